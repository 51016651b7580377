"""Data-aware merges (fisher, regmean, mats): the math against closed forms and hand-computed values,
and the whole path from `moerge stats` folders through a recipe to a merged model, with its errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from moerge import api
from moerge.errors import NonFiniteError, PlanError
from moerge.methods import get_method
from moerge.methods.mats import conjugate_gradient

# -- the math, on in-memory tensors ---------------------------------------------------------------


class FakeStats:
    """A StatsSource over in-memory tensors: ``parts[k]`` is model k's statistic (tuple of parts)."""

    def __init__(self, kind: str, parts: list[tuple[torch.Tensor, ...]], norms: list[float] | None = None):
        self.kind, self.parts, self.norms = kind, parts, norms

    def whole(self, model: int, part: int = 0) -> torch.Tensor:
        return self.parts[model][part].float()

    def block(self, model: int, start: int, stop: int, part: int = 0) -> torch.Tensor:
        return self.parts[model][part].reshape(-1)[start:stop].float().clone()

    def norm(self, model: int) -> float:
        assert self.norms is not None
        return self.norms[model]


def _run(method: str, models: list[torch.Tensor], stats: Any, base: torch.Tensor | None = None,
         block: int | None = None, weight: list[float] | None = None, **params: Any) -> tuple[torch.Tensor, dict]:
    m = get_method(method)
    glob = {p.name: params.get(p.name, p.default) for p in m.params if not p.per_model}
    mparams = [{"weight": w} for w in (weight or [1.0] * len(models))]
    notes: dict[str, Any] = {}
    out = m(base, models, mparams, glob, stats=stats, name="w", notes=notes, block=block)
    return out, notes


def _spd(n: int, seed: int, rows: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows or 3 * n, n, generator=g, dtype=torch.float64)
    return x.T @ x / x.shape[0]


def _weights(shape: tuple[int, int], n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def test_regmean_hand_computed_scalar_inputs() -> None:
    # one input feature: Gᵢ = gᵢ (1×1), so each output row is Σ gᵢwᵢ / Σ gᵢ
    models = [torch.tensor([[1.0], [2.0]]), torch.tensor([[4.0], [-1.0]])]
    grams = [(torch.tensor([[1.0]]),), (torch.tensor([[3.0]]),)]
    out, notes = _run("regmean", models, FakeStats("gram", grams), alpha=1.0, ridge=0.0)
    torch.testing.assert_close(out, torch.tensor([[13 / 4], [-1 / 4]]))
    assert notes["solved_layers"] == 1


def test_regmean_hand_computed_two_features() -> None:
    # G₁ = diag(1, 0) sees only feature 0, G₂ = I: feature 0 averages, feature 1 comes from model 2
    models = [torch.tensor([[2.0, 5.0]]), torch.tensor([[4.0, 1.0]])]
    grams = [(torch.tensor([[1.0, 0.0], [0.0, 0.0]]),), (torch.eye(2),)]
    out, _ = _run("regmean", models, FakeStats("gram", grams), alpha=1.0, ridge=0.0)
    torch.testing.assert_close(out, torch.tensor([[3.0, 1.0]]))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_regmean_equals_closed_form(alpha: float) -> None:
    shape, n = (7, 5), 3
    models = _weights(shape, n, 0)
    grams = [_spd(5, s) for s in range(n)]
    out, _ = _run("regmean", models, FakeStats("gram", [(g,) for g in grams]), alpha=alpha, ridge=0.0, block=14)
    shrunk = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in grams]
    want = torch.linalg.solve(sum(shrunk), sum(g @ w.double().T for g, w in zip(shrunk, models))).T
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_regmean_weights_scale_grams() -> None:
    shape = (4, 3)
    models = _weights(shape, 2, 1)
    grams = [_spd(3, 10), _spd(3, 11)]
    out, _ = _run("regmean", models, FakeStats("gram", [(g,) for g in grams]), weight=[2.0, 1.0], alpha=1.0, ridge=0.0)
    want = torch.linalg.solve(2 * grams[0] + grams[1],
                              2 * grams[0] @ models[0].double().T + grams[1] @ models[1].double().T).T
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_regmean_singular_without_ridge_is_an_error_and_ridge_solves_it() -> None:
    models = _weights((2, 3), 2, 2)
    singular = torch.zeros(3, 3)
    singular[0, 0] = 1.0
    stats = FakeStats("gram", [(singular,), (singular,)])
    with pytest.raises(ValueError, match="singular"):
        _run("regmean", models, stats, alpha=1.0, ridge=0.0)
    out, notes = _run("regmean", models, stats, alpha=1.0, ridge=1e-6)
    torch.testing.assert_close(out[:, 0], (models[0][:, 0] + models[1][:, 0]) / 2)
    assert notes["condition_estimate"]["w"] > 1e5  # reported, not hidden


def test_mats_gram_objective_converges_to_regmean() -> None:
    shape, n = (6, 5), 3
    models = _weights(shape, n, 3)
    stats = FakeStats("gram", [(_spd(5, 20 + s),) for s in range(n)])
    reg, _ = _run("regmean", models, stats, alpha=1.0, ridge=0.0)
    for init in ("average", "task_arithmetic", "base"):
        base = torch.zeros(shape)
        out, notes = _run("mats", models, stats, base=base, init=init, tolerance=1e-10, iterations=500, ridge=0.0,
                           precision="float64")
        torch.testing.assert_close(out, reg, rtol=1e-4, atol=1e-4)
        assert notes["cg_residual"]["w"] < 1e-8 and 0 < notes["cg_steps"]["w"] <= 30  # 5·6 unknowns
    fast, notes = _run("mats", models, stats, init="average", tolerance=1e-5, ridge=0.0)  # float32 products
    torch.testing.assert_close(fast, reg, rtol=1e-3, atol=1e-3)
    assert notes["cg_residual"]["w"] < 1e-4


def test_mats_kfac_objective_equals_dense_kronecker_solve() -> None:
    out_dim, in_dim, n = 4, 3, 2
    models = _weights((out_dim, in_dim), n, 4)
    grams = [_spd(in_dim, 30 + s) for s in range(n)]
    outs = [_spd(out_dim, 40 + s) for s in range(n)]
    got, notes = _run("mats", models, FakeStats("kfac", list(zip(grams, outs))), init="average", tolerance=1e-12,
                      precision="float64",
                      iterations=1000, ridge=0.0)
    # row-major vec: (S X G)[o, j] = Σ S[o, p] X[p, q] G[q, j]  ->  kron(S, G) vec(X)
    a = sum(torch.kron(s, g) for g, s in zip(grams, outs))
    b = sum(torch.kron(s, g) @ w.double().reshape(-1) for g, s, w in zip(grams, outs, models))
    want = torch.linalg.solve(a, b).reshape(out_dim, in_dim)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert notes["cg_residual"]["w"] < 1e-9


def test_mats_stops_at_the_iteration_cap_and_reports_the_residual() -> None:
    models = _weights((8, 6), 2, 5)
    stats = FakeStats("gram", [(_spd(6, 50, rows=7),), (_spd(6, 51, rows=7),)])
    _, notes = _run("mats", models, stats, init="average", iterations=2, tolerance=0.0)
    assert notes["cg_steps"]["w"] == 2 and notes["cg_residual"]["w"] > 1e-6


def test_conjugate_gradient_on_a_known_system() -> None:
    a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    x, res, steps = conjugate_gradient(lambda v: a @ v, torch.tensor([1.0, 2.0], dtype=torch.float64),
                                       torch.zeros(2, dtype=torch.float64), 1e-12, 10)
    torch.testing.assert_close(x, torch.tensor([1 / 11, 7 / 11], dtype=torch.float64))
    assert steps == 2 and res < 1e-12  # CG is exact in n steps


def test_fisher_hand_computed() -> None:
    models = [torch.tensor([0.0, 0.0, 2.0]), torch.tensor([4.0, 4.0, 2.0])]
    fishers = [(torch.tensor([1.0, 3.0, 0.0]),), (torch.tensor([3.0, 1.0, 0.0]),)]
    out, _ = _run("fisher", models, FakeStats("fisher", fishers), normalize=False, epsilon=1e-6)
    torch.testing.assert_close(out, torch.tensor([3.0, 1.0, 2.0]))  # no Fisher anywhere: the average
    # normalised: model 2's Fisher is 2× larger, so it counts half as much: c = (2/3, 1/3)
    fishers2 = [(torch.tensor([1.0, 1.0, 1.0]),), (torch.tensor([2.0, 2.0, 2.0]),)]
    out, _ = _run("fisher", models, FakeStats("fisher", fishers2, norms=[1.0, 2.0]), epsilon=1e-12)
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0, 2.0]))  # equal effective weights


def test_fisher_with_equal_fishers_is_the_average() -> None:
    models = _weights((5, 4), 3, 6)
    f = torch.rand(5, 4) + 0.1
    out, _ = _run("fisher", models, FakeStats("fisher", [(f,)] * 3, norms=[2.0] * 3), block=7)
    torch.testing.assert_close(out, sum(models) / 3, rtol=1e-5, atol=1e-6)


def test_tensors_without_statistics_are_averaged() -> None:
    models = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    for method in ("fisher", "regmean", "mats"):
        out, notes = _run(method, models, None, weight=[1.0, 3.0], init="average")
        torch.testing.assert_close(out, torch.tensor([2.5, 5.0]))
        assert notes["averaged_tensors"] == 1


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), out_dim=st.integers(1, 6), in_dim=st.integers(1, 6))
def test_one_expert_is_identity(seed: int, out_dim: int, in_dim: int) -> None:
    (w,) = _weights((out_dim, in_dim), 1, seed)
    g = _spd(in_dim, seed)
    s = _spd(out_dim, seed + 1)
    for method, stats in (("regmean", FakeStats("gram", [(g,)])), ("mats", FakeStats("gram", [(g,)])),
                          ("mats", FakeStats("kfac", [(g, s)])),
                          ("fisher", FakeStats("fisher", [(g.new_ones(out_dim, in_dim),)], norms=[1.0]))):
        out, _ = _run(method, [w], stats, init="average", ridge=0.0, tolerance=1e-12, iterations=200,
                      precision="float64")
        torch.testing.assert_close(out, w, rtol=1e-4, atol=1e-4, msg=method)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4))
def test_identical_models_return_the_model(seed: int, n: int) -> None:
    (w,) = _weights((5, 4), 1, seed)
    stats = [(_spd(4, seed + k),) for k in range(n)]
    for method in ("regmean", "mats"):
        out, _ = _run(method, [w] * n, FakeStats("gram", stats), init="average")
        torch.testing.assert_close(out, w, rtol=1e-4, atol=1e-4)


# -- end to end: statistics folders, recipes, errors ------------------------------------------

TEXTS = ["good day today", "this is awful and bad", "meh, it is fine", "great great news", "terrible",
         "ok then", "a fine film", "bad bad bad"]
LABELS = [2, 0, 1, 2, 0, 1, 2, 0]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from moerge.data.tasks import get_task
    from moerge.stats import StatsSettings, compute_stats
    from moerge.testing import make_word_llama, perturb

    root = tmp_path_factory.mktemp("data_aware")
    base = make_word_llama(root / "base", list(get_task("tweets").words), TEXTS, layers=1)
    paths: dict[str, Path] = {"base": base}
    for k in (1, 2):
        paths[f"e{k}"] = perturb(base, root / f"e{k}", scale=0.05, seed=k)
        for kind in ("gram", "fisher", "kfac"):
            compute_stats(paths[f"e{k}"], root / f"{kind}{k}", StatsSettings(kind, batch_size=4), track="decoder",
                          task="tweets", texts=TEXTS[k - 1:], labels=LABELS[k - 1:])
            paths[f"{kind}{k}"] = root / f"{kind}{k}"
    return paths


def _recipe(tmp: Path, method: str, zoo: dict[str, Path], kind: str, base: bool = False, **params: Any) -> Path:
    lines = [f"method: {method}"] + ([f"base_model: {zoo['base']}"] if base else []) + ["models:"]
    for k in (1, 2):
        lines += [f"  - model: {zoo[f'e{k}']}", f"    stats: {zoo[f'{kind}{k}']}"]
    if params:
        lines += ["parameters:"] + [f"  {k}: {v}" for k, v in params.items()]
    p = tmp / f"{method}-{kind}.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def _state(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_regmean_recipe_end_to_end(zoo: dict[str, Path], tmp_path: Path) -> None:
    res = api.merge(_recipe(tmp_path, "regmean", zoo, "gram", alpha=0.9, ridge=0.0), tmp_path / "out")
    out = _state(res.output)
    e1, e2 = _state(zoo["e1"]), _state(zoo["e2"])
    g1, g2 = _state(zoo["gram1"]), _state(zoo["gram2"])
    solved = 0
    for name, w in out.items():
        if name in g1:
            s1, s2 = (0.9 * g.double() + 0.1 * torch.diag(torch.diagonal(g.double())) for g in (g1[name], g2[name]))
            want = torch.linalg.solve(s1 + s2, s1 @ e1[name].double().T + s2 @ e2[name].double().T).T
            torch.testing.assert_close(w.double(), want, rtol=1e-4, atol=1e-4, msg=name)
            solved += 1
        else:
            torch.testing.assert_close(w.float(), ((e1[name].float() + e2[name].float()) / 2).to(w.dtype).float())
    assert solved == len(g1) and res.notes["solved_layers"] == solved
    assert "condition_estimate" in json.loads((res.output / "moerge_merge_report.json").read_text())
    assert "condition_estimate: largest" in (res.output / "README.md").read_text()


def test_fisher_recipe_end_to_end(zoo: dict[str, Path], tmp_path: Path) -> None:
    res = api.merge(_recipe(tmp_path, "fisher", zoo, "fisher"), tmp_path / "out")
    out = _state(res.output)
    e1, e2 = _state(zoo["e1"]), _state(zoo["e2"])
    f1, f2 = _state(zoo["fisher1"]), _state(zoo["fisher2"])
    n1, n2 = (json.loads((zoo[f"fisher{k}"] / "moerge_stats.json").read_text())["norm"] for k in (1, 2))
    c1, c2 = (1 / n1) / (1 / n1 + 1 / n2), (1 / n2) / (1 / n1 + 1 / n2)
    for name, w in out.items():
        a, b = c1 * (f1[name] + 1e-6), c2 * (f2[name] + 1e-6)
        want = (a * e1[name].float() + b * e2[name].float()) / (a + b)
        torch.testing.assert_close(w.float(), want.to(w.dtype).float(), rtol=1e-2, atol=1e-6, msg=name)


def test_mats_recipe_end_to_end_reports_residuals(zoo: dict[str, Path], tmp_path: Path) -> None:
    res = api.merge(_recipe(tmp_path, "mats", zoo, "kfac", base=True, iterations=50), tmp_path / "out")
    report = json.loads((res.output / "moerge_merge_report.json").read_text())
    assert set(report["cg_residual"]) == set(report["cg_steps"]) and report["cg_residual"]
    assert max(report["cg_steps"].values()) <= 50
    assert "cg_residual: largest" in (res.output / "README.md").read_text()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(res.output))  # a loadable model


def test_missing_stats_names_the_model_and_the_command(zoo: dict[str, Path], tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(f"method: regmean\nmodels:\n  - model: {zoo['e1']}\n    stats: {zoo['gram1']}\n"
                 f"  - model: {zoo['e2']}\n")
    with pytest.raises(PlanError, match=r"r.yaml:\d+: regmean needs statistics for every model") as e:
        api.merge(p, tmp_path / "out")
    assert "moerge stats gram" in (e.value.hint or "")


def test_stats_of_another_model_are_refused(zoo: dict[str, Path], tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(f"method: regmean\nmodels:\n  - model: {zoo['e1']}\n    stats: {zoo['gram2']}\n"
                 f"  - model: {zoo['e2']}\n    stats: {zoo['gram2']}\n")
    with pytest.raises(PlanError, match="gram2: these statistics were computed from .*e2.*not from .*e1"):
        api.merge(p, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_kind_and_mixed_kinds(zoo: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="holds 'fisher' statistics; regmean reads gram or kfac"):
        api.merge(_recipe(tmp_path, "regmean", zoo, "fisher"), tmp_path / "out")
    p = tmp_path / "mixed.yaml"
    p.write_text(f"method: mats\nparameters:\n  init: average\nmodels:\n  - model: {zoo['e1']}\n"
                 f"    stats: {zoo['gram1']}\n  - model: {zoo['e2']}\n    stats: {zoo['kfac2']}\n")
    with pytest.raises(PlanError, match="holds kfac statistics but other models bring gram"):
        api.merge(p, tmp_path / "out")


def test_mats_task_arithmetic_start_needs_a_base(zoo: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="init: task_arithmetic starts from the base model; add base_model"):
        api.merge(_recipe(tmp_path, "mats", zoo, "gram"), tmp_path / "out")


def _copy_stats(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))
    return dst


def test_nan_in_statistics_names_the_file_and_tensor(zoo: dict[str, Path], tmp_path: Path) -> None:
    name = "model.layers.0.mlp.down_proj.weight"

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[name][0, 1] = float("nan")

    bad = _copy_stats(zoo["gram2"], tmp_path / "bad", poison)
    p = tmp_path / "r.yaml"
    p.write_text(f"method: regmean\nmodels:\n  - model: {zoo['e1']}\n    stats: {zoo['gram1']}\n"
                 f"  - model: {zoo['e2']}\n    stats: {bad}\n")
    with pytest.raises(NonFiniteError, match=rf"statistic '{name}' in .*bad .*holds NaN/Inf"):
        api.merge(p, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_layer_and_wrong_shape_in_statistics(zoo: dict[str, Path], tmp_path: Path) -> None:
    name = "model.layers.0.self_attn.o_proj.weight"
    missing = _copy_stats(zoo["gram2"], tmp_path / "missing", lambda t: t.pop(name))
    p = tmp_path / "r.yaml"
    p.write_text(f"method: regmean\nmodels:\n  - model: {zoo['e1']}\n    stats: {zoo['gram1']}\n"
                 f"  - model: {zoo['e2']}\n    stats: {missing}\n")
    with pytest.raises(PlanError, match=rf"statistics for '{name}' are missing from .*missing"):
        api.merge(p, tmp_path / "out")

    def shrink(t: dict[str, torch.Tensor]) -> None:
        t[name] = t[name][:-1, :-1].contiguous()

    wrong = _copy_stats(zoo["gram2"], tmp_path / "wrong", shrink)
    p.write_text(f"method: regmean\nmodels:\n  - model: {zoo['e1']}\n    stats: {zoo['gram1']}\n"
                 f"  - model: {zoo['e2']}\n    stats: {wrong}\n")
    with pytest.raises(PlanError, match=rf"wrong: statistic '{name}' is \[\d+, \d+\], expected"):
        api.merge(p, tmp_path / "out")


def test_stats_on_a_data_free_method_are_ignored_with_a_warning(zoo: dict[str, Path], tmp_path: Path) -> None:
    res = api.merge(_recipe(tmp_path, "linear", zoo, "gram"), tmp_path / "out", dry_run=True)
    assert any("linear does not use statistics" in w for w in res.warnings)


def test_a_comparison_names_a_statistic_with_method_at_statistic() -> None:
    from moerge.errors import MoergeError
    from moerge.evaluation.experiment import method_and_statistic

    assert method_and_statistic("mats") == ("mats", "kfac")
    assert method_and_statistic("mats@gram") == ("mats", "gram")
    assert method_and_statistic("ties") == ("ties", None)
    with pytest.raises(MoergeError, match="ties reads no statistics"):
        method_and_statistic("ties@gram")


def test_model_card_lists_statistics_apart_from_the_models(zoo: dict[str, Path], tmp_path: Path) -> None:
    # a data-aware merge without a base: the card's base_model is the merged experts, never their statistics
    res = api.merge(_recipe(tmp_path, "fisher", zoo, "fisher"), tmp_path / "out")
    card = (res.output / "README.md").read_text()
    front = card.split("---")[1]
    assert str(zoo["e1"]) in front and str(zoo["e2"]) in front
    assert str(zoo["fisher1"]) not in front and str(zoo["fisher2"]) not in front
    statistics = card.split("## Statistics")[1].split("##")[0]
    assert str(zoo["fisher1"]) in statistics and str(zoo["fisher2"]) in statistics
