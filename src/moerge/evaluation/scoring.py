"""Scoring a causal language model on a classification task by label log-likelihood.

For each input, the prompt is followed by each label word in turn and the
label whose word has the highest total log-probability wins. When every label
word is a single token, one forward pass per batch scores all labels (the next-
token distribution after the prompt); otherwise each label costs one pass.
The same model can therefore be scored zero-shot on tasks no expert saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moerge.runtime.batching import label_ids, left_padded, pad_id, padded


@torch.no_grad()
def label_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], words: Sequence[str], *,
                   batch_size: int = 16, max_length: int = 128) -> torch.Tensor:
    """[len(prompts), len(words)] total log-probability of each label word after each prompt.

    Prompts longer than ``max_length`` tokens keep their last tokens (the
    question at the end of the prompt matters more than the start of the text).
    Prompts are batched by length, so little compute goes to padding.
    """
    model.eval()
    words_ids = label_ids(tokenizer, words)
    longest = max(len(w) for w in words_ids)
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    out = torch.empty(len(prompts), len(words), dtype=torch.float64)
    prompt_ids = [list(tokenizer(p)["input_ids"])[-(max_length - longest):] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        batch = [prompt_ids[i] for i in idx]
        if longest == 1:  # one pass: the next-token distribution after each prompt
            logp = last_logprobs(model, batch, pad, device)
            out[idx] = logp[:, [w[0] for w in words_ids]].double().cpu()
            continue
        for j, w in enumerate(words_ids):
            seqs = [p + w for p in batch]
            out[idx, j] = _continuation_logprob(model, seqs, [len(w)] * len(seqs), pad, device)
    return out


def last_logits(model: Any, seqs: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """Logits of the token after each sequence, [batch, vocab] (only the last position goes through the head)."""
    inputs = left_padded(seqs, pad, device)
    try:
        logits = model(**inputs, logits_to_keep=1).logits
    except TypeError:  # a model class without logits_to_keep
        logits = model(**inputs).logits
    return logits[:, -1].float()


def last_logprobs(model: Any, seqs: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    return torch.log_softmax(last_logits(model, seqs, pad, device), dim=-1)


def _continuation_logprob(model: Any, seqs: list[list[int]], tail: list[int], pad: int,
                          device: torch.device) -> torch.Tensor:
    """Summed log-probability of the last ``tail[i]`` tokens of each sequence."""
    ids, mask = padded(seqs, pad, device, left=False)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    out = torch.zeros(len(seqs), dtype=torch.float64)
    for i, (s, k) in enumerate(zip(seqs, tail)):
        pos = torch.arange(len(s) - k - 1, len(s) - 1, device=device)
        out[i] = logp[i, pos, ids[i, pos + 1]].sum().double().cpu()
    return out


def accuracy(scores: torch.Tensor, labels: Sequence[int]) -> float:
    """Share of rows whose highest score is at the true label."""
    right = hits(scores, labels)
    return right.count("1") / len(right) if right else float("nan")


def hits(scores: torch.Tensor, labels: Sequence[int]) -> str:
    """Per row, "1" where the highest score is at the true label, else "0" (a compact record of which
    examples a model gets right, for paired comparisons of two models on the same examples)."""
    if len(labels) == 0:
        return ""
    pred = scores.argmax(dim=1)
    return "".join("1" if ok else "0" for ok in (pred == torch.tensor(list(labels))).tolist())
