"""``export_onnx``: an adapter as one ONNX graph per precision, saved (docs/onnx-lowering.md).

The graph itself is built by :mod:`prism_deploy.lower.adapter_onnx`, its self-description by
:mod:`prism_deploy.lower.contract`, int8-qdq activation scales by
:mod:`prism_deploy.lower.calibrate`; this module checks the options, runs the three and saves.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from prism_deploy.core import defaults
from prism_deploy.core.blocks import DeferredTensor
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.onnx_io import save_model
from prism_deploy.core.precision import CALIBRATORS, Precision
from prism_deploy.format import adapter_arrays
from prism_deploy.lower.adapter_onnx import DEFAULT_GATED_FORM, GATED_FORMS, AdapterGraphBuilder
from prism_deploy.lower.calibrate import calibrate
from prism_deploy.lower.contract import read_metadata
from prism_deploy.lower.graph_writer import DTYPE_NAMES

IO_DTYPES = tuple(DTYPE_NAMES)


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote."""

    paths: list[str]
    bytes: int
    node_count: int
    precision: Precision
    io_dtype: str
    gated_form: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def export_onnx(
    adapter: Any,
    path: str | os.PathLike[str],
    *,
    precision: Precision | str = defaults.PRECISION,
    io_dtype: str = "float32",
    calib: np.ndarray | str | os.PathLike[str] | None = None,
    calibrator: str = defaults.CALIBRATOR,
    gated_form: str = DEFAULT_GATED_FORM,
    progress: bool = False,
    ort_nbits: bool = False,
) -> ExportResult:
    """Lower ``adapter`` (``AdapterTensors`` or a ``PrismAdapter``) and save it atomically
    (external data over ~2 GiB). The large weights are computed and written a block at a time
    (``DeferredTensor``): the export holds the adapter plus a bounded working set, not a copy
    of the weights (docs/onnx-lowering.md, "Memory"); int8-qdq, whose calibration runs the
    graph, holds the model whole as ``build_model`` does.

    ``precision``: a ``Precision``, or its name from an API caller (parsed here, once: this is
    the lowering's edge; everything below it takes the ``Precision``).

    ``progress`` shows a tqdm bar on stderr when it is a terminal (one step per pipe, one
    for saving).
    """
    from tqdm import tqdm

    prec = check_options(precision, io_dtype, calibrator, gated_form)
    data = adapter_arrays(adapter)
    with tqdm(
        total=data.config.num_pipes + 1,
        desc="export",
        unit="step",
        disable=None if progress else True,
        file=sys.stderr,
        leave=False,
    ) as bar:
        model, deferred = _lower(
            data,
            precision=prec,
            io_dtype=io_dtype,
            calib=calib,
            calibrator=calibrator,
            gated_form=gated_form,
            on_pipe=bar.update,
            defer=True,
            ort_nbits=ort_nbits,
        )
        node_count = len(model.graph.node)
        metadata = read_metadata(model)
        bar.set_postfix_str("saving")
        written = save_model(model, path, deferred=deferred)  # the model is spent
        del model, deferred
        bar.update(1)
    return ExportResult(
        paths=[str(p) for p in written],
        bytes=sum(p.stat().st_size for p in written),
        node_count=node_count,
        precision=prec,
        io_dtype=io_dtype,
        gated_form=gated_form,
        metadata=metadata,
    )


def build_model(
    adapter: Any,
    *,
    precision: Precision | str = defaults.PRECISION,
    io_dtype: str = "float32",
    calib: np.ndarray | str | os.PathLike[str] | None = None,
    calibrator: str = defaults.CALIBRATOR,
    gated_form: str = DEFAULT_GATED_FORM,
    _on_pipe: Callable[[int], Any] | None = None,
    ort_nbits: bool = False,
) -> onnx.ModelProto:
    """The ONNX model of ``adapter`` at ``precision``, in memory (finalized: opset 19, IR 9);
    ``precision`` as ``export_onnx`` takes it."""
    prec = check_options(precision, io_dtype, calibrator, gated_form)
    model, _ = _lower(
        adapter,
        precision=prec,
        io_dtype=io_dtype,
        calib=calib,
        calibrator=calibrator,
        gated_form=gated_form,
        on_pipe=_on_pipe,
        defer=False,
        ort_nbits=ort_nbits,
    )
    return model


def _lower(
    adapter: Any,
    *,
    precision: Precision,
    io_dtype: str,
    calib: np.ndarray | str | os.PathLike[str] | None,
    calibrator: str,
    gated_form: str,
    on_pipe: Callable[[int], Any] | None,
    defer: bool,
    ort_nbits: bool = False,
) -> tuple[onnx.ModelProto, dict[str, DeferredTensor]]:
    """The model, and (``defer``) its large initializers left for ``save_model`` to write."""
    data = adapter_arrays(adapter)
    calib_data = None
    if precision.quantizes_activations:
        if calib is None:
            raise PrismInputError(
                "--precision int8-qdq needs calibration data: pass --calib FILE "
                "(.npy or .safetensors of model-A hidden states [n, in_dim])"
            )
        calib_data = _load_calib(calib, data.config.in_dim)
    builder = AdapterGraphBuilder(data, precision, io_dtype, gated_form, ort_nbits=ort_nbits)
    builder.on_pipe = on_pipe
    model = builder.model(defer=defer and calib_data is None)  # calibration runs the whole model
    if calib_data is not None:
        calibrate(model, builder.act_scales, io_dtype, builder.cd, calib_data, calibrator)
    return model, builder.g.deferred


def check_options(precision: Precision | str, io_dtype: str, calibrator: str, gated_form: str) -> Precision:
    """The lowering's options checked, and its precision parsed (the lowering's edge)."""
    prec = Precision.parse(precision)
    if io_dtype not in IO_DTYPES:
        raise PrismInputError(f"--io-dtype: {io_dtype!r} is not one of {', '.join(IO_DTYPES)}")
    if calibrator not in CALIBRATORS:
        raise PrismInputError(f"--calibrator: {calibrator!r} is not one of {', '.join(CALIBRATORS)}")
    if gated_form not in GATED_FORMS:
        raise PrismInputError(f"gated_form: {gated_form!r} is not one of {', '.join(GATED_FORMS)}")
    return prec


def _load_calib(calib: np.ndarray | str | os.PathLike[str], in_dim: int) -> np.ndarray:
    if isinstance(calib, np.ndarray):
        data, label = calib, "calibration array"
    else:
        from prism_deploy.core.data import load_matrix

        data, label = load_matrix(calib), str(calib)
    if data.ndim != 2 or data.shape[1] != in_dim or data.shape[0] == 0:
        raise PrismInputError(
            f"{label}: calibration data must have shape [n, {in_dim}] with n >= 1, got {list(data.shape)}"
        )
    data = np.asarray(data, dtype=np.float32)
    if not np.isfinite(data).all():
        raise PrismInputError(f"{label}: calibration data holds NaN or Inf")
    return data
