"""The machine a benchmark ran on, and the two rates its floor is measured against.

Results from different machines must never be mixed up, so every run records the CPU
model, core count, load average (the dev machine is shared), GPU and driver, and the
versions of the libraries that did the work. The copy bandwidth and matrix rate are
measured at the start of each run on the same machine, not taken from a data sheet.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any

import numpy as np

# Large enough to fall out of every cache level of a server CPU (L3 is tens of MiB).
COPY_BYTES_CPU = 256 * 1024 * 1024
COPY_BYTES_GPU = 1024 * 1024 * 1024
MATMUL_N_CPU = 2048
MATMUL_N_GPU = 8192
RATE_TRIES = 5


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector/matrix ISA flags that decide which kernels a library can use."""
    wanted = (
        "avx2",
        "avx512f",
        "avx512_bf16",
        "avx512_fp16",
        "avx512_vnni",
        "amx_bf16",
        "amx_int8",
        "amx_tile",
        "f16c",
    )
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def gpu_info() -> dict[str, Any] | None:
    """The GPU as ``core.targets.gpu_info`` finds it, with torch's CUDA version; None without one."""
    from prism_deploy.core.targets import gpu_info as smi_info
    from prism_deploy.core.targets import gpu_present

    if not gpu_present():
        return None
    info: dict[str, Any] = dict(smi_info() or {})
    try:
        import torch

        if torch.cuda.is_available():
            info.setdefault("name", torch.cuda.get_device_name(0))
            info["torch_cuda"] = torch.version.cuda
    except Exception:  # a broken CUDA install must not stop a CPU benchmark
        pass
    return info or {"name": "unknown NVIDIA GPU"}


def library_versions() -> dict[str, str]:
    import torch

    from prism_deploy.core.version import __version__

    versions = {
        "python": platform.python_version(),
        "prism_deploy": __version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    for name in ("onnxruntime", "onnx", "matplotlib"):
        try:
            mod = __import__(name)
        except Exception:
            continue
        versions[name] = str(getattr(mod, "__version__", "unknown"))
    from prism_deploy.core.targets import tensorrt_version  # None where only the type stubs are installed

    trt = tensorrt_version()
    if trt is not None:
        versions["tensorrt"] = trt
    return versions


def describe_machine() -> dict[str, Any]:
    import torch

    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": _mem_total(),
        "gpu": gpu_info(),
        "versions": library_versions(),
        "argv": recorded_argv(sys.argv),
    }


def recorded_argv(argv: list[str]) -> list[str]:
    """The command line as a result file records it: ``python -m prism_deploy`` puts the absolute
    path of the checkout's ``__main__.py`` in argv[0], which names the machine's folders in a
    committed result; it is recorded from the package's parent instead."""
    head = argv[:1]
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if head and os.path.isabs(head[0]) and head[0].startswith(package_parent + os.sep):
        head = [os.path.relpath(head[0], package_parent)]
    return [*head, *argv[1:]]


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure_copy_bandwidth(
    device: str = "cpu", nbytes: int | None = None, threads: int | None = None, working_set: int | None = None
) -> dict[str, Any]:
    """Best-of-N large copy; bandwidth counts bytes read plus bytes written (as STREAM's Copy).

    A kernel that streams weights once reads each byte and writes almost nothing, so its
    floor is ``bytes read / bandwidth`` with this definition. On CPU the copy runs on
    ``threads`` threads (numpy releases the GIL; default: all cores), over a buffer larger
    than most last-level caches and, when ``working_set`` is given, over buffers the size of
    the adapter's weights: a CPU with a large last-level cache keeps weights of that size
    in cache from one call to the next, and the floor must be the most the machine can do
    for this adapter. The fastest of these copies is the bandwidth.
    """
    if device == "cuda":
        return _gpu_copy_bandwidth(nbytes or COPY_BYTES_GPU)
    n_threads = threads or os.cpu_count() or 1
    sizes = {"large": nbytes or COPY_BYTES_CPU}
    if working_set:
        sizes["adapter working set"] = max(1 << 20, min(sizes["large"], working_set))
    results = {}
    for label, total in sizes.items():
        # src + dst together span ``total`` for the working-set copy; 2 x ``total`` for the large one
        src_bytes = total if label == "large" else total // 2
        size = f"{src_bytes / 2**20:.0f} MiB" if src_bytes >= 2**20 else f"{src_bytes / 2**10:.0f} KiB"
        results[f"numpy copyto, {n_threads} thread(s), {size} ({label})"] = _copy_rate(src_bytes, n_threads)
    name = max(results, key=lambda k: results[k])
    return {
        "bytes_per_s": results[name],
        "by_method": results,
        "method": f"{name}, best of {RATE_TRIES}, read+write counted",
    }


def _copy_rate(src_bytes: int, threads: int) -> float:
    from concurrent.futures import ThreadPoolExecutor

    src = np.ones(max(1, src_bytes // 8), dtype=np.float64)
    dst = np.empty_like(src)
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in np.array_split(np.arange(src.size), threads) if c.size]
    with ThreadPoolExecutor(max_workers=len(bounds)) as pool:

        def copy() -> None:
            list(pool.map(lambda ab: np.copyto(dst[ab[0] : ab[1]], src[ab[0] : ab[1]]), bounds))

        copy()  # fault the pages in (and warm the cache) before timing
        # Small buffers copy in microseconds: time enough repetitions per sample.
        reps = max(1, int(0.02 * 20e9 / max(1, 2 * src.nbytes)))
        best = float("inf")
        for _ in range(RATE_TRIES):
            t0 = time.perf_counter_ns()
            for _ in range(reps):
                copy()
            best = min(best, (time.perf_counter_ns() - t0) * 1e-9 / reps)
    return 2 * src.nbytes / best


def _gpu_copy_bandwidth(nbytes: int) -> dict[str, Any]:
    import torch

    src = torch.ones(nbytes // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(RATE_TRIES):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e-3)
    return {
        "bytes_per_s": 2 * nbytes / best,
        "method": f"torch device-to-device copy of {nbytes >> 20} MiB, CUDA events, best of {RATE_TRIES}, read+write counted",
        "seconds": best,
    }


def measure_matrix_rate(
    device: str = "cpu", dtype: str = "fp32", n: int | None = None, threads: int | None = None
) -> dict[str, Any]:
    """Best-of-N square matmul, in FLOP/s (2*n^3 per product).

    On CPU both torch (oneDNN/MKL) and ONNX Runtime (MLAS) are measured and the faster kept,
    for the same reason as the copy: the floor is what the machine can do.
    """
    import torch

    tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    n = n or (MATMUL_N_GPU if device == "cuda" else MATMUL_N_CPU)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=tdtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=tdtype)
    if device == "cuda":
        torch.mm(a, b)
        best = float("inf")
        for _ in range(RATE_TRIES):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) * 1e-3)
        return {
            "flops_per_s": 2 * n**3 / best,
            "method": f"torch.mm {n}x{n} {dtype} on cuda, CUDA events, best of {RATE_TRIES}",
        }
    results = {f"torch.mm ({torch.get_num_threads()} threads)": 2 * n**3 / _best_seconds(lambda: torch.mm(a, b))}
    ort_run = _ort_matmul(a.numpy(), b.numpy(), threads)
    if ort_run is not None:
        results[f"onnxruntime MatMul ({threads or 'default'} threads)"] = 2 * n**3 / _best_seconds(ort_run)
    name = max(results, key=lambda k: results[k])
    return {
        "flops_per_s": results[name],
        "by_method": results,
        "method": f"{name}, {n}x{n} {dtype}, best of {RATE_TRIES}",
    }


def _best_seconds(fn: Any) -> float:
    fn()
    best = float("inf")
    for _ in range(RATE_TRIES):
        t0 = time.perf_counter_ns()
        fn()
        best = min(best, (time.perf_counter_ns() - t0) * 1e-9)
    return best


def _ort_matmul(a: np.ndarray, b: np.ndarray, threads: int | None) -> Any:
    """A one-node ONNX MatMul session with ``b`` as an initializer; None without onnxruntime."""
    try:
        from onnx import TensorProto, helper, numpy_helper

        from prism_deploy.core.onnx_io import finalize
        from prism_deploy.core.ort_session import make_session
    except ImportError:
        return None
    n = a.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matrix_rate",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
        [numpy_helper.from_array(np.ascontiguousarray(b, dtype=np.float32), "b")],
    )
    session = make_session(finalize(helper.make_model(graph)).SerializeToString(), "cpu", intra_op_threads=threads)
    x = np.ascontiguousarray(a, dtype=np.float32)
    return lambda: session.run(None, {"a": x})
