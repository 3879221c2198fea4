"""Runtime layer: running lowered graphs, built engines and model folders (ONNX Runtime, TensorRT).

One runner runs any ONNX graph by feed dict (``OnnxRunner``); the adapter graph, the built
engines and the model folders are thin views over it; ``Chain`` (and ``Pipeline``, its two-model
case) runs them one after the other; ``Graph`` runs a graph of them (fan-out, fusions). Nothing here
imports PyTorch (a torch CUDA tensor handed to ``load_engines(...).run`` is the one exception,
and only then). Heavy modules load on first use.
"""

from __future__ import annotations

from prism_deploy.core.lazy import lazy_getattr

__all__ = ["AdapterGraph", "Chain", "Graph", "OnnxRunner", "Pipeline", "load_engines"]

_LAZY = {
    "load_engines": "prism_deploy.runtime.engines",
    "AdapterGraph": "prism_deploy.runtime.adapter_session",
    "OnnxRunner": "prism_deploy.runtime.onnx_runner",
    "Pipeline": "prism_deploy.runtime.chain",
    "Chain": "prism_deploy.runtime.chain",
    "Graph": "prism_deploy.runtime.graph",
}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
