"""``prism-deploy triton env [REPO] [--env DIR] [--json]``: make (first use) and check the Python-backend environment."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prism_deploy.serving.env import BackendEnv


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "triton-env",
        help="create (from PyPI, cached) and check the environment Triton's Python backend runs in",
        description="Also spelled `prism-deploy triton env`. numpy < 2, onnxruntime at the engines' version, onnx, "
        "nvidia-pytriton (the tritonserver binary), and a copy of this project's code; no PyTorch.",
    )
    p.add_argument(
        "repository",
        nargs="?",
        metavar="REPO",
        help="a repository: its engines' ONNX Runtime version picks the environment (default: this one's)",
    )
    p.add_argument("--env", metavar="DIR", help="check this environment instead of the cached one")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def backend_env(repository: str | None, env_dir: str | None) -> BackendEnv:
    """The checked environment for ``repository`` (shared with ``serve``)."""
    import onnxruntime

    from prism_deploy.serving import env
    from prism_deploy.serving.repository import read_manifest

    manifest = read_manifest(repository) if repository else {}
    version = manifest.get("onnxruntime") or onnxruntime.__version__
    return env.prepare(
        version, gpu=bool(manifest.get("gpu")), env_path=env_dir, log=lambda m: print(m, file=sys.stderr)
    )


def run(args: argparse.Namespace) -> int:
    from prism_deploy.cli.output import print_json, print_table

    be = backend_env(args.repository, args.env)
    info = {"environment": str(be.path), "code": str(be.code), **be.info}
    if args.json:
        print_json(info)
        return 0
    print_table(
        ["environment", "python", "numpy", "onnxruntime", "pytorch", "tritonserver"],
        [
            [
                info["environment"],
                info["python"],
                info["numpy"],
                info["onnxruntime"],
                "imported" if info["torch_imported"] else "not imported",
                "nvidia-pytriton" if info["pytriton"] else "-",
            ]
        ],
    )
    return 0
