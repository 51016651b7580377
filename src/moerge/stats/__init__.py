"""Statistics of an expert over data (Gram matrices, diagonal Fisher, K-FAC factors), saved as files."""

from moerge.stats.collect import KINDS, STATS_META, StatsError, StatsSettings, compute_stats

__all__ = ["KINDS", "STATS_META", "StatsError", "StatsSettings", "compute_stats"]
