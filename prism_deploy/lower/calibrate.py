"""int8-qdq calibration: one symmetric INT8 scale per quantized activation, from data.

The lowering places a QuantizeLinear -> DequantizeLinear pair on each MatMul's activation
input with a placeholder scale; ``calibrate`` runs the graph on calibration rows (model-A
hidden states), observes each quantized activation and sets its scale: ``max |x|`` or the
99.99th percentile of ``|x|`` (clips rare outliers, keeps the bulk's resolution), over 127.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from prism_deploy.core.onnx_io import INPUT_NAME, save_model
from prism_deploy.core.precision import CALIBRATORS
from prism_deploy.core.tiles import QMAX

PERCENTILE = 99.99  # of |activation| values
SAMPLE_PER_BATCH = 1 << 20  # |values| kept per calibration batch for the percentile
CALIB_BATCH_ROWS = 256


class ActivationObserver:
    """Collects |values| of one tensor over calibration batches; gives its INT8 scale."""

    def __init__(self, calibrator: str, seed: int = 0) -> None:
        if calibrator not in CALIBRATORS:
            raise ValueError(f"unknown calibrator {calibrator!r}")
        self.calibrator = calibrator
        self.amax = 0.0
        self.samples: list[np.ndarray] = []
        self._rng = np.random.default_rng(seed)

    def observe(self, values: np.ndarray) -> None:
        a = np.abs(values.astype(np.float32, copy=False)).ravel()
        if a.size == 0:
            return
        self.amax = max(self.amax, float(a.max()))
        if self.calibrator == "percentile":
            if a.size > SAMPLE_PER_BATCH:  # a uniform sample keeps memory bounded
                a = a[self._rng.integers(0, a.size, SAMPLE_PER_BATCH)]
            self.samples.append(a)

    def scale(self) -> float:
        bound = self.amax
        if self.calibrator == "percentile" and self.samples:
            bound = float(np.percentile(np.concatenate(self.samples), PERCENTILE))
        if not np.isfinite(bound) or bound <= 0:
            return 1.0
        # float16 holds the scale in the graph: keep it representable
        return float(np.float16(bound / QMAX)) or float(np.finfo(np.float16).tiny)


def calibrate(
    model: onnx.ModelProto,
    act_scales: dict[str, str],
    io_dtype: str,
    compute_dtype: np.dtype,
    data: np.ndarray,
    calibrator: str,
) -> None:
    """Run the graph on the calibration rows, observe each Q/DQ'd activation, set its scale.

    The observed tensors lie upstream of their own QuantizeLinear and depend only on the
    input and the float32 gates, never on another quantized MatMul, so the placeholder
    scales do not affect what is observed.
    """
    from prism_deploy.core.ort_session import make_session

    observed = sorted(set(act_scales.values()))
    io = np.dtype(io_dtype)
    observers = {name: ActivationObserver(calibrator) for name in observed}
    # The session reads the model with the observed tensors as its outputs. Swap them in on
    # the model itself (no copy of the weights) and put the real output back afterwards.
    real_outputs = [onnx.ValueInfoProto() for _ in model.graph.output]
    for copy, out in zip(real_outputs, model.graph.output):
        copy.CopyFrom(out)
    del model.graph.output[:]
    for name in observed:
        model.graph.output.append(helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory(prefix="prism-calib-") as tmp:
        try:
            if model.ByteSize() < (1 << 31) - (1 << 26):
                sess = make_session(model.SerializeToString(), "cpu")
            else:  # too big for one protobuf message: a copy saved with external data
                probe = onnx.ModelProto()
                probe.CopyFrom(model)
                path = Path(tmp) / "probe.onnx"
                save_model(probe, path, external=True)
                del probe
                sess = make_session(path, "cpu")
        finally:
            del model.graph.output[:]
            model.graph.output.extend(real_outputs)
        for start in range(0, data.shape[0], CALIB_BATCH_ROWS):
            rows = data[start : start + CALIB_BATCH_ROWS].astype(io)[None]
            for name, value in zip(observed, sess.run(observed, {INPUT_NAME: rows})):
                observers[name].observe(value)
    values = {scale: observers[x].scale() for scale, x in act_scales.items()}
    for init in model.graph.initializer:
        if init.name in values:
            init.CopyFrom(onnx.numpy_helper.from_array(np.asarray(values[init.name], dtype=compute_dtype), init.name))
