"""Run the tile-dispatch kernel's CUDA source on the CPU, for tests on machines without a GPU.

``plugins/tile_dispatch/host/`` compiles ``tile_dispatch.cu`` unchanged as host C++ with a small
execution model of the CUDA built-ins it uses (``cuda_host.h``: blocks one after another, the
threads of a block as cooperative fibers, warp shuffles and ballots as real exchanges between
the 32 lanes). The defines are ``TileDispatchSpec.defines()`` and the grid, block and shared
memory come from ``launch_config``: the same specialisation and geometry a GPU launch uses. So
this checks the kernel's code, not a re-implementation of it: indexing, routing, grouping,
padding, int8 scales, half conversions, and that the launch geometry covers every output.

The run happens in a child process, because what it is there to catch can crash: every buffer
lies against an inaccessible page (an out-of-bounds read or write is a SIGSEGV, reported as a
``HostRunError``), the shared memory is exactly the launch's size, and tiles the routing did not
select can be made inaccessible (``unread_workers``). Needs a C++17 compiler with ``_Float16``
(g++ 12 or newer on x86-64); ``$CXX`` overrides ``g++``. Executables are cached next to the PTX
(``prism_deploy.kernel.nvrtc.cache_dir``), keyed by every source, the defines and the compiler.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.fsutil import atomic_output
from prism_deploy.kernel.nvrtc import cache_dir, prune_cache, touch_cache_entry
from prism_deploy.kernel.spec import TileDispatchSpec, kernel_source_path, launch_config

CXX_FLAGS = ["-std=c++17", "-O2", "-U_FORTIFY_SOURCE", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas"]


class HostRunError(RuntimeError):
    """The host build failed, or the kernel broke a rule while running (message says which)."""


def host_sources() -> list[Path]:
    """The kernel source and the two host files, in the order they are hashed."""
    kernel = kernel_source_path()
    host = kernel.parent / "host"
    return [kernel, host / "cuda_host.h", host / "host_main.cpp"]


def compiler() -> str | None:
    """The C++ compiler to use, or None when there is none on PATH."""
    return shutil.which(os.environ.get("CXX", "g++"))


def build_host_runner(spec: TileDispatchSpec, *, use_cache: bool = True) -> Path:
    """The host executable for ``spec`` (compiled once, then taken from the cache)."""
    cxx = compiler()
    if cxx is None:
        raise HostRunError("no C++ compiler found (set $CXX or install g++)")
    sources = host_sources()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    h = hashlib.sha256()
    for part in [
        *(p.read_bytes() for p in sources),
        *(s.encode() for s in spec.defines()),
        *(v.encode() for v in version),
    ]:
        h.update(hashlib.sha256(part).digest())
    exe = cache_dir() / f"tile_dispatch-host-{h.hexdigest()[:24]}"
    if use_cache and exe.is_file() and os.access(exe, os.X_OK):  # a copy without its x bit is rebuilt
        touch_cache_entry(exe)
        return exe
    host_dir = sources[1].parent
    exe.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(exe) as tmp:
        cmd = [cxx, *CXX_FLAGS, *spec.defines(), "-include", str(sources[1]), str(sources[2]), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=host_dir)
        if done.returncode != 0:
            first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr.strip()[:300])
            raise HostRunError(f"host build of tile_dispatch.cu failed ({' '.join(spec.defines())}): {first}")
        os.chmod(tmp, 0o755)
    prune_cache("tile_dispatch-host-*")
    return exe


def run_on_host(
    spec: TileDispatchSpec,
    hidden: np.ndarray,
    scores: np.ndarray,
    tiles: np.ndarray,
    scales: np.ndarray | None = None,
    *,
    guard: str = "end",
    unread_workers: Iterable[int] = (),
    timeout: float = 600.0,
) -> np.ndarray:
    """The kernel's output ``[T, out_dim]`` (dtype of ``hidden``), computed by its CUDA source on the CPU.

    ``guard``: which edge of every buffer touches an inaccessible page (``"end"`` catches
    overruns, ``"start"`` underruns). ``unread_workers``: workers whose tiles must not be
    touched (needs ``guard="start"`` and tiles of whole pages); touching one is a HostRunError.
    """
    out, _ = _run(
        spec,
        hidden,
        scores,
        tiles,
        scales,
        guard=guard,
        unread_workers=unread_workers,
        count_reads=False,
        timeout=timeout,
    )
    return out


def count_tile_reads(
    spec: TileDispatchSpec,
    hidden: np.ndarray,
    scores: np.ndarray,
    tiles: np.ndarray,
    scales: np.ndarray | None = None,
    *,
    timeout: float = 600.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The output, and how many times each 16-byte piece of ``tiles`` was loaded by a 16-byte
    load: ``[R*C, tr, tc * itemsize // 16]`` (needs ``tc * itemsize`` a multiple of 16).

    Only the kernel's vector loads are counted; a tile row whose valid columns do not end on a
    16-byte boundary is read partly by scalar loads, which this does not see."""
    row_bytes = spec.tc * np.dtype(spec.tile_dtype).itemsize
    if row_bytes % 16:
        raise PrismInputError(f"count_tile_reads needs tile rows of whole 16-byte pieces, got {row_bytes} bytes")
    out, reads = _run(
        spec, hidden, scores, tiles, scales, guard="end", unread_workers=(), count_reads=True, timeout=timeout
    )
    assert reads is not None
    return out, reads.reshape(spec.workers, spec.tr, row_bytes // 16)


def _run(
    spec: TileDispatchSpec,
    hidden: np.ndarray,
    scores: np.ndarray,
    tiles: np.ndarray,
    scales: np.ndarray | None,
    *,
    guard: str,
    unread_workers: Iterable[int],
    count_reads: bool,
    timeout: float,
) -> tuple[np.ndarray, np.ndarray | None]:
    hidden, scores, tiles, scales = _checked_inputs(spec, hidden, scores, tiles, scales)
    if guard not in ("end", "start"):
        raise PrismInputError(f"guard must be 'end' or 'start', got {guard!r}")
    T, in_dim = hidden.shape
    cfg = launch_config(spec, T)
    exe = build_host_runner(spec)
    with tempfile.TemporaryDirectory(prefix="tile-dispatch-host-") as d:
        for name, arr in (("hidden", hidden), ("scores", scores), ("tiles", tiles), ("scales", scales)):
            arr.tofile(os.path.join(d, f"{name}.bin"))
        unread = sorted({int(w) for w in unread_workers})
        if unread:
            Path(d, "unread_workers.txt").write_text("".join(f"{w}\n" for w in unread))
        if count_reads:
            Path(d, "count_reads").touch()
        # at least one token chunk, as the TensorRT plugin launches it (T = 0 included)
        argv = [
            str(exe),
            str(cfg.grid_x),
            str(max(cfg.grid_y, 1)),
            str(cfg.block_x),
            str(cfg.shared_mem),
            str(T),
            str(in_dim),
            guard,
            d,
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise HostRunError(_describe_failure(done.returncode, done.stderr))
        out = np.fromfile(os.path.join(d, "out.bin"), dtype=hidden.dtype)
        reads = np.fromfile(os.path.join(d, "tile_reads.bin"), dtype=np.uint32) if count_reads else None
    return out.reshape(T, spec.out_dim), reads


def _describe_failure(code: int, stderr: str) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        what = "an out-of-bounds memory access" if -code in (signal.SIGSEGV, signal.SIGBUS) else "a crash"
        return f"the kernel died with {name} on the host: {what}"
    return stderr.strip().splitlines()[-1] if stderr.strip() else f"host runner exited with {code}"


def _checked_inputs(
    spec: TileDispatchSpec, hidden: np.ndarray, scores: np.ndarray, tiles: np.ndarray, scales: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if hidden.ndim != 2 or hidden.dtype != np.dtype(spec.hidden_dtype):
        raise PrismInputError(f"hidden must be [T, in_dim] {spec.hidden_dtype}, got {hidden.dtype} {hidden.shape}")
    T, in_dim = hidden.shape
    if not 0 < in_dim <= spec.padded_in:
        raise PrismInputError(f"in_dim={in_dim} must be in [1, C*tc={spec.padded_in}]")
    if scores.shape != (T, spec.workers) or scores.dtype != np.float32:
        raise PrismInputError(f"scores must be [{T}, {spec.workers}] float32, got {scores.dtype} {scores.shape}")
    if tiles.shape != (spec.workers, spec.tr, spec.tc) or tiles.dtype != np.dtype(spec.tile_dtype):
        raise PrismInputError(
            f"tiles must be [{spec.workers}, {spec.tr}, {spec.tc}] {spec.tile_dtype}, got {tiles.dtype} {tiles.shape}"
        )
    if spec.tile_dtype == "int8":
        if scales is None or scales.shape != (spec.workers, spec.tr) or scales.dtype != np.float32:
            raise PrismInputError(f"int8 tiles need scales [{spec.workers}, {spec.tr}] float32")
    elif scales is None:
        scales = np.ones(1, np.float32)
    return (
        np.ascontiguousarray(hidden),
        np.ascontiguousarray(scores),
        np.ascontiguousarray(tiles),
        np.ascontiguousarray(scales, dtype=np.float32),
    )
