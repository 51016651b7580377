"""What every reader of tensors is: a :class:`TensorSource`, and where a reference points.

A source is a lazy map from tensor name to tensor: names, shapes and dtypes up
front, bytes on demand. :func:`moerge.io.checkpoint.open_source` picks the
source for a path: a safetensors (or, when asked, pickled) checkpoint, or a PEFT
LoRA adapter seen as the full model it stands for. Planners and the executor
see only this protocol.
"""

from __future__ import annotations

import math
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from moerge.errors import CheckpointError
from moerge.io.containment import shown as shown_name
from moerge.io.untrusted import read_regular

if TYPE_CHECKING:
    import torch

    from moerge.io.safetensors_format import TensorEntry

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one tensor, and the file that holds it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class TensorSource(Protocol):
    """A lazily read model (see the module docstring)."""

    ref: str  # what the user named
    root: Path  # the folder whose config.json and tokenizer files go with the tensors
    infos: dict[str, TensorInfo]
    allow_external_files: bool  # whether its files may lie outside its folder (moerge.io.containment)

    @property
    def files(self) -> list[Path]: ...
    @property
    def tensor_names(self) -> list[str]: ...
    @property
    def config(self) -> dict[str, Any] | None: ...
    def side_file(self, name: str) -> Path | None: ...
    def __contains__(self, name: str) -> bool: ...
    def info(self, name: str) -> TensorInfo: ...
    def entry(self, name: str) -> TensorEntry | None: ...
    def read(self, name: str, start: int = 0, count: int | None = None,
             buffer: torch.Tensor | None = None) -> torch.Tensor: ...
    def read_runs(self, name: str, runs: list[tuple[int, int]]) -> torch.Tensor: ...
    def mappable(self, name: str) -> bool: ...
    def map(self, name: str) -> torch.Tensor: ...
    def nbytes(self) -> int: ...
    def fingerprint(self, samples: int = 64) -> str: ...
    def check_unchanged(self) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> TensorSource: ...
    def __exit__(self, *exc: object) -> None: ...


class NamedTensors(ABC):
    """What a source derives from its ``infos`` (name → :class:`TensorInfo`) and its ``files``."""

    ref: str
    root: Path
    infos: dict[str, TensorInfo]
    allow_external_files: bool = False

    @property
    @abstractmethod
    def files(self) -> list[Path]:
        """Every file the source reads."""

    def side_file(self, name: str) -> Path | None:
        """``root / name`` (``config.json``, a tokenizer file) when it is there, checked to lie inside the
        model folder (:func:`moerge.io.containment.member`); None when there is none."""
        from moerge.io.containment import member

        return member(self.root, name, allow_external_files=self.allow_external_files)

    @property
    def tensor_names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise CheckpointError(f"{self.ref}: has no tensor {name!r}") from None

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def fingerprint(self, samples: int = 64) -> str:
        return files_fingerprint(self.files, samples)

    @abstractmethod
    def close(self) -> None:
        """Release the files (descriptors and mappings)."""

    @abstractmethod
    def check_unchanged(self) -> None:
        """Raise a CheckpointError naming the file if any file read has changed since it was opened."""

    def __enter__(self) -> NamedTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_runs_one_by_one(source: TensorSource, name: str, runs: list[tuple[int, int]]) -> torch.Tensor:
    """``source.read_runs`` through ``source.read``, for sources without a raw-file fast path."""
    import torch

    return torch.cat([source.read(name, s, e - s).reshape(-1) for s, e in runs])


def files_fingerprint(files: list[Path], samples: int = 64) -> str:
    """A cheap content fingerprint (16 hex digits): each file's size, its first 1 MiB (a safetensors
    header and the first tensors) and ``samples`` 4 KiB pieces spread evenly over the rest. Two
    fine-tunes of one base differ almost everywhere, so they differ here; reading costs about 1.3 MiB
    per file whatever the model size (statistics are checked against it)."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for path in files:
        size = path.stat().st_size
        h.update(size.to_bytes(8, "little"))
        with open(path, "rb") as fh:
            h.update(fh.read(1 << 20))
            for k in range(samples):
                fh.seek(size * k // samples)
                h.update(fh.read(4096))
    return h.hexdigest()


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def hf_cache_dirs() -> list[Path]:
    """The Hugging Face hub cache folders to look in, in the library's order of precedence."""
    dirs = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    if os.environ.get("XDG_CACHE_HOME"):
        dirs.append(Path(os.environ["XDG_CACHE_HOME"]) / "huggingface" / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def resolve_reference(ref: str | os.PathLike[str]) -> Path:
    """Turn a path or ``org/name[@revision]`` into a local path, never downloading."""
    text = str(ref)
    shown = shown_name(text)
    if "\x00" in text:
        raise CheckpointError(f"{shown}: not a path (it holds a NUL character)")
    try:
        path = Path(ref).expanduser()
        if path.exists():
            return path
    except RuntimeError:  # ~user for a user that does not exist
        raise CheckpointError(f"{shown}: no such user's home folder") from None
    except OSError as e:  # a name too long for the file system, a loop of links
        raise CheckpointError(f"{shown}: not a usable path ({e.strerror or e})") from None
    repo, _, revision = text.partition("@")
    parts = repo.split("/")
    looks_like_repo = (len(parts) == 2 and all(re.fullmatch(r"[\w.-]{1,96}", p) for p in parts)
                       and not text.startswith((".", "/", "~")))
    if not looks_like_repo:
        raise CheckpointError(f"{shown}: no such file or directory")
    revision = revision or "main"
    if not re.fullmatch(r"[\w.-]{1,128}", revision) or revision.startswith("."):
        raise CheckpointError(f"{shown}: invalid revision {revision[:100]!r}")
    searched = []
    for cache in hf_cache_dirs():
        root = cache / f"models--{parts[0]}--{parts[1]}"
        searched.append(str(cache))
        if not root.is_dir():
            continue
        ref_file = root / "refs" / revision
        commit = read_regular(ref_file, max_bytes=4096).decode("utf-8", "replace").strip() \
            if ref_file.is_file() else revision
        if not re.fullmatch(r"[\w.-]{1,128}", commit):
            raise CheckpointError(f"{ref_file}: not a commit hash")
        snap = root / "snapshots" / commit
        if snap.is_dir():
            return snap
        # a short commit hash
        snaps = sorted(p for p in (root / "snapshots").glob(f"{commit}*") if p.is_dir()) if len(commit) >= 7 else []
        if len(snaps) == 1:
            return snaps[0]
    raise CheckpointError(
        f"{text}: not a local path, and not found in the Hugging Face cache "
        f"(looked in {', '.join(dict.fromkeys(searched))})",
        hint=f"download it first (e.g. `huggingface-cli download {repo}`) or pass a local directory",
    )
