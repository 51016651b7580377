"""Examples that trained routers learn from: (prompt, target) pairs (:mod:`moerge.data.samples`), the
causal-LM objective on the target."""

from __future__ import annotations

from typing import Any

import torch

from moerge.data.samples import Sample, encode, load_samples

__all__ = ["Sample", "encode", "load_samples", "per_example_loss", "target_loss"]


def target_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the target tokens (each sequence's next-token predictions under the labels)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=-100)


def per_example_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed target cross-entropy of each sequence, [B] (LoraHub's objective)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                           ignore_index=-100, reduction="none")
    return ce.sum(1)
