"""Building a routed bundle: experts copied (or extracted from full fine-tunes), router rows computed from
the copies, everything published at once."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moerge.errors import MoergeError
from moerge.io.publish import Publication, check_not_an_input
from moerge.io.sources import is_adapter_folder
from moerge.routing.arrow import arrow_rows, subtract_general
from moerge.routing.bundle import base_fingerprint, copy_adapter, sha256, write_spec
from moerge.routing.experts import ExpertSet, expert_names
from moerge.routing.layer import RouterOptions, describe
from moerge.version import __version__

# router rows per module (or rows and biases) from the opened experts and the number of task experts
RowsFn = Callable[[ExpertSet, int], Any]


def build_bundle(method: str, base: str | os.PathLike[str], adapters: list[str | os.PathLike[str]],
                 out: str | os.PathLike[str], *, options: RouterOptions, rows: RowsFn,
                 method_options: dict[str, Any] | None = None, general: list[str | os.PathLike[str]] = (),
                 extract_rank: int | None = None, force: bool = False,
                 build_info: dict[str, Any] | None = None) -> Path:
    """Write the bundle ``out``. ``adapters``: PEFT LoRA folders, or full fine-tuned models (extracted at
    ``extract_rank``); ``general``: GenKnowSub's general adapters. ``rows(experts, n_task)`` gives the
    router rows of every module from the opened copies; ``build_info`` (filled by it, e.g. training logs)
    goes into the spec's ``build`` record."""
    options.check()
    t0 = time.perf_counter()
    folders = [Path(a) for a in adapters]
    general_folders = [Path(g) for g in general]
    names = expert_names(folders)
    general_names = [f"general-{n}" for n in expert_names(general_folders)]
    check_not_an_input(Path(out), [Path(base), *folders, *general_folders])
    extracted: dict[str, Any] = {}
    with Publication(out, force=force) as pub:
        entries = []
        for role, group, group_names in (("task", folders, names), ("general", general_folders, general_names)):
            for folder, name in zip(group, group_names):
                dst = pub.tmp / "experts" / name
                if is_adapter_folder(folder):
                    hashes = copy_adapter(folder, dst)
                else:
                    hashes, extracted[name] = _extract(folder, base, dst, extract_rank)
                entries.append({"name": name, "role": role, "path": f"experts/{name}", "source": str(folder.resolve()),
                                "files": hashes})
        copies = [pub.tmp / e["path"] for e in entries]
        with ExpertSet(base, copies, names=names + general_names) as experts:
            router_rows = rows(experts, len(folders))
            router_rows, biases = router_rows if isinstance(router_rows, tuple) else (router_rows, None)
            modules = experts.modules
            ranks = experts.ranks()
        for e, r in zip(entries, ranks):
            e["rank"] = r
        spec = {
            "method": method, "router": describe(options), "method_options": dict(method_options or {}),
            "base": {"path": str(Path(base).resolve()), "fingerprint": base_fingerprint(base)},
            "experts": entries, "modules": modules,
            "build": {"seconds": round(time.perf_counter() - t0, 3), "extracted": extracted, **(build_info or {})},
        }
        write_spec(pub.tmp, spec, router_rows, _card(spec), biases)
        pub.commit()
    return Path(out)


def _extract(model: Path, base: str | os.PathLike[str], dst: Path, rank: int | None) -> tuple[dict[str, str], Any]:
    """A full fine-tuned expert routed through its rank-``rank`` LoRA extraction (moerge extract-lora)."""
    from moerge.extract import extract_lora

    if rank is None:
        raise MoergeError(f"{model}: is a full model, not a PEFT adapter; routing needs LoRA experts",
                          hint="pass --extract-rank R to route it through its rank-R extraction")
    report = extract_lora(model, base, dst, rank=rank)
    hashes = {name: sha256(dst / name) for name in ("adapter_config.json", "adapter_model.safetensors")}
    kept = {t: round(1.0 - d, 6) for t, d in report.tensors.items()}
    return hashes, {"rank": rank, "energy_kept": round(1.0 - report.discarded, 6), "per_module_energy_kept": kept,
                    "not_representable": sorted(report.not_representable)}


def arrow(gks: str = "none") -> RowsFn:
    """Arrow's router rows: the exact top right singular vector of each (GenKnowSub-purified) expert."""

    def rows(experts: ExpertSet, n_task: int) -> dict[str, torch.Tensor]:
        out = {}
        for module in experts.modules:
            factors = experts.factors(module)
            out[module] = arrow_rows(subtract_general(factors[:n_task], factors[n_task:], gks))[0]
        return out

    return rows


def base_model(base: str | os.PathLike[str]) -> tuple[Any, Any]:
    """The base causal LM (float32, eval) and its tokenizer, for routers trained or measured on data."""
    from moerge.io.untrusted import read_json_object
    from moerge.runtime.models import load_model

    cfg = read_json_object(Path(base) / "config.json")
    if "CausalLM" not in " ".join(cfg.get("architectures") or []):
        raise MoergeError(f"{base}: routers trained on data need a causal language model (found "
                          f"{cfg.get('architectures')})", hint="Arrow needs no data and routes any model")
    return load_model(Path(base), "decoder")


def phatgoose(base: str | os.PathLike[str], data: list[list[Any]], settings: Any, work: Path,
              logs: dict[str, Any], progress: Callable[[str, int, int, float], None] | None = None) -> RowsFn:
    """PHATGOOSE's router rows: each expert's gate vectors, trained on its own data."""
    from moerge.routing.phatgoose import all_gates

    def rows(experts: ExpertSet, n_task: int) -> dict[str, torch.Tensor]:
        model, tok = base_model(base)
        out, trained = all_gates(model, tok, experts, n_task, data, settings, work, progress)
        logs.update(trained)
        return out

    return rows


def smear(base: str | os.PathLike[str], data: list[list[Any]], settings: Any, options: Any, logs: dict[str, Any],
          progress: Callable[[str, int, int, float], None] | None = None) -> RowsFn:
    """SMEAR's router rows and biases, trained on the union of the experts' data over the frozen experts."""
    from moerge.routing.smear import train_router

    def rows(experts: ExpertSet, n_task: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model, tok = base_model(base)
        out, biases, log = train_router(model, tok, experts, n_task, data, settings, options,
                                        (lambda k, n, loss: progress("router", k, n, loss)) if progress else None)
        logs["router_training"] = log
        return out, biases

    return rows


def average_activation(base: str | os.PathLike[str], data: list[list[Any]], max_length: int,
                       batch_size: int = 8) -> RowsFn:
    """The average-activation baseline (PHATGOOSE's): each expert's router row in a module is the mean input
    of that module (every real token) over the expert's own examples, run through the base model."""

    def rows(experts: ExpertSet, n_task: int) -> dict[str, torch.Tensor]:
        model, tok = base_model(base)
        means = [mean_inputs(model, tok, experts.modules, samples, max_length, batch_size)
                 for samples in data[:n_task]]
        return {m: torch.stack([x[m] for x in means]) for m in experts.modules}

    return rows


def mean_inputs(model: Any, tok: Any, modules: list[str], samples: list[Any], max_length: int,
                batch_size: int) -> dict[str, torch.Tensor]:
    """Each module's input averaged over the real tokens of ``samples`` (float32)."""
    from moerge.routing.data import encode

    named = dict(model.named_modules())
    sums = {m: torch.zeros(named[m].in_features, dtype=torch.float64) for m in modules}
    state: dict[str, Any] = {"mask": None, "tokens": 0}

    def hook(name: str) -> Callable[..., None]:
        def fn(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            keep = state["mask"].reshape(-1).bool()
            sums[name] += args[0].reshape(-1, args[0].shape[-1])[keep].double().sum(0)
        return fn

    hooks = [named[m].register_forward_pre_hook(hook(m)) for m in modules]
    try:
        with torch.no_grad():
            for i in range(0, len(samples), batch_size):
                batch = encode(tok, samples[i:i + batch_size], max_length, torch.device("cpu"))
                state["mask"] = batch["attention_mask"]
                state["tokens"] += int(batch["attention_mask"].sum())
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    return {m: (v / max(state["tokens"], 1)).float() for m, v in sums.items()}


def _card(spec: dict[str, Any]) -> str:
    experts = "\n".join(f"- `{e['name']}` ({e['role']}, rank {e['rank']}): from `{e['source']}`"
                        for e in spec["experts"])
    extracted = spec["build"]["extracted"]
    extra = "".join(f"\n- `{n}` was a full fine-tune, routed through its rank-{x['rank']} LoRA extraction "
                    f"(energy kept {x['energy_kept']:.1%})" for n, x in extracted.items())
    return f"""---
library_name: transformers
tags: [moerge, routing, {spec['method']}]
---
# A routed model ({spec['method']})

Built by moerge {__version__} over the base model `{spec['base']['path']}`: {len(spec['modules'])}
linear modules each route every token among these experts:

{experts}{extra}

Router: `{json.dumps(spec['router'])}`; method options: `{json.dumps(spec['method_options'])}`.

Load it with `moerge.load_routed("this folder")` (an ordinary `transformers` model), score it with
`moerge eval THIS_FOLDER --task ...`, or load any one expert alone with PEFT from `experts/<name>`.
`moerge_routing.json` holds every option; `router.safetensors` holds the router rows.
"""


# methods whose router row of an expert depends on that expert alone (a subset of the experts keeps its rows)
PER_EXPERT_ROWS = ("arrow", "phatgoose", "avg_act")


def derive_bundle(src: str | os.PathLike[str], out: str | os.PathLike[str], *, keep: list[str] | None = None,
                  router: dict[str, Any] | None = None, force: bool = False) -> Path:
    """A bundle from another without building anything again: the task experts ``keep`` (in that order;
    None: all) with their router rows, and ``router`` options changed (``top_k``, ``temperature``, ``mix``,
    ``score``, ``renorm_eps``). A subset needs a method whose rows are per expert (Arrow, PHATGOOSE,
    average activation): SMEAR's router was trained jointly over its experts and is refused."""
    from moerge.routing.bundle import read_bundle
    from moerge.routing.load import router_options

    bundle = read_bundle(src)
    task = [e for e in bundle.spec["experts"] if e.get("role", "task") == "task"]
    general = [e for e in bundle.spec["experts"] if e.get("role", "task") != "task"]
    names = [e["name"] for e in task]
    keep = list(names) if keep is None else list(keep)
    unknown = [k for k in keep if k not in names]
    if unknown or not keep or len(set(keep)) != len(keep):
        raise MoergeError(f"{src}: cannot keep {', '.join(unknown) or keep!r}: its experts are {', '.join(names)}"
                          + ("" if keep else " (keep at least one)"))
    if keep != names and bundle.method not in PER_EXPERT_ROWS:
        raise MoergeError(f"{src}: a {bundle.method} router was trained over all its experts together; a subset "
                          "would route with rows learned for another set",
                          hint=f"train it again on the subset (subsets work for {', '.join(PER_EXPERT_ROWS)})")
    allowed = {"top_k", "temperature", "mix", "score", "renorm_eps"}
    if set(router or {}) - allowed:
        raise MoergeError(f"router options {sorted(set(router or {}) - allowed)} cannot be changed",
                          hint=f"changeable: {', '.join(sorted(allowed))}")
    merged = {**bundle.router, **(router or {})}
    options = RouterOptions(score=str(merged["score"]), top_k=int(merged["top_k"]),
                            temperature=float(merged["temperature"]), mix=str(merged["mix"]),
                            granularity=router_options(bundle).granularity, renorm_eps=float(merged["renorm_eps"]))
    try:
        options.check()
    except ValueError as e:
        raise MoergeError(str(e)) from None
    order = [names.index(k) for k in keep]
    src_path = Path(src)
    check_not_an_input(Path(out), [src_path])
    with Publication(out, force=force) as pub:
        entries = [task[i] for i in order] + general
        for e in entries:
            for fname in e["files"]:
                dst = pub.tmp / e["path"] / fname
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src_path / e["path"] / fname, dst)
                if sha256(dst) != e["files"][fname]:
                    raise MoergeError(f"{src_path / e['path'] / fname}: changed while it was copied")
        rows = {m: r[order] for m, r in bundle.rows.items()}
        biases = {m: b[order] for m, b in bundle.biases.items()}
        spec = {k: v for k, v in bundle.spec.items() if k not in ("format", "version", "moerge")}
        spec |= {"router": describe(options), "experts": entries,
                 "derived": {"from": str(src_path.resolve()), "kept": keep, "router": dict(router or {})}}
        write_spec(pub.tmp, spec, rows, _card(spec), biases or None)
        pub.commit()
    return Path(out)
