"""The evaluation's commands: ``moerge zoo``, ``eval``, ``sweep``, ``compare`` and ``report``.

Only click is imported here; torch and transformers load inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from moerge.cli._common import ProgressBar, run_offline

ZOO_HELP = "Zoo folder (default: $MOERGE_CACHE/zoo, i.e. ~/.cache/moerge/zoo)."


def _zoo_dir(zoo: str | None) -> Path:
    from moerge.evaluation.models import default_cache

    return Path(zoo) if zoo else default_cache() / "zoo"


def training_bar(quiet: bool) -> ProgressBar:
    """A bar per expert being trained; without a terminal, one line per expert when it is done."""
    return ProgressBar(quiet, on_done=lambda label, total, info: click.echo(
        f"{label}: {total} steps" + (f", {info}" if info else ""), err=True))


@click.group()
def zoo() -> None:
    """Build and list the expert zoo: real pretrained models fine-tuned on each task of a suite.

    \b
    Examples:
      moerge zoo build text --track encoder               MiniLM experts (full fine-tuning)
      moerge zoo build text --track encoder --kind lora   LoRA adapters (PEFT layout)
      moerge zoo build text --track decoder --multitask   SmolLM2 experts and the multitask oracle
      moerge zoo list
    """


@zoo.command("build")
@click.argument("suite")
@click.option("--track", type=click.Choice(["encoder", "decoder"]), default="encoder", show_default=True,
              help="encoder: all-MiniLM-L6-v2 with one head per task; decoder: SmolLM2-135M, label words.")
@click.option("--kind", type=click.Choice(["full", "lora"]), default="full", show_default=True,
              help="Full fine-tuning, or LoRA adapters saved in PEFT's layout.")
@click.option("--zoo", "zoo_dir", default=None, help=ZOO_HELP)
@click.option("--tasks", default=None, help="Comma-separated tasks (default: every task of the suite).")
@click.option("--multitask", is_flag=True, help="Also train one model on all held-in tasks (the oracle).")
@click.option("--rebuild", is_flag=True, help="Retrain the experts of --tasks (and the oracle, with --multitask) even if built (the old one is "
              "replaced when the new one is complete). Without it, an expert built with other settings is an error.")
@click.option("--examples", type=int, default=None, help="Training examples per task (track default).")
@click.option("--epochs", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--max-length", type=int, default=None, help="Tokens per input (longer inputs keep their end).")
@click.option("--seed", type=int, default=None)
@click.option("--weight-decay", type=float, default=None, help="AdamW weight decay.")
@click.option("--head-l2", type=float, default=None,
              help="Encoder: L2 penalty of the linear probe each task head starts from.")
@click.option("--lora-rank", type=int, default=None)
@click.option("--lora-dropout", type=float, default=None)
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def zoo_build(ctx: click.Context, suite: str, track: str, kind: str, zoo_dir: str | None, tasks: str | None,
              multitask: bool, rebuild: bool, quiet: bool, **overrides: Any) -> None:
    """Fine-tune one expert per task of SUITE (skipping experts already built).

    \b
    Each expert is written to ZOO/<track>/<kind>/<task>/ with moerge_expert.json
    (data hashes, settings, training time, validation accuracy of the expert and
    of the pretrained model). Interrupt at any time: the next run resumes at the
    first missing expert. An expert already built with other settings than those
    asked for stops the build (add --rebuild to retrain it). Defaults (per track
    and kind) are in moerge.evaluation.train.DEFAULTS.
    """

    def body() -> None:
        from moerge.evaluation.zoo import build_zoo

        root = _zoo_dir(zoo_dir)
        with training_bar(quiet) as bar:
            metas = build_zoo(suite, root, track=track, kind=kind, multitask=multitask, rebuild=rebuild,
                              tasks=tasks.split(",") if tasks else None,
                              report=lambda label, step, total, loss: bar.update(label, step, total, f"loss {loss:.4f}"),
                              **overrides)
        _print_experts(metas)
        click.echo(f"zoo: {root / track / kind}")

    run_offline(ctx, body)


def _print_experts(metas: list[dict[str, Any]]) -> None:
    click.echo(f"{'expert':<18} {'kind':<5} {'seconds':>8} {'seq/s':>6}  validation accuracy (pretrained → expert)")
    for m in metas:
        name = "multitask" if m["role"] == "multitask" else m["tasks"][0]
        acc = ", ".join(f"{t} {m['validation_pretrained'][t]:.3f} → {m['validation'][t]:.3f}" for t in m["tasks"])
        click.echo(f"{name:<18} {m['kind']:<5} {m['seconds']:>8.1f} {m['log']['sequences_per_second'] or 0:>6.1f}  {acc}")


@zoo.command("list")
@click.option("--zoo", "zoo_dir", default=None, help=ZOO_HELP)
@click.pass_context
def zoo_list(ctx: click.Context, zoo_dir: str | None) -> None:
    """Every expert of the zoo, with its training time and validation accuracy."""

    def body() -> None:
        from moerge.evaluation.zoo import list_experts

        root = _zoo_dir(zoo_dir)
        for track in ("encoder", "decoder"):
            for kind in ("full", "lora"):
                metas = list(list_experts(root, track, kind).values())
                if metas:
                    click.secho(f"\n{track} / {kind}  ({root / track / kind})", bold=True)
                    _print_experts(metas)

    run_offline(ctx, body)


def _experiment(suite: str, track: str, kind: str, zoo_dir: str | None, results: str, val_limit: int | None,
                test_limit: int | None, quiet: bool) -> Any:
    from moerge.evaluation.experiment import Experiment

    return Experiment(suite, track, kind, zoo=_zoo_dir(zoo_dir), results=Path(results), val_limit=val_limit,
                      test_limit=test_limit, log=(lambda s: None) if quiet else (lambda s: click.echo(s)))


def _common(f: Any) -> Any:
    opts = [
        click.option("--suite", default="text", show_default=True, help="Task suite (held-in and held-out tasks)."),
        click.option("--track", type=click.Choice(["encoder", "decoder"]), default="encoder", show_default=True),
        click.option("--kind", type=click.Choice(["full", "lora"]), default="full", show_default=True,
                     help="Which experts of the zoo are merged."),
        click.option("--zoo", "zoo_dir", default=None, help=ZOO_HELP),
        click.option("--results", default="results", show_default=True, help="Folder of result records."),
        click.option("--val-limit", type=int, default=None, help="Examples per task on validation (default: all)."),
        click.option("--test-limit", type=int, default=None, help="Examples per task on test (default: all)."),
        click.option("-q", "--quiet", is_flag=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.command("eval")
@click.argument("model")
@_common
@click.option("--split", type=click.Choice(["validation", "test"]), default="test", show_default=True)
@click.option("--name", default=None, help="Name of the row in the results (default: the folder or recipe name).")
@click.option("--no-baselines", is_flag=True, help="Score MODEL alone (no rows for the pretrained model, the "
              "experts and the oracle).")
@click.pass_context
def eval_cmd(ctx: click.Context, model: str, suite: str, track: str, kind: str, zoo_dir: str | None, results: str,
             val_limit: int | None, test_limit: int | None, quiet: bool, split: str, name: str | None,
             no_baselines: bool) -> None:
    """Score MODEL (a model folder, a LoRA adapter folder, or a merge recipe) on every task of a suite.

    \b
    A recipe is merged first (in its own process; wall time and peak memory are
    recorded). Prints per-task accuracy, accuracy normalised by each task's
    fine-tuned expert, and the held-in / held-out means, in a table next to
    the baselines of the zoo on the same split: the pretrained model, each
    expert and the multitask oracle when built. Appends records to RESULTS for
    `moerge report`. Scores are cached by model content: the baselines cost
    their scoring once.
    Example:
      moerge eval ./merged --track decoder
      moerge eval recipe.yaml --track encoder --split validation
    """

    def body() -> None:
        import yaml

        from moerge.evaluation.experiment import _line
        from moerge.evaluation.report import text_table
        from moerge.recipe import load_recipe

        path = Path(model)
        is_recipe = path.is_file() and path.suffix in (".yaml", ".yml")
        loaded = load_recipe(path) if is_recipe else None  # recipe errors, with their line, before anything runs
        exp = _experiment(suite, track, kind, zoo_dir, results, val_limit, test_limit, quiet)
        if loaded is not None:
            r = loaded.recipe
            experts = [m.model for m in r.models] if r.models else [s.model for sl in r.slices or [] for s in sl.sources]
            out, cost = exp.merge(yaml.safe_load(loaded.text or path.read_text()))
            rec = exp.record(name or path.stem, "merge", out, split, method=r.method, params=dict(r.parameters),
                             experts=list(dict.fromkeys(experts)), **cost)
        else:
            rec = exp.record(name or path.name, "model", path, split)
        click.echo(_line(rec))
        rows = [] if no_baselines else exp.baselines(split)
        click.echo("\n" + text_table(rows + [rec], suite))
        norm = ", ".join(f"{t} {n:.3f}" for t, n in rec["normalized"].items())
        click.echo(f"{split} split; * held-out task. {rec['name']}, normalised by each task's expert: {norm}")

    run_offline(ctx, body)


@click.command("sweep")
@click.argument("method")
@_common
@click.option("--grid", "grid_items", multiple=True, help="name=v1,v2,... (repeatable); default: the built-in grid.")
@click.pass_context
def sweep_cmd(ctx: click.Context, method: str, suite: str, track: str, kind: str, zoo_dir: str | None, results: str,
              val_limit: int | None, test_limit: int | None, quiet: bool, grid_items: tuple[str, ...]) -> None:
    """Choose METHOD's values on the validation splits of the held-in tasks (never on test).

    \b
    Merges the zoo's held-in experts at every grid point, scores each merge on
    held-in validation, and prints the best by mean normalised accuracy.
    Example:
      moerge sweep ties --grid density=0.2,0.5 --grid lambda=0.5,1.0
    """

    def body() -> None:
        from moerge.evaluation.experiment import GRIDS

        grid: dict[str, list[Any]] = {}
        for item in grid_items:
            key, _, values = item.partition("=")
            grid[key.strip()] = [_number(v) for v in values.split(",") if v.strip()]
        exp = _experiment(suite, track, kind, zoo_dir, results, val_limit, test_limit, quiet)
        best, _ = exp.sweep(method, grid or GRIDS["full"].get(method, {}))
        click.echo(f"best on validation: {method} {best}")

    run_offline(ctx, body)


def _number(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.strip().lower(), v.strip())


@click.command("compare")
@_common
@click.option("--methods", default=None, help="Comma-separated methods (default: every method of the grid: the data-free ones, then "
              "fisher, regmean and mats, which first compute each expert's statistics once, cached in the zoo). "
              "METHOD@STATISTIC picks another statistic, e.g. mats@gram (MaTS with the RegMean objective).")
@click.option("--grid", type=click.Choice(["full", "small"]), default="full", show_default=True,
              help="Values tried per method on validation (`small` for the slow decoder track).")
@click.option("--no-curve", is_flag=True, help="Skip merges of 2 … N−1 experts.")
@click.option("--baselines-only", is_flag=True, help="Score only the pretrained model, each expert and the "
              "multitask oracle (e.g. after building the oracle); no merge.")
@click.pass_context
def compare_cmd(ctx: click.Context, suite: str, track: str, kind: str, zoo_dir: str | None, results: str,
                val_limit: int | None, test_limit: int | None, quiet: bool, methods: str | None, grid: str,
                no_curve: bool, baselines_only: bool) -> None:
    """The whole comparison: baselines, a validation sweep per method, its test result, the expert-count curve.

    \b
    Then `moerge report RESULTS` draws it. Examples (the README has the exact
    commands of its tables):
      moerge compare --track encoder --grid small
      moerge compare --track encoder --kind lora --grid small --no-curve
      moerge compare --track decoder --grid small --val-limit 60 --test-limit 150
      moerge report results
    """

    def body() -> None:
        exp = _experiment(suite, track, kind, zoo_dir, results, val_limit, test_limit, quiet)
        chosen = [] if baselines_only else methods.split(",") if methods else None
        exp.compare(chosen, grid=grid, curve=not no_curve)
        click.echo(f"records in {Path(results) / 'records'}; next: moerge report {results}")

    run_offline(ctx, body)


@click.command("report")
@click.argument("results", default="results")
@click.option("--out", default=None, help="Where to write report.html and the PNGs (default: RESULTS).")
@click.pass_context
def report_cmd(ctx: click.Context, results: str, out: str | None) -> None:
    """Write RESULTS/report.html (self-contained) and PNG figures from the records of RESULTS."""

    def body() -> None:
        from moerge.evaluation.report import write_report

        click.echo(f"wrote {write_report(results, out, warn=lambda m: click.echo(f'warning: {m}', err=True))}")

    run_offline(ctx, body)


COMMANDS = [zoo, eval_cmd, sweep_cmd, compare_cmd, report_cmd]
