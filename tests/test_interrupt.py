"""A merge killed or interrupted half way leaves nothing at the output path that looks like a model."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import recipe

# Runs the real CLI with each tensor's computation and each write slowed down, so we can stop it mid-merge.
SLOW_CLI = """
import signal, sys, time
# a shell's background job starts with SIGINT ignored, and Python then installs no KeyboardInterrupt
# handler; restore it, so the test behaves the same however pytest was launched
signal.signal(signal.SIGINT, signal.default_int_handler)
import moerge.engine.execute as ex
import moerge.io.writer as wr
real = ex._merge_item
def slow(*a, **k):
    time.sleep(0.15)
    return real(*a, **k)
ex._merge_item = slow
real_write = wr.ModelWriter.write
def slow_write(self, *a, **k):
    time.sleep(0.05)
    return real_write(self, *a, **k)
wr.ModelWriter.write = slow_write
from moerge.cli import main
sys.argv = ["moerge"] + sys.argv[1:]
main()
"""


def start_merge(llama, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe("ties", llama["base"], [llama["ft1"], llama["ft2"]])))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "merge", str(tmp_path / "r.yaml"), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        tmp = [p for p in tmp_path.iterdir() if ".moerge-tmp-" in p.name]
        if tmp and any(tmp[0].iterdir()):
            return proc, out
        if proc.poll() is not None:
            pytest.fail(f"merge ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("merge never started writing")


def test_sigkill_leaves_no_output(llama, tmp_path):
    proc, out = start_merge(llama, tmp_path)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if ".moerge-tmp-" in p.name]
    assert leftovers and all(p.name.startswith(".") for p in leftovers)  # hidden, not a model path
    # the next merge to the same output cleans the dead process's temporary directory
    from moerge.io.publish import clean_stale_temp_dirs

    assert clean_stale_temp_dirs(out) == leftovers


def test_ctrl_c_removes_partial_output(llama, tmp_path):
    proc, out = start_merge(llama, tmp_path)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".moerge-tmp-" in p.name]


def test_existing_output_survives_a_killed_forced_merge(llama, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("previous model")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe("ties", llama["base"], [llama["ft1"], llama["ft2"]])))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "merge", "--force", str(tmp_path / "r.yaml"),
                             str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(2.5)
    proc.kill()
    proc.wait()
    assert (tmp_path / "out" / "keep.txt").read_text() == "previous model"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(llama, tmp_path, sig):
    proc, out = start_merge(llama, tmp_path)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"terminated ({signal.Signals(sig).name})" in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".moerge-tmp-" in p.name]  # nothing left behind
