"""A routed bundle as an ordinary ``transformers`` model: its base, with each routed module's ``nn.Linear``
replaced by a :class:`moerge.routing.layer.RoutedLinear` over the bundle's experts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moerge.errors import CheckpointError
from moerge.routing.arrow import subtract_general
from moerge.routing.bundle import Bundle, base_fingerprint, read_bundle
from moerge.routing.experts import ExpertSet
from moerge.routing.layer import RoutedLinear, RouterOptions, stack_experts


def router_options(bundle: Bundle) -> RouterOptions:
    r = bundle.router
    try:
        options = RouterOptions(score=str(r.get("score", "abs_dot")), top_k=int(r.get("top_k", 3)),
                                temperature=float(r.get("temperature", 1.0)), mix=str(r.get("mix", "outputs")),
                                granularity=str(r.get("granularity", "token")),
                                renorm_eps=float(r.get("renorm_eps", 0.0)))
        options.check()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{bundle.folder / 'moerge_routing.json'}: router options: {e}") from None
    return options


def resolve_base(bundle: Bundle, base: str | os.PathLike[str] | None) -> str:
    """The base model to build on: ``base`` or the bundle's, checked against the bundle's fingerprint."""
    path = str(base) if base is not None else bundle.base_path
    if not Path(path).exists():
        raise CheckpointError(f"{bundle.folder}: its base model {path} is not there",
                              hint="pass the base model's folder (--base / base=)")
    want = bundle.spec["base"].get("fingerprint")
    if want and base_fingerprint(path) != want:
        raise CheckpointError(f"{path}: is not the base model {bundle.folder} was built on (another config or "
                              "tensor table)", hint="pass the base the experts were trained on")
    return path


def model_class(config: dict[str, Any]) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    arch = " ".join(config.get("architectures") or [])
    return AutoModelForCausalLM if "CausalLM" in arch else AutoModel


def attach(model: nn.Module, bundle: Bundle, base: str, options: RouterOptions | None = None) -> nn.Module:
    """Replace the bundle's modules of ``model`` (the base, loaded) by routed layers, in place."""
    options = options or router_options(bundle)
    tasks, general = bundle.experts("task"), bundle.experts("general")
    gks = str(bundle.spec.get("method_options", {}).get("gks", "none"))
    folders = [p for _, p in tasks + general]
    names = [n for n, _ in tasks + general]
    with ExpertSet(base, folders, names=names) as experts:
        if sorted(experts.modules) != sorted(bundle.modules):
            raise CheckpointError(f"{bundle.folder}: its experts adapt other modules than moerge_routing.json lists")
        return attach_experts(model, experts, len(tasks), bundle.rows, options, gks=gks, biases=bundle.biases)


def attach_experts(model: nn.Module, experts: ExpertSet, n_task: int, rows: dict[str, torch.Tensor],
                   options: RouterOptions, *, gks: str = "none",
                   biases: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Replace every module the experts adapt by a routed layer over the first ``n_task`` experts (the
    others: GenKnowSub's general adapters), with router ``rows`` (and ``biases``) per module; in place."""
    modules = dict(model.named_modules())
    for name in experts.modules:
        target = _module(modules, name, model)
        factors = experts.factors(name)
        a_cat, b_cat, rank = stack_experts(subtract_general(factors[:n_task], factors[n_task:], gks))
        layer = RoutedLinear(target, a_cat, b_cat, rows[name], options, rank, (biases or {}).get(name))
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer)
    return model


def track_attention_mask(model: nn.Module) -> None:
    """Hooks that hand each forward's ``attention_mask`` to the routed layers (:func:`token_mask`), so
    per-example routing pools over real tokens and recorders skip padding."""
    from moerge.routing.layer import MASKS

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        MASKS.append(kwargs.get("attention_mask"))

    def after(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        MASKS.pop()

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True, always_call=True)


def _module(modules: dict[str, nn.Module], name: str, model: nn.Module) -> nn.Linear:
    """The linear module ``name`` of the loaded model (bundle names are the checkpoint's tensor prefixes;
    a bare encoder loaded with AutoModel may lack the architecture's prefix)."""
    found = modules.get(name)
    if found is None and "." in name:
        found = modules.get(name.split(".", 1)[1])
    if not isinstance(found, nn.Linear):
        kind = "missing" if found is None else type(found).__name__
        raise CheckpointError(f"module {name!r} of {type(model).__name__} is {kind}, not a linear layer")
    return found


def load_routed(folder: str | os.PathLike[str], *, device: str | torch.device | None = None,
                base: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32,
                options: RouterOptions | None = None) -> Any:
    """The routed model of a bundle: a ``transformers`` ``PreTrainedModel`` (eval mode) whose routed modules
    are :class:`RoutedLinear`; ``options`` overrides the bundle's router options (e.g. another top-k)."""
    from moerge.runtime.models import check_files

    bundle = read_bundle(folder)
    path = resolve_base(bundle, base)
    check_files(Path(path))
    from moerge.io.untrusted import read_json_object

    cls = model_class(read_json_object(Path(path) / "config.json"))
    model = cls.from_pretrained(path, dtype=dtype)
    attach(model, bundle, path, options)
    track_attention_mask(model)
    model.moerge_routing = bundle.spec
    if device is not None:
        model.to(device)
    return model.eval()
