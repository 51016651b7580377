"""Per-expert statistics for data-aware merges: the folder contract (:mod:`moerge.stats.format`) and
their computation (:mod:`moerge.stats.collect`, which loads torch and transformers: imported on use)."""

from __future__ import annotations

from typing import Any

__all__ = ["KINDS", "STATS_META", "StatsError", "StatsSettings", "compute_stats"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from moerge.stats import collect

        return getattr(collect, name)
    raise AttributeError(f"module 'moerge.stats' has no attribute {name!r}")
