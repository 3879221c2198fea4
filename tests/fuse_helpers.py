"""A small stand-in for the lowering (issue 3) that writes graphs following its metadata
contract, so the fusion pass is tested before ``prism_deploy.lower`` is on main. It lowers gated
pipes in the masked "form A" (gates scale the input per row-block, one batched MatMul), and
ungated pipes as one MatMul, with node names ``<prefix>...`` as the contract says.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from prism_deploy.core.onnx_io import finalize
from prism_deploy.reference import PrismAdapter

NP = {"float32": np.float32, "float16": np.float16}
TP = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


def quantize_rows(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per tile row: ``[W, tr, tc]`` -> (q int8, scales float32 ``[W, tr]``)."""
    amax = np.abs(tiles).max(axis=2)
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(tiles / scales[..., None]), -127, 127).astype(np.int8)
    return q, scales


def dequantized_adapter(adapter: PrismAdapter) -> PrismAdapter:
    """The adapter whose tiles are exactly what int8 weights with row scales represent."""
    tensors = {k: v.clone() for k, v in adapter.tensors().items()}
    for i, _ in enumerate(adapter.config.pipes):
        q, s = quantize_rows(tensors[f"pipes.{i}.tiles"].float().numpy())
        tensors[f"pipes.{i}.tiles"] = torch.from_numpy(q.astype(np.float32) * s[..., None])
    return PrismAdapter(adapter.config, tensors)


def contract_model(adapter: PrismAdapter, precision: str = "fp32") -> onnx.ModelProto:
    cfg = adapter.config
    compute = "float32" if precision == "fp32" else "float16"
    cd, ct = NP[compute], TP[compute]
    nodes, inits = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(kind, inputs, name, outputs=None, **attrs):
        outs = outputs or [f"{name}_out"]
        nodes.append(helper.make_node(kind, inputs, outs, name=name, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def ints(name, values):
        return init(name, np.asarray(values, np.int64))

    hidden_2d = "hidden_2d"
    if compute == "float32":
        op("Identity", ["hidden"], "input/Identity", outputs=[hidden_2d])
        x_f32 = hidden_2d
    else:
        op("Cast", ["hidden"], "input/Cast", outputs=[hidden_2d], to=ct)
        x_f32 = "hidden"
    pipes_meta, terms = [], []
    for i, pipe in enumerate(adapter.pipe_list()):
        spec = pipe.spec
        p = f"{spec.name}/"
        (R, C), (tr, tc) = spec.grid, spec.tile
        W = R * C
        t = pipe.tiles.detach().float().numpy()
        scales_name = None
        if precision == "int8":
            q, s = quantize_rows(t)
            tiles_name = init(f"{p}tiles", q.reshape(W * tr, tc))
            scales_name = init(f"{p}tiles/scales", s.reshape(W * tr))
            zp = init(f"{p}tiles/zero_point", np.zeros(W * tr, np.int8))
            deq = op("DequantizeLinear", [tiles_name, scales_name, zp], f"{p}tiles/DequantizeLinear", axis=0)
            deq = op("Cast", [deq], f"{p}tiles/Cast", to=ct)
            t3 = op("Reshape", [deq, ints(f"{p}tiles/shape", [W, tr, tc])], f"{p}tiles/Reshape")
        else:
            tiles_name = init(f"{p}tiles", t.astype(cd))
            t3 = tiles_name
        entry = {"index": i, "name": spec.name, "gated": spec.gated, "R": R, "C": C, "tr": tr, "tc": tc,
                 "top_k": spec.top_k, "gate_scale": spec.gate_scale if spec.gated else None,
                 "scores": None, "output": None, "tiles": tiles_name, "scales": scales_name, "node_prefix": p}
        xp = op("Pad", [hidden_2d, ints(f"{p}pad/pads", [0, 0, 0, spec.padded_in - cfg.in_dim])], f"{p}Pad")
        t4 = op("Reshape", [t3, ints(f"{p}tiles/shape4", [R, C, tr, tc])], f"{p}tiles/Reshape4")
        if spec.gated:
            wt = op("Transpose", [t4], f"{p}tiles/Transpose", perm=[0, 1, 3, 2])
            w = op("Reshape", [wt, ints(f"{p}tiles/shapeA", [R, C * tc, tr])], f"{p}tiles/ReshapeA")
            gw = init(f"{p}gate/weight_t", pipe.gate.weight.detach().float().numpy().T.copy())
            gb = init(f"{p}gate/bias", pipe.gate.bias.detach().float().numpy())
            mm = op("MatMul", [x_f32, gw], f"{p}gate/MatMul")
            scores = op("Add", [mm, gb], f"{p}gate/Add", outputs=[f"{p}gate/scores"])
            vals, idx = op("TopK", [scores, ints(f"{p}gate/k", [spec.top_k])], f"{p}gate/TopK",
                           outputs=[f"{p}gate/v", f"{p}gate/i"], axis=-1, largest=1, sorted=1)
            soft = op("Softmax", [vals], f"{p}gate/Softmax", axis=-1)
            wts = op("Mul", [soft, init(f"{p}gate/scale", np.array(spec.gate_scale, np.float32))], f"{p}gate/Mul")
            zeros = op("ConstantOfShape", [op("Shape", [scores], f"{p}gate/Shape")], f"{p}gate/ConstantOfShape",
                       value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0]))
            dense = op("ScatterElements", [zeros, idx, wts], f"{p}gate/ScatterElements", axis=1)
            if compute != "float32":
                dense = op("Cast", [dense], f"{p}gate/Cast", to=ct)
            g3 = op("Reshape", [dense, ints(f"{p}gates/shape", [-1, R, C])], f"{p}gates/Reshape")
            g4 = op("Unsqueeze", [op("Transpose", [g3], f"{p}gates/Transpose", perm=[1, 0, 2]),
                                  ints(f"{p}gates/axes", [3])], f"{p}gates/Unsqueeze")
            x4 = op("Reshape", [xp, ints(f"{p}input/shape", [1, -1, C, tc])], f"{p}input/Reshape")
            scaled = op("Reshape", [op("Mul", [g4, x4], f"{p}input/Mul"), ints(f"{p}input/shapeA", [R, -1, C * tc])],
                        f"{p}input/ReshapeA")
            y = op("Transpose", [op("MatMul", [scaled, w], f"{p}MatMul")], f"{p}output/Transpose", perm=[1, 0, 2])
            entry["scores"] = scores
        else:
            # ungated: x [T, C*tc] @ the tiles as [C*tc, R*tr]
            wd = op("Reshape", [op("Transpose", [t4], f"{p}tiles/TransposeD", perm=[1, 3, 0, 2]),
                                ints(f"{p}tiles/shapeD", [C * tc, R * tr])], f"{p}tiles/ReshapeD")
            y = op("MatMul", [xp, wd], f"{p}MatMul")
        y = op("Reshape", [y, ints(f"{p}output/shape", [-1, R * tr])], f"{p}output/Reshape")
        out = op("Slice", [y, ints(f"{p}output/starts", [0]), ints(f"{p}output/ends", [cfg.out_dim]),
                           ints(f"{p}output/axes", [1])], f"{p}output/Slice", outputs=[f"{p}output"])
        entry["output"] = out
        pipes_meta.append(entry)
        beta = adapter.betas(torch.float64)[i].item()
        terms.append(op("Mul", [out, init(f"combine/beta_{i}", np.array(beta, cd))], f"combine/Mul_{i}"))
    y2 = terms[0] if len(terms) == 1 else op("Sum", terms, "combine/Sum")
    if compute != "float32":
        y2 = op("Cast", [y2], "output/Cast", to=TensorProto.FLOAT)
    op("Identity", [y2], "output/Identity", outputs=["adapted"])
    graph = helper.make_graph(
        nodes, "prism_adapter",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["T", cfg.in_dim])],
        [helper.make_tensor_value_info("adapted", TensorProto.FLOAT, ["T", cfg.out_dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    meta = {"version": 1, "precision": precision, "io_dtype": "float32", "compute_dtype": compute,
            "in_dim": cfg.in_dim, "out_dim": cfg.out_dim, "hidden_2d": hidden_2d, "pipes": pipes_meta}
    helper.set_model_props(model, {"prism.lowering": json.dumps(meta)})
    return finalize(model)
