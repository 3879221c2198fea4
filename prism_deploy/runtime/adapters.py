"""Resolve the pipeline's ``adapter`` argument to something with ``.run(hidden) -> adapted``.

The pipeline only needs that one method (``AdapterRunner``), so every way of running an
adapter plugs in the same way:

- a folder written by ``prism-deploy build`` (it has ``manifest.json``):
  ``prism_deploy.runtime.load_engines(DIR, precision=..., target=...)``;
- an ``.onnx`` file (what ``prism-deploy export`` wrote): ONNX Runtime on the target's provider
  (``OnnxAdapterRunner``, which can take model A's output where it lies: ``run_device``);
- an adapter ``.safetensors``: lowered to ONNX on first use with ``prism_deploy.lower.export_onnx``
  (cached beside the file, keyed by its sha256 and the precision) and run on ONNX Runtime;
- any object with ``.run(numpy) -> numpy``, e.g. ``ReferenceAdapterRunner`` (the PyTorch
  reference, ``kind == "reference"``: exact, slow, never a deployed engine).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from prism_deploy.errors import PrismInputError

TARGETS = ("auto", "ort-cpu", "ort-cuda", "trt")


class AdapterRunner(Protocol):
    def run(self, hidden: np.ndarray) -> np.ndarray: ...


class ReferenceAdapterRunner:
    """The PyTorch reference (float32) on numpy arrays: exact, slow, never a deployed engine.
    Pass one as ``adapter=`` to run the chain on the reference adapter."""

    kind = "reference"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from prism_deploy.reference import load_adapter

        self.adapter = load_adapter(path)
        self.in_dim = self.adapter.config.in_dim
        self.out_dim = self.adapter.config.out_dim

    def run(self, hidden: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.adapter(torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))).numpy()


class OnnxAdapterRunner:
    """An adapter ONNX graph (input ``hidden``, output ``adapted``) on ONNX Runtime."""

    kind = "onnx"

    def __init__(self, onnx_path: str | os.PathLike[str], provider: str = "cpu") -> None:
        from prism_deploy.ort_session import make_session, session_config_for

        import onnx

        self.path = Path(onnx_path)
        skeleton = onnx.load_model(str(self.path), load_external_data=False)
        self.precision = graph_precision(skeleton)
        self.device = provider  # ONNX Runtime device names: "cpu", "cuda"
        # The session options follow the exact lowering (weight-only int8 and int8-qdq both
        # store int8 weights, but only the former folds its dequantization).
        self.session = make_session(self.path, provider,
                                    session_config=session_config_for(lowered_precision(skeleton)))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32
        self.input_type = inp.type
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "adapted" if "adapted" in outputs else outputs[0]
        self.in_dim = inp.shape[-1] if isinstance(inp.shape[-1], int) else None
        out_shape = next(o.shape for o in self.session.get_outputs() if o.name == self.output_name)
        self.out_dim = out_shape[-1] if isinstance(out_shape[-1], int) else None

    def run(self, hidden: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(hidden, dtype=self.input_dtype)})[0]
        return np.asarray(out, dtype=np.float32)

    def run_device(self, hidden: Any) -> Any:
        """OrtValue in, OrtValue out, on this runner's device (cast through the host only when
        the dtypes differ, e.g. an fp16 model A feeding an fp32 adapter graph)."""
        from prism_deploy.runtime.binding import run_bound

        if hidden.data_type() != self.input_type:
            hidden = hidden.numpy().astype(self.input_dtype)
        return run_bound(self.session, {self.input_name: hidden}, [self.output_name], self.device)[0]


def graph_precision(model: Any) -> str:
    """``int8``, ``fp16`` or ``fp32``: the least precise weights the graph stores (for the
    default parity tolerances)."""
    import onnx

    types = {t.data_type for t in model.graph.initializer}
    if types & {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4}:
        return "int8"
    if types & {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}:
        return "fp16"
    return "fp32"


def lowered_precision(model: Any) -> str | None:
    """The ``precision`` the lowering recorded (``int8-qdq`` included); None for other graphs."""
    from prism_deploy.errors import PrismInputError
    from prism_deploy.lower import read_lowering_metadata

    try:
        return str(read_lowering_metadata(model)["precision"])
    except PrismInputError:
        return None


def target_provider(target: str) -> tuple[str, str]:
    """ONNX Runtime provider for the models (and ONNX adapters) under ``target``, and why."""
    from prism_deploy.ort_session import resolve_provider

    if target not in TARGETS:
        raise PrismInputError(f"--target: {target!r} is not one of {', '.join(TARGETS)}")
    if target == "ort-cpu":
        return "cpu", "asked for"
    if target in ("ort-cuda", "trt"):
        ok_provider, why = resolve_provider("cuda")
        if ok_provider != "cuda":
            raise PrismInputError(f"--target {target}: {why}")
        return "cuda", why
    return resolve_provider("auto")


def adapter_runner(adapter: Any, target: str = "ort-cpu", *, precision: str | None = None,
                   cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """The runner for ``adapter``: a build folder, an ``.onnx``, a ``.safetensors``, or a runner object."""
    if hasattr(adapter, "run") and not isinstance(adapter, (str, os.PathLike)):
        return adapter
    path = Path(adapter)
    provider, _ = target_provider(target)
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise PrismInputError(f"{adapter}: a folder without manifest.json (not written by `prism-deploy build`)")
        from prism_deploy.runtime.engines import load_engines

        # "auto" is a choice among targets, not a target an engine was built for: let the
        # manifest's entries decide (load_engines refuses an ambiguous choice).
        kwargs: dict[str, Any] = {"target": None if target == "auto" else target}
        if precision:
            kwargs["precision"] = precision
        return load_engines(path, **kwargs)
    if not path.is_file():
        raise PrismInputError(f"{adapter}: no such adapter file or build folder")
    if path.suffix == ".onnx":
        return _onnx_runner(path, provider)
    if path.suffix != ".safetensors":
        raise PrismInputError(f"{adapter}: expected a build folder, an adapter .onnx or an adapter .safetensors")
    from prism_deploy.lower import export_onnx

    lowered_precision = precision or ("fp32" if provider == "cpu" else "fp16")
    onnx_path = _lowered_path(path, lowered_precision, cache_dir)
    if not onnx_path.is_file():
        from prism_deploy.reference import load_adapter

        export_onnx(load_adapter(path), onnx_path, precision=lowered_precision)
    return _onnx_runner(onnx_path, provider)


def _onnx_runner(path: Path, provider: str) -> Any:
    # Not the lowering layer's OrtRunner: that one serves parity (worker selections, stored
    # tiles) through numpy, while the pipeline needs an OrtValue entry point (run_device) to keep
    # the hand-offs on the device. Both run the same graph with the same session helper.
    return OnnxAdapterRunner(path, provider)


def _lowered_path(path: Path, precision: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """``<dir>/<stem>-<sha8>-<precision>.onnx`` in a cache folder beside the adapter (or a temp one)."""
    from prism_deploy.format import file_sha256

    name = f"{path.stem}-{file_sha256(path)[:8]}-{precision}.onnx"
    if cache_dir is not None:
        folder = Path(cache_dir)
    elif os.access(path.parent, os.W_OK):
        folder = path.parent / ".prism-cache"
    else:
        folder = Path(tempfile.gettempdir()) / "prism-deploy-cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name
