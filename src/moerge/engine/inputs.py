"""The checks of a plan's inputs that need no tensor data: every model has every tensor, with a shape and
dtype that fit (or a vocabulary policy that says what to do), and each data-aware model brings statistics
that belong to it."""

from __future__ import annotations

from typing import Any

from moerge.arch.names import is_vocab_name
from moerge.engine.items import InputRef
from moerge.errors import MoergeError, PlanError
from moerge.io.checkpoint import open_source
from moerge.io.sources import TensorSource, resolve_reference
from moerge.methods import MergeMethod
from moerge.recipe.loader import LoadedRecipe
from moerge.stats.format import KINDS as STAT_KINDS
from moerge.stats.format import part_names, part_shapes, read_meta

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


class InputChecks:
    """Presence, shape and dtype of input tensors across ``checkpoints``; warnings go to ``warnings``."""

    def __init__(self, loaded: LoadedRecipe, method: MergeMethod, checkpoints: list[TensorSource],
                 warnings: list[str]) -> None:
        self.loaded, self.method, self.checkpoints, self.warnings = loaded, method, checkpoints, warnings

    def count(self, n: int) -> None:
        """The method takes ``n`` models (besides the base)."""
        m = self.method
        if n < m.min_models:
            raise PlanError(f"{self.loaded.source}: {m.name} needs at least {m.min_models} model(s) "
                            f"besides the base model, got {n}")
        if m.max_models is not None and n > m.max_models:
            extra = " besides the base model" if m.needs_base else ""
            raise PlanError(f"{self.loaded.source}: {m.name} takes at most {m.max_models} model(s){extra}, got {n}")

    def check(self, name: str, reference: int, others: list[int], shape: tuple[int, ...],
              names: list[str] | None = None, aligned: bool = False) -> bool:
        """Check presence and shape of ``name`` in every input; return whether rows need fixing.
        ``aligned``: its rows follow the vocabulary alignment, so only the other dimensions must agree."""
        ref = self.checkpoints[reference]
        row_fix = False
        for k, idx in enumerate(others):
            ck = self.checkpoints[idx]
            tname = names[k] if names else name
            if tname not in ck:
                raise PlanError(
                    f"tensor {tname!r} is missing from {ck.ref} (files: {', '.join(str(f) for f in ck.files)}); "
                    f"it is in {ref.ref}",
                    hint="all models must share the base model's architecture",
                )
            other = ck.info(tname).shape
            ref_float = ref.info(name).dtype in FLOAT_DTYPES
            if ref_float != (ck.info(tname).dtype in FLOAT_DTYPES):
                raise PlanError(
                    f"dtype mismatch in {tname!r}: {ref.info(name).dtype} in {ref.ref} "
                    f"({ref.info(name).file}) but {ck.info(tname).dtype} in {ck.ref} ({ck.info(tname).file})",
                    hint="floating-point tensors can only be merged with floating-point tensors",
                )
            if other == shape or (aligned and len(other) == len(shape) and other[1:] == shape[1:]):
                continue
            same_tail = len(other) == len(shape) and other[1:] == shape[1:]
            if same_tail and is_vocab_tensor(tname, ck, other[0], ref, shape[0]):
                if self.loaded.recipe.vocab_policy == "base":
                    row_fix = True
                    self.warnings.append(f"{tname}: {ck.ref} has {other[0]} rows, the output keeps "
                                         f"{shape[0]} (vocab_policy: base)")
                    continue
                raise PlanError(
                    f"vocabulary size mismatch in {tname!r}: {ref.ref} ({ref.info(name).file}) has "
                    f"{shape[0]} rows, {ck.ref} ({ck.info(tname).file}) has {other[0]}",
                    hint="the models use different tokenizers or padded vocabularies; set "
                    "'vocab_policy: base' to keep the base model's vocabulary (extra rows are cropped, "
                    "missing rows keep the base values)",
                )
            raise PlanError(
                f"shape mismatch in {tname!r}: {list(shape)} in {ref.ref} ({ref.info(name).file}) "
                f"but {list(other)} in {ck.ref} ({ck.info(tname).file})",
                hint="all models must share the base model's architecture and sizes",
            )
        return row_fix


def is_vocab_tensor(name: str, ck: TensorSource, rows: int, ref: TensorSource, ref_rows: int) -> bool:
    """Whether a tensor whose rows differ between models is vocabulary-sized (by its name, or because each
    model's ``vocab_size`` is its row count)."""
    if is_vocab_name(name):
        return True
    v1 = (ck.config or {}).get("vocab_size")
    v0 = (ref.config or {}).get("vocab_size")
    return v1 == rows and v0 == ref_rows


class StatsInputs:
    """Each expert's statistics folder (data-aware methods), opened as one more checkpoint of the plan."""

    def __init__(self, loaded: LoadedRecipe, method: MergeMethod, checkpoints: list[TensorSource],
                 index: dict[str, int], warnings: list[str], *, allow_external_files: bool = False) -> None:
        self.loaded, self.method, self.checkpoints, self.index, self.warnings = (
            loaded, method, checkpoints, index, warnings)
        self.allow_external_files = allow_external_files
        self.kind: str | None = None  # the kind of statistics every expert brings
        self.of_expert: dict[int, int] = {}  # expert checkpoint -> its statistics checkpoint
        self.meta: dict[int, dict[str, Any]] = {}  # statistics checkpoint -> its moerge_stats.json

    def open(self, entries: list[tuple[int, Any]]) -> None:
        """Open each expert's statistics folder and check it belongs to that expert."""
        m = self.method
        kinds = " or ".join(m.stats)
        for i, e in entries:
            where = self.loaded.where("models", i)
            if not e.stats:
                raise PlanError(
                    f"{where}: {m.name} needs statistics for every model; {e.model} has no 'stats'",
                    hint=f"compute them with `moerge stats {m.stats[0]} {e.model} --data TASK --out DIR` and "
                    "add 'stats: DIR' to this model's entry")
            try:
                folder = resolve_reference(e.stats)
            except MoergeError as err:
                raise PlanError(f"{self.loaded.where('models', i, 'stats')}: {err.message}") from None
            meta = read_meta(folder, allow_external_files=self.allow_external_files, hint=f"compute statistics with `moerge stats {m.stats[0]} MODEL --data TASK "
                             "--out DIR`")
            kind = meta.get("kind")
            if kind not in m.stats or kind not in STAT_KINDS:
                raise PlanError(f"{folder}: holds {kind!r} statistics; {m.name} reads {kinds} statistics")
            if self.kind is not None and kind != self.kind:
                raise PlanError(f"{folder}: holds {kind} statistics but other models bring {self.kind}; "
                                "give every model the same kind")
            self.kind = kind
            expert = self.index[e.model]
            want = meta.get("model_fingerprint")
            if want is None:
                self.warnings.append(f"{folder}: no model fingerprint recorded; cannot check that these "
                                     f"statistics belong to {e.model}")
            else:
                have = self.checkpoints[expert].fingerprint()
                if have != want:
                    raise PlanError(
                        f"{folder}: these statistics were computed from {meta.get('model')} (fingerprint "
                        f"{want}), not from {e.model} (fingerprint {have})",
                        hint=f"recompute them: moerge stats {kind} {e.model} --data TASK --out {folder} --force")
            self.of_expert[expert] = len(self.checkpoints)
            self.meta[len(self.checkpoints)] = meta
            self.checkpoints.append(open_source(folder, allow_external_files=self.allow_external_files))

    def refs(self, name: str, shape: tuple[int, ...], experts: list[int]) -> list[tuple[InputRef, ...]] | None:
        """The statistics tensors of one weight, per expert; None if no expert has them."""
        kind = self.kind
        assert kind is not None
        names = part_names(name, kind)
        found = [all(n in self.checkpoints[self.of_expert[x]] for n in names) for x in experts]
        if not any(found):
            return None
        if not all(found):
            have = self.checkpoints[self.of_expert[experts[found.index(True)]]]
            lack = self.checkpoints[self.of_expert[experts[found.index(False)]]]
            raise PlanError(f"statistics for {name!r} are missing from {lack.root} (they are in {have.root})",
                            hint="compute every model's statistics the same way (same kind, same model layout)")
        expected = part_shapes(kind, shape)
        if expected is None:
            raise PlanError(f"{self.checkpoints[self.of_expert[experts[0]]].root}: has {kind} statistics for "
                            f"{name!r}, which is not a 2-D weight ({list(shape)})")
        refs = []
        for x in experts:
            ck = self.checkpoints[self.of_expert[x]]
            for n, want in zip(names, expected):
                got = ck.info(n).shape
                if tuple(got) != tuple(want):
                    raise PlanError(f"{ck.root}: statistic {n!r} is {list(got)}, expected {list(want)} for the "
                                    f"weight {name!r} of shape {list(shape)} ({ck.info(n).file})",
                                    hint="statistics must come from a model of the same architecture")
            refs.append(tuple(InputRef(self.of_expert[x], n) for n in names))
        return refs
