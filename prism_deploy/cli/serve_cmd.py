"""``prism-deploy serve REPO [--http-port --grpc-port --metrics-port --host]``: a real Triton on a repository.

Prepares (first use: creates from PyPI) and checks the Python-backend environment, refusing a
numpy >= 2 there; finds ``tritonserver`` (PATH, else the nvidia-pytriton wheel's); starts it in
explicit model-control mode with every model loaded; waits for readiness within
``--ready-timeout``; prints the endpoints; forwards SIGINT/SIGTERM (Triton then finishes the
requests it holds) and exits 0 once it has stopped. A server that dies on its own is exit 1.
A Python-backend process that dies is noticed within about a second and its model restarted
(:mod:`prism_deploy.serving.watchdog`).
The HTTP port is a small front (:mod:`prism_deploy.serving.http_guard`) that refuses requests
declaring more than they carry, Triton's own HTTP on a loopback port behind it.
While it runs, ``REPO/.prism-serve.json`` (owner-only) tells ``triton update`` where it is and
holds the secret that Triton's model-control APIs require (a fresh one per start; see
:mod:`prism_deploy.serving.server`).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from prism_deploy.cli.numbers import PORT, number
from prism_deploy.cli.paths import declare_outputs
from prism_deploy.core.limits import Limit


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run Triton Inference Server on a repository from `prism-deploy triton`")
    p.add_argument("repository", metavar="REPO")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--http-port", type=number(PORT), default=8000, help="HTTP port (default 8000; 0: a free one)")
    p.add_argument("--grpc-port", type=number(PORT), default=8001, help="gRPC port (default 8001; 0: a free one)")
    p.add_argument(
        "--metrics-port", type=number(PORT), default=8002, help="Prometheus metrics port (default 8002; 0: a free one)"
    )
    p.add_argument("--env", metavar="DIR", help="a Python-backend environment to use instead of the cached one")
    p.add_argument(
        "--ready-timeout",
        type=number(Limit(float, 0.0, 86_400.0, low_open=True)),
        default=180.0,
        help="seconds to wait for readiness (default 180)",
    )
    p.add_argument(
        "--exit-timeout",
        type=number(Limit(int, 0, 86_400)),
        default=30,
        help="on SIGINT/SIGTERM, seconds Triton waits for in-flight requests and open client connections "
        "(default 30, Triton's)",
    )
    p.add_argument(
        "--log",
        metavar="FILE",
        help="server log file (default: a file in the temporary folder, removed after a clean stop)",
    )
    p.add_argument("--json", action="store_true", help="print the endpoints as one JSON line once ready")
    p.add_argument(
        "--record",
        metavar="DIR",
        help="keep a sample of the requests' token ids (never outputs) in DIR, owner-only, for "
        "`prism-deploy adapt` (default: nothing is recorded); docs/adaptation.md",
    )
    p.add_argument(
        "--record-rate",
        type=number(Limit(float, 0.0, 1.0, low_open=True)),
        default=1.0,
        metavar="F",
        help="with --record: the fraction of requests kept (default 1)",
    )
    p.add_argument(
        "--record-budget-mb",
        type=number(Limit(float, 0.0, float(1 << 30), low_open=True)),
        default=64.0,
        metavar="MB",
        help="with --record: at most this many MiB of records; the oldest are dropped first (default 64)",
    )
    declare_outputs(p, files=("log",), folders=("record",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prism_deploy.cli.output import print_table
    from prism_deploy.cli.triton_env_cmd import backend_env
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.serving import server as srv
    from prism_deploy.serving.http_guard import HttpGuard
    from prism_deploy.serving.repository import read_manifest
    from prism_deploy.serving.server import SERVE_STATE
    from prism_deploy.serving.watchdog import StubWatch

    repo = Path(args.repository)
    manifest = read_manifest(repo)
    for option in ("http_port", "grpc_port", "metrics_port"):
        if not 0 <= getattr(args, option) <= 65535:
            raise PrismInputError(f"--{option.replace('_', '-')}: {getattr(args, option)} is not a port")
    given = [p for p in (args.http_port, args.grpc_port, args.metrics_port) if p]
    if len(set(given)) < len(given):
        raise PrismInputError(f"port {max(given, key=given.count)} given twice (HTTP, gRPC and metrics need one each)")
    # before the environment (minutes on first use): a taken port is said at once
    http, grpc, metrics = srv.ports(args.host, args.http_port, args.grpc_port, args.metrics_port)
    srv.check_ports_free(args.host, http, grpc, metrics)
    if args.record is not None:  # before _recording makes the folder: a refusal leaves nothing behind
        _check_recordable(manifest, args.repository)
    recording = _recording(args)
    be = backend_env(str(repo), args.env)
    if args.exit_timeout < 0:
        raise PrismInputError(f"--exit-timeout: {args.exit_timeout} must be >= 0")
    # Triton's HTTP on a loopback port of its own; the user's HTTP port is the guard in front of it
    server = srv.TritonServer(
        repo,
        be,
        srv.free_port(),
        grpc,
        metrics,
        host=args.host,
        http_host="127.0.0.1",
        log_path=Path(args.log) if args.log else None,
        exit_timeout_s=args.exit_timeout,
    )
    guard: HttpGuard | None = None
    stop_requested: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stop_requested.append(signum)
        server.signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    state = repo / SERVE_STATE
    wrote_state = False
    stopped_cleanly = False
    try:
        server.start()
        try:
            ready_s = server.wait_ready(args.ready_timeout)
        except PrismInputError:
            if stop_requested:  # asked to stop while loading: the server's exit is the expected one
                stopped_cleanly = True
                return _stopped(server)
            raise
        if stop_requested:
            stopped_cleanly = True
            return _stopped(server)
        try:
            guard = HttpGuard(args.host, http, server.http_port)
        except OSError as exc:  # taken since the check: said as the check says it
            raise PrismInputError(
                f"port {http} in use (on {args.host}); choose another or stop what holds it"
                if exc.errno == errno.EADDRINUSE
                else f"--host {args.host}: cannot bind port {http} ({exc.strerror})"
            ) from None
        guard.start()
        info: dict[str, Any] = {
            "repository": str(repo),
            "http": f"{server.probe_host}:{http}",
            "grpc": server.grpc_url,
            "metrics": server.metrics_url,
            "models": sorted(manifest["models"]),
            "tritonserver": str(server.binary.path) if server.binary else None,
            "environment": str(be.path),
            "log": str(server.log_path),
            "ready_seconds": round(ready_s, 2),
            "pid": os.getpid(),
            "control_secret_file": str(state),
            "record": None if recording is None else str(recording.folder),
        }
        srv.write_state(repo, {**info, "secret": server.secret})
        wrote_state = True
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            print_table(
                ["endpoint", "address"], [["HTTP", info["http"]], ["gRPC", info["grpc"]], ["metrics", info["metrics"]]]
            )
            print(f"models: {', '.join(info['models'])}; ready in {info['ready_seconds']} s; log: {info['log']}")
            print(
                f"model control (load, unload, config, statistics): header {srv.SECRET_HEADER}, its secret in {state} "
                "(owner-only)"
            )
            if recording is not None:
                print(
                    f"recording a {recording.rate:g} sample of the first model's request token ids in {recording.folder} "
                    f"(owner-only, at most {recording.budget_bytes / (1 << 20):g} MiB, oldest dropped first)"
                )
            print("serving; Ctrl-C (SIGINT) or SIGTERM stops it", flush=True)
        # a Python-backend stub that dies is not replaced by Triton: its model is restarted here
        watch = StubWatch(server, log=lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
        while not stop_requested:
            watch.check()
            code = server.wait(0.5)
            if code is not None:
                print(
                    f"error: tritonserver exited by itself ({server.exit_cause()}); log: {server.log_path}",
                    file=sys.stderr,
                )
                return 1
        stopped_cleanly = True
        return _stopped(server, guard)
    finally:
        if guard is not None:
            guard.stop()  # first: its connections to Triton would hold Triton's shutdown
        server.stop()
        if wrote_state and _ours(state):
            state.unlink()
        if stopped_cleanly and not args.log and server.log_path is not None:
            # the default log, in the temporary folder, is ours: kept only when it explains a failure
            server.log_path.unlink(missing_ok=True)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _recording(args: argparse.Namespace) -> Any:
    """The record settings the backend processes get through their environment; without
    ``--record`` the variable is cleared, so nothing is recorded unless asked."""
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.serving.record import RECORD_VARIABLE, RecordSettings, prepare_folder

    if args.record is None:
        if args.record_rate != 1.0 or args.record_budget_mb != 64.0:
            raise PrismInputError("--record-rate and --record-budget-mb need --record DIR")
        os.environ.pop(RECORD_VARIABLE, None)
        return None
    settings = RecordSettings(prepare_folder(args.record), args.record_rate, int(args.record_budget_mb * (1 << 20)))
    os.environ[RECORD_VARIABLE] = settings.to_env()
    return settings


def _check_recordable(manifest: dict[str, Any], repo: str) -> None:
    """Request text reaches a Python-form first model only: anything else would record nothing."""
    from prism_deploy.core.errors import PrismInputError

    if manifest.get("backend") == "native":
        raise PrismInputError(
            f"--record: {repo} is in the native form; its first model runs in Triton's own "
            "backend, which records nothing (write the repository with --backend python)"
        )
    if not any(r.get("kind") == "first" for r in manifest.get("models", {}).values()):
        raise PrismInputError(
            f"--record: {repo} serves no first model: no request text reaches it "
            "(only a chain's first model sees token ids)"
        )


def _stopped(server: object, guard: Any = None) -> int:
    started = time.monotonic()
    if guard is not None:
        guard.stop()
    code = server.stop()  # type: ignore[attr-defined]
    print(f"stopped (tritonserver exit code {code}, {time.monotonic() - started:.1f} s)", file=sys.stderr)
    return 0


def _ours(state: Path) -> bool:
    try:
        return int(json.loads(state.read_text(encoding="utf-8"))["pid"]) == os.getpid()
    except (OSError, ValueError, KeyError):
        return False
