"""The worked example of docs/adapter-format.md, number for number (computed there by hand)."""

from __future__ import annotations

import math

import torch

from prism_deploy import AdapterConfig, PipeSpec, load_adapter, save_adapter


def worked_example():
    config = AdapterConfig(
        in_dim=3,
        out_dim=3,
        pipes=(
            PipeSpec("dense", grid=(2, 2), tile=(2, 2), top_k=None),
            PipeSpec("gated", grid=(1, 3), tile=(3, 1), top_k=2, gate_scale=2.0),
        ),
        combine="weighted",
    )
    tensors = {
        "pipes.0.tiles": torch.tensor(
            [
                [[1.0, 0.0], [0.0, 1.0]],  # worker 0: r=0, c=0
                [[1.0, 0.0], [0.0, 0.0]],  # worker 1: r=0, c=1
                [[0.0, 1.0], [0.0, 0.0]],  # worker 2: r=1, c=0
                [[2.0, 5.0], [7.0, 7.0]],  # worker 3: r=1, c=1 (the 5 and the 7s only meet padding)
            ]
        ),
        "pipes.1.tiles": torch.tensor([[[1.0], [1.0], [0.0]], [[0.0], [2.0], [0.0]], [[5.0], [5.0], [5.0]]]),
        "pipes.1.gate.weight": torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, -1.0]]),
        "pipes.1.gate.bias": torch.tensor([math.log(3.0), 1.0, 2.0]),
        "combine.weight": torch.tensor([1.0, 2.0]),
    }
    return config, tensors


def test_worked_example_numbers(tmp_path):
    config, tensors = worked_example()
    path = tmp_path / "worked.safetensors"
    save_adapter(tensors, path, config)
    adapter = load_adapter(path)
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    dense, gated = adapter.pipe_outputs(x)
    torch.testing.assert_close(dense, torch.tensor([[4.0, 2.0, 8.0]], dtype=torch.float64))
    (_, routing) = adapter.routings(x)
    torch.testing.assert_close(routing.scores, torch.tensor([[math.log(3.0), 0.0, -1.0]], dtype=torch.float64))
    assert routing.indices.tolist() == [[0, 1]]
    torch.testing.assert_close(routing.dense, torch.tensor([[1.5, 0.5, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(gated, torch.tensor([[1.5, 3.5, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(adapter(x), torch.tensor([[7.0, 9.0, 8.0]], dtype=torch.float64))
    # the padded output of the dense pipe, before the cut to out_dim: [4, 2, 8, 21]
    pipe = adapter.pipe_list()[0]
    xp = pipe.padded_input(x)
    torch.testing.assert_close(
        xp @ pipe.dense_weight(torch.float64).T, torch.tensor([[4.0, 2.0, 8.0, 21.0]], dtype=torch.float64)
    )


def test_worked_example_ties():
    # x = [0, 0, 1]: scores [ln 3, 1, 1]; top-2 = worker 0, then the tie 1 = 1 goes to worker 1
    config, tensors = worked_example()
    from prism_deploy import PrismAdapter

    adapter = PrismAdapter(config, tensors)
    (_, routing) = adapter.routings(torch.tensor([[0.0, 0.0, 1.0]]))
    assert routing.indices.tolist() == [[0, 1]]
