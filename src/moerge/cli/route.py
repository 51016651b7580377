"""``moerge route``: build routed bundles over LoRA experts, and look inside them."""

from __future__ import annotations

import json
from pathlib import Path

import click

from moerge.cli._common import run, run_offline
from moerge.cli.evaluation import _common, _experiment


@click.group("route")
def route() -> None:
    """Route among LoRA experts instead of merging them (MoErging).

    \b
    A routed bundle is a folder: moerge_routing.json (every option), router.safetensors (one router row
    per expert and module) and experts/ (the PEFT adapters, unchanged). `moerge eval BUNDLE --task T`
    scores it like any model; `moerge.load_routed(BUNDLE)` gives a transformers model.
    Examples:
      moerge route arrow BASE bbc/ tweets/ debates/ --out routed/ --top-k 2
      moerge route inspect routed/
      moerge route derive routed/ --drop tweets --out routed-3/
    """


@route.command("arrow")
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--top-k", type=int, default=3, show_default=True,
              help="Experts mixed per token (PEFT's default 3; more than the experts = all).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Softmax temperature.")
@click.option("--mix", type=click.Choice(["outputs", "parameters"]), default="outputs", show_default=True,
              help="outputs: Σ w·ΔW·x (PEFT); parameters: (Σ w·B)(Σ w·A)·x per token (mttl's default).")
@click.option("--score", type=click.Choice(["abs_dot", "abs_cos"]), default="abs_dot", show_default=True,
              help="abs_dot: |x·p| on the raw input (PEFT and mttl); abs_cos: |x·p|/‖x‖.")
@click.option("--gks", type=click.Choice(["none", "exact", "factors"]), default="none", show_default=True,
              help="GenKnowSub with --general adapters: exact subtracts their mean ΔW; factors their mean A "
              "and mean B (PEFT's code).")
@click.option("--general", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A general-knowledge adapter for GenKnowSub (repeat the option).")
@click.option("--extract-rank", type=int, default=None,
              help="Route full fine-tuned experts through their rank-R LoRA extraction (energy kept recorded).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.pass_context
def arrow(ctx: click.Context, base: str, adapters: tuple[str, ...], out: str, top_k: int, temperature: float,
          mix: str, score: str, gks: str, general: tuple[str, ...], extract_rank: int | None, force: bool) -> None:
    """Arrow: route each token by |x·p| to the experts whose prototype p (the top right singular vector of
    the expert's ΔW, computed exactly) it aligns with; top-k, softmax with temperature.

    ADAPTERS are PEFT LoRA folders trained on BASE (or full fine-tunes, with --extract-rank)."""

    def body() -> None:
        from moerge.api import route as build

        path = build("arrow", base, list(adapters), out, top_k=top_k, temperature=temperature, mix=mix,
                     score=score, gks=gks, general=list(general), extract_rank=extract_rank, force=force)
        click.echo(f"arrow: {len(adapters)} experts, top-{top_k}; wrote {path}")

    run(ctx, body)


def _trained(name: str, summary: str):  # the two routers learned from each expert's data
    @route.command(name, help=summary)
    @click.argument("base", type=click.Path(exists=True, file_okay=False))
    @click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
    @click.option("--data", "data", multiple=True, required=True,
                  help="Each expert's own data, one per adapter in order: a task name (its train split) or a "
                  'JSONL file of {"prompt": ..., "target": ...} rows (repeat the option).')
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
    @click.option("--examples", type=int, default=None, help="At most this many examples per expert.")
    @click.option("--top-k", type=int, default=None,
                  help="Experts mixed per token (default: phatgoose and avg_act 2, smear all).")
    @click.option("--renorm-eps", type=float, default=None,
                  help="Softmax over all experts, top-k, w/(Σw + eps) as PHATGOOSE's reference (its default "
                  "1e-6); 0 = softmax over the top-k logits (mttl).")
    @click.option("--steps", type=int, default=100, show_default=True, help="Training steps (gates, router).")
    @click.option("--lr", type=float, default=5e-3, show_default=True, help="AdamW learning rate.")
    @click.option("--batch-size", type=int, default=8, show_default=True,
                  help="Sequences per step (the reference: 1024 = 32 x 32 accumulation on T5-XL).")
    @click.option("--accumulate", type=int, default=1, show_default=True, help="Batches per step.")
    @click.option("--schedule", type=click.Choice(["constant", "linear"]), default="constant", show_default=True,
                  help="Constant after warm-up (PHATGOOSE's reference) or linear decay (mttl).")
    @click.option("--warmup", type=float, default=0.06, show_default=True, help="Warm-up share of the steps.")
    @click.option("--seed", type=int, default=0, show_default=True, help="Data order (and SMEAR's init).")
    @click.option("--expert-dropout", type=float, default=0.1, show_default=True,
                  help="smear: drop each expert's weight with this probability in training (the reference).")
    @click.option("--extract-rank", type=int, default=None, help="Route full fine-tunes through their rank-R "
                  "LoRA extraction.")
    @click.option("--force", is_flag=True, help="Replace --out if it exists.")
    @click.option("-q", "--quiet", is_flag=True)
    @click.pass_context
    def command(ctx: click.Context, base: str, adapters: tuple[str, ...], data: tuple[str, ...], out: str,
                examples: int | None, top_k: int, renorm_eps: float, steps: int, lr: float, batch_size: int,
                accumulate: int, schedule: str, warmup: float, seed: int, expert_dropout: float,
                extract_rank: int | None, force: bool, quiet: bool) -> None:
        def body() -> None:
            from moerge.api import route as build
            from moerge.cli.evaluation import training_bar
            from moerge.routing.phatgoose import GateSettings

            sources = [part for d in data for part in ([d] if Path(d).exists() else d.split(","))]
            gates = GateSettings(steps=steps, lr=lr, warmup=warmup, schedule=schedule, batch_size=batch_size,
                                 accumulate=accumulate, seed=seed, expert_dropout=expert_dropout)
            with training_bar(quiet) as bar:
                path = build(name, base, list(adapters), out, data=sources, examples=examples, top_k=top_k,
                             renorm_eps=renorm_eps, gates=gates, extract_rank=extract_rank, force=force,
                             progress=lambda expert, k, n, loss: bar.update(f"{name} {expert}", k, n,
                                                                            f"loss {loss:.3f}"))
            click.echo(f"{name}: {len(adapters)} experts; wrote {path}")

        run_offline(ctx, body)

    return command


phatgoose = _trained("phatgoose", """PHATGOOSE: train a gate vector per expert and module on that expert's own
data (everything else frozen, one expert at a time, resumable), then route each token by
LN(x)·LN(v)/√d, top-k, renormalised.

\b
Example:
  moerge route phatgoose BASE bbc/ tweets/ --data bbc --data tweets --out routed/ --steps 100""")
avg_act = _trained("avg_act", """Average activation (PHATGOOSE's baseline): each expert's router row is the mean
input of the module over that expert's data; routed like PHATGOOSE (training options unused).""")
smear = _trained("smear", """SMEAR over frozen experts: a router per module, trained on the union of the
experts' data (everything else frozen), that averages the experts' ΔW once per sequence, from the mean
module input over its tokens so far.""")


@route.command("lorahub")
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, help="The new task's few examples: a task name (its train split's first "
              '--examples) or a JSONL file of {"prompt": ..., "target": ...} rows.')
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Adapter folder to write.")
@click.option("--examples", type=int, default=5, show_default=True, help="Few-shot examples used.")
@click.option("--budget", type=int, default=40, show_default=True, help="Objective evaluations (NGOpt's budget).")
@click.option("--l1", type=float, default=0.05, show_default=True, help="Weight of the mean |w| penalty (mttl: 0).")
@click.option("--loss", type=click.Choice(["reference", "mean"]), default="reference", show_default=True,
              help="reference: Σ batch-mean CE / examples, as sail-sg/lorahub; mean: mean CE per example.")
@click.option("--bound", type=float, default=1.5, show_default=True, help="Weights searched in [-bound, bound].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def lorahub(ctx: click.Context, base: str, adapters: tuple[str, ...], data: str, out: str, examples: int,
            budget: int, l1: float, loss: str, bound: float, seed: int, force: bool, quiet: bool) -> None:
    """LoraHub: find weights for ADAPTERS on a few examples of a new task, gradient-free (nevergrad NGOpt),
    and write ONE plain PEFT adapter whose ΔW is Σ wᵢ·ΔWᵢ exactly (rank Σ rᵢ).

    \b
    Example:
      moerge route lorahub BASE bbc/ tweets/ debates/ --data rotten_tomatoes --out hub/"""

    def body() -> None:
        from moerge.api import lorahub as run_hub
        from moerge.cli.evaluation import training_bar
        from moerge.routing.lorahub import HubSettings

        settings = HubSettings(budget=budget, bound=bound, l1=l1, loss=loss, seed=seed)
        with training_bar(quiet) as bar:
            path = run_hub(base, list(adapters), data, out, examples=examples, settings=settings, force=force,
                           progress=lambda k, n, best: bar.update("lorahub search", k, n, f"best {best:.4f}"))
        record = json.loads((Path(path) / "moerge_lorahub.json").read_text())
        weights = ", ".join(f"{k} {v:+.3f}" for k, v in record["weights"].items())
        click.echo(f"lorahub: weights {weights}; objective {record['search']['objective']:.4f} "
                   f"(at w = 0: {record['search']['objective_at_zero']:.4f}); wrote {path}")

    run_offline(ctx, body)


@route.command("derive")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--keep", default=None, help="Comma-separated experts to keep, in order (default: all).")
@click.option("--drop", default=None, help="Comma-separated experts to leave out.")
@click.option("--top-k", type=int, default=None, help="Another top-k.")
@click.option("--temperature", type=float, default=None, help="Another softmax temperature.")
@click.option("--mix", type=click.Choice(["outputs", "parameters"]), default=None, help="Another mixing.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.pass_context
def derive(ctx: click.Context, bundle: str, out: str, keep: str | None, drop: str | None, top_k: int | None,
           temperature: float | None, mix: str | None, force: bool) -> None:
    """A new bundle from BUNDLE without training or computing anything again: a subset of its experts
    (Arrow, PHATGOOSE and average-activation rows belong to one expert each, so removing an expert keeps
    the others' rows; SMEAR's jointly trained router is refused) and/or other router options.

    \b
    Example (leave one expert out, route top-1):
      moerge route derive routed/ --drop tweets --top-k 1 --out routed-no-tweets/"""

    def body() -> None:
        from moerge.api import derive_routed

        path = derive_routed(bundle, out, keep=keep.split(",") if keep else None,
                             drop=drop.split(",") if drop else None, top_k=top_k, temperature=temperature,
                             mix=mix, force=force)
        click.echo(f"derived {path} from {bundle}")

    run_offline(ctx, body)


@route.command("compare")
@_common
@click.option("--routers", default=None, help="Comma-separated routers and baselines to score (default: all of "
              "arrow, phatgoose, avg_act, smear, retrieval, oracle, lorahub).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds of the trained routers (one record each).")
@click.option("--steps", type=int, default=100, show_default=True, help="Training steps of gates and routers.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--loto-seeds", default=None, help="Seeds of SMEAR in the leave-one-task-out folds, where it trains "
              "again on every fold (default: --seeds).")
@click.option("--extract-rank", type=int, default=16, show_default=True,
              help="--kind full: route the full experts through their rank-R LoRA extraction.")
@click.option("--no-loto", is_flag=True, help="Skip the leave-one-task-out folds.")
@click.option("--no-held-in", is_flag=True, help="Skip the held-in setting.")
@click.pass_context
def compare(ctx: click.Context, suite: str, track: str, kind: str, zoo_dir: str | None, results: str,
            val_limit: int | None, test_limit: int | None, quiet: bool, routers: str, seeds: str, steps: int,
            batch_size: int, loto_seeds: str | None, extract_rank: int, no_loto: bool, no_held_in: bool) -> None:
    """Score routers among the zoo's experts beside the merges (decoder track): held-in without a task id
    (every task's test split), and leave one task out (route among the other experts, score the left-out
    task), with the merges of the other experts and LoraHub in each fold. Records go to RESULTS beside
    `moerge compare`'s; `moerge report RESULTS` draws the routing table and figures.

    \b
    Example (the README's routing table):
      moerge route compare --track decoder --kind lora --val-limit 60 --test-limit 150 --results results/text
    """

    def body() -> None:
        from moerge.evaluation.routing import ROUTERS, RoutingExperiment

        exp = _experiment(suite, track, kind, zoo_dir, results, val_limit, test_limit, quiet)
        names = [r for r in routers.split(",") if r] if routers else list(ROUTERS)
        rx = RoutingExperiment(exp, seeds=tuple(int(x) for x in seeds.split(",")), steps=steps,
                               batch_size=batch_size, extract_rank=extract_rank,
                               fold_seeds=tuple(int(x) for x in loto_seeds.split(",")) if loto_seeds else None)
        if not no_held_in:
            rx.held_in_setting(names)
        if not no_loto:
            rx.leave_one_out(names)
        click.echo(f"records in {Path(results) / 'records'}; next: moerge report {results}")

    run_offline(ctx, body)


@route.command("inspect")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.pass_context
def inspect(ctx: click.Context, bundle: str, as_json: bool) -> None:
    """Experts, routed modules, options and router statistics of a routed bundle."""

    def body() -> None:
        from moerge.routing.inspect import describe_bundle

        info = describe_bundle(bundle)
        if as_json:
            click.echo(json.dumps(info, indent=1))
            return
        click.echo(f"{info['folder']}: {info['method']} over {info['base']['path']}")
        click.echo(f"router: {json.dumps(info['router'])}; options: {json.dumps(info['method_options'])}")
        click.echo(f"{info['modules']} routed modules; experts:")
        for e, norm in zip(info["experts"], info["mean_row_norm_per_expert"] + [None] * len(info["experts"])):
            extra = f", mean router-row norm {norm:.3g}" if norm is not None and e["role"] == "task" else ""
            click.echo(f"  {e['name']:<24} {e['role']:<8} rank {e['rank']}{extra}  ({e['source']})")
        for name, x in info["build"].get("extracted", {}).items():
            click.echo(f"  {name}: rank-{x['rank']} extraction kept {x['energy_kept']:.1%} of ‖ΔW‖²")
        if info["row_similarity_per_layer"]:
            click.echo("mean |cos| between two experts' router rows, per layer (1 = indistinguishable):")
            click.echo("  " + "  ".join(f"{k}:{v:.2f}" for k, v in info["row_similarity_per_layer"].items()))

    run_offline(ctx, body)


COMMANDS = [route]
