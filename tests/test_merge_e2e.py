"""End-to-end merges of real (tiny) Hugging Face models: load with transformers and generate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

import moerge
from conftest import load_tensors, recipe

METHODS = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.8},
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.7},
    "dare_ties": {"density": 0.7},
    "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05},
    "model_stock": {},
}


def generate(path, n=4):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=n, do_sample=False)
    assert out.shape == (1, 3 + n)
    return out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_llama_merge_loads_and_generates(llama, tmp_path, method):
    base = None if method == "linear" else llama["base"]
    r = recipe(method, base, [llama["ft1"], llama["ft2"], llama["ft3"]], params=METHODS[method])
    res = moerge.merge(r, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()
    assert (tmp_path / "out" / "README.md").read_text().count(method) >= 2
    assert res.summary["tensors"] == len(load_tensors(llama["base"]))
    generate(tmp_path / "out")


@pytest.mark.parametrize("method", ["ties", "slerp", "task_arithmetic"])
def test_gpt2_merge_loads_and_generates(gpt2, tmp_path, method):
    models = [gpt2["ft1"]] if method == "slerp" else [gpt2["ft1"], gpt2["ft2"]]
    moerge.merge(recipe(method, gpt2["base"], models, params={"density": 0.5} if method == "ties" else None),
                 tmp_path / "out")
    generate(tmp_path / "out")


def test_merge_is_bit_identical_across_runs(llama, tmp_path):
    r = recipe("dare_ties", llama["base"], [llama["ft1"], llama["ft2"]], params={"density": 0.5}, seed=3)
    moerge.merge(r, tmp_path / "a")
    moerge.merge(r, tmp_path / "b")
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    r["seed"] = 4
    moerge.merge(r, tmp_path / "c")
    assert (tmp_path / "a/model.safetensors").read_bytes() != (tmp_path / "c/model.safetensors").read_bytes()


def test_output_matches_direct_computation(llama, tmp_path):
    r = recipe("task_arithmetic", llama["base"], [llama["ft1"], llama["ft2"]],
               model_params=[{"weight": 0.7}, {"weight": 0.2}], params={"lambda": 1.5})
    moerge.merge(r, tmp_path / "out")
    out = load_tensors(tmp_path / "out")
    b, f1, f2 = (load_tensors(llama[k]) for k in ("base", "ft1", "ft2"))
    for name, t in out.items():
        ref = b[name] + 1.5 * (0.7 * (f1[name] - b[name]) + 0.2 * (f2[name] - b[name]))
        assert torch.allclose(t, ref, atol=1e-6), name


def test_identity_merge_reproduces_model_bitwise(llama, tmp_path):
    moerge.merge(recipe("linear", None, [llama["ft1"]]), tmp_path / "out")
    a, b = load_tensors(tmp_path / "out"), load_tensors(llama["ft1"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_bf16_inputs_and_outputs(llama_bf16, tmp_path):
    r = recipe("ties", llama_bf16["base"], [llama_bf16["ft1"], llama_bf16["ft2"]], params={"density": 0.5})
    moerge.merge(r, tmp_path / "out", shard_size="30KB")
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "out" / s).is_file() for s in shards)
    out = load_tensors(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert json.loads((tmp_path / "out/config.json").read_text())["torch_dtype"] == "bfloat16"
    # the safetensors library itself reads what we wrote
    from safetensors.torch import load_file

    for s in shards:
        for k, v in load_file(tmp_path / "out" / s).items():
            assert torch.equal(v, out[k])
    generate(tmp_path / "out")


def test_output_dtype_from_recipe(llama_bf16, tmp_path):
    r = recipe("linear", None, [llama_bf16["ft1"], llama_bf16["ft2"]], dtype="float32")
    moerge.merge(r, tmp_path / "out")
    assert all(t.dtype == torch.float32 for t in load_tensors(tmp_path / "out").values())


def test_ties_trim_scope_model_differs_from_tensor(llama, tmp_path):
    models = [llama["ft1"], llama["ft2"], llama["ft3"]]
    moerge.merge(recipe("ties", llama["base"], models, params={"density": 0.3}), tmp_path / "model")
    moerge.merge(recipe("ties", llama["base"], models, params={"density": 0.3, "trim_scope": "tensor"}),
                 tmp_path / "tensor")
    a, b = load_tensors(tmp_path / "model"), load_tensors(tmp_path / "tensor")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_gradient_and_filter_parameters(llama, tmp_path):
    r = recipe("task_arithmetic", llama["base"], [llama["ft1"]],
               model_params=[{"weight": [{"filter": "self_attn", "value": 0.0}, {"value": [0.0, 1.0]}]}])
    moerge.merge(r, tmp_path / "out")
    out, b, f = load_tensors(tmp_path / "out"), load_tensors(llama["base"]), load_tensors(llama["ft1"])
    # attention: weight 0 → base; mlp of layer 0 (t=0) → base; layer 2 (t=1) → expert
    assert torch.equal(out["model.layers.2.self_attn.q_proj.weight"], b["model.layers.2.self_attn.q_proj.weight"])
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    assert torch.allclose(out["model.layers.2.mlp.up_proj.weight"], f["model.layers.2.mlp.up_proj.weight"])
    mid = b["model.layers.1.mlp.up_proj.weight"] + 0.5 * (f["model.layers.1.mlp.up_proj.weight"] - b["model.layers.1.mlp.up_proj.weight"])
    assert torch.allclose(out["model.layers.1.mlp.up_proj.weight"], mid, atol=1e-6)
    # native conventions: embeddings take the gradient's first value, lm_head (after the blocks) its last
    assert torch.equal(out["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.allclose(out["lm_head.weight"], f["lm_head.weight"])


def test_passthrough_slices_frankenmerge(llama, tmp_path):
    r = {"method": "passthrough", "slices": [
        {"sources": [{"model": str(llama["ft1"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(llama["ft2"]), "layer_range": [1, 3]}]},
    ]}
    moerge.merge(r, tmp_path / "out")
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert cfg["num_hidden_layers"] == 4
    out, f1, f2 = (load_tensors(p) for p in (tmp_path / "out", llama["ft1"], llama["ft2"]))
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], f1["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], f2["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"], f2["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], f1["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], f2["lm_head.weight"])
    generate(tmp_path / "out")


def test_yaml_file_recipe_and_recipe_copy(llama, tmp_path):
    text = yaml.safe_dump(recipe("ties", llama["base"], [llama["ft1"], llama["ft2"]], params={"density": 0.4}))
    (tmp_path / "r.yaml").write_text(text)
    moerge.merge(str(tmp_path / "r.yaml"), tmp_path / "out")
    assert (tmp_path / "out/moerge_recipe.yaml").read_text() == text


def test_force_replaces_existing_output(llama, tmp_path):
    r = recipe("linear", None, [llama["ft1"]])
    (tmp_path / "out").mkdir()
    (tmp_path / "out/old.txt").write_text("old")
    moerge.merge(r, tmp_path / "out", force=True)
    assert not (tmp_path / "out/old.txt").exists() and (tmp_path / "out/model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_dry_run_writes_nothing(llama, tmp_path):
    res = moerge.merge(recipe("ties", llama["base"], [llama["ft1"]]), tmp_path / "out", dry_run=True)
    assert res.output is None and not (tmp_path / "out").exists()
    assert res.summary["tensors"] > 0


def test_cli_merge_inspect_diff_methods(llama, tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe("ties", llama["base"], [llama["ft1"], llama["ft2"]])))
    cli = [sys.executable, "-m", "moerge"]
    r = subprocess.run(cli + ["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "merged" in r.stdout
    r = subprocess.run(cli + ["inspect", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0 and "model.layers.0.mlp.up_proj.weight" in r.stdout and "parameters:" in r.stdout
    r = subprocess.run(cli + ["diff", str(llama["base"]), str(llama["ft1"]), "--json"], capture_output=True, text=True)
    d = json.loads(r.stdout)
    assert all(0 < t["relative"] < 1 and t["unchanged"] < 0.5 for t in d["tensors"])
    r = subprocess.run(cli + ["methods"], capture_output=True, text=True)
    for name in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "breadcrumbs",
                 "model_stock", "passthrough"):
        assert f"\n{name}  " in "\n" + r.stdout, name
    r = subprocess.run(cli + ["methods", "ties"], capture_output=True, text=True)
    assert "trim_scope" in r.stdout and "mergekit: 'tensor'" in r.stdout


def test_single_slice_prunes_layers(llama, tmp_path):
    r = {"merge_method": "passthrough", "dtype": "float32",
         "slices": [{"sources": [{"model": str(llama["ft1"]), "layer_range": [0, 2]}]}]}
    moerge.merge(r, tmp_path / "out")
    out, f1 = load_tensors(tmp_path / "out"), load_tensors(llama["ft1"])
    assert json.loads((tmp_path / "out/config.json").read_text())["num_hidden_layers"] == 2
    assert "model.layers.2.mlp.up_proj.weight" not in out
    assert torch.equal(out["lm_head.weight"], f1["lm_head.weight"])
    assert torch.equal(out["model.norm.weight"], f1["model.norm.weight"])
    generate(tmp_path / "out")


def test_model_stock_small_task_vectors_keep_their_angle():
    from test_methods_values import run

    base = torch.zeros(2000)
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(2000, generator=g) * 1e-6
    models = [shared + torch.randn(2000, generator=g) * 1e-6 for _ in range(2)]
    cos = float(torch.nn.functional.cosine_similarity(models[0], models[1], dim=0))
    t = 2 * cos / (1 + cos)
    out = run("model_stock", base, models)
    assert torch.allclose(out, t * (models[0] + models[1]) / 2, atol=1e-12)
    # mergekit floors the product of the norms at 1e-6, which sends tiny task vectors to the base
    mk = run("model_stock", base, models, conventions="mergekit", extra={"conventions": "mergekit"})
    assert float(mk.abs().max()) < 0.01 * float(out.abs().max())


def test_demo_runs_end_to_end(tmp_path):
    from moerge.demo import run_demo

    lines: list[str] = []
    table = run_demo(tmp_path / "demo", steps=3, pretrain_steps=3, echo=lines.append)
    assert set(table) == {"base", "expert-counting", "expert-alphabet", "expert-colors", "merged"}
    assert all(v > 0 for row in table.values() for v in row.values())
    assert (tmp_path / "demo/merged/model.safetensors").is_file()
    assert any("the merged model continues" in line for line in lines)
