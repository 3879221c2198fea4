"""Runtime layer: running lowered graphs and built engines (ONNX Runtime, TensorRT)."""

from __future__ import annotations

from typing import Any

__all__ = ["load_engines"]


def __getattr__(name: str) -> Any:
    # Loading engines pulls in onnxruntime (and TensorRT for trt engines): only on first use.
    if name == "load_engines":
        from prism_deploy.runtime.engines import load_engines

        return load_engines
    raise AttributeError(f"module 'prism_deploy.runtime' has no attribute {name!r}")
