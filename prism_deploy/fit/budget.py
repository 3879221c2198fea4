"""What a fit will cost, known before it starts: the adapter's bytes, the peak memory, the work.

``fit_adapter`` calls ``estimate_fit`` before the first pass over the data and refuses what
cannot fit in the memory available now (``check_budget``), so a fit never dies at minute 27.
The same numbers size the chunks (rows per step of every pass, so that the working set of one
step stays within ``STEP_BYTES`` whatever the layout) and weigh the steps of the progress
estimate (multiply-adds per row or per gate step).

The memory figures are upper bounds of what this package holds at once in each phase (float64
working copies, the reference forward's temporaries), checked against measured peak RSS in
docs/fitting.md; the work figures are multiply-adds plus a fixed allowance per step for the
per-operation overhead that dominates small problems. Neither needs to be exact: one decides
"does it fit" with a margin, the other only paces a progress bar.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prism_deploy.core import tiles
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.units import human_bytes
from prism_deploy.format import AdapterConfig, PipeSpec

F64 = 8
F32 = 4
# Working set of one step of a pass (one chunk through the reference forward, the features
# of a refit): chunks are cut smaller than --chunk-rows when a row needs more than this / rows.
STEP_BYTES = 1 << 30
# Python objects per real worker in a refit (its float64 tile tensor, its bookkeeping): measured
# at about 700 bytes per small tensor; counted generously.
PER_WORKER_BYTES = 2048
# The interpreter, torch and the libraries, before any tensor (measured RSS of an idle fit).
BASE_BYTES = 400 << 20
# Per-operation overhead in multiply-add equivalents (about 1 ms per gate step of ~100 small
# operations, 0.2 ms per chunk, at ~10 GMAC/s): what dominates small fits' time.
STEP_OVERHEAD = 10_000_000
CHUNK_OVERHEAD = 2_000_000


@dataclass(frozen=True)
class FitEstimate:
    adapter_bytes: int  # the stored tensors (what the file's data section holds)
    peak_bytes: int  # the most this fit should hold at once, interpreter included
    peak_step: str  # the phase that sets the peak
    chunk_rows: int  # rows per step of every pass (--chunk-rows, or fewer to bound a step)
    row_bytes: int  # working set per row of a step


# ---- per-pipe sizes ---------------------------------------------------------------------
def tile_params(spec: PipeSpec) -> int:
    return spec.padded_out * spec.padded_in


def gate_params(spec: PipeSpec, in_dim: int) -> int:
    return spec.workers * (in_dim + 1) if spec.gated else 0


def real_row_blocks(spec: PipeSpec, out_dim: int) -> int:
    return min(spec.rows, tiles.real_blocks(out_dim, spec.tile_rows))


def real_workers(spec: PipeSpec, in_dim: int, out_dim: int) -> int:
    return tiles.real_workers(spec.grid, spec.tile, in_dim, out_dim)


def adapter_bytes(config: AdapterConfig, itemsize: int) -> int:
    return sum((tile_params(s) + gate_params(s, config.in_dim)) * itemsize for s in config.pipes)


# ---- work, in multiply-adds ----------------------------------------------------------------
def forward_macs(config: AdapterConfig, pipes: list[int] | None = None) -> int:
    """Per row, the reference forward of the given pipes (all by default): every tile, gated or
    not (the reference computes all workers and zeroes the unselected by their gate), plus gates."""
    total = 0
    for i, s in enumerate(config.pipes):
        if pipes is None or i in pipes:
            total += tile_params(s) + (config.in_dim * s.workers if s.gated else 0)
    return total


def normal_macs(config: AdapterConfig) -> int:
    """Per row, ``X^T X`` and ``X^T Z``."""
    return config.in_dim * (config.in_dim + config.out_dim)


def gate_step_macs(config: AdapterConfig, batch_rows: int) -> int:
    """One Adam step of gate training: forward and backward of a minibatch, about 3 forwards."""
    return 3 * batch_rows * forward_macs(config) + STEP_OVERHEAD


def pass_work(macs_per_row: float, chunk_rows: int) -> float:
    """Per row of a pass: its multiply-adds plus its share of the per-chunk overhead."""
    return macs_per_row + CHUNK_OVERHEAD / max(chunk_rows, 1)


def solve_macs(dim: int, rhs: int) -> int:
    """Cholesky, its triangular solves and the condition estimate's 40 products."""
    return dim**3 // 3 + 2 * dim * dim * rhs + 40 * dim * dim


# ---- memory --------------------------------------------------------------------------------
def forward_row_bytes(config: AdapterConfig, itemsize: int = F64) -> int:
    """Per row, the temporaries of one pass step through the reference forward: the chunk as
    read and converted, each pipe's padded input, the gated pipes' per-row-block scaled input
    ``[R, C*tc]`` (the largest by far), outputs and routing."""
    io = 4 * (config.in_dim + config.out_dim)
    per_pipe = 0
    for s in config.pipes:
        work = s.padded_in + 2 * s.padded_out
        if s.gated:
            work += s.rows * s.padded_in + 4 * s.workers
        per_pipe = max(per_pipe, work)
    return (io + per_pipe + 2 * config.out_dim) * itemsize


def refit_row_bytes(config: AdapterConfig, p: int) -> int:
    """Per row, one step of a full-pipe refit: the residual, the features of every key (all
    real row-blocks of a gated pipe at once) and the other pipes' forward."""
    spec = config.pipes[p]
    keys = real_row_blocks(spec, config.out_dim) if spec.gated else 1
    return forward_row_bytes(config) + (keys * config.in_dim + 2 * config.in_dim + config.out_dim) * F64


def step_row_bytes(config: AdapterConfig) -> int:
    """Per row, the largest working set of a pass step of fit, refit or workers."""
    row = forward_row_bytes(config)
    for p, spec in enumerate(config.pipes):
        if spec.gated:
            row = max(row, refit_row_bytes(config, p))
    return row


def step_rows(config: AdapterConfig, chunk_rows: int) -> int:
    """Rows per pass step: ``chunk_rows``, or fewer when one step would hold more than
    ``STEP_BYTES`` (a gated pipe's scaled input is ``R * padded_in`` values per row)."""
    return max(1, min(chunk_rows, STEP_BYTES // step_row_bytes(config)))


def estimate_fit(
    config: AdapterConfig,
    *,
    rows_train: int,
    rows_holdout: int,
    chunk_rows: int,
    itemsize: int,
    gate_batch: int,
    method: str = "joint",
) -> FitEstimate:
    """Bytes and chunking of ``fit_adapter`` on this config (see the module docstring)."""
    d, m = config.in_dim, config.out_dim
    P = config.num_pipes
    gated = bool(config.gated_pipes)
    tiles = sum(tile_params(s) for s in config.pipes)
    gates = sum(gate_params(s, d) for s in config.pipes)
    largest_tile = max(tile_params(s) for s in config.pipes)
    normal = (d * d + d * m) * F64
    stored = (tiles + gates) * itemsize
    solve = (4 * d * d + 3 * d * m) * F64
    work = (tiles + gates) * F64
    workers = sum(real_workers(s, d, m) for s in config.pipes) * PER_WORKER_BYTES

    row = step_row_bytes(config)
    chunk = step_rows(config, chunk_rows)
    held = min(chunk, max(rows_train, rows_holdout, 1)) * row  # a step never holds more rows than there are

    phases: dict[str, int] = {
        "the least-squares solve": normal + solve + (1 + P) * d * m * F64,
        "cutting the solution into tiles": normal + (1 + P) * d * m * F64 + work + 2 * largest_tile * F64,
        "evaluating the adapter": normal + work + stored + 2 * largest_tile * F64 + held,
        "writing the adapter": stored * 2 + work,
    }
    if method == "per-tile":
        phases["the least-squares solve"] += solve
    if gated:
        refit = max(
            (real_row_blocks(s, m) if s.gated else 1) * (d * d * F64 + solve // 2)
            + 2 * d * m * F64
            + tile_params(s) * F64
            for s in config.pipes
        )
        # the working adapter, the round's saved copy, the fixed part (a float64 copy with the
        # pipe's tiles zeroed), the new tiles, the grams, and the other pipes' forward (which
        # copies its tiles into the product's layout on every call)
        phases["re-solving the workers of a pipe"] = normal + 3 * work + refit + workers + held + 2 * largest_tile * F64
        batch_row = 3 * forward_row_bytes(config, F32) // 2
        phases["training the gates"] = (
            normal
            + 2 * work
            + tiles * F32
            + 4 * gates * F32
            + gate_batch * batch_row
            + 16 * gate_batch * (d + m) * F32 * 2
        )
    step = max(phases, key=lambda k: phases[k])
    return FitEstimate(stored, BASE_BYTES + phases[step], step, chunk, row)


def available_memory() -> int | None:
    """Bytes the system can give this process now without swapping (``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_budget(estimate: FitEstimate, what: str = "this fit") -> None:
    """Refuse, before any computing, a fit whose peak cannot fit in the memory available now."""
    free = available_memory()
    if free is not None and estimate.peak_bytes > free:
        raise PrismInputError(
            f"{what} needs about {human_bytes(estimate.peak_bytes)} of memory at its peak "
            f"({estimate.peak_step}; the adapter alone is {human_bytes(estimate.adapter_bytes)}), "
            f"more than the {human_bytes(free)} available: use fewer workers or smaller tiles "
            "(--workers, --grid, --mostly-padding adapt), or fewer gated pipes"
        )
