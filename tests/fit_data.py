"""Synthetic paired activations for the fitting tests: ``Z = X M^T + noise``."""

from __future__ import annotations

import numpy as np


def synthetic_pair(
    n: int, in_dim: int, out_dim: int, *, cond: float = 1.0, noise: float = 0.01, seed: int = 0, mean: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``X`` with singular values spread log-evenly over ``[1/cond, 1]`` in a random basis
    (so column blocks are correlated, as in real hidden states), a dense ``M``, and
    ``Z = X M^T + noise``. Returns ``(X, Z, M)``, float64."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((in_dim, in_dim)))
    x = (rng.standard_normal((n, in_dim)) * np.logspace(0, -np.log10(cond), in_dim)) @ q.T + mean
    m = rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)
    z = x @ m.T + noise * rng.standard_normal((n, out_dim)) * np.sqrt((x @ m.T).var())
    return x, z, m


def full_ls_holdout_error(
    x: np.ndarray, z: np.ndarray, held: np.ndarray, ridge: float = 0.0
) -> tuple[np.ndarray, float]:
    """The unconstrained full-matrix least-squares map on the training rows (SVD-based
    ``lstsq`` on ``X`` itself, not the normal equations) and its held-out relative error."""
    xt, zt = x[~held], z[~held]
    if ridge:
        w = np.linalg.solve(xt.T @ xt + ridge * np.eye(x.shape[1]), xt.T @ zt).T
    else:
        w = np.linalg.lstsq(xt, zt, rcond=None)[0].T
    err = np.linalg.norm(x[held] @ w.T - z[held]) / np.linalg.norm(z[held])
    return w, float(err)
