"""The adapter graph: a ``PrismAdapter``'s semantics in standard ONNX ops, per precision.

Graph, for ``hidden`` ``[batch, seq, in_dim]``:

    hidden -> Reshape [T, in_dim] (-> Cast to the compute dtype) = hidden_2d
    per pipe (nodes named "<pipe>/..."):
      ungated: one MatMul on a dense weight (folded with its ungated neighbours in fp32/fp16)
      gated:   gate/MatMul + gate/Add (float32 scores) -> gate/TopK -> gate/Softmax ->
               gate/Mul (gate_scale) -> gate/ScatterElements into gate/ConstantOfShape zeros
               [T, R*C] -> batched MatMul over the tile grid (form A or B below), or only
               the selected tiles (the sparse and grouped forms)
      INT8 ungated with ``ort_nbits``, INT4 ungated: ONNX Runtime's MatMulNBits on the packed weights
      INT4 gated: the tiles packed, dequantized by GatherBlockQuantized (lower/nbits.py)
    combine: Mul by the combine weight (weighted), Sum over pipes -> Cast -> Reshape = adapted

The node count depends on the pipes and the precision, never on the number of workers. The
adapter arrives as numpy arrays (``AdapterTensors``): no PyTorch here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from prism_deploy.core import defaults
from prism_deploy.core.blocks import DeferredTensor, blocks
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.limits import FLOAT16_MAX
from prism_deploy.core.onnx_io import INPUT_NAME, OPSET, OUTPUT_NAME, finalize
from prism_deploy.core.precision import Precision
from prism_deploy.core.tiles import (
    QMAX,
    QMAX_INT4,
    dense_rows,
    pack_int4,
    quantize_with_scales,
    real_blocks,
    row_scales,
)
from prism_deploy.format import AdapterTensors
from prism_deploy.lower.contract import write_metadata
from prism_deploy.lower.graph_writer import DTYPE_NAMES, NP_TO_ONNX, GraphBuilder
from prism_deploy.lower.nbits import MS_DOMAIN, check_int4_applies, int4_gathered, int4_tiles, nbits_applies

GATED_FORMS = ("auto", "A", "B", "sparse", "grouped")
DEFAULT_GATED_FORM = "auto"
# The gated form. A and B compute every worker (the sparse and grouped forms below compute
# only the selected ones), so they differ only in the intermediate they materialise:
#   A: scale the input per row-block by the gates, one MatMul batched over the R row-blocks
#      ([R, T, C*tc] @ [R, C*tc, tr]); the sum over column-blocks happens inside the MatMul's
#      reduction, as in the reference. Intermediate: R * T * C*tc values.
#   B: one MatMul batched over the C column-blocks ([C, T, tc] @ [C, tc, R*tr]), then weight
#      the per-column-block partials by the gates and ReduceSum over C. Intermediate:
#      C * T * R*tr values, plus a separate reduction pass.
# "auto" picks per pipe the form with the smaller intermediate (A when tc <= tr; ties -> A,
# which keeps the reference's summation order), except for int8-qdq, where it always takes B
# (form A would quantize the gate-scaled input g*x, whose values span the gate's whole range),
# and for int4, where it takes the sparse form: A and B dequantize every 4-bit tile on every
# call (lower/nbits.py), the sparse form only the selected ones, and no dense form is folded.
# The measurements behind both rules are in docs/onnx-lowering.md ("Gated pipes: form A and form B").
#   sparse: only the tiles selected by at least one token of the call (the union of the
#      tokens' TopK sets) are gathered, each once, and multiplied; never picked by "auto"
#      (its speed depends on the batch: `build` times it per batch bucket).
#   grouped: tokens grouped by tile: every tile multiplies only the tokens that selected it
#      (padded to the largest group), never all T tokens; for many tokens (same choice rule).


def choose_gated_form(spec: Any, precision: Precision = defaults.PRECISION) -> str:
    """``auto``'s choice for one gated pipe (see above)."""
    if precision is Precision.INT4:
        return "sparse"
    if precision.quantizes_activations:
        return "B"
    R, C = spec.grid
    tr, tc = spec.tile
    return "A" if R * C * tc <= C * R * tr else "B"


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


class AdapterGraphBuilder:
    """Builds the graph for one adapter, precision and io dtype."""

    def __init__(
        self,
        adapter: AdapterTensors,
        precision: Precision,
        io_dtype: str,
        gated_form: str,
        gate_dtype: str = "float32",
        ort_nbits: bool = False,
    ) -> None:
        self.adapter = adapter
        self.config = adapter.config
        self.precision = precision
        self.io_dtype = io_dtype
        self.gated_form = gated_form
        # float16 gates exist only for tools/measure_fp16_gate.py (the measurement behind
        # the float32 choice); exports always use float32 gate scores and Softmax
        self.gate_dtype = np.dtype(gate_dtype)
        self.cd = self.precision.compute_dtype
        self.cd_onnx = NP_TO_ONNX[self.cd]
        self.int8 = self.precision.quantized
        self.qdq = self.precision.quantizes_activations
        self.g = GraphBuilder()
        self.prefixes = pipe_prefixes([p.name for p in self.config.pipes])
        self.pipe_meta: list[dict[str, Any]] = []
        # int8-qdq: scale initializer -> the activation tensor calibration observes for it
        self.act_scales: dict[str, str] = {}
        self.on_pipe: Callable[[int], Any] | None = None  # progress: called with pipes done
        # ONNX Runtime only: INT8 ungated pipes as com.microsoft MatMulNBits (8-bit weights read at
        # their own width; see _ungated_nbits); TensorRT does not know the op
        self.ort_nbits = ort_nbits and self.int8 and not self.qdq
        if self.precision is Precision.INT4:  # int4 exists only in ONNX Runtime's 4-bit ops (lower/nbits.py)
            check_int4_applies(self.config)
            self.ort_nbits = True

    # -- whole graph --------------------------------------------------------------------
    def model(self, *, defer: bool = False) -> onnx.ModelProto:
        """The finalized model. ``defer``: its large weights are left out, in ``self.g.deferred``,
        for ``save_model`` to compute and write a block at a time (``GraphBuilder``); otherwise
        the model is whole."""
        cfg, g = self.config, self.g
        if self.cd == np.float16:
            for i in range(cfg.num_pipes):
                _check_float16_range(f"pipes.{i}.tiles", *_min_max(self.adapter.tiles(i)))
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

        betas = self.adapter.betas()
        outputs: list[str] = []  # [T, out_dim] terms of the final sum, compute dtype
        for run in self._runs():
            if len(run) > 1:
                outputs.append(self._folded_ungated(run, betas))
            else:
                i = run[0]
                out = self._gated(i) if cfg.pipes[i].gated else self._ungated(i)
                if cfg.combine == "weighted":
                    out = g.op("Mul", [out, g.const(f"combine/beta_{i}", betas[i], self.cd)], f"combine/Mul_{i}")
                outputs.append(out)
            if self.on_pipe is not None:
                self.on_pipe(len(run))

        y2 = outputs[0] if len(outputs) == 1 else g.op("Sum", outputs, "combine/Sum")
        if np.dtype(self.io_dtype) != self.cd:
            y2 = g.op("Cast", [y2], "output/Cast", to=io_type)
        y2 = g.op("Slice", [y2, g.ints("output/zero", [0]), self.rows, g.ints("output/axes", [0])], "output/rows")
        out_shape = g.op("Concat", [lead, g.ints("output/out_dim", [cfg.out_dim])], "output/shape", axis=0)
        # allowzero: a 0 in the shape is a dimension of 0 tokens, not "copy the input's"
        g.op("Reshape", [y2, out_shape], "output/Reshape", outputs=[OUTPUT_NAME], allowzero=1)

        graph = g.graph
        graph.name = "prism_adapter"
        graph.input.append(helper.make_tensor_value_info(INPUT_NAME, io_type, ["batch", "seq", cfg.in_dim]))
        graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, io_type, ["batch", "seq", cfg.out_dim]))
        model = g.model  # built in place: make_graph/make_model would copy the weights twice
        model.opset_import.append(helper.make_opsetid("", OPSET))
        if any(n.domain == MS_DOMAIN for n in g.graph.node):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        model.doc_string = (
            f"PRISM adapter {cfg.in_dim} -> {cfg.out_dim}, {cfg.num_pipes} pipe(s), "
            f"precision {self.precision}, lowered by prism-deploy"
        )
        write_metadata(model, self.metadata())
        if not defer:
            g.materialize()
        return finalize(model)

    def _runs(self) -> list[list[int]]:
        """Pipe indices in order, grouped: a run of consecutive ungated pipes is one group
        (folded into one weight) in fp32/fp16; every other pipe is a group of its own."""
        runs: list[list[int]] = []
        for i, spec in enumerate(self.config.pipes):
            prev = runs[-1][-1] if runs else None
            if not self.int8 and not spec.gated and prev is not None and not self.config.pipes[prev].gated:
                runs[-1].append(i)
            else:
                runs.append([i])
        return runs

    def _input(self) -> tuple[str, str]:
        g = self.g
        shape = g.op("Shape", [INPUT_NAME], "input/Shape")
        lead = g.op("Slice", [shape, g.ints("input/zero", [0]), g.ints("input/two", [2])], "input/lead")
        name = "hidden_2d" if np.dtype(self.io_dtype) == self.cd else "hidden_2d_io"
        x2 = g.op("Reshape", [INPUT_NAME, g.ints("input/flat_shape", [-1, self.config.in_dim])], "input/Reshape")
        # Zero tokens are legal input. ONNX Runtime's CPU MatMul with a batch dimension and no
        # rows dies of SIGFPE (and int8's DynamicQuantizeLinear has no range to take), so the
        # graph computes on one row of zeros when there are none and keeps only the real rows
        # at the end (output/rows): for T > 0 the pad is zero rows and the slice keeps all.
        self.rows = g.op(
            "Slice",
            [g.op("Shape", [x2], "input/Shape2d"), g.ints("input/zero_", [0]), g.ints("input/one", [1])],
            "input/rows",
        )
        empty = g.op(
            "Cast",
            [g.op("Equal", [self.rows, g.ints("input/none", [0])], "input/Equal")],
            "input/empty",
            to=TensorProto.INT64,
        )
        pads = g.op(
            "Concat", [g.ints("input/pads_begin", [0, 0]), empty, g.ints("input/pads_col", [0])], "input/pads", axis=0
        )
        x2 = g.op("Pad", [x2, pads], "input/Pad", outputs=[name])
        return x2, lead

    def metadata(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "precision": self.precision.value,
            "io_dtype": self.io_dtype,
            "compute_dtype": self.cd.name,
            "in_dim": cfg.in_dim,
            "out_dim": cfg.out_dim,
            "combine": cfg.combine,
            "gated_form": self.gated_form,
            "hidden_2d": self.x_cd,
            "pipes": self.pipe_meta,
            # what it was lowered from: parity refuses to compare it with another adapter
            "adapter": {"digest": self.adapter.content_digest(), "topology": cfg.topology()},
        }

    def _pipe_entry(self, i: int, **extra: Any) -> dict[str, Any]:
        spec = self.config.pipes[i]
        entry: dict[str, Any] = {
            "index": i,
            "name": spec.name,
            "gated": spec.gated,
            "R": spec.rows,
            "C": spec.cols,
            "tr": spec.tile_rows,
            "tc": spec.tile_cols,
            "top_k": spec.top_k,
            "gate_scale": spec.gate_scale if spec.gated else None,
            "scores": None,
            "output": None,
            "tiles": None,
            "scales": None,
            "dense_weight": None,
            "folded_into": None,
            "form": None,
            "node_prefix": self.prefixes[i],
        }
        entry.update(extra)
        return entry

    # -- weights ------------------------------------------------------------------------
    def _dense_weight_t(self, i: int, dtype: np.dtype | type) -> DeferredTensor:
        """``[in_dim, out_dim]``: pipe ``i``'s tiles permuted into the dense (transposed) matrix
        and cropped to the real dims (``prism_deploy.core.tiles.dense_rows``), a row-block at a
        time when it is written; the tiles themselves are only viewed."""
        spec, cfg = self.config.pipes[i], self.config
        tiles = self.adapter.tiles(i)
        return DeferredTensor(
            (cfg.in_dim, cfg.out_dim),
            np.dtype(dtype),
            lambda a, b: dense_rows(tiles, spec.grid, spec.tile, a, b, crop=(cfg.out_dim, cfg.in_dim), dtype=dtype),
        )

    def _tiles_in_storage_order(self, i: int) -> tuple[str, str | None, str]:
        """The tile initializer in storage order -> (tiles name, scales name, compute-dtype
        tensor ``[R*C, tr, tc]``). INT8 tiles are dequantized in the graph (per axis, on the
        tiles flattened to ``[R*C*tr, tc]``, axis 0: one scale per tile row). INT4 tiles are
        gathered whole and dequantized by ``GatherBlockQuantized`` on every call (lower/nbits.py)."""
        g, p = self.g, self.prefixes[i]
        spec = self.config.pipes[i]
        W, (tr, tc) = spec.workers, spec.tile
        source, cd = self.adapter.tiles(i), self.cd
        if self.precision is Precision.INT4:
            tiles, scale_name = int4_tiles(g, p, spec, source)
            every = g.initializer(f"{p}tiles/every", np.arange(W, dtype=np.int64))
            deq = int4_gathered(g, p, spec, tiles, scale_name, every)  # [W, tr, tc] float32
            return tiles, scale_name, g.op("Cast", [deq], f"{p}tiles/Cast", to=self.cd_onnx)
        if not self.int8:
            tiles = g.initializer(
                f"{p}tiles", DeferredTensor((W, tr, tc), cd, lambda a, b: np.ascontiguousarray(source[a:b], dtype=cd))
            )
            return tiles, None, tiles
        # quantize_rows, split: the scales (4 bytes per tile row) in one pass now, the int8
        # values a block of tile rows at a time when they are written
        rows = source.reshape(W * tr, tc)
        scales = row_scales(rows)
        tiles = g.initializer(
            f"{p}tiles",
            DeferredTensor((W * tr, tc), np.dtype(np.int8), lambda a, b: quantize_with_scales(rows[a:b], scales[a:b])),
        )
        scale_name = g.initializer(f"{p}tiles/scales", scales)
        deq = g.op(
            "DequantizeLinear",
            [tiles, scale_name, g.const(f"{p}tiles/zero_point", np.zeros(W * tr), np.int8)],
            f"{p}tiles/DequantizeLinear",
            axis=0,
        )
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
        spec = self.config.pipes[i]
        cfg = self.config
        if not self.int8:
            w = g.initializer(f"{p}weight", self._dense_weight_t(i, self.cd))
            x = self.x_cd
            out = g.op("MatMul", [x, w], f"{p}MatMul", outputs=[f"{p}output"])
            self.pipe_meta.append(self._pipe_entry(i, output=out, dense_weight=w))
            return out
        if self.ort_nbits and nbits_applies(spec):
            return self._ungated_nbits(i)
        (R, C), (tr, tc) = spec.grid, spec.tile
        tiles, scales, t3 = self._tiles_in_storage_order(i)
        t4 = g.op("Reshape", [t3, g.ints(f"{p}weight/shape4", [R, C, tr, tc])], f"{p}weight/Reshape4")
        tt = g.op("Transpose", [t4], f"{p}weight/Transpose", perm=[1, 3, 0, 2])  # [C, tc, R, tr]
        dense = g.op("Reshape", [tt, g.ints(f"{p}weight/shape2", [C * tc, R * tr])], f"{p}weight/Reshape2")
        w = g.op(
            "Slice",
            [dense, g.ints(f"{p}weight/starts", [0, 0]), g.ints(f"{p}weight/ends", [cfg.in_dim, cfg.out_dim])],
            f"{p}weight/Slice",
        )
        x = self._act_qdq(self.x_cd, f"{p}input/")
        out = g.op("MatMul", [x, w], f"{p}MatMul", outputs=[f"{p}output"])
        self.pipe_meta.append(self._pipe_entry(i, output=out, tiles=tiles, scales=scales))
        return out

    def _ungated_nbits(self, i: int) -> str:
        """INT8/INT4 ungated pipe as ONNX Runtime's ``MatMulNBits`` (bits 8 or 4, blocks of ``tc``
        along K): the weights stay 8-bit (4-bit) where the product reads them.

        The same int8 values and scales as the DequantizeLinear path (``quantize_rows``): block
        ``c`` of output ``n`` is tile ``(n // tr, c)``'s row ``n % tr``, stored as ``q + 128``
        (MatMulNBits' default zero point for 8 bits). ``accuracy_level`` 4 runs ONNX Runtime's
        int8 CPU kernel, which also quantizes the input per block to int8 (the other levels take
        a slow path on CPU; docs/onnx-lowering.md has the figures and the error). INT4: symmetric
        round-to-nearest codes ``-7..7`` (scale ``max|row| / 7``), stored as ``q + 8`` two to a
        byte, the even element in the low nibble (MatMulNBits' layout and 4-bit zero point).
        """
        g, p = self.g, self.prefixes[i]
        spec, cfg = self.config.pipes[i], self.config
        (R, C), (tr, tc) = spec.grid, spec.tile
        W = spec.workers
        bits = self.precision.bits or 8
        qmax = QMAX_INT4 if bits == 4 else QMAX
        rows = self.adapter.tiles(i).reshape(W * tr, tc)
        scales = row_scales(rows, qmax)
        q = quantize_with_scales(rows, scales, qmax).reshape(R, C, tr, tc)
        n_blocks = real_blocks(cfg.in_dim, tc)
        # [R, C, tr, tc] -> [R, tr, C, tc] -> [R*tr, C, tc]: output row n, block c
        codes = q.transpose(0, 2, 1, 3).reshape(R * tr, C, tc)[: cfg.out_dim, :n_blocks]
        packed = (codes.astype(np.int16) + 128).astype(np.uint8) if bits == 8 else pack_int4(codes)
        block_scales = scales.reshape(R, C, tr).transpose(0, 2, 1).reshape(R * tr, C)[: cfg.out_dim, :n_blocks]
        w = g.initializer(f"{p}nbits/weight", np.ascontiguousarray(packed))
        s = g.initializer(f"{p}nbits/scales", np.ascontiguousarray(block_scales.reshape(-1), dtype=np.float32))
        y = g.op(
            "MatMulNBits",
            [self.x_f32, w, s],
            f"{p}MatMulNBits",
            domain=MS_DOMAIN,
            K=cfg.in_dim,
            N=cfg.out_dim,
            bits=bits,
            block_size=tc,
            accuracy_level=4,
        )
        out = (
            y
            if self.cd == np.float32
            else g.op("Cast", [y], f"{p}output/Cast", to=self.cd_onnx, outputs=[f"{p}output"])
        )
        self.pipe_meta.append(self._pipe_entry(i, output=out, nbits_weight=w, nbits_scales=s))
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
        prefix = f"fold{run[0]}/"
        parts = [(np.float32(betas[i]), self._dense_weight_t(i, np.float32)) for i in run]
        cd = self.cd

        def rows(a: int, b: int) -> np.ndarray:
            acc = np.zeros((b - a, self.config.out_dim), dtype=np.float32)
            for beta, weight in parts:  # in pipe order: the same float32 sums whatever the blocks
                acc += beta * weight.rows(a, b)
            if cd == np.float16:  # checked as it is written (the whole weight is never held)
                _check_float16_range(f"the folded weight of pipes {run}", float(acc.min()), float(acc.max()))
            return acc.astype(cd, copy=False)

        w = g.initializer(
            f"{prefix}weight", DeferredTensor((self.config.in_dim, self.config.out_dim), np.dtype(cd), rows)
        )
        out = g.op("MatMul", [self.x_cd, w], f"{prefix}MatMul", outputs=[f"{prefix}output"])
        for i in run:
            self.pipe_meta.append(self._pipe_entry(i, dense_weight=w, folded_into=prefix))
        return out

    # -- gated --------------------------------------------------------------------------
    def _gate(self, i: int) -> tuple[str, str, str]:
        """float32 scores -> TopK -> Softmax -> * gate_scale -> scattered into zeros [T, R*C].

        Scores and Softmax stay float32 in every precision (docs/onnx-lowering.md: float16
        scores flip TopK selections far more often than float32 rounding does, and the gate
        is a small part of the work). Returns (scores, indices, dense gates in compute dtype).
        """
        g, p = self.g, self.prefixes[i]
        spec = self.config.pipes[i]
        gate = self.adapter.gate(i)
        assert gate is not None and spec.top_k is not None
        gd = self.gate_dtype
        gw = gate[0]
        wt = g.initializer(
            f"{p}gate/weight_t",
            DeferredTensor(  # [in_dim, W]: read a block of columns at a time
                (self.config.in_dim, spec.workers),
                gd,
                lambda a, b: np.ascontiguousarray(np.asarray(gw[:, a:b], dtype=np.float32).T, dtype=gd),
            ),
        )
        b = g.initializer(f"{p}gate/bias", np.asarray(gate[1], dtype=np.float32).astype(gd))
        if gd == np.float32:
            mm = g.op("MatMul", [self.x_f32, wt], f"{p}gate/MatMul")
            scores = g.op("Add", [mm, b], f"{p}gate/Add", outputs=[f"{p}gate/scores"])
        else:  # measurement only: float16 scores, widened afterwards (TopK order unchanged)
            x16 = (
                self.x_cd
                if self.cd == np.float16
                else g.op("Cast", [self.x_cd], f"{p}gate/Cast16", to=TensorProto.FLOAT16)
            )
            mm = g.op("MatMul", [x16, wt], f"{p}gate/MatMul")
            s16 = g.op("Add", [mm, b], f"{p}gate/Add")
            scores = g.op("Cast", [s16], f"{p}gate/CastScores", to=TensorProto.FLOAT)
        values, indices = g.op(
            "TopK",
            [scores, g.ints(f"{p}gate/k", [spec.top_k])],
            f"{p}gate/TopK",
            outputs=[f"{p}gate/topk_values", f"{p}gate/topk_indices"],
            axis=-1,
            largest=1,
            sorted=1,
        )
        soft = g.op("Softmax", [values], f"{p}gate/Softmax", axis=-1)
        weights = g.op(
            "Mul",
            [soft, g.const(f"{p}gate/scale", spec.gate_scale, np.float32)],
            f"{p}gate/Mul",
            outputs=[f"{p}gate/weights"],
        )
        shape = g.op("Shape", [scores], f"{p}gate/Shape")
        zeros = g.op(
            "ConstantOfShape",
            [shape],
            f"{p}gate/ConstantOfShape",
            value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0]),
        )
        # no reduction: indices are distinct (TopK), and reduction="add" fails in float16 on ORT
        dense = g.op(
            "ScatterElements", [zeros, indices, weights], f"{p}gate/ScatterElements", outputs=[f"{p}gate/dense"], axis=1
        )
        if self.cd != np.float32:
            dense = g.op("Cast", [dense], f"{p}gate/Cast", to=self.cd_onnx)
        return scores, indices, dense

    def _gated(self, i: int) -> str:
        g, p = self.g, self.prefixes[i]
        spec = self.config.pipes[i]
        cfg = self.config
        (R, C), (tr, tc) = spec.grid, spec.tile
        form = self.gated_form if self.gated_form != "auto" else choose_gated_form(spec, self.precision)
        if form == "sparse":
            return self._gated_sparse(i)
        if form == "grouped":
            return self._gated_grouped(i)
        scores, _, gates = self._gate(i)
        tiles, scales, t3 = self._tiles_in_storage_order(i)
        # zero-pad the input to C*tc (always present, a no-op when C*tc == in_dim, so that
        # the node count never depends on the grid)
        xp = g.op("Pad", [self.x_cd, g.ints(f"{p}pad/pads", [0, 0, 0, spec.padded_in - cfg.in_dim])], f"{p}Pad")
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
            y = g.op(
                "ReduceSum", [weighted, g.ints(f"{p}partials/axes", [0])], f"{p}partials/ReduceSum", keepdims=0
            )  # [T, R, tr]
        out = self._pipe_rows(p, y, R * tr)
        self.pipe_meta.append(self._pipe_entry(i, scores=scores, output=out, tiles=tiles, scales=scales, form=form))
        return out

    def _pipe_rows(self, p: str, y: str, rows: int) -> str:
        """A gated pipe's ``[T, R, tr]`` partial sums as ``[T, out_dim]``: the tile rows flattened,
        the padding rows cut off (every gated form ends so)."""
        g = self.g
        y = g.op("Reshape", [y, g.ints(f"{p}output/shape", [-1, rows])], f"{p}output/Reshape")
        starts, ends = g.ints(f"{p}output/starts", [0]), g.ints(f"{p}output/ends", [self.config.out_dim])
        axes = g.ints(f"{p}output/axes", [1])
        return g.op("Slice", [y, starts, ends, axes], f"{p}output/Slice", outputs=[f"{p}output"])

    def _gated_sparse(self, i: int) -> str:
        """Only the selected tiles: the union ``S`` of the tokens' TopK sets, each tile read once.

        The tiles stay in storage order ``[R*C, tr, tc]``: each worker's tile is one contiguous
        block, so Gather copies whole blocks, and the product is taken as ``tile @ x_c^T``
        (``[n, tr, tc] @ [n, tc, T]``) so that no gathered tile is transposed. INT8 tiles are
        gathered as int8 with their per-row scales and dequantized after the gather (the same
        float32 ``q * s`` then cast as DequantizeLinear + Cast in forms A and B).

        Summation order: each tile's product sums over its ``tc`` columns (in the MatMul's
        reduction), then a second MatMul ``[T, R, n] @ [T, n, tr]`` sums the selected tiles of
        each row-block, weighted by their gates (the coefficient is the gate for the tile's own
        row-block and an exact 0 otherwise). That is form B's order (per-tile partial sums,
        then a sum over column blocks), over the selected tiles only: the unselected tiles'
        terms that A and B add are exact zeros.
        """
        g, p = self.g, self.prefixes[i]
        spec = self.config.pipes[i]
        cfg = self.config
        (R, C), (tr, tc) = spec.grid, spec.tile
        scores, indices, gates = self._gate(i)
        # the union of the selections: a [W] mask from TopK's indices, then its nonzero positions
        ones = g.op(
            "ConstantOfShape",
            [g.op("Shape", [indices], f"{p}select/ShapeK")],
            f"{p}select/Ones",
            value=helper.make_tensor("value", TensorProto.FLOAT, [1], [1.0]),
        )
        zeros = g.op(
            "ConstantOfShape",
            [g.op("Shape", [scores], f"{p}select/Shape")],
            f"{p}select/Zeros",
            value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0]),
        )
        hits = g.op("ScatterElements", [zeros, indices, ones], f"{p}select/ScatterElements", axis=1)  # [T, W]
        mask = g.op("ReduceMax", [hits, g.ints(f"{p}select/axes", [0])], f"{p}select/ReduceMax", keepdims=0)
        sel = g.op(
            "Reshape",
            [g.op("NonZero", [mask], f"{p}select/NonZero"), g.ints(f"{p}select/flat", [-1])],
            f"{p}select/indices",
        )  # [n], ascending worker index
        # weight-only INT8 / INT4: the gathered tiles multiply in float32; INT8's row scales
        # apply to the [n, tr, T] products (one pass over the gathered tiles, not three), INT4's
        # tiles arrive dequantized (GatherBlockQuantized)
        in_f32 = self.int8 and not self.qdq
        scaled_after = in_f32 and self.precision is not Precision.INT4
        tiles, scales, t3 = self._tiles_gathered(i, sel, scaled_after)  # [n, tr, tc]
        # the input column block of each selected tile: x as [C, T, tc], gathered by c = w % C
        x_in = self.x_f32 if in_f32 else self.x_cd
        xp = g.op("Pad", [x_in, g.ints(f"{p}pad/pads", [0, 0, 0, spec.padded_in - cfg.in_dim])], f"{p}Pad")
        xq = self._act_qdq(xp, f"{p}input/")
        x3 = g.op("Reshape", [xq, g.ints(f"{p}input/shape", [-1, C, tc])], f"{p}input/Reshape")
        xt = g.op("Transpose", [x3], f"{p}input/Transpose", perm=[1, 2, 0])  # [C, tc, T]
        col = g.op("Mod", [sel, g.ints(f"{p}select/C", [C])], f"{p}select/col")
        row = g.op("Div", [sel, g.ints(f"{p}select/C_", [C])], f"{p}select/row")
        xs = g.op("Gather", [xt, col], f"{p}input/Gather", axis=0)  # [n, tc, T]
        part = g.op("MatMul", [t3, xs], f"{p}MatMul")  # [n, tr, T]
        if scaled_after:
            assert scales is not None  # int8 tiles always have their row scales
            s = g.op(
                "Gather",
                [
                    g.op(
                        "Reshape",
                        [scales, g.ints(f"{p}tiles/scale_shape", [spec.workers, tr, 1])],
                        f"{p}tiles/ReshapeScales",
                    ),
                    sel,
                ],
                f"{p}tiles/GatherScales",
                axis=0,
            )
            part = g.op("Mul", [part, s], f"{p}partials/Scale")  # [n, tr, T] * [n, tr, 1]
        if in_f32 and self.cd != np.float32:
            part = g.op("Cast", [part], f"{p}partials/Cast", to=self.cd_onnx)
        part = g.op("Transpose", [part], f"{p}partials/Transpose", perm=[2, 0, 1])  # [T, n, tr]
        # coefficients [T, R, n]: the tile's gate where R is its row-block, 0 elsewhere
        gsel = g.op("Gather", [gates, sel], f"{p}gates/Gather", axis=1)  # [T, n]
        gsel = g.op("Unsqueeze", [gsel, g.ints(f"{p}gates/axes", [1])], f"{p}gates/Unsqueeze")  # [T, 1, n]
        rows_r = g.ints(f"{p}select/rows", list(range(R)))
        onehot = g.op(
            "Equal",
            [
                g.op("Unsqueeze", [row, g.ints(f"{p}select/axes0", [0])], f"{p}select/Unsqueeze"),
                g.op("Unsqueeze", [rows_r, g.ints(f"{p}select/axes1", [1])], f"{p}select/Unsqueeze_"),
            ],
            f"{p}select/Equal",
        )  # [R, n]
        onehot = g.op("Cast", [onehot], f"{p}select/onehot", to=self.cd_onnx)
        coef = g.op("Mul", [gsel, onehot], f"{p}gates/Mul")  # [T, R, n]
        y = g.op("MatMul", [coef, part], f"{p}partials/MatMul")  # [T, R, tr]
        out = self._pipe_rows(p, y, R * tr)
        self.pipe_meta.append(self._pipe_entry(i, scores=scores, output=out, tiles=tiles, scales=scales, form="sparse"))
        return out

    def _gated_grouped(self, i: int) -> str:
        """Tokens grouped by tile: tile ``w`` multiplies only the ``m_w`` tokens that selected it,
        as one batched MatMul over all tiles with every group padded to the largest, ``m``
        (padding rows are a zero token). Work ``R*C * m`` token-tile products instead of A's and
        B's ``R*C * T``: for T tokens of top-k over R*C workers, ``m`` is about ``T*k/(R*C)`` plus
        its spread. No tile is gathered (at many tokens nearly every tile is selected, and a
        Gather would copy them all); the tiles are the storage-order initializer, transposed
        per tile in the graph (ONNX Runtime folds that constant when the session opens).

        Table: position of token t in tile w's group = exclusive CumSum over tokens of the
        selection mask; ScatterND writes t at [w, position] into a [R*C, m] table filled with
        T (the zero row). Back to tokens: each (t, j) selection gathers its product row at
        ``w * m + position``, and a MatMul ``[T, R, k] @ [T, k, tr]`` sums each row-block's
        selections weighted by their gates (the coefficient is 0 for another row-block).
        Summation order: per-tile partial sums over ``tc`` (in the MatMul), then a sum over the
        token's selected tiles of each row-block in TopK's order (scores descending), in the
        second MatMul's reduction: form B's rule, over the selected tiles only.
        """
        g, p = self.g, self.prefixes[i]
        spec = self.config.pipes[i]
        cfg = self.config
        (R, C), (tr, tc) = spec.grid, spec.tile
        W = spec.workers
        scores, indices, _ = self._gate(i)
        weights = f"{p}gate/weights"  # [T, k] float32, the gates of the selected tiles
        tiles, scales, t3 = self._tiles_in_storage_order(i)
        wt = g.op("Transpose", [t3], f"{p}tiles/Transpose", perm=[0, 2, 1])  # [W, tc, tr]
        one_f = helper.make_tensor("value", TensorProto.FLOAT, [1], [1.0])
        hits = g.op(
            "ScatterElements",
            [
                g.op(
                    "ConstantOfShape",
                    [g.op("Shape", [scores], f"{p}group/Shape")],
                    f"{p}group/Zeros",
                    value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0]),
                ),
                indices,
                g.op("ConstantOfShape", [g.op("Shape", [indices], f"{p}group/ShapeK")], f"{p}group/Ones", value=one_f),
            ],
            f"{p}group/hits",
            axis=1,
        )  # [T, W]
        pos = g.op(
            "Cast",
            [g.op("CumSum", [hits, g.ints(f"{p}group/axis0", [0])], f"{p}group/CumSum", exclusive=1)],
            f"{p}group/pos",
            to=TensorProto.INT64,
        )  # [T, W]
        m = g.op(
            "Cast",
            [
                g.op(
                    "ReduceMax",
                    [g.op("ReduceSum", [hits, g.ints(f"{p}group/axes0", [0])], f"{p}group/counts", keepdims=0)],
                    f"{p}group/m_f",
                    keepdims=1,
                )
            ],
            f"{p}group/m",
            to=TensorProto.INT64,
        )  # [1]
        # T here counts the rows the gate saw (one zero row when the call has no tokens)
        shape_k = g.op("Shape", [indices], f"{p}group/ShapeK2")
        rows = g.op("Slice", [shape_k, g.ints(f"{p}group/s0", [0]), g.ints(f"{p}group/s1", [1])], f"{p}group/T")
        table = g.op(
            "ConstantOfShape",
            [g.op("Concat", [g.ints(f"{p}group/W", [W]), m], f"{p}group/table_shape", axis=0)],
            f"{p}group/table0",
            value=helper.make_tensor("value", TensorProto.INT64, [1], [0]),
        )
        table = g.op("Add", [table, rows], f"{p}group/table_T")  # [W, m] filled with T (the zero row)
        tpos = g.op("GatherElements", [pos, indices], f"{p}group/tpos", axis=1)  # [T, k]
        token_ids = g.op(
            "Range",
            [
                g.const(f"{p}group/zero_s", 0, np.int64),
                g.op("Squeeze", [rows], f"{p}group/T_s"),
                g.const(f"{p}group/one_s", 1, np.int64),
            ],
            f"{p}group/Range",
        )  # [T]
        tok = g.op(
            "Expand",
            [g.op("Unsqueeze", [token_ids, g.ints(f"{p}group/axes1", [1])], f"{p}group/tok1"), shape_k],
            f"{p}group/tok",
        )  # [T, k]
        where = g.op(
            "Concat",
            [
                g.op("Unsqueeze", [indices, g.ints(f"{p}group/axes_l", [2])], f"{p}group/w3"),
                g.op("Unsqueeze", [tpos, g.ints(f"{p}group/axes_l2", [2])], f"{p}group/p3"),
            ],
            f"{p}group/where",
            axis=2,
        )  # [T, k, 2]
        table = g.op("ScatterND", [table, where, tok], f"{p}group/table")  # [W, m] token per slot
        # inputs: x padded to C*tc, one zero row appended (index T), as [T+1, C, tc]
        xp = g.op("Pad", [self.x_cd, g.ints(f"{p}pad/pads", [0, 0, 1, spec.padded_in - cfg.in_dim])], f"{p}Pad")
        xq = self._act_qdq(xp, f"{p}input/")
        x3 = g.op("Reshape", [xq, g.ints(f"{p}input/shape", [-1, C, tc])], f"{p}input/Reshape")
        colw = g.initializer(f"{p}group/col_of_worker", np.array([[w % C] for w in range(W)], dtype=np.int64))
        col = g.op("Expand", [colw, g.op("Shape", [table], f"{p}group/ShapeTable2")], f"{p}group/col")  # [W, m]
        nd = g.op(
            "Concat",
            [
                g.op("Unsqueeze", [table, g.ints(f"{p}group/axes_t", [2])], f"{p}group/t3"),
                g.op("Unsqueeze", [col, g.ints(f"{p}group/axes_c", [2])], f"{p}group/c3"),
            ],
            f"{p}group/nd",
            axis=2,
        )  # [W, m, 2]
        xg = g.op("GatherND", [x3, nd], f"{p}input/GatherND")  # [W, m, tc]
        part = g.op("MatMul", [xg, wt], f"{p}MatMul")  # [W, m, tr]
        flat = g.op("Reshape", [part, g.ints(f"{p}partials/flat", [-1, tr])], f"{p}partials/Reshape")
        slot = g.op("Add", [g.op("Mul", [indices, m], f"{p}group/slot_w"), tpos], f"{p}group/slot")  # [T, k]
        mine = g.op("Gather", [flat, slot], f"{p}partials/Gather", axis=0)  # [T, k, tr]
        roww = g.op("Div", [indices, g.ints(f"{p}group/C", [C])], f"{p}group/row")  # [T, k]
        onehot = g.op(
            "Cast",
            [
                g.op(
                    "Equal",
                    [
                        g.op("Unsqueeze", [roww, g.ints(f"{p}group/axes_r", [1])], f"{p}group/row3"),
                        g.initializer(f"{p}group/row_ids", np.arange(R, dtype=np.int64).reshape(1, R, 1)),
                    ],
                    f"{p}group/Equal",
                )
            ],
            f"{p}group/onehot",
            to=self.cd_onnx,
        )  # [T, R, k]
        gw = weights if self.cd == np.float32 else g.op("Cast", [weights], f"{p}gates/Cast", to=self.cd_onnx)
        coef = g.op(
            "Mul",
            [onehot, g.op("Unsqueeze", [gw, g.ints(f"{p}gates/axes", [1])], f"{p}gates/Unsqueeze")],
            f"{p}gates/Mul",
        )  # [T, R, k]
        y = g.op("MatMul", [coef, mine], f"{p}partials/MatMul")  # [T, R, tr]
        out = self._pipe_rows(p, y, R * tr)
        self.pipe_meta.append(
            self._pipe_entry(i, scores=scores, output=out, tiles=tiles, scales=scales, form="grouped")
        )
        return out

    def _tiles_gathered(self, i: int, sel: str, scaled_after: bool = False) -> tuple[str, str | None, str]:
        """The selected tiles ``[n, tr, tc]`` in the compute dtype, gathered from the storage-order
        initializer (``_tiles_in_storage_order``'s, which stays the contract's ``tiles``).
        INT8: gathered at 1 byte a value, dequantized after the gather; with ``scaled_after``
        only cast to float32 (the caller applies the row scales to the products). INT4: gathered
        at half a byte a value and dequantized in the same op, float32 (lower/nbits.py)."""
        g, p = self.g, self.prefixes[i]
        spec = self.config.pipes[i]
        W, (tr, tc) = spec.workers, spec.tile
        source, cd = self.adapter.tiles(i), self.cd
        if self.precision is Precision.INT4:
            tiles, scale_name = int4_tiles(g, p, spec, source)
            return tiles, scale_name, int4_gathered(g, p, spec, tiles, scale_name, sel)
        if not self.int8:
            tiles = g.initializer(
                f"{p}tiles", DeferredTensor((W, tr, tc), cd, lambda a, b: np.ascontiguousarray(source[a:b], dtype=cd))
            )
            return tiles, None, g.op("Gather", [tiles, sel], f"{p}tiles/Gather", axis=0)
        rows = source.reshape(W * tr, tc)
        scales = row_scales(rows)
        # the contract's shapes ([R*C*tr, tc] int8, [R*C*tr] float32); the graph views them per worker
        tiles = g.initializer(
            f"{p}tiles",
            DeferredTensor((W * tr, tc), np.dtype(np.int8), lambda a, b: quantize_with_scales(rows[a:b], scales[a:b])),
        )
        scale_name = g.initializer(f"{p}tiles/scales", scales)
        q = g.op(
            "Gather",
            [g.op("Reshape", [tiles, g.ints(f"{p}tiles/shape", [W, tr, tc])], f"{p}tiles/Reshape"), sel],
            f"{p}tiles/Gather",
            axis=0,
        )  # [n, tr, tc] int8
        if scaled_after:
            return tiles, scale_name, g.op("Cast", [q], f"{p}tiles/CastQ", to=TensorProto.FLOAT)
        s = g.op(
            "Gather",
            [
                g.op("Reshape", [scale_name, g.ints(f"{p}tiles/scale_shape", [W, tr, 1])], f"{p}tiles/ReshapeScales"),
                sel,
            ],
            f"{p}tiles/GatherScales",
            axis=0,
        )  # [n, tr, 1]
        deq = g.op("Mul", [g.op("Cast", [q], f"{p}tiles/CastQ", to=TensorProto.FLOAT), s], f"{p}tiles/Dequantize")
        if self.cd != np.float32:
            deq = g.op("Cast", [deq], f"{p}tiles/Cast", to=self.cd_onnx)
        return tiles, scale_name, deq


def _check_float16_range(what: str, lo: float, hi: float) -> None:
    """float16 graphs hold the weights in float16: values past 65504 would become inf."""
    if max(abs(lo), abs(hi)) > FLOAT16_MAX:
        raise PrismInputError(
            f"{what}: values up to {max(abs(lo), abs(hi)):.4g} exceed the float16 range (65504); use --precision fp32"
        )


def _min_max(a: np.ndarray) -> tuple[float, float]:
    """Smallest and largest value, a slice at a time (bfloat16 widened only a slice at a time)."""
    lo, hi = np.inf, -np.inf
    for block in blocks(a):
        chunk = np.asarray(block, dtype=np.float32)
        lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
    return lo, hi
