"""Build layer: engines per pipe configuration, their manifest and cache (docs/engines.md).

``build_engines(BuildRequest(...))`` is what ``prism-deploy build`` runs; the modules import
ONNX Runtime, TensorRT and the exporter lazily, so importing this package is cheap.
"""

from prism_deploy.build.builder import BuildRequest, BuildResult, Outcome, build_engines, pipe_adapter
from prism_deploy.build.manifest import EngineFileError, read_manifest
from prism_deploy.build.options import EngineConfig, Profile

__all__ = [
    "BuildRequest",
    "BuildResult",
    "EngineConfig",
    "EngineFileError",
    "Outcome",
    "Profile",
    "build_engines",
    "pipe_adapter",
    "read_manifest",
]
