"""One backend object per target: ``backend_for("trt")`` -> what builds, opens and checks its engines.

The target names (``core.targets.Target``) are the keys; each backend is one file here
(``ort_cpu.py``, ``ort_cuda.py``, ``tensorrt.py``; the two ONNX Runtime ones share
``onnxruntime.py``). Adding a target is adding a file and its line in ``BACKENDS`` (and its
name in ``Target``). ``base.py`` says what a backend is.
"""

from __future__ import annotations

from prism_deploy.core.targets import Target, parse_target
from prism_deploy.target_backends.base import AdapterRunner, BuiltEngine, EngineBuild, GraphLoader, TargetBackend
from prism_deploy.target_backends.ort_cpu import OrtCpuTarget
from prism_deploy.target_backends.ort_cuda import OrtCudaTarget
from prism_deploy.target_backends.tensorrt import TensorRTTarget

BACKENDS: dict[Target, TargetBackend] = {b.target: b for b in (TensorRTTarget(), OrtCudaTarget(), OrtCpuTarget())}


def backend_for(target: Target | str) -> TargetBackend:
    """The backend of ``target`` (a ``Target`` or its name; another name is bad input)."""
    return BACKENDS[parse_target(target)]


def graph_backend(provider: str) -> TargetBackend:
    """The backend whose engines of model graphs run on ONNX Runtime's ``provider``."""
    for b in BACKENDS.values():
        if b.opens_model_graphs and b.provider == provider:
            return b
    raise ValueError(f"no target opens model graphs on provider {provider!r}")


__all__ = [
    "BACKENDS",
    "AdapterRunner",
    "BuiltEngine",
    "EngineBuild",
    "GraphLoader",
    "TargetBackend",
    "backend_for",
    "graph_backend",
]
