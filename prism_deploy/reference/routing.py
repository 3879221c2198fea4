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

    ``torch.topk`` does not promise an order for ties, so use a stable descending sort:
    equal scores keep their index order, hence the lower index comes first.
    """
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
