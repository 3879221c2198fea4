"""Where the serving layer reads the project's folders and opens their stages on the runtime.

A *stage* is one step of a chain, in order: the first model, an adapter, a middle model and the
last model (with its KV-cache graph ``graph_with_past`` and the ``embed_tokens.npy`` table for
decoding); what each takes and gives is :mod:`prism_deploy.format.stage_io`'s table, which the
configs here are written from. Today's two-model pipeline is ``[first, adapter, last]``; a
chain of N models is ``[first, adapter, middle, adapter, ..., last]``.

Two sides:

- :func:`inspect_stage` (the repository generator, in the CLI's environment): what a build or
  export folder holds, which files a served version needs, its tensors, profile and target;
- :func:`open_stage` (inside Triton's Python backend, in the backend environment without
  PyTorch): run the stage from the folder a served version carries.

The serving layer's calls into the runtime are here, but for the decoding loop the ``generate``
models share with the in-process chain (:mod:`prism_deploy.runtime.decode`, used by the backend):

- adapter build folders: :func:`prism_deploy.runtime.engines.load_engines` and
  ``select_entry``; manifests through :mod:`prism_deploy.format.engine_manifest`;
- model folders (export or build): :class:`prism_deploy.runtime.model_stage.ModelStage`, the
  stage the in-process chain runs (no copy of it here); also :func:`graph_io`, which reads an
  engine's tensors for the native form.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prism_deploy.core import defaults
from prism_deploy.core.errors import PrismInputError
from prism_deploy.format.stage_io import KINDS, STAGE_IO, StageTensor, decode_io

if TYPE_CHECKING:
    from prism_deploy.runtime.model_stage import ModelStage

# model.json roles -> chain stage kinds (prism_deploy.format.model_folder reads old names as new)
ROLE_KINDS = {"first": "first", "middle": "middle", "last": "last"}
# a served stage's files live in this folder of the model version
STAGE_DIR = "stage"


@dataclass
class TensorSpec:
    """One tensor at the Triton interface: name, numpy dtype name, dims after the batch dim."""

    name: str
    dtype: str
    dims: list[int]


@dataclass
class StageInfo:
    """What the repository generator needs to know about one stage folder."""

    kind: str
    source: Path
    layout: str  # "adapter-build", "model-build" or "model-export"
    target: str
    precision: str
    profile: dict[str, list[int]]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    files: list[str]  # plain names inside ``source`` (checked): what a served version copies
    onnxruntime: str | None  # version the engines were built with (None: an export, any version)
    manifest: dict[str, Any] | None = None  # build manifest reduced to the served entries
    model: dict[str, Any] | None = None  # model.json of model stages
    graphs: dict[str, str] = field(default_factory=dict)  # graph key -> engine/graph file (native form)
    # KV-cache graph io (a last stage of the portable form; the ort form's cache stays in its process)
    decode: tuple[list[TensorSpec], list[TensorSpec]] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)  # of the files whose hash a manifest records

    def __post_init__(self) -> None:
        # every name read from a manifest or model.json stays inside its folder (no "..", no
        # absolute path, no symlink out): checked before anything is written or linked
        from prism_deploy.core.fsutil import inside

        for name in self.files:
            inside(self.source, name, f"{self.source}: file")

    @property
    def max_seq(self) -> int:
        limit = int(self.profile["seq"][2])
        if self.model is not None:
            limit = min(limit, int(self.model["max_seq"]))
        return limit

    @property
    def max_batch(self) -> int:
        return int(self.profile["batch"][2])

    @property
    def graph_form(self) -> str:
        """``portable`` or ``ort`` for a model stage (docs/model-forms.md); ``portable`` for adapters."""
        return str(self.details.get("graph_form", "portable"))

    @property
    def width_in(self) -> int | None:
        """The float width this stage reads (adapter ``in_dim``, model embedding width); None for ids."""
        x = next((t for t in self.inputs if t.dtype.startswith("float")), None)
        return x.dims[-1] if x is not None else None

    @property
    def width_out(self) -> int:
        return self.outputs[0].dims[-1]


def _read_model_json(folder: Path) -> dict[str, Any]:
    from prism_deploy.format.model_folder import read_model_json

    return read_model_json(folder)


def _specs(tensors: tuple[StageTensor, ...], sizes: dict[str, int], *, batched: bool) -> list[TensorSpec]:
    """Contract tensors as Triton sees them: numbers for the widths, -1 for free dims, and the
    batch dim left out where Triton batches the model."""
    return [TensorSpec(t.name, t.dtype, t.sized(sizes)[1:] if batched else t.sized(sizes)) for t in tensors]


def _model_io(kind: str, model: dict[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs, outputs = STAGE_IO[kind]
    return _specs(inputs, model["dims"], batched=True), _specs(outputs, model["dims"], batched=True)


def _decode_io(model: dict[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The KV-cache step with the batch dim explicit (its model is not batched by Triton); it
    returns the last position's logits [batch, vocab], all that greedy decoding reads
    (``ModelStage.step``'s ``positions="last"``)."""
    inputs, outputs = decode_io(int(model["dims"]["layers"]))
    specs = _specs(outputs, model["dims"], batched=False)
    logits = specs[0]
    specs[0] = TensorSpec(logits.name, logits.dtype, [logits.dims[0], logits.dims[-1]])  # the last position only
    return _specs(inputs, model["dims"], batched=False), specs


def inspect_stage(
    path: str | os.PathLike[str],
    *,
    precision: str | None = None,
    target: str | None = None,
    engine_id: str | None = None,
) -> StageInfo:
    """Describe a build folder (adapter or model) or a model export folder as a chain stage."""
    from prism_deploy.format.engine_manifest import MANIFEST_NAME
    from prism_deploy.format.model_folder import MODEL_JSON

    folder = Path(path)
    if not folder.is_dir():
        what = (
            "a file, not a folder: give the stage folders (a build --chain folder's chain.json lists them)"
            if folder.is_file()
            else "no such folder"
        )
        raise PrismInputError(f"{path}: {what} (give `prism-deploy build` or `export-model` folders)")
    if (folder / MANIFEST_NAME).is_file():
        from prism_deploy.format.engine_manifest import read_manifest, source_kind

        manifest = read_manifest(folder)
        assert manifest is not None
        if source_kind(manifest) == "adapter":
            return _adapter_stage(folder, manifest, precision, target, engine_id)
        return _model_build_stage(folder, manifest, target)
    if (folder / MODEL_JSON).is_file():
        return _model_export_stage(folder)
    raise PrismInputError(f"{path}: neither a build folder (manifest.json) nor a model export folder (model.json)")


def _adapter_stage(
    folder: Path, manifest: dict[str, Any], precision: str | None, target: str | None, engine_id: str | None = None
) -> StageInfo:
    from prism_deploy.format.engine_manifest import part_files
    from prism_deploy.runtime.engines import AmbiguousEngines, select_entry

    try:
        entry = select_entry(manifest, folder, precision=precision, target=target, engine_id=engine_id)
    except AmbiguousEngines as exc:
        raise exc.saying("pick the one to serve with --precision, --target or --engine-id") from None
    config = manifest["adapter"]["config"]
    cfg = entry["configuration"]
    files = [name for part in entry["parts"] for name, _ in part_files(part)]
    graphs = {"graph": entry["parts"][0]["file"]} if len(entry["parts"]) == 1 else {}
    if entry.get("forms"):
        # one gated form per token bucket: a server running one graph (Triton's ONNX Runtime
        # backend, the native form) gets the form chosen for the profile's OPT call
        from prism_deploy.format.engine_manifest import bucket_for

        opt = cfg["profile"]["batch"][1] * cfg["profile"]["seq"][1]
        form = bucket_for(entry["forms"]["buckets"], opt)["form"]
        graphs = {"graph": next(p["file"] for p in entry["parts"] if p.get("form") == form)}
    sizes = {"in_dim": int(config["in_dim"]), "out_dim": int(config["out_dim"])}
    adapter_io = (
        _specs(STAGE_IO["adapter"][0], sizes, batched=True),
        _specs(STAGE_IO["adapter"][1], sizes, batched=True),
    )
    return StageInfo(
        kind="adapter",
        source=folder,
        layout="adapter-build",
        target=entry["target"],
        precision=cfg["precision"],
        profile=dict(cfg["profile"]),
        inputs=adapter_io[0],
        outputs=adapter_io[1],
        files=files,
        sha256={name: sha for part in entry["parts"] for name, sha in part_files(part)},
        onnxruntime=entry["tools"].get("onnxruntime"),
        manifest={**manifest, "engines": [entry]},
        graphs=graphs,
        details={
            "engine_id": entry["id"],
            "adapter_sha256": manifest["adapter"]["sha256"],
            "topology_sha256": manifest["adapter"].get("topology_sha256"),
            "engine_layout": cfg["layout"],
            "plugin": bool(cfg.get("plugin")),
        },
    )


def _model_build_stage(folder: Path, manifest: dict[str, Any], target: str | None) -> StageInfo:
    from prism_deploy.format.engine_manifest import part_files
    from prism_deploy.format.model_folder import GRAPHS_BY_FORM, graph_form

    model = _read_model_json(folder)
    kind = ROLE_KINDS[model["role"]]
    form = graph_form(model)
    graphs_needed = GRAPHS_BY_FORM[form][model["role"]]
    targets = sorted({e["target"] for e in manifest["engines"]})
    if target is None:
        if len(targets) != 1:
            raise PrismInputError(f"{folder}: engines for {', '.join(targets) or 'no target'}; pick one with --target")
        target = targets[0]
    entries = {e["configuration"]["graph"]: e for e in manifest["engines"] if e["target"] == target}
    missing = [g for g in graphs_needed if g not in entries]
    if missing:
        raise PrismInputError(f"{folder}: no {target} engine for graph(s) {', '.join(missing)}")
    chosen = [entries[g] for g in graphs_needed]
    copies = {c["file"]: c["sha256"] for c in manifest["model"].get("copies", [])}
    copies.update({name: sha for e in chosen for part in e["parts"] for name, sha in part_files(part)})
    files = list(copies)
    inputs, outputs = _model_io(kind, model)
    profile = chosen[0]["configuration"].get("profile") or defaults.SERVING_PROFILE
    return StageInfo(
        kind=kind,
        source=folder,
        layout="model-build",
        target=target,
        precision=str(model.get("precision", "fp32")),
        profile=dict(profile),
        inputs=inputs,
        outputs=outputs,
        files=files,
        sha256=copies,
        onnxruntime=chosen[0]["tools"].get("onnxruntime"),
        manifest={**manifest, "engines": chosen},
        model=model,
        graphs={g: entries[g]["parts"][0]["file"] for g in graphs_needed},
        decode=_decode_io(model) if kind == "last" and form == "portable" else None,
        details={"role": model["role"], "graph_form": form},
    )


def _model_export_stage(folder: Path) -> StageInfo:
    model = _read_model_json(folder)
    kind = ROLE_KINDS[model["role"]]
    from prism_deploy.format.model_folder import MODEL_JSON, file_path, graph_form

    for key in model["files"]:
        if not file_path(folder, model, key).is_file():
            raise PrismInputError(f"{file_path(folder, model, key)}: missing (model.json lists it as {key})")
    inputs, outputs = _model_io(kind, model)
    files = [MODEL_JSON, *(record["name"] for record in model["files"].values())]
    hashes = {record["name"]: record["sha256"] for record in model["files"].values()}
    graphs = {k: model["files"][k]["name"] for k in ("graph", "graph_with_past") if k in model["files"]}
    return StageInfo(
        kind=kind,
        source=folder,
        layout="model-export",
        target="ort-cpu",
        precision=str(model.get("precision", "fp32")),
        profile={key: list(values) for key, values in defaults.SERVING_PROFILE.items()},
        inputs=inputs,
        outputs=outputs,
        files=files,
        sha256=hashes,
        onnxruntime=None,
        model=model,
        graphs=graphs,
        decode=_decode_io(model) if kind == "last" and graph_form(model) == "portable" else None,
        details={"role": model["role"], "graph_form": graph_form(model)},
    )


def stage_manifest_text(info: StageInfo) -> str | None:
    """The build manifest a served version carries: only the entries it serves."""
    return None if info.manifest is None else json.dumps(info.manifest, indent=2) + "\n"


def write_stage_files(info: StageInfo, dest: Path) -> None:
    """Fill ``dest`` (a new folder) with what ``open_stage`` needs: hard links where the file
    system allows (engines are never rewritten in place), else copies; hashes re-checked."""
    import shutil

    from prism_deploy.core.fsutil import file_sha256, inside
    from prism_deploy.format.engine_manifest import MANIFEST_NAME

    dest.mkdir(parents=True)
    for name in info.files:
        src, dst = inside(info.source, name, f"{info.source}: file"), dest / name
        if dst.exists():  # two records naming one file; never write over anything
            raise PrismInputError(f"{src}: named twice by the folder's manifest")
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        if name in info.sha256 and file_sha256(dst) != info.sha256[name]:
            raise PrismInputError(
                f"{src}: sha256 differs from what its folder's manifest records (changed after "
                "the build or export; build or export it again)"
            )
    text = stage_manifest_text(info)
    if text is not None:
        (dest / MANIFEST_NAME).write_text(text, encoding="utf-8")


def graph_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX graph or engine as ONNX Runtime opens it (symbolic dims -> -1);
    the native form's configs are written from, and checked against, this."""
    from prism_deploy.core.ort_session import make_session

    session = make_session(path, "cpu", graph_optimization_level="ORT_DISABLE_ALL")
    numpy_of = {
        "tensor(float)": "float32",
        "tensor(float16)": "float16",
        "tensor(int64)": "int64",
        "tensor(int32)": "int32",
        "tensor(bool)": "bool",
        "tensor(int8)": "int8",
    }

    def spec(arg: Any) -> TensorSpec:
        if arg.type not in numpy_of:
            raise PrismInputError(f"{path}: tensor {arg.name!r} of type {arg.type} has no Triton data type here")
        return TensorSpec(arg.name, numpy_of[arg.type], [d if isinstance(d, int) and d > 0 else -1 for d in arg.shape])

    return [spec(a) for a in session.get_inputs()], [spec(a) for a in session.get_outputs()]


# ---- running, inside the backend -------------------------------------------------------------


class AdapterStage:
    """An adapter build folder: ``run(hidden [b, s, in_dim]) -> adapted [b, s, out_dim]`` float32."""

    kind = "adapter"

    def __init__(self, folder: Path) -> None:
        from prism_deploy.runtime.engines import load_engines

        self.engines = load_engines(folder)
        self.in_dim, self.out_dim = self.engines.in_dim, self.engines.out_dim
        self.engine_id = self.engines.id

    def run(self, hidden: np.ndarray) -> np.ndarray:
        return np.asarray(self.engines.run(np.ascontiguousarray(hidden, dtype=np.float32)), dtype=np.float32)


def open_stage(folder: str | os.PathLike[str], kind: str, provider: str = "cpu") -> AdapterStage | ModelStage:
    """Open a served version's stage folder (written by :func:`write_stage_files`): a model
    stage is the runtime's own :class:`~prism_deploy.runtime.model_stage.ModelStage`, so a
    served model runs as the in-process chain runs it (its one session for a last model's plain
    calls and decoding steps included)."""
    if kind not in KINDS:
        raise PrismInputError(f"stage kind {kind!r} is not one of {', '.join(KINDS)}")
    path = Path(folder)
    if kind == "adapter":
        return AdapterStage(path)
    from prism_deploy.runtime.model_stage import ModelStage

    return ModelStage(path, kind, provider)


def provider_of(target: str) -> str:
    """The ONNX Runtime provider that runs engines of ``target`` in the Python backend."""
    from prism_deploy.target_backends import backend_for

    backend = backend_for(target)
    if backend.runtime_tool == "onnxruntime":
        return backend.provider
    raise PrismInputError(
        f"target {target!r}: the Python backend form runs ONNX Runtime engines only "
        "(TensorRT engines: use --backend native)"
    )
