"""``moerge demo``: a real merge end to end on small models built on the spot.

1. trains a byte-level BPE tokenizer on a tiny built-in corpus;
2. builds a small random Llama-architecture base model and fine-tunes three
   experts from it, each on its own "task" (a text pattern);
3. merges them with the chosen method through the normal recipe path;
4. loads every model with ``transformers`` and reports each one's loss on each
   task, then lets the merged model generate.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

TASKS = {
    "counting": "one two three four five six seven eight nine ten. " * 3,
    "alphabet": "a b c d e f g h i j k l m n o p q r s t u v w x y z. " * 2,
    "colors": "red orange yellow green blue indigo violet. " * 3,
}


def _tokenizer(out: Path):
    from moerge.testing import make_bpe_tokenizer

    return make_bpe_tokenizer(out, list(TASKS.values()) * 4)


def _loss(model, ids) -> float:
    import torch

    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


def _train(model, batches, *, steps: int, lr: float) -> float:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss.detach())


def run_demo(out_dir: str | Path, *, method: str = "ties", force: bool = False, steps: int = 25,
             pretrain_steps: int = 60,
             echo: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import moerge

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    out = Path(out_dir)
    if out.exists():
        if not force:
            from moerge.errors import OutputError

            raise OutputError(f"{out} already exists", hint="pass --force to rebuild it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    tok = _tokenizer(out / "base")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    base = LlamaForCausalLM(cfg)
    data = {k: tok(v, return_tensors="pt").input_ids for k, v in TASKS.items()}
    # a brief "pre-training" on all tasks, so that the experts share a starting point that means something
    _train(base, list(data.values()), steps=pretrain_steps, lr=3e-3)
    base.save_pretrained(out / "base")
    echo(f"built a {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M-parameter Llama base and a "
         f"{len(tok)}-token tokenizer in {out / 'base'}")
    for task, ids in data.items():
        model = LlamaForCausalLM.from_pretrained(out / "base")
        loss = _train(model, [ids], steps=steps, lr=1e-3)
        model.save_pretrained(out / f"expert-{task}")
        tok.save_pretrained(out / f"expert-{task}")
        echo(f"fine-tuned expert-{task}: {steps} steps, final training loss {loss:.3f}")
    params = {"ties": {"density": 0.5}, "dare_ties": {"density": 0.5}, "dare_linear": {"density": 0.5},
              "breadcrumbs": {"density": 0.9, "gamma": 0.01}, "task_arithmetic": {"lambda": 1.0}}.get(method, {})
    models = [f"expert-{t}" for t in TASKS]
    if method == "slerp":
        models = models[:1]
    recipe = {"method": method, "models": [{"model": str(out / m)} for m in models]}
    if method not in ("linear",):
        recipe["base_model"] = str(out / "base")
    if params:
        recipe["parameters"] = params
    import yaml

    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    res = moerge.merge(str(out / "recipe.yaml"), out / "merged")
    echo(f"merged {len(models)} experts with {method} in {res.seconds:.2f} s -> {out / 'merged'}")

    names = ["base", *models, "merged"]
    table: dict[str, dict[str, float]] = {}
    for name in names:
        model = AutoModelForCausalLM.from_pretrained(out / name).eval()
        table[name] = {task: _loss(model, ids) for task, ids in data.items()}
    width = max(len(n) for n in names)
    echo("\nloss on each task (lower is better):")
    echo(f"{'model':<{width}}  " + "  ".join(f"{t:>9}" for t in TASKS))
    for name in names:
        echo(f"{name:<{width}}  " + "  ".join(f"{table[name][t]:>9.3f}" for t in TASKS))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    echo("\nthe merged model continues each task's prompt:")
    for text in TASKS.values():
        prompt = " ".join(text.split()[:3])
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = merged.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
        echo(f"  {prompt!r} -> {tok.decode(gen[0][ids.shape[1]:])!r}")
    echo(f"\ndone in {time.perf_counter() - t0:.1f} s; inspect it with: moerge inspect {out / 'merged'}")
    return table
