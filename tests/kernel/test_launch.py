"""The launcher's argument handling, checked without a GPU: the driver call is intercepted and
its arguments compared with launch_config and the kernel's parameter order."""

from __future__ import annotations

import ctypes

import pytest

pytest.importorskip("cuda.bindings.driver", reason="cuda-bindings is not installed")

from prism_deploy.core.errors import PrismInputError  # noqa: E402
from prism_deploy.kernel import launch as launch_mod  # noqa: E402
from prism_deploy.kernel.launch import CudaError, DeviceArray, TileDispatchLauncher  # noqa: E402
from prism_deploy.kernel.spec import TileDispatchSpec, launch_config  # noqa: E402

TYPESTR = {"float32": "<f4", "float16": "<f2", "int8": "|i1"}


class FakeCudaArray:
    """Just enough of ``__cuda_array_interface__`` (v3) for the launcher."""

    def __init__(self, ptr, shape, dtype, strides=None):
        self.__cuda_array_interface__ = {
            "data": (ptr, False),
            "shape": shape,
            "typestr": TYPESTR[dtype],
            "strides": strides,
            "version": 3,
        }


def _launcher(spec):
    lau = object.__new__(TileDispatchLauncher)  # no GPU: skip module loading
    lau.spec = spec
    lau._function = "fn"
    return lau


def test_launch_arguments_follow_launch_config(monkeypatch):
    spec = TileDispatchSpec(4, 3, 16, 24, 5, 1.5, 60, "float16", "int8")
    calls = []

    class FakeDriver:
        class CUresult:
            CUDA_SUCCESS = 0

        @staticmethod
        def CUstream(s):
            return ("stream", s)

        @staticmethod
        def cuLaunchKernel(*args):
            calls.append(args)
            return (0,)

    import cuda.bindings

    monkeypatch.setattr(cuda.bindings, "driver", FakeDriver, raising=False)
    monkeypatch.setitem(__import__("sys").modules, "cuda.bindings.driver", FakeDriver)
    T, in_dim = 300, 70
    h = FakeCudaArray(0x1000, (T, in_dim), "float16")
    s = FakeCudaArray(0x2000, (T, 12), "float32")
    t = FakeCudaArray(0x3000, (12, 16, 24), "int8")
    q = FakeCudaArray(0x4000, (12, 16), "float32")
    o = FakeCudaArray(0x5000, (T, 60), "float16")
    _launcher(spec)(h, s, t, q, o, stream=7)
    (args,) = calls
    cfg = launch_config(spec, T)
    assert args[0] == "fn"
    assert args[1:7] == (cfg.grid_x, cfg.grid_y, 1, cfg.block_x, 1, 1)
    assert args[7] == cfg.shared_mem and args[8] == ("stream", 7)
    values, types = args[9]
    assert values == (0x1000, 0x2000, 0x3000, 0x4000, T, in_dim, 0x5000)
    assert types == (ctypes.c_void_p,) * 4 + (ctypes.c_int,) * 2 + (ctypes.c_void_p,)
    # bad inputs are refused before any launch
    bad = [
        (FakeCudaArray(0x1000, (T, in_dim), "float32"), s, t, q, o),  # hidden dtype
        (h, FakeCudaArray(0x2000, (T, 11), "float32"), t, q, o),  # scores width
        (h, s, FakeCudaArray(0x3008, (12, 16, 24), "int8"), q, o),  # misaligned tiles
        (h, s, t, FakeCudaArray(0x4000, (1,), "float32"), o),  # int8 without row scales
        (h, s, t, q, FakeCudaArray(0x5000, (T, 61), "float16")),  # output shape
        (FakeCudaArray(0x1000, (T, 73), "float16", strides=(2, 146)), s, t, q, o),  # not C-contiguous
        (h, s, t, q, object()),  # not a CUDA array
    ]
    for args_ in bad:
        with pytest.raises(PrismInputError):
            _launcher(spec)(*args_, stream=0)
    assert len(calls) == 1


def test_device_array_reads_the_interface():
    a = DeviceArray.of(FakeCudaArray(0xABC0, (3, 4), "float16", strides=(8, 2)), "x")
    assert (a.ptr, a.shape, a.dtype) == (0xABC0, (3, 4), "float16")


def test_without_a_driver_the_error_is_clear():
    import os
    import shutil

    # the machine itself, not the CPU-only view the other tests get (tests/conftest.py)
    if shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0"):
        pytest.skip("an NVIDIA driver is present")
    with pytest.raises(CudaError, match="CUDA driver|cuInit"):
        TileDispatchLauncher(TileDispatchSpec(2, 2, 8, 8, 2, 1.0, 16))
    assert launch_mod  # the module imports without a GPU
