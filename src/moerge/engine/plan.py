"""Planning: map every output tensor to its inputs, method and resolved parameters.

Everything that can be checked without reading tensor values is checked here,
before the first byte is written: that every model has every tensor, that
shapes agree (or a vocabulary policy says what to do), that every parameter is
known, well-placed and in range for every tensor, and that the output fits on
disk. The executor then only streams.
"""

from __future__ import annotations

import functools
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moerge.arch.names import is_pre_layer, is_vocab_name, layer_index, with_layer_index
from moerge.engine.inputs import FLOAT_DTYPES, InputChecks, StatsInputs
from moerge.engine.items import InputRef, WorkItem
from moerge.engine.parameters import RecipeParameters, recipe_method
from moerge.engine.vocab import VocabPlan, VocabPlanner
from moerge.errors import PlanError
from moerge.io.checkpoint import open_source
from moerge.io.sources import TensorSource
from moerge.methods import MergeMethod
from moerge.methods.masks import tensor_seed
from moerge.recipe.loader import LoadedRecipe
from moerge.recipe.schema import ModelEntry, Recipe

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class Plan:
    loaded: LoadedRecipe
    method: MergeMethod
    checkpoints: list[TensorSource]
    items: list[WorkItem]
    reference: int  # checkpoint whose config/tokenizer/tensor layout the output follows
    config_source: int
    tokenizer_source: int
    num_layers_out: int | None
    base_index: int | None
    warnings: list[str] = field(default_factory=list)
    n_models: int | None = None  # checkpoints[:n_models] are models, the rest statistics folders
    stats_kind: str | None = None  # the kind of statistics every expert brings (data-aware methods)
    stats_meta: dict[int, dict[str, Any]] = field(default_factory=dict)  # per statistics checkpoint
    vocab: VocabPlan | None = None  # the output's tokens and each model's rows of them

    @property
    def recipe(self) -> Recipe:
        return self.loaded.recipe

    @property
    def models(self) -> list[TensorSource]:
        """The recipe's models (the checkpoints after them are statistics folders)."""
        return self.checkpoints[: self.n_models]

    @property
    def statistics(self) -> list[TensorSource]:
        return self.checkpoints[len(self.models):]

    def check_unchanged(self) -> None:
        """Raise if an input file changed (rewritten, replaced, deleted) since planning."""
        for c in self.checkpoints:
            c.check_unchanged()

    def close(self) -> None:
        """Close every checkpoint (their file descriptors and mappings)."""
        for c in self.checkpoints:
            c.close()

    @property
    def output_bytes(self) -> int:
        return sum(i.nbytes for i in self.items)

    @functools.cached_property
    def input_bytes(self) -> int:
        """The inputs' size on disk, taken once (a file deleted mid-merge is reported by check_unchanged)."""
        return sum(c.nbytes() for c in self.checkpoints)

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method.name,
            "conventions": self.recipe.conventions,
            "tensors": len(self.items),
            "parameters": sum(math.prod(i.shape) for i in self.items),
            "output_bytes": self.output_bytes,
            "input_bytes": self.input_bytes,
            "models": [c.ref for c in self.models],
        }


@dataclass
class _Layout:
    """What planning the tensors decided: the work items and where the output's layout comes from."""

    items: list[WorkItem]
    reference: int  # checkpoint whose config/tokenizer/tensor layout the output follows
    num_layers: int | None
    base_index: int | None


class _Planner:
    def __init__(self, loaded: LoadedRecipe, *, allow_pickle: bool = False,
                 allow_external_files: bool = False) -> None:
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.method = recipe_method(loaded)
        self.refs = self.recipe.model_refs()
        self.checkpoints: list[TensorSource] = []
        try:
            for ref in self.refs:
                self.checkpoints.append(open_source(ref, allow_pickle=allow_pickle,
                                                    allow_external_files=allow_external_files))
        except BaseException:
            for c in self.checkpoints:
                c.close()
            raise
        self.index = {r: i for i, r in enumerate(self.refs)}
        self.warnings: list[str] = []
        self.n_models = len(self.checkpoints)  # the statistics folders opened later come after the models
        self.params = RecipeParameters(loaded, self.method, self.warnings)
        self.inputs = InputChecks(loaded, self.method, self.checkpoints, self.warnings)
        self.stats = StatsInputs(loaded, self.method, self.checkpoints, self.index, self.warnings,
                                 allow_external_files=allow_external_files)

    # -- building -----------------------------------------------------------------------------
    def plan(self) -> Plan:
        r = self.recipe
        m = self.method
        self.params.check_keys(r.parameters, ("parameters",), per_model=False)
        if m.stats and r.slices is not None:
            raise PlanError(f"{self.loaded.source}: {m.name} reads per-model statistics, which do not combine "
                            "with slices; list the models under 'models'")
        if m.needs_base and not r.base_model and not r.slices:
            raise PlanError(f"{self.loaded.source}: {m.name} needs a 'base_model' (the model the task "
                            "vectors are taken against)")
        if r.slices is not None and (r.tokenizer_from is not None or r.tokenizer is not None):
            raise PlanError(f"{self.loaded.where('tokenizer' if r.tokenizer else 'tokenizer_source')}: "
                            "tokenizer alignment does not combine with slices yet; merge with 'models'")
        self.vocab: VocabPlan | None = None
        layout = self._plan_slices() if r.slices is not None else self._plan_models()
        self._check_whole_model_trim(layout.items)
        return Plan(
            loaded=self.loaded, method=m, checkpoints=self.checkpoints, items=layout.items,
            reference=layout.reference,
            config_source=self._source_index(r.config_source, layout.reference, "config_source"),
            tokenizer_source=self._source_index(r.tokenizer_from, layout.reference, "tokenizer_source"),
            num_layers_out=layout.num_layers, base_index=layout.base_index,
            warnings=self.warnings, n_models=self.n_models, stats_kind=self.stats.kind, stats_meta=self.stats.meta,
            vocab=self.vocab,
        )

    def _warn_ignored_keys(self) -> None:
        """Recipe keys moerge accepts (mergekit's format has them) but does not apply yet: each would change
        mergekit's output, so the user is told rather than handed a silently different model."""
        r = self.recipe
        if r.slices is not None and r.chat_template is not None:
            self.warnings.append(
                f"{self.loaded.where('chat_template')}: chat_template is not applied to slice merges yet; the "
                "output's tokenizer files are copied unchanged from the tokenizer source")

    def _check_whole_model_trim(self, items: list[WorkItem]) -> None:
        """A trim over each whole task vector needs one density per model and a model per position."""
        merged = [i for i in items if i.copy_from is None]
        if not merged or merged[0].params.get("trim_scope") != "model":
            return
        if self.recipe.slices is not None:
            raise PlanError(f"{self.loaded.where('parameters', 'trim_scope')}: trim_scope: model (a trim over "
                            "each model's whole task vector) does not combine with slices; use trim_scope: tensor")
        for k in range(len(merged[0].model_params)):
            values = {i.model_params[k]["density"] for i in merged}
            if len(values) > 1:
                raise PlanError(
                    f"{self.loaded.source}: trim_scope: model trims each model's whole task vector, so each "
                    f"model needs one density, but model {k + 1} gets {sorted(values)}",
                    hint="give one density per model, or set trim_scope: tensor for per-tensor densities",
                )

    def _source_index(self, ref: str | None, default: int, key: str) -> int:
        if ref is None or ref in ("base", "union"):
            return default
        if ref in self.index:
            return self.index[ref]
        raise PlanError(f"{self.loaded.where(key)}: {key} {ref!r} is not one of the recipe's models")

    def _count_layers(self, ckpt: TensorSource) -> int | None:
        cfg = ckpt.config or {}
        for key in LAYER_COUNT_KEYS:
            if isinstance(cfg.get(key), int):
                return cfg[key]
        idx = [layer_index(n) for n in ckpt.tensor_names]
        found = [i for i in idx if i is not None]
        return max(found) + 1 if found else None

    def _position(self, name: str, layer: int | None, n_layers: int | None) -> float:
        if layer is not None and n_layers:
            return layer / (n_layers - 1) if n_layers > 1 else 1.0
        if self.recipe.conventions == "mergekit":
            return 0.0  # mergekit evaluates gradients at t=0 for every tensor outside the blocks
        return 0.0 if is_pre_layer(name) else 1.0

    def _ordered_names(self, ckpt: TensorSource) -> list[str]:
        def key(n: str) -> tuple[str, int, str]:
            e = ckpt.entry(n)
            return (str(ckpt.info(n).file), e.begin if e else 0, n)

        return sorted(ckpt.tensor_names, key=key)

    def _plan_models(self) -> _Layout:
        r = self.recipe
        m = self.method
        base_idx = self.index[r.base_model] if r.base_model else None
        entries = list(enumerate(r.models or []))
        uses_base = m.needs_base or (m.optional_base and base_idx is not None)
        if uses_base:
            entries = [(i, e) for i, e in entries if e.model != r.base_model]
        elif m.base_joins and self.loaded.format == "mergekit" and r.base_model and all(
                e.model != r.base_model for e in r.models or []):
            # as mergekit does for a method without a base: the base model joins the inputs, last
            entries.append((len(entries), ModelEntry(model=r.base_model)))
        else:
            if r.base_model and all(e.model != r.base_model for e in r.models or []):
                self.warnings.append(f"{m.name} does not use a base model; {r.base_model} is ignored "
                                     "(list it under models to include it)")
        self.inputs.count(len(entries))
        for i, e in entries:
            self.params.check_keys(e.parameters, ("models", i, "parameters"), per_model=True)
        experts = [self.index[e.model] for _, e in entries]
        if m.stats:
            self.stats.open(entries)
        elif any(e.stats for _, e in entries):
            k = next(i for i, e in entries if e.stats)
            self.warnings.append(f"{self.loaded.where('models', k, 'stats')}: {m.name} does not use statistics; "
                                 "'stats' is ignored")
        reference = base_idx if (uses_base and base_idx is not None) else experts[0]
        ref_ckpt = self.checkpoints[reference]
        n_layers = self._count_layers(ref_ckpt)
        out_dtype = self.recipe.output_dtype
        members = ([base_idx] if uses_base and base_idx is not None else []) + experts
        vocab_names = self._vocab_names(ref_ckpt)
        self.vocab = VocabPlanner(self.loaded, self.checkpoints, self.index, members, base_idx if uses_base else None,
                                  reference, vocab_names, self.warnings).plan()
        align = self.vocab.alignment
        items: list[WorkItem] = []
        for name in self._ordered_names(ref_ckpt):
            info = ref_ckpt.info(name)
            layer = layer_index(name)
            t = self._position(name, layer, n_layers)
            aligned = align is not None and name in vocab_names
            row_fix = self.inputs.check(name, reference, experts, info.shape, aligned=aligned)
            shape = (align.rows, *info.shape[1:]) if aligned and align is not None else info.shape
            gparams = self.params.resolve([(r.parameters, ("parameters",))], name, t, per_model=False)
            mparams = [
                self.params.resolve([(e.parameters, ("models", i, "parameters")), (r.parameters, ("parameters",))],
                             name, t, per_model=True)
                for i, e in entries
            ]
            dtype = info.dtype if info.dtype not in FLOAT_DTYPES else (out_dtype or info.dtype)
            if m.check is not None and info.dtype in FLOAT_DTYPES and (why := m.check(mparams, gparams)):
                raise PlanError(f"{self.loaded.source}: {m.name}: {why} (tensor {name!r})")
            if not items and base_idx is None and m.requires_base and (why := m.requires_base(gparams)):
                raise PlanError(f"{self.loaded.source}: {m.name}: {why}; add base_model to the recipe")
            item = WorkItem(
                name=name, shape=shape, dtype=dtype,
                base=InputRef(base_idx, name) if uses_base and base_idx is not None else None,
                inputs=[InputRef(x, name) for x in experts],
                model_params=mparams, params=gparams, seed=tensor_seed(r.seed, name),
                copy_from=None if info.dtype in FLOAT_DTYPES else InputRef(reference, name),
                row_fix=row_fix and not aligned, align=aligned,
            )
            if m.stats and item.copy_from is None:
                item.stats = self.stats.refs(name, info.shape, experts)
            items.append(item)
        return _Layout(items, reference, n_layers, base_idx if uses_base else None)

    @staticmethod
    def _vocab_names(ckpt: TensorSource) -> list[str]:
        """The tensors with one row per token: vocabulary-named, with the embedding's row count."""
        named = [n for n in ckpt.tensor_names if is_vocab_name(n) and len(ckpt.info(n).shape) >= 1]
        two_d = [n for n in named if len(ckpt.info(n).shape) == 2]
        if not two_d:
            return []
        rows = ckpt.info(two_d[0]).shape[0]
        return [n for n in named if ckpt.info(n).shape[0] == rows]

    def _plan_slices(self) -> _Layout:
        slices = self.recipe.slices or []
        items: list[WorkItem] = []
        out_layer = 0
        reference = self.index[slices[0].sources[0].model]
        base_index: int | None = None
        for si, sl in enumerate(slices):
            block_items, lead_idx, length = self._plan_slice(si, sl, out_layer)
            items.extend(block_items)
            out_layer += length
            if self.method.needs_base and base_index is None:
                base_index = lead_idx
        # tensors outside the blocks: embeddings from the first slice, the rest from the last (each of the
        # first slice's goes in front of everything planned before it, so they end up in reverse order)
        before = self._plan_outside_blocks(True, 0, slices[0], reference)
        after = self._plan_outside_blocks(False, len(slices) - 1, slices[-1], reference)
        items = before[::-1] + items + after
        names = [i.name for i in items]
        if len(set(names)) != len(names):
            raise PlanError(f"{self.loaded.source}: the slices produce duplicate tensor names")
        return _Layout(items, reference, out_layer, base_index)

    def _slice_sources(self, si: int, sl: Any) -> tuple[Any, list[tuple[int, Any]]]:
        """The slice's base source (when the method needs one) and its other sources, with their positions."""
        m = self.method
        base_ref = sl.base_model or self.recipe.base_model
        srcs = list(enumerate(sl.sources))
        base_src = None
        if m.needs_base:
            matches = [(k, s) for k, s in srcs if s.model == base_ref]
            if not base_ref or not matches:
                raise PlanError(f"{self.loaded.where('slices', si)}: {m.name} needs the base model "
                                "among each slice's sources")
            base_src = matches[0]
            srcs = [(k, s) for k, s in srcs if s.model != base_ref]
        self.inputs.count(len(srcs))
        for k, s in srcs:
            self.params.check_keys(s.parameters, ("slices", si, "sources", k, "parameters"), per_model=True)
        for k, s in enumerate(sl.sources):
            n = self._count_layers(self.checkpoints[self.index[s.model]])
            if n is not None and s.layer_range[1] > n:
                raise PlanError(f"{self.loaded.where('slices', si, 'sources', k, 'layer_range')}: "
                                f"layer_range {list(s.layer_range)} exceeds the {n} layers of {s.model}")
        return base_src, srcs

    def _plan_slice(self, si: int, sl: Any, out_layer: int) -> tuple[list[WorkItem], int, int]:
        """The work items of one slice's blocks; also its lead checkpoint and its length."""
        r = self.recipe
        self.params.check_keys(sl.parameters, ("slices", si, "parameters"), per_model=False)
        base_src, srcs = self._slice_sources(si, sl)
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        lead = base_src[1] if base_src else srcs[0][1]
        lead_idx = self.index[lead.model]
        lead_ck = self.checkpoints[lead_idx]
        experts = [self.index[s.model] for _, s in srcs]
        templates = [n for n in self._ordered_names(lead_ck) if layer_index(n) == lead.layer_range[0]]
        if not templates:
            raise PlanError(f"{lead.model}: no tensors found for layer {lead.layer_range[0]}")
        levels_g = [(sl.parameters, ("slices", si, "parameters")), (r.parameters, ("parameters",))]
        items = []
        for off in range(length):
            t = off / (length - 1) if length > 1 else 1.0
            for tmpl in templates:
                out_name = with_layer_index(tmpl, out_layer + off)
                lead_name = with_layer_index(tmpl, lead.layer_range[0] + off)
                info = lead_ck.info(lead_name)
                in_names = [with_layer_index(tmpl, s.layer_range[0] + off) for _, s in srcs]
                row_fix = self.inputs.check(lead_name, lead_idx, experts, info.shape, in_names)
                gparams = self.params.resolve(levels_g, out_name, t, per_model=False)
                # per-model parameters match the model's own (input) tensor name, as in mergekit
                mparams = [self.params.resolve([(s.parameters, ("slices", si, "sources", k, "parameters"))] + levels_g,
                                        nm, t, per_model=True) for (k, s), nm in zip(srcs, in_names)]
                items.append(self._item(out_name, info, r.output_dtype,
                                        InputRef(lead_idx, lead_name) if base_src else None,
                                        [InputRef(x, nm) for x, nm in zip(experts, in_names)],
                                        mparams, gparams, lead_idx, lead_name, row_fix))
        return items, lead_idx, length

    def _plan_outside_blocks(self, pre: bool, pos: int, sl: Any, reference: int) -> list[WorkItem]:
        """The tensors before the blocks (``pre``: embeddings) or after them (norm, head), from slice ``pos``."""
        r, m = self.recipe, self.method
        base_ref = sl.base_model or r.base_model
        srcs = [s for s in sl.sources if not (m.needs_base and s.model == base_ref)]
        lead_idx = self.index[base_ref] if m.needs_base and base_ref else self.index[srcs[0].model]
        lead_ck = self.checkpoints[lead_idx]
        ref_ck = self.checkpoints[reference]
        experts = [self.index[s.model] for s in srcs]
        levels_g = [(sl.parameters, ("slices", pos, "parameters")), (r.parameters, ("parameters",))]
        items = []
        for name in self._ordered_names(lead_ck):
            if layer_index(name) is not None or is_pre_layer(name) != pre:
                continue
            info = lead_ck.info(name)
            row_fix = self.inputs.check(name, lead_idx, experts, info.shape)
            pad_from = None
            if lead_idx != reference and name in ref_ck and ref_ck.info(name).shape != info.shape:
                # the output must agree with the model whose config it carries (the first slice's)
                self.inputs.check(name, reference, [lead_idx], ref_ck.info(name).shape)
                info = ref_ck.info(name)
                row_fix, pad_from = True, InputRef(reference, name)
            t = self._position(name, None, None)
            gparams = self.params.resolve(levels_g, name, t, per_model=False)
            mparams = [self.params.resolve([(s.parameters, ())] + levels_g, name, t, per_model=True) for s in srcs]
            item = self._item(name, info, r.output_dtype, InputRef(lead_idx, name) if m.needs_base else None,
                              [InputRef(x, name) for x in experts], mparams, gparams, lead_idx, name, row_fix)
            item.pad_from = pad_from
            items.append(item)
        return items

    def _item(self, out_name, info, out_dtype, base, inputs, mparams, gparams, lead_idx, lead_name,
              row_fix: bool = False) -> WorkItem:
        is_float = info.dtype in FLOAT_DTYPES
        return WorkItem(
            name=out_name, shape=info.shape,
            dtype=(out_dtype or info.dtype) if is_float else info.dtype,
            base=base, inputs=inputs, model_params=mparams, params=gparams,
            seed=tensor_seed(self.recipe.seed, out_name),
            copy_from=None if is_float else InputRef(lead_idx, lead_name),
            row_fix=row_fix,
        )


def make_plan(loaded: LoadedRecipe, *, allow_pickle: bool = False, allow_external_files: bool = False) -> Plan:
    """Open the recipe's checkpoints and plan every output tensor (no tensor data is read). The
    caller closes the plan; when planning fails, every checkpoint it opened is closed here.
    ``allow_external_files``: the models' files may lie outside their folders (links to another disk)."""
    planner = _Planner(loaded, allow_pickle=allow_pickle, allow_external_files=allow_external_files)
    try:
        plan = planner.plan()
        _ = plan.input_bytes  # sized now, while every input is the file planned from
        return plan
    except BaseException:
        for c in planner.checkpoints:
            c.close()
        raise


def check_disk_space(plan: Plan, out_dir: Path) -> None:
    """Fail early when the output cannot fit on its file system (with 1% + 64 MiB headroom)."""
    parent = out_dir.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    need = plan.output_bytes
    if need * 1.01 + (64 << 20) > free:
        raise PlanError(
            f"not enough disk space for {out_dir}: the merged model needs {need / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free on {parent}",
            hint="free some space or choose another output directory",
        )
