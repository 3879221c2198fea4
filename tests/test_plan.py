"""The tile planner: the seed's examples, the rule itself, padding, the three-pipe layout, the CLI."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_deploy import plan_tiles
from prism_deploy.cli.main import main
from prism_deploy.core.errors import PrismInputError
from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.plan import factor_pairs, next_pow2, plan_cubic_pipe, plan_layer3_pipe, plan_three_pipes
from prism_deploy.reference import random_adapter


def spec_padding_workers(plan) -> int:
    """All-padding workers counted by the format layer's own (independent) code."""
    return len(PipeSpec("p", plan.grid, plan.tile).padding_workers(plan.in_dim, plan.out_dim))


# ---- the seed's printed examples ------------------------------------------------------------
def test_square_4096_matches_the_seed():
    p = plan_tiles(4096, 4096, 512)
    assert (p.grid, p.tile) == ((16, 32), (256, 128))  # the seed prints exactly this
    assert (p.padding_rows, p.padding_cols, p.padding_workers, p.notes) == (0, 0, 0, ())


def test_8192_to_1536_follows_the_rule_not_the_seed_printout():
    p = plan_tiles(8192, 1536, 512)
    # aspect 0.1875: 8/64 = 0.125 is closest (16/32 = 0.5 next); the seed prints 32x16 of 48x512
    assert (p.grid, p.tile) == ((8, 64), (192, 128))
    assert p.padded_out == 1536 and p.padded_in == 8192 and p.padding_workers == 0


def test_1536_to_8192_follows_the_rule_not_the_seed_printout():
    p = plan_tiles(1536, 8192, 512)
    # aspect 5.33: 64/8 = 8 is closest (32/16 = 2 next); the seed prints 16x32 of 512x48
    assert (p.grid, p.tile) == ((64, 8), (128, 192))
    assert p.padding_workers == 0


def test_seed_printouts_are_not_what_the_rule_minimises():
    # The printed grids are strictly farther from the aspect than the rule's choice.
    for in_dim, out_dim, printed in [(8192, 1536, (32, 16)), (1536, 8192, (16, 32))]:
        aspect = out_dim / in_dim
        chosen = plan_tiles(in_dim, out_dim).grid
        assert abs(chosen[0] / chosen[1] - aspect) < abs(printed[0] / printed[1] - aspect)


# ---- the rule, checked against a brute force ------------------------------------------------
def brute_force(in_dim: int, out_dim: int, workers: int):
    aspect = out_dim / in_dim
    options = []
    for R in range(1, workers + 1):
        if workers % R:
            continue
        C = workers // R
        tr, tc = math.ceil(out_dim / R), math.ceil(in_dim / C)
        # a row-block is all padding when it starts at or past out_dim
        pad_rows = sum(1 for r in range(R) if r * tr >= out_dim)
        pad_cols = sum(1 for c in range(C) if c * tc >= in_dim)
        pad_workers = pad_rows * C + pad_cols * R - pad_rows * pad_cols
        options.append((pad_workers > 0, abs(R / C - aspect), R, (R, C), (tr, tc), pad_workers))
    clean = [o for o in options if not o[0]]
    best = min(clean or options, key=lambda o: (o[1], o[2]))
    return best[3], best[4], best[5]


@settings(max_examples=150, deadline=None)
@given(
    in_dim=st.integers(1, 20000),
    out_dim=st.integers(1, 200000),
    workers=st.sampled_from([1, 2, 6, 12, 64, 96, 100, 512, 1024]),
)
def test_plan_matches_brute_force_rule(in_dim, out_dim, workers):
    p = plan_tiles(in_dim, out_dim, workers)
    grid, tile, pad = brute_force(in_dim, out_dim, workers)
    assert (p.grid, p.tile, p.padding_workers) == (grid, tile, pad)
    assert p.workers == workers and p.covers
    # smallest tiles that cover: one row or column less would not
    assert (p.tile[0] - 1) * p.grid[0] < out_dim and (p.tile[1] - 1) * p.grid[1] < in_dim
    assert p.padding_workers == spec_padding_workers(p)
    if p.padding_workers:
        assert "compute nothing useful" in p.notes[0]


def test_prefers_a_pair_without_all_padding_blocks():
    # aspect 4: 6x1 is closest, but its 2x2 tiles put rows 8..11 (2 workers) wholly in the padding
    p = plan_tiles(2, 8, 6)
    assert (p.grid, p.tile, p.padding_workers) == ((3, 2), (3, 1), 0)
    assert "6x1" in p.notes[0] and "has none" in p.notes[0]


def test_dims_that_force_padding_report_it():
    p = plan_tiles(100, 100, 512)
    # 16x32 of 7x4 tiles: 112 x 128 padded; row-blocks start 0,7,..,105 (one past 100),
    # column-blocks 0,4,..,124 (seven at or past 100): 1*32 + 7*16 - 1*7 = 137 workers
    assert (p.grid, p.tile) == ((16, 32), (7, 4))
    assert (p.padding_rows, p.padding_cols) == (12, 28)
    assert p.padding_workers == 137 == spec_padding_workers(p)
    assert "137 of 512" in p.notes[0]


def test_padding_without_wasted_workers():
    p = plan_tiles(1000, 1000, 512)
    assert (p.grid, p.tile) == ((16, 32), (63, 32))
    assert (p.padding_rows, p.padding_cols, p.padding_workers) == (8, 24, 0)


def test_to_pipe_spec_gives_a_loadable_adapter():
    p = plan_tiles(50, 30, 12)
    spec = p.to_pipe_spec("main", top_k=3)
    cfg = AdapterConfig(50, 30, (spec,))
    adapter = random_adapter(cfg, seed=1)
    assert adapter.pipe_list()[0].tiles.shape == (12, *p.tile)


@pytest.mark.parametrize("args", [(0, 5, 4), (5, -1, 4), (5, 5, 0), (5.0, 5, 4), (True, 5, 4), (5, 5, 1 << 30)])
def test_bad_dims_raise_input_error(args):
    with pytest.raises(PrismInputError):
        plan_tiles(*args)


def test_helpers():
    assert [next_pow2(x) for x in (1, 2, 3, 501, 512, 513, 2048)] == [1, 2, 4, 512, 512, 1024, 2048]
    assert factor_pairs(12) == [(1, 12), (2, 6), (3, 4), (4, 3), (6, 2), (12, 1)]


# ---- three pipes -----------------------------------------------------------------------------
def test_three_pipes_seed_example_4096_to_128256():
    three = plan_three_pipes(4096, 128256)
    cubic, twin, layer3 = three.pipes
    assert cubic == twin
    # no 512-worker grid of 512x512 tiles covers it; nearest covering grid ceil(128256/512) x 8
    assert not three.cubic_covers_with_requested_workers
    assert (cubic.grid, cubic.tile, cubic.workers) == ((251, 8), (512, 512), 2008)
    assert cubic.covers and "1024 input columns" in cubic.notes[0] and "2008" in cubic.notes[0]
    # pipe 3 reproduces the seed: 256x2 of 512x2048, output padded to 131072
    assert (layer3.grid, layer3.tile, layer3.padded_out, layer3.padding_rows) == ((256, 2), (512, 2048), 131072, 2816)
    assert layer3.padding_workers == spec_padding_workers(layer3) == 10
    cfg = three.to_config(top_k=8)  # a valid config (coverage checked by the format layer)
    assert [p.grid for p in cfg.pipes] == [(251, 8), (251, 8), (256, 2)]


def test_cubic_pipe_covers_when_it_can():
    p = plan_cubic_pipe(1024, 2048, 8)  # needs 4x2 = 8 workers of 512x512: exactly
    assert (p.grid, p.tile, p.padding_workers, p.notes) == ((4, 2), (512, 512), 0, ())
    q = plan_cubic_pipe(4096, 4096, 512)  # covers, but most of the 512 tiles are padding
    assert q.workers == 512 and q.covers and q.padding_workers == spec_padding_workers(q) > 0
    assert "wholly in the padding" in q.notes[0]


def test_layer3_tiles_are_powers_of_two_that_cover():
    for in_dim, out_dim in [(4096, 128256), (1536, 8192), (300, 700), (8192, 1536)]:
        p = plan_layer3_pipe(in_dim, out_dim)
        assert p.workers == 512 and p.covers
        for t in p.tile:
            assert t & (t - 1) == 0


# ---- CLI -------------------------------------------------------------------------------------
def test_plan_cli_table(capsys):
    assert main(["plan", "8192", "1536"]) == 0
    out = capsys.readouterr().out
    assert "8x64" in out and "192x128" in out


def test_plan_cli_json_is_to_json(capsys):
    assert main(["plan", "100", "100", "--workers", "512", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == plan_tiles(100, 100, 512).to_json()
    assert main(["plan", "4096", "128256", "--three-pipe", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj == plan_three_pipes(4096, 128256).to_json()
    assert [p["grid"] for p in obj["pipes"]] == [[251, 8], [251, 8], [256, 2]]


def test_plan_cli_three_pipe_table_and_notes(capsys):
    assert main(["plan", "4096", "128256", "--three-pipe"]) == 0
    out = capsys.readouterr().out
    assert "251x8" in out and "256x2" in out and "512x2048" in out
    assert out.count("note (pipe1)") == 1 and "note (pipe2)" not in out


def run_cli(argv):
    """``main(argv)``'s exit code, whether it returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv", [["0", "5"], ["5", "-3"], ["5", "5", "--workers", "0"], ["5", "x"]])
def test_plan_cli_bad_input_exit_2(argv, capsys):
    assert run_cli(["plan", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and captured.out == ""
