"""``build --graph FILE -o OUT``: every stage of a graph built once into ``OUT``, and ``OUT/graph.json``.

Stages are built as ``build --chain`` builds them (:func:`~prism_deploy.builder.chain_source.build_stage`),
each into ``OUT/<n>-<name>/``, except that a source several stages share (the same file or
folder, kind, precision and target: one last model behind two branches of a logit fusion) is
built once, into the folder of the first stage that names it, and every stage naming it uses
that folder. ``OUT/graph.json`` is the graph file with the built folders, each with its sha256,
the same inputs and fusions; it is written (atomically) only when every stage built.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prism_deploy.builder.chain_source import ChainBuildResult, build_stage, check_chain_out_dir, stage_folder_name
from prism_deploy.builder.loop import BuildResult, EngineCheck, check_out_dir
from prism_deploy.builder.options import Profile
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.fsutil import write_text_atomic
from prism_deploy.format.chain_file import ChainSpec, chain_to_object, stage_digest
from prism_deploy.format.engine_manifest import MANIFEST_NAME
from prism_deploy.format.graph_file import BUILT_BY, GraphSpec, graph_to_object

GRAPH_FILE = "graph.json"


@dataclass
class GraphBuildRequest:
    spec: GraphSpec
    out_dir: Path
    target: str | None = None
    profile: Profile = field(default_factory=Profile)
    force: bool = False
    progress: bool = False


def build_graph(
    request: GraphBuildRequest,
    adapter_check: Callable[[Path], EngineCheck] | None = None,
    model_check: Callable[[Path], EngineCheck] | None = None,
    log: Callable[[str], None] | None = None,
) -> ChainBuildResult:
    """Build every stage once (see the module docstring); the result's ``chain_file`` is
    ``OUT/graph.json`` (None when a stage failed)."""
    spec, out = request.spec, Path(request.out_dir)
    check_out_dir(out)
    check_chain_out_dir(out, spec, request.force, GRAPH_FILE, BUILT_BY)
    stages = [n.stage for n in spec.nodes if n.stage is not None]
    for s in stages:
        if s.kind == "adapter" and s.path.is_file() and s.path.suffix != ".safetensors":
            raise PrismInputError(
                f"{spec.where()}: {s.label}: {s.path}: build --graph builds an adapter from its "
                ".safetensors (or uses a build folder as it is), not from a .onnx"
            )
    results: list[tuple[str, BuildResult | None]] = []
    built: dict[tuple[str, str, str | None, str], Path] = {}
    paths: dict[int, Path] = {}
    for s in stages:
        target = request.target or s.target or spec.target or "auto"
        if s.path.is_dir() and (s.path / MANIFEST_NAME).is_file():
            results.append((s.label, None))
            paths[s.index] = s.path
            continue
        key = (str(s.path.resolve()), s.kind, s.precision, target)
        if key in built:  # shared: built once already
            paths[s.index] = built[key]
            continue
        folder = out / stage_folder_name(s.index, s.name)
        results.append(
            (s.label, build_stage(spec.where(), s, folder, target, request, adapter_check, model_check, log))
        )
        built[key] = paths[s.index] = folder
    if any(r is not None and r.failed for _, r in results):
        return ChainBuildResult(out, results, None)
    built_stages = []
    for s in stages:
        path = paths[s.index]
        reference = (
            s.reference if s.reference is not None else (s.path if s.kind == "adapter" and s.path.is_file() else None)
        )
        built_stages.append(replace(s, path=path, sha256=stage_digest(path), reference=reference))
    items = iter(chain_to_object(ChainSpec(spec.path, built_stages), out)["stages"])
    objects: list[dict[str, Any]] = []
    for n in spec.nodes:
        item: dict[str, Any] = {} if n.stage is None else next(items)
        if n.kind == "model" and n.tokenizer is not None and n.tokenizer != n.stage.hf:  # type: ignore[union-attr]
            item["tokenizer"] = str(n.tokenizer.resolve())
        objects.append(item)
    obj = graph_to_object(spec, objects, built=True)
    if spec.tokenizers:
        obj["tokenizers"] = {k: str(v.resolve()) for k, v in spec.tokenizers.items()}
    graph_file = out / GRAPH_FILE
    text = json.dumps(obj, indent=2) + "\n"
    if not graph_file.is_file() or graph_file.read_text(encoding="utf-8") != text:
        write_text_atomic(graph_file, text)
    return ChainBuildResult(out, results, graph_file)
