"""What one compiled tile-dispatch kernel is specialised for, and how it is launched.

The kernel (``plugins/tile_dispatch/tile_dispatch.cu``) takes its shapes, dtypes and the gate
scale as compile-time constants: a TensorRT AOT plugin gets no attributes at run time, and
constants let the compiler unroll the routing and the token loops. ``launch_config`` is the
one place that turns a spec and a token count into grid, block and shared memory: the Python
launcher and the TensorRT plugin both call it, with an ``int`` or a TensorRT shape expression
for the token count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.tiles import ceil_div, padded_shape, real_blocks

KERNEL_NAME = "tile_dispatch_kernel"
HIDDEN_DTYPES = {"float32": 0, "float16": 1}
TILE_DTYPES = {"float32": 0, "float16": 1, "int8": 2}
TILE_BYTES = {"float32": 4, "float16": 2, "int8": 1}
# 8 warps per block (256 threads); each warp owns ROWS_PER_WARP output rows in turn.
WARPS_PER_BLOCK = 8
# Every block routes its token chunk itself (one launch, no grid-wide sync), so blocks are
# made larger (more rows per warp) until the grid is down to about this many blocks: several
# waves on a 132-SM H100 keep the memory system busy, fewer blocks repeat less routing.
TARGET_BLOCKS = 1024
MAX_ROWS_PER_WARP = 8
# Shared memory per block: the gate-weight table [tokens_per_block, C] and the list of selected
# column blocks; keep it under 32 KiB so several blocks fit on an SM, and never over the 48 KiB
# a launch gets without an opt-in (which a TensorRT AOT plugin cannot make).
SMEM_BUDGET = 32 * 1024
SMEM_LIMIT = 48 * 1024
MAX_TOKENS_PER_BLOCK = 256


def kernel_source_path() -> Path:
    """``plugins/tile_dispatch/tile_dispatch.cu``; ``$PRISM_DEPLOY_PLUGINS`` overrides the folder.

    A checkout (or editable install) reads the repository's ``plugins/``; a wheel install reads
    the copy that pyproject's data-files put under ``<prefix>/share/prism-deploy/plugins``.
    """
    import os
    import sys

    root = os.environ.get("PRISM_DEPLOY_PLUGINS")
    candidates = (
        [Path(root)]
        if root
        else [
            Path(__file__).resolve().parents[2] / "plugins",
            Path(sys.prefix) / "share" / "prism-deploy" / "plugins",
        ]
    )
    for base in candidates:
        path = base / "tile_dispatch" / "tile_dispatch.cu"
        if path.is_file():
            return path
    return candidates[0] / "tile_dispatch" / "tile_dispatch.cu"


@dataclass(frozen=True)
class TileDispatchSpec:
    """One gated pipe as the kernel sees it (the ONNX node's attributes plus the two dtypes)."""

    R: int
    C: int
    tr: int
    tc: int
    top_k: int
    gate_scale: float
    out_dim: int
    hidden_dtype: str = "float32"
    tile_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("R", "C", "tr", "tc", "top_k", "out_dim"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise PrismInputError(f"tile_dispatch: {name} must be a positive int, got {value!r}")
        if self.top_k > self.workers:
            raise PrismInputError(f"tile_dispatch: top_k={self.top_k} exceeds R*C={self.workers}")
        if self.out_dim > self.R * self.tr:
            raise PrismInputError(f"tile_dispatch: out_dim={self.out_dim} exceeds R*tr={self.R * self.tr}")
        if not math.isfinite(self.gate_scale):
            raise PrismInputError(f"tile_dispatch: gate_scale must be finite, got {self.gate_scale!r}")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise PrismInputError(
                f"tile_dispatch: hidden dtype {self.hidden_dtype!r} is not one of {sorted(HIDDEN_DTYPES)}"
            )
        if self.tile_dtype not in TILE_DTYPES:
            raise PrismInputError(f"tile_dispatch: tile dtype {self.tile_dtype!r} is not one of {sorted(TILE_DTYPES)}")
        if shared_bytes(self.C, 32) > SMEM_LIMIT:
            raise PrismInputError(
                f"tile_dispatch: C={self.C} column blocks need {shared_bytes(self.C, 32)} bytes of shared "
                f"memory per block, over the {SMEM_LIMIT} a launch gets; use a grid with fewer column blocks"
            )

    @property
    def workers(self) -> int:
        return self.R * self.C

    @property
    def padded_in(self) -> int:
        return padded_shape((self.R, self.C), (self.tr, self.tc))[1]

    @property
    def gate_scale_f32(self) -> float:
        """The gate scale rounded to float32, as the float32 reference multiplies by it."""
        return float(np.float32(self.gate_scale))

    @property
    def tokens_per_block(self) -> int:
        """Tokens one block routes and serves: each selected tile row is read once per block."""
        tpb = MAX_TOKENS_PER_BLOCK
        while tpb > 32 and shared_bytes(self.C, tpb) > SMEM_BUDGET:
            tpb //= 2
        return tpb

    @property
    def rows_per_warp(self) -> int:
        """1, 2, 4 or 8: the largest that still leaves TARGET_BLOCKS row slabs (or 1)."""
        live_row_blocks = min(self.R, real_blocks(self.out_dim, self.tr))
        rpw = 1
        while (
            rpw < MAX_ROWS_PER_WARP and live_row_blocks * ceil_div(self.tr, WARPS_PER_BLOCK * rpw * 2) >= TARGET_BLOCKS
        ):
            rpw *= 2
        return rpw

    @property
    def rows_per_block(self) -> int:
        return WARPS_PER_BLOCK * self.rows_per_warp

    def defines(self) -> list[str]:
        """The NVRTC ``-D`` options that specialise the kernel source to this spec."""
        # A hexadecimal float literal carries the float32 value exactly (C++17).
        scale = float(self.gate_scale_f32).hex() + "f"
        return [
            f"-DPRISM_HIDDEN_DTYPE={HIDDEN_DTYPES[self.hidden_dtype]}",
            f"-DPRISM_TILE_DTYPE={TILE_DTYPES[self.tile_dtype]}",
            f"-DPRISM_R={self.R}",
            f"-DPRISM_C={self.C}",
            f"-DPRISM_TR={self.tr}",
            f"-DPRISM_TC={self.tc}",
            f"-DPRISM_TOP_K={self.top_k}",
            f"-DPRISM_GATE_SCALE={scale}",
            f"-DPRISM_OUT_DIM={self.out_dim}",
            f"-DPRISM_TOKENS_PER_BLOCK={self.tokens_per_block}",
            f"-DPRISM_WARPS={WARPS_PER_BLOCK}",
            f"-DPRISM_ROWS_PER_WARP={self.rows_per_warp}",
        ]

    def attributes(self) -> dict[str, Any]:
        """The ONNX node / plugin attributes (dtypes come from the tensors)."""
        return {
            "R": self.R,
            "C": self.C,
            "tr": self.tr,
            "tc": self.tc,
            "top_k": self.top_k,
            "gate_scale": float(self.gate_scale),
            "out_dim": self.out_dim,
        }


def shared_bytes(C: int, tokens_per_block: int) -> int:
    """Dynamic shared memory of one block: the gate-weight table (float32, its row stride odd so
    that lanes reading one column hit different banks), then the list of selected column
    blocks and its length (int32, C + 1)."""
    stride = C + 1 if C % 2 == 0 else C
    return (tokens_per_block * stride + C + 1) * 4


N = TypeVar("N")


@dataclass(frozen=True)
class LaunchConfig(Generic[N]):
    """Grid, block and dynamic shared memory; ``grid_y`` follows the token count ``N``."""

    grid_x: int
    grid_y: N
    block_x: int
    shared_mem: int
    tokens_per_block: int

    @property
    def grid(self) -> tuple[int, N, int]:
        return (self.grid_x, self.grid_y, 1)

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.block_x, 1, 1)


def launch_config(spec: TileDispatchSpec, tokens: N) -> LaunchConfig[N]:
    """Grid/block/shared memory for ``tokens`` tokens (an int, or a TensorRT shape expression).

    x: one block per (row-block r, slab of ``spec.rows_per_block`` rows); y: one per token chunk.
    Only ``+`` and ``//`` are applied to ``tokens``, which TensorRT shape expressions support.
    """
    tpb = spec.tokens_per_block
    slabs = ceil_div(spec.tr, spec.rows_per_block)
    # Row-blocks wholly in the output padding have no rows to write: no blocks for them.
    live_row_blocks = real_blocks(spec.out_dim, spec.tr)
    grid_y: N = (tokens + (tpb - 1)) // tpb  # type: ignore[operator,assignment]
    return LaunchConfig(
        grid_x=live_row_blocks * slabs,
        grid_y=grid_y,
        block_x=WARPS_PER_BLOCK * 32,
        shared_mem=shared_bytes(spec.C, tpb),
        tokens_per_block=tpb,
    )
