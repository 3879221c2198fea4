"""TensorRT's ONNX parser and builder on this project's graphs, without a GPU.

No full TensorRT installs on these machines, but TensorRT-RTX does (``tensorrt-rtx-cu13``,
module ``tensorrt_rtx``): its builder and ONNX parser have TensorRT's API, build engines on a
CPU (its "CPU-only AOT" phase) and build strongly typed networks only. Through it the real
``prism_deploy.trt.engine`` code parses every lowering into a network and builds an engine,
and the network shows what precision TensorRT gives each MatMul. What this cannot show: that
the engines run (TensorRT-RTX engines need an RTX GPU; none targets an H100), or anything
about the plugin beyond its ONNX node (TensorRT-RTX ships no usable ``tensorrt.plugin``;
tools/qdp_check.py takes NVIDIA's from a TensorRT checkout).
"""

from __future__ import annotations

import numpy as np
import pytest

from prism_deploy.core.onnx_io import save_model
from prism_deploy.core.precision import PRECISIONS as ALL_PRECISIONS
from prism_deploy.fuse import fuse_gated_pipes
from prism_deploy.lower import export_onnx
from prism_deploy.reference.module import load_adapter
from prism_deploy.trt.engine import TensorRTError, TrtBuildSettings, build_serialized_engine, parse_network

try:
    import tensorrt_rtx as trt
except ImportError as exc:  # pragma: no cover - the dev extra installs it
    trt = None
    WHY = f"needs TensorRT-RTX (pip install tensorrt-rtx-cu13): {exc}"
else:
    WHY = ""
# int4 is MatMulNBits (ONNX Runtime) only: TensorRT builds are refused it (docs/precision.md)
PRECISIONS = tuple(p for p in ALL_PRECISIONS if p != "int4")

pytestmark = pytest.mark.skipif(trt is None, reason=WHY)

EXAMPLE = "examples/demo-adapter.safetensors"
SETTINGS = TrtBuildSettings(min_shape=(1, 1, 256), opt_shape=(1, 8, 256), max_shape=(4, 64, 256))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The shipped example lowered at every precision and in both gated forms."""
    out = tmp_path_factory.mktemp("graphs")
    adapter = load_adapter(EXAMPLE)
    calib = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    paths = {}
    for precision in PRECISIONS:
        for form in ("A", "B"):
            path = out / f"{precision}-{form}.onnx"
            export_onnx(
                adapter, path, precision=precision, gated_form=form, calib=calib if precision == "int8-qdq" else None
            )
            paths[precision, form] = path
    return paths


def _matmuls(network):
    """name -> (input dtypes, output dtype) of every MatMul, plus the (De)Quantize layers."""
    found = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.MATRIX_MULTIPLY, trt.LayerType.DEQUANTIZE, trt.LayerType.QUANTIZE):
            found[layer.name] = ([layer.get_input(j).dtype for j in range(layer.num_inputs)], layer.get_output(0).dtype)
    return found


@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_lowering_parses_strongly_typed_with_its_precision(graphs, precision, form):
    _builder, network, _parser = parse_network(graphs[precision, form], trt_module=trt)
    layers = _matmuls(network)
    F, H, I8 = trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.INT8
    tile_mms = {n: v for n, v in layers.items() if n.endswith("/MatMul") and "/gate/" not in n}
    gate_mms = {n: v for n, v in layers.items() if "/gate/" in n}
    # the example: one ungated pipe and two gated ones, each a MatMul over its tiles
    assert set(tile_mms) == {"dense/MatMul", "routed/MatMul", "coarse/MatMul"}
    assert set(gate_mms) == {"routed/gate/MatMul", "coarse/gate/MatMul"}
    compute = F if precision == "fp32" else H
    for name, (ins, out) in tile_mms.items():
        assert ins == [compute, compute] and out == compute, (name, ins, out)
    # the gates stay float32 at every precision (docs/precision.md: routing is decided there)
    for name, (ins, out) in gate_mms.items():
        assert ins == [F, F] and out == F, (name, ins, out)
    weight_dq = [n for n in layers if n.endswith("tiles/DequantizeLinear")]
    act_q = [n for n in layers if n.endswith("input/QuantizeLinear")]
    if precision in ("int8", "int8-qdq"):
        assert len(weight_dq) == 3 and all(layers[n][0][0] == I8 for n in weight_dq)
    else:
        assert not weight_dq
    if precision == "int8-qdq":
        assert len(act_q) == 3 and all(layers[n][1] == I8 for n in act_q)
    else:
        assert not act_q


# TensorRT-RTX 1.7 deprecates timing caches (its calls are no-ops there); the code path that
# reads and atomically rewrites the cache file still runs.
@pytest.mark.filterwarnings("ignore:Use Deprecated in TensorRT-RTX:DeprecationWarning")
@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_engine_builds_with_a_timing_cache(graphs, precision, form, tmp_path):
    """REFIT builds are not tried: TensorRT-RTX 1.7 needs CUDA for them (on a CPU its Myelin
    compiler fails with `CHECK(status == CUDA_SUCCESS)`), so they wait for a GPU and full TensorRT."""
    cache = tmp_path / "timing.cache"
    plan = build_serialized_engine(graphs[precision, form], SETTINGS, timing_cache=cache, trt_module=trt)
    assert len(plan) > 200_000  # a whole plan (about 2 MB here), not an empty or truncated one
    assert cache.is_file()
    # a second build reads the cache file it wrote
    again = build_serialized_engine(graphs[precision, form], SETTINGS, timing_cache=cache, trt_module=trt)
    assert len(again) > 200_000


def test_parser_errors_reach_the_caller(graphs, tmp_path):
    """The fused graph's prism::tile_dispatch node has no importer here (no plugin registry for
    it in TensorRT-RTX), and a truncated file is no model: both are one TensorRTError."""
    import onnx

    fused = fuse_gated_pipes(onnx.load(graphs["fp16", "A"]))
    save_model(fused, tmp_path / "fused.onnx")
    with pytest.raises(TensorRTError, match="tile_dispatch"):
        parse_network(tmp_path / "fused.onnx", trt_module=trt)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(graphs["fp32", "A"].read_bytes()[:1000])
    with pytest.raises(TensorRTError, match="ONNX parser failed"):
        parse_network(broken, trt_module=trt)


@pytest.fixture(scope="module")
def model_exports(zoo):
    """A tiny Llama exported as model A and a tiny Qwen2 as model B (tests/conftest.py)."""
    return {"A": zoo["A"], "B": zoo["B"]}


@pytest.mark.filterwarnings("ignore:Use Deprecated in TensorRT-RTX:DeprecationWarning")
@pytest.mark.parametrize("role,key", [("A", "graph"), ("B", "graph"), ("B", "graph_with_past")])
def test_exported_model_graphs_parse_and_build(model_exports, role, key):
    """The graphs of `prism-deploy export-model` with the profile `build --model --target trt` gives
    them (batch x seq, and past length 0..max for the KV-cache graph)."""
    import json

    from prism_deploy.builder.model_source import trt_input_shapes
    from prism_deploy.builder.options import Profile

    folder = model_exports[role]
    model = json.loads((folder / "model.json").read_text())
    shapes = trt_input_shapes(model, key, Profile(batch=(1, 2, 4), seq=(1, 8, 32)))
    _builder, network, _parser = parse_network(folder / model["files"][key]["name"], trt_module=trt)
    assert {network.get_input(i).name for i in range(network.num_inputs)} == {name for name, *_ in shapes}
    unused = (0, 0, 0)
    settings = TrtBuildSettings(unused, unused, unused, input_shapes=shapes)
    assert len(build_serialized_engine(folder / model["files"][key]["name"], settings, trt_module=trt)) > 100_000
