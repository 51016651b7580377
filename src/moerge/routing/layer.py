"""The routed LoRA layer: a base linear layer plus E frozen LoRA experts and a router over them.

Per token t and module, with x the module's input, ΔW_e = s_e · B_e · A_e the experts and w_t the routing
weights (each row sums to 1):

* ``mix: outputs`` (PEFT's Arrow, the PHATGOOSE reference): ``y = W x + Σ_e w_te · ΔW_e x``;
* ``mix: parameters`` (mttl's default for Arrow, ``lora_merge_after=False``): ``y = W x + (Σ_e w_te s_e B_e)
  (Σ_e w_te A_e) x``, with the cross terms s_i B_i A_j that this implies.

Both run as two matrix products over the experts' stacked factors (``A_cat``: [E·R, in]; ``B_cat``: [out,
E·R], each expert's scale folded into its B, ranks zero-padded to the largest R), so the cost is that of one
LoRA of rank E·R whatever k is, with no per-expert Python loop. Router scores are computed in float32.

Routers (``score``):

* ``abs_dot``: ``|x · p_e|`` on the raw input (PEFT's and mttl's Arrow; PEFT's docs call it a cosine, its
  code does not normalise x, so the effective temperature is T/‖x‖);
* ``abs_cos``: ``|x · p_e| / ‖x‖`` (the cosine the docs describe);
* ``ln_corr``: ``LN(x) · LN(v_e) / √d`` with a LayerNorm without affine, eps 1e-5 (PHATGOOSE; = √d · the
  Pearson correlation of x and v_e);
* ``dot_sqrt_d``: ``x · p_e / √d`` (mttl's average-activation router).

then the top-k logits (all of them for ``top_k`` ≥ E), a softmax over them with temperature T, and zero
weight elsewhere. Softmax over the top-k logits equals the reference PHATGOOSE's softmax over all experts,
top-k, renormalised, up to its 1e-6 eps (``renorm_eps`` reproduces it exactly).

* ``ln_dot``: ``LN(x) · w_e + b_e`` (a learned router: SMEAR's, whose affine LayerNorm folds into w and b).

``granularity: example`` (SMEAR) routes by the mean of the module's input over the sequence's real tokens
(the attention mask, set by :func:`token_mask` or by the hooks :func:`moerge.routing.load.load_routed`
adds). For a causal model the mean runs over the tokens *up to* each position, so routing never reads the
future, a prompt's last token is routed by the mean over the whole prompt, and generation with a KV cache
routes exactly as a full forward (the layer keeps each sequence's running sum between calls). SMEAR's
reference (an encoder-decoder) averages the whole input, padding included.

A ``fixed`` weight vector (LoraHub's search, a static mixture) replaces the router: every token gets it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

SCORES = ("abs_dot", "abs_cos", "ln_corr", "dot_sqrt_d", "ln_dot")
MIXES = ("outputs", "parameters")
GRANULARITIES = ("token", "example")


@dataclass(frozen=True)
class RouterOptions:
    """How a routed layer turns a module input into weights over its experts."""

    score: str = "abs_dot"
    top_k: int = 3
    temperature: float = 1.0
    mix: str = "outputs"
    granularity: str = "token"
    renorm_eps: float = 0.0  # PHATGOOSE reference: softmax over all, top-k, w / (Σw + 1e-6)

    def check(self) -> None:
        for value, allowed, what in ((self.score, SCORES, "score"), (self.mix, MIXES, "mix"),
                                     (self.granularity, GRANULARITIES, "granularity")):
            if value not in allowed:
                raise ValueError(f"router {what} must be one of {', '.join(allowed)}; got {value!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1; got {self.top_k}")
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a positive number; got {self.temperature}")
        if self.renorm_eps < 0:
            raise ValueError(f"renorm_eps must be at least 0; got {self.renorm_eps}")


def layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension without affine parameters (PHATGOOSE's ``LN``)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def scores(x: torch.Tensor, rows: torch.Tensor, score: str) -> torch.Tensor:
    """Router logits [T, E] of inputs x [T, d] against router rows [E, d] (float32).
    ``rows`` for ``ln_corr`` are the raw gate vectors (normalised here)."""
    x = x.float()
    if score == "abs_dot":
        return (x @ rows.T).abs()
    if score == "abs_cos":
        return (x @ rows.T).abs() / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if score == "ln_corr":
        return layer_norm(x) @ layer_norm(rows).T / math.sqrt(x.shape[-1])
    if score == "dot_sqrt_d":
        return x @ rows.T / math.sqrt(x.shape[-1])
    if score == "ln_dot":
        return layer_norm(x) @ rows.T
    raise ValueError(f"unknown router score {score!r}")


def route(logits: torch.Tensor, top_k: int, temperature: float, renorm_eps: float = 0.0) -> torch.Tensor:
    """Weights [T, E]: softmax over each row's top-k logits / temperature, zero elsewhere."""
    n = logits.shape[-1]
    if renorm_eps > 0:  # the reference PHATGOOSE order: softmax over all experts, keep top-k, renormalise
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_k >= n:
            return probs / (probs.sum(-1, keepdim=True) + renorm_eps)
        top, idx = probs.topk(top_k, dim=-1)
        return torch.zeros_like(probs).scatter_(-1, idx, top / (top.sum(-1, keepdim=True) + renorm_eps))
    if top_k >= n:
        return torch.softmax(logits / temperature, dim=-1)
    top, idx = logits.topk(top_k, dim=-1)
    return torch.zeros_like(logits).scatter_(-1, idx, torch.softmax(top / temperature, dim=-1))


class RoutingRecorder:
    """Sums of routing weights per expert and of routed tokens, for ``route inspect`` and the evaluation's
    routing-mass diagnostics (float64; tokens outside :func:`token_mask` are not counted)."""

    def __init__(self, n_experts: int) -> None:
        self.mass = torch.zeros(n_experts, dtype=torch.float64)
        self.top1 = torch.zeros(n_experts, dtype=torch.float64)
        self.tokens = 0

    def add(self, weights: torch.Tensor, keep: torch.Tensor | None) -> None:
        w = weights.detach().to("cpu", torch.float64)
        if keep is not None:
            w = w[keep.reshape(-1).to("cpu")]
        self.mass += w.sum(0)
        self.top1 += torch.bincount(w.argmax(-1), minlength=w.shape[-1]).double() if len(w) else 0
        self.tokens += w.shape[0]


# the attention masks of the forwards in progress, innermost last (set by token_mask and by the hooks that
# load_routed puts on the model)
MASKS: list[torch.Tensor | None] = []


@contextlib.contextmanager
def token_mask(mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, routed layers know which tokens are real (the batch's attention mask [B, L]): the
    example granularity pools over them and recorders count only them."""
    MASKS.append(mask)
    try:
        yield
    finally:
        MASKS.pop()


class RoutedLinear(nn.Linear):
    """``nn.Linear`` (its weight and bias are the base layer's, under the same names, so the model's state
    dict is the base model's) plus frozen LoRA experts and a router. The experts and router rows are
    non-persistent buffers: they come from the bundle, never from a checkpoint of the routed model."""

    def __init__(self, base: nn.Linear, a_cat: torch.Tensor, b_cat: torch.Tensor, router_rows: torch.Tensor,
                 options: RouterOptions, rank: int, router_bias: torch.Tensor | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        n = router_rows.shape[0]
        if a_cat.shape != (n * rank, self.in_features) or b_cat.shape != (self.out_features, n * rank):
            raise ValueError(f"expert factors of shapes {list(a_cat.shape)} / {list(b_cat.shape)} do not fit "
                             f"{n} experts of rank {rank} on a {self.out_features}x{self.in_features} layer")
        options.check()
        dtype, device = base.weight.dtype, base.weight.device
        self.register_buffer("a_cat", a_cat.to(device, dtype), persistent=False)
        self.register_buffer("b_cat", b_cat.to(device, dtype), persistent=False)
        self.register_buffer("router_rows", router_rows.to(device, torch.float32), persistent=False)
        bias = torch.zeros(n) if router_bias is None else router_bias
        self.register_buffer("router_bias", bias.to(device, torch.float32), persistent=False)
        self.options, self.rank, self.n_experts = options, rank, n
        self.recorder: RoutingRecorder | None = None
        self.fixed: torch.Tensor | None = None  # [E]: every token gets these weights
        self.expert_dropout = 0.0  # training only: each expert's weight dropped with this probability
        self._prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # running sums for the example mean

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights [T, E] for the flattened (or pooled) inputs x [T, in]."""
        if self.fixed is not None:
            return self.fixed.to(x.device, torch.float32).expand(x.shape[0], -1)
        o = self.options
        logits = scores(x, self.router_rows, o.score) + self.router_bias
        if self.training and self.expert_dropout > 0:
            drop = torch.rand(logits.shape, device=logits.device) < self.expert_dropout
            logits = logits.masked_fill(drop & ~drop.all(-1, keepdim=True), float("-inf"))
        return route(logits, o.top_k, o.temperature, o.renorm_eps)

    def pooled(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[B, L, in]: at each position the mean module input over the sequence's real tokens up to it."""
        b, length, _ = x.shape
        full = mask if mask is not None and mask.dim() == 2 and mask.shape[0] == b and mask.shape[1] >= length \
            else torch.ones(b, length, device=x.device)
        m = full[:, -length:].to(x.device, torch.float32).unsqueeze(-1)
        sums, counts = (x.float() * m).cumsum(1), m.cumsum(1)
        if full.shape[1] > length and self._prefix is not None and self._prefix[0].shape[0] == b:
            sums, counts = sums + self._prefix[0].unsqueeze(1), counts + self._prefix[1].unsqueeze(1)
        self._prefix = (sums[:, -1].detach().clone(), counts[:, -1].detach().clone())  # not views: they would keep
        # the whole [B, L, d] running sum of every layer alive
        return sums / counts.clamp_min(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        shape = x.shape
        mask = MASKS[-1] if MASKS else None
        if self.options.granularity == "example" and x.dim() == 3 and self.fixed is None:
            w = self.weights(self.pooled(x, mask).reshape(-1, shape[-1]))
        else:
            w = self.weights(x.reshape(-1, shape[-1]))
        if self.recorder is not None:
            keep = mask[:, -shape[-2]:].bool() if mask is not None and x.dim() == 3 and mask.dim() == 2 \
                and mask.shape[0] == shape[0] and mask.shape[1] >= shape[-2] else None
            self.recorder.add(w, keep)
        return y + self.delta(x.reshape(-1, shape[-1]), w.to(x.dtype)).reshape(*shape[:-1], self.out_features)

    def delta(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Σ_e w_te ΔW_e x_t (``outputs``) or (Σ_e w_te s_e B_e)(Σ_e w_te A_e) x_t (``parameters``)."""
        t, n, r = x.shape[0], self.n_experts, self.rank
        z = (x @ self.a_cat.T).view(t, n, r)  # A_e x_t for every expert
        if self.options.mix == "outputs":
            u = z * w.unsqueeze(-1)
        else:
            h = (z * w.unsqueeze(-1)).sum(1)  # (Σ_e w_te A_e) x_t
            u = w.unsqueeze(-1) * h.unsqueeze(1)
        return u.reshape(t, n * r) @ self.b_cat.T

    def extra_repr(self) -> str:
        o = self.options
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={self.n_experts}, "
                f"rank={self.rank}, score={o.score}, top_k={o.top_k}, temperature={o.temperature}, mix={o.mix}")


def stack_experts(factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A_cat [E·R, in], B_cat [out, E·R], R) from each expert's (A [r_e, in], B [out, r_e], scale), ranks
    zero-padded to the largest (a zero row of A and column of B add nothing), scales folded into B."""
    rank = max(a.shape[0] for a, _, _ in factors)
    d_in, d_out = factors[0][0].shape[1], factors[0][1].shape[0]
    a_cat = torch.zeros(len(factors) * rank, d_in, dtype=torch.float32)
    b_cat = torch.zeros(d_out, len(factors) * rank, dtype=torch.float32)
    for e, (a, b, scale) in enumerate(factors):
        r = a.shape[0]
        a_cat[e * rank:e * rank + r] = a.float()
        b_cat[:, e * rank:e * rank + r] = b.float() * scale
    return a_cat, b_cat, rank


def routed_layers(model: nn.Module) -> dict[str, RoutedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, RoutedLinear)}


def record(model: nn.Module, on: bool = True) -> dict[str, RoutingRecorder]:
    """Attach (or detach, ``on=False``) a fresh recorder to every routed layer; returns them by module."""
    out: dict[str, RoutingRecorder] = {}
    for name, layer in routed_layers(model).items():
        layer.recorder = RoutingRecorder(layer.n_experts) if on else None
        if on:
            out[name] = layer.recorder  # type: ignore[assignment]
    return out


def describe(options: RouterOptions) -> dict[str, Any]:
    return {"score": options.score, "top_k": options.top_k, "temperature": options.temperature,
            "mix": options.mix, "granularity": options.granularity, "renorm_eps": options.renorm_eps}
