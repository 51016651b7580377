"""The statistics folder contract, in one place: what ``moerge stats`` writes and merges read.

A statistics folder is a safetensors model folder (written by moerge's writer)
plus ``moerge_stats.json``. Per weight ``W`` (out × in) of a linear layer it holds
the tensors named by :data:`PARTS` after the weight's own name:

- ``fisher``: the diagonal Fisher, shaped like the weight (every parameter has one);
- ``gram``: ``G = XᵀX / rows``, in × in;
- ``kfac``: ``<weight>::in`` = ``A = E[x xᵀ]`` (in × in) and ``<weight>::out`` = ``S = E[g gᵀ]`` (out × out).

``moerge_stats.json`` records the kind, the model it was computed from
(``model_fingerprint``, compared with the expert's before a merge, and
``model_hash`` of its files), the data, the settings, and for Fisher the global
norm ``norm`` that Fisher merging's normalisation divides by.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moerge.errors import MoergeError, PlanError
from moerge.io.containment import member
from moerge.io.untrusted import read_json_object

META = "moerge_stats.json"
KINDS = ("gram", "fisher", "kfac")
PARTS: dict[str, tuple[str, ...]] = {"fisher": ("",), "gram": ("",), "kfac": ("::in", "::out")}


def part_names(weight: str, kind: str) -> list[str]:
    """The statistic tensors of one weight."""
    return [weight + suffix for suffix in PARTS[kind]]


def part_shapes(kind: str, shape: tuple[int, ...]) -> list[tuple[int, ...]] | None:
    """The shape each statistic tensor of a weight of ``shape`` must have (None: this kind has no
    statistics for a weight that is not 2-D)."""
    if kind == "fisher":
        return [shape]
    if len(shape) != 2:
        return None
    return [(shape[1], shape[1]), (shape[0], shape[0])][: len(PARTS[kind])]


def read_meta(folder: Path, hint: str | None = None, *, allow_external_files: bool = False) -> dict[str, Any]:
    """The parsed ``moerge_stats.json`` of a statistics folder (inside it, see :mod:`moerge.io.containment`)."""
    try:
        path = member(folder, META, allow_external_files=allow_external_files)
    except MoergeError as e:
        raise PlanError(e.message, hint=e.hint) from None
    if path is None:
        raise PlanError(f"{folder}: not a statistics folder (no {META})", hint=hint)
    return read_json_object(path, error=PlanError)


def stale_for(meta: dict[str, Any], model_hash: str) -> bool:
    """Whether statistics were computed from other files than the model's current ones."""
    return meta.get("model_hash") != model_hash
