"""Parity checks: any runner against the PyTorch reference (docs/precision.md), end-to-end
pipeline parity (``parity.chain_parity``), and the checks a build runs on each engine
(``parity.build_checks``). Loaded lazily: the model-graph check needs no PyTorch."""

from __future__ import annotations

from prism_deploy.core.lazy import lazy_getattr

__all__ = [
    "ParityReport",
    "adapter_engine_check",
    "check_parity",
    "default_tolerances",
    "model_graph_check",
    "simulated_stored_tiles",
]

_LAZY = {
    "ParityReport": "prism_deploy.parity.check",
    "check_parity": "prism_deploy.parity.check",
    "default_tolerances": "prism_deploy.parity.check",
    "simulated_stored_tiles": "prism_deploy.parity.check",
    "adapter_engine_check": "prism_deploy.parity.build_checks",
    "model_graph_check": "prism_deploy.parity.build_checks",
}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
