"""`moerge stats`: Gram, diagonal Fisher and K-FAC statistics match brute-force per-example computations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moerge.data.tasks import get_task
from moerge.stats import StatsError, StatsSettings, compute_stats
from moerge.testing import make_word_llama

TEXTS = ["good day today", "this is awful and bad", "meh, it is fine", "great great news", "terrible",
         "ok then", "a long sentence that goes on and on about nothing much at all really"]
LABELS = [2, 0, 1, 2, 0, 1, 1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    task = get_task("tweets")
    return make_word_llama(tmp_path_factory.mktemp("stats") / "m", list(task.words), TEXTS, layers=2)


def _model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return m, AutoTokenizer.from_pretrained(str(path))


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok(get_task("tweets").render(text))["input_ids"][-63:]])


def _read(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_gram_matches_concatenated_inputs(tiny: Path, tmp_path: Path) -> None:
    meta = compute_stats(tiny, tmp_path / "g", StatsSettings("gram", batch_size=3), track="decoder", task="tweets",
                         texts=TEXTS, labels=LABELS)
    got = _read(tmp_path / "g")
    model, tok = _model(tiny)
    xs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: xs.setdefault(n, []).append(inp[0][0].detach()))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        for t in TEXTS:  # one example at a time: no padding to mask
            model(_ids(tok, t))
    for h in hooks:
        h.remove()
    assert set(got) == {f"{n}.weight" for n in xs} | {"lm_head.weight"}
    for n, parts in xs.items():
        x = torch.cat(parts)
        torch.testing.assert_close(got[f"{n}.weight"], x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    assert meta["rows"] == sum(_ids(tok, t).shape[1] for t in TEXTS) and meta["examples"] == len(TEXTS)
    assert json.loads((tmp_path / "g" / "moerge_stats.json").read_text())["model_hash"] == meta["model_hash"]


@pytest.mark.parametrize("estimator", ["empirical", "true"])
def test_fisher_matches_per_example_gradients(tiny: Path, tmp_path: Path, estimator: str) -> None:
    compute_stats(tiny, tmp_path / "f", StatsSettings("fisher", estimator=estimator), track="decoder",
                  task="tweets", texts=TEXTS, labels=LABELS)
    got = _read(tmp_path / "f")
    model, tok = _model(tiny)
    words = [tok(w, add_special_tokens=False)["input_ids"][0] for w in get_task("tweets").words]
    params = dict(model.named_parameters())
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for t, y in zip(TEXTS, LABELS):
        logp = torch.log_softmax(model(_ids(tok, t)).logits[0, -1], -1)[words]
        p = torch.softmax(logp.detach(), -1)
        for label, w in ([(y, 1.0)] if estimator == "empirical" else [(k, float(p[k])) for k in range(3)]):
            grads = torch.autograd.grad(logp[label], list(params.values()), retain_graph=True, allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    ref[n] += w * g.square()
    assert set(got) == {n for n in params if n in got} and "model.embed_tokens.weight" in got
    for n, v in got.items():
        torch.testing.assert_close(v, ref[n] / len(TEXTS), rtol=1e-4, atol=1e-10)


def test_kfac_factors(tiny: Path, tmp_path: Path) -> None:
    compute_stats(tiny, tmp_path / "k", StatsSettings("kfac"), track="decoder", task="tweets", texts=TEXTS,
                  labels=LABELS)
    compute_stats(tiny, tmp_path / "g", StatsSettings("gram", batch_size=4), track="decoder", task="tweets",
                  texts=TEXTS, labels=LABELS)
    k, g = _read(tmp_path / "k"), _read(tmp_path / "g")
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(k[f"{name}::in"], g[name], rtol=1e-5, atol=1e-6)  # A is the input Gram
    model, tok = _model(tiny)
    words = [tok(w, add_special_tokens=False)["input_ids"][0] for w in get_task("tweets").words]
    mod = model.get_submodule("model.layers.1.mlp.down_proj")
    outs: list[torch.Tensor] = []

    def keep(m, i, o) -> None:  # a forward hook that returns something would replace the output
        o.retain_grad()
        outs.append(o)

    h = mod.register_forward_hook(keep)
    s = torch.zeros(mod.out_features, mod.out_features)
    for t, y in zip(TEXTS, LABELS):
        outs.clear()
        torch.log_softmax(model(_ids(tok, t)).logits[0, -1], -1)[words][y].backward()
        gr = outs[0].grad[0]
        s += gr.T @ gr
    h.remove()
    torch.testing.assert_close(k[f"{name}::out"], s / len(TEXTS), rtol=1e-4, atol=1e-9)
    assert k[f"{name}::out"].shape == (mod.out_features, mod.out_features)


def test_stats_errors(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(StatsError, match="unknown statistic 'fishr'.*fisher"):
        compute_stats(tiny, tmp_path / "x", StatsSettings("fishr"), track="decoder", task="tweets", texts=TEXTS,
                      labels=LABELS)
    compute_stats(tiny, tmp_path / "g", StatsSettings("gram"), track="decoder", texts=TEXTS)
    with pytest.raises(StatsError, match="already exists"):
        compute_stats(tiny, tmp_path / "g", StatsSettings("gram"), track="decoder", texts=TEXTS)
    with pytest.raises(StatsError, match="needs labelled examples"):
        compute_stats(tiny, tmp_path / "f", StatsSettings("fisher"), track="decoder", texts=TEXTS)


@pytest.mark.parametrize("kind,batch", [("gram", 2), ("fisher", 1), ("kfac", 1)])
def test_interrupted_statistics_resume_from_the_last_save(tiny: Path, tmp_path: Path, kind: str, batch: int) -> None:
    settings = StatsSettings(kind, batch_size=batch)
    kw = dict(track="decoder", task="tweets", texts=TEXTS, labels=LABELS)
    whole = compute_stats(tiny, tmp_path / "whole", settings, **kw)

    def stop_at_3(step: int, total: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # saves after every step (interval 0), stopped at step 3
        compute_stats(tiny, tmp_path / "s", settings, progress=stop_at_3, save_interval=0.0, **kw)
    assert not (tmp_path / "s").exists() and (tmp_path / ".s.partial" / "state.json").exists()
    seen: list[int] = []
    meta = compute_stats(tiny, tmp_path / "s", settings, progress=lambda k, n: seen.append(k), **kw)
    assert meta["resumed_at_step"] == 2 and seen[0] == 3  # steps 1-2 were not computed again
    assert meta["rows"] == whole["rows"] and not (tmp_path / ".s.partial").exists()
    a, b = _read(tmp_path / "whole"), _read(tmp_path / "s")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)
    # a partial run of other settings is not mixed in: it is discarded and the run starts over
    with pytest.raises(KeyboardInterrupt):
        compute_stats(tiny, tmp_path / "t", settings, progress=stop_at_3, save_interval=0.0, **kw)
    other = compute_stats(tiny, tmp_path / "t", StatsSettings(kind, batch_size=batch, max_length=32), **kw)
    assert other["resumed_at_step"] == 0
