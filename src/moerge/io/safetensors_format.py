"""The safetensors file format, read and written.

A safetensors file is an 8-byte little-endian header length, a JSON header
(tensor name -> dtype, shape, byte offsets) and the raw little-endian tensor
bytes. We parse the header ourselves so that a corrupt file gets a precise
message. Tensor bytes are read two ways: ``read`` copies an element range with
``os.preadv`` (which releases the GIL) into a fresh or reused buffer, and
``map`` maps one whole tensor from the page cache without a copy, for the
executor's native kernels. A mapping lives only as long as its tensor, so pages
we are done with stop counting against the process's resident memory.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moerge.errors import CheckpointError
from moerge.io.descriptors import POOL
from moerge.io.untrusted import parse_json

if TYPE_CHECKING:
    import torch

MADV_POPULATE_READ = 22  # not in Python's mmap module (3.11)

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
TORCH_TO_CODE = {name: code for code, (name, _) in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside a safetensors file."""

    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def numel(self) -> int:
        n = math.prod(self.shape)
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def identity(info: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one state of a file from another: device, inode, size, modification time."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def parse_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str], tuple[int, int, int, int]]:
    """Read and validate the header of a safetensors file.

    Returns the tensor entries, the free-form ``__metadata__`` dict and the :func:`identity` of the
    file the header was read from. Raises :class:`CheckpointError` naming the file for anything that is
    not a valid safetensors file (truncated, bad JSON, offsets outside the file, overlaps).
    """
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block, a device never end
            raise CheckpointError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())  # the file opened, not whatever the path names a moment later
            size = st.st_size
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (declares a {header_len}-byte header "
                    f"in a {size}-byte file)",
                    hint="the file is truncated or is not safetensors; re-download or re-save it",
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    header = parse_json(raw, f"{path}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = size - data_start
    entries: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str)
              and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) for x in info["data_offsets"]))
        if not ok:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r} "
                                  "(expected dtype string, integer shape list and two integer data_offsets)")
        code = info["dtype"]
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        if code not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
        torch_name, itemsize = DTYPES[code]
        numel = 1
        for d in shape:
            if d < 0:
                raise CheckpointError(f"{path}: tensor {name!r} has a negative dimension {shape}")
            numel *= d
        if not (0 <= begin <= end <= data_size) or end - begin != numel * itemsize:
            raise CheckpointError(
                f"{path}: corrupt header entry for tensor {name!r}: bytes [{begin}, {end}) do not "
                f"hold a {code} tensor of shape {list(shape)} inside {data_size} data bytes",
                hint="the file is truncated or damaged; re-download or re-save it",
            )
        entries[name] = TensorEntry(name, torch_name, shape, data_start + begin, data_start + end)
        spans.append((begin, end, name))
    spans.sort()
    expected = 0
    for span_begin, span_end, span_name in spans:
        if span_begin < expected:
            raise CheckpointError(f"{path}: corrupt header: tensor {span_name!r} overlaps the tensor before it")
        if span_begin > expected:
            raise CheckpointError(
                f"{path}: corrupt header: a gap of {span_begin - expected} bytes before tensor {span_name!r}")
        expected = span_end
    if expected != data_size:
        what = "after the last tensor" if spans else "but its header lists no tensor"
        raise CheckpointError(f"{path}: corrupt file: {data_size - expected} bytes {what}",
                              hint="the file may have been written by something else or be damaged")
    if not isinstance(metadata, dict):
        metadata = {}
    return entries, {str(k): str(v) for k, v in metadata.items()}, identity(st)


class SafetensorsReader:
    """Lazy reader of one safetensors file: parses the header, reads tensors on demand. Its descriptor
    is borrowed from the process's bounded pool for each read (:mod:`moerge.io.descriptors`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries, self.metadata, self.identity = parse_header(self.path)

    def open_checked(self, name: str | None = None) -> int:
        """A new descriptor of the file, checked to be the file whose header was read: a shard replaced or
        rewritten after planning would otherwise be read at the old header's offsets. ``name``: the tensor
        about to be read, named in the error. Failing to open raises the OSError (the pool handles it)."""
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        now = os.fstat(fd)
        if identity(now) != self.identity:
            os.close(fd)
            short = name is not None and now.st_size < self.entries[name].end
            what = f"file shorter than its header says (tensor {name!r}): " if short else ""
            raise CheckpointError(f"{self.path}: {what}changed since its header was read (replaced, "
                                  "rewritten or truncated while in use); nothing was written from it",
                                  hint="run again once the file no longer changes")
        return fd

    def check_unchanged(self) -> None:
        """Raise unless the file is still the one whose header was read: run before an output made from
        it is published, so that a file rewritten in place, replaced or deleted while it was being read
        (which a descriptor already open would not notice) never ends in a silently mixed output."""
        try:
            now = identity(os.stat(self.path))
        except OSError:
            now = None
        if now != self.identity:
            what = "was deleted" if now is None else "changed"
            raise CheckpointError(f"{self.path}: {what} while the merge read it; nothing was published",
                                  hint="run again once the file no longer changes")

    @property
    def is_open(self) -> bool:
        """Whether the pool holds a descriptor of this file."""
        return POOL.holds(self)

    def close(self) -> None:
        POOL.forget(self)

    # No __del__: the pool holds every reader it lends a descriptor to, so a reader being collected has
    # none open; and a finaliser that took the pool's lock could run while that lock is held (a deadlock).

    def read(self, name: str, start: int = 0, count: int | None = None,
             buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Read tensor ``name`` (or elements ``[start, start+count)`` of it, flattened).

        ``buffer`` (uint8, large enough) is reused instead of a new allocation:
        the result is then a view of it.
        """
        import torch

        entry = self.entries[name]
        itemsize = DTYPES[TORCH_TO_CODE[entry.dtype]][1]
        if count is None:
            count = entry.numel - start
        nbytes = count * itemsize
        buf = torch.empty(nbytes, dtype=torch.uint8) if buffer is None else buffer[:nbytes]
        if nbytes:
            self._pread(name, memoryview(buf.numpy()), entry.begin + start * itemsize)
        t = buf.view(getattr(torch, entry.dtype))
        return t.reshape(entry.shape) if start == 0 and count == entry.numel else t

    def map(self, name: str) -> torch.Tensor:
        """Tensor ``name``, flat, as a read-only view of the page cache (no copy): pages are mapped
        as they are first touched and unmapped when the tensor (and every view of it) is freed."""
        import mmap

        import torch

        entry = self.entries[name]
        nbytes = entry.end - entry.begin
        if nbytes == 0:
            return torch.empty(0, dtype=getattr(torch, entry.dtype))
        lead = entry.begin % mmap.ALLOCATIONGRANULARITY
        with POOL.use(self, name) as fd:  # the map keeps a duplicate of the descriptor; this one goes back
            if os.fstat(fd).st_size < entry.end:  # a mapping past the end of a file faults (SIGBUS)
                raise CheckpointError(f"{self.path}: file shorter than its header says (tensor {name!r})")
            try:  # the map keeps a duplicate descriptor: this can run out of them too
                mm = mmap.mmap(fd, nbytes + lead, offset=entry.begin - lead, access=mmap.ACCESS_COPY)
            except OSError as e:
                raise CheckpointError(f"{self.path}: cannot map tensor {name!r} ({e.strerror or e})",
                                      hint="raise the open-file limit (ulimit -n) or merge fewer models at "
                                      "once" if e.errno in (errno.EMFILE, errno.ENFILE) else None) from None
        try:  # fill the page tables in one call instead of a fault per 64 KiB (Linux >= 5.14)
            mm.madvise(MADV_POPULATE_READ)
        except (AttributeError, OSError, ValueError):  # no madvise (Windows), or an older kernel
            pass
        return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=lead).view(getattr(torch, entry.dtype))

    def read_runs(self, name: str, runs: list[tuple[int, int]]) -> torch.Tensor:
        """Elements [s, e) of the flattened tensor for each run, concatenated (one buffer, one
        ``preadv`` per run: a sample of a tensor costs a few system calls, not a tensor read)."""
        import torch

        entry = self.entries[name]
        itemsize = DTYPES[TORCH_TO_CODE[entry.dtype]][1]
        buf = torch.empty(sum(e - s for s, e in runs) * itemsize, dtype=torch.uint8)
        view, pos = memoryview(buf.numpy()), 0
        for s, e in runs:
            n = (e - s) * itemsize
            if n:
                self._pread(name, view[pos: pos + n], entry.begin + s * itemsize)
            pos += n
        return buf.view(getattr(torch, entry.dtype))

    def _pread(self, name: str, view: memoryview, offset: int) -> None:
        """Fill ``view`` from the file at ``offset``."""
        got, nbytes = 0, len(view)
        with POOL.use(self, name) as fd:
            while got < nbytes:
                n = os.preadv(fd, [view[got:]], offset + got)
                if n <= 0:
                    raise CheckpointError(f"{self.path}: unexpected end of file while reading tensor {name!r}")
                got += n


def build_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[tuple[str, int, int]]]:
    """Lay out a safetensors file for tensors given as (name, torch dtype name, shape).

    Returns the full prefix (length + JSON header, padded to 8 bytes) and each
    tensor's (name, relative begin, relative end) in write order.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    layout = []
    offset = 0
    for name, dtype, shape in tensors:
        code = TORCH_TO_CODE[dtype]
        n = math.prod(shape)
        nbytes = n * DTYPES[code][1]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        layout.append((name, offset, offset + nbytes))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, layout


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = math.prod(shape)
    return n * DTYPES[TORCH_TO_CODE[dtype]][1]
