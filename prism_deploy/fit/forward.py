"""The reference forward and routing, bit for bit, without the reference's full sort.

``reference.top_k_indices`` sorts every row of scores (stable, so that ties go to the lower
index, as ONNX TopK does) to keep ``k`` of them: a full sort of ``[rows, workers]``, 96 ms
for 4096 rows of 512 float64 scores here, where ``torch.topk`` takes 5.5 ms. With 512 workers
per pipe at 256 -> 160 the sorts were a third of a gated fit's time (docs/fitting.md). The
semantics are the reference's and stay there; this module only computes the same indices
faster: ``torch.topk`` returns the same ``k`` indices in the same order whenever a row has no
tie among its top ``k`` and none at the boundary with the rest (then its values are strictly
decreasing and the set is forced); rows with such a tie, rare with float scores, are handed
to the reference's own stable sort. Everything after the indices (gather, softmax, scatter,
each pipe's forward with those gates, the sum over pipes) is the reference's code or the
same expressions in the same order, so outputs are identical, not merely close
(tests/test_fit_preflight.py checks ``torch.equal`` against the reference, ties included).
"""

from __future__ import annotations

import torch

from prism_deploy.reference import Pipe, PrismAdapter, Routing, top_k_indices


def top_k_exact(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``reference.top_k_indices(scores, k)`` for 2-D ``scores``, by ``torch.topk``."""
    if scores.shape[-1] == 0 or k == 0:
        return top_k_indices(scores, k)
    values, indices = torch.topk(scores, k, dim=-1, largest=True, sorted=True)
    kth = values[:, -1:]
    boundary_tie = (scores >= kth).sum(-1) > k
    inner_tie = (values[:, 1:] == values[:, :-1]).any(-1) if k > 1 else torch.zeros_like(boundary_tie)
    # topk and the sort both rank NaN above every number, so a row with a NaN has it among
    # its top k; its order against other NaNs is the sort's business: hand the row over.
    odd = torch.isnan(values).any(-1)
    ties = torch.nonzero(boundary_tie | inner_tie | odd).flatten()
    if ties.numel():
        indices[ties] = top_k_indices(scores[ties], k)
    return indices


def route(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor, top_k: int, gate_scale: float) -> Routing:
    """``reference.route``, the same expressions, with ``top_k_exact`` for the selection."""
    scores = x @ gate_weight.to(x.dtype).T + gate_bias.to(x.dtype)
    indices = top_k_exact(scores, top_k)
    weights = gate_scale * torch.softmax(scores.gather(-1, indices), dim=-1)
    dense = torch.zeros_like(scores).scatter(-1, indices, weights)
    return Routing(scores, indices, weights, dense)


def routing(pipe: Pipe, x2: torch.Tensor) -> Routing | None:
    """``pipe.routing(x2)``."""
    if pipe.gate is None:
        return None
    assert pipe.spec.top_k is not None
    return route(x2, pipe.gate.weight, pipe.gate.bias, pipe.spec.top_k, pipe.spec.gate_scale)


def pipe_forward(pipe: Pipe, x2: torch.Tensor) -> torch.Tensor:
    """``pipe(x2)``: the reference's own forward, given the gates it would compute."""
    r = routing(pipe, x2)
    return pipe(x2, gates=None if r is None else r.dense)


def adapter_forward(adapter: PrismAdapter, x2: torch.Tensor) -> torch.Tensor:
    """``adapter(x2)`` for a 2-D float64 or float32 batch: the reference's loop over pipes."""
    betas = adapter.betas(x2.dtype)
    y = torch.zeros(x2.shape[0], adapter.out_dim, dtype=x2.dtype, device=x2.device)
    for beta, pipe in zip(betas, adapter.pipe_list()):
        y = y + beta * pipe_forward(pipe, x2)
    return y
