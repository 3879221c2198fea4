"""Reference layer: the PyTorch semantics every backend is checked against."""

from prism_deploy.reference.module import (
    Pipe,
    PrismAdapter,
    ReferenceAdapterRunner,
    compute_dtype_for,
    describe,
    load_adapter,
    save_adapter,
)
from prism_deploy.reference.routing import Routing, route, top_k_indices
from prism_deploy.reference.synthetic import random_adapter, simple_config

__all__ = [
    "Pipe",
    "PrismAdapter",
    "ReferenceAdapterRunner",
    "Routing",
    "compute_dtype_for",
    "describe",
    "load_adapter",
    "random_adapter",
    "route",
    "save_adapter",
    "simple_config",
    "top_k_indices",
]
