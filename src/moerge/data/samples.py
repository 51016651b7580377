"""Data sources of routers and router rows: a task name (its train split in the suite, each example's
prompt and label word, the objective the zoo's experts were trained with) or a JSONL file of
``{"prompt": ..., "target": ...}`` rows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moerge.errors import MoergeError
from moerge.io.untrusted import read_regular


@dataclass(frozen=True)
class Sample:
    prompt: str
    target: str


def load_samples(source: str, *, suite: str = "text", limit: int | None = None) -> list[Sample]:
    """The samples of one data source (at most ``limit``, in order)."""
    path = Path(source)
    if path.suffix == ".jsonl" or path.is_file():
        out = []
        text = read_regular(path, max_bytes=1 << 30, error=MoergeError).decode("utf-8", errors="strict")
        for k, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoergeError(f"{path}:{k}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or \
                    not isinstance(row.get("target"), str) or not row["target"]:
                raise MoergeError(f"{path}:{k}: each line must be an object with string \"prompt\" and a "
                                  "non-empty string \"target\"")
            out.append(Sample(row["prompt"], row["target"]))
        if not out:
            raise MoergeError(f"{path}: holds no examples")
        return out[:limit]
    from moerge.data.tasks import get_task, suite_splits

    task = get_task(source)
    train = suite_splits(suite, source).train
    return [Sample(task.render(ex.text), task.words[ex.label]) for ex in train[:limit]]


def encode(tok: Any, samples: Sequence[Sample], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 outside the target): the prompt is cut from the
    left so the target always fits."""
    seqs, labels = [], []
    for s in samples:
        p = list(tok(s.prompt)["input_ids"])
        t = list(tok(s.target, add_special_tokens=False)["input_ids"])[:max_length - 1]
        p = p[-(max_length - len(t)):]
        seqs.append(p + t)
        labels.append([-100] * len(p) + t)
    n = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, (s, y) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        lab[i, :len(y)] = torch.tensor(y)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": lab.to(device)}
