"""A real ``tritonserver`` on a model repository: found, started, waited for, stopped.

The binary is the first ``tritonserver`` on ``PATH`` or, else, the one in the ``nvidia-pytriton``
wheel of the backend environment (:mod:`prism_deploy.serving.env`): its libraries come from
the wheel's ``nvidia_pytriton.libs`` (``LD_LIBRARY_PATH``), its Python backend from
``pytriton/tritonserver/backends`` (where the environment put the stub for this Python). The
server starts in explicit model-control mode with every model loaded (``--load-model=*``), so
versions can be loaded and unloaded later (hot-swap), binds the given host (127.0.0.1 unless
told otherwise), and is asked to die with its parent (``PR_SET_PDEATHSIG``) so a killed
``serve`` leaves no server behind. Readiness is polled on ``/v2/health/ready`` within a bound;
if the server exits first, its log's error lines say why.

The control APIs are restricted to a secret (Triton's ``--http-restricted-api`` and
``--grpc-restricted-protocol``): loading a model with a configuration and files given in the
request runs that code in the server, so a request without the secret's header may not load,
unload or reconfigure a model, read statistics, touch shared-memory regions, or change the trace
or log settings. Inference, health and metadata stay open. ``serve`` keeps the secret in
``REPO/.prism-serve.json``, readable by its owner only, where ``triton update`` reads it. The
secret is on the server's command line (Triton takes it nowhere else), which other users of the
machine can read in ``/proc``: the restriction keeps out cross-origin browser requests and
processes that cannot read it, not a local user who can; a shared machine needs a proxy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from prism_deploy.core.errors import PrismInputError
from prism_deploy.serving.env import BackendEnv, backend_process_env

EXIT_TIMEOUT_S = 30  # tritonserver's own wait for in-flight requests on SIGTERM

SERVE_STATE = ".prism-serve.json"  # in the repository folder, owner-only: where serve runs, and its secret
SECRET_HEADER = "prism-serve-key"  # the HTTP header the control APIs require
# gRPC: Triton expects the key with this prefix in the call's metadata
GRPC_SECRET_HEADER = f"triton-grpc-protocol-{SECRET_HEADER}"
# Triton's names for its control APIs (HTTP) and protocols (gRPC): the same list for both
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def new_secret() -> str:
    return secrets.token_urlsafe(32)  # [A-Za-z0-9_-]: nothing Triton's "key=value" option could split on


def write_state(repo: Path, info: dict[str, Any]) -> Path:
    """``REPO/.prism-serve.json``, owner-only (0600) from its first byte: it holds the secret."""
    from prism_deploy.core.fsutil import write_text_atomic

    state = repo / SERVE_STATE
    write_text_atomic(state, json.dumps(info) + "\n", mode=0o600)
    return state


def read_state(repo: Path) -> dict[str, Any] | None:
    """What a running ``serve`` recorded for ``repo``; None when none runs (no file, or its process is gone)."""
    state = repo / SERVE_STATE
    try:
        obj = json.loads(state.read_text(encoding="utf-8"))
        os.kill(int(obj["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a stale file from a serve that is gone
    return obj if isinstance(obj, dict) else None


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class ServerBinary:
    path: Path
    backend_dir: Path | None
    lib_dirs: list[Path]
    source: str  # "PATH" or "nvidia-pytriton"


def find_tritonserver(env: BackendEnv) -> ServerBinary:
    """``tritonserver`` on PATH, else the nvidia-pytriton wheel's in the backend environment."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerBinary(Path(on_path), None, [], "PATH")
    wheel = env.pytriton_dir()
    if wheel is None:
        raise PrismInputError(f"{env.path}: no tritonserver on PATH and no nvidia-pytriton in the backend environment")
    binary = wheel / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise PrismInputError(f"{binary}: missing from the nvidia-pytriton wheel")
    libs = wheel.parent / "nvidia_pytriton.libs"
    return ServerBinary(binary, wheel / "tritonserver" / "backends", [libs] if libs.is_dir() else [], "nvidia-pytriton")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class TritonServer:
    """One ``tritonserver`` process on ``repo``. Use as a context manager: stopped on exit."""

    repo: Path
    env: BackendEnv
    http_port: int
    grpc_port: int
    metrics_port: int
    host: str = "127.0.0.1"
    log_path: Path | None = None
    load: list[str] = field(default_factory=lambda: ["*"])
    # how long Triton waits, on SIGTERM, for in-flight requests and open client connections
    exit_timeout_s: int = EXIT_TIMEOUT_S
    # the control APIs' secret; None serves them unrestricted, which only a loopback host may
    secret: str | None = field(default_factory=new_secret)
    # where Triton's own HTTP listens when it differs from ``host`` (serve: loopback, behind its guard)
    http_host: str | None = None
    binary: ServerBinary | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None
    _temp_log: bool = False  # the log is a temporary file of ours: removed on a clean stop

    @property
    def probe_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        return f"{self.http_host or self.probe_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.probe_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.probe_host}:{self.metrics_port}/metrics"

    @property
    def control_headers(self) -> dict[str, str]:
        """The header an HTTP control request (load, unload, config, statistics...) must carry."""
        return {SECRET_HEADER: self.secret} if self.secret else {}

    @property
    def grpc_control_headers(self) -> dict[str, str]:
        """The metadata a gRPC control call must carry."""
        return {GRPC_SECRET_HEADER: self.secret} if self.secret else {}

    def restriction(self) -> list[str]:
        if not self.secret:
            if self.host not in LOOPBACK_HOSTS:
                raise PrismInputError(
                    f"--host {self.host}: refusing to serve the model-control APIs unrestricted "
                    "beyond this machine (no secret)"
                )
            return []
        group = f"{','.join(RESTRICTED_APIS)}:{SECRET_HEADER}={self.secret}"
        return [f"--http-restricted-api={group}", f"--grpc-restricted-protocol={group}"]

    def command(self) -> list[str]:
        restriction = self.restriction()
        binary = self.binary or find_tritonserver(self.env)
        self.binary = binary
        cmd = [
            str(binary.path),
            f"--model-repository={self.repo.resolve()}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--http-address={self.http_host or self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.load),
            # our configs are complete: no auto-complete stub process per Python model at load
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--allow-gpu-metrics=false",
            "--log-verbose=0",
            *restriction,
        ]
        if binary.backend_dir is not None:
            cmd.append(f"--backend-directory={binary.backend_dir}")
        return cmd

    def environment(self) -> dict[str, str]:
        env = backend_process_env(self.env.path, self.env.code)
        if self.binary is not None and self.binary.lib_dirs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, self.binary.lib_dirs), env.get("LD_LIBRARY_PATH", "")])
        return env

    def start(self) -> None:
        cmd = self.command()
        if self.log_path is None:
            self.log_path = (
                Path(os.environ.get("TMPDIR", "/tmp")) / f"prism-tritonserver-{os.getpid()}-{self.http_port}.log"
            )
            self._temp_log = True
        self._log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise PrismInputError(f"{cmd[0]}: cannot start ({exc})") from None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until ready; the server's exit or the bound is bad input with the log's reason."""
        assert self.proc is not None
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise PrismInputError(
                    f"{self.repo}: tritonserver ended while loading ({self.exit_cause()}); log: {self.log_path}"
                )
            if self.ready():
                return time.monotonic() - started
            time.sleep(0.2)
        self._temp_log = False  # the error names the log: it stays
        self.stop()
        raise PrismInputError(
            f"{self.repo}: tritonserver not ready within {timeout_s:.0f} s ({self.log_reason()}); log: {self.log_path}"
        )

    def log_reason(self) -> str:
        """The most telling lines of the server's log (see :func:`log_reason`)."""
        return log_reason(self.log_path)

    def exit_cause(self) -> str:
        """How the server ended and why, for one line: its exit code or signal, and its log's reason."""
        assert self.proc is not None
        return f"{exit_status(self.proc.returncode)}: {self.log_reason()}"

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout_s: float | None = None) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM (Triton drains in-flight requests), then SIGKILL after its exit timeout and 15 s more;
        then whatever is left of the server's process group (see :meth:`reap_group`)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(self.exit_timeout_s + 15 if timeout_s is None else timeout_s) is None:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.reap_group()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._temp_log and self.proc.returncode == 0 and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)  # a server that failed keeps its log: messages name it
        return self.proc.returncode

    def group_members(self) -> list[int]:
        """Processes still in the server's process group (its Python backend stubs)."""
        if self.proc is None:
            return []
        return group_members(self.proc.pid)

    def reap_group(self) -> list[int]:
        """Kill the server's stubs left behind when it died without unloading its models.

        ``tritonserver`` was started as the leader of a new process group, which its stub
        processes inherit. A stub whose server was killed (SIGKILL) was seen to live on,
        ignoring SIGTERM; after the server has exited, the members left in its group are
        killed, by that group id only.
        """
        if self.proc is None or self.proc.poll() is None:
            return []
        left = self.group_members()
        if not left:
            return []
        regions = [r for r in (stub_region(pid) for pid in left) if r]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.group_members() and time.monotonic() < deadline:
            time.sleep(0.05)
        for region in regions:  # named on the killed stub's own command line: that server's, no other's
            with contextlib.suppress(OSError):
                (Path("/dev/shm") / region).unlink()
        return left

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# A server that aborts prints these lines (C++ runtime, Triton's signal handler) after its last
# log record; the stack frames after them say nothing to a user.
FATAL_MARKS = ("terminate called", "what():", "Signal (", "Segmentation fault", "Aborted", "Killed")
# Harmless on a machine without a GPU: never the reason
NOISE_MARKS = ("CudaDriverHelper", "pinned", "NVML", "DCGM")


def log_reason(log_path: Path | None) -> str:
    """A fatal line if the server aborted, else its last error lines, else its last line."""
    try:
        lines = Path(log_path or "").read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    fatal = [ln.strip() for ln in lines if any(ln.lstrip().startswith(m) for m in FATAL_MARKS)]
    errors = [ln for ln in lines if ln.startswith("E") and not any(m in ln for m in NOISE_MARKS)]
    plain = [ln for ln in lines if ln.strip() and not re.match(r"\s*\d+# ", ln)]
    picked = fatal[-3:] if fatal else errors[-2:] if errors else plain[-1:]
    return " | ".join(" ".join(ln.split())[:300] for ln in picked) or "empty log"


def exit_status(code: int | None) -> str:
    """``code`` as a person reads it: a signal by name (Popen's negative code, or a shell's 128+N)."""
    if code is None:
        return "still running"
    number = -code if code < 0 else code - 128 if 128 < code < 160 else 0
    if number:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(number).name} (exit code {code})"
    return f"exit code {code}"


def stub_region(pid: int) -> str | None:
    """The shared-memory region a Python backend stub was started with (its second argument)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if len(argv) > 2 and argv[0].endswith(b"triton_python_backend_stub"):
        name = argv[2].decode(errors="replace")
        if name.startswith("triton_python_backend_shm_region_") and "/" not in name:
            return name
    return None


def group_members(pgid: int) -> list[int]:
    """Live pids whose process group is ``pgid`` (Linux /proc; zombies are dead already)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def check_ports_free(host: str, *ports_: int) -> None:
    """Refuse a port another process listens on: the readiness poll would otherwise be answered
    by that other server. (A port taken between this check and Triton's bind still fails Triton.)"""
    import errno

    bind_host = "0.0.0.0" if host == "" else host
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    for port in ports_:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton binds: a closing socket is no owner
            try:
                s.bind((bind_host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PrismInputError(
                        f"port {port} in use (on {bind_host}); choose another or stop what holds it"
                    ) from None
                raise PrismInputError(f"--host {host}: cannot bind port {port} ({exc.strerror})") from None


def ports(host: str, http: int, grpc: int, metrics: int) -> tuple[int, int, int]:
    """The ports to use: 0 picks a free one."""
    return tuple(
        p if p else free_port(host if host not in ("0.0.0.0", "") else "127.0.0.1")  # type: ignore[return-value]
        for p in (http, grpc, metrics)
    )
