"""moerge: recycle fine-tuned expert models by merging, routing and evaluating them.

The top-level functions are imported lazily so that ``import moerge`` (and the
CLI's ``--help``) stay fast; torch is only imported when a merge runs.
"""

from __future__ import annotations

from typing import Any

from moerge.version import __version__

__all__ = ["__version__", "derive_routed", "diff", "inspect", "load_recipe", "load_routed", "lorahub", "merge", "methods", "inspect_moe", "route", "shrink_moe", "train_moe_router", "upcycle"]


def __getattr__(name: str) -> Any:
    if name in ("merge", "inspect", "diff", "methods", "route", "load_routed", "lorahub", "derive_routed",
                "upcycle", "inspect_moe", "shrink_moe",
                "train_moe_router"):
        from moerge import api

        return getattr(api, name)
    if name == "load_recipe":
        from moerge.recipe import load_recipe

        return load_recipe
    raise AttributeError(f"module 'moerge' has no attribute {name!r}")
