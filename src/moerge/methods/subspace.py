"""Merging in singular-vector subspaces: TSV-M, Iso-C, Iso-CTS and KnOTS.

Each works on one 2-D weight at a time, whole (the executor hands these
mergers every input as one block, budgeted as such), on the task vectors
τᵢ = wᵢ·(θᵢ − θ₀) in ``svd_dtype`` (float32, or float64; torch's own threads use
every core). Every other tensor — biases, norms, any tensor a filter marks
``exclude: true`` — takes the rule the reference codes use for them: the mean of
the task vectors, λ·(1/T)·Σ τᵢ (task arithmetic at λ/T).

Conventions (docs/methods.md has the table):

* Directions with no support carry no information (LAPACK returns arbitrary
  vectors for a zero singular value): a task vector that is exactly zero adds
  no directions, and ``rank_rtol > 0`` also drops directions with a singular value
  at or below ``rank_rtol`` × the largest. At ``rank_rtol: 0`` (the default)
  every other direction is kept, as the references keep them.
* "Orthogonalise" is the polar factor U·Vᵀ of a thin SVD (the nearest matrix
  with orthonormal columns), as the references compute it.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

from moerge.methods.base import LAMBDA, WEIGHT, Param, register
from moerge.methods.protocol import TensorMerger

SVD_DTYPE = Param("svd_dtype", str, "float32", "precision of the decompositions", choices=("float32", "float64"),
                  gradient=False, constant=True)
RANK_RTOL = Param("rank_rtol", float, 0.0, "drop directions whose singular value is <= this fraction of the "
                  "largest (0: keep all but those of an all-zero matrix, as the reference code does)",
                  low=0.0, high=1.0, high_open=True, gradient=False, constant=True)
EXCLUDE = Param("exclude", bool, False, "give this tensor the rule of 1-D tensors (λ·mean of the task vectors), "
                "like the reference codes' exclude_keys; set it with a filter", gradient=False)
COMMON = (WEIGHT, LAMBDA, EXCLUDE, SVD_DTYPE, RANK_RTOL)


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD, singular values descending. A wide matrix is decomposed through its transpose (the same
    factors; LAPACK's divide and conquer is 2-3× slower on wide inputs than on tall ones here)."""
    if x.shape[-2] < x.shape[-1]:
        u, s, vh = torch.linalg.svd(x.mT, full_matrices=False)
        return vh.mT, s, u.mT
    return torch.linalg.svd(x, full_matrices=False)


def polar(x: torch.Tensor) -> torch.Tensor:
    """The polar factor U·Vᵀ of x = U·S·Vᵀ: the nearest matrix with orthonormal columns (or rows)."""
    u, _, vh = svd(x)
    return u @ vh


def total(taus: list[torch.Tensor]) -> torch.Tensor:
    """Σ τᵢ, accumulated in one new tensor (not a stack of T copies)."""
    out = taus[0].clone()
    for t in taus[1:]:
        out.add_(t)
    return out


def top_triplets(x: torch.Tensor, k: int, rtol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (at most) ``k`` leading supported singular triplets of ``x``: U[:, :k], S[:k], Vᵀ[:k]."""
    u, s, vh = svd(x)
    keep = min(k, supported(s, rtol))
    return u[:, :keep], s[:keep], vh[:keep]


def supported(s: torch.Tensor, rtol: float) -> int:
    """How many leading singular values count: none for an all-zero matrix, those above rtol·max otherwise."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    if rtol == 0.0:
        return s.numel()
    return int((s > rtol * s[0]).sum())


class SubspaceMerger(TensorMerger):
    """Whole-tensor merger: θ₀ + :meth:`merge_matrix` of the task vectors for 2-D tensors,
    θ₀ + λ·mean(wᵢ·τᵢ) for the rest."""

    whole_block = True

    def __init__(self, shape: tuple[int, ...], weight: list[float], lam: float, exclude: bool,
                 svd_dtype: str) -> None:
        self.shape = shape
        self.weight = weight
        self.lam = lam
        self.matrix = len(shape) == 2 and not exclude and min(shape) > 0
        self.dtype = getattr(torch, svd_dtype)

    @abstractmethod
    def merge_matrix(self, taus: list[torch.Tensor]) -> torch.Tensor:
        """The merged task vector of a 2-D tensor from the raw τᵢ = θᵢ − θ₀ (weights and λ applied here)."""

    def weighted(self, taus: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t * w if w != 1.0 else t for t, w in zip(taus, self.weight)]

    def emit(self, start, base, models) -> torch.Tensor:
        assert start == 0 and base is not None
        base = base.to(self.dtype)
        taus = []
        for k, m in enumerate(models):
            tau = m.to(self.dtype) - base
            if not bool(torch.isfinite(tau).all()):
                raise ValueError(f"model {k + 1}'s task vector holds NaN/Inf; the decompositions need finite inputs")
            taus.append(tau)
        if self.matrix:
            try:
                merged = self.merge_matrix([t.view(self.shape) for t in taus]).reshape(-1)
            except torch.linalg.LinAlgError as err:  # e.g. an SVD that does not converge
                raise ValueError(f"the decomposition failed ({err}); try svd_dtype: float64") from None
        else:
            merged = total(self.weighted(taus)) * (self.lam / len(taus))
        return (base + merged).to(torch.float32)


# -- TSV-M ----------------------------------------------------------------------------------------
class TsvMerger(SubspaceMerger):
    def __init__(self, shape, weight, lam, exclude, svd_dtype, rank_rtol: float) -> None:
        super().__init__(shape, weight, lam, exclude, svd_dtype)
        self.rtol = rank_rtol
        if self.matrix and min(shape) // len(weight) == 0:
            raise ValueError(f"tsv_m keeps ⌊min(shape)/T⌋ = ⌊{min(shape)}/{len(weight)}⌋ = 0 singular vectors per "
                             "model of this tensor; give it `exclude: true` (the mean) or merge fewer models")

    def merge_matrix(self, taus: list[torch.Tensor]) -> torch.Tensor:
        return tsv_merge(self.weighted(taus), self.rtol) * self.lam


def tsv_merge(taus: list[torch.Tensor], rtol: float = 0.0) -> torch.Tensor:
    """Σ of each task's top-⌊r/T⌋ singular triplets, their U and V orthogonalised together."""
    k = min(taus[0].shape) // len(taus)
    us, ss, vs = zip(*(top_triplets(tau, k, rtol) for tau in taus))
    s = torch.cat(ss)
    if s.numel() == 0:
        return torch.zeros_like(taus[0])
    return (polar(torch.cat(us, 1)) * s) @ polar(torch.cat(vs, 0))


@register(
    "tsv_m",
    params=COMMON,
    summary="per matrix, each task vector's top 1/T singular vectors, orthogonalised across tasks "
    "(Task Singular Vectors: Merge)",
    citation="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging "
    "(CVPR 2025, arXiv:2412.00081); reference code github.com/AntoAndGar/task_singular_vectors, FusionBench",
    needs_base=True,
    whole_tensor=lambda params: True,
)
def tsv_m(shape: tuple[int, ...], *, weight: list[float], lam: float, exclude: bool, svd_dtype: str,
          rank_rtol: float) -> TsvMerger:
    """θ₀ + λ·polar([U₁,k … U_T,k])·diag(S)·polar([V₁,k … V_T,k])ᵀ, k = ⌊min(m, n)/T⌋."""
    return TsvMerger(shape, weight, lam, exclude, svd_dtype, rank_rtol)


# -- Iso-C and Iso-CTS -----------------------------------------------------------------------------
class IsoMerger(SubspaceMerger):
    def __init__(self, shape, weight, lam, exclude, svd_dtype, rank_rtol: float,
                 common_space_fraction: float | None) -> None:
        super().__init__(shape, weight, lam, exclude, svd_dtype)
        self.rtol = rank_rtol
        self.fraction = common_space_fraction

    def merge_matrix(self, taus: list[torch.Tensor]) -> torch.Tensor:
        taus = self.weighted(taus)
        if self.fraction is None:
            return iso_c_merge(taus, self.rtol) * self.lam
        return iso_cts_merge(taus, self.fraction, self.rtol) * self.lam


def iso_c_merge(taus: list[torch.Tensor], rtol: float = 0.0) -> torch.Tensor:
    """The sum of the task vectors with its spectrum flattened to its mean singular value."""
    u, s, vh = svd(total(taus))
    keep = supported(s, rtol)
    if keep == 0:
        return torch.zeros_like(taus[0])
    return (u[:, :keep] * s[:keep].mean()) @ vh[:keep]


def iso_cts_split(r: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """(common directions, directions per task) of a rank-r space, as the reference code rounds them:
    common = ⌊r·f⌋ first, then the rest rounded (half to even) to a multiple of T; never more than r."""
    common = int(r * fraction)
    per_task = round((r - common) / n_tasks)
    while per_task * n_tasks > r:  # many tasks on a small matrix: the reference would slice with a negative index
        per_task -= 1
    return r - per_task * n_tasks, per_task


def iso_cts_merge(taus: list[torch.Tensor], fraction: float, rtol: float = 0.0) -> torch.Tensor:
    """Common subspace of the sum plus each task's own top directions outside it, orthogonalised, isotropic."""
    r = min(taus[0].shape)
    common, per_task = iso_cts_split(r, len(taus), fraction)
    uc, sc, vc = top_triplets(total(taus), common, rtol)
    # each task's own top directions in the part of τᵢ outside the common subspace
    own = [top_triplets(tau - uc @ (uc.T @ tau), per_task, rtol) for tau in taus] if per_task else []
    us, ss, vs = zip(*own) if own else ((), (), ())
    s_all = torch.cat([*ss, sc])
    if s_all.numel() == 0:
        return torch.zeros_like(taus[0])
    uu = polar(torch.cat([*us, uc], 1))
    vv = polar(torch.cat([*vs, vc], 0))
    return (uu * s_all.mean()) @ vv


@register(
    "iso_c",
    params=COMMON,
    summary="per matrix, the sum of the task vectors with a flat (isotropic) spectrum: every singular value "
    "set to their mean",
    citation="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces (ICML 2025, arXiv:2502.04959); reference code github.com/danielm1405/iso-merging, FusionBench",
    needs_base=True,
    whole_tensor=lambda params: True,
)
def iso_c(shape: tuple[int, ...], *, weight: list[float], lam: float, exclude: bool, svd_dtype: str,
          rank_rtol: float) -> IsoMerger:
    """θ₀ + λ·mean(S)·U·Vᵀ where Σ τᵢ = U·S·Vᵀ."""
    return IsoMerger(shape, weight, lam, exclude, svd_dtype, rank_rtol, None)


@register(
    "iso_cts",
    params=(*COMMON,
            Param("common_space_fraction", float, 0.8, "share of the directions taken from the sum's common "
                  "subspace; the rest are split equally among the tasks", low=0.0, high=1.0, gradient=False)),
    summary="per matrix, the common subspace of the summed task vectors plus each task's own top directions "
    "outside it, orthogonalised, with a flat spectrum",
    citation="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces (ICML 2025, arXiv:2502.04959); reference code github.com/danielm1405/iso-merging, FusionBench",
    needs_base=True,
    whole_tensor=lambda params: True,
)
def iso_cts(shape: tuple[int, ...], *, weight: list[float], lam: float, exclude: bool, svd_dtype: str,
            rank_rtol: float, common_space_fraction: float) -> IsoMerger:
    """θ₀ + λ·mean(S)·polar([U_task…, U_common])·polar([V_task…, V_common])ᵀ."""
    return IsoMerger(shape, weight, lam, exclude, svd_dtype, rank_rtol, common_space_fraction)


# -- KnOTS ----------------------------------------------------------------------------------------
KNOTS_INNER = ("ties", "dare_ties", "task_arithmetic")


def knots_basis(taus: list[torch.Tensor], eps: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(U, [S·V₁ᵀ, …, S·V_Tᵀ]) of the column-wise concatenation [τ₁ … τ_T] = U·S·[V₁ᵀ … V_Tᵀ], keeping the
    singular values above ``eps``. Computed from the smaller Gram matrix of the concatenation (the
    concatenation itself is never formed): S·Vᵢᵀ = Uᵀ·τᵢ."""
    m, n = taus[0].shape
    if m <= n * len(taus):
        gram = torch.zeros(m, m, dtype=taus[0].dtype, device=taus[0].device)
        for t in taus:
            gram.addmm_(t, t.T)
        evals, evecs = torch.linalg.eigh(gram)  # ascending
        keep = evals > eps * eps
        u = evecs[:, keep].flip(1)
        return u, [u.T @ t for t in taus]
    # tall: the concatenation's right singular vectors from its column Gram, block by block
    cols = torch.cat(taus, 1)
    evals, evecs = torch.linalg.eigh(cols.T @ cols)
    keep = evals > eps * eps
    v = evecs[:, keep].flip(1)
    s = evals[keep].flip(0).sqrt()
    u = (cols @ v) / s
    sv = (v * s).T  # S·Vᵀ, split into the tasks' column blocks
    return u, list(torch.split(sv, n, dim=1))


class KnotsMerger(SubspaceMerger):
    def __init__(self, shape, weight, lam, exclude, svd_dtype, density: list[float], merge: str, eps: float,
                 seed: int) -> None:
        super().__init__(shape, weight, lam, exclude, svd_dtype)
        self.density, self.merge, self.eps, self.seed = density, merge, eps, seed

    def merge_matrix(self, taus: list[torch.Tensor]) -> torch.Tensor:
        u, svs = knots_basis(taus, self.eps)  # the basis of the raw task vectors; weights act on S·Vᵢᵀ
        if u.shape[1] == 0:
            return torch.zeros_like(taus[0])
        merged = inner_merge(self.merge, [s.to(torch.float32) for s in svs], self.weight, self.density,
                             self.lam, self.seed)
        return u @ merged.to(device=u.device, dtype=u.dtype)  # run_whole hands back a CPU tensor


def inner_merge(name: str, vectors: list[torch.Tensor], weight: list[float], density: list[float], lam: float,
                seed: int) -> torch.Tensor:
    """A registered task-vector method run on ``vectors`` as task vectors of a zero base (paper conventions,
    trimmed per tensor): λ·merge(vᵢ)."""
    from moerge.methods import get_method

    method = get_method(name)
    params = {p.name: p.default_for("paper") for p in method.params if not p.per_model}
    params.update({"lambda": lam, "trim_scope": "tensor"} if "trim_scope" in params else {"lambda": lam})
    model_params = []
    for w, d in zip(weight, density):
        mp: dict[str, Any] = {p.name: p.default_for("paper") for p in method.params if p.per_model}
        mp["weight"] = w
        if "density" in mp:
            mp["density"] = d
        model_params.append(mp)
    zero = torch.zeros_like(vectors[0])
    return method(zero, vectors, model_params, params, seed=seed)


@register(
    "knots",
    params=(WEIGHT, LAMBDA,
            Param("density", float, 1.0, "TIES: fraction of each model's S·Vᵢᵀ entries kept (the reference's topK/100; "
                  "per tensor, the reference ranks all adapted layers together); DARE: keep probability",
                  per_model=True, low=0.0, high=1.0, low_open=True),
            Param("merge", str, "ties", "how the aligned S·Vᵢᵀ are merged (KnOTS-TIES, KnOTS-DARE-TIES, or their sum)",
                  choices=KNOTS_INNER, gradient=False),
            Param("eps", float, 1e-5, "singular values of the concatenation at or below this are dropped "
                  "(absolute, as the reference)", low=0.0, gradient=False, constant=True),
            EXCLUDE, SVD_DTYPE.with_default("float64")),
    summary="align the task vectors (LoRA updates) in the shared SVD basis of their concatenation, merge "
    "their coordinates S·Vᵢᵀ with TIES (or DARE-TIES), map back through U",
    citation="Stoica et al. 2025, Model merging with SVD to tie the KnOTS (ICLR 2025, arXiv:2410.19735); "
    "reference code github.com/gstoica27/KnOTS",
    needs_base=True,
    whole_tensor=lambda params: True,
)
def knots(shape: tuple[int, ...], *, weight: list[float], lam: float, density: list[float], merge: str, eps: float,
          exclude: bool, svd_dtype: str, seed: int = 0) -> KnotsMerger:
    """[τ₁ … τ_T] = U·S·[V₁ᵀ … V_Tᵀ];  θ = θ₀ + U·merge(S·V₁ᵀ, …, S·V_Tᵀ)."""
    return KnotsMerger(shape, weight, lam, exclude, svd_dtype, density, merge, eps, seed)
