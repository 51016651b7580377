"""Containment (issue 16): nothing is read from outside a model folder unless the user asks — index entries
that are absolute or climb out with ``..``, and links (weights, config, tokenizer, adapter files) that lead
out, are refused before anything of the target is read; the Hugging Face cache's snapshot links are not."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import moerge
from conftest import recipe
from moerge.cli import main
from moerge.errors import CheckpointError
from moerge.io.checkpoint import open_source
from moerge.io.containment import boundaries, member

SECRET = "SECRET-TOKEN-4242"


@pytest.fixture
def secret(tmp_path) -> Path:
    p = tmp_path / "private" / "id_token"
    p.parent.mkdir()
    p.write_text(SECRET + "\n")
    return p


def _sharded(llama_bf16, tmp_path) -> tuple[Path, dict, Path]:
    m = shutil.copytree(llama_bf16["base"], tmp_path / "m")
    index_path = m / "model.safetensors.index.json"
    return m, json.loads(index_path.read_text()), index_path


def _move_shard_out(m: Path, index: dict, index_path: Path, elsewhere: Path, entry) -> str:
    """Move the first shard to ``elsewhere`` and point the index at it with ``entry(new_path)``."""
    shard = sorted(set(index["weight_map"].values()))[0]
    elsewhere.mkdir(parents=True, exist_ok=True)
    shutil.move(m / shard, elsewhere / shard)
    new = entry(elsewhere / shard)
    index["weight_map"] = {k: (new if v == shard else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return new


@pytest.mark.parametrize("kind", ["absolute", "dotdot"])
def test_an_index_entry_outside_the_folder_is_refused_and_allowed_on_request(llama_bf16, tmp_path, kind):
    m, index, index_path = _sharded(llama_bf16, tmp_path)
    new = _move_shard_out(m, index, index_path, tmp_path / "elsewhere",
                          (lambda p: str(p)) if kind == "absolute" else (lambda p: f"../elsewhere/{p.name}"))
    expected = "an absolute path" if kind == "absolute" else "which leaves the model folder"
    with pytest.raises(CheckpointError, match=expected) as e:
        open_source(m)
    assert str(index_path) in str(e.value) and new in str(e.value)
    assert "--allow-external-files" in (e.value.hint or "")
    with open_source(m, allow_external_files=True) as ck:  # the user keeps shards elsewhere on purpose
        assert any(f.parent.name == "elsewhere" for f in ck.files)
        for name in ck.tensor_names:
            ck.read(name)


def test_an_index_entry_naming_a_secret_never_echoes_it(llama_bf16, tmp_path, secret):
    m, index, index_path = _sharded(llama_bf16, tmp_path)
    rel = os.path.relpath(secret, m)
    index["weight_map"] = {k: rel for k in index["weight_map"]}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        moerge.merge(recipe("linear", None, [m, m]), tmp_path / "out")
    assert "leaves the model folder" in str(e.value) and SECRET not in str(e.value) + str(e.value.hint)
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_linked_to_a_secret_is_not_copied_into_the_output(llama, tmp_path, secret):
    base = shutil.copytree(llama["base"], tmp_path / "base")
    (base / "tokenizer.json").unlink(missing_ok=True)
    (base / "tokenizer.json").symlink_to(secret)
    rec = recipe("task_arithmetic", base, [llama["ft1"]])
    with pytest.raises(CheckpointError, match=r"base/tokenizer\.json: a link to .*id_token, outside the model "
                                              "folder") as e:
        moerge.merge(rec, tmp_path / "out")
    assert SECRET not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    moerge.merge(rec, tmp_path / "out", allow_external_files=True)  # asked for: followed
    assert (tmp_path / "out" / "tokenizer.json").read_text().startswith(SECRET)


@pytest.mark.parametrize("file", ["model.safetensors", "config.json", "generation_config.json"])
def test_weights_and_config_links_out_of_the_folder(llama, tmp_path, file):
    m = shutil.copytree(llama["base"], tmp_path / "m")
    outside = tmp_path / "other" / file
    outside.parent.mkdir()
    (m / file).write_text("{}") if not (m / file).exists() else None
    shutil.move(m / file, outside)
    (m / file).symlink_to(outside)
    with pytest.raises(CheckpointError, match=f"m/{file}: a link to .*other/{file}, outside the model folder"):
        moerge.merge(recipe("task_arithmetic", m, [llama["ft1"]]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_links_inside_the_folder_and_a_linked_folder_are_fine(llama, tmp_path):
    m = shutil.copytree(llama["base"], tmp_path / "m")
    (m / "store").mkdir()
    shutil.move(m / "model.safetensors", m / "store" / "weights.safetensors")
    (m / "model.safetensors").symlink_to("store/weights.safetensors")
    (tmp_path / "alias").symlink_to(m)  # a folder that is itself a link
    res = moerge.merge(recipe("task_arithmetic", tmp_path / "alias", [llama["ft1"]]), tmp_path / "out")
    assert res.output is not None and (res.output / "config.json").is_file()


def test_a_dangling_link_out_of_the_folder_is_refused(llama, tmp_path):
    m = shutil.copytree(llama["base"], tmp_path / "m")
    (m / "tokenizer_config.json").unlink(missing_ok=True)
    (m / "tokenizer_config.json").symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(CheckpointError, match="outside the model folder"):
        member(m, "tokenizer_config.json")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_tokenizer_is_refused_not_read(llama, tmp_path):
    base = shutil.copytree(llama["base"], tmp_path / "base")
    (base / "tokenizer.json").unlink(missing_ok=True)
    os.mkfifo(base / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a regular file"):
        moerge.merge(recipe("task_arithmetic", base, [llama["ft1"]]), tmp_path / "out")


def _hub_cache(model: Path, cache: Path, org: str = "acme", name: str = "tiny") -> Path:
    """``model`` laid out as the Hugging Face hub cache does: blobs, and a snapshot of links to them."""
    repo = cache / f"models--{org}--{name}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for k, f in enumerate(sorted(p for p in model.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{k:040x}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snap


def test_the_hub_cache_layout_is_inside_its_repository(llama, tmp_path, monkeypatch):
    snap = _hub_cache(llama["base"], tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert boundaries(snap) == [snap.resolve(), (snap.parent.parent / "blobs").resolve()]
    res = moerge.merge(recipe("task_arithmetic", Path("acme/tiny"), [llama["ft1"]]), tmp_path / "out")
    assert res.output is not None and (res.output / "config.json").is_file()
    assert not any(p.name.startswith("0000") for p in res.output.iterdir())  # copied under their own names
    (snap / "tokenizer_config.json").unlink(missing_ok=True)
    (snap / "tokenizer_config.json").symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text("{}")
    with pytest.raises(CheckpointError, match="outside the model folder"):  # but not beyond the repository
        moerge.merge(recipe("task_arithmetic", Path("acme/tiny"), [llama["ft1"]]), tmp_path / "out2")
    (snap / "tokenizer_config.json").unlink()
    (snap.parent.parent / "refs" / "secret.txt").write_text("x")
    (snap / "tokenizer_config.json").symlink_to("../../refs/secret.txt")  # inside the repository, not a blob
    with pytest.raises(CheckpointError, match="outside the model folder"):
        member(snap, "tokenizer_config.json")


def test_a_subfolder_of_a_hub_snapshot_links_into_its_blobs(llama, tmp_path):
    # diffusers-style and multi-variant repositories keep models in subfolders of the snapshot
    snap = _hub_cache(llama["base"], tmp_path / "hub")
    sub = snap / "text_encoder"
    sub.mkdir()
    for link in list(snap.iterdir()):
        if link.is_symlink():
            (sub / link.name).symlink_to(Path("..") / os.readlink(link))
    with open_source(sub) as ck:
        assert ck.tensor_names and ck.config is not None
    assert not (tmp_path / "hub" / "blobs").exists()


def test_a_folder_merely_named_like_a_snapshot_gets_no_wider_boundary(tmp_path, secret):
    fake = tmp_path / "models--x--y" / "snapshots" / "abc"  # no blobs folder: not the hub's layout
    fake.mkdir(parents=True)
    (fake / "config.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="outside the model folder"):
        member(fake, "config.json")


def test_untrusted_names_are_quoted_and_shortened_in_messages(tmp_path):
    (tmp_path / "m").mkdir()
    index = tmp_path / "m" / "model.safetensors.index.json"
    name = "\x1b[31m" + "a" * 5000
    with pytest.raises(CheckpointError) as e:
        member(tmp_path / "m", "/" + name, named_by=index)
    text = str(e.value)
    assert "\x1b" not in text and "\\x1b" in text and len(text) < 600


def test_adapter_files_linked_out_are_refused(tmp_path):
    from moerge.extract import extract_lora
    from moerge.testing import make_llama, perturb

    base = make_llama(tmp_path / "base", seed=0, layers=1)
    lora = extract_lora(perturb(base, tmp_path / "tuned", seed=1, scale=0.1), base, tmp_path / "lora",
                        rank=2).output
    assert lora is not None
    shutil.move(lora / "adapter_model.safetensors", tmp_path / "weights.safetensors")
    (lora / "adapter_model.safetensors").symlink_to(tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: a link to .*, outside the model folder"):
        open_source(lora)
    with open_source(lora, allow_external_files=True) as view:
        assert view.tensor_names


def test_the_cli_refuses_with_the_flag_in_the_hint_and_follows_with_it(llama_bf16, tmp_path):
    m, index, index_path = _sharded(llama_bf16, tmp_path)
    _move_shard_out(m, index, index_path, tmp_path / "elsewhere", lambda p: str(p))
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", str(m), "--no-tensors"])
    assert res.exit_code == 2 and "an absolute path" in res.output and "--allow-external-files" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(main, ["inspect", str(m), "--no-tensors", "--allow-external-files"])
    assert res.exit_code == 0, res.output
    assert "tensors:" in res.output


def test_models_are_checked_before_transformers_loads_them(llama, tmp_path, secret):
    from moerge.runtime.models import load_model

    m = shutil.copytree(llama["base"], tmp_path / "m")
    (m / "special_tokens_map.json").unlink(missing_ok=True)
    (m / "special_tokens_map.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match=r"special_tokens_map\.json: a link to .*, outside the model folder"):
        load_model(m, "decoder")
