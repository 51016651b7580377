"""The encoder track: a sentence encoder, mean pooling, and one linear head per task.

Only the encoder is merged; each held-in task keeps its expert's head (the
setting of most merging papers). Held-out tasks have no head: they are scored by
a linear probe fitted on frozen features of the task's train split, so they
measure how useful the (merged) representation is for a task no expert saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moerge.runtime.batching import mean_pool


def pooled(model: Any, tok: Any, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """Mean-pooled last hidden states (gradients flow; call under no_grad to embed)."""
    enc = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    return mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])


@torch.no_grad()
def embed(model: Any, tok: Any, texts: Sequence[str], *, max_length: int = 64, batch_size: int = 64) -> torch.Tensor:
    """Features of many texts, batched by length (less padding), in the input order."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        out[idx] = pooled(model, tok, [texts[i] for i in idx], max_length).float().cpu()
    return out


def fit_probe(features: torch.Tensor, labels: Sequence[int], n_classes: int, *, l2: float = 1e-3,
              iterations: int = 200) -> torch.nn.Linear:
    """Multinomial logistic regression on fixed features (full-batch L-BFGS, deterministic)."""
    y = torch.tensor(list(labels))
    head = torch.nn.Linear(features.shape[1], n_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(features), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head
