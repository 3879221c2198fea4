"""The ``prism::tile_dispatch`` TensorRT plugin (a Quickly Deployable Plugin, ``tensorrt.plugin``).

- ``register``: one output ``[T, out_dim]`` with the dtype of ``hidden``.
- ``autotune``: hidden/out float32 or float16 together; tiles float32, float16 or int8; scores
  and scales float32; linear layouts.
- ``aot_impl``: the NVRTC-compiled PTX of ``plugins/tile_dispatch/tile_dispatch.cu``,
  specialised to the node's attributes and tensor dtypes, with grid/block/shared memory from
  ``prism_deploy.kernel.launch_config`` (the launcher's own source of truth) and the token
  count and ``in_dim`` as ``SymInt32`` kernel arguments. The kernel is embedded in the engine:
  a process without Python runs it.
- ``impl`` (JIT fallback): the same kernel through ``prism_deploy.kernel.launch``; the process
  that runs such an engine must call ``register_tile_dispatch_plugin()`` first.

Call ``register_tile_dispatch_plugin()`` before parsing an ONNX model holding ``tile_dispatch``
nodes or building a network with the plugin. Facts relied on, with sources:
plugins/tile_dispatch/README.md. Written and type-checked without TensorRT or a GPU: it has not
been run against a real TensorRT yet.

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the decorated
functions' annotations as objects, so they must be evaluated when the functions are defined.
"""

import os
from typing import Any, List, Tuple, Union

from prism_deploy.kernel.spec import TileDispatchSpec, launch_config

PLUGIN_NAMESPACE = "prism"
PLUGIN_NAME = "tile_dispatch"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
# Overrides the architecture the AOT kernel is compiled for (default: the build GPU's own).
ARCH_ENV = "PRISM_DEPLOY_KERNEL_ARCH"

_registered = False


def register_tile_dispatch_plugin() -> None:
    """Register ``prism::tile_dispatch`` with TensorRT's plugin registry (idempotent)."""
    global _registered
    if _registered:
        return
    import tensorrt as trt  # type: ignore[import-untyped,unused-ignore]

    if not hasattr(trt, "Builder"):
        raise RuntimeError("TensorRT is not installed here (only type stubs): cannot register prism::tile_dispatch")
    _define_plugin()
    _registered = True


def _dtype_name(dtype: Any) -> str:
    import tensorrt as trt  # type: ignore[import-untyped,unused-ignore]

    names = {trt.float32: "float32", trt.float16: "float16", trt.int8: "int8"}
    if dtype not in names:
        raise ValueError(f"prism::tile_dispatch: unsupported tensor dtype {dtype}")
    return names[dtype]


def _spec(
    hidden_dtype: Any, tile_dtype: Any, R: int, C: int, tr: int, tc: int, top_k: int, gate_scale: float, out_dim: int
) -> TileDispatchSpec:
    return TileDispatchSpec(
        R,
        C,
        tr,
        tc,
        top_k,
        gate_scale,
        out_dim,
        hidden_dtype=_dtype_name(hidden_dtype),
        tile_dtype=_dtype_name(tile_dtype),
    )


def build_arch() -> str:
    """The architecture AOT kernels are compiled for: ``$PRISM_DEPLOY_KERNEL_ARCH`` or GPU 0's."""
    forced = os.environ.get(ARCH_ENV)
    if forced:
        return forced
    from prism_deploy.kernel.launch import device_arch

    return device_arch(0)


def _define_plugin() -> None:
    import tensorrt.plugin as trtp  # type: ignore[import-untyped,unused-ignore]

    @trtp.register(PLUGIN_ID)
    def tile_dispatch_desc(
        hidden: trtp.TensorDesc,
        scores: trtp.TensorDesc,
        tiles: trtp.TensorDesc,
        scales: trtp.TensorDesc,
        R: int,
        C: int,
        tr: int,
        tc: int,
        top_k: int,
        gate_scale: float,
        out_dim: int,
    ) -> trtp.TensorDesc:
        return trtp.from_shape_expr((hidden.shape_expr[0], out_dim), dtype=hidden.dtype)

    @trtp.autotune(PLUGIN_ID)
    def tile_dispatch_autotune(
        hidden: trtp.TensorDesc,
        scores: trtp.TensorDesc,
        tiles: trtp.TensorDesc,
        scales: trtp.TensorDesc,
        outputs: Tuple[trtp.TensorDesc],
    ) -> List[trtp.AutoTuneCombination]:
        # positions: hidden, scores, tiles, scales, out. '|' ties hidden to out; '*' lets the
        # tiles' dtype vary on its own.
        return [trtp.AutoTuneCombination("FP32|FP16, FP32, FP32*FP16*INT8, FP32, FP32|FP16", "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def tile_dispatch_aot(
        hidden: trtp.TensorDesc,
        scores: trtp.TensorDesc,
        tiles: trtp.TensorDesc,
        scales: trtp.TensorDesc,
        R: int,
        C: int,
        tr: int,
        tc: int,
        top_k: int,
        gate_scale: float,
        out_dim: int,
        outputs: Tuple[trtp.TensorDesc],
        tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        from prism_deploy.kernel.nvrtc import compile_ptx

        spec = _spec(hidden.dtype, tiles.dtype, R, C, tr, tc, top_k, gate_scale, out_dim)
        kernel = compile_ptx(spec, build_arch())
        tokens = hidden.shape_expr[0]
        cfg = launch_config(spec, tokens)
        params = trtp.KernelLaunchParams()
        params.grid_x = cfg.grid_x
        # TensorRT launches an AOT kernel itself, so nothing skips the launch at T = 0 (as the
        # Python launcher does), and a zero grid is an invalid launch. One chunk instead: the
        # kernel returns at once from a chunk with no tokens (checked on the host build).
        params.grid_y = trtp.max(cfg.grid_y, 1)
        params.grid_z = 1
        params.block_x = cfg.block_x
        params.block_y = 1
        params.block_z = 1
        params.shared_mem = cfg.shared_mem
        # kernel arguments: the 4 input pointers, then these int32 scalars, then the output
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(tokens), trtp.SymInt32(hidden.shape_expr[1])])
        return kernel.name, kernel.ptx, params, extra

    @trtp.impl(PLUGIN_ID)
    def tile_dispatch_jit(
        hidden: trtp.Tensor,
        scores: trtp.Tensor,
        tiles: trtp.Tensor,
        scales: trtp.Tensor,
        R: int,
        C: int,
        tr: int,
        tc: int,
        top_k: int,
        gate_scale: float,
        out_dim: int,
        outputs: Tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        import torch

        from prism_deploy.kernel.launch import _launcher_for

        spec = _spec(hidden.dtype, tiles.dtype, R, C, tr, tc, top_k, gate_scale, out_dim)
        launcher = _launcher_for(spec, torch.cuda.current_device())
        h, s, t, q, o = (torch.as_tensor(x, device="cuda") for x in (hidden, scores, tiles, scales, outputs[0]))
        launcher(h, s, t, q, o, stream=stream)


def add_tile_dispatch(
    network: Any, hidden: Any, scores: Any, tiles: Any, scales: Any, spec: TileDispatchSpec, aot: bool = True
) -> Any:
    """Add the plugin to a ``trt.INetworkDefinition`` directly (the ONNX route needs no call)."""
    import tensorrt.plugin as trtp  # type: ignore[import-untyped,unused-ignore]

    register_tile_dispatch_plugin()
    op = getattr(getattr(trtp.op, PLUGIN_NAMESPACE), PLUGIN_NAME)
    attrs = spec.attributes()
    return network.add_plugin(op(hidden, scores, tiles, scales, **attrs), aot=aot)
