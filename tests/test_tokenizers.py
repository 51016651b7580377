"""Vocabularies that differ, on SmolLM2's real tokenizer: tokenizer_source base | union | a model, the
tokenizer: block (tokens with source/force, pad_to_multiple_of), chat_template, padding-only differences,
and the error for vocabularies that cannot be aligned. Checked token by token; the merged models load with
transformers and their tokenizers round-trip the added tokens."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import moerge
from moerge.errors import PlanError

ADDED = ["<|moerge_tool|>", "<|moerge_end|>"]
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from conftest import load_tensors

    return load_tensors(path)


def save(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smol(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama on SmolLM2's tokenizer: base, an expert with two added tokens (rows resized with
    resize_token_embeddings, the new rows set), an expert without, and one whose rows are padded."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from moerge.evaluation.models import smollm2_tokenizer

    tok_dir = smollm2_tokenizer()
    root = tmp_path_factory.mktemp("smol")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    out = {"base": save(base, tok, root / "base")}
    for name in ("plain", "added", "padded"):
        m = LlamaForCausalLM(copy.deepcopy(cfg))
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        t = AutoTokenizer.from_pretrained(tok_dir)
        if name == "added":
            t.add_tokens(ADDED)
            m.resize_token_embeddings(len(t))
            with torch.no_grad():
                for j in range(len(ADDED)):
                    m.model.embed_tokens.weight[len(tok) + j] = 10.0 + j
                    m.lm_head.weight[len(tok) + j] = -10.0 - j
        if name == "padded":
            m.resize_token_embeddings(len(tok) + 64)  # vocabulary unchanged, 64 padding rows
        out[name] = save(m, t, root / name)
    return out


def recipe(tmp_path: Path, body: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


def test_union_keeps_every_token_and_takes_new_rows_from_the_model_that_has_them(smol, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = recipe(tmp_path, f"merge_method: task_arithmetic\nbase_model: {smol['base']}\nmodels:\n"
               f"  - model: {smol['added']}\n    parameters: {{weight: 1.0}}\n"
               f"  - model: {smol['plain']}\n    parameters: {{weight: 1.0}}\ntokenizer_source: union\n")
    res = moerge.merge(r, tmp_path / "out")
    assert any("union tokenizer, 49154 tokens (2 not in" in w for w in res.warnings)
    out, base, a, b = (tensors(p) for p in (tmp_path / "out", smol["base"], smol["added"], smol["plain"]))
    n = base[EMB].shape[0]
    assert out[EMB].shape == (n + 2, 16) and out[HEAD].shape == (n + 2, 16)
    # every shared token: the task-arithmetic merge of its three rows
    for k in (EMB, HEAD):
        assert torch.allclose(out[k][:n], base[k] + (a[k][:n] - base[k]) + (b[k] - base[k]), atol=1e-6)
        # the added tokens: only the expert has them, so the base and the other expert take its row
        # (no task vector of their own), and the merge is that row
        assert torch.allclose(out[k][n:], a[k][n:])
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok("hello <|moerge_tool|> world<|moerge_end|>", add_special_tokens=False)["input_ids"]
    assert ids.count(n) == 1 and ids.count(n + 1) == 1
    assert tok.decode([n]) == "<|moerge_tool|>"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == n + 2
    assert model(torch.tensor([ids])).logits.shape[-1] == n + 2


def test_tokenizer_source_base_drops_added_tokens_and_a_model_source_keeps_them(smol, tmp_path):
    body = (f"merge_method: linear\nmodels:\n  - model: {smol['added']}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {smol['plain']}\n    parameters: {{weight: 1.0}}\n")
    a, b = tensors(smol["added"]), tensors(smol["plain"])
    n = b[EMB].shape[0]
    moerge.merge(recipe(tmp_path, body + f"tokenizer_source: {smol['plain']}\n"), tmp_path / "out_plain")
    out = tensors(tmp_path / "out_plain")
    assert out[EMB].shape[0] == n
    assert torch.allclose(out[EMB], (a[EMB][:n] + b[EMB]) / 2, atol=1e-6)
    moerge.merge(recipe(tmp_path, body + f"tokenizer_source: {smol['added']}\n", "r2.yaml"), tmp_path / "out_added")
    out = tensors(tmp_path / "out_added")
    assert out[EMB].shape[0] == n + 2
    assert torch.allclose(out[EMB][n:], a[EMB][n:])  # the plain expert takes the added rows as its fill


def test_tokens_block_sources_force_and_pad_to_multiple_of(smol, tmp_path):
    from transformers import AutoModelForCausalLM

    r = recipe(tmp_path, f"""merge_method: linear
models:
  - model: {smol['added']}
    parameters: {{weight: 1.0}}
  - model: {smol['plain']}
    parameters: {{weight: 1.0}}
tokenizer:
  source: union
  pad_to_multiple_of: 64
  tokens:
    "<|moerge_tool|>":
      source: {{kind: zero}}
      force: true
    "<|moerge_end|>":
      source: {{kind: model_token, model: {smol['plain']}, token: "hello"}}
    "<|brand_new|>":
      source: {{kind: model_token, model: {smol['added']}, token_id: 0}}
""")
    moerge.merge(r, tmp_path / "out")
    out, a, b = tensors(tmp_path / "out"), tensors(smol["added"]), tensors(smol["plain"])
    n = b[EMB].shape[0]
    rows = -(-(n + 3) // 64) * 64
    assert out[EMB].shape[0] == rows
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    tool, end, new = (tok.convert_tokens_to_ids(t) for t in ("<|moerge_tool|>", "<|moerge_end|>", "<|brand_new|>"))
    hello = AutoTokenizer.from_pretrained(smol["plain"]).convert_tokens_to_ids("hello")
    assert torch.equal(out[EMB][tool], torch.zeros(16))  # forced: zero in every model, even the one that has it
    assert torch.allclose(out[EMB][end], (a[EMB][end] + b[EMB][hello]) / 2, atol=1e-6)  # not forced: a keeps its own
    assert torch.allclose(out[EMB][new], (a[EMB][0] + a[EMB][0]) / 2, atol=1e-6)
    # padding rows: each model's aligned token rows averaged (neither has padding of its own there), merged
    aligned_a = torch.cat([a[EMB][:n], torch.zeros(1, 16), a[EMB][n + 1:n + 2], a[EMB][:1]])
    aligned_b = torch.cat([b[EMB], torch.zeros(1, 16), b[EMB][hello:hello + 1], a[EMB][:1]])
    pad = (aligned_a.mean(0) + aligned_b.mean(0)) / 2
    assert torch.allclose(out[EMB][n + 3:], pad.expand(rows - n - 3, 16), atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == rows


def test_vocabularies_that_differ_only_in_padding_rows_merge_with_a_note(smol, tmp_path):
    r = recipe(tmp_path, f"method: task_arithmetic\nbase_model: {smol['base']}\nmodels:\n"
               f"  - model: {smol['padded']}\n  - model: {smol['plain']}\n")
    res = moerge.merge(r, tmp_path / "out")
    assert any("differ only in padding rows" in w for w in res.warnings)
    out, base, p, b = (tensors(x) for x in (tmp_path / "out", smol["base"], smol["padded"], smol["plain"]))
    n = base[EMB].shape[0]
    assert out[EMB].shape[0] == n
    assert torch.allclose(out[EMB], base[EMB] + (p[EMB][:n] - base[EMB]) + (b[EMB] - base[EMB]), atol=1e-6)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "differ only in padding rows" in card


def test_vocabularies_that_cannot_be_aligned_name_both_tokenizers_and_the_first_token(smol, tmp_path):
    r = recipe(tmp_path, f"method: task_arithmetic\nbase_model: {smol['base']}\nmodels:\n"
               f"  - model: {smol['added']}\n")
    with pytest.raises(PlanError) as err:
        moerge.merge(r, tmp_path / "out")
    msg = str(err.value)
    assert str(smol["base"]) in msg and str(smol["added"]) in msg
    assert "first at id 49152: '(none)' in the first, '<|moerge_tool|>' in the second" in msg
    assert "tokenizer_source: union" in msg
    assert not (tmp_path / "out").exists()


def test_chat_template_auto_named_and_literal(smol, tmp_path):
    from transformers import AutoTokenizer

    body = (f"method: linear\nmodels:\n  - model: {smol['plain']}\n  - model: {smol['base']}\n")
    msgs = [{"role": "user", "content": "hi"}]
    moerge.merge(recipe(tmp_path, body + "chat_template: auto\n"), tmp_path / "auto")
    src = AutoTokenizer.from_pretrained(smol["base"])
    assert AutoTokenizer.from_pretrained(tmp_path / "auto").chat_template.strip() == src.chat_template.strip()
    moerge.merge(recipe(tmp_path, body + "chat_template: chatml\n", "c.yaml"), tmp_path / "chatml")
    text = AutoTokenizer.from_pretrained(tmp_path / "chatml").apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
    lit = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    moerge.merge(recipe(tmp_path, body + f'chat_template: "{lit}"\n', "l.yaml"), tmp_path / "lit")
    assert AutoTokenizer.from_pretrained(tmp_path / "lit").apply_chat_template(msgs, tokenize=False) == "[user] hi"
    with pytest.raises(PlanError, match="neither 'auto'"):
        moerge.merge(recipe(tmp_path, body + "chat_template: nosuch\n", "n.yaml"), tmp_path / "bad")


def test_bad_tokens_entries_name_their_line(smol, tmp_path):
    r = recipe(tmp_path, f"""merge_method: linear
models:
  - model: {smol['plain']}
  - model: {smol['base']}
tokenizer:
  tokens:
    "<|x|>":
      source: {{kind: model_token, model: {smol['plain']}, token: "no-such-token-here"}}
""")
    with pytest.raises(PlanError, match=r"r\.yaml:8.*'no-such-token-here' is not in"):
        moerge.merge(r, tmp_path / "out")


def test_same_row_count_but_different_tokens_is_an_error(tmp_path):
    from moerge.testing import make_bpe_tokenizer, make_llama

    a = make_llama(tmp_path / "a", vocab=300, seed=1)
    b = make_llama(tmp_path / "b", vocab=300, seed=2)
    make_bpe_tokenizer(a, ["the cat sat on the mat", "a dog ran far away"] * 3, vocab_size=300)
    make_bpe_tokenizer(b, ["zebra quartz vexing jumps", "wolves howl at night"] * 3, vocab_size=300)
    r = recipe(tmp_path, f"method: linear\nmodels:\n  - model: {a}\n  - model: {b}\n")
    with pytest.raises(PlanError, match="vocabularies differ.*first at id"):
        moerge.merge(r, tmp_path / "out")
    r = recipe(tmp_path, f"method: linear\nmodels:\n  - model: {a}\n  - model: {b}\nvocab_policy: base\n", "p.yaml")
    moerge.merge(r, tmp_path / "out")  # the explicit policy: rows merged by position, as asked
