"""The PyTorch reference: the semantics of docs/adapter-format.md, as an ``nn.Module``.

Every other backend (ONNX graphs, the CUDA kernel, TensorRT engines) is checked against
``PrismAdapter.forward``. It is written for clarity and exactness first, but vectorised:
no Python loop over workers or tokens, only batched matmuls over the tile grid.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from prism_deploy.core.tiles import dense_from_tiles
from prism_deploy.format import AdapterConfig, AdapterTensors, PipeSpec, read_adapter_file, write_adapter_file
from prism_deploy.format.adapter_file import BFLOAT16
from prism_deploy.format.adapter_file import describe as describe_tensors
from prism_deploy.reference.routing import Routing, route


def compute_dtype_for(x: torch.Tensor) -> torch.dtype:
    """float32 whatever is stored; float64 when the caller asks for it with float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Gate(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)


class Combine(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


class Pipe(nn.Module):
    """One grid of tiles, with its optional gate."""

    def __init__(
        self,
        spec: PipeSpec,
        in_dim: int,
        out_dim: int,
        tiles: torch.Tensor,
        gate: Gate | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.tiles = nn.Parameter(tiles)
        self.gate = gate

    def routing(self, x2: torch.Tensor) -> Routing | None:
        """Gate ``x2`` ``[N, in_dim]``; ``None`` for an ungated pipe."""
        if self.gate is None:
            return None
        assert self.spec.top_k is not None
        return route(x2, self.gate.weight, self.gate.bias, self.spec.top_k, self.spec.gate_scale)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tiles assembled into the padded ``[R*tr, C*tc]`` matrix (worker w = r*C + c)."""
        return dense_from_tiles(self.tiles.to(dtype), self.spec.grid, self.spec.tile)

    def padded_input(self, x2: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x2, (0, self.spec.padded_in - self.in_dim))

    def forward(self, x2: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        """``x2`` ``[N, in_dim]`` in the compute dtype -> the pipe's output ``[N, out_dim]``.

        ``gates`` ``[N, R*C]`` overrides the gate's own weights (used by fitting, which
        holds the routing fixed); by default a gated pipe routes ``x2`` itself.
        """
        if gates is None:
            routing = self.routing(x2)
            gates = None if routing is None else routing.dense
        (R, C), (tr, tc) = self.spec.grid, self.spec.tile
        n = x2.shape[0]
        xp = self.padded_input(x2)
        if gates is None:
            yp = xp @ self.dense_weight(x2.dtype).T
        else:
            # Scale each column-block of the input by the gate of the worker that reads it,
            # separately for each row-block, then one matmul per row-block (batched):
            # yp[:, r] = sum_c g[:, r, c] * (x_c @ tiles[r, c]^T). The sum over c happens
            # inside the matmul's reduction, so workers sharing a row-block add up.
            g = gates.to(x2.dtype).reshape(n, R, C).permute(1, 0, 2)  # [R, N, C]
            scaled = (g.unsqueeze(-1) * xp.reshape(1, n, C, tc)).reshape(R, n, C * tc)
            w = self.tiles.to(x2.dtype).reshape(R, C, tr, tc).permute(0, 1, 3, 2)
            yp = torch.bmm(scaled, w.reshape(R, C * tc, tr)).permute(1, 0, 2).reshape(n, R * tr)
        return yp[:, : self.out_dim]


class PrismAdapter(nn.Module):
    """A loaded adapter. ``forward(x)`` maps ``[..., in_dim]`` to ``[..., out_dim]``."""

    def __init__(self, config: AdapterConfig, tensors: Mapping[str, Any]) -> None:
        super().__init__()
        self.config = config
        tensors = {name: as_tensor(t) for name, t in tensors.items()}
        pipes = []
        for i, spec in enumerate(config.pipes):
            gate = None
            if spec.gated:
                gate = Gate(tensors[f"pipes.{i}.gate.weight"], tensors[f"pipes.{i}.gate.bias"])
            pipes.append(Pipe(spec, config.in_dim, config.out_dim, tensors[f"pipes.{i}.tiles"], gate))
        self.pipes = nn.ModuleList(pipes)
        self.combine = Combine(tensors["combine.weight"]) if config.combine == "weighted" else None
        self.requires_grad_(False)

    # ---- semantics -------------------------------------------------------------------
    @property
    def in_dim(self) -> int:
        return self.config.in_dim

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def pipe_list(self) -> list[Pipe]:
        return [p for p in self.pipes if isinstance(p, Pipe)]

    def betas(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.combine is None:
            return torch.ones(self.config.num_pipes, dtype=dtype)
        return self.combine.weight.to(dtype)

    def _flatten(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"input has last dimension {x.shape[-1]}, adapter expects in_dim={self.in_dim}")
        if not torch.is_floating_point(x):
            raise TypeError(f"input must be a float tensor, got {x.dtype}")
        lead = tuple(x.shape[:-1])
        return x.reshape(-1, self.in_dim).to(compute_dtype_for(x)), lead

    def pipe_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each pipe's output ``[..., out_dim]`` before its combine weight."""
        x2, lead = self._flatten(x)
        return [p(x2).reshape(*lead, self.out_dim) for p in self.pipe_list()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = self._flatten(x)
        betas = self.betas(x2.dtype)
        y = torch.zeros(x2.shape[0], self.out_dim, dtype=x2.dtype, device=x2.device)
        for beta, pipe in zip(betas, self.pipe_list()):  # a loop over pipes (1-3), not workers
            y = y + beta * pipe(x2)
        return y.reshape(*lead, self.out_dim)

    def routings(self, x: torch.Tensor) -> list[Routing | None]:
        x2, _ = self._flatten(x)
        return [p.routing(x2) for p in self.pipe_list()]

    def dense_matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``[out_dim, in_dim]``: the whole adapter as one matrix, exact only if no pipe is gated."""
        if self.config.gated_pipes:
            raise ValueError("a gated adapter is not one matrix: its routing depends on the input")
        betas = self.betas(dtype)
        mats = [b * p.dense_weight(dtype)[: self.out_dim, : self.in_dim] for b, p in zip(betas, self.pipe_list())]
        return torch.stack(mats).sum(0)

    # ---- storage -------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The file's tensors, named as format v1 names them, in their stored dtypes."""
        return {name: t.detach() for name, t in self.state_dict().items()}

    def arrays(self) -> AdapterTensors:
        """The same tensors as numpy arrays (views where the dtype allows), for the torch-free
        layers (lowering, inspection)."""
        return AdapterTensors(self.config, {name: as_array(t) for name, t in self.tensors().items()})

    def save(self, path: str | os.PathLike[str]) -> None:
        write_adapter_file(path, self.config, self.tensors())

    def describe(self) -> dict[str, Any]:
        return describe(self.config, self.tensors())

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (what the file's data section holds)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def flops_per_token(self) -> dict[str, int]:
        """``{"dense": ..., "gated": ...}``: every worker, or only the selected ones (plus gates)."""
        return dict(self.describe()["flops_per_token"])


class ReferenceAdapterRunner:
    """The PyTorch reference (float32) on numpy arrays: exact, slow, never a deployed engine.
    Pass one as ``adapter=`` to run a pipeline on the reference adapter."""

    kind = "reference"

    def __init__(self, path_or_adapter: str | os.PathLike[str] | PrismAdapter) -> None:
        self.adapter = path_or_adapter if isinstance(path_or_adapter, PrismAdapter) else load_adapter(path_or_adapter)
        self.in_dim = self.adapter.config.in_dim
        self.out_dim = self.adapter.config.out_dim
        self.precision = "fp32"

    def run(self, hidden: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.adapter(torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))).numpy()


def load_adapter(path: str | os.PathLike[str]) -> PrismAdapter:
    """Read, validate and wrap an adapter file (format v1)."""
    data = read_adapter_file(path)
    return PrismAdapter(data.config, data.tensors)


def save_adapter(
    adapter_or_tensors: PrismAdapter | dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    config: AdapterConfig | dict[str, Any] | None = None,
) -> None:
    """Write a valid v1 file atomically. ``config`` defaults to the adapter's own."""
    if isinstance(adapter_or_tensors, PrismAdapter):
        tensors = adapter_or_tensors.tensors()
        cfg = adapter_or_tensors.config if config is None else config
    else:
        tensors = dict(adapter_or_tensors)
        if config is None:
            raise ValueError("save_adapter: a config is needed when saving bare tensors")
        cfg = config
    if isinstance(cfg, dict):
        cfg = AdapterConfig.from_json(cfg)
    write_adapter_file(path, cfg, tensors)


def describe(config: AdapterConfig, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Sizes, FLOPs and weight bytes per token (``prism_deploy.format.describe`` on these tensors)."""
    return describe_tensors(config, tensors)


def as_tensor(t: Any) -> torch.Tensor:
    """A numpy array (bfloat16 from ``ml_dtypes`` included) or tensor as a torch tensor, sharing
    memory where it can."""
    if isinstance(t, torch.Tensor):
        return t
    a = np.asarray(t)
    if a.dtype == BFLOAT16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    if not a.flags.writeable:  # torch warns on read-only memory (safetensors maps the file)
        a = a.copy()
    return torch.from_numpy(np.ascontiguousarray(a))


def as_array(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu")
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(BFLOAT16)
    return t.numpy()
