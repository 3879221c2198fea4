"""Weight-only INT8 / INT4 model graphs (issue 18): export, the exact lowering, validation, the chain.

Tiny random models from tests/model_helpers.py (2 layers; Llama 64 wide as model A, Qwen2 96
wide as model B, GPT-2 for its Gemm weights). The lowering is checked reference-first: the
quantized graph against the float graph of the weights it stores, read back by
``quantize.dequantized_weights`` (to float rounding), and those weights against the original
float weights (within the rounding step of their block).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from prism_deploy.cli.main import main
from prism_deploy.core.errors import PrismInputError
from prism_deploy.format.model_folder import read_model_json as read_manifest
from prism_deploy.models import quantize
from prism_deploy.models.lm_export import export_model
from prism_deploy.reference import random_adapter, simple_config
from tests.model_helpers import make_model

# (precision, form): the four forms the export offers
FORMS = [("int8", "nbits"), ("int4", "nbits"), ("int8", "dq"), ("int4", "dq")]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("qmodels")
    z = {kind: make_model(kind, root / kind) for kind in ("llama", "qwen2", "gpt2")}
    for kind, role in (("llama", "first"), ("qwen2", "last"), ("gpt2", "last")):
        z[kind, role, "fp32"] = root / f"{kind}-{role}-fp32"
        export_model(z[kind], role, z[kind, role, "fp32"], max_seq=32)
    z["adapter"] = root / "adapter.safetensors"
    random_adapter(simple_config(64, 96, (4, 2), top_k=3), seed=5).save(z["adapter"])
    z["root"] = root
    return z


def _session(path, level=None):
    from prism_deploy.core.ort_session import make_session

    return make_session(path, "cpu", graph_optimization_level=level)


def _feeds(path, seed=0):
    """Random inputs for a model graph: ids or embeddings, a mask with one left-padded row, an
    empty past for the KV-cache graph."""
    rng = np.random.default_rng(seed)
    model = onnx.load(str(path), load_external_data=False)
    feeds = {}
    batch, seq = 2, 5
    initializers = {t.name for t in model.graph.initializer}  # logits_start: optional, left at its default
    for i in model.graph.input:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.name in initializers:
            continue
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 200, size=(batch, seq), dtype=np.int64)
        elif i.name == "inputs_embeds":
            feeds[i.name] = rng.normal(0, 1, size=(batch, seq, dims[2])).astype(np.float32)
        elif i.name == "attention_mask":
            mask = np.ones((batch, seq), dtype=np.int64)
            mask[1, :2] = 0
            feeds[i.name] = mask
        else:  # past_key_values.*: [batch, kv_heads, 0, head_dim]
            feeds[i.name] = np.zeros((batch, dims[1], 0, dims[3]), dtype=np.float32)
    return feeds


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


# -- the lowering, reference first ----------------------------------------------------------------


@pytest.mark.parametrize(
    "graph,precision,options",
    [
        (("qwen2", "last", "last_with_past.onnx"), "int8", {"accuracy_level": 0}),
        (("qwen2", "last", "last.onnx"), "int4", {"accuracy_level": 0, "symmetric": False, "block_size": 16}),
        (("llama", "first", "first.onnx"), "int4", {"accuracy_level": 0, "embedding": True}),
        (("gpt2", "last", "last.onnx"), "int8", {"form": "dq"}),
        (("qwen2", "last", "last_with_past.onnx"), "int4", {"form": "dq"}),
        (("gpt2", "last", "last_with_past.onnx"), "int4", {"accuracy_level": 0}),
    ],
)
def test_quantized_graph_equals_its_dequantized_reference(zoo, tmp_path, graph, precision, options):
    """ONNX Runtime on the quantized graph = the float graph of the weights it stores (read back
    by this project's own unpacking), to float rounding; and each stored weight is the original
    rounded to its block's step. A wrong packing, layout, block or zero point fails one of the two."""
    kind, role, name = graph
    src = zoo[kind, role, "fp32"] / name
    spec = quantize.make_spec(precision, **options)
    record = quantize.quantize_graph(src, tmp_path / "q.onnx", spec)
    weights = quantize.dequantized_reference(tmp_path / "q.onnx", tmp_path / "ref.onnx")
    feeds = _feeds(src)
    # ORT_DISABLE_ALL: the graph as written (ORT would otherwise fuse the dq form's
    # DequantizeLinear + MatMul into MatMulNBits computing on int8-rounded activations)
    level = "ORT_DISABLE_ALL" if spec.form == "dq" else None
    got = _session(tmp_path / "q.onnx", level).run(None, feeds)
    want = _session(tmp_path / "ref.onnx", level).run(None, feeds)
    for g, w in zip(got, want):
        if w.size:
            assert _rel(g, w) < 1e-5, _rel(g, w)
    assert _rel(got[0], _session(src).run(None, feeds)[0]) > 1e-4  # and it really is quantized

    original = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    done = [layer for layer in record["layers"] if "quantized" in layer]
    assert done and {layer["runs_as"] for layer in done} == set(weights)
    for layer in done:
        w = weights[layer["runs_as"]]
        ref = original.get(layer["weight"])
        if ref is None:  # a Gemm weight stored transposed for MatMul (transB)
            ref = original[layer["weight"].removesuffix("_transposed")].T
        assert w.shape == ref.shape == tuple(layer["shape"])
        if layer["quantized"] == "GatherBlockQuantized":
            ref, w = ref.T, w.T  # a table's rows are blocked along the hidden axis: make it the first
        k = ref.shape[0]
        block = layer["block_size"] or k
        pad = -k % block
        blocks = np.abs(np.pad(ref, ((0, pad), (0, 0)))).reshape(-1, block, ref.shape[1]).max(axis=1)
        absmax = np.repeat(blocks, block, axis=0)[:k]
        # one step of the symmetric grid, absmax / (2^(bits-1) - 1), bounds the rounding error of
        # every scheme here (symmetric: half a step, or one where the far end clips; asymmetric:
        # half of (max - min) / (2^bits - 1))
        step = absmax / (2 ** (layer["bits"] - 1) - 1)
        err = np.abs(w - ref)
        assert (err <= step * (1 + 1e-5) + 1e-12).all(), float((err / np.maximum(step, 1e-30)).max())
        assert err.max() > 0


def test_accuracy_level_changes_the_kernel_not_the_weights(zoo, tmp_path):
    """Level 4 (the default) stores the same bytes as level 0; only ONNX Runtime's CPU kernel
    differs, by rounding each block of the activations to int8."""
    src = zoo["qwen2", "last", "fp32"] / "last.onnx"
    for level in (0, 4):
        quantize.quantize_graph(src, tmp_path / f"l{level}.onnx", quantize.make_spec("int8", accuracy_level=level))
    a, b = (onnx.load(str(tmp_path / f"l{level}.onnx")) for level in (0, 4))
    assert [t.SerializeToString() for t in a.graph.initializer] == [t.SerializeToString() for t in b.graph.initializer]
    feeds = _feeds(src)
    exact, fast = (_session(tmp_path / f"l{level}.onnx").run(None, feeds)[0] for level in (0, 4))
    # int8 activations (a step of max|block|/127) move the logits by well under 1% here
    assert 0 < _rel(fast, exact) < 1e-2


def test_forms_opsets_and_records(zoo, tmp_path):
    """nbits: opset 19 / IR 9 plus com.microsoft; dq int8 stays at 19 / 9; only int4
    initializers (dq int4, int4 embedding tables) take opset 21 / IR 10. Every MatMul weight
    (the LM head included) is quantized; embedding tables are recorded as kept."""
    src = zoo["llama", "first", "fp32"] / "first.onnx"
    expect = {
        ("int8", "nbits", False): (19, 9),
        ("int4", "nbits", False): (19, 9),
        ("int8", "dq", False): (19, 9),
        ("int4", "dq", False): (21, 10),
        ("int4", "nbits", True): (21, 10),
    }
    for (precision, form, embedding), (opset, ir) in expect.items():
        spec = quantize.make_spec(precision, form=form, embedding=embedding)
        rec = quantize.quantize_graph(src, tmp_path / "q.onnx", spec)
        model = onnx.load(str(tmp_path / "q.onnx"))
        onnx.checker.check_model(model, full_check=form == "dq")
        main_opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert (rec["opset"], rec["ir_version"], main_opset, model.ir_version) == (opset, ir, opset, ir)
        ops = {n.op_type for n in model.graph.node}
        assert ("MatMulNBits" in ops) == (form == "nbits") and ("DequantizeLinear" in ops) == (form == "dq")
        assert rec["domains"] == (["com.microsoft"] if form == "nbits" else [])
        # 14 projections in 2 layers, nothing left float but the embedding table (unless asked)
        assert sum("quantized" in layer for layer in rec["layers"]) == 14 + embedding
        assert [layer["kept"][:15] for layer in rec["layers"] if "kept" in layer] == (
            [] if embedding else ["embedding table"]
        )
        # int8: 1 byte + a float32 scale per 32 weights (or per column); int4: half a byte + a scale per 32
        assert rec["quantized_bytes"] < rec["quantized_bytes_float"] / (3.5 if precision == "int8" else 6)
    lm_head = quantize.quantize_graph(
        zoo["qwen2", "last", "fp32"] / "last.onnx", tmp_path / "b.onnx", quantize.make_spec("int4")
    )
    assert any(layer["node"] == "/model/lm_head/MatMul" and "quantized" in layer for layer in lm_head["layers"])


# -- export, validation, the chain ----------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(zoo):
    """Model A (Llama, upper) and model B (Qwen2, lower) at each precision and form."""
    out = {}
    for precision, form in FORMS:
        spec = quantize.make_spec(precision, form=form)
        for kind, role, tag in (("llama", "first", "A"), ("qwen2", "last", "B")):
            folder = zoo["root"] / f"{tag}-{precision}-{form}"
            export_model(zoo[kind], role, folder, precision=precision, max_seq=64, quantization=spec)
            out[tag, precision, form] = folder
    return out


@pytest.mark.parametrize("precision,form", FORMS)
def test_every_role_exports_validates_and_runs_in_the_chain(zoo, exports, precision, form):
    from prism_deploy.core import tolerances
    from prism_deploy.parity.chain_parity import check_pipeline_parity
    from prism_deploy.runtime.chain import Pipeline

    a, b = exports["A", precision, form], exports["B", precision, form]
    tol = tolerances.model_export(precision).to_json()
    for folder, outputs in ((a, ("hidden",)), (b, ("logits", "logits_with_past"))):
        manifest = read_manifest(folder)
        q = manifest["quantization"]
        assert (
            manifest["precision"] == precision and q["form"] == form and q["bits"] == {"int8": 8, "int4": 4}[precision]
        )
        assert q["block_size"] == (None if (precision, form) == ("int8", "dq") else 32)
        assert set(q["graphs"]) == ({"graph"} if folder == a else {"graph", "graph_with_past"})
        for key, graph in q["graphs"].items():
            on_disk = onnx.load(str(folder / manifest["files"][key]["name"]))
            assert on_disk.ir_version == graph["ir_version"] <= 10
            assert all(layer["bits"] == q["bits"] for layer in graph["layers"] if "quantized" in layer)
        for name in outputs:
            fig = manifest["validation"][name]
            assert 0 < fig["rel_l2"] <= tol["rel_l2_max"] and fig["min_cosine"] >= tol["token_cosine_min"]
            if name != "hidden":
                assert fig["top1"] >= tol["top1_min"] and fig["kl_max"] <= tol["kl_max"]
        assert np.load(folder / "embed_tokens.npy").dtype == np.float32 if folder == b else True

    pipe = Pipeline(a, zoo["adapter"], b)
    ids = np.random.default_rng(0).integers(0, 300, size=(4, 32))  # 128 tokens: top-1 over ~40 clear ones
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    assert pipe.generate(ids, mask, max_new_tokens=4).shape == (4, 4)
    report = check_pipeline_parity(zoo["llama"], zoo["adapter"], zoo["qwen2"], pipe, ids, mask)
    assert report["precision"] == precision and report["passed"], report["failures"]
    # each hop's error is reported: model A's quantization shows at `hidden`, before the adapter
    # (whose gate then routes some tokens differently: `adapted` moves more than `hidden`)
    assert 1e-4 < report["hidden"]["rel_l2"] < report["adapted"]["rel_l2"] < 1.0


@pytest.mark.parametrize("role", ["first", "last"])
def test_gpt2_gemm_weights_are_quantized(zoo, tmp_path, role):
    """GPT-2's Conv1D projections trace to Gemm: rewritten to MatMul + Add, then quantized."""
    m = export_model(zoo["gpt2"], role, tmp_path / role, precision="int4", max_seq=32)
    graph = m["quantization"]["graphs"]["graph"]
    done = [layer["node"] for layer in graph["layers"] if "quantized" in layer]
    assert sum("/Gemm" in n for n in done) == 8  # 4 per layer
    assert not any(
        n.op_type == "Gemm" for n in onnx.load(str(tmp_path / role / m["files"]["graph"]["name"])).graph.node
    )


def test_a_model_that_fails_validation_writes_nothing(zoo, tmp_path, monkeypatch, capsys):
    """Flip the sign of one layer's stored scales after quantizing: validation catches it, the
    command exits 1 and no model.json is written."""
    real = quantize.quantize_graph

    def quantize_then_break(src, dst, spec, **kwargs):
        record = real(src, dst, spec, **kwargs)
        model = onnx.load(str(dst))
        target = next(layer for layer in record["layers"] if "quantized" in layer and "down_proj" in layer["node"])
        node = next(n for n in model.graph.node if n.name == target["written"])
        scales = next(t for t in model.graph.initializer if t.name == node.input[2])
        scales.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(scales), scales.name))
        onnx.save(model, str(dst))
        return record

    monkeypatch.setattr(quantize, "quantize_graph", quantize_then_break)
    out = tmp_path / "bad"
    code = main(
        ["export-model", str(zoo["qwen2"]), "--role", "last", "-o", str(out), "--precision", "int8", "--max-seq", "16"]
    )
    err = capsys.readouterr().err
    assert (
        code == 1
        and err.startswith("error: check failed: last graph `logits` (int8) diverges")
        and err.count("\n") == 1
    )
    assert not (out / "model.json").exists()


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--precision", "int4", "--block-size", "48"], "--block-size: 48 must be a power of two from 16 to 256"),
        (["--precision", "int8", "--block-size", "8"], "--block-size: 8 must be a power of two from 16 to 256"),
        (["--precision", "int4", "--block-size", "512"], "--block-size: 512 must be a power of two from 16 to 256"),
        (["--precision", "int8", "--block-size", "65536"], "--block-size: 65536 must be a power of two from 16 to 256"),
        (["--precision", "int4", "--form", "dq", "--asymmetric"], "--asymmetric: the dq form"),
        (["--precision", "int8", "--form", "dq", "--block-size", "32"], "int8 in the dq form is per output channel"),
        (["--precision", "int8", "--quantize-embedding"], "4 bits only"),
        (["--precision", "int4", "--form", "dq", "--quantize-embedding"], "only the nbits form"),
        (["--precision", "int4", "--form", "dq", "--accuracy-level", "4"], "--accuracy-level: a MatMulNBits attribute"),
        (["--precision", "int4", "--accuracy-level", "7"], "--accuracy-level: 7 is not an integer in [0, 4]"),
        (["--block-size", "32"], "--block-size: only with --precision int8 or int4"),
        (["--precision", "int4", "--form", "qdq"], "invalid choice: 'qdq'"),
    ],
)
def test_bad_quantization_options_exit_2_with_one_line(zoo, tmp_path, capsys, extra, needle):
    out = tmp_path / "never"
    try:
        code = main(["export-model", str(zoo["qwen2"]), "--role", "last", "-o", str(out), *extra])
    except SystemExit as exc:  # argparse's own refusals (an unknown --form) exit from the parser
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1
    assert not out.exists()  # refused before anything was loaded or written


def test_export_model_cli_prints_the_quantization(zoo, tmp_path, capsys):
    out = tmp_path / "A4"
    assert (
        main(
            [
                "export-model",
                str(zoo["llama"]),
                "--role",
                "first",
                "-o",
                str(out),
                "--precision",
                "int4",
                "--block-size",
                "64",
                "--max-seq",
                "16",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert (
        "quantized: int4 nbits, block 64, symmetric, accuracy level 4; graph: 14 weights quantized, 1 kept float"
        in text
    )
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["quantization"]["block_size"] == 64 and manifest["quantization"]["graphs"]["graph"]["layers"]


def test_build_model_accepts_quantized_folders(zoo, exports, tmp_path, capsys):
    """`build --model` on int4 model B (nbits) and int8 model A (dq): the ORT engines pass the
    built-graph parity and run in the pipeline with the same tokens as the export folders."""
    from prism_deploy.runtime.chain import Pipeline

    a, b = exports["A", "int8", "dq"], exports["B", "int4", "nbits"]
    assert main(["build", "--model", str(b), "-o", str(tmp_path / "trt"), "--target", "trt"]) == 2
    err = capsys.readouterr().err
    assert "nbits form (MatMulNBits), which is for ONNX Runtime; export with --form dq for TensorRT" in err
    assert err.count("\n") == 1 and not (tmp_path / "trt").exists()
    built = {}
    for tag, folder in (("A", a), ("B", b)):
        built[tag] = tmp_path / f"built-{tag}"
        assert main(["build", "--model", str(folder), "-o", str(built[tag]), "--target", "ort-cpu", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        for engine in report["engines"]:
            assert engine["entry"]["parity"]["passed"] and engine["entry"]["parity"]["rel_l2"] < 1e-4, engine
    ids = np.random.default_rng(4).integers(0, 300, size=(2, 7))
    plain, engines = Pipeline(a, zoo["adapter"], b), Pipeline(built["A"], zoo["adapter"], built["B"])
    np.testing.assert_allclose(engines(ids), plain(ids), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(engines.generate(ids, max_new_tokens=3), plain.generate(ids, max_new_tokens=3))


@pytest.mark.filterwarnings("ignore:Use Deprecated in TensorRT-RTX:DeprecationWarning")
def test_tensorrt_parses_and_builds_the_dq_form_only(zoo, tmp_path):
    """TensorRT-RTX (TensorRT's parser and builder, no GPU needed) reads the dq form as INT8 / INT4
    DequantizeLinear layers feeding float MatMuls, and builds an engine; the nbits form's
    MatMulNBits is refused (TensorRT's importer wants float16 activations; ours are float32),
    which is why `build --model --target trt` refuses it up front."""
    trt = pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (the dev extra's tensorrt-rtx-cu13)")
    from prism_deploy.builder.model_source import trt_input_shapes
    from prism_deploy.builder.options import Profile
    from prism_deploy.trt.engine import TensorRTError, TrtBuildSettings, build_serialized_engine, parse_network

    folder = zoo["qwen2", "last", "fp32"]
    model = json.loads((folder / "model.json").read_text())
    shapes = trt_input_shapes(model, "graph_with_past", Profile(batch=(1, 1, 2), seq=(1, 4, 16)))
    for precision, dtype in (("int8", trt.DataType.INT8), ("int4", trt.DataType.INT4)):
        path = tmp_path / f"{precision}.onnx"
        quantize.quantize_graph(folder / "last_with_past.onnx", path, quantize.make_spec(precision, form="dq"))
        _builder, network, _parser = parse_network(path, trt_module=trt)
        layers = [network.get_layer(i) for i in range(network.num_layers)]
        dq = [layer for layer in layers if layer.type == trt.LayerType.DEQUANTIZE]
        assert len(dq) == 15 and all(layer.get_input(0).dtype == dtype for layer in dq)
        assert all(layer.get_output(0).dtype == trt.DataType.FLOAT for layer in dq)
        unused = (0, 0, 0)
        assert (
            len(
                build_serialized_engine(
                    path, TrtBuildSettings(unused, unused, unused, input_shapes=shapes), trt_module=trt
                )
            )
            > 100_000
        )
    nbits = tmp_path / "nbits.onnx"
    quantize.quantize_graph(folder / "last_with_past.onnx", nbits, quantize.make_spec("int4"))
    with pytest.raises(TensorRTError, match="MatMulNBits"):
        parse_network(nbits, trt_module=trt)


def test_bench_model_side_by_side(zoo, exports, tmp_path, capsys, monkeypatch):
    """`bench --model` (routed to bench-model): every folder and transformers eager timed on the
    same inputs; floors from the graphs' bytes; the issue's targets evaluated, not enforced."""
    # the peers (ONNX Runtime GenAI, llama.cpp) where installed: tests/models/test_ort_form_builder.py
    monkeypatch.setattr(
        "prism_deploy.bench.peers.peer_reasons", lambda gguf=None: {"onnxruntime-genai": "off", "llama.cpp": "off"}
    )
    folders = [zoo["qwen2", "last", "fp32"], exports["B", "int8", "nbits"], exports["B", "int4", "dq"]]
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--model",
                *map(str, folders),
                "--prompt",
                "4",
                "--new-tokens",
                "3",
                "--repeat",
                "1",
                "--warmup",
                "0",
                "--json-out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "transformers eager" in text and ("target int4" in text or "unstable: " in text)
    assert "the targets apply to" in text or "unstable: " in text
    results = json.loads(out.read_text())
    cases = {c["name"]: c for c in results["cases"]}
    assert list(cases) == [f.name for f in folders] + ["transformers eager"]
    for c in cases.values():
        assert c["prefill"]["samples"] == 1 and c["decode"]["samples"] == 3 and c["floor"]["decode_s"] > 0
    fp32, int8, int4 = (cases[f.name] for f in folders)
    # bytes per token: the graph's weights as stored, without the embedding table (not in model B's graph)
    assert (
        fp32["weight_bytes_per_token"]
        > 3.5 * int8["weight_bytes_per_token"]
        > 3.5 * 1.6 * int4["weight_bytes_per_token"]
    )
    # fp32 is its own base: 1.0, unless its own timing was unstable (3 samples on a busy machine)
    assert fp32["decode"].get("speedup_vs_fp32") == 1.0 or fp32["decode"].get("unstable_vs_fp32")
    assert results["machine"]["load_average_start"] is not None
    # each quantized folder is judged against its target, or says why not: a timing too unstable to compare
    judged = {t["precision"] for t in results["targets"]}
    assert all(
        p in judged or (c["decode"].get("unstable_vs_fp32") and "speedup_vs_fp32" not in c["decode"])
        for p, c in (("int8", int8), ("int4", int4))
    )
    # bad input, before any timing: mixed roles, a folder that is not an export
    assert main(["bench-model", str(zoo["qwen2", "last", "fp32"]), str(zoo["llama", "first", "fp32"])]) == 2
    assert "share one role" in capsys.readouterr().err
    assert main(["bench-model", str(tmp_path)]) == 2
    assert "no model.json" in capsys.readouterr().err


@pytest.mark.parametrize("role", ["first", "middle", "last"])
@pytest.mark.parametrize("max_seq", [2, 3, 16, 64, 95, 96, 97, 2048])
def test_bench_model_defaults_fit_every_max_seq(role, max_seq):
    from prism_deploy.bench.models import DEFAULT_NEW_TOKENS, DEFAULT_PROMPT, fitted_lengths

    prompt, new_tokens = fitted_lengths(None, None, role, max_seq)
    used = prompt + new_tokens if role == "last" else prompt
    assert prompt >= 1 and new_tokens >= 1 and used <= max_seq + (role == "last")
    if max_seq >= DEFAULT_PROMPT + DEFAULT_NEW_TOKENS:
        assert (prompt, new_tokens) == (DEFAULT_PROMPT, DEFAULT_NEW_TOKENS)  # unchanged where they fit
    with pytest.raises(PrismInputError, match="exceed"):
        fitted_lengths(max_seq + 2, 1, role, max_seq)  # given lengths are checked, never shortened


def test_bench_model_json_on_stdout_with_its_defaults(zoo, capsys):
    folder = zoo["qwen2", "last", "fp32"]  # exported with max_seq 32: the defaults 64 + 32 do not fit
    assert main(["bench", "--model", str(folder), "--no-eager", "--repeat", "1", "--warmup", "0", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)  # stdout is the JSON object alone
    settings = results["settings"]
    assert settings["prompt"] + settings["new_tokens"] <= 32 + 1 and settings["new_tokens"] >= 1


def test_model_json_says_the_opset_its_graphs_were_written_at():
    from prism_deploy.models.lm_export import _opset

    assert _opset({}) == {"opset": 19, "ir_version": 9}
    assert _opset({"graph": {"opset": 21, "ir_version": 10}, "graph_with_past": {"opset": 21, "ir_version": 10}}) == {
        "opset": 21,
        "ir_version": 10,
    }
    assert _opset({"graph": {"opset": 19, "ir_version": 9}}) == {"opset": 19, "ir_version": 9}
