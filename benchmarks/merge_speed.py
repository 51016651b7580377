"""Merge speed and memory: moerge against mergekit 0.1.5 and the I/O floor, in one run.

Usage (from the repository root)::

    python -m benchmarks.merge_speed                         # every size and method, 3 pairs
    python -m benchmarks.merge_speed --quick                 # smoke test: 0.1B, 1 pair
    python -m benchmarks.merge_speed --sizes 0.84B --methods linear,slerp --pairs 1 \\
        --mergekit /path/to/venv/bin/mergekit-yaml
    python -m benchmarks.merge_speed --replot benchmarks/results/DATE-HOST.json

What it does, per model size:

1. generates base + three experts once into ``benchmarks/cache/<size>/`` (Llama shape, bf16, seeded;
   expert = base + sparse Gaussian deltas like a light fine-tune), skipped when already there;
2. per method, writes ONE mergekit-format recipe and runs ``moerge merge`` and ``mergekit-yaml`` on it:
   one warm-up of each (whose outputs are compared element by element), then ``--pairs`` alternating
   pairs A B A B ..., each pair followed by the I/O floor (``cat`` of all inputs to /dev/null, and
   ``dd ... conv=fsync`` of one output-sized file), all with a warm page cache;
3. measures each whole child process with ``os.wait4``: wall, user+sys CPU, peak RSS;
4. prints a table, writes ``benchmarks/results/<date>-<host>.json`` (every raw run, machine info,
   medians, output checks) and a PNG (wall and peak RSS against model size).

mergekit comes from ``benchmarks/setup_mergekit.sh`` (its own venv under the cache) unless
``--mergekit`` names a ``mergekit-yaml``; ``--no-mergekit`` measures moerge and the floor only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from moerge.measure import run_measured

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / "cache"
RESULTS = HERE / "results"

# Llama shapes (bf16, vocab 32000, untied lm_head). 0.4B/0.84B/1.6B share every tensor shape and differ
# only in depth, so wall time against size is a clean scaling curve; 0.1B needs a narrower model.
SIZES: dict[str, dict[str, int]] = {
    "0.1B": dict(hidden=768, intermediate=2048, layers=8, heads=12, kv_heads=4, vocab=32000),  # 99.5 M
    "0.4B": dict(hidden=2048, intermediate=5632, layers=6, heads=32, kv_heads=4, vocab=32000),  # 395 M
    "0.84B": dict(hidden=2048, intermediate=5632, layers=16, heads=32, kv_heads=4, vocab=32000),  # 836 M
    "1.6B": dict(hidden=2048, intermediate=5632, layers=34, heads=32, kv_heads=4, vocab=32000),  # 1.63 B
}
EXPERT_SCALE, EXPERT_DENSITY, SHARD_SIZE = 0.01, 0.1, "2GB"  # deltas: 10% of entries, 0.01·rms
EXPERTS = ("ft1", "ft2", "ft3")
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "slerp", "model_stock",
           "della", "sce", "nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
           "tsv_m", "iso_c", "iso_cts", "knots", "wudi", "wudi_exact")
# methods mergekit does not have: moerge against the I/O floor only (wudi_exact = wudi with solver: exact)
MOERGE_ONLY = {"tsv_m", "iso_c", "iso_cts", "knots", "wudi", "wudi_exact"}
# mergekit's RNG differs from moerge's: report, don't judge (arcee_fusion: mergekit samples its quartiles
# from tensors of more than 10⁶ entries, moerge computes them exactly)
RANDOM_METHODS = {"dare_ties", "della", "arcee_fusion"}
TOOLS = ("moerge", "mergekit")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # neither tool may reach a hub


def param_count(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> int:
    kv = kv_heads * (hidden // heads)
    per_layer = 2 * hidden + 2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * intermediate
    return 2 * vocab * hidden + hidden + layers * per_layer


# ---------------------------------------------------------------------------------------------- models


def model_complete(path: Path, shape: dict[str, int]) -> bool:
    """moerge's writer publishes a model directory atomically, so a directory whose config has the
    wanted shape and whose shards are all present is complete."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    keys = dict(hidden="hidden_size", intermediate="intermediate_size", layers="num_hidden_layers",
                heads="num_attention_heads", kv_heads="num_key_value_heads", vocab="vocab_size")
    if any(cfg.get(k) != shape[s] for s, k in keys.items()):
        return False
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return all((path / s).exists() for s in shards)
    return (path / "model.safetensors").exists()


def moerge_command() -> list[str]:
    """How the benchmarks run moerge: the console script itself (not a pyenv shim), as users run it."""
    moerge = Path(sys.executable).parent / "moerge"
    return [str(moerge)] if moerge.exists() else [sys.executable, "-m", "moerge"]


def ensure_models(size: str) -> Path:
    """Generate base, ft1, ft2, ft3 for ``size`` unless already present (seeded, so reproducible)."""
    from moerge.testing import make_llama_like_big, perturb

    root, shape = CACHE / size, SIZES[size]
    for name in ("base", *EXPERTS):
        path = root / name
        if model_complete(path, shape):
            continue
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
        t0 = time.perf_counter()
        if name == "base":
            make_llama_like_big(path, **shape, seed=0, shard_size=SHARD_SIZE)
        else:
            perturb(root / "base", path, scale=EXPERT_SCALE, density=EXPERT_DENSITY,
                    seed=EXPERTS.index(name) + 1, shard_size=SHARD_SIZE)
        print(f"  generated {size}/{name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return root


def shards(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


# --------------------------------------------------------------------------------------------- recipes


def recipe(method: str, root: Path) -> dict:
    """The mergekit-format recipe both tools run (weights 1.0, bf16 output)."""
    base, fts = str(root / "base"), [str(root / f) for f in EXPERTS]

    def experts(**params: float) -> list[dict]:
        return [{"model": f, "parameters": {"weight": 1.0, **params}} for f in fts]

    r: dict = {"merge_method": "wudi" if method == "wudi_exact" else method}
    if method == "linear":
        r["models"] = experts()
    elif method == "slerp":
        r |= {"base_model": base, "models": [{"model": base}, {"model": fts[0]}], "parameters": {"t": 0.5}}
    elif method in ("model_stock", "karcher", "ram", "ramplus_tl"):
        r |= {"base_model": base, "models": [{"model": f} for f in fts]}
        if method.startswith("ram"):
            r["parameters"] = {"epsilon": 1e-4}
    elif method in ("nearswap", "arcee_fusion"):
        r |= {"base_model": base, "models": [{"model": fts[0]}]}
        if method == "nearswap":
            r["parameters"] = {"t": 1e-3}
    elif method in ("nuslerp", "multislerp"):
        r |= {"base_model": base, "models": experts()[:2] if method == "nuslerp" else experts()}
    elif method in MOERGE_ONLY:
        r |= {"base_model": base, "models": [{"model": f} for f in fts]}
        if method == "wudi_exact":
            r["parameters"] = {"solver": "exact"}
    elif method == "sce":
        r |= {"base_model": base, "models": [{"model": f} for f in fts], "parameters": {"select_topk": 0.5}}
    else:
        params = {"task_arithmetic": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5},
                  "breadcrumbs": {"density": 0.9, "gamma": 0.01}, "della": {"density": 0.5, "epsilon": 0.15}}[method]
        r |= {"base_model": base, "models": experts(**params)}
    r["dtype"] = "bfloat16"
    return r


def recipe_models(r: dict) -> list[Path]:
    """Every model the recipe reads, each once."""
    models = dict.fromkeys([r["base_model"]] if "base_model" in r else [])
    models |= dict.fromkeys(m["model"] for m in r["models"])
    return [Path(m) for m in models]


def recipe_inputs(r: dict) -> list[Path]:
    """Every safetensors file the recipe reads."""
    return [s for m in recipe_models(r) for s in shards(m)]


# ------------------------------------------------------------------------------------------- measuring


def measure(cmd: list[str], log: Path | None = None, cwd: Path | None = None) -> dict:
    """One child run to completion through moerge's small launcher: wall, CPU, peak RSS and RssAnon."""
    return run_measured(cmd, log=log, cwd=cwd, env=ENV)


def warm(files: list[Path]) -> None:
    """Pull the inputs into the page cache (untimed)."""
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()  # write back dirty pages now, untimed, rather than during the next run


def floor_write_cmd(base: Path, out: Path) -> list[str]:
    """Write a file of the output's size (one per base shard), fsynced, as one process tree."""
    parts = [f"dd if='{s}' of='{out}/{s.name}' bs=16M conv=fsync status=none" for s in shards(base)]
    return ["sh", "-c", f"mkdir -p '{out}' && " + " && ".join(parts)]


def tail(log: Path, n: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- checks


def compare(mine: Path, ref: Path, inputs: list[Path]) -> dict:
    """Element-wise comparison of two bf16 model directories, read with the safetensors package (an
    independent reader). Two counts of elements "differing by more than 2 bf16 ulps":

    - ``gt2ulp``: ulps counted between the two outputs' bit patterns (at the output's own scale);
    - ``beyond_tol``: |diff| > 2 bf16 ulps of the largest magnitude among the two outputs and the
      inputs at that element. mergekit does task arithmetic in bf16, so where the inputs nearly cancel,
      its result carries rounding errors at the inputs' scale, many ulps of the tiny output; this count
      forgives those and nothing else.
    """
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for s in shards(d):
            with safe_open(s, "pt") as f:
                out |= dict.fromkeys(f.keys(), s)
        return out

    def load(idx: dict[str, Path], name: str) -> torch.Tensor:
        with safe_open(idx[name], "pt") as f:
            return f.get_tensor(name)

    def ordered(t: torch.Tensor) -> torch.Tensor:  # bf16 bit patterns -> integers in value order
        b = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(b < 0, -(b & 0x7FFF), b)

    def bf16_ulp(x: torch.Tensor) -> torch.Tensor:  # ulp of bf16 numbers of magnitude x (fp32)
        exponent = (x.view(torch.int32) >> 23) & 0xFF
        return torch.ldexp(torch.ones_like(x), exponent.clamp(min=1) - 127 - 7)

    a_idx, b_idx = index(mine), index(ref)
    in_idx = [index(m) for m in inputs]
    res = {"missing": sorted(set(b_idx) - set(a_idx)), "extra": sorted(set(a_idx) - set(b_idx)),
           "bad_shape_or_dtype": [], "max_abs_diff": 0.0, "max_ulps": 0, "numel": 0, "n_diff": 0,
           "n_gt2ulp": 0, "n_beyond_tol": 0, "worst_tensors": {}}
    for name in sorted(set(a_idx) & set(b_idx)):
        a, b = load(a_idx, name), load(b_idx, name)
        if a.shape == b.shape and a.dtype == torch.bfloat16 and b.dtype == torch.float32:
            b = b.to(torch.bfloat16)  # mergekit writes float32 for arcee_fusion and ramplus_tl: round it as moerge does
            res["ref_float32"] = res.get("ref_float32", 0) + 1
        if a.shape != b.shape or a.dtype != b.dtype or a.dtype != torch.bfloat16:
            res["bad_shape_or_dtype"].append(f"{name}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
            continue
        diff = (a.float() - b.float()).abs()
        ulps = (ordered(a) - ordered(b)).abs()
        scale = torch.maximum(a.float().abs(), b.float().abs())
        for idx in in_idx:
            if name in idx:
                x = load(idx, name)
                if x.shape == a.shape:
                    scale = torch.maximum(scale, x.float().abs())
        beyond = int((diff > 2 * bf16_ulp(scale)).sum())
        res["max_abs_diff"] = max(res["max_abs_diff"], float(diff.max()))
        res["max_ulps"] = max(res["max_ulps"], int(ulps.max()))
        res["numel"] += a.numel()
        res["n_diff"] += int((ulps > 0).sum())
        res["n_gt2ulp"] += int((ulps > 2).sum())
        res["n_beyond_tol"] += beyond
        if beyond:
            res["worst_tensors"][name] = beyond
        del a, b, diff, ulps, scale
    res["worst_tensors"] = dict(sorted(res["worst_tensors"].items(), key=lambda kv: -kv[1])[:5])
    for k in ("diff", "gt2ulp", "beyond_tol"):
        res["frac_" + k] = res["n_" + k] / max(res["numel"], 1)
    return res


def verdict(check: dict, method: str) -> str:
    if check.get("error"):
        return "FAIL (" + check["error"] + ")"
    if check["missing"] or check["extra"] or check["bad_shape_or_dtype"]:
        return "FAIL (tensor names, shapes or dtypes differ)"
    if method in RANDOM_METHODS:
        return "n/a (different RNG)"
    if check.get("ref_float32"):
        check = dict(check, ref_float32=0)
        return verdict(check, method) + " (mergekit's float32 output rounded to bf16)"
    if check["n_diff"] == 0:
        return "identical"
    if check["n_beyond_tol"] == 0:
        return "ok (bf16 rounding)"
    if check["frac_beyond_tol"] <= 1e-6:  # e.g. a TIES sign election flipped by mergekit's bf16 deltas
        return f"ok but {check['n_beyond_tol']} elements beyond"
    return "DIFFERS beyond bf16 rounding"


# ------------------------------------------------------------------------------------------- the bench


def bench_method(size: str, method: str, tools: dict[str, list[str]], pairs: int, runs: list, checks: list) -> None:
    root = CACHE / size
    rdir, work, logs = root / "recipes", root / "out", CACHE / "logs"
    for d in (rdir, work, logs):
        d.mkdir(parents=True, exist_ok=True)
    if method in MOERGE_ONLY:
        tools = {t: c for t, c in tools.items() if t != "mergekit"}
    r = recipe(method, root)
    rpath = rdir / f"{method}.yaml"
    rpath.write_text(yaml.safe_dump(r, sort_keys=False))
    inputs = recipe_inputs(r)

    def run(tool: str, rep: int, keep: bool = False) -> dict:
        out, log = work / tool, logs / f"{size}-{method}-{tool}.log"
        remove(out)
        warm(inputs)
        if tool == "floor_read":
            cmd = ["cat", *map(str, inputs)]  # stdout -> /dev/null (measure() with no log)
            log = None
        elif tool == "floor_write":
            cmd = floor_write_cmd(root / "base", out)
        else:
            cmd = [*tools[tool], str(rpath), str(out)]
        rec = {"size": size, "method": method, "tool": tool, "rep": rep, **measure(cmd, log, cwd=root)}
        runs.append(rec)
        status = "" if rec["rc"] == 0 else f"  EXIT {rec['rc']}"
        print(f"    {tool:<12} {'warm-up' if rep < 0 else f'pair {rep + 1}':<8} {rec['wall']:8.2f} s "
              f"cpu {rec['cpu']:7.1f} s  rss {rec['rss_mib']:7.0f} MiB  anon {rec['anon_mib']:7.0f} MiB{status}",
              flush=True)
        if rec["rc"] != 0 and log:
            print("      " + tail(log).replace("\n", "\n      "), flush=True)
        if not keep:
            remove(out)
        return rec

    print(f"  {size} {method}: {len(inputs)} input files, {sum(f.stat().st_size for f in inputs) / 1e9:.2f} GB",
          flush=True)
    warmups = {t: run(t, 0 if pairs == 0 else -1, keep=True) for t in tools}  # --pairs 0: the one run counts
    if "mergekit" in tools:
        for tool in tools:
            if tool == "mergekit":
                continue
            if warmups[tool]["rc"] or warmups["mergekit"]["rc"]:
                check = {"error": "a tool failed"}
            else:
                check = compare(work / tool, work / "mergekit", recipe_models(r))
            check |= {"size": size, "method": method, "tool": tool}
            check["verdict"] = verdict(check, method)
            checks.append(check)
            print(f"    check {tool} vs mergekit: {check['verdict']}"
                  + ("" if "error" in check else f"; max |diff| {check['max_abs_diff']:.3g}, max {check['max_ulps']}"
                     f" ulps, {100 * check['frac_diff']:.3f}% differ, {100 * check['frac_gt2ulp']:.4f}% by > 2 ulps, "
                     f"{100 * check['frac_beyond_tol']:.4f}% beyond bf16 rounding {check['worst_tensors'] or ''}"),
                  flush=True)
    for tool in tools:
        remove(work / tool)
    for rep in range(pairs):
        for tool in (*tools, "floor_read", "floor_write"):
            run(tool, rep)
    if pairs == 0:
        for tool in ("floor_read", "floor_write"):
            run(tool, 0)


def time_startup(commands: dict[str, list[str]], runs: list, n: int = 5) -> None:
    """Start-up cost: each tool's --help, and a bare `import torch` for reference."""
    commands = {**{t: [*c, "--help"] for t, c in commands.items()},
                "import torch": [sys.executable, "-c", "import torch"]}
    for rep in range(-1, n):  # one warm-up, then n alternating runs
        for tool, cmd in commands.items():
            runs.append({"size": "-", "method": "--help", "tool": tool, "rep": rep, **measure(cmd)})


# -------------------------------------------------------------------------------------------- reporting


def summarize(runs: list[dict]) -> list[dict]:
    """Medians of the timed runs (warm-ups excluded) per size, method and tool; floor = read + write."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["rep"] >= 0 and r["rc"] == 0:
            groups.setdefault((r["size"], r["method"], r["tool"]), []).append(r)
    med = {k: {"size": k[0], "method": k[1], "tool": k[2], "n": len(v),
               **{m: statistics.median(x[m] for x in v) for m in ("wall", "cpu", "rss_mib", "anon_mib")}}
           for k, v in groups.items()}
    for (size, method, tool), row in list(med.items()):
        if tool == "floor_read" and (size, method, "floor_write") in med:
            w = med[size, method, "floor_write"]
            med[size, method, "floor"] = {"size": size, "method": method, "tool": "floor", "n": row["n"],
                                          "wall": row["wall"] + w["wall"], "cpu": row["cpu"] + w["cpu"],
                                          "rss_mib": max(row["rss_mib"], w["rss_mib"]),
                                          "anon_mib": max(row["anon_mib"], w["anon_mib"])}
    for (size, method, _tool), row in med.items():
        floor, mk = med.get((size, method, "floor")), med.get((size, method, "mergekit"))
        row["x_floor"] = row["wall"] / floor["wall"] if floor else None
        row["speedup_vs_mergekit"] = mk["wall"] / row["wall"] if mk else None
        if size != "-":
            row["params"] = param_count(**SIZES[size])
    order = {t: i for i, t in enumerate((*TOOLS, "floor", "floor_read", "floor_write"))}
    size_order = {s: i for i, s in enumerate(SIZES)}
    return sorted(med.values(), key=lambda r: (r["method"] == "--help", METHODS.index(r["method"])
                  if r["method"] in METHODS else 0, size_order.get(r["size"], -1), order.get(r["tool"], 9)))


def table(medians: list[dict], checks: list[dict]) -> str:
    tools = (*TOOLS, "moerge-cuda")
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"{'method':<16}{'size':>6}  {'tool':<12}{'wall s':>9}{'cpu s':>9}{'peak RSS MiB':>14}"
             f"{'anon MiB':>10}{'x floor':>9}{'vs mergekit':>13}"]
    for r in medians:
        speed = r["speedup_vs_mergekit"] if r["tool"].startswith("moerge") else None
        lines.append(f"{r['method']:<16}{r['size']:>6}  {r['tool']:<12}{r['wall']:>9.2f}{r['cpu']:>9.1f}"
                     f"{r['rss_mib']:>14.0f}{r['anon_mib']:>10.0f}{f(r['x_floor'] if r['tool'] in tools else None, '9.2f'):>9}"
                     f"{f(speed, '12.1f') + ('x' if speed else ''):>13}")
    if checks:
        lines += ["", f"{'output check':<16}{'size':>6}  {'tool':<12}{'max|diff|':>10}{'max ulps':>9}"
                  f"{'% differ':>10}{'% >2ulps':>10}{'% >tol':>9}  verdict (vs mergekit; tol = 2 ulps of max |out|,|inputs|)"]
        for c in checks:
            if "error" in c:
                lines.append(f"{c['method']:<16}{c['size']:>6}  {c['tool']:<12}  {c['verdict']}")
                continue
            lines.append(f"{c['method']:<16}{c['size']:>6}  {c['tool']:<12}{c['max_abs_diff']:>10.3g}"
                         f"{c['max_ulps']:>9}{100 * c['frac_diff']:>10.3f}{100 * c['frac_gt2ulp']:>10.4f}"
                         f"{100 * c['frac_beyond_tol']:>9.4f}  {c['verdict']}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """(left) wall time vs model size per method and tool, with the I/O floor; (right) peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter

    rows = [r for r in result["medians"] if r["size"] != "-"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(METHODS)}
    style = {"moerge": ("-", "o"), "mergekit": ("--", "s"), "moerge-cuda": (":", "^")}
    for method in METHODS:
        for tool, (ls, mk) in style.items():
            pts = sorted((r["params"] / 1e9, r["wall"], r["rss_mib"], r.get("anon_mib", 0)) for r in rows
                         if r["method"] == method and r["tool"] == tool)
            if pts:
                x, t, m, anon = zip(*pts)
                ax_t.plot(x, t, ls=ls, marker=mk, color=colors[method])
                ax_m.plot(x, m, ls=ls, marker=mk, color=colors[method])
                ax_m.plot(x, anon, ls=ls, lw=0.6, marker=mk, mfc="none", color=colors[method])
    # one floor line per number of input models (linear reads 3 models, slerp 2, the others 4)
    floors: dict[int, dict[float, float]] = {}
    for r in rows:
        if r["tool"] == "floor":
            n_in = {"linear": 3, "slerp": 2}.get(r["method"], 4)
            floors.setdefault(n_in, {})[r["params"] / 1e9] = r["wall"]
    floor_handles = []
    for n_in, pts in sorted(floors.items()):
        x = sorted(pts)
        (h,) = ax_t.plot(x, [pts[v] for v in x], ls=":", marker="x", color=str(0.25 * (n_in - 2)),
                         label=f"I/O floor: read {n_in} models + write 1")
        floor_handles.append(h)
    gb = ax_m.axhline(1e9 / 2**20, color="gray", lw=0.8, ls=":", label="1.0 GB")
    xmax = max((r["params"] / 1e9 for r in rows), default=1.0) * 1.08
    ax_t.set(yscale="log", xlim=(0, xmax), xlabel="model size (billion parameters, bf16)",
             ylabel="wall time (s, median)", title="Merge wall time (warm page cache)")
    ax_m.set(xlim=(0, xmax), ylim=(0, None), xlabel="model size (billion parameters, bf16)",
             ylabel="MiB (median)", title="Peak memory of the whole process")
    for fmt in (ax_t.yaxis.set_major_formatter, ax_t.yaxis.set_minor_formatter):  # 20, not 2×10¹
        fmt(FormatStrFormatter("%g"))
    for ax in (ax_t, ax_m):
        ax.grid(True, alpha=0.3)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    tools = [t for t in style if any(r["tool"] == t for r in rows)]
    handles = ([Line2D([], [], color=colors[m], lw=3, label=m) for m in methods]
               + [Line2D([], [], color="black", ls=style[t][0], marker=style[t][1], label=t) for t in tools]
               + floor_handles + [gb, Line2D([], [], color="black", marker="o", ls="", label="peak RSS (ru_maxrss)"),
                                  Line2D([], [], color="black", marker="o", mfc="none", ls="",
                                         label="peak anonymous RSS (sampled)")])
    ax_m.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    m = result["machine"]
    fig.suptitle(f"moerge vs mergekit {m.get('mergekit_version') or ''}: {m['cpu_model']}, {m['nproc']} cores, "
                 f"{m['ram_gib']:.0f} GiB, {result['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict, size: str) -> str:
    """The README's table of one size of a result file: moerge against the floor and mergekit."""
    med = {(m["method"], m["tool"]): m for m in result["medians"] if m.get("size") == size}
    verdicts = {c["method"]: c.get("verdict", "") for c in result.get("checks", []) if c.get("size") == size}
    ties_mk = med.get(("ties", "mergekit"), {}).get("wall")
    rows = ["| method | moerge wall | × I/O floor | mergekit wall | speed-up | vs mergekit's ties | moerge peak RSS "
            "| mergekit peak RSS (anon.) | outputs vs mergekit |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for method in METHODS:
        a, b = med.get((method, "moerge")), med.get((method, "mergekit"))
        if a is None:
            continue
        vs_ties = f"{ties_mk / a['wall']:.1f}×" if ties_mk and method in ("ties", "dare_ties", "breadcrumbs") else ""
        rows.append(" | ".join([
            f"| {method}", f"{a['wall']:.1f} s", f"{a['x_floor']:.2f}",
            f"{b['wall']:.1f} s" if b else "–", f"{b['wall'] / a['wall']:.1f}×" if b else "–", vs_ties,
            f"{a['rss_mib']:.0f} MiB", f"{b['rss_mib']:,.0f} MiB ({b['anon_mib']:,.0f})" if b else "–",
            f"{verdicts.get(method, '')} |"]))
    return "\n".join(rows)


def machine_info(mergekit: str | None) -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem_kib = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal"))

    def out(cmd: list[str]) -> str | None:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    mk_version = None
    if mergekit:
        mk_python = Path(mergekit).parent / "python"
        mk_version = out([str(mk_python), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"])
    dirty = out(["git", "-C", str(REPO), "status", "--porcelain", "src"])
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "ram_gib": mem_kib / 2**20,
            "cpu_model": cpu, "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "platform": platform.platform(),
            "moerge_commit": out(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
            "moerge_src_dirty": bool(dirty), "mergekit": mergekit, "mergekit_version": mk_version}


# ------------------------------------------------------------------------------------------------- main


def find_mergekit(arg: str | None) -> str:
    if arg:
        return str(Path(arg).resolve())
    exe = CACHE / "mergekit-venv" / "bin" / "mergekit-yaml"
    if not exe.exists():
        subprocess.run(["bash", str(HERE / "setup_mergekit.sh")], check=True)
    return str(exe)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.merge_speed", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--pairs", type=int, default=3, help="timed A/B pairs after the warm-up (default 3; 0: one run of each, "
                    "which is both the output check and the measurement: for long runs, noisier)")
    ap.add_argument("--mergekit", metavar="PATH", help="a mergekit-yaml to use instead of the benchmark's venv")
    ap.add_argument("--no-mergekit", action="store_true", help="measure moerge and the floor only")
    ap.add_argument("--quick", action="store_true", help="smoke test: 0.1B only, 1 pair")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the PNG of an earlier result file")
    ap.add_argument("--markdown", metavar="JSON", help="only print the README's table of an earlier result file "
                    "(the size given by --sizes, default 0.84B)")
    args = ap.parse_args(argv)

    if args.markdown:
        size = args.sizes if args.sizes in SIZES else "0.84B"
        print(markdown(json.loads(Path(args.markdown).read_text()), size))
        return 0

    if args.replot:
        src = Path(args.replot)
        plot(json.loads(src.read_text()), src.with_suffix(".png"))
        print(f"wrote {src.with_suffix('.png')}")
        return 0
    if args.quick:
        args.sizes, args.pairs = "0.1B", 1
    sizes, methods = args.sizes.split(","), args.methods.split(",")
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r} (choose from {', '.join(SIZES)})")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r} (choose from {', '.join(METHODS)})")

    moerge_cmd = moerge_command()
    tools = {"moerge": [*moerge_cmd, "merge", "--force", "-q"]}
    help_cmds = {"moerge": moerge_cmd}
    mergekit = None if args.no_mergekit else find_mergekit(args.mergekit)
    if mergekit:
        tools["mergekit"] = [mergekit, "--random-seed", "0", "--no-write-model-card"]
        help_cmds["mergekit"] = [mergekit]
    machine = machine_info(mergekit)
    if machine["cuda_available"]:
        tools["moerge-cuda"] = [*tools["moerge"], "--device", "cuda"]
    print(f"machine: {machine['cpu_model']}, {machine['nproc']} cores, {machine['ram_gib']:.1f} GiB, "
          f"torch {machine['torch']}, CUDA {'yes: ' + machine['cuda_device'] if machine['cuda_available'] else 'no'}",
          flush=True)

    runs: list[dict] = []
    checks: list[dict] = []
    started = time.time()
    print("timing start-up: --help and import torch (median of 5)", flush=True)
    time_startup(help_cmds, runs)
    for size in sizes:
        print(f"models {size} ({param_count(**SIZES[size]) / 1e9:.2f} B params)", flush=True)
        ensure_models(size)
        for method in methods:
            bench_method(size, method, tools, args.pairs, runs, checks)

    date, host = datetime.date.today().isoformat(), socket.gethostname()
    result = {"date": date, "host": host, "argv": sys.argv[1:], "seconds": time.time() - started,
              "machine": machine, "tools": tools, "sizes": {s: SIZES[s] for s in sizes},
              "recipes": {m: recipe(m, Path("<cache>/<size>")) for m in methods},
              "medians": summarize(runs), "checks": checks, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{date}-{host}{'-quick' if args.quick else ''}"
    n = 1
    while stem.with_name(stem.name + (f"-{n}" if n > 1 else "") + ".json").exists():  # never overwrite
        n += 1
    stem = stem.with_name(stem.name + (f"-{n}" if n > 1 else ""))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(result, stem.with_suffix(".png"))
    print()
    print(table(result["medians"], checks))
    print(f"\nwrote {stem}.json and {stem}.png ({result['seconds'] / 60:.1f} min)")
    failed = [r for r in runs if r["rc"] != 0] + [c for c in checks if c["verdict"].startswith("FAIL")]
    if failed:
        print(f"{len(failed)} failed run(s) or check(s): see above and {CACHE / 'logs'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
