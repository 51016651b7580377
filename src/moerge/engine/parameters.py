"""The parameters of a recipe for its method: every key known and well placed, and each tensor's values.

Precedence, filters and gradients are :mod:`moerge.recipe.params`; this adds what
needs the method: its parameter schema, defaults per convention set, ranges, and
the recipe line of every value for the error that names it.
"""

from __future__ import annotations

from typing import Any

from moerge.errors import PlanError, UnknownMethodError, did_you_mean
from moerge.methods import MergeMethod, get_method
from moerge.methods.base import REQUIRED
from moerge.recipe.loader import LoadedRecipe
from moerge.recipe.params import NOT_SET, check_shape, evaluate

# mergekit-only parameters that change nothing in moerge's arithmetic
IGNORED_PARAMS = {"int8_mask"}


def _someones_parameter(key: str) -> bool:
    """Whether ``key`` is a parameter of any registered method (so not a typo)."""
    from moerge.methods import all_methods

    return any(m.param(key) is not None for m in all_methods().values())


Levels = list[tuple[dict[str, Any], tuple[Any, ...]]]  # (parameters, their path in the recipe), first wins


def recipe_method(loaded: LoadedRecipe) -> MergeMethod:
    """The recipe's merge method (an unknown name is an error on the recipe's method line)."""
    try:
        return get_method(loaded.recipe.method)
    except UnknownMethodError as e:
        key = "merge_method" if loaded.format == "mergekit" else "method"
        raise UnknownMethodError(f"{loaded.where(key)}: {e.message}", hint=e.hint) from None


class RecipeParameters:
    """Checks and resolves the parameters of ``loaded`` for ``method``; warnings go to ``warnings``."""

    def __init__(self, loaded: LoadedRecipe, method: MergeMethod, warnings: list[str]) -> None:
        self.loaded = loaded
        self.method = method
        self.warnings = warnings

    def check_keys(self, params: dict[str, Any], path: tuple[Any, ...], per_model: bool) -> None:
        """Every key of one parameters block (at ``path`` in the recipe) is the method's, in its place."""
        names = {p.name for p in self.method.params}
        for key, value in params.items():
            where = self.loaded.where(*path, key)
            if key in IGNORED_PARAMS:
                continue
            p = self.method.param(key)
            if p is None and self.loaded.format == "mergekit" and _someones_parameter(key):
                # mergekit ignores parameters its method does not read (a copied `weight:` under sce)
                self.warnings.append(f"{where}: {self.method.name} has no parameter {key!r}; ignored, as "
                                     "mergekit ignores it")
                continue
            if p is None:
                known = ", ".join(sorted(names)) or "none"
                raise PlanError(
                    f"{where}: {self.method.name} has no parameter {key!r}{did_you_mean(key, names)}",
                    hint=f"its parameters are: {known} (see `moerge methods {self.method.name}`)",
                )
            if self.loaded.format == "mergekit" and not p.in_mergekit:
                self.warnings.append(
                    f"{where}: mergekit ignores {key!r} for {self.method.name}; moerge applies it, so "
                    "the result will differ from mergekit's"
                )
            if per_model and not p.per_model:
                raise PlanError(
                    f"{where}: {key!r} is a global parameter of {self.method.name}; set it under "
                    "the top-level 'parameters:'"
                )
            err = check_shape(value)
            if err is None and isinstance(value, list) and p.constant:
                err = f"{key!r} applies to the whole merge (give one value, no list or filter)"
            elif err is None and isinstance(value, list) and not p.gradient and not all(
                isinstance(v, dict) for v in value
            ):
                err = f"{key!r} cannot vary across layers (give one value)"
            if err:
                raise PlanError(f"{where}: {key}: {err}")

    def resolve(self, levels: Levels, tensor: str, t: float, per_model: bool) -> dict[str, Any]:
        """The global (or per-model) parameters of one tensor at layer position ``t``."""
        out: dict[str, Any] = {}
        for p in self.method.params:
            if p.per_model != per_model:
                continue
            value, where = NOT_SET, "default"
            for params, path in levels:
                if p.name in params:
                    v = evaluate(params[p.name], tensor, t)
                    if v is not NOT_SET:
                        value, where = v, self.loaded.where(*path, p.name)
                        break
            if value is NOT_SET:
                value = p.default_for(self.loaded.recipe.conventions)
                if value is REQUIRED:
                    raise PlanError(f"{self.loaded.source}: {self.method.name} needs parameter {p.name!r} (for {tensor})")
            if p.kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            err = p.check(value)
            if err:
                raise PlanError(f"{where}: {p.name} {err} (for tensor {tensor})")
            out[p.name] = value
        return out
