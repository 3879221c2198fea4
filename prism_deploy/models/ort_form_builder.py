"""The ``ort`` graph form of a chain's model, written by ONNX Runtime GenAI's model builder.

ONNX Runtime GenAI (``onnxruntime-genai``) ships a model builder that writes decoder LMs in
ONNX Runtime's fused form: one ``GroupQueryAttention`` per layer with the rotary embedding
inside, ``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm), one fused QKV projection,
``MatMulNBits`` for int8/int4, and a KV cache that past and present can share in one buffer
preallocated to the maximum length. Its options map onto this project's roles:

- ``first``: ``exclude_lm_head`` (ids -> ``hidden_states``, after the final norm);
- ``middle``: ``exclude_embeds`` + ``exclude_lm_head`` (embeddings -> ``hidden_states``);
- ``last``: ``exclude_embeds`` (embeddings -> ``logits`` at every position) plus
  ``embed_tokens.npy`` for the generation loop; the graph then gets the optional
  ``logits_start`` (:mod:`prism_deploy.models.logits_positions`), so that a prefill computes
  logits only at the positions the runner reads.

Why the builder rather than fusions written here: docs/model-forms.md. The builder is run in a
child process (``python -m onnxruntime_genai.models.builder``): it loads the model itself and
prints progress; its memory goes back when it exits. The graphs are checked against
transformers as the portable form's are (left padding included: the runners feed GQA right
padding, :func:`prism_deploy.format.model_folder.right_padding_shifts`).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prism_deploy.core import defaults, tolerances
from prism_deploy.core.errors import PrismInputError, brief
from prism_deploy.core.fsutil import atomic_output, file_sha256, folder_lock, write_text_atomic
from prism_deploy.core.metrics import compare, compare_logits, merge
from prism_deploy.core.precision import ModelPrecision
from prism_deploy.format.model_folder import (
    FORMAT,
    LOCK_NAME,
    MODEL_JSON,
    VERSION,
    canonical_role,
    check_export_folder,
    ort_form_io,
    past_names,
    right_padding_shifts,
    roll_rows,
)
from prism_deploy.format.model_folder import OUTPUT_ORT_FORM as OUTPUT

if TYPE_CHECKING:  # the module loads torch: imported where the export runs
    from prism_deploy.models.export_checks import Expected

# The builder's precision names on the CPU execution provider (fp16 graphs are written for CUDA).
BUILDER_PRECISION = {"fp32": "fp32", "int8": "int8", "int4": "int4"}
ROLE_OPTIONS = {
    "first": {"exclude_lm_head": "true"},
    "middle": {"exclude_embeds": "true", "exclude_lm_head": "true"},
    "last": {"exclude_embeds": "true"},
}


def builder_missing() -> str | None:
    """Why the ``ort`` form cannot be written here (None when it can)."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return (
            "the ort graph form is written by ONNX Runtime GenAI's model builder: "
            "pip install --no-deps onnxruntime-genai==0.18.0 (without --no-deps it pulls the CPU onnxruntime "
            "over onnxruntime-gpu)"
        )
    return None


def export_ort_form(
    hf_dir: str | os.PathLike[str],
    role: str,
    out_dir: str | os.PathLike[str],
    *,
    precision: ModelPrecision | str = defaults.MODEL_PRECISION,
    max_seq: int | None = None,
    validate: bool = True,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Export ``hf_dir`` as ``role`` in the ``ort`` form into ``out_dir``, validate it against
    transformers and write model.json; returns the manifest."""
    from prism_deploy.models import export_checks, hf

    role = canonical_role(role)
    prec = ModelPrecision.parse(precision)  # the export's edge: a name from an API caller is parsed once, here
    if prec not in BUILDER_PRECISION:
        raise PrismInputError(
            f"--precision {prec}: the ort graph form is written for the CPU at "
            f"{', '.join(BUILDER_PRECISION)} (fp16: the portable form)"
        )
    why = builder_missing()
    if why:
        raise PrismInputError(f"--graph-form ort: {why}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PrismInputError(f"{out_dir}: exists and is not a folder")
    check_export_folder(out, force)
    started = time.perf_counter()
    # The sizes from the config: the weights are loaded once the builder's process, which holds
    # its own copy of them, has ended, so the two are never in memory together.
    config = hf.load_config(hf_dir)
    limit = hf.max_positions(config)
    if max_seq is None:
        max_seq = min(limit or 2048, 2048)
    if max_seq < 2 or (limit is not None and max_seq > limit):
        raise PrismInputError(f"--max-seq: {max_seq} must be in 2..{limit or 'inf'} (the model's position limit)")
    dims = hf.cache_dims(config)
    if dims["head_dim"] % 16:  # ONNX Runtime's GroupQueryAttention refuses others when it runs
        raise PrismInputError(
            f"{hf_dir}: head size {dims['head_dim']}: the ort graph form needs a multiple of 16 "
            "(GroupQueryAttention); use the portable form"
        )
    graph_name = f"{role}.onnx"
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(out, LOCK_NAME):
            check_export_folder(out, force)
            try:
                (out / MODEL_JSON).unlink(missing_ok=True)
                files = {"graph": graph_name, "graph_data": graph_name + ".data"}
                builder = _run_builder(Path(hf_dir), role, out, graph_name, prec, max_seq)
                reference = hf.load_causal_lm(hf_dir, attn_implementation="eager")
                table = reference.get_input_embeddings() if role == "first" else reference.get_output_embeddings()
                vocab = int(table.weight.shape[0])
                embeddings = hf.input_embedding_matrix(reference)
                family, eos_token_id, embed_std = (
                    hf.family(reference),
                    _eos_token_id(reference),
                    float(embeddings.std()),
                )
                if role == "last":
                    from prism_deploy.models.logits_positions import add_logits_start

                    add_logits_start(out / graph_name)  # generation asks for the last position's logits only
                    files["embed_tokens"] = "embed_tokens.npy"
                    with atomic_output(out / files["embed_tokens"]) as tmp, open(tmp, "wb") as fh:
                        np.save(fh, embeddings.astype(np.float32))
                export_s = time.perf_counter() - started
                # the float model's outputs first, then the graph's with the model let go (export_checks)
                expected = export_checks.expect(reference, role, max_seq, seed, kv=False) if validate else None
                del reference, table, embeddings
                gc.collect()
                validation: dict[str, Any] = {"skipped": True}
                if expected is not None:
                    validation = _check_graph(expected, out / graph_name, role, prec, dims)
                manifest = {
                    "format": FORMAT,
                    "version": VERSION,
                    "role": role,
                    "graph_form": "ort",
                    "family": family,
                    "known_family": family in hf.KNOWN_FAMILIES,
                    "source": str(Path(hf_dir).resolve()),
                    "precision": prec.value,
                    "max_seq": max_seq,
                    "dims": {
                        "hidden": dims["hidden"],
                        "vocab": vocab,
                        "layers": dims["layers"],
                        "kv_heads": dims["kv_heads"],
                        "head_dim": dims["head_dim"],
                    },
                    "embed_std": embed_std,
                    "io": ort_form_io(role, dims["layers"]),
                    "files": {key: {"name": name, "sha256": file_sha256(out / name)} for key, name in files.items()},
                    "position_ids": "from the attention mask inside GroupQueryAttention (real tokens counted from the "
                    "left: the runners feed left-padded rows right-padded)",
                    "exporter": builder,
                    "export_seconds": round(export_s, 3),
                    "eos_token_id": eos_token_id,
                    "validation": validation,
                    "versions": _versions(),
                }
                write_text_atomic(out / MODEL_JSON, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            except BaseException:
                for name in (graph_name, graph_name + ".data", "embed_tokens.npy"):
                    with contextlib.suppress(OSError):
                        (out / name).unlink(missing_ok=True)
                raise
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                (out / LOCK_NAME).unlink(missing_ok=True)
                out.rmdir()
        raise
    return manifest


def _run_builder(hf_dir: Path, role: str, out: Path, graph_name: str, precision: ModelPrecision, max_seq: int) -> str:
    """The builder in a child process, into a scratch folder; the graph and its data moved in.
    Returns the exporter's description for model.json."""
    import onnx

    options = {**ROLE_OPTIONS[role], "filename": graph_name}
    with tempfile.TemporaryDirectory(prefix=".genai-", dir=out) as scratch:
        work = Path(scratch)
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(hf_dir),
            "-o",
            str(work / "out"),
            "-p",
            BUILDER_PRECISION[precision],
            "-e",
            "cpu",
            "-c",
            str(work / "cache"),
            "--extra_options",
            *(f"{k}={v}" for k, v in options.items()),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        graph = work / "out" / graph_name
        if done.returncode != 0 or not graph.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise PrismInputError(
                f"{hf_dir}: ONNX Runtime GenAI's model builder cannot export this model ({brief(tail[0], 300)})"
            )
        model = onnx.load(str(graph), load_external_data=False)
        data = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        if data - {graph_name + ".data"}:  # the builder's file names are part of the folder's schema
            raise PrismInputError(
                f"{hf_dir}: the model builder wrote external data as {sorted(data)}, not {graph_name}.data"
            )
        for name in (graph_name + ".data", graph_name):  # the data first: a graph never points at nothing
            shutil.move(str(work / "out" / name), str(out / name))
    import onnxruntime_genai

    return (
        f"onnxruntime_genai.models.builder {onnxruntime_genai.__version__} (-p {BUILDER_PRECISION[precision]} "
        f"-e cpu, {' '.join(f'{k}={v}' for k, v in ROLE_OPTIONS[role].items())})"
    )


def run_graph(session: Any, role: str, x: np.ndarray, mask: np.ndarray, dims: dict[str, int]) -> np.ndarray:
    """One plain call of an ``ort``-form graph (an empty past), left padding fed as right padding."""
    shifts = right_padding_shifts(mask)
    feeds = {
        "input_ids" if role == "first" else "inputs_embeds": roll_rows(x, shifts),
        "attention_mask": roll_rows(mask, shifts),
    }
    dtype = np.float32
    empty = np.zeros((x.shape[0], dims["kv_heads"], 0, dims["head_dim"]), dtype=dtype)
    feeds.update({n: empty for n in past_names(dims["layers"])})
    return roll_rows(session.run([OUTPUT[role]], feeds)[0], shifts, sign=1)


def _check_graph(
    expected: Expected,
    graph: Path,
    role: str,
    precision: ModelPrecision,
    dims: dict[str, int],
) -> dict[str, Any]:
    from prism_deploy.core.ort_session import make_session
    from prism_deploy.models.export_checks import check_figures

    tol = tolerances.model_export(precision)
    session = make_session(graph, "cpu")
    figs = []
    for x, mask, ref in expected.plain:
        got = run_graph(session, role, x, mask, dims)
        figs.append(compare_logits(got, ref, mask, tie_gap=tol.tie_gap) if role == "last" else compare(got, ref, mask))
    fig = merge(figs)
    check_figures(f"{role} graph `{OUTPUT[role]}` (ort form)", fig, tol, precision)
    return {"provider": "cpu", "tolerances": tol.to_json(), OUTPUT[role]: fig}


def _eos_token_id(model: Any) -> int | None:
    from prism_deploy.models.lm_export import _eos_token_id as eos

    return eos(model)


def _versions() -> dict[str, str]:
    import onnxruntime_genai

    from prism_deploy.models.lm_export import _versions as versions

    return {**versions(), "onnxruntime_genai": onnxruntime_genai.__version__}
