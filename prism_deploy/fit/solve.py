"""Solving ridge normal equations ``(G + ridge*I) B = H`` in float64.

Cholesky first (one factorisation serves every right-hand side, so a whole pipe's row-blocks
are one multi-RHS solve). When the factorisation fails or its pivots say the system is
ill-conditioned, fall back to an SVD-based least-squares solve, which also reports the
numerical rank: rank deficiency without ridge is an input error when the caller says the
system comes straight from the data (``strict``), and a minimum-norm solution otherwise
(for instance a gated worker that no token ever selects).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from prism_deploy.core.errors import PrismInputError

# Past this condition number a float64 Cholesky solve keeps fewer than ~4 of its ~16 digits:
# use the eigendecomposition instead (it can drop the directions that are only rounding noise).
CHOLESKY_MAX_COND = 1e12
ESTIMATE_ITERATIONS = 20


class SolveInfo:
    """How a system was solved (reported by ``fit --json``)."""

    def __init__(self, method: str, dim: int, rank: int, cond_estimate: float) -> None:
        self.method = method
        self.dim = dim
        self.rank = rank
        self.cond_estimate = cond_estimate

    def to_json(self) -> dict[str, object]:
        return {"method": self.method, "dim": self.dim, "rank": self.rank, "cond_estimate": self.cond_estimate}


def rank_tolerance(dim: int) -> float:
    """Relative singular-value cut-off of the gram matrix below which a direction counts as absent."""
    return dim * torch.finfo(torch.float64).eps * 10


def solve_normal(
    gram: torch.Tensor,
    rhs: torch.Tensor,
    ridge: float = 0.0,
    *,
    what: str = "X^T X",
    strict: bool = False,
) -> tuple[torch.Tensor, SolveInfo]:
    """Return ``B`` with ``(gram + ridge*I) B = rhs`` (float64) and how it was solved.

    ``gram`` is symmetric positive semi-definite ``[d, d]``, ``rhs`` is ``[d, m]``.
    Features whose gram diagonal is exactly zero (padding, a worker never selected) are
    left out of the solve and get zero coefficients.
    """
    gram = gram.to(torch.float64)
    rhs = rhs.to(torch.float64)
    d = gram.shape[0]
    out = torch.zeros(d, rhs.shape[1], dtype=torch.float64)
    live = torch.diagonal(gram) > 0
    if strict and ridge == 0 and not bool(live.all()):
        dead = torch.nonzero(~live).flatten().tolist()
        shown = ", ".join(map(str, dead[:8])) + (", ..." if len(dead) > 8 else "")
        raise PrismInputError(
            f"{what} is rank-deficient: {len(dead)} feature(s) are zero in every row (index {shown}); "
            "add --ridge (e.g. --ridge 1e-3) or drop those columns"
        )
    if not bool(live.any()):
        return out, SolveInfo("none", d, 0, float("inf"))
    a = gram[live][:, live]
    b = rhs[live]
    if ridge:
        a = a + ridge * torch.eye(a.shape[0], dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        cond = condition_estimate(a, chol)
        if cond < CHOLESKY_MAX_COND:
            out[live] = torch.cholesky_solve(b, chol)
            return out, SolveInfo("cholesky", d, int(a.shape[0]), cond)
    else:
        cond = float("inf")
    sol, rank = _lstsq(a)
    if strict and ridge == 0 and rank < a.shape[0]:
        raise PrismInputError(
            f"{what} is rank-deficient: rank {rank} of {d} (the training rows do not span the input "
            "space: too few rows or linearly dependent columns); add --ridge (e.g. --ridge 1e-3) or more, "
            "independent rows"
        )
    out[live] = sol(b)
    return out, SolveInfo("lstsq", d, rank, cond)


def condition_estimate(a: torch.Tensor, chol: torch.Tensor) -> float:
    """``lambda_max / lambda_min`` of SPD ``a`` by power and inverse iteration on its Cholesky
    factor: O(d^2) per step, negligible next to the O(d^3) factorisation. The pivot ratio
    ``(max L_ii / min L_ii)^2`` is cheaper but can miss the condition by orders of magnitude."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(a.shape[0], 1, generator=gen, dtype=torch.float64)
    u = v.clone()
    lam_max = lam_min_inv = 0.0
    for _ in range(ESTIMATE_ITERATIONS):
        v = a @ v
        lam_max = float(v.norm())
        v = v / lam_max
        u = torch.cholesky_solve(u, chol)
        lam_min_inv = float(u.norm())
        u = u / lam_min_inv
    if not (lam_max > 0 and lam_min_inv > 0) or not torch.isfinite(torch.tensor(lam_min_inv)):
        return float("inf")
    return lam_max * lam_min_inv


def _lstsq(a: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """Pseudo-inverse of a symmetric PSD matrix via its eigendecomposition, and its rank."""
    evals, evecs = torch.linalg.eigh(a)
    tol = rank_tolerance(a.shape[0]) * float(evals.abs().max())
    keep = evals > tol
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    rank = int(keep.sum())

    def apply(b: torch.Tensor) -> torch.Tensor:
        return evecs @ (inv[:, None] * (evecs.T @ b))

    return apply, rank
