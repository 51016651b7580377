"""Planning an upcycle: dense experts → one MoE checkpoint, as work items of the one executor.

The non-expert tensors (attention, norms, embeddings, head) are planned as an ordinary merge:
copied from ``base_model`` (mergekit-moe: ``passthrough`` of the base) or, for BTX, merged over
the experts by the recipe's ``non_experts`` method. The dense MLPs become *stack* items (each
layer's experts concatenated and stacked into the fused tensors, or one item per expert matrix in
the per-expert layout); router rows and missing zero biases are *computed* items. Everything is
checked here, before a byte is written or a model forward runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.arch.moe_layouts import DENSE_MLP, LAYOUTS, MoeArchitecture, dense_mlp_name, probe, select_architecture
from moerge.engine.items import InputRef, Piece, WorkItem
from moerge.engine.plan import Plan, make_plan
from moerge.errors import MoergeError, PlanError
from moerge.io.checkpoint import open_source
from moerge.recipe.loader import load_recipe
from moerge.recipe.moe import PROMPT_MODES, Expert, LoadedMoeRecipe, MoeRecipe

_DENSE_MLP_RE = re.compile(r"^model\.layers\.\d+\.mlp\.")
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size")


@dataclass
class UpcyclePlan:
    loaded: LoadedMoeRecipe
    plan: Plan  # what the executor runs (its checkpoints: the non-expert recipe's models, then the other experts)
    arch: MoeArchitecture
    layout: str
    config: dict[str, Any]
    index: dict[str, int]  # model reference → checkpoint index
    router_items: list[WorkItem]  # (L) routers, then (L) shared-expert gates; values filled by compute_router
    warnings: list[str] = field(default_factory=list)

    @property
    def recipe(self) -> MoeRecipe:
        return self.loaded.recipe

    def summary(self) -> dict[str, Any]:
        r = self.recipe
        items = self.plan.items
        return {
            "architecture": self.arch.class_name, "layout": self.layout, "experts": len(r.experts),
            "experts_per_token": r.experts_per_token, "gate_mode": r.gate_mode,
            "non_experts": r.non_experts.method if r.non_experts else f"copied from {r.base_model}",
            "tensors": len(items), "parameters": sum(math.prod(i.shape) for i in items),
            "output_bytes": sum(i.nbytes for i in items), "input_bytes": self.plan.input_bytes,
            "models": list(self.index),
        }

    def close(self) -> None:
        self.plan.close()


def _dtype_of(config: dict[str, Any] | None) -> str:
    d = (config or {}).get("dtype") or (config or {}).get("torch_dtype") or "float32"
    return str(d).removeprefix("torch.")


def _non_expert_recipe(loaded: LoadedMoeRecipe, dtype: str) -> dict[str, Any]:
    r = loaded.recipe
    if r.non_experts is None:  # mergekit-moe: everything that is not an MLP comes from the base
        return {"method": "passthrough", "models": [r.base_model], "dtype": dtype}
    return {"method": r.non_experts.method, "base_model": r.base_model,
            "models": [e.source_model for e in r.experts], "parameters": dict(r.non_experts.parameters),
            "dtype": dtype, "seed": r.seed}


def plan_upcycle(loaded: LoadedMoeRecipe, *, layout: str | None = None, allow_pickle: bool = False,
                 allow_external_files: bool = False) -> UpcyclePlan:
    """Check the recipe against its models and plan every output tensor (no tensor data is read, no
    model runs). The caller closes the plan."""
    r = loaded.recipe
    if layout is not None and layout not in LAYOUTS:
        raise PlanError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    base_cfg = _configs_checked(loaded, allow_pickle, allow_external_files)
    dtype = r.dtype or _dtype_of(base_cfg[r.base_model])
    types = [str(base_cfg[ref].get("model_type")) for ref in r.model_refs()]
    try:
        arch = select_architecture(r.architecture, types, len(r.shared_experts or []))
    except ValueError as err:
        raise PlanError(f"{loaded.where('architecture')}: {err}") from None
    layout = layout or probe(arch).default_layout
    if r.gate_mode == "data":
        _check_data(loaded)
    plan = make_plan(load_recipe(_non_expert_recipe(loaded, dtype)), allow_pickle=allow_pickle,
                     allow_external_files=allow_external_files)
    try:
        index = {c.ref: i for i, c in enumerate(plan.checkpoints)}
        for ref in r.model_refs():
            if ref not in index:
                index[ref] = len(plan.checkpoints)
                plan.checkpoints.append(open_source(ref, allow_pickle=allow_pickle,
                                                    allow_external_files=allow_external_files))
        builder = _Builder(loaded, plan, arch, layout, index, dtype, base_cfg[r.base_model])
        builder.build()
        cfg = arch.config(base_cfg[r.base_model], len(r.experts), r.experts_per_token,
                          norm_topk_prob=r.norm_topk_prob)
        cfg["dtype"] = dtype
        _ = plan.input_bytes
        return UpcyclePlan(loaded, plan, arch, layout, cfg, index, builder.routers, builder.warnings)
    except BaseException:
        plan.close()
        raise


def _check_data(loaded: LoadedMoeRecipe) -> None:
    """Every expert's data source exists: a JSONL file, or a task of the suite."""
    from pathlib import Path

    from moerge.data.tasks import get_task

    r = loaded.recipe
    for key, i, e in r.entries():
        src = str(e.data)
        if src.endswith(".jsonl") or Path(src).exists():
            if not Path(src).is_file():
                raise PlanError(f"{loaded.where(key, i, 'data')}: {key}[{i}]'s data {src} is not a file")
            continue
        try:
            get_task(src)
        except MoergeError as err:
            raise PlanError(f"{loaded.where(key, i, 'data')}: {key}[{i}]'s data {src!r} is neither a file nor a "
                            f"task ({err.message})", hint=f"{err.hint}; or a JSONL file of prompt/target rows") from None


def _configs_checked(loaded: LoadedMoeRecipe, allow_pickle: bool, allow_external_files: bool) -> dict[str, dict[str, Any]]:
    """Every model's config.json, checked to be one architecture of one size."""
    r = loaded.recipe
    configs: dict[str, dict[str, Any]] = {}
    for ref in r.model_refs():
        with open_source(ref, allow_pickle=allow_pickle, allow_external_files=allow_external_files) as src:
            if src.config is None:
                raise PlanError(f"{ref}: no config.json; upcycling reads each model's architecture from it")
            configs[ref] = src.config
    base = configs[r.base_model]
    for ref, cfg in configs.items():
        if cfg.get("model_type") != base.get("model_type"):
            raise PlanError(f"{ref} is a {cfg.get('model_type')} model but the base model {r.base_model} is a "
                            f"{base.get('model_type')} model; the experts of one MoE must be of one architecture")
        for key in SIZE_KEYS:
            if cfg.get(key) != base.get(key):
                raise PlanError(f"{ref} has {key} = {cfg.get(key)} but the base model {r.base_model} has "
                                f"{base.get(key)}; the experts of one MoE must be models of one size")
        if cfg.get("mlp_bias"):
            raise PlanError(f"{ref} has MLP biases (mlp_bias: true), which the MoE outputs have no place for")
    return configs


class _Builder:
    def __init__(self, loaded: LoadedMoeRecipe, plan: Plan, arch: MoeArchitecture, layout: str,
                 index: dict[str, int], dtype: str, base_cfg: dict[str, Any]) -> None:
        self.loaded, self.plan, self.arch, self.layout = loaded, plan, arch, layout
        self.index, self.dtype = index, dtype
        self.layers = int(base_cfg["num_hidden_layers"])
        self.hidden = int(base_cfg["hidden_size"])
        self.width = int(base_cfg["intermediate_size"])
        self.transposed = probe(arch).transposed
        self.routers: list[WorkItem] = []
        self.warnings: list[str] = []

    def build(self) -> None:
        r = self.loaded.recipe
        others = [i for i in self.plan.items if _DENSE_MLP_RE.match(i.name)
                  and i.name.rsplit(".", 2)[-2] not in DENSE_MLP]
        if others:
            raise PlanError(f"{r.base_model}: MLP tensor {others[0].name!r} has no place in {self.arch.class_name}")
        items = [i for i in self.plan.items if not _DENSE_MLP_RE.match(i.name)]
        for k, e in enumerate(r.experts):
            self._check_mlp(e, ("experts", k))
        if r.shared is not None:
            self._check_mlp(r.shared, ("shared_experts", 0))
        items += self._biases()
        for layer in range(self.layers):
            items += self._experts(layer)
            router = self._computed(self.arch.router(layer, self.layout), (len(r.experts), self.hidden))
            self.routers.append(router)
            items.append(router)
        if r.shared is not None:
            for layer in range(self.layers):
                items += self._shared(layer)
                gate = self._computed(self.arch.shared_gate(layer), (1, self.hidden))
                self.routers.append(gate)
                items.append(gate)
        if len({e.source_model for e in r.experts}) == 1 and len(r.experts) > 1:
            self.warnings.append("every expert is the same model: the MoE computes what that model computes, "
                                 "at more cost, until its experts are trained apart")
        self.plan.items = sorted(items, key=layer_order)

    def _check_mlp(self, e: Expert, where: tuple[str, int]) -> None:
        src = self.plan.checkpoints[self.index[e.source_model]]
        want = {"gate_proj": (self.width, self.hidden), "up_proj": (self.width, self.hidden),
                "down_proj": (self.hidden, self.width)}
        for layer in range(self.layers):
            for part, shape in want.items():
                name = dense_mlp_name(layer, part)
                if name not in src:
                    raise PlanError(f"{self.loaded.where(*where)}: {e.source_model} has "
                                    f"no {name} (upcycling takes Llama-style gate/up/down MLPs)")
                got = tuple(src.info(name).shape)
                if got != shape:
                    raise PlanError(f"{e.source_model}: {name} has shape {list(got)}, expected {list(shape)} "
                                    f"(intermediate {self.width}, hidden {self.hidden})")

    def _piece(self, e: Expert, layer: int, part: str, fused: bool = True) -> Piece:
        """Expert ``e``'s dense ``part`` of ``layer``, with its residual scale and noise; transposed when it
        goes into fused tensors stored [E, H, 2I]."""
        scale = e.residual_scale if part == "down_proj" and e.residual_scale is not None else 1.0
        return Piece(InputRef(self.index[e.source_model], dense_mlp_name(layer, part)), scale=scale,
                     noise=e.noise_scale or 0.0, transpose=fused and self.transposed and self.layout == "fused")

    def _stack(self, name: str, groups: list[list[Piece]], shape: tuple[int, ...], stacked: bool) -> WorkItem:
        cat_dim = 1 if self.transposed and self.layout == "fused" else 0
        return WorkItem(name=name, shape=shape, dtype=self.dtype, base=None, inputs=[], model_params=[], params={},
                        seed=self.loaded.recipe.seed, groups=groups, cat_dim=cat_dim, stacked=stacked)

    def _experts(self, layer: int) -> list[WorkItem]:
        r = self.loaded.recipe
        n, h, w = len(r.experts), self.hidden, self.width
        if self.layout == "fused":
            gate_up, down = self.arch.fused(layer)
            t = self.transposed
            return [
                self._stack(gate_up, [[self._piece(e, layer, "gate_proj"), self._piece(e, layer, "up_proj")]
                                      for e in r.experts], (n, h, 2 * w) if t else (n, 2 * w, h), True),
                self._stack(down, [[self._piece(e, layer, "down_proj")] for e in r.experts],
                            (n, w, h) if t else (n, h, w), True),
            ]
        items = []
        for k, e in enumerate(r.experts):
            for name, part in zip(self.arch.per_expert(layer, k), DENSE_MLP):
                shape = (h, w) if part == "down_proj" else (w, h)
                items.append(self._stack(name, [[self._piece(e, layer, part)]], shape, False))
        return items

    def _shared(self, layer: int) -> list[WorkItem]:
        e = self.loaded.recipe.shared
        assert e is not None
        h, w = self.hidden, self.width
        return [self._stack(name, [[self._piece(e, layer, part, fused=False)]], (h, w) if part == "down_proj" else (w, h),
                            False)
                for name, part in zip(self.arch.shared(layer), DENSE_MLP)]

    def _computed(self, name: str, shape: tuple[int, ...], value: torch.Tensor | None = None) -> WorkItem:
        return WorkItem(name=name, shape=shape, dtype=self.dtype, base=None, inputs=[], model_params=[], params={},
                        seed=self.loaded.recipe.seed, value=torch.zeros(shape) if value is None else value)

    def _biases(self) -> list[WorkItem]:
        """Qwen2-MoE's q/k/v biases, zeros when the dense base has none (as mergekit writes them)."""
        if not self.arch.attention_bias:
            return []
        base = self.plan.checkpoints[self.index[self.loaded.recipe.base_model]]
        out = []
        for layer in range(self.layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                name = f"model.layers.{layer}.self_attn.{proj}.bias"
                if name not in base:
                    rows = base.info(f"model.layers.{layer}.self_attn.{proj}.weight").shape[0]
                    out.append(self._computed(name, (rows,)))
        return out


def layer_order(item: WorkItem) -> tuple[int, str]:
    """Embeddings first, then the layers in order, then the rest (final norm, head)."""
    m = re.match(r"^model\.layers\.(\d+)\.", item.name)
    if m:
        return (1 + int(m.group(1)), item.name)
    return (0 if "embed" in item.name else 1 << 30, item.name)


def compute_router(up: UpcyclePlan, device: str = "cpu") -> list[str]:
    """Fill the plan's router rows (and shared-expert gates) by the recipe's gate mode; returns warnings.
    The ``hidden`` modes run the dense base model (on ``device``)."""
    from moerge.io.tokenizers import load_tokenizer
    from moerge.moe import router_init as ri

    r = up.recipe
    sets = [e for _, _, e in r.entries()]
    base = up.plan.checkpoints[up.index[r.base_model]]
    cfg = base.config or {}
    layers, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    if r.gate_mode in ("random", "uniform_random"):
        rows = ri.random_rows(r.gate_mode, layers, len(sets), hidden, r.seed)
    elif r.gate_mode == "data":
        from moerge.data.samples import load_samples

        tokenizer = load_tokenizer(base)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = ri.load_base_for_hidden(base.root, r.forward_dtype, device)
        samples = [load_samples(str(e.data), limit=r.data_examples) for e in sets]
        rows = ri.data_rows(model, tokenizer, samples, max_length=r.max_length)
    else:
        tokenizer = load_tokenizer(base)
        if r.gate_mode == "cheap_embed":
            name = "model.embed_tokens.weight"
            if name not in base:
                raise PlanError(f"{r.base_model}: gate_mode cheap_embed reads {name}, which it does not have")
            summary = ri.cheap_embed_summary(base.read(name).reshape(base.info(name).shape), layers)
        else:
            model = ri.load_base_for_hidden(base.root, r.forward_dtype, device)
            summary = ri.hidden_summary(model, r.gate_mode)
        rows = ri.prompt_rows(summary, tokenizer, [ri.PromptSet(e.positive_prompts or (), e.negative_prompts or ())
                                                   for e in sets])
    n = len(r.experts)
    for layer in range(layers):
        up.router_items[layer].value = rows[layer, :n].clone()
        if r.shared is not None:
            up.router_items[layers + layer].value = rows[layer, n:].clone()
    bad = ri.degenerate_layers(rows)
    if bad and r.gate_mode in PROMPT_MODES:
        worst = max(bad, key=lambda b: b[1])
        return [f"router rows of {len(bad)} of {layers} layers are nearly dependent (condition number above 5; "
                f"worst: layer {worst[0]}, {worst[1]:.1f}): the prompts are too alike, so some experts will "
                "rarely be chosen"]
    return []
