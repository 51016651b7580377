"""What a routed bundle holds, for ``moerge route inspect``: its options, experts and router statistics."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from moerge.routing.bundle import read_bundle


def _layer(module: str) -> int | None:
    m = re.search(r"\.(\d+)\.", module)
    return int(m.group(1)) if m else None


def describe_bundle(folder: str | Path) -> dict[str, Any]:
    """The bundle's spec plus, per layer, how alike the experts' router rows are (mean |cos| between the
    rows of two different experts: near 1, the router cannot tell the experts apart there)."""
    bundle = read_bundle(folder)
    per_layer: dict[str, list[float]] = {}
    for module in bundle.modules:
        rows = bundle.rows[module].double()
        n = rows.shape[0]
        if n < 2:
            continue
        unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        cos = (unit @ unit.T).abs()
        off = float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))
        per_layer.setdefault(str(_layer(module)), []).append(off)
    similarity = {layer: sum(v) / len(v) for layer, v in per_layer.items()}
    norms = torch.stack([bundle.rows[m].norm(dim=-1) for m in bundle.modules]).mean(0).tolist()
    return {"folder": str(bundle.folder), "method": bundle.method, "router": bundle.router,
            "method_options": bundle.spec.get("method_options", {}), "base": bundle.spec["base"],
            "experts": [{k: e.get(k) for k in ("name", "role", "rank", "source")} for e in bundle.spec["experts"]],
            "modules": len(bundle.modules), "module_names": bundle.modules, "build": bundle.spec.get("build", {}),
            "row_similarity_per_layer": similarity, "mean_row_norm_per_expert": norms}
