"""The one atomic publication of a folder: a model, an adapter, statistics, an expert, a bundle.

Everything is written into a hidden sibling (``.NAME.moerge-tmp-PID-XXXX``). On
:meth:`Publication.commit` every file and folder in it is fsynced, then it is
renamed to the output path in one step, and the parent folder is fsynced. An
existing output (only with ``force``) is swapped out atomically (Linux
``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, undone by the next run if a
crash falls between them). A crash, a kill or Ctrl-C at any moment leaves either
the old state or the complete new folder at the output path, never a half-written
one; temporaries of dead processes are removed by the next publication to the
same path.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from moerge.errors import OutputError

TMP_MARK = ".moerge-tmp-"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a publication's temporary sibling (a folder to skip when listing outputs)."""
    return TMP_MARK in path.name


def clean_stale_temp_dirs(out_dir: Path) -> list[Path]:
    """Remove temporary siblings of ``out_dir`` left by processes that no longer exist.

    A previous output set aside by an interrupted ``force`` replacement (``...-old-...``)
    is never deleted: if the output is missing it is put back.
    """
    removed = []
    for p in out_dir.parent.glob(f".{out_dir.name}{TMP_MARK}*"):
        m = re.search(re.escape(TMP_MARK) + r"(\d+)-", p.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if "-old-" in p.name:
            if not out_dir.exists():
                os.rename(p, out_dir)  # a crash between the two renames of a forced replacement
            continue
        _remove(p)
        removed.append(p)
    return removed


def _remove(path: Path) -> None:
    """Delete a folder, or a link or file that took a folder's place."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def output_error(e: OSError, out_dir: Path, written_bytes: int | None = None) -> OutputError:
    """One readable message for an ``OSError`` met while writing ``out_dir`` (disk full, permissions)."""
    if e.errno == errno.ENOSPC:
        done = f" ({written_bytes / 1e9:.2f} GB written)" if written_bytes is not None else ""
        return OutputError(f"disk full while writing {out_dir}{done}; the partial output was removed",
                           hint="free some space and run again")
    return OutputError(f"cannot write {out_dir}: {e.strerror or e}")


def check_not_an_input(out_dir: Path, inputs: list[Path]) -> None:
    """Refuse an output folder that is, or holds, one of the inputs: replacing it (``force``) would destroy
    an input, possibly while it is still being read."""
    out = Path(out_dir).resolve()
    for f in inputs:
        path = Path(f).resolve()
        if path == out or out in path.parents:
            raise OutputError(f"{out_dir} holds an input of this merge ({f})",
                              hint="write the output to another folder")


class Publication:
    """A folder being written: fill :attr:`tmp`, then :meth:`commit`; leaving the ``with`` block
    without a commit (an error, Ctrl-C) removes everything written, and the output path is untouched."""

    def __init__(self, out_dir: str | os.PathLike[str], *, force: bool = False) -> None:
        self.named = Path(out_dir)
        # an output that is a link (to a folder on another disk, say) is published where it points: the
        # link stays and shows the new folder, and the temporary sits beside the target, on its disk
        self.out_dir = Path(os.path.realpath(self.named)) if self.named.is_symlink() else self.named
        self.force = force
        if self.out_dir.exists() and not force:
            raise OutputError(f"{self.out_dir} already exists", hint="pass --force to replace it")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise OutputError(f"{self.out_dir} exists and is not a directory")
        parent = self.out_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create {parent}: {e.strerror or e}") from e
        clean_stale_temp_dirs(self.out_dir)
        self.tmp = parent / f".{self.out_dir.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(3)}"
        try:
            self.tmp.mkdir()
        except OSError as e:
            raise OutputError(f"cannot write in {parent}: {e.strerror or e}") from e
        self.done = False

    def _sync_tree(self) -> None:
        for folder, _, files in os.walk(self.tmp, topdown=False):
            for f in files:
                _fsync_path(Path(folder) / f)
            _fsync_path(Path(folder))

    def commit(self, written_bytes: int | None = None, *, last_check: Callable[[], None] | None = None) -> Path:
        """fsync everything, then rename the folder into place. Returns the output path.
        ``written_bytes`` (what the caller wrote) goes into the message if the disk fills up here;
        ``last_check`` runs after the fsync, just before the rename (a raise there publishes nothing)."""
        try:
            self._sync_tree()
        except OSError as e:
            raise output_error(e, self.out_dir, written_bytes) from e
        if last_check is not None:
            last_check()
        try:
            trash = self._swap_in()
        except OSError as e:
            raise OutputError(f"cannot put {self.out_dir} in place: {e.strerror or e}",
                              hint="a mount point, or a folder another program holds, cannot be replaced; "
                              "write into a folder inside it") from e
        _fsync_path(self.out_dir.parent)
        self.done = True
        if trash is not None:
            _remove(trash)
        return self.named

    def _swap_in(self) -> Path | None:
        """Rename the temporary folder to the output; returns the previous output's folder, to delete."""
        for _ in range(3):  # another publication may put its output there between a look and a rename
            if not self.out_dir.exists():
                try:
                    os.rename(self.tmp, self.out_dir)
                    return None
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
            if not self.force:
                raise OutputError(f"{self.out_dir} appeared while writing it; not replacing it without --force")
            if _exchange(self.tmp, self.out_dir):
                return self.tmp  # now holds the previous output
            if not self.out_dir.exists():
                continue
            trash = self.out_dir.parent / f".{self.out_dir.name}{TMP_MARK}{os.getpid()}-old-{secrets.token_hex(3)}"
            os.rename(self.out_dir, trash)
            try:
                os.rename(self.tmp, self.out_dir)
            except OSError:
                os.rename(trash, self.out_dir)  # put the previous output back
                raise
            return trash
        raise OutputError(f"{self.out_dir} keeps changing while it is published (other merges writing to it?)")

    def abort(self) -> None:
        """Remove everything written so far (the output path is untouched)."""
        if not self.done:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.done = True

    def __enter__(self) -> Publication:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.abort()
