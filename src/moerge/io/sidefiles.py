"""Files that travel with the weights: config, tokenizer, generation config, model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moerge.io.sources import TensorSource

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "spiece.model",
    "chat_template.jinja", "chat_template.json", "sentencepiece.bpe.model",
)
CONFIG_SIDE_FILES = ("generation_config.json",)


def output_config(config: dict[str, Any] | None, dtype: str | None, num_layers: int | None,
                  layer_key_values: tuple[str, ...]) -> dict[str, Any] | None:
    """The source config with the output dtype and (for slices) the new layer count."""
    if config is None:
        return None
    cfg = dict(config)
    if dtype:
        for key in ("torch_dtype", "dtype"):
            if key in cfg or key == "torch_dtype":
                cfg[key] = dtype
    if num_layers is not None:
        for key in layer_key_values:
            if key in cfg and cfg[key] != num_layers:
                cfg[key] = num_layers
                if "layer_types" in cfg and isinstance(cfg["layer_types"], list):
                    lt = cfg["layer_types"]
                    cfg["layer_types"] = (lt * (num_layers // max(len(lt), 1) + 1))[:num_layers]
    return cfg


def tokenizer_files(source: TensorSource) -> list[Path]:
    """The tokenizer files beside ``source``'s weights, each checked to lie inside its folder."""
    return [p for f in TOKENIZER_FILES if (p := source.side_file(f)) is not None]


def model_card(*, method: Any, recipe_text: str, conventions: str, inputs: list[str],
               base: str | None, version: str, summary: dict[str, Any], notes: dict[str, Any],
               statistics: list[str] | None = None) -> str:
    """A Hugging Face model card (README.md) recording how the model was made. ``inputs`` are the merged
    models (the card's ``base_model`` when no base is named); ``statistics`` the folders a data-aware
    method read, listed apart."""
    base_models = [base] if base else inputs
    front = ["---", "library_name: transformers", "tags:", "- moerge", "- merge", f"- {method.name}",
             "base_model:"] + [f"- {json.dumps(m)}" for m in base_models] + ["---", ""]
    lines = [
        f"# Merged model ({method.name})",
        "",
        f"Made with [moerge](https://pypi.org/project/moerge/) {version} by merging "
        f"{len(inputs)} model(s) with **{method.name}** ({method.summary}).",
        "",
        f"- Method: `{method.name}` — {method.citation}",
        f"- Conventions: `{conventions}`" + (" (mergekit-compatible recipe)" if conventions == "mergekit" else
                                            " (the method paper's reference code)"),
        f"- Tensors: {summary['tensors']:,}; parameters: {summary['parameters']:,}",
        "",
        "## Inputs",
        "",
    ]
    lines += [f"- `{m}`" + (" (base)" if m == base else "") for m in inputs]
    if statistics:
        lines += ["", "## Statistics", ""] + [f"- `{m}`" for m in statistics]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {k}: {v}" for k, v in notes.items()]
    lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(front + lines)


MOE_CITATIONS = {
    "mergekit": "Goddard et al. 2024, Arcee's MergeKit (arXiv:2403.13257), mergekit-moe",
    "btx": "Sukhbaatar et al. 2024, Branch-Train-MiX (arXiv:2403.07816)",
}


def moe_card(*, summary: dict[str, Any], recipe: Any, recipe_text: str, version: str, warnings: list[str]) -> str:
    """The model card of an upcycled mixture of experts: its parents, how its experts, non-expert
    tensors and router were made, and the recipe."""
    parents = list(dict.fromkeys([recipe.base_model] + [e.source_model for e in recipe.experts]
                                 + [e.source_model for e in recipe.shared_experts or []]))
    btx = recipe.non_experts is not None
    front = ["---", "library_name: transformers", "tags:", "- moerge", "- merge", "- moe",
             f"- {'btx' if btx else 'mergekit-moe'}", "base_model:"] + [f"- {json.dumps(m)}" for m in parents]
    front += ["---", ""]
    k, n = recipe.experts_per_token, len(recipe.experts)
    lines = [
        f"# Mixture of experts ({summary['architecture']}, {n} experts, top-{k})",
        "",
        f"Upcycled with [moerge](https://pypi.org/project/moerge/) {version} from {n} dense expert(s): each "
        "expert's MLP became one routed expert of every layer.",
        "",
        "- Non-expert tensors (attention, norms, embeddings, head): " + (
            f"merged over the experts with `{recipe.non_experts.method}` (as BTX, {MOE_CITATIONS['btx']})"
            if btx else f"copied from `{recipe.base_model}` (as mergekit-moe, {MOE_CITATIONS['mergekit']})"),
        f"- Router rows: gate mode `{recipe.gate_mode}`, no training; top-{k} weights "
        + ("renormalised" if recipe.norm_topk_prob else "not renormalised"),
        f"- Layout: {summary['layout']}; tensors: {summary['tensors']:,}; parameters: {summary['parameters']:,}",
        "",
        "## Experts",
        "",
    ]
    lines += [f"{i}. `{e.source_model}`" for i, e in enumerate(recipe.experts)]
    if recipe.shared_experts:
        lines += ["", f"Shared expert: `{recipe.shared_experts[0].source_model}`"]
    if warnings:
        lines += ["", "## Notes", ""] + [f"- {w}" for w in warnings]
    lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(front + lines)


def shrink_card(*, source: str, summary: dict[str, Any], report: dict[str, Any], version: str) -> str:
    """The model card of a shrunk MoE: where it came from, how its experts were merged or dropped."""
    how = {"frequency": "kept the most used experts of each layer (frequency pruning)",
           "hc-smoe": "clustered each layer's experts by their mean output over the calibration tokens (average "
                      "linkage) and merged each cluster (HC-SMoE, Chen et al. 2025, arXiv:2410.08589)",
           "mc-smoe": "grouped each layer's experts around its most used ones by router-logit similarity and merged "
                      "each group (MC-SMoE, Li et al. 2024, arXiv:2310.01334)",
           "naee": "kept the subset of each layer's experts whose routed output on the calibration tokens is "
                   "closest to all experts' (NAEE, Lu et al. 2024, arXiv:2402.14800)"}[report["method"]]
    front = ["---", "library_name: transformers", "tags:", "- moerge", "- moe", f"- {report['method']}",
             "base_model:", f"- {json.dumps(source)}", "---", ""]
    lines = [f"# {summary['architecture']} shrunk from {report['experts_in']} to {report['experts_out']} experts",
             "", f"Made with [moerge](https://pypi.org/project/moerge/) {version} from `{source}`: {how}; "
             f"merged experts are the {report['merge']}-weighted average of their members, router rows "
             f"{'the most used member' if report['router'] == 'dominant' else 'the frequency-weighted mean'}'s. "
             f"Calibration: {report['tokens']:,} tokens of `{report['data']}`.", "",
             "| layer | experts kept or merged (input indices) |", "|---|---|"]
    lines += [f"| {k} | {' · '.join('+'.join(map(str, g)) for g in layer['groups'])} |"
              for k, layer in enumerate(report["layers"])]
    return "\n".join(front + lines) + "\n"
