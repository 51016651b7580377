"""Router-only training of an MoE: every router row learns, every other parameter stays frozen.

The objective is the causal-LM loss of the targets of the union of the experts' data (prompt/target
samples, shuffled with the seed) plus ``aux_coef`` × the load-balancing loss as transformers computes it
for the class (``aux_loss`` of ``output_router_logits``: Switch's E·Σ fᵢ·Pᵢ with fᵢ the *fraction of tokens*
routed to expert i; BTX writes the mean gate value instead, a convention noted in docs/upcycling.md). Top-k
routing as the model runs it. AdamW on the router rows only.

Resumable: every ``save_every`` steps the rows, the optimizer's moments and the loss curve so far are
written (safetensors + JSON, never a pickle) to a state folder beside the output; a rerun with the same
settings continues from there and gives what an uninterrupted run gives.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class RouterTraining:
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    aux_coef: float = 0.01  # BTX's α
    max_length: int = 256
    examples: int = 256  # per data source
    seed: int = 0
    save_every: int = 10

    def key(self, model_hash: str, data: list[str]) -> str:
        blob = json.dumps({"settings": {k: v for k, v in asdict(self).items() if k != "save_every"},
                           "model": model_hash, "data": data}, sort_keys=True)
        return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def _router_params(model: Any) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}


def train_router(model: Any, tok: Any, samples: list[Any], settings: RouterTraining, state: Path,
                 key: str, log: Any = None) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Train the router rows of ``model`` (in place) on ``samples``; returns the rows by parameter name and
    the loss curve (one entry per step: total, language-model and load-balancing loss)."""
    from safetensors.torch import load_file, save_file

    from moerge.data.samples import encode

    routers = _router_params(model)
    if not routers:
        raise ValueError("the model has no mlp.gate.weight router parameters")
    for n, p in model.named_parameters():
        p.requires_grad_(n in routers)
    opt = torch.optim.AdamW(list(routers.values()), lr=settings.lr, weight_decay=0.0)
    order = list(range(len(samples)))
    random.Random(settings.seed).shuffle(order)
    curve: list[dict[str, float]] = []
    start = 0
    meta_path, tensors_path = state / "state.json", state / "state.safetensors"
    if meta_path.exists() and tensors_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            saved = load_file(tensors_path)
            with torch.no_grad():
                for n, p in routers.items():
                    p.copy_(saved[f"row/{n}"])
                    opt.state[p] = {"step": torch.tensor(float(meta["step"])), "exp_avg": saved[f"m/{n}"].clone(),
                                    "exp_avg_sq": saved[f"v/{n}"].clone()}
            start, curve = int(meta["step"]), list(meta["curve"])
    model.train()
    device = next(model.parameters()).device
    for step in range(start, settings.steps):
        pos = (step * settings.batch_size) % len(order)
        idx = [order[(pos + j) % len(order)] for j in range(settings.batch_size)]
        batch = encode(tok, [samples[i] for i in idx], settings.max_length, device)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
        logits = out.logits.float()
        lm = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
        aux = out.aux_loss if getattr(out, "aux_loss", None) is not None else torch.zeros(())
        loss = lm + settings.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append({"step": step + 1, "loss": float(loss.detach()), "lm": float(lm.detach()),
                      "balance": float(aux.detach())})
        if log is not None:
            log(step + 1, settings.steps, curve[-1])
        if (step + 1) % settings.save_every == 0 or step + 1 == settings.steps:
            _save_state(state, routers, opt, key, step + 1, curve, save_file)
    model.eval()
    return {n: p.detach().clone() for n, p in routers.items()}, curve


def _save_state(state: Path, routers: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer, key: str,
                step: int, curve: list[dict[str, float]], save_file: Any) -> None:
    state.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for n, p in routers.items():
        tensors[f"row/{n}"] = p.detach().contiguous().clone()
        st = opt.state[p]
        tensors[f"m/{n}"] = st["exp_avg"].contiguous().clone()
        tensors[f"v/{n}"] = st["exp_avg_sq"].contiguous().clone()
    tmp = state / ".state.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(state / "state.safetensors")
    meta = state / ".state.json.tmp"
    meta.write_text(json.dumps({"key": key, "step": step, "curve": curve}))
    meta.replace(state / "state.json")


def train_saved_moe(path: Path, samples: list[Any], data: list[str], settings: RouterTraining, state: Path,
                    device: str, progress: Any = None) -> tuple[dict[int, torch.Tensor], list[dict[str, float]]]:
    """Load the MoE at ``path`` (safetensors only, no remote code), train its router rows on ``samples``
    with the state kept in ``state``; returns the rows by layer and the loss curve."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moerge.runtime.models import check_files, files_hash

    check_files(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False).to(device)
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows, curve = train_router(model, tok, samples, settings, state, settings.key(files_hash(path), data), progress)
    return {int(n.split(".")[2]): r for n, r in rows.items()}, curve


def loss_plot(curve: list[dict[str, float]], path: Path) -> None:
    """The loss curve as a PNG (total, language-model and load-balancing loss per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    steps = [c["step"] for c in curve]
    for k in ("loss", "lm", "balance"):
        ax.plot(steps, [c[k] for c in curve], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("router-only training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
