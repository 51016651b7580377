"""Fused CPU kernels for the task-vector family (C, built at install, called through ctypes).

The kernels in ``kernels.c`` take blocks in their stored dtype (bfloat16 or
float32), so conversion, task vectors, masks, sign election, the combination
and the rounding to the output dtype happen in one pass per block. ctypes
releases the GIL during each call, so the executor's worker threads run them in
parallel. :func:`available` says whether they are built; without them (no C
compiler at install, ``MOERGE_NATIVE=0``, or a CUDA device) moerge uses its
torch code path, which computes the same values.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from ctypes import POINTER, c_double, c_float, c_int, c_int64, c_uint8, c_uint32, c_uint64, c_void_p
from functools import lru_cache
from typing import Any

import torch

DT_CODES = {torch.float32: 0, torch.bfloat16: 1}
MASK_NONE, MASK_THRESHOLD, MASK_WINDOW, MASK_BERNOULLI, MASK_DROP_ALL = 0, 1, 2, 3, 4
COMBINE_SUM, COMBINE_CONSENSUS_SUM, COMBINE_CONSENSUS_COUNT = 0, 1, 2


class TVModel(ctypes.Structure):
    """One model's sparsifier and part in the combination (``tv_model`` in kernels.c)."""

    _fields_ = [
        ("mask", c_int64),
        ("has_lo", c_int64), ("cut_lo", c_int64), ("seen_lo", c_int64),
        ("has_hi", c_int64), ("cut_hi", c_int64), ("seen_hi", c_int64),
        ("seed", c_int64), ("t24", c_int64),
        ("weight", c_double), ("scale", c_double), ("vote_weight", c_double), ("sign", c_double),
        ("div_weight", c_double), ("lo", c_double), ("hi", c_double),
        ("keep_bits", c_void_p),
    ]


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    if os.environ.get("MOERGE_NATIVE", "1") == "0":
        return None
    try:
        from moerge.native import _kernels  # type: ignore[attr-defined]
    except ImportError:
        return None
    lib = ctypes.CDLL(_kernels.__file__)
    i64p = POINTER(c_int64)
    lib.mk_bernoulli.argtypes = [c_int64, c_int64, c_uint64, c_uint32, POINTER(c_uint8)]
    lib.mk_bernoulli.restype = None
    lib.mk_uniform24.argtypes = [c_int64, c_int64, c_uint64, POINTER(ctypes.c_int32)]
    lib.mk_uniform24.restype = None
    lib.mk_hist_hi.argtypes = [c_void_p, c_int, c_void_p, c_int, c_int64, i64p]
    lib.mk_hist_lo.argtypes = [c_void_p, c_int, c_void_p, c_int, c_int64, c_int, POINTER(ctypes.c_int32), i64p]
    lib.mk_dare_l1.argtypes = [c_void_p, c_int, c_void_p, c_int, c_int64, c_int64, c_uint64, c_uint32,
                               POINTER(c_double), c_void_p]
    lib.mk_tv_emit.argtypes = [c_void_p, c_int, POINTER(c_void_p), POINTER(ctypes.c_int32), c_int,
                               POINTER(TVModel), c_int64, c_int64, c_int, c_float, c_float, c_int, c_float,
                               c_void_p, c_int, i64p, POINTER(c_double)]
    lib.mk_gram.argtypes = [c_void_p, c_int, POINTER(c_void_p), POINTER(ctypes.c_int32), c_int, c_int64,
                            POINTER(c_double)]
    lib.mk_linear_emit.argtypes = [POINTER(c_void_p), POINTER(ctypes.c_int32), c_int, POINTER(c_float), c_int64,
                                   c_float, c_void_p, c_int, i64p]
    u32p = POINTER(ctypes.c_uint32)
    lib.mk_bracket.argtypes = [c_void_p, c_int, c_void_p, c_int, c_int64, c_int, u32p, u32p, i64p,
                               POINTER(c_void_p), c_int64]
    try:  # the bus-error guard (a kernels build older than it has none: the kernels still work)
        lib.mk_bus_guard.argtypes = [ctypes.c_char_p]
        lib.mk_bus_guard.restype = c_int
        lib.mk_bus_unguard.argtypes = []
        lib.mk_bus_unguard.restype = c_int
        lib.mk_bus_note.argtypes = [ctypes.c_size_t, c_uint64, ctypes.c_char_p]
        lib.mk_bus_note.restype = None
        lib.has_bus_guard = True
    except AttributeError:
        lib.has_bus_guard = False
    for f in (lib.mk_hist_hi, lib.mk_hist_lo, lib.mk_dare_l1, lib.mk_tv_emit, lib.mk_linear_emit, lib.mk_gram,
              lib.mk_bracket):
        f.restype = c_int64
    return lib


_disabled = False


def available() -> bool:
    """True when the native kernels are built and not disabled (``MOERGE_NATIVE=0``, :func:`disabled`)."""
    return not _disabled and _lib() is not None


@contextmanager
def disabled() -> Iterator[None]:
    """Use the torch code path inside this block (tests compare the two paths)."""
    global _disabled
    before, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = before


_bus_lock = threading.Lock()
_bus_users = 0


@contextmanager
def bus_error_message(message: str) -> Iterator[None]:
    """While inside, a bus error (an input that shrank while mapped) ends the process with "error: FILE:
    ``message``" on standard error (FILE as told by :func:`note_mapping`) and exit status 135 instead of a
    bare "Bus error" (see ``mk_bus_guard`` in kernels.c); the signal's previous disposition is restored
    after the last user leaves. Inputs are
    mapped only when the kernels are available, so without them there is nothing to guard."""
    global _bus_users
    lib = _lib()
    if lib is None or not lib.has_bus_guard:
        yield
        return
    with _bus_lock:
        if _bus_users == 0:
            lib.mk_bus_guard(message.encode("utf-8", "replace")[:1023])
        _bus_users += 1
    try:
        yield
    finally:
        with _bus_lock:
            _bus_users -= 1
            if _bus_users == 0:
                lib.mk_bus_unguard()


def note_mapping(t: torch.Tensor, path: str) -> None:
    """Tell the bus-error handler that ``t`` (a tensor mapped from a file) lives in ``path``, so that its
    message names the file that shrank."""
    lib = _lib()
    if lib is not None and lib.has_bus_guard and t.numel():
        lib.mk_bus_note(t.data_ptr(), t.numel() * t.element_size(), os.fsencode(path)[:511])


def _lib_or_raise() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        raise RuntimeError("moerge's native kernels are not available")
    return lib


def _check(nonfinite: int) -> int:
    if nonfinite < 0:
        raise MemoryError("native kernel could not allocate its scratch buffer")
    return nonfinite


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _dt(t: torch.Tensor | None) -> int:
    return 0 if t is None else DT_CODES[t.dtype]


def t24(density: float) -> int:
    """The integer keep threshold of a density: keep iff the top 24 bits of the hash are below it."""
    return min(1 << 24, math.ceil(density * (1 << 24)))


def bernoulli(start: int, count: int, seed: int, density: float) -> torch.Tensor:
    """Keep-mask of elements [start, start+count) (the C twin of ``masks.bernoulli_keep_range``)."""
    out = torch.empty(count, dtype=torch.uint8)
    _lib_or_raise().mk_bernoulli(start, count, seed, t24(density), ctypes.cast(out.data_ptr(), POINTER(c_uint8)))
    return out.bool()


def uniform24(start: int, count: int, seed: int) -> torch.Tensor:
    """Elements [start, start+count) of the seeded 24-bit stream (the C twin of ``masks.uniform24_range``),
    int32."""
    out = torch.empty(count, dtype=torch.int32)
    _lib_or_raise().mk_uniform24(start, count, seed & ((1 << 64) - 1), ctypes.cast(out.data_ptr(), POINTER(ctypes.c_int32)))
    return out


def hist_hi(base: torch.Tensor | None, model: torch.Tensor, hist: torch.Tensor) -> int:
    """hist (int64[32768]) += histogram of the high half-words of |model − base|; returns #non-finite inputs."""
    return _check(_lib_or_raise().mk_hist_hi(_ptr(base), _dt(base), model.data_ptr(), _dt(model), model.numel(),
                                             ctypes.cast(hist.data_ptr(), POINTER(c_int64))))


def bracket(base: torch.Tensor | None, model: torch.Tensor, lo: list[int], hi: list[int], counts: torch.Tensor,
            outs: list[torch.Tensor]) -> int:
    """One pass of sampled-bracket selection over |model − base| (float32 bit patterns): for bracket k,
    ``counts[k]`` (int64[nb, 4]) += (above hi, equal to hi, equal to lo, strictly inside), and the strictly
    inside ones are appended to ``outs[k]`` (int32, room for cap + 1); the inside count goes on past the cap."""
    nb = len(lo)
    cap = min(o.numel() for o in outs) - 1
    ptrs = (c_void_p * nb)(*[o.data_ptr() for o in outs])
    return _check(_lib_or_raise().mk_bracket(
        _ptr(base), _dt(base), model.data_ptr(), _dt(model), model.numel(), nb, (ctypes.c_uint32 * nb)(*lo),
        (ctypes.c_uint32 * nb)(*hi), ctypes.cast(counts.data_ptr(), POINTER(c_int64)), ptrs, cap))


def hist_lo(base: torch.Tensor | None, model: torch.Tensor, bins: list[int], hists: torch.Tensor) -> int:
    """hists[k] (int64[len(bins), 65536]) += histogram of the low half-words of |model − base| in bin k."""
    arr = (ctypes.c_int32 * len(bins))(*bins)
    return _check(_lib_or_raise().mk_hist_lo(_ptr(base), _dt(base), model.data_ptr(), _dt(model), model.numel(),
                                             len(bins), arr, ctypes.cast(hists.data_ptr(), POINTER(c_int64))))


def dare_l1(base: torch.Tensor, model: torch.Tensor, start: int, seed: int, density: float,
            bits: torch.Tensor | None = None) -> tuple[float, float, int]:
    """(Σ|τ|, Σ|τ| over kept entries, #non-finite inputs) of one block. With ``bits`` (uint8, at least
    ⌈n/8⌉), the block's keep decisions are stored there too, bit t of byte g for element 8g+t."""
    if bits is not None and bits.numel() < (model.numel() + 7) // 8:
        raise ValueError("dare_l1: bits buffer too small")
    sums = (c_double * 2)(0.0, 0.0)
    nf = _check(_lib_or_raise().mk_dare_l1(base.data_ptr(), _dt(base), model.data_ptr(), _dt(model), model.numel(),
                                           start, seed, t24(density), sums, _ptr(bits)))
    return sums[0], sums[1], nf


def _inputs(models: list[torch.Tensor]) -> tuple[Any, Any]:
    ptrs = (c_void_p * len(models))(*[m.data_ptr() for m in models])
    dts = (ctypes.c_int32 * len(models))(*[_dt(m) for m in models])
    return ptrs, dts


def tv_emit(base: torch.Tensor, models: list[torch.Tensor], spec: Any, start: int, *, combine: int, lam: float,
            divide: float, normalize: bool, tie: float, out: torch.Tensor | None,
            flags: Any) -> tuple[int, float]:
    """One block of θ₀ + λ·combine(sparsified τᵢ) into ``out`` (bfloat16/float32, or None for the
    majority-sign pass). ``spec`` is a ``TVModel`` array whose window counters advance.
    Returns (#non-finite inputs, Σ elected signs)."""
    ptrs, dts = _inputs(models)
    sign_sum = c_double(0.0)
    nf = _lib_or_raise().mk_tv_emit(base.data_ptr(), _dt(base), ptrs, dts, len(models), spec, base.numel(), start,
                                    combine, lam, divide, int(normalize), tie, _ptr(out), _dt(out), flags,
                                    ctypes.byref(sign_sum))
    return _check(nf), sign_sum.value


def linear_emit(models: list[torch.Tensor], weight: list[float], divide: float, out: torch.Tensor,
                flags: Any) -> int:
    """One block of Σ wᵢθᵢ / divide into ``out``; returns #non-finite inputs."""
    ptrs, dts = _inputs(models)
    w = (c_float * len(weight))(*weight)
    return _check(_lib_or_raise().mk_linear_emit(ptrs, dts, len(models), w, models[0].numel(), divide,
                                                 out.data_ptr(), _dt(out), flags))


GRAM_MAX = 8  # models per call of mk_gram


def gram(base: torch.Tensor | None, models: list[torch.Tensor], out: torch.Tensor) -> int:
    """Add the block's Gram matrix of (modelᵢ − base), or of the models when ``base`` is None, to the upper
    triangle of ``out`` (a contiguous float64 [k, k] CPU tensor); returns #non-finite inputs."""
    if len(models) > GRAM_MAX:
        raise ValueError(f"mk_gram takes at most {GRAM_MAX} models")
    ptrs, dts = _inputs(models)
    acc = ctypes.cast(out.data_ptr(), POINTER(c_double))
    return _check(_lib_or_raise().mk_gram(_ptr(base), _dt(base), ptrs, dts, len(models), models[0].numel(), acc))


def new_flags() -> Any:
    """Counters a kernel adds to: [non-finite results before rounding, after rounding]."""
    return (c_int64 * 2)(0, 0)
