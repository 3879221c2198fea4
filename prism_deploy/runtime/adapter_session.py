"""An adapter ONNX graph (what ``prism-deploy export`` wrote) as a runner: ``run(hidden) -> adapted``.

    graph = AdapterGraph("adapter.onnx", "cpu")
    adapted = graph.run(hidden)            # [batch, seq, in_dim] -> [batch, seq, out_dim] float32

A thin view over :class:`~prism_deploy.runtime.onnx_runner.OnnxRunner`. Beside ``run`` it gives
what parity checks need and a black-box engine may not have: ``run_with_selections`` (each gated
pipe's TopK indices, fetched as extra outputs) and ``stored_tiles`` (the tiles as the graph
holds them, dequantized to float32); and ``run_device`` (OrtValue in and out) for the pipeline's
device-resident hand-offs. A fused graph (``export --plugin``) runs on the CPU through the
``prism::tile_dispatch`` op's twin (``prism_deploy.fuse.tile_dispatch_twin``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from prism_deploy.core.errors import PrismInputError, brief
from prism_deploy.core.onnx_io import INPUT_NAME, OUTPUT_NAME
from prism_deploy.core.ort_session import session_config_for
from prism_deploy.core.precision import Precision
from prism_deploy.core.tiles import dequantize_rows, tiles_from_dense, unpack_int4
from prism_deploy.lower.contract import graph_precision, has_metadata, read_metadata
from prism_deploy.runtime.onnx_runner import OnnxRunner, shape_of


class AdapterGraph:
    """An adapter graph on ONNX Runtime (see the module docstring)."""

    kind = "onnx"

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        provider: str = "cpu",
        *,
        intra_op_threads: int | None = None,
        twin: str = "semantics",
    ) -> None:
        """``twin``: for a fused graph, which implementation computes its ``prism::tile_dispatch``
        nodes on the CPU: ``"semantics"`` (numpy) or ``"host"`` (the CUDA kernel's own source)."""
        self.path = Path(onnx_path)
        self.provider = provider
        self.device = provider
        self.intra_op_threads = intra_op_threads
        self.twin = twin
        if not self.path.is_file():
            raise PrismInputError(f"{self.path}: no such file")
        try:
            # structure only: external weights stay on disk until ONNX Runtime reads them
            self._skeleton = onnx.load_model(str(self.path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError and friends
            raise PrismInputError(f"{self.path}: not an ONNX model ({brief(exc)})") from None
        try:
            self.metadata: dict[str, Any] | None = (
                read_metadata(self._skeleton) if has_metadata(self._skeleton) else None
            )
            self.precision: Precision = graph_precision(self._skeleton)
        except PrismInputError as exc:
            raise PrismInputError(f"{self.path}: {exc}") from None
        _check_interface(self._skeleton, self.path)
        from prism_deploy.fuse import is_fused

        self.fused = is_fused(self._skeleton)
        # tensor names of each gated pipe's TopK indices, fetched alongside the output
        self.selection_outputs: dict[int, str] = {}
        for pipe in (self.metadata or {}).get("pipes", []):
            if pipe.get("gated"):
                topk = _node(self._skeleton, pipe["node_prefix"] + "gate/TopK")
                if topk is not None:
                    self.selection_outputs[pipe["index"]] = topk.output[1]
        self.runner = self._open()
        inp = self.runner.session.get_inputs()[0]
        self.input_name = inp.name
        self.io_dtype = self.runner.input_dtype(inp.name) or np.dtype(np.float32)
        self.output_name = OUTPUT_NAME
        self.in_dim = inp.shape[-1] if isinstance(inp.shape[-1], int) else None
        out_dim = self.runner.output_shapes[self.output_name][-1]
        self.out_dim = out_dim if isinstance(out_dim, int) else None
        if self.metadata is not None:
            self.in_dim, self.out_dim = int(self.metadata["in_dim"]), int(self.metadata["out_dim"])
        self._outputs = [self.output_name, *self.selection_outputs.values()]

    def _open(self) -> OnnxRunner:
        config = session_config_for(self.precision)
        if self.fused:
            from prism_deploy.fuse.tile_dispatch_twin import make_twin_session

            if self.provider != "cpu":
                raise PrismInputError(
                    f"{self.path}: a fused graph (prism::tile_dispatch nodes) runs on ONNX Runtime "
                    "only on the CPU, through the op's twin; TensorRT runs the plugin itself"
                )
            model = onnx.load_model(str(self.path))  # the twin rewrite needs the weights in memory
            session = make_twin_session(model, self.intra_op_threads, kernel=self.twin, session_config=config)
            return OnnxRunner(session, "cpu", str(self.path))
        if not self.selection_outputs:
            return OnnxRunner.open(self.path, self.provider, threads=self.intra_op_threads, session_config=config)
        probe = onnx.ModelProto()
        probe.CopyFrom(self._skeleton)
        for name in self.selection_outputs.values():
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
        if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in probe.graph.initializer):
            runner = OnnxRunner.open(
                probe.SerializeToString(), self.provider, threads=self.intra_op_threads, session_config=config
            )
            runner.label = str(self.path)
            return runner
        # External weights are found relative to the model file: write the extended skeleton
        # beside it for as long as the session takes to open.
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".runner.onnx", dir=self.path.parent)
        os.close(fd)
        try:
            onnx.save_model(probe, tmp)
            return OnnxRunner.open(tmp, self.provider, threads=self.intra_op_threads, session_config=config)
        finally:
            os.unlink(tmp)

    @property
    def session(self) -> Any:
        """The ONNX Runtime session (for callers that bind buffers themselves)."""
        return self.runner.session

    # ---- running ----------------------------------------------------------------------------
    def _check(self, hidden: Any) -> tuple[int, ...]:
        shape = shape_of(hidden) if not isinstance(hidden, np.ndarray) else hidden.shape
        if len(shape) != 3 or (self.in_dim is not None and shape[-1] != self.in_dim):
            raise PrismInputError(f"hidden must be [batch, seq, {self.in_dim}], got {list(shape)}")
        return tuple(shape)

    def run(self, hidden: Any) -> np.ndarray:
        """``[batch, seq, in_dim]`` (cast to the graph's io dtype) -> ``adapted`` as float32."""
        return self.run_with_selections(hidden)[0]

    def run_with_selections(self, hidden: Any) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """The output and, per gated pipe index, its selected workers ``[tokens, top_k]``."""
        x = np.asarray(hidden)
        self._check(x)
        res = self.runner.run({self.input_name: x}, self._outputs)
        sel = {i: res[name].reshape(-1, res[name].shape[-1]) for i, name in self.selection_outputs.items()}
        return np.asarray(res[self.output_name], dtype=np.float32), sel

    def run_device(self, hidden: Any) -> Any:
        """OrtValue in, OrtValue out, on this graph's device."""
        return self.runner.run_device({self.input_name: hidden}, [self.output_name])[0]

    # ---- what parity wants ------------------------------------------------------------------
    def stored_tiles(self) -> dict[int, np.ndarray]:
        """Per pipe index, the tiles ``[R*C, tr, tc]`` float32 as the graph computes with them
        (dequantized for INT8 and INT4). Pipes folded with others at export are left out."""
        if self.metadata is None:
            return {}
        model = onnx.load_model(str(self.path))
        inits = {t.name: t for t in model.graph.initializer}
        out: dict[int, np.ndarray] = {}
        for pipe in self.metadata["pipes"]:
            shape = (pipe["R"] * pipe["C"], pipe["tr"], pipe["tc"])
            if pipe.get("tiles") is not None:
                tiles = numpy_helper.to_array(inits[pipe["tiles"]])
                if self.precision is Precision.INT4:  # 4-bit codes, two to a byte
                    tiles = unpack_int4(tiles)
                tiles = tiles.reshape(shape)
                if pipe.get("scales") is not None:
                    out[pipe["index"]] = dequantize_rows(tiles, numpy_helper.to_array(inits[pipe["scales"]]))
                else:
                    out[pipe["index"]] = tiles.astype(np.float32)
            elif pipe.get("nbits_weight") is not None:  # MatMulNBits: [out_dim, blocks, tc*bits/8]
                packed = nbits_codes(numpy_helper.to_array(inits[pipe["nbits_weight"]]), pipe["tc"])
                scales = numpy_helper.to_array(inits[pipe["nbits_scales"]]).reshape(packed.shape[:2])
                weight = (packed * scales[..., None]).reshape(packed.shape[0], -1)  # [out_dim, blocks*tc]
                out[pipe["index"]] = tiles_from_dense(weight, (pipe["R"], pipe["C"]), (pipe["tr"], pipe["tc"]))
            elif pipe.get("dense_weight") is not None and pipe.get("folded_into") is None:
                weight_t = numpy_helper.to_array(inits[pipe["dense_weight"]]).astype(np.float32)
                out[pipe["index"]] = tiles_from_dense(
                    weight_t, (pipe["R"], pipe["C"]), (pipe["tr"], pipe["tc"]), transposed=True
                )
        return out

    def describe(self) -> str:
        twin = f" (tile_dispatch twin: {self.twin})" if self.fused else ""
        return f"onnxruntime {self.provider}: {self.path.name}{twin}"


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if n.name == name), None)


def _check_interface(model: onnx.ModelProto, path: Path) -> None:
    """An adapter graph takes one float input ``hidden`` [batch, seq, in_dim] and gives
    ``adapted``; anything else (a model graph given as an adapter, say) is refused here, not by
    ONNX Runtime in the middle of a chain."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    outputs = [o.name for o in model.graph.output]
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    ok = (
        len(inputs) == 1
        and inputs[0].name == INPUT_NAME
        and inputs[0].type.tensor_type.elem_type in floats
        and len(inputs[0].type.tensor_type.shape.dim) == 3
        and OUTPUT_NAME in outputs
    )
    if not ok:
        have = ", ".join(i.name for i in inputs) or "none"
        raise PrismInputError(
            f"{path}: not an adapter graph (one float input {INPUT_NAME!r} [batch, seq, in_dim], "
            f"output {OUTPUT_NAME!r}); it takes {have} and gives {', '.join(outputs) or 'nothing'}"
        )


def nbits_codes(blob: np.ndarray, block: int) -> np.ndarray:
    """MatMulNBits' stored weight ``[N, blocks, block*bits/8]`` -> the signed codes ``[N, blocks,
    block]`` float32: 8 bits are ``q + 128``; 4 bits are ``q + 8`` two to a byte, low nibble first."""
    if blob.shape[-1] == block:
        return blob.astype(np.float32) - 128.0
    return unpack_int4(blob)
