"""The Python entry points; the CLI is a thin layer over these.

>>> import moerge
>>> moerge.merge("recipe.yaml", "./merged")          # doctest: +SKIP
>>> moerge.inspect("./merged")                        # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.errors import MoergeError
from moerge.io.publish import TMP_MARK, check_not_an_input
from moerge.io.writer import ModelWriter, parse_size
from moerge.recipe import LoadedRecipe, Recipe, load_recipe
from moerge.version import __version__

if TYPE_CHECKING:
    from moerge.engine.plan import Plan


@dataclass
class MergeResult:
    """What a merge did: where it wrote, what it planned, how long it took."""

    output: Path | None
    summary: dict[str, Any]
    seconds: float
    notes: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def merge(
    recipe: str | os.PathLike[str] | dict[str, Any] | Recipe,
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    shard_size: str | int = "5GB",
    device: str | None = "cpu",
    allow_pickle: bool = False,
    allow_external_files: bool = False,
    allow_nonfinite: bool = False,
    dry_run: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    lora_rank: int | None = None,
) -> MergeResult:
    """Merge the models of ``recipe`` into ``out_dir`` (a Hugging Face model directory).

    ``recipe`` is a YAML path, YAML text, a dict or a :class:`Recipe`, in moerge's
    or mergekit's format. The output appears atomically; an existing ``out_dir``
    is replaced only with ``force``. ``progress(tensor_name, done, total)`` is
    called after each tensor. With ``dry_run`` everything is validated and
    planned, and nothing is written. With ``lora_rank``, the merge is written as a
    PEFT LoRA adapter of the base model instead (truncated SVD of each linear
    layer's change, see :func:`moerge.extract.extract_lora`); ``notes["lora"]``
    says how much of the change the rank cut discarded. Every file a model folder names must lie
    inside it (no index entry or link leads out) unless ``allow_external_files``.
    """
    from moerge.engine.plan import make_plan

    t0 = time.perf_counter()
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe)
    plan = make_plan(loaded, allow_pickle=allow_pickle, allow_external_files=allow_external_files)
    try:
        out = final = Path(out_dir)
        size = parse_size(shard_size)
        check_not_an_input(final, [f for c in plan.checkpoints for f in c.files])
        if lora_rank is not None:
            out = _lora_staging(plan, final, force, lora_rank)
        if dry_run:
            return MergeResult(None, plan.summary(), time.perf_counter() - t0, warnings=plan.warnings)
        path, stats, notes = _write_merge(plan, out, size=size, force=force or lora_rank is not None,
                                          device=device, allow_nonfinite=allow_nonfinite, progress=progress)
    finally:
        plan.close()
    if lora_rank is not None:
        path, notes["lora"] = _write_lora(path, plan, final, lora_rank, force)
    summary = plan.summary() | {"bytes_read": stats.bytes_read, "prepass_seconds": stats.prepass_seconds}
    return MergeResult(path, summary, time.perf_counter() - t0, notes, plan.warnings)


def upcycle(
    recipe: str | os.PathLike[str] | dict[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    layout: str | None = None,
    force: bool = False,
    shard_size: str | int = "5GB",
    device: str | None = "cpu",
    allow_pickle: bool = False,
    allow_external_files: bool = False,
    allow_nonfinite: bool = False,
    dry_run: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    train_router: int | None = None,
) -> MergeResult:
    """Upcycle the dense experts of ``recipe`` (mergekit-moe's YAML, or moerge's with ``non_experts``
    for BTX) into one mixture-of-experts model at ``out_dir``, loadable by ``transformers``.

    ``layout``: ``fused`` (transformers v5's 3-D expert tensors) or ``per-expert`` (one tensor per
    expert matrix); default: what the installed transformers writes. The router rows are computed
    (the ``hidden`` modes run the dense base on ``device``) after every check passed and before the
    first tensor is written; the output appears atomically. With ``dry_run`` nothing runs or is written.
    With ``train_router`` (steps), the router rows are then trained on the union of the experts' ``data:``
    (:func:`train_moe_router`), and only the trained model is published at ``out_dir``.
    """
    from moerge.moe.upcycle import compute_router, plan_upcycle
    from moerge.recipe.moe import load_moe_recipe

    t0 = time.perf_counter()
    loaded = load_moe_recipe(recipe)
    if train_router is not None:
        return _upcycle_then_train(loaded, Path(out_dir), train_router, layout=layout, force=force,
                                   shard_size=shard_size, device=device, allow_pickle=allow_pickle,
                                   allow_external_files=allow_external_files, allow_nonfinite=allow_nonfinite,
                                   dry_run=dry_run, progress=progress)
    up = plan_upcycle(loaded, layout=layout, allow_pickle=allow_pickle, allow_external_files=allow_external_files)
    try:
        final = Path(out_dir)
        check_not_an_input(final, [f for c in up.plan.checkpoints for f in c.files])
        if final.exists() and not force:
            raise MoergeError(f"{final} already exists", hint="pass --force to replace it")
        if dry_run:
            return MergeResult(None, up.summary(), time.perf_counter() - t0, warnings=up.warnings)
        up.warnings += compute_router(up, device or "cpu")
        path, stats = _write_upcycle(up, final, size=parse_size(shard_size), force=force, device=device,
                                     allow_nonfinite=allow_nonfinite, progress=progress)
    finally:
        up.close()
    summary = up.summary() | {"bytes_read": stats.bytes_read}
    return MergeResult(path, summary, time.perf_counter() - t0, stats.notes, up.warnings)


def _upcycle_then_train(loaded: Any, final: Path, steps: int, *, dry_run: bool, force: bool,
                        **kw: Any) -> MergeResult:
    """Upcycle into a staging folder beside ``final``, train its routers into ``final``, remove the staging."""
    r = loaded.recipe
    data = [e.data for e in r.experts]
    if any(d is None for d in data):
        missing = [i for i, d in enumerate(data) if d is None]
        raise MoergeError(f"{loaded.source}: --train-router trains on the experts' data, and experts {missing} "
                          "have no data:", hint="give each expert data: TASK or data: FILE.jsonl")
    if final.exists() and not force:
        raise MoergeError(f"{final} already exists", hint="pass --force to replace it")
    if dry_run:
        return upcycle(loaded.recipe, final, dry_run=True, force=force, **kw)
    staging = final.parent / f".{final.name}{TMP_MARK}{os.getpid()}-untrained"
    try:
        first = upcycle(loaded.recipe if not loaded.text else loaded.text, staging, force=True, **kw)
        trained = train_moe_router(staging, final, data=[str(d) for d in data], steps=steps, seed=r.seed,
                                   force=force, device=kw.get("device") or "cpu")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return MergeResult(trained.output, first.summary | {"router_steps": steps}, first.seconds + trained.seconds,
                       trained.notes, first.warnings)


def inspect_moe(model: str | os.PathLike[str], *, data: str | None = None, examples: int = 32,
                device: str = "cpu") -> dict[str, Any]:
    """An MoE checkpoint's class, sizes, layout and per-layer router statistics; with ``data`` (a task or
    a JSONL of prompt/target rows), which experts each layer picks on it (see :mod:`moerge.moe.inspect`)."""
    from moerge.moe.inspect import inspect_moe as run

    return run(model, data=data, examples=examples, device=device)


def shrink_moe(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    experts: int,
    method: str = "hc-smoe",
    data: str | None = None,
    examples: int = 64,
    max_length: int = 256,
    merge: str = "frequency",
    router: str = "dominant",
    layout: str | None = None,
    force: bool = False,
    device: str = "cpu",
    dry_run: bool = False,
) -> MergeResult:
    """Shrink the MoE at ``model`` to ``experts`` experts per layer, written to ``out_dir`` (a smaller
    checkpoint transformers loads as it is). ``method``: ``frequency`` (keep the most used) or ``hc-smoe``
    (cluster by mean output, merge each cluster); both read calibration ``data`` (a task or a JSONL of
    prompt/target rows) run through the MoE. See :mod:`moerge.moe.shrink` for every convention."""
    from moerge.data.samples import load_samples
    from moerge.moe.shrink import SHRINK_METHODS, calibrate, groups_for, member_weights, plan_experts, plan_shrink

    t0 = time.perf_counter()
    if method not in SHRINK_METHODS:
        raise MoergeError(f"unknown shrink method {method!r}; choose one of {', '.join(SHRINK_METHODS)}")
    if merge not in ("frequency", "average") or router not in ("dominant", "mean"):
        raise MoergeError(f"merge is frequency or average (got {merge!r}); router is dominant or mean (got {router!r})")
    if data is None:
        raise MoergeError(f"{method} reads calibration data", hint="pass --data TASK or --data FILE.jsonl")
    samples = load_samples(data, limit=examples)
    sp = plan_shrink(model, experts, layout=layout)
    try:
        final = Path(out_dir)
        check_not_an_input(final, [f for c in sp.plan.checkpoints for f in c.files])
        if final.exists() and not force:
            raise MoergeError(f"{final} already exists", hint="pass --force to replace it")
        if dry_run:
            return MergeResult(None, sp.summary(), time.perf_counter() - t0)
        calib = calibrate(Path(model), sp.view, samples, max_length=max_length, device=device,
                          outputs=method == "hc-smoe", keep_inputs=method == "naee")
        groups = [groups_for(method, calib, layer, experts, sp.view) for layer in range(sp.view.layers)]
        weights = [[member_weights(g, calib.frequency[layer], merge) for g in groups[layer]]
                   for layer in range(sp.view.layers)]
        plan_experts(sp, groups, weights, router, calib.frequency)
        report = {"method": method, "merge": merge, "router": router, "data": data, "tokens": calib.tokens,
                  "experts_in": sp.view.experts, "experts_out": experts,
                  "layers": [{"groups": g, "weights": w, "frequency": calib.frequency[k].tolist()}
                             for k, (g, w) in enumerate(zip(groups, weights))]}
        path = _write_shrink(sp, final, report, force=force)
    finally:
        sp.close()
    return MergeResult(path, sp.summary(), time.perf_counter() - t0, {"groups": report["layers"]})


def train_moe_router(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    data: list[str],
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 8,
    aux_coef: float = 0.01,
    examples: int = 256,
    seed: int = 0,
    save_every: int = 10,
    force: bool = False,
    device: str = "cpu",
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> MergeResult:
    """Train only the router rows of the MoE at ``model`` on the union of ``data`` (tasks or JSONL files of
    prompt/target rows) and write the model with its new rows to ``out_dir`` (everything else byte for byte,
    the loss curve beside it). Interrupted, a rerun with the same arguments resumes (see
    :mod:`moerge.moe.train_router`)."""
    from moerge.data.samples import load_samples
    from moerge.moe.shrink import plan_shrink_copy
    from moerge.moe.train_router import RouterTraining, train_saved_moe

    t0 = time.perf_counter()
    if not data:
        raise MoergeError("router training needs data", hint="pass --data TASK or --data FILE.jsonl (one per expert)")
    settings = RouterTraining(steps=steps, lr=lr, batch_size=batch_size, aux_coef=aux_coef, examples=examples,
                              seed=seed, save_every=save_every)
    samples = [s for d in data for s in load_samples(d, limit=examples)]
    final = Path(out_dir)
    sp = plan_shrink_copy(model)
    try:
        check_not_an_input(final, [f for c in sp.plan.checkpoints for f in c.files])
        if final.exists() and not force:
            raise MoergeError(f"{final} already exists", hint="pass --force to replace it")
        state = final.parent / f".{final.name}.router-training"
        rows, curve = train_saved_moe(Path(model), samples, list(data), settings, state, device, progress)
        sp.add_routers(rows)
        report = {"settings": {**settings.__dict__}, "data": list(data), "samples": len(samples), "curve": curve}
        path = _write_trained(sp, final, report, force=force)
        shutil.rmtree(state, ignore_errors=True)  # the state goes once the trained model is published
    finally:
        sp.close()
    return MergeResult(path, sp.summary() | {"steps": steps, "final_loss": curve[-1]["loss"] if curve else None},
                       time.perf_counter() - t0, {"curve": curve})


def _publish_moe(sp: Any, out: Path, *, force: bool, side: tuple[str, ...], extra: Callable[[Any], None]) -> Path:
    """Stream an MoE plan (a shrink or a router training: the input copied but for what the plan changes)
    into ``out`` with the input's tokenizer and the ``side`` files, then ``extra(writer)``; publish it."""
    from moerge.engine.execute import execute
    from moerge.engine.plan import check_disk_space
    from moerge.io.sidefiles import tokenizer_files

    plan = sp.plan
    src = plan.checkpoints[0]
    tensors = [(i.name, i.dtype, i.shape) for i in plan.items]
    with ModelWriter(out, tensors, shard_size=parse_size("5GB"), force=force,
                     metadata={"format": "pt", "moerge_version": __version__}) as writer:
        check_disk_space(plan, out)
        execute(plan, writer, device="cpu")
        for name in side:
            if (f := src.side_file(name)) is not None:
                writer.copy_file(Path(os.path.realpath(f)), f.name)
        for f in tokenizer_files(src):
            writer.copy_file(Path(os.path.realpath(f)), f.name)
        extra(writer)
        return writer.commit(last_check=plan.check_unchanged)


def _write_trained(sp: Any, out: Path, report: dict[str, Any], *, force: bool) -> Path:
    import json
    import tempfile

    from moerge.io.sidefiles import CONFIG_SIDE_FILES
    from moerge.moe.train_router import loss_plot

    def extra(writer: Any) -> None:
        writer.write_text("moerge_router_training.json", json.dumps(report, indent=1) + "\n")
        if report["curve"]:
            with tempfile.TemporaryDirectory() as tmp:
                loss_plot(report["curve"], Path(tmp) / "router_loss.png")
                writer.copy_file(Path(tmp) / "router_loss.png", "router_loss.png")

    side = ("config.json", *CONFIG_SIDE_FILES, "moerge_upcycle.yaml", "moerge_shrink.json", "README.md")
    return _publish_moe(sp, out, force=force, side=side, extra=extra)


def _write_shrink(sp: Any, out: Path, report: dict[str, Any], *, force: bool) -> Path:
    import json

    from moerge.io.sidefiles import CONFIG_SIDE_FILES, shrink_card

    def extra(writer: Any) -> None:
        writer.write_text("config.json", json.dumps(sp.config, indent=2) + "\n")
        writer.write_text("moerge_shrink.json", json.dumps(report, indent=1) + "\n")
        writer.write_text("README.md", shrink_card(source=sp.plan.checkpoints[0].ref, summary=sp.summary(),
                                                   report=report, version=__version__))

    return _publish_moe(sp, out, force=force, side=CONFIG_SIDE_FILES, extra=extra)

def _write_upcycle(up: Any, out: Path, *, size: int, force: bool, device: str | None, allow_nonfinite: bool,
                   progress: Callable[[str, int, int], None] | None) -> tuple[Path, Any]:
    """Stream an upcycle plan into ``out`` with config, tokenizer, recipe and card; publish it."""
    import json

    from moerge.engine.execute import execute
    from moerge.engine.plan import check_disk_space
    from moerge.io.sidefiles import CONFIG_SIDE_FILES, moe_card, tokenizer_files

    plan = up.plan
    total, done = len(plan.items), [0]

    def on_tensor(item: Any, k: int) -> None:
        done[0] += 1
        if progress is not None:
            progress(item.name, done[0], total)

    tensors = [(i.name, i.dtype, i.shape) for i in plan.items]
    with ModelWriter(out, tensors, shard_size=size, force=force,
                     metadata={"format": "pt", "moerge_version": __version__}) as writer:
        check_disk_space(plan, out)
        stats = execute(plan, writer, device=device, allow_nonfinite=allow_nonfinite, progress=on_tensor)
        base = plan.checkpoints[up.index[up.recipe.base_model]]
        writer.write_text("config.json", json.dumps(up.config, indent=2) + "\n")
        for name in CONFIG_SIDE_FILES:
            if (side := base.side_file(name)) is not None:
                writer.copy_file(Path(os.path.realpath(side)), side.name)
        for f in tokenizer_files(base):
            writer.copy_file(Path(os.path.realpath(f)), f.name)
        text = up.loaded.text or _dump_moe_recipe(up.recipe)
        writer.write_text("moerge_upcycle.yaml", text)
        if up.loaded.format == "mergekit":
            writer.write_text("mergekit_moe_config.yml", text)
        writer.write_text("README.md", moe_card(summary=up.summary(), recipe=up.recipe, recipe_text=text,
                                                version=__version__, warnings=up.warnings))
        return writer.commit(last_check=plan.check_unchanged), stats


def _dump_moe_recipe(recipe: Any) -> str:
    import yaml

    return yaml.safe_dump(recipe.model_dump(exclude_none=True, exclude_defaults=True), sort_keys=False)


def _lora_staging(plan: Plan, final: Path, force: bool, rank: int) -> Path:
    """Where a merge written as a LoRA adapter is first written in full (beside the adapter's folder)."""
    from moerge.extract import check_rank

    if plan.base_index is None:
        raise MoergeError(f"{plan.method.name} has no base model; a LoRA adapter needs one",
                          hint="add base_model to the recipe, or drop --lora-rank")
    check_rank(rank, [i.shape for i in plan.items], "the merge")
    if final.exists() and not force:
        raise MoergeError(f"{final} already exists", hint="pass --force to replace it")
    # a publication's temporary name (this process's id in it): a run killed here leaves nothing that blocks
    # the next one, whose publication of ``final`` removes it
    return final.parent / f".{final.name}{TMP_MARK}{os.getpid()}-full-merge"


def _write_merge(plan: Plan, out: Path, *, size: int, force: bool, device: str | None, allow_nonfinite: bool,
                 progress: Callable[[str, int, int], None] | None) -> tuple[Path, Any, dict[str, Any]]:
    """Stream the plan into ``out`` with its side files and card; returns the path, the executor's
    statistics and the notes for the user."""
    from moerge.engine.execute import execute
    from moerge.engine.plan import check_disk_space

    total = len(plan.items)
    done = [0]

    def on_tensor(item: Any, k: int) -> None:
        done[0] += 1
        if progress is not None:
            progress(item.name, done[0], total)

    tensors = [(i.name, i.dtype, i.shape) for i in plan.items]
    with ModelWriter(out, tensors, shard_size=size, force=force,
                     metadata={"format": "pt", "moerge_version": __version__}) as writer:
        check_disk_space(plan, out)
        stats = execute(plan, writer, device=device, allow_nonfinite=allow_nonfinite, progress=on_tensor)
        notes = _write_side_files(plan, writer, stats.notes)
        # every input still the file planned from, checked as late as possible: or nothing is published
        return writer.commit(last_check=plan.check_unchanged), stats, notes


def _write_side_files(plan: Plan, writer: ModelWriter, executor_notes: dict[str, Any]) -> dict[str, Any]:
    """config.json, generation config, tokenizer, the recipe, the solver report and the model card."""
    import json

    from moerge.engine.plan import LAYER_COUNT_KEYS
    from moerge.io.sidefiles import CONFIG_SIDE_FILES, model_card, output_config, tokenizer_files

    cfg_ckpt = plan.checkpoints[plan.config_source]
    out_dtype = plan.recipe.output_dtype or _main_dtype(plan)
    cfg = output_config(cfg_ckpt.config, out_dtype, plan.num_layers_out if plan.recipe.slices else None,
                        LAYER_COUNT_KEYS)
    vocab = plan.vocab
    if cfg is not None and vocab is not None and vocab.rows is not None:
        cfg["vocab_size"] = vocab.rows
    if cfg is not None:
        writer.write_text("config.json", json.dumps(cfg, indent=2) + "\n")
    # copied from the file each name resolved to when it was checked (a link swapped since cannot redirect it)
    for name in CONFIG_SIDE_FILES:
        if (side := cfg_ckpt.side_file(name)) is not None:
            writer.copy_file(Path(os.path.realpath(side)), side.name)
    if vocab is not None and vocab.tokenizer is not None:  # built here (a union, added tokens, a chat template)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            vocab.tokenizer.save_pretrained(tmp)
            for f in sorted(Path(tmp).iterdir()):
                writer.copy_file(f, f.name)
    else:
        for f in tokenizer_files(plan.checkpoints[plan.tokenizer_source]):
            writer.copy_file(Path(os.path.realpath(f)), f.name)
    recipe_text = plan.loaded.text or _dump_recipe(plan.recipe)
    writer.write_text("moerge_recipe.yaml", recipe_text)
    notes = dict(executor_notes)
    if vocab is not None and vocab.note:
        notes["vocabulary"] = vocab.note
    per_tensor = {k: v for k, v in notes.items() if isinstance(v, dict)}
    if per_tensor:  # a solver's report per layer: the whole of it in a file, its extremes in the card
        writer.write_text("moerge_merge_report.json", json.dumps(per_tensor, indent=1) + "\n")
        notes.update({k: _extremes(v) for k, v in per_tensor.items()})
    if "lerp_fallback" in notes:
        notes["lerp_fallback"] = (f"{notes['lerp_fallback']} of {len(plan.items)} tensors were nearly colinear "
                                  "and linearly interpolated")
    base_ref = plan.checkpoints[plan.base_index].ref if plan.base_index is not None else None
    writer.write_text("README.md", model_card(
        method=plan.method, recipe_text=recipe_text, conventions=plan.recipe.conventions,
        inputs=[c.ref for c in plan.models], statistics=[c.ref for c in plan.statistics], base=base_ref,
        version=__version__, summary=plan.summary(), notes=notes))
    return notes


def _write_lora(full: Path, plan: Plan, final: Path, rank: int, force: bool) -> tuple[Path, str]:
    """Factorise the full merge at ``full`` into a LoRA adapter at ``final``, then remove ``full``."""
    from moerge.extract import extract_lora

    assert plan.base_index is not None
    try:
        base = plan.checkpoints[plan.base_index]
        rep = extract_lora(full, base.ref, final, rank=rank, force=force,
                           allow_external_files=base.allow_external_files,
                           source=f"{plan.method.name} merge of {', '.join(c.ref for c in plan.models)}")
    finally:
        shutil.rmtree(full, ignore_errors=True)
    note = (f"rank {rank}: {len(rep.tensors)} layers, {rep.discarded:.2%} of ‖ΔW‖² discarded"
            + (f"; {len(rep.not_representable)} changed non-linear tensors left out" if rep.not_representable else ""))
    assert rep.output is not None
    return rep.output, note


def _extremes(values: dict[str, float]) -> str:
    """'largest 3.1e-06 (tensor), median 2e-07 over 84 tensors' for a per-tensor report."""
    worst = max(values, key=lambda k: values[k])
    ordered = sorted(values.values())
    return (f"largest {values[worst]:.3g} ({worst}), median {ordered[len(ordered) // 2]:.3g} over "
            f"{len(values)} tensors (all in moerge_merge_report.json)")


def _main_dtype(plan: Any) -> str | None:
    counts: dict[str, int] = {}
    for i in plan.items:
        counts[i.dtype] = counts.get(i.dtype, 0) + math.prod(i.shape)
    return max(counts, key=counts.__getitem__) if counts else None


def _dump_recipe(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.model_dump(exclude_none=True, exclude_defaults=True), sort_keys=False)


# -- inspect ---------------------------------------------------------------------------------
@dataclass
class TensorRow:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelInfo:
    path: str
    tensors: list[TensorRow]
    files: list[str]
    total_bytes: int
    config: dict[str, Any] | None

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    def dtypes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.dtype] = out.get(t.dtype, 0) + t.numel
        return out


def inspect(model: str | os.PathLike[str], *, allow_pickle: bool = False,
            allow_external_files: bool = False) -> ModelInfo:
    """List a checkpoint's tensors (name, dtype, shape, shard) without reading any tensor data."""
    from moerge.io.checkpoint import open_source

    with open_source(model, allow_pickle=allow_pickle, allow_external_files=allow_external_files) as ck:
        rows = [TensorRow(i.name, i.dtype, i.shape, i.file.name) for i in ck.infos.values()]
        return ModelInfo(str(model), rows, [f.name for f in ck.files], ck.nbytes(), ck.config)


# -- diff ------------------------------------------------------------------------------------
@dataclass
class TensorDiff:
    name: str
    shape: tuple[int, ...]
    delta_l2: float
    base_l2: float
    cosine: float
    sparsity: float  # fraction of entries left unchanged (delta exactly zero)
    max_abs: float

    @property
    def relative(self) -> float:
        return self.delta_l2 / self.base_l2 if self.base_l2 > 0 else math.inf if self.delta_l2 else 0.0


def diff(base: str | os.PathLike[str], other: str | os.PathLike[str], *, allow_pickle: bool = False,
         allow_external_files: bool = False, progress: Callable[[str, int, int], None] | None = None) -> tuple[list[TensorDiff], list[str], list[str]]:
    """Per-tensor change from ``base`` to ``other``, streamed one tensor at a time.

    Returns the diffs of shared tensors, and the names only in base / only in other.
    """

    from moerge.errors import PlanError
    from moerge.io.checkpoint import open_source

    opts = {"allow_pickle": allow_pickle, "allow_external_files": allow_external_files}
    with open_source(base, **opts) as a, open_source(other, **opts) as b:
        shared = [n for n in a.tensor_names if n in b]
        only_a = [n for n in a.tensor_names if n not in b]
        only_b = [n for n in b.tensor_names if n not in a]
        out: list[TensorDiff] = []
        for k, name in enumerate(shared):
            sa, sb = a.info(name).shape, b.info(name).shape
            if sa != sb:
                raise PlanError(f"shape mismatch in {name!r}: {list(sa)} in {base} but {list(sb)} in {other}")
            x = a.read(name).double()
            y = b.read(name).double()
            d = y - x
            nx, ny = float(x.norm()), float(y.norm())
            cos = float((x * y).sum()) / (nx * ny) if nx > 0 and ny > 0 else float("nan")
            out.append(TensorDiff(name, sa, float(d.norm()), nx, cos,
                                  float((d == 0).sum()) / max(d.numel(), 1),
                                  float(d.abs().max()) if d.numel() else 0.0))
            if progress:
                progress(name, k + 1, len(shared))
    return out, only_a, only_b


def methods() -> dict[str, Any]:
    """Every registered merge method, by name."""
    from moerge.methods import all_methods

    return all_methods()


ROUTERS = ("arrow", "phatgoose", "avg_act", "smear")
# each router's defaults, as its reference computes it (docs/routing.md)
ROUTER_DEFAULTS: dict[str, dict[str, Any]] = {
    "arrow": {"score": "abs_dot", "top_k": 3, "renorm_eps": 0.0},  # PEFT 0.21's ArrowConfig
    "phatgoose": {"score": "ln_corr", "top_k": 2, "renorm_eps": 1e-6},  # r-three/phatgoose eval_multitask.sh
    "avg_act": {"score": "ln_corr", "top_k": 2, "renorm_eps": 1e-6},  # PHATGOOSE's average-activation baseline
    "smear": {"score": "ln_dot", "top_k": None, "renorm_eps": 0.0},  # r-three/smear: softmax over all experts
}


def route(method: str, base: str | os.PathLike[str], adapters: list[str | os.PathLike[str]],
          out: str | os.PathLike[str], *, top_k: int | None = None, temperature: float = 1.0,
          mix: str = "outputs", score: str | None = None, renorm_eps: float | None = None, gks: str = "none",
          general: list[str | os.PathLike[str]] = (), data: list[str] = (), examples: int | None = None,
          gates: Any = None, extract_rank: int | None = None, force: bool = False,
          progress: Callable[[str, int, int, float], None] | None = None) -> Path:
    """Build a routed bundle ``out`` over ``adapters`` (PEFT LoRA folders of ``base``, or full fine-tunes
    routed through their rank-``extract_rank`` extraction); load it with :func:`load_routed`.

    ``arrow``: prototypes = exact top right singular vectors of each expert's ΔW; ``gks`` none | exact |
    factors with ``general`` adapters (GenKnowSub). ``phatgoose``: gate vectors trained on each expert's
    ``data`` (one source per adapter: a task name or a JSONL of prompt/target rows; ``gates`` a
    :class:`moerge.routing.phatgoose.GateSettings`). ``avg_act``: each expert's mean module input on its
    data. ``score``, ``top_k``, ``renorm_eps`` default to the method's reference (``ROUTER_DEFAULTS``);
    ``mix`` outputs (PEFT) or parameters (mttl). ``docs/routing.md`` gives every convention.
    """
    from moerge.routing import build
    from moerge.routing.arrow import GKS_MODES
    from moerge.routing.layer import RouterOptions

    if method not in ROUTERS:
        raise MoergeError(f"unknown routing method {method!r}", hint=f"one of {', '.join(ROUTERS)}")
    if gks not in GKS_MODES:
        raise MoergeError(f"gks must be one of {', '.join(GKS_MODES)} (got {gks!r})")
    if (gks == "none") != (not general) or (general and method != "arrow"):
        raise MoergeError("GenKnowSub is an Arrow option: it needs both --gks exact|factors and at least one "
                          "--general adapter")
    d = ROUTER_DEFAULTS[method]
    options = RouterOptions(score=score or d["score"], top_k=(d["top_k"] or len(adapters)) if top_k is None else top_k,
                            temperature=temperature, mix=mix,
                            renorm_eps=d["renorm_eps"] if renorm_eps is None else renorm_eps,
                            granularity="example" if method == "smear" else "token")
    try:
        options.check()
    except ValueError as e:
        raise MoergeError(str(e)) from None
    method_options: dict[str, Any] = {}
    info: dict[str, Any] = {}
    if method == "arrow":
        if data:
            raise MoergeError("Arrow needs no data (its prototypes come from the experts' weights)")
        rows, method_options = build.arrow(gks), {"prototype": "exact_svd", "gks": gks}
    else:
        samples = _routing_data(data, len(adapters), examples)
        from moerge.routing.phatgoose import GateSettings

        settings = gates or GateSettings()
        try:
            settings.check()
        except ValueError as e:
            raise MoergeError(str(e)) from None
        if method == "smear":
            logs_: dict[str, Any] = {}
            rows = build.smear(base, samples, settings, options, logs_, progress)
            method_options = {"training": _asdict(settings), "data": list(data), "examples": examples}
            info = logs_
        elif method == "phatgoose":
            outp = Path(out)
            work = outp.parent / f".{outp.name}.phatgoose-work"
            logs: dict[str, Any] = {}
            rows = build.phatgoose(base, samples, settings, work, logs, progress)
            method_options = {"gates": _asdict(settings), "data": list(data), "examples": examples}
            info["gate_training"] = logs
        else:
            rows = build.average_activation(base, samples, max_length=64)
            method_options = {"data": list(data), "examples": examples}
    path = build.build_bundle(method, base, list(adapters), out, options=options, rows=rows,
                              method_options=method_options, general=list(general), extract_rank=extract_rank,
                              force=force, build_info=info)
    if method == "phatgoose":
        shutil.rmtree(work, ignore_errors=True)
    return path


def lorahub(base: str | os.PathLike[str], adapters: list[str | os.PathLike[str]], data: str,
            out: str | os.PathLike[str], *, examples: int | None = 5, settings: Any = None, force: bool = False,
            progress: Callable[[int, int, float], None] | None = None) -> Path:
    """LoraHub: weights for ``adapters`` found gradient-free (nevergrad) on a few examples of a new task
    (``data``: a task name or a JSONL of prompt/target rows; its first ``examples``), written to ``out`` as
    one plain PEFT adapter with ΔW = Σ wᵢ ΔWᵢ exactly. ``settings``: a
    :class:`moerge.routing.lorahub.HubSettings`. The weights and the search log are in
    ``moerge_lorahub.json``."""
    from moerge.routing.lorahub import HubSettings, run

    settings = settings or HubSettings()
    try:
        settings.check()
    except ValueError as e:
        raise MoergeError(str(e)) from None
    return run(base, [Path(a) for a in adapters], data, Path(out), examples=examples, settings=settings,
               force=force, progress=progress)


def _asdict(settings: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(settings)


def _routing_data(data: list[str], n: int, examples: int | None) -> list[Any]:
    from moerge.routing.data import load_samples

    if len(data) != n:
        raise MoergeError(f"{len(data)} data sources for {n} experts: give one --data per adapter, in the "
                          "same order (its own training data)")
    return [load_samples(d, limit=examples) for d in data]


def derive_routed(bundle: str | os.PathLike[str], out: str | os.PathLike[str], *, keep: list[str] | None = None,
                  drop: list[str] | None = None, top_k: int | None = None, temperature: float | None = None,
                  mix: str | None = None, force: bool = False) -> Path:
    """A routed bundle ``out`` from ``bundle`` with only the experts ``keep`` (or all but ``drop``) and/or other
    router options, nothing trained or computed again (subsets need per-expert rows: Arrow, PHATGOOSE,
    average activation)."""
    from moerge.routing.build import derive_bundle
    from moerge.routing.bundle import read_bundle

    if keep is not None and drop is not None:
        raise MoergeError("give the experts to keep or those to drop, not both")
    if drop is not None:
        names = [n for n, _ in read_bundle(bundle, verify=False).experts("task")]
        missing = [d for d in drop if d not in names]
        if missing:
            raise MoergeError(f"{bundle}: has no expert {', '.join(missing)} (its experts: {', '.join(names)})")
        keep = [n for n in names if n not in drop]
    router = {k: v for k, v in (("top_k", top_k), ("temperature", temperature), ("mix", mix)) if v is not None}
    return derive_bundle(bundle, out, keep=keep, router=router, force=force)


def load_routed(folder: str | os.PathLike[str], *, device: str | None = None,
                base: str | os.PathLike[str] | None = None, options: Any = None) -> Any:
    """A routed bundle as a ``transformers`` model (``generate``, ``forward``, batching as usual). ``base``:
    the base model's folder when it moved (checked against the bundle's fingerprint); ``options``: a
    :class:`moerge.routing.layer.RouterOptions` instead of the bundle's (another top-k, say)."""
    from moerge.routing.load import load_routed as _load

    return _load(folder, device=device, base=base, options=options)
