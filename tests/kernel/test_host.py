"""The kernel's own CUDA source, run on the CPU (prism_deploy.kernel.host), against the reference.

This is the kernel code itself, compiled as host C++ with the defines and launch geometry a GPU
launch uses; warp shuffles and ballots are real exchanges between 32 lanes. Every buffer lies
against an inaccessible page, so out-of-bounds accesses crash the run; output starts as NaN, so
an element no thread writes shows. The negative controls at the end show the harness fails
when the kernel is wrong."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from prism_deploy.kernel.host import HostRunError, build_host_runner, compiler, run_on_host
from prism_deploy.kernel.semantics import gate_weights, random_inputs, tile_dispatch
from prism_deploy.kernel.spec import TileDispatchSpec, kernel_source_path, launch_config
from prism_deploy.reference import random_adapter, simple_config

pytestmark = pytest.mark.skipif(compiler() is None, reason="needs a C++ compiler (g++) to build the host runner")

# relative L2 against the float32 reference: float32 I/O 1e-6; float16 I/O rounds input and output.
TOL = {"float32": 1e-6, "float16": 2e-3}

CASES = [
    # R, C, tr, tc, top_k, in_dim, out_dim, hidden dtype, tile dtype, T
    (3, 4, 10, 10, 5, 37, 29, "float32", "float32", 7),  # padding rows and columns, scalar loads
    (3, 4, 10, 16, 5, 60, 29, "float16", "int8", 40),  # int8 with row scales, vector loads
    (2, 3, 7, 300, 1, 850, 13, "float16", "float16", 33),  # top_k = 1, a row-block wholly in padding
    (4, 2, 5, 40, 8, 70, 20, "float32", "int8", 5),  # top_k = R*C
    (1, 5, 3, 13, 5, 40, 3, "float32", "float32", 3),  # whole column blocks in the padding
    (2, 2, 8, 2100, 2, 4000, 16, "float16", "float16", 3),  # tiles wider than one 2048-column segment
    (4, 8, 16, 64, 3, 500, 60, "float32", "float16", 300),  # two token chunks, the second partial
    (32, 2, 1024, 8, 3, 16, 32668, "float32", "float32", 2),  # 4 rows per warp (a 1024-block grid)
    (2, 40, 3, 8, 30, 310, 5, "float32", "float32", 9),  # C > 32: two list words, batches of 32
    (2, 2, 4, 2100, 2, 4100, 8, "float16", "int8", 3),  # int8 rows over one segment
]


def _inputs(case, seed=0, tie_step=0.0):
    R, C, tr, tc, k, in_dim, out_dim, hd, td, T = case
    x, s, tiles, scales = random_inputs(np.random.default_rng(seed), T, in_dim, R, C, tr, tc, td, hd)
    if tie_step:
        s = (np.round(s / tie_step) * tie_step).astype(np.float32)
    spec = TileDispatchSpec(R, C, tr, tc, k, 1.7, out_dim, hd, td)
    return spec, x, s, tiles, scales


def _reference(spec, x, s, tiles, scales):
    return tile_dispatch(x.astype(np.float32), s, tiles, scales, **spec.attributes())


def _rel(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_source_matches_reference(case):
    spec, x, s, tiles, scales = _inputs(case)
    for guard in ("end", "start"):  # overruns, then underruns, of every buffer fault
        out = run_on_host(spec, x, s, tiles, scales, guard=guard)
        assert out.dtype == x.dtype and not np.isnan(out).any(), "an output element nobody wrote"
        assert _rel(out, _reference(spec, x, s, tiles, scales)) < TOL[spec.hidden_dtype]


def test_kernel_source_matches_reference_adapter_pipe():
    """Against PrismAdapter itself: one gated pipe, its own gate scores and tiles."""
    adapter = random_adapter(simple_config(45, 33, (3, 5), top_k=4, gate_scale=2.0), seed=7)
    pipe = adapter.pipe_list()[0]
    x = torch.randn(9, 45, generator=torch.Generator().manual_seed(2))
    sp = pipe.spec
    spec = TileDispatchSpec(*sp.grid, *sp.tile, sp.top_k, sp.gate_scale, 33)
    out = run_on_host(spec, x.numpy(), pipe.routing(x).scores.detach().numpy(), pipe.tiles.detach().numpy())
    ref = pipe(x).detach().numpy()
    assert _rel(out, ref) < 1e-6


HARD = np.array(
    [
        [-3.0, -1.0, -1.0, -2.0, -1.0, -5.0, -1.0, -7.0],  # all negative, four-way tie
        [0.0, -0.0, 0.0, -0.0, 1.0, 0.0, -0.0, -1.0],  # signed zeros compare equal
        [2.0] * 8,  # everything tied
        [3e38, -3e38, 3.0, 3e38, 0.0, -3.0, 1e-38, -1e-38],  # extremes, denormal-adjacent
        [1.0, np.nextafter(np.float32(1), np.float32(2)), 1.0, 1.0, 0.5, 0.5, 0.5, 0.5],  # one ulp apart
    ],
    dtype=np.float32,
)


@pytest.mark.parametrize("k", [1, 3, 4, 5, 8])
def test_kernel_source_routing_on_hard_scores(k):
    """Ties go to the lower index, -0 == +0: the selected set must equal the reference's exactly,
    which a one-worker difference would break far beyond the tolerance (tiles differ per worker)."""
    rng = np.random.default_rng(k)
    spec = TileDispatchSpec(2, 4, 3, 8, k, 1.3, 6, "float32", "float32")
    x = rng.standard_normal((len(HARD), 32)).astype(np.float32)
    tiles = rng.standard_normal((8, 3, 8)).astype(np.float32)
    out = run_on_host(spec, x, HARD, tiles)
    ref = _reference(spec, x, HARD, tiles, None)
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("R,C,k", [(1, 1, 1), (1, 31, 7), (4, 8, 32), (3, 11, 1), (10, 10, 50), (16, 32, 154)])
def test_kernel_source_routing_on_random_scores_with_ties(R, C, k):
    """Up to the square benchmark pipe's 512 workers and top_k 154, a third of scores rounded to
    one decimal (many ties); tiles of one row and one column make each output a weighted sum."""
    rng = np.random.default_rng(R * C + k)
    s = rng.standard_normal((6, R * C)).astype(np.float32)
    s[:, ::3] = np.round(s[:, ::3], 1)
    x = rng.standard_normal((6, C)).astype(np.float32)
    tiles = rng.standard_normal((R * C, 1, 1)).astype(np.float32)
    spec = TileDispatchSpec(R, C, 1, 1, k, 0.7, R, "float32", "float32")
    out = run_on_host(spec, x, s, tiles)
    np.testing.assert_allclose(out, _reference(spec, x, s, tiles, None), rtol=1e-5, atol=1e-6)


def test_kernel_source_is_batch_invariant():
    """A token alone gives bit-identical results to the same token inside a batch of 300."""
    spec, x, s, tiles, scales = _inputs(CASES[6], seed=3)
    batch = run_on_host(spec, x, s, tiles, scales)
    for i in (0, 137, 299):
        alone = run_on_host(spec, x[i : i + 1], s[i : i + 1], tiles, scales)
        np.testing.assert_array_equal(alone[0], batch[i])


def test_kernel_source_with_no_tokens_reads_and_writes_nothing():
    """T = 0 launched as the TensorRT plugin launches it (one token chunk, since a zero grid is
    an invalid launch): no tile touched, nothing written past the empty output, no fault."""
    R, C, k = 3, 6, 4
    spec, x, s, tiles, scales = _inputs((R, C, 64, 64, k, C * 64 - 5, R * 64 - 3, "float16", "int8", 2))
    assert tiles.nbytes // (R * C) == os.sysconf("SC_PAGE_SIZE")
    assert launch_config(spec, 0).grid_y == 0  # the host runner raises it to 1, as the plugin does
    out = run_on_host(spec, x[:0], s[:0], tiles, scales, guard="start", unread_workers=range(R * C))
    assert out.shape == (0, spec.out_dim)
    # the empty output ends at an inaccessible page: any write faults
    assert run_on_host(spec, x[:0], s[:0], tiles, scales, guard="end").shape == (0, spec.out_dim)
    # the same protection catches the first token's reads
    with pytest.raises(HostRunError, match="SIGSEGV"):
        run_on_host(spec, x[:1], s[:1], tiles, scales, guard="start", unread_workers=range(R * C))


@pytest.mark.parametrize(
    "hd,td,tr,tc", [("float32", "float32", 16, 64), ("float16", "float16", 32, 64), ("float16", "int8", 64, 64)]
)
@pytest.mark.parametrize("T", [1, 4])
def test_kernel_source_never_touches_unselected_tiles(hd, td, tr, tc, T):
    """Tiles of exactly one page each; every tile no token selected is made inaccessible."""
    R, C, k = 3, 6, 4
    case = (R, C, tr, tc, k, C * tc - 5, R * tr - 3, hd, td, T)
    spec, x, s, tiles, scales = _inputs(case, seed=T)
    assert tiles.nbytes // (R * C) == os.sysconf("SC_PAGE_SIZE")
    chosen = set(np.flatnonzero(gate_weights(s, k, 1.7).any(axis=0)))
    unread = [w for w in range(R * C) if w not in chosen]
    assert unread, "the test needs unselected workers"
    out = run_on_host(spec, x, s, tiles, scales, guard="start", unread_workers=unread)
    assert _rel(out, _reference(spec, x, s, tiles, scales)) < TOL[hd]
    # ... and the protection is real: hiding one selected tile crashes the run
    with pytest.raises(HostRunError, match="SIGSEGV"):
        run_on_host(spec, x, s, tiles, scales, guard="start", unread_workers=[min(chosen)])


# ---------------------------------------------------------------- negative controls


def _mutated_plugins(tmp_path, old, new):
    src = kernel_source_path()
    root = tmp_path / "plugins"
    shutil.copytree(src.parent.parent, root)
    path = root / "tile_dispatch" / "tile_dispatch.cu"
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return root


def test_a_wrong_tie_break_in_the_source_is_caught(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_DEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(
        "PRISM_DEPLOY_PLUGINS",
        str(
            _mutated_plugins(
                tmp_path,
                "const bool sel = kw > tau || (kw == tau && w <= cutoff);",
                "const bool sel = kw > tau || (kw == tau && w >= cutoff);",
            )
        ),
    )
    rng = np.random.default_rng(0)
    spec = TileDispatchSpec(2, 4, 3, 8, 3, 1.3, 6, "float32", "float32")
    x = rng.standard_normal((len(HARD), 32)).astype(np.float32)
    tiles = rng.standard_normal((8, 3, 8)).astype(np.float32)
    out = run_on_host(spec, x, HARD, tiles)
    assert not np.allclose(out, _reference(spec, x, HARD, tiles, None), rtol=1e-3, atol=1e-3)


def test_a_collective_in_a_divergent_branch_is_reported_as_deadlock(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_DEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(
        "PRISM_DEPLOY_PLUGINS",
        str(
            _mutated_plugins(
                tmp_path,
                "for (int q = 0; q < RPL; ++q) p[q] = group_sum_float(p[q]);",
                "for (int q = 0; q < RPL; ++q) if (lane < 16) p[q] = group_sum_float(p[q]);",
            )
        ),
    )
    spec, x, s, tiles, scales = _inputs(CASES[0])
    with pytest.raises(HostRunError, match="deadlock"):
        run_on_host(spec, x, s, tiles, scales)


def _run_exe(spec, x, s, tiles, tmp_path, *, grid_x=None, shared=None):
    """Call the host runner directly with a geometry other than launch_config's."""
    cfg = launch_config(spec, x.shape[0])
    for name, arr in (("hidden", x), ("scores", s), ("tiles", tiles), ("scales", np.ones(1, np.float32))):
        arr.tofile(tmp_path / f"{name}.bin")
    argv = [
        str(build_host_runner(spec)),
        str(grid_x or cfg.grid_x),
        str(cfg.grid_y),
        str(cfg.block_x),
        str(cfg.shared_mem if shared is None else shared),
        str(x.shape[0]),
        str(x.shape[1]),
        "end",
        str(tmp_path),
    ]
    return subprocess.run(argv, capture_output=True, text=True)


def test_too_little_shared_memory_faults(tmp_path):
    """A full token chunk writes the gate table up to its last real column (the padding column
    of an even C is never written): 8 bytes fewer than launch_config gives must fault."""
    spec, x, s, tiles, _ = _inputs(CASES[0][:-1] + (256,))
    cfg = launch_config(spec, 256)
    assert cfg.tokens_per_block == 256 and spec.C % 2 == 0
    assert _run_exe(spec, x, s, tiles, tmp_path).returncode == 0
    assert _run_exe(spec, x, s, tiles, tmp_path, shared=cfg.shared_mem - 8).returncode < 0


def test_a_grid_short_of_one_block_leaves_outputs_unwritten(tmp_path):
    spec, x, s, tiles, _ = _inputs(CASES[0])
    done = _run_exe(spec, x, s, tiles, tmp_path, grid_x=launch_config(spec, 7).grid_x - 1)
    assert done.returncode == 0
    out = np.fromfile(tmp_path / "out.bin", np.float32).reshape(7, spec.out_dim)
    assert np.isnan(out).any()


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(
    R=st.integers(1, 4),
    C=st.integers(1, 6),
    tr=st.integers(1, 9),
    tc=st.integers(1, 40),
    T=st.integers(1, 5),
    k_frac=st.floats(0, 1),
    pad_in=st.integers(0, 39),
    pad_out=st.integers(0, 8),
    dtypes=st.sampled_from(
        [
            ("float32", "float32"),
            ("float32", "float16"),
            ("float16", "float16"),
            ("float16", "int8"),
            ("float32", "int8"),
        ]
    ),
    tie_step=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_kernel_source_matches_reference_property(R, C, tr, tc, T, k_frac, pad_in, pad_out, dtypes, tie_step, seed):
    """Random grids (each a new compile), padding on both sides, every top_k, coarse scores."""
    in_dim = max(1, C * tc - min(pad_in, tc - 1))
    out_dim = max(1, R * tr - min(pad_out, tr - 1))
    k = 1 + int(k_frac * (R * C - 1))
    spec, x, s, tiles, scales = _inputs((R, C, tr, tc, k, in_dim, out_dim, *dtypes, T), seed=seed, tie_step=tie_step)
    out = run_on_host(spec, x, s, tiles, scales)
    ref = _reference(spec, x, s, tiles, scales)
    tol = 1e-5 if dtypes[0] == "float32" else 2e-3
    np.testing.assert_allclose(out.astype(np.float32), ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize(
    "hd,td,T",
    [("float32", "float32", 300), ("float16", "float16", 1), ("float16", "int8", 40), ("float32", "float16", 260)],
)
def test_each_selected_tile_row_is_loaded_once_per_token_chunk(hd, td, T):
    """Every 16-byte load of the tiles is counted: a live piece of worker w is loaded exactly once
    per token chunk in which some token selected w, and nothing else is ever loaded (unselected
    workers, rows past out_dim). Columns are all live (in_dim = C*tc), so every load is 16 bytes."""
    from prism_deploy.kernel.host import count_tile_reads

    R, C, tr, tc, k = 4, 8, 16, 64, 3
    spec, x, s, tiles, scales = _inputs((R, C, tr, tc, k, C * tc, R * tr - 5, hd, td, T), seed=T)
    out, reads = count_tile_reads(spec, x, s, tiles, scales)
    assert _rel(out, _reference(spec, x, s, tiles, scales)) < TOL[hd]
    tpb = launch_config(spec, T).tokens_per_block
    selected = gate_weights(s, k, 1.7) != 0
    chunks = np.stack([selected[i : i + tpb].any(axis=0) for i in range(0, T, tpb)]).sum(axis=0)  # [W]
    expected = np.zeros_like(reads)
    live_rows = np.arange(R * tr).reshape(R, tr) < spec.out_dim  # [R, tr]
    for w in range(R * C):
        expected[w][live_rows[w // C]] = chunks[w]
    np.testing.assert_array_equal(reads, expected)
    if T > tpb:
        assert expected.max() > 1  # the case really has a worker read in two chunks


@pytest.mark.parametrize("tile_dtype", ["float16", "int8"])
@pytest.mark.parametrize("T", [1, 8])
def test_benchmark_pipe_loads_exactly_its_floor(tile_dtype, T):
    """The square benchmark pipe of tools/bench_kernel.py (4096->4096, 16x32 grid of 256x128
    tiles, top 154), with the benchmark's own seeded scores: the kernel's 16-byte tile loads add
    up to exactly the tile bytes of the floor that docs/plugin.md tabulates (int8: less the
    float32 row scales, which are scalar loads)."""
    from prism_deploy.kernel.host import count_tile_reads
    from tests.tool_helpers import load_tool

    bench = load_tool("bench_kernel")
    case = bench.CASES["square"]
    spec = case.spec(tile_dtype, "float16")
    scores = bench.seeded_scores(case, T, 0)
    rng = np.random.default_rng(T)
    x = rng.standard_normal((T, case.in_dim)).astype(np.float16)
    if tile_dtype == "int8":
        tiles = rng.integers(-127, 128, (512, case.tr, case.tc)).astype(np.int8)
        scales = np.full((512, case.tr), 1e-3, np.float32)
    else:
        tiles, scales = (rng.standard_normal((512, case.tr, case.tc)) * 0.02).astype(np.float16), None
    _, reads = count_tile_reads(spec, x, scores, tiles, scales)
    floor = bench.floor_bytes(case, scores, tile_dtype, "float16")
    scale_bytes = floor["distinct_tiles"] * case.tr * 4 if tile_dtype == "int8" else 0
    assert int(reads.sum()) * 16 == floor["tile_bytes"] - scale_bytes
    assert reads.max() == 1  # one token chunk: no piece loaded twice


@pytest.mark.slow
def test_planted_kernel_bugs_are_caught():
    """tools/kernel_mutants.py: fifteen plausible bugs, each planted alone in the source; the host
    tests must fail on every one but the one the tool marks equivalent (about a minute)."""
    from tests.tool_helpers import load_tool

    assert load_tool("kernel_mutants").main() == 0


def test_bad_inputs_and_builds_are_clean_errors(tmp_path, monkeypatch):
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.kernel.host import count_tile_reads

    spec, x, s, tiles, scales = _inputs(CASES[0])
    with pytest.raises(PrismInputError, match="hidden must be"):
        run_on_host(spec, x.astype(np.float16), s, tiles)
    with pytest.raises(PrismInputError, match="scores must be"):
        run_on_host(spec, x, s[:, :-1], tiles)
    with pytest.raises(PrismInputError, match="tiles must be"):
        run_on_host(spec, x, s, tiles[:, :, :-1])
    with pytest.raises(PrismInputError, match="in_dim"):
        run_on_host(spec, np.zeros((2, spec.padded_in + 1), np.float32), s[:2], tiles)
    with pytest.raises(PrismInputError, match="guard"):
        run_on_host(spec, x, s, tiles, guard="middle")
    with pytest.raises(PrismInputError, match="16-byte"):
        count_tile_reads(spec, x, s, tiles)  # 10 float32 columns: 40-byte rows
    i8 = TileDispatchSpec(spec.R, spec.C, spec.tr, spec.tc, spec.top_k, 1.0, spec.out_dim, "float32", "int8")
    with pytest.raises(PrismInputError, match="scales"):
        run_on_host(i8, x, s, tiles.astype(np.int8))
    # a broken source: one line naming the defines and the compiler's first error
    monkeypatch.setenv("PRISM_DEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(
        "PRISM_DEPLOY_PLUGINS", str(_mutated_plugins(tmp_path, "float part = 0.0f;", "float part = nope;"))
    )
    with pytest.raises(HostRunError, match="host build of tile_dispatch.cu failed .*-DPRISM_R=3.*nope"):
        build_host_runner(spec)
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(HostRunError, match="no C\\+\\+ compiler"):
        build_host_runner(spec)


def test_host_runner_cache_keeps_the_most_recently_used(tmp_path, monkeypatch):
    from prism_deploy.kernel import nvrtc

    monkeypatch.setenv("PRISM_DEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(nvrtc, "CACHE_KEEP", 1)
    first = build_host_runner(TileDispatchSpec(2, 2, 4, 4, 2, 1.0, 8))
    second = build_host_runner(TileDispatchSpec(2, 2, 4, 4, 2, 2.0, 8))
    assert second.is_file() and not first.exists()
    assert sorted(p.name for p in second.parent.iterdir()) == [second.name]
