"""The checks a build runs on each engine it makes, before the engine enters the folder.

The builder (``prism_deploy.builder``) is handed one of these; it never runs engines itself.

- ``adapter_engine_check(ADAPTER)``: the engine, opened through the loader users get
  (``prism_deploy.runtime.engines``), against the PyTorch reference (``check_parity``).
- ``model_graph_check(MODEL_DIR)``: a built model graph against the exported ONNX it was built
  from, on the same random inputs (same precision: only graph rewrites may differ). A TensorRT
  engine of a model graph cannot be run here (no multi-input TensorRT runner yet): it is
  recorded as not checked, never as passed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.builder.loop import CheckResult, EngineCheck, Unit
from prism_deploy.core import tolerances
from prism_deploy.core.metrics import compare
from prism_deploy.format import model_folder
from prism_deploy.target_backends import backend_for

# Parity runs the engine on this many random batches of the profile's OPT shape (cut: checked_shape).
PARITY_SAMPLES = 2
# the most tokens one parity batch of the build gate compares (a few MB of activations)
PARITY_TOKENS = 4096
PARITY_PAST = 3
# the most tokens the check of each further gated form runs (a form chosen for a bucket above
# it is the same graph at this size)
PARITY_FORM_TOKENS = 64  # past length fed to the KV-cache graph in a model graph's check


def adapter_engine_check(adapter_path: str | os.PathLike[str]) -> EngineCheck:
    """The build's parity gate for adapter engines (needs PyTorch: the reference)."""
    from prism_deploy.core.errors import require_torch

    require_torch("the build's parity check (pass --no-parity to build without it)")
    state: dict[str, Any] = {}

    def check(unit: Unit, folder: Path, entry: dict[str, Any]) -> CheckResult:
        from prism_deploy.parity.check import check_parity
        from prism_deploy.reference import load_adapter
        from prism_deploy.runtime.engines import open_entry

        if "adapter" not in state:
            state["adapter"] = load_adapter(adapter_path)
        adapter = state["adapter"]
        loaded = open_entry(folder, entry, adapter.config.to_json())
        batch, seq = checked_shape(unit.config.profile)
        report = check_parity(
            adapter, loaded, precision=unit.config.precision, samples=PARITY_SAMPLES, batch=batch, seq=seq, seed=0
        )
        figures, passed, failures = report.to_json(), bool(report.passed), list(report.failures)
        # an entry with a form per token bucket: every chosen form is checked too, at the token
        # count it was timed at (the profile's shape above runs only one of them)
        by_form: dict[str, Any] = {}
        checked = {loaded.form_for(batch * seq)}
        for bucket in (entry.get("forms") or {}).get("buckets", []):
            if bucket["form"] in checked:
                continue
            checked.add(bucket["form"])
            tokens = min(bucket["timed_tokens"], PARITY_FORM_TOKENS)
            r = check_parity(adapter, loaded, precision=unit.config.precision, samples=1, batch=1, seq=tokens, seed=1)
            by_form[bucket["form"]] = {"tokens": tokens, **r.to_json()}
            passed = passed and bool(r.passed)
            failures += [f"form {bucket['form']} at {tokens} token(s): {f}" for f in r.failures]
        if by_form:
            figures["forms"] = by_form
        return CheckResult(passed, figures, "; ".join(failures))

    return check


def checked_shape(profile: Any) -> tuple[int, int]:
    """The shape the parity gate runs: the profile's optimum, cut to ``PARITY_TOKENS`` tokens
    (``--batch 1:100000:100000`` would otherwise compare 6.4 million tokens against the float64
    reference and run out of memory); the seq kept first, as the axis engines vary most in."""
    seq = min(profile.seq[1], PARITY_TOKENS)
    batch = max(1, min(profile.batch[1], PARITY_TOKENS // seq))
    return batch, seq


def model_graph_check(model_dir: str | os.PathLike[str]) -> EngineCheck:
    """The build's parity gate for model graphs (no PyTorch needed)."""
    source = Path(model_dir)
    model = model_folder.read_model_json(source)

    def check(unit: Unit, folder: Path, entry: dict[str, Any]) -> CheckResult:
        key = unit.config.layout
        backend = backend_for(entry["target"])
        if not backend.opens_model_graphs:
            return CheckResult(None, {"checked": False, "reason": f"no {backend.tool} runner for model graphs yet"})
        return graph_parity(model_folder.file_path(source, model, key), folder, entry, model, key)

    return check


def graph_parity(
    source_onnx: Path, work: Path, entry: dict[str, Any], model: dict[str, Any], key: str, seed: int = 0
) -> CheckResult:
    """Run the built graph and the source ONNX on the same random inputs; relative L2 on every
    output, top-1 agreement on logits."""
    from prism_deploy.format.engine_manifest import verify_part
    from prism_deploy.runtime.onnx_runner import OnnxRunner

    backend = backend_for(entry["target"])
    built = backend.open_graph(verify_part(work, entry["parts"][0]), entry, OnnxRunner.open)
    reference = OnnxRunner.open(source_onnx, backend.provider)
    feeds, mask = parity_inputs(reference, model, key, seed, source_onnx.parent)
    got, want = built.run(feeds), reference.run(feeds)
    tol = tolerances.built_graph(model["precision"])  # model.json's schema requires one of them
    figures: dict[str, Any] = {"checked": True, "tolerances": tol.to_json(), "outputs": {}}
    bad: list[str] = []
    # the ort form's present.* past its real tokens is not written (GroupQueryAttention): its output only
    names = (
        [model_folder.OUTPUT_ORT_FORM[model["role"]]]
        if model_folder.graph_form(model) == "ort"
        else reference.output_names
    )
    for name in names:
        is_logits = name == "logits"
        fig = compare(
            got[name],
            want[name],
            mask if is_logits or name in ("hidden", "hidden_states") else None,
            logits=is_logits,
            tie_gap=tol.tie_gap,
        )
        figures["outputs"][name] = fig
        bad += tol.failures({k: fig[k] for k in ("rel_l2", "top1") if k in fig}, name)
    figures["rel_l2"] = max(f["rel_l2"] for f in figures["outputs"].values())
    figures["max_abs"] = max(f["max_abs"] for f in figures["outputs"].values())
    return CheckResult(not bad, figures, "; ".join(bad))


def _empty_ort_past(runner: Any, feeds: dict[str, Any], dims: dict[str, Any]) -> dict[str, Any]:
    """An ``ort``-form graph's plain call: its KV inputs given a past of length zero."""
    batch = int(feeds["attention_mask"].shape[0])
    names = model_folder.past_names(int(dims["layers"]))
    dtype = runner.input_dtype(names[0]) or np.dtype(np.float32)
    empty = np.zeros((batch, int(dims["kv_heads"]), 0, int(dims["head_dim"])), dtype=dtype)
    return {**feeds, **{n: empty for n in names}}


def parity_inputs(
    runner: Any, model: dict[str, Any], key: str, seed: int, model_dir: Path
) -> tuple[dict[str, Any], np.ndarray]:
    """Random feeds for one graph: ids/mask (first), embeds/mask (middle, last), plus a short past
    (KV graph). Returns (feeds, mask over the new tokens)."""
    rng = np.random.default_rng(seed)
    dims = model["dims"]
    batch, seq = 2, max(1, min(int(model["max_seq"]) - PARITY_PAST, 7))
    past = PARITY_PAST if key == "graph_with_past" else 0
    mask = np.ones((batch, past + seq), dtype=np.int64)
    ort_form = model_folder.graph_form(model) == "ort"
    if ort_form:  # its graph reads the mask as GroupQueryAttention does: real tokens first (right padding)
        mask[-1, -2:] = 0
    else:
        mask[-1, :2] = 0  # one left-padded row
    if model["role"] == "first":
        ids = rng.integers(0, int(dims["vocab"]), size=(batch, seq), dtype=np.int64)
        feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        return (_empty_ort_past(runner, feeds, dims) if ort_form else feeds), mask
    if "embed_tokens" in model["files"]:  # embedding-scale inputs: rows of the model's own table plus noise
        table = np.load(model_folder.file_path(model_dir, model, "embed_tokens"), mmap_mode="r", allow_pickle=False)
        rows = np.asarray(table[rng.integers(0, table.shape[0], size=(batch, seq))], dtype=np.float32)
        embeds = rows + rng.normal(0.0, float(rows.std()) or 1.0, size=rows.shape)
    else:  # a middle model keeps no table: noise of its embeddings' recorded scale
        embeds = rng.normal(0.0, float(model.get("embed_std") or 1.0), size=(batch, seq, int(dims["hidden"])))
    feeds = {"inputs_embeds": embeds.astype(np.float32), "attention_mask": mask}
    if ort_form:
        return _empty_ort_past(runner, feeds, dims), mask
    if key == "graph_with_past":
        shape = (batch, int(dims["kv_heads"]), past, int(dims["head_dim"]))
        for name in model_folder.past_names(int(dims["layers"])):
            feeds[name] = rng.normal(0.0, 1.0, size=shape).astype(np.float32)
    return feeds, mask[:, past:]
