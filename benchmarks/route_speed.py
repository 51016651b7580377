"""What routing costs at inference, beside the base model, one LoRA adapter and PEFT's Arrow.

Usage (from the repository root)::

    python -m benchmarks.route_speed                 # SmolLM2-135M, rank-8 experts on all 7 projections
    python -m benchmarks.route_speed --tiny          # a small random Llama (a quick check of the script)

Each configuration runs in its own process (started through :mod:`moerge.measure`'s launcher, so its peak
RSS is its own): the model is built, warmed up, then forward passes over batches of 64-token sequences are
timed (``--reps`` each, median), at batch 1 and 16. Configurations:

* ``base``: the base model; ``merged``: one adapter merged into it (the same cost as the base, by
  construction: a check of the harness); ``lora``: one unmerged PEFT LoRA adapter;
* ``peft-arrow-E``: PEFT 0.21 ``create_arrow_model`` over E experts, top-2;
* ``arrow-E``, ``phatgoose-E``, ``smear-E``: moerge's routed layers over E experts (Arrow |x·p| top-2,
  PHATGOOSE LN-corr top-2, SMEAR per-sequence mean, all experts); router rows are what the router's own
  construction gives (Arrow) or random (their values do not change the cost).

Rounds alternate the order of the configurations, so a machine that is busy part of the time slows each
of them alike; the JSON keeps every round. One-time costs are timed too: Arrow's prototypes (moerge's
exact SVD for every module, PEFT's power iteration on its first forward), PHATGOOSE gate training per
step, LoraHub's objective per evaluation. Writes ``benchmarks/results/<date>-<host>-route-speed.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / "cache" / "route"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SEQ = 64


def prepare(tiny: bool, experts: int) -> tuple[Path, list[Path]]:
    """The base model and ``experts`` random rank-8 adapters with a decaying spectrum (built once)."""
    from moerge.testing import make_bpe_tokenizer, make_llama, make_lora

    root = CACHE / ("tiny" if tiny else "smollm2")
    if tiny:
        base = root / "base"
        if not (base / "config.json").exists():
            tok = make_bpe_tokenizer(base, ["the weather today is sunny and warm"] * 50 + ["Example 1 2 3"] * 50)
            make_llama(base, hidden=128, intermediate=384, layers=4, heads=4, kv_heads=2, vocab=len(tok))
    else:
        from moerge.evaluation.models import pretrained_path

        base = pretrained_path("decoder")
    adapters = []
    for e in range(experts):
        path = root / f"expert-{e}"
        if not (path / "adapter_config.json").exists():
            make_lora(base, path, seed=e + 1, rank=8, alpha=16, targets=TARGETS, std=0.02, decay=0.7)
        adapters.append(path)
    return base, adapters


def build(config: str, base: Path, adapters: list[Path]) -> tuple[Any, dict[str, float]]:
    """The model of one configuration (eval mode) and its one-time costs in seconds."""
    import torch
    from peft import ArrowConfig, PeftModel, create_arrow_model
    from transformers import AutoModelForCausalLM

    import moerge
    from moerge.routing.layer import routed_layers

    kind, _, n = config.partition("-")
    n_experts = int(n.rsplit("-", 1)[-1]) if n else 1
    once: dict[str, float] = {}
    load = lambda: AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)  # noqa: E731
    if kind in ("base", "merged", "lora"):
        model = load()
        if kind != "base":
            model = PeftModel.from_pretrained(model, str(adapters[0]))
            if kind == "merged":
                model = model.merge_and_unload()
        return model.eval(), once
    if config.startswith("peft-arrow"):
        cfg = ArrowConfig(top_k=2, router_temperature=1.0, rng_seed=0)
        model = create_arrow_model(load(), [str(a) for a in adapters[:n_experts]], cfg).eval()
        ids = torch.zeros(1, 4, dtype=torch.long)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids)  # PEFT builds its prototypes on the first forward
        once["prototypes_s"] = time.perf_counter() - t0
        return model, once
    bundle = CACHE / "bundles" / f"{base.name}-{config}"
    t0 = time.perf_counter()  # every routed configuration starts from the same bundle; its router is swapped
    moerge.route("arrow", base, adapters[:n_experts], bundle, top_k=2, force=True)
    once["bundle_s"] = time.perf_counter() - t0
    options = None
    if kind != "arrow":
        from moerge.routing.layer import RouterOptions

        options = RouterOptions(score="ln_corr", top_k=2, renorm_eps=1e-6) if kind == "phatgoose" else \
            RouterOptions(score="ln_dot", top_k=n_experts, granularity="example")
    model = moerge.load_routed(bundle, options=options) if options else moerge.load_routed(bundle)
    if kind != "arrow":
        g = torch.Generator().manual_seed(0)
        for layer in routed_layers(model).values():
            layer.router_rows.copy_(torch.randn(layer.router_rows.shape, generator=g))
    return model, once


def time_forward(model: Any, vocab: int, batch: int, reps: int) -> float:
    import torch

    ids = torch.randint(0, vocab, (batch, SEQ), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    times = []
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def one(config: str, tiny: bool, reps: int, out: Path) -> None:
    """Child process: build one configuration, time it, write its JSON."""
    import torch

    base, adapters = prepare(tiny, 8)
    model, once = build(config, base, adapters)
    vocab = model.config.vocab_size
    rec: dict[str, Any] = {"config": config, "once": once, "threads": torch.get_num_threads()}
    for batch in (1, 16):
        sec = time_forward(model, vocab, batch, reps if batch == 16 else 3 * reps)
        rec[f"b{batch}_s"] = sec
        rec[f"b{batch}_tok_s"] = batch * SEQ / sec
    out.write_text(json.dumps(rec))


def one_time_costs(tiny: bool) -> dict[str, float]:
    """Arrow's exact prototypes for 8 experts, a PHATGOOSE gate-training step, a LoraHub evaluation."""
    import torch

    from moerge.routing.arrow import arrow_rows
    from moerge.routing.build import base_model
    from moerge.routing.data import Sample
    from moerge.routing.experts import ExpertSet
    from moerge.routing.layer import RouterOptions
    from moerge.routing.load import attach_experts
    from moerge.routing.lorahub import HubSettings, objective
    from moerge.routing.phatgoose import GateSettings, train_gates

    base, adapters = prepare(tiny, 8)
    samples = [Sample(f"Example {i}: the weather today is", " sunny") for i in range(16)]
    out: dict[str, float] = {}
    with ExpertSet(base, adapters) as experts:
        t0 = time.perf_counter()
        for m in experts.modules:
            arrow_rows(experts.factors(m))
        out["arrow_prototypes_8_experts_s"] = time.perf_counter() - t0
        model, tok = base_model(base)
        factors = {m: experts.factors(m)[0] for m in experts.modules}
        steps = 3
        t0 = time.perf_counter()
        train_gates(model, tok, factors, samples, GateSettings(steps=steps, batch_size=8))
        out["phatgoose_gate_step_batch8_s"] = (time.perf_counter() - t0) / steps
        out["phatgoose_gates_per_expert_100_steps_s"] = 100 * out["phatgoose_gate_step_batch8_s"]
        attach_experts(model, experts, 8, {m: torch.zeros(8, experts.base.info(m + ".weight").shape[1])
                                           for m in experts.modules}, RouterOptions(top_k=8))
        t0 = time.perf_counter()
        for _ in range(3):
            objective(model, tok, samples[:5], torch.full((8,), 0.1), HubSettings())
        out["lorahub_evaluation_5_examples_s"] = (time.perf_counter() - t0) / 3
        out["lorahub_search_40_evaluations_s"] = 40 * out["lorahub_evaluation_5_examples_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="A small random Llama instead of SmolLM2-135M.")
    ap.add_argument("--reps", type=int, default=5, help="Timed forwards at batch 16 (3x at batch 1).")
    ap.add_argument("--rounds", type=int, default=2, help="Passes over all configurations (alternating order).")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.one:
        one(args.one, args.tiny, args.reps, Path(args.out))
        return 0
    from moerge.measure import run_measured

    prepare(args.tiny, 8)
    configs = ["base", "merged", "lora"] + [f"{k}-{e}" for e in (4, 8) for k in ("peft-arrow", "arrow",
                                                                                  "phatgoose", "smear")]
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for config in configs if r % 2 == 0 else configs[::-1]:
            tmp = CACHE / f"result-{config}.json"
            cmd = [sys.executable, "-m", "benchmarks.route_speed", "--one", config, "--out", str(tmp),
                   "--reps", str(args.reps)] + (["--tiny"] if args.tiny else [])
            m = run_measured(cmd, cwd=Path(__file__).resolve().parent.parent, log=CACHE / f"log-{config}.txt")
            if m["rc"] != 0:
                print(f"{config}: failed (see {CACHE / f'log-{config}.txt'})")
                continue
            rec = json.loads(tmp.read_text()) | {"round": r, "rss_mib": m["rss_mib"], "anon_mib": m["anon_mib"]}
            rounds.append(rec)
            print(f"  round {r} {config:<14} b1 {rec['b1_tok_s']:8.1f} tok/s  b16 {rec['b16_tok_s']:8.1f} tok/s",
                  flush=True)
    summary = {}
    for config in configs:
        recs = [x for x in rounds if x["config"] == config]
        if recs:
            summary[config] = {k: statistics.median(x[k] for x in recs)
                               for k in ("b1_s", "b16_s", "b1_tok_s", "b16_tok_s", "rss_mib", "anon_mib")}
            summary[config]["once"] = recs[0]["once"]
    once = one_time_costs(args.tiny)
    lora16 = summary.get("lora", {}).get("b16_s")
    print(f"\n{'config':<14} {'b1 tok/s':>9} {'b16 tok/s':>10} {'b16 × lora':>11} {'peak RSS':>9}")
    for config, s in summary.items():
        ratio = f"{s['b16_s'] / lora16:10.2f}x" if lora16 else ""
        print(f"{config:<14} {s['b1_tok_s']:9.1f} {s['b16_tok_s']:10.1f} {ratio:>11} {s['rss_mib']:7.0f} MiB")
    for e in (4, 8):
        if f"arrow-{e}" in summary and f"peft-arrow-{e}" in summary:
            for b in ("b1", "b16"):
                print(f"moerge Arrow / PEFT Arrow, {e} experts, {b}: "
                      f"{summary[f'peft-arrow-{e}'][b + '_s'] / summary[f'arrow-{e}'][b + '_s']:.2f}x faster")
    print("one-time: " + ", ".join(f"{k} {v:.3g}" for k, v in once.items()))
    RESULTS.mkdir(exist_ok=True)
    name = f"{datetime.date.today().isoformat()}-{socket.gethostname()}-route-speed{'-tiny' if args.tiny else ''}.json"
    (RESULTS / name).write_text(json.dumps({"argv": argv or sys.argv[1:], "seq": SEQ, "summary": summary,
                                            "one_time": once, "rounds": rounds}, indent=1))
    print(f"wrote {RESULTS / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
