"""Fuse each gated pipe of an exported graph into one ``prism::tile_dispatch`` node.

The lowering (``prism_deploy.lower``) computes a gated pipe with standard ops: gate
MatMul+Add (float32 scores) -> TopK -> Softmax -> Mul -> ScatterElements -> a grouped batched
MatMul over every tile, masked by the gates. This pass keeps the gate's MatMul+Add and replaces
everything from the scores to the pipe's output by one node that reads only the selected tiles
(plugins/tile_dispatch). It relies only on the lowering's metadata contract
(``model.metadata_props["prism.lowering"]``): the names of ``hidden_2d``, each pipe's
``scores``, ``output``, ``tiles`` and ``scales``, and its ``node_prefix``.

The node: op type ``tile_dispatch``, domain ``prism``; inputs ``hidden [T, in_dim]`` (compute
dtype), ``scores [T, R*C]`` float32, ``tiles [R*C, tr, tc]`` (the tile initializer itself,
its dims rewritten: the same storage), ``scales`` (``[R*C, tr]`` float32 for int8 tiles, a
one-element 1.0 otherwise); attributes R, C, tr, tc, top_k, gate_scale, out_dim, plus
``plugin_namespace="prism"`` and ``aot=1`` for TensorRT's ONNX parser (which finds a Quickly
Deployable Plugin by op type + namespace and picks its AOT implementation with ``aot``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from prism_deploy.core.errors import PrismInputError
from prism_deploy.lower.contract import read_metadata

FUSION_KEY = "prism.fusion"
DOMAIN = "prism"
OP_TYPE = "tile_dispatch"
FUSION_VERSION = 1


def lowering_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """The lowering's contract (``prism_deploy.lower.contract``), its errors said as the pass's."""
    try:
        return read_metadata(model)
    except PrismInputError as exc:
        raise PrismInputError(f"fuse: {exc}") from None


def is_fused(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds ``prism::tile_dispatch`` nodes (ONNX Runtime needs the twin for it)."""
    return any(n.op_type == OP_TYPE and n.domain == DOMAIN for n in model.graph.node)


def fuse_gated_pipes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new model in which every gated pipe is one ``prism::tile_dispatch`` node.

    Ungated pipes, the gate MatMul+Add, the combine and the I/O are left as they are. A model
    without gated pipes comes back unchanged (a copy). ``int8-qdq`` models are refused: the
    kernel takes int8 weights with float activations, so fusing would silently drop the
    activation quantization the graph asks for.
    """
    import onnx_graphsurgeon as gs

    meta = lowering_metadata(model)
    if is_fused(model):
        raise PrismInputError(
            f"fuse: the model is already fused (it has {DOMAIN}::{OP_TYPE} nodes): "
            "fuse the graph prism-deploy export wrote"
        )
    if meta["precision"].quantizes_activations:  # a Precision: read_metadata parsed it
        raise PrismInputError(
            "fuse: precision int8-qdq is not supported by the tile_dispatch plugin: it quantizes activations "
            "too, which the kernel (int8 weights, float activations) does not do; export with --precision int8"
        )
    gated = [p for p in meta["pipes"] if p.get("gated")]
    if not gated:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out

    # onnx-graphsurgeon keeps the weights as references to ``model``'s TensorProtos (LazyValues)
    # and the export copies each once: one extra copy of the weights at the peak, and ``model``
    # itself is left as it was.
    opsets = [onnx.helper.make_opsetid(o.domain, o.version) for o in model.opset_import]
    graph = gs.import_onnx(model)
    graph.cleanup()  # baseline: nodes already dead before the rewrite are not ours to explain
    tensors = graph.tensors()
    before = {n.name for n in graph.nodes}
    fused: list[dict[str, Any]] = []
    reshaped: dict[str, list[int]] = {}
    for pipe in gated:
        fused.append(_fuse_one(graph, tensors, meta, pipe, reshaped))
    graph.cleanup().toposort()

    kept_gate = set()
    for pipe in gated:
        kept_gate |= {f"{pipe['node_prefix']}gate/MatMul", f"{pipe['node_prefix']}gate/Add"}
    removed = before - {n.name for n in graph.nodes}
    strays = sorted(n for n in removed if not any(n.startswith(p["node_prefix"]) for p in gated))
    if strays:
        raise PrismInputError(f"fuse: the rewrite would remove nodes outside the gated pipes: {', '.join(strays[:5])}")
    lost = sorted(kept_gate & removed)
    if lost:
        raise PrismInputError(f"fuse: the gate nodes {', '.join(lost)} do not feed the pipe's scores")

    result = gs.export_onnx(graph, do_type_check=True)
    # the exporter appends the new domain to the imported model's own opset list: put it back
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    _restore_model_fields(model, result)
    for init in result.graph.initializer:
        if init.name in reshaped:
            del init.dims[:]
            init.dims.extend(reshaped[init.name])
    onnx.helper.set_model_props(
        result,
        {
            **{p.key: p.value for p in model.metadata_props},
            FUSION_KEY: json.dumps(
                {"version": FUSION_VERSION, "op": f"{DOMAIN}::{OP_TYPE}", "pipes": fused}, sort_keys=True
            ),
        },
    )
    return result


def _fuse_one(
    graph: Any, tensors: dict[str, Any], meta: dict[str, Any], pipe: dict[str, Any], reshaped: dict[str, list[int]]
) -> dict[str, Any]:
    import onnx_graphsurgeon as gs

    where = f"gated pipe {pipe['index']} ({pipe['name']})"

    def tensor(name: str, what: str) -> Any:
        if name not in tensors:
            raise PrismInputError(f"fuse: {where}: {what} tensor {name!r} is not in the graph")
        return tensors[name]

    R, C, tr, tc = (int(pipe[k]) for k in ("R", "C", "tr", "tc"))
    W = R * C
    hidden = tensor(meta["hidden_2d"], "hidden_2d")
    scores = tensor(pipe["scores"], "scores")
    output = tensor(pipe["output"], "output")
    tiles = tensor(pipe["tiles"], "tiles")
    if not isinstance(tiles, gs.Constant):
        raise PrismInputError(f"fuse: {where}: tiles {pipe['tiles']!r} is not an initializer")
    if int(np.prod(tiles.shape)) != W * tr * tc:
        raise PrismInputError(f"fuse: {where}: tiles {pipe['tiles']!r} has shape {tiles.shape}, not R*C*tr*tc elements")
    tile_dtype = np.dtype(tiles.dtype)
    if tile_dtype == np.int8:
        if pipe.get("scales") is None:
            raise PrismInputError(f"fuse: {where}: int8 tiles without scales")
        scales = tensor(pipe["scales"], "scales")
        if not isinstance(scales, gs.Constant) or int(np.prod(scales.shape)) != W * tr:
            raise PrismInputError(f"fuse: {where}: scales {pipe['scales']!r} must be an initializer of R*C*tr elements")
        if np.dtype(scales.dtype) != np.float32:
            raise PrismInputError(f"fuse: {where}: scales {pipe['scales']!r} must be float32, got {scales.dtype}")
        reshaped[scales.name] = [W, tr]
    elif tile_dtype in (np.float32, np.float16):
        scales = gs.Constant(f"{pipe['node_prefix']}tile_dispatch/unit_scale", np.ones(1, np.float32))
    else:
        raise PrismInputError(f"fuse: {where}: tiles dtype {tile_dtype} is not float32, float16 or int8")
    reshaped[tiles.name] = [W, tr, tc]

    attrs = {
        "R": R,
        "C": C,
        "tr": tr,
        "tc": tc,
        "top_k": int(pipe["top_k"]),
        "gate_scale": float(pipe["gate_scale"]),
        "out_dim": int(meta["out_dim"]),
        "plugin_namespace": DOMAIN,
        "aot": 1,
    }
    output.inputs.clear()  # detach the masked subgraph; cleanup() drops what no longer feeds anything
    node = gs.Node(
        op=OP_TYPE,
        name=f"{pipe['node_prefix']}tile_dispatch",
        domain=DOMAIN,
        attrs=attrs,
        inputs=[hidden, scores, tiles, scales],
        outputs=[output],
    )
    graph.nodes.append(node)
    return {
        "index": pipe["index"],
        "name": pipe["name"],
        "node": node.name,
        "tile_dtype": tile_dtype.name,
        "attributes": {k: attrs[k] for k in ("R", "C", "tr", "tc", "top_k", "gate_scale", "out_dim")},
    }


def _restore_model_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """Keep the exporter's IR version, opsets, producer and doc; add the ``prism`` domain."""
    from prism_deploy.core.onnx_io import finalize

    dst.ir_version = src.ir_version
    del dst.opset_import[:]
    dst.opset_import.extend(src.opset_import)
    if not any(o.domain == DOMAIN for o in dst.opset_import):
        dst.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    dst.producer_name, dst.producer_version, dst.doc_string = src.producer_name, src.producer_version, src.doc_string
    dst.graph.name = src.graph.name
    finalize(dst)


def fuse_onnx_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an exported model (with its external data), fuse it, save it atomically.

    Returns a summary: paths written, node counts before and after, and the fused pipes.
    """
    from prism_deploy.core.onnx_io import save_model

    path = Path(src)
    if not path.is_file():
        raise PrismInputError(f"{src}: no such ONNX file")
    try:
        model = onnx.load_model(str(path), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError and friends for non-ONNX input
        raise PrismInputError(f"{src}: not a readable ONNX model ({type(exc).__name__})") from exc
    nodes_before = len(model.graph.node)
    try:
        fused = fuse_gated_pipes(model)
    except PrismInputError as exc:  # "fuse: ..." said of the user's file
        raise PrismInputError(f"{src}: {str(exc).removeprefix('fuse: ')}") from None
    del model
    info = json.loads(next((p.value for p in fused.metadata_props if p.key == FUSION_KEY), '{"pipes": []}'))
    nodes_after = len(fused.graph.node)
    written = save_model(fused, dst)
    return {
        "paths": [str(p) for p in written],
        "nodes_before": nodes_before,
        "nodes_after": nodes_after,
        "fused_pipes": info["pipes"],
    }


def export_fused(adapter: Any, path: str | os.PathLike[str], *, progress: bool = False, **export_options: Any) -> Any:
    """``prism-deploy export --plugin`` as a function: lower (``prism_deploy.lower.build_model``),
    fuse, save atomically. ``export_options`` are build_model's (precision, io_dtype, calib, ...);
    ``progress`` shows a tqdm bar on stderr when it is a terminal. Returns the lowering's
    ``ExportResult`` for the fused file; its metadata gains ``fused`` (the fused pipes, as in the
    ``prism.fusion`` model property).
    """
    import sys

    from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

    from prism_deploy.core.onnx_io import save_model
    from prism_deploy.format import adapter_arrays
    from prism_deploy.lower import DEFAULT_GATED_FORM, ExportResult, build_model

    adapter = adapter_arrays(adapter)
    with tqdm(
        total=adapter.config.num_pipes + 2,
        desc="export --plugin",
        unit="step",
        disable=None if progress else True,
        file=sys.stderr,
        leave=False,
    ) as bar:
        model = build_model(adapter, _on_pipe=bar.update, **export_options)
        bar.set_postfix_str("fusing")
        fused = fuse_gated_pipes(model)
        del model
        bar.update(1)
        metadata = read_metadata(fused)
        metadata["fused"] = json.loads(
            next((p.value for p in fused.metadata_props if p.key == FUSION_KEY), '{"pipes": []}')
        )["pipes"]
        node_count = len(fused.graph.node)
        bar.set_postfix_str("saving")
        written = save_model(fused, path)
        bar.update(1)
    return ExportResult(
        paths=[str(p) for p in written],
        bytes=sum(p.stat().st_size for p in written),
        node_count=node_count,
        precision=metadata["precision"],  # what the lowering wrote, parsed by read_metadata
        io_dtype=export_options.get("io_dtype", "float32"),
        gated_form=export_options.get("gated_form", DEFAULT_GATED_FORM),
        metadata=metadata,
    )
