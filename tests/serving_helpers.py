"""Shared by the serving tests: tiny stages, the backend environment, a server that is always stopped.

The stages are the ones tests/models/test_models.py uses (random 2-layer Llama 64 -> adapter -> Qwen2
96, exported at max_seq 64) plus adapters from ``prism_deploy.reference.random_adapter`` built
for ort-cpu fp32. Nothing is downloaded except, on a machine's first run, the Python-backend
environment (PyPI, cached under ``$PRISM_DEPLOY_CACHE``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from prism_deploy.reference import random_adapter, simple_config

ROOT = Path(__file__).resolve().parent.parent


def make_stages(root: Path, zoo: dict[str, Path]) -> dict[str, Path]:
    """Model A and B (the shared exports, tests/conftest.py) and their ort-cpu builds, a dense and
    a gated adapter (64 -> 96) and their ort-cpu fp32 builds (checked against the reference), and
    a second dense adapter for hot-swapping."""
    from prism_deploy.builder import BuildRequest, ModelBuildRequest, build_engines, build_model_engines
    from prism_deploy.parity.build_checks import adapter_engine_check, model_graph_check

    z: dict[str, Path] = {key: zoo[key] for key in ("llama", "qwen2", "A", "B")}
    for name, top_k, seed in (("dense", None, 6), ("gated", 3, 5), ("dense_new", None, 7)):
        z[name] = root / f"{name}.safetensors"
        random_adapter(simple_config(64, 96, (4, 2), top_k=top_k), seed=seed).save(z[name])
    for name in ("dense", "gated"):
        z[f"{name}_build"] = root / f"{name}_build"
        result = build_engines(
            BuildRequest(adapter=z[name], out_dir=z[f"{name}_build"], target="ort-cpu", precisions=("fp32",)),
            adapter_engine_check(z[name]),
            log=lambda _m: None,
        )
        result.raise_for_failures()
    for name in ("A", "B"):  # the same models as `build --model` folders (engines + manifest)
        z[f"{name}_build"] = root / f"{name}_build"
        build_model_engines(
            ModelBuildRequest(model_dir=z[name], out_dir=z[f"{name}_build"], target="ort-cpu"),
            model_graph_check(z[name]),
            log=lambda _m: None,
        ).raise_for_failures()
    return z


def reference(adapter: Path, x: np.ndarray) -> np.ndarray:
    import torch

    from prism_deploy.reference import load_adapter

    with torch.no_grad():
        return load_adapter(adapter)(torch.from_numpy(x)).numpy()


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def backend_env():  # type: ignore[no-untyped-def]
    import onnxruntime

    from prism_deploy.serving import env

    return env.prepare(onnxruntime.__version__, log=lambda m: print(m, file=sys.stderr))


@contextlib.contextmanager
def running_server(repo: Path, be, log: Path, timeout_s: float = 120) -> Iterator[object]:  # type: ignore[no-untyped-def]
    """A TritonServer on ``repo`` (free loopback ports), stopped however the block ends."""
    from prism_deploy.serving.server import SERVE_STATE, TritonServer, ports, write_state

    http, grpc, metrics = ports("127.0.0.1", 0, 0, 0)
    # a test's client objects may keep keep-alive connections open; Triton would wait 30 s for them
    server = TritonServer(repo, be, http, grpc, metrics, log_path=log, exit_timeout_s=5)
    try:
        server.start()
        server.wait_ready(timeout_s)
        # as serve records itself: `triton update` finds the control secret there
        write_state(repo, {"http": server.http_url, "pid": os.getpid(), "secret": server.secret})
        yield server
    finally:
        server.stop()
        (repo / SERVE_STATE).unlink(missing_ok=True)


def http_input(name: str, array: np.ndarray, dtype: str):  # type: ignore[no-untyped-def]
    import tritonclient.http as httpclient

    t = httpclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def grpc_input(name: str, array: np.ndarray, dtype: str):  # type: ignore[no-untyped-def]
    import tritonclient.grpc as grpcclient

    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def serve_process(repo: Path, http: int, grpc: int, metrics: int, log: Path) -> subprocess.Popen[str]:
    """``prism-deploy serve`` as a user runs it, in a process group of its own (so a test can stop it all)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prism_deploy",
            "serve",
            str(repo),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
            "--log",
            str(log),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(repo.parent),
        start_new_session=True,
    )


def stop_process_group(proc: subprocess.Popen[str], timeout_s: float = 60) -> None:
    """SIGTERM to the group this test started, then SIGKILL if it has not ended in time."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def wait_ready(http_url: str, proc: subprocess.Popen[str] | None = None, timeout_s: float = 120) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(http_url, connection_timeout=2, network_timeout=5)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(
                    f"serve exited early with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
                )
            with contextlib.suppress(Exception):
                if client.is_server_ready():
                    return
            time.sleep(0.2)
    finally:
        client.close()  # an open keep-alive connection would hold the server's shutdown
    raise AssertionError(f"{http_url}: not ready within {timeout_s} s")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out
