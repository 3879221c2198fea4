"""The adaptation loop on a served chain: recording on, traffic from a second text domain, one
`adapt` round hot-swapped under load with zero failed requests, `triton rollback` restoring the
previous answers exactly. A real `tritonserver` (the wheel's), as tests/serving/test_server.py.
"""

from __future__ import annotations

import json
import stat
import threading
import time

import numpy as np
import pytest

from prism_deploy.cli.main import main
from prism_deploy.serving import record
from tests.adapt_helpers import MAX_SEQ, fitted_on_prose, prose_and_code
from tests.serving_helpers import ROOT, http_input, stop_process_group, wait_ready

httpclient = pytest.importorskip("tritonclient.http")


def test_recorded_drift_adapted_live_under_load_and_rolled_back(zoo, serving_env, tmp_path, capsys):
    import os
    import subprocess
    import sys

    from prism_deploy.models.tokenizers import load_tokenizer
    from prism_deploy.serving.server import free_port

    fitted = fitted_on_prose(tmp_path, zoo["llama"], zoo["qwen2"])
    repo = tmp_path / "repo"
    assert main(["triton", str(zoo["A"]), str(fitted["build"]), str(zoo["B"]), "-o", str(repo)]) == 0
    records = tmp_path / "records"
    tok = load_tokenizer(zoo["llama"])
    _, code = prose_and_code()
    x = np.random.default_rng(3).standard_normal((1, 8, 64)).astype(np.float32)
    http = free_port()
    ports = [str(http), str(free_port()), str(free_port())]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(record.RECORD_VARIABLE, None)
    # `serve --record` as a user runs it; adapt and rollback find it (and its secret) in REPO/.prism-serve.json
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prism_deploy",
            "serve",
            str(repo),
            "--http-port",
            ports[0],
            "--grpc-port",
            ports[1],
            "--metrics-port",
            ports[2],
            "--log",
            str(tmp_path / "server.log"),
            "--exit-timeout",
            "5",
            "--record",
            str(records),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(tmp_path),
        start_new_session=True,
    )
    url = f"127.0.0.1:{http}"
    try:
        wait_ready(url, proc)
        deadline = time.monotonic() + 30
        while not (repo / ".prism-serve.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        client = httpclient.InferenceServerClient(url)
        sent = []
        for text in code:  # the drifted traffic, through the ensemble
            ids = tok([text], truncation=True, max_length=MAX_SEQ, return_tensors="np")["input_ids"].astype(np.int64)
            client.infer(
                "chain",
                [http_input("input_ids", ids, "INT64"), http_input("attention_mask", np.ones_like(ids), "INT64")],
            )
            sent.append(ids[0].tolist())
        kept = record.read_records(records)
        assert [r["ids"][0] for r in kept] == sent and all(r["tokenizer"] == "llama" for r in kept)
        old = client.infer("adapter", [http_input("hidden", x, "FP32")]).as_numpy("adapted")

        stop = threading.Event()
        results: list[np.ndarray | Exception] = []

        def load() -> None:
            c = httpclient.InferenceServerClient(url, network_timeout=60)
            for _ in range(20000):
                if stop.is_set():
                    break
                try:
                    results.append(c.infer("adapter", [http_input("hidden", x, "FP32")]).as_numpy("adapted"))
                except Exception as exc:  # counted below
                    results.append(exc)
            c.close()

        capsys.readouterr()  # the build's and the repository's tables
        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            code_rc = main(
                [
                    "adapt",
                    str(repo),
                    "--model",
                    "adapter",
                    "--from",
                    str(records),
                    "--model-a",
                    str(zoo["llama"]),
                    "--model-b",
                    str(zoo["qwen2"]),
                    "--original",
                    str(fitted["pairs"]),
                    "--adapter",
                    str(fitted["adapter"]),
                    "--max-seq",
                    str(MAX_SEQ),
                    "--top",
                    "2",
                    "--margin",
                    "0.2",
                    "--json",
                ]
            )
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert code_rc == 0
        entry = json.loads(capsys.readouterr().out)
        assert entry["decision"] == "live" and entry["after"]["recorded"] < entry["before"]["recorded"]
        new = client.infer("adapter", [http_input("hidden", x, "FP32")]).as_numpy("adapted")
        assert not np.array_equal(new, old)
        assert [r for r in results if isinstance(r, Exception)] == []
        assert all(np.array_equal(r, old) or np.array_equal(r, new) for r in results) and len(results) > 20

        assert main(["triton", "rollback", str(repo), "--model", "adapter"]) == 0
        back = client.infer("adapter", [http_input("hidden", x, "FP32")]).as_numpy("adapted")
        assert np.array_equal(back, old)
        client.close()
    finally:
        stop_process_group(proc)
    assert proc.returncode == 0
    assert stat.S_IMODE(os.stat(records).st_mode) == 0o700
    assert all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in record.record_files(records))
