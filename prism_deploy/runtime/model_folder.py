"""A model on disk: the folder ``export-model`` wrote, or the one ``build --model`` wrote.

Both hold ``model.json`` (dims, max_seq, the embedding table's name); a build folder also has
``manifest.json`` (that is how it is told apart) whose entries name one engine per graph and
target. Engines and copied files are checked against the manifest's sha256 and the engine's
ONNX Runtime version before they are opened, as adapter engines are
(:mod:`prism_deploy.runtime.engines`); every file name stays inside the folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.core.targets import Target
from prism_deploy.format import model_folder
from prism_deploy.format.engine_manifest import EngineFileError, read_manifest, source_kind, verify_part
from prism_deploy.runtime.engines import check_environment, select_entry
from prism_deploy.runtime.onnx_runner import OnnxRunner


class ModelFolder:
    """``model.json`` and one :class:`OnnxRunner` per graph (``graph``, ``graph_with_past``)."""

    def __init__(self, directory: str | os.PathLike[str], role: str) -> None:
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
        self.manifest = model_folder.read_model_json(self.dir, role)

    @property
    def built(self) -> bool:
        return self.build is not None

    def runner(self, key: str, provider: str) -> OnnxRunner:
        """Graph ``key`` on ``provider``: the export's ``.onnx``, or the build's engine for
        ``ort-<provider>`` (opened as it was built)."""
        if self.build is None:
            return OnnxRunner.open(model_folder.file_path(self.dir, self.manifest, key), provider)
        target = Target.ORT_CPU if provider == "cpu" else Target.ORT_CUDA
        entry = select_entry(self.build, self.dir, target=target.value, layout=key)
        check_environment(entry)
        path = verify_part(self.dir, entry["parts"][0])
        return OnnxRunner.open(path, provider, optimization_level=entry["session"]["load_graph_optimization_level"],
                               session_config=entry["session"].get("load_session_config"))

    def table(self, key: str) -> np.ndarray:
        """A table model.json lists (the embedding matrix), memory-mapped."""
        return np.load(model_folder.file_path(self.dir, self.manifest, key), mmap_mode="r", allow_pickle=False)
