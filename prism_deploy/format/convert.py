"""Import of the seed's own artifact: a ``torch.save``'d ``[W, tr, tc]`` tile tensor.

The seed trains one grid of tiles and saves ``torch.stack(tiles)`` with ``torch.save``. That
file is a pickle, and a pickle can run code when loaded, so it is read only with
``torch.load(weights_only=True)``, which refuses anything but plain tensors and containers.
The tensor becomes the single, ungated pipe of a v1 adapter. The file does not record the
grid, so it is given (``grid``) or inferred from the dims (``infer_grid``).
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.core.errors import AdapterFormatError, PrismInputError, brief, require_torch
from prism_deploy.core.tiles import real_blocks
from prism_deploy.format.adapter_config import AdapterConfig, PipeSpec
from prism_deploy.format.adapter_file import (
    FLOAT_DTYPES,
    AdapterTensors,
    _as_numpy,
    validate_tensors,
    write_adapter_file,
)


def load_seed_tiles(path: str | os.PathLike[str]) -> np.ndarray:
    """The ``[W, tr, tc]`` float tensor of a seed ``.pt`` file, read without running its code."""
    p = Path(path)
    if not p.is_file():
        raise PrismInputError(f"{p}: no such file")
    require_torch("reading a torch.save'd .pt file")
    import torch

    try:
        with warnings.catch_warnings():
            # torch warns (on stderr) about pickle protocols; the project prints one line only
            warnings.simplefilter("ignore")
            obj = torch.load(str(p), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise PrismInputError(
            f"{p}: refused by torch.load(weights_only=True) ({_weights_only_reason(exc)}): only a "
            "torch.save'd tensor is accepted, and no code in the file is ever run"
        ) from None
    except Exception as exc:  # torch.load's many ways to fail on a file that is not a .pt
        raise PrismInputError(
            f"{p}: not a file torch.load can read ({brief(f'{type(exc).__name__}: {exc}')})"
        ) from None
    if not isinstance(obj, torch.Tensor):
        raise PrismInputError(f"{p}: holds a {type(obj).__name__}, expected one tensor [workers, tile_rows, tile_cols]")
    if obj.dim() != 3:
        raise PrismInputError(
            f"{p}: tensor has shape {list(obj.shape)}, expected 3 dims [workers, tile_rows, tile_cols]"
        )
    if not obj.is_floating_point():
        raise PrismInputError(f"{p}: tensor dtype {_dtype(obj)} is not a float type")
    if 0 in obj.shape:
        raise PrismInputError(f"{p}: tensor has an empty dimension, shape {list(obj.shape)}")
    if obj.untyped_storage().nbytes() < obj.numel() * obj.element_size():
        # an expanded view (stride 0) of a small storage: its dense copy could be terabytes
        raise PrismInputError(
            f"{p}: tensor of shape {list(obj.shape)} is a view of a storage of "
            f"{obj.untyped_storage().nbytes()} bytes (an expanded tensor); save a plain tensor"
        )
    if obj.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        # float64 (what a float64 least-squares solve gives) is not a format v1 dtype
        obj = obj.to(torch.float32)
    return _as_numpy(obj)


def infer_grid(workers: int, tile: tuple[int, int], in_dim: int, out_dim: int) -> tuple[int, int]:
    """The one grid ``R x C = workers`` whose tiles cover ``out_dim x in_dim``.

    Every covering pair has the same padded area (``workers * tr * tc``) and the same number
    of all-padding workers (``workers - ceil(out/tr) * ceil(in/tc)``), so "least padding" cannot
    choose between two of them: more than one covering pair is reported as ambiguous.
    """
    tr, tc = tile
    small = [r for r in range(1, math.isqrt(workers) + 1) if workers % r == 0]
    rows = sorted(set(small) | {workers // r for r in small})  # every divisor, in O(sqrt W)
    covering = [(r, workers // r) for r in rows if r * tr >= out_dim and (workers // r) * tc >= in_dim]
    if not covering:
        need_r, need_c = real_blocks(out_dim, tr), real_blocks(in_dim, tc)
        raise PrismInputError(
            f"--grid: no grid R x C = {workers} of {tr}x{tc} tiles covers in_dim={in_dim}, out_dim={out_dim} "
            f"(it needs R >= {need_r} and C >= {need_c}, {need_r * need_c} workers); check --in-dim/--out-dim"
        )
    if len(covering) > 1:
        listed = ", ".join(f"{r}x{c}" for r, c in covering)
        raise PrismInputError(
            f"--grid: ambiguous: {len(covering)} grids of {workers} workers cover the dims ({listed}), "
            "all with the same padding; pass --grid R C"
        )
    return covering[0]


def tiles_to_adapter(
    tiles: Any,
    in_dim: int,
    out_dim: int,
    grid: tuple[int, int] | None = None,
    name: str = "pipe1",
) -> AdapterTensors:
    """One ungated pipe holding ``tiles`` (worker ``w = r*C + c``, as the seed numbers them)."""
    for key, value in (("--in-dim", in_dim), ("--out-dim", out_dim)):
        if value < 1:
            raise PrismInputError(f"{key}: must be a positive integer, got {value}")
    workers, tr, tc = tiles.shape
    if grid is None:
        grid = infer_grid(workers, (tr, tc), in_dim, out_dim)
    R, C = grid
    if R < 1 or C < 1 or R * C != workers:
        raise PrismInputError(f"--grid: {R}x{C} = {R * C} workers, but the tensor holds {workers}")
    tiles = _as_numpy(tiles)
    if tiles.dtype not in FLOAT_DTYPES:
        # float64 (what a float64 least-squares solve gives) is not a format v1 dtype
        tiles = tiles.astype(np.float32)
    try:
        config = AdapterConfig(in_dim, out_dim, (PipeSpec(name, (R, C), (tr, tc), None),))
    except AdapterFormatError as exc:
        raise PrismInputError(f"--grid {R} {C}: {exc}") from None
    tensors = {"pipes.0.tiles": np.ascontiguousarray(tiles)}
    validate_tensors(config, tensors)  # NaN/Inf: refuse before anything is written
    return AdapterTensors(config, tensors)


def convert_seed_tiles(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    in_dim: int,
    out_dim: int,
    grid: tuple[int, int] | None = None,
    name: str = "pipe1",
) -> AdapterTensors:
    """Read a seed ``.pt`` file and write it as a v1 adapter (atomically)."""
    tiles = load_seed_tiles(path)
    try:
        data = tiles_to_adapter(tiles, in_dim, out_dim, grid, name)
    except PrismInputError as exc:
        raise PrismInputError(f"{path}: {exc}") from None
    write_adapter_file(output, data.config, data.tensors)
    return data


def _weights_only_reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for marker in ("GLOBAL", "Unsupported", "Unpickler"):
        for line in lines:
            if marker in line and not line.startswith("Please file an issue"):
                return line.rstrip(".")
    return "weights_only load failed"


def _dtype(t: Any) -> str:
    return str(t.dtype).removeprefix("torch.")
