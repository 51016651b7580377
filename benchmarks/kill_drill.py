"""Kill drill: signals at random moments of real merges, then the state they leave and a rerun.

Usage (from the repository root)::

    python -m benchmarks.kill_drill                    # 60 signals (20 each of SIGKILL, SIGTERM, SIGINT) on
                                                       # 0.4B task-arithmetic merges, + 10 during --lora-rank
    python -m benchmarks.kill_drill --size 0.1B --trials 12 --lora-trials 3   # a quick look

Per trial: ``moerge merge`` starts (a CLI process, as users run it), and after a random delay drawn
uniformly over the time a probe merge took to publish its output it gets the signal. Then:

- **torn**: the output folder exists but is not a complete model (every shard its index lists, each
  shard's header and size consistent, the card and recipe written), or it exists at all although the
  merge did not finish (an output appears only complete);
- **temporaries left**: hidden ``.OUT.moerge-tmp-*`` siblings after the process ended (expected only
  after SIGKILL, which no process can handle; the next run removes them);
- **rerun**: the same command again (``--force`` when an output is there) must succeed, and leave no
  temporary behind.

Odd trials of full merges start with a previous complete output in place and ``--force``, so a kill
during the replacement is tried too. The models are the benchmark's (``benchmarks/cache/<size>``, generated once
by ``benchmarks.merge_speed``'s generator). Prints a table and writes
``benchmarks/results/<date>-<host>-kill-drill.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.merge_speed import RESULTS, ensure_models, moerge_command

SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


def _recipe(root: Path, work: Path) -> Path:
    text = (f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\nmodels:\n"
            f"  - model: {root / 'ft1'}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {root / 'ft2'}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n")
    path = work / "recipe.yaml"
    path.write_text(text)
    return path


def _command(recipe: Path, out: Path, *, force: bool, lora: bool) -> list[str]:
    cmd = [*moerge_command(), "merge", str(recipe), str(out), "-q"]
    if force:
        cmd.append("--force")
    if lora:
        cmd += ["--lora-rank", "8"]
    return cmd


def complete(out: Path, lora: bool) -> str | None:
    """None when ``out`` is a complete output, else what is wrong with it."""
    from moerge.io.safetensors_format import parse_header

    if lora:
        need = ["adapter_config.json", "adapter_model.safetensors"]
    else:
        need = ["config.json", "moerge_recipe.yaml", "README.md"]
    missing = [n for n in need if not (out / n).is_file()]
    if missing:
        return f"missing {missing}"
    files = sorted(out.glob("*.safetensors"))
    index = out / "model.safetensors.index.json"
    if index.is_file():
        listed = set(json.loads(index.read_text())["weight_map"].values())
        if listed != {f.name for f in files}:
            return f"index lists {sorted(listed)}, folder holds {[f.name for f in files]}"
    if not files:
        return "no weights"
    for f in files:
        try:
            parse_header(f)  # sizes and offsets consistent with the file's length
        except Exception as e:
            return f"{f.name}: {e}"
    return None


def temporaries(work: Path) -> list[str]:
    return sorted(p.name for p in work.iterdir() if ".moerge-tmp-" in p.name)


def timed_run(cmd: list[str]) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, time.perf_counter() - t0, proc.stderr[-2000:]


def trial(k: int, sig_name: str, lora: bool, recipe: Path, work: Path, duration: float,
          rng: random.Random) -> dict:
    out = work / "out"
    if out.exists():
        shutil.rmtree(out)
    for t in temporaries(work):
        p = work / t
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    prior = k % 2 == 1 and not lora  # (a --lora-rank merge of 0.4B takes minutes: its trials start empty)
    if prior:  # a complete output is there: the merge replaces it (--force)
        code, _, err = timed_run(_command(recipe, out, force=False, lora=lora))
        assert code == 0, err
    delay = rng.uniform(0.05, duration)
    proc = subprocess.Popen(_command(recipe, out, force=prior, lora=lora), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    finished_before = proc.poll() is not None
    if not finished_before:
        proc.send_signal(SIGNALS[sig_name])
    _, stderr = proc.communicate(timeout=600)
    code = proc.returncode
    state = complete(out, lora) if out.exists() else "absent"
    torn = out.exists() and state is not None
    left = temporaries(work)
    rerun_code, rerun_s, rerun_err = timed_run(_command(recipe, out, force=out.exists(), lora=lora))
    after = temporaries(work)
    rerun_ok = rerun_code == 0 and complete(out, lora) is None and not after
    return {"trial": k, "signal": sig_name, "lora": lora, "prior_output": prior, "delay_s": round(delay, 3),
            "finished_before_signal": finished_before, "exit": code, "stderr_tail": stderr.strip()[-300:],
            "output": "complete" if state is None else state, "torn": torn, "temporaries_left": left,
            "rerun_exit": rerun_code, "rerun_s": round(rerun_s, 2), "rerun_ok": rerun_ok,
            "rerun_stderr": "" if rerun_ok else rerun_err[-500:], "temporaries_after_rerun": after}


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for lora in (False, True):
        for sig in SIGNALS:
            sel = [r for r in rows if r["signal"] == sig and r["lora"] == lora]
            if not sel:
                continue
            hit = [r for r in sel if not r["finished_before_signal"]]
            out.append({
                "merge": "--lora-rank 8" if lora else "full", "signal": sig, "trials": len(sel),
                "signalled_mid_merge": len(hit), "torn": sum(r["torn"] for r in sel),
                "temporaries_left": sum(bool(r["temporaries_left"]) for r in hit),
                "exit_codes": sorted({r["exit"] for r in hit}),
                "reruns_ok": sum(r["rerun_ok"] for r in sel)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kill_drill", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="0.4B")
    p.add_argument("--trials", type=int, default=60, help="full merges signalled (shared by the three signals)")
    p.add_argument("--lora-trials", type=int, default=10, help="--lora-rank merges signalled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None, help="folder for outputs (default: beside the models)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    root = ensure_models(args.size)
    work = args.work or root.parent / f"kill-drill-{args.size}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    recipe = _recipe(root, work)
    durations = {}  # from the start of the command to the moment its output appears (not its exit)
    for lora in (False, True):
        probe = work / "probe"
        t0 = time.perf_counter()
        proc = subprocess.Popen(_command(recipe, probe, force=True, lora=lora), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        while not probe.exists() and proc.poll() is None:
            time.sleep(0.005)
        durations[lora] = time.perf_counter() - t0
        _, err = proc.communicate()
        assert proc.returncode == 0, err
        shutil.rmtree(probe)
    print(f"{args.size}: a merge publishes its output {durations[False]:.1f} s after it starts, with --lora-rank "
          f"{durations[True]:.1f} s", flush=True)
    plan = [(name, False) for k in range(args.trials) for name in [list(SIGNALS)[k % 3]]]
    plan += [(list(SIGNALS)[k % 3], True) for k in range(args.lora_trials)]
    rows = []
    for k, (sig, lora) in enumerate(plan):
        rows.append(trial(k, sig, lora, recipe, work, durations[lora], rng))
        r = rows[-1]
        print(f"  {k + 1:3d}/{len(plan)} {sig:7s} {'lora' if lora else 'full'} at {r['delay_s']:5.2f} s: "
              f"exit {r['exit']}, output {r['output'][:40]}, temporaries {len(r['temporaries_left'])}, "
              f"rerun {'ok' if r['rerun_ok'] else 'FAILED'}", flush=True)
    table = summarize(rows)
    print("\n| merge | signal | trials | mid-merge | torn | temporaries left (mid-merge) | exit codes | reruns ok |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for t in table:
        print(f"| {t['merge']} | {t['signal']} | {t['trials']} | {t['signalled_mid_merge']} | {t['torn']} | "
              f"{t['temporaries_left']} | {', '.join(map(str, t['exit_codes']))} | {t['reruns_ok']} |")
    RESULTS.mkdir(exist_ok=True)
    stamp = f"{datetime.date.today()}-{socket.gethostname()}"
    dest = RESULTS / f"{stamp}-kill-drill.json"
    dest.write_text(json.dumps({"size": args.size, "durations_s": {"full": durations[False], "lora": durations[True]},
                                "seed": args.seed, "summary": table, "trials": rows}, indent=1))
    print(f"\nwrote {dest}")
    shutil.rmtree(work, ignore_errors=True)
    bad = any(t["torn"] for t in table) or any(
        t["temporaries_left"] for t in table if t["signal"] != "SIGKILL") or any(
        t["reruns_ok"] != t["trials"] for t in table)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
