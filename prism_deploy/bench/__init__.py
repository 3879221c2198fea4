"""``prism-deploy bench``: every backend side by side on the same inputs, against the floor."""

from prism_deploy.bench.backends import BACKEND_NAMES, Backend, BackendUnavailable
from prism_deploy.bench.floor import bytes_must_move, case_floor, floor_seconds, flops_must_do
from prism_deploy.bench.runner import BenchSettings, adapter_content_digest, run_bench

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
