"""Upcycling speed and memory: ``moerge upcycle`` against ``mergekit-moe`` 0.1.5 and the I/O floor, in one run.

Usage (from the repository root)::

    python -m benchmarks.upcycle_speed                    # 0.84B experts (the issue's size), 2 pairs
    python -m benchmarks.upcycle_speed --quick            # smoke test: 0.1B, 1 pair

Per size: the base and three experts of ``benchmarks/merge_speed`` (generated once into
``benchmarks/cache/<size>/``, Llama shape, bf16) are the four experts of one Mixtral, base as
``base_model``; a tokenizer is trained once into the base folder (mergekit-moe loads one whatever
the gate mode). One recipe, ``gate_mode: cheap_embed`` (deterministic and forward-free, so both tools
do only the upcycle itself), is run by both tools: a warm-up of each (their outputs compared tensor by
tensor), then ``--pairs`` alternating pairs, each followed by the I/O floor (``cat`` of every input to
/dev/null, then ``dd ... conv=fsync`` of an output-sized file), warm page cache. Each whole child process
is measured (wall, CPU, peak RSS). Prints a table and writes ``benchmarks/results/<date>-<host>-upcycle.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from benchmarks.merge_speed import (
    CACHE,
    EXPERTS,
    RESULTS,
    SIZES,
    ensure_models,
    machine_info,
    measure,
    moerge_command,
    remove,
    shards,
    warm,
)

TEXTS = ["business news: shares fell as the bank raised rates", "the striker scored twice in the final",
         "just saw the match lol what a game", "the debate turned to taxes and healthcare"] * 8
PROMPTS = [["Business news: shares fell"], ["the striker scored"], ["lol what a game"], ["the debate on taxes"]]


def ensure_tokenizer(base: Path) -> None:
    if not (base / "tokenizer.json").exists():
        from moerge.testing import make_bpe_tokenizer

        make_bpe_tokenizer(base, TEXTS, vocab_size=400)


def recipe(root: Path) -> dict:
    models = ["base", *EXPERTS]
    return {"base_model": str(root / "base"), "gate_mode": "cheap_embed", "dtype": "bfloat16",
            "experts_per_token": 2,
            "experts": [{"source_model": str(root / m), "positive_prompts": p} for m, p in zip(models, PROMPTS)]}


def compare(mine: Path, ref: Path) -> dict:
    """Tensor names, shapes and values of the two outputs (streamed one tensor at a time)."""
    from moerge.io.checkpoint import open_source

    with open_source(mine) as a, open_source(ref) as b:
        names_a, names_b = set(a.tensor_names), set(b.tensor_names)
        worst, unequal = 0.0, 0
        for n in sorted(names_a & names_b):
            x, y = a.read(n).float(), b.read(n).float()
            d = float((x - y).abs().max()) if x.numel() == y.numel() else float("inf")
            worst, unequal = max(worst, d), unequal + (d > 0)
    return {"same_names": names_a == names_b, "only_moerge": sorted(names_a - names_b)[:5],
            "only_mergekit": sorted(names_b - names_a)[:5], "max_abs_diff": worst, "tensors_differing": unequal}


def floor(inputs: list[Path], out: Path, out_bytes: int) -> dict:
    """Read every input once, write an output-sized file with fsync: the cost no upcycle can beat."""
    read = measure(["cat", *map(str, inputs)])
    out.mkdir(parents=True, exist_ok=True)
    count = max(out_bytes >> 24, 1)
    write = measure(["dd", "if=/dev/zero", f"of={out}/floor.bin", "bs=16M", f"count={count}", "conv=fsync",
                     "status=none"])
    remove(out)
    return {"wall": read["wall"] + write["wall"], "read_wall": read["wall"], "write_wall": write["wall"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.upcycle_speed", description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="0.84B", choices=list(SIZES))
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--mergekit-moe", default=str(CACHE / "mergekit-venv" / "bin" / "mergekit-moe"))
    ap.add_argument("--quick", action="store_true", help="0.1B, 1 pair")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.pairs = "0.1B", 1
    root = ensure_models(args.size)
    ensure_tokenizer(root / "base")
    work = CACHE / f"upcycle-{args.size}"
    work.mkdir(exist_ok=True)
    rec_path = work / "moe.yaml"
    rec_path.write_text(yaml.safe_dump(recipe(root), sort_keys=False))
    inputs = [s for m in ("base", *EXPERTS) for s in shards(root / m)]
    tools = {"moerge": [*moerge_command(), "upcycle", str(rec_path), str(work / "out-moerge"), "--force", "-q",
                        "--layout", "fused"],
             "mergekit-moe": [args.mergekit_moe, str(rec_path), str(work / "out-mergekit"), "--device", "cpu",
                              "--no-write-model-card", "--out-shard-size", "2B"]}
    runs: list[dict] = []
    warm(inputs)
    for name, cmd in tools.items():  # warm-up, kept for the output check
        remove(work / f"out-{'moerge' if name == 'moerge' else 'mergekit'}")
        runs.append({"tool": name, "warmup": True, **measure(cmd, log=work / f"{name}.log")})
    check = compare(work / "out-moerge", work / "out-mergekit")
    out_bytes = sum(f.stat().st_size for f in (work / "out-moerge").glob("*.safetensors"))
    in_bytes = sum(f.stat().st_size for f in inputs)
    for _ in range(args.pairs):
        for name, cmd in tools.items():
            remove(work / f"out-{'moerge' if name == 'moerge' else 'mergekit'}")
            warm(inputs)
            runs.append({"tool": name, "warmup": False, **measure(cmd, log=work / f"{name}.log")})
        warm(inputs)
        runs.append({"tool": "floor", "warmup": False, **floor(inputs, work / "floor", out_bytes)})
    timed = [r for r in runs if not r["warmup"]]
    med = {t: {k: statistics.median(r[k] for r in timed if r["tool"] == t and k in r) for k in ("wall", "rss_mib")
               if any(k in r for r in timed if r["tool"] == t)} for t in ("moerge", "mergekit-moe", "floor")}
    lines = [f"upcycle of 4 × {args.size} experts into a Mixtral (cheap_embed gate, bf16): "
             f"{in_bytes / 1e9:.2f} GB in, {out_bytes / 1e9:.2f} GB out",
             "| tool | wall s | × floor | peak RSS MiB |", "|---|---|---|---|"]
    for t in ("moerge", "mergekit-moe", "floor"):
        m = med[t]
        lines.append(f"| {t} | {m['wall']:.1f} | {m['wall'] / med['floor']['wall']:.2f} | "
                     f"{m.get('rss_mib', float('nan')):.0f} |")
    lines.append(f"moerge is {med['mergekit-moe']['wall'] / med['moerge']['wall']:.2f}× faster than mergekit-moe; "
                 f"outputs: {check}")
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.date.today().isoformat()}-{socket.gethostname()}-upcycle-{args.size}.json"
    out.write_text(json.dumps({"size": args.size, "input_bytes": in_bytes, "output_bytes": out_bytes,
                               "runs": runs, "medians": med, "check": check, "table": lines,
                               "machine": machine_info(args.mergekit_moe)}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    for name in ("out-moerge", "out-mergekit"):
        remove(work / name)
    subprocess.run(["sync"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
