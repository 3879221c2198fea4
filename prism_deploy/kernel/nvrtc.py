"""Compile the tile-dispatch kernel to PTX with NVRTC, cached on disk.

NVRTC needs no GPU, so CI compiles every variant. PTX is cached under
``$PRISM_DEPLOY_CACHE/kernels`` (default ``~/.cache/prism-deploy/kernels``), keyed by the
source's SHA-256, the target architecture, the ``-D`` defines and the NVRTC version: a change
to any of them is a miss, never a stale hit. Each kind of entry (PTX, host executables) is
capped at ``CACHE_KEEP`` files, least recently used first out.

PTX carries an ISA version (NVRTC 13.5 writes 9.5); a driver older than the NVRTC that wrote it
refuses to load it (CUDA_ERROR_UNSUPPORTED_PTX_VERSION): compile for the device's own
architecture with an NVRTC no newer than its driver.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prism_deploy.core.errors import PrismInputError, brief
from prism_deploy.core.fsutil import write_bytes_atomic
from prism_deploy.kernel.spec import KERNEL_NAME, TileDispatchSpec, kernel_source_path

SUPPORTED_ARCHS = ("compute_80", "compute_86", "compute_89", "compute_90")
# No --use_fast_math: expf and the divisions stay IEEE, as in the float32 reference.
BASE_OPTIONS = ["-std=c++17"]


class KernelCompileError(RuntimeError):
    """NVRTC rejected the kernel: the message names the arch, the defines and the first error."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(" ".join(message.split()))
        self.log = log


@dataclass(frozen=True)
class CompiledKernel:
    name: str  # the entry point in the PTX
    ptx: bytes
    arch: str
    options: tuple[str, ...]
    cache_path: Path | None
    cache_hit: bool


def normalize_arch(arch: str | int | tuple[int, int]) -> str:
    """``"sm_90"``, ``"compute_90"``, ``"90"``, ``90`` or ``(9, 0)`` -> ``"compute_90"``."""
    if isinstance(arch, tuple):
        arch = f"{arch[0]}{arch[1]}"
    text = str(arch).strip().lower()
    m = re.fullmatch(r"(?:sm_|compute_)?(\d{2,3})a?", text)
    if not m:
        raise PrismInputError(f"kernel arch: {arch!r} is not like compute_90, sm_90 or 90")
    return f"compute_{m.group(1)}"


def cache_dir() -> Path:
    root = os.environ.get("PRISM_DEPLOY_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "prism-deploy"
    return base / "kernels"


# Entries of one kind the kernel cache keeps. Every edit of the source and every new shape adds
# an entry and nothing else removes one, so after a write the least recently used beyond this
# many go (a hit refreshes an entry's mtime). A just-written entry is the newest: never pruned.
CACHE_KEEP = 256


def touch_cache_entry(path: Path) -> None:
    """Mark a cache entry as just used (best effort: a read-only cache still serves hits)."""
    try:
        os.utime(path)
    except OSError:
        pass


def prune_cache(pattern: str, keep: int | None = None) -> int:
    """Remove all but the ``keep`` most recently used cache entries matching ``pattern``;
    returns how many went. Temporary files (``.name.*.tmp``) never match a pattern."""
    keep = CACHE_KEEP if keep is None else keep
    entries = []
    for path in cache_dir().glob(pattern):
        try:
            entries.append((path.stat().st_mtime_ns, path))
        except OSError:  # removed by another process meanwhile
            continue
    entries.sort(reverse=True)
    removed = 0
    for _, path in entries[keep:]:
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc  # type: ignore[import-untyped,unused-ignore]

    err, major, minor = nvrtc.nvrtcVersion()
    _check(err, "nvrtcVersion")
    return int(major), int(minor)


def nvrtc_status() -> tuple[bool, str]:
    """Whether NVRTC can compile here: the binding imports and the library (libnvrtc) loads."""
    try:
        major, minor = nvrtc_version()
    except ImportError as exc:
        return False, f"cuda-bindings (NVRTC) is not installed ({exc})"
    except Exception as exc:  # the binding raises when libnvrtc cannot be loaded
        return False, f"NVRTC cannot be loaded ({type(exc).__name__}: {brief(exc)})"
    return True, f"NVRTC {major}.{minor}"


def compile_ptx(
    spec: TileDispatchSpec,
    arch: str | int | tuple[int, int],
    *,
    source: str | None = None,
    use_cache: bool = True,
) -> CompiledKernel:
    """PTX of the kernel specialised to ``spec`` for ``arch``; from the disk cache when present."""
    arch_name = normalize_arch(arch)
    text = kernel_source_path().read_text() if source is None else source
    options = (f"--gpu-architecture={arch_name}", *BASE_OPTIONS, *spec.defines())
    key = _cache_key(text, arch_name, options)
    path = cache_dir() / f"tile_dispatch-{arch_name}-{key[:24]}.ptx"
    if use_cache and path.is_file():
        touch_cache_entry(path)
        return CompiledKernel(KERNEL_NAME, path.read_bytes(), arch_name, options, path, True)
    ptx = _nvrtc_compile(text, options, arch_name)
    if KERNEL_NAME.encode() not in ptx:
        raise KernelCompileError(f"NVRTC output for {arch_name} lacks the entry point {KERNEL_NAME}", "")
    if use_cache:
        try:
            write_bytes_atomic(path, ptx)
            prune_cache("tile_dispatch-compute_*.ptx")
        except OSError:  # a read-only cache is no reason to fail a compile
            path = None  # type: ignore[assignment,unused-ignore]
    return CompiledKernel(KERNEL_NAME, ptx, arch_name, options, path if use_cache else None, False)


def ptx_entry_points(ptx: bytes) -> list[str]:
    """The kernel names a PTX module defines (``.entry`` directives)."""
    return re.findall(r"\.entry\s+([A-Za-z_][A-Za-z0-9_$]*)\s*\(", ptx.decode("ascii", "replace"))


@dataclass(frozen=True)
class Resources:
    """What ptxas reports for one compiled variant (``--ptxas-options=-v``)."""

    arch: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int


def ptxas_resources(
    spec: TileDispatchSpec, arch: str | int | tuple[int, int] = "sm_90", *, source: str | None = None
) -> Resources:
    """Registers, stack and spills of the kernel for ``spec`` on a real architecture (``sm_XX``).

    NVRTC compiles to a cubin with ptxas verbose, so this needs no GPU and no CUDA toolkit."""
    sm = normalize_arch(arch).replace("compute_", "sm_")
    text = kernel_source_path().read_text() if source is None else source
    options = (f"--gpu-architecture={sm}", *BASE_OPTIONS, "--ptxas-options=-v", *spec.defines())
    with _compiled_program(text, options, sm) as (_prog, log):
        pass
    regs = re.search(r"Used (\d+) registers", log)
    stack = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or stack is None:
        raise KernelCompileError(f"no ptxas resource report in the NVRTC log for {sm}", log)
    return Resources(sm, int(regs.group(1)), int(stack.group(1)), int(stack.group(2)), int(stack.group(3)))


def _cache_key(text: str, arch: str, options: tuple[str, ...]) -> str:
    payload = json.dumps(
        {
            "source": hashlib.sha256(text.encode()).hexdigest(),
            "arch": arch,
            "options": list(options),
            "nvrtc": list(nvrtc_version()),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _nvrtc_compile(text: str, options: tuple[str, ...], arch: str) -> bytes:
    from cuda.bindings import nvrtc  # type: ignore[import-untyped,unused-ignore]

    with _compiled_program(text, options, arch) as (prog, _log):
        err, size = nvrtc.nvrtcGetPTXSize(prog)
        _check(err, "nvrtcGetPTXSize")
        buf = _out_buffer(size)
        (err,) = nvrtc.nvrtcGetPTX(prog, buf)
        _check(err, "nvrtcGetPTX")
        return bytes(buf).rstrip(b"\x00")


@contextlib.contextmanager
def _compiled_program(text: str, options: tuple[str, ...], arch: str) -> Iterator[tuple[object, str]]:
    """``(program, log)`` of ``tile_dispatch.cu`` compiled with ``options``, destroyed on exit; a
    failed compile is one ``KernelCompileError`` naming the arch, the defines and the first error."""
    from cuda.bindings import nvrtc  # type: ignore[import-untyped,unused-ignore]

    err, prog = nvrtc.nvrtcCreateProgram(text.encode(), b"tile_dispatch.cu", 0, [], [])
    _check(err, "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in options]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log = _program_log(prog)
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            first = next((ln.strip() for ln in log.splitlines() if "error" in ln), log.strip()[:200])
            defines = " ".join(o for o in options if o.startswith("-D"))
            raise KernelCompileError(f"NVRTC could not compile tile_dispatch.cu for {arch} ({defines}): {first}", log)
        yield prog, log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _program_log(prog: object) -> str:
    from cuda.bindings import nvrtc  # type: ignore[import-untyped,unused-ignore]

    err, size = nvrtc.nvrtcGetProgramLogSize(prog)
    _check(err, "nvrtcGetProgramLogSize")
    buf = _out_buffer(size)
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return bytes(buf).rstrip(b"\x00").decode("utf-8", "replace")


def _out_buffer(size: int) -> bytearray:
    """A writable buffer for NVRTC to fill. Never ``b" " * size``: bytes are immutable, and
    for size 1 (an empty log) CPython returns its shared ``b" "`` object, which NVRTC would
    then overwrite for the whole process (seen here: every later ``b" "`` became ``b"\\x00"``)."""
    return bytearray(size)


def _check(err: object, what: str) -> None:
    from cuda.bindings import nvrtc  # type: ignore[import-untyped,unused-ignore]

    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise KernelCompileError(f"{what} failed: {err}", "")
