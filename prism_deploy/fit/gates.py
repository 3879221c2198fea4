"""Training the gates of gated pipes with every tile frozen (Adam).

The loss is the mean squared error of the combined output over the training rows, scaled by
the mean squared target so that the learning rate does not depend on the data's scale. The
top-k selection is piecewise constant, so the gradient reaches the gate only through the
softmax weights of the selected workers, ``g = gate_scale * softmax(s[I])``: the reference's
``route`` followed by ``Pipe.forward(x, gates=dense)``, the same function computed per column
block (``column_outputs``): with the tiles frozen, each worker's output ``x_c tiles[w]^T`` does
not depend on the gates, so it is computed once per minibatch without autograd, and the
backward pass is only the gate weights' small contraction. The reference's form differentiates
through the tile product and pays for it twice (measured in docs/fitting.md).
"""

from __future__ import annotations

import math

import torch

from prism_deploy.fit.budget import gate_step_macs
from prism_deploy.fit.progress import progress_bar
from prism_deploy.fit.stream import PairedData
from prism_deploy.format import PipeSpec
from prism_deploy.reference import PrismAdapter, route

BATCHES_PER_BLOCK = 16


def init_gates(adapter: PrismAdapter, x_rms: float, seed: int) -> None:
    """Random gate weights, scaled so that the scores start with unit spread, zero bias."""
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 / (math.sqrt(adapter.in_dim) * max(x_rms, 1e-12))
    with torch.no_grad():
        for pipe in adapter.pipe_list():
            if pipe.gate is not None:
                w = torch.randn(pipe.gate.weight.shape, generator=gen, dtype=torch.float64) * scale
                pipe.gate.weight.copy_(w.to(pipe.gate.weight.dtype))
                pipe.gate.bias.zero_()


def train_gates(
    adapter: PrismAdapter,
    data: PairedData,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    batch_rows: int = 256,
    seed: int = 0,
    desc: str = "train gates",
) -> list[float]:
    """``steps`` Adam steps on the gates (in place); returns the loss of each step."""
    pipes = adapter.pipe_list()
    gated = [i for i, p in enumerate(pipes) if p.gate is not None]
    if not gated or steps <= 0:
        return []
    params = {}
    for i in gated:
        g = pipes[i].gate
        assert g is not None
        params[i] = (
            g.weight.detach().float().clone().requires_grad_(True),
            g.bias.detach().float().clone().requires_grad_(True),
        )
    # Adam moves each entry by about ``lr`` per step whatever its gradient's size, so the
    # weights' step is scaled by their own size (scores start at unit spread, see init_gates):
    # ``lr`` is then a relative step, the same for any in_dim or activation scale.
    flat: list[torch.Tensor] = []
    rates: list[float] = []
    for w, b in params.values():
        rms = float(w.detach().pow(2).mean().sqrt()) or 1.0
        flat += [w, b]
        rates += [lr * rms, lr]
    opt = Adam(flat, rates)
    betas = adapter.betas(torch.float32)
    tiles = {i: column_tiles(p.spec, p.tiles.detach()) for i, p in enumerate(pipes) if i in params}
    losses: list[float] = []
    epoch = 0
    with progress_bar(steps, desc, unit="step", work=gate_step_macs(adapter.config, batch_rows)) as bar:
        while len(losses) < steps:
            # Minibatches are shuffled within fixed blocks of training rows, each block with
            # its own seed: the same batches whatever the file's chunk size.
            for block, (x, z) in enumerate(data.blocks("train", batch_rows * BATCHES_PER_BLOCK, torch.float32)):
                gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + block) % (1 << 62))
                order = torch.randperm(x.shape[0], generator=gen)
                for a in range(0, x.shape[0], batch_rows):
                    idx = order[a : a + batch_rows]
                    xb, zb = x[idx], z[idx]
                    y = torch.zeros_like(zb)
                    for i, pipe in enumerate(pipes):
                        if i in params:
                            gw, gb = params[i]
                            dense = route(xb, gw, gb, pipe.spec.top_k, pipe.spec.gate_scale).dense  # type: ignore[arg-type]
                            with torch.no_grad():
                                u = column_outputs(pipe.spec, tiles[i], xb)
                            y = y + betas[i] * gated_output(pipe.spec, u, dense, adapter.out_dim)
                        else:
                            with torch.no_grad():
                                y = y + betas[i] * pipe(xb)
                    loss = ((y - zb) ** 2).sum(1).mean() / (zb**2).sum(1).mean().clamp_min(1e-30)
                    opt.step(torch.autograd.grad(loss, flat))
                    losses.append(float(loss.detach()))
                    bar.update(1)
                    if len(losses) >= steps:
                        break
                if len(losses) >= steps:
                    break
            epoch += 1
    with torch.no_grad():
        for i, (w, b) in params.items():
            gate = pipes[i].gate
            assert gate is not None
            gate.weight.copy_(w.to(gate.weight.dtype))
            gate.bias.copy_(b.to(gate.bias.dtype))
    return losses


def column_tiles(spec: PipeSpec, tiles: torch.Tensor) -> torch.Tensor:
    """``[C, tc, R*tr]`` float32: per column block, its ``R`` workers' tiles side by side."""
    (R, C), (tr, tc) = spec.grid, spec.tile
    return tiles.float().reshape(R, C, tr, tc).permute(1, 3, 0, 2).reshape(C, tc, R * tr).contiguous()


def column_outputs(spec: PipeSpec, wt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[N, R, C, tr]``: every worker's output ``x_c tiles[r, c]^T`` before its gate (one bmm)."""
    (R, C), (tr, tc) = spec.grid, spec.tile
    n = x.shape[0]
    xp = torch.nn.functional.pad(x, (0, spec.padded_in - x.shape[1]))
    u = torch.bmm(xp.reshape(n, C, tc).transpose(0, 1), wt)  # [C, N, R*tr]
    return u.reshape(C, n, R, tr).permute(1, 2, 0, 3)


def gated_output(spec: PipeSpec, u: torch.Tensor, dense: torch.Tensor, out_dim: int) -> torch.Tensor:
    """``[N, out_dim]``: ``y_r = sum_c g_{rc} u_{rc}``, the reference's ``Pipe.forward(x, gates=dense)``."""
    (R, C), (tr, _) = spec.grid, spec.tile
    n = u.shape[0]
    return torch.matmul(dense.reshape(n, R, 1, C), u).reshape(n, R * tr)[:, :out_dim]


class Adam:
    """``torch.optim.Adam`` with its defaults (betas 0.9, 0.999, eps 1e-8, no weight decay), one
    learning rate per tensor: the same arithmetic, operation for operation, as torch's
    single-tensor step on CPU (tests/fit/test_speed.py compares them bit for bit). Written out because
    constructing ``torch.optim.Adam`` imports ``torch._dynamo``: 0.8-1 s per process, a fifth of
    a small gated fit."""

    def __init__(
        self, params: list[torch.Tensor], lrs: list[float], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.params, self.lrs, self.betas, self.eps = params, lrs, betas, eps
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self, grads: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        # torch counts steps in a float32 tensor and reads it back with .item(): exact integers.
        step = float(self.steps)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        bias_correction2_sqrt = bias_correction2**0.5
        for p, grad, m, v, lr in zip(self.params, grads, self.exp_avg, self.exp_avg_sq, self.lrs):
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-(lr / bias_correction1))
