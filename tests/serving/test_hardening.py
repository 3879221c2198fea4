"""What a hostile or unlucky client must not do to a served repository: take over its models,
kill the server, or leave a dead backend serving errors for good.

Against a real Triton (the nvidia-pytriton wheel's), loopback only, free ports, bounded loops,
every server stopped by a ``finally``.
"""

from __future__ import annotations

import base64
import json
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from prism_deploy.cli.main import main
from prism_deploy.serving.server import (
    GRPC_SECRET_HEADER,
    SECRET_HEADER,
    SERVE_STATE,
    ServerBinary,
    TritonServer,
    free_port,
)
from tests.serving_helpers import http_input, reference, rel_l2, serve_process, stop_process_group, wait_ready

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _wait_state(repo: Path, timeout_s: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s  # serve records itself just after its own readiness check
    while not (repo / SERVE_STATE).is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    return json.loads((repo / SERVE_STATE).read_text())


def test_the_control_apis_are_restricted_on_both_protocols_and_never_open_beyond_loopback():
    binary = ServerBinary(Path("tritonserver"), None, [], "PATH")
    server = TritonServer(Path("repo"), None, 1, 2, 3, binary=binary)  # type: ignore[arg-type]
    cmd = server.command()
    http = [a for a in cmd if a.startswith("--http-restricted-api=")]
    grpc = [a for a in cmd if a.startswith("--grpc-restricted-protocol=")]
    assert len(http) == 1 and len(grpc) == 1
    apis, header = http[0].split("=", 1)[1].split(":")
    assert {"model-repository", "model-config", "shared-memory", "statistics", "trace", "logging"} <= set(
        apis.split(",")
    )
    assert "inference" not in apis and header == f"{SECRET_HEADER}={server.secret}" and len(server.secret or "") >= 32
    assert grpc[0].split("=", 1)[1] == http[0].split("=", 1)[1]
    assert TritonServer(Path("repo"), None, 1, 2, 3, binary=binary).secret != server.secret  # one per server
    from prism_deploy.core.errors import PrismInputError

    for host in ("0.0.0.0", "192.168.1.5"):
        with pytest.raises(PrismInputError, match="unrestricted"):
            TritonServer(Path("repo"), None, 1, 2, 3, host=host, secret=None, binary=binary).command()  # type: ignore[arg-type]
    unrestricted = TritonServer(Path("repo"), None, 1, 2, 3, secret=None, binary=binary).command()  # type: ignore[arg-type]
    assert not any("restricted" in a for a in unrestricted)


def test_a_request_without_the_secret_cannot_load_code_or_unload_and_triton_update_still_swaps(
    serving_stages, serving_env, tmp_path
):
    z = serving_stages
    repo = tmp_path / "repo"
    assert main(["triton", str(z["dense_build"]), "-o", str(repo)]) == 0
    x = np.random.default_rng(3).standard_normal((1, 5, 64)).astype(np.float32)
    ports = [free_port() for _ in range(3)]
    proc = serve_process(repo, *ports, tmp_path / "serve.log")
    http_url, grpc_url = f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"
    try:
        wait_ready(http_url, proc)
        state = _wait_state(repo)
        assert stat.S_IMODE((repo / SERVE_STATE).stat().st_mode) == 0o600 and state["secret"]
        printed = json.loads(proc.stdout.readline()) if proc.stdout else {}
        assert "secret" not in printed and str(state["secret"]) not in json.dumps(printed)

        # the exploit: a model config and a model.py in the load request, under the served name
        marker = tmp_path / "ran"
        code = f"open({str(marker)!r}, 'w').write('x')\nclass TritonPythonModel:\n    def execute(self, r):\n        return []\n"
        config = {
            "name": "adapter",
            "backend": "python",
            "max_batch_size": 0,
            "input": [{"name": "hidden", "data_type": "TYPE_FP32", "dims": [-1]}],
            "output": [{"name": "adapted", "data_type": "TYPE_FP32", "dims": [-1]}],
        }
        body = json.dumps(
            {"parameters": {"config": json.dumps(config), "file:1/model.py": base64.b64encode(code.encode()).decode()}}
        ).encode()
        base = f"http://{http_url}/v2/repository/models/adapter"
        status, text = _post(f"{base}/load", body, {"Content-Type": "application/json"})
        assert status in (401, 403), (status, text)
        # what a browser sends cross-origin without a preflight
        status, text = _post(f"{base}/unload", b"{}", {"Content-Type": "text/plain", "Origin": "http://evil.example"})
        assert status in (401, 403), (status, text)
        status, _ = _post(f"{base}/unload", b"{}", {SECRET_HEADER: "a-guess"})
        assert status in (401, 403)
        status, _ = _post(f"http://{http_url}/v2/repository/index", b"{}", {})
        assert status in (401, 403)
        grpc = grpcclient.InferenceServerClient(grpc_url)
        for control in (
            lambda: grpc.unload_model("adapter"),
            lambda: grpc.get_model_config("adapter"),
            lambda: grpc.get_inference_statistics("adapter"),
        ):
            with pytest.raises(InferenceServerException):
                control()
        grpc.get_inference_statistics("adapter", headers={GRPC_SECRET_HEADER: str(state["secret"])})  # the owner may
        grpc.close()
        assert not marker.exists()
        client = httpclient.InferenceServerClient(http_url)
        assert client.is_model_ready("adapter")
        got = client.infer("adapter", [http_input("hidden", x, "FP32")]).as_numpy("adapted")
        assert rel_l2(got, reference(z["dense"], x)) <= 1e-5

        # the owner's hot-swap reads the secret serve recorded and still works
        assert main(["triton", "update", str(repo), "--adapter", str(z["dense_new"]), "--json"]) == 0
        got = client.infer("adapter", [http_input("hidden", x, "FP32")]).as_numpy("adapted")
        client.close()
        assert rel_l2(got, reference(z["dense_new"], x)) <= 1e-5
        time.sleep(1.5)  # the stub watch looks every 0.5 s: the old version's stub has exited by now
    finally:
        stop_process_group(proc)
    assert not (repo / SERVE_STATE).exists()
    err = proc.stderr.read() if proc.stderr else ""
    assert "backend process died" not in err, err  # a version unloaded by the swap is not a dead process


def test_a_server_that_aborted_is_reported_by_its_fatal_lines_not_its_gpu_noise(tmp_path):
    from prism_deploy.serving.server import exit_status, log_reason

    log = tmp_path / "server.log"
    log.write_text(
        'I1206 19:48:46.6 13006 server.cc:100] "started"\n'
        'E1206 19:48:46.6 13006 server.cc:241] "CudaDriverHelper has not been initialized."\n'
        "terminate called after throwing an instance of 'std::bad_alloc'\n  what():  std::bad_alloc\n"
        "Signal (6) received.\n 0# 0x00005570A913F29C in tritonserver\n 1# 0x00007FB3B37278EC in libc.so.6\n"
    )
    reason = log_reason(log)
    assert "std::bad_alloc" in reason and "Signal (6)" in reason and "Cuda" not in reason and "0x" not in reason
    log.write_text(
        'E1206 1 model_lifecycle.cc:1] "failed to load \'adapter\'"\nE1206 2 server.cc:241] "CudaDriverHelper x"\n'
    )
    assert "failed to load" in log_reason(log) and "Cuda" not in log_reason(log)
    assert exit_status(-6) == "killed by SIGABRT (exit code -6)" and exit_status(137).startswith("killed by SIGKILL")
    assert exit_status(1) == "exit code 1"


def test_requests_over_the_declared_bounds_get_one_line_400s_and_the_server_keeps_serving(
    serving_stages, serving_env, tmp_path
):
    from tests.serving_helpers import running_server

    z = serving_stages
    repo = tmp_path / "repo"
    assert main(["triton", str(z["dense_build"]), "-o", str(repo)]) == 0
    config = (repo / "adapter" / "config.pbtxt").read_text()
    max_seq = int(config.split('key: "max_seq"')[1].split('string_value: "')[1].split('"')[0])
    max_batch = int(config.split("max_batch_size:")[1].split()[0])
    x = np.random.default_rng(4).standard_normal((1, 3, 64)).astype(np.float32)
    with running_server(repo, serving_env, tmp_path / "server.log") as server:
        url = f"http://{server.http_url}/v2/models/adapter/infer"
        cases = {  # what the request declares, what its body holds
            "over max_seq": ([1, max_seq + 1, 64], (max_seq + 1) * 64 * 4),
            "over the batch": ([max_batch + 1, 2, 64], (max_batch + 1) * 2 * 64 * 4),
            "huge shape, short body": ([1, 10**9, 48], 8),
            "wrong width": ([1, 2, 48], 2 * 48 * 4),
        }
        for what, (shape, nbytes) in cases.items():
            head = json.dumps(
                {
                    "inputs": [
                        {
                            "name": "hidden",
                            "shape": shape,
                            "datatype": "FP32",
                            "parameters": {"binary_data_size": nbytes},
                        }
                    ]
                }
            ).encode()
            status, text = _post(url, head + b"\0" * nbytes, {"Inference-Header-Content-Length": str(len(head))})
            assert status == 400, (what, status, text)
            message = json.loads(text)["error"]
            assert "\n" not in message and "Traceback" not in message, (what, message)
            assert server.proc.poll() is None, what
        client = httpclient.InferenceServerClient(server.http_url)
        got = client.infer("adapter", [http_input("hidden", x, "FP32")]).as_numpy("adapted")
        client.close()
        assert rel_l2(got, reference(z["dense"], x)) <= 1e-5


def test_serve_restarts_a_model_whose_backend_process_was_killed(serving_stages, serving_env, tmp_path):
    import os
    import signal

    from prism_deploy.serving.watchdog import stub_model
    from tests.serving_helpers import children

    z = serving_stages
    repo = tmp_path / "repo"
    assert main(["triton", str(z["dense_build"]), str(z["gated_build"]), "-o", str(repo)]) == 0
    x = np.random.default_rng(5).standard_normal((1, 4, 64)).astype(np.float32)
    ports = [free_port() for _ in range(3)]
    proc = serve_process(repo, *ports, tmp_path / "serve.log")
    http_url = f"127.0.0.1:{ports[0]}"
    try:
        wait_ready(http_url, proc)
        _wait_state(repo)
        (server,) = children(proc.pid)
        from prism_deploy.serving.server import group_members

        stubs = {pid: stub_model(pid) for pid in group_members(server)}
        victim = [pid for pid, mv in stubs.items() if mv and mv[0] == "adapter_1"]
        other = [pid for pid, mv in stubs.items() if mv and mv[0] == "adapter_2"]
        assert len(victim) == 1 and len(other) == 1
        os.kill(victim[0], signal.SIGKILL)
        client = httpclient.InferenceServerClient(http_url, connection_timeout=5, network_timeout=30)
        got = None
        deadline = time.monotonic() + 60  # bounded: a restart takes about a second
        while got is None and time.monotonic() < deadline:
            try:
                got = client.infer("adapter_1", [http_input("hidden", x, "FP32")]).as_numpy("adapted")
            except InferenceServerException:
                time.sleep(0.2)
        assert got is not None and rel_l2(got, reference(z["dense"], x)) <= 1e-5
        now = {pid: stub_model(pid) for pid in group_members(server)}
        assert other[0] in now and victim[0] not in now  # only the dead model's process was replaced
        assert any(mv and mv[0] == "adapter_1" for mv in now.values())
        got2 = client.infer("adapter_2", [http_input("hidden", x, "FP32")]).as_numpy("adapted")
        client.close()
        assert rel_l2(got2, reference(z["gated"], x)) <= 1e-5
    finally:
        stop_process_group(proc)
    err = proc.stderr.read() if proc.stderr else ""
    assert "adapter_1: its backend process died; restarted in" in err and proc.returncode == 0, err


def test_concurrent_updates_of_two_models_of_one_repository_both_stay_recorded(serving_stages, tmp_path):
    import os
    import subprocess
    import sys

    from prism_deploy.reference import random_adapter, simple_config
    from tests.serving_helpers import ROOT

    z = serving_stages
    repo = tmp_path / "repo"
    assert main(["triton", str(z["dense_build"]), str(z["gated_build"]), "-o", str(repo)]) == 0
    new = {}
    for model, seed in (("adapter_1", 21), ("adapter_2", 22)):
        new[model] = tmp_path / f"{model}-new.safetensors"
        random_adapter(simple_config(64, 96, (4, 2)), seed=seed).save(new[model])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prism_deploy",
                "triton",
                "update",
                str(repo),
                "--adapter",
                str(new[m]),
                "--model",
                m,
                "--no-load",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for m in new
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    manifest = json.loads((repo / "prism-repository.json").read_text())
    for model in new:
        record = manifest["models"][model]
        assert record["versions"] == [1, 2], (model, record["versions"])
        assert record["sources"]["2"] == str(new[model].resolve())
        assert (repo / model / "2").is_dir()
    # and the recorded widths still guard a shape change
    wide = tmp_path / "wide.safetensors"
    random_adapter(simple_config(64, 128, (4, 2)), seed=23).save(wide)
    assert main(["triton", "update", str(repo), "--adapter", str(wide), "--model", "adapter_1", "--no-load"]) == 2


def test_serve_refuses_ports_in_use_before_starting(serving_stages, tmp_path):
    import socket
    import subprocess
    import sys

    from tests.serving_helpers import ROOT

    z = serving_stages
    repo = tmp_path / "repo"
    assert main(["triton", str(z["dense_build"]), "-o", str(repo)]) == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag in ("--http-port", "--grpc-port", "--metrics-port"):
            others = [f for f in ("--http-port", "--grpc-port", "--metrics-port") if f != flag]
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "prism_deploy",
                    "serve",
                    str(repo),
                    flag,
                    str(port),
                    others[0],
                    "0",
                    others[1],
                    "0",
                ],
                capture_output=True,
                text=True,
                timeout=120,
                env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
            )
            assert out.returncode == 2, out.stderr
            assert out.stderr.strip().splitlines() == [
                f"error: port {port} in use (on 127.0.0.1); choose another or stop what holds it"
            ], out.stderr
            assert not (repo / SERVE_STATE).exists() and out.stdout == ""


def test_the_served_adapter_answers_zero_tokens_as_load_engines_does(serving_stages, serving_env, tmp_path):
    from prism_deploy.runtime import load_engines
    from tests.serving_helpers import running_server

    z = serving_stages
    repo = tmp_path / "repo"
    assert main(["triton", str(z["dense_build"]), "-o", str(repo)]) == 0
    engines = load_engines(z["dense_build"])
    with running_server(repo, serving_env, tmp_path / "server.log") as server:
        client = httpclient.InferenceServerClient(server.http_url)
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        from tests.serving_helpers import grpc_input

        for shape in ((1, 0, 64), (3, 0, 64)):
            x = np.zeros(shape, np.float32)
            expected = np.asarray(engines.run(x))
            served = client.infer("adapter", [http_input("hidden", x, "FP32")]).as_numpy("adapted")
            over_grpc = grpc.infer("adapter", [grpc_input("hidden", x, "FP32")]).as_numpy("adapted")
            assert served.shape == over_grpc.shape == expected.shape == (shape[0], 0, 96)
        x = np.random.default_rng(6).standard_normal((1, 2, 64)).astype(np.float32)  # and real tokens still
        got = client.infer("adapter", [http_input("hidden", x, "FP32")]).as_numpy("adapted")
        client.close()
        grpc.close()
        assert rel_l2(got, np.asarray(engines.run(x))) <= 1e-5


def test_serve_refuses_a_json_request_declaring_more_values_than_it_carries_and_keeps_serving(
    serving_stages, serving_env, tmp_path
):
    """Triton 2.51 allocates a JSON input's declared shape before reading it ([1, 10^9, 48] with two
    numbers aborted it); serve's HTTP front refuses such a request, and passes the rest through."""
    z = serving_stages
    repo = tmp_path / "repo"
    assert main(["triton", str(z["dense_build"]), "-o", str(repo)]) == 0
    x = np.random.default_rng(8).standard_normal((1, 2, 64)).astype(np.float32)
    ports = [free_port() for _ in range(3)]
    proc = serve_process(repo, *ports, tmp_path / "serve.log")
    http_url = f"127.0.0.1:{ports[0]}"
    try:
        wait_ready(http_url, proc)
        _wait_state(repo)
        url = f"http://{http_url}/v2/models/adapter/infer"
        for shape in ([1, 10**9, 48], [10**6, 1, 64], [1, 2**40, 64]):
            body = json.dumps(
                {"inputs": [{"name": "hidden", "shape": shape, "datatype": "FP32", "data": [1.0, 2.0]}]}
            ).encode()
            status, text = _post(url, body, {"Content-Type": "application/json"})
            assert status == 400 and "declares" in json.loads(text)["error"] and "\n" not in text, (shape, text)
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "hidden",
                        "shape": [1, 10**9, 48],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 8},
                    }
                ]
            }
        ).encode()
        status, text = _post(url, head + b"\0" * 8, {"Inference-Header-Content-Length": str(len(head))})
        assert status == 400, text  # Triton's own check, through the front
        ok = json.dumps(
            {"inputs": [{"name": "hidden", "shape": [1, 2, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
        ).encode()
        status, text = _post(url, ok, {"Content-Type": "application/json"})
        assert status == 200
        got = np.asarray(json.loads(text)["outputs"][0]["data"], np.float32).reshape(1, 2, 96)
        assert rel_l2(got, reference(z["dense"], x)) <= 1e-5
        client = httpclient.InferenceServerClient(http_url)  # keep-alive, binary tensors
        for _ in range(3):
            got = client.infer("adapter", [http_input("hidden", x, "FP32")]).as_numpy("adapted")
            assert rel_l2(got, reference(z["dense"], x)) <= 1e-5
        assert client.is_server_ready() and client.is_model_ready("adapter")
        client.close()
        assert proc.poll() is None
    finally:
        stop_process_group(proc)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


def test_the_front_judges_only_json_data_against_the_body():
    from prism_deploy.serving.http_guard import declared_too_much

    def body(inputs: list[dict[str, object]]) -> bytes:
        return json.dumps({"inputs": inputs}).encode()

    assert declared_too_much(body([{"name": "h", "shape": [1, 10**9, 48], "data": [1.0]}]), None)
    assert declared_too_much(body([{"name": "h", "shape": [1, 2, 2], "data": [1.0] * 4}]), None) is None
    assert declared_too_much(body([{"name": "h", "shape": [1, 0, 64], "data": []}]), None) is None  # zero tokens
    head = body([{"name": "h", "shape": [1, 10**9, 48], "parameters": {"binary_data_size": 8}}])
    assert declared_too_much(head + b"\0" * 8, str(len(head))) is None  # binary: Triton checks the bytes
    assert declared_too_much(b"not json", None) is None and declared_too_much(b"[]", None) is None


def test_serve_removes_its_default_log_after_a_clean_stop(serving_stages, serving_env, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.serving_helpers import ROOT

    z = serving_stages
    repo = tmp_path / "repo"
    assert main(["triton", str(z["dense_build"]), "-o", str(repo)]) == 0
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    ports = [free_port() for _ in range(3)]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prism_deploy",
            "serve",
            str(repo),
            "--http-port",
            str(ports[0]),
            "--grpc-port",
            str(ports[1]),
            "--metrics-port",
            str(ports[2]),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir)},
    )
    try:
        wait_ready(f"127.0.0.1:{ports[0]}", proc)
        _wait_state(repo)
        assert len(list(tmpdir.glob("prism-tritonserver-*.log"))) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        stop_process_group(proc)
    assert list(tmpdir.glob("prism-tritonserver-*.log")) == []


def test_the_front_leaves_no_connection_open_per_client_and_passes_bodies_unchanged():
    import http.server
    import os
    import threading

    from prism_deploy.serving.http_guard import HttpGuard

    class Echo(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    front = HttpGuard("127.0.0.1", 0, upstream.server_address[1])
    front.start()
    try:
        url = f"http://127.0.0.1:{front.server_address[1]}/v2/models/m/infer"
        fds = len(os.listdir("/proc/self/fd"))
        for i in range(50):  # a new client connection each time
            body = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [i, 2]}]}).encode()
            assert _post(url, body, {}) == (200, body.decode())
        deadline = time.monotonic() + 10
        while front._open and time.monotonic() < deadline:
            time.sleep(0.05)
        assert front._open == set() and len(os.listdir("/proc/self/fd")) <= fds + 2
    finally:
        front.stop()
        upstream.shutdown()
        upstream.server_close()


@pytest.mark.parametrize("values", [[[1, 2, 1]], [[1, 1, 7]], [[-1, 1, 1]]])
def test_the_backend_refuses_attention_mask_values_other_than_0_and_1(monkeypatch, values):
    """The served stages refuse what the in-process runtime refuses (core.limits.mask_problem):
    another number would be read as a weight and change the logits."""
    from types import SimpleNamespace

    from prism_deploy.serving import backend

    tensors = {"attention_mask": np.asarray(values, dtype=np.int64), "input_ids": np.ones((1, 3), np.int64)}
    fake_pb = SimpleNamespace(
        get_input_tensor_by_name=lambda request, name: (
            SimpleNamespace(as_numpy=lambda: tensors[name]) if name in tensors else None
        )
    )
    monkeypatch.setattr(backend, "_pb", lambda: fake_pb)
    with pytest.raises(backend.RequestError, match="attention_mask: values must be 0"):
        backend._input(object(), "attention_mask")
    tensors["attention_mask"] = np.asarray([[0, 1, 1]], dtype=np.int64)
    assert backend._input(object(), "attention_mask").tolist() == [[0, 1, 1]]
