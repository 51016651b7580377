"""Untrusted JSON made into typed values, in one place: safetensors headers, ``config.json``,
``model.safetensors.index.json``, ``adapter_config.json``, ``moerge_stats.json``.

Every failure is a :class:`~moerge.errors.CheckpointError` (or the error class the
caller names) that says which file and what was expected, never a ``RecursionError``,
a ``ValueError`` from Python's integer digit limit or an ``AttributeError`` on a list
where a mapping was expected. Only regular files are read (a FIFO would block, a
device never end), and no more than ``max_bytes`` of them.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from moerge.errors import CheckpointError, MoergeError

MAX_JSON_BYTES = 64 << 20
MAX_DIGITS = 30  # no count, size or offset in a checkpoint needs more (2**64 has 20)


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def _constant(text: str) -> float:
    raise ValueError(f"{text} is not a JSON number")


def parse_json(data: bytes, where: str, *, error: type[MoergeError] = CheckpointError) -> Any:
    """``data`` parsed as strict JSON (UTF-8; integers of at most :data:`MAX_DIGITS` digits; no NaN or
    Infinity; nesting bounded by Python's recursion limit), or ``error`` naming ``where``."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    try:
        return json.loads(text, parse_int=_int, parse_constant=_constant)
    except RecursionError:
        raise error(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError, and so are the hooks' refusals
        raise error(f"{where}: invalid JSON ({e})") from None


def read_regular(path: Path, *, max_bytes: int = MAX_JSON_BYTES, error: type[MoergeError] = CheckpointError) -> bytes:
    """The bytes of ``path``, a regular file of at most ``max_bytes``."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: not a regular file")
    if info.st_size > max_bytes:
        raise error(f"{path}: {info.st_size:,} bytes, more than the {max_bytes:,} such a file may hold")
    try:
        with open(path, "rb") as fh:
            return fh.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None


def read_json_object(path: Path, *, error: type[MoergeError] = CheckpointError) -> dict[str, Any]:
    """A JSON file that must hold an object (``config.json``, an index, an adapter config, statistics metadata)."""
    value = parse_json(read_regular(path, error=error), str(path), error=error)
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, found {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def expect(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    """``value`` when it is of ``kind`` (``bool`` is not a number here), else a CheckpointError."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        raise CheckpointError(f"{where}: {what} must be {' or '.join(k.__name__ for k in kinds)}, found {_kind(value)}")
    return value
