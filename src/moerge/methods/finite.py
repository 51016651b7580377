"""The one NaN/Inf check of inputs: cheap when everything is finite, precise when not."""

from __future__ import annotations

import torch


def first_nonfinite(t: torch.Tensor) -> int | None:
    """Flat index of the first NaN or ±Inf in ``t``, or None when every entry is finite.

    NaN propagates through ``aminmax`` and ±Inf shows there, so a finite tensor costs two
    reductions and no mask; the mask is built only to locate a bad entry.
    """
    if not t.numel():
        return None
    lo, hi = torch.aminmax(t)
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return None
    return int((~torch.isfinite(t.reshape(-1))).nonzero()[0, 0])
