"""``prism-deploy export-model HF_DIR|FILE.gguf --role first|middle|last -o DIR [--precision fp32|fp16|int8|int4] [--max-seq N] [--json]``.

With ``int8``/``int4``: ``[--form nbits|dq] [--block-size N] [--asymmetric] [--accuracy-level L]
[--quantize-embedding] [--algorithm rtn|hqq|k_quant|gptq] [--mixed [--max-error E]]
[--calibration-text FILE] [--calibration-chain CHAIN --hop N]`` (docs/quantized-models.md).
"""

from __future__ import annotations

import argparse
from typing import Any

from prism_deploy.cli.numbers import COUNT, number
from prism_deploy.cli.output import print_json, print_table
from prism_deploy.cli.paths import declare_outputs
from prism_deploy.core import defaults
from prism_deploy.core.limits import Limit
from prism_deploy.core.precision import MODEL_PRECISIONS, ModelPrecision
from prism_deploy.format.model_folder import GRAPH_FORMS, ROLE_ALIASES, ROLES
from prism_deploy.models.quantize import DEFAULT_MAX_ERROR


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export-model", help="export a local causal LM as a chain's first, middle or last model")
    p.add_argument(
        "hf_dir",
        metavar="HF_DIR",
        help="local Hugging Face model folder, or a .gguf file (its weights dequantized; nothing is downloaded)",
    )
    p.add_argument(
        "--role",
        required=True,
        choices=(*ROLES, *ROLE_ALIASES),
        metavar="{" + ",".join(ROLES) + "}",
        help="first: token ids -> final hidden states; middle: embeddings -> final hidden states; "
        "last: embeddings -> logits, with a KV-cache graph for generation "
        "(upper and lower are the old names of first and last)",
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (graphs and model.json)")
    p.add_argument(
        "--precision",
        default=defaults.MODEL_PRECISION.value,
        choices=MODEL_PRECISIONS,
        help="int8/int4: weight-only quantized MatMul weights and LM head, float activations",
    )
    q = p.add_argument_group("int8 / int4 (docs/quantized-models.md)")
    q.add_argument(
        "--form",
        default=None,
        choices=("nbits", "dq"),
        help="nbits (default): MatMulNBits, for ONNX Runtime; dq: DequantizeLinear -> MatMul, for TensorRT",
    )
    q.add_argument(
        "--block-size",
        type=number(Limit(int, 1, 1 << 16)),
        default=None,
        metavar="N",
        help="weights per scale along K: 16, 32, 64, 128 or 256 (default 32; int8 dq is per channel)",
    )
    q.add_argument("--asymmetric", action="store_true", help="zero points per block (nbits form only)")
    q.add_argument(
        "--accuracy-level",
        type=number(Limit(int, 0, 4)),
        default=None,
        metavar="L",
        help="MatMulNBits accuracy_level: 0 float compute, 4 int8 compute on CPU (default 4; nbits only)",
    )
    q.add_argument(
        "--quantize-embedding",
        action="store_true",
        help="also quantize embedding tables that the graph gathers from (int4, nbits form)",
    )
    q.add_argument(
        "--algorithm",
        default=None,
        choices=("rtn", "hqq", "k_quant", "gptq"),
        help="ONNX Runtime's weight-only algorithm: rtn (default, round to nearest), hqq, k_quant, "
        "gptq (int4, calibrated on text); hqq/k_quant/gptq: nbits form",
    )
    q.add_argument(
        "--mixed",
        action="store_true",
        help="per layer: the fewest bits (int4, int8, else float) whose error on calibration text "
        "is within --max-error; each choice and its error go into model.json",
    )
    q.add_argument(
        "--max-error",
        type=number(Limit(float, 0.0, 1.0, low_open=True)),
        default=None,
        metavar="E",
        help="--mixed's bound: relative L2 error of one layer's output on calibration text, below 1 "
        f"(default {DEFAULT_MAX_ERROR:g})",
    )
    q.add_argument(
        "--calibration-text",
        default=None,
        metavar="FILE",
        help="UTF-8 text for GPTQ and --mixed (default: the calibration part of the default corpus, Python's pydoc topics)",
    )
    q.add_argument(
        "--calibration-chain",
        default=None,
        metavar="CHAIN",
        help="middle/last with GPTQ or --mixed: calibrate on what this model reads in the chain, the "
        "text through model N and the adapter of --hop N (this model is the chain's model N+1)",
    )
    q.add_argument(
        "--hop",
        type=number(Limit(int, 1, 1 << 10)),
        default=None,
        metavar="N",
        help="with --calibration-chain: the hop whose adapter feeds this model (from 1)",
    )
    p.add_argument(
        "--graph-form",
        default="portable",
        choices=GRAPH_FORMS,
        help="portable (default): standard ONNX from the PyTorch tracer, what TensorRT parses; ort: "
        "ONNX Runtime's fused operators (GroupQueryAttention, SkipSimplifiedLayerNormalization, "
        "MatMulNBits) from ONNX Runtime GenAI's model builder, with a shared preallocated KV cache "
        "(fp32, int8, int4; docs/model-forms.md)",
    )
    p.add_argument(
        "--max-seq",
        type=number(COUNT),
        default=None,
        metavar="N",
        help="longest sequence the pipeline will accept (default: the model's limit, at most 2048)",
    )
    p.add_argument(
        "--text",
        metavar="FILE",
        default=None,
        help="UTF-8 text for the real-text validation, paragraphs separated by blank lines (every fifth "
        "held out and used; default: the prose of Python's pydoc_data.topics, docs/real-models.md)",
    )
    p.add_argument("--json", action="store_true", help="print the manifest as one JSON object")
    p.add_argument(
        "--force",
        action="store_true",
        help="export into a folder holding files export-model did not write (they are kept)",
    )
    declare_outputs(p, files=(), folders=("output",))
    p.set_defaults(func=run, needs=("torch", "transformers"))


def quantization_spec(args: argparse.Namespace, precision: ModelPrecision) -> object | None:
    """The checked quantization options, or None for a float precision (where giving any is bad input)."""
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.models import quantize

    given = [
        flag
        for flag, value in (
            ("--form", args.form),
            ("--block-size", args.block_size),
            ("--asymmetric", args.asymmetric),
            ("--accuracy-level", args.accuracy_level),
            ("--quantize-embedding", args.quantize_embedding),
            ("--algorithm", args.algorithm),
            ("--mixed", args.mixed),
            ("--max-error", args.max_error),
            ("--calibration-text", args.calibration_text),
            ("--calibration-chain", args.calibration_chain),
            ("--hop", args.hop),
        )
        if value not in (None, False)
    ]
    if not precision.weight_only:
        if given:
            raise PrismInputError(f"{given[0]}: only with --precision int8 or int4")
        return None
    return quantize.make_spec(
        precision,
        form=args.form or "nbits",
        block_size=args.block_size,
        symmetric=not args.asymmetric,
        accuracy_level=args.accuracy_level,
        embedding=args.quantize_embedding,
        algorithm=args.algorithm or "rtn",
        mixed=args.mixed,
        max_error=args.max_error,
    )


def _calibration_text(path: str | None, spec: object | None) -> str | None:
    """The text of ``--calibration-text``, read before the model is loaded."""
    from prism_deploy.core.errors import PrismInputError

    if path is None:
        return None
    if not getattr(spec, "needs_calibration", False):
        raise PrismInputError("--calibration-text: only GPTQ and --mixed calibrate; give one of them")
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise PrismInputError(f"{path}: cannot read it as UTF-8 text ({type(exc).__name__})") from None


def _chain_inputs(args: argparse.Namespace, spec: object | None, text: str | None) -> Any:
    """``--calibration-chain CHAIN --hop N``: the upstream adapter's outputs on the calibration text."""
    from prism_deploy.core.errors import PrismInputError

    if args.calibration_chain is None:
        if args.hop is not None:
            raise PrismInputError("--hop: only with --calibration-chain")
        return None
    if not getattr(spec, "needs_calibration", False):
        raise PrismInputError("--calibration-chain: only GPTQ and --mixed calibrate; give one of them")
    if ROLE_ALIASES.get(args.role, args.role) == "first":
        raise PrismInputError(
            "--calibration-chain: a first model reads token ids, not an adapter's output; it calibrates on text"
        )
    if args.graph_form == "ort":
        return None  # refused with the other quantization options below
    from prism_deploy.cli.chain_calibration import chain_calibration_inputs

    return chain_calibration_inputs(args.calibration_chain, args.hop, args.hf_dir, text)


def _calibration_label(calibration: dict[str, Any]) -> str:
    if calibration["source"] == "chain":
        return f"{calibration['text']} through hop {calibration['hop']} of {calibration['chain']}"
    return str(calibration["source"])


def run(args: argparse.Namespace) -> int:
    import sys

    from prism_deploy.models.lm_export import export_model

    if args.role in ROLE_ALIASES:
        print(f"note: --role {args.role} is now called --role {ROLE_ALIASES[args.role]}", file=sys.stderr)
    precision = ModelPrecision(args.precision)  # the CLI's edge: parsed once (choices= checked the name)
    spec = quantization_spec(args, precision)  # checked before the model is loaded
    text = _calibration_text(args.calibration_text, spec)
    inputs = _chain_inputs(args, spec, text)
    if args.graph_form == "ort":
        from prism_deploy.core.errors import PrismInputError
        from prism_deploy.models.ort_form_builder import export_ort_form

        if any(
            v not in (None, False)
            for v in (
                args.form,
                args.block_size,
                args.asymmetric,
                args.accuracy_level,
                args.quantize_embedding,
                args.algorithm,
                args.mixed,
                args.max_error,
                args.calibration_text,
                args.calibration_chain,
            )
        ):
            raise PrismInputError(
                "--graph-form ort: the quantization options are the model builder's own "
                "(block 32, symmetric, round to nearest); give only --precision"
            )
        manifest = export_ort_form(
            args.hf_dir, args.role, args.output, precision=precision, max_seq=args.max_seq, force=args.force
        )
    else:
        manifest = export_model(
            args.hf_dir,
            args.role,
            args.output,
            precision=precision,
            max_seq=args.max_seq,
            quantization=spec,
            force=args.force,
            text=args.text,
            calibration_text=text,
            calibration_inputs=inputs,
        )
    if args.json:
        print_json(manifest)
        return 0
    dims = manifest["dims"]
    print(
        f"{args.hf_dir}: {manifest['family']} exported as {manifest['role']} ({manifest['precision']}) to {args.output} "
        f"in {manifest['export_seconds']:.1f} s; hidden {dims['hidden']}, vocab {dims['vocab']}, "
        f"{dims['layers']} layers, max seq {manifest['max_seq']}"
    )
    rows = []
    for output, fig in manifest["validation"].items():
        if not isinstance(fig, dict) or "tokens" not in fig:
            continue
        rows.append(
            [
                output,
                fig["tokens"],
                f"{fig['max_abs']:.3g}",
                f"{fig['rel_l2']:.3g}",
                f"{fig['min_cosine']:.6f}",
                f"{fig['top1']:.3f}" if "top1" in fig else "-",
                f"{fig['kl_max']:.3g}" if "kl_max" in fig else "-",
            ]
        )
    validation = manifest["validation"]
    real = validation.get("real_text")
    gated = validation.get("random_inputs", "gated") == "gated"
    print(
        "validation against transformers on ONNX Runtime CPU (random inputs, one left-padded row"
        + ("" if gated else "; reported, not gated: real text gates a language model")
        + "):"
    )
    print_table(["output", "tokens", "max abs", "rel L2", "min cosine", "top-1", "KL max"], rows)
    if real:
        fig, nt = real["output"], real["next_token"]
        print(
            f"on real text ({real['corpus']['name']}, held-out part, {nt['tokens']} tokens): rel L2 {fig['rel_l2']:.3g}, "
            f"min cosine {fig['min_cosine']:.6f}, next-token top-1 agreement {nt['agreement']:.3f}, perplexity "
            f"{nt['perplexity']:.3f} vs {nt['perplexity_reference']:.3f} float32 (x{nt['perplexity_ratio']:.4f})"
            + ("" if real["language_model"] else "; the model does not predict the text (perplexity not gated)")
        )
    q = manifest.get("quantization")
    if q:
        if q.get("mixed"):
            plan = next(iter(q["graphs"].values()))["plan"]
            counts = {
                label: sum(1 for b in plan.values() if b == bits)
                for label, bits in (("int4", 4), ("int8", 8), ("float", None))
            }
            print(
                f"mixed plan ({q['algorithm']}, max error {q['max_error']:g} on {q['calibration']['tokens']} tokens of "
                f"{_calibration_label(q['calibration'])}): "
                + ", ".join(f"{n} {label}" for label, n in counts.items() if n)
            )
        block = "per channel" if q["block_size"] is None else f"block {q['block_size']}"
        print(
            f"quantized: {manifest['precision']} {q['form']}, {block}, {'symmetric' if q['symmetric'] else 'asymmetric'}"
            + (f", accuracy level {q['accuracy_level']}" if q["accuracy_level"] is not None else "")
            + "; "
            + "; ".join(
                f"{key}: {sum('quantized' in x for x in g['layers'])} weights quantized, "
                f"{sum('kept' in x for x in g['layers'])} kept float, "
                f"{g['quantized_bytes_float'] / 2**20:.2f} -> {g['quantized_bytes'] / 2**20:.2f} MiB"
                for key, g in q["graphs"].items()
            )
            + " (model.json lists each weight)"
        )
    if not manifest["known_family"]:
        print(f"note: family {manifest['family']!r} is not one of the tested ones; the validation above passed")
    return 0
