"""``OrtRunner``: run an exported adapter graph on ONNX Runtime (one way to run, Polygraphy style).

    runner = OrtRunner("adapter.onnx", "cpu")
    adapted = runner.run(hidden)            # [batch, seq, in_dim] -> [batch, seq, out_dim]

Besides ``run``, it exposes what parity checks need and a black-box engine may not have:
``selections`` (each gated pipe's TopK indices, fetched as extra session outputs) and
``stored_tiles`` (the tiles as the graph holds them, dequantized to float32).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from prism_deploy.errors import PrismInputError
from prism_deploy.lower.export import read_lowering_metadata
from prism_deploy.ort_session import make_session, session_config_for


class OrtRunner:
    """An ONNX Runtime session on an adapter graph written by ``prism-deploy export``."""

    def __init__(self, onnx_path: str | os.PathLike[str], provider: str = "cpu", *,
                 intra_op_threads: int | None = None, twin: str = "semantics") -> None:
        """``twin``: for a fused graph (``export --plugin``), which implementation computes its
        ``prism::tile_dispatch`` nodes on the CPU: ``"semantics"`` (numpy) or ``"host"`` (the CUDA
        kernel's own source); see ``prism_deploy.fuse.ort_twin``."""
        self.path = Path(onnx_path)
        self.intra_op_threads = intra_op_threads
        self.twin = twin
        if not self.path.is_file():
            raise PrismInputError(f"{self.path}: no such file")
        self.provider = provider
        try:
            # structure only: external weights stay on disk until ONNX Runtime reads them
            self._skeleton = onnx.load_model(str(self.path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError and friends
            raise PrismInputError(f"{self.path}: not an ONNX model ({' '.join(str(exc).split())[:200]})") from None
        try:
            self.metadata = read_lowering_metadata(self._skeleton)
        except PrismInputError as exc:
            raise PrismInputError(f"{self.path}: {exc}") from None
        self.io_dtype = np.dtype(self.metadata["io_dtype"])
        self.precision: str = self.metadata["precision"]
        # tensor names of each gated pipe's TopK indices, fetched alongside the output
        self.selection_outputs: dict[int, str] = {}
        for pipe in self.metadata["pipes"]:
            if pipe["gated"]:
                topk = _node(self._skeleton, pipe["node_prefix"] + "gate/TopK")
                if topk is not None:
                    self.selection_outputs[pipe["index"]] = topk.output[1]
        from prism_deploy.fuse import is_fused

        self.fused = is_fused(self._skeleton)
        self.session = self._open()
        self._outputs = ["adapted", *self.selection_outputs.values()]

    def _session(self, model: str | os.PathLike[str] | bytes) -> Any:
        return make_session(model, self.provider, intra_op_threads=self.intra_op_threads,
                            session_config=session_config_for(self.precision))

    def _open(self) -> Any:
        from prism_deploy.fuse.ort_twin import make_twin_session

        if self.fused:
            if self.provider != "cpu":
                raise PrismInputError(f"{self.path}: a fused graph (prism::tile_dispatch nodes) runs on ONNX Runtime "
                                      "only on the CPU, through the op's twin; TensorRT runs the plugin itself")
            model = onnx.load_model(str(self.path))  # the twin rewrite needs the weights in memory
            return make_twin_session(model, self.intra_op_threads, kernel=self.twin,
                                     session_config=session_config_for(self.precision))
        if not self.selection_outputs:
            return self._session(self.path)
        probe = onnx.ModelProto()
        probe.CopyFrom(self._skeleton)
        for name in self.selection_outputs.values():
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
        if not _has_external_data(probe):
            return self._session(probe.SerializeToString())
        # External weights are found relative to the model file: write the extended
        # skeleton beside it for as long as the session takes to open.
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".runner.onnx", dir=self.path.parent)
        os.close(fd)
        try:
            onnx.save_model(probe, tmp)
            return self._session(tmp)
        finally:
            os.unlink(tmp)

    def _feed(self, hidden: np.ndarray) -> np.ndarray:
        if hidden.ndim != 3 or hidden.shape[-1] != self.metadata["in_dim"]:
            raise PrismInputError(f"hidden must be [batch, seq, {self.metadata['in_dim']}], got {list(hidden.shape)}")
        return np.ascontiguousarray(hidden, dtype=self.io_dtype)

    def run(self, hidden: np.ndarray) -> np.ndarray:
        """``[batch, seq, in_dim]`` (cast to the graph's io dtype) -> ``adapted`` as float32."""
        return self.run_with_selections(hidden)[0]

    def run_with_selections(self, hidden: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """The output and, per gated pipe index, its selected workers ``[tokens, top_k]``."""
        res = self.session.run(self._outputs, {"hidden": self._feed(hidden)})
        sel = {i: r.reshape(-1, r.shape[-1]) for i, r in zip(self.selection_outputs, res[1:])}
        return res[0].astype(np.float32), sel

    def stored_tiles(self) -> dict[int, np.ndarray]:
        """Per pipe index, the tiles ``[R*C, tr, tc]`` float32 as the graph computes with them
        (dequantized for INT8). Pipes folded with others at export are left out."""
        from prism_deploy.lower.quantize import dequantize_tiles

        model = onnx.load_model(str(self.path))
        inits = {t.name: t for t in model.graph.initializer}
        out: dict[int, np.ndarray] = {}
        for pipe in self.metadata["pipes"]:
            shape = (pipe["R"] * pipe["C"], pipe["tr"], pipe["tc"])
            if pipe["tiles"] is not None:
                tiles = numpy_helper.to_array(inits[pipe["tiles"]])
                if pipe["scales"] is not None:
                    scales = numpy_helper.to_array(inits[pipe["scales"]]).reshape(shape[:2])
                    out[pipe["index"]] = dequantize_tiles(tiles.reshape(shape), scales)
                else:
                    out[pipe["index"]] = tiles.reshape(shape).astype(np.float32)
            elif pipe["dense_weight"] is not None and pipe["folded_into"] is None:
                out[pipe["index"]] = tiles_from_dense(numpy_helper.to_array(inits[pipe["dense_weight"]]), pipe)
        return out


def tiles_from_dense(weight_t: np.ndarray, pipe: dict[str, Any]) -> np.ndarray:
    """Invert the export's permutation: cropped ``[in_dim, out_dim]`` -> ``[R*C, tr, tc]``
    (the cropped-away padding comes back as zeros)."""
    R, C, tr, tc = pipe["R"], pipe["C"], pipe["tr"], pipe["tc"]
    full = np.zeros((C * tc, R * tr), dtype=np.float32)
    full[: weight_t.shape[0], : weight_t.shape[1]] = weight_t
    return full.reshape(C, tc, R, tr).transpose(2, 0, 3, 1).reshape(R * C, tr, tc)




def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if n.name == name), None)


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
