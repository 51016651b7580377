"""The native kernels against the torch code path: same masks, same values, same errors."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moerge
from conftest import load_tensors, recipe
from moerge import native
from moerge.errors import NonFiniteError
from moerge.methods.masks import bernoulli_keep_range
from test_methods_values import run

pytestmark = pytest.mark.skipif(not native.available() and os.environ.get("MOERGE_NATIVE") == "0",
                                reason="native kernels disabled by MOERGE_NATIVE=0")
NATIVE_METHODS = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                  "breadcrumbs_ties"]


def test_kernels_are_built():
    # setup.sh builds them; without a C compiler moerge still works (torch path), but this suite wants them
    assert native.available()


@settings(max_examples=40, deadline=None)
@given(start=st.integers(0, 1 << 40), n=st.integers(0, 3000), seed=st.integers(0, (1 << 63) - 1),
       density=st.floats(0.01, 1.0))
def test_bernoulli_mask_is_the_same_in_c_and_torch(start, n, seed, density):
    assert torch.equal(native.bernoulli(start, n, seed, density), bernoulli_keep_range(start, start + n, density, seed))


def test_bernoulli_keep_rate_and_independence():
    a = native.bernoulli(0, 1 << 20, 7, 0.3)
    b = native.bernoulli(0, 1 << 20, 8, 0.3)
    assert abs(a.float().mean().item() - 0.3) < 3e-3
    # different seeds: independent masks (P(both) ≈ 0.09)
    assert abs((a & b).float().mean().item() - 0.09) < 3e-3
    # neighbouring elements are not correlated
    assert abs((a[1:] & a[:-1]).float().mean().item() - 0.09) < 3e-3


def _inputs(rows: int, cols: int, k: int, seed: int, quantize: bool, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g).to(dtype)
    models = []
    for _ in range(k):
        delta = torch.randn(rows, cols, generator=g)
        if quantize:  # many exactly equal magnitudes and zeros: exercises rank ties and zero signs
            delta = torch.round(delta * 2) / 4
        models.append((base.float() + delta).to(dtype))
    return base, models


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 50), k=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
       method=st.sampled_from(NATIVE_METHODS), conventions=st.sampled_from(["paper", "mergekit"]),
       quantize=st.booleans(), bf16=st.booleans(), block=st.integers(1, 80), density=st.floats(0.1, 1.0))
def test_native_path_equals_torch_path(rows, cols, k, seed, method, conventions, quantize, bf16, block, density):
    base, models = _inputs(rows, cols, k, seed, quantize, torch.bfloat16 if bf16 else torch.float32)
    kw = {"density": [density] * k} if method not in ("linear", "task_arithmetic") else {}
    if method != "linear":
        kw["weight"] = [0.5 + i for i in range(k)]
    b = None if method == "linear" else base
    ref = run(method, None if b is None else b.float(), [m.float() for m in models], conventions=conventions,
              seed=seed, native=False, **kw)
    got = run(method, b, models, conventions=conventions, seed=seed, native=True, block=block,
              out_dtype=torch.float32, **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)
    if bf16:  # rounding into the output dtype is torch's round-to-nearest-even
        as_bf16 = run(method, b, models, conventions=conventions, seed=seed, native=True, block=block,
                      out_dtype=torch.bfloat16, **kw)
        assert torch.equal(as_bf16, got.to(torch.bfloat16))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 50), k=st.integers(2, 5), seed=st.integers(0, 2**31 - 1),
       method=st.sampled_from(["slerp", "model_stock"]), conventions=st.sampled_from(["paper", "mergekit"]),
       bf16=st.booleans(), block=st.integers(1, 80), t=st.floats(0.0, 1.0))
def test_native_gram_methods_equal_torch_path(rows, cols, k, seed, method, conventions, bf16, block, t):
    base, models = _inputs(rows, cols, k if method == "model_stock" else 1, seed, False,
                           torch.bfloat16 if bf16 else torch.float32)
    if method == "slerp" and seed % 3 == 0:  # nearly colinear: the linear fallback
        models = [(base.float() * 1.5).to(base.dtype)]
    kw = {"t": t} if method == "slerp" else {}
    ref = run(method, base.float(), [m.float() for m in models], conventions=conventions, native=False, **kw)
    got = run(method, base, models, conventions=conventions, native=True, block=block, out_dtype=torch.float32, **kw)
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)


def test_gram_kernel_against_float64():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5000, generator=g)
    models = [torch.randn(5000, generator=g).to(torch.bfloat16) for _ in range(3)]
    out = torch.zeros(3, 3, dtype=torch.float64)
    native.gram(base, models, out)
    native.gram(base, models, out)  # accumulates
    d = [(m.float() - base).double() for m in models]  # differences in float32, as in the torch path
    for i in range(3):
        for j in range(i, 3):
            assert out[i, j].item() == pytest.approx(2 * float((d[i] * d[j]).sum()), rel=1e-12)


def test_window_ties_broken_by_position_across_blocks():
    # eight equal magnitudes, keep the top 3 by rank: the last three by position survive
    base = torch.zeros(8)
    model = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0])
    for block in (1, 3, 8):
        out = run("ties", base, [model], native=True, block=block, density=[3 / 8], trim_scope="tensor")
        assert torch.equal(out, torch.tensor([0, 0, 0, 0, 0, 1.0, -1.0, 1.0]))


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.5}),  # paper: whole-model trim, parallel native pre-pass
    ("dare_ties", {"density": 0.6}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    ("linear", {}),
    ("model_stock", {}),
])
def test_merge_native_equals_torch_end_to_end(llama_bf16, tmp_path, method, params):
    r = recipe(method, None if method == "linear" else llama_bf16["base"],
               [llama_bf16["ft1"], llama_bf16["ft2"]], params=params, seed=5, dtype="float32")
    moerge.merge(r, tmp_path / "native")
    with native.disabled():
        moerge.merge(r, tmp_path / "torch")
    a, b = load_tensors(tmp_path / "native"), load_tensors(tmp_path / "torch")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=2e-6, atol=2e-6, msg=name)


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.5}),
    ("dare_ties", {"density": 0.6}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    ("slerp", {"t": 0.3}),
])
def test_mapped_inputs_merge_as_inputs_read_block_by_block(llama_bf16, tmp_path, monkeypatch, method, params):
    # tensors within MAP_LIMIT are mapped whole from the page cache; larger ones are read a block at a time
    from moerge.engine import execute
    from moerge.io.checkpoint import Checkpoint

    mapped = []
    real_map = Checkpoint.map
    monkeypatch.setattr(Checkpoint, "map", lambda self, name: mapped.append(name) or real_map(self, name))
    models = [llama_bf16["ft1"], llama_bf16["ft2"]]
    r = recipe(method, None if method == "slerp" else llama_bf16["base"], models, params=params, seed=5)
    if method == "slerp":
        r["base_model"] = str(models[0])
    moerge.merge(r, tmp_path / "mapped")
    assert mapped
    mapped.clear()
    monkeypatch.setattr(execute, "MAP_LIMIT", 0)
    moerge.merge(r, tmp_path / "read")
    assert not mapped
    a, b = load_tensors(tmp_path / "mapped"), load_tensors(tmp_path / "read")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_native_nonfinite_input_names_tensor_and_index(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in llama["ft1"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    t = load_file(bad / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    t[name].view(-1)[123] = float("inf")
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=r"up_proj.*flat index 123"):
        moerge.merge(recipe("ties", llama["base"], [bad, llama["ft2"]], params={"density": 0.5}), tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16"])
def test_native_output_overflow_is_reported(tmp_path, out_dtype):
    from safetensors.torch import save_file

    # finite in float32, beyond the largest bfloat16 (3.3895e38) and float16 (65504)
    for name, value in (("base", 0.0), ("ft", 3.4e38)):
        (tmp_path / name).mkdir()
        save_file({"w": torch.full((4, 4), value)}, tmp_path / name / "model.safetensors")
    r = recipe("task_arithmetic", tmp_path / "base", [tmp_path / "ft"], dtype=out_dtype)
    with pytest.raises(NonFiniteError, match=f"overflow {out_dtype}"):
        moerge.merge(r, tmp_path / "o")
    assert not (tmp_path / "o").exists()


class _Bracketing:
    """Sampled-bracket selection for every tensor, however small (it normally starts at 256 Ki elements)."""

    def __enter__(self):
        from moerge.methods.select import RankSelect

        self.saved = RankSelect.SAMPLE_MIN, RankSelect.SAMPLE_MIN_VALUES
        RankSelect.SAMPLE_MIN, RankSelect.SAMPLE_MIN_VALUES = 0, 1

    def __exit__(self, *exc):
        from moerge.methods.select import RankSelect

        RankSelect.SAMPLE_MIN, RankSelect.SAMPLE_MIN_VALUES = self.saved


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 50), k=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
       method=st.sampled_from(["ties", "breadcrumbs", "breadcrumbs_ties"]), quantize=st.booleans(),
       bf16=st.booleans(), block=st.integers(1, 80), density=st.floats(0.05, 1.0))
def test_sampled_bracket_selection_equals_torch_path(rows, cols, k, seed, method, quantize, bf16, block, density):
    # mergekit conventions trim per tensor: the selection that the bracket pass replaces
    base, models = _inputs(rows, cols, k, seed, quantize, torch.bfloat16 if bf16 else torch.float32)
    kw = {"density": [density] * k, "weight": [0.5 + i for i in range(k)]}
    ref = run(method, base.float(), [m.float() for m in models], conventions="mergekit", seed=seed, native=False, **kw)
    with _Bracketing():
        got = run(method, base, models, conventions="mergekit", seed=seed, native=True, block=block,
                  out_dtype=torch.float32, **kw)
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)


def test_a_bracket_that_misses_falls_back_to_exact_radix_passes():
    from moerge.methods import get_method
    from moerge.methods.protocol import run_whole, sample_positions

    n = 300_000
    g = torch.Generator().manual_seed(0)
    delta = 1.0 + torch.rand(n, generator=g)
    for s, e in sample_positions(n):  # the sample sees only tiny magnitudes: its bracket must miss
        delta[s:e] = 1e-3 * torch.rand(e - s, generator=g)
    base = torch.randn(n, generator=g)
    models = [base + delta, base - 0.5 * delta]
    m = get_method("ties")
    params = {p.name: p.default_for("mergekit") for p in m.params if not p.per_model}
    mparams = [{"weight": 1.0, "density": 0.4}, {"weight": 1.0, "density": 0.4}]
    ref = run_whole(m.build((n,), mparams, params, conventions="mergekit"), base, models)
    merger = m.build((n,), mparams, params, conventions="mergekit")
    got = run_whole(merger, base, models, native=True)
    assert all(sp.window.select.offset == 1 and sp.passes == 3 for sp in merger.sparsifiers)  # fell back
    assert torch.equal(got, ref)
    hit = m.build((n,), mparams, {**params, "lambda": 1.0}, conventions="mergekit")
    plain = (base + 0.01 * torch.randn(n, generator=g))
    run_whole(hit, base, [plain, plain * 1.001], native=True)
    assert all(sp.passes == 1 for sp in hit.sparsifiers)  # a representative sample: one pass


@pytest.mark.parametrize("map_limit", [None, 0], ids=["mapped", "read"])
def test_merge_samples_every_run_of_a_large_tensor(tmp_path, monkeypatch, map_limit):
    # The executor reads the sample of a tensor it does not map run by run; each run must land in its
    # own place, or the sample is one run repeated and brackets miss (a slow fallback, not wrong).
    from safetensors.torch import save_file

    from moerge.engine import execute
    from moerge.methods.select import RankSelect

    if map_limit is not None:
        monkeypatch.setattr(execute, "MAP_LIMIT", map_limit)

    g = torch.Generator().manual_seed(3)
    shape = (640, 512)  # 327,680 elements: above RankSelect.SAMPLE_MIN
    base = {f"layer{i}.weight": torch.randn(shape, generator=g) for i in range(4)}
    paths = []
    for k, name in enumerate(["base", "ft1", "ft2"]):
        d = tmp_path / name
        d.mkdir()
        # row-structured deltas: a sample of one run would miss the spread of the whole tensor
        scale = torch.linspace(0.1, 3.0, shape[0]).unsqueeze(1)
        t = base if k == 0 else {n: v + scale * torch.randn(shape, generator=g) for n, v in base.items()}
        save_file(t, str(d / "model.safetensors"))
        paths.append(d)
    outcomes = []
    end = RankSelect._end_bracket

    def spy(self):
        end(self)
        outcomes.append(self.offset)

    monkeypatch.setattr(RankSelect, "_end_bracket", spy)
    r = recipe("breadcrumbs", paths[0], paths[1:], params={"density": 0.9, "gamma": 0.01}, dtype="float32")
    moerge.merge(r, tmp_path / "native")
    assert len(outcomes) == 8 and not any(outcomes)  # every bracket took one pass
    with native.disabled():
        moerge.merge(r, tmp_path / "torch")
    a, b = load_tensors(tmp_path / "native"), load_tensors(tmp_path / "torch")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=2e-6, atol=2e-6, msg=name)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("block", [7, 64, 5000])
def test_dare_l1_keep_bits_reused_by_the_emit_pass(method, block, monkeypatch):
    # mergekit's L1 rescale needs a statistics pass; the emit pass reuses its keep bits instead of
    # hashing again, and must give the very same mask (blocks not a multiple of 8 included)
    from moerge.methods.task_vector import DropSparsifier

    base, models = _inputs(37, 53, 3, 11, False, torch.bfloat16)
    used = []
    block_done = DropSparsifier.block_done

    def spy(self, start):
        used.append(start in self.bits)
        block_done(self, start)

    monkeypatch.setattr(DropSparsifier, "block_done", spy)
    kw = {"density": [0.3, 0.5, 0.7], "weight": [1.0, 0.5, 2.0]}
    ref = run(method, base.float(), [m.float() for m in models], conventions="mergekit", seed=4, native=False, **kw)
    got = run(method, base, models, conventions="mergekit", seed=4, native=True, block=block,
              out_dtype=torch.float32, **kw)
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)
    assert used and all(used)  # every emitted block found its bits


def test_a_bracket_around_a_huge_run_of_one_value_is_not_taken():
    # half the magnitudes are exactly 1.0 and the wanted rank falls in that run: widened to the
    # neighbouring values, the bracket would gather half the tensor, so radix passes are used instead
    from moerge.methods.protocol import sample_of
    from moerge.methods.select import RankSelect

    n = 400_000
    g = torch.Generator().manual_seed(1)
    values = torch.rand(n, generator=g) * 2.0
    values[::2] = 1.0
    rs = RankSelect([n // 2])
    rs.observe_sample(sample_of(None, [values])[1][0], n)
    assert rs.bracket is None and rs.passes == 2
    for p in range(rs.passes):
        rs.observe_native(p, None, values)
        rs.end_pass(p)
    assert rs.value == [torch.sort(values).values[n // 2].item()]


@pytest.mark.parametrize("native_path", [True, False])
def test_an_empty_breadcrumbs_window_keeps_nothing_of_the_task_vector(native_path):
    # density so small that ⌊(γ+density)·n⌋ = ⌊γ·n⌋: the window is empty (found by the fuzzer: the
    # native spec asked for a rank boundary that was never selected), the merge is the base
    base = torch.arange(200.0) / 7
    models = [base + torch.linspace(-1, 1, 200), base - torch.linspace(0, 2, 200)]
    for method in ("breadcrumbs", "breadcrumbs_ties"):
        out = run(method, base, models, native=native_path, density=[1e-9, 1e-9], gamma=[0.01, 0.01])
        assert torch.equal(out, base), method
