"""The one runner: any ONNX graph on ONNX Runtime, by feed dict (Polygraphy's runner idea).

    runner = OnnxRunner.open("model.onnx", "cpu")          # the loader makes the session
    out = runner.run({"input_ids": ids, "attention_mask": mask})   # -> {"hidden": array}
    values = runner.run_device(feeds, ["logits"])           # -> OrtValues left on the device

Every graph the project runs (exported adapters, built ONNX Runtime engines, exported or built
model graphs) goes through it; the adapter, engine and model views are thin wrappers. Float
feeds are cast to the dtype the graph declares (one place for it); ``run_device`` binds inputs
and outputs on the session's device (``cpu`` or ``cuda``) so one stage's output feeds the next
stage, or the next decoding step's KV cache, without a host round trip on a GPU.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from prism_deploy.core.ort_session import make_session

DEVICES = ("cpu", "cuda")
_FLOAT_TYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
}


class OnnxRunner:
    """An ONNX Runtime session and what its graph takes and gives."""

    def __init__(self, session: Any, provider: str = "cpu", label: str = "model") -> None:
        self.session = session
        self.provider = provider
        self.device = provider if provider in DEVICES else "cpu"
        self.label = label
        # initializers a call may feed over (ONNX Runtime's get_inputs leaves them out): a last
        # model's ``logits_start`` (prism_deploy.models.logits_positions)
        self.optional_inputs = {i.name: i.type for i in session.get_overridable_initializers()}
        self.input_types = {**self.optional_inputs, **{i.name: i.type for i in session.get_inputs()}}
        self.output_types = {o.name: o.type for o in session.get_outputs()}
        self.input_shapes = {i.name: list(i.shape) for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]
        self.output_shapes = {o.name: list(o.shape) for o in session.get_outputs()}

    @classmethod
    def open(
        cls,
        model: str | os.PathLike[str] | bytes,
        provider: str = "cpu",
        *,
        threads: int | None = None,
        optimization_level: str | None = None,
        session_config: dict[str, str] | None = None,
        custom_ops_library: str | None = None,
    ) -> OnnxRunner:
        """The loader: a session on ``model`` (a path or serialized bytes) on ``provider``."""
        session = make_session(
            model,
            provider,
            intra_op_threads=threads,
            graph_optimization_level=optimization_level,
            session_config=session_config,
            custom_ops_library=custom_ops_library,
        )
        return cls(session, provider, "model" if isinstance(model, bytes) else str(model))

    def input_dtype(self, name: str) -> np.dtype | None:
        """The float dtype the graph declares for ``name`` (None for integer inputs)."""
        return _FLOAT_TYPES.get(self.input_types[name])

    def output_dtype(self, name: str) -> np.dtype | None:
        """The float dtype the graph declares for output ``name`` (None for integer outputs)."""
        return _FLOAT_TYPES.get(self.output_types[name])

    def feed(self, name: str, value: Any) -> Any:
        """``value`` as the graph wants it: numpy cast to a declared float type; an OrtValue of
        another float type cast through the host; anything else untouched."""
        want = self.input_dtype(name)
        if isinstance(value, np.ndarray):
            if want is not None and value.dtype != want:
                return np.ascontiguousarray(value, dtype=want)
            return np.ascontiguousarray(value)
        if hasattr(value, "data_type") and want is not None and value.data_type() != self.input_types[name]:
            return value.numpy().astype(want)
        return value

    def run(self, feeds: dict[str, Any], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """numpy in, numpy out: ``{output name: array}`` for ``outputs`` (default: all)."""
        names = outputs or self.output_names
        values = self.session.run(names, {k: self.feed(k, v) for k, v in feeds.items()})
        return dict(zip(names, values))

    def run_device(self, feeds: dict[str, Any], outputs: list[str] | None = None) -> list[Any]:
        """Inputs (numpy, copied to the device, or OrtValues already there) and outputs bound on
        the session's device; the outputs come back as OrtValues left there."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in feeds.items():
            value = self.feed(name, value)
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(value, self.device, 0)
            binding.bind_ortvalue_input(name, value)
        for name in outputs or self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return list(binding.get_outputs())


def host(value: Any) -> np.ndarray:
    """An OrtValue (or array) as a host numpy array."""
    return value if isinstance(value, np.ndarray) else value.numpy()


def shape_of(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, np.ndarray) else tuple(value.shape())
