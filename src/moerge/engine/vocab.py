"""Vocabularies: which token each embedding and head row stands for, in every model and in the output.

The planner calls :func:`plan_vocabulary` once. It decides, from the recipe's
``tokenizer_source`` / ``tokenizer:`` block and the models' tokenizers, the output's
tokens and, for every model, where each output token's row comes from:

* the model's own row for that token when it has it (and the token is not forced);
* otherwise the token's *fill*, as mergekit 0.1.5 defines it: the row of a ``tokens:``
  entry's source (a model's row of that token, a model's row of another token, or
  zero); else, for a token only one model has, that model's row; one no model has,
  zero; one the base has, the base's row; else the mean of the rows of the models
  that have it.

The merge method then runs on these aligned rows as on any tensor, so a token's
merged row combines the models that have it with fills that carry no task vector
of their own. Rows past the last token (padding) keep the model's own padding row
where the model has one there, else get the mean of the model's token rows
(the rule mergekit uses for ``pad_to_multiple_of``).

Without any tokenizer option, models whose vocabularies differ only in padding
rows are aligned automatically (with a note); any other difference is one error
naming both tokenizers, the first differing token and the options that resolve it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from moerge.errors import PlanError
from moerge.io.tokenizers import chat_template, fast_vocab, load_tokenizer, tokenizer_dir

if TYPE_CHECKING:
    from moerge.io.sources import TensorSource
    from moerge.recipe.loader import LoadedRecipe

NAMED_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
}


@dataclass
class VocabAlignment:
    """Where each output row comes from, per checkpoint (index into the plan's checkpoints)."""

    rows: int  # output rows (tokens, then padding)
    tokens: int  # output tokens: ids [0, tokens)
    perms: dict[int, torch.Tensor]  # checkpoint -> its row of each output token, -1 where it takes the fill
    own_tokens: dict[int, int]  # checkpoint -> how many of its rows are tokens (the rest is its padding)
    fills: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # token -> rows (checkpoint, row) averaged
    note: str = ""

    def apply(self, tensors: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Every checkpoint's tensor with its rows in the output's order, float32."""
        first = next(iter(tensors.values()))
        tail = tuple(first.shape[1:])
        defaults: dict[int, torch.Tensor] = {}
        for tid, srcs in self.fills.items():
            if srcs:
                defaults[tid] = torch.stack([tensors[c][r].float() for c, r in srcs]).mean(0)
            else:
                defaults[tid] = torch.zeros(tail, dtype=torch.float32, device=first.device)
        out = {}
        for c, t in tensors.items():
            p = self.perms[c].to(t.device)
            new = torch.zeros((self.rows, *tail), dtype=torch.float32, device=t.device)
            have = torch.nonzero(p >= 0).squeeze(1)
            new[have] = t[p[have]].float()
            missing = torch.nonzero(p < 0).squeeze(1).tolist()
            if missing:
                new[missing] = torch.stack([defaults[i] for i in missing])
            if self.rows > self.tokens:
                mean = new[: self.tokens].mean(0)
                new[self.tokens:] = mean
                lo, hi = max(self.tokens, self.own_tokens[c]), min(self.rows, t.shape[0])
                if hi > lo:  # rows that are padding in this model too keep their values
                    new[lo:hi] = t[lo:hi].float()
            out[c] = new
        return out


@dataclass
class VocabPlan:
    alignment: VocabAlignment | None  # None: every model's rows already line up
    tokenizer: Any | None  # a transformers tokenizer to save in the output (None: copy the source's files)
    rows: int | None  # the output's vocab_size when it changes
    note: str = ""  # for the merge report


def vocab_rows(ckpt: TensorSource, vocab_names: list[str]) -> int | None:
    """The number of embedding rows of ``ckpt``: its first vocabulary tensor's."""
    for n in vocab_names:
        if n in ckpt:
            return ckpt.info(n).shape[0]
    return None


def _id_map(vocab: dict[str, int], rows: int) -> dict[int, str]:
    return {i: t for t, i in vocab.items() if i < rows}


def _first_difference(a: dict[int, str], b: dict[int, str]) -> str:
    for i in range(max(len(a), len(b), 1)):
        if a.get(i) != b.get(i):
            return f"id {i}: {a.get(i, '(none)')!r} in the first, {b.get(i, '(none)')!r} in the second"
    return "(none)"


class VocabPlanner:
    def __init__(self, loaded: LoadedRecipe, checkpoints: list[TensorSource], index: dict[str, int],
                 members: list[int], base: int | None, reference: int, vocab_names: list[str],
                 warnings: list[str]) -> None:
        self.loaded, self.recipe = loaded, loaded.recipe
        self.checkpoints, self.index, self.members = checkpoints, index, members
        self.base, self.reference, self.vocab_names, self.warnings = base, reference, vocab_names, warnings
        self.rows = {c: r for c in members if (r := vocab_rows(checkpoints[c], vocab_names)) is not None}

    # -- entry --------------------------------------------------------------------------------
    def plan(self) -> VocabPlan:
        r = self.recipe
        spec = r.tokenizer
        asked = r.tokenizer_from is not None or (spec is not None and (spec.tokens or spec.pad_to_multiple_of))
        if asked and self.rows:
            if any(tokenizer_dir(self.checkpoints[c]) is not None for c in self.members):
                return self._build()
            self.warnings.append(f"{self.loaded.where('tokenizer' if spec else 'tokenizer_source')}: no model has "
                                 "tokenizer files, so the rows cannot be aligned by token; ignored")
        plan = VocabPlan(None, None, None)
        if self.rows and r.vocab_policy != "base":
            plan.alignment = self._automatic()
            plan.note = plan.alignment.note if plan.alignment is not None else ""
        if r.chat_template is not None:
            plan.tokenizer = self._with_template(None)
        return plan

    # -- without options: padding only, or an error -------------------------------------------
    def _automatic(self) -> VocabAlignment | None:
        ref = self.reference
        vocabs = {c: fast_vocab(self.checkpoints[c]) for c in self.members}
        sizes = set(self.rows.values())
        if len(sizes) == 1:
            known = {c: v for c, v in vocabs.items() if v is not None}
            if ref in known:
                rows = self.rows[ref]
                mine = _id_map(known[ref], rows)
                for c, v in known.items():
                    if c != ref and _id_map(v, rows) != mine:
                        self._differ(ref, c, mine, _id_map(v, rows))
            return None
        if any(v is None for v in vocabs.values()):
            c = next(c for c in self.members if self.rows.get(c) != self.rows.get(ref))
            raise PlanError(
                f"vocabulary size mismatch in {self.vocab_names[0]!r}: {self.checkpoints[ref].ref} has {self.rows[ref]} "
                f"rows, {self.checkpoints[c].ref} has {self.rows[c]}, and their tokens cannot be compared (no "
                "tokenizer.json)", hint=self._options_hint())
        maps = {c: _id_map(v, self.rows[c]) for c, v in vocabs.items() if v is not None}
        mine = maps[ref]
        for c in self.members:
            common = min(len(mine), len(maps[c]))
            a = {i: t for i, t in mine.items() if i < common}
            b = {i: t for i, t in maps[c].items() if i < common}
            if a != b or len(mine) != len(maps[c]):
                self._differ(ref, c, mine, maps[c])
        n = len(mine)
        out_rows = self.rows[ref]
        perms = {c: torch.arange(n) for c in self.members}
        counts = ", ".join(f"{self.checkpoints[c].ref}: {self.rows[c]}" for c in self.members)
        note = (f"the models share one vocabulary of {n} tokens and differ only in padding rows ({counts}); "
                f"the output keeps {out_rows} rows, padding rows a model lacks get the mean of its token rows")
        self.warnings.append(note)
        return VocabAlignment(out_rows, n, perms, {c: n for c in self.members}, {}, note)

    def _differ(self, a: int, b: int, ma: dict[int, str], mb: dict[int, str]) -> None:
        ca, cb = self.checkpoints[a], self.checkpoints[b]
        da, db = tokenizer_dir(ca), tokenizer_dir(cb)
        raise PlanError(
            f"the models' vocabularies differ: {ca.ref} ({da}, {len(ma)} tokens in {self.rows[a]} rows) and "
            f"{cb.ref} ({db}, {len(mb)} tokens in {self.rows[b]} rows), first at {_first_difference(ma, mb)}",
            hint=self._options_hint())

    @staticmethod
    def _options_hint() -> str:
        return ("set 'tokenizer_source: union' (every model's tokens), 'base', or one model's path to align the "
                "rows token by token; or 'vocab_policy: base' to crop/pad rows without looking at tokens")

    # -- with options: mergekit's tokenizer_source / tokenizer block ----------------------------
    def _model(self, ref: Any, *where: Any) -> int:
        if isinstance(ref, str) and ref in self.index and self.index[ref] in self.members:
            return self.index[ref]
        if ref == "base" and self.base is not None:
            return self.base
        raise PlanError(f"{self.loaded.where(*where)}: {ref!r} is not one of the merged models")

    def _build(self) -> VocabPlan:
        r = self.recipe
        spec = r.tokenizer
        source = r.tokenizer_from or "base"
        toks: dict[int, Any] = {}
        base_c = self.base if self.base is not None else self.reference
        toks[base_c] = load_tokenizer(self.checkpoints[base_c])
        for c in self.members:
            if c in toks:
                continue
            if tokenizer_dir(self.checkpoints[c]) is None:
                self.warnings.append(f"{self.checkpoints[c].ref} has no tokenizer; taken to be the same as "
                                     f"{self.checkpoints[base_c].ref}'s (as mergekit does)")
                toks[c] = toks[base_c]
                continue
            toks[c] = load_tokenizer(self.checkpoints[c])
        key = ("tokenizer", "source") if spec is not None else ("tokenizer_source",)
        if source == "union":
            out_tok = self._union(toks, base_c)
        elif source == "base":
            out_tok = load_tokenizer(self.checkpoints[base_c])
        else:
            out_tok = load_tokenizer(self.checkpoints[self._model(source, *key)])
        configs = dict(spec.tokens or {}) if spec is not None else {}
        existing = set(out_tok.get_vocab())
        new = [t for t in configs if t not in existing]
        if new:
            out_tok.add_tokens(new)
        vocab_out = out_tok.get_vocab()
        n = max(vocab_out.values()) + 1
        vocabs = {c: toks[c].get_vocab() for c in self.members}
        perms: dict[int, torch.Tensor] = {}
        for c in self.members:
            p = torch.full((n,), -1, dtype=torch.long)
            mv, rows = vocabs[c], self.rows[c]
            for t, i in vocab_out.items():
                j = mv.get(t)
                if j is not None and j < rows:
                    p[i] = j
            perms[c] = p
        fills = self._fills(vocab_out, perms, configs, vocabs)
        pad = spec.pad_to_multiple_of if spec is not None else None
        rows = n
        if source != "union":  # keep the source's padding rows (mergekit crops them to the tokens)
            src_c = base_c if source == "base" else self._model(source, *key)
            rows = max(n, self.rows[src_c])
        if pad:
            rows = -(-rows // pad) * pad
        own = {c: len(_id_map(vocabs[c], self.rows[c])) for c in self.members}
        identity = (not fills and rows == n and all(self.rows[c] == n and torch.equal(perms[c], torch.arange(n))
                                                    for c in self.members))
        self._set_template(out_tok)
        n_new = sum(1 for t in vocab_out if t not in vocabs[base_c])
        note = (f"vocabulary: {source} tokenizer, {n} tokens ({n_new} not in {self.checkpoints[base_c].ref}), "
                f"{rows} rows; {sum(len(v) > 0 for v in fills.values())} filled from other models, "
                f"{sum(not v for v in fills.values())} zero")
        self.warnings.append(note)
        if identity:
            return VocabPlan(None, out_tok, None, note)
        return VocabPlan(VocabAlignment(rows, n, perms, own, fills, note), out_tok, rows, note)

    def _union(self, toks: dict[int, Any], base_c: int) -> Any:
        """mergekit's union: the base tokenizer plus every other model's tokens (ordinary ones first,
        then added tokens with their settings), each model's tokens in id order."""
        ordinary: dict[str, None] = {}
        added: dict[str, Any] = {}
        for c in [base_c, *[m for m in self.members if m != base_c]]:
            tok, rows = toks[c], self.rows[c]
            dec = {i: a for i, a in tok.added_tokens_decoder.items() if i < rows}
            contents = {a.content for a in tok.added_tokens_decoder.values()}
            for t, i in sorted(tok.get_vocab().items(), key=lambda e: e[1]):
                if i < rows and t not in contents:
                    ordinary.setdefault(t)
            for _, a in sorted(dec.items()):
                added.setdefault(a.content, a)
        out = load_tokenizer(self.checkpoints[base_c])
        base_vocab = out.get_vocab()
        fresh = [t for t in ordinary if t not in added and t not in base_vocab]
        if fresh:
            out.add_tokens(fresh)
        extra = [a for t, a in added.items() if t not in base_vocab]
        if extra:
            out.add_tokens(extra)
        return out

    def _fills(self, vocab_out: dict[str, int], perms: dict[int, torch.Tensor], configs: dict[str, Any],
               vocabs: dict[int, dict[str, int]]) -> dict[int, list[tuple[int, int]]]:
        fills: dict[int, list[tuple[int, int]]] = {}
        for t, cfg in configs.items():
            where = ("tokenizer", "tokens", t)
            if not isinstance(cfg, dict):
                raise PlanError(f"{self.loaded.where(*where)}: expected a mapping with 'source' (and 'force'), "
                                f"got {cfg!r}")
            unknown = set(cfg) - {"source", "force"}
            if unknown:
                raise PlanError(f"{self.loaded.where(*where)}: unknown key(s) {sorted(unknown)}; "
                                "a token takes 'source' and 'force'")
            tid = vocab_out[t]
            src = cfg.get("source")
            if src is None:
                raise PlanError(f"{self.loaded.where(*where)}: give this token a 'source' (a model, "
                                "{kind: zero}, or {kind: model_token, model: ..., token: ...})")
            if isinstance(src, dict):
                kind = src.get("kind")
                if kind == "zero":
                    fills[tid] = []
                elif kind == "model_token":
                    c = self._model(src.get("model"), *where, "source", "model")
                    if ("token" in src) == ("token_id" in src):
                        raise PlanError(f"{self.loaded.where(*where, 'source')}: give exactly one of 'token' "
                                        "and 'token_id'")
                    j = src.get("token_id")
                    if j is None:
                        j = vocabs[c].get(src["token"])
                        if j is None:
                            raise PlanError(f"{self.loaded.where(*where, 'source', 'token')}: token "
                                            f"{src['token']!r} is not in {self.checkpoints[c].ref}'s tokenizer")
                    if not isinstance(j, int) or not 0 <= j < self.rows[c]:
                        raise PlanError(f"{self.loaded.where(*where, 'source')}: token id {j!r} is outside "
                                        f"{self.checkpoints[c].ref}'s {self.rows[c]} rows")
                    fills[tid] = [(c, j)]
                else:
                    raise PlanError(f"{self.loaded.where(*where, 'source')}: kind must be 'zero' or "
                                    f"'model_token', got {kind!r}")
            else:
                c = self._model(src, *where, "source")
                j = int(perms[c][tid])
                if j < 0:
                    raise PlanError(f"{self.loaded.where(*where, 'source')}: token {t!r} is not in "
                                    f"{self.checkpoints[c].ref}'s tokenizer")
                fills[tid] = [(c, j)]
            if cfg.get("force", False):
                for c in self.members:
                    perms[c][tid] = -1
        for t, tid in vocab_out.items():
            if t in configs:
                continue
            having = [c for c in self.members if perms[c][tid] >= 0]
            if len(having) == len(self.members):
                continue
            if len(having) == 1:
                fills[tid] = [(having[0], int(perms[having[0]][tid]))]
            elif not having:
                fills[tid] = []
            elif self.base is not None and self.base in having:
                fills[tid] = [(self.base, int(perms[self.base][tid]))]
            else:
                fills[tid] = [(c, int(perms[c][tid])) for c in having]
        return fills

    # -- chat template ------------------------------------------------------------------------
    def _template(self) -> str | None:
        t = self.recipe.chat_template
        if t is None:
            return None
        if t == "auto":
            found = [x for c in self.members if (x := chat_template(self.checkpoints[c])) is not None]
            if not found:
                self.warnings.append(f"{self.loaded.where('chat_template')}: auto, but no model has a chat "
                                     "template; none is set")
                return None
            return Counter(found).most_common(1)[0][0]
        if t in self.index and self.index[t] in self.members:
            found_t = chat_template(self.checkpoints[self.index[t]])
            if found_t is None:
                raise PlanError(f"{self.loaded.where('chat_template')}: {t} has no chat template")
            return found_t
        if t in NAMED_TEMPLATES:
            return NAMED_TEMPLATES[t]
        if "{" not in t:
            raise PlanError(f"{self.loaded.where('chat_template')}: {t!r} is neither 'auto', one of the models, "
                            f"a named template ({', '.join(NAMED_TEMPLATES)}) nor a Jinja template")
        return t

    def _set_template(self, tok: Any) -> None:
        if (t := self._template()) is not None:
            tok.chat_template = t

    def _with_template(self, tok: Any) -> Any:
        template = self._template()
        if template is None:
            return None
        src = self.index.get(self.recipe.tokenizer_from or "", self.reference)
        if tokenizer_dir(self.checkpoints[src]) is None:
            self.warnings.append(f"{self.loaded.where('chat_template')}: the tokenizer source "
                                 f"{self.checkpoints[src].ref} has no tokenizer; the chat template is not saved")
            return None
        tok = load_tokenizer(self.checkpoints[src])
        tok.chat_template = template
        return tok
