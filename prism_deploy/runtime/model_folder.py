"""A pipeline part on disk: the folder ``export-model`` wrote, or the one ``build --model`` wrote.

Both hold ``model.json`` (dims, max_seq, the embedding table's name); a build folder also has
``manifest.json`` (that is how it is told apart) whose entries name one engine per graph and
target. Engines and copied files are checked against the manifest's sha256 and the engine's
ONNX Runtime version before they are opened, as adapter engines are
(:mod:`prism_deploy.runtime.engines`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prism_deploy.build.manifest import EngineFileError, read_manifest, source_kind, verify_part


class ModelFolder:
    """``model.json`` and one ONNX Runtime session per graph (``graph``, ``graph_with_past``)."""

    def __init__(self, directory: str | os.PathLike[str], role: str) -> None:
        from prism_deploy.models.export import read_manifest as read_model_manifest

        self.dir = Path(directory)
        self.build = read_manifest(self.dir)  # None for an export folder
        if self.build is not None:
            if source_kind(self.build) != "model":
                raise EngineFileError(f"{self.dir}: holds adapter engines, not a model build (role {role} needed)")
            built_role = self.build["model"].get("role")
            if built_role != role:
                raise EngineFileError(f"{self.dir}: a build of role {built_role!r}, {role!r} is needed here")
            for copy in self.build["model"].get("copies", []):  # model.json and the embedding table
                verify_part(self.dir, copy)
        self.manifest = read_model_manifest(self.dir, role)

    @property
    def built(self) -> bool:
        return self.build is not None

    def session(self, key: str, provider: str, *, intra_op_threads: int | None = None) -> Any:
        """An ONNX Runtime session of graph ``key`` on ``provider``: the export's ``.onnx``, or
        the build's engine for ``ort-<provider>`` (opened with optimization off, as built).
        ``intra_op_threads``: ONNX Runtime's own default when None (benchmarks set it)."""
        from prism_deploy.ort_session import make_session

        if self.build is None:
            return make_session(self.dir / self.manifest["files"][key]["name"], provider,
                                intra_op_threads=intra_op_threads)
        from prism_deploy.runtime.engines import check_environment, select_entry

        entry = select_entry(self.build, self.dir, engine_id=f"ort-{provider}/{key}")
        check_environment(entry)
        path = verify_part(self.dir, entry["parts"][0])
        return make_session(path, provider, graph_optimization_level=entry["session"]["load_graph_optimization_level"],
                            intra_op_threads=intra_op_threads)
