"""Builder layer: engines per configuration, their manifest and cache (docs/engines.md).

One loop (``loop.build``) over two kinds of source: an adapter file
(``build_engines(BuildRequest(...))``, what ``prism-deploy build ADAPTER`` runs) and an
``export-model`` folder (``build_model_engines(ModelBuildRequest(...))``, ``build --model``).
The check of each new engine is passed in by the caller (``prism_deploy.parity``), so this
layer runs no engine itself. ONNX Runtime, TensorRT and the exporter are imported lazily.
"""

from prism_deploy.builder.adapter_source import BuildRequest, build_engines
from prism_deploy.builder.loop import BuildResult, CheckResult, Outcome, Unit
from prism_deploy.builder.model_source import ModelBuildRequest, build_model_engines
from prism_deploy.builder.options import EngineConfig, Profile
from prism_deploy.format.engine_manifest import EngineFileError, read_manifest

__all__ = [
    "BuildRequest",
    "BuildResult",
    "CheckResult",
    "EngineConfig",
    "EngineFileError",
    "ModelBuildRequest",
    "Outcome",
    "Profile",
    "Unit",
    "build_engines",
    "build_model_engines",
    "read_manifest",
]
