"""PEFT LoRA adapters as merge inputs: ΔW = scale·B·A expanded per tensor, checked against PEFT itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moerge.errors import CheckpointError
from moerge.io.checkpoint import Checkpoint
from moerge.testing import make_llama, make_lora

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = make_llama(root / "base", seed=0, layers=2)
    return {"base": base,
            "a1": make_lora(base, root / "a1", seed=1, rank=4, alpha=8),
            "a2": make_lora(base, root / "a2", seed=2, rank=2, alpha=6, targets=("q_proj", "o_proj")),
            "rs": make_lora(base, root / "rs", seed=3, rank=4, alpha=4, use_rslora=True)}


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("name", ["a1", "a2", "rs"])
def test_adapter_reads_as_peft_merged_model(adapters: dict[str, Path], name: str) -> None:
    ck = Checkpoint.open(adapters[name])
    expected = _peft_merged(adapters["base"], adapters[name])
    assert set(ck.tensor_names) == set(expected)
    changed = 0
    for t in ck.tensor_names:
        got = ck.read(t).reshape(expected[t].shape).float()
        torch.testing.assert_close(got, expected[t].float(), rtol=1e-6, atol=1e-6)
        changed += int(not torch.equal(got, load_file(str(adapters["base"] / "model.safetensors"))[t].float()))
    assert changed == len(ck.pairs) > 0


def test_block_reads_match_whole_tensor(adapters: dict[str, Path]) -> None:
    ck = Checkpoint.open(adapters["a1"])
    name = next(iter(ck.pairs))
    whole = ck.read(name).reshape(-1)
    for start, count in [(0, 5), (7, 100), (31, 33), (whole.numel() - 9, 9)]:
        torch.testing.assert_close(ck.read(name, start, count), whole[start:start + count])


@pytest.mark.parametrize("which", ["base", "a1"])
def test_read_runs_equals_the_runs_of_the_whole_tensor(adapters: dict[str, Path], which: str) -> None:
    # the executor samples a tensor with read_runs: plain safetensors (one preadv per run) and adapters
    ck = Checkpoint.open(adapters[which])
    for name in ck.tensor_names:
        whole = ck.read(name).reshape(-1)
        n = whole.numel()
        runs = [(0, min(3, n)), (n // 3, n // 3 + 1), (n // 2, n), (n - 1, n), (5 % n, 5 % n)]
        expected = torch.cat([whole[s:e] for s, e in runs])
        got = ck.read_runs(name, runs)
        assert got.dtype == whole.dtype
        assert torch.equal(got, expected), name


def test_merging_adapters_merges_products_not_factors(adapters: dict[str, Path], tmp_path: Path) -> None:
    from moerge.api import merge

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: task_arithmetic\nbase_model: {adapters['base']}\nmodels:\n"
                      f"  - model: {adapters['a1']}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {adapters['a2']}\n    parameters: {{weight: 1.0}}\nparameters: {{lambda: 1.0}}\n")
    merge(recipe, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(adapters["base"] / "model.safetensors"))
    a1, a2 = Checkpoint.open(adapters["a1"]), Checkpoint.open(adapters["a2"])
    name = "model.layers.0.self_attn.q_proj.weight"  # adapted by both
    expected = base[name] + a1.delta(name) + a2.delta(name)
    torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)
    # the PEFT pitfall: averaging A and B separately is not the average of the products
    ad = load_file(str(adapters["a1"] / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    b, a = ad[f"{key}.lora_B.weight"], ad[f"{key}.lora_A.weight"]
    assert not torch.allclose((b * 0.5) @ (a * 0.5) * 2.0, b @ a * 2.0)
    untouched = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(out[untouched], base[untouched])


def test_adapter_errors(adapters: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "nobase"
    shutil.copytree(adapters["a1"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "missing-base")
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="base model .* is not available locally"):
        Checkpoint.open(bad)
    cfg["base_model_name_or_path"] = str(adapters["base"])
    cfg["use_dora"] = True
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="DoRA"):
        Checkpoint.open(bad)
    other = make_llama(tmp_path / "wide", seed=0, layers=2, hidden=48, heads=4)
    cfg["use_dora"] = False
    cfg["base_model_name_or_path"] = str(other)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not fit the base weight"):
        Checkpoint.open(bad)


def test_extract_lora_round_trip_and_energy(adapters: dict[str, Path], tmp_path: Path) -> None:
    from moerge.api import merge
    from moerge.extract import extract_lora

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: task_arithmetic\nbase_model: {adapters['base']}\n"
                      f"models: [{adapters['a1']}, {adapters['a2']}]\nparameters: {{lambda: 0.5}}\n")
    merge(recipe, tmp_path / "merged")
    # q_proj carries two rank-4 and rank-2 updates: rank 6 is exact, rank 1 is not
    full = extract_lora(tmp_path / "merged", adapters["base"], tmp_path / "lora6", rank=6)
    assert full.discarded < 1e-9 and not full.not_representable
    merged, back = Checkpoint.open(tmp_path / "merged"), Checkpoint.open(tmp_path / "lora6")
    for name in merged.tensor_names:
        torch.testing.assert_close(back.read(name).reshape(merged.info(name).shape).float(),
                                   merged.read(name).float(), rtol=1e-5, atol=1e-5)
    low = extract_lora(tmp_path / "merged", adapters["base"], tmp_path / "lora1", rank=1)
    d = Checkpoint.open(tmp_path / "merged").read("model.layers.0.self_attn.q_proj.weight").double() - \
        Checkpoint.open(adapters["base"]).read("model.layers.0.self_attn.q_proj.weight").double()
    s = torch.linalg.svdvals(d)
    expected = 1 - float(s[0] ** 2 / (s**2).sum())
    assert low.tensors["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(expected, rel=1e-9)
    assert 0 < low.discarded < 1
    # the adapter loads in PEFT
    assert _peft_merged(adapters["base"], tmp_path / "lora1")["model.layers.0.self_attn.q_proj.weight"].shape == d.shape


def test_extract_at_a_rank_above_a_layers_width_loads_in_peft(adapters: dict[str, Path], tmp_path: Path) -> None:
    from moerge.extract import extract_lora

    # v_proj is 16 x 32: a rank-20 adapter stores its rank-16 factors zero-padded to the adapter's rank
    rep = extract_lora(adapters["a1"], adapters["base"], tmp_path / "wide", rank=20)
    assert rep.discarded < 1e-9
    a = load_file(str(tmp_path / "wide" / "adapter_model.safetensors"))
    assert a["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape == (20, 32)
    got = _peft_merged(adapters["base"], tmp_path / "wide")
    want = Checkpoint.open(adapters["a1"])
    for name in ("model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(got[name], want.read(name).float(), rtol=1e-5, atol=1e-5)


def test_merge_written_as_lora_adapter(adapters: dict[str, Path], tmp_path: Path) -> None:
    from moerge.api import merge

    recipe = (f"method: task_arithmetic\nbase_model: {adapters['base']}\n"
              f"models: [{adapters['a1']}, {adapters['a2']}]\nparameters: {{lambda: 0.5}}\n")
    res = merge(recipe, tmp_path / "adapter", lora_rank=6)
    assert (tmp_path / "adapter" / "adapter_config.json").exists() and "0.00%" in res.notes["lora"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the full merge was removed
    record = json.loads((tmp_path / "adapter" / "moerge_extract.json").read_text())
    want = f"task_arithmetic merge of {adapters['base']}, {adapters['a1']}, {adapters['a2']}"
    assert record["source"] == want  # not the staging folder, which is gone
    full = merge(recipe, tmp_path / "full")
    a, f = Checkpoint.open(tmp_path / "adapter"), Checkpoint.open(full.output)
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(a.read(name).reshape(f.info(name).shape), f.read(name).float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="already exists"):
        merge(recipe, tmp_path / "adapter", lora_rank=6)


def test_a_killed_lora_rank_merge_does_not_block_the_next_one(adapters: dict[str, Path], tmp_path: Path) -> None:
    # what a merge written as an adapter leaves when killed between the full merge and the factorisation
    import subprocess
    import sys

    from moerge.api import merge

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale = tmp_path / f".adapter.moerge-tmp-{dead}-full-merge"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"left by a killed merge")
    recipe = (f"method: task_arithmetic\nbase_model: {adapters['base']}\n"
              f"models: [{adapters['a1']}, {adapters['a2']}]\nparameters: {{lambda: 0.5}}\n")
    res = merge(recipe, tmp_path / "adapter", lora_rank=6)  # no --force needed
    assert res.output == tmp_path / "adapter" and (res.output / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # the stale staging folder is gone


def test_a_rank_above_every_layers_full_rank_is_refused_up_front(adapters: dict[str, Path], tmp_path: Path) -> None:
    from moerge.api import merge
    from moerge.errors import MoergeError
    from moerge.extract import extract_lora

    # the widest layer of the tiny model is 32 wide: rank 33 would only pad zeros (10**6 filled the disk)
    with pytest.raises(MoergeError, match=r"rank 33 is above the full rank of every layer .*\(the largest is 32\)"):
        extract_lora(adapters["a1"], adapters["base"], tmp_path / "x", rank=33)
    recipe = f"method: task_arithmetic\nbase_model: {adapters['base']}\nmodels: [{adapters['a1']}]\n"
    with pytest.raises(MoergeError, match="rank 1000000 is above"):
        merge(recipe, tmp_path / "y", lora_rank=10**6)
    assert not list(tmp_path.iterdir())


MODULES = [f"model.layers.{i}.{part}" for i in range(3) for part in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj",
            "mlp.down_proj", "mlp.experts.1.gate_proj")] + ["lm_head", "model.embed_tokens"]


@pytest.mark.parametrize("cfg", [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["model.layers.0.self_attn.q_proj", "down_proj"]},
    {"target_modules": r".*\.(q|k)_proj"},
    {"target_modules": r"model\.layers\.1\..*"},
    {"target_modules": ["q_proj", "gate_proj"], "layers_to_transform": [1, 2]},
    {"target_modules": ["q_proj", "gate_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [2], "layers_pattern": ["h", "layers"]},
    {"target_modules": ["q_proj", "up_proj"], "exclude_modules": ["layers.1.self_attn.q_proj"]},
    {"target_modules": ["proj"], "exclude_modules": r".*\.0\..*"},
    {"target_modules": ["lm_head", "embed_tokens"]},
    {"target_modules": ["q_proj", "up_proj"], "modules_to_save": ["up_proj"]},
])
def test_target_selection_is_pefts(cfg):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from moerge.io.peft import targeted

    peft_config = LoraConfig(**cfg)
    for module in MODULES:
        assert targeted(cfg, module) == bool(check_target_module_exists(peft_config, module)), (cfg, module)


def test_factors_of_modules_the_config_does_not_target_are_refused(adapters: dict[str, Path], tmp_path: Path) -> None:
    bad = shutil.copytree(adapters["a1"], tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    targets = sorted(cfg["target_modules"]) if isinstance(cfg["target_modules"], list) else ["q_proj", "v_proj"]
    cfg["target_modules"] = targets[:1]  # PEFT would build LoRA layers for this one only, and drop the rest
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="which the target_modules of .* do not select; PEFT would drop them"):
        Checkpoint.open(bad)


@pytest.mark.parametrize("edit", [{"layers_pattern": "(", "layers_to_transform": [0]}, {"modules_to_save": ["la[yer"]}])
def test_adapter_config_patterns_peft_compiles_are_checked(adapters: dict[str, Path], tmp_path: Path, edit) -> None:
    bad = shutil.copytree(adapters["a1"], tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(cfg | edit))
    with pytest.raises(CheckpointError, match="is not a valid regular expression"):
        Checkpoint.open(bad)


def test_a_model_without_matrices_has_no_rank_to_choose() -> None:
    from moerge.errors import MoergeError
    from moerge.extract import check_rank

    with pytest.raises(MoergeError, match="x has no matrix to factorise"):
        check_rank(1, [(4,), (2, 3, 4)], "x")
    check_rank(3, [(4,), (3, 8)], "x")  # rank 3 of a 3 × 8 matrix: fine
