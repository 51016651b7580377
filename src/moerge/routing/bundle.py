"""The routed bundle: a folder that says how to route among unchanged PEFT experts.

::

    routed/
      moerge_routing.json     format, moerge version, method, every router option, the base model (path
                              and fingerprint), the experts (relative paths, SHA-256 of each file), the
                              routed modules, what the build measured
      router.safetensors      "<module>.router": [E, d_in] float32, one row per expert (Arrow's prototypes,
                              PHATGOOSE's gate vectors, a trained router's rows); "<module>.router_bias":
                              [E], a learned router's biases (SMEAR)
      experts/<name>/         each PEFT adapter folder as it came (adapter_config.json,
                              adapter_model.safetensors), so PEFT loads any one alone
      README.md               how it was built

It is written through the one publisher (it appears complete or not at all) and read back as data only:
JSON bounded and typed, tensors from safetensors, every expert file checked against its hash, paths kept
inside the bundle. Nothing is unpickled and no code from the folder runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moerge.errors import CheckpointError
from moerge.io.checkpoint import open_source
from moerge.io.containment import member
from moerge.io.untrusted import expect, read_json_object
from moerge.version import __version__

ROUTING_FILE = "moerge_routing.json"
ROUTER_FILE = "router.safetensors"
FORMAT = "moerge-routing"
VERSION = 1
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def is_bundle(folder: str | Path) -> bool:
    return (Path(folder) / ROUTING_FILE).is_file()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def base_fingerprint(base: str | Path) -> str:
    """A hash of the base model's config and tensor table (names, dtypes, shapes): cheap, and it tells
    another model from the one the bundle was built on (it does not read the weights)."""
    h = hashlib.blake2b(digest_size=8)
    with open_source(base) as source:
        cfg = source.config or {}
        h.update(json.dumps({k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version")},
                            sort_keys=True).encode())
        for name in sorted(source.infos):
            info = source.infos[name]
            h.update(f"{name}:{info.dtype}:{list(info.shape)};".encode())
    return h.hexdigest()


def copy_adapter(src: Path, dst: Path) -> dict[str, str]:
    """Copy an adapter's files (checked to lie inside its folder) into ``dst``; their SHA-256 by name."""
    dst.mkdir(parents=True)
    hashes = {}
    for name in ADAPTER_FILES:
        path = member(src, name)
        if path is None:
            raise CheckpointError(f"{src}: no {name}; not a PEFT adapter folder")
        shutil.copyfile(path, dst / name)
        hashes[name] = sha256(dst / name)
    return hashes


@dataclass
class Bundle:
    folder: Path
    spec: dict[str, Any]
    rows: dict[str, torch.Tensor]  # module -> [E, d_in]
    biases: dict[str, torch.Tensor]  # module -> [E] (learned routers only)

    @property
    def method(self) -> str:
        return str(self.spec["method"])

    @property
    def router(self) -> dict[str, Any]:
        return dict(self.spec["router"])

    @property
    def modules(self) -> list[str]:
        return list(self.spec["modules"])

    def experts(self, role: str = "task") -> list[tuple[str, Path]]:
        return [(e["name"], self.folder / e["path"]) for e in self.spec["experts"] if e.get("role", "task") == role]

    @property
    def base_path(self) -> str:
        return str(self.spec["base"]["path"])


def write_spec(tmp: Path, spec: dict[str, Any], rows: dict[str, torch.Tensor], card: str,
               biases: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {f"{m}.router": r.float().contiguous() for m, r in rows.items()}
    tensors |= {f"{m}.router_bias": b.float().contiguous() for m, b in (biases or {}).items()}
    save_file(tensors, str(tmp / ROUTER_FILE), metadata={"format": FORMAT})
    full = {"format": FORMAT, "version": VERSION, "moerge": __version__, **spec}
    (tmp / ROUTING_FILE).write_text(json.dumps(full, indent=1) + "\n")
    (tmp / "README.md").write_text(card)


def read_bundle(folder: str | Path, *, verify: bool = True) -> Bundle:
    """The bundle at ``folder``, checked: its JSON, every expert file against its hash (``verify``), and
    one router row per expert for every module."""
    folder = Path(folder)
    path = member(folder, ROUTING_FILE)
    if path is None:
        raise CheckpointError(f"{folder}: not a routed bundle (no {ROUTING_FILE})")
    where = str(path)
    spec = read_json_object(path)
    if spec.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a moerge routing file (format {spec.get('format')!r})")
    if expect(spec.get("version"), int, where, "'version'") > VERSION:
        raise CheckpointError(f"{where}: format version {spec['version']} is newer than this moerge reads "
                              f"({VERSION})", hint="upgrade moerge")
    expect(spec.get("method"), str, where, "'method'")
    expect(spec.get("router"), dict, where, "'router'")
    base = expect(spec.get("base"), dict, where, "'base'")
    expect(base.get("path"), str, where, "'base.path'")
    modules = expect(spec.get("modules"), list, where, "'modules'")
    for m in modules:
        expect(m, str, where, "an entry of 'modules'")
    experts = expect(spec.get("experts"), list, where, "'experts'")
    if not experts:
        raise CheckpointError(f"{where}: lists no experts")
    for e in experts:
        expect(e, dict, where, "an entry of 'experts'")
        name = expect(e.get("name"), str, where, "an expert's 'name'")
        rel = expect(e.get("path"), str, where, f"expert {name!r}'s 'path'")
        files = expect(e.get("files"), dict, where, f"expert {name!r}'s 'files'")
        for fname in ADAPTER_FILES:
            digest = expect(files.get(fname), str, where, f"expert {name!r}'s hash of {fname}")
            file = member(folder, f"{rel}/{fname}")
            if file is None:
                raise CheckpointError(f"{folder}: expert {name!r} is missing ({rel}/{fname})",
                                      hint="the bundle is incomplete; build it again")
            if verify and sha256(file) != digest:
                raise CheckpointError(f"{file}: does not match the hash in {ROUTING_FILE} (changed after the "
                                      "bundle was built)", hint="rebuild the bundle, or restore the expert")
    router_path = member(folder, ROUTER_FILE)
    if router_path is None:
        raise CheckpointError(f"{folder}: no {ROUTER_FILE}")
    n_task = sum(1 for e in experts if e.get("role", "task") == "task")
    from safetensors.torch import load_file

    tensors = load_file(str(router_path))
    rows = {k.removesuffix(".router"): v for k, v in tensors.items() if k.endswith(".router")}
    biases = {k.removesuffix(".router_bias"): v for k, v in tensors.items() if k.endswith(".router_bias")}
    for m in modules:
        r = rows.get(m)
        if r is None or r.dim() != 2 or r.shape[0] != n_task:
            found = "missing" if r is None else f"shape {list(r.shape)}"
            raise CheckpointError(f"{router_path}: router rows of {m!r} are {found}; expected one row per "
                                  f"expert ({n_task})")
        if m in biases and tuple(biases[m].shape) != (n_task,):
            raise CheckpointError(f"{router_path}: router biases of {m!r} have shape {list(biases[m].shape)}")
    return Bundle(folder, spec, rows, biases)
