"""INT8 / INT4 of a graph whose float weights exceed 2 GiB (issue 28 item 4), marked ``slow``.

A random graph of 35 MatMuls with [4096, 4096] float32 weights (2.19 GiB, so its weights live in
an external data file, as the exporter writes a model that size) is quantized by
``quantize.quantize_graph`` in a fresh process. The process resets the kernel's peak-RSS counter
after loading its libraries (``/proc/self/clear_refs``), so the peak above that baseline is what
quantizing holds: at most 1.5x the float weights (the issue's bound; measured for int4: 1.08x in
all, 0.65x of the process's own memory, 347 s on the loaded 2-core machine),
and nothing loads the whole proto (no in-memory ``check_model`` of a >2 GiB message: the
former code failed there with "This protobuf of onnx model is too large (>2GiB)").
Figures: docs/quantized-models.md, "Graphs over 2 GiB".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))
LAYERS, WIDTH = int(os.environ.get("PRISM_TEST_BIG_LAYERS", 35)), 4096
FLOAT_BYTES = LAYERS * WIDTH * WIDTH * 4

MAKE = textwrap.dedent("""
    import sys
    import numpy as np
    from onnx import TensorProto, helper
    from prism_deploy.core.blocks import DeferredTensor
    from prism_deploy.core.onnx_io import finalize, save_model

    layers, width, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    nodes, inits, deferred = [], [], {}
    for i in range(layers):
        name = f"w{i}"
        nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", name],
                                      [f"h{i}" if i < layers - 1 else "y"], name=f"/layers.{i}/MatMul"))
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT)  # its bytes: deferred
        tensor.dims.extend([width, width])
        inits.append(tensor)
        deferred[name] = DeferredTensor((width, width), np.dtype(np.float32),
            lambda a, b, i=i: (np.random.default_rng([i, a]).standard_normal((b - a, width), np.float32)
                               / np.sqrt(width)).astype(np.float32))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, width])], initializer=inits)
    model = finalize(helper.make_model(graph))
    print(save_model(model, path, deferred=deferred))
""")

MEASURE = textwrap.dedent("""
    import json, sys, threading, time

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    anon, done = [0], threading.Event()

    def sample():
        while not done.wait(0.01):
            anon[0] = max(anon[0], status("RssAnon:"))

    src, dst, precision, result = sys.argv[1:5]
    import numpy, onnx, onnxruntime, torch
    from onnxruntime.quantization import matmul_nbits_quantizer
    from prism_deploy.models import quantize
    spec = quantize.make_spec(precision)
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    anon[0] = status("RssAnon:")
    anon_before = anon[0]
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.time()
    record = quantize.quantize_graph(src, dst, spec)
    out = dict(seconds=time.time() - t0, rss_before=before, anon_before=anon_before, peak=status("VmHWM:"),
               anon=anon[0], files=record["files"], quantized=sum("quantized" in x for x in record["layers"]),
               quantized_bytes=record["quantized_bytes"], float_bytes=record["quantized_bytes_float"])
    done.set()
    json.dump(out, open(result, "w"))
""")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantizing_a_graph_over_2_gib_holds_less_than_its_weights(tmp_path, precision):
    src = tmp_path / "big.onnx"
    subprocess.run([sys.executable, "-c", MAKE, str(LAYERS), str(WIDTH), str(src)], check=True, env=ENV, timeout=1800)
    assert (tmp_path / "big.onnx.data").stat().st_size >= FLOAT_BYTES > 2 * 2**30
    result = tmp_path / "measured.json"
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(src), str(tmp_path / "q.onnx"), precision, str(result)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=3000,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(result.read_text())
    print(precision, json.dumps(m))
    assert m["quantized"] == LAYERS and m["float_bytes"] == FLOAT_BYTES
    held = m["peak"] - m["rss_before"]
    assert held <= 1.5 * FLOAT_BYTES, held / FLOAT_BYTES
    # the process's own memory stays under the weights' size (int4 measured: 0.65x, of which the
    # quantized tensors are 0.16x; the rest is the quantizer's working set of one weight and the
    # serialized output)
    assert m["anon"] - m["anon_before"] <= 1.0 * FLOAT_BYTES, (m["anon"] - m["anon_before"]) / FLOAT_BYTES
    # the quantized graph loads and runs in ONNX Runtime, and is near the float graph on an input
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((2, WIDTH)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    model = onnx.load(str(src), load_external_data=False)
    want = x
    for i in range(LAYERS):  # the float chain, one weight at a time from the data file
        tensor = next(t for t in model.graph.initializer if t.name == f"w{i}")
        offset = int(next(e.value for e in tensor.external_data if e.key == "offset"))
        w = np.fromfile(tmp_path / "big.onnx.data", dtype=np.float32, count=WIDTH * WIDTH, offset=offset)
        want = want @ w.reshape(WIDTH, WIDTH)
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert 0 < rel < (0.05 if precision == "int8" else 0.6), rel
