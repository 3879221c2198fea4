"""prism-deploy: a deployment compiler for PRISM adapters.

Layers, data flowing one way: ``format`` (load, validate, save) -> ``reference`` (PyTorch
semantics) -> ``lower`` (ONNX per precision) -> ``fuse`` (plugin rewrite) -> ``build``
(engines, manifest) -> ``runtime`` (run engines, pipeline) -> ``cli``. ``fit`` and ``bench``
sit beside them and use the same pieces.
"""

from __future__ import annotations

from typing import Any

from prism_deploy.errors import AdapterFormatError, CheckFailed, PrismInputError
from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.reference import PrismAdapter, load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterFormatError",
    "CheckFailed",
    "PipeSpec",
    "PrismAdapter",
    "PrismInputError",
    "__version__",
    "load_adapter",
    "plan_tiles",
    "save_adapter",
]


def __getattr__(name: str) -> Any:
    # Later layers import heavy libraries (onnx, onnxruntime): load them on first use only.
    if name == "plan_tiles":
        from prism_deploy.plan import plan_tiles

        return plan_tiles
    if name == "Pipeline":
        from prism_deploy.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'prism_deploy' has no attribute {name!r}")
