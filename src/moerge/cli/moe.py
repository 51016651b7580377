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
@click.option("--train-router", "train_steps", type=int, default=None, metavar="STEPS",
              help="Then train only the router rows for STEPS steps on the experts' data: (see moe train-router).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.pass_context
def upcycle(ctx: click.Context, recipe: str, out_dir: str, layout: str | None, force: bool, shard_size: str,
            device: str, allow_pickle: bool, allow_external_files: bool, allow_nonfinite: bool, dry_run: bool,
            train_steps: int | None, quiet: bool) -> None:
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
                             allow_nonfinite=allow_nonfinite, dry_run=dry_run, train_router=train_steps,
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
        curve = res.notes.get("curve")
        if curve:
            click.echo(f"trained the routers for {len(curve)} steps: loss {curve[0]['loss']:.3f} → {curve[-1]['loss']:.3f}")
        if res.output is not None:
            click.echo(f"wrote {res.output}")

    run_offline(ctx, body)


@click.group()
def moe() -> None:
    """Look into mixture-of-experts checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE; fused or per-expert layout)."""


@moe.command("inspect")
@click.argument("model", type=click.Path(file_okay=False, exists=True))
@click.option("--data", default=None, help="A task name or a JSONL of prompt/target rows: show which experts "
              "each layer's router picks on it.")
@click.option("--examples", default=32, show_default=True, help="Examples of --data to run.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.pass_context
def inspect_cmd(ctx: click.Context, model: str, data: str | None, examples: int, device: str, as_json: bool) -> None:
    """Show MODEL's experts, routers and (with --data) per-layer expert usage.

    \b
    Per layer: the router rows' norms, the largest |cosine| between two rows and
    their condition number (rows nearly alike route nearly alike); with --data, the
    share of real tokens whose top-k includes each expert, and its mean routing
    probability. Example:
      moerge moe inspect ./moe --data bbc
    """

    def body() -> None:
        import json

        from moerge.api import inspect_moe

        info = inspect_moe(model, data=data, examples=examples, device=device)
        if as_json:
            click.echo(json.dumps(info, indent=1))
            return
        click.echo(f"{info['architecture']}: {info['layers']} layers, {info['experts']} experts of width "
                   f"{info['expert_width']}, top-{info['experts_per_token']} "
                   f"({'renormalised' if info['norm_topk_prob'] else 'not renormalised'}), "
                   f"{'a shared expert, ' if info['shared_expert'] else ''}{info['layout']} layout")
        usage = info.get("usage")
        head = "layer  router norms      max|cos|   cond"
        if usage:
            head += "   top-k share per expert (" + f"{usage['tokens']} tokens of {usage['data']})"
        click.echo(head)
        for k, r in enumerate(info["routers"]):
            line = f"{k:>5}  {r['norm_min']:7.3g}–{r['norm_max']:<7.3g}  {r['max_abs_cos']:8.3f} {r['cond']:7.3g}"
            if usage:
                line += "   " + " ".join(f"{c:5.2f}" for c in usage["chosen"][k])
            click.echo(line)

    run_offline(ctx, body)


@moe.command("shrink")
@click.argument("model", type=click.Path(file_okay=False, exists=True))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--experts", "k", type=int, required=True, help="Experts per layer to keep (K).")
@click.option("--method", type=click.Choice(["hc-smoe", "mc-smoe", "naee", "frequency"]), default="hc-smoe",
              show_default=True, help="hc-smoe: cluster experts by mean output, merge each cluster; mc-smoe: group "
              "around the most used by router-logit similarity, merge; naee: keep the subset whose output is "
              "closest; frequency: keep the most used.")
@click.option("--data", required=True, help="Calibration data: a task name or a JSONL of prompt/target rows.")
@click.option("--examples", default=64, show_default=True)
@click.option("--merge", type=click.Choice(["frequency", "average"]), default="frequency", show_default=True,
              help="How a cluster's members are averaged.")
@click.option("--router", type=click.Choice(["dominant", "mean"]), default="dominant", show_default=True,
              help="A merged expert's router row: its most used member's, or the frequency-weighted mean.")
@click.option("--layout", type=click.Choice(["fused", "per-expert"]), default=None,
              help="Output layout (default: the input's).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--dry-run", is_flag=True, help="Check MODEL, K and the data; run and write nothing.")
@click.pass_context
def shrink_cmd(ctx: click.Context, model: str, out_dir: str, k: int, method: str, data: str, examples: int,
               merge: str, router: str, layout: str | None, device: str, force: bool, dry_run: bool) -> None:
    """Shrink MODEL to K experts per layer: a smaller checkpoint in OUT_DIR.

    \b
    The calibration data runs through MODEL once (routing counts, and for
    hc-smoe every expert's mean output); each layer's K output experts are then
    written with K router rows and the config's expert count set to K, so
    transformers loads OUT_DIR as a smaller model. Example:
      moerge moe shrink ./moe ./smaller --experts 2 --method hc-smoe --data bbc
    """

    def body() -> None:
        from moerge.api import shrink_moe

        res = shrink_moe(model, out_dir, experts=k, method=method, data=data, examples=examples, merge=merge,
                         router=router, layout=layout, force=force, device=device, dry_run=dry_run)
        s = res.summary
        click.echo(f"{'planned' if dry_run else 'shrank'} {s['architecture']} from {s['experts_in']} to "
                   f"{s['experts_out']} experts per layer ({method}): {s['input_bytes'] / 1e9:.2f} GB in"
                   + ("" if dry_run else f", {s['output_bytes'] / 1e9:.2f} GB out, {res.seconds:.1f} s"))
        for layer, g in enumerate(res.notes.get("groups", [])):
            click.echo(f"  layer {layer}: " + " · ".join("+".join(map(str, m)) for m in g["groups"]))
        if res.output is not None:
            click.echo(f"wrote {res.output}")

    run_offline(ctx, body)


@moe.command("train-router")
@click.argument("model", type=click.Path(file_okay=False, exists=True))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--data", multiple=True, required=True,
              help="Training data (repeat: one per expert): a task name or a JSONL of prompt/target rows.")
@click.option("--steps", default=100, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--aux-coef", default=0.01, show_default=True, help="Weight of the load-balancing loss (BTX: 0.01).")
@click.option("--examples", default=256, show_default=True, help="Examples per data source.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def train_router_cmd(ctx: click.Context, model: str, out_dir: str, data: tuple[str, ...], steps: int, lr: float,
                     batch_size: int, aux_coef: float, examples: int, seed: int, device: str, force: bool,
                     quiet: bool) -> None:
    """Train only MODEL's router rows on DATA; write the result to OUT_DIR.

    \b
    Every other parameter stays frozen and is written byte for byte; the loss
    (target cross-entropy + aux-coef × load balancing, as transformers computes it)
    goes to OUT_DIR/moerge_router_training.json and router_loss.png. Interrupt at
    any time: rerunning the same command resumes from the last saved step.
      moerge moe train-router ./moe ./moe-trained --data bbc --data tweets --steps 200
    """

    def body() -> None:
        from moerge.api import train_moe_router

        with ProgressBar(quiet, transient=True) as bar:
            res = train_moe_router(model, out_dir, data=list(data), steps=steps, lr=lr, batch_size=batch_size,
                                   aux_coef=aux_coef, examples=examples, seed=seed, force=force, device=device,
                                   progress=lambda k, n, c: bar.update("router", k, n, f"loss {c['loss']:.3f}"))
        if quiet:
            return
        curve = res.notes["curve"]
        if curve:
            click.echo(f"trained the routers for {len(curve)} steps: loss {curve[0]['loss']:.3f} → "
                       f"{curve[-1]['loss']:.3f} (load balancing {curve[0]['balance']:.3f} → {curve[-1]['balance']:.3f}), "
                       f"{res.seconds:.1f} s")
        click.echo(f"wrote {res.output}")

    run_offline(ctx, body)


COMMANDS = [upcycle, moe]
