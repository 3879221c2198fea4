"""Ungated fitting from the normal equations ``X^T X`` and ``X^T Z``, accumulated in chunks.

An ungated pipe computes ``y = x W^T`` with ``W`` its tiles assembled: a plain linear map.
Its least-squares fit is therefore the full-matrix solution ``W = Z^T X (X^T X + ridge I)^-1``
cut into tiles. The row-blocks share ``X^T X``; each row-block ``r`` is the right-hand side
``X^T Z_r``, so all row-blocks together are one multi-RHS solve against one Cholesky factor
("joint"). The seed's per-tile recipe instead solves each tile against only its own input
slice, ``W_rc = Z_r^T X_c (X_c^T X_c + ridge I)^-1``: it ignores the other column blocks
that share the row-block's output, see docs/fitting.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_deploy.fit import budget
from prism_deploy.fit.progress import add_work, progress_bar
from prism_deploy.fit.solve import SolveInfo, solve_normal
from prism_deploy.fit.stream import PairedData, Split
from prism_deploy.format import PipeSpec


@dataclass
class NormalEquations:
    xtx: torch.Tensor  # [in_dim, in_dim] float64
    xtz: torch.Tensor  # [in_dim, out_dim] float64
    rows: int


def accumulate_normal(data: PairedData, split: Split = "train", *, desc: str = "X^T X, X^T Z") -> NormalEquations:
    """One pass over ``split``: ``X^T X`` and ``X^T Z`` in float64."""
    xtx = torch.zeros(data.in_dim, data.in_dim, dtype=torch.float64)
    xtz = torch.zeros(data.in_dim, data.out_dim, dtype=torch.float64)
    rows = 0
    per_row = budget.pass_work(data.in_dim * (data.in_dim + data.out_dim), data.chunk_rows)
    with progress_bar(data.count(split), desc, work=per_row) as bar:
        for x, z in data.chunks(split):
            xtx.addmm_(x.T, x)
            xtz.addmm_(x.T, z)
            rows += x.shape[0]
            bar.update(x.shape[0])
    return NormalEquations(xtx, xtz, rows)


def solve_joint(ne: NormalEquations, ridge: float, *, strict: bool = True) -> tuple[torch.Tensor, SolveInfo]:
    """The full-matrix least-squares map ``W`` ``[out_dim, in_dim]``: every row-block at once."""
    b, info = solve_normal(ne.xtx, ne.xtz, ridge, what=f"X^T X of the {ne.rows} training rows", strict=strict)
    add_work(budget.solve_macs(*ne.xtz.shape))
    return b.T.contiguous(), info


def solve_per_tile(ne: NormalEquations, spec: PipeSpec, ridge: float, *, strict: bool = True) -> torch.Tensor:
    """The seed's recipe: each column block ``c`` solved alone, for every row-block at once.

    ``W_rc`` depends on ``c`` only through ``X_c^T X_c`` and ``X_c^T Z_r``, so one solve per
    column block (all row-blocks as right-hand sides) gives every tile; assembled, they form
    the ``[out_dim, in_dim]`` matrix returned here.
    """
    in_dim = ne.xtx.shape[0]
    w = torch.zeros(ne.xtz.shape[1], in_dim, dtype=torch.float64)
    tc = spec.tile_cols
    for c in range(spec.cols):
        cols = slice(min(c * tc, in_dim), min((c + 1) * tc, in_dim))
        if cols.start == cols.stop:
            continue
        b, _ = solve_normal(
            ne.xtx[cols, cols], ne.xtz[cols], ridge, what=f"X_c^T X_c of column block {c}", strict=strict
        )
        add_work(budget.solve_macs(tc, ne.xtz.shape[1]))
        w[:, cols] = b.T
    return w
