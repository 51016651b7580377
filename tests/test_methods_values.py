"""Each method against values computed by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from moerge import native as kernels
from moerge.methods import get_method
from moerge.methods.masks import breadcrumbs_counts, topk_window
from moerge.methods.select import RankSelect, RankWindowMask

T = torch.tensor


def window_mask(values: torch.Tensor, lo: int, hi: int, block: int = 1 << 20) -> torch.Tensor:
    """Run RankWindowMask over ``values`` in blocks of ``block`` elements."""
    w = RankWindowMask(values.numel(), lo, hi)
    flat = values.reshape(-1)
    ranges = [(s, min(flat.numel(), s + block)) for s in range(0, flat.numel(), block)]
    for p in range(w.passes):
        for s, e in ranges:
            w.observe(p, flat[s:e])
        w.end_pass(p)
    if w.select is None:
        return torch.ones_like(flat, dtype=torch.bool)
    return torch.cat([w.mask(flat[s:e]) for s, e in ranges])


NATIVE = False  # which code path `run` takes; every test of this module runs on both


@pytest.fixture(autouse=True, params=["torch", "native"])
def code_path(request):
    global NATIVE
    if request.param == "native" and not kernels.available():
        pytest.skip("native kernels not built")
    NATIVE = request.param == "native"
    yield request.param
    NATIVE = False


def run(name: str, base, models, *, conventions: str = "paper", seed: int = 0, extra=None, block=None,
        native: bool | None = None, out_dtype=None, **params):
    """Call a registered method with its defaults for ``conventions``, overridden by ``params``."""
    m = get_method(name)
    g, per = {}, [{} for _ in models]
    for p in m.params:
        if p.per_model:
            vals = params.get(p.name, p.default_for(conventions))
            for i in range(len(models)):
                per[i][p.name] = vals[i] if isinstance(vals, list) else vals
        else:
            g[p.name] = params.get(p.name, p.default_for(conventions))
    return m(base, list(models), per, g, seed=seed, block=block, native=NATIVE if native is None else native,
             out_dtype=out_dtype, **(extra or {}))


def test_linear_weighted_normalized():
    out = run("linear", None, [T([1.0, 2.0]), T([3.0, 4.0])], weight=[1.0, 3.0])
    assert torch.allclose(out, T([2.5, 3.5]))


def test_linear_unnormalized():
    out = run("linear", None, [T([1.0, 2.0]), T([3.0, 4.0])], weight=[1.0, 3.0], normalize=False)
    assert torch.allclose(out, T([10.0, 14.0]))


def test_task_arithmetic():
    out = run("task_arithmetic", T([1.0, 1.0]), [T([2.0, 0.0]), T([1.0, 3.0])], weight=[1.0, 0.5], **{"lambda": 0.5})
    # τ = [1,-1], [0,2]; Σwτ = [1, 0]; base + 0.5·[1,0]
    assert torch.allclose(out, T([1.5, 1.0]))


def test_task_arithmetic_normalize():
    out = run("task_arithmetic", T([0.0]), [T([2.0]), T([4.0])], weight=[1.0, 3.0], normalize=True)
    assert torch.allclose(out, T([(2 + 12) / 4]))


TIES_BASE = torch.zeros(4)
TIES_MODELS = [T([3.0, -1.0, 0.5, -2.0]), T([-2.0, 2.0, 1.0, -0.1])]


def test_ties_paper_conventions():
    # trim (k = n − ⌊n·0.5⌋ = 2nd smallest |τ| = 1 for both): [3,-1,0,-2], [-2,2,1,0]
    # elect on unweighted sums [1,1,1,-2] → [+,+,+,-]; agreeing: τ1 {0,3}, τ2 {1,2}
    # weighted numerators with w=[1,3]: [3, 6, 3, -2]; divisor = count of agreeing = 1 each
    out = run("ties", TIES_BASE, TIES_MODELS, weight=[1.0, 3.0], density=[0.5, 0.5])
    assert torch.allclose(out, T([3.0, 6.0, 3.0, -2.0]))


def test_ties_mergekit_conventions():
    # per-tensor top-2: [3,0,0,-2], [-2,2,0,0]; weighted: [3,0,0,-2], [-6,6,0,0]; sum [-3,6,0,-2]
    # elect [-,+,+,-]; agreeing: τ1 {3}, τ2 {0,1}; num [-6,6,0,-2]; den = Σw agreeing [3,3,0→1,1]
    out = run("ties", TIES_BASE, TIES_MODELS, conventions="mergekit", weight=[1.0, 3.0], density=[0.5, 0.5])
    assert torch.allclose(out, T([-2.0, 2.0, 0.0, -2.0]))


def test_ties_count_consensus_and_lambda():
    base = torch.zeros(3)
    models = [T([1.0, 1.0, -5.0]), T([1.0, -2.0, 1.0]), T([-9.0, -2.0, 1.0])]
    # count: signs per entry: [+,+,-] → +, [+,-,-] → -, [-,+,+] → +
    out = run("ties", base, models, density=[1.0] * 3, consensus_method="count", **{"lambda": 2.0})
    assert torch.allclose(out, 2.0 * T([1.0, -2.0, 1.0]))


def test_ties_sum_without_normalize():
    out = run("ties", torch.zeros(2), [T([1.0, 2.0]), T([3.0, -1.0])], density=[1.0, 1.0], normalize=False)
    assert torch.allclose(out, T([4.0, 2.0]))


def test_dare_density_one_is_task_arithmetic():
    base = torch.randn(50)
    models = [base + torch.randn(50), base + torch.randn(50)]
    out = run("dare_linear", base, models, density=[1.0, 1.0], weight=[0.5, 1.0])
    ref = run("task_arithmetic", base, models, weight=[0.5, 1.0])
    assert torch.allclose(out, ref)


def test_dare_inverse_density_rescale():
    base = torch.zeros(10000)
    model = torch.ones(10000)
    out = run("dare_linear", base, [model], density=[0.25], seed=7)
    kept = out != 0
    assert torch.allclose(out[kept], torch.full((int(kept.sum()),), 4.0))
    assert abs(kept.float().mean().item() - 0.25) < 0.02


def test_dare_l1_rescale_matches_norm():
    base = torch.zeros(1000)
    model = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    out = run("dare_linear", base, [model], density=[0.3], rescale_norm="l1", seed=3)
    assert math.isclose(float(out.abs().sum()), float(model.abs().sum()), rel_tol=1e-5)


def test_dare_is_seeded_and_tensor_specific():
    base = torch.zeros(5000)
    m = [torch.ones(5000)]
    a = run("dare_linear", base, m, density=[0.5], seed=1)
    b = run("dare_linear", base, m, density=[0.5], seed=1)
    c = run("dare_linear", base, m, density=[0.5], seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dare_ties():
    base = torch.zeros(3)
    models = [T([1.0, -1.0, 2.0]), T([3.0, 1.0, -1.0])]
    out = run("dare_ties", base, models, density=[1.0, 1.0])
    # elect sums [4, 0→+ (tensor majority +), 1] → agreeing means [2, 1, 2]
    assert torch.allclose(out, T([2.0, 1.0, 2.0]))


def test_breadcrumbs_window():
    assert breadcrumbs_counts(10, 0.7, 0.1) == (2, 1)
    base = torch.zeros(10)
    tv = torch.arange(1.0, 11.0) * T([1, -1] * 5)
    out = run("breadcrumbs", base, [tv], density=[0.7], gamma=[0.1])
    expected = tv.clone()
    expected[[0, 1, 9]] = 0  # the two smallest and the largest magnitudes
    assert torch.equal(out, expected)


def test_breadcrumbs_does_not_zero_small_tensors():
    # ⌊γn⌋ = 0: mergekit's slice [n_bot:-0] is empty and zeroes the tensor; we keep it
    base = torch.zeros(5)
    tv = T([1.0, 2.0, 3.0, 4.0, 5.0])
    out = run("breadcrumbs", base, [tv], density=[1.0], gamma=[0.01])
    assert torch.equal(out, tv)
    out = run("breadcrumbs", base, [tv], density=[0.6], gamma=[0.01])
    assert torch.equal(out, T([0.0, 0.0, 3.0, 4.0, 5.0]))


def test_slerp_orthogonal_midpoint():
    out = run("slerp", T([1.0, 0.0]), [T([0.0, 1.0])], t=0.5)
    assert torch.allclose(out, T([math.sqrt(0.5), math.sqrt(0.5)]))


def test_slerp_endpoints_and_colinear_fallback():
    v0, v1 = T([1.0, 2.0, 3.0]), T([-2.0, 0.5, 1.0])
    assert torch.equal(run("slerp", v0, [v1], t=0.0), v0)
    assert torch.allclose(run("slerp", v0, [v1], t=1.0), v1, atol=1e-6)
    notes: dict = {}
    out = run("slerp", v0, [2 * v0], t=0.25, extra={"notes": notes})
    assert torch.allclose(out, 1.25 * v0) and notes["lerp_fallback"] == 1


def test_slerp_angle():
    # 90° apart, t = 1/3 → 30° from v0, norms interpolated on the arc
    out = run("slerp", T([2.0, 0.0]), [T([0.0, 2.0])], t=1 / 3)
    assert torch.allclose(out, T([2 * math.cos(math.pi / 6), 2 * math.sin(math.pi / 6)]), atol=1e-6)


def test_model_stock_two_models():
    base = torch.zeros(2)
    out = run("model_stock", base, [T([1.0, 0.0]), T([1.0, 1.0])])
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    assert torch.allclose(out, t * T([1.0, 0.5]))


def test_model_stock_orthogonal_gives_base_and_filter_wise():
    base = T([[5.0, 5.0], [1.0, 1.0]])
    models = [base + T([[1.0, 0.0], [1.0, 0.0]]), base + T([[0.0, 1.0], [1.0, 1.0]])]
    out = run("model_stock", base, models)
    whole = run("model_stock", base, models, filter_wise=True)
    assert torch.allclose(whole[0], base[0])  # row 0: orthogonal deltas → t = 0
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    assert torch.allclose(whole[1], base[1] + t * T([1.0, 0.5]))
    assert not torch.allclose(out, whole)


def test_passthrough_scale():
    assert torch.equal(run("passthrough", None, [T([1.0, -2.0])], scale=0.5), T([0.5, -1.0]))


def test_rank_window_top_k_breaks_ties_by_position_exactly():
    x = T([1.0, 2.0, 2.0, 2.0, 0.5])
    assert window_mask(x, *topk_window(5, 0.4)).tolist() == [False, False, True, True, False]
    # the same across block boundaries
    assert window_mask(x, *topk_window(5, 0.4), block=2).tolist() == [False, False, True, True, False]
    assert int(window_mask(T([3.0, 1.0, 2.0, 0.5]), *topk_window(4, 0.5)).sum()) == 2


def test_rank_window_drops_both_ends():
    x = T([5.0, 1.0, 3.0, 2.0, 4.0])
    assert window_mask(x, 1, 4).tolist() == [False, False, True, True, True]


def test_rank_select_exact_order_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10000, generator=g).abs()
    x[::7] = 0.25  # many exact ties
    sel = RankSelect([0, 17, 5000, 9999])
    for p in range(2):
        for s in range(0, x.numel(), 999):
            sel.observe(p, x[s:s + 999])
        sel.end_pass(p)
    ordered = torch.sort(x).values
    for k, r in enumerate([0, 17, 5000, 9999]):
        v = float(ordered[r])
        assert sel.value[k] == v
        assert sel.less[k] == int((x < v).sum()) and sel.equal[k] == int((x == v).sum())


def test_global_trim_threshold_matches_concatenated_kthvalue():
    from moerge.methods.ties import GlobalTrimThreshold

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g) for s in (37, 1000, 4096)]
    density = 0.2
    pre = GlobalTrimThreshold()
    for p in range(pre.passes):
        for i, t in enumerate(tensors):
            for s in range(0, t.numel(), 512):
                blk = t[s:s + 512]
                pre.observe(p, f"t{i}", s, torch.zeros_like(blk), [blk, 2 * blk], [{"density": density}, {"density": 1.0}])
        pre.end_pass(p)
    allv = torch.cat([t.abs() for t in tensors])
    k = allv.numel() - int(allv.numel() * density)
    assert pre.result()["thresholds"][0] == float(torch.kthvalue(allv, k).values)
    assert pre.result()["thresholds"][1] is None


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties"])
def test_consensus_methods_handle_all_zero_task_vectors(name):
    base = torch.ones(6)
    out = run(name, base, [base.clone(), base.clone()], density=[0.5, 0.5] if name != "breadcrumbs_ties" else [1.0, 1.0])
    assert torch.equal(out, base)
