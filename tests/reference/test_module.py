"""The reference against two independent formulations: a naive loop and the dense matrix."""

from __future__ import annotations

import pytest
import torch

from prism_deploy import AdapterConfig, PipeSpec, load_adapter, save_adapter
from prism_deploy.reference import random_adapter, simple_config, top_k_indices


def naive_forward(adapter, x: torch.Tensor) -> torch.Tensor:
    """Per token, per worker, in float64: the format's definition read literally."""
    cfg = adapter.config
    x2 = x.reshape(-1, cfg.in_dim).double()
    out = torch.zeros(x2.shape[0], cfg.out_dim, dtype=torch.float64)
    for p, (spec, pipe) in enumerate(zip(cfg.pipes, adapter.pipe_list())):
        beta = 1.0 if cfg.combine == "sum" else float(adapter.combine.weight[p])
        R, C = spec.grid
        tr, tc = spec.tile
        tiles = pipe.tiles.double()
        for n in range(x2.shape[0]):
            xp = torch.zeros(C * tc, dtype=torch.float64)
            xp[: cfg.in_dim] = x2[n]
            g = torch.ones(R * C, dtype=torch.float64)
            if spec.gated:
                s = pipe.gate.weight.double() @ x2[n] + pipe.gate.bias.double()
                # selection: sort by (-score, index), the lower index first on ties
                order = sorted(range(R * C), key=lambda w: (-float(s[w]), w))[: spec.top_k]
                sel = torch.tensor(order)
                g = torch.zeros(R * C, dtype=torch.float64)
                g[sel] = spec.gate_scale * torch.softmax(s[sel], 0)
            yp = torch.zeros(R * tr, dtype=torch.float64)
            for w in range(R * C):
                r, c = divmod(w, C)
                yp[r * tr : (r + 1) * tr] += g[w] * (tiles[w] @ xp[c * tc : (c + 1) * tc])
            out[n] += beta * yp[: cfg.out_dim]
    return out.reshape(*x.shape[:-1], cfg.out_dim)


CASES = [
    # in, out, grid, top_k, pipes, combine
    (12, 10, (2, 3), None, 1, "sum"),
    (13, 7, (3, 2), 1, 1, "sum"),  # padding on both sides, top_k = 1
    (13, 7, (3, 2), 6, 1, "weighted"),  # top_k = R*C
    (20, 30, (4, 4), 5, 2, "weighted"),
    (9, 17, (5, 3), 4, 3, "sum"),
]


@pytest.mark.parametrize("in_dim,out_dim,grid,top_k,pipes,combine", CASES)
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_reference_matches_naive_loop(in_dim, out_dim, grid, top_k, pipes, combine, lead, rng):
    cfg = simple_config(in_dim, out_dim, grid, top_k=top_k, pipes=pipes, combine=combine, gate_scale=1.5)
    adapter = random_adapter(cfg, seed=7)
    x = torch.randn(*lead, in_dim, generator=rng)
    got = adapter(x.double())
    assert got.shape == (*lead, out_dim)
    torch.testing.assert_close(got, naive_forward(adapter, x), rtol=1e-10, atol=1e-10)
    # float32 input computes in float32 and agrees to float32 rounding
    torch.testing.assert_close(adapter(x).double(), naive_forward(adapter, x), rtol=1e-4, atol=1e-5)


def test_mixed_gated_and_ungated_pipes(rng):
    pipes = (
        PipeSpec("dense", (2, 2), (4, 5), None),
        PipeSpec("sparse", (3, 4), (3, 3), 2, 0.5),
    )
    adapter = random_adapter(AdapterConfig(10, 8, pipes, "weighted"), seed=3)
    x = torch.randn(6, 10, generator=rng)
    torch.testing.assert_close(adapter(x.double()), naive_forward(adapter, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pipes,combine", [(1, "sum"), (3, "weighted")])
def test_ungated_reference_is_the_dense_matrix(pipes, combine, rng):
    cfg = simple_config(23, 19, (4, 5), pipes=pipes, combine=combine)
    adapter = random_adapter(cfg, seed=11)
    x = torch.randn(7, 23, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(adapter(x), x @ adapter.dense_matrix().T, rtol=1e-12, atol=1e-12)


def test_full_top_k_with_gate_scale_one_over_softmax_is_a_weighted_dense_sum(rng):
    # top_k = R*C selects every worker; the output is then a softmax-weighted sum of tiles.
    cfg = simple_config(8, 8, (2, 2), top_k=4)
    adapter = random_adapter(cfg, seed=5)
    x = torch.randn(3, 8, generator=rng, dtype=torch.float64)
    (routing,) = adapter.routings(x)
    assert torch.allclose(routing.dense.sum(-1), torch.ones(3, dtype=torch.float64))


def test_ties_pick_the_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert top_k_indices(scores, 2).tolist() == [[1, 2]]
    assert top_k_indices(torch.zeros(1, 6), 3).tolist() == [[0, 1, 2]]
    neg = torch.tensor([[-5.0, -1.0, -1.0, -7.0]])  # all-negative scores route like any others
    assert top_k_indices(neg, 3).tolist() == [[1, 2, 0]]


def test_batch_invariance(rng):
    # A token's output must not depend on which tokens share its batch.
    adapter = random_adapter(simple_config(16, 12, (4, 4), top_k=3, pipes=2), seed=2)
    x = torch.randn(9, 16, generator=rng)
    whole = adapter(x)
    for i in (0, 4, 8):
        torch.testing.assert_close(adapter(x[i : i + 1])[0], whole[i], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_save_load_roundtrip_keeps_dtype_and_values(dtype, tmp_path, rng):
    cfg = simple_config(10, 9, (3, 2), top_k=2, pipes=2, combine="weighted")
    adapter = random_adapter(cfg, seed=4, dtype=dtype)
    path = tmp_path / "a.safetensors"
    save_adapter(adapter, path)
    loaded = load_adapter(path)
    assert loaded.config == cfg
    for name, t in adapter.tensors().items():
        assert loaded.tensors()[name].dtype == dtype
        assert torch.equal(loaded.tensors()[name], t)
    x = torch.randn(4, 10, generator=rng)
    assert torch.equal(loaded(x), adapter(x))
    assert loaded(x).dtype == torch.float32  # computes in float32 whatever is stored
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left


def test_describe_counts(rng):
    cfg = simple_config(16, 16, (4, 4), top_k=4)
    info = random_adapter(cfg).describe()
    tile = 4 * 4
    assert info["flops_per_token"]["dense"] == 2 * 16 * tile + 2 * 16 * 16
    assert info["flops_per_token"]["gated"] == 2 * 4 * tile + 2 * 16 * 16
    assert info["params"] == 16 * tile + 16 * 16 + 16
    assert info["bytes"] == 4 * info["params"]
    adapter = random_adapter(cfg, dtype=torch.float16)
    assert adapter.num_parameters == info["params"]
    assert adapter.nbytes == 2 * info["params"]
    assert adapter.flops_per_token == info["flops_per_token"]


def test_saving_the_same_adapter_twice_gives_the_same_bytes(tmp_path):
    # build caches key engines by the adapter file's sha256
    adapter = random_adapter(simple_config(10, 9, (3, 2), top_k=2, pipes=3, combine="weighted"), seed=1)
    for i in range(4):
        adapter.save(tmp_path / f"a{i}.safetensors")
    blobs = {(tmp_path / f"a{i}.safetensors").read_bytes() for i in range(4)}
    assert len(blobs) == 1
    assert load_adapter(tmp_path / "a0.safetensors").config == adapter.config
