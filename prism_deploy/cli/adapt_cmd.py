"""``prism-deploy adapt REPO --model NAME --from DIR``: one adaptation round on recorded traffic.

Recorded request text (``serve --record DIR``) -> pairs from the hop's two models (``collect``'s
code) -> the served adapter's worst workers on them (``workers``) -> two candidates, the worst
``--top`` workers re-solved and every worker re-solved (``refit``) -> the gate (better on the
recorded held-out texts, not worse than ``--margin`` on the original held-out set) -> the build
with the parity gate and the hot-swap of ``triton update``. Every round that gets to the gate is
recorded in ``REPO/prism-adapt-log.json``; ``adapt REPO --log`` prints it. Exit 0: the new
version is live; 1: the gate refused it (nothing served changed); 2: bad or too little data
(nothing changed, nothing logged). See docs/adaptation.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from prism_deploy.cli.fit_cmd import number as fit_number
from prism_deploy.cli.numbers import COUNT, number
from prism_deploy.core.limits import Limit

FRACTION_OPEN = Limit(float, 0.0, 1.0, low_open=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("adapt", help="refit a served adapter on recorded request text; gate; hot-swap")
    p.add_argument("repository", metavar="REPO", help="a repository written by `prism-deploy triton`")
    p.add_argument("--model", help="the served adapter model (default: the repository's only one)")
    p.add_argument("--log", action="store_true", help="print the adaptation rounds recorded for REPO and exit")
    p.add_argument("--from", dest="records", metavar="DIR", help="the folder `serve --record DIR` wrote")
    p.add_argument("--model-a", metavar="HF_DIR", help="the hop's first model (Hugging Face folder)")
    p.add_argument("--model-b", metavar="HF_DIR", help="the hop's second model (Hugging Face folder)")
    p.add_argument("--chain", metavar="FILE", help="instead of --model-a/--model-b: a chain file, with --hop")
    p.add_argument("--hop", type=number(Limit(int, 1, 1 << 10)), metavar="N", help="with --chain: the hop (from 1)")
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="the tokenizer that made the recorded ids, to read them back as text (default: --model-a)",
    )
    p.add_argument(
        "--original",
        metavar="PAIRS",
        help="the pairs the adapter was fitted on (X and Z in one .safetensors, as `collect` writes)",
    )
    p.add_argument(
        "--original-holdout",
        type=fit_number("holdout"),
        default=0.1,
        help="the held-out fraction fit used on --original (default 0.1)",
    )
    p.add_argument(
        "--original-seed", type=fit_number("seed"), default=0, help="the seed fit used on --original (default 0)"
    )
    p.add_argument(
        "--adapter",
        metavar="FILE",
        help="the served adapter's .safetensors (default: the file the repository recorded for the "
        "served version; its sha256 is checked against the served build)",
    )
    p.add_argument(
        "--holdout",
        type=number(FRACTION_OPEN),
        default=0.25,
        help="fraction of the recorded texts held out to judge the round (default 0.25)",
    )
    p.add_argument("--seed", type=fit_number("seed"), default=0, help="seed of the recorded texts' held-out split")
    p.add_argument(
        "--top", type=number(COUNT), default=8, help="workers re-solved in the 'worst' candidate (default 8)"
    )
    p.add_argument(
        "--margin",
        type=number(Limit(float, 0.0, 1e6)),
        default=0.05,
        help="relative error allowed above the served adapter's on the original set (default 0.05)",
    )
    p.add_argument("--ridge", type=fit_number("ridge"), default=0.0, help="ridge of the re-solves (default 0)")
    p.add_argument(
        "--pool",
        default="tokens",
        choices=("last", "mean", "tokens"),
        help="pairs per text, as `collect --pool` (default tokens)",
    )
    p.add_argument("--max-seq", type=number(COUNT), default=512, metavar="N", help="truncate texts to N tokens")
    p.add_argument(
        "--min-texts",
        type=number(Limit(int, 2, 1 << 30)),
        default=8,
        help="fewer recorded texts stop the round (default 8)",
    )
    p.add_argument(
        "--keep", type=number(Limit(int, 1, 1 << 20)), default=5, help="versions of the adapter model kept (default 5)"
    )
    p.add_argument(
        "--every",
        type=number(Limit(float, 1.0, 1e7)),
        metavar="SECONDS",
        help="keep running: every SECONDS, run a round when --min-new records have arrived since the last",
    )
    p.add_argument(
        "--min-new", type=number(COUNT), metavar="N", help="with --every: new records that start a round (default 64)"
    )
    p.add_argument("--rounds", type=number(COUNT), metavar="N", help="with --every: stop after N rounds")
    p.add_argument("--url", metavar="HOST:PORT", help="the running server (default: the one `serve` recorded)")
    p.add_argument("--no-load", action="store_true", help="write the version only; do not ask a server to load it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(
        func=run,
        needs=("torch", "transformers"),
        graph_hint="adapt reads a chain file (--chain FILE --hop N) or --model-a HF_DIR --model-b HF_DIR: "
        "give the two models of the graph edge with --model-a and --model-b",
    )


def run(args: argparse.Namespace) -> int:
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.serving.repository import read_manifest
    from prism_deploy.serving.versions import adapter_model, round_lock

    root = Path(args.repository)
    manifest = read_manifest(root)
    if args.log:
        return show_log(args)
    model = adapter_model(manifest, args.repository, args.model)
    if args.records is None or args.original is None:
        raise PrismInputError("adapt: give --from DIR (recorded text) and --original PAIRS (the fit's data), or --log")
    if args.chain is not None:
        from prism_deploy.cli.collect_cmd import hop_models

        if args.model_a is not None or args.model_b is not None:
            raise PrismInputError("--chain: give a chain file and --hop, or --model-a and --model-b, not both")
        args.model_a, args.model_b = hop_models(args.chain, args.hop, "adapt")
    if args.model_a is None or args.model_b is None:
        raise PrismInputError("adapt: give --model-a HF_DIR and --model-b HF_DIR, or --chain FILE --hop N")
    if args.every is None and (args.min_new is not None or args.rounds is not None):
        raise PrismInputError("--min-new and --rounds need --every SECONDS")
    with round_lock(root, model):  # held while watching too: no other round on this adapter meanwhile
        return adapt_once(args, root, model) if args.every is None else watch(args, root, model)


def watch(args: argparse.Namespace, root: Path, model: str) -> int:
    """Rounds while records arrive: a round each time ``--min-new`` records are newer than those
    the previous round saw (each round reads every record in the folder: the budget's window).
    A round stopped for its data, or by a write the disk refused (it may have room by the next
    round), is reported in one line and the watch goes on."""
    from prism_deploy.core.errors import OutputError, PrismInputError
    from prism_deploy.serving.record import record_files

    folder = Path(args.records)
    if not folder.is_dir():
        raise PrismInputError(f"--from {args.records}: no such record folder")
    min_new = args.min_new or 64
    seen: str | None = None
    done = 0
    while True:
        files = record_files(folder)
        if len([f for f in files if seen is None or f.name > seen]) >= min_new:
            try:
                if adapt_once(args, root, model) == 0:
                    args.adapter = None  # the new version's own file, recorded in the repository
                done += 1
            except (PrismInputError, OutputError) as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            seen = files[-1].name
            sys.stdout.flush()
            if args.rounds is not None and done >= args.rounds:
                return 0
        time.sleep(args.every)


def recorded_texts(folder: str, tokenizer_dir: str, *, named: bool = False) -> tuple[list[str], dict[str, Any]]:
    """The recorded rows read back as text by the tokenizer that made them: the records name it
    (the first model's source folder); a folder of another name is refused unless the user
    ``named`` it (``--tokenizer``)."""
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.models.tokenizers import load_tokenizer
    from prism_deploy.serving.record import read_records

    records = read_records(folder)
    names = sorted({str(r.get("tokenizer")) for r in records})
    ours = Path(tokenizer_dir).resolve().name
    if records and names != [ours] and not (named and len(names) == 1):
        raise PrismInputError(
            f"{folder}: recorded with tokenizer {', '.join(names)}, reading with {ours} "
            f"({tokenizer_dir}); pass --tokenizer DIR, the first model's tokenizer; nothing was changed"
        )
    tok = load_tokenizer(tokenizer_dir)
    texts = []
    size = len(tok)
    for r in records:
        for row in r["ids"]:
            if any(not 0 <= int(v) < size for v in row):
                raise PrismInputError(
                    f"{folder}: a recorded id is outside the {size} ids of the tokenizer "
                    f"{tokenizer_dir}; pass --tokenizer DIR, the one that made them; nothing was changed"
                )
            text = tok.decode([int(v) for v in row], skip_special_tokens=True).strip()
            if text:
                texts.append(text)
    times = [float(r["time"]) for r in records if isinstance(r.get("time"), (int, float))]
    return texts, {
        "records": len(records),
        "tokenizer": ours,
        "first": min(times) if times else None,
        "last": max(times) if times else None,
    }


def _served_adapter(args: argparse.Namespace, root: Path, model: str) -> Path:
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.core.fsutil import file_sha256
    from prism_deploy.serving.repository import read_manifest
    from prism_deploy.serving.update import versions_of
    from prism_deploy.serving.versions import model_dir, version_adapter_sha256

    mdir = model_dir(root, model)
    served = max(versions_of(mdir), default=None)
    if served is None:
        raise PrismInputError(f"{mdir}: no version folders")
    expected = version_adapter_sha256(mdir, served)
    if args.adapter is not None:
        path = Path(args.adapter)
    else:
        source = read_manifest(root)["models"][model].get("sources", {}).get(str(served))
        path = Path(source) if source else Path()
        if not (source and path.suffix == ".safetensors" and path.is_file()):
            raise PrismInputError(
                f"{root}: version {served} of {model} was built from {source or 'an unrecorded source'}; "
                "give the served adapter's file with --adapter FILE"
            )
    if not path.is_file():
        raise PrismInputError(f"--adapter {path}: no such adapter file")
    if expected is not None and file_sha256(path) != expected:
        raise PrismInputError(f"--adapter {path}: not the adapter served as {model} version {served} (sha256 differs)")
    return path


def adapt_once(args: argparse.Namespace, root: Path, model: str) -> int:
    import tempfile

    import numpy as np

    from prism_deploy.builder import build_engines
    from prism_deploy.cli.output import print_json
    from prism_deploy.core.errors import PrismInputError, brief
    from prism_deploy.fit import PairedData, holdout_mask
    from prism_deploy.fit.adapt import adapt_round
    from prism_deploy.format import read_adapter_file, write_adapter_file
    from prism_deploy.models.collect import collect_pairs
    from prism_deploy.parity.build_checks import adapter_engine_check
    from prism_deploy.serving.update import update_adapter
    from prism_deploy.serving.versions import ADAPTED_DIR, append_log, model_dir, prune

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    unchanged = "nothing was changed"
    texts, data_info = recorded_texts(args.records, args.tokenizer or args.model_a, named=args.tokenizer is not None)
    if len(texts) < args.min_texts:
        raise PrismInputError(
            f"{args.records}: {len(texts)} recorded texts, fewer than --min-texts {args.min_texts}; {unchanged}"
        )
    if len(set(texts)) < 2:
        raise PrismInputError(f"{args.records}: every recorded text is the same text; {unchanged}")
    held = holdout_mask(0, len(texts), args.holdout, args.seed)
    eval_texts = [t for t, h in zip(texts, held) if h]
    fit_texts = [t for t, h in zip(texts, held) if not h]
    if not eval_texts or not fit_texts:
        raise PrismInputError(
            f"{args.records}: {len(texts)} texts leave no {'held-out' if not eval_texts else 'fitting'} "
            f"text at --holdout {args.holdout}; {unchanged}"
        )
    adapter_path = _served_adapter(args, root, model)
    stored = read_adapter_file(adapter_path)
    x_fit, z_fit, _ = collect_pairs(
        args.model_a, args.model_b, fit_texts, pool=args.pool, max_seq=args.max_seq, progress=False
    )
    x_eval, z_eval, _ = collect_pairs(
        args.model_a, args.model_b, eval_texts, pool=args.pool, max_seq=args.max_seq, progress=False
    )
    cfg = stored.config
    if (x_fit.shape[1], z_fit.shape[1]) != (cfg.in_dim, cfg.out_dim):
        raise PrismInputError(
            f"--model-a/--model-b give {x_fit.shape[1]} -> {z_fit.shape[1]} pairs, the adapter "
            f"{model} maps {cfg.in_dim} -> {cfg.out_dim}; {unchanged}"
        )
    original = PairedData(
        f"{args.original}:X", f"{args.original}:Z", holdout=args.original_holdout, seed=args.original_seed
    )
    if (original.in_dim, original.out_dim) != (cfg.in_dim, cfg.out_dim) or original.count("holdout") == 0:
        raise PrismInputError(
            f"--original {args.original}: {original.in_dim} -> {original.out_dim} with "
            f"{original.count('holdout')} held-out rows; the adapter maps {cfg.in_dim} -> {cfg.out_dim}"
        )
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="prism-adapt-") as tmp:
        (Path(tmp) / "fit").mkdir()
        (Path(tmp) / "eval").mkdir()
        fit_data = PairedData.from_arrays(x_fit, z_fit, Path(tmp) / "fit", holdout=0.0)
        score_data = PairedData(Path(tmp) / "fit" / "x.npy", Path(tmp) / "fit" / "z.npy", holdout=0.2, seed=args.seed)
        recorded_eval = PairedData.from_arrays(x_eval, z_eval, Path(tmp) / "eval", holdout=1.0)
        if score_data.count("holdout") == 0 or score_data.count("train") == 0:
            raise PrismInputError(
                f"{args.records}: {len(x_fit)} recorded pairs are too few to rank the workers; {unchanged}"
            )
        try:
            result = adapt_round(
                stored,
                fit_data,
                score_data,
                recorded_eval,
                original,
                top=args.top,
                margin=args.margin,
                ridge=args.ridge,
            )
        except PrismInputError as exc:  # rank deficiency of the recorded pairs
            raise PrismInputError(
                f"{args.records}: the recorded text ({len(fit_texts)} texts, {len(x_fit)} pairs): {exc}; {unchanged}"
            ) from None
    entry: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "model": model,
        "data": {
            "from": str(Path(args.records).resolve()),
            **data_info,
            "texts": len(texts),
            "distinct_texts": len(set(texts)),
            "fit_texts": len(fit_texts),
            "heldout_texts": len(eval_texts),
            "fit_pairs": int(len(x_fit)),
            "heldout_pairs": int(len(x_eval)),
            "pool": args.pool,
            "original": str(Path(args.original).resolve()),
            "original_heldout_rows": original.count("holdout"),
        },
        "adapter": str(adapter_path.resolve()),
        "margin": args.margin,
        "top": args.top,
        "ridge": args.ridge,
        "before": {"recorded": result.before_recorded, "original": result.before_original},
        "candidates": [c.to_json() for c in result.candidates],
        "after": None,
        "decision": "refused",
        "reason": None,
        "version": None,
        "previous_version": None,
    }
    chosen = result.chosen
    code = 1
    if chosen is None:
        entry["reason"] = "; ".join(f"{c.name}: {c.why}" for c in result.candidates)
    else:
        entry["after"] = {"recorded": chosen.recorded, "original": chosen.original, "candidate": chosen.name}
        keep_dir = model_dir(root, model) / ADAPTED_DIR
        keep_dir.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
        new_path = keep_dir / f"{model}-{stamp}-{np.random.default_rng().integers(1 << 32):08x}.safetensors"
        write_adapter_file(new_path, cfg, chosen.tensors)

        def build(request: Any) -> Any:
            return build_engines(request, adapter_engine_check(request.adapter), log=log)

        try:
            report = update_adapter(
                root, new_path, build=build, model=model, url=args.url, load=not args.no_load, log=log
            )
        except BaseException as exc:
            if not _served_from(root, model, new_path):
                new_path.unlink(missing_ok=True)  # ours, and no version was built from it
            entry.update(decision="failed", reason=f"build or swap: {brief(exc, 300)}")
            append_log(root, entry, log)
            raise
        entry.update(
            decision="live",
            version=report["version"],
            previous_version=report["previous"],
            new_adapter=str(new_path.resolve()),
            reason=chosen.why,
            server=report.get("server"),
            parity={k: (report.get("parity") or {}).get(k) for k in ("precision", "rel_l2", "max_abs", "passed")},
        )
        entry["removed_versions"] = prune(root, model, args.keep, log)
        code = 0
    entry["round"] = append_log(root, entry, log)
    if args.json:
        print_json(entry)
    else:
        _print_round(entry)
    return code


def _served_from(root: Path, model: str, path: Path) -> bool:
    from prism_deploy.serving.repository import read_manifest

    sources = read_manifest(root)["models"][model].get("sources", {})
    return str(path.resolve()) in sources.values()


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def _print_round(entry: dict[str, Any]) -> None:
    d = entry["data"]
    print(
        f"round {entry['round']} on {entry['model']}: {d['texts']} recorded texts ({d['fit_texts']} to fit, "
        f"{d['heldout_texts']} held out; {d['fit_pairs']} + {d['heldout_pairs']} pairs)"
    )
    print(f"served: recorded rel err {_fmt(entry['before']['recorded'])}, original {_fmt(entry['before']['original'])}")
    for c in entry["candidates"]:
        print(
            f"  {c['name']} ({c['workers']} workers): recorded {_fmt(c['recorded_rel_err'])}, original "
            f"{_fmt(c['original_rel_err'])}: {'passes' if c['passes'] else 'refused'} ({c['why']})"
        )
    if entry["decision"] == "live":
        print(
            f"live: version {entry['version']} (was {entry['previous_version']}), candidate {entry['after']['candidate']}"
        )
    else:
        print(f"refused: nothing served changed ({entry['reason']})")


def show_log(args: argparse.Namespace) -> int:
    from prism_deploy.cli.output import print_json, print_table
    from prism_deploy.serving.versions import read_log

    rounds = [r for r in read_log(args.repository) if args.model is None or r.get("model") == args.model]
    if args.json:
        print_json({"repository": args.repository, "rounds": rounds})
        return 0
    if not rounds:
        print(f"{args.repository}: no adaptation rounds recorded")
        return 0
    rows = []
    for r in rounds:
        after = r.get("after") or {}
        d = r.get("data", {})
        rows.append(
            [
                r.get("round"),
                r.get("time"),
                r.get("model"),
                f"{d.get('fit_texts')}/{d.get('heldout_texts')}",
                f"{_fmt(r['before']['recorded'])} -> {_fmt(after.get('recorded'))}",
                f"{_fmt(r['before']['original'])} -> {_fmt(after.get('original'))}",
                r.get("decision"),
                r.get("version") or "-",
            ]
        )
    print_table(
        ["round", "time (UTC)", "model", "texts fit/held", "recorded err", "original err", "decision", "version"], rows
    )
    return 0
