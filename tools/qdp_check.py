#!/usr/bin/env python
"""prism::tile_dispatch under NVIDIA's own ``tensorrt.plugin`` code, without a full TensorRT.

    python tools/qdp_check.py --trt-source DIR [--json]

DIR is a checkout of github.com/NVIDIA/TensorRT. No full TensorRT installs on these machines,
and the TensorRT-RTX wheel ships a ``tensorrt_rtx.plugin`` that imports a module it lacks. So
this tool makes, in a temporary folder, a ``tensorrt`` package whose bindings are
TensorRT-RTX's and whose ``plugin`` subpackage is the one in DIR
(``python/packaging/bindings_wheel/tensorrt/plugin``, used where it lies), and checks what that
can show:

1. registration: tensorrt.plugin's validators accept ``register``, ``autotune``, ``aot_impl``
   and ``impl`` as prism_deploy.trt.plugin defines them;
2. the functions: ``register`` gives the output the dtype of ``hidden``; ``autotune`` expands to
   exactly the kernel's six dtype combinations; ``aot_impl`` returns the kernel's name, PTX
   with that entry, launch parameters and the two int32 extras, for every tile dtype;
3. the ONNX route: TensorRT-RTX's ONNX parser, given fused graphs from the exporter, finds the
   registered creator by op type, version and namespace (without registration it reports
   "Plugin not found"). TensorRT-RTX then refuses the creator, since it imports plugins of
   ``IPluginCreatorV3One`` creators only: that refusal is the expected outcome here.

TensorRT-RTX lacks the AOT interfaces (``IPluginV3QuickAOTBuild``, ``KernelLaunchParams``,
``ISymExpr``, ``QuickPluginCreationRequest``); the shim gives them empty placeholders so the
package imports with AOT enabled. So this shows nothing about a built engine, the AOT kernel
inside one, or a run: those need TensorRT and a GPU (tests/trt/test_plugin.py).
Exit 0 when every check holds, 1 when one fails, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_PACKAGE = Path("python/packaging/bindings_wheel/tensorrt")
EXAMPLE = ROOT / "examples" / "demo-adapter.safetensors"
RTX_REFUSAL = "imports IPluginV3 plugins registered with an IPluginCreatorV3One creator only"
NOT_FOUND = "Plugin not found"

SHIM = """\
# Written by prism-deploy tools/qdp_check.py: TensorRT-RTX's bindings as `tensorrt`, with the
# `plugin` subpackage found in the TensorRT source checkout below.
import tensorrt_rtx as _rtx

globals().update({k: getattr(_rtx, k) for k in dir(_rtx) if not k.startswith("__")})
__version__ = _rtx.__version__
for _name in ("QuickPluginCreationRequest", "ISymExpr", "ISymExprs", "IPluginV3QuickAOTBuild", "KernelLaunchParams"):
    if _name not in globals():  # AOT interfaces TensorRT-RTX lacks: placeholders, never used
        globals()[_name] = type(_name, (), {"__init__": lambda self, *a, **k: None})
__path__.append(%r)
"""


def make_shim(trt_source: Path, folder: Path) -> Path:
    package = folder / "tensorrt"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(SHIM % str(trt_source / PLUGIN_PACKAGE))
    return folder


# ---- run inside the shim (child processes) ----------------------------------------------------


def fused_graphs(folder: Path) -> dict[str, Path]:
    from prism_deploy.fuse import fuse_onnx_file
    from prism_deploy.lower import export_onnx
    from prism_deploy.reference import load_adapter

    adapter = load_adapter(EXAMPLE)
    paths = {}
    for precision in ("fp32", "fp16", "int8"):
        path = folder / f"fused-{precision}.onnx"
        export_onnx(adapter, path, precision=precision, io_dtype="float32")
        fuse_onnx_file(path, path)
        paths[precision] = path
    return paths


def parse_outcome(path: Path) -> str:
    import tensorrt as trt

    from prism_deploy.trt import engine

    try:
        engine.parse_network(path, plugin=False, trt_module=trt)
    except Exception as exc:  # the parser's message is the result
        text = str(exc)
        for known in (RTX_REFUSAL, NOT_FOUND):
            if known in text:
                return known
        return text.splitlines()[-1][:300]
    return "parsed"


def child_functions(folder: Path) -> list[dict[str, object]]:
    import tensorrt as trt
    import tensorrt.plugin as trtp
    from tensorrt.plugin._lib import QDP_REGISTRY

    from prism_deploy.kernel import KERNEL_NAME, ptx_entry_points
    from prism_deploy.trt.plugin import PLUGIN_ID, register_tile_dispatch_plugin

    checks: list[dict[str, object]] = []

    def check(name: str, ok: bool, detail: object) -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": str(detail)})

    register_tile_dispatch_plugin()  # the validators run here, at decoration
    plugin = QDP_REGISTRY[PLUGIN_ID]
    check(
        "registered with its validators",
        plugin.aot_impl_func is not None and plugin.impl_func is not None,
        f"inputs {plugin.input_tensor_names}, attributes {list(plugin.input_attrs)}",
    )

    def desc(dtype: object, *dims: int | None) -> object:
        exprs = tuple(trtp.ShapeExpr() if d is None else d for d in dims)
        return trtp.TensorDesc(trtp.ShapeExprs.from_tuple(exprs), dtype)

    attrs = dict(R=8, C=8, tr=20, tc=32, top_k=16, gate_scale=1.0, out_dim=160)
    names = {trt.float32: "FP32", trt.float16: "FP16", trt.int8: "INT8"}
    expected = {(h, "FP32", t, "FP32", h) for h in ("FP32", "FP16") for t in ("FP32", "FP16", "INT8")}
    for hidden_dtype in (trt.float32, trt.float16):
        for tile_dtype in (trt.float32, trt.float16, trt.int8):
            label = f"{names[hidden_dtype]} hidden, {names[tile_dtype]} tiles"
            inputs = (
                desc(hidden_dtype, None, 256),
                desc(trt.float32, None, 64),
                desc(tile_dtype, 64, 20, 32),
                desc(trt.float32, 64 if tile_dtype == trt.int8 else 1, 20 if tile_dtype == trt.int8 else 1),
            )
            out = plugin.register_func(*inputs, **attrs)
            check(f"register: {label}", out.dtype == hidden_dtype, f"output dtype {out.dtype}")
            name, ptx, params, extra = plugin.aot_impl_func(*inputs, **attrs, outputs=(out,), tactic=0)
            ptx = ptx.encode() if isinstance(ptx, str) else ptx
            ok = (
                name == KERNEL_NAME
                and ptx_entry_points(ptx) == [KERNEL_NAME]
                and isinstance(params, trtp.KernelLaunchParams)
                and len(extra) == 2
            )
            check(f"aot_impl: {label}", ok, f"{name}, {len(ptx)} bytes of PTX, {len(extra)} int32 extras")
    (combination,) = plugin.autotune_func(*inputs, (out,))
    got = {tuple(names[t] for t in c.types) for c in combination._get_combinations()}
    check(
        "autotune: the kernel's six dtype combinations",
        got == expected,
        f"{len(got)} combinations" + ("" if got == expected else f"; missing {expected - got}, extra {got - expected}"),
    )
    for precision, path in fused_graphs(folder).items():
        outcome = parse_outcome(path)
        # A full TensorRT would parse; TensorRT-RTX finds the creator and then refuses it.
        check(f"ONNX parser finds the creator: {precision} fused graph", outcome in (RTX_REFUSAL, "parsed"), outcome)
    return checks


def child_unregistered(folder: Path) -> list[dict[str, object]]:
    path = fused_graphs(folder)["fp16"]
    outcome = parse_outcome(path)
    return [
        {
            "check": "negative control: unregistered, the parser finds no creator",
            "ok": outcome == NOT_FOUND,
            "detail": outcome,
        }
    ]


# ---- the driver ------------------------------------------------------------------------------


def run_child(which: str, shim: Path, folder: Path) -> list[dict[str, object]]:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(shim), str(ROOT)]),
        PRISM_DEPLOY_KERNEL_ARCH=os.environ.get("PRISM_DEPLOY_KERNEL_ARCH", "sm_90"),
    )
    done = subprocess.run(
        [sys.executable, __file__, "--child", which, "--folder", str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return [{"check": f"{which} (child process)", "ok": False, "detail": tail}]
    return list(json.loads(lines[-1])["checks"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trt-source", type=Path, help="a checkout of github.com/NVIDIA/TensorRT")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=("functions", "unregistered"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run = child_functions if args.child == "functions" else child_unregistered
        print(json.dumps({"checks": run(args.folder)}))
        return 0
    if args.trt_source is None or not (args.trt_source / PLUGIN_PACKAGE / "plugin" / "_lib.py").is_file():
        print(
            f"error: --trt-source must be a checkout of NVIDIA/TensorRT with {PLUGIN_PACKAGE}/plugin", file=sys.stderr
        )
        return 2
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError as exc:
        print(f"error: needs TensorRT-RTX (pip install tensorrt-rtx-cu13): {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="qdp-check-") as tmp:
        shim = make_shim(args.trt_source.resolve(), Path(tmp) / "shim")
        checks = []
        for which in ("functions", "unregistered"):
            folder = Path(tmp) / which
            folder.mkdir()
            checks += run_child(which, shim, folder)
    commit = (
        subprocess.run(
            ["git", "-C", str(args.trt_source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or "unknown"
    )
    if args.json:
        print(
            json.dumps(
                {"trt_source_commit": commit, "tensorrt_rtx": tensorrt_rtx.__version__, "checks": checks}, indent=2
            )
        )
    else:
        print(f"tensorrt.plugin from NVIDIA/TensorRT {commit}, bindings TensorRT-RTX {tensorrt_rtx.__version__}")
        width = max(len(str(c["check"])) for c in checks)
        for c in checks:
            print(f"{'ok  ' if c['ok'] else 'FAIL'}  {str(c['check']):<{width}}  {c['detail']}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
