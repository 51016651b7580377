"""``moerge merge``, ``inspect``, ``diff``, ``methods``, ``demo`` and ``extract-lora``."""

from __future__ import annotations

import click

from moerge.cli._common import EXTERNAL_HELP, ProgressBar, run


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists (atomically, after the merge succeeds).")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard, in bytes (5GB, 500MB, 2GiB).")
@click.option("--device", default="cpu", show_default=True, help="Compute device: cpu, cuda, cuda:1 or auto.")
@click.option("--allow-pickle", is_flag=True, help="Allow PyTorch .bin inputs (loaded with weights_only=True).")
@click.option("--allow-external-files", is_flag=True, help=EXTERNAL_HELP)
@click.option("--allow-nonfinite", is_flag=True, help="Merge even if an input holds NaN or Inf.")
@click.option("--dry-run", is_flag=True, help="Validate the recipe and plan the merge; write nothing.")
@click.option("--lora-rank", type=int, default=None,
              help="Write the merge as a PEFT LoRA adapter of the base at this rank (truncated SVD per layer).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.pass_context
def merge(ctx: click.Context, recipe: str, out_dir: str, force: bool, shard_size: str, device: str,
          allow_pickle: bool, allow_external_files: bool, allow_nonfinite: bool, dry_run: bool,
          lora_rank: int | None, quiet: bool) -> None:
    """Merge the models named in RECIPE into OUT_DIR.

    \b
    OUT_DIR becomes a Hugging Face model directory: sharded safetensors with an
    index, config.json and tokenizer files from the base model, moerge_recipe.yaml
    and a model card. It appears only when complete. Every tensor is validated
    (presence, shape, dtype, parameters) before anything is written.
    Models may be PEFT LoRA adapter folders (read as base + scale·B·A); with
    --lora-rank the result is written back as a LoRA adapter instead.
    No file outside a model's folder is read (an index entry or a link that
    leads out is an error) unless --allow-external-files.
    """

    def body() -> None:
        from moerge.api import merge as do_merge

        with ProgressBar(quiet or dry_run, transient=True) as bar:
            bar.update("merging", 0, None)  # shown while the inputs are opened and checked
            res = do_merge(recipe, out_dir, force=force, shard_size=shard_size, device=device,
                           allow_pickle=allow_pickle, allow_external_files=allow_external_files,
                           allow_nonfinite=allow_nonfinite, dry_run=dry_run,
                           progress=lambda name, done, total: bar.update("merging", done, total, name[-48:]),
                           lora_rank=lora_rank)
        s = res.summary
        for w in res.warnings:
            click.echo(f"warning: {w}", err=True)
        if quiet:
            return
        what = "planned" if dry_run else "merged"
        click.echo(f"{what} {s['tensors']} tensors ({s['parameters'] / 1e6:.1f}M parameters) with "
                   f"{s['method']} [{s['conventions']} conventions]: {s['input_bytes'] / 1e9:.2f} GB in, "
                   f"{s['output_bytes'] / 1e9:.2f} GB out" + ("" if dry_run else f", {res.seconds:.1f} s"))
        for k, v in res.notes.items():
            click.echo(f"note: {k}: {v}")
        if res.output is not None:
            click.echo(f"wrote {res.output}")

    run(ctx, body)


@click.command()
@click.argument("model")
@click.option("--tensors/--no-tensors", default=True, help="List every tensor.")
@click.option("--allow-pickle", is_flag=True, help="Allow PyTorch .bin checkpoints.")
@click.option("--allow-external-files", is_flag=True, help=EXTERNAL_HELP)
@click.pass_context
def inspect(ctx: click.Context, model: str, tensors: bool, allow_pickle: bool, allow_external_files: bool) -> None:
    """Show MODEL's tensors, dtypes, shapes, parameter count and shards (reads headers only)."""

    def body() -> None:
        from moerge.api import inspect as do_inspect

        info = do_inspect(model, allow_pickle=allow_pickle, allow_external_files=allow_external_files)
        if tensors:
            width = max((len(t.name) for t in info.tensors), default=10)
            click.echo(f"{'tensor':<{width}}  {'dtype':<9} {'shape':<18} file")
            for t in info.tensors:
                click.echo(f"{t.name:<{width}}  {t.dtype:<9} {str(list(t.shape)):<18} {t.file}")
            click.echo()
        click.echo(f"model:      {info.path}")
        if info.config:
            click.echo(f"arch:       {', '.join(info.config.get('architectures', []) or ['?'])} "
                       f"({info.config.get('model_type', '?')})")
        click.echo(f"tensors:    {len(info.tensors)}")
        click.echo(f"parameters: {info.parameters:,} ({info.parameters / 1e6:.2f}M)")
        click.echo("dtypes:     " + ", ".join(f"{k} {v:,}" for k, v in info.dtypes().items()))
        click.echo(f"files:      {len(info.files)} ({info.total_bytes / 1e9:.3f} GB): {', '.join(info.files)}")

    run(ctx, body)


@click.command()
@click.argument("base")
@click.argument("other")
@click.option("--top", type=int, default=0, help="Only the N tensors that changed most (by relative change).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--allow-pickle", is_flag=True, help="Allow PyTorch .bin checkpoints.")
@click.option("--allow-external-files", is_flag=True, help=EXTERNAL_HELP)
@click.pass_context
def diff(ctx: click.Context, base: str, other: str, top: int, as_json: bool, allow_pickle: bool,
         allow_external_files: bool) -> None:
    """Per-tensor change from BASE to OTHER: L2 of the delta, relative change, cosine, sparsity.

    \b
    relative = ‖other − base‖ / ‖base‖;  cosine = cos(base, other);
    unchanged = fraction of entries whose delta is exactly zero.
    """

    def body() -> None:
        from moerge.api import diff as do_diff

        rows, only_a, only_b = do_diff(base, other, allow_pickle=allow_pickle,
                                       allow_external_files=allow_external_files)
        if top:
            rows = sorted(rows, key=lambda r: -r.relative)[:top]
        if as_json:
            import json

            click.echo(json.dumps({
                "tensors": [{"name": r.name, "shape": list(r.shape), "delta_l2": r.delta_l2,
                             "relative": r.relative, "cosine": r.cosine, "unchanged": r.sparsity,
                             "max_abs": r.max_abs} for r in rows],
                "only_in_base": only_a, "only_in_other": only_b}, indent=1))
            return
        width = max((len(r.name) for r in rows), default=10)
        click.echo(f"{'tensor':<{width}}  {'‖Δ‖':>10} {'relative':>9} {'cosine':>9} {'unchanged':>9} {'max|Δ|':>10}")
        for r in rows:
            click.echo(f"{r.name:<{width}}  {r.delta_l2:>10.4g} {r.relative:>9.3%} {r.cosine:>9.6f} "
                       f"{r.sparsity:>9.2%} {r.max_abs:>10.4g}")
        total = sum(r.delta_l2**2 for r in rows) ** 0.5
        changed = sum(1 for r in rows if r.delta_l2 > 0)
        click.echo(f"\n{changed} of {len(rows)} tensors changed; total ‖Δ‖ = {total:.4g}")
        if only_a:
            click.echo(f"only in {base}: {', '.join(only_a)}")
        if only_b:
            click.echo(f"only in {other}: {', '.join(only_b)}")

    run(ctx, body)


@click.command()
@click.argument("name", required=False)
@click.pass_context
def methods(ctx: click.Context, name: str | None) -> None:
    """List every merge method with its parameters, defaults and paper (or one method in detail)."""

    def body() -> None:
        from moerge.methods import all_methods, get_method

        chosen = [get_method(name)] if name else list(all_methods().values())
        for m in chosen:
            base = ("needs base_model" if m.needs_base else "base_model optional" if m.optional_base
                    else "no base model")
            if m.stats:
                base += "; statistics: " + " or ".join(m.stats) + " (per model 'stats:')"
            count = f"{m.min_models}" + ("+" if m.max_models is None else ("" if m.max_models == m.min_models else f"-{m.max_models}"))
            click.secho(f"{m.name}", bold=True, nl=False)
            click.echo(f"  — {m.summary}  [{base}; models: {count}]")
            click.echo(f"    paper: {m.citation}")
            for p in m.params:
                scope = "per model" if p.per_model else "global"
                default = repr(p.default)
                diff_mk = p.defaults.get("mergekit")
                if diff_mk is not None:
                    default += f" (mergekit: {diff_mk!r})"
                click.echo(f"    {p.name:<17} {p.describe_range():<26} {scope:<9} default {default}")
                if name:
                    click.echo(f"      {p.doc}")
            if name and m.fn.__doc__:
                click.echo("\n    " + m.fn.__doc__.strip().replace("\n", "\n    "))
            click.echo()

    run(ctx, body)


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False), default="./moerge-demo")
@click.option("--method", default="ties", show_default=True, help="Merge method to demonstrate.")
@click.option("--force", is_flag=True, help="Rebuild OUT_DIR if it exists.")
@click.pass_context
def demo(ctx: click.Context, out_dir: str, method: str, force: bool) -> None:
    """Build a small Llama-style model, fine-tune three experts, merge them, and generate text."""

    def body() -> None:
        from moerge.demo import run_demo

        run_demo(out_dir, method=method, force=force, echo=click.echo)

    run(ctx, body)


@click.command("extract-lora")
@click.argument("model")
@click.argument("base")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank of every adapted layer.")
@click.option("--include-embeddings", is_flag=True, help="Also factorise changed embedding matrices.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--allow-external-files", is_flag=True, help=EXTERNAL_HELP)
@click.pass_context
def extract_lora(ctx: click.Context, model: str, base: str, out_dir: str, rank: int, include_embeddings: bool,
                 force: bool, allow_external_files: bool) -> None:
    """Write MODEL − BASE as a PEFT LoRA adapter in OUT_DIR (truncated SVD per linear layer).

    \b
    Reports the share of ‖ΔW‖² the truncation discards, per tensor (worst
    first) and in total, and lists changed tensors a LoRA cannot carry (norms,
    biases). A merge of LoRA experts can be written back as one adapter:
      moerge merge recipe.yaml ./merged && moerge extract-lora ./merged ./base ./merged-lora --rank 16
    """

    def body() -> None:
        from moerge.extract import extract_lora as do_extract

        rep = do_extract(model, base, out_dir, rank=rank, include_embeddings=include_embeddings, force=force,
                         allow_external_files=allow_external_files)
        worst = sorted(rep.tensors.items(), key=lambda kv: -kv[1])[:5]
        click.echo(f"rank {rank}: {len(rep.tensors)} layers, discarded {rep.discarded:.2%} of ‖ΔW‖²")
        for name, share in worst:
            click.echo(f"  {share:8.2%}  {name}")
        if rep.not_representable:
            click.echo(f"warning: {len(rep.not_representable)} changed tensors are not linear-layer weights and are "
                       f"not in the adapter: " + ", ".join(list(rep.not_representable)[:5]), err=True)
        click.echo(f"wrote {rep.output}")

    run(ctx, body)


COMMANDS = [merge, inspect, diff, methods, demo, extract_lora]
