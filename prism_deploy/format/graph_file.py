"""The graph file: a chain file whose stages name their inputs (docs/graphs.md).

    [[stages]]
    name = "A"
    model = "exports/a"                      # the one source: a first model

    [[stages]]
    name = "a-b"
    adapter = "adapters/a-b.safetensors"     # no `inputs`: the stage listed before it (A)

    [[stages]]
    name = "B"
    model = "exports/b"

    [[stages]]
    name = "a-c"
    adapter = "adapters/a-c.safetensors"
    inputs = ["A"]                           # fan-out: A feeds a second adapter

    [[stages]]
    name = "C"
    model = "exports/c"

    [[stages]]
    name = "fuse"
    adapter = "adapters/bc-d.safetensors"    # fan-in: in_dim = width(B) + width(C), concatenated
    inputs = ["B", "C"]                      # in this order

    [[stages]]
    name = "D"
    model = "exports/d"                      # the last stage listed is the graph's output

A stage's ``inputs`` are stage names (or stage numbers from 1); without ``inputs`` a stage takes
the one listed before it, so every chain file is a graph as it is. Two fusions join branches:

- an **adapter with several inputs** (a fusion adapter): an ordinary PRISM adapter over the
  inputs' hidden states concatenated along the feature axis, in the order ``inputs`` lists them;
- a **logit fusion** stage, ``fusion = "logits"``, ``inputs`` = two or more last models that
  share one tokenizer, ``weights`` one per input: it gives ``sum_i w_i * log_softmax(logits_i)``,
  and greedy generation picks from that joint distribution, every branch fed the chosen token.

:func:`read_graph_file` checks the whole graph before anything is opened, and every refusal is
one line naming the stage and the edge: one source (a model), no cycles, every stage reaching the
output, roles along every edge (a model takes one adapter's output; an adapter takes models'
hidden states; a logit fusion takes last models, and is the output), and where the files tell
(``model.json`` of a model folder, the header of an adapter ``.safetensors``): the model roles
the positions ask for, widths along every edge (a fusion adapter's ``in_dim`` is the sum), and
one vocabulary and one tokenizer for a logit fusion's inputs.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.fsutil import file_sha256
from prism_deploy.format import chain_file
from prism_deploy.format.chain_file import ChainSpec, StageSpec

FUSIONS = ("logits",)
# The files that make up a Hugging Face tokenizer: two folders whose present ones hash alike
# tokenize alike.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "tokenizer_config.json")

_INPUTS = {"type": "array", "items": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "integer", "minimum": 1}]}}


def _graph_schema() -> dict[str, Any]:
    schema = copy.deepcopy(chain_file.SCHEMA)
    stages = schema["properties"]["stages"]
    stages["minItems"] = 3
    model, adapter = stages["items"]["oneOf"]
    model["properties"].update(inputs=_INPUTS, tokenizer=chain_file._PATH)
    adapter["properties"].update(inputs=_INPUTS)
    stages["items"]["oneOf"].append(
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["fusion", "inputs", "weights"],
            "properties": {
                "fusion": {"enum": list(FUSIONS)},
                "inputs": {**_INPUTS, "minItems": 2},
                "weights": {"type": "array", "minItems": 2, "items": {"type": "number", "exclusiveMinimum": 0}},
                "name": {"type": "string", "minLength": 1},
            },
        }
    )
    schema["properties"]["built_by"] = {"enum": [chain_file.BUILT_BY, BUILT_BY]}
    return schema


BUILT_BY = "prism-deploy build --graph"
SCHEMA = _graph_schema()


@dataclass
class GraphNode:
    """One stage of a graph: a model, an adapter (a fusion adapter with several inputs), or a
    logit fusion (``stage`` None). ``inputs``: the indices of the stages it takes, in order."""

    index: int
    kind: str  # "model", "adapter" or "fusion"
    name: str
    inputs: list[int]
    stage: StageSpec | None = None
    weights: list[float] = field(default_factory=list)
    tokenizer: Path | None = None  # a model's tokenizer folder (default: its hf folder)

    @property
    def label(self) -> str:
        return f"stage {self.index + 1} ({self.kind} {self.name})"


@dataclass
class GraphSpec:
    path: Path | None
    nodes: list[GraphNode]
    name: str | None = None
    target: str | None = None
    tokenizers: dict[str, Path] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)  # a topological order, stable in file order
    roles: dict[int, str] = field(default_factory=dict)  # each model's role by its place

    @property
    def output(self) -> GraphNode:
        return self.nodes[-1]

    @property
    def stages(self) -> list[StageSpec]:
        """The model and adapter stages (fusion nodes have none), in file order."""
        return [n.stage for n in self.nodes if n.stage is not None]

    @property
    def source(self) -> GraphNode:
        return self.nodes[0]

    def consumers(self, i: int) -> list[int]:
        return [n.index for n in self.nodes if i in n.inputs]

    def where(self) -> str:
        return str(self.path) if self.path is not None else "graph"

    def edge(self, node: GraphNode) -> str:
        """How errors name the edge into ``node``: ``B + C -> fuse``."""
        return " + ".join(self.nodes[i].name for i in node.inputs) + f" -> {node.name}" if node.inputs else node.name

    def is_chain(self) -> bool:
        return all(n.kind != "fusion" and n.inputs == ([n.index - 1] if n.index else []) for n in self.nodes)

    def as_chain(self) -> ChainSpec:
        """The chain this graph is (only when :meth:`is_chain`)."""
        return ChainSpec(
            self.path,
            [n.stage for n in self.nodes if n.stage is not None],
            self.name,
            self.target,
            dict(self.tokenizers),
        )


def read_graph_file(path: str | os.PathLike[str]) -> GraphSpec:
    """Parse and validate a graph file (a chain file is one): TOML or JSON, by its suffix."""
    p = Path(path)
    obj = chain_file.parse_file(p, "graph file")
    return graph_from_object(obj, p)


def graph_from_object(obj: Any, path: Path | None = None) -> GraphSpec:
    import jsonschema

    where = str(path) if path is not None else "graph"
    try:
        jsonschema.validate(obj, SCHEMA)
    except jsonschema.ValidationError as exc:
        raise PrismInputError(f"{where}: {_describe_error(exc)}") from None
    raw_stages = obj["stages"]
    # the stages, read as a chain file reads them (paths resolved, names defaulted)
    plain = [{k: v for k, v in s.items() if k not in ("inputs", "tokenizer")} for s in raw_stages]
    parsed = chain_file.stages_from_object(plain, path, alternate=False)
    base = path.parent if path is not None else Path(".")
    nodes = []
    for i, (raw, st) in enumerate(zip(raw_stages, parsed)):
        if st is None:
            nodes.append(
                GraphNode(
                    i,
                    "fusion",
                    str(raw.get("name") or f"fusion_{i + 1}"),
                    [],
                    weights=[float(w) for w in raw["weights"]],
                )
            )
        else:
            tok = raw.get("tokenizer")
            nodes.append(
                GraphNode(i, st.kind, st.name, [], st, tokenizer=(base / os.path.expanduser(tok)) if tok else st.hf)
            )
    by_name: dict[str, int] = {}
    named_inputs = any("inputs" in s for s in raw_stages)
    for n in nodes:
        if named_inputs and n.name in by_name:
            raise PrismInputError(
                f"{where}: {n.label}: the name {n.name!r} is also stage {by_name[n.name] + 1}'s; "
                "stages that inputs name need names of their own"
            )
        by_name.setdefault(n.name, n.index)
    for n, raw in zip(nodes, raw_stages):
        if "inputs" not in raw:
            n.inputs = [n.index - 1] if n.index else []
            continue
        for ref in raw["inputs"]:
            j = (ref - 1) if isinstance(ref, int) else by_name.get(ref)
            if j is None or not 0 <= j < len(nodes):
                raise PrismInputError(f"{where}: {n.label}: input {ref!r} is no stage's name or number")
            if j == n.index:
                raise PrismInputError(
                    f"{where}: {n.label}: edge {n.name} -> {n.name}: a stage cannot take its own output"
                )
            if j in n.inputs:
                raise PrismInputError(f"{where}: {n.label}: input {ref!r} is named twice")
            n.inputs.append(j)
    spec = GraphSpec(
        path,
        nodes,
        obj.get("name"),
        obj.get("target"),
        {k: base / os.path.expanduser(v) for k, v in obj.get("tokenizers", {}).items()},
    )
    check_structure(spec)
    check_files(spec)
    return spec


def check_structure(spec: GraphSpec) -> None:
    """One source, no cycle, every stage reaching the output, roles along every edge."""
    where, nodes = spec.where(), spec.nodes
    sources = [n for n in nodes if not n.inputs]
    if len(sources) > 1:
        raise PrismInputError(
            f"{where}: {sources[0].label} and {sources[1].label} both take no input; a graph has one source"
        )
    cycle = _find_cycle(nodes)
    if cycle:
        path = " -> ".join(nodes[i].name for i in cycle)
        raise PrismInputError(f"{where}: {nodes[cycle[0]].label}: a cycle through the edges {path}")
    if not sources:  # pragma: no cover - an acyclic graph has a source
        raise PrismInputError(f"{where}: no stage without inputs; a graph has one source")
    if sources[0].index != 0:
        raise PrismInputError(f"{where}: {sources[0].label} takes no input: the source is listed first")
    spec.order = _topological(nodes)
    out = spec.output
    feeds_output = {out.index}
    for i in reversed(spec.order):
        if i in feeds_output:
            feeds_output.update(nodes[i].inputs)
    for n in nodes:
        if n.index not in feeds_output:
            raise PrismInputError(
                f"{where}: {n.label}: unreachable from the output: no path of edges leads from it to "
                f"{out.label}, the graph's output (the stage listed last)"
            )
    if nodes[0].kind != "model":
        raise PrismInputError(f"{where}: {nodes[0].label}: the source is a model (token ids in)")
    if out.kind == "adapter":
        raise PrismInputError(f"{where}: {out.label}: the output (the stage listed last) is a model or a logit fusion")
    for n in nodes:
        if n.index == 0:
            continue
        kinds = [nodes[i].kind for i in n.inputs]
        edge = f"edge {spec.edge(n)}"
        if n.kind == "model":
            if len(n.inputs) != 1 or kinds[0] != "adapter":
                raise PrismInputError(f"{where}: {n.label}: {edge}: a model takes exactly one adapter's output")
        elif n.kind == "adapter":
            if any(k != "model" for k in kinds):
                raise PrismInputError(f"{where}: {n.label}: {edge}: an adapter takes models' hidden states")
        else:
            if any(k != "model" for k in kinds):
                raise PrismInputError(f"{where}: {n.label}: {edge}: a logit fusion takes last models' logits")
            if len(n.weights) != len(n.inputs):
                raise PrismInputError(f"{where}: {n.label}: {len(n.weights)} weights for {len(n.inputs)} inputs")
            if n.index != out.index:
                raise PrismInputError(f"{where}: {n.label}: a logit fusion gives the output; list it last")
        for i in n.inputs:
            after = [nodes[j] for j in spec.consumers(i)]
            if nodes[i].kind == "model" and any(c.kind == "fusion" for c in after) and len(after) > 1:
                raise PrismInputError(
                    f"{where}: {nodes[i].label}: edge {nodes[i].name} -> "
                    f"{', '.join(c.name for c in after)}: a model feeding a logit fusion is a last "
                    "model and feeds nothing else"
                )
    for n in nodes:
        if n.kind == "model":
            after = [nodes[j] for j in spec.consumers(n.index)]
            spec.roles[n.index] = (
                "first" if n.index == 0 else "middle" if any(c.kind == "adapter" for c in after) else "last"
            )


def _find_cycle(nodes: list[GraphNode]) -> list[int]:
    """A cycle as stage indices along its edges (first repeated at the end), or []."""
    state: dict[int, int] = {}  # 1: on the path, 2: done
    stack: list[int] = []

    def visit(i: int) -> list[int]:
        state[i] = 1
        stack.append(i)
        for j in [n.index for n in nodes if i in n.inputs]:
            if state.get(j) == 1:
                return stack[stack.index(j) :] + [j]
            if j not in state:
                found = visit(j)
                if found:
                    return found
        stack.pop()
        state[i] = 2
        return []

    for n in nodes:
        if n.index not in state:
            found = visit(n.index)
            if found:
                return found
    return []


def _topological(nodes: list[GraphNode]) -> list[int]:
    """Kahn's order, ties in file order."""
    done: list[int] = []
    seen: set[int] = set()
    while len(done) < len(nodes):
        ready = [n.index for n in nodes if n.index not in seen and all(i in seen for i in n.inputs)]
        done.append(ready[0])
        seen.add(ready[0])
    return done


def levels(spec: GraphSpec) -> list[list[int]]:
    """The stages in waves: each wave's stages take only earlier waves' outputs, so the stages
    of one wave may run at the same time."""
    depth: dict[int, int] = {}
    for i in spec.order:
        depth[i] = 1 + max((depth[j] for j in spec.nodes[i].inputs), default=-1)
    return [[i for i in spec.order if depth[i] == d] for d in range(max(depth.values()) + 1)]


# ---- what the files tell --------------------------------------------------------------------------


def _model_dims(node: GraphNode) -> dict[str, Any] | None:
    """A model folder's ``model.json`` (role and dims), None when it cannot be read here (the
    runtime says why when it opens the folder)."""
    from prism_deploy.format import model_folder

    assert node.stage is not None
    try:
        return model_folder.read_model_json(node.stage.path)
    except (PrismInputError, OSError):
        return None


def _adapter_dims(node: GraphNode) -> tuple[int, int] | None:
    """An adapter ``.safetensors``' (in_dim, out_dim) from its header; None for other forms."""
    from prism_deploy.format.adapter_file import read_adapter_config

    assert node.stage is not None
    if node.stage.path.suffix != ".safetensors" or not node.stage.path.is_file():
        return None
    try:
        config = read_adapter_config(node.stage.path)
    except (PrismInputError, OSError):
        return None
    return int(config.in_dim), int(config.out_dim)


def tokenizer_digest(folder: Path) -> dict[str, str]:
    """The sha256 of each tokenizer file present in ``folder``."""
    return {f: file_sha256(folder / f) for f in TOKENIZER_FILES if (folder / f).is_file()}


def check_files(spec: GraphSpec) -> None:
    """Roles, widths and (for a logit fusion) vocabularies and tokenizers, where files tell."""
    where, nodes = spec.where(), spec.nodes
    models = {n.index: _model_dims(n) for n in nodes if n.kind == "model"}
    for i, m in models.items():
        if m is not None and m["role"] != spec.roles[i]:
            raise PrismInputError(
                f"{where}: {nodes[i].label}: exported as role {m['role']!r}; its place in the graph "
                f"needs a {spec.roles[i]!r} model"
            )
    for n in nodes:
        if n.kind == "adapter":
            dims = _adapter_dims(n)
            if dims is None:
                continue
            known = [models[i] for i in n.inputs]
            widths = [int(m["dims"]["hidden"]) for m in known if m is not None]
            if len(widths) == len(known) and dims[0] != sum(widths):
                said = " + ".join(map(str, widths)) + (f" = {sum(widths)}" if len(widths) > 1 else "")
                raise PrismInputError(
                    f"{where}: {n.label}: edge {spec.edge(n)}: in_dim {dims[0]} does not match the "
                    f"hidden width{'s' if len(widths) > 1 else ''} {said}"
                )
            for j in spec.consumers(n.index):
                m = models.get(j)
                if m is not None and dims[1] != m["dims"]["hidden"]:
                    raise PrismInputError(
                        f"{where}: {n.label}: edge {n.name} -> {nodes[j].name}: out_dim {dims[1]} "
                        f"does not match the embedding width {m['dims']['hidden']} of {nodes[j].label}"
                    )
        elif n.kind == "fusion":
            toks = [(nodes[i], nodes[i].tokenizer) for i in n.inputs]
            missing = [node.name for node, t in toks if t is None]
            if missing:
                raise PrismInputError(
                    f"{where}: {n.label}: edge {spec.edge(n)}: a logit fusion needs each input's "
                    f"tokenizer (`hf` or `tokenizer` on {', '.join(missing)})"
                )
            first_node, first_tok = toks[0]
            want = tokenizer_digest(first_tok)  # type: ignore[arg-type]
            for other, t in toks[1:]:
                if tokenizer_digest(t) != want or not want:  # type: ignore[arg-type]
                    raise PrismInputError(
                        f"{where}: {n.label}: edge {spec.edge(n)}: {other.name}'s tokenizer ({t}) is not "
                        f"{first_node.name}'s ({first_tok}); logit fusion needs one shared tokenizer"
                    )
            vocabs = {nodes[i].name: m["dims"]["vocab"] for i in n.inputs if (m := models[i]) is not None}
            if len(set(vocabs.values())) > 1:
                raise PrismInputError(
                    f"{where}: {n.label}: edge {spec.edge(n)}: a logit fusion joins one vocabulary, "
                    f"got {', '.join(f'{k} {v}' for k, v in vocabs.items())}"
                )


def graph_to_object(spec: GraphSpec, stages: list[dict[str, Any]], built: bool = False) -> dict[str, Any]:
    """The graph file's JSON form with ``stages`` (each a chain stage's object, in node order,
    None for a fusion) given their inputs by name."""
    out_stages = []
    for n, item in zip(spec.nodes, stages):
        if n.kind == "fusion":
            item = {"fusion": "logits", "weights": list(n.weights), "name": n.name}
        item = {**item, "name": n.name, "inputs": [spec.nodes[i].name for i in n.inputs]}
        if n.index == 0:
            item.pop("inputs")
        out_stages.append(item)
    obj: dict[str, Any] = {"schema": chain_file.SCHEMA_NAME, "schema_version": chain_file.SCHEMA_VERSION}
    if built:
        obj["built_by"] = BUILT_BY
    if spec.name:
        obj["name"] = spec.name
    if spec.target:
        obj["target"] = spec.target
    obj["stages"] = out_stages
    return obj


def _describe_error(exc: Any) -> str:
    if exc.validator == "oneOf" and isinstance(exc.instance, dict) and "fusion" in exc.instance:
        import jsonschema

        inner = next(iter(jsonschema.Draft202012Validator(exc.schema["oneOf"][2]).iter_errors(exc.instance)), None)
        parts = list(exc.absolute_path)
        field = ".".join(str(p) for p in parts) + (f" (stage {parts[1] + 1})" if len(parts) >= 2 else "")
        if inner is not None:
            sub = ".".join(str(p) for p in inner.absolute_path)
            return f"{field}{'.' + sub if sub else ''}: {inner.message}"
    return chain_file._describe_error(exc)
