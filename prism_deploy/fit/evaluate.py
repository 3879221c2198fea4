"""How well an adapter maps ``X`` to ``Z`` on a split: relative error, cosine, per row-block.

- relative error: ``||Y - Z||_F / ||Z||_F`` over the rows of the split;
- cosine: the mean over rows of ``cos(y_i, z_i)`` (a row with ``y_i = 0`` or ``z_i = 0`` counts 0);
- per row-block: the relative error restricted to the output rows of one row-block of a pipe.

The adapter is run through the reference in float64, as stored (after any dtype cast).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_deploy.fit import budget
from prism_deploy.fit.progress import progress_bar
from prism_deploy.fit.stream import PairedData, Split
from prism_deploy.format import PipeSpec
from prism_deploy.reference import PrismAdapter


@dataclass
class Metrics:
    rows: int
    sq_err: torch.Tensor  # [out_dim] sum over rows of (y - z)^2, per output feature
    sq_z: torch.Tensor  # [out_dim] sum over rows of z^2
    cosine_sum: float

    @property
    def rel_err(self) -> float | None:
        den = float(self.sq_z.sum())
        return None if self.rows == 0 or den == 0 else (float(self.sq_err.sum()) / den) ** 0.5

    @property
    def cosine(self) -> float | None:
        return None if self.rows == 0 else self.cosine_sum / self.rows

    def row_block_errors(self, spec: PipeSpec) -> list[float | None]:
        """Relative error over the output rows of each row-block of ``spec`` (``None``: padding)."""
        tr, out = spec.tile_rows, self.sq_err.shape[0]
        errs: list[float | None] = []
        for r in range(spec.rows):
            rows = slice(min(r * tr, out), min((r + 1) * tr, out))
            den = float(self.sq_z[rows].sum())
            errs.append(None if rows.start == rows.stop or den == 0 else (float(self.sq_err[rows].sum()) / den) ** 0.5)
        return errs

    def worst_row_block(self, spec: PipeSpec) -> tuple[int | None, float | None]:
        errs = self.row_block_errors(spec)
        best = max((e, r) for r, e in enumerate(errs) if e is not None) if any(e is not None for e in errs) else None
        return (None, None) if best is None else (best[1], best[0])

    def to_json(self) -> dict[str, object]:
        return {"rows": self.rows, "rel_err": self.rel_err, "cosine": self.cosine}


def evaluate(adapter: PrismAdapter, data: PairedData, split: Split, *, desc: str | None = None) -> Metrics:
    """One pass over ``split`` through the reference forward in float64."""
    sq_err = torch.zeros(data.out_dim, dtype=torch.float64)
    sq_z = torch.zeros(data.out_dim, dtype=torch.float64)
    cos_sum, rows = 0.0, 0
    per_row = budget.pass_work(budget.forward_macs(adapter.config), data.chunk_rows)
    with progress_bar(data.count(split), desc or f"evaluate {split}", work=per_row) as bar, torch.no_grad():
        for x, z in data.chunks(split):
            y = adapter(x)
            sq_err += ((y - z) ** 2).sum(0)
            sq_z += (z**2).sum(0)
            cos_sum += float(row_cosines(y, z).sum())
            rows += x.shape[0]
            bar.update(x.shape[0])
    return Metrics(rows, sq_err, sq_z, cos_sum)


def row_cosines(y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    den = y.norm(dim=1) * z.norm(dim=1)
    return torch.where(den > 0, (y * z).sum(1) / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
