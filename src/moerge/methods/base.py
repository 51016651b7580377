"""What a merge method is: a per-tensor merger factory plus a typed parameter schema.

A method never opens a file. For one output tensor it receives the tensor's
shape and its parameters, already resolved for that tensor (per-model
parameters as lists, one value per model), and returns a
:class:`~moerge.methods.protocol.TensorMerger`, which the executor feeds with
blocks of the base tensor (or None) and of each model's tensor, in float32 on
the compute device.

Conventions that differ between reference implementations are ordinary
parameters whose default depends on the *convention set* in force: ``paper``
(the reference code of the method's paper; moerge's own recipes) or
``mergekit`` (what mergekit computes; any recipe written in mergekit's format).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CONVENTIONS = ("paper", "mergekit")


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    ``per_model`` parameters may be given for each model (and fall back to the
    global value, then the default); global ones apply to the whole merge.
    ``defaults`` maps a convention set to its default when they differ.
    """

    name: str
    kind: type
    default: Any = REQUIRED
    doc: str = ""
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    arg: str | None = None  # Python keyword when the name is reserved (lambda)
    gradient: bool = True  # may be given as a list interpolated across layers
    in_mergekit: bool = True  # mergekit 0.1.5 reads this parameter for this method (else: it ignores it)
    constant: bool = False  # one value for the whole merge: no gradient, no filter

    @property
    def kwarg(self) -> str:
        return self.arg or self.name

    def with_default(self, default: Any) -> Param:
        """This parameter with another default (for a method whose paper uses another value)."""
        import dataclasses

        return dataclasses.replace(self, default=default, defaults={})

    def default_for(self, convention: str) -> Any:
        return self.defaults.get(convention, self.default)

    def check(self, value: Any) -> str | None:
        """Return an error text if ``value`` is not acceptable, else None."""
        if self.kind is bool:
            if not isinstance(value, bool):
                return f"expected true or false, got {value!r}"
            return None
        if self.kind is str:
            if not isinstance(value, str):
                return f"expected a string, got {value!r}"
            if self.choices and value not in self.choices:
                return f"expected one of {', '.join(self.choices)}, got {value!r}"
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {value!r}"
        if self.kind is int and not float(value).is_integer():
            return f"expected an integer, got {value!r}"
        v = float(value)
        if not math.isfinite(v):
            return f"expected a finite number, got {value!r}"
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return f"must be {'>' if self.low_open else '>='} {self.low}, got {value!r}"
        if self.high is not None and (v > self.high or (self.high_open and v == self.high)):
            return f"must be {'<' if self.high_open else '<='} {self.high}, got {value!r}"
        return None

    def describe_range(self) -> str:
        if self.choices:
            return "|".join(self.choices)
        if self.kind is bool:
            return "bool"
        if self.low is None and self.high is None:
            return self.kind.__name__
        lo = "(-inf" if self.low is None else ("(" if self.low_open else "[") + f"{self.low:g}"
        hi = "inf)" if self.high is None else f"{self.high:g}" + (")" if self.high_open else "]")
        rng = f" {lo}, {hi}"
        return self.kind.__name__ + rng


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method."""

    name: str
    fn: Callable[..., Any]
    params: tuple[Param, ...]
    summary: str
    citation: str
    needs_base: bool
    min_models: int = 1
    max_models: int | None = None
    family: str = ""
    # Optional factory of a whole-model pre-pass (e.g. TIES trim over the whole task vector).
    prepass: Callable[[dict[str, Any]], Any] | None = None
    # Data-aware methods: the kinds of per-model statistics (``moerge stats``) they read, first preferred.
    stats: tuple[str, ...] = ()
    # Uses the base model when the recipe names one (e.g. MaTS's task-arithmetic start), else not.
    optional_base: bool = False
    # For an optional base: a reason why these global parameters need one (or None).
    requires_base: Callable[[dict[str, Any]], str | None] | None = None
    # Whether, with these global parameters, a tensor is merged as one block (costed as such).
    whole_tensor: Callable[[dict[str, Any]], bool] | None = None
    # mergekit format: a base_model not listed among the models joins them as an ordinary model
    # (mergekit appends it to the inputs of methods that have no base).
    base_joins: bool = False
    # A check of one tensor's resolved parameters (per model, global) before anything runs: an error text or None.
    check: Callable[[list[dict[str, Any]], dict[str, Any]], str | None] | None = None

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    @property
    def accepts(self) -> set[str]:
        return set(inspect.signature(self.fn).parameters)

    def build(self, shape: tuple[int, ...], model_params: list[dict[str, Any]], params: dict[str, Any],
              **extra: Any) -> Any:
        """The :class:`~moerge.methods.protocol.TensorMerger` for one tensor of ``shape``."""
        kwargs: dict[str, Any] = {}
        for p in self.params:
            if p.per_model:
                kwargs[p.kwarg] = [mp[p.name] for mp in model_params]
            else:
                kwargs[p.kwarg] = params[p.name]
        accepted = self.accepts
        extra.setdefault("n_models", len(model_params))
        kwargs.update({k: v for k, v in extra.items() if k in accepted})
        return self.fn(tuple(shape), **kwargs)

    def __call__(self, base: Any, models: list[Any], model_params: list[dict[str, Any]],
                 params: dict[str, Any], *, block: int | None = None, native: bool = False,
                 out_dtype: Any = None, **extra: Any) -> Any:
        """Merge whole in-memory tensors; for tests and small merges.

        By default through the torch path in float32; ``native`` uses the fused
        kernels where the method has them (inputs bfloat16/float32, result in
        ``out_dtype``, default the inputs' dtype).
        """
        from moerge import native as kernels
        from moerge.methods.protocol import BLOCK, run_whole

        extra.setdefault("has_base", base is not None)
        merger = self.build(tuple(models[0].shape), model_params, params, **extra)
        use_native = native and kernels.available() and merger.native_ok()
        return run_whole(merger, base, list(models), block or BLOCK, native=use_native, out_dtype=out_dtype)


_REGISTRY: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    params: tuple[Param, ...],
    summary: str,
    citation: str,
    needs_base: bool,
    min_models: int = 1,
    max_models: int | None = None,
    family: str = "",
    prepass: Callable[[dict[str, Any]], Any] | None = None,
    stats: tuple[str, ...] = (),
    optional_base: bool = False,
    requires_base: Callable[[dict[str, Any]], str | None] | None = None,
    whole_tensor: Callable[[dict[str, Any]], bool] | None = None,
    base_joins: bool = False,
    check: Callable[[list[dict[str, Any]], dict[str, Any]], str | None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a merger factory ``fn(shape, **params) -> TensorMerger`` under ``name``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        _REGISTRY[name] = MergeMethod(
            name, fn, params, summary, citation, needs_base, min_models, max_models,
            family or fn.__module__.rsplit(".", 1)[-1], prepass, stats, optional_base, requires_base,
            whole_tensor, base_joins, check,
        )
        return fn

    return deco


def registry() -> dict[str, MergeMethod]:
    return _REGISTRY


# Parameters shared by the task-vector family --------------------------------------------
WEIGHT = Param("weight", float, 1.0, "scale of this model's task vector (or of the model, for linear)",
               per_model=True)
LAMBDA = Param("lambda", float, 1.0, "scale of the merged task vector before it is added to the base",
               arg="lam")
DENSITY = Param("density", float, 1.0, "fraction of task-vector entries kept", per_model=True,
                low=0.0, high=1.0, low_open=True)
