"""INT8 numerics: weight quantization per tile row, activation calibrators.

Weights: symmetric INT8, one scale per output row of each tile (scales ``[R*C, tr]`` in the
tiles' storage order): a worker's rows never share a scale with another worker's, so a tile
whose values are small (a padding tile, a rarely useful worker) keeps its own resolution.
Activations (``int8-qdq`` only): one symmetric scale per tensor, from calibration data.
"""

from __future__ import annotations

import numpy as np
import torch

QMAX = 127.0
CALIBRATORS = ("max", "percentile")
PERCENTILE = 99.99  # of |activation| values: clips rare outliers, keeps the bulk's resolution
SAMPLE_PER_BATCH = 1 << 20  # |values| kept per calibration batch for the percentile


def quantize_tiles(tiles: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``[W, tr, tc]`` -> (int8 ``[W, tr, tc]``, float32 scales ``[W, tr]``), symmetric.

    ``q = round(t / s)`` clipped to [-127, 127] with ``s = max|row| / 127`` (rows of zeros get
    scale 1 so that dequantization is exact and no division by zero happens). The tiles are
    converted row-block by row-block to keep only a slice in float32 at a time.
    """
    w = tiles.shape[0]
    q = np.empty(tuple(tiles.shape), dtype=np.int8)
    scales = np.empty(tuple(tiles.shape[:2]), dtype=np.float32)
    step = max(1, (1 << 24) // max(1, tiles.shape[1] * tiles.shape[2]))
    for a in range(0, w, step):
        t = tiles[a:a + step].to(torch.float32)
        amax = t.abs().amax(dim=-1)
        s = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
        q[a:a + step] = torch.clamp(torch.round(t / s.unsqueeze(-1)), -QMAX, QMAX).to(torch.int8).numpy()
        scales[a:a + step] = s.numpy()
    return q, scales


def dequantize_tiles(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float32 tiles an INT8 graph computes with: ``q * s`` per row."""
    return q.astype(np.float32) * scales.reshape(*scales.shape, 1)


class ActivationObserver:
    """Collects |values| of one tensor over calibration batches; gives its INT8 scale."""

    def __init__(self, calibrator: str, seed: int = 0) -> None:
        if calibrator not in CALIBRATORS:
            raise ValueError(f"unknown calibrator {calibrator!r}")
        self.calibrator = calibrator
        self.amax = 0.0
        self.samples: list[np.ndarray] = []
        self._rng = np.random.default_rng(seed)

    def observe(self, values: np.ndarray) -> None:
        a = np.abs(values.astype(np.float32, copy=False)).ravel()
        if a.size == 0:
            return
        self.amax = max(self.amax, float(a.max()))
        if self.calibrator == "percentile":
            if a.size > SAMPLE_PER_BATCH:  # a uniform sample keeps memory bounded
                a = a[self._rng.integers(0, a.size, SAMPLE_PER_BATCH)]
            self.samples.append(a)

    def scale(self) -> float:
        bound = self.amax
        if self.calibrator == "percentile" and self.samples:
            bound = float(np.percentile(np.concatenate(self.samples), PERCENTILE))
        if not np.isfinite(bound) or bound <= 0:
            return 1.0
        # float16 holds the scale in the graph: keep it representable
        return float(np.float16(bound / QMAX)) or float(np.finfo(np.float16).tiny)
