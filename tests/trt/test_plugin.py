"""The TensorRT plugin module: type-checked against tensorrt-stubs here, exercised for real
wherever a real TensorRT (10.9+, with tensorrt.plugin.aot_impl) and a GPU are present."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "mypy_trt.py"


def _stubs_installed() -> bool:
    spec = importlib.util.find_spec("tensorrt")
    return bool(spec and any((Path(p) / "__init__.pyi").is_file() for p in spec.submodule_search_locations or []))


needs_mypy = pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
needs_stubs = pytest.mark.skipif(
    not _stubs_installed(), reason="tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)"
)


@needs_mypy
@needs_stubs
def test_trt_package_type_checks_against_stubs(tmp_path):
    # One mypy run (it is slow on 2 cores): the project's package must be clean, and a file of
    # deliberate misuse must fail, which proves the stubs are consulted rather than read as Any.
    bad = tmp_path / "bad_trt.py"
    bad.write_text(
        "import tensorrt as trt\nimport tensorrt.plugin as trtp\n\n\n"
        "def f() -> None:\n    trtp.register(3)\n    trt.Builder().no_such_method()\n"
    )
    out = subprocess.run(
        [sys.executable, str(TOOL), "prism_deploy/trt", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    errors = [ln for ln in out.stdout.splitlines() if ": error:" in ln]
    assert out.returncode == 1, out.stdout + out.stderr
    assert all(ln.startswith(str(bad)) for ln in errors), "\n".join(errors)
    assert any('Argument 1 to "register"' in ln for ln in errors)
    assert any("no_such_method" in ln for ln in errors)


def test_detection_is_honest():
    """plugin_support says yes exactly when a real TensorRT with AOT plugins imports, and always says why."""
    from prism_deploy.trt import plugin_support

    ok, why = plugin_support()
    assert why
    try:
        import tensorrt

        real = hasattr(tensorrt, "Builder")
    except ImportError:
        real = False
    if real:
        try:
            import tensorrt.plugin as trtp

            has_aot = hasattr(trtp, "aot_impl")
        except ImportError:
            has_aot = False
        assert ok == has_aot
    else:
        assert not ok
        from prism_deploy.trt.plugin import register_tile_dispatch_plugin

        with pytest.raises(RuntimeError, match="not installed"):
            register_tile_dispatch_plugin()


def _real_trt_reason() -> str | None:
    from prism_deploy.trt import plugin_support as tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        return why
    from prism_deploy.core.targets import gpu_present

    return None if gpu_present() else "no NVIDIA GPU on this machine"


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_plugin_builds_and_matches_reference_in_tensorrt():
    reason = _real_trt_reason()
    if reason:
        pytest.skip(f"needs a real TensorRT and a GPU: {reason}")
    import numpy as np
    import tensorrt as trt
    import torch

    from prism_deploy.kernel.semantics import tile_dispatch
    from prism_deploy.kernel.spec import TileDispatchSpec
    from prism_deploy.trt.plugin import add_tile_dispatch

    spec = TileDispatchSpec(4, 3, 16, 24, 5, 1.5, 60)
    in_dim, T = 70, 9
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, in_dim), dtype=np.float32)
    s = rng.standard_normal((T, spec.workers), dtype=np.float32)
    tiles = rng.standard_normal((spec.workers, spec.tr, spec.tc), dtype=np.float32)
    scales = np.ones(1, np.float32)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    hx = net.add_input("hidden", trt.float32, (T, in_dim))
    hs = net.add_input("scores", trt.float32, (T, spec.workers))
    ht = net.add_constant(tiles.shape, trt.Weights(tiles)).get_output(0)
    hq = net.add_constant(scales.shape, trt.Weights(scales)).get_output(0)
    layer = add_tile_dispatch(net, hx, hs, ht, hq, spec, aot=True)
    net.mark_output(layer.get_output(0))
    plan = builder.build_serialized_network(net, builder.create_builder_config())
    assert plan is not None
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    ctx = engine.create_execution_context()
    dx, ds = torch.from_numpy(x).cuda(), torch.from_numpy(s).cuda()
    out = torch.empty(T, spec.out_dim, device="cuda")
    for name, t in (("hidden", dx), ("scores", ds), (engine.get_tensor_name(2), out)):
        ctx.set_tensor_address(name, t.data_ptr())
    stream = torch.cuda.current_stream()
    assert ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    ref = tile_dispatch(x, s, tiles, None, **spec.attributes())
    np.testing.assert_allclose(out.cpu().numpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_fused_onnx_parses_and_runs_in_tensorrt(tmp_path):
    """The fused graph through TensorRT's ONNX parser (op type + plugin_namespace + aot=1)."""
    reason = _real_trt_reason()
    if reason:
        pytest.skip(f"needs a real TensorRT and a GPU: {reason}")
    import numpy as np
    import tensorrt as trt
    import torch

    from prism_deploy.fuse import fuse_gated_pipes
    from prism_deploy.fuse.tile_dispatch_twin import make_twin_session
    from prism_deploy.lower import build_model
    from prism_deploy.reference import random_adapter, simple_config
    from prism_deploy.trt.plugin import register_tile_dispatch_plugin

    adapter = random_adapter(simple_config(70, 60, (4, 3), top_k=5, gate_scale=1.5), seed=0)
    fused = fuse_gated_pipes(build_model(adapter, precision="fp32"))
    register_tile_dispatch_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(net, logger)
    assert parser.parse(fused.SerializeToString()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("hidden", (1, 1, 70), (1, 8, 70), (2, 64, 70))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(net, config)
    assert plan is not None
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    ctx = engine.create_execution_context()
    x = np.random.default_rng(1).standard_normal((1, 8, 70)).astype(np.float32)
    dx = torch.from_numpy(x).cuda()
    out = torch.empty(1, 8, 60, device="cuda")
    ctx.set_input_shape("hidden", tuple(x.shape))
    ctx.set_tensor_address("hidden", dx.data_ptr())
    ctx.set_tensor_address("adapted", out.data_ptr())
    stream = torch.cuda.current_stream()
    assert ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    twin = make_twin_session(fused).run(None, {"hidden": x})[0]
    np.testing.assert_allclose(out.cpu().numpy(), twin, rtol=1e-4, atol=1e-4)
