"""Small real Hugging Face models built on the spot, for tests, the demo and benchmarks.

The models are random-initialised ``transformers`` models of real architectures
(Llama, GPT-2), saved in Hugging Face layout. "Experts" are the base plus a
seeded perturbation, written tensor by tensor, so the factory also serves for
large benchmark models without holding them in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def make_bpe_tokenizer(path: str | Path, texts: list[str], vocab_size: int = 300) -> Any:
    """A small byte-level BPE tokenizer trained on ``texts``, saved in HF layout at ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def make_llama(path: str | Path, *, seed: int = 0, vocab: int = 64, hidden: int = 32,
               intermediate: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               dtype: torch.dtype = torch.float32, tie: bool = False,
               shard_size: str | None = None) -> Path:
    """A random Llama-architecture causal LM saved with ``save_pretrained``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=128, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).to(dtype)
    return _save(model, path, shard_size)


def make_gpt2(path: str | Path, *, seed: int = 0, vocab: int = 64, hidden: int = 32, layers: int = 2,
              heads: int = 4, dtype: torch.dtype = torch.float32) -> Path:
    """A random GPT-2 causal LM (tied embeddings, Conv1D layers, fused attention)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128)
    model = GPT2LMHeadModel(cfg).to(dtype)
    return _save(model, path, None)


def _save(model: Any, path: str | Path, shard_size: str | None) -> Path:
    path = Path(path)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if shard_size:
        kwargs["max_shard_size"] = shard_size
    model.save_pretrained(path, **kwargs)
    return path


def perturb(src: str | Path, dst: str | Path, *, scale: float = 0.05, seed: int = 1,
            density: float = 1.0, shard_size: str | int = "5GB") -> Path:
    """An "expert": ``src`` plus seeded Gaussian deltas of ``scale``·rms per tensor.

    With ``density`` < 1 only that fraction of entries is changed (sparse deltas,
    like a light fine-tune). Streams tensor by tensor through moerge's own
    reader and writer, so it works for models of any size.
    """
    from moerge.io.checkpoint import open_source
    from moerge.io.writer import ModelWriter, parse_size
    from moerge.methods.masks import bernoulli_keep, tensor_seed

    src, dst = Path(src), Path(dst)
    with open_source(src) as ck, ModelWriter(dst, [(n, i.dtype, i.shape) for n, i in ck.infos.items()],
                                             shard_size=parse_size(shard_size), force=True) as w:
        gen = torch.Generator()
        for name in ck.tensor_names:
            t = ck.read(name)
            if t.is_floating_point() and t.numel():
                x = t.float()
                rms = float(x.pow(2).mean().sqrt()) or 1.0
                gen.manual_seed(tensor_seed(seed, name))
                noise = torch.randn(x.shape, generator=gen) * (scale * rms)
                if density < 1.0:
                    noise *= bernoulli_keep(x.shape, density, tensor_seed(seed, name, "mask"))
                t = (x + noise).to(t.dtype)
            w.write(name, t)
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                w.copy_file(f)
        w.commit()
    return dst


def make_llama_like_big(path: str | Path, *, hidden: int, intermediate: int, layers: int, heads: int,
                        kv_heads: int, vocab: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                        shard_size: str | int = "2GB") -> Path:
    """A Llama-shaped checkpoint of any size, written tensor by tensor (never whole in memory).

    Weights are seeded normal(0, 0.02); norms are ones. ``config.json`` is a
    real LlamaConfig, so transformers loads the result.
    """
    from transformers import LlamaConfig

    from moerge.io.writer import ModelWriter, parse_size

    path = Path(path)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      tie_word_embeddings=False)
    head = hidden // heads
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    dname = str(dtype).removeprefix("torch.")
    gen = torch.Generator()
    from moerge.methods.masks import tensor_seed

    with ModelWriter(path, [(n, dname, s) for n, s in shapes], shard_size=parse_size(shard_size),
                     force=True) as w:
        for name, shape in shapes:
            if len(shape) == 1:
                t = torch.ones(shape, dtype=dtype)
            else:
                gen.manual_seed(tensor_seed(seed, name))
                t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
            w.write(name, t)
        d = cfg.to_dict()
        d["torch_dtype"] = dname
        d["architectures"] = ["LlamaForCausalLM"]
        w.write_text("config.json", json.dumps(d, indent=2))
        w.commit()
    return path


def make_lora(base: str | Path, dst: str | Path, *, seed: int = 0, rank: int = 4, alpha: int = 8,
              targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"), std: float = 0.1,
              decay: float = 1.0, **lora_kwargs: Any) -> Path:
    """A PEFT LoRA adapter for ``base`` with random (non-zero) A and B, saved in PEFT's layout. ``decay`` < 1
    scales A's i-th rank row by decay**i, a spectrum with a clear top direction like trained adapters'."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                                  lora_dropout=0.0, **lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
                if "lora_A" in name and decay != 1.0:
                    p.mul_(decay ** torch.arange(p.shape[0], dtype=p.dtype).unsqueeze(1))
    peft_model.save_pretrained(str(dst))
    cfg_path = Path(dst) / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(Path(base).resolve())
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return Path(dst)


def make_word_llama(path: str | Path, words: list[str], texts: list[str], *, seed: int = 0, layers: int = 1,
                    hidden: int = 32) -> Path:
    """A tiny random Llama with a BPE tokenizer in which every word of ``words`` is one token
    (for label-word scoring and statistics tests without a real model)."""
    tok = make_bpe_tokenizer(path, [" ".join(words * 50), *texts], vocab_size=600)
    for w in words:
        if len(tok(w, add_special_tokens=False)["input_ids"]) != 1:
            raise ValueError(f"label word {w!r} is not one token; add it to the texts more often")
    return make_llama(path, seed=seed, vocab=len(tok), layers=layers, hidden=hidden)
