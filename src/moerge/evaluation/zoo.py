"""``moerge zoo build``: fine-tune one expert per task of a suite, once, into a cached folder.

Layout of a zoo (every model folder is a plain Hugging Face folder)::

    ZOO/<track>/pretrained/            the base every expert starts from (a saved copy)
    ZOO/<track>/<kind>/<task>/         one expert per task: full weights, or a PEFT LoRA adapter
        moerge_expert.json             task, data hashes, training settings, time, validation accuracy
        head.safetensors               encoder track: the task's linear head
    ZOO/<track>/<kind>/multitask/      optional: one model trained on every held-in task (the oracle)

Experts for held-out tasks are built too, but never merged: they give the
"fine-tuned on this task" accuracy that held-out results are normalised by.
Each expert is written into a temporary sibling and published atomically when
complete (:mod:`moerge.io.publish`), so an interrupted build resumes at the first
missing expert. An expert already built
with other training settings than those asked for is an error, never silently
reused; ``rebuild`` retrains it.

Each expert's metadata file also fingerprints it: a comparison records the
fingerprint of the zoo it scored against, so results of an older zoo are never
mixed into a table with results of a rebuilt one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moerge.data.tasks import TaskError, get_suite, get_task, make_splits
from moerge.evaluation.evaluate import EXPERT_META, EvalSettings, Evaluator, OwnHeadEvaluator
from moerge.evaluation.models import check_track, pretrained_path
from moerge.evaluation.train import TrainConfig, default_config
from moerge.io.publish import Publication, is_temporary

MULTITASK = "multitask"
Report = Callable[[str, int, int, float], None]  # (label, step, total, loss)


def pretrained_dir(zoo: Path, track: str) -> Path:
    return zoo / track / "pretrained"


def expert_dir(zoo: Path, track: str, kind: str, task: str) -> Path:
    return zoo / track / kind / task


def stats_dir(zoo: Path, track: str, kind: str, stat: str, task: str) -> Path:
    """Where an expert's ``moerge stats`` folder lives in the zoo."""
    return zoo / track / f"{kind}-stats" / stat / task


def read_meta(folder: Path) -> dict[str, Any] | None:
    p = folder / EXPERT_META
    return json.loads(p.read_text()) if p.exists() else None


def fingerprint(folder: Path) -> str | None:
    """A short hash of a zoo model's metadata file (it holds the training log and time, so every build differs)."""
    p = folder / EXPERT_META
    return hashlib.blake2b(p.read_bytes(), digest_size=6).hexdigest() if p.exists() else None


def zoo_fingerprint(zoo: Path, track: str, kind: str, suite_name: str) -> str:
    """One hash of every zoo model a comparison depends on: the pretrained model, the ``kind`` experts of
    the held-in tasks (merged, and the normalisers of held-in accuracy) and the full experts of the
    held-out tasks (their normalisers). The multitask oracle is not part of it (building it later changes
    no other result); its record carries its own fingerprint."""
    suite = get_suite(suite_name)
    parts = [f"pretrained={fingerprint(pretrained_dir(zoo, track))}"]
    parts += [f"{kind}/{t}={fingerprint(expert_dir(zoo, track, kind, t))}" for t in suite.held_in]
    parts += [f"full/{t}={fingerprint(expert_dir(zoo, track, 'full', t))}" for t in suite.held_out]
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=6).hexdigest()


def changed_settings(built: dict[str, Any], wanted: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Training settings that differ between an expert's metadata and the requested configuration.
    Only settings the metadata records are compared: a setting added to the code later defaults to the
    behaviour older builds had."""
    return {k: (v, wanted[k]) for k, v in built.items() if k in wanted and wanted[k] != v}


def ensure_pretrained(zoo: Path, track: str, source: Path | None = None) -> Path:
    """Save the track's pretrained model (or ``source``) into the zoo once (one layout for base and experts)."""
    out = pretrained_dir(zoo, track)
    if (out / EXPERT_META).exists():
        return out
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    src = source or pretrained_path(track)
    cls = AutoModelForCausalLM if track == "decoder" else AutoModel
    model = cls.from_pretrained(str(src), dtype=torch.float32)
    with Publication(out, force=True) as pub:
        model.save_pretrained(pub.tmp)
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(pub.tmp)
        (pub.tmp / EXPERT_META).write_text(json.dumps({"role": "pretrained", "track": track, "source": str(src)},
                                                      indent=1))
        return pub.commit()


def build_zoo(suite_name: str, zoo: Path, *, track: str, kind: str = "full", tasks: list[str] | None = None,
              multitask: bool = False, report: Report | None = None, pretrained: Path | None = None,
              rebuild: bool = False, **overrides: Any) -> list[dict[str, Any]]:
    """Build every missing expert of a suite; returns the metadata of all of them.

    An expert already built with the requested settings is reused; one built with other settings raises
    :class:`TaskError` unless ``rebuild`` is set, which retrains the experts of ``tasks`` (the old one is
    replaced only when the new one is complete). ``pretrained`` replaces the track's real model (tests
    use tiny random ones)."""
    check_track(track)
    suite = get_suite(suite_name)
    cfg = default_config(track, kind, **overrides)
    base = ensure_pretrained(zoo, track, pretrained)
    names = tasks or list(suite.tasks)
    jobs: list[tuple[str, list[str]]] = [(t, [t]) for t in names]
    if multitask:
        jobs.append((MULTITASK, list(suite.held_in)))
    metas = []
    for name, job_tasks in jobs:
        out = expert_dir(zoo, track, kind, name)
        meta = None if rebuild else read_meta(out)
        if meta is not None:
            changed = changed_settings(meta.get("train", {}), cfg.to_dict())
            if changed:
                diff = ", ".join(f"{k} {old!r} (asked {new!r})" for k, (old, new) in sorted(changed.items()))
                raise TaskError(f"{out}: this expert was built with other settings: {diff}",
                                hint=f"add --rebuild to retrain it (with --tasks {name} for this one only), or "
                                     "build into another folder with --zoo")
        if meta is None:
            meta = _build_one(suite_name, base, out, track, job_tasks, cfg, zoo,
                              (lambda s, n, loss, _l=name: report(_l, s, n, loss)) if report else None)
        metas.append(meta)
    return metas


def _build_one(suite_name: str, base: Path, out: Path, track: str, tasks: list[str], cfg: TrainConfig, zoo: Path,
               progress: Callable[[int, int, float], None] | None) -> dict[str, Any]:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    suite = get_suite(suite_name)
    splits = {t: make_splits(t, suite.sizes, seed=0) for t in tasks}
    data = {t: splits[t].train[: cfg.examples] for t in tasks}
    with Publication(out, force=True) as pub:
        meta = _train_into(pub.tmp, suite_name, base, out, track, tasks, cfg, splits, data, progress)
        pub.commit()
    return meta


def _train_into(tmp: Path, suite_name: str, base: Path, out: Path, track: str, tasks: list[str], cfg: TrainConfig,
                splits: dict[str, Any], data: dict[str, Any],
                progress: Callable[[int, int, float], None] | None) -> dict[str, Any]:
    """Train, save and validate one expert into the folder ``tmp`` (published by the caller)."""
    from moerge.runtime.models import load_model

    model, tok = load_model(base, track)
    t0 = time.perf_counter()
    if track == "decoder":
        from moerge.evaluation.train import train_decoder

        model, log = train_decoder(model, tok, {t: get_task(t) for t in tasks}, data, cfg, progress)
    else:
        from moerge.evaluation.encoder import embed, fit_probe
        from moerge.evaluation.train import train_encoder
        from moerge.runtime.models import save_head

        heads = {}
        for t in tasks:  # LP-FT: start each head from a probe on the pretrained features
            feats = embed(model, tok, [e.text for e in data[t]], max_length=cfg.max_length)
            heads[t] = fit_probe(feats, [e.label for e in data[t]], len(get_task(t).labels), l2=cfg.head_l2)
        model, log = train_encoder(model, tok, heads, data, cfg, progress)
        for t in tasks:
            target = tmp if len(tasks) == 1 else tmp / "heads" / t
            target.mkdir(parents=True, exist_ok=True)
            save_head(heads[t], target / "head.safetensors", t)
    seconds = time.perf_counter() - t0
    if not log["loss_finite"]:
        raise RuntimeError(f"training {out.name} diverged (non-finite loss); lower the learning rate")
    if cfg.kind == "lora":
        model.save_pretrained(str(tmp))  # PEFT layout: adapter_config.json + adapter_model.safetensors
        cfg_path = tmp / "adapter_config.json"
        ac = json.loads(cfg_path.read_text())
        ac["base_model_name_or_path"] = str(base.resolve())
        cfg_path.write_text(json.dumps(ac, indent=2))
    else:
        model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    meta: dict[str, Any] = {
        "role": "multitask" if len(tasks) > 1 else "expert", "track": track, "kind": cfg.kind, "tasks": tasks,
        "suite": suite_name, "base": str(base.resolve()), "train": cfg.to_dict(), "log": log,
        "data": {t: {"train_examples": len(data[t]), **splits[t].hashes} for t in tasks},
        "seconds": round(seconds, 1), "machine": f"{platform.node()} ({os.cpu_count()} cpus)",
    }
    (tmp / EXPERT_META).write_text(json.dumps(meta, indent=1))
    del model
    # validation accuracy of this expert and of the pretrained model on its own task(s)
    settings = EvalSettings(suite_name, track, "validation")
    if track == "encoder" and len(tasks) == 1:  # the head sits in the expert folder itself
        mine: Evaluator = OwnHeadEvaluator(settings, tmp, tasks[0])
    else:
        mine = Evaluator(settings, heads=tmp / "heads" if track == "encoder" else None)
    ev = Evaluator(settings)
    meta["validation"] = mine.score(tmp, tasks)
    meta["validation_pretrained"] = ev.score(base, tasks, probe_only=True)
    (tmp / EXPERT_META).write_text(json.dumps(meta, indent=1))
    return meta


def list_experts(zoo: Path, track: str, kind: str) -> dict[str, dict[str, Any]]:
    root = zoo / track / kind
    out = {}
    if root.exists():
        for d in sorted(root.iterdir()):
            meta = read_meta(d) if d.is_dir() and not d.name.endswith(".partial") and not is_temporary(d) else None
            if meta:
                out[d.name] = meta
    return out
