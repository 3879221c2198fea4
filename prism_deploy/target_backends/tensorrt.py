"""``trt``: TensorRT engines for the adapter (the pipeline's model graphs run on ONNX Runtime CUDA).

A plan is tied to the TensorRT version and the GPU's compute capability; a version-compatible
plan is meant for later TensorRT runtimes (the lean one included), but never for another GPU.
Every use of TensorRT's API lives in ``prism_deploy.trt``; this file says when to call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from prism_deploy.core import targets
from prism_deploy.core.errors import CheckFailed
from prism_deploy.core.targets import Target
from prism_deploy.format.engine_manifest import EngineFileError
from prism_deploy.target_backends.base import BuiltEngine, EngineBuild, GraphLoader, TargetBackend

UNUSED_SHAPE = (0, 0, 0)  # the adapter's single-input shapes, when input_shapes replaces them


class TensorRTTarget(TargetBackend):
    target: ClassVar[Target] = Target.TRT
    provider: ClassVar[str] = "cuda"
    gpu: ClassVar[bool] = True
    tool: ClassVar[str] = "TensorRT"
    engine_options: ClassVar[frozenset[str]] = frozenset({"--refittable", "--version-compatible", "--weight-streaming"})
    fuses_plugin: ClassVar[bool] = True
    refits: ClassVar[bool] = True
    # TensorRT's parser takes MatMulNBits with float16 activations only; model graphs are float32
    takes_nbits_models: ClassVar[bool] = False
    opens_model_graphs: ClassVar[bool] = False
    # a TensorRT profile starts at one token: a call of zero is answered by the loader
    answers_zero_tokens: ClassVar[bool] = False
    triton_platform: ClassVar[tuple[str, str]] = ("tensorrt_plan", "model.plan")

    def _version_here(self, entry: dict[str, Any], built: Any) -> Any:
        # a version-compatible plan is meant for other (later) TensorRT runtimes, the lean one included
        if entry["configuration"].get("version_compatible"):
            return built
        return super()._version_here(entry, built)

    def check_environment(self, entry: dict[str, Any]) -> None:
        super().check_environment(entry)
        # version compatibility is not hardware compatibility: the GPU must match
        gpu = targets.device_info(self.target)
        if gpu.get("compute_capability") != entry["device"].get("compute_capability"):
            raise EngineFileError(
                f"engine {entry['id']}: built for compute capability "
                f"{entry['device'].get('compute_capability')}, this GPU is "
                f"{gpu.get('compute_capability')}; rebuild with `prism-deploy build`"
            )

    def build(self, onnx_path: Path, work: Path, stem: str, request: EngineBuild) -> BuiltEngine:
        from prism_deploy.trt import engine as trt_engine

        try:
            return BuiltEngine(self._serialized(trt_engine, onnx_path, request), ".engine")
        except trt_engine.TensorRTError as exc:
            raise CheckFailed(f"TensorRT build failed: {exc}") from None

    def _serialized(self, trt_engine: Any, onnx_path: Path, request: EngineBuild) -> bytes:
        if request.refit_from is not None:
            return bytes(
                trt_engine.refit_serialized_engine(request.refit_from.read_bytes(), onnx_path, plugin=request.plugin)
            )
        lo, opt, hi = request.shapes or (UNUSED_SHAPE, UNUSED_SHAPE, UNUSED_SHAPE)
        settings = trt_engine.TrtBuildSettings(
            min_shape=lo,
            opt_shape=opt,
            max_shape=hi,
            refittable=request.refittable,
            version_compatible=request.version_compatible,
            weight_streaming=request.weight_streaming,
            plugin=request.plugin,
            input_shapes=request.input_shapes,
        )
        cache = None
        if request.cache_dir is not None:
            cc = str(targets.device_info(self.target).get("compute_capability", "unknown")).replace(".", "")
            cache = request.cache_dir / f"timing-trt{targets.tensorrt_version()}-sm{cc}.cache"
        return bytes(trt_engine.build_serialized_engine(onnx_path, settings, cache))

    def open(self, path: Path, entry: dict[str, Any], load_graph: GraphLoader, out_dim: int) -> Any:
        from prism_deploy.trt.engine import TrtRunner

        cfg = entry["configuration"]
        return TrtRunner(path, plugin=bool(cfg.get("plugin")), version_compatible=bool(cfg.get("version_compatible")))
