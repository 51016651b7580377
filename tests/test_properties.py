"""Hypothesis properties of the merge math."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_methods_values import run

GTA = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"]
ALL_WITH_BASE = GTA + ["model_stock", "slerp"]

sizes = st.integers(min_value=1, max_value=300)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
conv = st.sampled_from(["paper", "mergekit"])


def tensor(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=25, deadline=None)
@given(n=sizes, seed=seeds, k=st.integers(2, 4), conventions=conv,
       method=st.sampled_from(ALL_WITH_BASE + ["linear"]))
def test_merging_identical_models_returns_the_model(n, seed, k, conventions, method):
    x = tensor(n, seed)
    models = [x.clone() for _ in range(1 if method == "slerp" else k)]
    kw = {"density": [0.5] * len(models)} if method in GTA and method != "breadcrumbs_ties" else {}
    out = run(method, None if method == "linear" else x.clone(), models, conventions=conventions, **kw)
    assert torch.allclose(out, x, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(n=sizes, seed=seeds, conventions=conv, method=st.sampled_from(GTA + ["linear"]))
def test_one_model_at_weight_one_is_identity(n, seed, conventions, method):
    base, model = tensor(n, seed), tensor(n, seed + 1)
    kw = {"weight": [1.0]}
    if method != "linear":
        kw["density"] = [1.0]
    if method.startswith("breadcrumbs"):
        kw["gamma"] = [0.0]
    out = run(method, None if method == "linear" else base, [model], conventions=conventions, **kw)
    assert torch.allclose(out, model, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(n=sizes, seed=seeds, lam=st.floats(0.1, 2.0), w=st.floats(0.1, 3.0), conventions=conv)
def test_ties_density_one_single_expert_is_task_arithmetic(n, seed, lam, w, conventions):
    base, model = tensor(n, seed), tensor(n, seed + 1)
    ties = run("ties", base, [model], conventions=conventions, density=[1.0], weight=[w], normalize=False,
               **{"lambda": lam})
    ta = run("task_arithmetic", base, [model], weight=[w], **{"lambda": lam})
    assert torch.allclose(ties, ta, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(n=sizes, seed=seeds, t=st.floats(0.0, 1.0))
def test_slerp_endpoints(n, seed, t):
    a, b = tensor(n, seed), tensor(n, seed + 1)
    assert torch.allclose(run("slerp", a, [b], t=0.0), a, atol=1e-6)
    assert torch.allclose(run("slerp", a, [b], t=1.0), b, atol=1e-5)
    mid = run("slerp", a, [b], t=t)
    # the interpolant's norm lies between the endpoints' norms scaled by at most 1/cos(half angle)
    assert torch.isfinite(mid).all()


@settings(max_examples=15, deadline=None)
@given(seed=seeds, p=st.floats(0.1, 0.9), conventions=st.just("paper"))
def test_dare_keeps_about_density_and_preserves_expectation(seed, p, conventions):
    n = 40000
    base = torch.zeros(n)
    model = torch.ones(n)
    out = run("dare_linear", base, [model], density=[p], seed=seed)
    kept = float((out != 0).float().mean())
    assert abs(kept - p) < 5 * (p * (1 - p) / n) ** 0.5 + 1e-3
    assert abs(float(out.mean()) - 1.0) < 5 * ((1 - p) / (p * n)) ** 0.5 + 1e-3


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 300), seed=seeds, d=st.floats(0.05, 1.0), block=st.integers(1, 64))
def test_magnitude_trim_keeps_exactly_k_largest(n, seed, d, block):
    from moerge.methods.masks import topk_window
    from test_methods_values import window_mask

    x = tensor(n, seed).abs()
    x[::3] = x[0]  # exact ties
    m = window_mask(x, *topk_window(n, d), block=block)
    k = n if d >= 1 else max(1, int(d * n))
    assert int(m.sum()) == k
    if k < n:
        assert float(x[m].min()) >= float(x[~m].max())


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 40), seed=seeds, block=st.integers(1, 100), conventions=conv,
       method=st.sampled_from(ALL_WITH_BASE + ["linear", "passthrough"]))
def test_result_does_not_depend_on_block_size(rows, cols, seed, block, conventions, method):
    base = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    k = 1 if method in ("slerp", "passthrough") else 3
    models = [base + torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + i + 1)) for i in range(k)]
    kw = {"density": [0.4] * k} if method in GTA else {}
    if method == "model_stock":
        kw = {"filter_wise": bool(seed % 2)}
    b = None if method in ("linear", "passthrough") else base
    whole = run(method, b, models, conventions=conventions, **kw)
    blocked = run(method, b, models, conventions=conventions, block=block, **kw)
    assert torch.equal(whole, blocked)


@settings(max_examples=25, deadline=None)
@given(n=sizes, seed=seeds, k=st.integers(2, 4))
def test_linear_is_permutation_invariant(n, seed, k):
    models = [tensor(n, seed + i) for i in range(k)]
    w = [0.5 + i for i in range(k)]
    a = run("linear", None, models, weight=w)
    b = run("linear", None, models[::-1], weight=w[::-1])
    assert torch.allclose(a, b, atol=1e-6)
