"""ONNX Runtime runs whose inputs and outputs stay on the session's device (I/O binding)."""

from __future__ import annotations

from typing import Any

import numpy as np

DEVICES = {"cpu": "cpu", "cuda": "cuda"}


def run_bound(session: Any, inputs: dict[str, Any], outputs: list[str] | None, device: str) -> list[Any]:
    """Run ``session`` with inputs and outputs bound on ``device`` (``cpu`` or ``cuda``).

    Inputs may be numpy arrays (copied to the device) or ``OrtValue``s already there; outputs
    come back as ``OrtValue``s left on the device, so one stage's output feeds the next stage
    (or the next decoding step's KV cache) without a host round-trip on a GPU.
    """
    import onnxruntime as ort

    binding = session.io_binding()
    for name, value in inputs.items():
        if isinstance(value, np.ndarray):
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, 0)
        binding.bind_ortvalue_input(name, value)
    for name in outputs or [o.name for o in session.get_outputs()]:
        binding.bind_output(name, device)
    session.run_with_iobinding(binding)
    return list(binding.get_outputs())
