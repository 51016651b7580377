"""Routers learned from data: PHATGOOSE's gates and the average-activation baseline, on a tiny Llama."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import moerge
from moerge.errors import MoergeError
from moerge.routing.data import Sample, encode, load_samples, target_loss
from moerge.routing.experts import ExpertSet
from moerge.routing.layer import routed_layers, scores
from moerge.routing.phatgoose import GateSettings, all_gates, train_gates
from moerge.testing import make_bpe_tokenizer, make_llama, make_lora

pytest.importorskip("peft")

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "rain"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trained")
    tok = make_bpe_tokenizer(root / "base", [" ".join(WORDS * 30), "the colour is red", "the animal is a dog"] * 10)
    base = make_llama(root / "base", seed=0, layers=2, vocab=len(tok))
    out = {"base": base, "root": root}
    for i in range(2):
        out[f"e{i}"] = make_lora(base, root / f"e{i}", seed=i + 1, rank=4, alpha=8, decay=0.5)
        path = root / f"d{i}.jsonl"
        words = WORDS[:3] if i == 0 else WORDS[3:]
        path.write_text("".join(json.dumps({"prompt": f"the thing is {w} and", "target": f" {w}"}) + "\n"
                                for w in words * 4))
        out[f"d{i}"] = path
    return out


def _state_hash(model: torch.nn.Module) -> str:
    h = hashlib.blake2b()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _base(lm: dict[str, Path]):
    from moerge.runtime.models import load_model

    return load_model(lm["base"], "decoder")


def test_jsonl_samples_and_their_loss(lm: dict[str, Path], tmp_path: Path) -> None:
    samples = load_samples(str(lm["d0"]))
    assert samples[0] == Sample("the thing is red and", " red") and len(samples) == 12
    model, tok = _base(lm)
    batch = encode(tok, samples[:3], 64, torch.device("cpu"))
    # the loss reads only the target tokens: equal to the mean CE computed one sequence at a time
    want = []
    for s in samples[:3]:
        p, t = tok(s.prompt)["input_ids"], tok(s.target, add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + t])).logits[0].float(), -1)
        want += [-float(logp[len(p) - 1 + i, tok_id]) for i, tok_id in enumerate(t)]
    assert float(target_loss(model, batch)) == pytest.approx(sum(want) / len(want), rel=1e-5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "target": "y"}\n{"prompt": 3}\n')
    with pytest.raises(MoergeError, match="bad.jsonl:2"):
        load_samples(str(bad))


def test_gate_training_changes_only_the_gates_and_is_deterministic(lm: dict[str, Path]) -> None:
    model, tok = _base(lm)
    before = _state_hash(model)
    samples = load_samples(str(lm["d0"]))
    settings = GateSettings(steps=6, batch_size=4, lr=5e-2)
    with ExpertSet(lm["base"], [lm["e0"]]) as experts:
        factors = {m: experts.factors(m)[0] for m in experts.modules}
    gates, log = train_gates(model, tok, factors, samples, settings)
    assert _state_hash(model) == before  # the base is back as it was, its weights untouched
    assert all(type(m).__name__ != "GatedLinear" for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert set(gates) == set(factors) and all(float(g.abs().sum()) > 0 for g in gates.values())
    assert log["steps"] == 6 and log["sequences"] == 24 and log["loss_finite"]
    again, _ = train_gates(model, tok, factors, samples, settings)
    assert all(torch.equal(gates[m], again[m]) for m in gates)
    other, _ = train_gates(model, tok, factors, samples, GateSettings(steps=6, batch_size=4, lr=5e-2, seed=1))
    assert any(not torch.equal(gates[m], other[m]) for m in gates)


def test_gate_initialisation_is_the_expert_at_half_strength(lm: dict[str, Path]) -> None:
    """v = 0 gives σ(0) = 1/2 on every token: the gated model is the base plus ΔW/2 (the reference's start)."""
    from moerge.routing.phatgoose import GatedLinear

    layer = torch.nn.Linear(6, 3)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, generator=g), torch.randn(3, 2, generator=g)
    x = torch.randn(4, 6, generator=g)
    with torch.no_grad():
        assert torch.allclose(GatedLinear(layer, a, b)(x), layer(x) + 0.5 * x @ a.T @ b.T, atol=1e-6)


def test_phatgoose_bundle_routes_by_ln_corr_top2(lm: dict[str, Path], tmp_path: Path) -> None:
    out = moerge.route("phatgoose", lm["base"], [lm["e0"], lm["e1"]], tmp_path / "pg", data=[str(lm["d0"]),
                       str(lm["d1"])], gates=GateSettings(steps=4, batch_size=4, lr=5e-2))
    spec = json.loads((out / "moerge_routing.json").read_text())
    assert spec["router"] == {"score": "ln_corr", "top_k": 2, "temperature": 1.0, "mix": "outputs",
                              "granularity": "token", "renorm_eps": 1e-6}
    assert spec["method_options"]["gates"]["steps"] == 4
    assert set(spec["build"]["gate_training"]) == {"e0", "e1"}
    assert not (tmp_path / ".pg.phatgoose-work").exists()
    model = moerge.load_routed(out)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    for layer in routed_layers(model).values():
        w = layer.weights(x)
        p = torch.softmax(scores(x, layer.router_rows, "ln_corr"), -1)  # the reference, written out
        assert torch.allclose(w, p / (p.sum(-1, keepdim=True) + 1e-6), atol=1e-7)
        break


def test_gates_resume_from_the_work_folder(lm: dict[str, Path], tmp_path: Path) -> None:
    model, tok = _base(lm)
    data = [load_samples(str(lm["d0"])), load_samples(str(lm["d1"]))]
    settings = GateSettings(steps=3, batch_size=4)
    with ExpertSet(lm["base"], [lm["e0"], lm["e1"]]) as experts:
        rows, logs = all_gates(model, tok, experts, 2, data, settings, tmp_path / "work")
        (tmp_path / "work" / "001-e1.json").unlink()  # as if killed while training the second expert
        again, logs2 = all_gates(model, tok, experts, 2, data, settings, tmp_path / "work")
    assert logs2["e0"].get("resumed") and not logs2["e1"].get("resumed")
    assert all(torch.equal(rows[m], again[m]) for m in rows)


def test_average_activation_rows_are_mean_module_inputs(lm: dict[str, Path], tmp_path: Path) -> None:
    out = moerge.route("avg_act", lm["base"], [lm["e0"], lm["e1"]], tmp_path / "aa",
                       data=[str(lm["d0"]), str(lm["d1"])], examples=5)
    model, tok = _base(lm)
    name = "model.layers.1.mlp.down_proj"
    seen: list[torch.Tensor] = []
    h = dict(model.named_modules())[name].register_forward_pre_hook(lambda m, a: seen.append(a[0][0]))
    samples = load_samples(str(lm["d1"]), limit=5)
    with torch.no_grad():
        for s in samples:
            p, t = tok(s.prompt)["input_ids"], tok(s.target, add_special_tokens=False)["input_ids"]
            model(input_ids=torch.tensor([p + t]))
    h.remove()
    want = torch.cat(seen).mean(0)
    rows = moerge.load_routed(out).get_submodule(name).router_rows
    assert torch.allclose(rows[1], want, atol=1e-5)


def test_trained_routers_refuse_bad_data(lm: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MoergeError, match="1 data sources for 2 experts"):
        moerge.route("phatgoose", lm["base"], [lm["e0"], lm["e1"]], tmp_path / "x", data=[str(lm["d0"])])
    with pytest.raises(MoergeError, match="Arrow needs no data"):
        moerge.route("arrow", lm["base"], [lm["e0"]], tmp_path / "y", data=[str(lm["d0"])])
    with pytest.raises(MoergeError, match="steps"):
        moerge.route("phatgoose", lm["base"], [lm["e0"]], tmp_path / "z", data=[str(lm["d0"])],
                     gates=GateSettings(steps=0))
    assert not any(tmp_path.iterdir())


def test_cli_builds_inspects_and_scores_routed_bundles(lm: dict[str, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from moerge.cli import main

    runner = CliRunner()
    out = tmp_path / "cli-pg"
    res = runner.invoke(main, ["route", "phatgoose", str(lm["base"]), str(lm["e0"]), str(lm["e1"]), "--data",
                               f"{lm['d0']}", "--data", f"{lm['d1']}", "--out", str(out), "--steps", "2",
                               "--batch-size", "2", "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["route", "inspect", str(out)])
    assert res.exit_code == 0 and "phatgoose" in res.output and "e1" in res.output
    res = runner.invoke(main, ["route", "arrow", str(lm["base"]), str(lm["e0"]), "--out", str(out)])
    assert res.exit_code != 0 and "already exists" in res.output


def test_smear_trains_only_its_router_and_routes_per_example(lm: dict[str, Path], tmp_path: Path) -> None:
    from moerge.routing.smear import train_router

    model, tok = _base(lm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [load_samples(str(lm["d0"])), load_samples(str(lm["d1"]))]
    options = moerge.routing.layer.RouterOptions(score="ln_dot", top_k=2, granularity="example")
    settings = GateSettings(steps=5, batch_size=4, lr=5e-2, expert_dropout=0.0)
    with ExpertSet(lm["base"], [lm["e0"], lm["e1"]]) as experts:
        rows, biases, log = train_router(model, tok, experts, 2, data, settings, options)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())  # base weights untouched
    assert log["loss_finite"] and set(rows) == set(biases) == set(routed_layers(model))
    assert all(r.shape[0] == 2 and float(r.std()) > 0 for r in rows.values())
    out = moerge.route("smear", lm["base"], [lm["e0"], lm["e1"]], tmp_path / "sm",
                       data=[str(lm["d0"]), str(lm["d1"])], gates=GateSettings(steps=3, batch_size=4))
    spec = json.loads((out / "moerge_routing.json").read_text())
    assert spec["router"]["granularity"] == "example" and spec["router"]["top_k"] == 2
    assert spec["build"]["router_training"]["steps"] == 3
    routed = moerge.load_routed(out)
    assert all(layer.router_bias.shape == (2,) for layer in routed_layers(routed).values())
    # generation with a KV cache routes each sequence as a full forward of the same tokens would
    ids = torch.tensor([[0, 0, 5, 9, 13], [7, 3, 5, 9, 13]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        gen = routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        full_mask = torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], 1)
        logits = routed(input_ids=gen[:, :-1], attention_mask=full_mask).logits
    assert torch.equal(logits[:, -3:].argmax(-1), gen[:, -3:])


def test_lorahub_objective_search_and_exact_merged_adapter(lm: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("nevergrad")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moerge.routing.layer import RouterOptions
    from moerge.routing.load import attach_experts
    from moerge.routing.lorahub import HubSettings, objective

    model, tok = _base(lm)
    samples = load_samples(str(lm["d1"]), limit=5)
    plain = float(target_loss(model, encode(tok, samples, 64, torch.device("cpu"))))
    with ExpertSet(lm["base"], [lm["e0"], lm["e1"]]) as experts:
        attach_experts(model, experts, 2, {m: torch.zeros(2, 32) for m in experts.modules}, RouterOptions(top_k=2))
    s = HubSettings()
    # w = 0 is the base; the reference divides the batch's mean CE by the number of examples (5)
    assert objective(model, tok, samples, torch.zeros(2), s) == pytest.approx(plain / 5, rel=1e-5)
    w = torch.tensor([0.5, -1.0])
    mean = objective(model, tok, samples, w, HubSettings(loss="mean", l1=0.0))
    assert objective(model, tok, samples, w, s) == pytest.approx(
        objective(model, tok, samples, w, HubSettings(l1=0.0)) + 0.05 * 0.75, rel=1e-6)
    assert mean > 0

    out = moerge.lorahub(lm["base"], [lm["e0"], lm["e1"]], str(lm["d1"]), tmp_path / "hub",
                         settings=HubSettings(budget=12))
    record = json.loads((out / "moerge_lorahub.json").read_text())
    weights = list(record["weights"].values())
    assert record["search"]["evaluations"] == 12 and len(weights) == 2
    assert record["search"]["objective"] <= record["search"]["objective_at_zero"] + 1e-9
    again = moerge.lorahub(lm["base"], [lm["e0"], lm["e1"]], str(lm["d1"]), tmp_path / "hub2",
                           settings=HubSettings(budget=12))
    assert json.loads((again / "moerge_lorahub.json").read_text())["weights"] == record["weights"]
    # the adapter is plain PEFT, and its ΔW is Σ wᵢ ΔWᵢ exactly (not (Σ wB)(Σ wA))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(lm["base"])), str(out))
    got = merged.merge_and_unload().state_dict()
    base = AutoModelForCausalLM.from_pretrained(str(lm["base"])).state_dict()
    with ExpertSet(lm["base"], [lm["e0"], lm["e1"]]) as experts:
        for m in experts.modules:
            want = base[m + ".weight"] + sum(wi * s_ * b @ a for wi, (a, b, s_) in zip(weights, experts.factors(m)))
            assert torch.allclose(got[m + ".weight"], want, atol=1e-5), m
