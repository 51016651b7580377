"""The evaluation pipeline end to end on the `tiny` suite: zoo build (resumable), merges scored
held-in and held-out, validation-only sweeps, normalisation, the report.

Tiny random models stand in for MiniLM and SmolLM2 (same code paths, seconds not hours); the
data is the real task data, a few dozen examples per task.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from moerge.data.tasks import TaskError, get_suite, make_splits


def _data_installed() -> bool:
    try:
        for t in get_suite("tiny").tasks:
            make_splits(t, (2, 1, 1))
        from moerge.evaluation.models import pretrained_path

        pretrained_path("encoder")
        return True
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _data_installed(), reason="evaluation data packages not installed "
                                                                "(scripts/setup.sh installs them)")


def _tiny_bert(path: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from moerge.evaluation.models import pretrained_path

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(pretrained_path("encoder")))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _tiny_decoder(path: Path) -> Path:
    from moerge.data.tasks import get_task
    from moerge.testing import make_word_llama

    words = [w for t in get_suite("tiny").tasks for w in get_task(t).words]
    texts = [ex.text for t in get_suite("tiny").tasks for ex in make_splits(t, (24, 12, 12)).train]
    return make_word_llama(path, words, texts)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zooenv")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOERGE_CACHE", str(root / "cache"))
    yield {"root": root, "bert": _tiny_bert(root / "bert"), "zoo": root / "zoo"}
    mp.undo()


@pytest.fixture(scope="module")
def encoder_zoo(env: dict[str, Path]) -> list[dict]:
    from moerge.evaluation.zoo import build_zoo

    return build_zoo("tiny", env["zoo"], track="encoder", kind="full", pretrained=env["bert"], examples=16,
                     batch_size=8, epochs=1, lr=1e-3, multitask=True)


def test_zoo_experts_have_metadata_heads_and_data_hashes(env: dict[str, Path], encoder_zoo: list[dict]) -> None:
    names = [m["tasks"][0] if m["role"] == "expert" else "multitask" for m in encoder_zoo]
    assert names == ["bbc", "tweets", "rotten_tomatoes", "multitask"]
    suite = get_suite("tiny")
    for m in encoder_zoo:
        for t in m["tasks"]:
            assert m["data"][t]["train"] == make_splits(t, suite.sizes).hashes["train"]
            assert 0.0 <= m["validation"][t] <= 1.0 and 0.0 <= m["validation_pretrained"][t] <= 1.0
        assert m["log"]["steps"] >= 2 and m["log"]["loss_finite"] and m["seconds"] > 0
    assert (env["zoo"] / "encoder/full/bbc/head.safetensors").exists()
    assert (env["zoo"] / "encoder/full/multitask/heads/tweets/head.safetensors").exists()
    assert (env["zoo"] / "encoder/full/bbc/model.safetensors").exists()


def test_zoo_build_resumes_without_retraining(env: dict[str, Path], encoder_zoo: list[dict]) -> None:
    from moerge.evaluation.zoo import build_zoo

    stamp = (env["zoo"] / "encoder/full/bbc/model.safetensors").stat().st_mtime_ns
    (env["zoo"] / "encoder/full/tweets.partial").mkdir()  # a build interrupted earlier
    again = build_zoo("tiny", env["zoo"], track="encoder", kind="full", examples=16, batch_size=8, epochs=1,
                      lr=1e-3)
    assert (env["zoo"] / "encoder/full/bbc/model.safetensors").stat().st_mtime_ns == stamp
    assert [m["seconds"] for m in again] == [m["seconds"] for m in encoder_zoo[:3]]


def test_compare_scores_merges_normalises_and_reports(env: dict[str, Path], encoder_zoo: list[dict]) -> None:
    from moerge.evaluation.experiment import Experiment, load_records
    from moerge.evaluation.report import markdown_table, write_report
    from moerge.evaluation.zoo import fingerprint, zoo_fingerprint

    results = env["root"] / "results"
    exp = Experiment("tiny", "encoder", "full", zoo=env["zoo"], results=results, log=lambda s: None)
    recs = exp.compare(["task_arithmetic"], grid="small", curve=False)
    by = {(r["role"], r["name"]): r for r in recs}
    assert {"pretrained", "expert:bbc", "expert:tweets", "multitask", "task_arithmetic"} <= \
        {name for _, name in by}
    ta = by[("merge", "task_arithmetic")]
    assert ta["split"] == "test" and ta["experts"] == ["bbc", "tweets"] and ta["merge_peak_mib"] > 0
    # normalised = accuracy / the task's own expert's accuracy on the same split
    for t in ("bbc", "tweets"):
        own = by[("expert", f"expert:{t}")]["accuracy"][t]
        assert ta["normalized"][t] == pytest.approx(ta["accuracy"][t] / own)
    assert ta["held_out"] == ta["accuracy"]["rotten_tomatoes"]
    # held-out tasks are probed on the scored model's features: the held-out expert's head scores only itself
    from moerge.evaluation.evaluate import EvalSettings, Evaluator, OwnHeadEvaluator

    settings = EvalSettings("tiny", "encoder", "test")
    probed = Evaluator(settings).score(env["zoo"] / "encoder/full/bbc", ["rotten_tomatoes"], probe_only=True)
    assert by[("expert", "expert:bbc")]["accuracy"]["rotten_tomatoes"] == probed["rotten_tomatoes"]
    assert exp.evaluator("test").mode("rotten_tomatoes", False) == "probe"
    assert exp.evaluator("test").mode("bbc", False) == "head"
    own = OwnHeadEvaluator(settings, env["zoo"] / "encoder/full/rotten_tomatoes", "rotten_tomatoes")
    assert own.mode("rotten_tomatoes", False) == "head"
    rt = own.score(env["zoo"] / "encoder/full/rotten_tomatoes", ["rotten_tomatoes"])["rotten_tomatoes"]
    assert ta["normalized"]["rotten_tomatoes"] == pytest.approx(ta["accuracy"]["rotten_tomatoes"] / rt)
    # the chosen λ is the best on held-in validation, and the sweep never looked at test or held-out tasks
    all_recs = load_records(results)
    sweep = [r for r in all_recs if r["role"] == "sweep" and r["name"] == "task_arithmetic"]
    assert len(sweep) == 3 and all(r["split"] == "validation" and set(r["accuracy"]) == {"bbc", "tweets"}
                                   for r in sweep)
    chosen = next(r for r in sweep if r["params"] == ta["params"])
    assert chosen["held_in_norm"] == max(r["held_in_norm"] for r in sweep)
    # scores are cached by content: a second pass is identical, and its record keeps when and at what cost
    # the result was measured (not the cache hit's zero seconds)
    again = exp.record("pretrained", "pretrained", env["zoo"] / "encoder/pretrained", "test", probe_only=True)
    first = by[("pretrained", "pretrained")]
    assert again["accuracy"] == first["accuracy"]
    assert (again["eval_seconds"], again["created"]) == (first["eval_seconds"], first["created"])
    page = write_report(results)
    text = page.read_text()
    assert "task_arithmetic" in text and text.count("data:image/png;base64") >= 2
    assert (results / "encoder-full-normalized.png").stat().st_size > 1000
    assert "| task_arithmetic |" in markdown_table(all_recs, "tiny")
    # per-example hits back every accuracy; a cached score from before they were kept is scored again
    for r in all_recs:
        assert all(r["accuracy"][t] == r["correct"][t].count("1") / len(r["correct"][t]) for t in r["accuracy"])
    pre = by[("pretrained", "pretrained")]
    stripped = 0
    for p in (env["root"] / "cache/eval").rglob("*.json"):
        payload = json.loads(p.read_text())
        if payload["model"] == str(env["zoo"] / "encoder/pretrained"):
            payload.pop("correct")
            p.write_text(json.dumps(payload))
            stripped += 1
    assert stripped >= 3
    again = exp.record("pretrained", "pretrained", env["zoo"] / "encoder/pretrained", "test", probe_only=True)
    assert again["correct"] == pre["correct"] and again["accuracy"] == pre["accuracy"]
    table = markdown_table(load_records(results), "tiny")
    assert "vs best merge (95% CI)" in table and "| best |" in table and " [" in table
    # every record names the zoo it was scored against; the baselines alone can be re-scored
    assert {r["zoo"] for r in all_recs} == {zoo_fingerprint(env["zoo"], "encoder", "full", "tiny")}
    assert [r["role"] for r in exp.compare([], grid="small")] == ["pretrained", "expert", "expert", "multitask"]
    assert by[("multitask", "multitask")]["model"] == fingerprint(env["zoo"] / "encoder/full/multitask")
    # a record of an older build of the zoo is left out of the report, which says so
    ghost = dict(ta, name="ghost", zoo="0ld0ld0ld0ld", created="2000-01-01T00:00:00Z")
    (results / "records" / "encoder-full-ghost.json").write_text(json.dumps(ghost))
    warned: list[str] = []
    text = write_report(results, warn=warned.append).read_text()
    assert "ghost" not in text and "ghost" not in (results / "encoder-full-table.md").read_text()
    assert len(warned) == 1 and "left out 1 record(s)" in warned[0] and "0ld0ld0ld0ld" in text


def test_eval_prints_the_model_next_to_the_baselines(env: dict[str, Path], encoder_zoo: list[dict]) -> None:
    from click.testing import CliRunner

    from moerge.cli import main

    args = ["eval", str(env["zoo"] / "encoder/full/bbc"), "--suite", "tiny", "--track", "encoder",
            "--zoo", str(env["zoo"]), "--results", str(env["root"] / "res-eval"), "--name", "bbc-again", "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line.split()[1:] for line in res.output.splitlines()
            if line.split() and line.split()[0] in ("pretrained", "expert:bbc", "expert:tweets", "multitask",
                                                    "bbc-again")}
    assert len(rows) == 5 and "rotten_to*" in res.output  # every baseline; the held-out task is starred
    assert rows["bbc-again"] == rows["expert:bbc"]  # the same model, scored the same way
    alone = CliRunner().invoke(main, args + ["--no-baselines"])
    assert alone.exit_code == 0 and "expert:tweets" not in alone.output and "bbc-again" in alone.output


@pytest.fixture(scope="module")
def decoder_zoo(env: dict[str, Path]) -> tuple[Path, list[dict]]:
    from moerge.evaluation.zoo import build_zoo

    dec = _tiny_decoder(env["root"] / "llama")
    zoo = env["root"] / "zoo-dec"
    kw = dict(track="decoder", pretrained=dec, examples=16, batch_size=8, epochs=1)
    build_zoo("tiny", zoo, kind="full", lr=1e-3, tasks=["bbc", "tweets", "rotten_tomatoes"], **kw)
    return zoo, build_zoo("tiny", zoo, kind="lora", lr=1e-2, lora_dropout=0.05, tasks=["bbc", "tweets"], **kw)


def test_decoder_lora_zoo_and_adapter_merge(env: dict[str, Path], decoder_zoo: tuple[Path, list[dict]]) -> None:
    from moerge.evaluation.experiment import Experiment

    zoo, metas = decoder_zoo
    assert all(m["kind"] == "lora" and m["train"]["lora_dropout"] == 0.05 for m in metas)
    adapter = zoo / "decoder/lora/bbc"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["lora_dropout"] == 0.05
    assert Path(cfg["base_model_name_or_path"]) == (zoo / "decoder/pretrained").resolve()
    exp = Experiment("tiny", "decoder", "lora", zoo=zoo, results=env["root"] / "res-dec", log=lambda s: None)
    rec = exp.merged_record("task_arithmetic", {"lambda": 1.0}, ["bbc", "tweets"], "validation", ["bbc", "tweets"])
    assert set(rec["accuracy"]) == {"bbc", "tweets"} and rec["held_in_norm"] is not None
    # a routed bundle is a model wherever one is accepted: one expert routed = that adapter, scored alike
    import moerge
    from moerge.evaluation.evaluate import EvalSettings, Evaluator

    routed = moerge.route("arrow", zoo / "decoder/pretrained", [adapter], env["root"] / "routed-bbc", top_k=1)
    ev = Evaluator(EvalSettings("tiny", "decoder", split="validation"))
    got, want = ev.results(routed, ["bbc"])["bbc"], ev.results(adapter, ["bbc"])["bbc"]
    assert got["correct"] == want["correct"] and got["model"] == str(routed)


def test_routing_comparison_scores_routers_beside_merges(env: dict[str, Path],
                                                        decoder_zoo: tuple[Path, list[dict]]) -> None:
    pytest.importorskip("nevergrad")
    from moerge.evaluation.experiment import Experiment
    from moerge.evaluation.report import write_report
    from moerge.evaluation.routing import RoutingExperiment

    zoo, _ = decoder_zoo
    results = env["root"] / "res-route"
    exp = Experiment("tiny", "decoder", "lora", zoo=zoo, results=results, log=lambda s: None)
    rx = RoutingExperiment(exp, seeds=(0, 1), steps=2, batch_size=4, mass_examples=4, lorahub_examples=3)
    recs = rx.held_in_setting(["arrow", "phatgoose", "smear", "retrieval", "oracle"])
    by = {}
    for r in recs:
        by.setdefault(r["name"], []).append(r)
    assert {k: len(v) for k, v in by.items()} == {"arrow": 1, "phatgoose": 2, "smear": 2, "retrieval": 1, "oracle": 1}
    assert all(r["split"] == "test" and set(r["accuracy"]) == {"bbc", "tweets", "rotten_tomatoes"}
               for k in ("arrow", "phatgoose", "smear", "retrieval") for r in by[k])
    assert by["oracle"][0]["normalized"] == {"bbc": 1.0, "tweets": 1.0}  # each task's own expert, by definition
    assert {r["params"]["seed"] for r in by["phatgoose"]} == {0, 1} and by["arrow"][0]["build_seconds"] > 0
    for share in by["retrieval"][0]["pick_share"].values():
        assert set(share) == {"bbc", "tweets"} and abs(sum(share.values()) - 1) < 1e-3
    mass = by["phatgoose"][0]["routing_mass"]
    assert set(mass) == {"bbc", "tweets"} and all(len(v) == 1 and all(0 <= x <= 1 for x in v) for v in mass.values())  # one layer
    sweeps = [r for r in load_records_of(results) if r["role"] == "route-sweep"]
    assert sorted(r["params"]["top_k"] for r in sweeps) == [1, 2, 3] and all(r["split"] == "validation" for r in sweeps)
    # leave one task out with two experts: each fold routes among one expert, which is that expert
    loto = rx.leave_one_out(["arrow", "phatgoose", "retrieval", "lorahub"], merges={"task_arithmetic": {"lambda": [1.0]}})
    ev = exp.evaluator("test")
    for r in loto:
        (left,) = r["accuracy"]
        assert r["left_out"] == left and r["experts"] == [e for e in ("bbc", "tweets") if e != left]
        if r["name"] in ("arrow", "phatgoose", "retrieval"):
            own = ev.results(zoo / "decoder/lora" / r["experts"][0], [left])[left]["correct"]
            assert r["correct"][left] == own, r["name"]
    assert {r["name"] for r in loto} == {"arrow", "phatgoose", "retrieval", "lorahub", "task_arithmetic"}
    page = write_report(results)
    text = page.read_text()
    assert "Routing" in text and "leave one task out" in text
    table = (results / "decoder-lora-routing.md").read_text()
    assert "phatgoose" in table and "oracle" in table and (results / "decoder-lora-routing.png").exists()


def load_records_of(results: Path) -> list[dict]:
    from moerge.evaluation.experiment import load_records

    return load_records(results)


def test_encoder_lora_heads_start_from_a_probe_with_the_configured_penalty(
        env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from moerge.evaluation import encoder
    from moerge.evaluation.zoo import build_zoo, fingerprint

    seen: list[float] = []
    real = encoder.fit_probe

    def spy(*a: object, l2: float = 1e-3, **k: object) -> torch.nn.Linear:
        seen.append(l2)
        return real(*a, l2=l2, **k)

    monkeypatch.setattr(encoder, "fit_probe", spy)
    metas = build_zoo("tiny", env["root"] / "zoo-enc-lora", track="encoder", kind="lora", pretrained=env["bert"],
                      tasks=["bbc"], examples=8, batch_size=8, epochs=1, head_l2=0.25, weight_decay=0.0)
    assert seen[0] == 0.25  # the head's initial probe; the evaluation's own probes keep their default
    assert metas[0]["train"]["head_l2"] == 0.25 and metas[0]["train"]["weight_decay"] == 0.0
    assert (env["root"] / "zoo-enc-lora/encoder/lora/bbc/head.safetensors").exists()
    # asking for other settings never silently reuses the expert built with these; --rebuild retrains it
    again = dict(track="encoder", kind="lora", tasks=["bbc"], examples=8, batch_size=8, epochs=1, head_l2=0.5,
                 weight_decay=0.0)
    with pytest.raises(TaskError, match=r"bbc: this expert was built with other settings: head_l2 0\.25 \(asked 0\.5"):
        build_zoo("tiny", env["root"] / "zoo-enc-lora", **again)
    folder = env["root"] / "zoo-enc-lora/encoder/lora/bbc"
    before = fingerprint(folder)
    metas = build_zoo("tiny", env["root"] / "zoo-enc-lora", rebuild=True, **again)
    assert metas[0]["train"]["head_l2"] == 0.5 and 0.5 in seen and fingerprint(folder) != before


def test_data_aware_merge_computes_statistics_once_and_records_their_cost(env: dict[str, Path],
                                                                          encoder_zoo: list[dict]) -> None:
    from moerge.evaluation.experiment import Experiment
    from moerge.evaluation.report import markdown_table
    from moerge.evaluation.zoo import stats_dir

    exp = Experiment("tiny", "encoder", "full", zoo=env["zoo"], results=env["root"] / "res-da", log=lambda s: None)
    rec = exp.merged_record("regmean", {"alpha": 0.9}, ["bbc", "tweets"], "validation", ["bbc", "tweets"])
    meta = json.loads((stats_dir(env["zoo"], "encoder", "full", "gram", "bbc") / "moerge_stats.json").read_text())
    assert meta["kind"] == "gram" and meta["task"] == "bbc" and meta["model_fingerprint"]
    assert rec["stats_kind"] == "gram" and rec["stats_seconds"] >= 0 and rec["held_in_norm"] is not None
    folder = stats_dir(env["zoo"], "encoder", "full", "gram", "bbc")
    stamp = (folder / "moerge_stats.json").stat().st_mtime_ns
    recipe = exp.recipe("regmean", {}, ["bbc", "tweets"])  # cached: not computed again
    assert recipe["models"][0] == {"model": str(env["zoo"] / "encoder/full/bbc"), "stats": str(folder)}
    assert (folder / "moerge_stats.json").stat().st_mtime_ns == stamp
    assert "(gram)" in markdown_table([dict(rec, split="test")], "tiny")
    # statistics of an older build of the expert are recomputed, never merged with the new weights
    (folder / "moerge_stats.json").write_text(json.dumps(dict(meta, model_hash="0" * 16)))
    exp.recipe("regmean", {}, ["bbc", "tweets"])
    assert json.loads((folder / "moerge_stats.json").read_text())["model_hash"] == meta["model_hash"]


def test_every_grid_names_real_methods_and_valid_values():
    from moerge.evaluation.experiment import GRIDS
    from moerge.methods import get_method

    for grid in GRIDS.values():
        for method, values in grid.items():
            m = get_method(method)
            for name, options in values.items():
                p = m.param(name)
                assert p is not None, (method, name)
                assert all(p.check(v) is None for v in options), (method, name, options)
