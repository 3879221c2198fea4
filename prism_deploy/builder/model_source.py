"""An ``export-model`` folder as a build source: one engine per graph of the model.

Per graph of the export (``first`` and ``middle``: ``graph``; ``last``: ``graph`` and ``graph_with_past``): an
ONNX Runtime offline-optimized model (``ort-*``) or a TensorRT engine with one profile from
``--batch``/``--seq`` (``trt``). A model needs all of its graphs, so they are one group: one
failing graph fails the whole build and leaves the folder as it was. ``model.json`` and the
embedding table are copied along, so the folder is a complete pipeline part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prism_deploy.builder.loop import BuildOptions, BuildResult, Unit, build, build_part
from prism_deploy.builder.options import EngineConfig, Profile
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.fsutil import file_sha256
from prism_deploy.core.precision import ModelPrecision
from prism_deploy.core.targets import Target
from prism_deploy.format import model_folder
from prism_deploy.format.engine_manifest import MANIFEST_NAME, source_kind
from prism_deploy.target_backends import EngineBuild, backend_for


@dataclass
class ModelBuildRequest:
    """The inputs of one ``prism-deploy build --model DIR`` call."""

    model_dir: Path
    out_dir: Path | None = None
    target: str = "auto"
    profile: Profile = field(default_factory=Profile)
    force: bool = False
    progress: bool = False


def read_model_export(model_dir: Path) -> dict[str, Any]:
    """``model.json`` of an export folder, after checking that every file it lists is there and
    hashes as recorded."""
    if not model_dir.is_dir():
        raise PrismInputError(f"--model {model_dir}: not a folder (give what `prism-deploy export-model` wrote)")
    if (model_dir / MANIFEST_NAME).is_file():
        raise PrismInputError(f"--model {model_dir}: already a build folder; give the `export-model` folder")
    manifest = model_folder.read_model_json(model_dir)
    model_folder.verify_files(model_dir, manifest)
    return manifest


def trt_input_shapes(
    model: dict[str, Any], key: str, profile: Profile
) -> tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]:
    """The TensorRT optimization profile of one graph: ``(input, min, opt, max)`` over batch x
    seq, and past length 0..max seq for the KV-cache graph (whose mask covers past + new)."""
    dims = model["dims"]
    (b0, b1, b2), (s0, s1, s2) = profile.batch, profile.seq
    if model["role"] == "first":
        return tuple((n, (b0, s0), (b1, s1), (b2, s2)) for n in ("input_ids", "attention_mask"))
    d = int(dims["hidden"])
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = [
        ("inputs_embeds", (b0, s0, d), (b1, s1, d), (b2, s2, d))
    ]
    if key == "graph":
        shapes.append(("attention_mask", (b0, s0), (b1, s1), (b2, s2)))
    else:
        kv, hd = int(dims["kv_heads"]), int(dims["head_dim"])
        shapes.append(("attention_mask", (b0, s0), (b1, 2 * s1), (b2, 2 * s2)))
        shapes += [
            (n, (b0, kv, 0, hd), (b1, kv, s1, hd), (b2, kv, s2, hd))
            for n in model_folder.past_names(int(dims["layers"]))
        ]
    return tuple(shapes)


class ModelSource:
    """``build --model DIR``: see the module docstring."""

    kind = "model"

    def __init__(self, request: ModelBuildRequest) -> None:
        self.request = request
        self.dir = Path(request.model_dir)
        self.model = read_model_export(self.dir)
        self.role = str(self.model["role"])
        self.precision = ModelPrecision(self.model["precision"])  # model.json's schema requires one of them
        self.form = model_folder.graph_form(self.model)  # portable or ort: its graphs per role differ
        self.label = self.role
        self.model_json_sha = file_sha256(self.dir / model_folder.MODEL_JSON)
        self.record: dict[str, Any] = {
            "role": self.role,
            "source": str(self.dir.resolve()),
            "model_json_sha256": self.model_json_sha,
            "precision": self.precision.value,
            "graph_form": self.form,
            "copies": [],
        }
        self._check_form_for(request.target)  # said before looking for TensorRT

    def _check_form_for(self, target: Target | str) -> None:
        """TensorRT's parser takes MatMulNBits with float16 activations only, and these graphs are
        float32: the nbits form is for ONNX Runtime, the dq form for TensorRT (models/quantize.py).
        The ``ort`` graph form builds for ``ort-cpu`` only: TensorRT cannot parse
        GroupQueryAttention, and the form is written for the CPU execution provider (float32
        activations; ONNX Runtime's CUDA GroupQueryAttention and MatMulNBits take float16)."""
        if target == "auto":  # checked again once chosen
            return
        if self.form == "ort" and target != Target.ORT_CPU:
            why = (
                "TensorRT cannot parse its GroupQueryAttention"
                if backend_for(target).runtime_tool != "onnxruntime"
                else "it is written for the CPU execution provider (float32 GroupQueryAttention)"
            )
            raise PrismInputError(
                f"--model {self.dir}: the ort graph form builds for ort-cpu only, not {target}: "
                f"{why}; export --graph-form portable for {target}"
            )
        if backend_for(target).takes_nbits_models:
            return
        if (self.model.get("quantization") or {}).get("form") == "nbits":
            raise PrismInputError(
                f"--model {self.dir}: its {self.precision} weights are in the nbits form "
                "(MatMulNBits), which is for ONNX Runtime; export with --form dq for TensorRT"
            )

    def default_out_dir(self) -> Path:
        return Path("engines") / f"{self.role}-{self.model_json_sha[:8]}"

    def same_source(self, old: dict[str, Any]) -> bool:
        return source_kind(old) == "model" and old["model"].get("model_json_sha256") == self.model_json_sha

    def owns(self, old: dict[str, Any]) -> bool:
        """A folder of this role's model engines (a re-export of the model counts)."""
        return source_kind(old) == "model" and old["model"].get("role") == self.role

    def copies(self) -> list[tuple[str, Path]]:
        names = [
            model_folder.MODEL_JSON,
            *(self.model["files"][k]["name"] for k in model_folder.TABLES if k in self.model["files"]),
        ]
        return [(name, self.dir / name) for name in names]

    def units(self, target: Target) -> list[Unit]:
        self._check_form_for(target)  # and where `auto` chose it
        units = []
        for key in model_folder.GRAPHS_BY_FORM[self.form][self.role]:
            cfg = EngineConfig(target=target, precision=self.precision, profile=self.request.profile, layout=key)
            sources = {"graph": [f["sha256"] for f in model_folder.graph_files(self.model, key)]}
            units.append(Unit(cfg, sources, group="model"))
        return units

    def refit_source(self, unit: Unit, directory: Path, old: dict[str, Any] | None) -> None:
        return None

    def make(
        self, unit: Unit, work: Path, directory: Path, refit_from: Any
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        key = unit.config.layout
        onnx_path = model_folder.file_path(self.dir, self.model, key)
        stem = f"{self.role}.{key}.{unit.config.target}"
        files = model_folder.graph_files(self.model, key)
        size = sum((self.dir / f["name"]).stat().st_size for f in files)
        request = EngineBuild(
            source_bytes=size,
            source_external=len(files) > 1,
            input_shapes=trt_input_shapes(self.model, key, self.request.profile),
        )
        part, session = build_part(backend_for(unit.config.target), onnx_path, work, stem, request)
        return [{"graph": key, **part}], session


def build_model_engines(request: ModelBuildRequest, check: Any = None, log: Any = None) -> BuildResult:
    """``prism-deploy build --model DIR``: an engine per graph, checked by ``check``
    (``prism_deploy.parity.model_graph_check``; None: unchecked)."""
    options = BuildOptions(
        out_dir=request.out_dir, target=request.target, check=check, force=request.force, progress=request.progress
    )
    return build(ModelSource(request), options, log)
