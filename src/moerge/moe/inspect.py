"""``moerge moe inspect``: what an MoE checkpoint is, how its routers look, and which experts data uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moerge.moe.view import open_moe


def router_stats(rows: torch.Tensor) -> dict[str, float]:
    """Row norms, the largest |cosine| between two rows, and the condition number of one layer's (E, H) rows."""
    w = rows.double()
    norms = w.norm(dim=1)
    unit = w / norms.clamp(min=1e-12)[:, None]
    cos = (unit @ unit.T).abs().fill_diagonal_(0.0)
    return {"norm_min": float(norms.min()), "norm_max": float(norms.max()), "max_abs_cos": float(cos.max()),
            "cond": float(torch.linalg.cond(w))}


def expert_usage(model: Any, batches: list[dict[str, torch.Tensor]], top_k: int) -> dict[str, list[list[float]]]:
    """Per layer and expert: the fraction of real tokens whose top-k includes the expert, and the mean
    routing probability (softmax over all experts) it gets."""
    chosen: list[torch.Tensor] | None = None
    prob: list[torch.Tensor] | None = None
    tokens = 0
    for batch in batches:
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
        keep = batch["attention_mask"].reshape(-1).bool()
        logits = [lg.reshape(-1, lg.shape[-1])[keep].float() for lg in out.router_logits]  # L × (N, E)
        if chosen is None:
            chosen = [torch.zeros(lg.shape[-1], dtype=torch.float64) for lg in logits]
            prob = [torch.zeros(lg.shape[-1], dtype=torch.float64) for lg in logits]
        assert prob is not None
        for k, lg in enumerate(logits):
            top = lg.topk(top_k, dim=-1).indices
            chosen[k] += torch.bincount(top.reshape(-1), minlength=lg.shape[-1]).double()
            prob[k] += lg.softmax(-1).sum(0).double()
        tokens += int(keep.sum())
    assert chosen is not None and prob is not None
    return {"chosen": [(c / tokens).tolist() for c in chosen], "probability": [(p / tokens).tolist() for p in prob],
            "tokens": tokens}  # type: ignore[dict-item]


def inspect_moe(path: str | Path, *, data: str | None = None, examples: int = 32, max_length: int = 256,
                device: str = "cpu") -> dict[str, Any]:
    """The structure of the MoE at ``path`` and its routers' statistics per layer; with ``data`` (a task or
    a JSONL of prompt/target rows), the per-layer use of each expert on its first ``examples`` examples."""
    with open_moe(path) as view:
        info: dict[str, Any] = {
            "architecture": view.arch.class_name, "layers": view.layers, "experts": view.experts,
            "experts_per_token": view.top_k, "norm_topk_prob": view.norm_topk_prob, "shared_expert": view.shared,
            "layout": view.layout + (" (transposed)" if view.transposed else ""),
            "expert_width": view.width, "hidden": view.hidden,
            "routers": [router_stats(view.router(k)) for k in range(view.layers)],
        }
    if data is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from moerge.data.samples import encode, load_samples
        from moerge.runtime.models import check_files

        check_files(Path(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True,
                                                     trust_remote_code=False).to(device).eval()
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        samples = load_samples(data, limit=examples)
        batches = [encode(tok, samples[s:s + 8], max_length, torch.device(device)) for s in range(0, len(samples), 8)]
        info["usage"] = expert_usage(model, batches, view.top_k) | {"data": data}
    return info
