"""Fitting (prism_deploy.fit) against the full-matrix least-squares solution computed independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.tiles import dense_from_tiles, tiles_from_dense
from prism_deploy.fit import FitOptions, PairedData, fit_adapter, fit_config, holdout_mask
from prism_deploy.fit.normal import accumulate_normal
from prism_deploy.fit.solve import solve_normal
from tests.fit_data import full_ls_holdout_error, synthetic_pair


def open_pair(tmp_path, x, z, **kw) -> PairedData:
    return PairedData.from_arrays(x, z, tmp_path, **kw)


def held_rows(data: PairedData) -> np.ndarray:
    return holdout_mask(0, data.rows, data.holdout, data.seed)


def test_holdout_mask_does_not_depend_on_chunking():
    whole = holdout_mask(0, 5000, 0.2, seed=7)
    parts = np.concatenate([holdout_mask(a, min(a + 333, 5000), 0.2, seed=7) for a in range(0, 5000, 333)])
    assert np.array_equal(whole, parts)
    assert 0.17 < whole.mean() < 0.23
    assert not np.array_equal(whole, holdout_mask(0, 5000, 0.2, seed=8))


def test_tiles_round_trip_with_padding():
    spec = fit_config(10, 7, grid=(3, 4)).pipes[0]  # tiles 3x3: 9 >= 7 rows, 12 >= 10 cols
    w = torch.randn(7, 10, dtype=torch.float64)
    tiles = tiles_from_dense(w, spec.grid, spec.tile)
    assert tiles.shape == (12, 3, 3)
    assert torch.equal(dense_from_tiles(tiles, spec.grid, spec.tile, crop=(7, 10)), w)
    padded = dense_from_tiles(tiles, spec.grid, spec.tile)  # [9, 12]: with the padding
    assert float(padded[7:].abs().sum()) == 0 and float(padded[:, 10:].abs().sum()) == 0


def test_streaming_in_chunks_equals_in_memory(tmp_path):
    x, z, _ = synthetic_pair(1000, 24, 20, cond=30, seed=1)
    x, z = x.astype(np.float32), z.astype(np.float32)
    small = open_pair(tmp_path, x, z, holdout=0.15, seed=3, chunk_rows=37)
    big = PairedData(small.x.path, small.z.path, holdout=0.15, seed=3, chunk_rows=100_000)
    ne_small, ne_big = accumulate_normal(small), accumulate_normal(big)
    keep = ~held_rows(small)
    x32, z32 = x.astype(np.float64), z.astype(np.float64)
    np.testing.assert_allclose(ne_small.xtx.numpy(), x32[keep].T @ x32[keep], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(ne_small.xtz.numpy(), x32[keep].T @ z32[keep], rtol=1e-12, atol=1e-9)
    assert ne_small.rows == ne_big.rows == int(keep.sum())
    cfg = fit_config(24, 20, grid=(3, 4), top_k=4)
    opts = FitOptions(rounds=1, gate_steps=10, gate_batch=64)
    a_small, _ = fit_adapter(cfg, small, opts)
    a_big, _ = fit_adapter(cfg, big, opts)
    for name, t in a_small.tensors().items():
        torch.testing.assert_close(t, a_big.tensors()[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cond", [3.0, 1e4], ids=["well-conditioned", "ill-conditioned"])
def test_joint_equals_full_matrix_least_squares(tmp_path, cond):
    # in 50 / out 37 on a 4x3 grid: tiles 10x17, so both dims are padded
    x, z, _ = synthetic_pair(1500, 50, 37, cond=cond, seed=2)
    data = open_pair(tmp_path, x.astype(np.float32), z.astype(np.float32), holdout=0.2, seed=1)
    x32, z32 = x.astype(np.float32).astype(np.float64), z.astype(np.float32).astype(np.float64)
    w_ref, err_ref = full_ls_holdout_error(x32, z32, held_rows(data))
    adapter, report = fit_adapter(fit_config(50, 37, grid=(4, 3)), data, FitOptions(dtype=torch.float32))
    assert report.holdout.rel_err == pytest.approx(err_ref, rel=1e-3)
    # and the tiles hold that very matrix (float32 storage)
    w = adapter.dense_matrix(torch.float64).numpy()
    np.testing.assert_allclose(w, w_ref, rtol=0, atol=2e-3 * np.abs(w_ref).max() * (1 if cond < 10 else 5))


def test_per_tile_recipe_is_measurably_worse(tmp_path):
    x, z, _ = synthetic_pair(1500, 48, 40, cond=100, seed=4)
    data = open_pair(tmp_path, x, z, holdout=0.2, seed=0)
    cfg = fit_config(48, 40, grid=(4, 4))
    _, joint = fit_adapter(cfg, data, FitOptions(method="joint"))
    _, per_tile = fit_adapter(cfg, data, FitOptions(method="per-tile"))
    assert per_tile.full_ls_holdout is not None
    assert per_tile.full_ls_holdout.rel_err == pytest.approx(joint.holdout.rel_err, rel=1e-3)
    assert per_tile.holdout.rel_err > 5 * joint.holdout.rel_err


def test_three_ungated_pipes_split_the_full_solution(tmp_path):
    x, z, _ = synthetic_pair(800, 30, 20, cond=10, seed=5)
    data = open_pair(tmp_path, x, z, holdout=0.2)
    _, err_ref = full_ls_holdout_error(
        x.astype(np.float32).astype(np.float64), z.astype(np.float32).astype(np.float64), held_rows(data)
    )
    adapter, report = fit_adapter(fit_config(30, 20, grid=(2, 3), pipes=3), data)
    assert report.holdout.rel_err == pytest.approx(err_ref, rel=1e-3)
    mats = [p.dense_weight(torch.float64) for p in adapter.pipe_list()]
    torch.testing.assert_close(mats[0], mats[1])  # the least-norm split: equal shares


def test_gated_fit_improves_on_its_initial_routing(tmp_path):
    x, z, _ = synthetic_pair(2000, 32, 24, cond=10, seed=6)
    data = open_pair(tmp_path, x, z, holdout=0.2)
    cfg = fit_config(32, 24, grid=(3, 4), top_k=4)
    assert cfg.pipes[0].gate_scale == 4.0
    adapter, report = fit_adapter(cfg, data, FitOptions(rounds=3, gate_steps=100, gate_batch=128))
    initial = report.rounds[0]["holdout_rel_err"]
    assert report.holdout.rel_err < 0.9 * initial
    # the kept rounds never made the held-out error worse
    kept = [r["holdout_rel_err"] for r in report.rounds if r.get("kept", True)]
    assert kept == sorted(kept, reverse=True)


def test_gated_worker_refit_is_the_least_squares_optimum_for_the_routing(tmp_path):
    # with the routing fixed, perturbing any worker after the refit cannot lower the train error
    from prism_deploy.fit import backfit
    from prism_deploy.fit.evaluate import evaluate

    x, z, _ = synthetic_pair(600, 16, 12, cond=5, seed=7)
    data = open_pair(tmp_path, x, z, holdout=0.0)
    cfg = fit_config(16, 12, grid=(2, 4), top_k=3)
    adapter, _ = fit_adapter(cfg, data, FitOptions(rounds=1, gate_steps=30, dtype=torch.float32))
    work = type(adapter)(cfg, {k: v.double() for k, v in adapter.tensors().items()})
    backfit(work, data, ridge=0.0, sweeps=1)
    base = evaluate(work, data, "train").rel_err
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in (0, 5):
            work.pipe_list()[0].tiles[w] += 1e-3 * torch.randn(6, 4, generator=gen, dtype=torch.float64)
            assert evaluate(work, data, "train").rel_err > base
            work.pipe_list()[0].tiles[w] -= 0  # keep the perturbation: the next one adds to it
            base = evaluate(work, data, "train").rel_err


def test_rank_deficient_without_ridge_is_an_input_error(tmp_path):
    x, _, m = synthetic_pair(400, 20, 10, seed=8)
    x[:, 7] = x[:, 3]  # a duplicated column: X^T X is singular
    z = x @ m.T
    data = open_pair(tmp_path, x, z)
    cfg = fit_config(20, 10, grid=(2, 2))
    with pytest.raises(PrismInputError, match="rank-deficient: rank 19 of 20"):
        fit_adapter(cfg, data)
    _, report = fit_adapter(cfg, data, FitOptions(ridge=1e-3))
    assert report.holdout.rel_err < 0.05
    x[:, 7] = 0  # a dead input column: as singular, and named
    z = x @ m.T
    data = PairedData.from_arrays(x, z, tmp_path)
    with pytest.raises(PrismInputError, match=r"1 feature\(s\) are zero in every row \(index 7\)"):
        fit_adapter(cfg, data)


def test_ill_conditioned_gram_falls_back_to_eigen_least_squares():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    gram = q @ torch.diag(torch.logspace(0, -13, 30, dtype=torch.float64)) @ q.T
    rhs = gram @ torch.randn(30, 4, generator=gen, dtype=torch.float64)
    sol, info = solve_normal(gram, rhs)
    assert info.method == "lstsq"
    torch.testing.assert_close(gram @ sol, rhs, rtol=0, atol=1e-10)
    well = q @ torch.diag(torch.logspace(0, -3, 30, dtype=torch.float64)) @ q.T
    assert solve_normal(well, rhs)[1].method == "cholesky"


def test_layout_mismatch_and_too_few_rows(tmp_path):
    x, z, _ = synthetic_pair(15, 20, 10, seed=9)
    data = open_pair(tmp_path, x, z, holdout=0.0)
    with pytest.raises(PrismInputError, match="fewer rows than in_dim"):
        fit_adapter(fit_config(20, 10, grid=(2, 2)), data)
    with pytest.raises(PrismInputError, match="layout is 21 -> 10"):
        fit_adapter(fit_config(21, 10, grid=(2, 2)), data)


def test_three_pipe_planner_layout_and_gated_backfitting(tmp_path):
    from prism_deploy.plan import plan_three_pipes

    # the planner's literal layout is mostly padding at this size: only on request (keep)
    cfg = fit_config(24, 20, workers=12, pipes=3, top_k=3, padding="keep")
    assert [(p.grid, p.tile) for p in cfg.pipes] == [(p.grid, p.tile) for p in plan_three_pipes(24, 20, 12).pipes]
    # the planner's pipes have 512x512 tiles (mostly padding): fit a small grid instead
    x, z, _ = synthetic_pair(1200, 24, 20, cond=10, seed=12)
    data = open_pair(tmp_path, x, z, holdout=0.2)
    cfg = fit_config(24, 20, grid=(2, 3), pipes=3, top_k=2)
    _, report = fit_adapter(cfg, data, FitOptions(rounds=2, gate_steps=80, gate_batch=128, sweeps=2))
    assert report.holdout.rel_err < report.rounds[0]["holdout_rel_err"]
    assert report.full_ls_holdout is not None and report.full_ls_holdout.rel_err < report.holdout.rel_err


@pytest.mark.parametrize("top_k", [None, 5], ids=["ungated", "gated"])
def test_every_corrupted_worker_is_ranked_first(tmp_path, top_k):
    from prism_deploy.fit.localize import score_workers
    from prism_deploy.reference import PrismAdapter

    x, z, _ = synthetic_pair(1500, 40, 30, cond=20, seed=11)
    data = open_pair(tmp_path, x.astype(np.float32), z.astype(np.float32))
    cfg = fit_config(40, 30, grid=(3, 4), top_k=top_k)
    good, _ = fit_adapter(cfg, data, FitOptions(rounds=1, gate_steps=60))
    # every worker when ungated; a spread of them when gated (each check re-solves the pipe)
    for w in range(cfg.pipes[0].workers) if top_k is None else (0, 5, 7, 11):
        tensors = {k: v.clone() for k, v in good.tensors().items()}
        tiles = tensors["pipes.0.tiles"]
        gen = torch.Generator().manual_seed(w)
        tiles[w] += 3 * tiles[w].std() * torch.randn(tiles.shape[1:], generator=gen)
        ranking = score_workers(PrismAdapter(cfg, tensors), data)
        assert ranking[0].worker == w, [(s.worker, s.deviation) for s in ranking[:3]]
        assert ranking[0].deviation > 100 * ranking[1].deviation
        # the excess alone would also put it first here, with a much thinner margin
        assert max(ranking, key=lambda s: s.excess).worker == w
