"""Mixture-of-experts output architectures: their config keys and tensor names, in both layouts.

transformers v5 holds an MoE layer's experts as two 3-D parameters (the *fused* layout,
``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``) but by default ``save_pretrained``
writes the *per-expert* names older releases used (``mlp.experts.{e}.gate_proj.weight``, Mixtral's
``block_sparse_moe.experts.{e}.w1.weight``), converting them back when it loads. moerge writes
either. Which one the installed transformers writes, and which way its fused tensors point
([E, 2I, H] or [E, H, 2I]), is read from a tiny model of the class (:func:`probe`), never assumed.

Dense inputs are Llama-family decoders whose MLP is ``mlp.{gate,up,down}_proj`` (SwiGLU).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

DENSE_MLP = ("gate_proj", "up_proj", "down_proj")


def dense_mlp_name(layer: int, part: str) -> str:
    """A dense decoder's MLP weight (``part`` one of gate_proj, up_proj, down_proj)."""
    return f"model.layers.{layer}.mlp.{part}.weight"


@dataclass(frozen=True)
class MoeArchitecture:
    """One MoE output class: which dense inputs it takes, its config keys, its tensor names."""

    name: str  # as in a mergekit-moe recipe's ``architecture:`` (prefix-matched)
    model_type: str
    class_name: str
    accepts: tuple[str, ...]  # dense model types it upcycles
    experts_key: str  # config key of the number of routed experts
    intermediate_key: str | None  # config key of an expert's width (None: intermediate_size itself)
    shared_expert: bool  # True: exactly one shared expert required (Qwen2-MoE); False: none allowed
    legacy_prefix: str = "mlp"  # the per-expert layout's block name (Mixtral: block_sparse_moe)
    legacy_parts: tuple[str, str, str] = DENSE_MLP  # per-expert names of gate, up, down
    attention_bias: bool = False  # q/k/v biases expected (filled with zeros when the dense model has none)

    def router(self, layer: int, layout: str) -> str:
        block = self.legacy_prefix if layout == "per-expert" else "mlp"
        return f"model.layers.{layer}.{block}.gate.weight"

    def fused(self, layer: int) -> tuple[str, str]:
        p = f"model.layers.{layer}.mlp.experts"
        return f"{p}.gate_up_proj", f"{p}.down_proj"

    def per_expert(self, layer: int, expert: int) -> tuple[str, str, str]:
        p = f"model.layers.{layer}.{self.legacy_prefix}.experts.{expert}"
        return tuple(f"{p}.{part}.weight" for part in self.legacy_parts)  # type: ignore[return-value]

    def shared(self, layer: int) -> tuple[str, str, str]:
        p = f"model.layers.{layer}.mlp.shared_expert"
        return tuple(f"{p}.{part}.weight" for part in DENSE_MLP)  # type: ignore[return-value]

    def shared_gate(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"

    def refusal(self, model_types: list[str], n_shared: int) -> str | None:
        """Why this output cannot be built from dense models of ``model_types`` with ``n_shared``
        shared experts (None: it can)."""
        if len(set(model_types)) != 1:
            return f"{self.name} needs every input model of one architecture, got {sorted(set(model_types))}"
        if model_types[0] not in self.accepts:
            return f"{self.name} upcycles {' or '.join(self.accepts)} models, not {model_types[0]}"
        if self.shared_expert and n_shared != 1:
            return f"{self.name} needs exactly one shared expert (shared_experts:), got {n_shared}"
        if not self.shared_expert and n_shared:
            return f"{self.name} has no shared expert; remove shared_experts: or choose architecture: qwen"
        return None

    def config(self, dense: dict[str, Any], experts: int, top_k: int, *, norm_topk_prob: bool) -> dict[str, Any]:
        """The output ``config.json``: the dense config carried over (as mergekit does) with the MoE keys."""
        import transformers

        cls = getattr(transformers, _CONFIG_CLASSES[self.model_type])
        src = {k: v for k, v in dense.items() if k not in ("architectures", "model_type", "transformers_version")}
        cfg = cls(**src)
        setattr(cfg, self.experts_key, experts)
        cfg.num_experts_per_tok = top_k
        if self.intermediate_key is not None:
            setattr(cfg, self.intermediate_key, dense["intermediate_size"])
        if self.model_type == "qwen2_moe":
            cfg.shared_expert_intermediate_size = dense["intermediate_size"]
            cfg.use_sliding_window = False
        if self.model_type in ("qwen2_moe", "qwen3_moe"):
            cfg.decoder_sparse_step = 1
            cfg.mlp_only_layers = []
        if hasattr(cfg, "norm_topk_prob"):
            cfg.norm_topk_prob = norm_topk_prob
        if hasattr(cfg, "sliding_window"):
            cfg.sliding_window = None
        cfg.architectures = [self.class_name]
        return cfg.to_diff_dict()  # what save_pretrained writes (keys left at their defaults omitted)


_CONFIG_CLASSES = {"mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig"}

MIXTRAL = MoeArchitecture("Mixtral", "mixtral", "MixtralForCausalLM", ("llama", "mistral"),
                          "num_local_experts", None, False, "block_sparse_moe", ("w1", "w3", "w2"))
QWEN2_MOE = MoeArchitecture("Qwen MoE", "qwen2_moe", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"),
                            "num_experts", "moe_intermediate_size", True, attention_bias=True)
QWEN3_MOE = MoeArchitecture("Qwen3 MoE", "qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",),
                            "num_experts", "moe_intermediate_size", False)
ARCHITECTURES = (MIXTRAL, QWEN2_MOE, QWEN3_MOE)  # mergekit's order of preference (Mixtral first)
LAYOUTS = ("fused", "per-expert")


def select_architecture(prefix: str | None, model_types: list[str], n_shared: int) -> MoeArchitecture:
    """mergekit-moe's choice: the architectures whose name starts with ``prefix`` (any, without one)
    that accept the inputs; Mixtral when it qualifies, else the first. Raises ValueError naming why
    each candidate was refused."""
    candidates = [a for a in ARCHITECTURES if prefix is None or a.name.lower().startswith(prefix.lower())
                  or a.model_type.startswith(prefix.lower())]
    if not candidates:
        names = ", ".join(f"{a.name} ({a.model_type})" for a in ARCHITECTURES)
        raise ValueError(f"no MoE output architecture matches architecture: {prefix!r}; choose one of {names}")
    reasons = {a.name: a.refusal(model_types, n_shared) for a in candidates}
    ok = [a for a in candidates if reasons[a.name] is None]
    if not ok:
        raise ValueError("no MoE output architecture takes these models: "
                         + "; ".join(f"{r}" for r in reasons.values()))
    return ok[0]


@dataclass(frozen=True)
class Probe:
    """What the installed transformers does with one MoE class."""

    default_layout: str  # what save_pretrained writes
    transposed: bool  # fused tensors stored [E, H, 2I] / [E, I, H] instead of [E, 2I, H] / [E, H, I]


@functools.cache
def probe(arch: MoeArchitecture) -> Probe:
    """What the installed transformers does with ``arch``: probed once per transformers version (see
    :func:`probe_model`) and remembered in ``$MOERGE_CACHE/moe_probe.json`` (the probe imports the
    modeling code: seconds)."""
    import importlib.metadata
    import json
    import os
    from pathlib import Path

    key = f"{arch.model_type}@transformers-{importlib.metadata.version('transformers')}"
    store = Path(os.environ.get("MOERGE_CACHE", Path.home() / ".cache" / "moerge")) / "moe_probe.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    got = known.get(key)
    if isinstance(got, dict) and got.get("default_layout") in LAYOUTS and isinstance(got.get("transposed"), bool):
        return Probe(got["default_layout"], got["transposed"])
    found = probe_model(arch)
    try:  # best effort: a read-only cache only costs the next run the probe again
        store.parent.mkdir(parents=True, exist_ok=True)
        known[key] = {"default_layout": found.default_layout, "transposed": found.transposed}
        tmp = store.with_name(f".{store.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(store)
    except OSError:
        pass
    return found


def probe_model(arch: MoeArchitecture) -> Probe:
    """Build a tiny model of ``arch``'s class (hidden 8, width 12, 3 experts), read the shape of its
    fused experts and the names ``save_pretrained`` writes."""
    import tempfile

    import torch
    import transformers
    from safetensors import safe_open

    h, i, e = 8, 12, 3
    dense = dict(vocab_size=16, hidden_size=h, intermediate_size=i, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=4, max_position_embeddings=32)
    cfg = getattr(transformers, _CONFIG_CLASSES[arch.model_type])(**arch.config(dense, e, 1, norm_topk_prob=True))
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    params = dict(model.named_parameters())
    gate_up, _ = arch.fused(0)
    shape = tuple(params[gate_up].shape)
    if shape not in ((e, 2 * i, h), (e, h, 2 * i)):
        raise RuntimeError(f"the installed transformers holds {gate_up} as {list(shape)}; moerge knows "
                           f"[E, 2I, H] and [E, H, 2I]")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            with safe_open(f"{tmp}/model.safetensors", "pt") as f:
                names = set(f.keys())
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    layout = "fused" if gate_up in names else "per-expert"
    expected = set(arch.fused(0)) if layout == "fused" else set(arch.per_expert(0, 0))
    if not expected <= names:
        raise RuntimeError(f"the installed transformers writes {arch.class_name} without {sorted(expected - names)}")
    return Probe(layout, shape == (e, h, 2 * i))
