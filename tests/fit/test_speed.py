"""Gated fits, faster for the same result: each change computes what the reference does.

Issue 17: a gated fit of 8000 x 256 -> 160 (32 workers, top-8) took 69-105 s against 6.9 s
ungated. The causes (docs/fitting.md, "Measurements"): intra-op threads waiting on busy cores,
gate training differentiating through the frozen tiles, full sorts for top-k, and the import
``torch.optim.Adam`` triggers. These tests pin that each replacement computes the same thing.
"""

from __future__ import annotations

import torch

from prism_deploy.fit import FitOptions, PairedData, fit_adapter, fit_config
from prism_deploy.fit.gates import Adam, column_outputs, column_tiles, gated_output
from prism_deploy.fit.threads import auto_threads
from prism_deploy.reference import random_adapter, route
from tests.fit_data import synthetic_pair


def test_column_block_forward_is_the_reference_gated_forward():
    cfg = fit_config(50, 37, grid=(4, 3), top_k=5)  # padded both ways
    adapter = random_adapter(cfg, seed=2)
    pipe = adapter.pipe_list()[0]
    x = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    dense = route(x, pipe.gate.weight, pipe.gate.bias, 5, pipe.spec.gate_scale).dense  # type: ignore[union-attr]
    u = column_outputs(pipe.spec, column_tiles(pipe.spec, pipe.tiles), x)
    torch.testing.assert_close(gated_output(pipe.spec, u, dense, 37), pipe(x, gates=dense), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gated_output(pipe.spec, u, dense, 37), adapter(x), rtol=1e-5, atol=1e-5)


def test_inline_adam_is_torch_adam_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(8, 30, generator=gen), torch.randn(8, generator=gen)]
    theirs = [p.clone().requires_grad_(True) for p in start]
    ours = [p.clone() for p in start]
    opt = torch.optim.Adam([{"params": [theirs[0]], "lr": 3e-3}, {"params": [theirs[1]], "lr": 1e-2}])
    mine = Adam(ours, [3e-3, 1e-2])
    for step in range(100):
        grads = [torch.randn(p.shape, generator=gen) * 10.0 ** (step % 5 - 2) for p in start]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
        mine.step(grads)
    assert all(torch.equal(a.detach(), b) for a, b in zip(theirs, ours))


def test_auto_threads_leaves_busy_cores_alone():
    assert auto_threads(load=0.1, cores=2, default=2)[0] == 2
    assert auto_threads(load=1.2, cores=2, default=2)[0] == 1
    assert auto_threads(load=7.0, cores=2, default=2)[0] == 1
    assert auto_threads(load=4.0, cores=32, default=32)[0] == 28


def test_explicit_threads_are_used_and_restored(tmp_path):
    x, z, _ = synthetic_pair(300, 12, 10, seed=1)
    data = PairedData.from_arrays(x, z, tmp_path)
    before = torch.get_num_threads()
    _, report = fit_adapter(fit_config(12, 10, grid=(2, 2)), data, FitOptions(threads=1))
    assert report.threads == 1 and report.threads_why == "--threads"
    assert torch.get_num_threads() == before


def test_top_k_fast_path_is_the_stable_sort_bit_for_bit():
    """``reference.top_k_indices`` takes ``torch.topk`` where the answer is forced and the
    stable sort (its definition) elsewhere: the indices are the definition's, ties included."""
    from prism_deploy.reference import top_k_indices

    def by_definition(s, k):
        return torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]

    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(500, 40, generator=gen, dtype=torch.float64)
    tied = torch.round(scores * 2) / 2  # many ties, inside the top k and at its boundary
    tied[7] = 0.0  # a row of equal scores
    tied[9, :3] = -0.0  # signed zeros compare equal
    odd = scores.clone()
    odd[3, [5, 17]] = float("nan")
    odd[4, 2] = float("inf")
    odd[5, [1, 30]] = float("-inf")
    for s in (scores, tied, odd, scores.float()):
        for k in (1, 3, 8, 40):
            assert torch.equal(top_k_indices(s, k), by_definition(s, k)), k
