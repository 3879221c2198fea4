"""Everything that imports ``tensorrt`` lives in this package; the rest of prism_deploy
imports it lazily (inside functions), so the project installs and runs without TensorRT.

A real TensorRT is detected with ``hasattr(tensorrt, "Builder")``: the ``tensorrt-stubs``
package makes ``import tensorrt`` succeed as an empty namespace package.
"""

from __future__ import annotations

import importlib


def plugin_support() -> tuple[bool, str]:
    """Whether a real TensorRT with Quickly Deployable Plugins (10.9+, AOT) imports here (whether
    TensorRT imports at all: ``prism_deploy.core.targets.tensorrt_available``)."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        return False, f"tensorrt is not installed ({exc})"
    if not hasattr(trt, "Builder"):
        return False, "'import tensorrt' finds only a namespace package (type stubs), not TensorRT"
    try:
        plugin = importlib.import_module("tensorrt.plugin")
    except ImportError as exc:
        return False, f"TensorRT {getattr(trt, '__version__', '?')} has no tensorrt.plugin ({exc})"
    if not hasattr(plugin, "aot_impl"):
        return False, f"TensorRT {getattr(trt, '__version__', '?')} has no tensorrt.plugin.aot_impl (needs 10.9+)"
    return True, f"TensorRT {trt.__version__}"
