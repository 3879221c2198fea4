"""Training the gates of gated pipes with every tile frozen (Adam).

The loss is the mean squared error of the combined output over the training rows, scaled by
the mean squared target so that the learning rate does not depend on the data's scale. The
top-k selection is piecewise constant, so the gradient reaches the gate only through the
softmax weights of the selected workers, ``g = gate_scale * softmax(s[I])``: exactly the
reference's ``route`` followed by ``Pipe.forward(x, gates=dense)``.
"""

from __future__ import annotations

import math

import torch

from prism_deploy.fit.budget import gate_step_macs
from prism_deploy.fit.progress import progress_bar
from prism_deploy.fit.stream import PairedData
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
        params[i] = (g.weight.detach().float().clone().requires_grad_(True),
                     g.bias.detach().float().clone().requires_grad_(True))
    # Adam moves each entry by about ``lr`` per step whatever its gradient's size, so the
    # weights' step is scaled by their own size (scores start at unit spread, see init_gates):
    # ``lr`` is then a relative step, the same for any in_dim or activation scale.
    groups = []
    for w, b in params.values():
        rms = float(w.detach().pow(2).mean().sqrt()) or 1.0
        groups += [{"params": [w], "lr": lr * rms}, {"params": [b], "lr": lr}]
    opt = torch.optim.Adam(groups)
    betas = adapter.betas(torch.float32)
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
                    idx = order[a:a + batch_rows]
                    xb, zb = x[idx], z[idx]
                    y = torch.zeros_like(zb)
                    for i, pipe in enumerate(pipes):
                        if i in params:
                            gw, gb = params[i]
                            dense = route(xb, gw, gb, pipe.spec.top_k, pipe.spec.gate_scale).dense  # type: ignore[arg-type]
                            y = y + betas[i] * pipe(xb, gates=dense)
                        else:
                            with torch.no_grad():
                                y = y + betas[i] * pipe(xb)
                    loss = ((y - zb) ** 2).sum(1).mean() / (zb**2).sum(1).mean().clamp_min(1e-30)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
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
