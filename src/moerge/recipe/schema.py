"""The typed recipe: what to merge, how, and into what.

moerge reads two spellings of the same structure:

* its own (``method:``), whose method conventions default to the methods'
  papers' reference code;
* mergekit's (``merge_method:``), which is accepted unchanged and switches every
  convention to what mergekit computes, so the result matches mergekit's.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A parameter value: a scalar, a gradient (list interpolated across layers) or a
# list of {filter, value} conditions (first matching filter wins).
ParamValue = Union[float, int, bool, str, list[Any]]  # noqa: UP007 - pydantic needs a runtime union

DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def canonical_dtype(value: str | None) -> str | None:
    """A recipe's dtype spelling (fp16, bf16, float …) as float32, float16 or bfloat16."""
    if value is None:
        return None
    if value not in DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {value!r}; use float32, float16 or bfloat16")
    return DTYPE_ALIASES[value]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelEntry(_Strict):
    model: str = Field(description="path, or Hugging Face repo id found in the local cache")
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    stats: str | None = Field(None, description="folder of this model's statistics (`moerge stats`), for "
                              "data-aware methods: fisher, regmean, mats")

    @field_validator("model")
    @classmethod
    def _no_lora_suffix(cls, v: str) -> str:
        import os

        if "+" in v and not os.path.exists(v):
            raise ValueError(
                f"{v!r}: 'model+lora' references (a LoRA applied to a model) are not supported "
                "yet; merge the adapter into its base first"
            )
        return v


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class Slice(_Strict):
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    residual_weight: float | None = Field(default=None, description="mergekit schema key; unused there too")

    @model_validator(mode="after")
    def _same_lengths(self) -> Slice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"every source of a slice must span the same number of layers, got {sorted(lengths)}")
        return self


class TokenizerSpec(_Strict):
    source: str | None = Field(None, description="union (mergekit's default), base, or a model")
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


class Recipe(_Strict):
    """A merge recipe. See the README's recipe gallery for examples."""

    method: str = Field(description="merge method name; `moerge methods` lists them")
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: str | None = Field(default=None, description="output dtype (mergekit: also its compute dtype)")
    out_dtype: str | None = None
    seed: int = 0
    conventions: Literal["paper", "mergekit"] = "paper"
    tokenizer_source: str | None = None
    tokenizer: TokenizerSpec | None = None
    config_source: str | None = None
    chat_template: str | None = None
    name: str | None = None
    description: str | None = None
    vocab_policy: Literal["error", "base"] = Field(
        default="error",
        description="when embedding rows differ between models: stop with an error, or take the "
        "base model's vocabulary (crop or pad the others' rows; padded rows keep the base values)",
    )

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        return canonical_dtype(value)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("models"), list):
            data = dict(data)
            data["models"] = [{"model": m} if isinstance(m, str) else m for m in data["models"]]
        return data

    @model_validator(mode="after")
    def _shape(self) -> Recipe:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give either 'tokenizer_source' or a 'tokenizer:' block, not both")
        if self.tokenizer is not None and self.tokenizer.pad_to_multiple_of is not None and \
                self.tokenizer.pad_to_multiple_of < 1:
            raise ValueError("tokenizer.pad_to_multiple_of must be a positive integer")
        return self

    @property
    def output_dtype(self) -> str | None:
        return self.out_dtype or self.dtype

    @property
    def tokenizer_from(self) -> str | None:
        if self.tokenizer is not None:
            return self.tokenizer.source or "union"  # mergekit's default for a tokenizer block
        return self.tokenizer_source

    def model_refs(self) -> list[str]:
        """Every distinct model reference, base first."""
        refs: list[str] = []
        if self.base_model:
            refs.append(self.base_model)
        for m in self.models or []:
            refs.append(m.model)
        for s in self.slices or []:
            if s.base_model:
                refs.append(s.base_model)
            refs.extend(src.model for src in s.sources)
        return list(dict.fromkeys(refs))
