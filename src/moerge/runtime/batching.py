"""Token ids into model inputs: the pad token, padding on either side, label tokens, mean pooling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else its end-of-sequence token, else 0 (positions under the mask)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0


def padded(seqs: Sequence[Sequence[int]], pad: int, device: torch.device, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask of a batch, ``(B, T)`` each, padded on the left (decoders reading the next
    token at the last position) or on the right."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(n - len(s), n) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(list(s), dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def left_padded(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded ids, attention mask and position ids (positions start at 0 at each sequence's first token)."""
    ids, mask = padded(seqs, pad, device, left=True)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


def label_ids(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """Token ids of each label word as it follows a prompt (words start with their space)."""
    out = [list(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words]
    for w, ids in zip(words, out):
        if not ids:
            raise ValueError(f"label word {w!r} has no tokens")
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states ``(B, T, E)`` over the tokens the attention mask ``(B, T)`` keeps: ``(B, E)``."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
