"""Resident memory of each ``bench --model`` case, each measured in a fresh child process (``--memory``).

Why a child: the bench's own process holds every folder, transformers and the peers at once, so
its resident set says nothing of one of them. A child imports what its case needs, loads it,
runs one generation on the bench's inputs (the prompt's prefill, then the decode steps) and
reads ``VmRSS`` (resident now) and ``VmHWM`` (peak resident so far) from ``/proc/self/status``
after its imports, after the load and after the run. A **baseline** child goes through the same
steps with nothing to import or load (Python, numpy and this module), so that a case's peak
can be stated net of the interpreter (``net_peak_bytes``: its peak less the baseline's). The
children run one at a time, after the timing, so that they neither take the timed cores nor
share memory with each other. Where ``/proc/self/status`` is missing (not Linux) nothing is
measured and the results say so.

    python -m prism_deploy.bench.resident SPEC.json    # prints one JSON object
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

STATUS = Path("/proc/self/status")
METHOD = (
    "VmRSS and VmHWM from /proc/self/status in a fresh child process per case, after its imports, "
    "after the load and after one generation (the prompt's prefill, then the decode steps); "
    "net_peak_bytes: the case's VmHWM after the run less a baseline child's (Python, numpy, nothing loaded)"
)
# a child that loads and runs one model for longer than this is stopped (its case says so)
CHILD_TIMEOUT_S = 3600
# the figures a child reads at each point, and their keys in /proc/self/status
FIELDS = {"rss_bytes": "VmRSS", "hwm_bytes": "VmHWM"}
# what each kind of case imports before it loads (the baseline: nothing beyond this module)
IMPORTS = {
    "baseline": (),
    "folder": ("onnxruntime", "prism_deploy.bench.model_runners", "prism_deploy.runtime.model_stage"),
    "transformers eager": ("torch", "transformers", "prism_deploy.bench.model_runners", "prism_deploy.models.hf"),
    "onnxruntime-genai": ("onnxruntime_genai", "prism_deploy.bench.peers"),
    "llama.cpp": ("llama_cpp", "prism_deploy.bench.llamacpp"),
}


def not_measured_reason() -> str | None:
    """Why resident memory cannot be measured here (None: it can)."""
    return None if STATUS.is_file() else f"not measured: no {STATUS} (Linux only)"


def read_status() -> dict[str, int]:
    """This process's VmRSS and VmHWM, in bytes."""
    out = {}
    for line in STATUS.read_text(encoding="utf-8").splitlines():
        key, _, rest = line.partition(":")
        for name, field in FIELDS.items():
            if key == field:
                out[name] = int(rest.split()[0]) * 1024  # the kernel writes kB (KiB)
    return out


def spec_of(name: str, runner: Any, common: dict[str, Any]) -> dict[str, Any]:
    """What a child needs to load ``runner`` (a case of the bench) again on its own."""
    kind = runner.describe().get("backend") or "folder"
    spec: dict[str, Any] = {"name": name, "kind": kind, **common}
    if kind == "folder":
        spec["path"] = str(runner.folder.dir)
    elif kind == "transformers eager":
        spec.update(path=runner.source, role=runner.role)
    elif kind == "onnxruntime-genai":
        spec.update(path=runner.source, precision=runner.precision)
    elif kind == "llama.cpp":
        spec.update(path=str(runner.path), precision=runner.precision, gguf_type=runner.gguf_type)
    return spec


def measure(specs: list[dict[str, Any]], scratch: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the baseline child's figures, {case name: its child's figures}), children run one by one;
    a child that fails gives ``error`` (its last line) instead of figures."""
    reason = not_measured_reason()
    if reason:
        return {"not_measured": reason}, {s["name"]: {"not_measured": reason} for s in specs}
    baseline = _child({"name": "baseline", "kind": "baseline"}, scratch)
    cases = {}
    for spec in specs:
        got = _child(spec, scratch)
        if "after_run" in got and "after_run" in baseline:
            got["net_peak_bytes"] = got["after_run"]["hwm_bytes"] - baseline["after_run"]["hwm_bytes"]
        cases[spec["name"]] = got
    return baseline, cases


def _child(spec: dict[str, Any], scratch: Path) -> dict[str, Any]:
    path = scratch / f"resident-{len(list(scratch.glob('resident-*.json')))}.json"
    path.write_text(json.dumps(spec))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "prism_deploy.bench.resident", str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"the child process ran past {CHILD_TIMEOUT_S} s and was stopped"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"the child process failed (exit {done.returncode}): {tail[0][:300]}"}
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def _load(spec: dict[str, Any]) -> Any:
    kind, threads = spec["kind"], int(spec.get("threads", 1))
    if kind == "baseline":
        return None
    if kind == "folder":
        from prism_deploy.bench.model_runners import OrtModel

        return OrtModel(Path(spec["path"]), threads)
    if kind == "transformers eager":
        import torch

        from prism_deploy.bench.model_runners import EagerModel

        torch.set_num_threads(threads)
        return EagerModel(spec["path"], spec["role"])
    if kind == "onnxruntime-genai":
        from prism_deploy.bench.peers import GenAIPeer

        return GenAIPeer(spec["path"], spec["precision"], threads, int(spec["max_length"]), Path(spec["scratch"]))
    if kind == "llama.cpp":
        from prism_deploy.bench.llamacpp import LlamaCppPeer

        return LlamaCppPeer(Path(spec["path"]), spec["gguf_type"], spec["precision"], threads, int(spec["max_length"]))
    raise ValueError(f"unknown kind of case {kind!r}")


def main(argv: list[str]) -> int:
    """The child: imports, load, one generation, and the figures after each, as one JSON line."""
    import importlib

    spec = json.loads(Path(argv[0]).read_text())
    for module in IMPORTS[spec["kind"]]:
        importlib.import_module(module)
    out: dict[str, Any] = {"after_imports": read_status()}
    runner = _load(spec)
    out["after_load"] = read_status()
    if runner is not None:
        inputs = np.load(spec["inputs"])
        first, steps = inputs["first"], list(inputs["steps"])
        if "ids" in inputs.files and hasattr(runner, "ids"):
            runner.ids = inputs["ids"]
        runner.generate(first, steps)
    out["after_run"] = read_status()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
