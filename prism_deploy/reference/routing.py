"""Gate semantics: top-k worker selection and the softmax weights of the selected workers."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Routing(NamedTuple):
    scores: torch.Tensor  # [N, W] gate scores s = x @ W^T + b
    indices: torch.Tensor  # [N, k] selected workers, highest score first
    weights: torch.Tensor  # [N, k] gate_scale * softmax(s[indices])
    dense: torch.Tensor  # [N, W] g_w: the weights scattered into a zero map


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest entries per row, ties broken toward the lower index (as ONNX TopK).

    The definition is a stable descending sort (:func:`top_k_by_sort`): equal scores keep
    their index order, hence the lower index comes first. ``torch.topk`` gives the same ``k``
    indices in the same order whenever a row has no tie among its top ``k`` nor at the
    boundary with the rest (its values are then strictly decreasing and the set is forced),
    at a fraction of a full sort's cost (a third of a gated fit's time went to the sort:
    docs/fitting.md); rows with such a tie, or a NaN, are given to the sort.
    """
    if scores.ndim != 2 or scores.shape[-1] == 0 or k == 0:
        return top_k_by_sort(scores, k)
    values, indices = torch.topk(scores, k, dim=-1, largest=True, sorted=True)
    boundary_tie = (scores >= values[:, -1:]).sum(-1) > k
    inner_tie = (values[:, 1:] == values[:, :-1]).any(-1) if k > 1 else torch.zeros_like(boundary_tie)
    # topk and the sort both rank NaN above every number; their order among NaNs is the sort's
    odd = torch.nonzero(boundary_tie | inner_tie | torch.isnan(values).any(-1)).flatten()
    if odd.numel():
        indices[odd] = top_k_by_sort(scores[odd], k)
    return indices


def top_k_by_sort(scores: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`top_k_indices` by its definition: a stable descending sort, first ``k``."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def route(
    x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor, top_k: int, gate_scale: float
) -> Routing:
    """Gate a batch of tokens ``x`` ``[N, in_dim]`` (already in the compute dtype)."""
    scores = x @ gate_weight.to(x.dtype).T + gate_bias.to(x.dtype)
    indices = top_k_indices(scores, top_k)
    weights = gate_scale * torch.softmax(scores.gather(-1, indices), dim=-1)
    dense = torch.zeros_like(scores).scatter(-1, indices, weights)
    return Routing(scores, indices, weights, dense)
