"""Load through a real Triton server against in-process ``load_engines(...).run``, same inputs, same run.

    python benchmarks/serving_load.py [--adapter examples/demo-adapter.safetensors] [--requests 400]
        [--seconds 30] [--concurrency 1,4,16] [--json benchmarks/results/DATE-cpu-serving.json]

Builds the adapter (ort-cpu, fp32, default profile) into a temporary folder, writes a
Python-form repository (`prism-deploy triton`), starts tritonserver on free loopback ports
(`prism_deploy.serving.server`), and for each concurrency level sends ``--requests`` requests
of one ``[1, seq, in_dim]`` float32 batch each from that many client threads (each thread its
own client), over HTTP, over gRPC, and over HTTP through ``serve``'s front
(``serving.http_guard``), stopping early after ``--seconds``. The same inputs then
go through ``load_engines(DIR).run`` in this process from the same number of threads.
Throughput (requests/s) and the p50/p99 latency of each request, and the serving overhead as
the ratio of the server's p50 to the in-process p50, go into one JSON file with the machine.
Every response is checked against the in-process output (max abs difference recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_level(
    call,
    inputs: list[np.ndarray],
    concurrency: int,
    requests: int,
    seconds: float,  # type: ignore[no-untyped-def]
    make_state,
) -> dict[str, object]:
    """``requests`` calls split over ``concurrency`` threads; each call's latency; stops after ``seconds``."""
    latencies: list[float] = []
    worst = [0.0]
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + seconds

    def worker() -> None:
        state = make_state()
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                x, expected = inputs[i % len(inputs)]
                t0 = time.perf_counter()
                try:
                    y = call(state, x)
                except Exception as exc:  # counted, reported
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                dt = time.perf_counter() - t0
                diff = float(np.abs(y - expected).max())
                with lock:
                    latencies.append(dt)
                    worst[0] = max(worst[0], diff)
        finally:
            close = getattr(state, "close", None)
            if close is not None:
                close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 60)
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:3],
        "seconds": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 1),
        "p50_ms": round(1e3 * percentile(latencies, 50), 3),
        "p99_ms": round(1e3 * percentile(latencies, 99), 3),
        "max_abs_diff_vs_in_process": worst[0],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", default=str(ROOT / "examples" / "demo-adapter.safetensors"))
    ap.add_argument("--seq", type=int, default=64, help="tokens per request (default 64, the profile's OPT)")
    ap.add_argument("--requests", type=int, default=400, help="requests per level and protocol (default 400)")
    ap.add_argument("--seconds", type=float, default=30.0, help="time bound per level and protocol (default 30)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--json", help="results file (default benchmarks/results/<date>-cpu-serving.json)")
    args = ap.parse_args()

    from prism_deploy.bench.machine import describe_machine, load_average

    levels = [int(c) for c in args.concurrency.split(",")]
    machine = describe_machine()
    load_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="prism-serving-bench-"))
    try:
        return _run(args, levels, machine, load_start, work)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)  # the temporary folder made above


def _run(args, levels, machine, load_start, work: Path) -> int:  # type: ignore[no-untyped-def]
    import onnxruntime
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from prism_deploy.bench.machine import load_average
    from prism_deploy.builder import BuildRequest, build_engines
    from prism_deploy.runtime import load_engines
    from prism_deploy.serving import env as envmod
    from prism_deploy.serving import repository
    from prism_deploy.serving.server import TritonServer, ports

    build = work / "build"
    build_engines(
        BuildRequest(adapter=Path(args.adapter), out_dir=build, target="ort-cpu", precisions=("fp32",)),
        log=lambda m: print(m, file=sys.stderr),
    ).raise_for_failures()
    engines = load_engines(build)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, args.seq, engines.in_dim)).astype(np.float32) for _ in range(32)]
    inputs = [(x, np.asarray(engines.run(x))) for x in xs]
    entries, manifest = repository.plan([build], repository.Options())
    repo = repository.write(work / "repo", entries, manifest)
    be = envmod.prepare(onnxruntime.__version__, log=lambda m: print(m, file=sys.stderr))

    class Http:
        def __init__(self, url: str) -> None:
            self.c = httpclient.InferenceServerClient(url, network_timeout=120)

        def close(self) -> None:
            self.c.close()

    class Grpc(Http):
        def __init__(self, url: str) -> None:
            self.c = grpcclient.InferenceServerClient(url)

    def http_call(state: Http, x: np.ndarray) -> np.ndarray:
        t = httpclient.InferInput("hidden", list(x.shape), "FP32")
        t.set_data_from_numpy(x)
        return state.c.infer("adapter", [t]).as_numpy("adapted")

    def grpc_call(state: Grpc, x: np.ndarray) -> np.ndarray:
        t = grpcclient.InferInput("hidden", list(x.shape), "FP32")
        t.set_data_from_numpy(x)
        return state.c.infer("adapter", [t]).as_numpy("adapted")

    results: dict[str, list[dict[str, object]]] = {"in_process": [], "http": [], "grpc": [], "http_front": []}
    http, grpc, metrics = ports("127.0.0.1", 0, 0, 0)
    with TritonServer(repo, be, http, grpc, metrics, log_path=work / "server.log") as server:
        server.wait_ready(180)
        for c in levels:  # warm-up: every instance path once
            run_level(http_call, inputs, c, 2 * c, 10, lambda: Http(server.http_url))
        # serve's HTTP front (serving.http_guard) before Triton's HTTP port, as `serve` runs it
        from prism_deploy.serving.http_guard import HttpGuard

        front = HttpGuard("127.0.0.1", 0, server.http_port)
        front.start()
        front_url = f"127.0.0.1:{front.server_address[1]}"
        for c in levels:
            for name, call, state in (
                ("http", http_call, lambda: Http(server.http_url)),
                ("grpc", grpc_call, lambda: Grpc(server.grpc_url)),
                ("http_front", http_call, lambda: Http(front_url)),
            ):
                row = run_level(call, inputs, c, args.requests, args.seconds, state)
                results[name].append(row)
                print(
                    f"{name:10s} c={c:2d}: {row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']:.3f} ms  "
                    f"p99 {row['p99_ms']:.3f} ms  errors {row['errors']}",
                    file=sys.stderr,
                )
        front.stop()
        stats = httpclient.InferenceServerClient(server.http_url).get_inference_statistics(
            "adapter", headers=server.control_headers
        )
    batch_stats = {
        int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["model_stats"][0]["batch_stats"]
    }
    for c in levels:
        row = run_level(lambda _s, x: np.asarray(engines.run(x)), inputs, c, args.requests, args.seconds, lambda: None)
        results["in_process"].append(row)
        print(
            f"{'in-process':10s} c={c:2d}: {row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']:.3f} ms  "
            f"p99 {row['p99_ms']:.3f} ms",
            file=sys.stderr,
        )
    overhead = {
        proto: {
            str(r["concurrency"]): round(float(r["p50_ms"]) / float(base["p50_ms"]), 2)  # type: ignore[arg-type]
            for r, base in zip(results[proto], results["in_process"])
        }
        for proto in ("http", "grpc", "http_front")
    }
    throughput_ratio = {
        proto: {
            str(r["concurrency"]): round(float(r["throughput_rps"]) / float(base["throughput_rps"]), 3)  # type: ignore[arg-type]
            for r, base in zip(results[proto], results["in_process"])
        }
        for proto in ("http", "grpc", "http_front")
    }
    out = {
        "benchmark": "prism-deploy serving load (benchmarks/serving_load.py)",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "adapter": os.path.relpath(args.adapter, ROOT),
        "engine": engines.id,
        "request": {"shape": [1, args.seq, engines.in_dim], "dtype": "float32"},
        "server": {
            "tritonserver": str(server.binary.path) if server.binary else None,
            "form": "python",
            "dynamic_batching": entries[0].config["dynamic_batching"],
            "max_batch_size": entries[0].config["max_batch_size"],
            "instances": 1,
            "backend_environment": be.info,
            "batch_sizes_executed": batch_stats,
        },
        "settings": {"requests_per_level": args.requests, "seconds_bound": args.seconds, "concurrency": levels},
        "results": results,
        "p50_ratio_server_over_in_process": overhead,
        "throughput_ratio_server_over_in_process": throughput_ratio,
    }
    path = (
        Path(args.json)
        if args.json
        else ROOT / "benchmarks" / "results" / f"{datetime.now():%Y-%m-%d}-cpu-serving.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(f"results: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
