"""The tile-dispatch kernel compiles with NVRTC (no GPU needed), the cache works, and the
launch geometry keeps its invariants. GPU parity is in tests/kernel/test_gpu.py."""

from __future__ import annotations

import re

import pytest

from prism_deploy.kernel.nvrtc import nvrtc_status  # noqa: E402

_NVRTC, _WHY = nvrtc_status()
if not _NVRTC:  # the library itself, not only its Python binding (a missing libnvrtc skips, not fails)
    pytest.skip(_WHY, allow_module_level=True)

from prism_deploy.core.errors import PrismInputError  # noqa: E402
from prism_deploy.kernel import (  # noqa: E402
    KERNEL_NAME,
    KernelCompileError,
    TileDispatchSpec,
    compile_ptx,
    kernel_source_path,
    launch_config,
    normalize_arch,
    ptx_entry_points,
)
from prism_deploy.kernel.spec import SMEM_LIMIT, WARPS_PER_BLOCK  # noqa: E402

VARIANTS = [("float32", "float32"), ("float16", "float16"), ("float16", "int8"), ("float32", "int8")]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_DEPLOY_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("arch", ["compute_80", "compute_89", "compute_90"])
@pytest.mark.parametrize("hidden_dtype,tile_dtype", VARIANTS)
def test_compiles_to_ptx_with_entry_point(arch, hidden_dtype, tile_dtype):
    # odd sizes: tc not a multiple of the 16-byte vector, C odd, padding rows
    spec = TileDispatchSpec(
        R=3, C=5, tr=7, tc=13, top_k=4, gate_scale=1.3, out_dim=19, hidden_dtype=hidden_dtype, tile_dtype=tile_dtype
    )
    k = compile_ptx(spec, arch)
    assert ptx_entry_points(k.ptx) == [KERNEL_NAME]
    text = k.ptx.decode()
    assert re.search(rf"^\.target\s+sm_{arch.split('_')[1]}\b", text, re.M)
    # seven parameters: 4 input pointers, T, in_dim, the output pointer (QDP AOT order)
    params = re.search(rf"\.entry\s+{KERNEL_NAME}\s*\((.*?)\)", text, re.S).group(1)
    kinds = re.findall(r"\.param\s+\.(u64|u32|s32)", params)
    assert kinds == ["u64"] * 4 + ["u32", "u32"] + ["u64"] or kinds == ["u64"] * 4 + ["s32", "s32"] + ["u64"]


@pytest.mark.parametrize(
    "spec",
    [
        # the benchmark shapes: 4096->4096 pipe of 512 workers, seed pipe 3 layout
        TileDispatchSpec(16, 32, 256, 128, 154, 1.0, 4096, "float16", "float16"),
        TileDispatchSpec(256, 2, 512, 2048, 154, 1.0, 128256, "float16", "int8"),
    ],
)
def test_benchmark_shapes_compile(spec):
    assert ptx_entry_points(compile_ptx(spec, "sm_90").ptx) == [KERNEL_NAME]


def test_second_call_hits_cache_and_changes_miss():
    spec = TileDispatchSpec(2, 2, 8, 8, 2, 1.0, 16)
    first = compile_ptx(spec, "sm_80")
    again = compile_ptx(spec, "compute_80")
    assert not first.cache_hit and again.cache_hit and again.ptx == first.ptx
    assert first.cache_path is not None and first.cache_path.is_file()
    # another arch, another define, another source: misses
    assert not compile_ptx(spec, "sm_90").cache_hit
    assert not compile_ptx(TileDispatchSpec(2, 2, 8, 8, 2, 0.5, 16), "sm_80").cache_hit
    src = kernel_source_path().read_text() + "\n// edited\n"
    assert not compile_ptx(spec, "sm_80", source=src).cache_hit


def test_cache_keeps_the_most_recently_used_entries(monkeypatch):
    from prism_deploy.kernel import nvrtc

    monkeypatch.setattr(nvrtc, "CACHE_KEEP", 2)
    a, b, c = (TileDispatchSpec(2, 2, 8, 8, 2, scale, 16) for scale in (1.0, 2.0, 3.0))
    path_a, path_b = compile_ptx(a, "sm_80").cache_path, compile_ptx(b, "sm_80").cache_path
    assert compile_ptx(a, "sm_80").cache_hit  # a is now used more recently than b
    path_c = compile_ptx(c, "sm_80").cache_path
    assert path_a.is_file() and path_c.is_file() and not path_b.exists()
    assert not compile_ptx(b, "sm_80").cache_hit


def test_gate_scale_is_exact_float32_literal():
    spec = TileDispatchSpec(2, 2, 8, 8, 2, 0.1, 16)
    (d,) = [d for d in spec.defines() if d.startswith("-DPRISM_GATE_SCALE=")]
    assert float.fromhex(d.split("=", 1)[1].rstrip("f")) == spec.gate_scale_f32 != 0.1


def test_compile_error_is_reported_clearly():
    spec = TileDispatchSpec(2, 2, 8, 8, 2, 1.0, 16)
    broken = kernel_source_path().read_text().replace("float part = 0.0f;", "float part = undefined_symbol;")
    with pytest.raises(KernelCompileError) as info:
        compile_ptx(spec, "sm_80", source=broken, use_cache=False)
    msg = str(info.value)
    assert "compute_80" in msg and "undefined_symbol" in msg and "\n" not in msg
    assert "undefined_symbol" in info.value.log


def test_bad_specs_and_archs_rejected():
    with pytest.raises(PrismInputError, match="top_k"):
        TileDispatchSpec(2, 2, 8, 8, 5, 1.0, 16)
    with pytest.raises(PrismInputError, match="out_dim"):
        TileDispatchSpec(2, 2, 8, 8, 2, 1.0, 17)
    with pytest.raises(PrismInputError, match="tile dtype"):
        TileDispatchSpec(2, 2, 8, 8, 2, 1.0, 16, tile_dtype="bfloat16")
    with pytest.raises(PrismInputError, match="shared memory"):
        TileDispatchSpec(1, 1024, 8, 8, 2, 1.0, 8)
    with pytest.raises(PrismInputError, match="arch"):
        normalize_arch("hopper")
    assert normalize_arch((9, 0)) == normalize_arch("sm_90") == normalize_arch(90) == "compute_90"


@pytest.mark.parametrize(
    "R,C,tr,tc,out_dim",
    [(16, 32, 256, 128, 4096), (256, 2, 512, 2048, 128256), (3, 5, 7, 13, 19), (1, 371, 4, 4, 4), (4, 1, 9, 3, 30)],
)
@pytest.mark.parametrize("T", [1, 31, 32, 33, 64, 256, 1000])
def test_launch_config_invariants(R, C, tr, tc, out_dim, T):
    spec = TileDispatchSpec(R, C, tr, tc, 1, 1.0, out_dim)
    cfg = launch_config(spec, T)
    tpb = cfg.tokens_per_block
    assert tpb % 32 == 0 and 32 <= tpb <= 256
    # every token is in exactly one chunk, no empty chunk
    assert cfg.grid_y * tpb >= T > (cfg.grid_y - 1) * tpb
    # every live output row has exactly one (block, warp, i) owner, none beyond out_dim's row-blocks
    assert cfg.block_x == WARPS_PER_BLOCK * 32
    rpb, rpw = spec.rows_per_block, spec.rows_per_warp
    assert rpb == WARPS_PER_BLOCK * rpw and rpw in (1, 2, 4, 8)
    slabs = -(-tr // rpb)
    owners = [
        (b // slabs) * tr + (b % slabs) * rpb + i * WARPS_PER_BLOCK + w
        for b in range(cfg.grid_x)
        for w in range(WARPS_PER_BLOCK)
        for i in range(rpw)
        if (b % slabs) * rpb + i * WARPS_PER_BLOCK + w < tr
    ]
    assert len(owners) == len(set(owners))
    assert set(range(out_dim)) <= set(owners) and max(owners) < R * tr
    assert (cfg.grid_x // slabs - 1) * tr < out_dim
    # the gate table (odd row stride) and the column list [C + 1] fit, as the kernel lays them out
    stride = C + 1 if C % 2 == 0 else C
    assert cfg.shared_mem == (tpb * stride + C + 1) * 4 <= SMEM_LIMIT


def test_rows_per_warp_trades_routing_for_parallelism():
    # the two benchmark pipes: 512 blocks of one row per warp for 4096 rows; the
    # 128256-row pipe gets 8 rows per warp (2008 blocks instead of 16064 that each route)
    square = TileDispatchSpec(16, 32, 256, 128, 154, 1.0, 4096)
    pipe3 = TileDispatchSpec(256, 2, 512, 2048, 154, 1.0, 128256)
    assert (square.rows_per_warp, launch_config(square, 1).grid_x) == (1, 512)
    assert (pipe3.rows_per_warp, launch_config(pipe3, 1).grid_x) == (8, 251 * 8)


def test_launch_config_accepts_shape_expressions():
    class Expr:
        """Stands for a TensorRT shape expression: only + and // are used."""

        def __init__(self, text):
            self.text = text

        def __add__(self, other):
            return Expr(f"({self.text} + {other})")

        def __floordiv__(self, other):
            return Expr(f"({self.text} // {other})")

    cfg = launch_config(TileDispatchSpec(16, 32, 256, 128, 154, 1.0, 4096), Expr("T"))
    assert cfg.grid_y.text == f"((T + {cfg.tokens_per_block - 1}) // {cfg.tokens_per_block})"


def test_compiling_leaves_python_constants_intact(tmp_path, monkeypatch):
    # NVRTC writes its log and PTX into the buffers it is given; an immutable bytes buffer of
    # size 1 is CPython's shared b" ", which then became b"\x00" for the whole process.
    monkeypatch.setenv("PRISM_DEPLOY_CACHE", str(tmp_path / "fresh-cache"))
    compile_ptx(TileDispatchSpec(R=2, C=2, tr=4, tc=8, top_k=1, gate_scale=1.0, out_dim=8), "compute_80")
    assert b" " * 3 == bytes([32, 32, 32])


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_ptxas_resources_are_reported(arch):
    from prism_deploy.kernel.nvrtc import ptxas_resources

    res = ptxas_resources(TileDispatchSpec(3, 4, 10, 16, 5, 1.0, 29, "float16", "int8"), arch)
    assert res.arch == arch
    # __launch_bounds__(256) allows up to 255 registers per thread; a kernel this size needs dozens
    assert 16 <= res.registers <= 255
    assert res.stack_bytes >= 0 and res.spill_store_bytes >= 0 and res.spill_load_bytes >= 0
    with pytest.raises(KernelCompileError):
        ptxas_resources(TileDispatchSpec(2, 2, 8, 8, 2, 1.0, 16), arch, source="this is not CUDA")
