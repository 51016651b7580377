"""Race drill: inputs changed while a merge reads them, and many merges into one output at once.

Usage (from the repository root)::

    python -m benchmarks.race_drill                       # 48 modifications on 0.1B merges, 600 API merges
                                                          # and 60 CLI pairs into one output
    python -m benchmarks.race_drill --trials 8 --api 60 --cli-pairs 4   # a quick look

**Modifications.** A CLI ``moerge merge`` (task arithmetic of the benchmark's 0.1B base and a copy of an
expert) runs; at a random moment over its measured duration one shard of the copy is *replaced* (a new
file renamed over it), *truncated* to half, *deleted*, or *rewritten in place* (same size, other bytes).
The change comes once the merge holds the shard open (seen in ``/proc/PID/fd``), at a random moment over
the time a merge then takes to publish its output (measured on the reference merge). A change made while the merge runs (its output not yet published) must end in an error that names the
shard (exit 2, or 135 when the file shrank under a memory map); a change that came after the output
appeared must leave it byte-identical to the merge of the unchanged inputs (such trials are counted apart). Anything else (a different output, a traceback, a crash) is counted as a failure.

**Concurrency.** Two processes each run ``moerge.merge(..., force=True)`` into the same output folder, over
and over (``--api`` merges in all), with two different recipes; then ``--cli-pairs`` pairs of CLI merges
are started at the same moment. Every merge must succeed or end in a clear error (never an internal
error), and the final folder must be byte-identical to one of the two recipes' outputs, with no
temporary left.

Prints tables and writes ``benchmarks/results/<date>-<host>-race-drill.json``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks.merge_speed import RESULTS, ensure_models, moerge_command

CHANGES = ("replace", "truncate", "delete", "rewrite")


def _recipe(path: Path, base: Path, expert: Path, weight: float = 0.5) -> Path:
    path.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {expert}\n"
                    f"    parameters: {{weight: {weight}}}\ndtype: bfloat16\n")
    return path


def digest(folder: Path) -> str:
    """A hash of every weights file and the index of a model folder (what a loader reads)."""
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.index.json")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _change(kind: str, shard: Path, staged: Path) -> None:
    """Change ``shard`` at once (a replacement is staged beforehand, so the change is one rename)."""
    if kind == "replace":
        os.replace(staged, shard)
    elif kind == "truncate":
        os.truncate(shard, shard.stat().st_size // 2)
    elif kind == "delete":
        shard.unlink()
    else:  # same size, other bytes, in the middle of the data
        size = shard.stat().st_size
        with open(shard, "r+b") as fh:
            fh.seek(size // 2)
            fh.write(os.urandom(4096))


def modification_trials(root: Path, work: Path, trials: int, rng: random.Random) -> tuple[list[dict], float]:
    base, expert, donor_model = root / "base", root / "ft1", root / "ft2"
    ref_out = work / "reference"
    reading = []  # seconds from the moment the merge holds the expert's shard open to its publication
    for _ in range(3):
        shutil.rmtree(ref_out, ignore_errors=True)
        proc = subprocess.Popen([*moerge_command(), "merge", str(_recipe(work / "ref.yaml", base, expert)), str(ref_out),
                                 "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_until_open(proc, sorted(expert.glob("*.safetensors"))[0])
        t_open = time.perf_counter()
        while not ref_out.exists() and proc.poll() is None:
            time.sleep(0.002)
        reading.append(time.perf_counter() - t_open)
        _, err = proc.communicate()
        assert proc.returncode == 0, err
    duration = sorted(reading)[1]
    want = digest(ref_out)
    rows = []
    for k in range(trials):
        kind = CHANGES[k % len(CHANGES)]
        copy = work / "ft1"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(expert, copy)
        shards = sorted(copy.glob("*.safetensors"))
        shard = rng.choice(shards)
        staged = shard.with_name(shard.name + ".new")
        if kind == "replace":
            shutil.copyfile(donor_model / shard.name, staged)
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        recipe = _recipe(work / "trial.yaml", base, copy)
        t0 = time.perf_counter()
        proc = subprocess.Popen([*moerge_command(), "merge", str(recipe), str(out), "-q"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        opened = _wait_until_open(proc, shard)  # "during the merge": once it holds the shard open
        time.sleep(rng.uniform(0.0, duration))  # over the time it then reads and writes, until it publishes
        finished_first = proc.poll() is not None
        published_first = out.exists()  # the output appears at once, complete, when it is published
        _change(kind, shard, staged)
        _, err = proc.communicate(timeout=600)
        seconds = time.perf_counter() - t0
        named = str(shard) in err
        if proc.returncode == 0 and digest(out) != want:
            verdict = "WRONG output"
        elif proc.returncode == 0:  # right, and the change came after the merge (or unnoticed, yet harmless)
            verdict = "after publication" if published_first else "unnoticed, output right"
        elif proc.returncode in (2, 135) and named and not out.exists():
            verdict = "error naming the file"
        else:
            verdict = "FAILED"
        left = [p.name for p in work.iterdir() if ".moerge-tmp-" in p.name]
        rows.append({"trial": k, "change": kind, "shard": shard.name, "opened_before_change": opened,
                     "finished_before_change": finished_first, "published_before_change": published_first,
                     "exit": proc.returncode, "verdict": verdict, "message": err.strip()[-400:],
                     "temporaries_left": left, "seconds": round(seconds, 2)})
        print(f"  {k + 1:3d}/{trials} {kind:8s} exit {proc.returncode:3d} {verdict}"
              + (f" ({err.strip().splitlines()[0][:110]})" if err.strip() else ""), flush=True)
        for t in left:  # a bus error exits without clean-up; the next run removes it (not counted here)
            shutil.rmtree(work / t, ignore_errors=True)
    return rows, duration


def _wait_until_open(proc: subprocess.Popen, shard: Path, timeout: float = 120.0) -> bool:
    """Wait until ``proc`` holds ``shard`` open (Linux /proc), or ends; whether it did."""
    fds, end = Path(f"/proc/{proc.pid}/fd"), time.perf_counter() + timeout
    target = str(shard.resolve())
    while proc.poll() is None and time.perf_counter() < end:
        try:
            for fd in fds.iterdir():
                try:
                    if os.readlink(fd) == target:
                        return True
                except OSError:
                    continue
        except OSError:
            pass
        time.sleep(0.002)
    return False


def _api_worker(args: tuple[str, str, int, int]) -> Counter:
    recipe, out, n, seed = args
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import moerge
    from moerge.errors import MoergeError

    counts: Counter = Counter()
    for _ in range(n):
        try:
            moerge.merge(recipe, out, force=True, shard_size="20KB")
            counts["ok"] += 1
        except MoergeError as e:
            counts["error: " + e.message.split(":")[-1].strip()[:80]] += 1
        except Exception as e:  # an internal error: what the drill looks for
            counts[f"INTERNAL {type(e).__name__}: {str(e)[:80]}"] += 1
    return counts


def concurrency(work: Path, api: int, cli_pairs: int) -> dict:
    from moerge.testing import make_llama, perturb

    tiny = work / "tiny"
    base = make_llama(tiny / "base", layers=2)
    expert = perturb(base, tiny / "ft1", seed=1, scale=0.1)
    recipes = [_recipe(work / f"c{k}.yaml", base, expert, w) for k, w in enumerate((0.3, 0.7))]
    refs = []
    for k, r in enumerate(recipes):
        out = work / f"cref{k}"
        res = subprocess.run([*moerge_command(), "merge", str(r), str(out), "-q", "--shard-size", "20KB"],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        refs.append(digest(out))
    out = work / "shared"
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(2) as pool:
        parts = pool.map(_api_worker, [(str(recipes[k]), str(out), api // 2, k) for k in range(2)])
    api_counts = sum(parts, Counter())
    api_s = time.perf_counter() - t0
    api_final = digest(out) in refs
    cli_counts: Counter = Counter()
    for _ in range(cli_pairs):
        procs = [subprocess.Popen([*moerge_command(), "merge", str(r), str(out), "-q", "--force", "--shard-size", "20KB"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in recipes]
        for p in procs:
            _, err = p.communicate(timeout=300)
            cli_counts["ok" if p.returncode == 0 else f"exit {p.returncode}: {err.strip()[:80]}"] += 1
    cli_final = digest(out) in refs
    left = [p.name for p in work.iterdir() if ".moerge-tmp-" in p.name]
    return {"api_merges": api, "api_outcomes": dict(api_counts), "api_seconds": round(api_s, 1),
            "api_final_output_is_one_of_the_two": api_final, "cli_pairs": cli_pairs,
            "cli_outcomes": dict(cli_counts), "cli_final_output_is_one_of_the_two": cli_final,
            "temporaries_left": left,
            "internal_errors": sum(v for k, v in api_counts.items() if k.startswith("INTERNAL"))
            + sum(v for k, v in cli_counts.items() if k.startswith("exit 1:"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.race_drill", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="0.1B")
    p.add_argument("--trials", type=int, default=48, help="merges whose input is changed (a quarter each kind)")
    p.add_argument("--api", type=int, default=600, help="API merges into one output, from two processes")
    p.add_argument("--cli-pairs", type=int, default=60, help="pairs of CLI merges started together")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    root = ensure_models(args.size)
    work = root.parent / f"race-drill-{args.size}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"modifications during {args.size} merges:", flush=True)
    rows, duration = modification_trials(root, work, args.trials, rng)
    print("\n| change | trials | changed mid-merge | error naming the file | wrong output | failed | "
          "changed after publication (output unchanged) |\n|---|---:|---:|---:|---:|---:|---:|")
    table = []
    for kind in CHANGES:
        sel = [r for r in rows if r["change"] == kind]
        c = Counter(r["verdict"] for r in sel)
        table.append({"change": kind, "trials": len(sel), **c})
        mid = len(sel) - c["after publication"]
        print(f"| {kind} | {len(sel)} | {mid} | {c['error naming the file']} | {c['WRONG output']} | "
              f"{c['FAILED'] + c['unnoticed, output right']} | {c['after publication']} |")
    print(f"\n(a merge publishes {duration:.2f} s after it opens its input)\n\nconcurrent merges into one "
          "output:", flush=True)
    conc = concurrency(work, args.api, args.cli_pairs)
    print(json.dumps(conc, indent=1))
    RESULTS.mkdir(exist_ok=True)
    dest = RESULTS / f"{datetime.date.today()}-{socket.gethostname()}-race-drill.json"
    dest.write_text(json.dumps({"size": args.size, "merge_seconds": duration, "modifications": table,
                                "trials": rows, "concurrency": conc}, indent=1))
    print(f"\nwrote {dest}")
    shutil.rmtree(work, ignore_errors=True)
    bad = any(r["verdict"] in ("WRONG output", "FAILED", "unnoticed, output right") for r in rows) or conc["internal_errors"] or not (
        conc["api_final_output_is_one_of_the_two"] and conc["cli_final_output_is_one_of_the_two"]) or \
        conc["temporaries_left"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
