"""Localized error: how much of the held-out error each worker is responsible for.

A worker's *excess* is the held-out squared error that re-solving that one worker alone
(every other tile and the routing fixed) would remove, as a fraction of the adapter's
held-out squared error. With ``e = z - y`` the residual on the rows the worker writes and
``f = beta_p * g_w(x) * x_c`` its features, the best change ``D`` of its tile minimises
``||e - f D^T||^2``, which removes

    excess_w = tr(B^T A^+ B),   A = sum f^T f,  B = sum f^T e    (sums over held-out rows),

an exact, per-worker quantity from one pass over the held-out rows. A tile that is far from
its share of the optimum (corrupted, stale, badly routed) has a large excess; in a fitted
adapter every worker's excess is small and of similar size (the held-out noise it could fit).
This is the same least-squares problem ``refit`` solves on the training rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_deploy.fit.progress import progress_bar
from prism_deploy.fit.solve import solve_normal
from prism_deploy.fit.stream import PairedData, Split
from prism_deploy.fit.tiles import worker_block
from prism_deploy.reference import PrismAdapter


@dataclass
class WorkerScore:
    pipe: int
    worker: int
    row_block: int
    col_block: int
    excess: float  # removable held-out squared error / total held-out squared error
    row_block_rel_err: float | None  # held-out relative error of the combined output on its rows

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def worker_excess(adapter: PrismAdapter, data: PairedData, split: Split = "holdout") -> list[WorkerScore]:
    """Every real worker's excess, worst first."""
    cfg = adapter.config
    pipes = adapter.pipe_list()
    betas = adapter.betas(torch.float64)
    grams, cross = [], []
    for spec in cfg.pipes:
        (R, C), (tr, tc) = spec.grid, spec.tile
        grams.append(torch.zeros((R if spec.gated else 1), C, tc, tc, dtype=torch.float64))
        cross.append(torch.zeros(R, C, tc, tr, dtype=torch.float64))
    sq_err = torch.zeros(cfg.out_dim, dtype=torch.float64)
    sq_target = torch.zeros(cfg.out_dim, dtype=torch.float64)
    rows = 0
    with progress_bar(data.count(split), f"worker excess ({split})") as bar, torch.no_grad():
        for x, z in data.chunks(split):
            e = z - adapter(x)
            sq_err += (e**2).sum(0)
            sq_target += (z**2).sum(0)
            rows += x.shape[0]
            for p, (spec, pipe) in enumerate(zip(cfg.pipes, pipes)):
                (R, C), (tr, tc) = spec.grid, spec.tile
                xp = pipe.padded_input(x).reshape(-1, C, tc) * betas[p]
                ep = torch.nn.functional.pad(e, (0, spec.padded_out - cfg.out_dim)).reshape(-1, R, tr)
                if spec.gated:
                    g = pipe.routing(x).dense.reshape(-1, R, C)  # type: ignore[union-attr]
                    grams[p] += torch.einsum("nrc,nci,ncj->rcij", g * g, xp, xp)
                    cross[p] += torch.einsum("nrc,nci,nrj->rcij", g, xp, ep)
                else:
                    grams[p][0] += torch.einsum("nci,ncj->cij", xp, xp)
                    cross[p] += torch.einsum("nci,nrj->rcij", xp, ep)
            bar.update(x.shape[0])
    total = float(sq_err.sum())
    scores = []
    for p, spec in enumerate(cfg.pipes):
        for w in range(spec.workers):
            r, c = divmod(w, spec.cols)
            out_rows, cols = worker_block(spec, w, cfg.in_dim, cfg.out_dim)
            if out_rows.start == out_rows.stop or cols.start == cols.stop or rows == 0:
                continue
            a = grams[p][r if spec.gated else 0, c]
            b = cross[p][r, c]
            sol, _ = solve_normal(a, b)
            gain = float((b * sol).sum())
            den = float(sq_target[out_rows].sum())
            rb = (float(sq_err[out_rows].sum()) / den) ** 0.5 if den > 0 else None
            scores.append(WorkerScore(p, w, r, c, gain / total if total > 0 else 0.0, rb))
    scores.sort(key=lambda s: -s.excess)
    return scores
