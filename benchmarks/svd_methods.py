"""Where the subspace methods' time goes: one weight matrix of each Llama shape, merged by each method.

Usage (from the repository root)::

    python -m benchmarks.svd_methods                    # the 0.84B model's shapes, 3 experts
    python -m benchmarks.svd_methods --shapes 2048x5632 --experts 4 --repeat 3

For each shape and method it times the merger alone on in-memory float32 task vectors (no I/O), splits
the time into its decompositions (SVDs, eigendecompositions, pseudo-inverses: counted by wrapping
torch.linalg) and the rest, and prints a table beside the cost of merely reading the inputs and writing
the output at 1 GB/s (the order of this machine's page-cache bandwidth through safetensors). Writes
``benchmarks/results/<date>-<host>-svd-methods.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import time
from pathlib import Path

import torch

from moerge.methods import get_method

RESULTS = Path(__file__).resolve().parent / "results"
# the 0.84B benchmark model (Llama, hidden 2048, MLP 5632, 4 KV heads): every distinct weight shape
SHAPES = ("2048x2048", "256x2048", "5632x2048", "2048x5632", "32000x2048")
COUNT_084B = {"2048x2048": 32, "256x2048": 32, "5632x2048": 32, "2048x5632": 16, "32000x2048": 2}  # 16 layers
METHODS = ("task_arithmetic", "tsv_m", "iso_c", "iso_cts", "knots", "wudi_exact", "wudi")
DECOMPOSITIONS = ("svd", "eigh", "pinv")


class Timer:
    """Adds up the wall time spent inside torch.linalg's decompositions while active."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._saved: dict[str, object] = {}

    def __enter__(self) -> Timer:
        for name in DECOMPOSITIONS:
            fn = getattr(torch.linalg, name)
            self._saved[name] = fn

            def wrapped(*a, _fn=fn, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    self.seconds += time.perf_counter() - t0

            setattr(torch.linalg, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(torch.linalg, name, fn)


ADAM_LIMIT = 2.5e10  # m·n² above which WUDI's 300 Adam steps are timed as 10 and scaled (printed "est.")


def merge_once(method: str, base: torch.Tensor, models: list[torch.Tensor],
               extra: dict | None = None) -> tuple[float, float]:
    name, extra = ("wudi", {"solver": "exact"}) if method == "wudi_exact" else (method, dict(extra or {}))
    m = get_method(name)
    params = {p.name: p.default_for("paper") for p in m.params if not p.per_model} | extra
    mparams = [{p.name: p.default_for("paper") for p in m.params if p.per_model} for _ in models]
    with Timer() as timer:
        t0 = time.perf_counter()
        m(base, models, mparams, params)
        wall = time.perf_counter() - t0
    return wall, timer.seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    rows = []
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.experts} experts")
    print(f"{'shape':>11} {'method':<16} {'wall s':>8} {'decomp s':>9} {'rest s':>7} {'I/O @1GB/s':>10} {'x I/O':>7}")
    for shape in args.shapes.split(","):
        m, n = (int(x) for x in shape.split("x"))
        base = torch.randn(m, n, generator=gen) * 0.02
        models = [base + torch.randn(m, n, generator=gen) * 2e-4 for _ in range(args.experts)]
        io = (args.experts + 2) * m * n * 2 / 1e9  # bf16 inputs read, one bf16 output written
        for method in args.methods.split(","):
            scale, extra = 1.0, {}
            if method == "wudi" and m * n * n > ADAM_LIMIT:
                scale, extra = 30.0, {"iterations": 10}
            runs = [merge_once(method, base, models, extra) for _ in range(args.repeat)]
            wall = statistics.median(r[0] for r in runs) * scale
            dec = statistics.median(r[1] for r in runs)
            rows.append({"shape": shape, "method": method, "wall": wall, "decompositions": dec, "io_floor": io,
                         "estimated": scale != 1.0})
            print(f"{shape:>11} {method:<16} {wall:8.2f} {dec:9.2f} {wall - dec:7.2f} {io:10.3f} {wall / io:7.0f}"
                  + ("  est. from 10 steps" if scale != 1.0 else ""), flush=True)
    totals = {}
    for method in args.methods.split(","):
        got = {r["shape"]: r for r in rows if r["method"] == method}
        if set(COUNT_084B) <= set(got):
            totals[method] = {k: sum(COUNT_084B[s] * got[s][k] for s in COUNT_084B) for k in ("wall", "decompositions",
                                                                                           "io_floor")}
            t = totals[method]
            print(f"0.84B model, {method}: {t['wall']:.0f} s of merging ({t['decompositions']:.0f} s in "
                  f"decompositions), I/O floor {t['io_floor']:.1f} s at 1 GB/s: x{t['wall'] / t['io_floor']:.0f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.date.today().isoformat()}-{socket.gethostname()}-svd-methods.json"
    out.write_text(json.dumps({"argv": argv, "threads": torch.get_num_threads(), "experts": args.experts,
                               "torch": torch.__version__, "rows": rows,
                               "model_0.84B": totals}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
