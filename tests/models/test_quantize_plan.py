"""ONNX Runtime's weight-only algorithms, the mixed per-layer plan, and quantizing weight by weight
(issue 21 item 5, issue 28 item 4), on tiny random models (tests/model_helpers.py).

- every algorithm (rtn, hqq, k_quant, gptq) writes a graph that ONNX Runtime runs exactly as the
  float graph of the weights it stores (this project's own unpacking, HQQ's float zero points
  included), each weight near its original, the algorithm recorded per layer;
- the mixed plan picks, per layer, the fewest bits whose error measured on calibration inputs is
  within the bound (float where int8 is not), records the errors, and the errors are what the
  stored weights give on those inputs; the KV-cache graph gets the first graph's plan;
- a graph whose weights are in an external data file is quantized to the same bytes as the same
  graph held in one file (the streaming path that big models take).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.onnx_io import save_model
from prism_deploy.models import quantize
from prism_deploy.models.lm_export import export_model
from tests.model_helpers import make_model


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qplan")
    hf_dir = make_model("qwen2", root / "qwen2")
    export_model(hf_dir, "last", root / "fp32", max_seq=32)
    return {"hf": hf_dir, "fp32": root / "fp32", "root": root}


def _feeds(path, seed=0, seq=24):
    rng = np.random.default_rng(seed)
    model = onnx.load(str(path), load_external_data=False)
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.name == "inputs_embeds":
            feeds[i.name] = rng.normal(0, 1, size=(1, seq, dims[2])).astype(np.float32)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, seq), np.int64)
        else:
            feeds[i.name] = np.zeros((1, dims[1], 0, dims[3]), np.float32)
    return feeds


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


def _session(path):
    from prism_deploy.core.ort_session import make_session

    return make_session(path, "cpu")


@pytest.mark.parametrize(
    "algorithm,precision",
    [("rtn", "int4"), ("hqq", "int4"), ("k_quant", "int4"), ("k_quant", "int8"), ("gptq", "int4")],
)
def test_each_algorithm_runs_as_the_weights_it_stores(qwen, tmp_path, algorithm, precision):
    src = qwen["fp32"] / "last.onnx"
    # block 16: ONNX Runtime's k_quant writer needs an even number of blocks along K (96 wide)
    spec = quantize.make_spec(precision, algorithm=algorithm, accuracy_level=0, block_size=16)
    acts = quantize.layer_inputs(src, [_feeds(src, seed=1)]) if algorithm == "gptq" else None
    record = quantize.quantize_graph(src, tmp_path / "q.onnx", spec, activations=acts)
    weights = quantize.dequantized_reference(tmp_path / "q.onnx", tmp_path / "ref.onnx")
    feeds = _feeds(src)
    got = _session(tmp_path / "q.onnx").run(["logits"], feeds)[0]
    assert _rel(got, _session(tmp_path / "ref.onnx").run(["logits"], feeds)[0]) < 1e-5
    float_logits = _session(src).run(["logits"], feeds)[0]
    assert 1e-5 < _rel(got, float_logits) < (0.05 if precision == "int8" else 0.6)
    original = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    done = [layer for layer in record["layers"] if "quantized" in layer]
    assert done and {layer["runs_as"] for layer in done} == set(weights)
    bound = 0.02 if precision == "int8" else 0.25  # of the weight's norm: 4-bit noise, not a wrong layout
    for layer in done:
        assert layer["algorithm"] == algorithm and layer["bits"] == quantize.BITS[precision]
        assert _rel(weights[layer["runs_as"]], original[layer["weight"]]) < bound
    assert record["algorithm"] == algorithm and record["symmetric"] == (algorithm in ("rtn", "gptq"))


def test_k_quant_with_an_odd_block_count_is_refused(qwen, tmp_path):
    with pytest.raises(PrismInputError, match="even number of blocks"):
        quantize.quantize_graph(
            qwen["fp32"] / "last.onnx", tmp_path / "q.onnx", quantize.make_spec("int4", algorithm="k_quant")
        )
    assert not (tmp_path / "q.onnx").exists()


def test_accuracy_level_is_set_on_every_algorithm(qwen, tmp_path):
    """HQQ's writer sets no accuracy_level: the spec's goes onto every MatMulNBits node."""
    quantize.quantize_graph(
        qwen["fp32"] / "last.onnx", tmp_path / "q.onnx", quantize.make_spec("int4", algorithm="hqq")
    )
    nodes = [n for n in onnx.load(str(tmp_path / "q.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert nodes and all(
        onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "accuracy_level")) == 4 for n in nodes
    )


def test_mixed_plan_follows_the_measured_errors(qwen, tmp_path):
    src = qwen["fp32"] / "last.onnx"
    acts = quantize.layer_inputs(src, [_feeds(src, seed=2)])
    # all int4 with a loose bound, then a bound between the layers' int4 errors
    loose = quantize.quantize_graph(
        src, tmp_path / "a.onnx", quantize.make_spec("int4", mixed=True, max_error=0.9), activations=acts
    )
    err4 = sorted(layer["error"]["4"] for layer in loose["layers"] if "error" in layer)
    assert set(loose["plan"].values()) == {4}
    bound = float(np.median(err4))
    rec = quantize.quantize_graph(
        src, tmp_path / "b.onnx", quantize.make_spec("int4", mixed=True, max_error=bound), activations=acts
    )
    weights = quantize.dequantized_weights(onnx.load(str(tmp_path / "b.onnx")))
    original = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    seen = set()
    for layer in rec["layers"]:
        if "error" not in layer:
            continue
        errors, bits = layer["error"], rec["plan"][layer["node"]]
        want = 4 if errors["4"] <= bound else 8 if errors.get("8", 1) <= bound else None
        assert bits == want
        seen.add(bits)
        if bits is not None:  # the recorded error is what the stored weight gives on those inputs
            measured = quantize.layer_error(original[layer["weight"]], weights[layer["runs_as"]], acts[layer["node"]])
            assert measured == pytest.approx(errors[str(bits)], rel=1e-4)
            assert layer["bits"] == bits
        else:
            assert "kept" in layer and "max-error" in layer["kept"]
    assert {4, 8} <= seen
    # a bound below every int8 error keeps every weight float
    tight = quantize.quantize_graph(
        src, tmp_path / "c.onnx", quantize.make_spec("int8", mixed=True, max_error=1e-9), activations=acts
    )
    assert set(tight["plan"].values()) == {None} and tight["quantized_bytes"] == 0


def test_export_mixed_records_the_plan_and_shares_it_with_the_kv_graph(qwen, tmp_path):
    out = tmp_path / "mixed"
    manifest = export_model(
        qwen["hf"],
        "last",
        out,
        precision="int4",
        max_seq=32,
        quantization=quantize.make_spec("int4", algorithm="hqq", mixed=True, max_error=0.05),
    )
    from prism_deploy.format.model_folder import read_model_json

    q = read_model_json(out, "last")["quantization"]  # the schema holds the plan and its errors
    assert q == json.loads(json.dumps(manifest["quantization"]))
    assert q["mixed"] and q["max_error"] == 0.05 and q["calibration"]["tokens"] > 16
    plans = [g["plan"] for g in q["graphs"].values()]
    assert len(plans) == 2 and plans[0] == plans[1]
    with_past = q["graphs"]["graph_with_past"]["layers"]
    assert all("error" in layer for layer in with_past if "quantized" in layer)
    # hqq at 4 bits, round to nearest where the plan says 8
    assert {(layer["bits"], layer["algorithm"]) for layer in with_past if "quantized" in layer} <= {
        (4, "hqq"),
        (8, "rtn"),
    }


def test_options_refused_as_one_line():
    for kwargs, words in [
        ({"algorithm": "gptq"}, "4-bit"),
        ({"algorithm": "hqq"}, "8-bit"),
        ({"algorithm": "hqq", "form": "dq"}, "dq form"),
        ({"max_error": 0.1}, "--mixed"),
        ({"algorithm": "nope"}, "--algorithm"),
        ({"mixed": True, "max_error": 2.0}, "(0, 1)"),
    ]:
        with pytest.raises(PrismInputError, match=words.replace("(", r"\(").replace(")", r"\)")):
            quantize.make_spec("int8", **kwargs)


def test_external_data_graph_quantizes_to_the_same_bytes(qwen, tmp_path):
    """The streaming path (weights read one at a time from the data file, kept float tensors
    copied from it while saving) gives the graph the in-memory path gives."""
    src = qwen["fp32"] / "last_with_past.onnx"
    (tmp_path / "ext").mkdir()
    external = tmp_path / "ext" / "g.onnx"
    written = save_model(onnx.load(str(src)), external, external=True)
    assert len(written) == 2  # graph + data file
    spec = quantize.make_spec("int4")
    a = quantize.quantize_graph(src, tmp_path / "a.onnx", spec)
    b = quantize.quantize_graph(external, tmp_path / "b.onnx", spec)
    assert a["layers"] == b["layers"]
    ma, mb = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    ta = {t.name: onnx.numpy_helper.to_array(t) for t in ma.graph.initializer}
    tb = {t.name: onnx.numpy_helper.to_array(t) for t in mb.graph.initializer}
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
