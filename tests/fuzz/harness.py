"""Running fuzz cases: the assets every case starts from, the outcome of one case, worker processes that
bound each case in time, and the campaign's counts."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECRET = "FUZZ-SECRET-7f3a9c"
BAD = ("internal", "hang", "crash", "outside", "wrong")


@dataclass
class Assets:
    """Pristine inputs, built once per worker; a case copies what it mutates into its own folder."""

    root: Path
    base: Path  # bf16, six shards with an index, a tokenizer file
    ft1: Path
    ft2: Path
    single: Path  # fp32, one model.safetensors
    single_ft: Path
    lora: Path  # a PEFT LoRA adapter of ``single``
    outside: Path  # what no case may read: a secret, a valid shard, valid adapter weights

    @classmethod
    def build(cls, root: Path) -> Assets:
        import torch

        from moerge.extract import extract_lora
        from moerge.testing import make_llama, perturb

        root.mkdir(parents=True, exist_ok=True)
        base = make_llama(root / "base", seed=0, layers=2, dtype=torch.bfloat16, shard_size="12KB")
        (base / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel"}}')
        ft1 = perturb(base, root / "ft1", seed=1, scale=0.1, shard_size="12KB")
        ft2 = perturb(base, root / "ft2", seed=2, scale=0.1, shard_size="12KB")
        single = make_llama(root / "single", seed=3, layers=1)
        single_ft = perturb(single, root / "single_ft", seed=4, scale=0.1)
        lora = extract_lora(single_ft, single, root / "lora", rank=2).output
        assert lora is not None
        outside = root / "outside"
        outside.mkdir()
        (outside / "secret.txt").write_text(SECRET + "\n")
        shard = sorted(base.glob("*.safetensors"))[0]
        shutil.copy(shard, outside / shard.name)
        shutil.copy(lora / "adapter_model.safetensors", outside / "adapter_model.safetensors")
        (outside / "config.json").write_text(json.dumps({"secret": SECRET}))
        return cls(root, base, ft1, ft2, single, single_ft, lora, outside)


@dataclass
class Case:
    """One generated attack: ``run()`` does it (raising what moerge raises); ``verify(result)``, when
    given, returns None when a successful result is right, or what is wrong with it."""

    family: str
    seed: int
    what: str
    run: Callable[[], Any]
    verify: Callable[[Any], str | None] | None = None
    workdir: Path | None = None


@dataclass
class Outcome:
    family: str
    seed: int
    kind: str  # ok, ok-verified, error, internal, hang, outside, wrong
    what: str
    detail: str = ""
    seconds: float = 0.0


class _OutsideWatch:
    """An audit hook that records every file opened under the assets' ``outside`` folder while active."""

    def __init__(self, outside: Path) -> None:
        self.outside = str(outside.resolve())
        self.active = False
        self.seen: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or event != "open" or not args:
            return
        path = args[0]
        if isinstance(path, int):
            return
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return
        if real == self.outside or real.startswith(self.outside + os.sep):
            self.seen.append(real)


GENERATORS: dict[str, Callable[[random.Random, Assets, Path, int], Case]] = {}


def family(name: str) -> Callable[[Callable[..., Case]], Callable[..., Case]]:
    def register(fn: Callable[..., Case]) -> Callable[..., Case]:
        GENERATORS[name] = fn
        return fn

    return register


def run_case(assets: Assets, watch: _OutsideWatch, family_name: str, seed: int, scratch: Path) -> Outcome:
    """Generate and run one case in this process."""
    from moerge.errors import MoergeError

    rng = random.Random(f"{family_name}:{seed}")
    workdir = scratch / f"{family_name}-{seed}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        case = GENERATORS[family_name](rng, assets, workdir, seed)
    except Exception:  # the generator itself failed: a bug of the fuzzer, reported as such
        return Outcome(family_name, seed, "internal", "generator", traceback.format_exc(limit=4))
    watch.seen.clear()
    watch.active = True
    message = ""
    try:
        result = case.run()
        kind = "ok"
    except MoergeError as e:
        kind, message = "error", f"{e.message}\n{e.hint or ''}"
    except Exception as e:
        lines = "".join(traceback.format_exception(e, limit=-6)).splitlines()
        kind, message = "internal", "\n".join(line[:300] for line in lines)
    finally:
        watch.active = False
    if kind == "ok":
        message = _text_of(result)
        if case.verify is not None:
            try:
                problem = case.verify(result)
            except Exception as e:
                problem = f"verifier raised {type(e).__name__}: {e}"
            kind, message = ("wrong", problem) if problem else ("ok-verified", message)
    if watch.seen or SECRET in message or _secret_in(workdir):
        kind, message = "outside", f"opened {sorted(set(watch.seen))[:3]}; {message[:300]}"
    seconds = time.perf_counter() - t0
    shutil.rmtree(workdir, ignore_errors=True)
    return Outcome(family_name, seed, kind, case.what, message[-2000:] if kind in BAD else message[:200], seconds)


def _text_of(result: Any) -> str:
    output = getattr(result, "output", None)
    return str(output) if output is not None else str(result)[:500]


def _secret_in(folder: Path) -> bool:
    """Whether the secret was copied into anything the case wrote (its outputs live in its folder)."""
    for top, _, files in os.walk(folder):  # links to folders are not followed
        for name in files:
            p = Path(top) / name
            if p.is_file() and not p.is_symlink() and p.stat().st_size < (1 << 20):
                try:
                    if SECRET.encode() in p.read_bytes():
                        return True
                except OSError:
                    continue
    return False


# -- workers: each case bounded in time ---------------------------------------------------------------
def _worker(conn: Any, root: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    from tests.fuzz import generators  # noqa: F401  (registers the families)

    torch.set_num_threads(1)
    import faulthandler
    import signal

    Path(root).mkdir(parents=True, exist_ok=True)
    stacks = open(Path(root) / "stacks.txt", "w")  # open for the worker's life
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)  # what a hung case was doing
    assets = Assets.build(Path(root) / "assets")
    watch = _OutsideWatch(assets.outside)
    scratch = Path(root) / "cases"
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(run_case(assets, watch, job[0], job[1], scratch))


class Worker:
    def __init__(self, root: Path) -> None:
        ctx = mp.get_context("spawn")
        self.root = root
        shutil.rmtree(root, ignore_errors=True)  # a fresh start, also after a killed worker
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, str(root)), daemon=True)
        self.proc.start()
        if not self.parent.poll(600) or self.parent.recv() != "ready":
            raise RuntimeError("a fuzz worker did not start")

    def run(self, family_name: str, seed: int, timeout: float) -> Outcome:
        """The case's outcome; a case past ``timeout`` is a hang and one that ends its worker a crash (the
        worker is then replaced)."""
        t0 = time.perf_counter()
        self.parent.send((family_name, seed))
        if self.parent.poll(timeout):
            try:
                return self.parent.recv()
            except EOFError:
                self.proc.join(5)
                code = self.proc.exitcode
                self.kill()
                return Outcome(family_name, seed, "crash", "", f"the worker died (exit code {code})",
                               time.perf_counter() - t0)
        stacks = ""
        try:  # every thread's stack, for the report
            import signal

            os.kill(self.proc.pid, signal.SIGUSR1)
            time.sleep(1.0)
            stacks = (self.root / "stacks.txt").read_text()[-6000:]
        except OSError:
            pass
        self.kill()
        return Outcome(family_name, seed, "hang", "", f"over {timeout:.0f} s\n{stacks}", timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(10)
        for sub in (self.root / "cases",):
            shutil.rmtree(sub, ignore_errors=True)

    def close(self) -> None:
        try:
            self.parent.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def campaign(jobs: Iterable[tuple[str, int]], *, workers: int = 2, timeout: float = 20.0,
             root: Path | None = None) -> Iterator[Outcome]:
    """Run ``jobs`` ((family, seed) pairs) on ``workers`` processes, yielding outcomes as they end."""
    import threading
    from queue import Queue

    base = Path(root or tempfile.mkdtemp(prefix="moerge-fuzz-"))
    todo: Queue[tuple[str, int] | None] = Queue()
    done: Queue[Outcome | None] = Queue()
    for job in jobs:
        todo.put(job)

    def drive(k: int) -> None:
        folder = base / f"w{k}"
        worker = Worker(folder)
        try:
            while True:
                try:
                    job = todo.get_nowait()
                except Exception:
                    return
                if job is None:
                    return
                out = worker.run(job[0], job[1], timeout)
                done.put(out)
                if out.kind in ("hang", "crash"):
                    worker = Worker(folder)
        finally:
            worker.close()
            done.put(None)

    threads = [threading.Thread(target=drive, args=(k,), daemon=True) for k in range(workers)]
    for t in threads:
        t.start()
    finished = 0
    while finished < workers:
        got = done.get()
        if got is None:
            finished += 1
        else:
            yield got
    if root is None:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Tally:
    counts: dict[str, Counter[str]] = field(default_factory=dict)
    bad: list[Outcome] = field(default_factory=list)
    slowest: float = 0.0

    def add(self, o: Outcome) -> None:
        self.counts.setdefault(o.family, Counter())[o.kind] += 1
        self.slowest = max(self.slowest, o.seconds)
        if o.kind in BAD:
            self.bad.append(o)

    def table(self) -> str:
        kinds = ["ok-verified", "ok", "error", *BAD]
        rows = ["| family | cases | " + " | ".join(kinds) + " |", "|---|---:|" + "---:|" * len(kinds)]
        total: Counter[str] = Counter()
        for fam in sorted(self.counts):
            c = self.counts[fam]
            total.update(c)
            rows.append(f"| {fam} | {sum(c.values())} | " + " | ".join(str(c[k]) for k in kinds) + " |")
        rows.append(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[k]) for k in kinds) + " |")
        return "\n".join(rows)
