"""``python -m tests.fuzz --cases 10000``: the full campaign; prints a table and writes JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tests.fuzz.harness import BAD, Tally, campaign

FAMILIES = ("recipe", "cli", "checkpoint", "adapter")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    p.add_argument("--cases", type=int, default=1000, help="cases in all, shared evenly by the families")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    p.add_argument("--first-seed", type=int, default=0, help="seeds run from here (a case is its family and seed)")
    p.add_argument("--seed", type=int, action="append", help="run only this seed (repeatable), for a replay")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds a case may take before it counts as a hang")
    p.add_argument("--json", type=Path, help="write the counts and every bad case here")
    args = p.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    per = max(1, args.cases // len(families))
    seeds = args.seed or list(range(args.first_seed, args.first_seed + per))
    jobs = [(f, s) for s in seeds for f in families]
    tally, t0, last = Tally(), time.time(), 0.0
    for k, outcome in enumerate(campaign(jobs, workers=args.workers, timeout=args.timeout), 1):
        tally.add(outcome)
        if outcome.kind in BAD:
            print(f"{outcome.kind}: {outcome.family} seed {outcome.seed}: {outcome.what}\n  "
                  + outcome.detail.strip().replace("\n", "\n  ")[-1500:], file=sys.stderr)
        if time.time() - last > 30:
            last = time.time()
            print(f"... {k}/{len(jobs)} cases, {time.time() - t0:.0f} s", file=sys.stderr)
    print(tally.table())
    print(f"\n{len(jobs)} cases in {time.time() - t0:.0f} s on {args.workers} workers; slowest case "
          f"{tally.slowest:.1f} s (bound {args.timeout:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({
            "cases": len(jobs), "seconds": time.time() - t0, "workers": args.workers, "timeout": args.timeout,
            "counts": {f: dict(c) for f, c in tally.counts.items()}, "slowest_case_seconds": tally.slowest,
            "bad": [asdict(o) for o in tally.bad]}, indent=1))
    return 1 if tally.bad else 0


if __name__ == "__main__":
    sys.exit(main())
