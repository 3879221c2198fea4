"""prism-deploy: a deployment compiler for PRISM adapters.

Layers, data flowing one way: ``format`` (every file: load, validate, save) -> ``reference``
(PyTorch semantics) -> ``lower`` (ONNX per precision) -> ``fuse`` (plugin rewrite) -> ``builder``
(engines, manifest) -> ``runtime`` (run engines and models, the pipeline) -> ``serving`` /
``cli``. ``fit``, ``parity`` and ``bench`` sit beside them; ``core`` holds what every layer
shares. Importing this package loads no layer: each name below loads its module on first use,
and only ``PrismAdapter`` / ``load_adapter`` (the reference) need PyTorch.
"""

from __future__ import annotations

from prism_deploy.core.lazy import lazy_getattr
from prism_deploy.core.version import __version__

_LAZY = {
    "AdapterConfig": "prism_deploy.format",
    "PipeSpec": "prism_deploy.format",
    "AdapterTensors": "prism_deploy.format",
    "read_adapter": ("prism_deploy.format", "read_adapter_file"),
    "write_adapter": ("prism_deploy.format", "write_adapter_file"),
    "AdapterFormatError": "prism_deploy.core.errors",
    "CheckFailed": "prism_deploy.core.errors",
    "PrismInputError": "prism_deploy.core.errors",
    "PrismAdapter": "prism_deploy.reference",
    "load_adapter": "prism_deploy.reference",
    "save_adapter": "prism_deploy.reference",
    "plan_tiles": "prism_deploy.plan",
    "load_engines": "prism_deploy.runtime.engines",
    "Pipeline": "prism_deploy.runtime.chain",
    "Chain": "prism_deploy.runtime.chain",
    "Graph": "prism_deploy.runtime.graph",
}

__all__ = ["__version__", *_LAZY]

__getattr__ = lazy_getattr(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(__all__)
