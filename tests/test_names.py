"""arch/names.py on the real tensor names of four architectures, pinned to the rules moerge applied
before they were gathered there (each was a hint list in the planner, extract-lora or the recipe code)."""

from __future__ import annotations

import re

import pytest
import torch

from moerge.arch.names import (
    block_part,
    is_embedding_name,
    is_pre_layer,
    is_vocab_name,
    layer_index,
    with_layer_index,
)

# the rules as they were written before (plan.py, extract.py, recipe/params.py)
OLD_LAYER_RE = re.compile(r"(^|\.)(layers|layer|h|blocks|block)\.(\d+)\.")
OLD_PRE_LAYER = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type")
OLD_VOCAB = ("embed", "lm_head", "wte", "word_embeddings", "embed_out", "output.weight")
OLD_EMBEDDING = ("embed", "lm_head", "wte", "wpe", "word_embeddings", "position_embeddings")


def _names(arch: str) -> list[str]:
    import transformers as tf

    small = dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = {
        "llama": lambda: tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_key_value_heads=1,
                                        tie_word_embeddings=False, **small),
        "qwen2": lambda: tf.Qwen2Config(hidden_size=16, intermediate_size=32, num_key_value_heads=1, **small),
        "gpt2": lambda: tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32),
        "bert": lambda: tf.BertConfig(hidden_size=16, intermediate_size=32, max_position_embeddings=32, **small),
    }[arch]()
    cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "gpt2": tf.GPT2LMHeadModel,
           "bert": tf.BertForMaskedLM}[arch]
    with torch.device("meta"):
        return list(cls(config).state_dict())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
def test_name_rules_are_the_ones_moerge_applied_before(arch: str) -> None:
    names = _names(arch)
    assert len(names) > 10
    for n in names:
        m = OLD_LAYER_RE.search(n)
        assert layer_index(n) == (int(m.group(3)) if m else None), n
        assert is_pre_layer(n) == any(h in n for h in OLD_PRE_LAYER), n
        assert is_vocab_name(n) == any(h in n for h in OLD_VOCAB), n
        assert is_embedding_name(n) == any(h in n for h in OLD_EMBEDDING), n
        if m:
            assert layer_index(with_layer_index(n, 11)) == 11
    assert any(layer_index(n) == 1 for n in names) and any(is_vocab_name(n) for n in names)


@pytest.mark.parametrize(("name", "part"), [
    ("model.layers.0.self_attn.q_proj.weight", "attention"),
    ("model.layers.0.self_attn.q_proj.bias", "attention"),  # Qwen2's attention biases
    ("model.layers.1.mlp.down_proj.weight", "mlp"),
    ("model.layers.1.input_layernorm.weight", "norm"),
    ("model.layers.1.post_attention_layernorm.weight", "norm"),
    ("transformer.h.0.attn.c_attn.weight", "attention"),
    ("transformer.h.0.mlp.c_fc.weight", "mlp"),
    ("transformer.h.0.ln_1.weight", "norm"),
    ("bert.encoder.layer.0.attention.self.query.weight", "attention"),
    ("bert.encoder.layer.0.attention.output.dense.weight", "attention"),
    ("bert.encoder.layer.0.attention.output.LayerNorm.weight", "norm"),
    ("bert.encoder.layer.0.intermediate.dense.weight", "mlp"),
    ("bert.encoder.layer.0.output.dense.weight", "mlp"),
    ("bert.encoder.layer.0.output.LayerNorm.bias", "norm"),
    ("model.embed_tokens.weight", None),
    ("model.norm.weight", None),
    ("lm_head.weight", None),
])
def test_block_part(name: str, part: str | None) -> None:
    assert block_part(name) == part


def test_every_block_tensor_of_the_four_architectures_has_a_part() -> None:
    for arch in ("llama", "qwen2", "gpt2", "bert"):
        inside = [n for n in _names(arch) if layer_index(n) is not None and not n.endswith(".attn.bias")]
        assert [n for n in inside if block_part(n) is None] == [], arch
