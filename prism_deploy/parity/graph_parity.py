"""Parity of a graph (docs/graphs.md): end to end, every stage on the reference's own inputs, and
bisection to the stage and edge that broke it.

The reference graph runs in float32 PyTorch as the reference chain does
(:mod:`prism_deploy.parity.chain_parity`): each model in ``transformers`` by its role, each adapter
(a fusion adapter too, on its inputs concatenated) through ``PrismAdapter.forward``, a logit
fusion as the weighted sum of its inputs' log-softmax. Per stage, the deployed stage takes the
reference's outputs of the stages that feed it, so each edge's error is charged to the stage at
its end. Bisect: the first failing stage in topological order, named with its edge; inside an
adapter the pipe and worker most to blame; inside a last model the graph (prefill or decoding).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from prism_deploy.core import defaults, tolerances
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.metrics import compare, compare_logits
from prism_deploy.core.precision import loosest
from prism_deploy.format.graph_file import GraphSpec
from prism_deploy.models import hf
from prism_deploy.parity.chain_parity import blamed_graph, last_model_graphs
from prism_deploy.runtime.graph import fuse_logits


class ReferenceGraph:
    """The float32 PyTorch graph: transformers models (each stage's ``hf``) and reference
    adapters (each stage's ``reference``, else its ``.safetensors``)."""

    def __init__(self, spec: GraphSpec, models: dict[int, Any] | None = None, adapters: dict[int, Any] | None = None):
        from prism_deploy.reference import PrismAdapter, load_adapter

        self.spec = spec
        self.models: dict[int, Any] = {}
        self.adapters: dict[int, Any] = {}
        for n in spec.nodes:
            given = (models or {}).get(n.index) if n.kind == "model" else (adapters or {}).get(n.index)
            if given is not None:
                (self.models if n.kind == "model" else self.adapters)[n.index] = given
                continue
            if n.kind == "model":
                assert n.stage is not None
                if n.stage.hf is None:
                    raise PrismInputError(f"{spec.where()}: {n.label}: no `hf` folder, the reference parity needs")
                # only a last model's head is used (an encoder such as MiniLM has none in its checkpoint)
                self.models[n.index] = hf.load_causal_lm(n.stage.hf, uses_head=spec.roles[n.index] == "last")
            elif n.kind == "adapter":
                assert n.stage is not None
                ref = n.stage.reference or n.stage.path
                if ref.suffix != ".safetensors":
                    raise PrismInputError(
                        f'{spec.where()}: {n.label}: give `reference = "<adapter>.safetensors"` for parity'
                    )
                self.adapters[n.index] = load_adapter(ref)
        for i, a in self.adapters.items():
            if not isinstance(a, PrismAdapter):
                self.adapters[i] = load_adapter(a)

    def stage(self, i: int, inputs: list[Any], mask: np.ndarray) -> np.ndarray:
        """Stage ``i`` on its inputs (ids for the source)."""
        n = self.spec.nodes[i]
        m = torch.from_numpy(np.asarray(mask, dtype=np.int64))
        with torch.no_grad():
            if n.kind == "fusion":
                return fuse_logits([np.asarray(v, np.float32) for v in inputs], n.weights)
            if n.kind == "adapter":
                x = np.concatenate([np.asarray(v, np.float32) for v in inputs], axis=-1)
                return self.adapters[i](torch.from_numpy(x)).float().numpy()
            model, role = self.models[i], self.spec.roles[i]
            if role == "first":
                return hf.final_hidden(model, torch.from_numpy(np.asarray(inputs[0], np.int64)), m).float().numpy()
            embeds = torch.from_numpy(np.asarray(inputs[0], np.float32))
            if role == "last":
                logits, _ = hf.causal_lm_forward(model, inputs_embeds=embeds, attention_mask=m)
                return logits.float().numpy()
            return hf.final_hidden(model, None, m, inputs_embeds=embeds).float().numpy()

    def outputs(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for i in self.spec.order:
            given = [ids] if i == 0 else [out[j] for j in self.spec.nodes[i].inputs]
            out[i] = self.stage(i, given, mask)
        return [out[i] for i in range(len(self.spec.nodes))]

    def heads(self) -> list[tuple[int, float]]:
        out = self.spec.output
        return list(zip(out.inputs, out.weights)) if out.kind == "fusion" else [(out.index, 1.0)]

    def generate(self, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
        """Greedy tokens from the reference output (a full forward of every last model per step)."""
        outs = self.outputs(ids, mask)
        heads = self.heads()
        embeds = {i: torch.from_numpy(outs[self.spec.nodes[i].inputs[0]]) for i, _ in heads}
        m = torch.from_numpy(np.asarray(mask, np.int64))
        tokens = []
        with torch.no_grad():
            for _ in range(new_tokens):
                step = []
                for i, _ in heads:
                    logits, _ = hf.causal_lm_forward(self.models[i], inputs_embeds=embeds[i], attention_mask=m)
                    step.append(logits[:, -1].float().numpy())
                token = torch.from_numpy(fuse_logits(step, [w for _, w in heads]).argmax(-1))
                tokens.append(token.numpy())
                for i, _ in heads:
                    table = self.models[i].get_input_embeddings().weight.detach().float()
                    embeds[i] = torch.cat([embeds[i], table[token][:, None, :]], dim=1)
                m = torch.cat([m, torch.ones(m.shape[0], 1, dtype=m.dtype)], dim=1)
        return np.stack(tokens, axis=1).astype(np.int64)


def _stage_precision(graph: Any, i: int) -> str:
    n, s = graph.nodes[i], graph.stages[i]
    if n.kind == "model":
        return str(s.precision)
    if n.kind == "adapter":
        return defaults.runner_precision(s)
    return loosest([graph.stages[j].precision for j in n.inputs])


def check_graph_parity(
    graph: Any,
    reference: ReferenceGraph,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    tolerance: str | None = None,
    new_tokens: int = 0,
    bisect: bool = False,
) -> dict[str, Any]:
    """``graph`` (a :class:`~prism_deploy.runtime.graph.Graph`) against ``reference``; the report
    has ``passed``, ``failures`` (one line each), ``stages`` (per stage, with its edge),
    ``logits`` end to end, ``greedy`` and ``bisect``."""
    spec = graph.spec
    ids, mask = graph.prepare_inputs(input_ids, attention_mask)
    ref = reference.outputs(ids, mask)
    precision = tolerance or graph.precision
    tol = tolerances.pipeline(precision)
    report: dict[str, Any] = {
        "precision": precision,
        "tolerances": tol.to_json(),
        "graph": graph.describe(),
        "batch": int(ids.shape[0]),
        "seq": int(ids.shape[1]),
        "tokens": int(mask.sum()),
    }
    hops = []
    for i in spec.order:
        n = spec.nodes[i]
        given = [ids] if i == 0 else [ref[j] for j in n.inputs]
        got = _stage_on(graph, i, given, mask)
        is_logits = n.kind == "fusion" or spec.roles.get(i) == "last"
        prec = _stage_precision(graph, i)
        hop_tol = tolerances.hop("adapter" if n.kind == "adapter" else "model", prec)
        fig = compare(got, ref[i], mask, logits=is_logits, tie_gap=hop_tol.tie_gap)
        bad = hop_tol.failures({k: fig[k] for k in ("rel_l2", "min_cosine", "top1") if k in fig})
        hop: dict[str, Any] = {
            "stage": i + 1,
            "index": i,
            "name": n.name,
            "kind": n.kind,
            "edge": spec.edge(n),
            "precision": prec,
            "tolerances": hop_tol.to_json(),
            **fig,
        }
        if n.kind == "model" and spec.roles[i] == "last":
            hop["graphs"] = last_model_graphs(graph.stages[i], ref[i], ref[n.inputs[0]], mask, hop_tol)
            bad += [
                f"{g}: " + "; ".join(f["failures"])
                for g, f in hop["graphs"].items()
                if not f["passed"] and g != "graph"
            ]
        hops.append({**hop, "passed": not bad, "failures": bad})
    report["stages"] = hops

    logits = graph(ids, mask)
    fig = compare_logits(logits, ref[spec.output.index], mask, tie_gap=tol.tie_gap)
    report["logits"] = fig
    report["timings"] = dict(graph.timings)
    failures = tol.failures({k: fig[k] for k in ("rel_l2", "kl_max", "top1")}, "logits")
    if new_tokens:
        got_tokens = graph.generate(ids, mask, max_new_tokens=new_tokens)
        want_tokens = reference.generate(ids, mask, new_tokens)
        match = float((got_tokens == want_tokens[:, : got_tokens.shape[1]]).mean())
        report["greedy"] = {
            "new_tokens": new_tokens,
            "graph": got_tokens.tolist(),
            "reference": want_tokens.tolist(),
            "match": match,
        }
        if precision == "fp32" and match < 1.0:
            failures.append(f"greedy tokens differ from the reference graph's ({match:.3f} of them agree)")
    for h in hops:
        if not h["passed"]:
            failures.append(
                f"stage {h['stage']} ({h['kind']} {h['name']}, edge {h['edge']}): " + "; ".join(h["failures"])
            )
    report["passed"] = not failures
    report["failures"] = failures
    if failures or bisect:
        report["bisect"] = _bisect(graph, reference, mask, ref, hops) if failures else {"found": None}
        if failures and report["bisect"].get("found"):
            failures.append(f"bisect: {report['bisect']['summary']}")
    return report


def _stage_on(graph: Any, i: int, given: list[Any], mask: np.ndarray) -> np.ndarray:
    """Deployed stage ``i`` on host inputs (the reference's), as host float32."""
    n, stage = graph.nodes[i], graph.stages[i]
    if n.kind == "model":
        return np.asarray(stage.run(given[0] if i == 0 else np.asarray(given[0], np.float32), mask), np.float32)
    if n.kind == "fusion":
        return fuse_logits([np.asarray(v, np.float32) for v in given], n.weights)
    x = np.concatenate([np.asarray(v, np.float32) for v in given], axis=-1)
    return np.asarray(stage.run(x), np.float32)


def _bisect(
    graph: Any, reference: ReferenceGraph, mask: np.ndarray, ref: list[np.ndarray], hops: list[dict[str, Any]]
) -> dict[str, Any]:
    """The first stage (in topological order) out of its bound, its edge, and inside it the part
    most to blame."""
    failing = [h for h in hops if not h["passed"]]
    if not failing:
        worst = max(hops, key=lambda h: h["rel_l2"] / max(h["tolerances"]["rel_l2_max"], 1e-30))
        return {
            "found": None,
            "summary": "every stage is within its own bound: the error accumulates over the graph "
            f"(closest to its bound: stage {worst['stage']} {worst['name']})",
        }
    h = failing[0]
    i = h["index"]
    n = graph.nodes[i]
    head = f"stage {h['stage']} ({h['kind']} {h['name']}) on edge {h['edge']}"
    out: dict[str, Any] = {
        "found": h["stage"],
        "index": i,
        "name": h["name"],
        "kind": h["kind"],
        "edge": h["edge"],
        "rel_l2": h["rel_l2"],
        "summary": head,
    }
    if n.kind == "adapter":
        from prism_deploy.parity.blame import blame_workers

        x = np.concatenate([np.asarray(ref[j], np.float32) for j in n.inputs], axis=-1)
        x = x.reshape(-1, x.shape[-1])[np.asarray(mask).reshape(-1).astype(bool)]
        workers = blame_workers(reference.adapters[i], graph.stages[i], x)
        out["workers"] = workers[:5]
        if workers:
            top = workers[0]
            out["pipe"] = {"index": top["pipe"], "name": top["name"]}
            out["summary"] = (
                f"{head}, pipe {top['pipe']} ({top['name']}), worker {top['worker']} "
                f"(row block {top['r']}, column block {top['c']})"
            )
    elif n.kind == "model":
        out["graph"] = blamed_graph(graph.stages[i], h.get("graphs", {}))
        out["summary"] = f"{head}, graph {out['graph']}"
    return out
