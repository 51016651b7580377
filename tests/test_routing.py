"""Routing among LoRA experts: the routed layer's math, Arrow against PEFT 0.21, the bundle, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moerge
from moerge.errors import CheckpointError, MoergeError
from moerge.routing.arrow import subtract_general, top_right_singular_vector
from moerge.routing.layer import (
    RoutedLinear,
    RouterOptions,
    record,
    route,
    routed_layers,
    scores,
    stack_experts,
    token_mask,
)
from moerge.testing import make_llama, make_lora

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("routing")
    base = make_llama(root / "base", seed=0, layers=2, hidden=32, intermediate=64)
    out = {"base": base, "root": root}
    for i in range(4):  # a decaying spectrum: a clear top direction, as trained adapters have
        out[f"e{i}"] = make_lora(base, root / f"e{i}", seed=i + 1, rank=4, alpha=8, decay=0.5)
    out["flat"] = _close_top_singular_values(make_lora(base, root / "flat", seed=9, rank=4, alpha=8))
    out["r2"] = make_lora(base, root / "r2", seed=7, rank=2, alpha=6)
    out["other_targets"] = make_lora(base, root / "other_targets", seed=5, targets=("q_proj", "o_proj"))
    for i in range(2):
        out[f"g{i}"] = make_lora(base, root / f"g{i}", seed=20 + i, rank=4, alpha=8, decay=0.5)
    return out


def _close_top_singular_values(folder: Path) -> Path:
    """Rewrite every module of an adapter as ΔW = Q_out diag(1, 0.97, 0.5, 0.2) Q_in (σ₂/σ₁ = 0.97)."""
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    g = torch.Generator().manual_seed(11)
    for name, a in list(tensors.items()):
        if "lora_A" in name:
            b_name = name.replace("lora_A", "lora_B")
            q_in = torch.linalg.qr(torch.randn(a.shape[1], 4, generator=g))[0].T
            q_out = torch.linalg.qr(torch.randn(tensors[b_name].shape[0], 4, generator=g))[0]
            tensors[name] = (torch.tensor([1.0, 0.97, 0.5, 0.2]).unsqueeze(1) * q_in).contiguous()
            tensors[b_name] = q_out.contiguous()
    save_file(tensors, str(path))
    return folder


def _ids(seed: int = 0, shape: tuple[int, int] = (3, 9)) -> torch.Tensor:
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def _peft_arrow(zoo: dict[str, Path], names: list[str], top_k: int, general: list[str] = ()) -> torch.nn.Module:
    from peft import ArrowConfig, create_arrow_model
    from transformers import AutoModelForCausalLM

    from moerge.runtime.models import quiet_peft

    base = AutoModelForCausalLM.from_pretrained(str(zoo["base"]), dtype=torch.float32)
    cfg = ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0, use_gks=bool(general))
    with quiet_peft():
        model = create_arrow_model(base, [str(zoo[n]) for n in names], cfg,
                                   general_adapter_paths=[str(zoo[g]) for g in general] or None)
    with torch.no_grad():
        model.eval()(_ids(99))  # PEFT purifies (GenKnowSub) and builds its prototypes on the first forward
    return model


def _peft_prototypes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model.").removesuffix(".lora_arrow.arrow_router.prototypes"): t
            for n, t in model.named_buffers() if n.endswith("arrow_router.prototypes")}


def _inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every routed module's input on ``ids``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
             for name, layer in routed_layers(model).items()]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


# ------------------------------------------------------------------------------------------ the math


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(2, 20), st.integers(2, 20), st.integers(0, 10_000))
def test_prototype_is_the_exact_top_right_singular_vector(r: int, d_in: int, d_out: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    v, sigma = top_right_singular_vector(a, b)
    _, s, vh = torch.linalg.svd(b.double() @ a.double())
    assert sigma == pytest.approx(float(s[0]), rel=1e-9)
    if s.numel() > 1 and s[0] - s[1] > 1e-6 * s[0]:  # unique up to sign only with a gap
        assert abs(float(v @ vh[0])) == pytest.approx(1.0, abs=1e-9)
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-12)


def test_route_top_k_softmax_by_hand() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    w = route(logits, 2, 1.0)
    e3, e2 = math.exp(3), math.exp(2)
    assert w.tolist()[0] == pytest.approx([0.0, e3 / (e3 + e2), e2 / (e3 + e2), 0.0])
    w = route(logits, 2, 2.0)  # temperature divides the logits
    assert w[0, 1] == pytest.approx(math.exp(1.5) / (math.exp(1.5) + math.exp(1.0)))
    assert route(logits, 9, 1.0).tolist()[0] == pytest.approx(torch.softmax(logits, -1).tolist()[0])
    # the reference PHATGOOSE order (softmax over all, top-k, renormalise + 1e-6) = top-k softmax up to eps
    ref = route(logits, 2, 1.0, renorm_eps=1e-6)
    p = torch.softmax(logits, -1)[0]
    assert ref[0, 1] == pytest.approx(float(p[1] / (p[1] + p[2] + 1e-6)), rel=1e-7)
    assert torch.allclose(ref, route(logits, 2, 1.0), atol=1e-5)


def test_scores_by_hand() -> None:
    x = torch.tensor([[3.0, -4.0, 0.0]])
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert scores(x, rows, "abs_dot").tolist() == [[3.0, 4.0]]
    assert scores(x, rows, "abs_cos").tolist()[0] == pytest.approx([0.6, 0.8])
    assert scores(x, rows, "dot_sqrt_d").tolist()[0] == pytest.approx([3 / math.sqrt(3), -4 / math.sqrt(3)])
    # PHATGOOSE: LN(x)·LN(v)/√d = √d · Pearson correlation (up to the LayerNorm's eps)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(5, 16, generator=g), torch.randn(3, 16, generator=g)
    corr = torch.stack([torch.stack([torch.corrcoef(torch.stack([xi, vj]))[0, 1] for vj in v]) for xi in x])
    assert torch.allclose(scores(x, v, "ln_corr"), 4.0 * corr, atol=1e-4)


def _layer(n: int = 3, r: int = 2, d_in: int = 5, d_out: int = 4, mix: str = "outputs", **kw: object):
    g = torch.Generator().manual_seed(1)
    base = torch.nn.Linear(d_in, d_out)
    factors = [(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 0.5 + e)
               for e in range(n)]
    a_cat, b_cat, rank = stack_experts(factors)
    rows = torch.randn(n, d_in, generator=g)
    layer = RoutedLinear(base, a_cat, b_cat, rows, RouterOptions(mix=mix, **kw), rank)  # type: ignore[arg-type]
    return layer, base, factors, rows


@pytest.mark.parametrize("mix", ["outputs", "parameters"])
def test_routed_layer_by_hand(mix: str) -> None:
    layer, base, factors, rows = _layer(mix=mix, top_k=2)
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = layer(x)
        for t, xt in enumerate(x.reshape(-1, 5)):
            w = route(scores(xt[None], rows, "abs_dot"), 2, 1.0)[0]
            if mix == "outputs":
                delta = sum(w[e] * s * b @ a @ xt for e, (a, b, s) in enumerate(factors))
            else:  # mttl: (Σ w s B)(Σ w A) x
                a_bar = sum(w[e] * a for e, (a, _, _) in enumerate(factors))
                b_bar = sum(w[e] * s * b for e, (_, b, s) in enumerate(factors))
                delta = b_bar @ a_bar @ xt
            assert torch.allclose(y.reshape(-1, 4)[t], base(xt) + delta, atol=1e-5)


def test_ranks_that_differ_are_zero_padded() -> None:
    g = torch.Generator().manual_seed(3)
    factors = [(torch.randn(1, 5, generator=g), torch.randn(4, 1, generator=g), 2.0),
               (torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g), 0.5)]
    a_cat, b_cat, rank = stack_experts(factors)
    assert rank == 3 and a_cat.shape == (6, 5)
    layer = RoutedLinear(torch.nn.Linear(5, 4), a_cat, b_cat, torch.zeros(2, 5), RouterOptions(top_k=2), rank)
    x = torch.randn(7, 5, generator=g)
    want = sum(0.5 * s * (b @ a @ x.T).T for a, b, s in factors)  # zero rows: uniform weights
    with torch.no_grad():
        assert torch.allclose(layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias), want, atol=1e-5)


def test_example_granularity_routes_by_the_mean_over_real_tokens_so_far() -> None:
    layer, base, factors, rows = _layer(granularity="example", top_k=1)
    x = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])  # left padding
    with torch.no_grad(), token_mask(mask):
        y = layer(x)
    for b in range(2):
        for t in range(4):
            if not mask[b, t]:
                continue
            seen = x[b, : t + 1][mask[b, : t + 1].bool()]
            w = route(scores(seen.mean(0, keepdim=True), rows, "abs_dot"), 1, 1.0)[0]
            a, bb, s = factors[int(w.argmax())]
            assert torch.allclose(y[b, t], base(x[b, t]) + s * bb @ a @ x[b, t], atol=1e-5)
    # a KV-cache step (one new token, the mask one longer) continues each sequence's running mean
    step = torch.randn(2, 1, 5, generator=torch.Generator().manual_seed(5))
    longer = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    with torch.no_grad(), token_mask(longer):
        y_step = layer(step)
    with torch.no_grad(), token_mask(longer):
        y_full = layer(torch.cat([x, step], 1))
    assert torch.allclose(y_step[:, 0], y_full[:, -1], atol=1e-5)


def test_fixed_weights_replace_the_router() -> None:
    layer, base, factors, _ = _layer(top_k=1)
    layer.fixed = torch.tensor([0.5, -1.0, 0.25])
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(6))
    want = base(x) + sum(w * s * (b @ a @ x.T).T for w, (a, b, s) in zip([0.5, -1.0, 0.25], factors))
    with torch.no_grad():
        assert torch.allclose(layer(x), want, atol=1e-5)


# ------------------------------------------------------------------------------------ against PEFT


def test_arrow_equals_peft_create_arrow_model(zoo: dict[str, Path], tmp_path: Path) -> None:
    names = ["e0", "e1", "e2", "e3"]
    moerge.route("arrow", zoo["base"], [zoo[n] for n in names], tmp_path / "routed", top_k=2)
    ours = moerge.load_routed(tmp_path / "routed")
    ref = _peft_arrow(zoo, names, top_k=2)
    ids = _ids()
    with torch.no_grad():
        y, y_ref = ours(ids).logits, ref(ids).logits
    assert (y - y_ref).abs().max() <= 1e-4
    protos = _peft_prototypes(ref)
    layers = routed_layers(ours)
    assert set(protos) == set(layers)
    inputs = _inputs(ours, ids)
    same, total = 0, 0
    for name, layer in layers.items():
        cos = (layer.router_rows * protos[name].float()).sum(-1).abs()
        assert cos.min() >= 0.999, name
        top = scores(inputs[name], layer.router_rows, "abs_dot").topk(2).indices.sort(-1).values
        top_ref = scores(inputs[name], protos[name].float(), "abs_dot").topk(2).indices.sort(-1).values
        same += int((top == top_ref).all(-1).sum())
        total += top.shape[0]
    assert same / total >= 0.999
    for name, layer in layers.items():  # fed PEFT's prototypes, the routed model is PEFT's
        layer.router_rows.copy_(protos[name])
    with torch.no_grad():
        assert (ours(ids).logits - y_ref).abs().max() <= 1e-6


def test_peft_power_iteration_drifts_where_the_spectrum_is_flat(zoo: dict[str, Path], tmp_path: Path) -> None:
    """PEFT's 15 power-iteration steps are not the top singular vector when σ₁ ≈ σ₂; ours is exact."""
    from moerge.routing.experts import ExpertSet

    moerge.route("arrow", zoo["base"], [zoo["flat"], zoo["e0"]], tmp_path / "routed", top_k=1)
    ref = _peft_prototypes(_peft_arrow(zoo, ["flat", "e0"], top_k=1))
    ours = moerge.load_routed(tmp_path / "routed")
    with ExpertSet(zoo["base"], [zoo["flat"]]) as experts:
        for name, layer in routed_layers(ours).items():
            a, b, s = experts.factors(name)[0]
            _, _, vh = torch.linalg.svd((s * b @ a).double())
            assert abs(float(layer.router_rows[0].double() @ vh[0])) == pytest.approx(1.0, abs=1e-6)
    worst = min(float((layer.router_rows[0] * ref[n][0]).sum().abs()) for n, layer in routed_layers(ours).items())
    assert worst < 0.999  # (0.97)^30 ≈ 0.4: fifteen steps are far from converged


def test_genknowsub_factors_equals_peft(zoo: dict[str, Path], tmp_path: Path) -> None:
    names, general = ["e0", "e1", "e2"], ["g0", "g1"]
    moerge.route("arrow", zoo["base"], [zoo[n] for n in names], tmp_path / "gks", top_k=2, gks="factors",
                 general=[zoo[g] for g in general])
    ours = moerge.load_routed(tmp_path / "gks")
    ref = _peft_arrow(zoo, names, top_k=2, general=general)
    ids = _ids(1)
    with torch.no_grad():
        y_ref = ref(ids).logits
        for name, layer in routed_layers(ours).items():
            assert (layer.router_rows * _peft_prototypes(ref)[name]).sum(-1).abs().min() >= 0.999
        assert (ours(ids).logits - y_ref).abs().max() <= 1e-4


def test_genknowsub_exact_subtracts_the_mean_update() -> None:
    g = torch.Generator().manual_seed(5)
    task = [(torch.randn(2, 6, generator=g), torch.randn(3, 2, generator=g), 1.5)]
    general = [(torch.randn(2, 6, generator=g), torch.randn(3, 2, generator=g), 0.5 + i) for i in range(3)]
    (a, b, s), = subtract_general(task, general, "exact")
    want = 1.5 * task[0][1] @ task[0][0] - sum(sg * bg @ ag for ag, bg, sg in general) / 3
    assert torch.allclose(s * b @ a, want, atol=1e-5)


# ------------------------------------------------------------------------------------- identities


def _merged_logits(zoo: dict[str, Path], deltas: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(zoo["base"]), dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, d in deltas.items():
            params[name + ".weight"] += d
        return model(ids).logits


def _delta(zoo: dict[str, Path], names: list[str]) -> dict[str, list[torch.Tensor]]:
    from moerge.routing.experts import ExpertSet

    with ExpertSet(zoo["base"], [zoo[n] for n in names]) as experts:
        return {m: [s * b @ a for a, b, s in experts.factors(m)] for m in experts.modules}


@pytest.mark.parametrize("top_k", [1, 3])
def test_one_expert_is_that_expert_merged(zoo: dict[str, Path], tmp_path: Path, top_k: int) -> None:
    moerge.route("arrow", zoo["base"], [zoo["e1"]], tmp_path / "one", top_k=top_k, temperature=0.3)
    ids = _ids(2)
    with torch.no_grad():
        y = moerge.load_routed(tmp_path / "one")(ids).logits
    want = _merged_logits(zoo, {m: d[0] for m, d in _delta(zoo, ["e1"]).items()}, ids)
    assert torch.allclose(y, want, atol=1e-5)


def test_identical_experts_are_one(zoo: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(zoo["e2"], copy)
    moerge.route("arrow", zoo["base"], [zoo["e2"], copy, zoo["e2"]], tmp_path / "same", top_k=2, mix="parameters")
    ids = _ids(3)
    with torch.no_grad():
        y = moerge.load_routed(tmp_path / "same")(ids).logits
    want = _merged_logits(zoo, {m: d[0] for m, d in _delta(zoo, ["e2"]).items()}, ids)
    assert torch.allclose(y, want, atol=1e-5)


def test_uniform_logits_with_top_k_all_is_the_average_update(zoo: dict[str, Path], tmp_path: Path) -> None:
    names = ["e0", "e1", "r2"]  # ranks 4, 4 and 2
    moerge.route("arrow", zoo["base"], [zoo[n] for n in names], tmp_path / "avg", top_k=3)
    model = moerge.load_routed(tmp_path / "avg")
    for layer in routed_layers(model).values():
        layer.router_rows.zero_()  # every score 0: uniform weights
    ids = _ids(4)
    with torch.no_grad():
        y = model(ids).logits
    want = _merged_logits(zoo, {m: sum(d) / 3 for m, d in _delta(zoo, names).items()}, ids)
    assert torch.allclose(y, want, atol=1e-5)


def test_a_derived_subset_is_the_bundle_built_on_the_subset(zoo: dict[str, Path], tmp_path: Path) -> None:
    moerge.route("arrow", zoo["base"], [zoo[n] for n in ("e0", "e1", "e2")], tmp_path / "all", top_k=2)
    derived = moerge.derive_routed(tmp_path / "all", tmp_path / "sub", drop=["e1"], top_k=1)
    moerge.route("arrow", zoo["base"], [zoo["e2"], zoo["e0"]][::-1], tmp_path / "direct", top_k=1)
    spec = json.loads((derived / "moerge_routing.json").read_text())
    assert [e["name"] for e in spec["experts"]] == ["e0", "e2"] and spec["router"]["top_k"] == 1
    assert spec["derived"]["kept"] == ["e0", "e2"]
    ids = _ids(5)
    with torch.no_grad():
        assert torch.equal(moerge.load_routed(derived)(ids).logits, moerge.load_routed(tmp_path / "direct")(ids).logits)
    reordered = moerge.derive_routed(tmp_path / "all", tmp_path / "re", keep=["e2", "e0", "e1"])
    with torch.no_grad():  # the order of the experts changes nothing routed
        assert torch.allclose(moerge.load_routed(reordered)(ids).logits,
                              moerge.load_routed(tmp_path / "all")(ids).logits, atol=1e-6)
    with pytest.raises(MoergeError, match="has no expert"):
        moerge.derive_routed(tmp_path / "all", tmp_path / "bad", drop=["nope"])
    with pytest.raises(MoergeError, match="keep at least one"):
        moerge.derive_routed(tmp_path / "all", tmp_path / "bad", keep=[])
    spec_path = tmp_path / "all" / "moerge_routing.json"
    spec = json.loads(spec_path.read_text())
    spec["method"] = "smear"  # a jointly trained router: no subsets (other options are fine)
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(MoergeError, match="trained over all its experts together"):
        moerge.derive_routed(tmp_path / "all", tmp_path / "bad", drop=["e0"])
    assert not (tmp_path / "bad").exists()
    moerge.derive_routed(tmp_path / "all", tmp_path / "k3", top_k=3)


def test_generate_batching_padding_and_routing_mass(zoo: dict[str, Path], tmp_path: Path) -> None:
    moerge.route("arrow", zoo["base"], [zoo["e0"], zoo["e1"]], tmp_path / "gen", top_k=1)
    model = moerge.load_routed(tmp_path / "gen")
    ids = _ids(5, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding, as for generation
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        alone = model.generate(input_ids=ids[:1, 2:], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9) and out[0, 5:].tolist() == alone[0, 3:].tolist()
    recorders = record(model)
    with torch.no_grad(), token_mask(mask):
        model(input_ids=ids, attention_mask=mask)
    for rec in recorders.values():
        assert rec.tokens == 8 and float(rec.mass.sum()) == pytest.approx(8.0)
    record(model, on=False)
    assert state_is_the_base(model, zoo)


def state_is_the_base(model: torch.nn.Module, zoo: dict[str, Path]) -> bool:
    from safetensors.torch import load_file

    base = load_file(str(zoo["base"] / "model.safetensors"))
    state = model.state_dict()
    return set(state) == set(base) and all(torch.equal(state[k], base[k]) for k in base)


def test_full_experts_are_routed_through_their_extraction(zoo: dict[str, Path], tmp_path: Path) -> None:
    from moerge.testing import perturb

    full = perturb(zoo["base"], tmp_path / "full", scale=0.05, seed=3)
    with pytest.raises(MoergeError, match="--extract-rank"):
        moerge.route("arrow", zoo["base"], [full, zoo["e0"]], tmp_path / "x")
    out = moerge.route("arrow", zoo["base"], [full], tmp_path / "ext", top_k=1, extract_rank=4)
    spec = json.loads((out / "moerge_routing.json").read_text())
    info = spec["build"]["extracted"]["full"]
    assert info["rank"] == 4 and 0 < info["energy_kept"] < 1
    assert "model.layers.0.self_attn.q_proj.weight" in info["per_module_energy_kept"]
    assert moerge.load_routed(out)(_ids()).logits.shape == (3, 9, 64)


# ------------------------------------------------------------------------------------- bad input


def test_bad_experts_get_one_clear_error(zoo: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="adapts other modules.*o_proj"):
        moerge.route("arrow", zoo["base"], [zoo["e0"], zoo["other_targets"]], tmp_path / "a")
    other_base = make_llama(tmp_path / "other_base", seed=4, layers=2)
    foreign = make_lora(other_base, tmp_path / "foreign", seed=1)
    with pytest.raises(CheckpointError, match="different base models"):
        moerge.route("arrow", zoo["base"], [zoo["e0"], foreign], tmp_path / "b")
    saved = make_lora(zoo["base"], tmp_path / "saved", seed=1, modules_to_save=["lm_head"])
    with pytest.raises(CheckpointError, match="stores .*in full"):
        moerge.route("arrow", zoo["base"], [saved], tmp_path / "c")
    dora = shutil.copytree(zoo["e0"], tmp_path / "dora")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA"):
        moerge.route("arrow", zoo["base"], [zoo["e0"], dora], tmp_path / "d")
    with pytest.raises(MoergeError, match="top_k"):
        moerge.route("arrow", zoo["base"], [zoo["e0"]], tmp_path / "e", top_k=0)
    with pytest.raises(MoergeError, match="GenKnowSub"):
        moerge.route("arrow", zoo["base"], [zoo["e0"]], tmp_path / "f", gks="exact")
    assert not any(p.name.startswith((".a", ".b", ".c", ".d")) for p in tmp_path.iterdir())
    assert not any((tmp_path / n).exists() for n in "abcdef")


def test_damaged_bundles_are_refused(zoo: dict[str, Path], tmp_path: Path) -> None:
    out = moerge.route("arrow", zoo["base"], [zoo["e0"], zoo["e1"]], tmp_path / "ok", top_k=1)
    tampered = shutil.copytree(out, tmp_path / "tampered")
    weights = tampered / "experts" / "e1" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the hash"):
        moerge.load_routed(tampered)
    missing = shutil.copytree(out, tmp_path / "missing")
    shutil.rmtree(missing / "experts" / "e0")
    with pytest.raises(CheckpointError, match="expert 'e0' is missing"):
        moerge.load_routed(missing)
    escape = shutil.copytree(out, tmp_path / "escape")
    spec = json.loads((escape / "moerge_routing.json").read_text())
    spec["experts"][0]["path"] = "../ok/experts/e0"
    (escape / "moerge_routing.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError):
        moerge.load_routed(escape)
    other_base = make_llama(tmp_path / "b2", seed=0, layers=3)
    with pytest.raises(CheckpointError, match="not the base model"):
        moerge.load_routed(out, base=other_base)
    with pytest.raises(MoergeError, match="already exists"):
        moerge.route("arrow", zoo["base"], [zoo["e0"]], out)
