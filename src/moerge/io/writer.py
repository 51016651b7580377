"""Writing a model: streamed safetensors shards, an index and side files, published atomically.

Everything goes into the temporary folder of a :class:`moerge.io.publish.Publication`,
which :meth:`ModelWriter.commit` renames into place once every byte is on disk, so
the output path holds either the old state or the complete new model, never a
half-written one. Shards are streamed: each shard's header is written first (the
plan knows every shape), then tensor bytes in order, so the writer holds no
tensor longer than one ``write`` call.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from moerge.errors import OutputError
from moerge.io.publish import Publication, output_error
from moerge.io.safetensors_format import build_header, tensor_nbytes

if TYPE_CHECKING:
    import torch



def parse_size(text: str | int) -> int:
    """'5GB', '500M', '2GiB', '1e9' or an int → bytes (decimal units, binary with 'i')."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise OutputError(f"cannot read size {text!r} (examples: 5GB, 500MB, 2GiB)")
    try:
        value = float(m.group(1))
    except ValueError:
        raise OutputError(f"cannot read size {text!r} (examples: 5GB, 500MB, 2GiB)") from None
    power = " kmgt".index(m.group(2).lower() or " ")
    base = 1024 if m.group(3) else 1000
    size = int(value * base**power)
    if size <= 0:
        raise OutputError(f"size must be positive, got {text!r}")
    return size


@dataclass
class _Shard:
    filename: str
    tensors: list[tuple[str, str, tuple[int, ...]]]


WRITEBACK_EVERY = 64 << 20  # bytes written between asynchronous writeback requests


def _start_writeback(fd: int) -> None:
    """Ask the kernel to start writing back a file's dirty pages without waiting (sync_file_range)."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE over the whole file


@functools.lru_cache(maxsize=1)
def _sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


class ModelWriter:
    """Streams planned tensors into shards inside a temporary directory, then publishes it.

    Tensors must be written in the order given to the constructor.
    """

    def __init__(self, out_dir: str | os.PathLike[str], tensors: list[tuple[str, str, tuple[int, ...]]],
                 *, shard_size: int = 5_000_000_000, force: bool = False,
                 metadata: dict[str, str] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.publication = Publication(out_dir, force=force)
        self.tmp = self.publication.tmp
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = self._layout(tensors, shard_size)
        self._order = [t[0] for s in self.shards for t in s.tensors]
        self._shard_of = {t[0]: i for i, s in enumerate(self.shards) for t in s.tensors}
        self._next = 0
        self._file: BinaryIO | None = None
        self._file_shard = -1
        self.bytes_written = 0
        self._unflushed = 0

    @staticmethod
    def _layout(tensors: list[tuple[str, str, tuple[int, ...]]], shard_size: int) -> list[_Shard]:
        groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
        size = 0
        for t in tensors:
            nb = tensor_nbytes(t[1], t[2])
            if groups[-1] and size + nb > shard_size:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += nb
        if len(groups) == 1:
            return [_Shard("model.safetensors", groups[0])]
        n = len(groups)
        return [_Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            raise output_error(e, self.out_dir, self.bytes_written) from e

    def _open_shard(self, idx: int) -> None:
        self._close_file()
        shard = self.shards[idx]
        prefix, _ = build_header(shard.tensors, self.metadata)
        self._file = self._guard(open, self.tmp / shard.filename, "wb", 0)
        self._file_shard = idx
        self._guard(self._write_all, prefix)

    def _write_all(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = self._file.write(view)  # type: ignore[union-attr]
            view = view[n:]
            self._unflushed += n
        if self._unflushed >= WRITEBACK_EVERY:
            # start writing the dirty pages to disk now, in the background, so the fsync at the end
            # waits for the last part only (Linux; elsewhere the fsync does it all)
            _start_writeback(self._file.fileno())  # type: ignore[union-attr]
            self._unflushed = 0

    def _close_file(self) -> None:
        if self._file is not None:
            f = self._file
            self._file = None
            self._guard(os.fsync, f.fileno())
            f.close()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (already in its output dtype and shape, on the CPU)."""
        expected = self._order[self._next] if self._next < len(self._order) else None
        if name != expected:
            raise RuntimeError(f"writer expected {expected!r}, got {name!r}")
        shard = self._shard_of[name]
        if shard != self._file_shard:
            self._open_shard(shard)
        import torch

        t = tensor.detach().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self._guard(self._write_all, data)
        self.bytes_written += len(data) if isinstance(data, bytes) else data.nbytes
        self._next += 1

    def write_text(self, filename: str, text: str) -> None:
        self._guard((self.tmp / filename).write_text, text)

    def copy_file(self, src: Path, filename: str | None = None) -> None:
        self._guard(shutil.copyfile, src, self.tmp / (filename or src.name))

    def commit(self, *, last_check: Callable[[], None] | None = None) -> Path:
        """Finish: index, fsync, rename into place (``last_check`` runs just before the rename, see
        :meth:`Publication.commit`). Returns the output path."""
        if self._next != len(self._order):
            raise RuntimeError(f"commit after {self._next} of {len(self._order)} tensors")
        self._close_file()
        if len(self.shards) > 1:
            total = sum(tensor_nbytes(t[1], t[2]) for s in self.shards for t in s.tensors)
            index = {"metadata": {"total_size": total},
                     "weight_map": {t[0]: s.filename for s in self.shards for t in s.tensors}}
            self.write_text("model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        return self.publication.commit(self.bytes_written, last_check=last_check)

    def abort(self) -> None:
        """Remove everything written so far (the output path is untouched)."""
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
        finally:
            self.publication.abort()

    def __enter__(self) -> ModelWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()
