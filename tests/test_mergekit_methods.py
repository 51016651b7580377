"""The ten methods mergekit 0.1.5 has beyond the classic ones: hand-computed values, seeded masks and
their expectation, identities, streaming invariance, and their errors. (Their agreement with
mergekit's own outputs is in test_mergekit_compat.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moerge
from moerge import native as kernels
from moerge.errors import MoergeError, PlanError
from moerge.methods.arcee_fusion import SAMPLE, importance, quantile_ranks
from moerge.methods.della import della_probabilities
from moerge.methods.masks import keep_with_probability, sample_indices, tensor_seed, uniform24_range
from moerge.methods.spherical import nuslerp_coefficients
from test_methods_values import run

T = torch.tensor
FIXTURES = Path(__file__).parent / "fixtures" / "mergekit"


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- RAM -----------------------------------------------------------------------------------------

def test_ram_keeps_unique_changes_and_averages_shared_ones():
    base = T([0.0, 0.0, 0.0, 0.0])
    a = T([1.0, 2.0, 0.0, 1e-7])
    b = T([3.0, 0.0, 0.0, 0.0])
    out = run("ram", base, [a, b], epsilon=1e-5)
    # entry 0 shared → mean 2; entry 1 unique to a → 2; entry 2 nobody; entry 3 below ε → 0
    assert torch.allclose(out, T([2.0, 2.0, 0.0, 0.0]))


def test_ramplus_amplifies_unique_entries_by_the_overlap_ratio():
    base = torch.zeros(4)
    a = T([1.0, 2.0, 4.0, 0.0])  # shared: entry 0; unique: entries 1, 2 → ρ = 1/2
    b = T([3.0, 0.0, 0.0, 5.0])  # shared: entry 0; unique: entry 3 → ρ = 1
    out = run("ramplus_tl", base, [a, b], r=0.5, alpha=0.8, epsilon=1e-5, rho_scope="tensor")
    la, lb = 1 + 0.5 * 0.5, 1 + 0.5 * 0.8  # ρ_b = 1 clamps to α = 0.8
    assert torch.allclose(out, T([2.0, 2.0 * la, 4.0 * la, 5.0 * lb]))


def test_ramplus_model_scope_counts_over_every_tensor(tmp_path, llama):
    from conftest import load_tensors
    from moerge.methods.ram import shared_unique_counts

    base, a, b = (load_tensors(llama[k]) for k in ("base", "ft1", "ft2"))
    eps = 0.05
    counts = [[0, 0], [0, 0]]
    for k in base:  # the whole-model counts, by hand
        for c, (sh, un) in zip(counts, shared_unique_counts(base[k], [a[k], b[k]], eps)):
            c[0] += sh
            c[1] += un
    lam = [1 + 0.1 * min(sh / max(un, eps), 1000.0) for sh, un in counts]
    outs = {}
    for scope in ("tensor", "model"):
        recipe = tmp_path / f"{scope}.yaml"
        recipe.write_text(f"method: ramplus_tl\nbase_model: {llama['base']}\nparameters: {{epsilon: {eps}, r: 0.1, "
                          f"alpha: 1000, rho_scope: {scope}}}\nmodels:\n  - model: {llama['ft1']}\n"
                          f"  - model: {llama['ft2']}\n")
        moerge.merge(recipe, tmp_path / f"out_{scope}")
        outs[scope] = load_tensors(tmp_path / f"out_{scope}")
    for k in base:
        ta, tb = a[k] - base[k], b[k] - base[k]
        act_a, act_b = ta.abs() > eps, tb.abs() > eps
        both = act_a & act_b
        expect = base[k] + torch.where(both, (ta + tb) / 2, ta * (act_a & ~act_b) * lam[0] + tb * (act_b & ~act_a) * lam[1])
        assert torch.allclose(outs["model"][k], expect, atol=1e-6), k
    assert any(not torch.equal(outs["tensor"][k], outs["model"][k]) for k in base)


# --- NearSwap ------------------------------------------------------------------------------------

def test_nearswap_hand_values():
    base = T([0.0, 0.0, 1.0])
    other = T([0.05, 0.5, 1.0])
    out = run("nearswap", base, [other], t=0.1)
    # |Δ| = .05 → w = 1 (take other); |Δ| = .5 → w = .2; |Δ| = 0 → w = clamp(.1/1e-6) = 1
    assert torch.allclose(out, T([0.05, 0.1, 1.0]))


# --- NuSLERP, Multi-SLERP, Karcher -----------------------------------------------------------------

def test_nuslerp_coefficients_orthogonal_and_colinear():
    c0, c1 = nuslerp_coefficients(0.5, 1.0, 1.0, 0.0)  # orthogonal unit vectors, θ = π/2
    assert c0 == pytest.approx(math.sin(math.pi / 4)) and c1 == pytest.approx(math.sin(math.pi / 4))
    assert nuslerp_coefficients(0.3, 4.0, 1.0, 2.0) == (0.7, 0.3)  # colinear: linear


def test_nuslerp_rows_interpolate_each_row():
    a = T([[1.0, 0.0], [2.0, 0.0]])
    b = T([[0.0, 1.0], [4.0, 0.0]])
    out = run("nuslerp", None, [a, b], weight=[1.0, 1.0], nuslerp_flatten=False)
    s = math.sin(math.pi / 4)
    assert torch.allclose(out, T([[s, s], [3.0, 0.0]]))  # row 0 spherical, row 1 colinear → linear


def test_multislerp_of_orthogonal_unit_vectors_stays_on_the_sphere():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    out = run("multislerp", None, [a, b], weight=[1.0, 1.0])
    assert torch.allclose(out, T([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)


def test_multislerp_antipodal_three_models_is_a_clear_error():
    a = T([1.0, 0.0])
    with pytest.raises(ValueError, match="weighted mean of the normalised models is zero"):
        run("multislerp", None, [a, -a, a.clone()], weight=[1.0, 2.0, 1.0])


def test_multislerp_of_models_that_all_equal_the_base_is_the_base():
    """A tensor no expert changed (LoRA experts' embeddings): zero task vectors, the base out, not an error."""
    base = rand(3, 4, seed=5)
    out = run("multislerp", base, [base.clone(), base.clone(), base.clone()], weight=[1.0, 1.0, 1.0])
    assert torch.equal(out, base)
    assert torch.equal(run("multislerp", None, [torch.zeros(3)] * 3, weight=[1.0, 1.0, 1.0]), torch.zeros(3))


def test_karcher_of_two_unit_vectors_is_their_bisector():
    a, b = T([1.0, 0.0]), T([0.0, 3.0])
    out = run("karcher", None, [a, b], max_iter=50, tol=1e-9)
    assert torch.allclose(out, 2.0 * T([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-5)  # mean norm 2


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 200), seed=st.integers(0, 2**31 - 1), k=st.integers(2, 4),
       method=st.sampled_from(["multislerp", "karcher", "nuslerp", "sce", "ram", "ramplus_tl", "della"]))
def test_identical_models_give_the_model(n, seed, k, method):
    """N copies of one model merge to that model (with a base: base + its task vector)."""
    x = rand(n, seed=seed)
    k = 2 if method == "nuslerp" else k
    base = None if method in ("multislerp", "karcher", "nuslerp") else rand(n, seed=seed + 1)
    kw: dict = {"weight": [1.0] * k} if method in ("multislerp", "nuslerp") else {}
    if method == "della":
        kw["density"] = [1.0] * k
    out = run(method, base, [x.clone() for _ in range(k)], **kw)
    assert torch.allclose(out, x, atol=1e-5 * max(1.0, float(x.abs().max())))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 200), seed=st.integers(0, 2**31 - 1),
       method=st.sampled_from(["della_linear", "nearswap", "multislerp", "karcher", "sce", "ram"]))
def test_one_expert_is_that_expert(n, seed, method):
    base, x = rand(n, seed=seed), rand(n, seed=seed + 1)
    kw: dict = {"nearswap": {"t": 1e9}, "della_linear": {"density": [1.0]}, "multislerp": {"weight": [1.0]}}.get(method, {})
    out = run(method, None if method in ("multislerp", "karcher") else base, [x], **kw)
    assert torch.allclose(out, x, atol=1e-5)


@pytest.mark.parametrize("method,kw", [
    ("multislerp", {"weight": [0.2, 0.5, 0.9]}), ("karcher", {}), ("sce", {"select_topk": 0.3}),
    ("nuslerp", {"weight": [0.2, 0.5], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("arcee_fusion", {}), ("della", {"density": [0.5] * 3, "rank_scope": "row", "rescale_norm": "l1"}),
    ("ramplus_tl", {}),
])
def test_blocks_do_not_change_the_result(method, kw):
    base = rand(64, 50, seed=1)
    n = {"nuslerp": 2, "arcee_fusion": 1}.get(method, 3)
    models = [base + 0.1 * rand(64, 50, seed=10 + i) for i in range(n)]
    needs_base = method not in ("multislerp", "karcher", "nuslerp")
    whole = run(method, base if needs_base else None, models, block=1 << 20, **kw)
    small = run(method, base if needs_base else None, models, block=300, **kw)
    assert torch.allclose(whole, small, atol=1e-6)


@pytest.mark.skipif(not kernels.available(), reason="native kernels not built")
@pytest.mark.parametrize("method", ["multislerp", "karcher", "nuslerp"])
def test_native_and_torch_paths_agree_on_bf16(method):
    base = rand(40, 30, seed=3).bfloat16()
    models = [(base.float() + 0.2 * rand(40, 30, seed=20 + i)).bfloat16() for i in range(2)]
    kw = {} if method == "karcher" else {"weight": [0.4, 0.6]}
    a = run(method, base, models, native=True, **kw)
    b = run(method, base, models, native=False, **kw)
    assert a.dtype == torch.bfloat16
    assert torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2)


# --- SCE -----------------------------------------------------------------------------------------

def test_sce_hand_values():
    base = torch.zeros(3)
    a = T([1.0, -1.0, 2.0])
    b = T([3.0, 1.0, -1.0])
    out = run("sce", base, [a, b], select_topk=1.0)
    wa, wb = (1 + 1 + 4) / 3, (9 + 1 + 1) / 3
    wa, wb = wa / (wa + wb), wb / (wa + wb)
    # entry 0: both agree (+) → weighted mean; entry 1: vote 0 → +, only b; entry 2: vote + → only a
    expect = T([(wa * 1 + wb * 3) / (wa + wb), 1.0, 2.0])
    assert torch.allclose(out, expect)


def test_sce_select_keeps_the_highest_variance_entries():
    base = torch.zeros(4)
    a = T([1.0, 0.0, 5.0, 1.0])
    b = T([1.0, 2.0, -5.0, 1.0])
    out = run("sce", base, [a, b], select_topk=0.5)  # variances 0, 1, 25, 0 → 2 non-zero → k = 1: entry 2
    assert out[0] == 0 and out[1] == 0 and out[3] == 0 and out[2] != 0


# --- DELLA ---------------------------------------------------------------------------------------

def test_della_probabilities_hand_values():
    mag = T([[0.1, 0.3, 0.2], [5.0, 1.0, 3.0]])
    p_row = della_probabilities(mag, 0.5, 0.1, "row", (2, 3))  # ρ = rank/(3−1), p = .5 + .1(2ρ − 1)
    assert torch.allclose(p_row.float(), T([0.4, 0.6, 0.5, 0.6, 0.4, 0.5]))
    p_t = della_probabilities(mag, 0.5, 0.05, "tensor", (2, 3))  # ρ = (rank+1)/6
    ranks = T([0, 2, 1, 5, 3, 4])
    assert torch.allclose(p_t.float(), 0.5 + 0.05 * (2 * (ranks + 1) / 6 - 1))


def test_della_masks_are_the_seeded_stream_hand_computed():
    base = torch.zeros(2, 3)
    tv = T([[0.1, 0.3, 0.2], [5.0, 1.0, 3.0]])
    out = run("della_linear", base, [tv], density=[0.5], epsilon=[0.2], rank_scope="row", epsilon_spread="full",
              rescale=False, seed=7)
    p = della_probabilities(tv.abs(), 0.5, 0.2, "row", (2, 3))
    u = uniform24_range(0, 6, tensor_seed(7, 0))
    keep = u < torch.ceil(p * (1 << 24)).long()
    assert torch.equal(keep, keep_with_probability(0, p, tensor_seed(7, 0)))
    assert torch.equal(out.reshape(-1), tv.reshape(-1) * keep)


def test_della_inverse_probability_is_unbiased_over_seeds():
    base = torch.zeros(400)
    tv = rand(400, seed=5)
    seeds = 400
    mean = sum(run("della_linear", base, [tv], density=[0.4], epsilon=[0.2], seed=s) for s in range(seeds)) / seeds
    p = della_probabilities(tv.abs(), 0.4, 0.1, "tensor", (400,)).float()
    # E[τ·keep/p] = τ; the sample mean's error is τ·sqrt((1−p)/(p·seeds)) per entry
    err = (mean - tv).abs() / (tv.abs() * ((1 - p) / (p * seeds)).sqrt()).clamp_min(1e-9)
    assert float(err.mean()) < 1.2 and float((err > 4.5).float().mean()) < 0.01


def test_della_keeps_each_entry_with_its_probability():
    base = torch.zeros(3, 1000)
    tv = rand(3, 1000, seed=2)
    p = della_probabilities(tv.abs(), 0.5, 0.15, "row", (3, 1000)).view(3, 1000).float()
    kept = sum((run("della_linear", base, [tv], density=[0.5], epsilon=[0.15], rank_scope="row",
                    epsilon_spread="full", rescale=False, seed=s) != 0).float() for s in range(200)) / 200
    # entries grouped by probability decile: the observed keep rate matches
    for lo in torch.linspace(0.35, 0.6, 5):
        sel = (p >= lo) & (p < lo + 0.05)
        assert abs(float(kept[sel].mean() - p[sel].mean())) < 0.02


def test_della_bad_epsilon_is_a_plan_error_naming_the_tensor(tmp_path, llama):
    base, a = llama["base"], llama["ft1"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: della\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                      "    parameters: {density: 0.1, epsilon: 0.3}\n")
    with pytest.raises(PlanError, match=r"della: model 1: density ± epsilon/2 .* \(tensor '.*'\)"):
        moerge.merge(recipe, tmp_path / "out", dry_run=True)  # found by the planner, before anything runs
    with pytest.raises(PlanError, match=r"model 1: density ± epsilon/2"):
        moerge.merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="density ± epsilon must"):  # and by the method itself
        run("della", torch.zeros(4), [torch.ones(4)], density=[0.1], epsilon=[0.15], epsilon_spread="full")


# --- Arcee Fusion --------------------------------------------------------------------------------

def test_arcee_fusion_hand_threshold():
    base = rand(8, 16, seed=1)
    model = base + 0.3 * rand(8, 16, seed=2)
    out = run("arcee_fusion", base, [model])
    imp = importance(base, model, 16)
    s = torch.sort(imp).values
    q1, med, q3 = (s[r] for r in quantile_ranks(imp.numel()))
    keep = (imp >= med + 1.5 * (q3 - q1)).view(8, 16)
    assert 0 < int(keep.sum()) < keep.numel()
    assert torch.equal(out, torch.where(keep, model, base))


def test_arcee_fusion_sampled_quantiles_come_from_the_seeded_sample(monkeypatch):
    import moerge.methods.arcee_fusion as af

    monkeypatch.setattr(af, "SAMPLE", 500)  # a tensor larger than the sample, at test size
    base = rand(40, 50, seed=1)
    model = base + 0.3 * rand(40, 50, seed=2)
    out = run("arcee_fusion", base, [model], quantiles="sampled", seed=11, block=700)
    imp = importance(base, model, 50)
    sample = torch.sort(imp[sample_indices(500, imp.numel(), 11)]).values
    q1, med, q3 = (sample[r] for r in quantile_ranks(500))
    keep = (imp >= med + 1.5 * (q3 - q1)).view(40, 50)
    assert torch.equal(out, torch.where(keep, model, base))
    assert SAMPLE == 1_000_000  # the module's value (mergekit's) is untouched outside this test


def test_sample_indices_are_uniform_and_reproducible():
    idx = sample_indices(100_000, 10, 3)
    assert torch.equal(idx, sample_indices(100_000, 10, 3))
    counts = torch.bincount(idx, minlength=10).float()
    assert float((counts - 10_000).abs().max()) < 500


# --- Recipes -------------------------------------------------------------------------------------

def test_recipes_mergekit_rejects_are_refused_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(FIXTURES)
    for name in ("nuslerp_three", "della_bad_epsilon", "model_stock_n1"):
        with pytest.raises(MoergeError) as err:
            moerge.merge(f"recipes/failing/{name}.yaml", tmp_path / name)
        assert "internal error" not in str(err.value)
        assert not (tmp_path / name).exists()


def test_methods_that_need_a_base_say_so(tmp_path, llama):
    a = llama["ft1"]
    for method in ("della", "sce", "ram", "nearswap", "arcee_fusion"):
        recipe = tmp_path / f"{method}.yaml"
        recipe.write_text(f"method: {method}\nparameters: {{t: 0.1}}\nmodels:\n  - model: {a}\n"
                          if method == "nearswap" else f"method: {method}\nmodels:\n  - model: {a}\n")
        with pytest.raises(MoergeError, match="base"):
            moerge.merge(recipe, tmp_path / f"out_{method}")


def test_a_parameter_mergekit_ignores_is_a_warning_not_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(FIXTURES)
    res = moerge.merge("recipes/sce.yaml", tmp_path / "out")  # `weight:` under sce, which has none
    assert any("sce has no parameter 'weight'; ignored" in w for w in res.warnings)
    bad = tmp_path / "typo.yaml"
    bad.write_text((FIXTURES / "recipes" / "sce.yaml").read_text().replace("weight", "wieght"))
    with pytest.raises(PlanError, match="no parameter 'wieght'"):
        moerge.merge(bad, tmp_path / "out2")


@pytest.mark.skipif(not kernels.available(), reason="native kernels not built")
def test_native_stream_equals_the_torch_stream_across_the_32_bit_wrap():
    from moerge.methods.masks import uniform24_torch

    for start, n, seed in [(0, 5000, 3), ((1 << 32) - 2500, 5000, (1 << 63) - 7), (10**10, 4096, 0)]:
        assert torch.equal(kernels.uniform24(start, n, seed).long(), uniform24_torch(start, start + n, seed))
