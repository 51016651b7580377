"""``moerge upcycle``: dense experts into one mixture-of-experts model."""

from __future__ import annotations

import click

from moerge.cli._common import EXTERNAL_HELP, ProgressBar, run_offline


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--layout", type=click.Choice(["fused", "per-expert"]), default=None,
              help="Expert tensors as transformers v5 holds them (fused: mlp.experts.gate_up_proj [E, 2I, H]) "
                   "or one per expert matrix (per-expert). Default: what the installed transformers writes.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists (atomically, after the upcycle succeeds).")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard (5GB, 500MB, 2GiB).")
@click.option("--device", default="cpu", show_default=True,
              help="Device of the base model's forward for the hidden gate modes: cpu, cuda, auto.")
@click.option("--allow-pickle", is_flag=True, help="Allow PyTorch .bin inputs (loaded with weights_only=True).")
@click.option("--allow-external-files", is_flag=True, help=EXTERNAL_HELP)
@click.option("--allow-nonfinite", is_flag=True, help="Upcycle even if an input holds NaN or Inf.")
@click.option("--dry-run", is_flag=True, help="Check the recipe against its models and plan; run and write nothing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.pass_context
def upcycle(ctx: click.Context, recipe: str, out_dir: str, layout: str | None, force: bool, shard_size: str,
            device: str, allow_pickle: bool, allow_external_files: bool, allow_nonfinite: bool, dry_run: bool,
            quiet: bool) -> None:
    """Upcycle the dense experts of RECIPE into one mixture-of-experts model in OUT_DIR.

    \b
    RECIPE is a mergekit-moe YAML, unchanged:
      base_model: ./base
      gate_mode: hidden        # hidden | hidden_avg | cheap_embed | random | uniform_random
      experts_per_token: 2
      experts:
        - source_model: ./bbc
          positive_prompts: ["Business news: shares fell"]
        - source_model: ./tweets
          positive_prompts: ["just saw the match lol"]
    Each expert's MLP becomes one routed expert of every layer; attention, norms,
    embeddings and head come from base_model, or (moerge's BTX key)
      non_experts: {method: linear}
    merges them over the experts with any merge method. Outputs: Mixtral (Llama or
    Mistral experts), Qwen2-MoE (architecture: qwen, one shared expert) and
    Qwen3-MoE (Qwen3 experts). OUT_DIR loads with AutoModelForCausalLM (no remote
    code) and appears only when complete.
    """

    def body() -> None:
        from moerge.api import upcycle as do_upcycle

        with ProgressBar(quiet or dry_run, transient=True) as bar:
            bar.update("upcycling", 0, None)
            res = do_upcycle(recipe, out_dir, layout=layout, force=force, shard_size=shard_size, device=device,
                             allow_pickle=allow_pickle, allow_external_files=allow_external_files,
                             allow_nonfinite=allow_nonfinite, dry_run=dry_run,
                             progress=lambda name, done, total: bar.update("upcycling", done, total, name[-48:]))
        for w in res.warnings:
            click.echo(f"warning: {w}", err=True)
        if quiet:
            return
        s = res.summary
        what = "planned" if dry_run else "upcycled"
        click.echo(f"{what} {s['experts']} experts into {s['architecture']} (top-{s['experts_per_token']}, "
                   f"{s['layout']} layout, gate {s['gate_mode']}; non-expert tensors {s['non_experts']}): "
                   f"{s['tensors']} tensors, {s['parameters'] / 1e6:.1f}M parameters, "
                   f"{s['input_bytes'] / 1e9:.2f} GB in, {s['output_bytes'] / 1e9:.2f} GB out"
                   + ("" if dry_run else f", {res.seconds:.1f} s"))
        if res.output is not None:
            click.echo(f"wrote {res.output}")

    run_offline(ctx, body)


COMMANDS = [upcycle]
