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
FOLDING_LOAD_LEVEL = "ORT_ENABLE_BASIC"  # constant folding, nothing hardware-specific
# Protobuf cannot hold a model over 2 GiB: above this, the optimized model's initializers go to
# a data file beside it (ONNX Runtime's session config keys for offline-optimized models).
EXTERNAL_FILE_KEY = "session.optimized_model_external_initializers_file_name"
EXTERNAL_MIN_SIZE_KEY = "session.optimized_model_external_initializers_min_size_in_bytes"
EXTERNAL_MIN_BYTES = 1024


def provider_for(target: str) -> str:
    return "cuda" if target == "ort-cuda" else "cpu"


def build_ort_engine(onnx_path: Path, engine_path: Path, target: str, *,
                     external_data: str | None = None, precision: str | None = None) -> dict[str, Any]:
    """Optimize ``onnx_path`` for ``target``'s provider into ``engine_path``; return the session record.

    ``external_data``: a file name (in ``engine_path``'s folder) for the initializers of a
    model too large for one protobuf; the optimized model refers to it by that name.
    """
    from prism_deploy.ort_session import make_session, session_config_for

    provider = provider_for(target)
    config = None
    if external_data is not None:
        config = {EXTERNAL_FILE_KEY: external_data, EXTERNAL_MIN_SIZE_KEY: str(EXTERNAL_MIN_BYTES)}
    make_session(onnx_path, provider, optimized_model_path=str(engine_path),
                 graph_optimization_level=BUILD_OPTIMIZATION_LEVEL, session_config=config)
    if not engine_path.is_file():
        raise RuntimeError(f"{onnx_path}: ONNX Runtime did not write the optimized model")
    if external_data is not None and not (engine_path.parent / external_data).is_file():
        raise RuntimeError(f"{onnx_path}: ONNX Runtime did not write the external initializers")
    record: dict[str, Any] = {
        "provider": provider,
        "build_graph_optimization_level": BUILD_OPTIMIZATION_LEVEL,
        "load_graph_optimization_level": LOAD_OPTIMIZATION_LEVEL,
    }
    load_config = session_config_for(precision)
    if load_config:
        # Weight-only int8: the engine file keeps int8 weights; their dequantization is folded
        # into floats once, when the engine is opened (which needs constant folding on).
        record.update(load_graph_optimization_level=FOLDING_LOAD_LEVEL, load_session_config=load_config)
    return record
