"""A Python-backend stub killed (SIGKILL) under load: how long until the model answers again, and
how many requests fail meanwhile.

    python benchmarks/stub_recovery.py [--adapter examples/demo-adapter.safetensors] [--clients 4]
        [--before 3] [--after 20] [--kills 3] [--json FILE]

Builds the adapter (ort-cpu, fp32) into a temporary folder, writes a Python-form repository,
starts tritonserver on free loopback ports with the watch ``serve`` keeps
(:class:`prism_deploy.serving.watchdog.StubWatch`, looked at every 0.5 s as in ``serve``), and
keeps ``--clients`` HTTP clients sending one ``[1, 8, in_dim]`` request each in a loop (a
60 s network timeout, so a hung request counts as failed, not as a hang). After ``--before``
seconds it kills the adapter's stub process, then measures: the time from the kill to the
first right answer after it (recovery), the requests that failed in between, the watch's own
restart time, whether a client polling readiness every 20 ms saw it false (and the longest
wait for an answer: Triton holds readiness requests while the model reloads), and whether every
answer was right. ``--kills``
repeats the kill (each after the previous recovery). Bounded in time: each kill waits at most
``--after`` seconds for recovery.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default=str(ROOT / "examples" / "demo-adapter.safetensors"))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--before", type=float, default=3.0)
    p.add_argument("--after", type=float, default=20.0)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="prism-stub-recovery-"))
    try:
        return _run(args, work)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)  # the temporary folder made above


def _run(args: argparse.Namespace, work: Path) -> int:
    import onnxruntime
    import tritonclient.http as httpclient

    from prism_deploy.bench.machine import describe_machine, load_average
    from prism_deploy.builder import BuildRequest, build_engines
    from prism_deploy.runtime import load_engines
    from prism_deploy.serving import env as envmod
    from prism_deploy.serving import repository
    from prism_deploy.serving.server import TritonServer, ports
    from prism_deploy.serving.watchdog import StubWatch

    build = work / "build"
    build_engines(
        BuildRequest(adapter=Path(args.adapter), out_dir=build, target="ort-cpu", precisions=("fp32",)),
        log=lambda m: print(m, file=sys.stderr),
    ).raise_for_failures()
    engines = load_engines(build)
    x = np.random.default_rng(0).standard_normal((1, 8, engines.in_dim)).astype(np.float32)
    expected = np.asarray(engines.run(x))
    entries, manifest = repository.plan([build], repository.Options())
    repo = repository.write(work / "repo", entries, manifest)
    be = envmod.prepare(onnxruntime.__version__, log=lambda m: print(m, file=sys.stderr))
    http, grpc, metrics = ports("127.0.0.1", 0, 0, 0)
    load_start = load_average()
    events: list[tuple[float, str]] = []  # (time, "ok" | "wrong" | "error")
    lock = threading.Lock()
    stop = threading.Event()
    kills: list[dict[str, object]] = []
    with TritonServer(repo, be, http, grpc, metrics, log_path=work / "server.log", exit_timeout_s=5) as server:
        server.wait_ready(180)
        watch = StubWatch(server, log=lambda m: print(m, file=sys.stderr))

        def client_loop() -> None:
            c = httpclient.InferenceServerClient(server.http_url, connection_timeout=10, network_timeout=60)
            t = httpclient.InferInput("hidden", list(x.shape), "FP32")
            t.set_data_from_numpy(x)
            for _ in range(1_000_000):  # bounded in count; the event bounds it in time
                if stop.is_set():
                    break
                try:
                    y = c.infer("adapter", [t]).as_numpy("adapted")
                    kind = "ok" if np.allclose(y, expected, atol=1e-5, rtol=1e-4) else "wrong"
                except Exception:
                    kind = "error"
                    time.sleep(0.01)
                with lock:
                    events.append((time.monotonic(), kind))
            c.close()

        threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        for th in threads:
            th.start()
        try:
            for _ in range(args.kills):
                time.sleep(args.before)
                stubs = [pid for pid, (model, _v) in watch.stubs().items() if model == "adapter"]
                killed_at = time.monotonic()
                for pid in stubs:
                    os.kill(pid, signal.SIGKILL)
                readiness: list[tuple[float, bool]] = []
                probing = threading.Event()

                def probe_loop() -> None:  # readiness as a client sees it, every 20 ms
                    probe = httpclient.InferenceServerClient(server.http_url, connection_timeout=5, network_timeout=10)
                    while not probing.is_set():
                        try:
                            readiness.append((time.monotonic(), bool(probe.is_model_ready("adapter"))))
                        except Exception:
                            readiness.append((time.monotonic(), False))
                        time.sleep(0.02)
                    probe.close()

                prober = threading.Thread(target=probe_loop)
                prober.start()
                restart: dict[str, object] = {}
                restart_done = None
                deadline = killed_at + args.after
                while time.monotonic() < deadline and not restart.get("ok"):
                    done = watch.check()  # what serve's loop does every 0.5 s
                    if done:
                        restart, restart_done = done[0], time.monotonic()
                    else:
                        time.sleep(0.5)
                time.sleep(1.0)  # answers after the restart
                probing.set()
                prober.join(timeout=30)
                with lock:
                    window = [(t, k) for t, k in events if t > killed_at]
                failed = [t for t, k in window if k == "error"]
                first_ok = min((t for t, k in window if k == "ok" and t > max(failed, default=killed_at)), default=None)
                kills.append(
                    {
                        "stubs_killed": len(stubs),
                        "recovered": bool(restart.get("ok")) and first_ok is not None,
                        "restart_done_seconds": round(restart_done - killed_at, 3) if restart_done else None,
                        "outage_seconds": round(first_ok - killed_at, 3) if failed and first_ok else 0.0,
                        "failed_requests": len(failed),
                        "wrong_answers": sum(k == "wrong" for _t, k in window),
                        "restart": restart,
                        # Triton holds a readiness request while the model reloads: the longest wait
                        "readiness_longest_gap_seconds": round(
                            max((b - a for (a, _), (b, _) in zip(readiness, readiness[1:])), default=0.0), 3
                        ),
                        "readiness_turned_false": any(not r for t, r in readiness if t > killed_at),
                    }
                )
                print(json.dumps(kills[-1]), file=sys.stderr)
        finally:
            stop.set()
            for th in threads:
                th.join(timeout=90)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "command": "python benchmarks/stub_recovery.py " + " ".join(argv_of(args)),
        "clients": args.clients,
        "requests": len(events),
        "wrong_answers": sum(k == "wrong" for _t, k in events),
        "kills": kills,
    }
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0 if kills and all(k["recovered"] for k in kills) and result["wrong_answers"] == 0 else 1


def argv_of(args: argparse.Namespace) -> list[str]:
    return [f"--clients {args.clients}", f"--kills {args.kills}"]


if __name__ == "__main__":
    sys.exit(main())
