"""Fine-tuning one expert (or the multitask oracle) on the tasks of a suite, on either track.

Decoder: the prompt, then the label word; the loss is the cross-entropy of the
label word's token at the end of the prompt (what scoring reads back).
Encoder: LP-FT, i.e. the head starts from a linear probe on the pretrained
features, then encoder and head are trained together (a fresh head would first
drag the encoder towards itself).

Full fine-tuning, or LoRA through PEFT (adapters saved in PEFT's layout).
Training is seeded; batches are drawn from a seeded permutation.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from moerge.data.tasks import Example, Task
from moerge.runtime.batching import label_ids, pad_id
from moerge.runtime.models import quiet_peft

LORA_TARGETS = {
    "decoder": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "encoder": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
}


@dataclass(frozen=True)
class TrainConfig:
    kind: str = "full"  # full | lora
    examples: int = 400  # training examples per task (at most the train split)
    epochs: int = 1
    lr: float = 3e-5
    head_lr: float = 1e-3  # encoder heads
    head_l2: float = 1e-3  # encoder: L2 penalty of the probe each head starts from (LP-FT)
    weight_decay: float = 0.0  # AdamW's, on the trained weights (encoder heads included)
    batch_size: int = 8
    max_length: int = 64
    seed: int = 0
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    warmup: float = 0.1  # share of steps with a linear warm-up, then linear decay

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULTS: dict[tuple[str, str], TrainConfig] = {
    ("decoder", "full"): TrainConfig("full", examples=400, epochs=1, lr=3e-5, batch_size=8, max_length=64),
    ("decoder", "lora"): TrainConfig("lora", examples=400, epochs=1, lr=5e-4, batch_size=8, max_length=64),
    ("encoder", "full"): TrainConfig("full", examples=1000, epochs=6, lr=1e-4, batch_size=32, max_length=64,
                                     weight_decay=0.01),
    # LoRA heads start from a strongly regularised probe: the default probe nearly fits the train split
    # already (train loss 0.28 on debates), which leaves an adapter no signal but to memorise it
    ("encoder", "lora"): TrainConfig("lora", examples=1000, epochs=6, lr=1e-3, batch_size=32, max_length=64,
                                     weight_decay=0.01, head_l2=0.1),
}


def default_config(track: str, kind: str, **overrides: Any) -> TrainConfig:
    return replace(DEFAULTS[(track, kind)], **{k: v for k, v in overrides.items() if v is not None})


Progress = Callable[[int, int, float], None]  # (step, total, loss)


def _schedule(opt: torch.optim.Optimizer, total: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    w = max(1, int(total * warmup))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / w if s < w else max(0.0, (total - s) / max(1, total - w)))


def _batches(data: dict[str, list[Example]], cfg: TrainConfig) -> list[tuple[str, list[Example]]]:
    """Seeded mini-batches; each batch holds one task.

    For the multitask oracle each task's batches are spread evenly over the whole run (batch i of n sits at
    (i + ½)/n; ties go in task order, which is round-robin when tasks are the same size): a small task is
    not trained only at the start and then forgotten."""
    rng = random.Random(cfg.seed)
    placed: list[tuple[float, int, tuple[str, list[Example]]]] = []
    for k, (name, examples) in enumerate(data.items()):
        batches = []
        for _ in range(cfg.epochs):
            order = list(examples)
            rng.shuffle(order)
            batches += [(name, order[i:i + cfg.batch_size]) for i in range(0, len(order), cfg.batch_size)]
        placed += [((i + 0.5) / len(batches), k, b) for i, b in enumerate(batches)]
    placed.sort(key=lambda p: (p[0], p[1]))
    return [b for _, _, b in placed]


def _lora(model: Any, track: str, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=LORA_TARGETS[track], bias="none")
    with quiet_peft():
        return get_peft_model(model, config)


# ---------------------------------------------------------------------------------------------- decoder


def train_decoder(model: Any, tok: Any, tasks: dict[str, Task], data: dict[str, list[Example]], cfg: TrainConfig,
                  progress: Progress | None = None) -> tuple[Any, dict[str, Any]]:
    """Fine-tune a causal LM in place (or wrap it in LoRA); returns (model, training log)."""
    from moerge.evaluation.scoring import last_logits

    torch.manual_seed(cfg.seed)
    if cfg.kind == "lora":
        model = _lora(model, "decoder", cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    label_token = {name: [ids[0] for ids in label_ids(tok, t.words)] for name, t in tasks.items()}
    pad = pad_id(tok)
    device = next(model.parameters()).device

    def loss_of(name: str, batch: list[Example]) -> torch.Tensor:
        seqs = [list(tok(tasks[name].render(ex.text))["input_ids"])[-(cfg.max_length - 1):] for ex in batch]
        target = torch.tensor([label_token[name][ex.label] for ex in batch], device=device)
        return torch.nn.functional.cross_entropy(last_logits(model, seqs, pad, device), target)

    return model, _fit(model, opt, params, _batches(data, cfg), loss_of, cfg, progress)


def _fit(model: Any, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter],
         batches: list[tuple[str, list[Example]]], loss_of: Callable[[str, list[Example]], torch.Tensor],
         cfg: TrainConfig, progress: Progress | None) -> dict[str, Any]:
    """The training loop both tracks share: warm-up then linear decay, gradient clipping at 1; the log."""
    sched = _schedule(opt, len(batches), cfg.warmup)
    model.train()
    t0, losses = time.perf_counter(), []
    for step, (name, batch) in enumerate(batches):
        loss = loss_of(name, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress:
            progress(step + 1, len(batches), _smooth(losses))
    model.eval()
    return _log(losses, batches, time.perf_counter() - t0)


def _smooth(losses: Sequence[float], k: int = 20) -> float:
    tail = losses[-k:]
    return sum(tail) / len(tail)


def _log(losses: Sequence[float], batches: Sequence[tuple[str, list[Example]]], seconds: float) -> dict[str, Any]:
    n = sum(len(b) for _, b in batches)
    return {"steps": len(batches), "sequences": n, "seconds": round(seconds, 1),
            "sequences_per_second": round(n / seconds, 2) if seconds else None,
            "loss_first": round(_smooth(losses[:20]), 4) if losses else None,
            "loss_last": round(_smooth(losses), 4) if losses else None,
            "loss_finite": all(math.isfinite(x) for x in losses)}


# ---------------------------------------------------------------------------------------------- encoder


def train_encoder(model: Any, tok: Any, heads: dict[str, torch.nn.Linear], data: dict[str, list[Example]],
                  cfg: TrainConfig, progress: Progress | None = None) -> tuple[Any, dict[str, Any]]:
    """Fine-tune an encoder and its task heads together (heads already initialised by a probe)."""
    from moerge.evaluation.encoder import pooled

    torch.manual_seed(cfg.seed)
    if cfg.kind == "lora":
        model = _lora(model, "encoder", cfg)
    enc_params = [p for p in model.parameters() if p.requires_grad]
    head_params = [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW([{"params": enc_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}],
                            weight_decay=cfg.weight_decay)

    def loss_of(name: str, batch: list[Example]) -> torch.Tensor:
        feats = pooled(model, tok, [ex.text for ex in batch], cfg.max_length)
        target = torch.tensor([ex.label for ex in batch], device=feats.device)
        return torch.nn.functional.cross_entropy(heads[name](feats), target)

    return model, _fit(model, opt, enc_params + head_params, _batches(data, cfg), loss_of, cfg, progress)
