"""The fuzz families: each turns ``(rng, assets, workdir, seed)`` into a :class:`~tests.fuzz.harness.Case`."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import struct
from pathlib import Path
from typing import Any

from tests.fuzz.harness import Assets, Case, family

# -- values of every type and size -------------------------------------------------------------------------


def junk(rng: random.Random, depth: int = 0) -> Any:
    """A value a careless or hostile user might put anywhere."""
    pick = rng.randrange(24)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, 1, -1, 2, 7, 2**31, -(2**63), 2**64 + 1])
    if pick == 3:
        return rng.choice([0.0, 0.5, -0.5, 1e-320, 1e308, -1e308, 3.5, 1e-9])
    if pick == 4:
        return rng.choice(["", "x", "none", "auto", "base", "float32", "bf16", "ties", "0.5", "1e999"])
    if pick == 5:
        return rng.choice(["[/x]", "[bold]b[/bold]", "ü" * 5, "\x00nul", "a\nb: c", "{{x}}", "%s%n", "../.."])
    if pick == 6:
        return "a" * rng.choice([1000, 100_000])
    if pick == 7:
        return [] if rng.random() < 0.5 else {}
    if pick == 8 and depth < 3:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(1, 5))]
    if pick == 9 and depth < 3:
        return {rng.choice(["value", "filter", "model", "weight", "density", "t", "x"]): junk(rng, depth + 1)
                for _ in range(rng.randrange(1, 4))}
    if pick == 10:
        value: Any = 1
        for _ in range(rng.choice([50, 200])):
            value = [value]
        return value
    if pick == 11:
        return [rng.random() for _ in range(rng.choice([2, 3, 5, 1000]))]
    if pick == 12:
        return rng.choice([float("nan"), float("inf"), -float("inf")])
    if pick == 13:
        return rng.choice(["/etc/passwd", "/dev/zero", "/proc/self/environ", "~", "org/name", "a/b@c",
                           "./nowhere", "/"])
    return rng.choice([0.3, 1.0, 0.9, 2, 0, -0.2, 10])  # plausible numbers, most of the time


# -- recipes ------------------------------------------------------------------------------------------------


def base_recipes(a: Assets) -> list[dict[str, Any]]:
    b, f1, f2 = str(a.base), str(a.ft1), str(a.ft2)
    return [
        {"merge_method": "linear", "models": [{"model": f1, "parameters": {"weight": 0.6}},
                                              {"model": f2, "parameters": {"weight": 0.4}}], "dtype": "bfloat16"},
        {"merge_method": "ties", "base_model": b, "models": [
            {"model": f1, "parameters": {"density": 0.5, "weight": 1.0}},
            {"model": f2, "parameters": {"density": [0.2, 0.8], "weight": 0.5}}],
         "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float32"},
        {"merge_method": "dare_ties", "base_model": b, "models": [{"model": f1, "parameters": {"density": 0.7}},
                                                                 {"model": f2, "parameters": {"density": 0.3}}]},
        {"merge_method": "slerp", "base_model": f1, "slices": [{"sources": [
            {"model": f1, "layer_range": [0, 2]}, {"model": f2, "layer_range": [0, 2]}]}],
         "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": 0.3},
                              {"value": 0.5}]}, "dtype": "bfloat16"},
        {"merge_method": "passthrough", "slices": [{"sources": [{"model": f1, "layer_range": [0, 1]}]},
                                                   {"sources": [{"model": f2, "layer_range": [1, 2]}]}]},
        {"method": "task_arithmetic", "base_model": b, "models": [{"model": f1}, {"model": f2}],
         "parameters": {"lambda": 0.7}, "seed": 3},
        {"method": "breadcrumbs_ties", "base_model": b, "models": [f1, f2],
         "parameters": {"density": 0.8, "gamma": 0.01}},
        {"merge_method": "model_stock", "base_model": b, "models": [{"model": f1}, {"model": f2}]},
        {"method": "dare_linear", "base_model": b, "models": [{"model": f1, "parameters": {"weight": 0.5}}],
         "tokenizer_source": "base", "out_dtype": "float16"},
    ]


KNOWN_KEYS = ["merge_method", "method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
              "seed", "tokenizer_source", "tokenizer", "chat_template", "conventions", "config_source", "name",
              "vocab_policy", "layer_range", "sources", "model", "weight", "density", "t", "lambda", "filter",
              "value", "normalize", "stats", "residual_weight", "pad_to_multiple_of", "gamma", "epsilon"]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    return obj


METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
           "slerp", "model_stock", "passthrough", "fisher", "regmean", "mats", "della", "nuslerp", "karcher"]


def plausible(rng: random.Random, key: Any) -> Any:
    """A value of the right type for ``key`` that a user could mean, at the edges of its range."""
    number = rng.choice([0, 0.0, 1, 1.0, -1.0, 0.5, 1e-12, 1e12, 2.0, -0.0, 0.999999, 1.000001, 3])
    table: dict[Any, Any] = {
        "weight": number, "density": rng.choice([0.0, 1e-9, 0.01, 0.5, 1.0, 1.5, -0.1]), "t": rng.choice(
            [0.0, 1.0, 0.5, -0.5, 1.5, [0, 1], [1, 0, 1], [0.2] * 7, [{"filter": "mlp", "value": 2}], []]),
        "lambda": number, "gamma": rng.choice([0.0, 0.01, 0.5, 1.0]), "epsilon": rng.choice([0.0, 0.05, 1.0]),
        "normalize": rng.choice([True, False]), "rescale": rng.choice([True, False]),
        "dtype": rng.choice(["float32", "bfloat16", "float16", "fp8", "int8", "float64"]),
        "out_dtype": rng.choice(["float32", "bfloat16", "float16", "int8"]),
        "seed": rng.choice([0, -1, 2**31, 2**64]), "merge_method": rng.choice(METHODS), "method": rng.choice(METHODS),
        "layer_range": rng.choice([[0, 1], [0, 2], [1, 2], [0, 3], [2, 2], [1, 0], [0, 100]]),
        "tokenizer_source": rng.choice(["base", "union", "model:" + "x", "ft1"]),
        "conventions": rng.choice(["paper", "mergekit", "other"]),
        "vocab_policy": rng.choice(["error", "base", "pad"]),
        "trim_scope": rng.choice(["model", "tensor", "layer"]),
        "sign_election": rng.choice(["weighted", "unweighted", "majority"]),
        "filter": rng.choice(["mlp", "self_attn", "", "layers.0", ".*", "["]),
        "chat_template": rng.choice(["chatml", "auto", "{{ x }}", ""]),
    }
    return table.get(key, number)


def mutate_data(rng: random.Random, rec: Any, a: Assets, workdir: Path) -> Any:
    if rng.random() < 0.5:  # values a user could mean, so that planning and merging run deep
        for _ in range(rng.choice([1, 2, 3])):
            paths = [p for p in _paths(rec) if p and not isinstance(p[-1], int)]
            path = rng.choice(paths)
            if path[-1] in ("model", "base_model") and rng.random() < 0.7:
                rec = _set(rec, path, str(rng.choice([a.base, a.ft1, a.ft2, a.single, a.lora])))
            elif path[-1] in ("models", "sources") and isinstance(_get(rec, path), list) and _get(rec, path):
                items, how = _get(rec, path), rng.randrange(3)
                if how == 0:
                    items.append(copy.deepcopy(items[0]))
                elif how == 1:
                    items.pop()
                else:
                    items.reverse()
            elif rng.random() < 0.3 and isinstance(_get(rec, path[:-1]), dict):
                _get(rec, path[:-1])[rng.choice(["weight", "density", "t", "lambda", "normalize", "filter"])] = (
                    plausible(rng, path[-1]))
            else:
                rec = _set(rec, path, plausible(rng, path[-1]))
        return rec
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        paths = _paths(rec)
        path = rng.choice(paths)
        op = rng.randrange(8)
        target = rec
        for k in path:
            target = target[k]
        if op <= 2:
            rec = _set(rec, path, junk(rng))
        elif op == 3 and path:
            parent = rec
            for k in path[:-1]:
                parent = parent[k]
            del parent[path[-1]]
        elif op == 4 and isinstance(target, dict):
            target[rng.choice(KNOWN_KEYS + ["unknown_key", "x"])] = junk(rng)
        elif op == 5 and isinstance(target, list) and target:
            target.append(copy.deepcopy(rng.choice(target)) if rng.random() < 0.7 else junk(rng))
        elif op == 6 and path and path[-1] in ("model", "base_model", "tokenizer_source", "config_source"):
            rec = _set(rec, path, rng.choice(_model_refs(a, workdir, rng)))
        elif op == 7 and path and path[-1] == "layer_range":
            rec = _set(rec, path, [rng.randrange(-2, 4), rng.randrange(-2, 5)])
        else:
            rec = _set(rec, path, junk(rng))
    return rec


def _model_refs(a: Assets, workdir: Path, rng: random.Random) -> list[str]:
    fifo = workdir / "fifo"
    if not fifo.exists() and hasattr(os, "mkfifo"):
        os.mkfifo(fifo)
    (workdir / "empty").mkdir(exist_ok=True)
    return [str(a.base), str(a.ft1), str(a.single), str(a.lora), str(workdir / "missing"), str(workdir / "empty"),
            str(a.base / "config.json"), str(sorted(a.base.glob("*.safetensors"))[0]), "acme/tiny", "acme/tiny@x/y",
            "", str(fifo), str(a.base) + "+" + str(a.lora), "base", "[/x]"]


YAML_SPICE = [
    "x: &a [1, 2]\ny: *a\n",
    "a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n",
    "boom: !!python/object/apply:os.system ['touch PWNED']\n",
    "? [a, b]\n: 1\n",
    "self: &s [*s]\n",
    "defaults: &d {weight: 0.5}\n",
    "tab:\t1\n",
    "w: " + "9" * 400 + "\n",
    "n: " + "1" * 5000 + "\n",
    "f: .nan\ng: .inf\n",
    "--- \nother: doc\n",
    "%YAML 1.1\n---\n",
    "k: !custom 1\n",
    "<<: {method: linear}\n",
    "date: 2001-12-14t21:59:43.10-05:00\n",
    "bin: !!binary aGVsbG8=\n",
    "s: !!set {a, b}\n",
    "[" * 200 + "]" * 200 + "\n",
]


def render(rng: random.Random, rec: Any) -> str:
    import yaml

    try:
        text = yaml.safe_dump(rec, sort_keys=False, allow_unicode=rng.random() < 0.5, width=10**6)
    except (yaml.YAMLError, RecursionError, ValueError):
        text = json.dumps(rec, default=str)
    if rng.random() < 0.35:
        op = rng.randrange(6)
        if op == 0:
            spice = rng.choice(YAML_SPICE)
            text = spice + text if rng.random() < 0.5 else text + spice
        elif op == 1 and text:
            pos = rng.randrange(len(text))
            text = text[:pos] + rng.choice(["\x00", "\ufeff", ":", "- ", "&x ", "*x", "{", "]", "'", "\t"]) + text[pos:]
        elif op == 2 and text:
            text = text[: rng.randrange(len(text))]
        elif op == 3:
            text = text.replace("0.5", rng.choice(["1e999", "-0", "0x1f", ".5e", "9" * 40]))
        elif op == 4:
            text = "\ufeff" + text
        else:
            text = text.replace("weight:", "<<: *d\n    weight:", 1) if "weight:" in text else text
            text = "defaults: &d {weight: 0.25}\n" + text
    return text


def _recipe_text(rng: random.Random, a: Assets, workdir: Path) -> tuple[str, bytes | str]:
    rec = copy.deepcopy(rng.choice(base_recipes(a)))
    if rng.random() < 0.9:
        rec = mutate_data(rng, rec, a, workdir)
    text = render(rng, rec)
    if rng.random() < 0.05:  # not UTF-8
        raw = text.encode("utf-8")
        pos = rng.randrange(len(raw) + 1)
        return "bytes", raw[:pos] + bytes([rng.choice([0xff, 0xc3, 0x80, 0xfe])]) + raw[pos:]
    return "text", text


@family("recipe")
def recipe_case(rng: random.Random, a: Assets, workdir: Path, seed: int) -> Case:
    import moerge

    kind, text = _recipe_text(rng, a, workdir)
    path = workdir / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    dry = rng.random() < 0.4
    source: Any = path if kind == "bytes" or rng.random() < 0.5 else text

    def run() -> Any:
        res = moerge.merge(source, workdir / "out", dry_run=dry, force=rng.random() < 0.2)
        if (workdir / "PWNED").exists():
            raise AssertionError("a YAML tag ran code")
        return res

    return Case("recipe", seed, f"{'dry' if dry else 'merge'} {kind}", run)


@family("cli")
def cli_case(rng: random.Random, a: Assets, workdir: Path, seed: int) -> Case:
    from click.testing import CliRunner

    from moerge.cli import main
    from moerge.errors import MoergeError

    kind, text = _recipe_text(rng, a, workdir)
    path = workdir / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    args = ["merge", str(path), str(workdir / "out"), "-q"]
    if rng.random() < 0.6:
        args.append("--dry-run")
    if rng.random() < 0.1:
        args += rng.choice([["--shard-size", str(junk(rng))], ["--device", str(junk(rng))],
                            ["--lora-rank", str(rng.choice([0, -1, 2, 10**6]))]])

    def run() -> Any:
        res = CliRunner().invoke(main, args, catch_exceptions=True)
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
        if res.exit_code == 1 or "internal error" in res.output or "Traceback" in res.output:
            raise RuntimeError(f"exit {res.exit_code}: {res.output[-1500:]}")
        if res.exit_code != 0:
            raise MoergeError(f"exit {res.exit_code}: {res.output[-500:]}")
        return res.output

    return Case("cli", seed, " ".join(args[3:]) + f" ({kind})", run)


# -- checkpoints ---------------------------------------------------------------------------------------------


def regular(path: Path) -> bool:
    """A plain file, not a link, FIFO or folder (what a mutation or a reference reader may open)."""
    return path.is_file() and not path.is_symlink()


def apply(mutation: Any, *args: Any) -> str:
    """Run one mutation; one that cannot apply to what an earlier one left (a file no longer JSON, say)
    is skipped and named so."""
    try:
        return mutation(*args)
    except Exception as e:  # whatever the file now is, the reader of the generator failed on it
        return f"({mutation.__name__} skipped: {type(e).__name__})"


def read_st(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


def write_st(path: Path, header: Any, data: bytes, *, raw_header: bytes | None = None) -> None:
    body = raw_header if raw_header is not None else json.dumps(header, default=str).encode()
    body += b" " * ((-len(body)) % 8)
    if path.is_symlink():
        path.unlink()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _mutate_header(rng: random.Random, f: Path) -> str:
    header, data = read_st(f)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    op = rng.randrange(10)
    if op == 0:
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F4", "", 5, None])
        what = f"dtype {entry['dtype']!r}"
    elif op == 1:
        shape = list(entry["shape"])
        choice = rng.randrange(5)
        entry["shape"] = (shape[::-1] if choice == 0 else shape + [1] if choice == 1 else [-x for x in shape]
                          if choice == 2 else [math.prod(shape)] if choice == 3 else junk(rng))
        what = f"shape {str(entry['shape'])[:40]}"
    elif op == 2:
        b, e = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[e, b], [b + 2, e + 2], [b, e - 2], [b, e + 10**12], [-4, e], [b],
                                            [b, e, e], [float(b), e], junk(rng)])
        what = f"offsets {str(entry['data_offsets'])[:40]}"
    elif op == 3:
        del header[name]
        what = "entry deleted"
    elif op == 4:
        header[name + rng.choice([".x", "_", ""]) + "2"] = header.pop(name)
        what = "tensor renamed"
    elif op == 5:
        header["__metadata__"] = junk(rng)
        what = "metadata"
    elif op == 6:  # two tensors of one size swap their bytes: a valid file that holds other values
        same = [k for k in names if k != name and header[k]["dtype"] == entry["dtype"]
                and header[k]["shape"] == entry["shape"]]
        if same:
            other = rng.choice(same)
            entry["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], entry["data_offsets"]
        what = "offsets swapped"
    elif op == 7:
        header[name] = junk(rng)
        what = "entry junk"
    elif op == 8:
        entry[rng.choice(["extra", "dtype", "shape"])] = junk(rng)
        what = "entry field"
    else:
        header = rng.choice([[], "x", 1, None, {"__metadata__": {}}])
        what = "header not an object"
    write_st(f, header, data)
    return "header: " + what


def _mutate_bytes(rng: random.Random, f: Path) -> str:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    op = rng.randrange(8)
    if op == 0:
        cut = rng.randrange(len(raw))
        f.write_bytes(raw[:cut])
        return f"truncated at {cut}"
    if op == 1:
        f.write_bytes(raw + os.urandom(rng.choice([1, 8, 1000])))
        return "bytes appended"
    if op == 2:
        f.write_bytes(struct.pack("<Q", rng.choice([0, 1, n - 1, n + 8, len(raw), 2**63, 2**64 - 1])) + raw[8:])
        return "length prefix"
    if op == 3:  # flipped data bytes: still a valid file, read the same by every reader
        data = bytearray(raw)
        for _ in range(rng.choice([1, 10])):
            pos = rng.randrange(8 + n, len(raw))
            data[pos] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(data))
        return "data bits flipped"
    if op == 4:
        data = bytearray(raw)
        pos = rng.randrange(8, 8 + n)
        data[pos] = rng.randrange(256)
        f.write_bytes(bytes(data))
        return "header byte"
    if op == 5:
        f.write_bytes(b"")
        return "empty file"
    if op == 6:
        header = rng.choice([b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe{}", b'{"w": NaN}', b"{}",
                             b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"4" * 5000 + b"]}}"])
        write_st(f, None, raw[8 + n:], raw_header=header)
        return "raw header"
    f.write_bytes(os.urandom(rng.choice([7, 64, 4096])))
    return "random bytes"


def _mutate_index(rng: random.Random, folder: Path, a: Assets) -> str:
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wm = index["weight_map"]
    names = list(wm)
    name = rng.choice(names)
    outside_shard = next(a.outside.glob("model-*.safetensors"))
    op = rng.randrange(11)
    if op == 0:
        wm[name] = str(outside_shard)
        what = "entry: absolute path outside"
    elif op == 1:
        wm[name] = os.path.relpath(outside_shard, folder)
        what = "entry: ../ outside"
    elif op == 2:
        wm[name] = os.path.relpath(a.outside / "secret.txt", folder)
        what = "entry: ../ secret"
    elif op == 3:
        wm[name] = "missing.safetensors"
        what = "entry: missing shard"
    elif op == 4:
        wm[name] = junk(rng)
        what = "entry: junk"
    elif op == 5:
        del wm[name]
        what = "entry deleted"
    elif op == 6:
        wm["model.layers.7.extra.weight"] = wm[name]
        what = "entry added"
    elif op == 7:
        others = sorted(set(wm.values()) - {wm[name]})
        wm[name] = rng.choice(others) if others else wm[name]
        what = "entry: other shard"
    elif op == 8:
        index["weight_map"] = junk(rng)
        what = "weight_map junk"
    elif op == 9:
        index_path.write_text(rng.choice(["[]", "not json", '{"weight_map": ' + "[" * 50_000 + "]" * 50_000 + "}",
                                          "", '"x"']))
        return "index: " + "raw"
    else:
        wm[name] = "/dev/zero" if rng.random() < 0.5 else "."
        what = "entry: device or folder"
    index_path.write_text(json.dumps(index, default=str))
    return "index: " + what


def _replace_with_special(rng: random.Random, victim: Path, a: Assets) -> str:
    op = rng.randrange(7)
    if victim.exists() or victim.is_symlink():
        if victim.is_dir() and not victim.is_symlink():
            shutil.rmtree(victim)
        else:
            victim.unlink()
    if op == 0:
        victim.symlink_to(a.outside / "secret.txt")
        return f"{victim.name} → link to a secret outside"
    if op == 1:
        target = next(a.outside.glob("model-*.safetensors")) if victim.suffix == ".safetensors" else (
            a.outside / "config.json")
        victim.symlink_to(target)
        return f"{victim.name} → link to a valid file outside"
    if op == 2:
        victim.symlink_to(os.path.relpath(a.outside / "secret.txt", victim.parent))
        return f"{victim.name} → relative link outside"
    if op == 3:
        victim.symlink_to(victim.parent / "nowhere")
        return f"{victim.name} → dangling link"
    if op == 4 and hasattr(os, "mkfifo"):
        os.mkfifo(victim)
        return f"{victim.name} → FIFO"
    if op == 5:
        victim.mkdir()
        return f"{victim.name} → folder"
    victim.symlink_to("/dev/zero")
    return f"{victim.name} → /dev/zero"


def _mutate_config(rng: random.Random, folder: Path) -> str:
    cfg_path = folder / "config.json"
    op = rng.randrange(4)
    if op == 0:
        cfg_path.write_text(rng.choice(["[1]", '"llama"', "", "{", '{"a": ' * 30_000 + "1" + "}" * 30_000, "nan"]))
        return "config: raw"
    if op == 1:
        cfg_path.write_bytes(b'{"model_type": "\xff"}')
        return "config: not UTF-8"
    cfg = json.loads(cfg_path.read_text())
    key = rng.choice(["num_hidden_layers", "torch_dtype", "vocab_size", "architectures", "layer_types", "model_type",
                      "hidden_size", "tie_word_embeddings"])
    cfg[key] = junk(rng)
    cfg_path.write_text(json.dumps(cfg, default=str))
    return f"config: {key}"


PICKLE_PAYLOAD = (b"\x80\x04\x95\x30\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94"
                  b"\x8c\x0btouch PWNED\x94\x85\x94R\x94.")


def _reference_tensors(folder: Path) -> dict[str, Any] | None:
    """The tensors of ``folder`` as the reference reader (the safetensors library, following the index as
    transformers does) reads them; None when it cannot."""
    from safetensors import safe_open

    if any(p.exists() and not regular(p) for p in folder.iterdir()):
        return None  # links, FIFOs or folders in place of files: no reference reading
    try:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            wm = json.loads(index.read_text())["weight_map"]
            files = {folder / v for v in wm.values()}
            out = {}
            for f in files:
                with safe_open(str(f), "pt") as fh:
                    for k in fh.keys():
                        out[k] = fh.get_tensor(k).float()
            if set(out) != set(wm):
                return None
            return out
        with safe_open(str(folder / "model.safetensors"), "pt") as fh:
            return {k: fh.get_tensor(k).float() for k in fh.keys()}
    except Exception:
        return None


def _verify_mean(inputs: list[Path], out: Path) -> str | None:
    import torch

    refs = [_reference_tensors(p) for p in inputs]
    if any(r is None for r in refs):
        return None  # the reference cannot read an input: nothing to compare against (counted as ok)
    got = _reference_tensors(out)
    if got is None:
        return "the output cannot be read back"
    first = refs[0]
    assert first is not None
    if set(got) != set(first):
        return f"output tensors differ from the input's: {sorted(set(got) ^ set(first))[:3]}"
    for name, t in got.items():
        want = sum(r[name] for r in refs if r is not None) / len(refs)
        if t.shape != want.shape or not torch.allclose(t, want, rtol=1e-5, atol=1e-6):
            return f"tensor {name!r} differs from the mean of the inputs"
    return None


@family("checkpoint")
def checkpoint_case(rng: random.Random, a: Assets, workdir: Path, seed: int) -> Case:
    import moerge

    sharded = rng.random() < 0.6
    src, peer = (a.base, a.ft1) if sharded else (a.single, a.single_ft)
    m = shutil.copytree(src, workdir / "m")
    shards = sorted(m.glob("*.safetensors"))
    whats = []
    for _ in range(rng.choice([1, 1, 2])):
        op = rng.randrange(9 if sharded else 7)
        if op == 6 and rng.random() < 0.7:
            op = rng.choice([0, 2])  # the pickle case is one of few kinds; keep it rare
        victim = rng.choice(shards)
        if not regular(victim):
            continue
        if op in (0, 1):
            whats.append(apply(_mutate_header, rng, victim))
        elif op in (2, 3):
            whats.append(apply(_mutate_bytes, rng, victim))
        elif op == 4:
            whats.append(apply(_replace_with_special, rng, rng.choice(
                shards + [m / "config.json", m / "tokenizer.json", m / "generation_config.json"]), a))
        elif op == 5 and regular(m / "config.json"):
            whats.append(apply(_mutate_config, rng, m))
        elif op == 6:
            (m / "model.safetensors").unlink(missing_ok=True)
            (m / "model.safetensors.index.json").unlink(missing_ok=True)
            for s in shards:
                s.unlink(missing_ok=True)
            (m / "pytorch_model.bin").write_bytes(PICKLE_PAYLOAD)
            whats.append("a pickle in place of the weights")
        elif regular(m / "model.safetensors.index.json"):
            whats.append(apply(_mutate_index, rng, m, a))
    action = rng.randrange(10)
    out = workdir / "out"

    def run() -> Any:
        try:
            if action == 0:
                return moerge.inspect(m)
            if action == 1:
                return moerge.diff(peer, m)
            if action in (2, 3):  # other methods, the damaged model as an expert of the pristine base
                rec = {"merge_method": rng.choice(["ties", "task_arithmetic", "slerp", "dare_ties", "model_stock"]),
                       "base_model": str(src), "models": [{"model": str(m)}, {"model": str(peer)}],
                       "parameters": {"t": 0.5, "density": 0.5, "weight": 1.0}}
                if rec["merge_method"] == "slerp":
                    rec["models"] = rec["models"][:1]
                return moerge.merge(rec, out)
            rec = {"merge_method": "linear", "models": [{"model": str(m)}, {"model": str(peer)}], "dtype": "float32"}
            return moerge.merge(rec, out)
        finally:
            if (workdir / "PWNED").exists() or Path("PWNED").exists():
                raise AssertionError("a pickle ran")

    def verify(result: Any) -> str | None:
        return _verify_mean([m, peer], out) if action >= 4 else None

    return Case("checkpoint", seed, "; ".join(whats) + f" [{['inspect', 'diff', 'merge', 'merge'][action] if action < 4 else 'linear, verified'}]",
                run, verify)


# -- adapters ----------------------------------------------------------------------------------------------


def _mutate_adapter_config(rng: random.Random, lora: Path, workdir: Path) -> str:
    path = lora / "adapter_config.json"
    cfg = json.loads(path.read_text())
    op = rng.randrange(6)
    if op == 0:
        key = rng.choice(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "peft_type",
                          "use_dora", "use_rslora", "fan_in_fan_out", "modules_to_save", "bias", "task_type"])
        cfg[key] = junk(rng)
        what = f"{key} junk"
    elif op == 1:
        key = rng.choice(["r", "lora_alpha", "use_rslora", "fan_in_fan_out"])
        cfg[key] = {"r": rng.choice([1, 2, 4, 16]), "lora_alpha": rng.choice([1, 2, 3.5, 64, 0]),
                    "use_rslora": rng.choice([True, False]), "fan_in_fan_out": rng.choice([True, False])}[key]
        what = f"{key} = {cfg[key]!r}"
    elif op == 2:
        mod = rng.choice(["q_proj", "model.layers.0.self_attn.q_proj", "v_proj", "(", ".*", "lm_head"])
        cfg[rng.choice(["rank_pattern", "alpha_pattern"])] = {mod: rng.choice([1, 2, 4, 0, -1, "x", 2.5])}
        what = f"pattern {mod}"
    elif op == 3:
        cfg["base_model_name_or_path"] = rng.choice([str(workdir / "missing"), "", "org/name", 7, None,
                                                     str(lora), "[/x]"])
        what = "base reference"
    elif op == 4:
        del cfg[rng.choice(list(cfg))]
        what = "key deleted"
    else:
        path.write_text(rng.choice(["[]", "{", "", '"x"', '{"r": ' + "9" * 400 + "}"]))
        return "config raw"
    path.write_text(json.dumps(cfg, default=str))
    return "config: " + what


def _mutate_adapter_weights(rng: random.Random, lora: Path) -> str:
    import torch
    from safetensors.torch import load_file, save_file

    f = lora / "adapter_model.safetensors"
    t = load_file(str(f))
    name = rng.choice(sorted(t))
    op = rng.randrange(9)
    if op == 0:
        del t[name]
        what = f"{name.split('.')[-2]} deleted"
    elif op == 1:
        t[name] = t[name].t().contiguous()
        what = "transposed"
    elif op == 2:
        t[name] = torch.cat([t[name], t[name]], dim=rng.randrange(t[name].dim())).contiguous()
        what = "doubled along a dimension"
    elif op == 3:
        t[name] = t[name].to(rng.choice([torch.float16, torch.bfloat16, torch.int32, torch.float64]))
        what = f"dtype {t[name].dtype}"
    elif op == 4:
        t[rng.choice(["base_model.model.x.lora_A.weight", "other.weight",
                      "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight.extra"])] = torch.zeros(2, 2)
        what = "extra tensor"
    elif op == 5:
        t[name] = t[name] * float("nan")
        what = "NaN factor"
    elif op == 6:  # a name damaged as one flipped header byte would
        pos = rng.randrange(len(name))
        t[name[:pos] + rng.choice([",", "_", "X", ""]) + name[pos + 1:]] = t.pop(name)
        what = "name damaged"
    elif op == 7:  # a trained norm or bias stored in full (PEFT's modules_to_save): valid
        target = rng.choice(["model.norm.weight", "model.layers.0.input_layernorm.weight"])
        t["base_model.model." + target] = torch.full((32,), 0.5)
        what = f"full tensor {target}"
    else:
        t[name] = t[name].reshape(-1)
        what = "flattened"
    save_file(t, str(f))
    return "weights: " + what


def _reference_adapter_model(lora: Path, base: Path) -> dict[str, Any] | None:
    """W + scale·B·A for every adapted weight, computed here from the files (PEFT's convention), for
    the simple configs (no rank or alpha patterns); None when the reference cannot or does not apply."""
    from safetensors.torch import load_file

    if not (regular(lora / "adapter_config.json") and regular(lora / "adapter_model.safetensors")):
        return None
    try:
        cfg = json.loads((lora / "adapter_config.json").read_text())
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("peft_type", "LORA") != "LORA":
            return None
        r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, (int, float)):
            return None
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        weights = {k: v.float() for k, v in load_file(str(base / "model.safetensors")).items()}
        factors = load_file(str(lora / "adapter_model.safetensors"))
        for name, a in factors.items():
            if ".lora_" not in name:  # stored in full: replaces the base tensor (PEFT's modules_to_save)
                target = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
                if target not in weights or weights[target].shape != a.shape:
                    return None
                weights[target] = a.float()
                continue
            if ".lora_A" not in name:
                continue
            b = factors[name.replace("lora_A", "lora_B")]
            target = name.removeprefix("base_model.model.").replace(".lora_A", "")
            delta = b.float() @ a.float()
            if cfg.get("fan_in_fan_out"):
                delta = delta.t()
            if a.shape[0] != r or weights[target].shape != delta.shape:
                return None
            weights[target] = weights[target] + scale * delta
        return weights
    except Exception:
        return None


@family("adapter")
def adapter_case(rng: random.Random, a: Assets, workdir: Path, seed: int) -> Case:
    import moerge

    lora = shutil.copytree(a.lora, workdir / "lora")
    whats = []
    weights, config = lora / "adapter_model.safetensors", lora / "adapter_config.json"
    for _ in range(rng.choice([1, 1, 2])):
        op = rng.randrange(8)
        if op <= 2 and regular(config):
            whats.append(apply(_mutate_adapter_config, rng, lora, workdir))
        elif op <= 4 and regular(weights):
            whats.append(apply(_mutate_adapter_weights, rng, lora))
        elif op == 5 and regular(weights):
            whats.append(apply(_mutate_header, rng, weights))
        elif op == 6:
            whats.append(apply(_replace_with_special, rng, rng.choice([weights, config]), a))
        elif regular(weights):
            whats.append(apply(_mutate_bytes, rng, weights))
    out = workdir / "out"
    expected = _reference_adapter_model(lora, a.single)

    def run() -> Any:
        rec = {"merge_method": "linear", "models": [{"model": str(lora)}], "dtype": "float32"}
        return moerge.merge(rec, out)

    def verify(result: Any) -> str | None:
        import torch

        if expected is None:
            return None
        got = _reference_tensors(out)
        if got is None:
            return "the output cannot be read back"
        if set(got) != set(expected):
            return f"output tensors differ from the base's: {sorted(set(got) ^ set(expected))[:3]}"
        for name, t in got.items():
            if t.shape != expected[name].shape or not torch.allclose(t, expected[name], rtol=1e-4, atol=1e-5):
                return f"tensor {name!r} differs from W + scale·B·A"
        return None

    return Case("adapter", seed, "; ".join(whats) or "unchanged", run, verify)
