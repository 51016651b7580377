"""Opening a model's weights files as a lazy map from tensor name to tensor, and :func:`open_source`.

A checkpoint is a Hugging Face model directory (one ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``), a single ``.safetensors``
file, a PyTorch ``.bin`` checkpoint (only with ``allow_pickle``, and then only
through ``torch.load(weights_only=True, mmap=True)``), or a Hugging Face repo id
that is already in the local Hugging Face cache. :func:`open_source` also opens
a PEFT LoRA adapter folder, as :class:`moerge.io.lora_view.LoraView`. Nothing is
downloaded and no remote code runs.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.errors import CheckpointError
from moerge.io.containment import member
from moerge.io.safetensors_format import SafetensorsReader, TensorEntry
from moerge.io.sources import (
    NamedTensors,
    TensorInfo,
    TensorSource,
    is_adapter_folder,
    read_runs_one_by_one,
    resolve_reference,
)
from moerge.io.untrusted import expect, read_json_object

if TYPE_CHECKING:
    import torch

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class Checkpoint(NamedTensors):
    """A lazily read model: tensor names, shapes and dtypes up front; bytes on demand.

    Use :meth:`open`. Reading a tensor touches only that tensor's bytes.
    """

    def __init__(self, ref: str, root: Path, infos: dict[str, TensorInfo], readers: dict[Path, Any], *,
                 allow_external_files: bool = False):
        self.ref = ref
        self.allow_external_files = allow_external_files
        self.root = root
        self.infos = infos
        self._readers = readers
        self._lock = threading.Lock()
        self._config: dict[str, Any] | None = None

    # -- construction -------------------------------------------------------------------
    @classmethod
    def open(cls, ref: str | os.PathLike[str], *, allow_pickle: bool = False,
             allow_external_files: bool = False) -> TensorSource:
        """Open any tensor source, as :func:`open_source` (a PEFT adapter folder gives its LoRA view)."""
        return open_source(ref, allow_pickle=allow_pickle, allow_external_files=allow_external_files)

    @classmethod
    def open_weights(cls, path: Path, ref: str, *, allow_pickle: bool = False,
                     allow_external_files: bool = False) -> Checkpoint:
        """Open the weights of a model folder, a weights file or a cached hub model. Every file a folder
        names or holds must lie inside it (:mod:`moerge.io.containment`) unless ``allow_external_files``."""
        if path.is_dir():
            opened = cls._open_folder(path, str(ref), allow_pickle, allow_external_files)
        elif path.is_file() and path.suffix == ".safetensors":  # a file the user named: taken as given
            opened = cls._from_safetensors(str(ref), path.parent, [path])
        elif path.is_file() and path.suffix in (".bin", ".pt", ".pth"):
            opened = cls._from_pickle(str(ref), path.parent, [path], allow_pickle)
        else:
            raise CheckpointError(f"{path}: not a checkpoint (expected a .safetensors file or a model directory)")
        opened.allow_external_files = allow_external_files
        return opened

    @classmethod
    def _open_folder(cls, path: Path, ref: str, allow_pickle: bool, external: bool) -> Checkpoint:
        def inside(name: str, named_by: Path | None = None) -> Path | None:
            return member(path, name, named_by=named_by, allow_external_files=external)

        if index := inside(SAFE_INDEX):
            weight_map = cls._weight_map(index)
            ck = cls._from_safetensors(ref, path, cls._shards(index, weight_map, external))
            try:
                ck._check_index(index, weight_map)
            except BaseException:
                ck.close()
                raise
            return ck
        if single := inside(SAFE_SINGLE):
            return cls._from_safetensors(ref, path, [single])
        others = [inside(p.name) for p in sorted(path.glob("*.safetensors")) if not p.name.startswith(".")]
        if any(others):
            return cls._from_safetensors(ref, path, [p for p in others if p is not None])
        if index := inside(BIN_INDEX):
            return cls._from_pickle(ref, path, cls._shards(index, cls._weight_map(index), external), allow_pickle)
        if single := inside(BIN_SINGLE):
            return cls._from_pickle(ref, path, [single], allow_pickle)
        raise CheckpointError(
            f"{path}: no model weights found (expected {SAFE_SINGLE}, {SAFE_INDEX} or *.safetensors)"
        )

    @staticmethod
    def _weight_map(index_path: Path) -> dict[str, str]:
        """The index's tensor name → shard file name map, checked to be one."""
        index = read_json_object(index_path)
        weight_map = expect(index.get("weight_map"), dict, f"{index_path}: corrupt index file", "'weight_map'")
        for tensor, shard in weight_map.items():
            expect(shard, str, f"{index_path}: corrupt index file", f"the shard of {tensor!r}")
        return weight_map

    @staticmethod
    def _shards(index_path: Path, weight_map: dict[str, str], allow_external_files: bool) -> list[Path]:
        """The shard files the index names, in order of first mention; each must exist inside the folder."""
        paths = []
        for name in dict.fromkeys(weight_map.values()):
            p = member(index_path.parent, name, named_by=index_path, allow_external_files=allow_external_files)
            if p is None:
                raise CheckpointError(f"{index_path}: lists shard {name}, which does not exist")
            paths.append(p)
        return paths

    def _check_index(self, index_path: Path, weight_map: dict[str, str]) -> None:
        """Every tensor the index lists is in the shard it names, and every tensor of a shard is listed (a
        loader that follows the index would otherwise read another model than the one merged)."""
        for name, shard in weight_map.items():
            if name not in self.infos:
                raise CheckpointError(f"{index_path}: lists tensor {name!r} in {shard}, which does not hold it")
            if self.infos[name].file.name != Path(shard).name:
                raise CheckpointError(f"{index_path}: lists tensor {name!r} in {shard}, but it is in "
                                      f"{self.infos[name].file.name}")
        unlisted = [n for n in self.infos if n not in weight_map]
        if unlisted:
            raise CheckpointError(f"{index_path}: does not list {len(unlisted)} tensor(s) its shards hold "
                                  f"(e.g. {unlisted[0]!r} in {self.infos[unlisted[0]].file.name})")

    @classmethod
    def _from_safetensors(cls, ref: str, root: Path, files: list[Path]) -> Checkpoint:
        infos: dict[str, TensorInfo] = {}
        readers: dict[Path, Any] = {}
        try:
            for f in files:
                reader = SafetensorsReader(f)
                readers[f] = reader
                for name, e in reader.entries.items():
                    if name in infos:
                        raise CheckpointError(f"{f}: tensor {name!r} also appears in {infos[name].file}")
                    infos[name] = TensorInfo(name, e.dtype, e.shape, f)
            if not infos:
                raise CheckpointError(f"{files[0] if len(files) == 1 else root}: holds no tensors",
                                      hint="a model needs at least one tensor; the file may be damaged")
        except BaseException:
            for r in readers.values():
                r.close()
            raise
        return cls(ref, root, infos, readers)

    @classmethod
    def _from_pickle(cls, ref: str, root: Path, files: list[Path], allow_pickle: bool) -> Checkpoint:
        if not allow_pickle:
            raise CheckpointError(
                f"{files[0]}: is a pickled PyTorch checkpoint; moerge does not unpickle files unless asked",
                hint="convert it to safetensors, or pass --allow-pickle (loaded with "
                "torch.load(weights_only=True), which refuses arbitrary objects)",
            )
        import torch

        infos: dict[str, TensorInfo] = {}
        readers: dict[Path, Any] = {}
        for f in files:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for bad pickles
                raise CheckpointError(f"{f}: cannot load PyTorch checkpoint ({e})") from e
            if not isinstance(state, dict):
                raise CheckpointError(f"{f}: expected a state dict, found {type(state).__name__}")
            readers[f] = state
            for name, t in state.items():
                if not isinstance(t, torch.Tensor):
                    continue
                infos[name] = TensorInfo(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), f)
        return cls(ref, root, infos, readers)

    # -- queries ------------------------------------------------------------------------
    @property
    def files(self) -> list[Path]:
        return list(self._readers)

    def entry(self, name: str) -> TensorEntry | None:
        reader = self._readers[self.info(name).file]
        return reader.entries[name] if isinstance(reader, SafetensorsReader) else None

    @property
    def config(self) -> dict[str, Any] | None:
        """The parsed ``config.json`` beside the weights, or None."""
        if self._config is None:
            p = self.side_file("config.json")
            if p is not None:
                self._config = read_json_object(p)
        return self._config

    def read(self, name: str, start: int = 0, count: int | None = None,
             buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (or a flat element range of it) into memory in its stored dtype
        (into ``buffer``, a large enough uint8 tensor, when given and the file is safetensors)."""
        info = self.info(name)
        reader = self._readers[info.file]
        if isinstance(reader, SafetensorsReader):
            return reader.read(name, start, count, buffer)
        t = reader[name]
        if start or count is not None:
            t = t.reshape(-1)[start : None if count is None else start + count]
        return t.clone()

    def mappable(self, name: str) -> bool:
        """Whether :meth:`map` can give tensor ``name`` (stored raw in a safetensors file)."""
        return isinstance(self._readers[self.info(name).file], SafetensorsReader)

    def map(self, name: str) -> torch.Tensor:
        """Tensor ``name``, flat, in its stored dtype, mapped from the page cache without a copy
        (only when :meth:`mappable`; otherwise use :meth:`read`)."""
        if not self.mappable(name):
            raise TypeError(f"{self.ref}: tensor {name!r} is not stored raw in a safetensors file")
        return self._readers[self.info(name).file].map(name)

    def read_runs(self, name: str, runs: list[tuple[int, int]]) -> torch.Tensor:
        """Elements [s, e) of the flattened tensor for each run, concatenated, in the stored dtype."""
        reader = self._readers[self.info(name).file]
        if isinstance(reader, SafetensorsReader):
            return reader.read_runs(name, runs)
        return read_runs_one_by_one(self, name, runs)

    def check_unchanged(self) -> None:
        for r in self._readers.values():
            if isinstance(r, SafetensorsReader):
                r.check_unchanged()

    def close(self) -> None:
        for r in self._readers.values():
            if isinstance(r, SafetensorsReader):
                r.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.ref!r}, {len(self.infos)} tensors, {len(self._readers)} files)"


def open_source(ref: str | os.PathLike[str], *, allow_pickle: bool = False,
                allow_external_files: bool = False) -> TensorSource:
    """The tensor source at ``ref`` (a path, or ``org/name[@revision]`` in the local Hugging Face cache):
    a PEFT LoRA adapter folder is read as base + scale·B·A (its base opened the same way), anything
    else as a checkpoint of weights files. Nothing is downloaded and no remote code runs, and no file
    outside the folder is read unless ``allow_external_files`` (see :mod:`moerge.io.containment`)."""
    from moerge.io.lora_view import LoraView
    from moerge.io.peft import PeftAdapter

    path = resolve_reference(ref)
    if not is_adapter_folder(path):
        return Checkpoint.open_weights(path, str(ref), allow_pickle=allow_pickle,
                                       allow_external_files=allow_external_files)
    adapter = PeftAdapter(path, allow_external_files=allow_external_files)
    try:
        try:
            base_path = resolve_reference(adapter.base_ref)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: the adapter's base model {adapter.base_ref!r} is not available locally",
                                  hint=e.hint) from None
        base = open_source(base_path, allow_pickle=allow_pickle, allow_external_files=allow_external_files)
    except BaseException:
        adapter.close()
        raise
    try:
        return LoraView(str(ref), adapter, base)
    except BaseException:
        adapter.close()
        base.close()
        raise
