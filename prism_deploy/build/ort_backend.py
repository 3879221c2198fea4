"""ONNX Runtime "engines": the exported graph optimized offline and saved, plus the options
needed to open it again.

ONNX Runtime's docs ask that an offline-optimized model be run with the same execution
provider, optimization level and hardware it was optimized for. So the saved model is
optimized at ``ORT_ENABLE_EXTENDED`` (fusions, no hardware-specific layout transforms) for the
target's provider, the provider and levels are recorded in the manifest, and the loader opens
the file with optimization disabled: the work was done once, at build time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BUILD_OPTIMIZATION_LEVEL = "ORT_ENABLE_EXTENDED"
LOAD_OPTIMIZATION_LEVEL = "ORT_DISABLE_ALL"


def provider_for(target: str) -> str:
    return "cuda" if target == "ort-cuda" else "cpu"


def build_ort_engine(onnx_path: Path, engine_path: Path, target: str) -> dict[str, Any]:
    """Optimize ``onnx_path`` for ``target``'s provider into ``engine_path``; return the session record."""
    from prism_deploy.runtime.ort_session import make_session

    provider = provider_for(target)
    make_session(onnx_path, provider, optimized_model_path=str(engine_path),
                 graph_optimization_level=BUILD_OPTIMIZATION_LEVEL)
    if not engine_path.is_file():
        raise RuntimeError(f"{onnx_path}: ONNX Runtime did not write the optimized model")
    return {
        "provider": provider,
        "build_graph_optimization_level": BUILD_OPTIMIZATION_LEVEL,
        "load_graph_optimization_level": LOAD_OPTIMIZATION_LEVEL,
    }
