"""The physical floor of one adapter call: what no implementation can beat on a machine.

A call on ``T`` tokens must at least
- read the weights it uses: every tile of an ungated pipe; for a gated pipe, each tile that
  some token selected, once (a kernel that groups tokens by worker reads it once for all of
  them), plus the whole gate (every token scores every worker);
- read the input ``[T, in_dim]`` and write the output ``[T, out_dim]``;
- do the multiply-adds: per token, the gate plus ``top_k`` tiles of each gated pipe and all
  tiles of each ungated pipe (``describe()['flops_per_token']['gated']``).

Its floor is ``max(bytes / copy bandwidth, FLOPs / matrix rate)``, both measured on the
machine at the start of the run (``machine.py``). Weights are counted at the precision's
width, the most favourable case, so that the floor stays a lower bound: fp32 4 bytes,
fp16 2, int8 1 plus one fp32 scale per output row (per tile row, and per gate row).
Biases and scales stay fp32 (fp16 for fp16). Activations are float32 unless the caller
says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prism_deploy.core.precision import Precision
from prism_deploy.format import AdapterConfig

FLOOR_MODEL = (
    "bytes = tiles selected by at least one token (all tiles of an ungated pipe) + whole gates "
    "+ input and output activations; weights at the precision's width (int8: +fp32 scale per row); "
    "floor = max(bytes / measured copy bandwidth, FLOPs / measured matmul rate)"
)


def bytes_must_move(
    config: AdapterConfig,
    precision: str,
    tokens: int,
    selected_tiles: Sequence[float | None] | None = None,
    io_bytes: int = 4,
) -> dict[str, float]:
    """Bytes one call on ``tokens`` tokens must move, by kind.

    ``selected_tiles[i]`` is the number of distinct workers pipe ``i``'s gate selected over
    the tokens (measured from the real routing); when not given, the least possible
    (``top_k``: every token picks the same tiles) is used, which keeps the floor a floor.
    """
    prec = Precision.parse(precision)
    item, side = prec.weight_bytes, prec.side_bytes
    quantized = prec.quantized
    tiles = gates = 0.0
    for i, spec in enumerate(config.pipes):
        tr, tc = spec.tile
        if spec.gated:
            assert spec.top_k is not None
            chosen = selected_tiles[i] if selected_tiles is not None and selected_tiles[i] is not None else spec.top_k
            n = float(min(spec.workers, max(float(spec.top_k), float(chosen))))  # type: ignore[arg-type]
            gates += spec.workers * config.in_dim * item + spec.workers * side
            if quantized:
                gates += spec.workers * side  # one scale per gate row
        else:
            n = float(spec.workers)
        tiles += n * tr * tc * item
        if quantized:
            tiles += n * tr * side  # one scale per tile row
    activations = float(tokens * (config.in_dim + config.out_dim) * io_bytes)
    return {"tiles": tiles, "gates": gates, "activations": activations, "total": tiles + gates + activations}


def flops_must_do(describe: dict[str, Any], tokens: int) -> float:
    """Multiply-adds (x2) of ``tokens`` tokens, reading only what the gates select."""
    return float(tokens * describe["flops_per_token"]["gated"])


def floor_seconds(bytes_total: float, flops: float, bandwidth: float, matrix_rate: float) -> dict[str, Any]:
    memory_s = bytes_total / bandwidth
    compute_s = flops / matrix_rate
    return {
        "memory_s": memory_s,
        "compute_s": compute_s,
        "floor_s": max(memory_s, compute_s),
        "bound": "memory" if memory_s >= compute_s else "compute",
    }


def case_floor(
    config: AdapterConfig,
    describe: dict[str, Any],
    precision: str,
    tokens: int,
    bandwidth: float,
    matrix_rate: float,
    selected_tiles: Sequence[float | None] | None = None,
    io_bytes: int = 4,
) -> dict[str, Any]:
    """Everything about one case's floor, as stored in the results JSON."""
    moved = bytes_must_move(config, precision, tokens, selected_tiles, io_bytes)
    flops = flops_must_do(describe, tokens)
    out = {"bytes": moved, "flops": flops, **floor_seconds(moved["total"], flops, bandwidth, matrix_rate)}
    # For comparison, not a floor: the same call when every tile is read and multiplied, as
    # the portable ONNX graph does (it computes all tiles and masks the unselected ones).
    every = bytes_must_move(config, precision, tokens, [float(p.workers) for p in config.pipes], io_bytes)
    every_flops = float(tokens * describe["flops_per_token"]["dense"])
    out["all_tiles"] = {
        "bytes": every["total"],
        "flops": every_flops,
        **floor_seconds(every["total"], every_flops, bandwidth, matrix_rate),
    }
    if selected_tiles is not None:
        out["selected_tiles"] = list(selected_tiles)
    return out
