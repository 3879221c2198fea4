"""ONNX Runtime sessions: the one way this project opens a model.

Which provider can run here is decided in :mod:`prism_deploy.core.targets` (the CUDA provider
only where a GPU really answers: ``onnxruntime-gpu`` lists it on machines without one, and
asking for it then logs errors before falling back).
"""

from __future__ import annotations

import os
from typing import Any

from prism_deploy.core.errors import PrismInputError, brief
from prism_deploy.core.precision import ModelPrecision, Precision
from prism_deploy.core.targets import PROVIDERS

# ONNX Runtime leaves a DequantizeLinear on constant weights unfolded (it is the QDQ pattern
# its quantized kernels look for), so a weight-only int8 graph dequantizes and re-lays out
# every weight on every call. With no quantized activations there is no such kernel to find:
# this lets constant folding turn the weights into floats once, when the session opens.
# Measured on the 2-core CPU dev machine (2026-11-25, 4096 -> 4096 dense pipe, one thread,
# batch 1): 95.8 ms -> 3.3 ms per call, outputs equal to float32 rounding; the int8 file stays
# int8 on disk. int8-qdq graphs keep the default: their Q/DQ pairs are meant for ORT's kernels.
WEIGHT_ONLY_INT8_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}


def session_config_for(precision: Precision | ModelPrecision | None) -> dict[str, str]:
    """Session config entries a graph of ``precision`` should be opened with: weight-only int8
    (an adapter's ``Precision.INT8``, a model's ``ModelPrecision.INT8``: string enums of one
    value, so one comparison covers both) folds its weights once."""
    return dict(WEIGHT_ONLY_INT8_SESSION_CONFIG) if precision == Precision.INT8 else {}


def make_session(
    model: str | os.PathLike[str] | bytes,
    provider: str = "cpu",
    *,
    custom_ops_library: str | None = None,
    optimized_model_path: str | None = None,
    intra_op_threads: int | None = None,
    graph_optimization_level: str | None = None,
    session_config: dict[str, str] | None = None,
) -> Any:
    """Open an ``onnxruntime.InferenceSession`` on ``cpu`` or ``cuda`` (no silent fallback).

    ``graph_optimization_level`` names an ``onnxruntime.GraphOptimizationLevel`` member
    (``ORT_DISABLE_ALL`` for a model that was already optimized offline); default: ORT's own.
    ``session_config`` entries go to ``SessionOptions.add_session_config_entry``.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if graph_optimization_level:
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, graph_optimization_level)
    for key, value in (session_config or {}).items():
        opts.add_session_config_entry(key, value)
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    if custom_ops_library:
        opts.register_custom_ops_library(custom_ops_library)
    if optimized_model_path:
        opts.optimized_model_filepath = str(optimized_model_path)
    providers = [PROVIDERS[provider]]
    if provider == "cuda":
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # finds the CUDA libraries of the nvidia-* wheels
        providers.append(PROVIDERS["cpu"])
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, sess_options=opts, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for bad models
        raise PrismInputError(
            f"{'model' if isinstance(model, bytes) else model}: ONNX Runtime cannot load it ({brief(exc, 400)})"
        ) from None


def versions() -> dict[str, str]:
    import onnxruntime as ort

    return {
        "onnxruntime": ort.__version__,
        "onnxruntime_build": "gpu" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu",
    }
