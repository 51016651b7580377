"""Bad input: one readable message naming the file and tensor, a non-zero exit, nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import moerge
from conftest import load_tensors, recipe
from moerge.errors import CheckpointError, NonFiniteError, OutputError, PlanError, RecipeError, UnknownMethodError


def edit_model(src: Path, dst: Path, fn) -> Path:
    """Copy a single-file model and rewrite its tensors with ``fn(dict) -> dict``."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file(fn(tensors), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def only_output_siblings(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name == "out")


def test_missing_tensor_names_tensor_and_file(llama, tmp_path):
    bad = edit_model(llama["ft1"], tmp_path / "bad", lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up" not in k})
    with pytest.raises(PlanError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing from .*bad") as e:
        moerge.merge(recipe("ties", llama["base"], [bad]), tmp_path / "out")
    assert "model.safetensors" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_both_files_and_shapes(llama, tmp_path):
    def shrink(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:, :16].contiguous()
        return t

    bad = edit_model(llama["ft1"], tmp_path / "bad", shrink)
    with pytest.raises(PlanError) as e:
        moerge.merge(recipe("task_arithmetic", llama["base"], [bad]), tmp_path / "out")
    msg = str(e.value)
    assert "shape mismatch in 'model.layers.0.mlp.up_proj.weight'" in msg
    assert "[64, 32]" in msg and "[64, 16]" in msg and str(llama["base"]) in msg and "bad" in msg


def test_vocab_mismatch_is_an_error_unless_policy(llama, tmp_path):
    def grow(t):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            t[k] = torch.cat([t[k], torch.full((4, t[k].shape[1]), 7.0)])
        return t

    big = edit_model(llama["ft1"], tmp_path / "big", grow)
    with pytest.raises(PlanError, match="vocabulary size mismatch.*64 rows.*68"):
        moerge.merge(recipe("task_arithmetic", llama["base"], [big]), tmp_path / "out")
    res = moerge.merge(recipe("task_arithmetic", llama["base"], [big], vocab_policy="base"), tmp_path / "out")
    assert any("68 rows" in w for w in res.warnings)
    out = load_tensors(tmp_path / "out")
    assert out["model.embed_tokens.weight"].shape == (64, 32)
    assert torch.equal(out["model.embed_tokens.weight"], load_tensors(llama["ft1"])["model.embed_tokens.weight"])


def test_vocab_policy_pads_smaller_expert_with_base_rows(llama, tmp_path):
    small = edit_model(llama["ft1"], tmp_path / "small", lambda t: {
        k: (v[:60].contiguous() if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in t.items()})
    moerge.merge(recipe("task_arithmetic", llama["base"], [small], vocab_policy="base"), tmp_path / "out")
    out, base, ft = load_tensors(tmp_path / "out"), load_tensors(llama["base"]), load_tensors(llama["ft1"])
    e = "model.embed_tokens.weight"
    assert torch.equal(out[e][60:], base[e][60:]) and torch.allclose(out[e][:60], ft[e][:60])


def test_nan_input_names_tensor(llama, tmp_path):
    def poison(t):
        t["model.layers.2.self_attn.v_proj.weight"][0, 0] = float("nan")
        return t

    bad = edit_model(llama["ft2"], tmp_path / "bad", poison)
    with pytest.raises(NonFiniteError, match=r"'model\.layers\.2\.self_attn\.v_proj\.weight'.*bad.*holds NaN/Inf \(first at flat index 0\)"):
        moerge.merge(recipe("ties", llama["base"], [llama["ft1"], bad]), tmp_path / "out")
    assert only_output_siblings(tmp_path) == []
    moerge.merge(recipe("linear", None, [llama["ft1"], bad]), tmp_path / "out", allow_nonfinite=True,
                 dry_run=True)


def test_int_vs_float_dtype_mismatch(llama, tmp_path):
    def to_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)
        return t

    bad = edit_model(llama["ft1"], tmp_path / "bad", to_int)
    with pytest.raises(PlanError, match="dtype mismatch in 'model.norm.weight'.*int32"):
        moerge.merge(recipe("linear", None, [llama["ft2"], bad]), tmp_path / "out")


def test_mixed_float_dtypes_merge(llama, tmp_path):
    half = edit_model(llama["ft1"], tmp_path / "half", lambda t: {k: v.half() for k, v in t.items()})
    moerge.merge(recipe("linear", None, [llama["ft2"], half]), tmp_path / "out")
    assert all(t.dtype == torch.float32 for t in load_tensors(tmp_path / "out").values())


def test_unknown_method_suggests(llama, tmp_path):
    with pytest.raises(UnknownMethodError, match="unknown merge method 'tie'.*did you mean 'ties'"):
        moerge.merge(recipe("tie", llama["base"], [llama["ft1"]]), tmp_path / "out")


def test_unknown_parameter_suggests_with_line(llama, tmp_path):
    (tmp_path / "r.yaml").write_text(f"""method: ties
base_model: {llama['base']}
models:
  - model: {llama['ft1']}
    parameters:
      denisty: 0.5
""")
    with pytest.raises(PlanError, match=r"r\.yaml:6: ties has no parameter 'denisty' \(did you mean 'density'\?\)"):
        moerge.merge(str(tmp_path / "r.yaml"), tmp_path / "out")


def test_global_parameter_given_per_model(llama, tmp_path):
    r = recipe("ties", llama["base"], [llama["ft1"]], model_params=[{"lambda": 2.0}])
    with pytest.raises(PlanError, match="'lambda' is a global parameter"):
        moerge.merge(r, tmp_path / "out")


def test_parameter_out_of_range(llama, tmp_path):
    with pytest.raises(PlanError, match="density must be <= 1.0, got 1.5"):
        moerge.merge(recipe("ties", llama["base"], [llama["ft1"]], params={"density": 1.5}), tmp_path / "out")
    with pytest.raises(PlanError, match="trim_scope expected one of model, tensor"):
        moerge.merge(recipe("ties", llama["base"], [llama["ft1"]], params={"trim_scope": "layer"}), tmp_path / "out")


def test_recipe_key_typo_has_line_and_suggestion(tmp_path):
    (tmp_path / "r.yaml").write_text("method: ties\nbase_model: a\nmodles:\n  - model: b\n")
    with pytest.raises(RecipeError) as e:
        moerge.merge(str(tmp_path / "r.yaml"), tmp_path / "out")
    assert "r.yaml:3: unknown key 'modles' (did you mean 'models'?)" in str(e.value)


def test_recipe_invalid_yaml_has_line(tmp_path):
    (tmp_path / "r.yaml").write_text("method: ties\nmodels: [a, b\nparameters: {}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: invalid YAML"):
        moerge.merge(str(tmp_path / "r.yaml"), tmp_path / "out")


def test_method_needs_base(llama, tmp_path):
    with pytest.raises(PlanError, match="ties needs a 'base_model'"):
        moerge.merge(recipe("ties", None, [llama["ft1"]]), tmp_path / "out")
    with pytest.raises(PlanError, match="slerp takes at most 1 model"):
        moerge.merge(recipe("slerp", llama["base"], [llama["ft1"], llama["ft2"]]), tmp_path / "out")


def test_corrupt_header_names_file(llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama["ft1"], bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[20:40] = b"\x00garbage{{{{{{{{{{{{"
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"bad/model\.safetensors: corrupt safetensors header"):
        moerge.merge(recipe("linear", None, [bad]), tmp_path / "out")


def test_truncated_file_names_file(llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama["ft1"], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"(?s)model\.safetensors: corrupt header entry for tensor .*truncated"):
        moerge.merge(recipe("linear", None, [bad]), tmp_path / "out")


def test_file_truncated_after_it_was_opened_names_file(llama, tmp_path):
    # inputs are mapped from the page cache; a mapping past the end of a file would kill the process
    # (SIGBUS) on first touch instead of raising
    from moerge.io.checkpoint import Checkpoint

    bad = tmp_path / "bad"
    shutil.copytree(llama["ft1"], bad)
    ck = Checkpoint.open(bad)
    name = ck.tensor_names[-1]
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 8])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: file shorter than its header says \(tensor {name!r}\)"):
        ck.map(name)
    ck.close()


def test_index_pointing_to_missing_shard(llama_bf16, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama_bf16["ft1"], bad)
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {shard.name}, which does not exist"):
        moerge.merge(recipe("linear", None, [bad]), tmp_path / "out")


def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match="does-not-exist: no such file or directory"):
        moerge.merge(recipe("linear", None, [tmp_path / "does-not-exist"]), tmp_path / "out")


def test_repo_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="org/model: not a local path, and not found in the Hugging Face cache"):
        moerge.merge(recipe("linear", None, ["org/model"]), tmp_path / "out")


def test_repo_id_resolved_from_cache(llama, tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--org--model" / "snapshots" / "abc123"
    shutil.copytree(llama["ft1"], snap)
    (tmp_path / "hub/models--org--model/refs").mkdir()
    (tmp_path / "hub/models--org--model/refs/main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    moerge.merge(recipe("linear", None, ["org/model"]), tmp_path / "out")
    assert torch.equal(load_tensors(tmp_path / "out")["lm_head.weight"], load_tensors(llama["ft1"])["lm_head.weight"])


def test_pickle_needs_opt_in(llama, tmp_path):
    d = tmp_path / "binmodel"
    d.mkdir()
    shutil.copy(llama["ft1"] / "config.json", d)
    torch.save(load_file(llama["ft1"] / "model.safetensors"), d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled PyTorch checkpoint; moerge does not unpickle"):
        moerge.merge(recipe("linear", None, [d]), tmp_path / "out")
    moerge.merge(recipe("linear", None, [d]), tmp_path / "out", allow_pickle=True)
    assert torch.equal(load_tensors(tmp_path / "out")["lm_head.weight"], load_tensors(llama["ft1"])["lm_head.weight"])


def test_existing_output_needs_force(llama, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        moerge.merge(recipe("linear", None, [llama["ft1"]]), tmp_path / "out")


def test_not_enough_disk_space_is_detected_up_front(llama, tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(PlanError, match="not enough disk space"):
        moerge.merge(recipe("linear", None, [llama["ft1"]]), tmp_path / "out")
    assert only_output_siblings(tmp_path) == []


def test_disk_full_during_write_cleans_up(llama, tmp_path, monkeypatch):
    from moerge.io.writer import ModelWriter

    calls = {"n": 0}
    real = ModelWriter._write_all

    def flaky(self, data):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(ModelWriter, "_write_all", flaky)
    with pytest.raises(OutputError, match="disk full while writing"):
        moerge.merge(recipe("linear", None, [llama["ft1"]]), tmp_path / "out")
    assert only_output_siblings(tmp_path) == []


def test_cli_error_is_one_message_without_traceback(llama, tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe("ties", llama["base"], [llama["ft1"]], params={"densty": 0.5})))
    r = subprocess.run([sys.executable, "-m", "moerge", "merge", str(tmp_path / "r.yaml"), str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "error:" in r.stderr and "did you mean 'density'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "moerge", "--debug", "merge", str(tmp_path / "r.yaml"),
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_cli_missing_recipe_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "moerge", "merge", str(tmp_path / "nope.yaml"), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "recipe file not found" in r.stderr and "Traceback" not in r.stderr


def test_mergekit_unsupported_features_are_explained(llama, tmp_path):
    r = {"merge_method": "linear", "models": [{"model": str(llama["ft1"]) + "+some/lora"}]}
    with pytest.raises(RecipeError, match="model\\+lora"):
        moerge.merge(r, tmp_path / "out")


def test_allow_nonfinite_writes_nan_through(llama, tmp_path):
    def poison(t):
        t["model.norm.weight"][0] = float("nan")
        return t

    bad = edit_model(llama["ft1"], tmp_path / "bad", poison)
    moerge.merge(recipe("task_arithmetic", llama["base"], [bad]), tmp_path / "out", allow_nonfinite=True)
    assert torch.isnan(load_tensors(tmp_path / "out")["model.norm.weight"][0])


def test_overflow_in_output_dtype_is_an_error(llama, tmp_path):
    r = recipe("task_arithmetic", llama["base"], [llama["ft1"]], params={"lambda": 1e38}, dtype="float16")
    with pytest.raises(NonFiniteError, match="overflow float16"):
        moerge.merge(r, tmp_path / "out")
    assert only_output_siblings(tmp_path) == []


def test_linear_weights_summing_to_about_zero(llama, tmp_path):
    r = recipe("linear", None, [llama["ft1"], llama["ft2"], llama["ft3"]],
               model_params=[{"weight": 0.1}, {"weight": 0.2}, {"weight": -0.3}])
    with pytest.raises(PlanError, match="weights sum to zero"):
        moerge.merge(r, tmp_path / "out")


def test_whole_model_trim_needs_one_density_per_model(llama, tmp_path):
    r = recipe("ties", llama["base"], [llama["ft1"]], model_params=[{"density": [0.2, 0.8]}])
    with pytest.raises(PlanError, match="model 1 gets"):
        moerge.merge(r, tmp_path / "out", dry_run=True)
    r = recipe("ties", llama["base"], [llama["ft1"]], params={"trim_scope": [{"filter": "mlp", "value": "tensor"}]})
    with pytest.raises(PlanError, match="applies to the whole merge"):
        moerge.merge(r, tmp_path / "out", dry_run=True)


def test_slices_honour_vocab_policy(llama, tmp_path):
    small = edit_model(llama["ft2"], tmp_path / "small", lambda t: {
        k: (v[:60].contiguous() if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in t.items()})
    r = {"method": "passthrough", "vocab_policy": "base", "slices": [
        {"sources": [{"model": str(llama["ft1"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(small), "layer_range": [2, 3]}]}]}
    with pytest.raises(PlanError, match="vocabulary size mismatch"):
        moerge.merge(dict(r, vocab_policy="error"), tmp_path / "out")
    moerge.merge(r, tmp_path / "out")
    assert load_tensors(tmp_path / "out")["lm_head.weight"].shape == (64, 32)


@pytest.mark.parametrize("entry", [{"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
                                   {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]},
                                   {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}])
def test_malformed_header_entries(tmp_path, entry):
    import struct

    header = json.dumps({"x": entry}).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match="corrupt header entry for tensor 'x'"):
        moerge.inspect(tmp_path / "m.safetensors")


def test_header_with_gap_between_tensors(tmp_path):
    import struct

    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                         "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(CheckpointError, match="gap of 4 bytes before tensor 'b'"):
        moerge.inspect(tmp_path / "m.safetensors")


def test_bad_shard_size():
    from moerge.io.writer import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500M") == 5 * 10**8
    with pytest.raises(OutputError, match="cannot read size"):
        parse_size("1.5.3GB")


def test_forced_replacement_interrupted_between_renames_is_recovered(llama, tmp_path):
    from moerge.io.publish import clean_stale_temp_dirs

    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("old")
    # what a crash between the two renames of a non-exchanging replacement leaves behind
    os.rename(out, tmp_path / ".out.moerge-tmp-999999999-old-abc123")
    clean_stale_temp_dirs(out)
    assert (out / "marker").read_text() == "old"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_requested_without_cuda(llama, tmp_path):
    with pytest.raises(PlanError, match="CUDA is not available"):
        moerge.merge(recipe("linear", None, [llama["ft1"]]), tmp_path / "out", device="cuda")
    assert only_output_siblings(tmp_path) == []


def test_auto_device_merges(llama, tmp_path):
    moerge.merge(recipe("linear", None, [llama["ft1"]]), tmp_path / "out", device="auto")
    assert torch.equal(load_tensors(tmp_path / "out")["lm_head.weight"], load_tensors(llama["ft1"])["lm_head.weight"])


def test_failed_plans_and_merges_close_every_checkpoint(llama, tmp_path, monkeypatch):
    # a long-running process (a git filter, a worker) must not keep a file open per failed merge: every
    # reader opened is closed when the merge fails, not later by the garbage collector
    from moerge.io.safetensors_format import SafetensorsReader

    opened: list[SafetensorsReader] = []  # held here, so only an explicit close can close them
    init = SafetensorsReader.__init__

    def tracking_init(self, path):
        init(self, path)
        opened.append(self)

    monkeypatch.setattr(SafetensorsReader, "__init__", tracking_init)
    bad = edit_model(llama["ft1"], tmp_path / "bad", lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up" not in k})
    nan = edit_model(llama["ft2"], tmp_path / "nan", lambda t: {k: (v * float("nan") if "layers.0.mlp.up" in k else v)
                                                                for k, v in t.items()})
    for models, error in (([llama["ft1"], nan], NonFiniteError),  # fails while merging
                          ([llama["ft1"], bad], PlanError),  # fails while planning
                          ([llama["ft1"], tmp_path / "missing"], CheckpointError)):  # fails while opening
        opened.clear()
        with pytest.raises(error):
            moerge.merge(recipe("ties", llama["base"], models), tmp_path / "out")
        assert opened and not any(r.is_open for r in opened), error.__name__
    assert not (tmp_path / "out").exists()


def test_tokenizer_keys_without_any_tokenizer_are_warned_about(llama, tmp_path):
    text = (f"merge_method: linear\nmodels:\n  - model: {llama['ft1']}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {llama['ft2']}\n    parameters: {{weight: 1.0}}\nchat_template: chatml\n"
            f"tokenizer:\n  source: base\n  pad_to_multiple_of: 64\n")
    res = moerge.merge(text, tmp_path / "out", dry_run=True)
    assert any("chat template is not saved" in w and ":7" in w for w in res.warnings)
    assert any("no model has tokenizer files" in w and ":8" in w for w in res.warnings)
    plain = text.split("chat_template")[0]
    assert not moerge.merge(plain, tmp_path / "out", dry_run=True).warnings


def test_eval_reads_a_recipe_with_the_recipe_loader(tmp_path):
    from click.testing import CliRunner

    from moerge.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("method: ties\nbase_model: ./base\nmodels:\n  - model: ./a\ndensty: 0.5\n")
    res = CliRunner().invoke(main, ["eval", str(bad), "--zoo", str(tmp_path / "zoo"), "--results", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert "bad.yaml:5" in res.output and "densty" in res.output


def test_the_output_may_not_be_one_of_the_inputs(llama, tmp_path):
    from moerge.extract import extract_lora

    work = shutil.copytree(llama["ft1"], tmp_path / "ft1")
    before = (work / "model.safetensors").read_bytes()
    for out in (work, tmp_path):  # the input's own folder, and a folder that holds it
        with pytest.raises(OutputError, match="holds an input of this merge"):
            moerge.merge(recipe("task_arithmetic", llama["base"], [work]), out, force=True)
        with pytest.raises(OutputError, match="holds an input of this merge"):
            extract_lora(work, llama["base"], out, force=True)
    assert (work / "model.safetensors").read_bytes() == before
