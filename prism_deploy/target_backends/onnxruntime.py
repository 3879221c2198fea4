"""ONNX Runtime "engines": the exported graph optimized offline and saved, plus the options
needed to open it again; the part both ONNX Runtime targets share (``ort_cpu``, ``ort_cuda``).

ONNX Runtime's docs ask that an offline-optimized model be run with the same execution
provider, optimization level and hardware it was optimized for. So the saved model is
optimized at ``ORT_ENABLE_EXTENDED`` (fusions, no hardware-specific layout transforms) for the
target's provider, the provider and levels are recorded in the manifest, and the loader opens
the file with optimization disabled: the work was done once, at build time. The exception is
weight-only int8: its file keeps int8 weights, and the loader opens it with constant folding on
(``ORT_ENABLE_BASIC``) so the dequantization is folded into floats once, when it opens.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from prism_deploy.core.errors import CheckFailed, PrismInputError
from prism_deploy.core.onnx_io import EXTERNAL_MIN_BYTES, INPUT_NAME, OUTPUT_NAME
from prism_deploy.core.precision import ModelPrecision, Precision
from prism_deploy.core.targets import Target
from prism_deploy.format.engine_manifest import EngineFileError
from prism_deploy.target_backends.base import BuiltEngine, EngineBuild, GraphLoader, TargetBackend, cuda_tensor

# Exports larger than this (bytes) get ONNX Runtime engines with external initializers.
ORT_EXTERNAL_THRESHOLD = 1536 * 1024**2

BUILD_OPTIMIZATION_LEVEL = "ORT_ENABLE_EXTENDED"
LOAD_OPTIMIZATION_LEVEL = "ORT_DISABLE_ALL"
FOLDING_LOAD_LEVEL = "ORT_ENABLE_BASIC"  # constant folding, nothing hardware-specific
# Protobuf cannot hold a model over 2 GiB: above this, the optimized model's initializers go to
# a data file beside it (ONNX Runtime's session config keys for offline-optimized models).
EXTERNAL_FILE_KEY = "session.optimized_model_external_initializers_file_name"
EXTERNAL_MIN_SIZE_KEY = "session.optimized_model_external_initializers_min_size_in_bytes"
# Prepacking lays constant weights out for the CPU kernels when a session opens: a second copy
# of every MatMul weight, and most of the time spent opening, for nothing the saved file keeps
# (the optimized model is the same bytes without it). The build's session only writes that
# file, so it goes without; the loader's sessions prepack as usual (docs/onnx-lowering.md,
# "Memory", has the figures).
BUILD_SESSION_CONFIG = {"session.disable_prepacking": "1"}


def build_ort_engine(
    onnx_path: Path,
    engine_path: Path,
    target: str,
    *,
    external_data: str | None = None,
    precision: Precision | ModelPrecision | None = None,
) -> dict[str, Any]:
    """Optimize ``onnx_path`` for ``target``'s provider into ``engine_path``; return the session record.

    ``external_data``: a file name (in ``engine_path``'s folder) for the initializers of a
    model too large for one protobuf; the optimized model refers to it by that name.
    """
    from prism_deploy.core.ort_session import make_session, session_config_for

    provider = Target(target).provider
    config = dict(BUILD_SESSION_CONFIG)
    if external_data is not None:
        config.update({EXTERNAL_FILE_KEY: external_data, EXTERNAL_MIN_SIZE_KEY: str(EXTERNAL_MIN_BYTES)})
    make_session(
        onnx_path,
        provider,
        optimized_model_path=str(engine_path),
        graph_optimization_level=BUILD_OPTIMIZATION_LEVEL,
        session_config=config,
    )
    if not engine_path.is_file():
        raise RuntimeError(f"{onnx_path}: ONNX Runtime did not write the optimized model")
    if external_data is not None and not (engine_path.parent / external_data).is_file():
        raise RuntimeError(f"{onnx_path}: ONNX Runtime did not write the external initializers")
    record: dict[str, Any] = {
        "provider": provider,
        "build_graph_optimization_level": BUILD_OPTIMIZATION_LEVEL,
        "load_graph_optimization_level": LOAD_OPTIMIZATION_LEVEL,
    }
    load_config = session_config_for(precision)
    if load_config:
        # Weight-only int8: the engine file keeps int8 weights; their dequantization is folded
        # into floats once, when the engine is opened (which needs constant folding on).
        record.update(load_graph_optimization_level=FOLDING_LOAD_LEVEL, load_session_config=load_config)
    return record


def session_record(entry: dict[str, Any]) -> dict[str, Any]:
    """The manifest's record of how an ONNX Runtime engine is opened again."""
    session = entry.get("session")
    if not isinstance(session, dict) or "provider" not in session:
        raise EngineFileError(f"engine {entry['id']}: the manifest lacks its session record")
    return session


class OrtEngineRunner:
    """An ONNX Runtime engine: the offline-optimized model, opened as it was built (optimization
    off, or constant folding for weight-only int8) on the provider it was optimized for."""

    def __init__(self, runner: Any, out_dim: int) -> None:
        self.runner = runner  # the OnnxRunner of the engine file
        self.provider = runner.provider
        self.out_dim = out_dim
        self.session = runner.session

    def widths(self) -> tuple[Any, Any]:
        """The last dimension of ``hidden`` and of ``adapted``, as the engine file says."""
        dims = {i.name: i.shape[-1] for i in [*self.session.get_inputs(), *self.session.get_outputs()]}
        return dims.get(INPUT_NAME), dims.get(OUTPUT_NAME)

    def run(self, hidden: Any) -> Any:
        dev = cuda_tensor(hidden)
        if dev is None:
            return self.runner.run({INPUT_NAME: np.asarray(hidden, np.float32)}, [OUTPUT_NAME])[OUTPUT_NAME]
        return self._run_device(dev, hidden)

    def _run_device(self, x: Any, given: Any) -> Any:
        """CUDA tensors bound in place through I/O binding: no host copy (GPU only; not run yet)."""
        import torch

        x = x.to(dtype=torch.float32).contiguous()
        out = torch.empty((*x.shape[:-1], self.out_dim), dtype=torch.float32, device=x.device)
        torch.cuda.current_stream(x.device).synchronize()  # ORT runs on its own stream
        binding = self.session.io_binding()
        index = x.device.index or 0
        binding.bind_input(INPUT_NAME, "cuda", index, np.float32, list(x.shape), x.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", index, np.float32, list(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        if isinstance(given, torch.Tensor):
            return out
        import cupy  # the other DLPack producer callers use

        return cupy.from_dlpack(out)


class OnnxRuntimeTarget(TargetBackend):
    """ONNX Runtime on one execution provider; a subclass names the target and its provider."""

    tool: ClassVar[str] = "ONNX Runtime"
    times_gated_forms: ClassVar[bool] = True

    def build(self, onnx_path: Path, work: Path, stem: str, request: EngineBuild) -> BuiltEngine:
        """ONNX Runtime's offline-optimized model of ``onnx_path`` in ``work``. A refused graph
        is a failed build (``CheckFailed``), not bad input."""
        engine = work / f"{stem}.ort.onnx.tmp"
        data_file = None
        if request.source_bytes > ORT_EXTERNAL_THRESHOLD or request.source_external:
            # the model refers to its data file by name: a fresh name never clobbers the data of
            # an engine the current manifest lists
            data_file = f"{stem}.{secrets.token_hex(6)}.ort.data"
        try:
            session = build_ort_engine(
                onnx_path, engine, self.target.value, external_data=data_file, precision=request.precision
            )
        except PrismInputError as exc:  # ORT refused a graph we were given to build: a failed build
            raise CheckFailed(f"ONNX Runtime build failed: {exc}") from None
        return BuiltEngine(engine, ".ort.onnx", session, data_file)

    def open(self, path: Path, entry: dict[str, Any], load_graph: GraphLoader, out_dim: int) -> OrtEngineRunner:
        session = session_record(entry)
        return OrtEngineRunner(
            load_graph(
                path,
                session["provider"],
                optimization_level=session["load_graph_optimization_level"],
                session_config=session.get("load_session_config"),
            ),
            out_dim,
        )

    def open_graph(
        self, path: Path, entry: dict[str, Any], load_graph: GraphLoader, *, threads: int | None = None
    ) -> Any:
        session = session_record(entry)
        return load_graph(
            path,
            self.provider,
            optimization_level=session["load_graph_optimization_level"],
            session_config=session.get("load_session_config"),
            threads=threads,
        )
