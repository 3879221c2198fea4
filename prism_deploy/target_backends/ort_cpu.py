"""``ort-cpu``: ONNX Runtime's CPU provider, the target every machine has.

INT8 ungated pipes are exported as MatMulNBits (weights read at 8 bits), the form ONNX
Runtime's CPU kernels run fastest (lower/adapter_onnx.py)."""

from __future__ import annotations

from typing import ClassVar

from prism_deploy.core.targets import Target
from prism_deploy.target_backends.onnxruntime import OnnxRuntimeTarget


class OrtCpuTarget(OnnxRuntimeTarget):
    target: ClassVar[Target] = Target.ORT_CPU
    provider: ClassVar[str] = "cpu"
    gpu: ClassVar[bool] = False
    nbits_export: ClassVar[bool] = True
