"""``prism-deploy bench``: every backend side by side on the same inputs, against the floor.

The names below load their modules on first use: ``bench --model --memory`` starts a child
process per model from a module of this package (:mod:`prism_deploy.bench.resident`), and
importing the package must not load PyTorch into a process that measures an ONNX model's memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prism_deploy.core.lazy import lazy_getattr

if TYPE_CHECKING:
    from prism_deploy.bench.backends import BACKEND_NAMES, Backend, BackendUnavailable
    from prism_deploy.bench.floor import bytes_must_move, case_floor, floor_seconds, flops_must_do
    from prism_deploy.bench.runner import BenchSettings, adapter_content_digest, run_bench

_LAZY = {
    "BACKEND_NAMES": "prism_deploy.bench.backends",
    "Backend": "prism_deploy.bench.backends",
    "BackendUnavailable": "prism_deploy.bench.backends",
    "bytes_must_move": "prism_deploy.bench.floor",
    "case_floor": "prism_deploy.bench.floor",
    "floor_seconds": "prism_deploy.bench.floor",
    "flops_must_do": "prism_deploy.bench.floor",
    "BenchSettings": "prism_deploy.bench.runner",
    "adapter_content_digest": "prism_deploy.bench.runner",
    "run_bench": "prism_deploy.bench.runner",
}

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendUnavailable",
    "BenchSettings",
    "adapter_content_digest",
    "bytes_must_move",
    "case_floor",
    "floor_seconds",
    "flops_must_do",
    "run_bench",
]

__getattr__ = lazy_getattr(__name__, _LAZY, globals())
