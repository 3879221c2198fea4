"""Block-quantized weights read by ONNX Runtime's contrib ops, and what int4 lowers.

The adapter graphs are opset 19 / IR 9 (``core/onnx_io.py``), where ONNX has no 4-bit type, so
int4 exists only through ONNX Runtime's ``com.microsoft`` ops that read 4-bit codes packed two
to a byte (``core.tiles.pack_int4``: the one byte layout): ``MatMulNBits`` for an ungated pipe
(the whole pipe as one ``[N, K]`` weight, ``adapter_onnx._ungated_nbits``) and
``GatherBlockQuantized`` for a gated pipe's sparse form (here).

Gated pipes at int4, every form: the tiles are stored packed in storage order and read through
``GatherBlockQuantized``, which gathers tiles' bytes and dequantizes them in one pass to float32
``q * s``, bit for bit the tile ``core.tiles.stored_as(.., INT4)`` gives. The sparse form gathers
the union of the call's selections (its products then in float32, as int8's sparse form); forms
A, B and grouped gather every tile (a constant index) and go on as at int8, in float16. Measured
on the 4096 -> 4096 pipe's 256x128 tiles (2-core CPU, one thread, ONNX Runtime 1.31,
2026-12-07): gathering and dequantizing 154 of 512 tiles took 3.9 ms with it against 18.2 ms
with standard ops (Gather, BitwiseAnd, BitShift, Concat, Cast, Sub, Mul); all 512: 26 ms against
38 ms; the same values (max difference 0).

Why not unpack with standard ops in forms A, B and grouped, whose tiles are constants: ONNX
Runtime constant-folds them when the ort-cpu engine is optimized at build time (checked: a
BitwiseAnd/BitShift/Concat/Cast unpack of an initializer is saved as a float initializer), and the
engine would hold float tiles: the form at fp32/fp16 under another name. It does not fold
``GatherBlockQuantized`` (checked the same way), so those forms stay 4-bit in the file and in
memory and pay the dequantization on every call; the build's timing (builder/forms.py) decides
per token bucket whether that ever beats the sparse form. ``MatMulNBits`` itself takes one 2-D
weight: form A's ``[R, C*tc, tr]`` and form B's ``[C, tc, R*tr]`` are batched, and one node per
row- or column-block would make the node count follow the grid. (int8 keeps its tiles int8 in
the file because ONNX Runtime leaves ``DequantizeLinear`` unfolded; a 4-bit ``DequantizeLinear``
needs opset 21 / IR 10, past the graphs' opset 19 / IR 9.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prism_deploy.core.blocks import DeferredTensor
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.tiles import QMAX_INT4, pack_int4, quantize_with_scales, row_scales
from prism_deploy.lower.graph_writer import GraphBuilder

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops (MatMulNBits, GatherBlockQuantized)


def nbits_applies(spec: Any) -> bool:
    """MatMulNBits (and GatherBlockQuantized) take blocks of a power of two >= 16: the tile width
    must be one, so that each block is one tile row and its scale the tile row's own (no
    requantization)."""
    tc = spec.tile[1]
    return tc >= 16 and tc & (tc - 1) == 0


def check_int4_applies(config: Any) -> None:
    """int4 needs every pipe's tile width to be a block size of the 4-bit ops; otherwise one
    error line naming the first pipe whose width is not."""
    for spec in config.pipes:
        if not nbits_applies(spec):
            why = f"has tile width {spec.tile[1]}, not a power of two >= 16 (MatMulNBits' block size)"
            raise PrismInputError(f"--precision int4: pipe {spec.name!r} {why}")


def int4_tiles(g: GraphBuilder, prefix: str, spec: Any, source: np.ndarray) -> tuple[str, str]:
    """A gated pipe's int4 tiles as the contract's two initializers, in storage order: the packed
    codes ``[R*C*tr, tc/2]`` uint8 (written a block of tile rows at a time) and the float32 scales
    ``[R*C*tr]`` (``max|row| / 7``)."""
    W, (tr, tc) = spec.workers, spec.tile
    rows = source.reshape(W * tr, tc)
    scales = row_scales(rows, QMAX_INT4)
    tiles = g.initializer(
        f"{prefix}tiles",
        DeferredTensor(
            (W * tr, tc // 2),
            np.dtype(np.uint8),
            lambda a, b: pack_int4(quantize_with_scales(rows[a:b], scales[a:b], QMAX_INT4)),
        ),
    )
    return tiles, g.initializer(f"{prefix}tiles/scales", scales)


def int4_gathered(g: GraphBuilder, prefix: str, spec: Any, tiles: str, scales: str, sel: str) -> str:
    """The tiles ``sel`` ``[n]`` (a tensor of worker indices) picks, dequantized: ``[n, tr, tc]``
    float32, read at 4 bits."""
    W, (tr, tc) = spec.workers, spec.tile
    data = g.op("Reshape", [tiles, g.ints(f"{prefix}tiles/shape", [W, tr, tc // 2])], f"{prefix}tiles/Reshape")
    s = g.op("Reshape", [scales, g.ints(f"{prefix}tiles/scale_shape", [W, tr, 1])], f"{prefix}tiles/ReshapeScales")
    return g.op(
        "GatherBlockQuantized",
        [data, sel, s],
        f"{prefix}tiles/GatherBlockQuantized",
        domain=MS_DOMAIN,
        gather_axis=0,
        quantize_axis=2,
        block_size=tc,
        bits=4,
    )
