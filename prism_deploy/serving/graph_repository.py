"""A Triton model repository from a built graph: ``prism-deploy triton OUT -o REPO`` (docs/graphs.md).

``OUT`` is a ``build --graph`` folder (its ``graph.json``) or a graph file whose stages are all
build or export folders. Every stage of the graph becomes one model, named as the stage, written
as the chain's stages are (:mod:`prism_deploy.serving.repository`: the same Python-backend stage
models, configs, checks and atomic write). What a graph adds, as models of their own:

- ``<adapter>_concat`` before a **fusion adapter**: its inputs' hidden states side by side,
  in the order the graph lists them (the adapter model itself stays an ordinary adapter of
  ``in_dim`` = the sum, so ``triton update`` hot-swaps it as any other);
- ``<fusion>``, a **logit fusion**: ``sum_i w_i * log_softmax(logits_i)``, the weights from the
  graph file (the in-process graph's own ``fuse_logits``);
- ``<last>_decode`` for every last model behind the output (its KV-cache step);
- ``graph``, the ensemble (token ids -> the output's logits): one step per stage in the graph's
  topological order, so fan-out is one tensor read by several steps and fan-in a step reading
  several; Triton runs a step as soon as its inputs exist, so branches run concurrently;
- ``generate`` (and with ``stream``, ``generate_stream``): greedy decoding as ``Graph.generate``
  by Business Logic Scripting: the prefix through every stage but the last models, then each
  last model decodes with its own cache and is fed its own embedding of the token chosen from
  the (fused) distribution.

Only the Python form is written for a graph (the concatenation, the fusion and ``generate``
are Python models; the native form is refused in one line).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from prism_deploy.core.errors import PrismInputError
from prism_deploy.format.graph_file import GraphSpec, read_graph_file
from prism_deploy.format.stage_io import input_names, output_name, past_names
from prism_deploy.serving import repository as repo_mod
from prism_deploy.serving import triton_config as cfg
from prism_deploy.serving.repository import ModelEntry, Options, _params, _python_decode, _python_stage
from prism_deploy.serving.stage_runtime import StageInfo, inspect_stage
from prism_deploy.target_backends import backend_for

GRAPH_ENTRY_FILE = Path(__file__).with_name("triton_graph_model.py")
ENSEMBLE = "graph"
RESERVED = (ENSEMBLE, "generate", "generate_stream")
# Triton model names are folder names: keep them plain
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def is_graph(path: str | os.PathLike[str]) -> bool:
    """A ``build --graph`` folder, or a graph/chain file given to ``triton``."""
    p = Path(path)
    return (p / "graph.json").is_file() or (p.is_file() and p.suffix in (".json", ".toml"))


def read_graph(path: str | os.PathLike[str]) -> GraphSpec:
    p = Path(path)
    return read_graph_file(p / "graph.json" if p.is_dir() else p)


def _copy_entry(vdir: Path) -> None:
    shutil.copy2(GRAPH_ENTRY_FILE, vdir / "model.py")


def _float(name: str, width: int) -> dict[str, Any]:
    return {"name": name, "data_type": "TYPE_FP32", "dims": [-1, width]}


def _concat(name: str, widths: list[int], max_batch: int, options: Options) -> ModelEntry:
    config = {
        "name": name,
        "backend": "python",
        "max_batch_size": max_batch,
        "input": [_float(f"hidden_{k}", w) for k, w in enumerate(widths)],
        "output": [_float("hidden", sum(widths))],
        "instance_group": [{"kind": "KIND_CPU", "count": options.instances}],
        "parameters": _params(prism_kind="concat", widths=json.dumps(widths)),
    }
    return ModelEntry(name, "concat", config, _copy_entry)


def _logit_fusion(name: str, vocab: int, weights: list[float], max_batch: int, options: Options) -> ModelEntry:
    config = {
        "name": name,
        "backend": "python",
        "max_batch_size": max_batch,
        "input": [_float(f"logits_{k}", vocab) for k in range(len(weights))],
        "output": [_float("logits", vocab)],
        "instance_group": [{"kind": "KIND_CPU", "count": options.instances}],
        "parameters": _params(prism_kind="logit_fusion", weights=json.dumps([float(w) for w in weights])),
    }
    return ModelEntry(name, "logit_fusion", config, _copy_entry)


def _inspect(spec: GraphSpec, options: Options) -> dict[int, StageInfo]:
    infos: dict[int, StageInfo] = {}
    for n in spec.nodes:
        if n.stage is None:
            continue
        try:
            info = inspect_stage(
                n.stage.path,
                precision=n.stage.precision or options.precision,
                target=n.stage.target or options.target,
                engine_id=options.engine_id,
            )
        except PrismInputError as exc:
            raise PrismInputError(f"{spec.where()}: {n.label}: {exc}") from None
        want = "adapter" if n.kind == "adapter" else spec.roles[n.index]
        if info.kind != want:
            raise PrismInputError(
                f"{spec.where()}: {n.label}: {n.stage.path} is a {info.kind} stage; its place in "
                f"the graph makes it {want}"
            )
        infos[n.index] = info
    return infos


def _tensor_of(spec: GraphSpec, i: int) -> str:
    """The ensemble tensor stage ``i`` produces (the output's is ``logits``)."""
    n = spec.nodes[i]
    if i == spec.output.index:
        return "logits"
    out = "logits" if n.kind == "fusion" else output_name("adapter" if n.kind == "adapter" else spec.roles[i])
    return f"{n.name}__{out}"


def plan_graph(path: str | os.PathLike[str], options: Options) -> tuple[list[ModelEntry], dict[str, Any]]:
    """Every model of the graph's repository, rendered and checked; nothing is written."""
    if options.backend != "python":
        raise PrismInputError(
            f"{path}: a graph is served in the python form only (its concatenations, logit "
            "fusion and generate are Python models); drop --backend native"
        )
    if options.instances < 1:
        raise PrismInputError(f"--instances: {options.instances} must be at least 1")
    spec = read_graph(path)
    infos = _inspect(spec, options)
    for n in spec.nodes:
        if not MODEL_NAME.fullmatch(n.name) or n.name in RESERVED:
            raise PrismInputError(
                f"{spec.where()}: {n.label}: the name {n.name!r} cannot name a Triton model "
                f"(letters, digits, _ . -; not {', '.join(RESERVED)})"
            )
    max_batch = min(i.max_batch for i in infos.values())
    entries: dict[str, ModelEntry] = {}

    def add(entry: ModelEntry) -> None:
        if entry.name in entries:
            raise PrismInputError(
                f"{spec.where()}: two models of the repository would be named {entry.name!r}; rename a stage"
            )
        entries[entry.name] = entry

    steps: list[dict[str, Any]] = []
    for i in spec.order:
        n = spec.nodes[i]
        produced = _tensor_of(spec, i)
        if n.kind == "fusion":
            vocab = infos[n.inputs[0]].width_out
            add(_logit_fusion(n.name, vocab, list(n.weights), max_batch, options))
            steps.append(
                {
                    "model_name": n.name,
                    "model_version": -1,
                    "input_map": {f"logits_{k}": _tensor_of(spec, j) for k, j in enumerate(n.inputs)},
                    "output_map": {"logits": produced},
                }
            )
            continue
        info = infos[i]
        add(_python_stage(n.name, info, options))
        kind = info.kind
        names = input_names(kind)
        if kind == "first":
            source = "input_ids"
        elif len(n.inputs) == 1:
            source = _tensor_of(spec, n.inputs[0])
        else:  # a fusion adapter: its inputs side by side first
            concat = f"{n.name}_concat"
            add(_concat(concat, [infos[j].width_out for j in n.inputs], max_batch, options))
            source = f"{n.name}__concatenated"
            steps.append(
                {
                    "model_name": concat,
                    "model_version": -1,
                    "input_map": {f"hidden_{k}": _tensor_of(spec, j) for k, j in enumerate(n.inputs)},
                    "output_map": {"hidden": source},
                }
            )
        input_map = {names[0]: source, **({names[1]: "attention_mask"} if len(names) > 1 else {})}
        steps.append(
            {
                "model_name": n.name,
                "model_version": -1,
                "input_map": input_map,
                "output_map": {output_name(kind): produced},
            }
        )
    out = spec.output
    heads = list(zip(out.inputs, out.weights)) if out.kind == "fusion" else [(out.index, 1.0)]
    for h, _ in heads:
        add(_python_decode(f"{spec.nodes[h].name}_decode", infos[h], options))
    source_entry = entries[spec.source.name].config
    vocab = infos[heads[0][0]].width_out
    add(
        ModelEntry(
            ENSEMBLE,
            "ensemble",
            {
                "name": ENSEMBLE,
                "platform": "ensemble",
                "max_batch_size": max_batch,
                "input": [dict(t) for t in source_entry["input"]],
                "output": [_float("logits", vocab)],
                "ensemble_scheduling": {"step": steps},
            },
            lambda vdir: None,
        )
    )
    head_ids = {h for h, _ in heads}
    prefix = [
        s
        for s in steps
        if s["model_name"] not in {spec.nodes[h].name for h in head_ids}
        and s["model_name"] != (out.name if out.kind == "fusion" else None)
    ]
    add(_generate("generate", spec, infos, heads, prefix, options, decoupled=False))
    if options.stream:
        add(_generate("generate_stream", spec, infos, heads, prefix, options, decoupled=True))
    messages = {}
    for entry in entries.values():
        entry.text = cfg.render(entry.config)
        messages[entry.name] = cfg.parse_text(entry.text, f"model {entry.name!r}")
    cfg.check_repository(messages)
    versions = {i.onnxruntime for i in infos.values() if i.onnxruntime}
    if len(versions) > 1:
        raise PrismInputError(
            f"the stages were built with different ONNX Runtime versions ({', '.join(sorted(versions))}); "
            "one Python backend environment runs them all: rebuild them with one"
        )
    stage_models = [n.name for n in spec.nodes if n.stage is not None]
    manifest = {
        "format": repo_mod.REPO_FORMAT,
        "version": repo_mod.REPO_VERSION,
        "backend": options.backend,
        # the models whose neighbours fix their widths (triton update refuses a shape change there)
        "chain": stage_models,
        "graph": {
            "file": str(Path(spec.path).resolve()) if spec.path else None,
            "ensemble": ENSEMBLE,
            "stages": [
                {
                    "name": n.name,
                    "kind": n.kind,
                    "inputs": [spec.nodes[j].name for j in n.inputs],
                    **({"weights": list(n.weights)} if n.kind == "fusion" else {}),
                }
                for n in spec.nodes
            ],
        },
        "onnxruntime": versions.pop() if versions else None,
        "gpu": any(backend_for(i.target).gpu for i in infos.values()),
        "models": {e.name: repo_mod._record(e) for e in entries.values()},
    }
    return list(entries.values()), manifest


def _generate(
    name: str,
    spec: GraphSpec,
    infos: dict[int, StageInfo],
    heads: list[tuple[int, float]],
    prefix: list[dict[str, Any]],
    options: Options,
    decoupled: bool,
) -> ModelEntry:
    head_params = []
    embed_files: list[tuple[Path, str]] = []
    for k, (h, weight) in enumerate(heads):
        info = infos[h]
        assert info.model is not None
        embed = info.model["files"]["embed_tokens"]["name"]
        local = f"embed_{k}.npy"
        embed_files.append((info.source / embed, local))
        layers = int(info.model["dims"]["layers"])
        head_params.append(
            {
                "decode_model": f"{spec.nodes[h].name}_decode",
                "weight": float(weight),
                "embeds": _tensor_of(spec, spec.nodes[h].inputs[0]),
                "embed_tokens": local,
                "past_inputs": past_names(layers, "past_key_values"),
                "present_outputs": past_names(layers, "present"),
            }
        )

    def fill(vdir: Path) -> None:
        _copy_entry(vdir)
        for src, local in embed_files:
            repo_mod._link_or_copy(src, vdir / local)

    return repo_mod.generate_entry(
        name,
        "graph_generate",
        list(infos.values()),
        infos[spec.source.index],
        infos[heads[0][0]],
        options,
        decoupled,
        fill,
        lead={"steps": json.dumps(prefix), "heads": json.dumps(head_params)},
    )
