"""Checkpoints, indexes, configs and adapters written by an attacker or a careless user: one CheckpointError
naming the file and what was expected, never a Python exception from deep inside (issue 16, file campaign)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moerge
from conftest import recipe
from moerge.errors import CheckpointError
from moerge.io.checkpoint import open_source


def _safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize(("header", "data", "expected"), ids=["deep", "digits", "nan", "no-tensor-data", "empty", "utf8"], argvalues=[
    (b"[" * 100_000 + b"]" * 100_000, b"", "corrupt safetensors header: invalid JSON (nested too deeply)"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"4" * 5000 + b"]}}", b"\0" * 4,
     "an integer of 5000 digits"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, NaN]}}', b"\0" * 4, "NaN is not a JSON number"),
    (b"{}", b"\0" * 64, "corrupt file: 64 bytes but its header lists no tensor"),
    (b"{}", b"", "holds no tensors"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}\xff', b"\0" * 4, "not UTF-8 text"),
])
def test_corrupt_safetensors_headers(tmp_path, header, data, expected):
    f = _safetensors(tmp_path / "m" / "model.safetensors", header, data)
    with pytest.raises(CheckpointError) as e:
        open_source(f.parent)
    assert str(f) in str(e.value) and expected in str(e.value), str(e.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_place_of_weights_is_refused_not_read(tmp_path):
    (tmp_path / "m").mkdir()
    os.mkfifo(tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: not a regular file"):
        open_source(tmp_path / "m")


@pytest.mark.parametrize(("config", "expected"), ids=["list", "string", "deep"], argvalues=[
    ("[1, 2]", "expected a JSON object, found a list"),
    ('"llama"', "expected a JSON object, found a string"),
    ('{"a": ' * 50_000 + "1" + "}" * 50_000, "invalid JSON (nested too deeply)"),
])
def test_a_config_that_is_not_an_object(llama, tmp_path, config, expected):
    bad = shutil.copytree(llama["base"], tmp_path / "bad")  # the base's config is the one the output follows
    (bad / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=r"bad/config\.json: " + expected.replace("(", r"\(").replace(")", r"\)")):
        moerge.merge(recipe("task_arithmetic", bad, [llama["ft1"]]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("index", "expected"), [
    ({"weight_map": {"w": 3}}, "the shard of 'w' must be str, found a number"),
    ({"weight_map": ["model.safetensors"]}, "'weight_map' must be dict, found a list"),
    ({"metadata": {}}, "'weight_map' must be dict, found null"),
])
def test_corrupt_indexes(llama, tmp_path, index, expected):
    bad = shutil.copytree(llama["base"], tmp_path / "bad")
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: corrupt index file: " + expected):
        open_source(bad)


def test_a_deep_index(llama, tmp_path):
    bad = shutil.copytree(llama["base"], tmp_path / "bad")
    (bad / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match=r"index\.json: invalid JSON \(nested too deeply\)"):
        open_source(bad)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    from moerge.extract import extract_lora
    from moerge.testing import make_llama, perturb

    root = tmp_path_factory.mktemp("hostile_adapter")
    base = make_llama(root / "base", seed=0, layers=1)
    return extract_lora(perturb(base, root / "tuned", seed=1, scale=0.1), base, root / "lora", rank=4).output


@pytest.mark.parametrize(("edit", "expected"), [
    ({"r": 0}, "'r' must be at least 1, found 0"),
    ({"r": "x"}, "'r' must be int, found a string"),
    ({"r": True}, "'r' must be int, found a boolean"),
    ({"lora_alpha": [1]}, "'lora_alpha' must be int or float, found a list"),
    ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be at least 1"),
    ({"rank_pattern": {"(": 4}}, "not a valid regular expression"),
    ({"r": 8}, "have rank 4, but .*adapter_config.json gives r = 8"),  # a scale that would be silently wrong
    ({"base_model_name_or_path": 7}, "'base_model_name_or_path' must be str, found a number"),
])
def test_adapter_configs_that_do_not_fit_their_factors(adapter, tmp_path, edit, expected):
    bad = shutil.copytree(adapter, tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(cfg | edit))
    with pytest.raises(CheckpointError, match=expected):
        open_source(bad)


@pytest.mark.parametrize("change", ["absent", "wrong shard", "unlisted"])
def test_an_index_that_disagrees_with_its_shards(llama_bf16, tmp_path, change):
    bad = shutil.copytree(llama_bf16["base"], tmp_path / "bad")
    index_path = bad / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wm = index["weight_map"]
    shards = sorted(set(wm.values()))
    assert len(shards) > 1
    name = next(iter(wm))
    if change == "absent":
        wm["model.layers.9.mlp.up_proj.weight"] = shards[0]
        expected = "lists tensor 'model.layers.9.mlp.up_proj.weight' in .*, which does not hold it"
    elif change == "wrong shard":
        wm[name] = next(s for s in shards if s != wm[name])
        expected = f"lists tensor '{name}' in .*, but it is in"
    else:
        del wm[name]
        expected = f"does not list 1 tensor\\(s\\) its shards hold \\(e.g. '{name}'"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=expected):
        open_source(bad)


def test_a_shard_replaced_after_planning_is_an_error_not_a_stale_read(llama, tmp_path, monkeypatch):
    import moerge.engine.plan as planning

    work = shutil.copytree(llama["ft1"], tmp_path / "ft1")
    real = planning.make_plan

    def plan_then_replace(*args, **kwargs):
        plan = real(*args, **kwargs)
        # another process saves a new version of the expert: a new file renamed over the old one
        shutil.copy(llama["ft2"] / "model.safetensors", work / "new.safetensors")
        os.replace(work / "new.safetensors", work / "model.safetensors")
        return plan

    monkeypatch.setattr(planning, "make_plan", plan_then_replace)
    with pytest.raises(CheckpointError, match=r"ft1/model\.safetensors: changed since its header was read"):
        moerge.merge(recipe("task_arithmetic", llama["base"], [work]), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft1"]  # no output, no temporary


def test_a_file_rewritten_in_place_after_its_header_was_read(llama, tmp_path):
    work = shutil.copytree(llama["ft1"], tmp_path / "ft1")
    ck = open_source(work)
    data = (work / "model.safetensors").read_bytes()
    with open(work / "model.safetensors", "wb") as fh:  # same inode, new contents (and time)
        fh.write(data[:-16])
    with pytest.raises(CheckpointError, match="changed since its header was read"):
        ck.read(ck.tensor_names[0])
    ck.close()


_TRUNCATE_WHILE_MAPPED = """
import os, sys
from pathlib import Path
import moerge.io.safetensors_format as st
from moerge.cli import main

real_map, done = st.SafetensorsReader.map, []

def map_then_truncate(self, name):
    t = real_map(self, name)
    if not done and t.numel() >= 1024 and "ft1" in str(self.path):  # another process cuts the file short
        done.append(1)
        os.truncate(self.path, 4096)
    return t

st.SafetensorsReader.map = map_then_truncate
sys.argv = ["moerge", "merge", sys.argv[1], sys.argv[2]]
main()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGBUS as on Linux")
def test_an_input_truncated_while_mapped_is_a_message_not_a_bare_bus_error(llama, tmp_path):
    from moerge import native

    if not native.available():
        pytest.skip("inputs are only mapped for the native kernels")
    work = shutil.copytree(llama["ft1"], tmp_path / "ft1")
    rec = tmp_path / "r.yaml"
    rec.write_text(json.dumps(recipe("task_arithmetic", llama["base"], [work])))
    proc = subprocess.run([sys.executable, "-c", _TRUNCATE_WHILE_MAPPED, str(rec), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 135, (proc.returncode, proc.stderr[-2000:])  # 128 + SIGBUS, like the signal
    assert re.search(r"error: \S*ft1/model\.safetensors: shrank or became unreadable while moerge had it mapped",
                     proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    shutil.copy(llama["ft1"] / "model.safetensors", work / "model.safetensors")  # the file is whole again
    moerge.merge(recipe("task_arithmetic", llama["base"], [work]), tmp_path / "out")  # the rerun succeeds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft1", "out", "r.yaml"]  # its temporary removed


@pytest.mark.parametrize("change", ["rewritten in place", "deleted"])
def test_an_input_changed_after_it_was_read_is_caught_before_publishing(llama, tmp_path, monkeypatch, change):
    import moerge.api as api

    work = shutil.copytree(llama["ft1"], tmp_path / "ft1")
    shard = work / "model.safetensors"
    real = api._write_side_files

    def side_files_then_change(*args, **kwargs):
        # every tensor was read through descriptors opened before: they would not notice
        if change == "deleted":
            shard.unlink()
        else:
            with open(shard, "r+b") as fh:
                fh.seek(-8, os.SEEK_END)
                fh.write(b"\x01" * 8)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "_write_side_files", side_files_then_change)
    word = "was deleted" if change == "deleted" else "changed"
    with pytest.raises(CheckpointError, match=rf"ft1/model\.safetensors: {word} while the merge read it"):
        moerge.merge(recipe("task_arithmetic", llama["base"], [work]), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft1"]


@pytest.mark.parametrize("rename", ["a factor's name damaged", "a foreign tensor"])
def test_adapter_tensors_that_are_neither_factors_nor_base_tensors_are_refused(adapter, tmp_path, rename):
    # found by the fuzzer: one byte of a header turned 'v_proj.lora_A' into 'v_proj,lora_A'; the B factor was
    # then ignored and the damaged name added to the model as a new tensor (PEFT drops such keys)
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(adapter, tmp_path / "bad")
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    a = next(k for k in sorted(tensors) if ".lora_A." in k)
    if rename == "a factor's name damaged":
        tensors[a.replace(".lora_A", ",lora_A")] = tensors.pop(a)
        expected = "has no matching"
    else:
        tensors["base_model.model.model.extra.weight"] = torch.zeros(2)
        expected = "neither a LoRA factor nor a tensor of the base model"
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=expected):
        open_source(bad)
