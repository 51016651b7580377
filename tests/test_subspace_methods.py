"""TSV-M, Iso-C, Iso-CTS, KnOTS and WUDI: hand-computed values, the reference algorithms written out
literally (zero-padded bases, full SVDs, autograd), identities, fallbacks and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moerge
from moerge.errors import MoergeError
from moerge.methods.subspace import iso_c_merge, iso_cts_merge, iso_cts_split, knots_basis, polar, tsv_merge
from moerge.methods.wudi import wudi_loss, wudi_merge
from test_methods_values import run

T = torch.tensor


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def svd(x):
    return torch.linalg.svd(x, full_matrices=False)


# --- the reference algorithms, written out as the papers' code computes them ----------------------

def tsv_reference(taus):
    """Zero-padded U, S, V of width r = min(m, n), each task's top ⌊r/T⌋ triplets in its own slot, then
    the polar factors of the padded matrices (TSV-M reference code)."""
    n_tasks = len(taus)
    u0, s0, v0 = svd(taus[0])
    sum_u, sum_s, sum_v = torch.zeros_like(u0), torch.zeros_like(s0), torch.zeros_like(v0)
    k = s0.shape[0] // n_tasks
    for i, t in enumerate(taus):
        u, s, v = svd(t)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k] = v[:k]
    uu, _, vu = svd(sum_u)
    uv, _, vv = svd(sum_v)
    return uu @ vu @ torch.diag(sum_s) @ uv @ vv


def iso_cts_reference(taus, fraction):
    shape = taus[0].shape
    r, n_tasks = min(shape), len(taus)
    common = int(r * fraction)
    common = r - round((r - common) / n_tasks) * n_tasks
    u, s, v = svd(sum(taus))
    cu, cs, cv = u[:, :common], s[:common], v[:common]
    per = (r - common) // n_tasks
    bu, bs, bv = torch.zeros(shape[0], r, dtype=u.dtype), torch.zeros(r, dtype=u.dtype), torch.zeros(r, shape[1], dtype=u.dtype)
    for i, t in enumerate(taus):
        ut, st_, vt = svd(t - cu @ cu.T @ t)
        bu[:, i * per:(i + 1) * per] = ut[:, :per]
        bs[i * per:(i + 1) * per] = st_[:per]
        bv[i * per:(i + 1) * per] = vt[:per]
    bu[:, n_tasks * per:] = cu
    bs[n_tasks * per:] = cs
    bv[n_tasks * per:] = cv
    a, _, b = svd(bu)
    c, _, d = svd(bv)
    return (a @ b) @ torch.diag(torch.ones_like(bs) * bs.mean()) @ (c @ d)


def ties_by_hand(vectors):
    """Density 1: sign elected by the summed values, mean over the agreeing non-zero entries."""
    x = torch.stack(vectors)
    sign = torch.sign(x.sum(0))
    agree = (torch.sign(x) == sign) & (x != 0)
    return (x * agree).sum(0) / agree.sum(0).clamp(min=1)


def knots_reference(taus, eps=1e-5):
    u, s, vh = svd(torch.cat(taus, 1))
    keep = s > eps
    u, s, vh = u[:, keep], s[keep], vh[keep]
    svs = torch.split(torch.diag(s) @ vh, taus[0].shape[1], dim=1)
    return u @ ties_by_hand(list(svs))


def wudi_reference(taus, iterations=300, lr=1e-5):
    """The reference loop: autograd through T products (x − τᵢ)τᵢᵀ per step."""
    tvs = torch.stack(taus)
    x = torch.nn.Parameter(tvs.sum(0))
    opt = torch.optim.Adam([x], lr=lr)
    norms = tvs.reshape(len(taus), -1).norm(dim=1) ** 2
    for _ in range(iterations):
        loss = (torch.matmul(x.unsqueeze(0) - tvs, tvs.transpose(1, 2)) ** 2 / norms[:, None, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x.detach()


# --- TSV-M ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,n", [((10, 7), 3), ((8, 12), 2), ((9, 9), 4)])
def test_tsv_m_equals_the_zero_padded_reference(shape, n):
    taus = [rand(*shape, seed=i) for i in range(n)]
    assert torch.allclose(tsv_merge(taus), tsv_reference(taus), atol=1e-10)


def test_tsv_m_of_tasks_in_orthogonal_subspaces_is_their_sum():
    e = torch.eye(4, dtype=torch.float64)
    t1 = 3 * torch.outer(e[0], e[1]) + 0.5 * torch.outer(e[1], e[0])
    t2 = 2 * torch.outer(e[2], e[3]) + 1 * torch.outer(e[3], e[2])
    assert torch.allclose(tsv_merge([t1, t2]), t1 + t2, atol=1e-12)


def test_tsv_m_keeps_each_tasks_top_singular_vectors():
    e = torch.eye(4, dtype=torch.float64)
    t1 = 3 * torch.outer(e[0], e[0]) + 1 * torch.outer(e[1], e[1])  # k = 2: both kept
    t2 = 2 * torch.outer(e[2], e[2]) + 0.1 * torch.outer(e[3], e[3])
    t3 = 5 * torch.outer(e[3], e[3])  # T = 3 on rank 4: k = 1, so t1 keeps only its 3·e0e0ᵀ
    out = tsv_merge([t1, t2, t3])
    assert torch.allclose(out, torch.diag(T([3.0, 0, 2, 5], dtype=torch.float64)), atol=1e-12)


def test_tsv_m_zero_task_vector_adds_no_direction():
    a = rand(6, 6, seed=1)
    zero = torch.zeros(6, 6, dtype=torch.float64)
    u, s, vh = svd(a)  # k = 3: a's own top three triplets, nothing from the zero model
    assert torch.allclose(tsv_merge([a, zero]), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-12)
    assert torch.equal(tsv_merge([zero, zero]), zero)


def test_tsv_m_more_models_than_the_rank_is_an_error():
    with pytest.raises(ValueError, match="exclude: true"):
        run("tsv_m", torch.zeros(2, 8), [torch.ones(2, 8)] * 3)


# --- Iso-C, Iso-CTS ------------------------------------------------------------------------------

def test_iso_c_flattens_the_spectrum_to_its_mean():
    t1 = torch.diag(T([3.0, 0.0], dtype=torch.float64))
    t2 = torch.diag(T([0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(iso_c_merge([t1, t2]), 2 * torch.eye(2, dtype=torch.float64))


def test_iso_c_through_the_executor_path_with_base_weight_and_lambda():
    base = T([[1.0, 0.0], [0.0, 1.0]])
    a = base + T([[4.0, 0.0], [0.0, 0.0]])
    b = base + T([[0.0, 0.0], [0.0, 1.0]])
    # weights (0.5, 2): Σ wτ = diag(2, 2) → mean 2 → λ = 0.5 → diag(1, 1)
    out = run("iso_c", base, [a, b], weight=[0.5, 2.0], **{"lambda": 0.5})
    assert torch.allclose(out, base + torch.eye(2), atol=1e-6)


def test_iso_c_rank_rtol_keeps_the_supported_subspace():
    t = torch.diag(T([4.0, 2.0, 1e-9], dtype=torch.float64))
    assert torch.allclose(iso_c_merge([t]), torch.eye(3, dtype=torch.float64) * (6 + 1e-9) / 3)  # reference: all kept
    assert torch.allclose(iso_c_merge([t], rtol=1e-6), torch.diag(T([3.0, 3.0, 0.0], dtype=torch.float64)))


@pytest.mark.parametrize("r,n,f,expected", [(10, 3, 0.8, (7, 1)), (8, 4, 0.8, (8, 0)), (12, 2, 0.5, (6, 3)),
                                            (3, 4, 0.1, (3, 0)), (16, 3, 0.8, (13, 1))])
def test_iso_cts_split_rounds_as_the_reference(r, n, f, expected):
    assert iso_cts_split(r, n, f) == expected


@pytest.mark.parametrize("shape,n,f", [((12, 9), 3, 0.8), ((8, 16), 2, 0.5), ((10, 10), 4, 0.6)])
def test_iso_cts_equals_the_zero_padded_reference(shape, n, f):
    taus = [rand(*shape, seed=10 + i) for i in range(n)]
    assert torch.allclose(iso_cts_merge(taus, f), iso_cts_reference(taus, f), atol=1e-10)


def test_iso_cts_output_is_isotropic_and_at_fraction_one_is_iso_c():
    taus = [rand(9, 7, seed=20 + i) for i in range(3)]
    s = torch.linalg.svdvals(iso_cts_merge(taus, 0.8))
    assert torch.allclose(s, s.mean().expand_as(s))
    assert torch.allclose(iso_cts_merge(taus, 1.0), iso_c_merge(taus), atol=1e-10)


# --- KnOTS ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,n", [((6, 4), 3), ((20, 3), 2), ((5, 5), 2)])  # wide and tall concatenations
def test_knots_basis_and_ties_equal_the_full_svd_reference(shape, n):
    taus = [rand(*shape, seed=30 + i) for i in range(n)]
    u, svs = knots_basis(taus, 1e-5)
    assert torch.allclose(u @ torch.cat(svs, 1), torch.cat(taus, 1), atol=1e-10)  # an exact factorisation
    assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-10)
    base = torch.zeros(shape, dtype=torch.float32)
    out = run("knots", base, [t.float() for t in taus])
    assert torch.allclose(out.double(), knots_reference(taus), atol=1e-5)


def test_knots_of_lora_updates_works_in_their_joint_rank():
    gen = torch.Generator().manual_seed(3)
    taus = [(torch.randn(16, 2, generator=gen) @ torch.randn(2, 12, generator=gen)).double() for _ in range(3)]
    u, svs = knots_basis(taus, 1e-5)
    assert u.shape[1] == 6  # T·r directions, whatever the size of the matrix


def test_knots_weights_and_lambda_act_on_the_aligned_coordinates():
    taus = [rand(6, 4, seed=40 + i).float() for i in range(2)]
    base = torch.zeros(6, 4)
    out = run("knots", base, taus, merge="task_arithmetic", weight=[1.0, 0.5], **{"lambda": 0.8})
    assert torch.allclose(out, 0.8 * (taus[0] + 0.5 * taus[1]), atol=1e-5)  # TA commutes with the basis


def test_knots_density_trims_each_models_coordinates():
    taus = [rand(6, 4, seed=50 + i).float() for i in range(2)]
    full = run("knots", torch.zeros(6, 4), taus)
    trimmed = run("knots", torch.zeros(6, 4), taus, density=0.2)
    assert not torch.allclose(full, trimmed)
    assert torch.allclose(run("knots", torch.zeros(6, 4), taus, density=1.0), full)


# --- WUDI ----------------------------------------------------------------------------------------

def test_wudi_adam_equals_the_autograd_reference():
    taus = [rand(9, 6, seed=60 + i, scale=0.01).float() for i in range(3)]
    ref = wudi_reference(taus, iterations=200, lr=1e-4)
    assert torch.allclose(wudi_merge(taus, 200, 1e-4), ref, atol=1e-7)


def test_wudi_exact_is_the_minimiser_gradient_descent_reaches():
    taus = [rand(5, 8, seed=70 + i) for i in range(2)]  # wide: A is singular, the minimiser not unique
    exact = wudi_merge(taus, solver="exact")
    gd = torch.stack(taus).sum(0).clone()
    a = sum(t.T @ t / (t * t).sum() for t in taus)
    b = sum(t @ t.T @ t / (t * t).sum() for t in taus)
    for _ in range(20000):
        gd -= 0.05 * 2 * (gd @ a - b)
    assert torch.allclose(exact, gd, atol=1e-8)
    assert wudi_loss(exact, taus) < wudi_loss(torch.stack(taus).sum(0), taus)
    assert wudi_loss(exact, taus) <= wudi_loss(wudi_merge(taus, 300, 1e-3), taus) + 1e-12


def test_wudi_leaves_zero_task_vectors_out_and_all_zero_is_zero():
    a = rand(5, 4, seed=80)
    zero = torch.zeros(5, 4, dtype=torch.float64)
    assert torch.allclose(wudi_merge([a, zero], solver="exact"), a)
    assert torch.equal(wudi_merge([zero, zero]), zero)


# --- what they share -------------------------------------------------------------------------------

SVD_METHODS = ("tsv_m", "iso_c", "iso_cts", "knots", "wudi")


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 7), st.integers(2, 7), st.integers(0, 10**6))
def test_one_expert_in_is_that_expert(m, n, seed):
    base = rand(m, n, seed=seed).float()
    expert = base + rand(m, n, seed=seed + 1).float() * 0.1
    for name in ("tsv_m", "knots", "wudi"):  # Iso flattens the spectrum, so it is not an identity
        assert torch.allclose(run(name, base, [expert]), expert, atol=1e-5), name


def test_iso_c_of_one_expert_with_a_flat_spectrum_is_that_expert():
    q, _ = torch.linalg.qr(rand(5, 5, seed=2))
    base = torch.zeros(5, 5)
    expert = (0.3 * q).float()
    assert torch.allclose(run("iso_c", base, [expert]), expert, atol=1e-6)
    assert torch.allclose(run("iso_cts", base, [expert]), expert, atol=1e-6)


@pytest.mark.parametrize("name", SVD_METHODS)
def test_one_dimensional_and_excluded_tensors_take_the_mean(name):
    base = T([1.0, 2.0, 3.0])
    a, b = base + T([1.0, 0.0, 2.0]), base + T([3.0, 2.0, 0.0])
    assert torch.allclose(run(name, base, [a, b], **{"lambda": 0.5}), base + 0.5 * T([2.0, 1.0, 1.0]))
    m0 = rand(4, 3, seed=5).float()
    m1, m2 = m0 + 1.0, m0 - 3.0
    assert torch.allclose(run(name, m0, [m1, m2], exclude=True), m0 - 1.0, atol=1e-6)


@pytest.mark.parametrize("name", SVD_METHODS)
def test_non_finite_task_vectors_are_refused(name):
    base = torch.zeros(3, 3)
    bad = torch.ones(3, 3)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="model 2's task vector holds NaN/Inf"):
        run(name, base, [torch.ones(3, 3), bad])


@pytest.mark.parametrize("name", SVD_METHODS)
def test_zero_task_vectors_give_the_base(name):
    base = rand(4, 5, seed=9).float()
    assert torch.allclose(run(name, base, [base.clone(), base.clone()]), base)


@pytest.mark.parametrize("name", SVD_METHODS)
def test_float64_and_float32_agree(name):
    base = rand(7, 5, seed=11).float()
    models = [base + 0.1 * rand(7, 5, seed=12 + i).float() for i in range(3)]
    key = "compute_dtype" if name == "wudi" else "svd_dtype"
    lo = run(name, base, models, **{key: "float32"})
    hi = run(name, base, models, **{key: "float64"})
    assert torch.allclose(lo, hi, atol=1e-5)


def test_svd_methods_merge_real_checkpoints_and_loras(tmp_path, llama):
    from conftest import load_tensors
    from moerge.testing import make_lora

    base = load_tensors(llama["base"])
    for name in SVD_METHODS:
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(f"method: {name}\nbase_model: {llama['base']}\nmodels:\n  - model: {llama['ft1']}\n"
                          f"  - model: {llama['ft2']}\n" + ("parameters: {iterations: 5}\n" if name == "wudi" else ""))
        moerge.merge(recipe, tmp_path / f"out_{name}")
        out = load_tensors(tmp_path / f"out_{name}")
        assert out.keys() == base.keys()
        changed = [k for k in out if not torch.equal(out[k], base[k])]
        assert changed
    loras = [make_lora(llama["base"], tmp_path / f"lora{i}", seed=i, rank=2) for i in range(2)]
    recipe = tmp_path / "knots_lora.yaml"
    recipe.write_text(f"method: knots\nbase_model: {llama['base']}\nmodels:\n  - model: {loras[0]}\n"
                      f"  - model: {loras[1]}\n")
    moerge.merge(recipe, tmp_path / "out_knots_lora")
    out = load_tensors(tmp_path / "out_knots_lora")
    delta = {k: out[k].double() - base[k].double() for k in out if not torch.equal(out[k], base[k])}
    assert delta and all(torch.linalg.matrix_rank(d, atol=1e-5) <= 4 for d in delta.values())  # T·r = 4


def test_non_finite_input_allowed_through_is_still_refused_by_name(tmp_path, llama):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(llama["ft2"], bad)
    f = next(bad.glob("*.safetensors"))
    t = load_file(f)
    name = next(k for k in t if k.endswith("q_proj.weight"))
    t[name][0, 0] = float("inf")
    save_file(t, f, metadata={"format": "pt"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: tsv_m\nbase_model: {llama['base']}\nmodels:\n  - model: {llama['ft1']}\n"
                      f"  - model: {bad}\n")
    with pytest.raises(MoergeError, match=f"tsv_m cannot merge tensor '{name}': model 2's task vector holds NaN/Inf"):
        moerge.merge(recipe, tmp_path / "out", allow_nonfinite=True)
    assert not (tmp_path / "out").exists()


def test_svd_methods_without_a_base_say_so(tmp_path, llama):
    for name in SVD_METHODS:
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(f"method: {name}\nmodels:\n  - model: {llama['ft1']}\n  - model: {llama['ft2']}\n")
        with pytest.raises(MoergeError, match="base"):
            moerge.merge(recipe, tmp_path / f"out_{name}")


def test_polar_factor_has_orthonormal_columns():
    q = polar(rand(7, 3, seed=1))
    assert torch.allclose(q.T @ q, torch.eye(3, dtype=q.dtype), atol=1e-12)
