"""Random adapters of any config: for tests, benchmarks and the shipped example."""

from __future__ import annotations

import math
from typing import Any

import torch

from prism_deploy.core.tiles import covering_tile
from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.reference.module import PrismAdapter


def random_adapter(
    config: AdapterConfig | dict[str, Any],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PrismAdapter:
    """An adapter with Gaussian tiles scaled so outputs have about unit variance.

    Tiles are scaled by 1/sqrt(in_dim) (each output sums over the input), gates by
    1/sqrt(in_dim) with a small bias, so that top-k selections are neither all ties nor
    dominated by the bias.
    """
    cfg = AdapterConfig.from_json(config) if isinstance(config, dict) else config
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    scale = 1.0 / math.sqrt(cfg.in_dim)
    for i, p in enumerate(cfg.pipes):
        tiles = torch.randn(p.workers, p.tile_rows, p.tile_cols, generator=gen) * scale
        tensors[f"pipes.{i}.tiles"] = tiles.to(dtype)
        if p.gated:
            tensors[f"pipes.{i}.gate.weight"] = (torch.randn(p.workers, cfg.in_dim, generator=gen) * scale).to(dtype)
            tensors[f"pipes.{i}.gate.bias"] = (torch.randn(p.workers, generator=gen) * 0.1).to(dtype)
    if cfg.combine == "weighted":
        tensors["combine.weight"] = (torch.rand(cfg.num_pipes, generator=gen) + 0.5).to(dtype)
    return PrismAdapter(cfg, tensors)


def simple_config(
    in_dim: int,
    out_dim: int,
    grid: tuple[int, int],
    *,
    top_k: int | None = None,
    pipes: int = 1,
    combine: str = "sum",
    gate_scale: float = 1.0,
) -> AdapterConfig:
    """``pipes`` identical pipes of the smallest tiles that cover the dims with ``grid``."""
    tile = covering_tile(grid, in_dim, out_dim)
    specs = tuple(PipeSpec(f"pipe{i + 1}", grid, tile, top_k, gate_scale) for i in range(pipes))
    return AdapterConfig(in_dim, out_dim, specs, combine)
