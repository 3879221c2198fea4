"""``prism-deploy run (--chain FILE | --graph FILE | --model-a DIR --adapter DIR_OR_FILE --model-b DIR) (--text T | --ids FILE)``."""

from __future__ import annotations

import argparse
from typing import Any

from prism_deploy.cli.numbers import COUNT_OR_ZERO, number
from prism_deploy.cli.output import print_json, print_table
from prism_deploy.cli.pipeline_inputs import add_input_arguments, read_inputs
from prism_deploy.core.precision import PRECISIONS, Precision
from prism_deploy.core.targets import TARGET_CHOICES


def add_chain_arguments(p: argparse.ArgumentParser) -> None:
    """What to run: a chain file, or the two-model case spelled out."""
    p.add_argument(
        "--chain",
        metavar="FILE",
        help="a chain file (chain.toml / chain.json) or a `build --chain` folder: models and adapters in order",
    )
    p.add_argument(
        "--graph",
        metavar="FILE",
        help="a graph file (a chain file whose stages name their inputs; docs/graphs.md) or a `build --graph` "
        "folder; any chain file runs as a graph too",
    )
    p.add_argument(
        "--model-a", metavar="DIR", help="two-model case: the first model (export-model --role first, or its build)"
    )
    p.add_argument(
        "--adapter",
        metavar="DIR_OR_FILE",
        help="two-model case: a `build` folder, an exported .onnx, or the .safetensors (lowered on first use)",
    )
    p.add_argument(
        "--model-b", metavar="DIR", help="two-model case: the last model (export-model --role last, or its build)"
    )
    p.add_argument(
        "--target",
        default=None,
        choices=TARGET_CHOICES,
        help="where to run (default: the chain file's, else ort-cpu); trt runs adapter engines with "
        "TensorRT, the models on ONNX Runtime CUDA",
    )
    p.add_argument(
        "--adapter-precision",
        default=None,
        choices=PRECISIONS,
        metavar="P",
        help="two-model case: the adapter precision to load or lower",
    )


def open_chain(args: argparse.Namespace) -> Any:
    """The ``Chain`` the arguments name (``Pipeline`` for the two-model spelling)."""
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.runtime.chain import Chain, Pipeline, chain_path

    pair = (args.model_a, args.adapter, args.model_b)
    if args.graph is not None:
        if args.chain is not None or any(v is not None for v in pair) or args.adapter_precision is not None:
            raise PrismInputError(
                "--graph: give a graph file alone (not with --chain or --model-a/--adapter/--model-b)"
            )
        from prism_deploy.runtime.graph import Graph, graph_path

        return Graph.from_file(graph_path(args.graph), args.target)
    if args.chain is not None:
        if any(v is not None for v in pair) or args.adapter_precision is not None:
            raise PrismInputError("--chain: give a chain file, or --model-a/--adapter/--model-b, not both")
        return Chain.from_file(chain_path(args.chain), args.target)
    if any(v is None for v in pair):
        raise PrismInputError(
            "give --chain FILE, --graph FILE, or all of --model-a DIR --adapter DIR_OR_FILE --model-b DIR"
        )
    return Pipeline(
        args.model_a,
        args.adapter,
        args.model_b,
        target=args.target or "ort-cpu",
        adapter_precision=Precision(args.adapter_precision) if args.adapter_precision else None,
        precision_keyword="--adapter-precision",
    )  # parsed once here (choices= checked the name)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="run a chain (model -> adapter -> model ...) on tokens, optionally generate greedily"
    )
    add_chain_arguments(p)
    add_input_arguments(p)
    p.add_argument(
        "--tokenizer-b",
        metavar="DIR",
        help="the last model's tokenizer folder, to decode generated tokens (default: the chain file's)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=number(COUNT_OR_ZERO),
        default=0,
        metavar="N",
        help="greedy tokens to generate in the last model (default 0)",
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating past the last model's end-of-text token (by default a row stops there)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (with per-stage timings)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prism_deploy.core.errors import PrismInputError

    if args.max_new_tokens < 0:
        raise PrismInputError(f"--max-new-tokens: {args.max_new_tokens} must be >= 0")
    chain = open_chain(args)
    ids, mask = read_inputs(args, chain)
    logits = chain(ids, mask)
    timings = dict(chain.timings)
    last = logits[:, -1]
    result = {
        **chain.describe(),
        "batch": int(ids.shape[0]),
        "seq": int(ids.shape[1]),
        "logits_shape": list(logits.shape),
        "next_token": last.argmax(-1).tolist(),
        "next_token_logit": last.max(-1).tolist(),
        "timings_s": {"forward": timings},
    }
    if args.max_new_tokens:
        eos = None if args.ignore_eos else chain.last.manifest.get("eos_token_id")
        generated = chain.generate(ids, mask, max_new_tokens=args.max_new_tokens, eos_token_id=eos)
        result["eos_token_id"] = eos
        result["generated_ids"] = generated.tolist()
        result["timings_s"]["generate"] = dict(chain.timings)
        tokenizer = args.tokenizer_b or (chain.spec.tokenizers.get("last") if chain.spec is not None else None)
        if tokenizer:
            from prism_deploy.models.tokenizers import load_tokenizer

            tok = load_tokenizer(tokenizer)
            result["generated_text"] = [tok.decode(row, skip_special_tokens=True) for row in generated]
    if args.json:
        print_json(result)
        return 0
    widths = " -> ".join(f"{s['name']} ({s.get('role') or s.get('runner')})" for s in result["stages"])
    if args.graph is not None:  # not a line: each stage with the stages it takes
        widths = "; ".join(
            f"{s['name']} ({s.get('role') or s.get('runner') or s.get('fusion')})"
            + (f" <- {' + '.join(s['inputs'])}" if s["inputs"] else "")
            for s in result["stages"]
        )
    what = "graph" if args.graph is not None else "chain"
    print(f"{what} on {chain.provider} ({chain.target}): {widths}")
    if args.graph is not None:
        print("waves (stages that run at the same time): " + " | ".join(", ".join(w) for w in result["waves"]))
    print(
        f"{ids.shape[0]} x {ids.shape[1]} tokens -> logits {list(logits.shape)}; next token per row: "
        f"{', '.join(map(str, result['next_token']))}"
    )
    rows = [[stage, f"{seconds * 1e3:.2f}"] for stage, seconds in timings.items()]
    if args.max_new_tokens:
        gen = result["timings_s"]["generate"]
        name = chain.names[-1]
        rows += [
            [f"{name}_prefill", f"{gen[f'{name}_prefill'] * 1e3:.2f}"],
            [f"{name}_decode ({int(gen['steps'])} steps)", f"{gen[f'{name}_decode'] * 1e3:.2f}"],
        ]
    print_table(["stage", "ms"], rows)
    if args.max_new_tokens:
        for i, row in enumerate(result["generated_ids"]):
            text = f"  {result['generated_text'][i]!r}" if "generated_text" in result else ""
            print(f"generated[{i}]: {' '.join(map(str, row))}{text}")
    return 0
