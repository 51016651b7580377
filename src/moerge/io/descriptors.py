"""A bounded pool of open file descriptors, shared by every safetensors reader of the process.

A merge of 100 models of 6 shards each reads 600 files; holding one descriptor per file would end in
"too many open files" under a common limit of 256 or 1,024. Readers instead borrow a descriptor for each
read (:meth:`DescriptorPool.use`); at most :attr:`DescriptorPool.capacity` stay open, and the least
recently used idle one is closed to make room. Reopening is safe because the reader checks, on every
open, that the file is still the one whose header it parsed (device, inode, size, modification time).

The capacity is a quarter of the soft ``RLIMIT_NOFILE`` limit (between 8 and 1,024): the rest is left to
memory maps (each holds a duplicate descriptor; the executor bounds how many it keeps, see
:func:`mapping_budget`), the writer, and the libraries of the process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Protocol

from moerge.errors import CheckpointError


def soft_limit() -> int:
    """The process's soft limit on open files (4,096 where it cannot be read)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        return 4096
    return soft if soft != resource.RLIM_INFINITY and soft > 0 else 1 << 20


def mapping_budget() -> int:
    """How many memory maps (one duplicate descriptor each) the executor may keep at once."""
    return max(8, soft_limit() // 4)


class Opener(Protocol):
    path: os.PathLike[str] | str

    def open_checked(self, name: str | None) -> int:
        """A fresh descriptor of the file, checked to be the file the reader parsed; raises OSError
        (EMFILE included) or a CheckpointError."""


class DescriptorPool:
    """See the module docstring. Thread-safe; a descriptor in use is never closed under its user."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity or min(1024, max(8, soft_limit() // 4))
        self._lock = threading.Lock()
        self._slots: OrderedDict[Opener, list[int]] = OrderedDict()  # owner -> [fd, users]
        self._closing: set[Opener] = set()  # forgotten while in use: closed by the last user
        self.opens = 0  # descriptors opened so far (a reopen counts), for tests and benchmarks

    @contextlib.contextmanager
    def use(self, owner: Opener, name: str | None = None) -> Iterator[int]:
        """A descriptor of ``owner``'s file for the duration of the block (``name``: the tensor read)."""
        fd = self._acquire(owner, name)
        try:
            yield fd
        finally:
            self._release(owner)

    def forget(self, owner: Opener) -> None:
        """Close ``owner``'s descriptor (now, or when its last user is done)."""
        with self._lock:
            slot = self._slots.get(owner)
            if slot is None:
                return
            if slot[1]:
                self._closing.add(owner)
                return
            del self._slots[owner]
        os.close(slot[0])

    @property
    def open_count(self) -> int:
        with self._lock:
            return len(self._slots)

    def holds(self, owner: Opener) -> bool:
        with self._lock:
            return owner in self._slots

    def _acquire(self, owner: Opener, name: str | None) -> int:
        with self._lock:
            slot = self._slots.get(owner)
            if slot is not None:
                slot[1] += 1
                self._slots.move_to_end(owner)
                return slot[0]
            self._shrink(self.capacity - 1)
            fd = self._open(owner.open_checked, name, owner)
            self._slots[owner] = [fd, 1]
            self.opens += 1
            return fd

    def _open(self, opener: Callable[[str | None], int], name: str | None, owner: Opener) -> int:
        try:
            return opener(name)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise CheckpointError(f"{owner.path}: cannot open ({e.strerror or e})") from None
        self._shrink(0)  # out of descriptors: give back every idle one and try once more
        try:
            return opener(name)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise CheckpointError(f"{owner.path}: too many open files ({e.strerror})",
                                      hint="raise the limit (ulimit -n) or merge fewer models at once") from None
            raise CheckpointError(f"{owner.path}: cannot open ({e.strerror or e})") from None

    def _shrink(self, keep: int) -> None:
        """Close least recently used idle descriptors until at most ``keep`` are open (lock held)."""
        if len(self._slots) <= keep:
            return
        for owner in [o for o, s in self._slots.items() if not s[1]]:
            os.close(self._slots.pop(owner)[0])
            if len(self._slots) <= keep:
                return

    def _release(self, owner: Opener) -> None:
        with self._lock:
            slot = self._slots[owner]
            slot[1] -= 1
            if not slot[1] and owner in self._closing:
                self._closing.discard(owner)
                del self._slots[owner]
                os.close(slot[0])
            self._shrink(self.capacity)  # back within capacity once the users over it are done


POOL = DescriptorPool()
