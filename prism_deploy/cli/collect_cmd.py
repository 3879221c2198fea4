"""``prism-deploy collect --model-a HF_DIR --model-b HF_DIR [--text FILE] -o pairs.safetensors``."""

from __future__ import annotations

import argparse
from pathlib import Path

from prism_deploy.cli.numbers import COUNT, number
from prism_deploy.cli.output import print_json
from prism_deploy.cli.paths import declare_outputs, refuse_overlap
from prism_deploy.core.limits import Limit


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "collect", help="paired activations for `fit`: X = model A hidden states, Z = model B embeddings"
    )
    p.add_argument("--model-a", metavar="HF_DIR", help="model A's local Hugging Face folder, or a .gguf file")
    p.add_argument("--model-b", metavar="HF_DIR", help="model B's local Hugging Face folder, or a .gguf file")
    p.add_argument("--chain", metavar="FILE", help="instead of --model-a/--model-b: a chain file, with --hop")
    p.add_argument(
        "--hop",
        type=number(Limit(int, 1, 1 << 10)),
        metavar="N",
        help="with --chain: the hop from model N to model N+1 (from 1), their `hf` folders",
    )
    p.add_argument(
        "--graph", metavar="FILE", help="instead of --model-a/--model-b: a graph file, with --edge (docs/graphs.md)"
    )
    p.add_argument(
        "--edge",
        metavar="ADAPTER",
        help="with --graph: the adapter stage (by name) whose pairs to collect: X = its input models' hidden "
        "states (concatenated in its inputs' order for a fusion adapter), Z = the embeddings of the "
        "model it feeds, from their `hf` folders",
    )
    p.add_argument("--tokenizer-a", metavar="DIR", help="model A's tokenizer folder (default: --model-a)")
    p.add_argument("--tokenizer-b", metavar="DIR", help="model B's tokenizer folder (default: --model-b)")
    p.add_argument(
        "--text",
        metavar="FILE",
        default=None,
        help="UTF-8 text file, one text per non-empty line (default: the calibration part of the prose "
        "of Python's pydoc_data.topics, one paragraph per text; docs/real-models.md)",
    )
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="output .safetensors with tensors X and Z")
    p.add_argument(
        "--pool",
        default="last",
        choices=("last", "mean", "tokens"),
        help="one row per text (last token / mean) or per model-A token aligned by char offsets",
    )
    p.add_argument(
        "--max-seq", type=number(COUNT), default=512, metavar="N", help="truncate texts to N tokens (default 512)"
    )
    p.add_argument(
        "--batch",
        type=number(Limit(int, 1, 1 << 16)),
        default=8,
        metavar="N",
        help="texts per forward pass (default 8)",
    )
    p.add_argument("--json", action="store_true", help="print what was written as one JSON object")
    declare_outputs(p, files=("output",), folders=())
    p.set_defaults(func=run, needs=("torch", "transformers"))


def run(args: argparse.Namespace) -> int:
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.models.collect import collect_pairs, read_texts, save_pairs

    if args.graph is not None or args.edge is not None:
        return run_graph_edge(args)
    if args.chain is not None:
        if args.model_a is not None or args.model_b is not None:
            raise PrismInputError("--chain: give a chain file and --hop, or --model-a and --model-b, not both")
        args.model_a, args.model_b = hop_models(args.chain, args.hop)
        # the chain file's folders are inputs too (the command line's are checked by main)
        refuse_overlap(Path(args.output), [args.model_a, args.model_b])
    elif args.hop is not None:
        raise PrismInputError("--hop: only with --chain")
    if args.model_a is None or args.model_b is None:
        raise PrismInputError("collect: give --model-a HF_DIR and --model-b HF_DIR, or --chain FILE --hop N")
    if not str(args.output).endswith(".safetensors"):
        raise PrismInputError(f"-o: {args.output}: the output must be a .safetensors file")
    if args.text is None:
        from prism_deploy.core import corpus

        texts = list(corpus.default().calibration)
    else:
        texts = read_texts(args.text)
    x, z, info = collect_pairs(
        args.model_a,
        args.model_b,
        texts,
        pool=args.pool,
        max_seq=args.max_seq,
        batch=args.batch,
        tokenizer_a=args.tokenizer_a,
        tokenizer_b=args.tokenizer_b,
    )
    save_pairs(args.output, x, z, info)
    info["output"] = str(args.output)
    if args.json:
        print_json(info)
    else:
        print(
            f"{args.output}: X {list(x.shape)} (model A hidden), Z {list(z.shape)} (model B embeddings), "
            f"pool {args.pool}, {info['texts']} texts"
            + (f", {info['skipped_texts']} skipped (no tokens)" if info["skipped_texts"] else "")
            + (f", {info['truncated_texts']} truncated to {args.max_seq} tokens" if info["truncated_texts"] else "")
        )
        print("tensors: X (model A hidden states, the fit inputs) and Z (model B embeddings, the targets)")
    return 0


def hop_models(chain_file: str, hop: int | None, command: str = "collect") -> tuple[str, str]:
    """The Hugging Face folders of models ``hop`` and ``hop + 1`` of a chain file (``command``:
    the one that needs them, as errors name it)."""
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.format.chain_file import read_chain_file

    spec = read_chain_file(chain_file)
    models = spec.models
    if hop is None or not 1 <= hop < len(models):
        raise PrismInputError(f"--hop: {hop!r} must be in 1..{len(models) - 1} (the chain has {len(models)} models)")
    pair = models[hop - 1], models[hop]
    for s in pair:
        if s.hf is None:
            raise PrismInputError(f"{spec.where()}: {s.label}: {command} needs its Hugging Face folder (hf = ...)")
    return str(pair[0].hf), str(pair[1].hf)


def edge_models(graph_file: str, edge: str | None) -> tuple[list[str], str]:
    """The Hugging Face folders of an adapter stage's input models and of the model it feeds."""
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.format.graph_file import read_graph_file

    spec = read_graph_file(graph_file)
    adapters = [n for n in spec.nodes if n.kind == "adapter"]
    node = next((n for n in adapters if n.name == edge), None)
    if node is None:
        raise PrismInputError(
            f"--edge: {edge!r} is not an adapter stage of {graph_file} (one of {', '.join(n.name for n in adapters)})"
        )
    after = [spec.nodes[j] for j in spec.consumers(node.index)]
    if len(after) != 1:
        raise PrismInputError(f"{spec.where()}: {node.label}: feeds {len(after)} models; collect pairs one target")
    folders = []
    for m in [spec.nodes[i] for i in node.inputs] + after:
        if m.stage is None or m.stage.hf is None:
            raise PrismInputError(f"{spec.where()}: {m.label}: collect needs its Hugging Face folder (hf = ...)")
        folders.append(str(m.stage.hf))
    return folders[:-1], folders[-1]


def run_graph_edge(args: argparse.Namespace) -> int:
    """``collect --graph FILE --edge ADAPTER``: one edge's pairs (a fusion adapter's included)."""
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.models.collect import collect_fusion_pairs, collect_pairs, read_texts, save_pairs

    if args.graph is None or args.edge is None:
        raise PrismInputError("--graph and --edge go together: a graph file and the adapter stage to collect for")
    if args.model_a is not None or args.model_b is not None or args.chain is not None or args.hop is not None:
        raise PrismInputError("--graph: give a graph file and --edge alone (not --model-a/--model-b or --chain)")
    if not str(args.output).endswith(".safetensors"):
        raise PrismInputError(f"-o: {args.output}: the output must be a .safetensors file")
    inputs, downstream_model = edge_models(args.graph, args.edge)
    refuse_overlap(Path(args.output), [*inputs, downstream_model])
    if args.text is None:  # the default real-text corpus, as for one pair of models
        from prism_deploy.core import corpus

        texts = list(corpus.default().calibration)
    else:
        texts = read_texts(args.text)
    if len(inputs) == 1:
        x, z, info = collect_pairs(
            inputs[0],
            downstream_model,
            texts,
            pool=args.pool,
            max_seq=args.max_seq,
            batch=args.batch,
            tokenizer_a=args.tokenizer_a,
            tokenizer_b=args.tokenizer_b,
        )
    else:
        if args.tokenizer_a is not None or args.tokenizer_b is not None:
            raise PrismInputError("--tokenizer-a/--tokenizer-b: a fusion edge reads each model's own tokenizer")
        x, z, info = collect_fusion_pairs(
            inputs, downstream_model, texts, pool=args.pool, max_seq=args.max_seq, batch=args.batch
        )
    info["edge"] = args.edge
    save_pairs(args.output, x, z, info)
    info["output"] = str(args.output)
    if args.json:
        print_json(info)
    else:
        print(
            f"{args.output}: X {list(x.shape)} (hidden states of {len(inputs)} input model(s)"
            f"{', concatenated' if len(inputs) > 1 else ''}), Z {list(z.shape)} (embeddings of the model it feeds), "
            f"edge {args.edge}, pool {args.pool}, {info['texts']} texts"
            + (f", {info['skipped_texts']} skipped" if info["skipped_texts"] else "")
        )
    return 0
