"""Resolve the pipeline's ``adapter`` argument to something with ``.run(hidden) -> adapted``.

The pipeline only needs that one method (``prism_deploy.target_backends.AdapterRunner``), so
every way of running an adapter plugs in the same way:

- a folder written by ``prism-deploy build`` (it has ``manifest.json``):
  ``prism_deploy.runtime.load_engines(DIR, precision=..., target=...)``;
- an ``.onnx`` file (what ``prism-deploy export`` wrote): ONNX Runtime on the target's provider
  (:class:`~prism_deploy.runtime.adapter_session.AdapterGraph`, which can take model A's output
  where it lies: ``run_device``);
- an adapter ``.safetensors``: lowered to ONNX on first use with ``prism_deploy.lower.export_onnx``
  into a cache keyed by the file's content and the precision, and verified on every use like an
  engine (a replaced or damaged cached graph is lowered again, never run);
- any object with ``.run(numpy) -> numpy`` (the PyTorch reference's runner in
  ``prism_deploy.parity``, or your own).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from prism_deploy.core import defaults
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.fsutil import file_sha256, write_text_atomic
from prism_deploy.core.precision import Precision
from prism_deploy.core.targets import TARGET_CHOICES, target_provider
from prism_deploy.format.engine_manifest import MANIFEST_NAME

CACHE_FOLDER = ".prism-cache"


def adapter_runner(
    adapter: Any,
    target: str = "ort-cpu",
    *,
    precision: Precision | str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> Any:
    """The runner for ``adapter``: a build folder, an ``.onnx``, a ``.safetensors``, or a runner object.

    ``precision``: the engine to load, or the precision to lower a ``.safetensors`` at (a name
    from an API caller is parsed here; the CLI and chain files pass a ``Precision``)."""
    if hasattr(adapter, "run") and not isinstance(adapter, (str, os.PathLike)):
        return adapter
    if target not in TARGET_CHOICES:
        raise PrismInputError(f"--target: {target!r} is not one of {', '.join(TARGET_CHOICES)}")
    path = Path(adapter)
    provider, _ = target_provider(target)
    if path.is_dir():
        from prism_deploy.format.model_folder import not_an_adapter

        reason = not_an_adapter(path)
        if reason is not None:
            raise PrismInputError(f"{adapter}: {reason}")
        if not (path / MANIFEST_NAME).is_file():
            raise PrismInputError(f"{adapter}: a folder without manifest.json (not written by `prism-deploy build`)")
        from prism_deploy.runtime.engines import load_engines

        # "auto" is a choice among targets, not a target an engine was built for: let the
        # manifest's entries decide (load_engines refuses an ambiguous choice).
        kwargs: dict[str, Any] = {"target": None if target == "auto" else target}
        if precision:
            kwargs["precision"] = precision
        return load_engines(path, **kwargs)
    if not path.exists():
        raise PrismInputError(f"{adapter}: no such adapter file or build folder")
    if not path.is_file():
        raise PrismInputError(
            f"{adapter}: not a regular file (give an adapter .safetensors or .onnx, or a build folder)"
        )
    from prism_deploy.runtime.adapter_session import AdapterGraph

    if path.suffix == ".onnx":
        return AdapterGraph(path, provider, intra_op_threads=threads)
    if path.suffix != ".safetensors":
        raise PrismInputError(f"{adapter}: expected a build folder, an adapter .onnx or an adapter .safetensors")
    if precision:
        lowered = Precision.parse(precision, "adapter_precision")
    else:
        lowered = defaults.CPU_RUN_PRECISION if provider == "cpu" else defaults.GPU_RUN_PRECISION
    return AdapterGraph(lowered_graph(path, lowered, cache_dir), provider, intra_op_threads=threads)


def lowered_graph(path: Path, precision: Precision, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The ONNX lowering of adapter ``path`` at ``precision``, from the cache when a verified copy
    is there, else lowered now and recorded. The cache entry is named by the adapter's sha256
    and the precision; its record holds the graph's own sha256, checked on every use."""
    from prism_deploy.core.version import __version__

    sha = file_sha256(path)
    folder = _cache_folder(path, cache_dir)
    onnx_path = folder / f"{path.stem}-{sha[:16]}-{precision.value}.onnx"
    record_path = onnx_path.with_suffix(".json")
    want = {"adapter_sha256": sha, "precision": precision.value, "prism_deploy": __version__}
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if (
            {k: record.get(k) for k in want} == want
            and onnx_path.is_file()
            and file_sha256(onnx_path) == record.get("onnx_sha256")
        ):
            return onnx_path
    except (OSError, ValueError):
        pass  # no record, or one that is not ours to trust: lower again
    from prism_deploy.format import read_adapter_file
    from prism_deploy.lower import export_onnx

    export_onnx(read_adapter_file(path), onnx_path, precision=precision)
    write_text_atomic(record_path, json.dumps({**want, "onnx_sha256": file_sha256(onnx_path)}, sort_keys=True) + "\n")
    return onnx_path


def _cache_folder(path: Path, cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        folder = Path(cache_dir)
    elif os.access(path.parent, os.W_OK):
        folder = path.parent / CACHE_FOLDER
    else:
        folder = Path(tempfile.gettempdir()) / "prism-deploy-cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
