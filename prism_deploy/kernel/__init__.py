"""The gated top-k sparse tile-dispatch kernel: spec, NVRTC compilation, launch geometry,
a driver-API launcher, and the op's numpy semantics (for the ONNX Runtime twin).

``plugins/tile_dispatch/tile_dispatch.cu`` is the one kernel source; README there explains it.
"""

from prism_deploy.kernel.nvrtc import (
    SUPPORTED_ARCHS,
    CompiledKernel,
    KernelCompileError,
    cache_dir,
    compile_ptx,
    normalize_arch,
    ptx_entry_points,
)
from prism_deploy.kernel.spec import (
    KERNEL_NAME,
    LaunchConfig,
    TileDispatchSpec,
    kernel_source_path,
    launch_config,
)

__all__ = [
    "KERNEL_NAME",
    "SUPPORTED_ARCHS",
    "CompiledKernel",
    "KernelCompileError",
    "LaunchConfig",
    "TileDispatchSpec",
    "cache_dir",
    "compile_ptx",
    "kernel_source_path",
    "launch_config",
    "normalize_arch",
    "ptx_entry_points",
]
