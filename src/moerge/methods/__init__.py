"""Merge methods, one module per family, registered by name.

>>> from moerge.methods import get_method
>>> get_method("ties").params  # doctest: +SKIP
"""

from __future__ import annotations

import importlib

from moerge.errors import UnknownMethodError, did_you_mean
from moerge.methods.base import CONVENTIONS, MergeMethod, Param, register, registry

FAMILIES = ("linear", "task_arithmetic", "ties", "dare", "breadcrumbs", "slerp", "model_stock",
            "passthrough", "fisher", "regmean", "mats", "della", "sce", "spherical", "nearswap",
            "arcee_fusion", "ram", "subspace", "wudi")
_loaded = False


def _load() -> None:
    global _loaded
    if not _loaded:
        for fam in FAMILIES:
            importlib.import_module(f"moerge.methods.{fam}")
        _loaded = True


def all_methods() -> dict[str, MergeMethod]:
    """Every registered method, by name."""
    _load()
    return dict(registry())


def get_method(name: str) -> MergeMethod:
    """Look up a method by name; unknown names get a suggestion."""
    methods = all_methods()
    if name not in methods:
        raise UnknownMethodError(
            f"unknown merge method {name!r}{did_you_mean(name, methods.keys())}",
            hint="`moerge methods` lists them all",
        )
    return methods[name]


__all__ = ["CONVENTIONS", "MergeMethod", "Param", "all_methods", "get_method", "register"]
