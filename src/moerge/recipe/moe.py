"""The upcycling recipe: mergekit-moe's YAML unchanged, plus moerge's keys (BTX, router dtype, seed).

mergekit-moe's keys (``base_model``, ``experts`` with ``source_model``, ``positive_prompts``,
``negative_prompts``, ``noise_scale``, ``residual_scale``; ``gate_mode``, ``experts_per_token``,
``shared_experts``, ``architecture``, ``dtype``) mean what they mean there. moerge adds:

- ``non_experts: {method: linear, parameters: {...}}`` — BTX: attention, norms, embeddings and head
  are *merged* over the experts by any merge method instead of copied from ``base_model``;
- ``gate_mode: data`` with ``data:`` per expert (a task name or a JSONL of prompt/target rows) — each row
  the mean of the state the router really sees (after ``post_attention_layernorm``) over the expert's own
  examples (``data_examples`` of them, ``max_length`` tokens each);
- ``router_dtype`` — the dtype of the base model's forward for the gate (default: bfloat16 for the
  ``hidden`` modes, as mergekit; float32 for ``data``);
- ``seed`` — for the random gate modes and ``noise_scale`` (mergekit draws from an unseeded generator);
- ``norm_topk_prob`` — renormalise the top-k routing weights (mergekit: always on).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moerge.errors import RecipeError
from moerge.recipe.loader import fields_at, read_yaml_source, validation_message, where_in
from moerge.recipe.schema import ParamValue, canonical_dtype

PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Expert(_Strict):
    source_model: str = Field(description="path, or Hugging Face repo id found in the local cache")
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = Field(None, description="add N(0, noise_scale²) to the expert's MLP weights")
    residual_scale: float | None = Field(None, description="multiply the expert's down_proj by this")
    data: str | None = Field(None, description="gate_mode data: the expert's examples (task name or JSONL)")


class NonExperts(_Strict):
    method: str = Field("linear", description="merge method of the non-expert tensors (BTX: linear)")
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class MoeRecipe(_Strict):
    """An upcycling recipe. The README's "Upcycling" section has examples."""

    base_model: str
    experts: list[Expert] = Field(min_length=1)
    gate_mode: Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random",
                       "data"] = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    # moerge's own keys
    non_experts: NonExperts | None = None
    router_dtype: str | None = None
    data_examples: int = Field(64, ge=1, description="gate_mode data: examples per expert")
    max_length: int = Field(256, ge=8, description="gate_mode data: tokens per example (longer ones keep their end)")
    seed: int = 0
    norm_topk_prob: bool = True
    name: str | None = None

    @field_validator("dtype", "router_dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        return canonical_dtype(value)

    @model_validator(mode="after")
    def _consistent(self) -> MoeRecipe:
        k, n = self.experts_per_token, len(self.experts)
        if k < 1:
            raise ValueError(f"experts_per_token must be at least 1, got {k}")
        if k > n:
            raise ValueError(f"experts_per_token is {k} but there are only {n} experts")
        if self.shared_experts is not None and len(self.shared_experts) > 1:
            raise ValueError(f"at most one shared expert is supported, got {len(self.shared_experts)}")
        return self

    @property
    def forward_dtype(self) -> str:
        """The dtype of the base model's forward for the router rows."""
        return self.router_dtype or ("float32" if self.gate_mode == "data" else "bfloat16")

    @property
    def shared(self) -> Expert | None:
        return self.shared_experts[0] if self.shared_experts else None

    def entries(self) -> list[tuple[str, int, Expert]]:
        """(recipe key, index, expert) of every routed expert, then the shared one."""
        out = [("experts", i, e) for i, e in enumerate(self.experts)]
        return out + ([("shared_experts", 0, self.shared)] if self.shared is not None else [])

    def model_refs(self) -> list[str]:
        """Every distinct model reference, base first."""
        refs = [self.base_model] + [e.source_model for e in self.experts]
        refs += [self.shared.source_model] if self.shared else []
        return list(dict.fromkeys(refs))


@dataclass
class LoadedMoeRecipe:
    recipe: MoeRecipe
    source: str = "<recipe>"
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict)
    text: str = ""

    @property
    def format(self) -> str:
        """"mergekit" when the recipe uses only mergekit-moe's keys."""
        own = ("non_experts", "router_dtype", "seed", "norm_topk_prob", "name", "data_examples", "max_length")
        r = self.recipe
        experts = r.experts + (r.shared_experts or [])
        if r.gate_mode == "data" or any(e.data for e in experts):
            return "moerge"
        return "moerge" if any(k in r.model_fields_set for k in own) else "mergekit"

    def where(self, *path: Any) -> str:
        """'file:line' of the deepest known prefix of ``path``."""
        return where_in(self.source, self.lines, path)


_CHILDREN: dict[tuple[type[BaseModel], str], type[BaseModel]] = {
    (MoeRecipe, "experts"): Expert, (MoeRecipe, "shared_experts"): Expert, (MoeRecipe, "non_experts"): NonExperts,
}


def _fields_at(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, list[str]]:
    return fields_at(MoeRecipe, _CHILDREN, loc)


def load_moe_recipe(source: str | os.PathLike[str] | dict[str, Any] | MoeRecipe) -> LoadedMoeRecipe:
    """Read and validate an upcycling recipe from a YAML path, YAML text, a dict or a MoeRecipe."""
    if isinstance(source, MoeRecipe):
        return LoadedMoeRecipe(source)
    name, text, lines = "<recipe>", "", {}
    if isinstance(source, dict):
        data: Any = source
    else:
        name, text, data, lines = read_yaml_source(source)
    if not isinstance(data, dict):
        raise RecipeError(f"{name}: an upcycling recipe is a YAML mapping with at least 'base_model' and 'experts'")
    if "merge_method" in data or "method" in data:
        raise RecipeError(f"{name}: this is a merge recipe ('merge_method'/'method'); upcycling recipes have "
                          "'base_model' and 'experts'", hint="run it with `moerge merge`")
    try:
        recipe = MoeRecipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(validation_message(e, lines, name, lambda loc: loc, _fields_at)) from None
    loaded = LoadedMoeRecipe(recipe, name, lines, text)
    _check_prompts(loaded)
    return loaded


def _check_prompts(loaded: LoadedMoeRecipe) -> None:
    """The prompt modes need every expert's positive prompts, and prompts that differ between experts."""
    r = loaded.recipe
    if r.gate_mode == "data":
        for key, i, e in r.entries():
            if not e.data:
                raise RecipeError(f"{loaded.where(key, i)}: {key}[{i}] ({e.source_model}) has no data; gate_mode "
                                  "data builds each router row from the expert's own examples",
                                  hint="give each expert data: TASK or data: FILE.jsonl (prompt/target rows)")
        return
    if r.gate_mode not in PROMPT_MODES:
        return
    for key, i, e in r.entries():
        if not e.positive_prompts:
            raise RecipeError(f"{loaded.where(key, i)}: {key}[{i}] ({e.source_model}) has no positive_prompts; "
                              f"gate_mode {r.gate_mode!r} builds each router row from them",
                              hint="add positive_prompts to every expert, or use gate_mode: random or uniform_random")
    prompts = {(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in r.experts}
    if len(prompts) == 1 and len(r.experts) > 1:
        raise RecipeError(f"{loaded.where('experts')}: every expert has the same prompts, so every router row "
                          "would be the same", hint="give each expert prompts of its own, or use gate_mode: "
                          "random or uniform_random")
