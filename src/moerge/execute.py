"""Execution: stream the plan tensor by tensor through the method into the writer.

Three stages overlap: a small pool of reader threads loads the inputs of the
next tensors (``os.preadv`` releases the GIL), the calling thread computes in
float32 on the chosen device (torch uses every core for the arithmetic), and a
writer thread appends finished tensors to the output shard. Queues between the
stages are short, so at most a few tensors' inputs are in memory at once,
whatever the model size.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.errors import NonFiniteError, PlanError
from moerge.io.writer import ModelWriter
from moerge.plan import InputRef, Plan, WorkItem

COMPUTE_DTYPE = torch.float32
ProgressFn = Callable[[WorkItem, int], None]


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
    return torch.device(device)


class _Loader:
    def __init__(self, plan: Plan, device: torch.device, allow_nonfinite: bool) -> None:
        self.plan = plan
        # mergekit's `dtype:` is the dtype tensors are cast to on load; reproduce that rounding
        rec = plan.recipe
        self.load_dtype = getattr(torch, rec.dtype) if rec.conventions == "mergekit" and rec.dtype else None
        self.device = device
        self.allow_nonfinite = allow_nonfinite
        self.bytes_read = 0
        self._lock = threading.Lock()

    def raw(self, ref: InputRef) -> torch.Tensor:
        t = self.plan.checkpoints[ref.model].read(ref.tensor)
        with self._lock:
            self.bytes_read += t.numel() * t.element_size()
        return t

    def compute(self, ref: InputRef, item: WorkItem) -> torch.Tensor:
        t = self.raw(ref).to(self.device, non_blocking=True)
        if self.load_dtype is not None and t.dtype != self.load_dtype:
            t = t.to(self.load_dtype)
        t = t.to(COMPUTE_DTYPE)
        if not self.allow_nonfinite and not bool(torch.isfinite(t).all()):
            ck = self.plan.checkpoints[ref.model]
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(
                f"tensor {ref.tensor!r} in {ck.ref} ({ck.info(ref.tensor).file}) holds {bad} NaN/Inf "
                "value(s)", hint="fix the checkpoint, or pass --allow-nonfinite to merge anyway",
            )
        if item.row_fix and t.shape[0] != item.shape[0]:
            t = self._fix_rows(t, item)
        return t

    def _fix_rows(self, t: torch.Tensor, item: WorkItem) -> torch.Tensor:
        rows = item.shape[0]
        if t.shape[0] > rows:
            return t[:rows].contiguous()
        ref = item.base or item.inputs[0]
        filler = self.raw(InputRef(ref.model, ref.tensor)).to(self.device).to(COMPUTE_DTYPE)
        out = filler[:rows].clone()
        out[: t.shape[0]] = t
        return out

    def load(self, item: WorkItem) -> tuple[Any, ...]:
        if item.copy_from is not None:
            return ("copy", self.raw(item.copy_from))
        base = self.compute(item.base, item) if item.base is not None else None
        models = [self.compute(r, item) for r in item.inputs]
        return ("merge", base, models)


def _run_prepass(plan: Plan, loader: _Loader, progress: ProgressFn | None) -> dict[str, Any]:
    make = plan.method.prepass
    if make is None:
        return {}
    prepass = make(plan.items[0].params if plan.items else {})
    if prepass is None:
        return {}
    merge_items = [i for i in plan.items if i.copy_from is None]
    depth = 2
    for p in range(prepass.passes):
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="moerge-prepass") as pool:
            pending = [pool.submit(loader.load, it) for it in merge_items[:depth]]
            for k, item in enumerate(merge_items):
                fut = pending.pop(0)
                if k + depth < len(merge_items):
                    pending.append(pool.submit(loader.load, merge_items[k + depth]))
                _prepass_step(prepass, p, item, fut)
        prepass.finish_pass(p)
    return prepass.result()


def _prepass_step(prepass: Any, p: int, item: WorkItem, fut: Future[Any]) -> None:
    _, base, models = fut.result()
    try:
        prepass.update(p, item.name, base, models, item.model_params)
    except ValueError as e:
        raise PlanError(str(e)) from None


def execute(plan: Plan, writer: ModelWriter, *, device: str | None = None, allow_nonfinite: bool = False,
            prefetch: int = 2, progress: ProgressFn | None = None) -> ExecStats:
    """Run ``plan`` and stream every output tensor into ``writer`` (which is not committed here)."""
    dev = resolve_device(device)
    loader = _Loader(plan, dev, allow_nonfinite)
    stats = ExecStats()
    t0 = time.perf_counter()
    extra = _run_prepass(plan, loader, progress)
    stats.prepass_seconds = time.perf_counter() - t0

    out_q: queue.Queue[Any] = queue.Queue(maxsize=2)
    write_error: list[BaseException] = []

    def write_loop() -> None:
        while True:
            got = out_q.get()
            if got is None:
                return
            name, tensor = got
            if write_error:
                continue
            try:
                writer.write(name, tensor)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                write_error.append(e)

    wthread = threading.Thread(target=write_loop, name="moerge-writer", daemon=True)
    wthread.start()
    notes: dict[str, Any] = {}
    items = plan.items
    try:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="moerge-read") as pool:
            pending: list[Future[Any]] = [pool.submit(loader.load, it) for it in items[:prefetch]]
            for k, item in enumerate(items):
                loaded = pending.pop(0).result()
                if k + prefetch < len(items):
                    pending.append(pool.submit(loader.load, items[k + prefetch]))
                out = _compute(plan, item, loaded, extra, notes)
                del loaded
                if write_error:
                    raise write_error[0]
                out_q.put((item.name, out))
                if progress is not None:
                    progress(item, k)
            for f in pending:
                f.cancel()
    finally:
        out_q.put(None)
        wthread.join()
    if write_error:
        raise write_error[0]
    stats.seconds = time.perf_counter() - t0
    stats.bytes_read = loader.bytes_read
    stats.bytes_written = writer.bytes_written
    stats.notes = notes
    return stats


def _compute(plan: Plan, item: WorkItem, loaded: tuple[Any, ...], extra: dict[str, Any],
             notes: dict[str, Any]) -> torch.Tensor:
    if loaded[0] == "copy":
        return loaded[1]
    _, base, models = loaded
    try:
        out = plan.method(base, models, item.model_params, item.params, seed=item.seed, notes=notes, **extra)
    except ValueError as e:
        raise PlanError(f"{plan.method.name} failed on tensor {item.name!r}: {e}") from None
    if tuple(out.shape) != item.shape:
        out = out.reshape(item.shape)
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(f"{plan.method.name} produced NaN/Inf in tensor {item.name!r} from finite inputs",
                             hint="check the recipe's parameters (e.g. weights summing to zero)")
    return out.to(getattr(torch, item.dtype)).cpu()
