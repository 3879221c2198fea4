"""Which workers of a deployed adapter are to blame for its error against the reference.

Two ways, one report (``pipe``, ``name``, ``worker``, ``r``, ``c``, ``error``, ``relative``,
worst first):

- a runner that exposes the tiles it computes with (``stored_tiles``: exported and lowered ONNX
  graphs) is compared tile by tile, each tile alone on the given inputs (the adapter parity's own
  ranking: ``worker_errors``, which ``prism_deploy.parity.check`` reports);
- any other runner (built engines: a black box) is probed: for each column block of each pipe,
  the inputs with every other column zeroed go through the runner and the reference, and each
  worker of that column block is scored by how much of the error lies along its own reference
  contribution (the squared projection of the error, over its output rows, onto
  ``beta * gate_w(x) * x_c T_w^T``). A worker whose tile is wrong by a factor carries the whole
  error in its own direction; a correct neighbour carries none of it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from prism_deploy.core.tiles import worker_block
from prism_deploy.reference import PrismAdapter

TOP_WORKERS = 10


def blame_workers(reference: Any, runner: Any, x: np.ndarray, top: int = TOP_WORKERS) -> list[dict[str, Any]]:
    """The workers of ``reference`` (a ``PrismAdapter``) most to blame for ``runner``'s error on
    the input rows ``x`` ``[n, in_dim]``."""
    x = np.asarray(x, np.float32)
    stored = runner.stored_tiles() if hasattr(runner, "stored_tiles") else {}
    if stored and len(stored) == reference.config.num_pipes:
        return worker_errors(reference, stored, x, [])[:top]
    return _probe(reference, runner, x)[:top]


def worker_errors(
    adapter: PrismAdapter, stored: dict[int, np.ndarray], x: np.ndarray, notes: list[str]
) -> list[dict[str, Any]]:
    """Each worker's tile alone on the same inputs: ``||x_c (T_stored - T_ref)^T||_F``.

    Computed from the Gram matrix of each column-block of the inputs, without forming the
    per-worker outputs: ``||X D^T||_F^2 = sum_j d_j^T (X^T X) d_j``. ``relative`` divides by
    the norm of the reference tile's own output on the same inputs.
    """
    xt = torch.from_numpy(x).to(torch.float64)
    rows: list[dict[str, Any]] = []
    for i, pipe in enumerate(adapter.pipe_list()):
        spec = pipe.spec
        if i not in stored:
            notes.append(
                f"pipe {spec.name!r}: folded into one weight with its ungated neighbours; no per-worker figures"
            )
            continue
        (R, C), (tr, tc) = spec.grid, spec.tile
        xp = torch.nn.functional.pad(xt, (0, spec.padded_in - adapter.in_dim)).reshape(-1, C, tc)
        gram = torch.einsum("nck,ncl->ckl", xp, xp)  # [C, tc, tc]
        ref = pipe.tiles.detach().to(torch.float64).reshape(R, C, tr, tc)
        d = torch.from_numpy(stored[i]).to(torch.float64).reshape(R, C, tr, tc) - ref
        err = torch.einsum("rcjk,ckl,rcjl->rc", d, gram, d).clamp_min(0).sqrt()
        base = torch.einsum("rcjk,ckl,rcjl->rc", ref, gram, ref).clamp_min(0).sqrt()
        # this pipe's candidates for the overall top ten (ties: lower worker index first)
        order = torch.sort(err.flatten(), descending=True, stable=True).indices[:TOP_WORKERS].tolist()
        for w in order:
            r, c = divmod(w, C)
            e, b = float(err[r, c]), float(base[r, c])
            rows.append(
                {
                    "pipe": i,
                    "name": spec.name,
                    "worker": w,
                    "r": r,
                    "c": c,
                    "error": e,
                    "relative": e / b if b > 0 else (0.0 if e == 0 else math.inf),
                }
            )
    rows.sort(key=lambda r: (-r["error"], r["pipe"], r["worker"]))
    return rows[:TOP_WORKERS]


def _probe(reference: Any, runner: Any, x: np.ndarray) -> list[dict[str, Any]]:
    cfg = reference.config
    betas = reference.betas(torch.float64)
    rows: list[dict[str, Any]] = []
    for p, (spec, pipe) in enumerate(zip(cfg.pipes, reference.pipe_list())):
        tiles = pipe.tiles.detach().to(torch.float64)
        for c in range(spec.cols):
            _, cols = worker_block(spec.grid, spec.tile, c, cfg.in_dim, cfg.out_dim)
            if cols.start == cols.stop:
                continue  # a column block wholly in the padding
            xc = np.zeros_like(x)
            xc[:, cols] = x[:, cols]
            got = np.asarray(runner.run(xc[None]), np.float64).reshape(len(x), cfg.out_dim)
            xt = torch.from_numpy(xc)
            with torch.no_grad():
                want = reference(xt.double()).numpy()
                routing = pipe.routing(xt.double())
            err = got - want
            gates = None if routing is None else routing.dense.numpy()
            for r in range(spec.rows):
                w = r * spec.cols + c
                out_rows, _ = worker_block(spec.grid, spec.tile, w, cfg.in_dim, cfg.out_dim)
                if out_rows.start == out_rows.stop:
                    continue
                n_rows = out_rows.stop - out_rows.start
                contrib = xc[:, cols].astype(np.float64) @ tiles[w, :n_rows, : cols.stop - cols.start].numpy().T
                contrib *= float(betas[p])
                if gates is not None:
                    contrib *= gates[:, w : w + 1]
                e = err[:, out_rows]
                den = float((contrib * contrib).sum())
                score = float((e * contrib).sum()) ** 2 / den if den > 0 else 0.0
                error = math.sqrt(max(score, 0.0))
                rows.append(
                    {
                        "pipe": p,
                        "name": spec.name,
                        "worker": w,
                        "r": r,
                        "c": c,
                        "error": error,
                        "relative": error / math.sqrt(den) if den > 0 else (0.0 if error == 0 else math.inf),
                    }
                )
    rows.sort(key=lambda row: (-row["error"], row["pipe"], row["worker"]))
    return rows
