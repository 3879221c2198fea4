"""End-to-end and hop-by-hop parity of a chain, and bisection to the stage that broke it.

The reference chain runs in float32 PyTorch: each model in ``transformers`` (the first from
token ids, a middle one from embeddings, both giving the final hidden state after the norm;
the last giving logits, position ids from the mask as the exported graphs do) and each adapter
through ``PrismAdapter.forward`` of its ``.safetensors``.

- **End to end**: the deployed chain's logits against the reference chain's, over the real
  tokens: max abs and relative L2 error, KL(reference || chain) of the next-token
  distributions, top-1 agreement on tokens whose reference top-1/top-2 gap is clear; and, with
  ``new_tokens``, the greedy tokens of ``Chain.generate`` against a greedy loop over the
  reference chain. Tolerances: the set of the chain's least precise part
  (``prism_deploy.core.tolerances.pipeline``).
- **Per hop**: each deployed stage fed the *reference's own* input for that stage, against the
  reference stage's output, so an error is charged to the stage that made it, not to those
  after it. Bounds: the stage's own precision (``tolerances.hop``).
- **Bisect** (on failure, or when asked): the first stage out of its bound; within an adapter,
  the pipe and the workers most to blame (:func:`prism_deploy.parity.blame.blame_workers`);
  within the last model, the graph (``graph`` for the prefill, ``graph_with_past`` for decoding).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from prism_deploy.core import defaults, tolerances
from prism_deploy.core.errors import PrismInputError, printable
from prism_deploy.core.metrics import compare, compare_logits
from prism_deploy.core.precision import loosest
from prism_deploy.models import hf


class ReferenceChain:
    """The float32 PyTorch chain: transformers models and reference adapters."""

    def __init__(self, models: list[Any], adapters: list[Any]) -> None:
        from prism_deploy.reference import PrismAdapter, load_adapter

        if len(models) != len(adapters) + 1:
            raise PrismInputError(
                f"reference chain: {len(models)} models need {len(models) - 1} adapters, got {len(adapters)}"
            )
        # only the last model's LM head is used: the others read their base model's hidden states
        self.models = [
            hf.load_causal_lm(m, uses_head=i == len(models) - 1) if isinstance(m, (str, os.PathLike)) else m
            for i, m in enumerate(models)
        ]
        self.adapters = [a if isinstance(a, PrismAdapter) else load_adapter(a) for a in adapters]
        self.sources = [str(m) if isinstance(m, (str, os.PathLike)) else type(m).__name__ for m in models]
        self.adapter_sources = [str(a) if not isinstance(a, PrismAdapter) else "adapter" for a in adapters]

    def widths(self) -> list[dict[str, int]]:
        """Per stage, the sizes that must equal the deployed stage's: a model's hidden width, layers
        and the vocabulary its ids or logits span; an adapter's in and out widths."""
        out: list[dict[str, int]] = []
        for i, model in enumerate(self.models):
            if i:
                a = self.adapters[i - 1]
                out.append({"in_dim": int(a.in_dim), "out_dim": int(a.out_dim)})
            dims = hf.cache_dims(model.config)
            table = model.get_input_embeddings() if i == 0 else model.get_output_embeddings()
            vocab = int(table.weight.shape[0]) if table is not None else int(model.config.vocab_size)
            out.append({"hidden": dims["hidden"], "layers": dims["layers"], "vocab": vocab})
        return out

    def check_matches(self, chain: Any) -> None:
        """Raise unless every reference part has the sizes of the deployed stage it checks (a
        reference of another model is bad input, not a shape error halfway through the run)."""
        if len(chain.stages) != 2 * len(self.models) - 1:
            raise PrismInputError(
                f"reference chain: {len(self.models)} models for a chain of {len(chain.stages)} stages"
            )
        for i, want in enumerate(self.widths()):
            stage, name = chain.stages[i], chain.names[i]
            if i % 2:
                have = {"in_dim": getattr(stage, "in_dim", None), "out_dim": getattr(stage, "out_dim", None)}
                source = self.adapter_sources[i // 2]
            else:
                have = {"hidden": stage.hidden_size, "layers": stage.layers, "vocab": stage.vocab}
                if i != 0 and i != len(chain.stages) - 1:
                    have.pop("vocab")  # a middle model's logits are not part of the chain
                source = self.sources[i // 2]
            for key, value in have.items():
                if value is not None and int(value) != want[key]:
                    kind = "adapter" if i % 2 else "model"
                    raise PrismInputError(
                        f"stage {i + 1} ({kind} {printable(name)}): its reference {printable(source)} "
                        f"has {key} {want[key]}, the deployed stage {value}: "
                        "the reference is not this stage's source"
                    )

    def stage(self, i: int, value: Any, mask: np.ndarray) -> np.ndarray:
        """Stage ``i`` (0-based, models at even indices) on ``value``: ids for the first model,
        float32 embeddings or hidden states otherwise."""
        m = torch.from_numpy(np.asarray(mask, dtype=np.int64))
        with torch.no_grad():
            if i % 2:
                return self.adapters[i // 2](torch.from_numpy(np.asarray(value, np.float32))).float().numpy()
            model = self.models[i // 2]
            if i == 0:
                return hf.final_hidden(model, torch.from_numpy(np.asarray(value, np.int64)), m).float().numpy()
            x = torch.from_numpy(np.asarray(value, np.float32))
            if i == 2 * (len(self.models) - 1):
                logits, _ = hf.causal_lm_forward(model, inputs_embeds=x, attention_mask=m)
                return logits.float().numpy()
            return hf.final_hidden(model, None, m, inputs_embeds=x).float().numpy()

    def outputs(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        value: Any = ids
        for i in range(2 * len(self.models) - 1):
            value = self.stage(i, value, mask)
            out.append(value)
        return out

    def generate(self, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
        """Greedy tokens of the last model after the reference prefix (a full forward per step)."""
        outs = self.outputs(ids, mask)
        embeds = torch.from_numpy(outs[-2])
        model = self.models[-1]
        table = model.get_input_embeddings().weight.detach().float()
        m = torch.from_numpy(np.asarray(mask, np.int64))
        tokens = []
        with torch.no_grad():
            for _ in range(new_tokens):
                logits, _ = hf.causal_lm_forward(model, inputs_embeds=embeds, attention_mask=m)
                token = logits[:, -1].argmax(-1)
                tokens.append(token.numpy())
                embeds = torch.cat([embeds, table[token][:, None, :]], dim=1)
                m = torch.cat([m, torch.ones(m.shape[0], 1, dtype=m.dtype)], dim=1)
        return np.stack(tokens, axis=1).astype(np.int64)


def chain_precision(chain: Any) -> str:
    """The loosest precision among the chain's parts (for the default end-to-end tolerances)."""
    return loosest([m.precision for m in chain.models] + [defaults.runner_precision(a) for a in chain.adapters])


def check_chain_parity(
    chain: Any,
    reference: ReferenceChain,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    tolerance: str | None = None,
    new_tokens: int = 0,
    bisect: bool = False,
) -> dict[str, Any]:
    """Compare ``chain`` with ``reference`` on ``input_ids``; returns a report (``passed``,
    ``failures`` one line each, ``stages`` per hop, ``logits`` end to end, ``bisect``)."""
    reference.check_matches(chain)
    ids, mask = chain.prepare_inputs(input_ids, attention_mask)
    ref = reference.outputs(ids, mask)
    precision = tolerance or chain_precision(chain)
    tol = tolerances.pipeline(precision)
    report: dict[str, Any] = {
        "precision": precision,
        "tolerances": tol.to_json(),
        "chain": chain.describe(),
        "batch": int(ids.shape[0]),
        "seq": int(ids.shape[1]),
        "tokens": int(mask.sum()),
    }

    # per hop: each deployed stage on the reference's own input for it
    hops = []
    for i, stage in enumerate(chain.stages):
        given = ids if i == 0 else ref[i - 1]
        got = _run_stage(chain, i, given, mask)
        kind = "model" if i % 2 == 0 else "adapter"
        is_logits = i == len(chain.stages) - 1
        prec = stage.precision if kind == "model" else defaults.runner_precision(stage)
        hop_tol = tolerances.hop(kind, prec)
        fig = compare(got, ref[i], mask, logits=is_logits, tie_gap=hop_tol.tie_gap)
        bad = hop_tol.failures({k: fig[k] for k in ("rel_l2", "min_cosine", "top1") if k in fig})
        hop: dict[str, Any] = {
            "stage": i + 1,
            "index": i,
            "name": chain.names[i],
            "kind": kind,
            "precision": prec,
            "tolerances": hop_tol.to_json(),
            **fig,
        }
        if is_logits:  # the last model decodes with its KV-cache graph: check that graph too
            hop["graphs"] = _last_model_graphs(chain, reference, ref[i - 1], mask, hop_tol)
            bad += [
                f"{g}: " + "; ".join(f["failures"])
                for g, f in hop["graphs"].items()
                if not f["passed"] and g != "graph"
            ]
        hops.append({**hop, "passed": not bad, "failures": bad})
    report["stages"] = hops

    # end to end
    logits = chain(ids, mask)
    fig = compare_logits(logits, ref[-1], mask, tie_gap=tol.tie_gap)
    report["logits"] = fig
    report["timings"] = dict(chain.timings)
    failures = tol.failures({k: fig[k] for k in ("rel_l2", "kl_max", "top1")}, "logits")
    if new_tokens:
        got_tokens = chain.generate(ids, mask, max_new_tokens=new_tokens)
        want_tokens = reference.generate(ids, mask, new_tokens)
        match = float((got_tokens == want_tokens[:, : got_tokens.shape[1]]).mean())
        judged = precision == "fp32"
        report["greedy"] = {
            "new_tokens": new_tokens,
            "chain": got_tokens.tolist(),
            "reference": want_tokens.tolist(),
            "match": match,
            "judged": judged,
            "why": "fp32: rounding cannot move a greedy token but on a tie"
            if judged
            else f"not part of the check at {precision}: its rounding moves a token wherever two logits "
            "are close, and every later token follows that one; the logits bounds above are the check",
        }
        if judged and match < 1.0:
            failures.append(f"greedy tokens differ from the reference chain's ({match:.3f} of them agree)")
    failed_hops = [h for h in hops if not h["passed"]]
    for h in failed_hops:
        failures.append(f"stage {h['stage']} ({h['kind']} {h['name']}): " + "; ".join(h["failures"]))
    report["passed"] = not failures
    report["failures"] = failures
    if failures or bisect:
        report["bisect"] = _bisect(chain, reference, ids, mask, ref, hops) if failures else {"found": None}
        if failures and report["bisect"].get("found"):
            failures.append(f"bisect: {report['bisect']['summary']}")
    return report


def _run_stage(chain: Any, i: int, given: Any, mask: np.ndarray) -> np.ndarray:
    stage = chain.stages[i]
    if i % 2 == 0:
        return np.asarray(stage.run(given, mask), dtype=np.float32)
    return np.asarray(stage.run(np.asarray(given, np.float32)), dtype=np.float32)


def _bisect(
    chain: Any,
    reference: ReferenceChain,
    ids: np.ndarray,
    mask: np.ndarray,
    ref: list[np.ndarray],
    hops: list[dict[str, Any]],
) -> dict[str, Any]:
    """The first stage out of its bound, and inside it the part most to blame."""
    failing = [h for h in hops if not h["passed"]]
    if not failing:
        worst = max(hops, key=lambda h: h["rel_l2"] / max(h["tolerances"]["rel_l2_max"], 1e-30))
        return {
            "found": None,
            "summary": "every stage is within its own bound: the error accumulates over the chain "
            f"(closest to its bound: stage {worst['stage']} {worst['name']})",
        }
    h = failing[0]
    i = h["index"]
    out: dict[str, Any] = {"found": h["stage"], "index": i, "name": h["name"], "kind": h["kind"], "rel_l2": h["rel_l2"]}
    if h["kind"] == "adapter":
        from prism_deploy.parity.blame import blame_workers

        x = np.asarray(ref[i - 1], np.float32).reshape(-1, ref[i - 1].shape[-1])[
            np.asarray(mask).reshape(-1).astype(bool)
        ]
        workers = blame_workers(reference.adapters[i // 2], chain.stages[i], x)
        out["workers"] = workers[:5]
        if workers:
            top = workers[0]
            out["pipe"] = {"index": top["pipe"], "name": top["name"]}
            out["summary"] = (
                f"stage {h['stage']} (adapter {h['name']}), pipe {top['pipe']} ({top['name']}), "
                f"worker {top['worker']} (row block {top['r']}, column block {top['c']})"
            )
        else:
            out["summary"] = f"stage {h['stage']} (adapter {h['name']})"
    else:
        out["graph"] = blamed_graph(chain.stages[i], h.get("graphs", {}))
        out["summary"] = f"stage {h['stage']} (model {h['name']}), graph {out['graph']}"
    return out


def blamed_graph(stage: Any, graphs: dict[str, Any]) -> str:
    """The graph file of a failing model stage to blame: the first whose figures fail."""
    bad = [g for g, f in graphs.items() if not f["passed"]]
    name = bad[0] if bad else "graph"
    if name == "graph" and getattr(stage, "shares_past_graph", False):
        # its plain calls (the prefill figures) ran on the KV-cache graph too: that is the file
        return "graph_with_past"
    return name


def _last_model_graphs(
    chain: Any, reference: ReferenceChain, embeds: np.ndarray, mask: np.ndarray, tol: tolerances.Tolerances
) -> dict[str, Any]:
    """The last model's prefill graph and its KV-cache graph, each against transformers on the
    reference's embeddings: the prefill on every position, the KV graph as a prefill of all but
    the last position and one decoding step."""
    return last_model_graphs(chain.last, reference.stage(len(chain.stages) - 1, embeds, mask), embeds, mask, tol)


def last_model_graphs(
    last: Any, want: np.ndarray, embeds: np.ndarray, mask: np.ndarray, tol: tolerances.Tolerances
) -> dict[str, Any]:
    """A last model's two graphs on ``embeds`` against the reference logits ``want``."""
    plain = compare(last.run(embeds, mask), want, mask, logits=True, tie_gap=tol.tie_gap)
    seq = embeds.shape[1]

    def judged(fig: dict[str, Any]) -> dict[str, Any]:
        bad = tol.failures({k: fig[k] for k in ("rel_l2", "min_cosine", "top1") if k in fig})
        return {**fig, "passed": not bad, "failures": bad}

    figures = {"graph": judged(plain)}
    if seq >= 2 and getattr(last, "graph_form", "portable") == "ort":
        # one graph on its shared KV buffer: a prefill of all but the last position, then one step
        # (whose logits, of the last position, are what the step gives)
        cache = last.empty_past(embeds.shape[0])
        last.step(embeds[:, : seq - 1], mask[:, : seq - 1], cache)
        step, _ = last.step(embeds[:, seq - 1 :], mask, cache)
        figures["graph_with_past"] = judged(
            compare(
                np.asarray(step, np.float32)[:, None],
                want[:, seq - 1 :],
                mask[:, seq - 1 :],
                logits=True,
                tie_gap=tol.tie_gap,
            )
        )
    elif seq >= 2:
        past = last.empty_past(embeds.shape[0])
        feeds = {"inputs_embeds": embeds[:, : seq - 1], "attention_mask": mask[:, : seq - 1], **past}
        outs = last.past_graph.run_device(feeds)
        from prism_deploy.format.model_folder import past_names

        cache = dict(zip(past_names(last.layers), outs[1:]))
        feeds = {"inputs_embeds": embeds[:, seq - 1 :], "attention_mask": mask, **cache}
        step = np.asarray(last.past_graph.run(feeds, ["logits"])["logits"], np.float32)
        got = np.concatenate([np.asarray(outs[0].numpy(), np.float32), step], axis=1)
        figures["graph_with_past"] = judged(compare(got, want, mask, logits=True, tie_gap=tol.tie_gap))
    return figures


# ---- the two-model case ---------------------------------------------------------------------------


def check_pipeline_parity(
    model_a_hf: Any,
    adapter: Any,
    model_b_hf: Any,
    pipeline: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    tolerance: str | None = None,
) -> dict[str, Any]:
    """``check_chain_parity`` for a two-model ``Pipeline``, with the report's stages also under
    ``hidden``, ``adapted`` and ``logits`` (model A's, the adapter's and model B's outputs)."""
    reference = ReferenceChain([model_a_hf, model_b_hf], [adapter])
    report = check_chain_parity(pipeline, reference, input_ids, attention_mask, tolerance=tolerance)
    ids, mask = pipeline.prepare_inputs(input_ids, attention_mask)
    outputs, _ = pipeline.stage_outputs(ids, mask)
    want = reference.outputs(ids, mask)
    report["hidden"] = compare(outputs[0], want[0], mask)
    report["adapted"] = compare(outputs[1], want[1], mask)
    report["pipeline"] = report["chain"]
    return report
