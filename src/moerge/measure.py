"""Measuring a child process honestly: wall time, CPU, peak RSS and peak anonymous memory.

A child's peak RSS (``ru_maxrss``) starts from the RSS of the process that forked it: the kernel
carries the pre-exec high-water mark over, so a command started straight from a process that holds
torch, a model or data would report that process's memory as its own. Every measured command is
therefore started by a tiny launcher (~10 MiB, ``python -S``) that spawns it, waits for it with
``wait4`` and reports its rusage. ``ru_maxrss`` also counts file-backed pages (every touched page of
a memory-mapped input), which the kernel can drop at will, so a thread also samples the child's
``RssAnon`` every 20 ms: its peak is the memory the process really needs (sampled, so a peak
shorter than that may be missed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

LAUNCHER = """
import json, os, sys, threading, time
result, cmd = sys.argv[1], sys.argv[2:]
peak_anon, done = [0], threading.Event()

def sample(pid):
    while not done.wait(0.02):
        try:
            with open(f"/proc/{pid}/status") as f:
                kib = next(int(ln.split()[1]) for ln in f if ln.startswith("RssAnon:"))
            peak_anon[0] = max(peak_anon[0], kib)
        except (OSError, StopIteration, ValueError):
            pass

t0 = time.perf_counter()
pid = os.posix_spawnp(cmd[0], cmd, os.environ)
threading.Thread(target=sample, args=(pid,), daemon=True).start()
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
done.set()
with open(result, "w") as f:
    json.dump({"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "rss_mib": ru.ru_maxrss / 1024,
               "anon_mib": peak_anon[0] / 1024, "rc": os.waitstatus_to_exitcode(status)}, f)
"""


def run_measured(cmd: list[str], *, log: Path | None = None, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` to completion; returns wall, user, sys and cpu seconds, rss_mib, anon_mib and rc.
    Its stdout and stderr go to ``log`` (or are discarded)."""
    fd, name = tempfile.mkstemp(prefix="moerge-measure-", suffix=".json")
    os.close(fd)
    result = Path(name)
    out = open(log, "wb") if log else subprocess.DEVNULL
    try:
        subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(result), *cmd],
                       stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, check=True)
        rec = json.loads(result.read_text())
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
        result.unlink(missing_ok=True)
    rec["cpu"] = rec["user"] + rec["sys"]
    return rec
