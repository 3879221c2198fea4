"""The build environment: which targets work here, tool versions, the GPU.

Engines are tied to what built them (an ONNX Runtime optimized model to the ONNX Runtime
version and provider; a TensorRT engine to the TensorRT version and the GPU's compute
capability), so these facts enter the cache key and are checked again when loading.
Tests monkeypatch ``tool_versions`` to simulate an upgrade.
"""

from __future__ import annotations

import functools
import platform
import shutil
import subprocess
from typing import Any

from prism_deploy.errors import PrismInputError
from prism_deploy.build.options import TARGETS


def tensorrt_status() -> tuple[bool, str]:
    """Whether a real TensorRT builder can run here (needs the library and a GPU), and why."""
    from prism_deploy.ort_session import gpu_present
    from prism_deploy.trt.engine import tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        return False, why
    if not gpu_present():
        return False, "TensorRT is installed but there is no NVIDIA GPU"
    return True, why


def target_status(target: str) -> tuple[bool, str]:
    from prism_deploy.ort_session import cuda_provider_available

    if target == "trt":
        return tensorrt_status()
    if target == "ort-cuda":
        return cuda_provider_available()
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False, "onnxruntime is not installed"
    return True, "ONNX Runtime CPU provider"


def resolve_target(requested: str) -> tuple[str, str]:
    """``auto`` or a named target -> (target, why). A named target that cannot run is bad input."""
    if requested == "auto":
        reasons: list[str] = []
        for target in TARGETS:
            ok, why = target_status(target)
            if ok:
                return target, "; ".join([why, *(f"not {r}" for r in reasons)])
            reasons.append(f"{target}: {why}")
        raise PrismInputError(f"--target auto: no target can run here ({'; '.join(reasons)})")
    if requested not in TARGETS:
        raise PrismInputError(f"--target: {requested!r} is not one of auto, {', '.join(TARGETS)}")
    ok, why = target_status(requested)
    if not ok:
        raise PrismInputError(f"--target {requested}: unavailable here ({why})")
    return requested, "asked for"


def tool_versions(target: str) -> dict[str, str | None]:
    """Versions of everything that shapes an engine of ``target`` (part of its cache key)."""
    import onnx
    import onnxruntime as ort

    from prism_deploy import __version__

    versions: dict[str, str | None] = {"prism_deploy": __version__, "onnx": onnx.__version__}
    if target == "trt":
        from prism_deploy.trt.engine import tensorrt_version

        versions["tensorrt"] = tensorrt_version()
    else:
        versions["onnxruntime"] = ort.__version__
    return versions


def runtime_tool(target: str) -> str:
    """The tool whose version must match between build and load."""
    return "tensorrt" if target == "trt" else "onnxruntime"


@functools.cache
def gpu_info() -> dict[str, str] | None:
    """Name and compute capability of GPU 0, from nvidia-smi (no CUDA context needed)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    name, _, cc = out.stdout.strip().splitlines()[0].rpartition(",")
    return {"name": name.strip(), "compute_capability": cc.strip()}


def device_info(target: str) -> dict[str, Any]:
    """The hardware an engine is tied to: the GPU for GPU targets, the CPU architecture otherwise."""
    if target == "ort-cpu":
        return {"kind": "cpu", "machine": platform.machine()}
    gpu = gpu_info() or {"name": "unknown", "compute_capability": "unknown"}
    return {"kind": "gpu", **gpu}
