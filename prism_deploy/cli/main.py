"""``prism-deploy``: one entry point, one module per sub-command.

Exit codes: 0 success; 1 a check (parity, a tolerance) failed; 2 bad input, reported as a
single ``error: ...`` line on stderr with no traceback; 141 (128 + SIGPIPE) when the reader of
the output went away, as for any Unix tool in a pipe.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from prism_deploy.cli.paths import FULL_OR_READ_ONLY, check_outputs, declared_output
from prism_deploy.core.errors import (
    CheckFailed,
    GraphFileAsChain,
    OutputError,
    PrismInputError,
    WriteError,
    printable,
    require,
)

# The exit codes besides 0: a check failed (1), bad input (2), an output could not be written (3).
CHECK_FAILED, BAD_INPUT, OUTPUT_FAILED = 1, 2, 3

# Each module defines ``register(subparsers)``, which adds its parser and sets ``func``.
# Heavy imports stay inside the commands' ``run`` functions so that ``--help`` is quick.
COMMAND_MODULES = [
    "prism_deploy.cli.inspect_cmd",
    "prism_deploy.cli.plan_cmd",
    "prism_deploy.cli.convert_cmd",
    "prism_deploy.cli.fit_cmd",
    "prism_deploy.cli.workers_cmd",
    "prism_deploy.cli.refit_cmd",
    "prism_deploy.cli.export_cmd",
    "prism_deploy.cli.parity_cmd",
    "prism_deploy.cli.fuse_cmd",
    "prism_deploy.cli.build_cmd",
    "prism_deploy.cli.export_model_cmd",
    "prism_deploy.cli.run_cmd",
    "prism_deploy.cli.parity_chain_cmd",
    "prism_deploy.cli.collect_cmd",
    "prism_deploy.cli.bench_cmd",
    "prism_deploy.cli.bench_model_cmd",
    "prism_deploy.cli.triton_cmd",
    "prism_deploy.cli.triton_update_cmd",
    "prism_deploy.cli.triton_env_cmd",
    "prism_deploy.cli.serve_cmd",
    "prism_deploy.cli.adapt_cmd",
    "prism_deploy.cli.triton_rollback_cmd",
]


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # "--max-new-token" must not pass for "--max-new-tokens": a prefix is a typo, not a choice
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage plus an error on two lines; the project promises one line.
        print(f"error: {self.prog}: {printable(message)}", file=sys.stderr)
        raise SystemExit(2)

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        commands = getattr(self, "_commands", {})
        words = list(sys.argv[1:] if args is None else args)
        if words and words[0] in commands:  # a mistyped flag is named before a missing required one
            command = commands[words[0]]
            known = {s for action in command._actions for s in action.option_strings}
            rest = words[1 : words.index("--")] if "--" in words else words[1:]
            unknown = [w for w in rest if w.startswith("--") and w.split("=", 1)[0] not in known]
            if unknown:
                command.error(unrecognized(unknown, command))
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # said by the sub-command's parser, with the flag it probably meant
            command = (
                self._commands.get(getattr(parsed, "command", None) or "", self) if hasattr(self, "_commands") else self
            )
            command.error(unrecognized(extras, command))
        return parsed


def unrecognized(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """ "unrecognized argument(s): ..." and, for a flag close to one of ``parser``'s, that flag."""
    import difflib

    flags = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    hints = []
    for extra in extras:
        word = extra.split("=", 1)[0]
        if word.startswith("-"):
            close = difflib.get_close_matches(word, flags, n=1, cutoff=0.6)
            if close:
                hints.append(f"{word}: did you mean {close[0]}?")
    return f"unrecognized argument{'s' if len(extras) > 1 else ''}: {' '.join(extras)}" + (
        f" ({'; '.join(hints)})" if hints else ""
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prism-deploy", description="Deployment compiler for PRISM adapters.")
    from prism_deploy.core.version import __version__

    parser.add_argument("--version", action="version", version=f"prism-deploy {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    parser._commands = dict(subparsers.choices)  # type: ignore[attr-defined]
    return parser


def _route_chain_parity(argv: list[str]) -> list[str]:
    """``parity --chain ...`` / ``parity --pipeline ...`` is the end-to-end check, whose options
    differ from the adapter-only ``parity``; it is served by the ``parity-chain`` parser."""
    if argv[:1] == ["parity"] and (
        "--pipeline" in argv
        or "--chain" in argv
        or "--graph" in argv
        or any(a.startswith(("--chain=", "--graph=")) for a in argv)
    ):
        rest = [a for a in argv[1:] if a != "--pipeline"]
        return ["parity-chain", *rest]
    return argv


def _route_model_bench(argv: list[str]) -> list[str]:
    """``bench --model DIR [DIR ...]`` times model folders, not an adapter: served by ``bench-model``."""
    if argv[:1] == ["bench"] and "--model" in argv:
        return ["bench-model", *[a for a in argv[1:] if a != "--model"]]
    return argv


# ``triton update ...`` and ``triton env ...`` are commands of their own: ``triton`` takes folders.
SUBCOMMAND_WORDS = {
    ("triton", "update"): "triton-update",
    ("triton", "env"): "triton-env",
    ("triton", "rollback"): "triton-rollback",
}


def _route_subcommand_words(argv: list[str]) -> list[str]:
    routed = SUBCOMMAND_WORDS.get((argv[0], argv[1])) if len(argv) >= 2 else None
    return [routed, *argv[2:]] if routed else argv


def graph_hint(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """What to do with a graph file given where a chain file goes: ``--graph`` where the command
    has it; else the command's own ``graph_hint`` (``set_defaults``), naming what it does take."""
    command = getattr(parser, "_commands", {}).get(args.command)
    if command is not None and any("--graph" in action.option_strings for action in command._actions):
        return "give it with --graph"
    return getattr(args, "graph_hint", None) or f"{args.command} does not read graph files"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(
        _route_subcommand_words(_route_model_bench(_route_chain_parity(list(sys.argv[1:] if argv is None else argv))))
    )
    try:
        # optional libraries a command needs (``set_defaults(needs=...)``): one line each if missing
        for module in getattr(args, "needs", ()):
            require(module, f"prism-deploy {args.command}")
        check_outputs(args)  # before any work: an output that is an input, a device, unwritable
        code = args.func(args)
        sys.stdout.flush()
    except PrismInputError as exc:
        hint = f"; {graph_hint(parser, args)}" if isinstance(exc, GraphFileAsChain) else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return BAD_INPUT
    except CheckFailed as exc:
        print(f"error: check failed: {printable(' '.join(str(exc).split()))}", file=sys.stderr)
        return CHECK_FAILED
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return OUTPUT_FAILED
    except BrokenPipeError:
        # the reader went away (``inspect | head -1``): stop quietly, as a tool killed by
        # SIGPIPE does; stdout is pointed at /dev/null so that the interpreter's final flush
        # does not fail a second time
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:
        # a file the command reads or writes; where the disk or file system refused a write,
        # the output the user named, whatever file (temporary, inside a library) met it
        output = declared_output(args) if exc.errno in FULL_OR_READ_ONLY else None
        if output is not None:
            print(f"error: {WriteError(output, exc.strerror or str(exc))}", file=sys.stderr)
        else:
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return OUTPUT_FAILED if exc.errno in FULL_OR_READ_ONLY else BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
