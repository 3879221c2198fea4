"""``prism-deploy run --model-a DIR --adapter DIR_OR_FILE --model-b DIR (--text T --tokenizer-a DIR | --ids FILE)``."""

from __future__ import annotations

import argparse

from prism_deploy.cli.output import print_json, print_table
from prism_deploy.cli.pipeline_inputs import add_input_arguments, read_inputs
from prism_deploy.core.targets import TARGET_CHOICES


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-a", required=True, metavar="DIR", help="model A folder from `export-model --role upper`")
    p.add_argument("--adapter", required=True, metavar="DIR_OR_FILE",
                   help="adapter: a `build` folder, an exported .onnx, or the .safetensors (lowered on first use)")
    p.add_argument("--model-b", required=True, metavar="DIR", help="model B folder from `export-model --role lower`")
    p.add_argument("--target", default="ort-cpu", choices=TARGET_CHOICES,
                   help="where to run (default ort-cpu); trt runs the adapter engines with TensorRT, the models on ORT CUDA")
    p.add_argument("--adapter-precision", default=None, metavar="P", help="adapter precision to load or lower (fp32, fp16, int8)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run model A -> adapter -> model B on tokens, optionally generate greedily in B")
    add_pipeline_arguments(p)
    add_input_arguments(p)
    p.add_argument("--tokenizer-b", metavar="DIR", help="model B's tokenizer folder, to decode generated tokens")
    p.add_argument("--max-new-tokens", type=int, default=0, metavar="N", help="greedy tokens to generate in model B (default 0)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past model B's end-of-text token (by default a row stops there)")
    p.add_argument("--json", action="store_true", help="print one JSON object (with per-stage timings)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.runtime.pipeline import Pipeline

    if args.max_new_tokens < 0:
        raise PrismInputError(f"--max-new-tokens: {args.max_new_tokens} must be >= 0")
    ids, mask = read_inputs(args)
    pipe = Pipeline(args.model_a, args.adapter, args.model_b, target=args.target, adapter_precision=args.adapter_precision)
    logits = pipe(ids, mask)
    timings = dict(pipe.timings)
    last = logits[:, -1]
    result = {**pipe.describe(), "batch": int(ids.shape[0]), "seq": int(ids.shape[1]),
              "logits_shape": list(logits.shape), "next_token": last.argmax(-1).tolist(),
              "next_token_logit": last.max(-1).tolist(), "timings_s": {"forward": timings}}
    if args.max_new_tokens:
        eos = None if args.ignore_eos else pipe.lower.manifest.get("eos_token_id")
        generated = pipe.generate(ids, mask, max_new_tokens=args.max_new_tokens, eos_token_id=eos)
        result["eos_token_id"] = eos
        result["generated_ids"] = generated.tolist()
        result["timings_s"]["generate"] = dict(pipe.timings)
        if args.tokenizer_b:
            from prism_deploy.models.tokenizers import load_tokenizer

            tok_b = load_tokenizer(args.tokenizer_b)
            result["generated_text"] = [tok_b.decode(row, skip_special_tokens=True) for row in generated]
    if args.json:
        print_json(result)
        return 0
    print(f"pipeline on {pipe.provider} ({pipe.target}); adapter runner: {pipe.adapter_kind}; "
          f"d_A {pipe.upper.hidden_size} -> d_B {pipe.lower.hidden_size}, vocab_B {pipe.lower.vocab}")
    print(f"{ids.shape[0]} x {ids.shape[1]} tokens -> logits {list(logits.shape)}; next token per row: "
          f"{', '.join(map(str, result['next_token']))}")
    rows = [[stage, f"{seconds * 1e3:.2f}"] for stage, seconds in timings.items()]
    if args.max_new_tokens:
        gen = result["timings_s"]["generate"]
        rows += [["model_b_prefill", f"{gen['model_b_prefill'] * 1e3:.2f}"],
                 [f"model_b_decode ({int(gen['steps'])} steps)", f"{gen['model_b_decode'] * 1e3:.2f}"]]
    print_table(["stage", "ms"], rows)
    if args.max_new_tokens:
        for i, row in enumerate(result["generated_ids"]):
            text = f"  {result['generated_text'][i]!r}" if "generated_text" in result else ""
            print(f"generated[{i}]: {' '.join(map(str, row))}{text}")
    return 0
