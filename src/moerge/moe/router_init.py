"""Router rows of an upcycled MoE, computed without training: mergekit-moe's gate modes exactly.

Each mode gives ``W`` of shape (L, E, H): row e of layer ℓ is expert e's router row.

- ``random``: N(0, 1) — about √(3H) times the spread of ``uniform_random``, so routing starts near one-hot;
- ``uniform_random``: U(−1/√H, 1/√H), ``nn.Linear``'s default initialisation;
- ``cheap_embed``: the sum of the token embeddings of an expert's prompts (BOS counted, padding not),
  unit length; minus the same for the negative prompts, unit length again; one row for every layer;
- ``hidden`` / ``hidden_last``: the base model's residual stream *entering* layer ℓ at each prompt's
  last token (prompts left-padded, BOS prepended), averaged over prompts; positives minus negatives,
  unit length per layer. ``hidden_avg``: the mean over all (padded) positions instead of the last.
  The forward runs in ``router_dtype`` (mergekit: bfloat16) and so does every later step, as there.

moerge's own mode:

- ``data``: the state the router really sees at run time — the output of layer ℓ's
  ``post_attention_layernorm`` in the dense base — averaged over every real token of the expert's own
  examples (prompt and target), then centred over the experts (subtracting their mean row shifts every
  logit of a token by the same amount, so routing is that of the raw means: a nearest-mean router).
  Rows keep their natural scale: no unit-length step.

Conventions: mergekit draws the random modes from torch's global generator (unseeded unless
``--random-seed``); here from a generator seeded by the recipe's ``seed``. mergekit's ``hidden`` is not
the state the router sees at run time (that is after attention and ``post_attention_layernorm``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moerge.methods.masks import tensor_seed


@dataclass(frozen=True)
class PromptSet:
    positive: Sequence[str]
    negative: Sequence[str] = ()


def random_rows(mode: str, layers: int, experts: int, hidden: int, seed: int) -> torch.Tensor:
    """(L, E, H) rows of the ``random`` or ``uniform_random`` mode, from a generator seeded by ``seed``."""
    gen = torch.Generator().manual_seed(tensor_seed(seed, "router", mode))
    if mode == "random":
        return torch.randn((layers, experts, hidden), generator=gen)
    scale = math.sqrt(1.0 / hidden)
    return torch.rand((layers, experts, hidden), generator=gen) * 2 * scale - scale


def prompt_tokens(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """mergekit-moe's tokenisation: BOS text prepended, no other special tokens, left-padded with the
    BOS id (EOS when there is no BOS)."""
    tokenizer.padding_side = "left"
    if tokenizer.bos_token_id is not None:
        tokenizer.pad_token_id = tokenizer.bos_token_id
    else:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [(tokenizer.bos_token or "") + p for p in prompts]
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def prompt_rows(summary: Callable[[dict[str, torch.Tensor]], torch.Tensor], tokenizer: Any,
                sets: Sequence[PromptSet]) -> torch.Tensor:
    """(L, E, H) rows: each expert's ``summary`` of its positive prompts, minus that of its negative
    ones, unit length per layer."""
    rows = []
    for s in sets:
        v = summary(prompt_tokens(tokenizer, s.positive))
        if s.negative:
            v = v - summary(prompt_tokens(tokenizer, s.negative))
        rows.append(_unit(v))
    return torch.stack(rows, dim=0).permute(1, 0, 2)  # (E, L, H) → (L, E, H)


def cheap_embed_summary(embed: torch.Tensor, layers: int) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The ``cheap_embed`` summary: the masked sum of the prompts' token embeddings, unit length, for every layer."""
    table = embed.float()

    def summary(tok: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = tok["input_ids"], tok["attention_mask"].bool()
        total = table[ids[mask]].sum(dim=0, keepdim=True)  # (1, H)
        return _unit(total).repeat(layers, 1)  # (L, H)

    return summary


def hidden_summary(model: Any, mode: str) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The ``hidden`` summaries: per layer, the residual stream entering it at the last position (or its
    mean over positions for ``hidden_avg``), averaged over prompts; in the model's dtype."""

    def summary(tok: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model(**{k: v.to(device) for k, v in tok.items()}, output_hidden_states=True, return_dict=True)
        h = torch.stack(out.hidden_states[:-1])  # (L, B, T, H): the input of each layer
        h = h.sum(dim=2) / h.shape[2] if mode == "hidden_avg" else h[:, :, -1, :]  # (L, B, H)
        return (h.sum(dim=1) / h.shape[1]).cpu()  # (L, H)

    return summary


def data_rows(model: Any, tokenizer: Any, expert_samples: Sequence[Sequence[Any]], *, max_length: int,
              batch_size: int = 8) -> torch.Tensor:
    """(L, E, H) rows of the ``data`` mode: per layer, the mean ``post_attention_layernorm`` output over the
    real tokens of each expert's samples (:class:`moerge.data.samples.Sample`), centred over the experts."""
    from moerge.data.samples import encode

    layers = model.model.layers
    device = next(model.parameters()).device
    sums: list[torch.Tensor] = []
    mask_now: list[torch.Tensor] = []

    def hook(layer: int) -> Callable[..., None]:
        def fn(module: Any, args: Any, out: torch.Tensor) -> None:  # out: (B, T, H)
            m = mask_now[0].to(out.dtype).unsqueeze(-1)
            sums[layer] += (out * m).sum(dim=(0, 1)).double().cpu()
        return fn

    handles = [layer.post_attention_layernorm.register_forward_hook(hook(k)) for k, layer in enumerate(layers)]
    rows = []
    try:
        for samples in expert_samples:
            sums[:] = [torch.zeros(model.config.hidden_size, dtype=torch.float64) for _ in layers]
            tokens = 0
            for start in range(0, len(samples), batch_size):
                batch = encode(tokenizer, samples[start:start + batch_size], max_length, device)
                mask_now[:] = [batch["attention_mask"]]
                with torch.no_grad():
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                tokens += int(batch["attention_mask"].sum())
            rows.append(torch.stack(sums) / max(tokens, 1))  # (L, H)
    finally:
        for h in handles:
            h.remove()
    w = torch.stack(rows, dim=1)  # (L, E, H)
    return (w - w.mean(dim=1, keepdim=True)).float()


def load_base_for_hidden(base: Path, dtype: str, device: str) -> Any:
    """The dense base model for the ``hidden`` modes: safetensors only, no remote code, eval mode."""
    from transformers import AutoModelForCausalLM

    from moerge.runtime.models import check_files

    check_files(base)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, dtype), use_safetensors=True,
                                                 trust_remote_code=False)
    return model.to(device).eval()


def degenerate_layers(rows: torch.Tensor, threshold: float = 5.0) -> list[tuple[int, float]]:
    """Layers whose router rows are nearly linearly dependent (condition number above ``threshold``, as
    mergekit warns): (layer, condition number) for each."""
    out = []
    for layer in range(rows.shape[0]):
        c = float(torch.linalg.cond(rows[layer].float()))
        if not c <= threshold:
            out.append((layer, c))
    return out
