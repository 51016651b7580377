"""Scoring a model folder on the tasks of a suite, with results cached by content.

A model is a Hugging Face folder (full weights) or a PEFT LoRA adapter folder
(applied to its base first). Each (model weights, heads, task, split, settings)
score is cached in ``CACHE/eval`` under a hash of the model files and of the
split's content, so re-running a report or a sweep never scores twice.

Decoder track: label-word log-likelihood after the task's prompt (zero-shot
for any task). Encoder track: a held-in task uses its expert's head
(``heads/<task>/head.safetensors``); a held-out task, or any task with
``probe_only``, a linear probe fitted on the model's frozen features of the
task's train split. A held-out task's own expert is scored with its own head
(:class:`OwnHeadEvaluator`): it is the reference held-out accuracy is
normalised by, and its head never scores another model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moerge.data.tasks import Splits, TaskError, get_suite, get_task, suite_splits
from moerge.evaluation.models import check_track, default_cache
from moerge.runtime.models import files_hash, load_model

SCORING_VERSION = 1
EXPERT_META = "moerge_expert.json"


@dataclass(frozen=True)
class EvalSettings:
    suite: str
    track: str
    split: str = "test"  # validation | test
    limit: int | None = None  # at most this many examples per task (the split's first ones; splits are shuffled)
    max_length: int = 64
    seed: int = 0  # the split seed
    probe_examples: int = 1000  # train examples for a linear probe

    def __post_init__(self) -> None:
        check_track(self.track)
        get_suite(self.suite)
        if self.split not in ("validation", "test"):
            raise TaskError(f"unknown split {self.split!r}", hint="validation or test (train is for training)")


def splits_for(settings: EvalSettings, task: str) -> Splits:
    return suite_splits(settings.suite, task, settings.seed)


class Evaluator:
    """Scores models on one suite/track/split; one model is loaded at a time."""

    def __init__(self, settings: EvalSettings, *, heads: Path | None = None, cache: Path | None = None):
        self.settings = settings
        self.heads = heads
        self.held_in = set(get_suite(settings.suite).held_in)
        self.cache = (cache or default_cache()) / "eval"
        self._splits: dict[str, Splits] = {}

    def split(self, task: str) -> Splits:
        if task not in self._splits:
            self._splits[task] = splits_for(self.settings, task)
        return self._splits[task]

    def examples(self, task: str) -> list[Any]:
        ex = self.split(task)[self.settings.split]
        return ex[: self.settings.limit] if self.settings.limit else ex

    def head_path(self, task: str) -> Path | None:
        """A held-in task's head under ``heads``; None (probe) for a held-out task."""
        if self.heads is None or task not in self.held_in:
            return None
        p = self.heads / task / "head.safetensors"
        return p if p.exists() else None

    def _key(self, model_hash: str, task: str, mode: str) -> Path:
        s = self.settings
        sp = self.split(task)
        head = self.head_path(task) if mode == "head" else None
        parts = [model_hash, s.track, task, s.split, sp.hashes[s.split], str(s.limit), str(s.max_length), mode,
                 files_hash(head.parent, ("head.safetensors",)) if head else "-",
                 sp.hashes["train"] if mode == "probe" else "-", str(s.probe_examples), str(SCORING_VERSION)]
        return self.cache / model_hash / (hashlib.blake2b("/".join(parts).encode(), digest_size=8).hexdigest()
                                          + ".json")

    def mode(self, task: str, probe: bool) -> str:
        if self.settings.track == "decoder":
            return "label-words"
        return "head" if not probe and self.head_path(task) is not None else "probe"

    def score(self, model_dir: str | os.PathLike[str], tasks: list[str] | None = None, *,
              probe_only: bool = False) -> dict[str, float]:
        """Accuracy per task (cached); ``probe_only`` scores every encoder task with a linear probe."""
        return {t: r["accuracy"] for t, r in self.results(model_dir, tasks, probe_only=probe_only).items()}

    def results(self, model_dir: str | os.PathLike[str], tasks: list[str] | None = None, *,
                probe_only: bool = False) -> dict[str, dict[str, Any]]:
        """The cached result of each task (accuracy, per-example hits, settings), scoring what is missing.
        A cached result without per-example hits (written before they were kept) is scored again."""
        folder = Path(model_dir)
        tasks = tasks or list(get_suite(self.settings.suite).tasks)
        h = files_hash(folder)
        out: dict[str, dict[str, Any]] = {}
        todo = []
        for t in tasks:
            key = self._key(h, t, self.mode(t, probe_only))
            cached = json.loads(key.read_text()) if key.exists() else None
            if cached is not None and "correct" in cached:
                out[t] = cached
            else:
                todo.append((t, key))
        if todo:
            model, tok = load_scored(folder, self.settings.track)
            for t, key in todo:
                correct = self._score_one(model, tok, t, self.mode(t, probe_only))
                out[t] = {"accuracy": correct.count("1") / len(correct) if correct else float("nan"),
                          "correct": correct, "model": str(folder), "task": t,
                          "settings": asdict(self.settings), "mode": self.mode(t, probe_only), "n": len(correct)}
                key.parent.mkdir(parents=True, exist_ok=True)
                tmp = key.with_suffix(".tmp")
                tmp.write_text(json.dumps(out[t]))
                tmp.replace(key)
            del model
        return {t: out[t] for t in tasks}

    def _score_one(self, model: Any, tok: Any, task_name: str, mode: str) -> str:
        from moerge.evaluation.scoring import hits, label_logprobs

        task, ex = get_task(task_name), self.examples(task_name)
        labels = [e.label for e in ex]
        if mode == "label-words":
            scores = label_logprobs(model, tok, [task.render(e.text) for e in ex], task.words,
                                    max_length=self.settings.max_length, batch_size=16)
            return hits(scores, labels)
        from moerge.evaluation.encoder import embed, fit_probe
        from moerge.runtime.models import load_head

        feats = embed(model, tok, [e.text for e in ex], max_length=self.settings.max_length)
        if mode == "head":
            head = load_head(self.head_path(task_name))  # type: ignore[arg-type]
        else:
            train = self.split(task_name).train[: self.settings.probe_examples]
            tf = embed(model, tok, [e.text for e in train], max_length=self.settings.max_length)
            head = fit_probe(tf, [e.label for e in train], len(task.labels))
        with torch.no_grad():
            return hits(head(feats), labels)


def load_scored(folder: Path, track: str) -> tuple[Any, Any]:
    """(model, tokenizer) of anything a model is accepted as: a model folder, a PEFT adapter, a routed bundle
    (its base with routed layers, and the base's tokenizer)."""
    from moerge.routing.bundle import is_bundle

    if not is_bundle(folder):
        return load_model(folder, track)
    from transformers import AutoTokenizer

    from moerge.routing.load import load_routed

    model = load_routed(folder)
    return model, AutoTokenizer.from_pretrained(str(model.moerge_routing["base"]["path"]))


class OwnHeadEvaluator(Evaluator):
    """Scores a single-task encoder expert on its task with the head stored in its own folder (held-in or
    held-out: this is the fine-tuned reference accuracy)."""

    def __init__(self, settings: EvalSettings, folder: Path, task: str):
        super().__init__(settings, heads=folder.parent)
        self._folder, self._task = folder, task

    def head_path(self, task: str) -> Path | None:
        p = self._folder / "head.safetensors"
        return p if task == self._task and p.exists() else None
