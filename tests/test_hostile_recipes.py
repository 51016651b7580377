"""Recipes written by an attacker or a careless user: each gives one RecipeError naming the file and line,
fast, never a Python exception from inside a library (issue 16's recipe campaign, case by case)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from moerge.cli import main
from moerge.errors import RecipeError
from moerge.recipe import load_recipe

HEAD = "method: linear\nmodels:\n  - model: a\n  - model: b\n"


def _error(text: str | bytes, tmp_path: Path) -> str:
    p = tmp_path / "r.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    t0 = time.perf_counter()
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert time.perf_counter() - t0 < 5  # bounded, whatever the input
    return str(e.value)


@pytest.mark.parametrize(("text", "expected"), [
    (b"method: linear\nmodels: [a, b]\nname: caf\xe9\n", r"r.yaml:3: not UTF-8 text \(byte 0xe9 at offset 39\)"),
    ("a: &x [*x]\n", r"r.yaml:1: .*alias refers to the value that contains it"),
    ("? [a, b]\n: 1\n", r"r.yaml:1: a key must be a plain value"),
    ("method: !!python/object:os.system ls\n", r"r.yaml:1: unsupported YAML tag 'tag:yaml.org,2002:python/object:os.system'"),
    ("method: !custom linear\n", r"r.yaml:1: unsupported YAML tag '!custom'"),
    ("method: linear\nwhen: 2024-01-01\nmodels: [a, b]\n", r"r.yaml:2: unsupported YAML tag 'tag:yaml.org,2002:timestamp'"),
    ("method: linear\nslices: []\n", r"'slices' is empty"),
    (HEAD + "parameters:\n  weight: " + "9" * 400 + "\n", r"r.yaml:6: an integer of 400 digits"),
    (HEAD + "seed: " + "1" * 5000 + "\n", r"r.yaml:5: an integer of 5000 digits"),
    (HEAD + "parameters:\n  weight: .nan\n", r"r.yaml:6: '.nan' is not a finite number"),
    (HEAD + "parameters:\n  weight: 1.0e+400\n", r"r.yaml:6: '1.0e\+400' is not a finite number"),
    ("a: " + "[" * 100 + "]" * 100 + "\n", r"nested deeper than 64 levels"),
    ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", r"nested deeper than 64 levels"),
])
def test_each_hostile_recipe_is_one_clear_error(text, expected, tmp_path):
    import re

    assert re.search(expected, _error(text, tmp_path)), _error(text, tmp_path)


def test_an_alias_bomb_is_refused_fast(tmp_path):
    # nine levels of nine aliases: 469 bytes that expand into 387 million values
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = "\n".join(lines) + "\nmethod: linear\n"
    assert len(text) < 600
    assert "more than 200,000 values once aliases are expanded" in _error(text, tmp_path)


def test_merge_keys_work_as_in_mergekit(tmp_path):
    text = ("defaults: &d\n  weight: 0.5\n  density: 0.3\n"
            "method: ties\nbase_model: base\nmodels:\n"
            "  - model: a\n    parameters:\n      <<: *d\n      weight: 0.7\n"
            "  - model: b\n    parameters: {<<: *d}\n")
    with pytest.raises(RecipeError, match=r"unknown key 'defaults'"):  # the anchor's own key is still a key
        load_recipe(text)
    r = load_recipe(text.replace("defaults: &d", "parameters: &d")).recipe
    assert r.models[0].parameters == {"weight": 0.7, "density": 0.3}
    assert r.models[1].parameters == {"weight": 0.5, "density": 0.3}


def test_aliases_within_budget_still_work(tmp_path):
    text = "method: linear\nmodels:\n  - &m {model: a, parameters: {weight: 1.0}}\n  - *m\n"
    r = load_recipe(text).recipe
    assert [m.model for m in r.models] == ["a", "a"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_recipe_is_refused_not_read(tmp_path):
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    with pytest.raises(RecipeError, match="not a regular file"):
        load_recipe(fifo)


def test_markup_in_an_error_is_printed_as_it_is(tmp_path):
    odd = tmp_path / "[/x] [bold]m[/bold]"  # a path that does not exist, named in the error
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: linear\nmodels:\n  - model: {odd}/a\n  - model: {odd}/b\n")
    res = CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "[/x] [bold]m[/bold]/a" in res.output and "internal error" not in res.output
