"""``moerge stats``: per-expert statistics for data-aware merges, computed once and saved as files.

* ``gram``   — for every linear layer, the Gram matrix of its inputs, ``G = XᵀX / rows`` over every
  non-padding token of the examples (RegMean, MaTS with the RegMean objective).
* ``fisher`` — the diagonal Fisher of every parameter, ``F = (1/N) Σₙ E_y[(∇θ log p(y|xₙ))²]``:
  ``empirical`` (y = the true label) or ``true`` (the exact expectation over the task's labels under the
  model's own label distribution). Computed one example at a time, so it is the real per-example
  Fisher, not the square of a batch gradient (Fisher merging).
* ``kfac``   — for every linear layer the two K-FAC factors of its Fisher block: the input Gram
  ``A = E[x xᵀ]`` and the output-gradient Gram ``S = E[g gᵀ]`` (g = ∂log p(y|x)/∂output per token),
  one example at a time (MaTS with the blockwise Fisher).

Statistics accumulate on the fly in float32 (never the activations of all layers); the result is a
sharded safetensors folder written atomically by moerge's writer, with ``moerge_stats.json`` saying
what produced it: the model's content hash, the data's content hash, the number of examples and
tokens, the estimator and every setting. Tensor names are the model's weight names (``gram``,
``fisher``) or ``<weight>::in`` / ``<weight>::out`` (``kfac``), so the engine can stream them next
to the weights.

Losses: decoder track, the log-probability of the label word after the task's prompt (over the whole
vocabulary; ``true`` takes the expectation over the label words, renormalised); encoder track, the
task head's log-softmax (the head is read from ``head.safetensors`` in the model folder).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moerge.errors import MoergeError
from moerge.runtime.batching import label_ids, left_padded, mean_pool, pad_id
from moerge.runtime.models import files_hash, load_head, load_model
from moerge.stats.format import KINDS, PARTS, part_names
from moerge.stats.format import META as STATS_META


class StatsError(MoergeError):
    """Statistics that cannot be computed or do not fit the model."""


@dataclass(frozen=True)
class StatsSettings:
    kind: str
    examples: int = 256
    batch_size: int = 8  # gram only; fisher and kfac go one example at a time
    max_length: int = 64
    estimator: str = "empirical"  # fisher/kfac: empirical | true
    seed: int = 0


class _Steps:
    """Progress and resumption of a statistics loop. The running sums are saved (at most once per
    ``interval`` seconds) into a hidden folder beside the output; a later run with the same model
    fingerprint, data hash and settings continues from the last save instead of starting over. Each
    save is a new file named by its step, made current by renaming the state file, so an interrupted
    save never corrupts the previous one."""

    def __init__(self, out: Path, key: dict[str, Any], progress: Callable[[int, int], None] | None,
                 interval: float = 60.0) -> None:
        self.dir = out.parent / f".{out.name}.partial"
        self.key, self.progress, self.interval = key, progress, interval
        self.last = time.monotonic()
        self.resumed = 0

    def start(self, acc: dict[str, torch.Tensor], counters: dict[str, Any]) -> int:
        """Load the last save into ``acc`` and ``counters`` (in place); return the step to start at."""
        from safetensors.torch import load_file

        state_path = self.dir / "state.json"
        try:
            state = json.loads(state_path.read_text())
            if state["key"] != self.key:
                raise ValueError("made by another model, data or settings")
            saved = load_file(str(self.dir / state["file"]))
            for name, value in acc.items():
                value.copy_(saved[name])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, RuntimeError):
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)  # unusable: start over
            return 0
        counters.update(state["counters"])
        self.resumed = int(state["step"])
        return self.resumed

    def done(self, step: int, total: int, acc: dict[str, torch.Tensor], counters: dict[str, Any]) -> None:
        """Step ``step`` of ``total`` is finished."""
        if self.progress:
            self.progress(step, total)
        if step < total and time.monotonic() - self.last >= self.interval:
            from safetensors.torch import save_file

            self.dir.mkdir(parents=True, exist_ok=True)
            name = f"sums-{step}.safetensors"
            save_file({k: v.contiguous() for k, v in acc.items()}, str(self.dir / name))
            tmp = self.dir / "state.json.tmp"
            tmp.write_text(json.dumps({"key": self.key, "step": step, "file": name, "counters": counters}))
            tmp.replace(self.dir / "state.json")
            for old in self.dir.glob("sums-*.safetensors"):
                if old.name != name:
                    old.unlink()
            self.last = time.monotonic()

    def finish(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def _linear_modules(model: Any, names: set[str]) -> dict[str, torch.nn.Linear]:
    """Linear layers whose weight is a tensor of the checkpoint (tied copies are skipped)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and f"{n}.weight" in names}


class _Batch:
    """The prompts of one batch, tokenised (left-padded), and what a loss needs."""

    def __init__(self, model: Any, tok: Any, track: str, task: Any, texts: Sequence[str], max_length: int):
        self.track = track
        device = next(model.parameters()).device
        if track == "decoder":
            pad = pad_id(tok)
            seqs = [list(tok(task.render(t) if task else t)["input_ids"])[-(max_length - 1):] for t in texts]
            self.inputs = left_padded(seqs, pad, device)
        else:
            enc = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            self.inputs = {k: v.to(device) for k, v in enc.items()}
        self.mask = self.inputs["attention_mask"].bool()


def compute_stats(model_dir: str | Path, out: str | Path, settings: StatsSettings, *, track: str,
                  task: str | None = None, texts: Sequence[str] | None = None, labels: Sequence[int] | None = None,
                  force: bool = False, progress: Callable[[int, int], None] | None = None,
                  save_interval: float = 60.0, allow_external_files: bool = False) -> dict[str, Any]:
    """Compute ``settings.kind`` statistics of one model over a task's train split (or given texts).
    The model's files must lie inside its folder unless ``allow_external_files``."""
    from moerge.data.tasks import Example, content_hash, get_task, make_splits
    from moerge.io.checkpoint import open_source
    from moerge.io.writer import ModelWriter

    if settings.kind not in KINDS:
        from moerge.errors import did_you_mean

        raise StatsError(f"unknown statistic {settings.kind!r}{did_you_mean(settings.kind, KINDS)}",
                         hint="one of: " + ", ".join(KINDS))
    if settings.estimator not in ("empirical", "true"):
        raise StatsError(f"unknown estimator {settings.estimator!r}", hint="empirical or true")
    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and not force:
        raise StatsError(f"{out} already exists", hint="pass --force to replace it")
    t = get_task(task) if task else None
    if texts is None:
        if t is None:
            raise StatsError("statistics need data: a task name or texts")
        from moerge.data.tasks import get_suite

        train = make_splits(t, get_suite("text").sizes).train[: settings.examples]  # the zoo's training split
        texts, labels = [e.text for e in train], [e.label for e in train]
    texts = list(texts)[: settings.examples]
    labels = list(labels)[: settings.examples] if labels is not None else None
    if settings.kind != "gram" and (labels is None or t is None):
        raise StatsError(f"{settings.kind} needs labelled examples of a task (a loss to differentiate)")
    data_hash = content_hash([Example(x, y) for x, y in zip(texts, labels or [0] * len(texts))])

    with open_source(model_dir, allow_external_files=allow_external_files) as ckpt:
        names, fingerprint = set(ckpt.tensor_names), ckpt.fingerprint()
    model, tok = load_model(model_dir, track, allow_external_files=allow_external_files)
    head = None
    if track == "encoder" and settings.kind != "gram":
        if not (model_dir / "head.safetensors").exists():
            raise StatsError(f"{model_dir}: no head.safetensors; encoder Fisher statistics need the task's head")
        head = load_head(model_dir / "head.safetensors")
    label_tokens = None
    if track == "decoder" and t is not None:
        label_tokens = [ids[0] for ids in label_ids(tok, t.words)]
    t0 = time.perf_counter()
    steps = _Steps(out, {"kind": settings.kind, "settings": settings.__dict__, "model": fingerprint,
                         "data": data_hash, "track": track}, progress, save_interval)
    if settings.kind == "gram":
        acc, rows = _gram(model, tok, track, t, texts, settings, names, steps)
    elif settings.kind == "fisher":
        acc, rows = _fisher(model, tok, track, t, texts, labels, settings, names, head, label_tokens, steps)
    else:
        acc, rows = _kfac(model, tok, track, t, texts, labels, settings, names, head, label_tokens, steps)
    seconds = time.perf_counter() - t0
    tensors = [(n, "float32", tuple(v.shape)) for n, v in acc.items()]
    norm = None
    if settings.kind == "fisher":  # Fisher merging's normalisation divides by each model's global norm
        norm = float(sum(float(v.double().square().sum()) for v in acc.values()) ** 0.5)
    meta = {
        "kind": settings.kind, "norm": norm, "estimator": settings.estimator if settings.kind != "gram" else None,
        "model": str(model_dir.resolve()), "model_hash": files_hash(model_dir),
        "model_fingerprint": fingerprint, "track": track,
        "task": t.name if t else None, "data_hash": data_hash, "examples": len(texts), "rows": rows,
        "settings": settings.__dict__, "seconds": round(seconds, 1), "tensors": len(tensors),
        "resumed_at_step": steps.resumed,
    }
    with ModelWriter(out, tensors, force=force, metadata={"format": "pt", "moerge_stats": settings.kind}) as w:
        for n, v in acc.items():
            w.write(n, v.contiguous())
        w.write_text(STATS_META, json.dumps(meta, indent=1))
        w.commit()
    steps.finish()
    return meta


def _rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The non-padding token rows of a [batch, seq, d] activation (a layer that sees only the last
    positions, like an LM head under ``logits_to_keep``, gets the mask's last columns)."""
    if x.dim() != 3:
        return x.reshape(-1, x.shape[-1])
    return x[mask[:, -x.shape[1]:]]


def _examples_in_batches(n: int, size: int) -> list[range]:
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def _gram(model: Any, tok: Any, track: str, task: Any, texts: Sequence[str], s: StatsSettings, names: set[str],
          steps: _Steps) -> tuple[dict[str, torch.Tensor], int]:
    mods = _linear_modules(model, names)
    acc = {f"{n}.weight": torch.zeros(m.in_features, m.in_features) for n, m in mods.items()}
    rows = {k: 0 for k in acc}
    state: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            # layers fed the same tensor (q/k/v, gate/up) share one product per batch
            key = (inputs[0].data_ptr(), tuple(inputs[0].shape))
            if key not in state["seen"]:
                x = _rows(inputs[0].detach().float(), state["mask"])
                # holding the input keeps its memory from being reused by a later tensor in this pass
                state["seen"][key] = (x.T @ x).cpu(), x.shape[0], inputs[0]
            xtx, n, _ = state["seen"][key]
            acc[name].add_(xtx)
            rows[name] += n
        return fn

    handles = [m.register_forward_pre_hook(hook(f"{n}.weight")) for n, m in mods.items()]
    try:
        model.eval()
        batches = _examples_in_batches(len(texts), s.batch_size)
        first = steps.start(acc, rows)
        with torch.no_grad():
            for k, idx in enumerate(batches):
                if k < first:
                    continue
                b = _Batch(model, tok, track, task, [texts[i] for i in idx], s.max_length)
                state["mask"], state["seen"] = b.mask, {}
                model(**b.inputs)
                steps.done(k + 1, len(batches), acc, rows)
    finally:
        for h in handles:
            h.remove()
    for k in acc:
        acc[k] /= max(1, rows[k])
    return acc, max(rows.values(), default=0)


def _log_probs(model: Any, b: _Batch, head: Any, label_tokens: list[int] | None) -> torch.Tensor:
    """log p(y | x) over the task's labels for one example: [n_labels] (decoder: over the whole vocabulary,
    read at the label words)."""
    if b.track == "decoder":
        logits = model(**b.inputs, logits_to_keep=1).logits[0, -1].float()
        return torch.log_softmax(logits, -1)[label_tokens]
    pooled = mean_pool(model(**b.inputs).last_hidden_state, b.inputs["attention_mask"])
    return torch.log_softmax(head(pooled)[0].float(), -1)


def _label_weights(logp: torch.Tensor, label: int, estimator: str) -> list[tuple[int, float]]:
    """(label, weight) pairs whose weighted squared gradients make one example's Fisher."""
    if estimator == "empirical":
        return [(label, 1.0)]
    p = torch.softmax(logp.detach(), -1)  # the model's distribution over the task's labels
    return [(y, float(p[y])) for y in range(len(p))]


def _fisher(model: Any, tok: Any, track: str, task: Any, texts: Sequence[str], labels: Sequence[int],
            s: StatsSettings, names: set[str], head: Any, label_tokens: list[int] | None,
            steps: _Steps) -> tuple[dict[str, torch.Tensor], int]:
    params = {n: p for n, p in model.named_parameters() if n in names}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    model.eval()
    first = steps.start(acc, {})
    for i, (text, label) in enumerate(zip(texts, labels)):
        if i < first:
            continue
        b = _Batch(model, tok, track, task, [text], s.max_length)
        logp = _log_probs(model, b, head, label_tokens)
        pairs = _label_weights(logp, label, s.estimator)
        for j, (y, w) in enumerate(pairs):
            grads = torch.autograd.grad(logp[y], list(params.values()), retain_graph=j < len(pairs) - 1,
                                        allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    acc[n].add_(g.float().square(), alpha=w)
        steps.done(i + 1, len(texts), acc, {})
    for v in acc.values():
        v /= max(1, len(texts))
    return acc, len(texts)


def _kfac(model: Any, tok: Any, track: str, task: Any, texts: Sequence[str], labels: Sequence[int],
          s: StatsSettings, names: set[str], head: Any, label_tokens: list[int] | None,
          steps: _Steps) -> tuple[dict[str, torch.Tensor], int]:
    mods = _linear_modules(model, names)
    acc: dict[str, torch.Tensor] = {}
    for n, m in mods.items():
        a_name, s_name = part_names(f"{n}.weight", "kfac")
        acc[a_name] = torch.zeros(m.in_features, m.in_features)
        acc[s_name] = torch.zeros(m.out_features, m.out_features)
    saved: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}
    for p in model.parameters():
        p.requires_grad_(False)

    def fwd(name: str) -> Callable[..., Any]:
        def fn(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            saved[name] = _rows(inputs[0].detach().float(), state["mask"])
            if output.requires_grad:  # keep a handle on the output to read its gradient
                output.register_hook(lambda g, _n=name: state["grads"].__setitem__(_n, g.detach().float()))
        return fn

    handles = [m.register_forward_hook(fwd(f"{n}.weight")) for n, m in mods.items()]
    count = {"tokens": 0}
    try:
        model.eval()
        first = steps.start(acc, count)
        for i, (text, label) in enumerate(zip(texts, labels)):
            if i < first:
                continue
            b = _Batch(model, tok, track, task, [text], s.max_length)
            state["mask"] = b.mask
            with torch.enable_grad():
                emb = model.get_input_embeddings()
                emb.weight.requires_grad_(True)  # a leaf that needs grad, so every layer's output does
                logp = _log_probs(model, b, head, label_tokens)
                pairs = _label_weights(logp, label, s.estimator)
                for name, x in saved.items():
                    acc[part_names(name, "kfac")[0]].addmm_(x.T, x)
                count["tokens"] += int(b.mask.sum())
                for j, (y, w) in enumerate(pairs):
                    state["grads"] = {}
                    logp[y].backward(retain_graph=j < len(pairs) - 1)
                    for name, g in state["grads"].items():
                        g = _rows(g, state["mask"])
                        acc[part_names(name, "kfac")[1]].addmm_(g.T, g, alpha=w)
                emb.weight.requires_grad_(False)
                emb.weight.grad = None
            steps.done(i + 1, len(texts), acc, count)
    finally:
        for h in handles:
            h.remove()
    tokens = count["tokens"]
    for k in acc:
        acc[k] /= max(1, tokens) if k.endswith(PARTS["kfac"][0]) else max(1, len(texts))
    return acc, tokens

