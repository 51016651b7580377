"""io/publish.py: the one atomic publication of a folder, and the publishers that use it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moerge.errors import OutputError
from moerge.io import publish
from moerge.io.publish import Publication, clean_stale_temp_dirs, is_temporary


def _siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_commit_publishes_every_file_after_syncing_it(tmp_path, monkeypatch):
    synced: list[str] = []
    real_sync, real_rename = publish._fsync_path, os.rename
    monkeypatch.setattr(publish, "_fsync_path", lambda p: (synced.append(str(p)), real_sync(p)))

    def rename(a, b):
        # everything inside the temporary folder is on disk before it takes the output's name
        inside = [str(p) for p in Path(a).rglob("*")] + [str(a)]
        assert set(inside) <= set(synced), set(inside) - set(synced)
        real_rename(a, b)

    monkeypatch.setattr(publish.os, "rename", rename)
    out = tmp_path / "out"
    with Publication(out) as pub:
        (pub.tmp / "a.txt").write_text("a")
        (pub.tmp / "heads" / "bbc").mkdir(parents=True)
        (pub.tmp / "heads" / "bbc" / "head.safetensors").write_bytes(b"h")
        assert is_temporary(pub.tmp) and not out.exists()
        assert pub.commit() == out
    assert (out / "heads" / "bbc" / "head.safetensors").read_bytes() == b"h"
    assert _siblings(tmp_path) == ["out"]
    assert str(tmp_path) in synced  # the parent folder, so the rename itself is durable


def test_an_error_inside_removes_everything_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), Publication(out, force=True) as pub:
        (pub.tmp / "new.txt").write_text("new")
        raise RuntimeError("interrupted")
    assert _siblings(tmp_path) == ["out"] and _siblings(out) == ["old.txt"]


def test_force_swaps_the_new_folder_in_and_the_old_one_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="already exists"):
        Publication(out)
    with Publication(out, force=True) as pub:
        (pub.tmp / "new.txt").write_text("new")
        pub.commit()
    assert _siblings(out) == ["new.txt"] and _siblings(tmp_path) == ["out"]


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out{publish.TMP_MARK}{int(dead.stdout)}-abc123"
    live = tmp_path / f".out{publish.TMP_MARK}{os.getpid()}-def456"
    stale.mkdir()
    live.mkdir()
    assert clean_stale_temp_dirs(out) == [stale]
    assert _siblings(tmp_path) == [live.name]


def test_output_errors_say_what_happened():
    full = publish.output_error(OSError(errno.ENOSPC, "No space left on device"), Path("/x/out"), 2_500_000_000)
    assert "disk full while writing /x/out (2.50 GB written)" in str(full) and full.hint
    denied = publish.output_error(PermissionError(errno.EACCES, "Permission denied"), Path("/x/out"))
    assert str(denied) == "cannot write /x/out: Permission denied"


def test_extract_lora_publishes_atomically_and_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    from moerge.extract import extract_lora
    from moerge.testing import make_llama, perturb

    base = make_llama(tmp_path / "base", seed=0, layers=1)
    tuned = perturb(base, tmp_path / "tuned", seed=1, scale=0.1)
    rep = extract_lora(tuned, base, tmp_path / "lora", rank=2)
    assert json.loads((rep.output / "adapter_config.json").read_text())["r"] == 2
    before = _siblings(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("moerge.extract.save_file", full_disk)
    with pytest.raises(OutputError, match="disk full while writing"):
        extract_lora(tuned, base, tmp_path / "lora", rank=4, force=True)
    assert _siblings(tmp_path) == before  # no temporary left, the old adapter kept
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 2


def test_the_zoo_lists_no_expert_being_published(tmp_path):
    from moerge.evaluation.zoo import list_experts

    meta = json.dumps({"role": "expert", "tasks": ["bbc"]})
    for name in ("bbc", f".tweets{publish.TMP_MARK}1-abc123", "debates.partial"):
        (tmp_path / "encoder" / "full" / name).mkdir(parents=True)
        (tmp_path / "encoder" / "full" / name / "moerge_expert.json").write_text(meta)
    assert list(list_experts(tmp_path, "encoder", "full")) == ["bbc"]


@pytest.mark.parametrize("force", [False, True])
def test_an_output_that_appears_just_before_the_rename(tmp_path, monkeypatch, force):
    # another merge into the same folder commits between this one's look and its rename
    out = tmp_path / "out"
    real_rename = os.rename

    def racing_rename(src, dst):
        if Path(dst) == out and not out.exists():
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
        real_rename(src, dst)

    monkeypatch.setattr(publish.os, "rename", racing_rename)
    pub = Publication(out, force=force)
    (pub.tmp / "ours.txt").write_text("ours")
    with pub:
        if force:
            pub.commit()
        else:
            with pytest.raises(OutputError, match="appeared while writing it"):
                pub.commit()
    assert _siblings(out) == (["ours.txt"] if force else ["theirs.txt"])
    assert _siblings(tmp_path) == ["out"]


def test_an_output_that_cannot_be_replaced_is_a_clear_error(tmp_path, monkeypatch):
    # a mount point: neither swapped nor renamed away (EBUSY)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def busy(src, dst):
        if Path(src) == out:
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_rename(src, dst)

    monkeypatch.setattr(publish.os, "rename", busy)
    with pytest.raises(OutputError, match="cannot put .*out in place: Device or resource busy"), \
            Publication(out, force=True) as pub:
        (pub.tmp / "new.txt").write_text("new")
        pub.commit()
    assert _siblings(out) == ["old.txt"] and _siblings(tmp_path) == ["out"]


@pytest.mark.parametrize("target", ["folder", "dangling"])
def test_an_output_that_is_a_link_is_published_where_it_points(tmp_path, target):
    disk = tmp_path / "other-disk"
    disk.mkdir()
    if target == "folder":
        (disk / "out").mkdir()
        (disk / "out" / "old.txt").write_text("old")
    (tmp_path / "out").symlink_to(disk / "out")
    with Publication(tmp_path / "out", force=True) as pub:
        assert pub.tmp.parent == disk  # beside the target, on its disk: the rename stays atomic
        (pub.tmp / "new.txt").write_text("new")
        assert pub.commit() == tmp_path / "out"
    assert (tmp_path / "out").is_symlink() and _siblings(tmp_path / "out") == ["new.txt"]
    assert _siblings(disk) == ["out"] and _siblings(tmp_path) == ["other-disk", "out"]  # nothing stray


def test_a_link_left_in_place_of_an_old_output_is_removed_as_a_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("keep")
    stale = tmp_path / f".out{publish.TMP_MARK}999999999-abc123"
    stale.symlink_to(real)  # what an older moerge could leave behind after --force onto a link
    clean_stale_temp_dirs(tmp_path / "out")
    assert not stale.is_symlink() and (real / "keep.txt").read_text() == "keep"  # never followed
