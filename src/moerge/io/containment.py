"""Containment: every file a model folder names lies inside that folder.

A model folder downloaded from anywhere is untrusted. Its index names shard files, and any of its
files (weights, ``config.json``, tokenizer files, an adapter's weights) may be a symbolic link. Left
unchecked, an index entry ``/home/me/.ssh/id_rsa`` or ``../../etc/passwd`` would be opened, and a
``tokenizer.json`` linked to a secret would be copied into a merged model that may then be published.
:func:`member` is the one gate: a name must be a relative path without ``..``, it must resolve (links
followed) inside the folder, and it must be a regular file (a FIFO would block, a device never end).
Nothing of a refused file is read.

The Hugging Face hub cache is the one layout where links leave the folder by design: the files of
``models--org--name/snapshots/<commit>/`` (and of its subfolders) are links into
``models--org--name/blobs/``. There that ``blobs`` folder is inside the boundary too, and nothing else
of the cache.

Users who keep shards elsewhere on purpose (links to another disk) pass ``allow_external_files``
(``--allow-external-files``): names are then taken as given, links followed anywhere; only the
regular-file check remains.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from moerge.errors import CheckpointError

EXTERNAL_HINT = ("if the model really keeps its files elsewhere, pass --allow-external-files (merge, inspect, "
                 "diff, extract-lora, stats; allow_external_files=True in Python)")
HUB_PREFIXES = ("models--", "datasets--", "spaces--")


def boundaries(folder: Path) -> list[Path]:
    """The folders inside which every file of ``folder`` must resolve: ``folder`` itself (links resolved),
    and, for a folder inside a Hugging Face cache snapshot (``models--org--name/snapshots/<commit>/...``,
    subfolders included), that repository's ``blobs`` folder, where the snapshot's links point."""
    real = folder.resolve()
    roots = [real]
    for up in (real, *real.parents):
        if up.parent.name == "snapshots" and up.parent.parent.name.startswith(HUB_PREFIXES):
            blobs = up.parent.parent / "blobs"
            if blobs.is_dir():
                roots.append(blobs)
            break
    return roots


def shown(text: str, *, quoted: bool = False, limit: int = 200) -> str:
    """An untrusted name as it may appear in a message: as it is (or quoted) when short and printable,
    else quoted with control characters escaped, and shortened."""
    if len(text) > limit:
        return f"{text[:limit // 2]!r}…({len(text):,} characters)"
    return repr(text) if quoted or not text.isprintable() else text


def member(folder: Path, name: str, *, named_by: Path | None = None,
           allow_external_files: bool = False) -> Path | None:
    """``folder / name`` when it exists, checked to be a regular file inside :func:`boundaries` of
    ``folder`` (see the module docstring); None when nothing is there. ``named_by`` is the file that
    named it (an index), for the message."""
    where = f"{named_by}: names {shown(name, quoted=True)}" if named_by is not None else f"{folder}/{shown(name)}"
    if not name or "\x00" in name:
        raise CheckpointError(f"{where}: not a file name")
    if not allow_external_files:
        _check_name(name, where)
    path = folder / name
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path) and not allow_external_files:
            _check_inside(folder, path, where)  # a dangling link out of the folder is refused too
        return None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot be read ({e.strerror or e})") from None
    if not allow_external_files:
        _check_inside(folder, path, where)
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{where}: not a regular file" + (f" ({path})" if named_by is not None else ""),
                              hint="a model folder's files must be plain files (not FIFOs, devices or folders)")
    return path


def _check_name(name: str, where: str) -> None:
    pure = PurePosixPath(name)
    if pure.is_absolute() or Path(name).is_absolute():
        raise CheckpointError(f"{where}, an absolute path; a model folder's files must lie inside it",
                              hint=EXTERNAL_HINT)
    if ".." in pure.parts or ".." in Path(name).parts:
        raise CheckpointError(f"{where}, which leaves the model folder", hint=EXTERNAL_HINT)


def _check_inside(folder: Path, path: Path, where: str) -> None:
    roots = boundaries(folder)
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:  # a loop of links
        raise CheckpointError(f"{where}: cannot be resolved ({e})") from None
    if not any(real == root or root in real.parents for root in roots):
        target = os.readlink(path) if path.is_symlink() else str(real)
        raise CheckpointError(f"{where}: a link to {shown(target)}, outside the model folder {roots[0]}",
                              hint=EXTERNAL_HINT)
