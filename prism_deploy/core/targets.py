"""Targets: where engines run, which of them work on this machine, and what ties an engine to it.

A target is ``trt`` (TensorRT), ``ort-cuda`` (ONNX Runtime's CUDA provider) or ``ort-cpu``.
Engines are tied to what built them (an ONNX Runtime optimized model to the ONNX Runtime version
and provider; a TensorRT engine to the TensorRT version and the GPU's compute capability), so
``tool_versions`` and ``device_info`` enter the build cache key and are checked again when an
engine is loaded. Tests monkeypatch ``tool_versions`` to simulate an upgrade.

The GPU is asked for only when it is really there: ``onnxruntime-gpu`` lists the CUDA provider
on machines without one. ``PRISM_DEPLOY_NO_GPU=1`` makes this machine count as GPU-less, so the
CPU paths can be tested the same way on every machine.

This module only probes whether TensorRT imports; every use of TensorRT's API lives in
``prism_deploy.trt``.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from enum import Enum
from typing import Any

from prism_deploy.core.errors import PrismInputError

NO_GPU_ENV = "PRISM_DEPLOY_NO_GPU"


class Target(str, Enum):
    TRT = "trt"
    ORT_CUDA = "ort-cuda"
    ORT_CPU = "ort-cpu"

    def __str__(self) -> str:
        return self.value

    @property
    def provider(self) -> str:
        """The ONNX Runtime provider of this target's models (TensorRT pipelines run their
        model graphs on ONNX Runtime CUDA)."""
        return "cpu" if self is Target.ORT_CPU else "cuda"

    @property
    def gpu(self) -> bool:
        return self is not Target.ORT_CPU

    @property
    def runtime_tool(self) -> str:
        """The tool whose version must match between build and load."""
        return "tensorrt" if self is Target.TRT else "onnxruntime"


# In the order ``auto`` tries them: the fastest that can run here.
TARGETS: tuple[str, ...] = tuple(t.value for t in Target)
TARGET_CHOICES: tuple[str, ...] = ("auto", *TARGETS)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def parse_target(value: Any, option: str = "--target") -> Target:
    try:
        return Target(value)
    except ValueError:
        raise PrismInputError(f"{option}: {value!r} is not one of {', '.join(TARGET_CHOICES)}") from None


# ---- what this machine has -------------------------------------------------------------------


@functools.cache
def gpu_present() -> bool:
    """True when an NVIDIA GPU answers (nvidia-smi, or /dev/nvidia0 as a fallback)."""
    if os.environ.get(NO_GPU_ENV):
        return False
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
            return out.returncode == 0 and "GPU" in out.stdout
        except (OSError, subprocess.SubprocessError):
            return False
    return os.path.exists("/dev/nvidia0")


def cuda_provider_available() -> tuple[bool, str]:
    """Whether ONNX Runtime's CUDA provider can run here, and why not when it cannot."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, f"this onnxruntime build ({ort.__version__}) has no CUDA provider"
    if not gpu_present():
        return False, "no NVIDIA GPU on this machine"
    return True, "CUDA provider and a GPU are present"


def tensorrt_available() -> tuple[bool, str]:
    """Whether ``import tensorrt`` gives the real library. ``tensorrt-stubs`` alone gives an
    empty namespace package, so test for ``Builder``, never for a successful import."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:
        return False, f"TensorRT is not installed ({type(exc).__name__}: {exc})"
    if not hasattr(tensorrt, "Builder"):
        return False, "`import tensorrt` finds no real TensorRT (no Builder: only type stubs are installed)"
    return True, f"TensorRT {tensorrt.__version__}"


def tensorrt_version() -> str | None:
    ok, _ = tensorrt_available()
    if not ok:
        return None
    import tensorrt

    return str(tensorrt.__version__)


def target_status(target: Target | str) -> tuple[bool, str]:
    """Whether ``target`` can build and run engines here, and why (not)."""
    t = parse_target(target)
    if t is Target.TRT:
        ok, why = tensorrt_available()
        if ok and not gpu_present():
            return False, "TensorRT is installed but there is no NVIDIA GPU"
        return ok, why
    if t is Target.ORT_CUDA:
        return cuda_provider_available()
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False, "onnxruntime is not installed"
    return True, "ONNX Runtime CPU provider"


def resolve_target(requested: Target | str) -> tuple[Target, str]:
    """``auto`` or a named target -> (target, why). A named target that cannot run is bad input."""
    if requested == "auto":
        reasons: list[str] = []
        for t in Target:
            ok, why = target_status(t)
            if ok:
                return t, "; ".join([why, *(f"not {r}" for r in reasons)])
            reasons.append(f"{t.value}: {why}")
        raise PrismInputError(f"--target auto: no target can run here ({'; '.join(reasons)})")
    t = parse_target(requested)
    ok, why = target_status(t)
    if not ok:
        raise PrismInputError(f"--target {t.value}: unavailable here ({why})")
    return t, "asked for"


def resolve_provider(provider: str) -> tuple[str, str]:
    """``cpu``, ``cuda`` or ``auto`` -> (the ONNX Runtime provider to use, why)."""
    if provider not in ("cpu", "cuda", "auto"):
        raise PrismInputError(f"--provider: {provider!r} is not one of cpu, cuda, auto")
    if provider == "cpu":
        return "cpu", "asked for"
    ok, why = cuda_provider_available()
    if ok:
        return "cuda", why
    return "cpu", f"CUDA provider unavailable ({why}); using CPU"


def target_provider(target: Target | str) -> tuple[str, str]:
    """The ONNX Runtime provider for the models (and ONNX adapters) of a pipeline run on
    ``target`` (``auto``: CUDA where it can run), and why."""
    if target == "auto":
        return resolve_provider("auto")
    t = parse_target(target)
    if t is Target.ORT_CPU:
        return "cpu", "asked for"
    provider, why = resolve_provider("cuda")
    if provider != "cuda":
        raise PrismInputError(f"--target {t.value}: {why}")
    return "cuda", why


# ---- what ties an engine to this machine ---------------------------------------------------------


def tool_versions(target: Target | str) -> dict[str, str | None]:
    """Versions of everything that shapes an engine of ``target`` (part of its cache key)."""
    import onnx

    from prism_deploy.core.version import __version__

    versions: dict[str, str | None] = {"prism_deploy": __version__, "onnx": onnx.__version__}
    if parse_target(target) is Target.TRT:
        versions["tensorrt"] = tensorrt_version()
    else:
        import onnxruntime as ort

        versions["onnxruntime"] = ort.__version__
    return versions


@functools.cache
def gpu_info() -> dict[str, str] | None:
    """Name, compute capability, driver and memory of GPU 0, from nvidia-smi (no CUDA context
    needed); None where no GPU answers."""
    smi = shutil.which("nvidia-smi")
    if not smi or os.environ.get(NO_GPU_ENV):
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,compute_cap,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    # the name may hold commas; the three fields after it do not
    name, cc, driver, memory = (out.stdout.strip().splitlines()[0].rsplit(",", 3) + ["", "", ""])[:4]
    return {"name": name.strip(), "compute_capability": cc.strip(), "driver": driver.strip(), "memory": memory.strip()}


def device_info(target: Target | str) -> dict[str, Any]:
    """The hardware an engine is tied to: the GPU for GPU targets, the CPU architecture otherwise."""
    if not parse_target(target).gpu:
        return {"kind": "cpu", "machine": platform.machine()}
    gpu = gpu_info() or {"name": "unknown", "compute_capability": "unknown"}
    return {"kind": "gpu", **gpu}
