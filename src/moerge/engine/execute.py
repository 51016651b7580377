"""Execution: stream the plan tensor by tensor, block by block, into the writer.

Worker threads each take one output tensor and run the method's statistics
passes and output pass over blocks of about a million elements. With the native
kernels, a tensor whose inputs fit ``MAP_LIMIT`` is mapped whole from the page
cache and every pass reads it in place (no copy, no system call per block);
larger ones (embeddings, LM head), and every input on the torch path, are read
block by block (``os.preadv``, which releases the GIL) into reused buffers. The
result is rounded to the output dtype. The calling thread hands finished
tensors, in plan order, to a writer thread. A byte budget bounds how many
tensors are in flight (each holds its output and its mapped inputs, or one
block per input), so peak memory stays flat whatever the model size.
"""

from __future__ import annotations

import contextlib
import gc
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge import native
from moerge.engine.items import InputRef, Piece, WorkItem
from moerge.engine.plan import Plan
from moerge.errors import NonFiniteError, PlanError
from moerge.io.descriptors import mapping_budget
from moerge.io.writer import ModelWriter
from moerge.methods.finite import first_nonfinite
from moerge.methods.masks import tensor_seed
from moerge.methods.protocol import BLOCK, TensorMerger, block_ranges, sample_of, sample_positions

COMPUTE_DTYPE = torch.float32
MAP_LIMIT = 128 << 20  # bytes of one work item's inputs, mapped whole (see _Reader.maps)
ProgressFn = Callable[[WorkItem, int], None]


def _refs(item: WorkItem) -> list[InputRef]:
    """An item's inputs: the base first (if any), then the models."""
    return ([item.base] if item.base is not None else []) + list(item.inputs)


@dataclass
class ExecStats:
    seconds: float = 0.0
    prepass_seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    notes: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PlanError(f"device {device!r} requested but CUDA is not available here")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise PlanError(f"unknown device {device!r} ({e})") from None


@dataclass
class _Inputs:
    """One work item's inputs: whole raw tensors (flat, on the device), or None to read blocks lazily."""

    item: WorkItem
    base: torch.Tensor | None
    models: list[torch.Tensor] | None
    refs: list[InputRef]  # base first (if any), then models

    @property
    def numel(self) -> int:
        return math.prod(self.item.shape)

    @classmethod
    def whole(cls, item: WorkItem, tensors: list[torch.Tensor], refs: list[InputRef]) -> _Inputs:
        """Inputs held whole, ``tensors`` in the order of ``refs`` (base first, if any)."""
        if item.base is not None:
            return cls(item, tensors[0], tensors[1:], refs)
        return cls(item, None, tensors, refs)


class _Reader:
    def __init__(self, plan: Plan, device: torch.device, allow_nonfinite: bool, workers: int = 1) -> None:
        self.plan = plan
        self.device = device
        self.allow_nonfinite = allow_nonfinite
        rec = plan.recipe
        # mergekit's `dtype:` is the dtype tensors are cast to on load; reproduce that rounding
        self.load_dtype = getattr(torch, rec.dtype) if rec.conventions == "mergekit" and rec.dtype else None
        self.bytes_read = 0
        self._lock = threading.Lock()
        self.native = device.type == "cpu" and native.available()
        self._buffers = threading.local()
        # each mapped input holds a file descriptor while its item runs: bounded, with every worker's share
        self.max_mapped = mapping_budget() // max(workers, 1)

    def raw(self, ref: InputRef, start: int = 0, count: int | None = None, slot: int | None = None) -> torch.Tensor:
        """A tensor (or a flat element range of it) in its stored dtype, on the CPU. With ``slot``, the
        range is read into this thread's reusable buffer number ``slot`` (valid until the next read
        into that slot): no allocation, no page faults per block."""
        buffer = None
        if slot is not None and count is not None:
            bufs = self._buffers.__dict__.setdefault("bufs", {})
            nbytes = count * 8  # the widest dtype
            if slot not in bufs or bufs[slot].numel() < nbytes:
                bufs[slot] = torch.empty(max(nbytes, BLOCK * 4), dtype=torch.uint8)
            buffer = bufs[slot]
        t = self.plan.checkpoints[ref.model].read(ref.tensor, start, count, buffer)
        with self._lock:
            self.bytes_read += t.numel() * t.element_size()
        return t

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        """Flat, rounded to mergekit's load dtype when that applies, on the compute device."""
        if self.load_dtype is not None and t.dtype != self.load_dtype:
            t = t.to(self.load_dtype)
        return t.reshape(-1).to(self.device, non_blocking=True)

    def _fix_rows(self, t: torch.Tensor, item: WorkItem) -> torch.Tensor:
        rows = item.shape[0]
        if t.shape[0] > rows:
            return t[:rows].contiguous()
        ref = item.pad_from or item.base or item.inputs[0]
        out = self.raw(ref)[:rows].to(t.dtype).clone()
        out[: t.shape[0]] = t
        return out

    def maps(self, item: WorkItem) -> bool:
        """Whether ``item``'s inputs are mapped whole from the page cache rather than read block by
        block: for the native kernels (which read them in place), when they fit :data:`MAP_LIMIT` and
        the descriptor budget (:func:`moerge.io.descriptors.mapping_budget`). Each pass then reads the page cache directly, with no copy and no system call per block."""
        if not self.native or item.row_fix or item.align or item.kind != "merge":
            return False
        refs = _refs(item)
        if len(refs) > self.max_mapped or not all(self.plan.checkpoints[r.model].mappable(r.tensor) for r in refs):
            return False
        infos = [self.plan.checkpoints[r.model].info(r.tensor) for r in refs]
        if self.load_dtype is not None and any(getattr(torch, i.dtype) != self.load_dtype for i in infos):
            return False
        return sum(i.numel * getattr(torch, i.dtype).itemsize for i in infos) <= MAP_LIMIT

    def load(self, item: WorkItem) -> _Inputs:
        """Prepare an item's inputs. Normally nothing is read here: :meth:`blocks` reads each block
        straight from the files (page cache), so memory holds blocks, not tensors. Inputs whose rows
        must be cropped or padded (vocabulary policy) are read whole."""
        refs = _refs(item)
        if self.maps(item):
            mapped = [self.plan.checkpoints[r.model].map(r.tensor) for r in refs]
            for r, t in zip(refs, mapped):  # a bus error's message names the file
                native.note_mapping(t, str(self.plan.checkpoints[r.model].info(r.tensor).file))
            with self._lock:
                self.bytes_read += sum(m.numel() * m.element_size() for m in mapped)
            return _Inputs.whole(item, mapped, refs)
        if item.align:
            assert self.plan.vocab is not None and self.plan.vocab.alignment is not None
            raw = {r.model: self.raw(r) for r in refs}
            rows = self.plan.vocab.alignment.apply(raw)
            return _Inputs.whole(item, [self._on_device(rows[r.model]) for r in refs], refs)
        if not item.row_fix:
            return _Inputs(item, None, None, refs)
        whole = []
        for r in refs:
            t = self.raw(r)
            whole.append(self._on_device(t if t.shape[0] == item.shape[0] else self._fix_rows(t, item)))
        return _Inputs.whole(item, whole, refs)

    def blocks(self, inp: _Inputs, s: int, e: int, check: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Elements [s, e) of every input as float32 on the device (checked for NaN/Inf when ``check``)."""
        base, models = self.raw_blocks(inp, s, e)
        base = base.to(COMPUTE_DTYPE) if base is not None else None
        models = [m.to(COMPUTE_DTYPE) for m in models]
        if check and not self.allow_nonfinite:
            for ref, t in zip(inp.refs, ([base] if base is not None else []) + models):
                if (bad := first_nonfinite(t)) is not None:
                    ck = self.plan.checkpoints[ref.model]
                    raise NonFiniteError(
                        f"tensor {ref.tensor!r} in {ck.ref} ({ck.info(ref.tensor).file}) holds NaN/Inf "
                        f"(first at flat index {s + bad})",
                        hint="fix the checkpoint, or pass --allow-nonfinite to merge anyway",
                    )
        return base, models

    def raw_blocks(self, inp: _Inputs, s: int, e: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Elements [s, e) of every input in its (load) dtype, on the device; for the native kernels,
        dtypes they do not take are widened to float32."""
        if inp.models is None:
            item = inp.item
            base = self._on_device(self.raw(item.base, s, e - s, slot=0)) if item.base is not None else None
            models = [self._on_device(self.raw(r, s, e - s, slot=i + 1)) for i, r in enumerate(item.inputs)]
        else:
            base = inp.base[s:e] if inp.base is not None else None
            models = [m[s:e] for m in inp.models]
        return (self._widen(base) if base is not None else None), [self._widen(m) for m in models]

    def _widen(self, t: torch.Tensor) -> torch.Tensor:
        """For the native kernels, dtypes they do not take as float32."""
        return t if not self.native or t.dtype in native.DT_CODES else t.to(COMPUTE_DTYPE)

    def sample(self, inp: _Inputs) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The same evenly spread runs of elements of every input (load dtype, CPU), concatenated."""
        runs = sample_positions(inp.numel)
        if inp.models is not None:  # whole inputs in memory (rows cropped or padded)
            base, models = self.raw_blocks(inp, 0, inp.numel)
            return sample_of(base, models)
        item = inp.item
        got = []
        for ref in _refs(item):
            t = self.plan.checkpoints[ref.model].read_runs(ref.tensor, runs)
            with self._lock:
                self.bytes_read += t.numel() * t.element_size()
            got.append(self._widen(self._on_device(t)))
        return (got[0], got[1:]) if item.base is not None else (None, got)

    def checked(self, nonfinite: int, inp: _Inputs, s: int, e: int) -> None:
        """A native kernel saw ``nonfinite`` NaN/Inf inputs in block [s, e): raise the precise error."""
        if nonfinite and not self.allow_nonfinite:
            self.blocks(inp, s, e, True)
            raise NonFiniteError(f"tensor {inp.item.name!r}: an input holds NaN/Inf in elements [{s}, {e})")


class _ItemStats:
    """The statistics of one work item, as data-aware methods see them (``moerge.methods.data_aware``)."""

    def __init__(self, reader: _Reader, item: WorkItem, norms: _Norms) -> None:
        assert item.stats is not None and reader.plan.stats_kind is not None
        self.kind = reader.plan.stats_kind
        self.reader, self.item, self.norms = reader, item, norms

    def _checked(self, ref: InputRef, t: torch.Tensor, start: int) -> torch.Tensor:
        t = t.to(self.reader.device, COMPUTE_DTYPE)
        if (bad := first_nonfinite(t)) is not None:
            ck = self.reader.plan.checkpoints[ref.model]
            raise NonFiniteError(f"statistic {ref.tensor!r} in {ck.root} ({ck.info(ref.tensor).file}) holds NaN/Inf "
                                 f"(first at flat index {start + bad})", hint="recompute the statistics with `moerge stats`")
        return t

    def whole(self, model: int, part: int = 0) -> torch.Tensor:
        ref = self.item.stats[model][part]  # type: ignore[index]
        return self._checked(ref, self.reader.raw(ref), 0)

    def block(self, model: int, start: int, stop: int, part: int = 0) -> torch.Tensor:
        ref = self.item.stats[model][part]  # type: ignore[index]
        return self._checked(ref, self.reader.raw(ref, start, stop - start, slot=100 + model).reshape(-1), start)

    def norm(self, model: int) -> float:
        return self.norms.get(self.item.stats[model][0].model)  # type: ignore[index]


class _Norms:
    """Global L2 norms of statistics folders: from their moerge_stats.json, else computed once by streaming."""

    def __init__(self, reader: _Reader) -> None:
        self.reader = reader
        self.values = {k: m["norm"] for k, m in reader.plan.stats_meta.items() if m.get("norm") is not None}
        self._lock = threading.Lock()

    def get(self, ckpt: int) -> float:
        with self._lock:
            if ckpt not in self.values:
                ck = self.reader.plan.checkpoints[ckpt]
                total = sum(float(ck.read(n).double().square().sum()) for n in ck.tensor_names)
                self.values[ckpt] = total ** 0.5
            return self.values[ckpt]


def _output_error(method: str, item: WorkItem, overflow: bool) -> NonFiniteError:
    return NonFiniteError(
        f"{method} produced NaN/Inf in tensor {item.name!r} (stored as {item.dtype})",
        hint=f"the merged values overflow {item.dtype}; choose another dtype, or pass "
        "--allow-nonfinite to write it anyway" if overflow else
        "check the recipe's parameters (e.g. weights summing to ~0 with normalize)",
    )


def _item_cost(reader: _Reader, item: WorkItem, block: int) -> int:
    """Bytes an item holds while in flight: its output, and its inputs (whole ones, mapped or read,
    or one block each)."""
    plan = reader.plan
    if item.kind == "computed":
        return item.nbytes
    if item.kind == "stack":  # the output, and one whole piece at a time (raw, and in float32)
        sizes = [(math.prod(p.shape) if p.shape else info.numel, getattr(torch, info.dtype).itemsize)
                 for g in item.groups or [] for p in g
                 for info in (plan.checkpoints[p.ref.model].info(p.ref.tensor),)]
        group = math.prod(item.shape[1:] if item.stacked else item.shape)
        summed = any(len({p.term for p in g}) > 1 for g in item.groups or [])
        # the output, one piece being read (raw and in float32), and a group's running sum when terms add
        return item.nbytes + max((n * (size + 4) for n, size in sizes), default=0) + (group * 8 if summed else 0)
    refs = _refs(item)
    if item.copy_from is not None:
        refs = [item.copy_from]
    whole = item.copy_from is not None or item.row_fix or item.align or reader.maps(item)
    cost = item.nbytes
    if item.copy_from is None and plan.method.whole_tensor is not None and plan.method.whole_tensor(item.params):
        whole = True  # one block: every input whole, in float32, and the method's workspace
        cost += math.prod(item.shape) * 4 * (len(refs) + 4)
    for r in refs:
        info = plan.checkpoints[r.model].info(r.tensor)
        itemsize = torch.empty((), dtype=getattr(torch, info.dtype)).element_size()
        cost += (info.numel if whole else min(info.numel, block)) * itemsize
    if item.stats:  # whole statistics in float64, and whole inputs for solvers that need them
        cost += sum(plan.checkpoints[r.model].info(r.tensor).numel * 8 for refs_k in item.stats for r in refs_k)
        cost += math.prod(item.shape) * 8 * (len(refs) + 4)
    return cost


def _merge_item(plan: Plan, reader: _Reader, item: WorkItem, extra: dict[str, Any], block: int) -> tuple[torch.Tensor, dict[str, Any]]:
    if item.copy_from is not None:
        return reader.raw(item.copy_from), {}
    if item.value is not None:
        return item.value.to(getattr(torch, item.dtype)).reshape(item.shape).contiguous(), {}
    if item.groups is not None:
        return _stack_item(reader, item), {}
    inp = reader.load(item)
    notes: dict[str, Any] = {}
    if plan.stats_kind is not None:
        extra = dict(extra, stats=_ItemStats(reader, item, extra["_norms"]) if item.stats else None)
    try:
        merger = plan.method.build(item.shape, item.model_params, item.params, seed=item.seed, notes=notes,
                                   conventions=plan.recipe.conventions, name=item.name,
                                   has_base=item.base is not None, **extra)
    except ValueError as err:
        raise PlanError(f"{plan.method.name} cannot merge tensor {item.name!r}: {err}") from None
    try:
        return _run_merger(plan, reader, merger, inp, block), notes
    except ValueError as err:  # a method's own check of the data (e.g. antipodal models for multislerp)
        raise PlanError(f"{plan.method.name} cannot merge tensor {item.name!r}: {err}") from None


def _stack_item(reader: _Reader, item: WorkItem) -> torch.Tensor:
    """A stack item: in each group, every term's pieces concatenated along ``cat_dim`` and the terms added
    (in float32 when there are several), into the group's slot of the output, rounded once to its dtype."""
    out = torch.empty(item.shape, dtype=getattr(torch, item.dtype))
    assert item.groups is not None
    for g, pieces in enumerate(item.groups):
        target = out[g] if item.stacked else out
        terms = sorted({p.term for p in pieces})
        total: torch.Tensor | None = None
        for term in terms:
            parts = [_piece(reader, item, p, f"{item.name}#{g}.{k}", len(terms) > 1)
                     for k, p in enumerate(pieces) if p.term == term]
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=item.cat_dim)
            total = t if total is None else total + t
        assert total is not None
        target.copy_(total.reshape(target.shape))
    if not reader.allow_nonfinite and first_nonfinite(out) is not None:
        raise _output_error("upcycling", item, overflow=True)
    return out


def _piece(reader: _Reader, item: WorkItem, piece: Piece, key: str, wide: bool = False) -> torch.Tensor:
    """One input matrix (or part) of a stack item, scaled and noised in float32 when asked or ``wide``
    (else as stored)."""
    ck = reader.plan.checkpoints[piece.ref.model]
    info = ck.info(piece.ref.tensor)
    if piece.shape is None:
        t = reader.raw(piece.ref).reshape(info.shape)
    else:
        t = reader.raw(piece.ref, piece.start, math.prod(piece.shape)).reshape(piece.shape)
    if not reader.allow_nonfinite and (bad := first_nonfinite(t)) is not None:
        raise NonFiniteError(f"tensor {piece.ref.tensor!r} in {ck.ref} ({info.file}) holds "
                             f"NaN/Inf (first at flat index {piece.start + bad})",
                             hint="fix the checkpoint, or pass --allow-nonfinite to go on anyway")
    if piece.noise or piece.scale != 1.0 or wide:
        t = t.to(COMPUTE_DTYPE)
        if piece.noise:
            gen = torch.Generator().manual_seed(tensor_seed(item.seed, key))
            t = t + torch.randn(t.shape, generator=gen) * piece.noise
        if piece.scale != 1.0:
            t = t * piece.scale
    return t.T if piece.transpose else t


def _run_merger(plan: Plan, reader: _Reader, merger: TensorMerger, inp: _Inputs, block: int) -> torch.Tensor:
    item, numel = inp.item, inp.numel
    ranges = block_ranges(numel, item.shape, block, merger.row_aligned, merger.whole_block)
    out = torch.empty(numel, dtype=getattr(torch, item.dtype))
    if reader.native and merger.native_ok():
        _merge_native(plan, reader, merger, inp, ranges, out)
        return out.view(item.shape)
    first = True
    p = 0
    while p < merger.passes:  # read afresh: a merger may find it needs another pass
        for s, e in ranges:
            merger.observe(p, s, *reader.blocks(inp, s, e, first))
        merger.end_pass(p)
        first = False
        p += 1
    for s, e in ranges:
        exact = merger.emit(s, *reader.blocks(inp, s, e, first))
        blk = exact.to(out.dtype)
        if not reader.allow_nonfinite and first_nonfinite(blk) is not None:
            # finite in float32, not in the output dtype: an overflow
            raise _output_error(plan.method.name, item, overflow=first_nonfinite(exact) is None)
        out[s:e] = blk.cpu()
    return out.view(item.shape)


def _merge_native(plan: Plan, reader: _Reader, merger: TensorMerger, inp: _Inputs, ranges: list[tuple[int, int]],
                  out: torch.Tensor) -> None:
    """The passes of one tensor through the native kernels: raw blocks in, rounded output blocks out."""
    if merger.sample_wanted():
        merger.observe_sample(*reader.sample(inp))
    p = 0
    while p < merger.passes:
        for s, e in ranges:
            reader.checked(merger.observe_native(p, s, *reader.raw_blocks(inp, s, e)), inp, s, e)
        merger.end_pass(p)
        p += 1
    direct = out.dtype in native.DT_CODES
    flags = native.new_flags()
    for s, e in ranges:
        target = out[s:e] if direct else torch.empty(e - s, dtype=COMPUTE_DTYPE)
        reader.checked(merger.emit_native(s, *reader.raw_blocks(inp, s, e), target, flags), inp, s, e)
        if not direct:
            out[s:e] = target.to(out.dtype)
            if not reader.allow_nonfinite and first_nonfinite(out[s:e]) is not None:
                raise _output_error(plan.method.name, inp.item, overflow=first_nonfinite(target) is None)
        elif flags[1] and not reader.allow_nonfinite:
            raise _output_error(plan.method.name, inp.item, overflow=flags[0] == 0)


LOOKAHEAD = 8  # items submitted ahead of the writer, per worker


def _submission_order(costs: list[int]) -> list[int]:
    """Plan order, except that the few items much larger than the rest (embeddings, LM head) start
    first: started last, one would keep a single worker busy while the others idle."""
    if not costs:
        return []
    typical = sorted(costs)[len(costs) // 2]
    big = [i for i, c in enumerate(costs) if c >= 4 * typical]
    rest = set(range(len(costs))) - set(big)
    return big + sorted(rest)


def _run_prepass(plan: Plan, reader: _Reader, block: int, workers: int) -> dict[str, Any]:
    """A method's whole-model statistics passes (e.g. TIES's global trim threshold), items in parallel."""
    make = plan.method.prepass
    items = [i for i in plan.items if i.kind == "merge"]
    prepass = make(items[0].params) if make is not None and items else None  # global params: one value
    if prepass is None:
        return {}

    def observe(p: int, item: WorkItem) -> None:
        inp = reader.load(item)
        for s, e in block_ranges(inp.numel, item.shape, block, False):
            if reader.native:
                raw = reader.raw_blocks(inp, s, e)
                reader.checked(prepass.observe_native(p, item.name, s, *raw, item.model_params), inp, s, e)
            else:
                prepass.observe(p, item.name, s, *reader.blocks(inp, s, e, p == 0), item.model_params)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moerge-prepass") as pool:
        for p in range(prepass.passes):
            for fut in [pool.submit(observe, p, item) for item in items]:
                fut.result()
            prepass.end_pass(p)
    return prepass.result()


def execute(plan: Plan, writer: ModelWriter, *, device: str | None = None, allow_nonfinite: bool = False,
            workers: int | None = None, block: int = BLOCK, memory_budget: int | None = None,
            progress: ProgressFn | None = None) -> ExecStats:
    """Run ``plan`` and stream every output tensor into ``writer`` (which is not committed here).

    ``workers`` tensors are merged concurrently (default: 2 on CPU, 1 on CUDA);
    ``memory_budget`` bounds the bytes held by tensors in flight (default: the
    largest tensor's, or 512 MB if more).
    """
    dev = resolve_device(device)
    n_workers = workers or (1 if dev.type == "cuda" else 2)
    reader = _Reader(plan, dev, allow_nonfinite, n_workers)
    costs = [_item_cost(reader, i, block) for i in plan.items]
    budget = memory_budget or max(max(costs, default=0), 512 << 20)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the loop allocates many small short-lived objects and no cycles; collections cost ~5%
    bus = (f"shrank or became unreadable while moerge had it mapped (bus error); the merge stopped and "
           f"nothing was published (its temporary folder {writer.tmp} is removed by the next run into the "
           "same folder)\nhint: do not modify the inputs while a merge reads them\n")
    try:
        with native.bus_error_message(bus) if reader.native else contextlib.nullcontext():
            return _execute(plan, writer, reader, dev, n_workers, block, budget, costs, progress)
    finally:
        if gc_was_enabled:
            gc.enable()


def _execute(plan: Plan, writer: ModelWriter, reader: _Reader, dev: torch.device, n_workers: int, block: int,
             budget: int, costs: list[int], progress: ProgressFn | None) -> ExecStats:
    stats = ExecStats()
    items = plan.items
    t0 = time.perf_counter()
    extra = _run_prepass(plan, reader, block, n_workers)
    if plan.stats_kind is not None:
        extra["_norms"] = _Norms(reader)
    stats.prepass_seconds = time.perf_counter() - t0

    out_q: queue.Queue[Any] = queue.Queue(maxsize=2)
    write_error: list[BaseException] = []

    def write_loop() -> None:
        while True:
            got = out_q.get()
            if got is None:
                return
            if write_error:
                continue
            try:
                writer.write(*got)
            except BaseException as e:
                write_error.append(e)

    wthread = threading.Thread(target=write_loop, name="moerge-writer", daemon=True)
    wthread.start()
    notes: dict[str, Any] = {}
    order = _submission_order(costs)
    submitted: dict[int, Future[Any]] = {}
    started: set[int] = set()
    inflight = 0
    pos = 0

    def submit(i: int) -> None:
        nonlocal inflight
        submitted[i] = pool.submit(_merge_item, plan, reader, items[i], extra, block)
        started.add(i)
        inflight += costs[i]

    try:
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="moerge-merge") as pool:
            try:
                for k, item in enumerate(items):
                    # run ahead of the writer within the memory budget (outputs wait for their turn)
                    while pos < len(order) and len(submitted) < LOOKAHEAD * n_workers and (
                            not submitted or inflight + costs[order[pos]] <= budget):
                        if order[pos] not in started:
                            submit(order[pos])
                        pos += 1
                    if k not in started:
                        submit(k)  # the writer needs it next, whatever the budget
                    out, item_notes = submitted.pop(k).result()
                    inflight -= costs[k]
                    for key, val in item_notes.items():
                        if isinstance(val, dict):  # per-tensor reports (e.g. a solver's residual per layer)
                            notes.setdefault(key, {}).update(val)
                        else:
                            notes[key] = notes.get(key, 0) + val
                    if write_error:
                        raise write_error[0]
                    out_q.put((item.name, out))
                    if progress is not None:
                        progress(item, k)
            finally:
                for f in submitted.values():
                    f.cancel()
    finally:
        out_q.put(None)
        wthread.join()
    if write_error:
        raise write_error[0]
    stats.seconds = time.perf_counter() - t0
    stats.bytes_read = reader.bytes_read
    stats.bytes_written = writer.bytes_written
    stats.notes = notes
    return stats
