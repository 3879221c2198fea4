"""A Triton model repository from built stages: ``prism-deploy triton BUILD_DIR... -o REPO``.

The folders given, in order, are the stages of one chain (``first, adapter, (middle,
adapter)*, last``: model folders from ``export-model`` or ``build --model``, adapter folders
from ``build``), or adapter build folders only (each served on its own). Layout
(docs/serving.md)::

    REPO/prism-repository.json          what was served from where (read by `serve`, `triton update`)
    REPO/<model>/config.pbtxt           schema-checked (prism_deploy.serving.triton_config)
    REPO/<model>/<version>/model.py     Python form: prism_deploy/serving/triton_model.py
    REPO/<model>/<version>/stage/...    Python form: the stage's engines/graphs and manifest
    REPO/<model>/<version>/model.onnx   native form, ONNX Runtime engines (model.plan: TensorRT)

Models: one per stage (``first``, ``adapter`` or ``adapter_<i>``, ``middle_<i>``, ``last``),
``last_decode`` (the last model's KV-cache step), the ensemble ``chain`` (token ids -> logits),
``generate`` (greedy decoding by BLS) and, with ``stream``, the decoupled ``generate_stream``.
A last model of the ``ort`` graph form has no ``last_decode``: its ``generate`` models carry the
stage and decode in their own process on the shared KV buffer (Python form only).

Every configuration is rendered and checked before anything is written; the repository is
assembled in a temporary sibling folder and renamed into place, so a failed run leaves no
repository; ``add_version`` (hot-swap) writes one version folder the same way inside its model.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prism_deploy.core import jsontext
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.fsutil import write_errors
from prism_deploy.format.stage_io import input_names, output_name
from prism_deploy.serving import triton_config as cfg
from prism_deploy.serving.stage_runtime import (
    STAGE_DIR,
    StageInfo,
    TensorSpec,
    graph_io,
    inspect_stage,
    write_stage_files,
)
from prism_deploy.target_backends import backend_for

REPO_MANIFEST = "prism-repository.json"
REPO_FORMAT = "prism-deploy-triton-repository"
REPO_VERSION = 1
FORMS = ("python", "native")
ENTRY_FILE = Path(__file__).with_name("triton_model.py")
STAGING_PREFIX = ".staging-"  # not a number: Triton ignores it as a version folder


@dataclass
class Options:
    backend: str = "python"
    precision: str | None = None
    target: str | None = None
    engine_id: str | None = None
    instances: int = 1
    max_queue_delay_us: int = 100
    stream: bool = False
    max_new_tokens_limit: int = 256


@dataclass
class ModelEntry:
    """One model of the repository: its configuration and how to fill a version folder."""

    name: str
    role: str  # stage | decode | generate | ensemble
    config: dict[str, Any]
    fill: Callable[[Path], None]
    stage: StageInfo | None = None
    text: str = ""
    record: dict[str, Any] = field(default_factory=dict)


def _tensor(t: TensorSpec, **extra: Any) -> dict[str, Any]:
    return {"name": t.name, "data_type": cfg.DTYPES[t.dtype], "dims": list(t.dims), **extra}


def _params(**values: Any) -> dict[str, Any]:
    return {k: {"string_value": str(v)} for k, v in values.items()}


def _instance_group(target: str, count: int) -> list[dict[str, Any]]:
    return [{"kind": "KIND_GPU" if backend_for(target).gpu else "KIND_CPU", "count": count}]


def _batching(info: StageInfo, options: Options) -> dict[str, Any]:
    opt, top = int(info.profile["batch"][1]), info.max_batch
    preferred = sorted({s for s in (opt, top) if 1 < s <= top})
    out: dict[str, Any] = {"max_queue_delay_microseconds": options.max_queue_delay_us}
    if preferred:
        out["preferred_batch_size"] = preferred
    return out


def stage_names(infos: list[StageInfo]) -> list[str]:
    """Model names of the stages: ``first``, ``adapter`` (``adapter_<i>`` when several), ``middle_<i>``, ``last``."""
    adapters = sum(1 for i in infos if i.kind == "adapter")
    names, a, m = [], 0, 0
    for info in infos:
        if info.kind == "adapter":
            a += 1
            names.append("adapter" if adapters == 1 else f"adapter_{a}")
        elif info.kind == "middle":
            m += 1
            names.append(f"middle_{m}")
        else:
            names.append(info.kind)
    return names


def check_chain(infos: list[StageInfo]) -> bool:
    """True for a chain, False for adapters served on their own; anything else is bad input."""
    kinds = [i.kind for i in infos]
    if all(k == "adapter" for k in kinds):
        return False
    shape_ok = (
        len(kinds) >= 3
        and kinds[0] == "first"
        and kinds[-1] == "last"
        and all(k == "adapter" for k in kinds[1::2])
        and all(k == "middle" for k in kinds[2:-1:2])
    )
    if not shape_ok:
        raise PrismInputError(
            f"stages {' -> '.join(kinds)}: a chain is first, adapter, (middle, adapter)..., last "
            "(or give adapter build folders only)"
        )
    for before, adapter, after in zip(infos[0::2], infos[1::2], infos[2::2]):
        if adapter.width_in != before.width_out:
            raise PrismInputError(
                f"{adapter.source}: adapter in_dim {adapter.width_in} does not match {before.source}'s "
                f"hidden size {before.width_out}"
            )
        if adapter.width_out != after.width_in:
            raise PrismInputError(
                f"{adapter.source}: adapter out_dim {adapter.width_out} does not match "
                f"{after.source}'s embedding size {after.width_in}"
            )
    return True


# ---- the Python (portable) form --------------------------------------------------------------


def _fill_python(info: StageInfo) -> Callable[[Path], None]:
    def fill(vdir: Path) -> None:
        shutil.copy2(ENTRY_FILE, vdir / "model.py")
        write_stage_files(info, vdir / STAGE_DIR)

    return fill


def _python_stage(name: str, info: StageInfo, options: Options) -> ModelEntry:
    from prism_deploy.serving.stage_runtime import provider_of

    config = {
        "name": name,
        "backend": "python",
        "max_batch_size": info.max_batch,
        "input": [_tensor(t) for t in info.inputs],
        "output": [_tensor(t) for t in info.outputs],
        "dynamic_batching": _batching(info, options),
        "instance_group": _instance_group(info.target, options.instances),
        "version_policy": {"latest": {"num_versions": 1}},
        "parameters": _params(prism_kind=info.kind, max_seq=info.max_seq, prism_provider=provider_of(info.target)),
    }
    return ModelEntry(name, "stage", config, _fill_python(info), info)


def _python_decode(name: str, info: StageInfo, options: Options) -> ModelEntry:
    from prism_deploy.serving.stage_runtime import provider_of

    assert info.decode is not None
    inputs, outputs = info.decode
    config = {
        "name": name,
        "backend": "python",
        "max_batch_size": 0,
        "input": [_tensor(t, optional=t.name.startswith("past_key_values.")) for t in inputs],
        "output": [_tensor(t) for t in outputs],
        "instance_group": _instance_group(info.target, options.instances),
        "parameters": _params(prism_kind="decode", max_seq=info.max_seq, prism_provider=provider_of(info.target)),
    }
    return ModelEntry(name, "decode", config, _fill_python(info), info)


# ---- the native form -----------------------------------------------------------------------


def _native_files(info: StageInfo, key: str) -> tuple[str, list[str]]:
    """(the graph/engine file of ``key``, the external data files that must sit beside it)."""
    main = info.graphs.get(key)
    if main is None:
        raise PrismInputError(
            f"{info.source}: the native form needs one engine file for {key!r} "
            "(a per-pipe adapter build has one per pipe: serve it with --backend python)"
        )
    stem = main.split(".")[0]
    extra = [f for f in info.files if f != main and (f.endswith((".data", ".ort.data")) and f.startswith(stem))]
    return main, extra


def _native_model(name: str, info: StageInfo, key: str, options: Options, batched: bool) -> ModelEntry:
    main, extra = _native_files(info, key)
    platform, model_file = backend_for(info.target).triton_platform
    if platform == "tensorrt_plan":  # a plan's I/O is the stage's; an ONNX graph says its own
        inputs, outputs = (info.inputs, info.outputs) if key == "graph" else info.decode  # type: ignore[misc]
    else:
        inputs, outputs = graph_io(info.source / main)
        if batched:  # Triton's batch dim is the graph's first one
            inputs = [TensorSpec(t.name, t.dtype, t.dims[1:]) for t in inputs]
            outputs = [TensorSpec(t.name, t.dtype, t.dims[1:]) for t in outputs]
    config: dict[str, Any] = {
        "name": name,
        "platform": platform,
        "max_batch_size": info.max_batch if batched else 0,
        "input": [_tensor(t) for t in inputs],
        "output": [_tensor(t) for t in outputs],
        "instance_group": _instance_group(info.target, options.instances),
        "version_policy": {"latest": {"num_versions": 1}},
    }
    if batched:
        config["dynamic_batching"] = _batching(info, options)
    if platform == "onnxruntime_onnx" and info.layout != "model-export":
        # built engines are optimized offline; load with optimization off, as the project's loader does
        config["optimization"] = {"graph": {"level": 2}}

    def fill(vdir: Path) -> None:
        _link_or_copy(info.source / main, vdir / model_file)
        for name_ in extra:
            _link_or_copy(info.source / name_, vdir / name_)

    entry = ModelEntry(name, "decode" if key == "graph_with_past" else "stage", config, fill, info)
    entry.record["native_file"] = str(info.source / main)
    return entry


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def check_native_onnx(config_text: str, onnx_path: Path, where: str) -> None:
    """A native ONNX Runtime model's config against the ``model.onnx`` it points at, as ORT opens it."""
    message = cfg.parse_text(config_text, where)
    inputs, outputs = graph_io(onnx_path)
    batched = message.max_batch_size > 0
    for group, declared, actual in (("input", message.input, inputs), ("output", message.output, outputs)):
        have = {t.name: t for t in actual}
        if [t.name for t in declared] != [t.name for t in actual]:
            raise PrismInputError(
                f"{where}: {group}s {[t.name for t in declared]} differ from {onnx_path}'s {[t.name for t in actual]}"
            )
        for t in declared:
            real = have[t.name]
            dims = real.dims[1:] if batched else real.dims
            if cfg.DTYPES[real.dtype] != _dtype_name(t.data_type) or list(t.dims) != dims:
                raise PrismInputError(
                    f"{where}: {group} {t.name!r} declared {_dtype_name(t.data_type)} {list(t.dims)}, "
                    f"{onnx_path} has {cfg.DTYPES[real.dtype]} {dims}"
                )


def _dtype_name(value: int) -> str:
    return cfg._type_name(value)


# ---- the chain models ----------------------------------------------------------------------


def _ensemble(names: list[str], infos: list[StageInfo], entries: dict[str, ModelEntry]) -> ModelEntry:
    steps, previous = [], ""
    for i, (name, info) in enumerate(zip(names, infos)):
        ins = input_names(info.kind)
        input_map = {ins[0]: previous or "input_ids"}
        if len(ins) > 1:
            input_map[ins[1]] = "attention_mask"
        out = output_name(info.kind)
        produced = "logits" if i == len(infos) - 1 else f"{name}_{out}"
        steps.append({"model_name": name, "model_version": -1, "input_map": input_map, "output_map": {out: produced}})
        previous = produced
    last = entries[names[-1]].config
    logits = next(o for o in last["output"] if o["name"] == "logits")
    first = entries[names[0]].config
    config = {
        "name": "chain",
        "platform": "ensemble",
        "max_batch_size": min(entries[n].config["max_batch_size"] for n in names),
        "input": [dict(t) for t in first["input"]],
        "output": [dict(logits)],
        "ensemble_scheduling": {"step": steps},
    }
    return ModelEntry("chain", "ensemble", config, lambda vdir: None)


def generate_entry(
    name: str,
    prism_kind: str,
    models: list[StageInfo],
    source: StageInfo,
    head: StageInfo,
    options: Options,
    decoupled: bool,
    fill: Callable[[Path], None],
    *,
    lead: dict[str, Any],
    tail: dict[str, Any] | None = None,
) -> ModelEntry:
    """The greedy ``generate`` model of a chain or a graph (a Python model, BLS over the stage
    models): token ids -> new tokens. ``models``: the stages whose limits bound it (max_seq of
    the models, max_batch of all), ``source`` the model reading the ids (its vocabulary),
    ``head`` a last model (its end-of-sequence id). Parameters: ``prism_kind``, ``lead``, the
    limits every generate model reads, ``tail``."""
    assert source.model is not None and head.model is not None
    eos = head.model.get("eos_token_id")
    config: dict[str, Any] = {
        "name": name,
        "backend": "python",
        "max_batch_size": 0,
        "input": [
            {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1, -1]},
            {"name": "attention_mask", "data_type": "TYPE_INT64", "dims": [-1, -1], "optional": True},
            {"name": "max_new_tokens", "data_type": "TYPE_INT32", "dims": [1], "optional": True},
            {"name": "eos_token_id", "data_type": "TYPE_INT64", "dims": [1], "optional": True},
        ],
        "output": [{"name": "tokens", "data_type": "TYPE_INT64", "dims": [-1, -1]}],
        "instance_group": [{"kind": "KIND_CPU", "count": options.instances}],
        "parameters": _params(
            prism_kind=prism_kind,
            **lead,
            max_seq=min(i.max_seq for i in models if i.model is not None),
            max_batch=min(i.max_batch for i in models),
            vocab_first=source.model["dims"]["vocab"],
            eos_token_id="none" if eos is None else eos,
            max_new_tokens_limit=options.max_new_tokens_limit,
            **(tail or {}),
        ),
    }
    if decoupled:
        config["model_transaction_policy"] = {"decoupled": True}
    return ModelEntry(name, "generate", config, fill)


def _generate_in_process(
    name: str, names: list[str], infos: list[StageInfo], options: Options, decoupled: bool
) -> ModelEntry:
    """``generate`` over an ``ort``-form last model: the stages before it through BLS, then the
    last model's prefill and steps in the generate model's own process, on the runtime's shared,
    preallocated KV buffer (docs/model-forms.md). A ``last_decode`` model would hand the whole
    cache to the caller and back on every step, the copy this form exists to remove."""
    from prism_deploy.serving.stage_runtime import provider_of

    last = infos[-1]

    def fill(vdir: Path) -> None:
        shutil.copy2(ENTRY_FILE, vdir / "model.py")
        write_stage_files(last, vdir / STAGE_DIR)

    return generate_entry(
        name,
        "generate",
        infos,
        infos[0],
        last,
        options,
        decoupled,
        fill,
        lead={
            "stages": json.dumps([{"model": n, "kind": i.kind} for n, i in zip(names[:-1], infos[:-1])]),
            "decode_model": "",
            "embed_tokens": "",
        },
        tail={"decode_in_process": "1", "prism_provider": provider_of(last.target)},
    )


def _generate(
    name: str,
    names: list[str],
    infos: list[StageInfo],
    decode: ModelEntry,
    options: Options,
    decoupled: bool,
    native: bool,
) -> ModelEntry:
    last = infos[-1]
    assert last.model is not None and last.decode is not None
    embed = last.model["files"]["embed_tokens"]["name"]
    decode_inputs, decode_outputs = last.decode

    def fill(vdir: Path) -> None:
        shutil.copy2(ENTRY_FILE, vdir / "model.py")
        _link_or_copy(last.source / embed, vdir / embed)

    return generate_entry(
        name,
        "generate",
        infos,
        infos[0],
        last,
        options,
        decoupled,
        fill,
        lead={
            "stages": json.dumps([{"model": n, "kind": i.kind} for n, i in zip(names[:-1], infos[:-1])]),
            "decode_model": decode.name,
            "embed_tokens": embed,
        },
        tail={
            "past_inputs": json.dumps([t.name for t in decode_inputs if t.name.startswith("past_key_values.")]),
            "present_outputs": json.dumps([t.name for t in decode_outputs if t.name.startswith("present.")]),
            "decode_needs_past": "1" if native else "0",
            "past_shape": json.dumps([last.model["dims"]["kv_heads"], last.model["dims"]["head_dim"]]),
        },
    )


# ---- planning and writing ------------------------------------------------------------------


def plan(paths: list[str | os.PathLike[str]], options: Options) -> tuple[list[ModelEntry], dict[str, Any]]:
    """Every model of the repository, rendered and checked; nothing is written."""
    if options.backend not in FORMS:
        raise PrismInputError(f"--backend: {options.backend!r} is not one of {', '.join(FORMS)}")
    if not paths:
        raise PrismInputError("give at least one build folder")
    if options.instances < 1:
        raise PrismInputError(f"--instances: {options.instances} must be at least 1")
    infos = [
        inspect_stage(p, precision=options.precision, target=options.target, engine_id=options.engine_id) for p in paths
    ]
    chain = check_chain(infos)
    native = options.backend == "native"
    for info in infos:
        if native and info.graph_form == "ort":
            raise PrismInputError(
                f"{info.source}: the ort graph form is served by the Python backend only "
                "(--backend python): its GroupQueryAttention reads a KV buffer that past and "
                "present share, which Triton's ONNX Runtime backend cannot bind"
            )
    names = stage_names(infos)
    entries: dict[str, ModelEntry] = {}
    for name, info in zip(names, infos):
        if native:
            entries[name] = _native_model(name, info, "graph", options, batched=True)
        else:
            entries[name] = _python_stage(name, info, options)
    if chain and infos[-1].graph_form == "ort":  # no decode model: generate decodes in process
        entries["chain"] = _ensemble(names, infos, entries)
        for name, decoupled in (("generate", False), ("generate_stream", True))[: 2 if options.stream else 1]:
            entries[name] = _generate_in_process(name, names, infos, options, decoupled)
    elif chain:
        last = infos[-1]
        decode = (
            _native_model("last_decode", last, "graph_with_past", options, batched=False)
            if native
            else _python_decode("last_decode", last, options)
        )
        entries[decode.name] = decode
        entries["chain"] = _ensemble(names, infos, entries)
        entries["generate"] = _generate("generate", names, infos, decode, options, False, native)
        if options.stream:
            entries["generate_stream"] = _generate("generate_stream", names, infos, decode, options, True, native)
    messages = {}
    for entry in entries.values():
        entry.text = cfg.render(entry.config)
        messages[entry.name] = cfg.parse_text(entry.text, f"model {entry.name!r}")
    cfg.check_repository(messages)
    if native:
        for entry in entries.values():
            if entry.config.get("platform") == "onnxruntime_onnx":
                check_native_onnx(entry.text, Path(entry.record["native_file"]), f"model {entry.name!r}")
    versions = {i.onnxruntime for i in infos if i.onnxruntime}
    if len(versions) > 1:
        raise PrismInputError(
            f"the stages were built with different ONNX Runtime versions ({', '.join(sorted(versions))}); "
            "one Python backend environment runs them all: rebuild them with one"
        )
    manifest = {
        "format": REPO_FORMAT,
        "version": REPO_VERSION,
        "backend": options.backend,
        "chain": names if chain else [],
        "onnxruntime": versions.pop() if versions else None,
        "gpu": any(backend_for(i.target).gpu for i in infos),
        "models": {e.name: _record(e) for e in entries.values()},
    }
    return list(entries.values()), manifest


def _record(entry: ModelEntry) -> dict[str, Any]:
    rec: dict[str, Any] = {"role": entry.role, "versions": [1]}
    info = entry.stage
    if info is not None:
        rec.update(
            {
                "kind": info.kind,
                "source": str(info.source.resolve()),
                "layout": info.layout,
                "target": info.target,
                "precision": info.precision,
                "profile": info.profile,
                "inputs": [t.__dict__ for t in info.inputs],
                "outputs": [t.__dict__ for t in info.outputs],
                "sources": {"1": str(info.source.resolve())},
                **info.details,
            }
        )
    return rec


def write(out: str | os.PathLike[str], entries: list[ModelEntry], manifest: dict[str, Any]) -> Path:
    """Assemble the repository in a temporary sibling folder, then rename it to ``out``."""
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise PrismInputError(
            f"{out}: exists and is not an empty folder (write a new repository, or use "
            "`prism-deploy triton update` to add an adapter version)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f".{target.name}.partial-{secrets.token_hex(4)}"
    work.mkdir()
    with write_errors(out, work):
        try:
            for entry in entries:
                model_dir = work / entry.name
                model_dir.mkdir()
                vdir = model_dir / "1"
                vdir.mkdir()
                entry.fill(vdir)
                (model_dir / "config.pbtxt").write_text(entry.text, encoding="utf-8")
            (work / REPO_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            os.replace(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # our own temporary folder, never the target
            raise
    return target


def read_manifest(repo: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(repo) / REPO_MANIFEST
    if not path.is_file():
        raise PrismInputError(f"{repo}: no {REPO_MANIFEST} (not a repository written by `prism-deploy triton`)")
    obj = jsontext.load_file(path)
    if not isinstance(obj, dict) or obj.get("format") != REPO_FORMAT or obj.get("version") != REPO_VERSION:
        raise PrismInputError(f"{path}: not a prism-deploy repository manifest of version {REPO_VERSION}")
    return dict(obj)


def write_manifest(repo: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    from prism_deploy.core.fsutil import write_text_atomic

    write_text_atomic(Path(repo) / REPO_MANIFEST, json.dumps(manifest, indent=2) + "\n")


def add_version(repo: Path, name: str, version: int, fill: Callable[[Path], None]) -> Path:
    """Write ``REPO/<name>/<version>/`` atomically: filled under a staging name, then renamed."""
    model_dir = repo / name
    final = model_dir / str(version)
    if final.exists():
        raise PrismInputError(f"{final}: exists already")
    staging = model_dir / f"{STAGING_PREFIX}{version}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        fill(staging)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # only the staging folder this call made
        raise
    return final
