"""Upcycling dense experts into an MoE: mergekit-moe's tensors exactly, identities, BTX, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moerge
from moerge.errors import MoergeError, NonFiniteError, PlanError, RecipeError
from moerge.testing import make_gpt2, make_llama, perturb

FIX = Path(__file__).parent / "fixtures" / "mergekit_moe"
MANIFEST = json.loads((FIX / "manifest.json").read_text())
# mergekit 0.1.5 writes Mixtral and Qwen3-MoE fused, Qwen2-MoE per expert
MERGEKIT_LAYOUT = {"mixtral": "fused", "qwen3": "fused", "qwen": "per-expert"}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", sorted(MANIFEST["recipes"]))
def test_mergekit_moe_recipes_give_mergekits_tensors(name, tmp_path, monkeypatch):
    monkeypatch.chdir(FIX)  # the recipes' model paths are relative to the fixture folder, as mergekit ran them
    out = tmp_path / "moe"
    res = moerge.upcycle(f"recipes/{name}.yaml", out, layout=MERGEKIT_LAYOUT[name.split("-")[0]])
    got, want = _tensors(out), load_file(FIX / "expected" / f"{name}.safetensors")
    assert sorted(got) == sorted(want)
    for n, w in want.items():
        assert got[n].dtype == w.dtype and got[n].shape == w.shape, n
        # the hidden modes run the same bf16 forward and reductions: equal; cheap_embed sums rows in another order
        torch.testing.assert_close(got[n], w, rtol=0, atol=2e-7, msg=n)
    cfg_got = json.loads((out / "config.json").read_text())
    cfg_want = json.loads((FIX / "expected" / f"{name}.config.json").read_text())
    for k in set(cfg_got) | set(cfg_want) - {"transformers_version"}:
        assert cfg_got.get(k) == cfg_want.get(k), k
    assert (out / "mergekit_moe_config.yml").read_text() == (FIX / "recipes" / f"{name}.yaml").read_text()
    card = (out / "README.md").read_text()
    assert "mergekit-moe" in card and res.summary["architecture"] in card


@pytest.mark.parametrize("name", sorted(MANIFEST["failed_recipes"]))
def test_recipes_mergekit_refuses_are_refused(name, tmp_path, monkeypatch):
    monkeypatch.chdir(FIX)
    with pytest.raises(RecipeError) as err:
        moerge.upcycle(f"recipes/failing/{name}.yaml", tmp_path / "moe")
    assert "recipes/failing" in str(err.value)  # the message names the recipe (and its line)
    assert not (tmp_path / "moe").exists()


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    base = make_llama(root / "base", seed=0, layers=2)
    out = {"base": base}
    for i in (1, 2, 3):
        out[f"e{i}"] = perturb(base, root / f"e{i}", seed=i, scale=0.3)
    return out


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("layout", ["fused", "per-expert"])
def test_identical_experts_reproduce_the_dense_model_mixtral(dense, tmp_path, layout):
    rec = {"base_model": str(dense["e1"]), "gate_mode": "random", "experts_per_token": 2,
           "experts": [{"source_model": str(dense["e1"])}] * 4}
    res = moerge.upcycle(rec, tmp_path / "moe", layout=layout)
    assert any("same model" in w for w in res.warnings)
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == 4
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(tmp_path / "moe", ids), _logits(dense["e1"], ids), rtol=0, atol=1e-5)


def test_identical_experts_reproduce_the_dense_model_qwen3(tmp_path):
    import transformers

    torch.manual_seed(4)
    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "q3")
    rec = {"base_model": str(tmp_path / "q3"), "gate_mode": "uniform_random", "experts_per_token": 2,
           "experts": [{"source_model": str(tmp_path / "q3")}] * 3}
    moerge.upcycle(rec, tmp_path / "moe", layout="fused")
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["model_type"] == "qwen3_moe"
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(tmp_path / "moe", ids), _logits(tmp_path / "q3", ids), rtol=0, atol=1e-5)


def test_one_expert_at_top1_is_that_expert_and_layouts_agree(dense, tmp_path):
    rec = {"base_model": str(dense["e2"]), "gate_mode": "random", "experts_per_token": 1,
           "experts": [{"source_model": str(dense["e2"])}]}
    moerge.upcycle(rec, tmp_path / "one", layout="per-expert")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(tmp_path / "one", ids), _logits(dense["e2"], ids), rtol=0, atol=1e-5)
    # distinct experts: the fused and the per-expert layout are the same model
    rec = {"base_model": str(dense["base"]), "gate_mode": "random", "seed": 3,
           "experts": [{"source_model": str(dense[f"e{i}"])} for i in (1, 2, 3)]}
    moerge.upcycle(rec, tmp_path / "fused", layout="fused")
    moerge.upcycle(rec, tmp_path / "split", layout="per-expert")
    torch.testing.assert_close(_logits(tmp_path / "fused", ids), _logits(tmp_path / "split", ids), rtol=0, atol=1e-6)
    fused = _tensors(tmp_path / "fused")
    e3 = _tensors(dense["e3"])
    gate_up = fused["model.layers.1.mlp.experts.gate_up_proj"]  # [E, 2I, H]: gate rows, then up rows
    assert torch.equal(gate_up[2], torch.cat([e3["model.layers.1.mlp.gate_proj.weight"],
                                              e3["model.layers.1.mlp.up_proj.weight"]]))
    assert torch.equal(fused["model.layers.1.self_attn.q_proj.weight"],
                       _tensors(dense["base"])["model.layers.1.self_attn.q_proj.weight"])


def test_btx_merges_the_non_expert_tensors_and_scales_the_residual(dense, tmp_path):
    rec = {"base_model": str(dense["base"]), "gate_mode": "random", "non_experts": {"method": "linear"},
           "experts": [{"source_model": str(dense["e1"]), "residual_scale": 0.5},
                       {"source_model": str(dense["e2"])}, {"source_model": str(dense["e3"])}]}
    res = moerge.upcycle(rec, tmp_path / "btx", layout="fused")
    assert res.summary["non_experts"] == "linear"
    out = _tensors(tmp_path / "btx")
    ex = [_tensors(dense[f"e{i}"]) for i in (1, 2, 3)]
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.embed_tokens.weight", "lm_head.weight",
                 "model.layers.1.post_attention_layernorm.weight"):
        torch.testing.assert_close(out[name], sum(e[name] for e in ex) / 3, rtol=0, atol=1e-6)
    down = out["model.layers.0.mlp.experts.down_proj"]
    assert torch.equal(down[0], ex[0]["model.layers.0.mlp.down_proj.weight"] * 0.5)
    assert torch.equal(down[1], ex[1]["model.layers.0.mlp.down_proj.weight"])
    assert "btx" in (tmp_path / "btx" / "README.md").read_text()
    assert not (tmp_path / "btx" / "mergekit_moe_config.yml").exists()  # moerge's own keys: not mergekit's format


def test_noise_is_seeded_and_has_its_scale(dense, tmp_path):
    rec = {"base_model": str(dense["base"]), "gate_mode": "random",
           "experts": [{"source_model": str(dense["e1"]), "noise_scale": 0.01}, {"source_model": str(dense["e2"])}]}
    moerge.upcycle(rec, tmp_path / "a", layout="fused")
    moerge.upcycle(rec, tmp_path / "b", layout="fused")
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)
    delta = a["model.layers.0.mlp.experts.down_proj"][0] - _tensors(dense["e1"])["model.layers.0.mlp.down_proj.weight"]
    assert 0.008 < float(delta.std()) < 0.012


def test_dry_run_writes_nothing_and_refuses_an_existing_output(dense, tmp_path):
    rec = {"base_model": str(dense["base"]), "gate_mode": "random",
           "experts": [{"source_model": str(dense["e1"])}, {"source_model": str(dense["e2"])}]}
    res = moerge.upcycle(rec, tmp_path / "moe", dry_run=True)
    assert res.output is None and not (tmp_path / "moe").exists() and res.summary["tensors"] > 0
    (tmp_path / "moe").mkdir()
    with pytest.raises(MoergeError, match="already exists"):
        moerge.upcycle(rec, tmp_path / "moe", dry_run=True)


def _rec(*experts: Path, **kw):
    return {"base_model": str(experts[0]), "gate_mode": "random",
            "experts": [{"source_model": str(e)} for e in experts], **kw}


def test_bad_inputs_get_one_clear_error_and_nothing_is_written(dense, tmp_path):
    small = make_llama(tmp_path / "small", seed=0, layers=2, hidden=16)
    gpt2 = make_gpt2(tmp_path / "gpt2", seed=0)
    cases = [
        (_rec(dense["e1"], small), PlanError, "hidden_size"),
        (_rec(dense["e1"], tmp_path / "gpt2"), PlanError, "gpt2 model .* one architecture"),
        (_rec(gpt2, gpt2), PlanError, "llama or mistral"),
        (_rec(dense["e1"], dense["e2"], shared_experts=[{"source_model": str(dense["e3"])}],
              architecture="mixtral"), PlanError, "no shared expert"),
        (_rec(dense["e1"], dense["e2"], architecture="qwen"), PlanError, "exactly one shared expert"),
        (_rec(dense["e1"], dense["e2"], architecture="deepseek"), PlanError, "no MoE output architecture matches"),
        (_rec(dense["e1"], dense["e2"], experts_per_token=3), RecipeError, "only 2 experts"),
        (_rec(dense["e1"], dense["e2"], gate_mode="cheap_embed"), RecipeError, "positive_prompts"),
    ]
    for rec, err, text in cases:
        with pytest.raises(err, match=text):
            moerge.upcycle(rec, tmp_path / "moe")
        assert not (tmp_path / "moe").exists()
    # an expert without the MLP tensor it needs
    broken = tmp_path / "broken"
    shutil.copytree(dense["e2"], broken)
    from safetensors.torch import save_file

    t = load_file(broken / "model.safetensors")
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PlanError, match="up_proj"):
        moerge.upcycle(_rec(dense["e1"], broken), tmp_path / "moe")
    # NaN in an expert's MLP: named, and no output
    t = load_file(dense["e3"] / "model.safetensors")
    t["model.layers.0.mlp.gate_proj.weight"][1, 2] = float("nan")
    nan = tmp_path / "nan"
    shutil.copytree(dense["e3"], nan)
    save_file(t, nan / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match="gate_proj"):
        moerge.upcycle(_rec(dense["e1"], nan), tmp_path / "moe")
    assert not (tmp_path / "moe").exists() and not list(tmp_path.glob(".moe*"))


def test_unknown_key_names_its_line():
    from moerge.recipe.moe import load_moe_recipe

    with pytest.raises(RecipeError, match=r"<recipe>:4: unknown key 'positiv_prompts'.*positive_prompts"):
        load_moe_recipe("base_model: x\nexperts:\n  - source_model: a\n    positiv_prompts: [x]\n")
    with pytest.raises(RecipeError, match="moerge merge"):
        load_moe_recipe("merge_method: linear\nmodels: [a]\n")


def test_the_probe_reads_the_installed_transformers(tmp_path, monkeypatch):
    from moerge.arch.moe_layouts import ARCHITECTURES, probe, probe_model

    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path))
    probe.cache_clear()
    for arch in ARCHITECTURES:
        p = probe(arch)
        assert p == probe_model(arch)  # remembered as found
        assert p.default_layout in ("fused", "per-expert") and isinstance(p.transposed, bool)
    assert len(json.loads((tmp_path / "moe_probe.json").read_text())) == len(ARCHITECTURES)
    probe.cache_clear()


def test_a_shared_expert_makes_qwen2_moe_that_generates(dense, tmp_path):
    rec = {"base_model": str(dense["base"]), "gate_mode": "random", "experts_per_token": 1,
           "experts": [{"source_model": str(dense["e1"])}, {"source_model": str(dense["e2"])}],
           "shared_experts": [{"source_model": str(dense["e3"]), "residual_scale": 0.5}]}
    res = moerge.upcycle(rec, tmp_path / "qwen")
    assert res.summary["architecture"] == "Qwen2MoeForCausalLM"  # Mixtral has no shared expert: mergekit's choice
    out = _tensors(tmp_path / "qwen")
    assert torch.equal(out["model.layers.0.self_attn.k_proj.bias"], torch.zeros(16))  # Llama has no q/k/v biases
    assert out["model.layers.1.mlp.shared_expert_gate.weight"].shape == (1, 32)
    assert torch.equal(out["model.layers.1.mlp.shared_expert.down_proj.weight"],
                       _tensors(dense["e3"])["model.layers.1.mlp.down_proj.weight"] * 0.5)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "qwen"))
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, 7)


def test_cli_upcycle_dry_run_and_errors(dense, tmp_path):
    from click.testing import CliRunner

    from moerge.cli import main

    recipe = tmp_path / "moe.yaml"
    recipe.write_text(f"base_model: {dense['base']}\ngate_mode: random\nexperts:\n"
                      f"  - source_model: {dense['e1']}\n  - source_model: {dense['e2']}\n")
    res = CliRunner().invoke(main, ["upcycle", str(recipe), str(tmp_path / "moe"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "planned 2 experts into MixtralForCausalLM" in res.output and not (tmp_path / "moe").exists()
    recipe.write_text(recipe.read_text().replace("random", "hidden"))
    res = CliRunner().invoke(main, ["upcycle", str(recipe), str(tmp_path / "moe")])
    assert res.exit_code == 2 and f"{recipe}:4: experts[0]" in res.output


def test_data_gate_rows_are_the_mean_state_the_router_sees(dense, tmp_path):
    from transformers import AutoModelForCausalLM

    from moerge.data.samples import encode, load_samples
    from moerge.io.checkpoint import open_source
    from moerge.io.tokenizers import load_tokenizer
    from moerge.testing import make_bpe_tokenizer

    texts = ["shares fell sharply", "the bank raised rates", "the striker scored", "what a match lol"] * 4
    base = make_llama(tmp_path / "base", seed=5, layers=2, vocab=300)
    make_bpe_tokenizer(base, texts, vocab_size=280)
    files = []
    for k, rows in enumerate((texts[:2], texts[2:4])):
        f = tmp_path / f"d{k}.jsonl"
        f.write_text("".join(json.dumps({"prompt": t, "target": " yes"}) + "\n" for t in rows * 3))
        files.append(f)
    rec = {"base_model": str(base), "gate_mode": "data", "data_examples": 5,
           "experts": [{"source_model": str(base), "data": str(f)} for f in files]}
    moerge.upcycle(rec, tmp_path / "moe", layout="fused")
    out = _tensors(tmp_path / "moe")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe")).eval()
    with open_source(base) as src:
        tok = load_tokenizer(src)
    tok.pad_token = tok.eos_token
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    hooks = [model.model.layers[k].mlp.gate.register_forward_hook(
        lambda mod, args, o, k=k: seen[k].append(args[0].reshape(-1, args[0].shape[-1]))) for k in (0, 1)]
    means = []
    for f in files:  # the router's own input, over each expert's real tokens
        for k in seen:
            seen[k].clear()
        batch = encode(tok, load_samples(str(f), limit=5), 256, torch.device("cpu"))
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        keep = batch["attention_mask"].reshape(-1).bool()
        means.append(torch.stack([seen[k][0][keep].mean(0) for k in (0, 1)]))  # (L, H)
    means_t = torch.stack(means, dim=1)  # (L, E, H)
    want = means_t - means_t.mean(dim=1, keepdim=True)
    for k in (0, 1):
        torch.testing.assert_close(out[f"model.layers.{k}.mlp.gate.weight"], want[k], rtol=1e-4, atol=1e-5)
    for h in hooks:
        h.remove()
    # a data source that is neither a file nor a task is refused before anything runs
    rec["experts"][1]["data"] = "no_such_task"
    with pytest.raises(PlanError, match="neither a file nor a task"):
        moerge.upcycle(rec, tmp_path / "moe2")
    del rec["experts"][1]["data"]
    with pytest.raises(RecipeError, match="has no data"):
        moerge.upcycle(rec, tmp_path / "moe2")


def test_inspect_reads_both_layouts_and_counts_expert_use(dense, tmp_path):
    from click.testing import CliRunner

    from moerge.cli import main
    from moerge.moe.view import open_moe
    from moerge.testing import make_bpe_tokenizer

    texts = ["shares fell sharply", "the bank raised rates", "the striker scored", "what a match lol"] * 4
    base = make_llama(tmp_path / "base", seed=6, layers=2, vocab=300)
    make_bpe_tokenizer(base, texts, vocab_size=280)
    e2 = perturb(base, tmp_path / "e2", seed=9, scale=0.3)
    rec = {"base_model": str(base), "gate_mode": "random", "experts_per_token": 1,
           "experts": [{"source_model": str(base)}, {"source_model": str(e2)}, {"source_model": str(base)}]}
    for layout in ("fused", "per-expert"):
        moerge.upcycle(rec, tmp_path / layout, layout=layout)
    with open_moe(tmp_path / "fused") as a, open_moe(tmp_path / "per-expert") as b:
        assert (a.layout, b.layout, a.experts, a.top_k) == ("fused", "per-expert", 3, 1)
        for e in range(3):  # the same matrices, whichever layout holds them
            assert all(torch.equal(x, y) for x, y in zip(a.expert(1, e), b.expert(1, e)))
        e2_down = _tensors(e2)["model.layers.1.mlp.down_proj.weight"]
        assert torch.equal(a.expert(1, 1)[2], e2_down)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": t, "target": " ok"}) + "\n" for t in texts))
    info = moerge.inspect_moe(tmp_path / "fused", data=str(data), examples=8)
    assert info["architecture"] == "MixtralForCausalLM" and len(info["routers"]) == 2
    for layer in info["usage"]["chosen"]:  # top-1: every real token picks exactly one expert
        assert sum(layer) == pytest.approx(1.0)
    res = CliRunner().invoke(main, ["moe", "inspect", str(tmp_path / "per-expert"), "--data", str(data),
                                    "--examples", "8"])
    assert res.exit_code == 0, res.output
    assert "3 experts" in res.output and "per-expert layout" in res.output and "top-k share" in res.output
    res = CliRunner().invoke(main, ["moe", "inspect", str(base)])
    assert res.exit_code != 0 and "not an MoE" in res.output


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory) -> dict[str, Path]:
    """A Llama base with a real tokenizer, an expert of it, and calibration data."""
    from moerge.testing import make_bpe_tokenizer

    root = tmp_path_factory.mktemp("tok")
    texts = ["shares fell sharply", "the bank raised rates", "the striker scored", "what a match lol"] * 4
    base = make_llama(root / "base", seed=6, layers=2, vocab=300)
    make_bpe_tokenizer(base, texts, vocab_size=280)
    e2 = perturb(base, root / "e2", seed=9, scale=0.3)
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": t, "target": " ok"}) + "\n" for t in texts))
    return {"base": base, "e2": e2, "data": data}


@pytest.mark.parametrize("layout", ["fused", "per-expert"])
def test_shrink_merging_identical_experts_changes_nothing(with_tokenizer, tmp_path, layout):
    w = with_tokenizer
    pa, pb = ["shares fell"], ["the striker scored"]
    rec = {"base_model": str(w["base"]), "gate_mode": "cheap_embed", "experts_per_token": 1,
           "experts": [{"source_model": str(w["base"]), "positive_prompts": pa},
                       {"source_model": str(w["e2"]), "positive_prompts": pb},
                       {"source_model": str(w["base"]), "positive_prompts": pa},
                       {"source_model": str(w["e2"]), "positive_prompts": pb}]}
    moerge.upcycle(rec, tmp_path / "moe", layout=layout)
    res = moerge.shrink_moe(tmp_path / "moe", tmp_path / "small", experts=2, method="hc-smoe", data=str(w["data"]),
                            examples=16)
    assert [g["groups"] for g in res.notes["groups"]] == [[[0, 2], [1, 3]]] * 2  # the identical pairs cluster
    cfg = json.loads((tmp_path / "small" / "config.json").read_text())
    assert cfg["num_local_experts"] == 2
    small = _tensors(tmp_path / "small")
    big = _tensors(tmp_path / "moe")
    assert sum(t.numel() for t in small.values()) < sum(t.numel() for t in big.values())
    ids = torch.randint(3, 280, (2, 8), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(tmp_path / "small", ids), _logits(tmp_path / "moe", ids), rtol=0, atol=1e-5)
    assert "hc-smoe" in (tmp_path / "small" / "README.md").read_text()
    report = json.loads((tmp_path / "small" / "moerge_shrink.json").read_text())
    assert report["layers"][0]["groups"] == [[0, 2], [1, 3]]


def test_shrink_by_frequency_keeps_the_most_used_rows_and_experts(with_tokenizer, tmp_path):
    from moerge.moe.view import open_moe

    w = with_tokenizer
    rec = {"base_model": str(w["base"]), "gate_mode": "random", "seed": 4, "experts_per_token": 2,
           "experts": [{"source_model": str(w["base"])}, {"source_model": str(w["e2"])},
                       {"source_model": str(w["base"]), "residual_scale": 0.5}]}
    moerge.upcycle(rec, tmp_path / "moe", layout="fused")
    info = moerge.inspect_moe(tmp_path / "moe", data=str(w["data"]), examples=16)
    res = moerge.shrink_moe(tmp_path / "moe", tmp_path / "small", experts=2, method="frequency",
                            data=str(w["data"]), examples=16, layout="per-expert")
    with open_moe(tmp_path / "moe") as big, open_moe(tmp_path / "small") as small:
        assert small.experts == 2 and small.layout == "per-expert"
        for layer in range(2):
            share = info["usage"]["chosen"][layer]
            kept = sorted(sorted(range(3), key=lambda e: (-share[e], e))[:2])
            assert [g for g in res.notes["groups"][layer]["groups"]] == [[e] for e in kept]
            assert torch.equal(small.router(layer), big.router(layer)[kept])
            for new, old in enumerate(kept):
                assert all(torch.equal(a, b) for a, b in zip(small.expert(layer, new), big.expert(layer, old)))
    from click.testing import CliRunner

    from moerge.cli import main

    cli = CliRunner().invoke(main, ["moe", "shrink", str(tmp_path / "moe"), str(tmp_path / "dry"), "--experts", "2",
                                    "--method", "frequency", "--data", str(w["data"]), "--dry-run"])
    assert cli.exit_code == 0 and "planned MixtralForCausalLM from 3 to 2 experts" in cli.output, cli.output
    assert not (tmp_path / "dry").exists()
    for k, err in ((3, "between 1 and 2"), (1, "cannot keep fewer")):
        with pytest.raises(PlanError, match=err):
            moerge.shrink_moe(tmp_path / "moe", tmp_path / "bad", experts=k, method="frequency", data=str(w["data"]))
    assert not (tmp_path / "bad").exists()


def test_average_linkage_against_hand_computed_clusters():
    from moerge.moe.shrink import average_linkage, member_weights

    pts = torch.tensor([[0.0], [1.0], [10.0], [11.5], [30.0]])
    assert average_linkage(pts, 3) == [[0, 1], [2, 3], [4]]
    # {0,1} to {2,3}: mean of 10, 11.5, 9, 10.5 = 10.25; {2,3} to {4}: 19.25 → {0,1,2,3}, {4}
    assert average_linkage(pts, 2) == [[0, 1, 2, 3], [4]]
    assert member_weights([0, 2], torch.tensor([0.3, 0.5, 0.1]), "frequency") == pytest.approx([0.75, 0.25])
    assert member_weights([1], torch.tensor([0.0, 0.0]), "frequency") == [1.0]


def test_router_training_changes_only_the_routers_and_resumes(with_tokenizer, tmp_path, monkeypatch):
    w = with_tokenizer
    rec = {"base_model": str(w["base"]), "gate_mode": "random", "seed": 1, "experts_per_token": 1,
           "experts": [{"source_model": str(w["base"])}, {"source_model": str(w["e2"])}]}
    moerge.upcycle(rec, tmp_path / "moe", layout="fused")
    kw = dict(data=[str(w["data"])], steps=6, batch_size=4, lr=0.05, examples=16, seed=0)
    res = moerge.train_moe_router(tmp_path / "moe", tmp_path / "full", **kw)
    before, after = _tensors(tmp_path / "moe"), _tensors(tmp_path / "full")
    assert sorted(before) == sorted(after)
    for n in before:
        changed = not torch.equal(before[n], after[n])
        assert changed == n.endswith("mlp.gate.weight"), n  # only the router rows move
    curve = res.notes["curve"]
    assert len(curve) == 6 and all(c["balance"] > 0 for c in curve)
    assert (tmp_path / "full" / "router_loss.png").stat().st_size > 1000
    assert json.loads((tmp_path / "full" / "moerge_router_training.json").read_text())["curve"] == curve
    # interrupted after step 4 (the state saved every 2 steps), then rerun: the same rows as one run
    import moerge.moe.train_router as tr

    kw["save_every"] = 2
    real = tr._save_state

    def stop_after_4(*args, **kwargs):
        real(*args, **kwargs)
        if args[4] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(tr, "_save_state", stop_after_4)
    with pytest.raises(KeyboardInterrupt):
        moerge.train_moe_router(tmp_path / "moe", tmp_path / "resumed", **kw)
    assert not (tmp_path / "resumed").exists()
    monkeypatch.setattr(tr, "_save_state", real)
    res2 = moerge.train_moe_router(tmp_path / "moe", tmp_path / "resumed", **kw)
    assert [c["loss"] for c in res2.notes["curve"]] == pytest.approx([c["loss"] for c in curve], rel=1e-5)
    again = _tensors(tmp_path / "resumed")
    for n in after:
        torch.testing.assert_close(again[n], after[n], rtol=1e-5, atol=1e-6)
    assert not (tmp_path / ".resumed.router-training").exists()  # the state goes once the model is published


def test_upcycle_with_router_training_publishes_only_the_trained_model(with_tokenizer, tmp_path):
    w = with_tokenizer
    rec = {"base_model": str(w["base"]), "gate_mode": "data", "data_examples": 8, "experts_per_token": 1,
           "experts": [{"source_model": str(w["base"]), "data": str(w["data"])},
                       {"source_model": str(w["e2"]), "data": str(w["data"])}]}
    res = moerge.upcycle(rec, tmp_path / "moe", layout="fused", train_router=2)
    assert res.summary["router_steps"] == 2 and len(res.notes["curve"]) == 2
    assert (tmp_path / "moe" / "moerge_router_training.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]  # no staging folder left
    del rec["experts"][1]["data"]
    rec["gate_mode"] = "random"
    with pytest.raises(MoergeError, match="no data"):
        moerge.upcycle(rec, tmp_path / "moe2", train_router=2)


def test_mc_smoe_and_naee_against_hand_known_answers(with_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from moerge.moe.shrink import calibrate, dominant_groups, routed_output
    from moerge.moe.view import open_moe

    w = with_tokenizer
    pa, pb = ["shares fell"], ["the striker scored"]
    rec = {"base_model": str(w["base"]), "gate_mode": "cheap_embed", "experts_per_token": 1,
           "experts": [{"source_model": str(w["base"]), "positive_prompts": pa},
                       {"source_model": str(w["e2"]), "positive_prompts": pb},
                       {"source_model": str(w["base"]), "positive_prompts": pa}]}
    moerge.upcycle(rec, tmp_path / "moe", layout="fused")
    ids = torch.randint(3, 280, (2, 8), generator=torch.Generator().manual_seed(5))
    # expert 2 duplicates expert 0 and its router row, so top-1 never picks it (ties go to the lower index)
    for method, want in (("mc-smoe", [[0, 2], [1]]), ("naee", [[0], [1]])):
        res = moerge.shrink_moe(tmp_path / "moe", tmp_path / method, experts=2, method=method,
                                data=str(w["data"]), examples=16)
        assert [g["groups"] for g in res.notes["groups"]] == [want, want], method
        torch.testing.assert_close(_logits(tmp_path / method, ids), _logits(tmp_path / "moe", ids),
                                   rtol=0, atol=1e-5)
    # MC-SMoE's similarity on a hand-made Gram: columns 0 and 2 parallel, 1 orthogonal
    gram = torch.tensor([[4.0, 0.0, 2.0], [0.0, 1.0, 0.0], [2.0, 0.0, 1.0]], dtype=torch.float64)
    assert dominant_groups(gram, [1, 0]) == [[0, 2], [1]]
    # the routed output moerge computes is the block output transformers computes (Mixtral has no shared part)
    with open_moe(tmp_path / "moe") as view:
        from moerge.data.samples import load_samples

        calib = calibrate(tmp_path / "moe", view, load_samples(str(w["data"]), limit=4), max_length=64,
                          device="cpu", keep_inputs=True)
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe")).eval()
        x = calib.inputs[1][0]
        from transformers.activations import ACT2FN

        from moerge.moe.shrink import _expert_out

        outs = torch.stack([_expert_out(x, view.expert(1, e), ACT2FN["silu"]) for e in range(3)])
        with torch.no_grad():
            hf = model.model.layers[1].mlp(x[None])[0]
            hf = hf[0] if isinstance(hf, tuple) else hf
        torch.testing.assert_close(routed_output(x, outs, view.router(1), 1, True), hf.reshape(x.shape),
                                   rtol=1e-4, atol=1e-5)
