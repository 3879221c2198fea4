"""TensorRT engines: build one from an exported ONNX graph, refit it, run it.

Written against the API documented for TensorRT 10.8+ and 11.x (see docs/engines.md):
- networks are strongly typed (precision comes from the graph's types and Q/DQ nodes; 11.x
  removed the FP16/INT8 builder flags). ``STRONGLY_TYPED`` is ignored by 11.x and needed by
  10.x; its numeric value differs between them, hence ``1 << int(flag)``.
- one optimization profile over the ``hidden`` input; a timing cache file reused across builds.
- ``REFIT`` (weights replaced later through ``OnnxParserRefitter``), ``VERSION_COMPATIBLE``
  (runs on the lean runtime, which must be allowed to run the engine's host code) and
  ``WEIGHT_STREAMING`` (weights larger than GPU memory stream in at run time).

No real TensorRT could be installed where this was written: this module type-checks against
``tensorrt-stubs`` (tests/trt/test_plugin.py, through tools/mypy_trt.py), its parser and builder
calls run through TensorRT-RTX (tests/trt/test_rtx_build.py), and its real tests
(tests/builder/test_trt_build.py) skip without a GPU.
``tensorrt`` is imported inside the functions: importing this module never needs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.fsutil import write_bytes_atomic
from prism_deploy.core.onnx_io import INPUT_NAME, OUTPUT_NAME
from prism_deploy.core.targets import tensorrt_available

if TYPE_CHECKING:
    import tensorrt as trt


class TensorRTError(RuntimeError):
    """TensorRT refused a step (parse, build, refit, deserialize); the message says which."""


@dataclass(frozen=True)
class TrtBuildSettings:
    """Everything the builder is told besides the ONNX graph."""

    min_shape: tuple[int, int, int]
    opt_shape: tuple[int, int, int]
    max_shape: tuple[int, int, int]
    refittable: bool = False
    version_compatible: bool = False
    weight_streaming: bool = False
    plugin: bool = False
    optimization_level: int = 3
    workspace_bytes: int | None = None
    # Graphs with other inputs than the adapter's ``hidden`` (the exported models): one
    # (name, min, opt, max) per dynamic input; when given, the three shapes above are unused.
    input_shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...] = ()


def _logger(trt_module: Any) -> Any:
    return trt_module.Logger(trt_module.Logger.WARNING)


def _parser_errors(parser: trt.OnnxParser | trt.OnnxParserRefitter) -> str:
    return "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no detail"


def _import_plugin() -> None:
    """Register the ``prism::tile_dispatch`` plugin before parsing or deserializing."""
    try:
        from prism_deploy.trt.plugin import register_tile_dispatch_plugin
    except ImportError as exc:
        raise PrismInputError(f"--plugin: the tile_dispatch plugin cannot be registered ({exc})") from None
    register_tile_dispatch_plugin()


def parse_network(
    onnx_path: str | os.PathLike[str], *, plugin: bool = False, trt_module: Any = None
) -> tuple[trt.Builder, trt.INetworkDefinition, trt.OnnxParser]:
    """``(builder, network, parser)``: ``onnx_path`` parsed into a strongly typed network.

    ``trt_module`` is ``tensorrt`` unless given: TensorRT-RTX's ``tensorrt_rtx`` has the same
    builder and parser API and builds without a GPU, which is how CI runs this code
    (tests/trt/test_rtx_build.py). The parser must outlive the network (it owns its weights).
    """
    if trt_module is None:
        import tensorrt as trt
    else:
        trt = trt_module
    if plugin:
        _import_plugin()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise TensorRTError(f"{onnx_path}: TensorRT's ONNX parser failed: {_parser_errors(parser)}")
    return builder, network, parser


def build_serialized_engine(
    onnx_path: str | os.PathLike[str],
    settings: TrtBuildSettings,
    timing_cache: Path | None = None,
    *,
    trt_module: Any = None,
) -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build a serialized engine.

    ``timing_cache`` is read when it exists and rewritten (atomically) after the build, so
    later builds on the same GPU and TensorRT version skip most kernel timing. ``trt_module``:
    see ``parse_network``.
    """
    if trt_module is None:
        import tensorrt as trt
    else:
        trt = trt_module
    builder, network, _parser = parse_network(onnx_path, plugin=settings.plugin, trt_module=trt_module)

    config = builder.create_builder_config()
    config.builder_optimization_level = settings.optimization_level
    if settings.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, lo, opt, hi in settings.input_shapes or (
        (INPUT_NAME, settings.min_shape, settings.opt_shape, settings.max_shape),
    ):
        profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(profile)
    if settings.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if settings.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)

    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b"")
    # ignore_mismatch=False: a cache from another GPU or TensorRT version is refused, not used
    config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    if timing_cache is not None:
        write_bytes_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def refit_serialized_engine(engine_bytes: bytes, onnx_path: str | os.PathLike[str], *, plugin: bool = False) -> bytes:
    """Replace every weight of a REFIT engine by the initializers of ``onnx_path`` (same topology)."""
    import tensorrt as trt

    if plugin:
        _import_plugin()
    logger = _logger(trt)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise TensorRTError("cached engine: TensorRT cannot deserialize it for refitting")
    refitter = trt.Refitter(engine, logger)
    onnx_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not onnx_refitter.refit_from_file(str(onnx_path)):
        raise TensorRTError(f"{onnx_path}: refit from ONNX failed: {_parser_errors(onnx_refitter)}")
    if not refitter.refit_cuda_engine():
        raise TensorRTError(f"{onnx_path}: TensorRT refused the refit (weights missing or of another shape)")
    return bytes(memoryview(engine.serialize()))


def _runtime_module(version_compatible: bool) -> Any:
    """The full TensorRT, else (for version-compatible engines only) the lean runtime."""
    ok, why = tensorrt_available()
    if ok:
        import tensorrt

        return tensorrt
    if version_compatible:
        try:
            import tensorrt_lean

            return tensorrt_lean
        except ImportError:
            pass
    raise PrismInputError(f"cannot run a TensorRT engine here: {why}")


def _check(result: tuple[Any, ...], what: str) -> Any:
    """cuda-python calls return (error, value...): raise on error, return the value(s)."""
    from cuda.bindings import runtime as cudart

    err = result[0]
    if err != cudart.cudaError_t.cudaSuccess:
        raise TensorRTError(f"CUDA {what} failed: {err}")
    return result[1] if len(result) == 2 else result[1:]


class TrtRunner:
    """Runs one serialized engine: ``run(hidden) -> adapted``.

    numpy in, numpy out (copied through device buffers that are allocated once and reused,
    grown only when a larger shape arrives), or torch/cupy CUDA tensors in and out through
    DLPack with no host copy, on the caller's current torch stream.
    """

    def __init__(
        self,
        engine_path: str | os.PathLike[str],
        *,
        plugin: bool = False,
        version_compatible: bool = False,
        weight_streaming_budget: int | None = None,
    ) -> None:
        from cuda.bindings import runtime as cudart

        trt_module = _runtime_module(version_compatible)
        if plugin:
            _import_plugin()
        self._logger = _logger(trt_module)
        self._runtime = trt_module.Runtime(self._logger)
        if version_compatible:
            # version-compatible plans carry the builder version's host code (lean runtime)
            self._runtime.engine_host_code_allowed = True
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise PrismInputError(
                f"{engine_path}: TensorRT cannot deserialize this engine "
                "(built by another TensorRT version or for another GPU?)"
            )
        if weight_streaming_budget is not None:
            self.engine.weight_streaming_budget_v2 = weight_streaming_budget
        self.context = self.engine.create_execution_context()
        self._stream = _check(cudart.cudaStreamCreate(), "stream creation")
        self.context.set_optimization_profile_async(0, int(self._stream))
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        # engines are exported with float32 I/O; ask the engine where the module can say
        to_numpy = getattr(trt_module, "nptype", None)
        self._dtypes = {
            name: np.dtype(to_numpy(self.engine.get_tensor_dtype(name)) if to_numpy else np.float32)
            for name in (INPUT_NAME, OUTPUT_NAME)
        }

    def widths(self) -> tuple[int, int]:
        """The last dimension of ``hidden`` and of ``adapted``, as the engine says."""
        return (int(self.engine.get_tensor_shape(INPUT_NAME)[-1]), int(self.engine.get_tensor_shape(OUTPUT_NAME)[-1]))

    def _device_buffer(self, name: str, nbytes: int) -> int:
        from cuda.bindings import runtime as cudart

        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(cudart.cudaFree(ptr), "free")
            ptr = int(_check(cudart.cudaMalloc(nbytes), f"allocation of {nbytes} bytes"))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _shape_output(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if not self.context.set_input_shape(INPUT_NAME, shape):
            raise PrismInputError(f"input shape {list(shape)} is outside the engine's profile")
        return tuple(self.context.get_tensor_shape(OUTPUT_NAME))

    def run(self, hidden: Any) -> Any:
        if isinstance(hidden, np.ndarray):
            return self._run_host(hidden)
        return self._run_device(hidden)

    def _run_host(self, hidden: np.ndarray) -> np.ndarray:
        from cuda.bindings import runtime as cudart

        x = np.ascontiguousarray(hidden, dtype=self._dtypes[INPUT_NAME])
        out_shape = self._shape_output(tuple(x.shape))
        out = np.empty(out_shape, dtype=self._dtypes[OUTPUT_NAME])
        d_in = self._device_buffer(INPUT_NAME, x.nbytes)
        d_out = self._device_buffer(OUTPUT_NAME, out.nbytes)
        self.context.set_tensor_address(INPUT_NAME, d_in)
        self.context.set_tensor_address(OUTPUT_NAME, d_out)
        kind = cudart.cudaMemcpyKind
        _check(
            cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, kind.cudaMemcpyHostToDevice, self._stream),
            "copy to device",
        )
        if not self.context.execute_async_v3(int(self._stream)):
            raise TensorRTError("execute_async_v3 failed")
        _check(
            cudart.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, kind.cudaMemcpyDeviceToHost, self._stream),
            "copy to host",
        )
        _check(cudart.cudaStreamSynchronize(self._stream), "stream synchronize")
        return out

    def _run_device(self, hidden: Any) -> Any:
        """torch or cupy CUDA tensors (anything with ``__dlpack__``): no host round trip."""
        import torch

        is_torch = isinstance(hidden, torch.Tensor)
        x = hidden if is_torch else torch.from_dlpack(hidden)
        if not x.is_cuda:
            return self._run_host(x.numpy())
        x = x.to(dtype=torch.float32).contiguous()
        out = torch.empty(self._shape_output(tuple(x.shape)), dtype=torch.float32, device=x.device)
        self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        # the caller's stream orders this after whatever produced ``hidden``
        if not self.context.execute_async_v3(torch.cuda.current_stream(x.device).cuda_stream):
            raise TensorRTError("execute_async_v3 failed")
        if is_torch:
            return out
        import cupy  # the only other DLPack producer this project hands back to

        return cupy.from_dlpack(out)

    def close(self) -> None:
        from cuda.bindings import runtime as cudart

        for ptr, _ in self._buffers.values():
            cudart.cudaFree(ptr)
        self._buffers.clear()
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass
