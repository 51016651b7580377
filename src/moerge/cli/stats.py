"""``moerge stats``: the per-expert statistics that data-aware merges read."""

from __future__ import annotations

from pathlib import Path

import click

from moerge.cli._common import EXTERNAL_HELP, run_offline
from moerge.cli.evaluation import training_bar
from moerge.stats.format import KINDS


@click.command("stats")
@click.argument("kind", type=click.Choice(KINDS))
@click.argument("model")
@click.option("--data", required=True, help="A task name (its train split is used), or a JSONL file of "
              '{"text": ..., "label": ...} rows (then --task gives the prompt and labels).')
@click.option("--task", default=None, help="The task whose prompt and labels a JSONL file follows.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--track", type=click.Choice(["encoder", "decoder"]), default="decoder", show_default=True)
@click.option("--examples", type=int, default=256, show_default=True, help="At most this many examples.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="gram only (fisher, kfac: one by one).")
@click.option("--max-length", type=int, default=64, show_default=True)
@click.option("--estimator", type=click.Choice(["empirical", "true"]), default="empirical", show_default=True,
              help="fisher/kfac: the true label, or the expectation over labels under the model.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--allow-external-files", is_flag=True, help=EXTERNAL_HELP)
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def stats(ctx: click.Context, kind: str, model: str, data: str, task: str | None, out: str, track: str,
          examples: int, batch_size: int, max_length: int, estimator: str, force: bool,
          allow_external_files: bool, quiet: bool) -> None:
    """Compute KIND statistics of MODEL over data, for data-aware merges (RegMean, Fisher, MaTS).

    \b
    gram    input Gram matrix XᵀX/rows of every linear layer (RegMean)
    fisher  diagonal Fisher of every parameter, one example at a time (Fisher merging)
    kfac    K-FAC factors of every linear layer: input Gram and output-gradient Gram (MaTS)
    Written as safetensors (named after the model's weights) with moerge_stats.json: model hash and
    fingerprint, data hash, examples, estimator. Interrupt at any time: the running sums are saved
    about once a minute beside --out, and the same command continues from there. Example:
      moerge stats gram ~/.cache/moerge/zoo/decoder/full/bbc --data bbc --out stats/bbc-gram
    """

    def body() -> None:
        import json as _json

        from moerge.stats import StatsSettings, compute_stats

        texts = labels = None
        task_name = task
        path = Path(data)
        if path.is_file():
            rows = [_json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            texts = [r["text"] for r in rows]
            labels = [int(r["label"]) for r in rows] if rows and all("label" in r for r in rows) else None
        else:
            task_name = data
        with training_bar(quiet) as bar:
            meta = compute_stats(model, out, StatsSettings(kind, examples, batch_size, max_length, estimator),
                                 track=track, task=task_name, texts=texts, labels=labels, force=force,
                                 allow_external_files=allow_external_files,
                                 progress=lambda k, n: bar.update("examples" if kind != "gram" else "batches", k, n))
        click.echo(f"{kind}: {meta['tensors']} tensors from {meta['examples']} examples ({meta['rows']} rows) in "
                   f"{meta['seconds']:.1f} s; wrote {out}")

    run_offline(ctx, body)


COMMANDS = [stats]
