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
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.onnx_io import WeightReader
from prism_deploy.core.precision import ModelPrecision
from prism_deploy.core.tiles import ceil_div

# bits per stored weight of each weight-only precision (ModelPrecision.bits is their home)
BITS = {p.value: p.bits for p in ModelPrecision if p.bits is not None}
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
# ONNX Runtime's weight-only algorithms (onnxruntime.quantization.matmul_nbits_quantizer), by the
# names of its own --quant_method: rtn is its default quantizer (round to nearest, C++), hqq
# (half-quadratic, zero points in float), k_quant (llama.cpp's k-quant search of scale and zero
# point per block), gptq (Hessian-guided rounding on calibration inputs; 4 bits only there).
ALGORITHMS = ("rtn", "hqq", "k_quant", "gptq")
DEFAULT_ALGORITHM = "rtn"
# The mixed plan's bound on one layer's output error on calibration text (relative L2). On
# SmolLM2-135M int4 errors run 0.03-0.22 (median 0.077): 0.1 keeps about a sixth of the weights
# at int8 (docs/quantized-models.md, "On a real model", with what it does and does not fix).
DEFAULT_MAX_ERROR = 0.1
RECORD_FORMAT = 2


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: bits (8 or 4), form, block size (None: per output channel, int8 dq),
    symmetric, MatMulNBits accuracy level (None for dq), whether embedding tables go too, the
    algorithm, and the mixed plan (each weight at the fewest bits whose measured error on
    calibration text is within ``max_error``, else float)."""

    bits: int
    form: str = "nbits"
    block_size: int | None = DEFAULT_BLOCK_SIZE
    symmetric: bool = True
    accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL
    embedding: bool = False
    algorithm: str = DEFAULT_ALGORITHM
    mixed: bool = False
    max_error: float | None = None

    @property
    def needs_calibration(self) -> bool:
        return self.mixed or self.algorithm == "gptq"

    def to_json(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "form": self.form,
            "block_size": self.block_size,
            "symmetric": self.symmetric,
            "accuracy_level": self.accuracy_level,
            "embedding": self.embedding,
            "algorithm": self.algorithm,
            "mixed": self.mixed,
            "max_error": self.max_error,
        }


def make_spec(
    precision: ModelPrecision | str,
    *,
    form: str = "nbits",
    block_size: int | None = None,
    symmetric: bool = True,
    accuracy_level: int | None = None,
    embedding: bool = False,
    algorithm: str = DEFAULT_ALGORITHM,
    mixed: bool = False,
    max_error: float | None = None,
) -> QuantSpec:
    """Check the options of ``--precision int8|int4``; every refusal is one line of bad input."""
    if precision not in BITS:
        raise PrismInputError(f"--precision: {precision!r} is not a quantized precision ({', '.join(BITS)})")
    bits = BITS[precision]
    if form not in FORMS:
        raise PrismInputError(f"--form: {form!r} is not one of {', '.join(FORMS)}")
    if algorithm not in ALGORITHMS:
        raise PrismInputError(f"--algorithm: {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    if max_error is not None and not mixed:
        raise PrismInputError("--max-error: the bound of the mixed plan; give --mixed too")
    if max_error is not None and not 0 < max_error < 1:
        raise PrismInputError(f"--max-error: {max_error:g} must be in (0, 1) (a relative L2 error)")
    if algorithm != DEFAULT_ALGORITHM:
        if form == "dq":
            raise PrismInputError(
                f"--algorithm {algorithm}: ONNX Runtime writes it as MatMulNBits only; the dq form is --algorithm rtn"
            )
        if embedding:
            raise PrismInputError(
                f"--quantize-embedding: with --algorithm rtn only ({algorithm} quantizes MatMul weights)"
            )
        if algorithm == "gptq" and bits == 8:
            raise PrismInputError(
                "--algorithm gptq: ONNX Runtime's GPTQ writes 4-bit weights only; use "
                "--precision int4 (or another algorithm for int8)"
            )
        if algorithm == "hqq" and bits == 8:
            raise PrismInputError(
                "--algorithm hqq: its 8-bit weights (float zero points) have no ONNX Runtime CPU "
                "kernel; use --precision int4 (or another algorithm for int8)"
            )
        # hqq and k_quant always write zero points: their weights are asymmetric whatever was asked
        symmetric = symmetric and algorithm not in ("hqq", "k_quant")
    plan_bound = (max_error or DEFAULT_MAX_ERROR) if mixed else None
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise PrismInputError(
            f"--block-size: {block_size} must be a power of two from {BLOCK_SIZES[0]} to "
            f"{BLOCK_SIZES[-1]} ({', '.join(map(str, BLOCK_SIZES))})"
        )
    if form == "dq":
        if not symmetric:
            raise PrismInputError(
                "--asymmetric: the dq form is read by TensorRT, whose dequantize takes no zero "
                "point; use --form nbits for zero points"
            )
        if accuracy_level is not None:
            raise PrismInputError("--accuracy-level: a MatMulNBits attribute; the dq form has no MatMulNBits")
        if embedding:
            raise PrismInputError(
                "--quantize-embedding: only the nbits form quantizes embedding tables "
                "(GatherBlockQuantized); the dq form quantizes MatMul weights only"
            )
        if bits == 8 and block_size is not None:
            raise PrismInputError(
                "--block-size: int8 in the dq form is per output channel (TensorRT reads no "
                "blocked INT8); leave --block-size out"
            )
        return QuantSpec(
            bits,
            "dq",
            None if bits == 8 else (block_size or DEFAULT_BLOCK_SIZE),
            True,
            None,
            False,
            algorithm=algorithm,
            mixed=mixed,
            max_error=plan_bound,
        )
    if embedding and bits != 4:
        raise PrismInputError(
            "--quantize-embedding: ONNX Runtime's quantizer writes GatherBlockQuantized at 4 bits "
            "only; use --precision int4"
        )
    if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
        raise PrismInputError(
            f"--accuracy-level: {accuracy_level} is not one of {', '.join(map(str, ACCURACY_LEVELS))}"
        )
    return QuantSpec(
        bits,
        "nbits",
        block_size or DEFAULT_BLOCK_SIZE,
        symmetric,
        DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level,
        embedding,
        algorithm=algorithm,
        mixed=mixed,
        max_error=plan_bound,
    )


# -- quantizing, one weight at a time ---------------------------------------------------------------
#
# Every weight is quantized on its own: a one-node model (Identity -> MatMul with that weight, or
# Gather from that table) goes through ONNX Runtime's quantizer, and its nodes and initializers
# are spliced into the graph in place of the float node. So only one float weight is in memory at
# a time (read from the graph's external data file when it has one), the algorithm and bits can
# differ per weight (the mixed plan), and the same code serves a 100 MB and a 10 GB graph.


def quantize_graph(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    spec: QuantSpec,
    *,
    activations: dict[str, np.ndarray] | None = None,
    plan: dict[str, int | None] | None = None,
    plan_errors: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Quantize the float graph ``src`` into ``dst`` (written atomically; ``dst`` may be ``src``).

    ``activations``: ``{MatMul node name: its float input rows [rows, K]}`` on calibration text
    (:func:`layer_inputs`), needed by GPTQ and by the mixed plan (``spec.mixed``), which measures
    each weight's error on them. ``plan``: ``{node name: bits, or None for float}`` decided
    already (the plan of the folder's other graph), with ``plan_errors`` the errors it was
    decided on (recorded again here); nodes not in it get ``spec.bits``.

    Returns the record that goes into ``model.json``: the spec, opset and IR version written,
    bytes of the quantized weights before (float) and after (codes, scales, zero points), the
    plan (``{node: bits}``), and one entry per weight: ``quantized`` (node, weight, shape,
    algorithm, bits, op written, the node that computes with it, bytes, measured error where
    measured) or ``kept`` with the reason it stayed float.
    """
    import onnx

    from prism_deploy.core.onnx_io import check_graph, finalize, save_model

    src = Path(src)
    model = onnx.load(str(src), load_external_data=False)  # weights stay in their file until used
    weights = WeightReader(model, src.parent)
    layers: list[dict[str, Any]] = []
    _gemm_to_matmul(model, weights, layers)
    candidates = _matmul_weights(model, layers)
    gathers = _gather_tables(model, layers, spec.embedding)
    if spec.mixed and plan is None and activations is None:
        raise PrismInputError("the mixed plan measures each weight on calibration text: no activations given")
    if spec.algorithm == "gptq" and activations is None:
        raise PrismInputError("--algorithm gptq: needs calibration text (no activations given)")
    chosen_plan: dict[str, int | None] = {}
    # {node name: (its replacement nodes, their initializers, the bits they were written at)}
    replaced: dict[str, tuple[list[Any], list[Any], int]] = {}
    for node in [*candidates, *gathers]:
        is_gather = node.op_type == "Gather"
        weight_name = node.input[0] if is_gather else node.input[1]
        w = weights.array(weight_name)
        x = None if activations is None or is_gather else activations.get(node.name)
        measured = spec.mixed and not is_gather and (plan is None or node.name not in plan)
        if (spec.algorithm == "gptq" or measured) and x is None and not is_gather:
            raise PrismInputError(f"{node.name}: no calibration activations for this weight")
        record = {"node": node.name, "weight": weight_name, "shape": list(w.shape), "float_bytes": int(w.nbytes)}
        if plan is not None and node.name in plan:
            bits, errors = plan[node.name], (plan_errors or {}).get(node.name)
        elif measured:
            assert x is not None  # refused above: a weight the mixed plan measures has calibration inputs
            bits, errors = _choose_bits(node, w, x, spec, replaced)
        else:
            bits, errors = spec.bits, None
        chosen_plan[node.name] = bits
        if errors is not None:
            record["error"] = errors  # relative L2 of this layer's output on calibration text, per bits
        if bits is None:
            layers.append(
                {
                    **record,
                    "kept": f"mixed plan: int8 error {errors['8']:.3g} over --max-error {spec.max_error:g}"
                    if errors
                    else "mixed plan: float",
                }
            )
            continue
        if node.name not in replaced or replaced[node.name][2] != bits:
            replaced[node.name] = (*_quantize_one(node, w, x, spec, bits), bits)
        nodes, inits, _ = replaced[node.name]
        algorithm = _algorithm_for(spec, bits)
        written = next(n for n in nodes if n.op_type in ("MatMulNBits", "GatherBlockQuantized", "DequantizeLinear"))
        runs_as = next(n for n in nodes if n.op_type in ("MatMulNBits", "GatherBlockQuantized", "MatMul"))
        layers.append(
            {
                **record,
                "quantized": written.op_type,
                "written": written.name,
                "runs_as": runs_as.name,
                "algorithm": algorithm,
                "bits": bits,
                "block_size": _block_of(written),
                **({"axis": 1} if spec.form == "dq" and bits == 8 else {}),
                "bytes": sum(_tensor_bytes(t) for t in inits),
            }
        )
        del w
    # The quantized weights are held as arrays and written from there: serialized inside the
    # model they were copied twice over (protobuf's serializer took model L's int8 graph, 0.8 GB
    # of weights, from 2.6 to 5.4 GB).
    held = _hold_as_arrays(replaced)
    _splice(model, {name: (n, i) for name, (n, i, _) in replaced.items()}, weights)
    if spec.accuracy_level:
        _set_accuracy_level(model, spec.accuracy_level)
    if any(n.domain == "com.microsoft" for n in model.graph.node) and not any(
        imp.domain == "com.microsoft" for imp in model.opset_import
    ):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    needs_ir10 = any(t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) for t in model.graph.initializer)
    finalize(model)  # opset 19 / IR 9 ...
    if needs_ir10:
        # ... except where int4 initializers are: INT4 is an IR 10 type, blocked DequantizeLinear
        # an opset 21 operator. Only these graphs go past opset 19 (still within IR <= 10).
        model.ir_version = 10
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = 21
    # The float tensors kept are still in the source's data file (read from it while saving):
    # the graph is checked without any weight's bytes.
    check_graph(model)
    opset = next(imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx"))
    ir_version = model.ir_version
    domains = sorted({imp.domain for imp in model.opset_import if imp.domain not in ("", "ai.onnx")})
    written_files = save_model(model, dst, deferred={**weights.deferred(model), **held})
    done = [layer for layer in layers if "quantized" in layer]
    return {
        "format": RECORD_FORMAT,
        **spec.to_json(),
        "opset": opset,
        "ir_version": ir_version,
        "domains": domains,
        "quantized_bytes_float": sum(layer["float_bytes"] for layer in done),
        "quantized_bytes": sum(layer["bytes"] for layer in done),
        "files": [Path(p).name for p in written_files],
        "plan": chosen_plan,
        "layers": layers,
    }


def plan_of(record: dict[str, Any]) -> tuple[dict[str, int | None], dict[str, dict[str, float]]]:
    """A graph's plan and the errors it was decided on, from its record, for the folder's other graph."""
    return record["plan"], {layer["node"]: layer["error"] for layer in record["layers"] if "error" in layer}


def _algorithm_for(spec: QuantSpec, bits: int) -> str:
    """GPTQ in ONNX Runtime's tool writes MatMulNBits at 4 bits only, and HQQ's float zero points
    have no 8-bit kernel in ONNX Runtime 1.31's CPU provider ("Only 2b and 4b quantization is
    supported for unpacked compute"): a mixed plan's int8 layers of those are round to nearest."""
    return "rtn" if spec.algorithm in ("gptq", "hqq") and bits == 8 else spec.algorithm


def _block_of(node: Any) -> int | None:
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return attrs.get("block_size") or None


def _set_accuracy_level(model: Any, level: int) -> None:
    """Every MatMulNBits node gets the spec's ``accuracy_level`` (HQQ's writer sets none)."""
    from onnx import helper

    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])


def _choose_bits(
    node: Any, w: np.ndarray, x: np.ndarray, spec: QuantSpec, cache: dict[str, tuple[list[Any], list[Any], int]]
) -> tuple[int | None, dict[str, float]]:
    """The fewest bits whose measured error (:func:`layer_error`) is within ``spec.max_error``;
    None (float) when even int8 is not. Each trial's nodes are kept for the one chosen."""
    bound = spec.max_error
    assert bound is not None  # make_spec sets the mixed plan's bound whenever mixed is on
    errors: dict[str, float] = {}
    for bits in [4, 8] if spec.bits == 4 else [8]:
        nodes, inits = _quantize_one(node, w, x, spec, bits)
        err = layer_error(w, _dequantized_one(nodes, inits), x)
        errors[str(bits)] = err
        if err <= bound:
            cache[node.name] = (nodes, inits, bits)
            return bits, errors
    return None, errors


def layer_error(w: np.ndarray, w_hat: np.ndarray, x: np.ndarray) -> float:
    """Relative L2 error of one layer's output on its calibration inputs:
    ``|x (w_hat - w)| / |x w|``. The error the layer adds where it sits in the model, as the
    model's own activations (outlier channels included) weigh it."""
    x = x.astype(np.float32)
    ref = x @ w.astype(np.float32)
    diff = x @ (w_hat - w.astype(np.float32))
    return float(np.linalg.norm(diff) / max(float(np.linalg.norm(ref)), 1e-30))


def _dequantized_one(nodes: list[Any], inits: list[Any]) -> np.ndarray:
    import onnx

    g = onnx.helper.make_graph(nodes, "one", [], [], initializer=inits)
    return next(iter(dequantized_weights(onnx.helper.make_model(g)).values()))


def _one_node_model(node: Any, w: np.ndarray) -> Any:
    """A model of the node alone: its input through an Identity (ONNX Runtime's GPTQ reads the
    node's input as an output of the graph, which a graph input cannot be), the weight as its
    initializer, the same node, input and output names as in the graph."""
    import onnx
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(w.dtype)
    if node.op_type == "Gather":
        ids = helper.make_tensor_value_info(node.input[1] + "_in", onnx.TensorProto.INT64, None)
        inputs, weight_name = [ids], node.input[0]
        first = helper.make_node("Identity", [ids.name], [node.input[1]], name=node.name + "_calibration_input")
    else:
        x = helper.make_tensor_value_info(node.input[0] + "_in", elem, [None, w.shape[0]])
        inputs, weight_name = [x], node.input[1]
        first = helper.make_node("Identity", [x.name], [node.input[0]], name=node.name + "_calibration_input")
    y = helper.make_tensor_value_info(node.output[0], elem, None)
    graph = helper.make_graph(
        [first, node], "one_weight", inputs, [y], initializer=[numpy_helper.from_array(w, weight_name)]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    return model


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over one node's input rows."""

    def __init__(self, name: str, x: np.ndarray, rows: int = 256) -> None:
        self.feeds = [{name: x[i : i + rows]} for i in range(0, len(x), rows)]
        self.at = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.at += 1
        return self.feeds[self.at - 1] if self.at <= len(self.feeds) else None

    def __iter__(self) -> Any:
        return iter(self.feeds)

    def rewind(self) -> None:
        self.at = 0


def _quantize_one(
    node: Any, w: np.ndarray, x: np.ndarray | None, spec: QuantSpec, bits: int
) -> tuple[list[Any], list[Any]]:
    """One weight through ONNX Runtime's quantizer (or :func:`_per_channel_int8` for the int8 dq
    form): the nodes and initializers that replace ``node`` and its weight."""
    model = _one_node_model(node, w)
    if spec.form == "dq" and bits == 8:
        out = _per_channel_int8(model)
    else:
        out = _ort_quantize(model, spec, bits, x)
    # Copies, not references: a message taken from ``out`` keeps all of ``out``'s memory alive
    # (protobuf's arena), the float weight included, so holding the references for every
    # layer held every float weight again (measured: 2.07x the weights of a 2.2 GiB graph).
    nodes = [_copy(n) for n in out.graph.node if n.op_type != "Identity" or not n.name.endswith("_calibration_input")]
    return nodes, [_copy(t) for t in out.graph.initializer]


def _hold_as_arrays(replaced: dict[str, tuple[list[Any], list[Any], Any]]) -> dict[str, Any]:
    """Each quantized initializer of 1 KiB or more as an array, its message left without its
    bytes (name, type and dims only): ``{name: DeferredTensor}`` for the saver."""
    from onnx import TensorProto, numpy_helper

    from prism_deploy.core.blocks import DeferredTensor
    from prism_deploy.core.onnx_io import EXTERNAL_MIN_BYTES

    # numpy holds packed 4-bit types one value a byte: those stay in the message. Reading
    # ``raw_data`` copies it, so each tensor's bytes are read once (by to_array).
    packed = (TensorProto.INT4, TensorProto.UINT4)
    held = {}
    for _, inits, _ in replaced.values():
        for tensor in inits:
            if not tensor.dims or not tensor.HasField("raw_data") or tensor.data_type in packed:
                continue
            array = numpy_helper.to_array(tensor)
            if array.nbytes < EXTERNAL_MIN_BYTES:
                continue
            tensor.ClearField("raw_data")
            held[tensor.name] = DeferredTensor.of_array(array)
    return held


def _copy(message: Any) -> Any:
    fresh = type(message)()
    fresh.CopyFrom(message)
    return fresh


def _ort_quantize(model: Any, spec: QuantSpec, bits: int, x: np.ndarray | None) -> Any:
    """ONNX Runtime's MatMulNBitsQuantizer with the spec's algorithm on a one-node model."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.quant_utils import QuantFormat

    algorithm = _algorithm_for(spec, bits)
    block = spec.block_size or DEFAULT_BLOCK_SIZE
    is_gather = any(n.op_type == "Gather" for n in model.graph.node)
    ops = ("Gather",) if is_gather else ("MatMul",)
    config = None
    if algorithm == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits, op_types_to_quantize=ops)
    elif algorithm == "k_quant":
        k = int(model.graph.initializer[0].dims[0])
        if bits == 4 and ceil_div(k, block) % 2:
            # its writer packs the 4-bit zero points of all rows as one stream, which is
            # MatMulNBits' per-row layout only for an even number of blocks per column
            raise PrismInputError(
                f"{model.graph.node[1].name}: --algorithm k_quant at 4 bits needs an even number "
                f"of blocks along K ({k} / {block} gives {ceil_div(k, block)}); choose --block-size"
            )
        config = mnq.KQuantWeightOnlyQuantConfig(
            op_types_to_quantize=ops, customized_weight_config={n.name: {"bits": bits} for n in model.graph.node}
        )
    elif algorithm == "gptq":
        name = model.graph.input[0].name
        assert x is not None  # quantize_graph refuses a gptq weight without calibration inputs
        config = mnq.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=_Calibration(name, x), block_size=128, op_types_to_quantize=ops
        )
    quantizer = mnq.MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block,
        is_symmetric=spec.symmetric,
        accuracy_level=spec.accuracy_level or None,
        quant_format=QuantFormat.QOperator if spec.form == "nbits" else QuantFormat.QDQ,
        op_types_to_quantize=ops,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
        algo_config=config,
    )
    # its neural_compressor part (rtn/k_quant/gptq) prints a progress bar to stdout
    with (
        _quiet("onnxruntime.quantization.matmul_nbits_quantizer"),
        _quiet("neural_compressor"),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        quantizer.process()
    out = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    if not any(n.op_type in ("MatMulNBits", "GatherBlockQuantized", "DequantizeLinear") for n in out.graph.node):
        raise PrismInputError(
            f"{model.graph.node[1].name}: ONNX Runtime's quantizer ({algorithm}, {bits} bits) left it unquantized"
        )
    return out


def _splice(model: Any, replaced: dict[str, tuple[list[Any], list[Any]]], weights: WeightReader) -> None:
    """Each quantized node replaced by its nodes, their initializers added, float weights no
    longer read by any node dropped."""
    nodes = []
    for node in model.graph.node:
        if node.name in replaced:
            nodes.extend(replaced[node.name][0])
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for _, inits in replaced.values():
        model.graph.initializer.extend(inits)
    _drop_unused_initializers(model)


def _initializers(model: Any) -> dict[str, Any]:
    return {t.name: t for t in model.graph.initializer}


def _is_float(tensor: Any) -> bool:
    import onnx

    return tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _gemm_to_matmul(model: Any, weights: WeightReader, layers: list[dict[str, Any]]) -> None:
    """``Gemm(A, B, C)`` with constant 2-D ``B``, alpha = beta = 1, no transA -> ``MatMul`` and
    ``Add``: the same arithmetic, in the op type ONNX Runtime's quantizer handles. ``transB``
    is applied to the stored weight."""
    from onnx import helper, numpy_helper

    inits = _initializers(model)
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in inits:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            layers.append(
                {"node": node.name, "weight": node.input[1], "kept": "Gemm with alpha/beta/transA: not rewritten"}
            )
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            w = weights.array(weight).T.copy()
            weight = weight + "_transposed"
            tensor = numpy_helper.from_array(w, weight)
            model.graph.initializer.append(tensor)
            weights.add(tensor)
        has_bias = len(node.input) > 2 and node.input[2] != ""
        mm_out = node.output[0] + "_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=node.name + "_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_Add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model)


def _drop_unused_initializers(model: Any) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _matmul_weights(model: Any, layers: list[dict[str, Any]]) -> list[Any]:
    """MatMul nodes whose second input is a constant 2-D float weight [K, N]; others recorded as kept."""
    inits = _initializers(model)
    chosen = []
    unnamed = 0
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        weight = inits.get(node.input[1])
        if weight is None:
            continue  # activation x activation (attention scores): nothing to quantize
        if len(weight.dims) != 2 or not _is_float(weight):
            layers.append(
                {
                    "node": node.name,
                    "weight": node.input[1],
                    "kept": f"weight of shape {list(weight.dims)}: only 2-D float weights are quantized",
                }
            )
            continue
        unnamed += not node.name
        chosen.append(node)
    if unnamed:  # records, plans and the float reference key by name; the exporter names every node
        raise PrismInputError(f"{unnamed} unnamed MatMul node(s): cannot record them for quantization")
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
            layers.append(
                {
                    "node": node.name,
                    "weight": node.input[0],
                    "shape": list(table.dims),
                    "kept": "embedding table (one row read per token): float unless --quantize-embedding",
                }
            )
    return tables


def _per_channel_int8(model: Any) -> Any:
    """INT8 per output channel as ``DequantizeLinear(axis=1) -> MatMul`` on a one-node model:
    the form TensorRT reads for INT8 weights, which ONNX Runtime's weight-only tool does not
    write (it has no 8-bit QDQ form). Symmetric round to nearest, ``scale = max|W[:, n]| / 127``
    (127, not 128: the symmetric range, so -W quantizes to -q)."""
    from onnx import helper, numpy_helper

    node = next(n for n in model.graph.node if n.op_type == "MatMul")
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[1])).astype(np.float32)
    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero column: any scale, codes 0
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    base = node.input[1]
    deq = base + "_DQ_Q8_output"
    nodes = [n for n in model.graph.node if n.op_type != "MatMul"]
    nodes += [
        helper.make_node(
            "DequantizeLinear", [base + "_DQ_Q8", base + "_DQ_scales"], [deq], name=node.name + "_DQ_Q8", axis=1
        ),
        helper.make_node("MatMul", [node.input[0], deq], list(node.output), name=node.name),
    ]
    graph = helper.make_graph(
        nodes,
        "one_weight",
        list(model.graph.input),
        list(model.graph.output),
        initializer=[numpy_helper.from_array(q, base + "_DQ_Q8"), numpy_helper.from_array(scale, base + "_DQ_scales")],
    )
    return helper.make_model(graph, opset_imports=list(model.opset_import))


def layer_inputs(
    graph: str | os.PathLike[str], feeds: list[dict[str, np.ndarray]], masks: list[np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """``{MatMul node name: its input rows [rows, K]}`` over ``feeds`` (the graph's inputs on
    calibration text), the float graph run by ONNX Runtime with those tensors as extra outputs.
    ``masks``: per feed, which token rows are real (padding rows dropped)."""
    import onnx

    from prism_deploy.core.fsutil import temp_sibling
    from prism_deploy.core.ort_session import make_session

    graph = Path(graph)
    model = onnx.load(str(graph), load_external_data=False)
    inits = _initializers(model)
    wanted: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
            wanted.setdefault(node.input[0], []).append(node.name)
            if node.op_type == "Gemm":  # quantize_graph names the rewritten node so
                wanted[node.input[0]].append(node.name + "_MatMul")
    outputs = {o.name for o in model.graph.output}
    for name in wanted:
        if name not in outputs:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    tmp = temp_sibling(graph)  # beside the graph: its external data file is found by relative name
    try:
        onnx.save_model(model, str(tmp))
        session = make_session(tmp, "cpu")
    finally:
        tmp.unlink(missing_ok=True)
    names = list(wanted)
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i, feed in enumerate(feeds):
        for name, value in zip(names, session.run(names, feed)):
            flat = value.reshape(-1, value.shape[-1])
            if masks is not None:
                flat = flat[masks[i].reshape(-1).astype(bool)]
            rows[name].append(flat.astype(np.float32))
    return {node: np.concatenate(rows[name]) for name, nodes in wanted.items() for node in nodes}


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
            k_blocks = ceil_div(k, bs)
            scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, k_blocks)
            if len(node.input) > 3 and node.input[3]:
                zp_raw = numpy_helper.to_array(inits[node.input[3]])
                if zp_raw.dtype.kind == "f":  # HQQ's float zero points, one per block, unpacked
                    zero = zp_raw.astype(np.float32).reshape(n, k_blocks)
                else:
                    zero = _unpack(zp_raw.reshape(n, -1), bits)[:, :k_blocks].astype(np.float32)
            else:
                zero = np.full((n, k_blocks), 2 ** (bits - 1), dtype=np.float32)
            codes = codes[:, : k_blocks * bs].reshape(n, k_blocks, bs).astype(np.float32)
            w = ((codes - zero[:, :, None]) * scales[:, :, None]).reshape(n, k_blocks * bs)[:, :k]
            out[node.name] = np.ascontiguousarray(w.T)
        elif (
            node.op_type == "MatMul"
            and node.input[1] in producers
            and producers[node.input[1]].op_type == "DequantizeLinear"
        ):
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
    zero = (
        _int_array(inits[dq.input[2]]).astype(np.float32) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
    )
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
            nodes.append(
                helper.make_node(
                    "Gather", [name, node.input[1]], list(node.output), name=node.name, axis=attrs.get("gather_axis", 0)
                )
            )
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
