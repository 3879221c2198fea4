"""``build_model_engines``: an ``export-model`` folder -> one engine per graph, with a manifest.

The same build folder rules as adapter builds (:mod:`prism_deploy.build.builder`): the
manifest (``source`` key ``model`` instead of ``adapter``), the file lock, engines made and
checked in a private temporary folder and moved in under content-addressed names, the
manifest replaced atomically last, and an entry reused when its cache key (the graph's file
hashes, target, profile, tool versions, device) and its files' hashes are unchanged.

Per graph of the export (``upper``: ``graph``; ``lower``: ``graph`` and ``graph_with_past``):
an ONNX Runtime offline-optimized model (``ort-*``) or a TensorRT engine with one profile from
``--batch``/``--seq`` (``trt``). After each build, a parity check runs the built graph and
the source ONNX on the same random inputs; one failing graph fails the whole build and leaves
the folder as it was (a model needs all of its graphs). ``model.json`` and ``embed_tokens.npy``
are copied along, so the folder is a complete pipeline part.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.build import environment
from prism_deploy.build.builder import TMP_PREFIX, engine_part, locked, ort_engine_part
from prism_deploy.build.manifest import (
    EngineFileError,
    canonical_hash,
    new_manifest,
    parts_intact,
    read_manifest,
    source_kind,
    unreferenced_engine_files,
    verify_part,
    write_manifest,
)
from prism_deploy.build.options import Profile
from prism_deploy.errors import CheckFailed, PrismInputError
from prism_deploy.fsutil import atomic_output, file_sha256

# The graphs of each role, by their key in model.json's "files".
GRAPHS = {"upper": ("graph",), "lower": ("graph", "graph_with_past")}
# Files copied beside the engines so that the folder runs on its own (model.json is always copied).
COPIED = ("embed_tokens",)
MODEL_MANIFEST = "model.json"
# Built graph vs source ONNX (same precision, same provider family): only graph rewrites differ.
# int8/int4 (weight-only, models/quantize.py): the engine and the source run the same quantized
# kernels on the same stored weights, so the fp32 bound holds (measured: 0, bit for bit, on the tests'
# models, tests/test_models_quantized.py::test_build_model_accepts_quantized_folders).
PARITY_TOLERANCES = {"fp32": {"rel_l2": 1e-4, "top1": 0.99}, "fp16": {"rel_l2": 1e-2, "top1": 0.95},
                     "int8": {"rel_l2": 1e-4, "top1": 0.99}, "int4": {"rel_l2": 1e-4, "top1": 0.99}}
PARITY_PAST = 3  # past length fed to the KV-cache graph in the parity check


@dataclass
class ModelBuildRequest:
    """The inputs of one ``prism-deploy build --model DIR`` call."""

    model_dir: Path
    out_dir: Path | None = None
    target: str = "auto"
    profile: Profile = field(default_factory=Profile)
    parity: bool = True
    force: bool = False
    progress: bool = False


@dataclass
class GraphOutcome:
    """What happened to one graph: ``built``, ``reused`` or ``failed``."""

    id: str
    graph: str
    action: str
    entry: dict[str, Any] | None
    seconds: float
    detail: str = ""


@dataclass
class ModelBuildResult:
    directory: Path
    role: str
    target: str
    target_reason: str
    outcomes: list[GraphOutcome]
    manifest_written: bool

    @property
    def failed(self) -> list[GraphOutcome]:
        return [o for o in self.outcomes if o.action == "failed"]

    def raise_for_failures(self) -> None:
        if self.failed:
            raise CheckFailed("; ".join(f"{o.id}: {o.detail}" for o in self.failed)
                              + " (manifest unchanged)")


def read_model_export(model_dir: Path) -> dict[str, Any]:
    """``model.json`` of an export folder, after checking that every file it lists is there
    and hashes as recorded (a graph changed behind the manifest is bad input, not a new model)."""
    from prism_deploy.models.export import read_manifest as read_model_manifest

    if not model_dir.is_dir():
        raise PrismInputError(f"--model {model_dir}: not a folder (give what `prism-deploy export-model` wrote)")
    if (model_dir / "manifest.json").is_file():
        raise PrismInputError(f"--model {model_dir}: already a build folder; give the `export-model` folder")
    manifest = read_model_manifest(model_dir)
    if manifest.get("role") not in GRAPHS:
        raise PrismInputError(f"{model_dir / MODEL_MANIFEST}: role {manifest.get('role')!r} is not upper or lower")
    for key, record in manifest["files"].items():
        path = model_dir / record["name"]
        if not path.is_file():
            raise PrismInputError(f"{path}: missing ({MODEL_MANIFEST} lists it as {key!r})")
        if file_sha256(path) != record["sha256"]:
            raise PrismInputError(f"{path}: sha256 differs from {MODEL_MANIFEST} (changed after the export; "
                                  "export the model again)")
    return manifest


def default_out_dir(role: str, model_json_sha: str) -> Path:
    return Path("engines") / f"{role}-{model_json_sha[:8]}"


def graph_files(manifest: dict[str, Any], key: str) -> list[dict[str, str]]:
    """model.json records of a graph: the ``.onnx`` and, over 2 GiB, its external data file."""
    files = manifest["files"]
    stem = files[key]["name"].split(".")[0]
    return [files[k] for k in (key, f"{stem}_data") if k in files]


def configuration(target: str, precision: str, key: str, profile: Profile) -> dict[str, Any]:
    return {"target": target, "precision": precision, "graph": key, "profile": profile.to_json()}


def build_model_engines(request: ModelBuildRequest, log: Callable[[str], None] | None = None) -> ModelBuildResult:
    """Build (or reuse) an engine for every graph of ``request.model_dir``; see the module docstring."""
    say = log or (lambda message: print(message, file=sys.stderr))
    source = Path(request.model_dir)
    model = read_model_export(source)
    role, precision = str(model["role"]), str(model.get("precision", "fp32"))
    model_json_sha = file_sha256(source / MODEL_MANIFEST)
    _check_form_for(request.target, model, source)  # said before looking for TensorRT
    target, target_reason = environment.resolve_target(request.target)
    _check_form_for(target, model, source)  # and where `auto` chose it
    tools, device = environment.tool_versions(target), environment.device_info(target)
    directory = Path(request.out_dir) if request.out_dir is not None else default_out_dir(role, model_json_sha)
    record = {"role": role, "source": str(source.resolve()), "model_json_sha256": model_json_sha,
              "precision": precision, "copies": []}

    with locked(directory, say):
        old = _previous(directory, say)
        old_entries = {e["id"]: e for e in old["engines"]} if old is not None and old["model"]["role"] == role else {}
        work = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=directory))
        try:
            outcomes = []
            for key in _progress(GRAPHS[role], request.progress):
                cfg = configuration(target, precision, key, request.profile)
                entry_id = f"{target}/{key}"
                cache = canonical_hash({"graph": [f["sha256"] for f in graph_files(model, key)],
                                        "configuration": cfg, "tools": tools, "device": device})
                previous = old_entries.get(entry_id)
                if (not request.force and previous is not None and previous.get("cache_key") == cache
                        and parts_intact(directory, previous)):
                    outcomes.append(GraphOutcome(entry_id, key, "reused", previous, 0.0, "cache hit"))
                    continue
                outcomes.append(_make(request, source, model, key, cfg, entry_id, cache, tools, device, work))
            written = _commit(directory, source, model, old, record, outcomes, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return ModelBuildResult(directory, role, target, target_reason, outcomes, written)


def _check_form_for(target: str, model: dict[str, Any], source: Path) -> None:
    """TensorRT's parser takes MatMulNBits with float16 activations only, and these graphs are
    float32: the nbits form is for ONNX Runtime, the dq form for TensorRT (models/quantize.py)."""
    if target == "trt" and (model.get("quantization") or {}).get("form") == "nbits":
        raise PrismInputError(f"--model {source}: its {model.get('precision')} weights are in the nbits form "
                              "(MatMulNBits), which is for ONNX Runtime; export with --form dq for TensorRT")


def _previous(directory: Path, say: Callable[[str], None]) -> dict[str, Any] | None:
    try:
        old = read_manifest(directory)
    except EngineFileError as exc:
        say(f"warning: {exc}; starting a new manifest")
        return None
    if old is not None and source_kind(old) != "model":
        raise PrismInputError(f"-o {directory}: holds adapter engines; build the model into another folder")
    return old


def _progress(keys: tuple[str, ...], enabled: bool) -> Any:
    if not enabled:
        return keys
    from tqdm import tqdm

    return tqdm(keys, desc="build --model", unit="graph", file=sys.stderr)


def _make(request: ModelBuildRequest, source: Path, model: dict[str, Any], key: str, cfg: dict[str, Any],
          entry_id: str, cache: str, tools: dict[str, Any], device: dict[str, Any], work: Path) -> GraphOutcome:
    onnx_path = source / model["files"][key]["name"]
    stem = f"{model['role']}.{key}.{cfg['target']}"
    start = time.perf_counter()
    session: dict[str, Any] | None = None
    try:
        if cfg["target"] == "trt":
            from prism_deploy.trt.engine import TensorRTError

            try:
                part = engine_part(work, stem, ".engine", _trt_engine(onnx_path, model, key, request.profile))
            except TensorRTError as exc:
                raise CheckFailed(f"TensorRT build failed: {exc}") from None
        else:
            size = sum((source / f["name"]).stat().st_size for f in graph_files(model, key))
            part, session = ort_engine_part(onnx_path, work, stem, cfg["target"], size)
    except CheckFailed as exc:
        return GraphOutcome(entry_id, key, "failed", None, time.perf_counter() - start, str(exc))
    seconds = time.perf_counter() - start
    entry: dict[str, Any] = {
        "id": entry_id, "configuration": cfg, "target": cfg["target"], "parts": [{"graph": key, **part}],
        "session": session, "tools": tools, "device": device, "cache_key": cache,
        "build_seconds": round(seconds, 3), "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "how": "built", "parity": None,
    }
    if request.parity:
        figures = graph_parity(onnx_path, work, entry, model, key)
        entry["parity"] = figures
        if not figures["passed"]:
            return GraphOutcome(entry_id, key, "failed", None, seconds, f"parity failed: {figures['detail']}")
    return GraphOutcome(entry_id, key, "built", entry, seconds, "cache miss")


def trt_input_shapes(model: dict[str, Any], key: str,
                     profile: Profile) -> tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]:
    """The TensorRT optimization profile of one graph: ``(input, min, opt, max)`` over batch x
    seq, and past length 0..max seq for the KV-cache graph (whose mask covers past + new)."""
    dims = model["dims"]
    (b0, b1, b2), (s0, s1, s2) = profile.batch, profile.seq
    if model["role"] == "upper":
        return tuple((n, (b0, s0), (b1, s1), (b2, s2)) for n in ("input_ids", "attention_mask"))
    from prism_deploy.models.export import past_names

    d = int(dims["hidden"])
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = [
        ("inputs_embeds", (b0, s0, d), (b1, s1, d), (b2, s2, d))]
    if key == "graph":
        shapes.append(("attention_mask", (b0, s0), (b1, s1), (b2, s2)))
    else:
        kv, hd = int(dims["kv_heads"]), int(dims["head_dim"])
        shapes.append(("attention_mask", (b0, s0), (b1, 2 * s1), (b2, 2 * s2)))
        shapes += [(n, (b0, kv, 0, hd), (b1, kv, s1, hd), (b2, kv, s2, hd)) for n in past_names(int(dims["layers"]))]
    return tuple(shapes)


def _trt_engine(onnx_path: Path, model: dict[str, Any], key: str, profile: Profile) -> bytes:
    """A TensorRT engine with one profile over the graph's dynamic inputs. Built through
    TensorRT-RTX in CI (tests/test_trt_rtx_build.py); never by TensorRT itself on a GPU yet."""
    from prism_deploy.trt import engine as trt_engine

    unused = (0, 0, 0)  # the adapter's single-input shapes: input_shapes replaces them
    settings = trt_engine.TrtBuildSettings(min_shape=unused, opt_shape=unused, max_shape=unused,
                                           input_shapes=trt_input_shapes(model, key, profile))
    return trt_engine.build_serialized_engine(onnx_path, settings)


def _commit(directory: Path, source: Path, model: dict[str, Any], old: dict[str, Any] | None,
            record: dict[str, Any], outcomes: list[GraphOutcome], work: Path) -> bool:
    """All graphs ready: move new engines in, copy model.json and the embedding table, then
    write the manifest. Any failure writes nothing."""
    if any(o.action == "failed" for o in outcomes):
        return False
    copies = [f"{MODEL_MANIFEST}", *(model["files"][k]["name"] for k in COPIED if k in model["files"])]
    same_model = old is not None and old["model"].get("model_json_sha256") == record["model_json_sha256"]
    copies_intact = same_model and old is not None and all(
        parts_intact(directory, {"parts": [c]}) for c in old["model"].get("copies", []))
    if all(o.action == "reused" for o in outcomes) and copies_intact:
        return False
    for o in outcomes:
        if o.action == "built" and o.entry is not None:
            for part in o.entry["parts"]:
                names = [part["file"]] + ([part["data_file"]] if part.get("data_file") else [])
                for name in names:
                    (work / name).replace(directory / name)
    for name in copies:
        with atomic_output(directory / name) as tmp:
            shutil.copyfile(source / name, tmp)
    record["copies"] = [{"file": n, "sha256": file_sha256(directory / n), "bytes": (directory / n).stat().st_size}
                        for n in copies]
    fresh = {o.id: o.entry for o in outcomes if o.entry is not None}
    # entries of other targets stay when they were built from the same export
    kept = [e for e in (old["engines"] if old is not None and same_model else []) if e["id"] not in fresh]
    manifest = new_manifest(record, [*kept, *fresh.values()], kind="model")
    write_manifest(directory, manifest)
    for stale in unreferenced_engine_files(directory, manifest):
        with contextlib.suppress(OSError):
            stale.unlink()
    return True


# ---- parity ------------------------------------------------------------------------------

def graph_parity(source_onnx: Path, work: Path, entry: dict[str, Any], model: dict[str, Any], key: str,
                 seed: int = 0) -> dict[str, Any]:
    """Run the built graph and the source ONNX on the same random inputs; relative L2 on every
    output, top-1 agreement on logits. TensorRT engines of a model are not run here (no
    multi-input TensorRT runner yet): their figures say so."""
    from prism_deploy.build.ort_backend import provider_for
    from prism_deploy.models.export import compare
    from prism_deploy.ort_session import make_session

    if entry["target"] == "trt":
        return {"passed": True, "skipped": "no TensorRT runner for model graphs yet", "detail": ""}
    provider = provider_for(entry["target"])
    part = entry["parts"][0]
    built = make_session(verify_part(work, part), provider,
                         graph_optimization_level=entry["session"]["load_graph_optimization_level"])
    reference = make_session(source_onnx, provider)
    feeds, mask = parity_inputs(reference, model, key, seed, source_onnx.parent)
    names = [o.name for o in reference.get_outputs()]
    got, want = built.run(names, feeds), reference.run(names, feeds)
    tol = PARITY_TOLERANCES.get(str(model.get("precision")), PARITY_TOLERANCES["fp32"])
    figures: dict[str, Any] = {"tolerances": tol, "outputs": {}}
    bad = []
    for name, g, w in zip(names, got, want):
        is_logits = name == "logits"
        fig = compare(g, w, mask if is_logits or name == "hidden" else None, logits=is_logits)
        figures["outputs"][name] = fig
        if not fig["rel_l2"] <= tol["rel_l2"]:
            bad.append(f"{name} rel_l2 {fig['rel_l2']:.3g} > {tol['rel_l2']:.3g}")
        if is_logits and not fig["top1"] >= tol["top1"]:
            bad.append(f"{name} top-1 {fig['top1']:.3f} < {tol['top1']}")
    figures["rel_l2"] = max(f["rel_l2"] for f in figures["outputs"].values())
    figures["max_abs"] = max(f["max_abs"] for f in figures["outputs"].values())
    figures["passed"] = not bad
    figures["detail"] = "; ".join(bad)
    return figures


def parity_inputs(session: Any, model: dict[str, Any], key: str, seed: int,
                  model_dir: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Random feeds for one graph: ids/mask (upper), embeds/mask (lower), plus a short past
    (KV graph). Returns (feeds, mask over the new tokens)."""
    rng = np.random.default_rng(seed)
    dims = model["dims"]
    batch, seq = 2, max(1, min(int(model["max_seq"]) - PARITY_PAST, 7))
    past = PARITY_PAST if key == "graph_with_past" else 0
    mask = np.ones((batch, past + seq), dtype=np.int64)
    mask[-1, :2] = 0  # one left-padded row
    types = {i.name: i.type for i in session.get_inputs()}

    def floats(a: np.ndarray, name: str) -> np.ndarray:
        return a.astype(np.float16 if "float16" in types[name] else np.float32)

    if model["role"] == "upper":
        ids = rng.integers(0, int(dims["vocab"]), size=(batch, seq), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": mask}, mask
    # embedding-scale inputs: rows of model B's own table plus noise
    table = np.load(model_dir / model["files"]["embed_tokens"]["name"], mmap_mode="r")
    rows = np.asarray(table[rng.integers(0, table.shape[0], size=(batch, seq))], dtype=np.float32)
    embeds = rows + rng.normal(0.0, float(rows.std()) or 1.0, size=rows.shape)
    feeds = {"inputs_embeds": floats(embeds, "inputs_embeds"), "attention_mask": mask}
    if key == "graph_with_past":
        from prism_deploy.models.export import past_names

        shape = (batch, int(dims["kv_heads"]), past, int(dims["head_dim"]))
        for name in past_names(int(dims["layers"])):
            feeds[name] = floats(rng.normal(0.0, 1.0, size=shape), name)
    return feeds, mask[:, past:]
