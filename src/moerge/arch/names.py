"""Every rule moerge applies to tensor names, in one place.

The rules are substring and pattern tests on Hugging Face checkpoint names, so
they work on any architecture whose names follow the common conventions
(Llama, Qwen2, Mistral, GPT-2, GPT-NeoX, BERT …); ``tests/test_names.py`` pins
them on real name lists of Llama, GPT-2, BERT and Qwen2.

- *layer index*: ``model.layers.7.…``, ``transformer.h.7.…``, ``encoder.layer.7.…``, ``blocks.7.…``;
- *pre-layer* tensors (before the first block: token, position and token-type embeddings) against
  those after the last block (final norm, head);
- *vocabulary-sized* tensors (input embeddings and output heads), whose rows follow the tokenizer;
- *embedding-like* weights, which a LoRA adapter carries in PEFT's embedding layout;
- the *part* of a block a tensor belongs to: attention, MLP, norm.
"""

from __future__ import annotations

import re

LAYER_RE = re.compile(r"(^|\.)(layers|layer|h|blocks|block)\.(\d+)\.")

INPUT_EMBEDDING_HINTS = ("embed", "wte", "word_embeddings")  # "embed" also matches GPT-NeoX's embed_out head
POSITION_EMBEDDING_HINTS = ("wpe", "position_embeddings")
TOKEN_TYPE_HINTS = ("token_type",)
HEAD_HINTS = ("lm_head", "embed_out", "output.weight")

PRE_LAYER_HINTS = INPUT_EMBEDDING_HINTS + POSITION_EMBEDDING_HINTS + TOKEN_TYPE_HINTS
VOCAB_HINTS = INPUT_EMBEDDING_HINTS + HEAD_HINTS
EMBEDDING_LIKE_HINTS = INPUT_EMBEDDING_HINTS + POSITION_EMBEDDING_HINTS + ("lm_head",)

ATTENTION_HINTS = ("self_attn", "attention", "attn")
MLP_HINTS = ("mlp", "intermediate", "output.dense", "feed_forward", "ffn")
NORM_HINTS = ("norm", "ln_")


def layer_index(name: str) -> int | None:
    """The transformer block index in a tensor name (``model.layers.7.mlp...`` → 7)."""
    m = LAYER_RE.search(name)
    return int(m.group(3)) if m else None


def with_layer_index(name: str, index: int) -> str:
    """Replace the block index in a tensor name."""
    m = LAYER_RE.search(name)
    if not m:
        return name
    return name[: m.start(3)] + str(index) + name[m.end(3):]


def is_pre_layer(name: str) -> bool:
    """Whether a tensor outside the blocks sits before them (embeddings) rather than after."""
    return any(h in name for h in PRE_LAYER_HINTS)


def is_vocab_name(name: str) -> bool:
    """Whether a tensor's rows are (by its name) one per vocabulary entry: input embeddings, heads."""
    return any(h in name for h in VOCAB_HINTS)


def is_embedding_name(name: str) -> bool:
    """Whether a weight is an embedding matrix (token or position) or the LM head: extract-lora leaves
    them out unless asked, and writes them in PEFT's embedding-adapter layout."""
    return any(h in name for h in EMBEDDING_LIKE_HINTS)


def block_part(name: str) -> str | None:
    """``"norm"``, ``"attention"`` or ``"mlp"`` for a tensor inside a block, else None. Norms are
    recognised first (``post_attention_layernorm`` and BERT's ``attention.output.LayerNorm`` are norms)."""
    if layer_index(name) is None:
        return None
    lowered = name.lower()
    if any(h in lowered for h in NORM_HINTS):
        return "norm"
    if any(h in name for h in ATTENTION_HINTS):
        return "attention"
    if any(h in name for h in MLP_HINTS):
        return "mlp"
    return None
