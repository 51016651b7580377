"""Resolving a parameter for one tensor: precedence, filters and gradients.

Precedence (first that gives a value wins): slice source > slice > model entry >
global ``parameters`` > the method's default for the convention set in force.
A value is a scalar, a *gradient* (a list interpolated piecewise-linearly over
the layer position t ∈ [0, 1]), or a list of ``{filter, value}`` conditions whose
filter is a substring of the tensor name (``*`` or no filter matches all); the
first matching condition wins, and if none matches the next level is asked.
"""

from __future__ import annotations

from typing import Any

NOT_SET: Any = object()

def is_filter_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def evaluate(value: Any, tensor_name: str, t: float) -> Any:
    """The value of a parameter for one tensor at layer position ``t`` (NOT_SET if no filter matches)."""
    if is_filter_list(value):
        for cond in value:
            f = cond.get("filter")
            if f is None or f == "*" or str(f) in tensor_name:
                return evaluate(cond.get("value"), tensor_name, t)
        return NOT_SET
    if isinstance(value, list):
        return interpolate(value, t)
    return value


def interpolate(values: list[Any], t: float) -> Any:
    """Piecewise-linear interpolation of ``values`` placed evenly on [0, 1]; non-numbers are picked."""
    if not values:
        raise ValueError("a gradient needs at least one value")
    if len(values) == 1:
        return values[0]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    pos = min(max(t, 0.0), 1.0) * (len(values) - 1)
    if not numeric:
        return values[min(int(pos), len(values) - 1)]
    i = min(int(pos), len(values) - 2)
    frac = pos - i
    return float(values[i]) * (1.0 - frac) + float(values[i + 1]) * frac


def check_shape(value: Any) -> str | None:
    """Structural check of a raw parameter value (before resolution); error text or None."""
    if is_filter_list(value):
        for cond in value:
            extra = set(cond) - {"filter", "value"}
            if extra:
                return f"a filter condition has unknown keys {sorted(extra)} (expected 'filter' and 'value')"
            if "value" not in cond:
                return "a filter condition needs a 'value'"
            err = check_shape(cond["value"])
            if err:
                return err
        return None
    if isinstance(value, list):
        if not value:
            return "an empty list is not a value"
        if any(isinstance(v, (list, dict)) for v in value):
            return "a gradient is a flat list of values"
    elif isinstance(value, dict):
        return "expected a value, a list (gradient) or a list of {filter, value} conditions"
    return None
