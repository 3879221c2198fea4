"""Lower a ``PrismAdapter`` to one ONNX graph per precision (docs/onnx-lowering.md).

Graph, for ``hidden`` ``[batch, seq, in_dim]``:

    hidden -> Reshape [T, in_dim] (-> Cast to the compute dtype) = hidden_2d
    per pipe (nodes named "<pipe>/..."):
      ungated: one MatMul on a dense weight (folded with its ungated neighbours in fp32/fp16)
      gated:   gate/MatMul + gate/Add (float32 scores) -> gate/TopK -> gate/Softmax ->
               gate/Mul (gate_scale) -> gate/ScatterElements into gate/ConstantOfShape zeros
               [T, R*C] -> grouped batched MatMul over the tile grid (form A or B below)
    combine: Mul by the combine weight (weighted), Sum over pipes -> Cast -> Reshape = adapted

The node count depends on the pipes and the precision, never on the number of workers.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from prism_deploy.errors import PrismInputError
from prism_deploy.lower.graph import DTYPE_NAMES, GraphBuilder
from prism_deploy.lower.quantize import CALIBRATORS, ActivationObserver, quantize_tiles
from prism_deploy.onnx_io import OPSET, finalize, save_model
from prism_deploy.reference import Pipe, PrismAdapter

PRECISIONS = ("fp32", "fp16", "int8", "int8-qdq")
IO_DTYPES = ("float32", "float16")
GATED_FORMS = ("auto", "A", "B")
METADATA_KEY = "prism.lowering"
METADATA_VERSION = 1

# The gated form. Both compute every worker (ONNX has no sparse op; the plugin of the fusion
# pass is the sparse path), so they differ only in the intermediate they materialise:
#   A: scale the input per row-block by the gates, one MatMul batched over the R row-blocks
#      ([R, T, C*tc] @ [R, C*tc, tr]); the sum over column-blocks happens inside the MatMul's
#      reduction, as in the reference. Intermediate: R * T * C*tc values.
#   B: one MatMul batched over the C column-blocks ([C, T, tc] @ [C, tc, R*tr]), then weight
#      the per-column-block partials by the gates and ReduceSum over C. Intermediate:
#      C * T * R*tr values, plus a separate reduction pass.
# Measured on ONNX Runtime 1.31.1 CPU, fp32, 1 thread, this 2-core dev machine, 2026-11-25
# (tools/bench_gated_form.py; median ms, A / B):
#   4096->4096 16x32 of 256x128 top 154: T=1 7.66/6.91, T=8 14.0/22.6, T=64 37.0/61.2
#   1024->1024 8x8 of 128x128 top 16:    T=1 0.19/0.19, T=8 0.37/0.39, T=64 1.17/1.48
#   256->160 8x8 of 20x32 top 16:        T=1 0.019/0.018, T=8 0.042/0.036, T=64 0.18/0.17
#   4096->1024 32x4 of 32x1024 top 8:    T=1 0.74/0.70, T=8 1.77/2.05, T=64 14.7/9.4
# Neither form wins everywhere; the smaller intermediate wins wherever the gap is large
# (A by 1.6x on the 4096 square grid, B by 1.6x on the tall 32x4 grid) and the two are
# within ~10% where the intermediates are close. So the default, "auto", picks per pipe the
# form with the smaller intermediate (A when R*C*tc <= C*R*tr, i.e. tc <= tr; ties -> A,
# which keeps the reference's summation order). At fp16 (same bench, --precision fp16) the
# rule holds too; B's float16 Mul+ReduceSum is much slower on ORT CPU for square grids at
# T=64 (4096: A 31 ms, B 172 ms), which the rule already avoids.
# int8-qdq is the exception: there "auto" always takes B. Form A quantizes the gate-scaled
# input g*x, whose values span the gate's whole range (0 for unselected workers up to
# gate_scale), so one per-tensor INT8 scale leaves the small products few levels; form B
# quantizes x itself. Measured rel L2 vs the reference (512 calibration rows, 128 tokens,
# ORT CPU, 2026-11-25): demo adapter A 0.0130 / B 0.0123; 1024->1024 8x8 top 16 A 0.058 /
# B 0.012; 512->512 16x32 top 154 A 0.18 / B 0.012 (max calibrator).
DEFAULT_GATED_FORM = "auto"


def choose_gated_form(spec: Any, precision: str = "fp32") -> str:
    """``auto``'s choice for one gated pipe (see above)."""
    if precision == "int8-qdq":
        return "B"
    R, C = spec.grid
    tr, tc = spec.tile
    return "A" if R * C * tc <= C * R * tr else "B"


COMPUTE_DTYPE = {"fp32": np.float32, "fp16": np.float16, "int8": np.float16, "int8-qdq": np.float16}
ONNX_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
CALIB_BATCH_ROWS = 256


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote."""

    paths: list[str]
    bytes: int
    node_count: int
    precision: str
    io_dtype: str
    gated_form: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def export_onnx(
    adapter: PrismAdapter,
    path: str | os.PathLike[str],
    *,
    precision: str = "fp32",
    io_dtype: str = "float32",
    calib: np.ndarray | str | os.PathLike[str] | None = None,
    calibrator: str = "max",
    gated_form: str = DEFAULT_GATED_FORM,
    progress: bool = False,
) -> ExportResult:
    """Lower ``adapter`` and save it (atomically; external data over ~2 GiB).

    ``progress`` shows a tqdm bar on stderr when it is a terminal (one step per pipe, one
    for saving).
    """
    from tqdm import tqdm

    with tqdm(total=adapter.config.num_pipes + 1, desc="export", unit="step", disable=None if progress else True,
              file=sys.stderr, leave=False) as bar:
        model = build_model(adapter, precision=precision, io_dtype=io_dtype, calib=calib,
                            calibrator=calibrator, gated_form=gated_form, _on_pipe=bar.update)
        node_count = len(model.graph.node)
        metadata = read_lowering_metadata(model)
        bar.set_postfix_str("saving")
        written = save_model(model, path)  # clears raw_data of external tensors: model is spent
        del model
        bar.update(1)
    return ExportResult(
        paths=[str(p) for p in written],
        bytes=sum(p.stat().st_size for p in written),
        node_count=node_count,
        precision=precision,
        io_dtype=io_dtype,
        gated_form=gated_form,
        metadata=metadata,
    )


def build_model(
    adapter: PrismAdapter,
    *,
    precision: str = "fp32",
    io_dtype: str = "float32",
    calib: np.ndarray | str | os.PathLike[str] | None = None,
    calibrator: str = "max",
    gated_form: str = DEFAULT_GATED_FORM,
    _on_pipe: Callable[[int], Any] | None = None,
) -> onnx.ModelProto:
    """The ONNX model of ``adapter`` at ``precision``, in memory (finalized: opset 19, IR 9)."""
    _check_options(precision, io_dtype, calibrator, gated_form)
    calib_data = None
    if precision == "int8-qdq":
        if calib is None:
            raise PrismInputError("--precision int8-qdq needs calibration data: pass --calib FILE "
                                  "(.npy or .safetensors of model-A hidden states [n, in_dim])")
        calib_data = _load_calib(calib, adapter.in_dim)
    lowering = _Lowering(adapter, precision, io_dtype, gated_form)
    lowering.on_pipe = _on_pipe
    model = lowering.model()
    if calib_data is not None:
        _calibrate(model, lowering, calib_data, calibrator)
    return model


def read_lowering_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """The ``prism.lowering`` metadata contract of a model this module wrote."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return dict(json.loads(prop.value))
    raise PrismInputError(f"the model has no {METADATA_KEY!r} metadata: not written by prism-deploy export")


# ---- options and inputs ------------------------------------------------------------------


def _check_options(precision: str, io_dtype: str, calibrator: str, gated_form: str) -> None:
    if precision not in PRECISIONS:
        raise PrismInputError(f"--precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if io_dtype not in IO_DTYPES:
        raise PrismInputError(f"--io-dtype: {io_dtype!r} is not one of {', '.join(IO_DTYPES)}")
    if calibrator not in CALIBRATORS:
        raise PrismInputError(f"--calibrator: {calibrator!r} is not one of {', '.join(CALIBRATORS)}")
    if gated_form not in GATED_FORMS:
        raise PrismInputError(f"gated_form: {gated_form!r} is not one of {', '.join(GATED_FORMS)}")


def _load_calib(calib: np.ndarray | str | os.PathLike[str], in_dim: int) -> np.ndarray:
    if isinstance(calib, np.ndarray):
        data, label = calib, "calibration array"
    else:
        from prism_deploy.data import load_matrix

        data, label = load_matrix(calib), str(calib)
    if data.ndim != 2 or data.shape[1] != in_dim or data.shape[0] == 0:
        raise PrismInputError(f"{label}: calibration data must have shape [n, {in_dim}] with n >= 1, "
                              f"got {list(data.shape)}")
    data = np.asarray(data, dtype=np.float32)
    if not np.isfinite(data).all():
        raise PrismInputError(f"{label}: calibration data holds NaN or Inf")
    return data


RESERVED_PREFIXES = ("input", "combine", "output")


def sanitize_name(name: str) -> str:
    """A pipe name usable as a node-name prefix: letters, digits, ``_ . -``; never empty."""
    clean = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
    return clean or "pipe"


def pipe_prefixes(names: list[str]) -> list[str]:
    """``<sanitized name>/`` per pipe, made unique (``_<i>`` appended) when names collide."""
    out: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        base = candidate = sanitize_name(name)
        n = i
        # "input/", "combine/", "output/" and "fold<i>/" prefix the graph's own nodes
        while candidate in seen or candidate in RESERVED_PREFIXES or re.fullmatch(r"fold\d+", candidate):
            candidate = f"{base}_{n}"
            n += 1
        seen.add(candidate)
        out.append(candidate + "/")
    return out


# ---- the lowering ------------------------------------------------------------------------


class _Lowering:
    """Builds the graph for one adapter, precision and io dtype."""

    def __init__(self, adapter: PrismAdapter, precision: str, io_dtype: str, gated_form: str,
                 gate_dtype: str = "float32") -> None:
        self.adapter = adapter
        self.config = adapter.config
        self.precision = precision
        self.io_dtype = io_dtype
        self.gated_form = gated_form
        # float16 gates exist only for tools/measure_fp16_gate.py (the measurement behind
        # the float32 choice); exports always use float32 gate scores and Softmax
        self.gate_dtype = np.dtype(gate_dtype)
        self.cd = np.dtype(COMPUTE_DTYPE[precision])
        self.cd_onnx = ONNX_TYPE[self.cd]
        self.int8 = precision in ("int8", "int8-qdq")
        self.qdq = precision == "int8-qdq"
        self.g = GraphBuilder()
        self.prefixes = pipe_prefixes([p.name for p in self.config.pipes])
        self.pipe_meta: list[dict[str, Any]] = []
        # int8-qdq: scale initializer -> the activation tensor calibration observes for it
        self.act_scales: dict[str, str] = {}
        self.on_pipe: Callable[[int], Any] | None = None  # progress: called with pipes done

    # -- whole graph --------------------------------------------------------------------
    def model(self) -> onnx.ModelProto:
        cfg, g = self.config, self.g
        if self.cd == np.float16:
            for i, pipe in enumerate(self.adapter.pipe_list()):
                lo, hi = torch.aminmax(pipe.tiles.detach())
                _check_float16_range(f"pipes.{i}.tiles", float(lo), float(hi))
        io_type = DTYPE_NAMES[self.io_dtype]
        x2_io, lead = self._input()
        hidden_2d = x2_io
        if np.dtype(self.io_dtype) != self.cd:
            hidden_2d = g.op("Cast", [x2_io], "hidden_2d", to=self.cd_onnx)
        if self.cd == np.float32:
            x_f32 = hidden_2d
        elif self.io_dtype == "float32":
            x_f32 = x2_io
        else:
            x_f32 = g.op("Cast", [hidden_2d], "hidden_2d_f32", to=TensorProto.FLOAT)
        self.x_cd, self.x_f32 = hidden_2d, x_f32

        betas = self.adapter.betas(torch.float64).tolist()
        outputs: list[str] = []  # [T, out_dim] terms of the final sum, compute dtype
        pipes = self.adapter.pipe_list()
        for run in self._runs():
            if len(run) > 1:
                outputs.append(self._folded_ungated(run, betas))
            else:
                i = run[0]
                out = self._gated(i) if pipes[i].spec.gated else self._ungated(i)
                if cfg.combine == "weighted":
                    out = g.op("Mul", [out, g.const(f"combine/beta_{i}", betas[i], self.cd)], f"combine/Mul_{i}")
                outputs.append(out)
            if self.on_pipe is not None:
                self.on_pipe(len(run))

        y2 = outputs[0] if len(outputs) == 1 else g.op("Sum", outputs, "combine/Sum")
        if np.dtype(self.io_dtype) != self.cd:
            y2 = g.op("Cast", [y2], "output/Cast", to=io_type)
        out_shape = g.op("Concat", [lead, g.ints("output/out_dim", [cfg.out_dim])], "output/shape", axis=0)
        g.op("Reshape", [y2, out_shape], "output/Reshape", outputs=["adapted"])

        graph = g.graph
        graph.name = "prism_adapter"
        graph.input.append(helper.make_tensor_value_info("hidden", io_type, ["batch", "seq", cfg.in_dim]))
        graph.output.append(helper.make_tensor_value_info("adapted", io_type, ["batch", "seq", cfg.out_dim]))
        model = g.model  # built in place: make_graph/make_model would copy the weights twice
        model.opset_import.append(helper.make_opsetid("", OPSET))
        model.doc_string = (f"PRISM adapter {cfg.in_dim} -> {cfg.out_dim}, {cfg.num_pipes} pipe(s), "
                            f"precision {self.precision}, lowered by prism-deploy")
        helper.set_model_props(model, {METADATA_KEY: json.dumps(self.metadata(), sort_keys=True)})
        return finalize(model)

    def _runs(self) -> list[list[int]]:
        """Pipe indices in order, grouped: a run of consecutive ungated pipes is one group
        (folded into one weight) in fp32/fp16; every other pipe is a group of its own."""
        runs: list[list[int]] = []
        for i, spec in enumerate(self.config.pipes):
            prev = runs[-1][-1] if runs else None
            if (not self.int8 and not spec.gated and prev is not None
                    and not self.config.pipes[prev].gated):
                runs[-1].append(i)
            else:
                runs.append([i])
        return runs

    def _input(self) -> tuple[str, str]:
        g = self.g
        shape = g.op("Shape", ["hidden"], "input/Shape")
        lead = g.op("Slice", [shape, g.ints("input/zero", [0]), g.ints("input/two", [2])], "input/lead")
        name = "hidden_2d" if np.dtype(self.io_dtype) == self.cd else "hidden_2d_io"
        x2 = g.op("Reshape", ["hidden", g.ints("input/flat_shape", [-1, self.config.in_dim])],
                  "input/Reshape", outputs=[name])
        return x2, lead

    def metadata(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "version": METADATA_VERSION,
            "precision": self.precision,
            "io_dtype": self.io_dtype,
            "compute_dtype": self.cd.name,
            "in_dim": cfg.in_dim,
            "out_dim": cfg.out_dim,
            "combine": cfg.combine,
            "gated_form": self.gated_form,
            "hidden_2d": self.x_cd,
            "pipes": self.pipe_meta,
        }

    def _pipe_entry(self, i: int, **extra: Any) -> dict[str, Any]:
        spec = self.config.pipes[i]
        entry: dict[str, Any] = {
            "index": i, "name": spec.name, "gated": spec.gated,
            "R": spec.rows, "C": spec.cols, "tr": spec.tile_rows, "tc": spec.tile_cols,
            "top_k": spec.top_k, "gate_scale": spec.gate_scale if spec.gated else None,
            "scores": None, "output": None, "tiles": None, "scales": None,
            "dense_weight": None, "folded_into": None, "form": None, "node_prefix": self.prefixes[i],
        }
        entry.update(extra)
        return entry

    # -- weights ------------------------------------------------------------------------
    def _tiles_in_storage_order(self, i: int, pipe: Pipe) -> tuple[str, str | None, str]:
        """The tile initializer in storage order -> (tiles name, scales name, compute-dtype
        tensor ``[R*C, tr, tc]``). INT8 tiles are dequantized in the graph (per axis, on the
        tiles flattened to ``[R*C*tr, tc]``, axis 0: one scale per tile row)."""
        g, p = self.g, self.prefixes[i]
        W, (tr, tc) = pipe.spec.workers, pipe.spec.tile
        if not self.int8:
            tiles = g.initializer(f"{p}tiles", _as_numpy(pipe.tiles, self.cd))
            return tiles, None, tiles
        q, scales = quantize_tiles(pipe.tiles.detach())
        tiles = g.initializer(f"{p}tiles", q.reshape(W * tr, tc))
        scale_name = g.initializer(f"{p}tiles/scales", scales.reshape(W * tr))
        del q
        deq = g.op("DequantizeLinear", [tiles, scale_name, g.const(f"{p}tiles/zero_point", np.zeros(W * tr), np.int8)],
                   f"{p}tiles/DequantizeLinear", axis=0)
        # DequantizeLinear's output type is the scale's (float32, per the metadata contract)
        deq = g.op("Cast", [deq], f"{p}tiles/Cast", to=self.cd_onnx)
        return tiles, scale_name, g.op("Reshape", [deq, g.ints(f"{p}tiles/shape", [W, tr, tc])], f"{p}tiles/Reshape")

    def _act_qdq(self, x: str, key: str) -> str:
        """int8-qdq: QuantizeLinear -> DequantizeLinear on a MatMul's activation input.
        The scale is a placeholder until calibration fills it in (``_calibrate``)."""
        if not self.qdq:
            return x
        g = self.g
        scale = g.const(f"{key}act_scale", 1.0, self.cd)
        zp = g.const(f"{key}act_zero_point", 0, np.int8)
        self.act_scales[scale] = x
        q = g.op("QuantizeLinear", [x, scale, zp], f"{key}QuantizeLinear")
        return g.op("DequantizeLinear", [q, scale, zp], f"{key}DequantizeLinear")

    # -- ungated ------------------------------------------------------------------------
    def _ungated(self, i: int) -> str:
        """One MatMul ``[T, in_dim] @ [in_dim, out_dim]``.

        fp32/fp16: the weight is built at export time: the tiles ``[R*C, tr, tc]`` in
        row-major storage are NOT the dense matrix laid out flat (worker ``r*C + c``'s tile
        sits at rows ``r*tr..`` and columns ``c*tc..`` of it), so this is a permutation of
        the storage (``[R, C, tr, tc] -> [C, tc, R, tr]``), then a crop to the real dims
        (padded input columns multiply zeros, padded output rows are cut: dropping them is
        exact and saves their work). INT8: the same permutation and crop in the graph, after
        the DequantizeLinear, so that the tiles and scales stay in storage order.
        """
        g, p = self.g, self.prefixes[i]
        pipe = self.adapter.pipe_list()[i]
        cfg = self.config
        if not self.int8:
            w = g.initializer(f"{p}weight", _dense_weight_t(pipe, self.cd))
            x = self.x_cd
            out = g.op("MatMul", [x, w], f"{p}MatMul", outputs=[f"{p}output"])
            self.pipe_meta.append(self._pipe_entry(i, output=out, dense_weight=w))
            return out
        (R, C), (tr, tc) = pipe.spec.grid, pipe.spec.tile
        tiles, scales, t3 = self._tiles_in_storage_order(i, pipe)
        t4 = g.op("Reshape", [t3, g.ints(f"{p}weight/shape4", [R, C, tr, tc])], f"{p}weight/Reshape4")
        tt = g.op("Transpose", [t4], f"{p}weight/Transpose", perm=[1, 3, 0, 2])  # [C, tc, R, tr]
        dense = g.op("Reshape", [tt, g.ints(f"{p}weight/shape2", [C * tc, R * tr])], f"{p}weight/Reshape2")
        w = g.op("Slice", [dense, g.ints(f"{p}weight/starts", [0, 0]),
                           g.ints(f"{p}weight/ends", [cfg.in_dim, cfg.out_dim])], f"{p}weight/Slice")
        x = self._act_qdq(self.x_cd, f"{p}input/")
        out = g.op("MatMul", [x, w], f"{p}MatMul", outputs=[f"{p}output"])
        self.pipe_meta.append(self._pipe_entry(i, output=out, tiles=tiles, scales=scales))
        return out

    def _folded_ungated(self, run: list[int], betas: list[float]) -> str:
        """Consecutive ungated pipes summed with their combine weights into ONE weight.

        ``sum_p beta_p * (x @ W_p) = x @ (sum_p beta_p * W_p)``: exact in real arithmetic.
        In floating point the folded weight is summed in float32 (each entry: at most one
        rounding of 2^-24 relative per pipe added, a few 1e-7 for 2-3 pipes) and, for fp16,
        rounded once to float16 (2^-11), where the unfolded graph rounds every pipe's weight
        to float16 and also rounds each pipe's output and their sum: the folded graph is as
        close to the exact result as the unfolded one or closer (measured in the tests:
        fp32 rel L2 error ~2e-7). Not done for INT8, whose per-tile-row scales (the metadata
        contract) need the tiles kept apart.
        """
        g = self.g
        pipes = self.adapter.pipe_list()
        prefix = f"fold{run[0]}/"
        acc = np.zeros((self.config.in_dim, self.config.out_dim), dtype=np.float32)
        for i in run:  # one pipe's weight at a time: transient copies of one pipe's size
            acc += np.float32(betas[i]) * _dense_weight_t(pipes[i], np.float32)
        if self.cd == np.float16:
            _check_float16_range(f"the folded weight of pipes {run}", float(acc.min()), float(acc.max()))
        w = g.initializer(f"{prefix}weight", acc.astype(self.cd, copy=False))
        del acc
        out = g.op("MatMul", [self.x_cd, w], f"{prefix}MatMul", outputs=[f"{prefix}output"])
        for i in run:
            self.pipe_meta.append(self._pipe_entry(i, dense_weight=w, folded_into=prefix))
        return out

    # -- gated --------------------------------------------------------------------------
    def _gate(self, i: int, pipe: Pipe) -> tuple[str, str, str]:
        """float32 scores -> TopK -> Softmax -> * gate_scale -> scattered into zeros [T, R*C].

        Scores and Softmax stay float32 in every precision (docs/onnx-lowering.md: float16
        scores flip TopK selections far more often than float32 rounding does, and the gate
        is a small part of the work). Returns (scores, indices, dense gates in compute dtype).
        """
        g, p = self.g, self.prefixes[i]
        spec = pipe.spec
        assert pipe.gate is not None and spec.top_k is not None
        gd = self.gate_dtype
        wt = g.initializer(f"{p}gate/weight_t", pipe.gate.weight.detach().to(torch.float32).numpy().T.astype(gd))
        b = g.initializer(f"{p}gate/bias", pipe.gate.bias.detach().to(torch.float32).numpy().astype(gd))
        if gd == np.float32:
            mm = g.op("MatMul", [self.x_f32, wt], f"{p}gate/MatMul")
            scores = g.op("Add", [mm, b], f"{p}gate/Add", outputs=[f"{p}gate/scores"])
        else:  # measurement only: float16 scores, widened afterwards (TopK order unchanged)
            x16 = self.x_cd if self.cd == np.float16 else g.op("Cast", [self.x_cd], f"{p}gate/Cast16", to=TensorProto.FLOAT16)
            mm = g.op("MatMul", [x16, wt], f"{p}gate/MatMul")
            s16 = g.op("Add", [mm, b], f"{p}gate/Add")
            scores = g.op("Cast", [s16], f"{p}gate/CastScores", to=TensorProto.FLOAT)
        values, indices = g.op("TopK", [scores, g.ints(f"{p}gate/k", [spec.top_k])], f"{p}gate/TopK",
                               outputs=[f"{p}gate/topk_values", f"{p}gate/topk_indices"],
                               axis=-1, largest=1, sorted=1)
        soft = g.op("Softmax", [values], f"{p}gate/Softmax", axis=-1)
        weights = g.op("Mul", [soft, g.const(f"{p}gate/scale", spec.gate_scale, np.float32)], f"{p}gate/Mul",
                       outputs=[f"{p}gate/weights"])
        shape = g.op("Shape", [scores], f"{p}gate/Shape")
        zeros = g.op("ConstantOfShape", [shape], f"{p}gate/ConstantOfShape",
                     value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0]))
        # no reduction: indices are distinct (TopK), and reduction="add" fails in float16 on ORT
        dense = g.op("ScatterElements", [zeros, indices, weights], f"{p}gate/ScatterElements",
                     outputs=[f"{p}gate/dense"], axis=1)
        if self.cd != np.float32:
            dense = g.op("Cast", [dense], f"{p}gate/Cast", to=self.cd_onnx)
        return scores, indices, dense

    def _gated(self, i: int) -> str:
        g, p = self.g, self.prefixes[i]
        pipe = self.adapter.pipe_list()[i]
        cfg = self.config
        (R, C), (tr, tc) = pipe.spec.grid, pipe.spec.tile
        form = self.gated_form if self.gated_form != "auto" else choose_gated_form(pipe.spec, self.precision)
        scores, _, gates = self._gate(i, pipe)
        tiles, scales, t3 = self._tiles_in_storage_order(i, pipe)
        # zero-pad the input to C*tc (always present, a no-op when C*tc == in_dim, so that
        # the node count never depends on the grid)
        xp = g.op("Pad", [self.x_cd, g.ints(f"{p}pad/pads", [0, 0, 0, pipe.spec.padded_in - cfg.in_dim])],
                  f"{p}Pad")
        t4 = g.op("Reshape", [t3, g.ints(f"{p}tiles/shape4", [R, C, tr, tc])], f"{p}tiles/Reshape4")
        if form == "A":
            # weights [R, C*tc, tr]: per row-block, the tiles of its C workers stacked along K
            wt = g.op("Transpose", [t4], f"{p}tiles/Transpose", perm=[0, 1, 3, 2])
            w = g.op("Reshape", [wt, g.ints(f"{p}tiles/shapeA", [R, C * tc, tr])], f"{p}tiles/ReshapeA")
            g3 = g.op("Reshape", [gates, g.ints(f"{p}gates/shape", [-1, R, C])], f"{p}gates/Reshape")
            gt = g.op("Transpose", [g3], f"{p}gates/Transpose", perm=[1, 0, 2])  # [R, T, C]
            g4 = g.op("Unsqueeze", [gt, g.ints(f"{p}gates/axes", [3])], f"{p}gates/Unsqueeze")
            x4 = g.op("Reshape", [xp, g.ints(f"{p}input/shape", [1, -1, C, tc])], f"{p}input/Reshape")
            scaled = g.op("Mul", [g4, x4], f"{p}input/Mul")  # [R, T, C, tc]
            scaled = g.op("Reshape", [scaled, g.ints(f"{p}input/shapeA", [R, -1, C * tc])], f"{p}input/ReshapeA")
            scaled = self._act_qdq(scaled, f"{p}input/")
            y = g.op("MatMul", [scaled, w], f"{p}MatMul")  # [R, T, tr]
            y = g.op("Transpose", [y], f"{p}output/Transpose", perm=[1, 0, 2])  # [T, R, tr]
        else:
            # weights [C, tc, R*tr]: per column-block, its R workers side by side along N
            wt = g.op("Transpose", [t4], f"{p}tiles/Transpose", perm=[1, 3, 0, 2])
            w = g.op("Reshape", [wt, g.ints(f"{p}tiles/shapeB", [C, tc, R * tr])], f"{p}tiles/ReshapeB")
            xq = self._act_qdq(xp, f"{p}input/")
            x3 = g.op("Reshape", [xq, g.ints(f"{p}input/shape", [-1, C, tc])], f"{p}input/Reshape")
            xt = g.op("Transpose", [x3], f"{p}input/Transpose", perm=[1, 0, 2])  # [C, T, tc]
            part = g.op("MatMul", [xt, w], f"{p}MatMul")  # [C, T, R*tr]
            part = g.op("Reshape", [part, g.ints(f"{p}partials/shape", [C, -1, R, tr])], f"{p}partials/Reshape")
            g3 = g.op("Reshape", [gates, g.ints(f"{p}gates/shape", [-1, R, C])], f"{p}gates/Reshape")
            gt = g.op("Transpose", [g3], f"{p}gates/Transpose", perm=[2, 0, 1])  # [C, T, R]
            g4 = g.op("Unsqueeze", [gt, g.ints(f"{p}gates/axes", [3])], f"{p}gates/Unsqueeze")
            weighted = g.op("Mul", [part, g4], f"{p}partials/Mul")  # [C, T, R, tr]
            y = g.op("ReduceSum", [weighted, g.ints(f"{p}partials/axes", [0])], f"{p}partials/ReduceSum",
                     keepdims=0)  # [T, R, tr]
        y = g.op("Reshape", [y, g.ints(f"{p}output/shape", [-1, R * tr])], f"{p}output/Reshape")
        out = g.op("Slice", [y, g.ints(f"{p}output/starts", [0]), g.ints(f"{p}output/ends", [cfg.out_dim]),
                             g.ints(f"{p}output/axes", [1])], f"{p}output/Slice", outputs=[f"{p}output"])
        self.pipe_meta.append(self._pipe_entry(i, scores=scores, output=out, tiles=tiles, scales=scales, form=form))
        return out


FLOAT16_MAX = float(np.finfo(np.float16).max)


def _check_float16_range(what: str, lo: float, hi: float) -> None:
    """float16 graphs hold the weights in float16: values past 65504 would become inf."""
    if max(abs(lo), abs(hi)) > FLOAT16_MAX:
        raise PrismInputError(f"{what}: values up to {max(abs(lo), abs(hi)):.4g} exceed the float16 range "
                              f"(65504); use --precision fp32")


def _as_numpy(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """A tensor as a contiguous numpy array of ``dtype`` (no copy when it already is one)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)  # numpy has no bfloat16; bf16 -> f32 is exact
    return np.ascontiguousarray(t.numpy(), dtype=dtype)


def _dense_weight_t(pipe: Pipe, dtype: np.dtype | type) -> np.ndarray:
    """``[in_dim, out_dim]``: the pipe's tiles permuted into the dense (transposed) matrix and
    cropped to the real dims. One new array; the tiles themselves are only viewed."""
    (R, C), (tr, tc) = pipe.spec.grid, pipe.spec.tile
    t = pipe.tiles.detach()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    view = t.numpy().reshape(R, C, tr, tc).transpose(1, 3, 0, 2).reshape(C * tc, R * tr)
    return np.ascontiguousarray(view[: pipe.in_dim, : pipe.out_dim], dtype=dtype)


# ---- int8-qdq calibration ----------------------------------------------------------------


def _calibrate(model: onnx.ModelProto, lowering: _Lowering, data: np.ndarray, calibrator: str) -> None:
    """Run the graph on the calibration rows, observe each Q/DQ'd activation, set its scale.

    The observed tensors lie upstream of their own QuantizeLinear and depend only on the
    input and the float32 gates, never on another quantized MatMul, so the placeholder
    scales do not affect what is observed.
    """
    from prism_deploy.ort_session import make_session

    observed = sorted(set(lowering.act_scales.values()))
    io = np.dtype(lowering.io_dtype)
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
            rows = data[start:start + CALIB_BATCH_ROWS].astype(io)[None]
            for name, value in zip(observed, sess.run(observed, {"hidden": rows})):
                observers[name].observe(value)
    values = {scale: observers[x].scale() for scale, x in lowering.act_scales.items()}
    for init in model.graph.initializer:
        if init.name in values:
            init.CopyFrom(onnx.numpy_helper.from_array(np.asarray(values[init.name], dtype=lowering.cd), init.name))
