"""Shared fixtures: tiny real Hugging Face models built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# the fuzzers are the package ``tests.fuzz`` (also run as ``python -m tests.fuzz``): the repository root is
# importable however pytest was started
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama base and three experts (fp32)."""
    from moerge.testing import make_llama, perturb

    root = tmp_path_factory.mktemp("llama")
    base = make_llama(root / "base", seed=0, layers=3)
    models = {"base": base}
    for i in range(3):
        models[f"ft{i + 1}"] = perturb(base, root / f"ft{i + 1}", seed=i + 1, scale=0.2)
    return models


@pytest.fixture(scope="session")
def llama_bf16(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny bf16 Llama base (sharded into several files) and two experts."""
    from moerge.testing import make_llama, perturb

    root = tmp_path_factory.mktemp("llama_bf16")
    base = make_llama(root / "base", seed=3, layers=2, dtype=torch.bfloat16, shard_size="20KB")
    return {"base": base,
            "ft1": perturb(base, root / "ft1", seed=11, scale=0.1, shard_size="20KB"),
            "ft2": perturb(base, root / "ft2", seed=12, scale=0.1, shard_size="20KB")}


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny GPT-2 base (tied embeddings, Conv1D) and two experts."""
    from moerge.testing import make_gpt2, perturb

    root = tmp_path_factory.mktemp("gpt2")
    base = make_gpt2(root / "base", seed=5)
    return {"base": base, "ft1": perturb(base, root / "ft1", seed=21, scale=0.2),
            "ft2": perturb(base, root / "ft2", seed=22, scale=0.2)}


def recipe(method: str, base: Path | None, models: list[Path], params: dict | None = None,
           model_params: list[dict] | None = None, **extra) -> dict:
    """A recipe dict in moerge's format."""
    out: dict = {"method": method, "models": []}
    if base is not None:
        out["base_model"] = str(base)
    for i, m in enumerate(models):
        entry: dict = {"model": str(m)}
        if model_params and model_params[i]:
            entry["parameters"] = model_params[i]
        out["models"].append(entry)
    if params:
        out["parameters"] = params
    out.update(extra)
    return out


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from moerge.io.checkpoint import Checkpoint

    ck = Checkpoint.open(path)
    out = {n: ck.read(n) for n in ck.tensor_names}
    ck.close()
    return out


from hypothesis import settings as _hsettings  # noqa: E402

_hsettings.register_profile("moerge", derandomize=True, deadline=None, database=None)
_hsettings.load_profile("moerge")
