"""Backends: one small object per way of running an adapter (Polygraphy-style runners).

Each has one way to run: ``prepare()`` (load, export, compile; may raise
``BackendUnavailable`` with the reason), ``make_input(hidden)`` (turn a float32 numpy
array ``[batch, seq, in_dim]`` into what ``run`` takes, outside the timed region),
``run(inputs)`` (one adapter call, returning the output), ``to_numpy(out)`` and
``describe()``. ``check()`` says, before any work, whether the backend can run here.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from prism_deploy.core.errors import brief
from prism_deploy.core.precision import Precision
from prism_deploy.core.targets import Target
from prism_deploy.reference import PrismAdapter
from prism_deploy.target_backends import backend_for

# int8-qdq calibration: as many rows as a small calibration set, never the timed inputs.
CALIB_ROWS = 256
CALIB_SEED = 12345

BACKEND_NAMES = ("torch", "torch-compile", "ort-cpu", "ort-cuda", "trt", "kernel")
# ONNX Runtime backends can be named with a gated form, "ort-cpu/sparse": the graph exported in
# that form (docs/onnx-lowering.md), so that every form is timed side by side with the floor
FORM_BACKENDS = ("ort-cpu", "ort-cuda")


def split_backend_name(name: str) -> tuple[str, str | None]:
    """``ort-cpu/sparse`` -> (``ort-cpu``, ``sparse``); a plain name has no form."""
    base, _, form = name.partition("/")
    return base, (form or None)


def check_backend_name(name: str) -> str | None:
    """Why ``name`` is not a backend this bench runs (None when it is)."""
    from prism_deploy.lower import GATED_FORMS

    base, form = split_backend_name(name)
    if base not in BACKEND_NAMES:
        return f"{name!r} is not one of {','.join(BACKEND_NAMES)} (ort-cpu and ort-cuda take /FORM)"
    if form is not None and (base not in FORM_BACKENDS or form not in GATED_FORMS[1:]):
        return f"{name!r}: only {' and '.join(FORM_BACKENDS)} take a gated form, one of {', '.join(GATED_FORMS[1:])}"
    return None


class BackendUnavailable(Exception):
    """This backend (or this precision of it) cannot run here; the message says why."""


def torch_device() -> str:
    """Where the torch backends run: the GPU when there is one torch can use."""
    import torch

    from prism_deploy.core.targets import gpu_present

    return "cuda" if gpu_present() and torch.cuda.is_available() else "cpu"


class Backend:
    name: ClassVar[str]
    device: str = "cpu"
    # torch ops can be captured in a CUDA graph; runtimes with their own host logic cannot.
    capturable: ClassVar[bool] = False

    def __init__(self, adapter: PrismAdapter, precision: Precision) -> None:
        self.adapter = adapter
        self.precision = precision

    @classmethod
    def check(cls, engines_dir: Path | None) -> tuple[bool, str]:
        return True, "available"

    @property
    def uses_gpu(self) -> bool:
        """Whether device memory should be measured (ONNX Runtime CUDA takes host arrays)."""
        return self.device == "cuda"

    def prepare(self) -> None:
        raise NotImplementedError

    def make_input(self, hidden: np.ndarray) -> Any:
        raise NotImplementedError

    def run(self, inputs: Any) -> Any:
        raise NotImplementedError

    def to_numpy(self, out: Any) -> np.ndarray:
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "precision": self.precision, "device": self.device}

    def close(self) -> None:
        """Drop what ``prepare`` built so the next precision starts from a clean slate."""


# ---- torch ---------------------------------------------------------------------------------


class TorchBackend(Backend):
    """The PyTorch reference module in eager mode: the baseline every ratio is taken to.

    ``fp32`` is the reference as stored; ``fp16`` stores tiles and gates in float16 (the
    reference then computes in float32, as it always does). The reference has no int8 path.
    """

    name = "torch"
    capturable = True

    def __init__(self, adapter: PrismAdapter, precision: Precision) -> None:
        super().__init__(adapter, precision)
        self.device = torch_device()
        self.module: Any = None

    def prepare(self) -> None:
        import torch

        if self.precision.quantized:
            raise BackendUnavailable(
                f"{self.name}: the PyTorch reference has no {self.precision} path "
                "(int8 exists only in lowered graphs and the kernel)"
            )
        if self.precision is Precision.FP32 and self.device == "cpu":
            self.module = self.adapter
            return
        # A copy: Module.to() moves in place, and the other backends need the adapter on the host.
        dtype = getattr(torch, self.precision.weight_dtype.name)  # float16 or float32 (quantized refused above)
        tensors = {k: v.to(self.device, dtype) for k, v in self.adapter.tensors().items()}
        self.module = PrismAdapter(self.adapter.config, tensors).eval()

    def make_input(self, hidden: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(hidden).to(self.device)

    def run(self, inputs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.module(inputs)

    def to_numpy(self, out: Any) -> np.ndarray:
        return out.detach().float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        import torch

        return {
            **super().describe(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "weights_dtype": self.precision.weight_dtype.name,
            "compute_dtype": "float32",
        }

    def close(self) -> None:
        self.module = None


class TorchCompileBackend(TorchBackend):
    """The same module under ``torch.compile`` (Inductor). Compilation happens in warm-up."""

    name = "torch-compile"

    @classmethod
    def check(cls, engines_dir: Path | None) -> tuple[bool, str]:
        if torch_device() == "cpu":
            # Inductor's CPU backend writes and compiles C++.
            cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
            if not cxx:
                return False, "torch.compile on CPU needs a C++ compiler (g++, c++ or clang++) and none is on PATH"
        return True, "available"

    def prepare(self) -> None:
        import torch

        super().prepare()
        self.module = torch.compile(self.module)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "compile": "torch.compile default (inductor)"}


# ---- ONNX Runtime --------------------------------------------------------------------------


def _onnx_input_dtype(path: Path) -> np.dtype:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    elem = model.graph.input[0].type.tensor_type.elem_type
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))


def _plain(obj: Any) -> Any:
    """An export result as JSON-able data (dataclass, mapping or plain value)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


class OrtBackend(Backend):
    """The lowered ONNX graph on ONNX Runtime (exported into ``workdir`` for this run), or
    the ``ort-*`` engine built by ``prism-deploy build`` when ``--engines`` names it."""

    name = "ort-cpu"
    target: ClassVar[Target] = Target.ORT_CPU

    def __init__(
        self,
        adapter: PrismAdapter,
        precision: Precision,
        workdir: Path,
        engines_dir: Path | None = None,
        threads: int | None = None,
        gated_form: str | None = None,
    ) -> None:
        super().__init__(adapter, precision)
        self.gated_form = gated_form
        if gated_form is not None:
            self.name = f"{type(self).name}/{gated_form}"  # type: ignore[misc]
        self.device = "cpu"  # inputs and outputs are host arrays; ORT copies for CUDA itself
        self.workdir = workdir
        self.engines_dir = engines_dir
        self.threads = threads
        self.runner: Any = None
        self.io_dtype = np.dtype(np.float32)
        self.info: dict[str, Any] = {}

    @property
    def provider(self) -> str:
        return backend_for(self.target).provider

    @property
    def uses_gpu(self) -> bool:
        """ONNX Runtime CUDA takes host arrays, but its memory is the GPU's."""
        return backend_for(self.target).gpu

    @classmethod
    def check(cls, engines_dir: Path | None) -> tuple[bool, str]:
        ok, why = backend_for(cls.target).status()
        return (True, "available") if ok else (False, why)

    def prepare(self) -> None:
        from prism_deploy.lower import export_onnx
        from prism_deploy.runtime.adapter_session import AdapterGraph
        from prism_deploy.runtime.engines import load_engines

        if self.engines_dir is not None and self.gated_form is not None:
            raise BackendUnavailable(
                f"{self.name}: a gated form is exported for the run, not read from "
                "--engines (the engines' own per-bucket choice runs as "
                f"{type(self).name})"
            )
        if self.engines_dir is not None:
            try:
                self.runner = load_engines(self.engines_dir, precision=self.precision, target=self.target.value)
            except Exception as exc:
                raise BackendUnavailable(
                    f"{self.name}: no {self.precision} engine in {self.engines_dir} ({brief(exc, 300)})"
                ) from None
            # The engine opens its own session: --threads does not reach it.
            self.info = {
                "source": "engines",
                "engines_dir": str(self.engines_dir),
                "engine": getattr(self.runner, "id", None),
                "session_threads": "onnxruntime default",
            }
            return
        stem = f"adapter-{self.precision}" + (f"-{self.gated_form}" if self.gated_form else "")
        path = self.workdir / f"{stem}.onnx"
        extra: dict[str, Any] = {}
        if self.precision.quantizes_activations:
            # Static activation scales need calibration data: hidden states drawn like the
            # benchmark's inputs (standard normal) from a seed of their own.
            extra["calib"] = np.random.default_rng(CALIB_SEED).standard_normal(
                (CALIB_ROWS, self.adapter.config.in_dim), dtype=np.float32
            )
        try:
            # as `build` exports for this target: MatMulNBits for INT8 ungated pipes on the CPU
            result = export_onnx(
                self.adapter,
                path,
                precision=self.precision,
                gated_form=self.gated_form or "auto",
                ort_nbits=backend_for(self.target).nbits_export,
                **extra,
            )
        except Exception as exc:
            raise BackendUnavailable(
                f"{self.name}: export at {self.precision} failed ({type(exc).__name__}: {brief(exc, 300)})"
            ) from None
        self.io_dtype = _onnx_input_dtype(path)
        self.runner = AdapterGraph(path, self.provider, intra_op_threads=self.threads)
        size = sum(p.stat().st_size for p in self.workdir.glob(f"{stem}.onnx*"))
        self.info = {
            "source": "export_onnx",
            "export": _plain(result),
            "model_bytes": size,
            "io_dtype": str(self.io_dtype),
            "runner": type(self.runner).__name__,
        }
        if extra:
            self.info["calibration"] = f"{CALIB_ROWS} standard-normal rows, seed {CALIB_SEED}"

    def make_input(self, hidden: np.ndarray) -> Any:
        return np.ascontiguousarray(hidden.astype(self.io_dtype, copy=False))

    def run(self, inputs: Any) -> Any:
        return self.runner.run(inputs)

    def to_numpy(self, out: Any) -> np.ndarray:
        if isinstance(out, (list, tuple)):
            out = out[0]
        if hasattr(out, "detach"):
            out = out.detach().cpu().numpy()
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {
            **super().describe(),
            "onnxruntime": ort.__version__,
            "provider": self.provider,
            "threads": self.threads if self.threads is not None else "onnxruntime default",
            **self.info,
        }

    def close(self) -> None:
        self.runner = None


class OrtCudaBackend(OrtBackend):
    name = "ort-cuda"
    target: ClassVar[Target] = Target.ORT_CUDA


# ---- GPU only: TensorRT engines and the kernel ---------------------------------------------


class TrtBackend(Backend):
    """Engines built by ``prism-deploy build --target trt``, run through ``load_engines``."""

    name = "trt"
    target: ClassVar[Target] = Target.TRT

    def __init__(
        self,
        adapter: PrismAdapter,
        precision: Precision,
        workdir: Path,
        engines_dir: Path | None = None,
        threads: int | None = None,
        gated_form: str | None = None,
    ) -> None:
        super().__init__(adapter, precision)  # the engines were built ahead: no workdir, threads or form
        self.device = "cuda"
        self.engines_dir = engines_dir
        self.engine: Any = None

    @classmethod
    def check(cls, engines_dir: Path | None) -> tuple[bool, str]:
        from prism_deploy.core.targets import gpu_present

        if not gpu_present():
            return False, "TensorRT needs an NVIDIA GPU and this machine has none"
        ok, why = backend_for(cls.target).status()
        if not ok:
            return False, why
        if engines_dir is None:
            return False, "TensorRT engines are built ahead: pass --engines DIR (from prism-deploy build --target trt)"
        return True, "available"

    def prepare(self) -> None:
        from prism_deploy.runtime.engines import load_engines

        try:
            assert self.engines_dir is not None  # check() refused to run without it
            self.engine = load_engines(self.engines_dir, precision=self.precision, target=self.target.value)
        except Exception as exc:
            raise BackendUnavailable(
                f"trt: no {self.precision} engine in {self.engines_dir} ({brief(exc, 300)})"
            ) from None

    def make_input(self, hidden: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(hidden).to("cuda")  # load_engines takes torch tensors via DLPack

    def run(self, inputs: Any) -> Any:
        return self.engine.run(inputs)

    def to_numpy(self, out: Any) -> np.ndarray:
        return out.float().cpu().numpy() if hasattr(out, "cpu") else np.asarray(out, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        from prism_deploy.core.targets import tensorrt_version

        return {**super().describe(), "tensorrt": tensorrt_version(), "engines_dir": str(self.engines_dir)}

    def close(self) -> None:
        self.engine = None


class KernelBackend(Backend):
    """The tile-dispatch kernel launched directly (no TensorRT): each gate's MatMul+Add and
    each ungated pipe in torch on the GPU, each gated pipe one kernel launch through
    ``prism_deploy.kernel.launch.tile_dispatch_torch``, the combine in torch.

    Tiles are stored at the case's precision (int8: symmetric per tile row, fp32 scales
    ``[R*C, tr]``, the kernel's contract). Written against the launcher on main; it has not
    run on a GPU from this module yet (none was lent to the benchmark work).
    """

    name = "kernel"
    capturable = True

    def __init__(self, adapter: PrismAdapter, precision: Precision) -> None:
        super().__init__(adapter, precision)
        self.device = "cuda"
        self.launch: Any = None
        self.pipes: list[dict[str, Any]] = []

    @classmethod
    def check(cls, engines_dir: Path | None) -> tuple[bool, str]:
        from prism_deploy.core.targets import gpu_present

        if not gpu_present():
            return False, "the tile-dispatch kernel runs only on an NVIDIA GPU and this machine has none"
        try:
            import cuda.bindings.driver  # noqa: F401
        except ImportError as exc:
            return False, f"the kernel launcher cannot be imported ({exc})"
        return True, "available"

    def prepare(self) -> None:
        import torch

        from prism_deploy.core.tiles import quantize_rows
        from prism_deploy.kernel import TileDispatchSpec
        from prism_deploy.kernel.launch import tile_dispatch_torch

        if self.precision.quantizes_activations or self.precision is Precision.INT4:
            raise BackendUnavailable(f"kernel: tiles come in fp32, fp16 or int8, not {self.precision}")
        self.launch = tile_dispatch_torch
        cfg = self.adapter.config
        tile_dtype = self.precision.weight_dtype.name  # float32, float16 or int8
        self.pipes = []
        for pipe in self.adapter.pipe_list():
            spec = pipe.spec
            entry: dict[str, Any] = {"pad": spec.padded_in - cfg.in_dim}
            if pipe.gate is None:
                entry["dense"] = pipe.dense_weight(torch.float32).to("cuda")
                self.pipes.append(entry)
                continue
            assert spec.top_k is not None
            tiles = pipe.tiles.detach().to("cuda", torch.float32)
            entry["gate_w"] = pipe.gate.weight.detach().to("cuda", torch.float32)
            entry["gate_b"] = pipe.gate.bias.detach().to("cuda", torch.float32)
            entry["scales"] = None
            if self.precision.quantized:  # the lowering's own quantization (prism_deploy.core.tiles)
                q, scales = quantize_rows(pipe.tiles)
                entry["tiles"] = torch.from_numpy(q).to("cuda")
                entry["scales"] = torch.from_numpy(scales).to("cuda")
            else:
                entry["tiles"] = tiles.to(getattr(torch, self.precision.weight_dtype.name))
            entry["spec"] = TileDispatchSpec(
                R=spec.grid[0],
                C=spec.grid[1],
                tr=spec.tile[0],
                tc=spec.tile[1],
                top_k=spec.top_k,
                gate_scale=spec.gate_scale,
                out_dim=cfg.out_dim,
                hidden_dtype="float32",
                tile_dtype=tile_dtype,
            )
            self.pipes.append(entry)
        self.betas = self.adapter.betas().to("cuda")

    def make_input(self, hidden: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(hidden).to("cuda")

    def run(self, inputs: Any) -> Any:
        import torch

        cfg = self.adapter.config
        x2 = inputs.reshape(-1, cfg.in_dim)
        y = torch.zeros(x2.shape[0], cfg.out_dim, device="cuda")
        for beta, p in zip(self.betas, self.pipes):
            if "dense" in p:
                xp = torch.nn.functional.pad(x2, (0, p["pad"]))
                out = (xp @ p["dense"].T)[:, : cfg.out_dim]
            else:
                scores = torch.addmm(p["gate_b"], x2, p["gate_w"].T)
                out = self.launch(x2, scores, p["tiles"], p["scales"], p["spec"])
            y = y + beta * out
        return y.reshape(*inputs.shape[:-1], cfg.out_dim)

    def to_numpy(self, out: Any) -> np.ndarray:
        return out.float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "launcher": "prism_deploy.kernel.launch.tile_dispatch_torch",
            "ungated_pipes": "torch matmul (fp32)",
        }

    def close(self) -> None:
        self.pipes = []


# the backends of a deployment target (target_backends): an engine of --engines, or (ONNX
# Runtime) a graph exported for the run; all take the same arguments
TARGET_CLASSES: dict[str, type[OrtBackend | TrtBackend]] = {
    c.target.value: c for c in (OrtBackend, OrtCudaBackend, TrtBackend)
}
BACKEND_CLASSES: dict[str, type[Backend]] = {
    "torch": TorchBackend,
    "torch-compile": TorchCompileBackend,
    **TARGET_CLASSES,
    "kernel": KernelBackend,
}


def make_backend(
    name: str,
    adapter: PrismAdapter,
    precision: Precision,
    workdir: Path,
    engines_dir: Path | None,
    threads: int | None = None,
) -> Backend:
    base, form = split_backend_name(name)
    if base in TARGET_CLASSES:
        return TARGET_CLASSES[base](adapter, precision, workdir, engines_dir, threads, form)
    return BACKEND_CLASSES[name](adapter, precision)
