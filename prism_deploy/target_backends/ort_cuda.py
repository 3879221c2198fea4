"""``ort-cuda``: ONNX Runtime's CUDA provider.

An engine of this target is refused where the provider cannot run, rather than left to ONNX
Runtime, which would fall back to the CPU silently."""

from __future__ import annotations

from typing import Any, ClassVar

from prism_deploy.core import targets
from prism_deploy.core.targets import Target
from prism_deploy.format.engine_manifest import EngineFileError
from prism_deploy.target_backends.onnxruntime import OnnxRuntimeTarget


class OrtCudaTarget(OnnxRuntimeTarget):
    target: ClassVar[Target] = Target.ORT_CUDA
    provider: ClassVar[str] = "cuda"
    gpu: ClassVar[bool] = True

    def check_environment(self, entry: dict[str, Any]) -> None:
        super().check_environment(entry)
        ok, why = targets.cuda_provider_available()
        if not ok:  # ONNX Runtime would fall back to the CPU silently: refuse instead
            raise EngineFileError(f"engine {entry['id']}: needs ONNX Runtime's CUDA provider ({why})")
