"""Weight-only INT8 / INT4 quantization of an exported float graph, and its exact float reference.

Knows nothing of model roles: it takes an ONNX graph file and quantizes the constant weights of
its ``MatMul`` nodes (every projection and the LM head) and, on request, the embedding tables
that ``Gather`` reads. Activations stay float in the graph: no QuantizeLinear is added.

Two forms, each for the runtime that reads it:

- ``nbits`` (ONNX Runtime, CPU and CUDA): ``com.microsoft.MatMulNBits``, block-wise along K
  (``block_size`` a power of two >= 16), symmetric or with zero points, written by ONNX
  Runtime's own ``MatMulNBitsQuantizer`` (round to nearest). ``accuracy_level`` is the node's
  attribute: the least precise compute ONNX Runtime may use for the float input. 0 (unset) and
  1 compute in float32 on the dequantized weight; 4 lets the CPU kernel round each block of
  the input to int8 and use integer dot products. On ONNX Runtime 1.31's CPU provider only 4
  is fast for 8-bit weights (docs/quantized-models.md gives the measurement); the CUDA provider
  ignores it. The main opset stays 19, IR 9; the ``com.microsoft`` domain is added.
  Embedding tables (``embedding=True``, int4 only: the tool quantizes ``Gather`` at 4 bits only)
  become ``GatherBlockQuantized``; their int4 initializers need IR 10 / opset 21.
- ``dq`` (TensorRT): a ``DequantizeLinear`` on the constant weight feeding a plain ``MatMul``,
  the form TensorRT's ONNX parser reads for weight-only quantization. Symmetric only (TensorRT's
  dequantize takes no zero point). INT4: blocked along K (DequantizeLinear ``block_size``, opset
  21, so these graphs are written at opset 21 / IR 10, the only ones that are), written by the
  same ONNX Runtime tool in its QDQ format. INT8: per output channel (``axis=1``), opset 19 /
  IR 9, because TensorRT takes block-quantized scales for INT4/FP4/FP8 only, not INT8. ONNX
  Runtime's tool has no 8-bit DQ form (it writes 8-bit MatMul weights as MatMulNBits only), so
  that one is written here (:func:`_per_channel_int8`): symmetric round to nearest with
  ``scale = max|column| / 127``.

``Gemm`` nodes with a constant weight (GPT-2's ``Conv1D`` traces to ``Gemm``) are first
rewritten to ``MatMul`` (+ ``Add`` of the bias), which is exact, because the ONNX Runtime tool
quantizes ``MatMul`` only.

:func:`dequantized_reference` is the other half: it reads the stored codes back (its own
unpacking of each form, not ONNX Runtime's) and writes the float graph that computes with the
dequantized weights. The tests check that the quantized graph equals it to float rounding, so
they check the lowering, not only a tolerance.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.core.errors import PrismInputError

BITS = {"int8": 8, "int4": 4}
FORMS = ("nbits", "dq")
# Per block of 32 along K, one scale: the usual size for INT4 weights (llama.cpp's Q4_0,
# MatMulNBits' fast paths). Measured on the benchmark model B (docs/quantized-models.md): 32
# against 128 halves the int4 logits error, and costs 17% more bytes for INT4.
DEFAULT_BLOCK_SIZE = 32
# The block sizes ONNX Runtime's MatMulNBits kernels take (its quantizer traces back beyond them).
BLOCK_SIZES = tuple(1 << n for n in range(4, 9))  # 16 .. 256
# 4: the CPU kernels' integer dot products. 0 is exact float compute but leaves 8-bit
# MatMulNBits 10x slower than float32 on ONNX Runtime 1.31's CPU provider (docs).
DEFAULT_ACCURACY_LEVEL = 4
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
RECORD_FORMAT = 1


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: bits (8 or 4), form, block size (None: per output channel, int8 dq),
    symmetric, MatMulNBits accuracy level (None for dq), and whether embedding tables go too."""

    bits: int
    form: str = "nbits"
    block_size: int | None = DEFAULT_BLOCK_SIZE
    symmetric: bool = True
    accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL
    embedding: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "form": self.form, "block_size": self.block_size, "symmetric": self.symmetric,
                "accuracy_level": self.accuracy_level, "embedding": self.embedding}


def make_spec(precision: str, *, form: str = "nbits", block_size: int | None = None, symmetric: bool = True,
              accuracy_level: int | None = None, embedding: bool = False) -> QuantSpec:
    """Check the options of ``--precision int8|int4``; every refusal is one line of bad input."""
    if precision not in BITS:
        raise PrismInputError(f"--precision: {precision!r} is not a quantized precision ({', '.join(BITS)})")
    bits = BITS[precision]
    if form not in FORMS:
        raise PrismInputError(f"--form: {form!r} is not one of {', '.join(FORMS)}")
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise PrismInputError(f"--block-size: {block_size} must be a power of two from {BLOCK_SIZES[0]} to "
                              f"{BLOCK_SIZES[-1]} ({', '.join(map(str, BLOCK_SIZES))})")
    if form == "dq":
        if not symmetric:
            raise PrismInputError("--asymmetric: the dq form is read by TensorRT, whose dequantize takes no zero "
                                  "point; use --form nbits for zero points")
        if accuracy_level is not None:
            raise PrismInputError("--accuracy-level: a MatMulNBits attribute; the dq form has no MatMulNBits")
        if embedding:
            raise PrismInputError("--quantize-embedding: only the nbits form quantizes embedding tables "
                                  "(GatherBlockQuantized); the dq form quantizes MatMul weights only")
        if bits == 8 and block_size is not None:
            raise PrismInputError("--block-size: int8 in the dq form is per output channel (TensorRT reads no "
                                  "blocked INT8); leave --block-size out")
        return QuantSpec(bits, "dq", None if bits == 8 else (block_size or DEFAULT_BLOCK_SIZE), True, None, False)
    if embedding and bits != 4:
        raise PrismInputError("--quantize-embedding: ONNX Runtime's quantizer writes GatherBlockQuantized at 4 bits "
                              "only; use --precision int4")
    if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
        raise PrismInputError(f"--accuracy-level: {accuracy_level} is not one of {', '.join(map(str, ACCURACY_LEVELS))}")
    return QuantSpec(bits, "nbits", block_size or DEFAULT_BLOCK_SIZE, symmetric,
                     DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level, embedding)


# -- quantizing -----------------------------------------------------------------------------------


def quantize_graph(src: str | os.PathLike[str], dst: str | os.PathLike[str], spec: QuantSpec) -> dict[str, Any]:
    """Quantize the float graph ``src`` into ``dst`` (written atomically; ``dst`` may be ``src``).

    Returns the record that goes into ``model.json``: the spec, opset and IR version written,
    bytes of the quantized weights before (float) and after (codes, scales, zero points), and one
    entry per weight: ``quantized`` (node, weight, shape, op written, the node that computes with
    it, bytes) or ``kept`` with the reason it stayed float.
    """
    import onnx

    from prism_deploy.core.onnx_io import finalize, save_model

    model = onnx.load(str(src))
    layers: list[dict[str, Any]] = []
    _gemm_to_matmul(model, layers)
    candidates = _matmul_weights(model, layers)
    gathers = _gather_tables(model, layers, spec.embedding)
    if spec.form == "dq" and spec.bits == 8:
        _per_channel_int8(model, candidates, layers)
    else:
        _ort_quantize(model, spec, candidates, gathers, layers)
    needs_ir10 = any(t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) for t in model.graph.initializer)
    finalize(model)  # opset 19 / IR 9 ...
    if needs_ir10:
        # ... except where int4 initializers are: INT4 is an IR 10 type, blocked DequantizeLinear
        # an opset 21 operator. Only these graphs go past opset 19 (still within IR <= 10).
        model.ir_version = 10
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = 21
    onnx.checker.check_model(model)
    written = save_model(model, dst)
    opset = next(imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx"))
    inits = _initializers(model)
    by_name = {n.name: n for n in model.graph.node}
    for layer in layers:
        if "quantized" in layer:  # codes + scales + zero points as stored
            layer["bytes"] = sum(_tensor_bytes(inits[i]) for i in by_name[layer["written"]].input if i in inits)
    done = [layer for layer in layers if "quantized" in layer]
    return {"format": RECORD_FORMAT, **spec.to_json(), "opset": opset, "ir_version": model.ir_version,
            "domains": sorted({imp.domain for imp in model.opset_import if imp.domain not in ("", "ai.onnx")}),
            "quantized_bytes_float": sum(layer["float_bytes"] for layer in done),
            "quantized_bytes": sum(layer["bytes"] for layer in done),
            "files": [Path(p).name for p in written], "layers": layers}


def _initializers(model: Any) -> dict[str, Any]:
    return {t.name: t for t in model.graph.initializer}


def _consumers(model: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _is_float(tensor: Any) -> bool:
    import onnx

    return tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _gemm_to_matmul(model: Any, layers: list[dict[str, Any]]) -> None:
    """``Gemm(A, B, C)`` with constant 2-D ``B``, alpha = beta = 1, no transA -> ``MatMul`` and
    ``Add``: the same arithmetic, in the op type ONNX Runtime's quantizer handles. ``transB``
    is applied to the stored weight."""
    import onnx
    from onnx import helper, numpy_helper

    inits = _initializers(model)
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in inits:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            layers.append({"node": node.name, "weight": node.input[1], "kept": "Gemm with alpha/beta/transA: not rewritten"})
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(inits[weight]).T.copy()
            weight = weight + "_transposed"
            model.graph.initializer.append(numpy_helper.from_array(w, weight))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        mm_out = node.output[0] + "_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=node.name + "_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_Add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model)
    onnx.checker.check_model(model)


def _drop_unused_initializers(model: Any) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _matmul_weights(model: Any, layers: list[dict[str, Any]]) -> list[Any]:
    """MatMul nodes whose second input is a constant 2-D float weight [K, N]; others recorded as kept."""
    inits = _initializers(model)
    chosen = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        weight = inits.get(node.input[1])
        if weight is None:
            continue  # activation x activation (attention scores): nothing to quantize
        if len(weight.dims) != 2 or not _is_float(weight):
            layers.append({"node": node.name, "weight": node.input[1], "kept": f"weight of shape {list(weight.dims)}: "
                           "only 2-D float weights are quantized"})
            continue
        chosen.append(node)
    return chosen


def _gather_tables(model: Any, layers: list[dict[str, Any]], embedding: bool) -> list[Any]:
    """Gather nodes reading a constant 2-D float table (embeddings); recorded as kept unless asked."""
    inits = _initializers(model)
    tables = []
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or len(table.dims) != 2 or not _is_float(table):
            continue
        if embedding:
            tables.append(node)
        else:
            layers.append({"node": node.name, "weight": node.input[0], "shape": list(table.dims),
                           "kept": "embedding table (one row read per token): float unless --quantize-embedding"})
    return tables


def _ort_quantize(model: Any, spec: QuantSpec, matmuls: list[Any], gathers: list[Any],
                  layers: list[dict[str, Any]]) -> None:
    """ONNX Runtime's MatMulNBitsQuantizer on exactly the chosen nodes (QOperator for nbits,
    QDQ for the int4 dq form)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    inits = _initializers(model)
    float_bytes = {n.name: _tensor_bytes(inits[n.input[1]]) for n in matmuls}
    float_bytes.update({n.name: _tensor_bytes(inits[n.input[0]]) for n in gathers})
    shapes = {n.name: list(inits[n.input[1]].dims) for n in matmuls}
    shapes.update({n.name: list(inits[n.input[0]].dims) for n in gathers})
    weights = {n.name: n.input[1] for n in matmuls} | {n.name: n.input[0] for n in gathers}
    chosen = set(weights)
    ops = ("MatMul", "Gather") if gathers else ("MatMul",)
    exclude = [n.name for n in model.graph.node if n.op_type in ops and n.name not in chosen]
    unnamed = [n for n in model.graph.node if n.op_type in ops and not n.name]
    if unnamed:  # the tool selects by name; the exporter names every node, so this is a broken graph
        raise PrismInputError(f"{len(unnamed)} unnamed {'/'.join(ops)} node(s): cannot select them for quantization")
    quantizer = MatMulNBitsQuantizer(
        model, bits=spec.bits, block_size=spec.block_size or DEFAULT_BLOCK_SIZE, is_symmetric=spec.symmetric,
        accuracy_level=spec.accuracy_level or None, nodes_to_exclude=exclude,
        quant_format=QuantFormat.QOperator if spec.form == "nbits" else QuantFormat.QDQ,
        op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))
    with _quiet("onnxruntime.quantization.matmul_nbits_quantizer"):
        quantizer.process()
    out = quantizer.model.model
    produced = {n.name: n for n in out.graph.node}
    for name in weights:
        op = "MatMulNBits" if spec.form == "nbits" else "DequantizeLinear"
        written = f"{name}_Q{spec.bits}" if spec.form == "nbits" else f"{name}_DQ_Q{spec.bits}"
        # the node that computes with the weight: the key of dequantized_weights
        runs_as = written if spec.form == "nbits" else f"{name}_matmul_Q{spec.bits}"
        if name in {n.name for n in gathers}:
            op, written = "GatherBlockQuantized", f"{name}_Q4"
            runs_as = written
        if written not in produced or runs_as not in produced:
            raise PrismInputError(f"{name}: ONNX Runtime's quantizer left it unquantized")
        layers.append({"node": name, "weight": weights[name], "shape": shapes[name], "quantized": op,
                       "written": written, "runs_as": runs_as, "bits": spec.bits, "block_size": spec.block_size,
                       "float_bytes": float_bytes[name]})
    if out is not model:
        model.CopyFrom(out)


def _per_channel_int8(model: Any, matmuls: list[Any], layers: list[dict[str, Any]]) -> None:
    """INT8 per output channel as ``DequantizeLinear(axis=1) -> MatMul``: the form TensorRT reads
    for INT8 weights, which ONNX Runtime's weight-only tool does not write (it has no 8-bit QDQ
    form). Symmetric round to nearest, ``scale = max|W[:, n]| / 127`` (127, not 128: the
    symmetric range, so -W quantizes to -q)."""
    from onnx import helper, numpy_helper

    inits = _initializers(model)
    names = {n.name for n in matmuls}
    nodes = []
    for node in model.graph.node:
        if node.name not in names or node.op_type != "MatMul":
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        scale = np.abs(w).max(axis=0) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero column: any scale, codes 0
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        base = node.input[1]
        model.graph.initializer.extend([numpy_helper.from_array(q, base + "_DQ_Q8"),
                                        numpy_helper.from_array(scale, base + "_DQ_scales")])
        deq = base + "_DQ_Q8_output"
        written = node.name + "_DQ_Q8"
        nodes.append(helper.make_node("DequantizeLinear", [base + "_DQ_Q8", base + "_DQ_scales"], [deq], name=written, axis=1))
        nodes.append(helper.make_node("MatMul", [node.input[0], deq], list(node.output), name=node.name))
        layers.append({"node": node.name, "weight": node.input[1], "shape": list(w.shape), "quantized": "DequantizeLinear",
                       "written": written, "runs_as": node.name, "bits": 8, "block_size": None, "axis": 1,
                       "float_bytes": _tensor_bytes(inits[node.input[1]])})
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Any:
    """ONNX Runtime's quantizer logs every node at INFO and its opset bump at WARNING, and sets
    up the root logger on import; the export's own output says what was done."""
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        # an all-zero block (a padding id's embedding row) divides 0 by 0 in the tool's numpy
        # path; it writes codes 0 there, which is right
        with np.errstate(invalid="ignore", divide="ignore"):
            yield
    finally:
        log.setLevel(level)


def _tensor_bytes(t: Any) -> int:
    import onnx

    n = int(np.prod(t.dims)) if len(t.dims) else 1
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


# -- the float reference --------------------------------------------------------------------------


def dequantized_weights(model: Any) -> dict[str, np.ndarray]:
    """The float weight each quantized node computes with, read back from the stored codes:
    ``{node name: W [K, N] float32}`` for MatMulNBits and DequantizeLinear nodes (the latter
    keyed by the MatMul they feed), ``{node name: table}`` for GatherBlockQuantized.

    The unpacking is this module's own reading of each format, not ONNX Runtime's:
    - MatMulNBits: B uint8 [N, k_blocks, block_size * bits / 8], codes low bits first along K;
      scales [N, k_blocks] (or flat); zero points uint8, packed the same way per row, default
      2^(bits-1); W[k, n] = (code - zero point) * scale, the padding past K dropped.
    - DequantizeLinear: (x - zero point) * scale, scale per column (axis 1) or per block of
      ``block_size`` rows along axis 0.
    - GatherBlockQuantized (int4, quantize_axis 1): blocks along each table row.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            k, n, bits, bs = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
            codes = _unpack(numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1), bits)  # [N, k_blocks*bs]
            k_blocks = -(-k // bs)
            scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, k_blocks)
            if len(node.input) > 3 and node.input[3]:
                zp_raw = numpy_helper.to_array(inits[node.input[3]]).reshape(n, -1)
                zero = _unpack(zp_raw, bits)[:, :k_blocks].astype(np.float32)
            else:
                zero = np.full((n, k_blocks), 2 ** (bits - 1), dtype=np.float32)
            codes = codes[:, : k_blocks * bs].reshape(n, k_blocks, bs).astype(np.float32)
            w = ((codes - zero[:, :, None]) * scales[:, :, None]).reshape(n, k_blocks * bs)[:, :k]
            out[node.name] = np.ascontiguousarray(w.T)
        elif node.op_type == "MatMul" and node.input[1] in producers and producers[node.input[1]].op_type == "DequantizeLinear":
            out[node.name] = _dequantize_linear(producers[node.input[1]], inits)
        elif node.op_type == "GatherBlockQuantized":
            out[node.name] = _gather_block_table(node, attrs, inits)
    return out


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 rows holding ``8 // bits`` codes a byte, low bits first -> one code per element."""
    packed = packed.astype(np.uint8)
    if bits == 8:
        return packed
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return np.stack(parts, axis=-1).reshape(packed.shape[0], -1)


def _int_array(t: Any) -> np.ndarray:
    """Integer codes of an initializer as int32, int4/uint4 included."""
    from onnx import numpy_helper

    return np.asarray(numpy_helper.to_array(t)).astype(np.int32)


def _dequantize_linear(dq: Any, inits: dict[str, Any]) -> np.ndarray:
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    x = _int_array(inits[dq.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    zero = _int_array(inits[dq.input[2]]).astype(np.float32) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
    axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
    if block:  # blocked along axis: scale has ceil(dim / block) entries there
        scale = np.repeat(scale, block, axis=axis).take(range(x.shape[axis]), axis=axis)
        zero = np.repeat(zero, block, axis=axis).take(range(x.shape[axis]), axis=axis)
    elif scale.ndim == 1 and scale.size > 1:  # per axis
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((x - zero) * scale).astype(np.float32)


def _gather_block_table(node: Any, attrs: dict[str, Any], inits: dict[str, Any]) -> np.ndarray:
    from onnx import numpy_helper

    data = _int_array(inits[node.input[0]]).astype(np.float32)
    scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
    axis, block = attrs.get("quantize_axis", 1), attrs["block_size"]
    if len(node.input) > 3 and node.input[3]:
        zero = _int_array(inits[node.input[3]]).astype(np.float32)
    else:  # int4 without zero points is symmetric around 0; uint4 around 8
        zero = np.zeros_like(scales) if inits[node.input[0]].data_type == 22 else np.full_like(scales, 8.0)
    scale = np.repeat(scales, block, axis=axis).take(range(data.shape[axis]), axis=axis)
    zero = np.repeat(zero, block, axis=axis).take(range(data.shape[axis]), axis=axis)
    return ((data - zero) * scale).astype(np.float32)


def dequantized_reference(quantized: str | os.PathLike[str], dst: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Write the float graph that computes exactly what ``quantized`` stores: every quantized
    MatMul / Gather replaced by its float form with :func:`dequantized_weights`. Returns those
    weights. Opset 21 / IR 10 stay as they were (the float ops are the same in both opsets)."""
    import onnx
    from onnx import helper, numpy_helper

    from prism_deploy.core.onnx_io import save_model

    model = onnx.load(str(quantized))
    weights = dequantized_weights(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    nodes, drop = [], set()
    for node in model.graph.node:
        if node.name not in weights:
            nodes.append(node)
            continue
        name = node.name + "_reference_weight"
        if node.op_type == "GatherBlockQuantized":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            model.graph.initializer.append(numpy_helper.from_array(weights[node.name], name))
            nodes.append(helper.make_node("Gather", [name, node.input[1]], list(node.output), name=node.name,
                                          axis=attrs.get("gather_axis", 0)))
            continue
        model.graph.initializer.append(numpy_helper.from_array(weights[node.name], name))
        if node.op_type == "MatMul":  # fed by a DequantizeLinear, which goes
            drop.add(producers[node.input[1]].name)
        nodes.append(helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name))
    nodes = [n for n in nodes if n.name not in drop]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model)
    save_model(model, dst)
    return weights
