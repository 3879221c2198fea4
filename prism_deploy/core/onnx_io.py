"""ONNX versions and saving, shared by every exporter in the project.

Opset 19 and IR version 9 reach the widest set of consumers: ONNX Runtime 1.18+ (the
``onnxruntime-gpu`` 1.31 wheel refuses IR 14, the newest ``onnx``'s default), and the
TensorRT 10.x/11.x ONNX parsers. Opset 19 is the first where DequantizeLinear takes a
float16 scale (weight-only INT8 with float16 activations).
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from prism_deploy.core.blocks import DeferredTensor
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.fsutil import output_path, temp_sibling, write_errors

OPSET = 19
# every adapter graph's interface (exported, fused, built): [batch, seq, in_dim] in, [batch, seq, out_dim] out
INPUT_NAME = "hidden"
OUTPUT_NAME = "adapted"
IR_VERSION = 9
# Protobuf cannot serialise a message over 2 GiB: larger models keep weights outside.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2


def finalize(model: onnx.ModelProto, producer: str = "prism-deploy") -> onnx.ModelProto:
    """Pin IR version and opset imports so old and new readers both accept the model."""
    from prism_deploy.core.version import __version__

    model.ir_version = IR_VERSION
    model.producer_name = producer
    model.producer_version = __version__
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = OPSET
    return model


def check_graph(model: onnx.ModelProto) -> None:
    """ONNX's checker on the graph, its weights left out: each initializer is given to it as a
    typed graph input instead, so no tensor's bytes are read or copied. An in-memory check
    resolves external data against the working directory, not the model's folder (a model whose
    weights stay in their source file fails it wherever it runs from), and cannot take a
    message over 2 GiB."""
    from onnx import helper

    graph = model.graph
    declared = {i.name for i in graph.input}
    weights = [
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in graph.initializer
        if t.name not in declared
    ]
    light = helper.make_model(
        helper.make_graph(graph.node, graph.name, [*graph.input, *weights], graph.output, value_info=graph.value_info),
        opset_imports=model.opset_import,
        functions=model.functions,
    )
    light.ir_version = model.ir_version
    onnx.checker.check_model(light)


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external: bool | None = None,
    deferred: Mapping[str, DeferredTensor] | None = None,
) -> list[Path]:
    """Save atomically; weights go to ``<name>.data`` beside the model when over ~2 GiB.

    ``deferred``: initializers of the main graph that are in ``model`` without their bytes
    (name, type, dims only), computed here a block at a time and written straight to the
    file, so that the saved weights are never held whole in memory (``DeferredTensor``).

    Returns the files written. Both files are written under temporary names and renamed
    only once both are complete, so a failure leaves no half-written model. Either way the
    model is spent: external tensors lose their bytes, deferred ones stay without them.
    """
    target = output_path(path)
    deferred = dict(deferred or {})
    weights = sum(len(t.raw_data) for t in model.graph.initializer) + sum(d.nbytes for d in deferred.values())
    use_external = weights > EXTERNAL_DATA_THRESHOLD if external is None else external
    # names of this call's own: two saves to one target never write into each other's files
    token = secrets.token_hex(4)
    tmp_model = temp_sibling(target, token)
    data_name = target.name + ".data"
    tmp_data = temp_sibling(target.with_name(data_name), token)
    written: list[Path] = []
    with write_errors(path, tmp_model, tmp_data):
        try:
            if use_external:
                # the model names the data file by its final name, relative to the model's folder
                _write_external_data(model, tmp_data, data_name, deferred)
                deferred = {}
            if deferred:
                _write_streamed(model, tmp_model, deferred)
            else:
                onnx.save_model(model, str(tmp_model))
            if use_external:
                os.replace(tmp_data, target.with_name(data_name))
                written.append(target.with_name(data_name))
            os.replace(tmp_model, target)
            written.insert(0, target)
            return written
        finally:
            for leftover in (tmp_model, tmp_data):
                if leftover.exists():
                    leftover.unlink()


# Tensors of at least this many bytes go to the external data file (onnx's own default);
# smaller ones (shapes, axes, biases) stay in the model.
EXTERNAL_MIN_BYTES = 1024
# Tensors of at least ALIGN_MIN_BYTES start at a multiple of ALIGNMENT in the data file, as ONNX
# Runtime aligns the files it writes (64 KiB, the Windows allocation granularity, a multiple of
# every page size): readers can then map a weight from the file instead of copying it.
ALIGNMENT = 64 * 1024
ALIGN_MIN_BYTES = 1024**2


def _write_external_data(
    model: onnx.ModelProto, data_path: Path, location: str, deferred: Mapping[str, DeferredTensor]
) -> None:
    """Every initializer of ``EXTERNAL_MIN_BYTES`` or more (subgraphs' too) into a new file
    ``data_path``, its bytes replaced in the model by a reference to ``location``. Deferred
    tensors are computed and written a block at a time; smaller deferred ones stay inline."""
    with open(data_path, "xb") as f:  # mode 0666 less the umask, as for any new file
        for tensor, source in [(t, deferred.get(t.name)) for t in model.graph.initializer] + [
            (t, None) for t in _subgraph_initializers(model.graph)
        ]:
            size = source.nbytes if source is not None else len(tensor.raw_data)
            if size < EXTERNAL_MIN_BYTES:
                if source is not None:
                    tensor.raw_data = source.materialize().tobytes()
                continue
            if source is None and not tensor.HasField("raw_data"):
                continue  # data in typed fields (or already external): left as it is
            if size >= ALIGN_MIN_BYTES and f.tell() % ALIGNMENT:
                f.write(b"\0" * (ALIGNMENT - f.tell() % ALIGNMENT))
            offset = f.tell()
            if source is not None:
                for block in source.blocks():
                    f.write(_bytes_of(block))
            else:
                f.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", offset), ("length", size)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)


def _subgraph_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The initializers of the graph's subgraphs, at any depth (``onnx`` writes them too)."""
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from sub.initializer
                yield from _subgraph_initializers(sub)


def _bytes_of(block: np.ndarray) -> memoryview:
    """A contiguous array's bytes, without copying them."""
    return block.reshape(-1).view(np.uint8).data


# ---- one protobuf file, its largest fields streamed ------------------------------------------------
#
# A model under the protobuf limit is one file: what ``model.SerializeToString()`` would give.
# Serialized whole, a 1.5 GB model costs its tensors' bytes in the message plus the serialized
# copy. Here the model is serialized without the deferred tensors' bytes (a few KB), and the
# file is written from that, with each deferred tensor's ``raw_data`` field put where protobuf
# puts it and its bytes streamed from the ``DeferredTensor``. Length prefixes of the tensor, the
# graph and nothing else change; the bytes are the same as serializing the whole message
# (tests/lower/test_stream.py compares them).

_LEN = 2  # wire type of length-delimited fields
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9  # field numbers in onnx.proto


def _write_streamed(model: onnx.ModelProto, path: Path, deferred: Mapping[str, DeferredTensor]) -> None:
    pieces = _streamed_pieces(model, deferred)
    with open(path, "xb") as f:
        for piece in pieces:
            if isinstance(piece, (bytes, memoryview)):
                f.write(piece)
            else:
                for block in piece.blocks():
                    f.write(_bytes_of(block))


# Serialized bytes are passed as views of the one serialization, never sliced into copies: the
# quantized tensors are in it (0.8 GB for model L's int8 graph), and each copy would hold them again.
Piece = bytes | memoryview | DeferredTensor


def _streamed_pieces(model: onnx.ModelProto, deferred: Mapping[str, DeferredTensor]) -> list[Piece]:
    """The model's serialization as bytes and deferred tensors, in file order."""
    inits = list(model.graph.initializer)
    found = [t.name for t in inits if t.name in deferred]
    if sorted(found) != sorted(deferred):
        raise ValueError(f"deferred tensors not among the graph's initializers: {sorted(set(deferred) - set(found))}")
    model_bytes = memoryview(model.SerializeToString())  # without the deferred tensors' bytes
    graph_bytes = _field_payload(model_bytes, _MODEL_GRAPH)
    graph: list[Piece] = []
    k = 0
    for number, start, body, end in _fields(graph_bytes):
        if number == _GRAPH_INITIALIZER:
            tensor = inits[k]
            k += 1
            if tensor.name in deferred:
                graph += _message_field(
                    _GRAPH_INITIALIZER, _with_raw_data(graph_bytes[body:end], deferred[tensor.name])
                )
                continue
        graph.append(graph_bytes[start:end])
    out: list[Piece] = []
    for number, start, _, end in _fields(model_bytes):
        out += _message_field(_MODEL_GRAPH, graph) if number == _MODEL_GRAPH else [model_bytes[start:end]]
    return out


def _with_raw_data(tensor: memoryview, data: DeferredTensor) -> list[Piece]:
    """A serialized TensorProto without ``raw_data``, with it: the field goes after the fields
    numbered below it, as protobuf writes fields in number order."""
    at = next((start for number, start, _, _ in _fields(tensor) if number > _TENSOR_RAW_DATA), len(tensor))
    return [tensor[:at], _key(_TENSOR_RAW_DATA) + _varint(data.nbytes), data, tensor[at:]]


def _message_field(number: int, pieces: list[Piece]) -> list[Piece]:
    size = sum(p.nbytes if isinstance(p, (memoryview, DeferredTensor)) else len(p) for p in pieces)
    return [_key(number) + _varint(size), *pieces]


def _field_payload(message: memoryview, number: int) -> memoryview:
    """The payload of the length-delimited field ``number`` of ``message`` (a view of it when
    the field occurs once, as a serializer writes it)."""
    parts = [message[body:end] for n, _, body, end in _fields(message) if n == number]
    return parts[0] if len(parts) == 1 else memoryview(b"".join(parts))


def _fields(message: bytes | memoryview) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, start, payload start, end)`` of each field of a serialized message."""
    pos = 0
    while pos < len(message):
        start = pos
        key, pos = _read_varint(message, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _read_varint(message, pos)
            body = start
        elif wire == 1:
            body, pos = pos, pos + 8
        elif wire == _LEN:
            length, body = _read_varint(message, pos)
            pos = body + length
        elif wire == 5:
            body, pos = pos, pos + 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield key >> 3, start, body, pos


def _read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int) -> bytes:
    return _varint(number << 3 | _LEN)


class WeightReader:
    """A graph's initializers as arrays, read one at a time: from ``raw_data`` when the graph
    holds its bytes, else from its external data files (in ``folder``) with plain reads (not a
    mapping, whose pages would stay in the process for the whole run: reading every weight of a
    10 GB graph through one would hold the 10 GB). :meth:`deferred` gives the external tensors
    as ``DeferredTensor``, copied from their files a block at a time while saving, so a graph
    over 2 GiB is re-saved (quantized, or traced into a scratch folder) without holding its
    weights."""

    def __init__(self, model: Any, folder: Path) -> None:
        self.folder = folder
        self.external = {
            t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer if t.data_location == 1
        }  # onnx.TensorProto.EXTERNAL
        self.meta = {t.name: t for t in model.graph.initializer}

    def _read(self, tensor: Any, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` (along the first axis) of an external tensor."""
        from onnx import helper

        from prism_deploy.core.fsutil import inside

        info = self.external[tensor.name]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        shape = tuple(int(d) for d in tensor.dims)
        row = int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
        stop = (shape[0] if shape else 1) if stop is None else stop
        path = inside(self.folder, info["location"], "external data location")
        offset = int(info.get("offset", 0)) + start * row * dtype.itemsize
        count = (stop - start) * row
        out = np.fromfile(path, dtype=dtype, count=count, offset=offset)
        if out.size != count:
            raise PrismInputError(f"{path.name}: ends before tensor {tensor.name!r} does")
        return out.reshape((stop - start, *shape[1:]) if shape else ())

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        tensor = self.meta[name]
        if name in self.external:
            return self._read(tensor)
        return numpy_helper.to_array(tensor)

    def add(self, tensor: Any) -> None:
        self.meta[tensor.name] = tensor

    def deferred(self, model: Any) -> dict[str, Any]:
        """The graph's remaining external tensors, copied from the source as the file is saved."""
        from onnx import helper

        out = {}
        for tensor in model.graph.initializer:
            if tensor.name not in self.external or tensor.data_location != 1:
                continue
            shape = tuple(int(d) for d in tensor.dims)
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
            if not shape:
                value = self._read(tensor)
            del tensor.external_data[:]
            tensor.data_location = 0  # onnx.TensorProto.DEFAULT: the saver writes its bytes
            if not shape:
                tensor.raw_data = value.tobytes()
                continue
            out[tensor.name] = DeferredTensor(
                shape, dtype, functools.partial(self._read_rows, tensor, self.external[tensor.name])
            )
        return out

    def _read_rows(self, tensor: Any, info: dict[str, str], start: int, stop: int) -> np.ndarray:
        # the tensor's external fields are cleared by now: read with the ones it had
        self.external[tensor.name] = info
        return self._read(tensor, start, stop)
