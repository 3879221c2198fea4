"""Launch the tile-dispatch kernel from Python through the CUDA driver API (no TensorRT).

Takes CUDA tensors that expose ``__cuda_array_interface__`` (torch, cupy): their device
pointers are passed straight to the kernel. The launch geometry comes from
``prism_deploy.kernel.spec.launch_config``, the same function the TensorRT plugin calls.

Written and type-checked on a machine without a GPU: this module has not been run on a GPU
yet (see docs/plugin.md).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from prism_deploy.core.errors import PrismInputError
from prism_deploy.kernel.nvrtc import CompiledKernel, compile_ptx
from prism_deploy.kernel.spec import TileDispatchSpec, launch_config

_TYPESTR = {"<f4": "float32", "<f2": "float16", "|i1": "int8", "<i1": "int8"}


class CudaError(RuntimeError):
    pass


def _check(result: Any, what: str) -> Any:
    """cuda.bindings calls return ``(err, *values)``; raise on an error, return the values."""
    from cuda.bindings import driver  # type: ignore[import-untyped,unused-ignore]

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise CudaError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class DeviceArray:
    """What the kernel needs of a tensor: its pointer, shape and dtype (C-contiguous only)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, tensor: Any, name: str) -> DeviceArray:
        cai = getattr(tensor, "__cuda_array_interface__", None)
        if cai is None:
            raise PrismInputError(f"tile_dispatch: {name} is not a CUDA array (no __cuda_array_interface__)")
        shape = tuple(int(s) for s in cai["shape"])
        dtype = _TYPESTR.get(cai["typestr"])
        if dtype is None:
            raise PrismInputError(f"tile_dispatch: {name} has unsupported dtype {cai['typestr']}")
        strides = cai.get("strides")
        if strides is not None:
            item = {"float32": 4, "float16": 2, "int8": 1}[dtype]
            expect, acc = [], item
            for s in reversed(shape):
                expect.append(acc)
                acc *= s
            if tuple(reversed(expect)) != tuple(strides) and 0 not in shape:
                raise PrismInputError(f"tile_dispatch: {name} must be C-contiguous")
        return cls(int(cai["data"][0]), shape, dtype)


def device_arch(device: int = 0) -> str:
    from cuda.bindings import driver  # type: ignore[import-untyped,unused-ignore]

    try:
        init = driver.cuInit(0)
    except Exception as exc:  # cuda-bindings raises when libcuda (the driver) is absent
        raise CudaError(f"no usable CUDA driver on this machine ({type(exc).__name__}: {exc})") from exc
    _check(init, "cuInit")
    dev = _check(driver.cuDeviceGet(device), "cuDeviceGet")
    attr = driver.CUdevice_attribute
    major = _check(
        driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cuDeviceGetAttribute"
    )
    minor = _check(
        driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cuDeviceGetAttribute"
    )
    return f"compute_{major}{minor}"


class TileDispatchLauncher:
    """One compiled, loaded kernel for one spec; call it with CUDA tensors.

    The caller's current CUDA context is used (torch and cupy make the device's primary
    context current); without one, the device's primary context is retained and made current.
    """

    def __init__(self, spec: TileDispatchSpec, device: int = 0) -> None:
        from cuda.bindings import driver  # type: ignore[import-untyped,unused-ignore]

        self.spec = spec
        self.arch = device_arch(device)
        ctx = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if ctx is None or int(ctx) == 0:
            dev = _check(driver.cuDeviceGet(device), "cuDeviceGet")
            ctx = _check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            _check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        self.kernel: CompiledKernel = compile_ptx(spec, self.arch)
        # NUL-terminated PTX in a buffer that outlives the call, passed by address
        self._image = np.frombuffer(self.kernel.ptx.rstrip(b"\0") + b"\0", dtype=np.uint8).copy()
        self._module = _check(driver.cuModuleLoadData(self._image.ctypes.data), "cuModuleLoadData")
        self._function = _check(
            driver.cuModuleGetFunction(self._module, self.kernel.name.encode()), "cuModuleGetFunction"
        )

    def __call__(self, hidden: Any, scores: Any, tiles: Any, scales: Any, out: Any, stream: int = 0) -> None:
        """Launch on ``stream`` (a raw ``cudaStream_t`` as int; 0 = legacy default stream)."""
        from cuda.bindings import driver  # type: ignore[import-untyped,unused-ignore]

        spec = self.spec
        h = DeviceArray.of(hidden, "hidden")
        s = DeviceArray.of(scores, "scores")
        t = DeviceArray.of(tiles, "tiles")
        q = DeviceArray.of(scales, "scales")
        o = DeviceArray.of(out, "out")
        if len(h.shape) != 2 or h.dtype != spec.hidden_dtype:
            raise PrismInputError(
                f"tile_dispatch: hidden must be [T, in_dim] {spec.hidden_dtype}, got {h.shape} {h.dtype}"
            )
        T, in_dim = h.shape
        if in_dim > spec.padded_in:
            raise PrismInputError(f"tile_dispatch: hidden has in_dim={in_dim} > C*tc={spec.padded_in}")
        if s.shape != (T, spec.workers) or s.dtype != "float32":
            raise PrismInputError(
                f"tile_dispatch: scores must be [{T}, {spec.workers}] float32, got {s.shape} {s.dtype}"
            )
        if t.dtype != spec.tile_dtype or _numel(t.shape) != spec.workers * spec.tr * spec.tc:
            raise PrismInputError(f"tile_dispatch: tiles must hold R*C*tr*tc {spec.tile_dtype} elements")
        if spec.tile_dtype == "int8" and (_numel(q.shape) != spec.workers * spec.tr or q.dtype != "float32"):
            raise PrismInputError("tile_dispatch: int8 tiles need float32 scales of shape [R*C, tr]")
        if o.shape != (T, spec.out_dim) or o.dtype != spec.hidden_dtype:
            raise PrismInputError(f"tile_dispatch: out must be [{T}, {spec.out_dim}] {spec.hidden_dtype}")
        if t.ptr % 16:
            # the kernel reads tile rows with 16-byte vector loads
            raise PrismInputError("tile_dispatch: tiles must start on a 16-byte boundary (a fresh allocation does)")
        if T == 0:
            return
        cfg = launch_config(spec, T)
        args = (h.ptr, s.ptr, t.ptr, q.ptr, T, in_dim, o.ptr)
        types = (
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
        )
        _check(
            driver.cuLaunchKernel(
                self._function,
                cfg.grid_x,
                cfg.grid_y,
                1,
                cfg.block_x,
                1,
                1,
                cfg.shared_mem,
                driver.CUstream(stream),
                (args, types),
                0,
            ),
            "cuLaunchKernel",
        )

    def close(self) -> None:
        from cuda.bindings import driver  # type: ignore[import-untyped,unused-ignore]

        if getattr(self, "_module", None) is not None:
            driver.cuModuleUnload(self._module)
            self._module = None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def tile_dispatch_torch(
    hidden: Any,
    scores: Any,
    tiles: Any,
    scales: Any | None,
    spec: TileDispatchSpec,
    launcher: TileDispatchLauncher | None = None,
) -> Any:
    """Convenience for torch CUDA tensors: allocate the output and launch on torch's stream."""
    import torch

    launcher = launcher or _launcher_for(spec, hidden.device.index or 0)
    out = torch.empty(hidden.shape[0], spec.out_dim, dtype=hidden.dtype, device=hidden.device)
    if scales is None:
        scales = torch.ones(1, dtype=torch.float32, device=hidden.device)
    launcher(
        hidden.contiguous(),
        scores.contiguous(),
        tiles.contiguous(),
        scales.contiguous(),
        out,
        stream=torch.cuda.current_stream(hidden.device).cuda_stream,
    )
    return out


_LAUNCHERS: dict[tuple[TileDispatchSpec, int], TileDispatchLauncher] = {}


def _launcher_for(spec: TileDispatchSpec, device: int) -> TileDispatchLauncher:
    key = (spec, device)
    if key not in _LAUNCHERS:
        _LAUNCHERS[key] = TileDispatchLauncher(spec, device)
    return _LAUNCHERS[key]
