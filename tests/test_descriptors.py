"""File descriptors stay bounded however many shards a merge reads (issue 16): the pool closes idle
descriptors beyond its capacity, never one in use, and a merge of 100 six-shard models runs under a
256-file limit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from moerge.errors import CheckpointError
from moerge.io.descriptors import DescriptorPool
from moerge.io.safetensors_format import SafetensorsReader


class _File:
    def __init__(self, path: Path) -> None:
        self.path = path

    def open_checked(self, name: str | None) -> int:
        return os.open(self.path, os.O_RDONLY)


def _files(tmp_path: Path, n: int) -> list[_File]:
    out = []
    for k in range(n):
        (tmp_path / f"f{k}").write_bytes(bytes([k]) * 16)
        out.append(_File(tmp_path / f"f{k}"))
    return out


def test_the_pool_keeps_at_most_its_capacity_of_idle_descriptors(tmp_path):
    pool, files = DescriptorPool(capacity=3), _files(tmp_path, 10)
    for _ in range(3):
        for k, f in enumerate(files):
            with pool.use(f) as fd:
                assert os.pread(fd, 1, 5) == bytes([k])  # the descriptor of this file, even after reopening
            assert pool.open_count <= 3
    assert pool.opens == 30  # least recently used first: a cycle longer than the capacity reopens every time
    for f in files:
        pool.forget(f)
    assert pool.open_count == 0


def test_a_descriptor_in_use_is_never_closed_under_its_user(tmp_path):
    pool, files = DescriptorPool(capacity=2), _files(tmp_path, 4)
    with pool.use(files[0]) as a, pool.use(files[1]) as b, pool.use(files[2]) as c:
        assert pool.open_count == 3  # over capacity while all are busy, rather than closing one in use
        with pool.use(files[3]) as d:
            for k, fd in enumerate((a, b, c, d)):
                assert os.pread(fd, 1, 0) == bytes([k])
        pool.forget(files[0])  # forgotten while in use: closed when its user is done
        assert os.pread(a, 1, 0) == b"\x00"
    assert not pool.holds(files[0]) and pool.open_count <= 2


def test_the_pool_under_threads(tmp_path):
    pool, files = DescriptorPool(capacity=4), _files(tmp_path, 12)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(300):
                k = (seed * 7 + i * 5) % len(files)
                with pool.use(files[k]) as fd:
                    assert os.pread(fd, 1, 3) == bytes([k])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and pool.open_count <= 6


def test_out_of_descriptors_is_one_clear_error(tmp_path):
    class Exhausted(_File):
        def open_checked(self, name: str | None) -> int:
            raise OSError(24, "Too many open files")

    with pytest.raises(CheckpointError, match="f0: too many open files") as e:
        with DescriptorPool(capacity=2).use(Exhausted(tmp_path / "f0")):
            pass
    assert "ulimit -n" in (e.value.hint or "")


def test_a_reopened_reader_checks_the_file_is_still_the_same(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(4.0)}, str(path))
    reader = SafetensorsReader(path)
    assert reader.read("w").tolist() == [0.0, 1.0, 2.0, 3.0]
    reader.close()
    assert not reader.is_open
    save_file({"w": torch.arange(4.0) + 1}, str(tmp_path / "new.safetensors"))
    os.replace(tmp_path / "new.safetensors", path)
    with pytest.raises(CheckpointError, match="changed since its header was read"):
        reader.read("w")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_NOFILE as on Linux")
def test_a_hundred_six_shard_models_merge_under_a_256_file_limit(tmp_path):
    from safetensors.torch import load_file

    from moerge.testing import make_llama, perturb

    base = make_llama(tmp_path / "base", layers=2, shard_size="20KB")
    distinct = [perturb(base, tmp_path / f"d{k}", seed=k + 1, scale=0.1, shard_size="20KB") for k in range(4)]
    assert len(list(distinct[0].glob("*.safetensors"))) == 6
    models = []
    for k in range(100):  # 100 folders, 600 shard paths (hard links of four distinct experts)
        folder = tmp_path / "zoo" / f"m{k:03d}"
        folder.mkdir(parents=True)
        for f in distinct[k % 4].iterdir():
            os.link(f, folder / f.name)
        models.append(folder)
    recipe = {"method": "linear", "models": [{"model": str(m)} for m in models], "dtype": "float32"}
    script = textwrap.dedent(f"""
        import resource, moerge
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        moerge.merge({recipe!r}, {str(tmp_path / "out")!r}, shard_size="1GB")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    experts = [_weights(d) for d in distinct]
    for name, t in merged.items():
        torch.testing.assert_close(t, sum(e[name] for e in experts) / 4, rtol=1e-5, atol=1e-6)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out
