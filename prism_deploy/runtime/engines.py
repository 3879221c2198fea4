"""Loading what ``prism-deploy build`` built: ``load_engines(DIR, precision=..., target=...)``.

Every engine file is checked against the manifest's sha256 before it is opened, and against
the tool version (ONNX Runtime or TensorRT) it was built with: a corrupt, replaced or stale
engine is refused with one clean error (``EngineFileError``, exit 2 on the CLI).

A per-pipe build is one engine per pipe; the loader adds the pipes' outputs weighted by the
adapter's combine weights (the "tiny combine step").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.build.manifest import EngineFileError, read_manifest, verify_part

INPUT_NAME = "hidden"
OUTPUT_NAME = "adapted"


def _as_torch_cuda(hidden: Any) -> tuple[Any, bool] | None:
    """(torch CUDA tensor viewing ``hidden``, whether the caller gave torch), or None for host data."""
    if isinstance(hidden, np.ndarray) or not hasattr(hidden, "__dlpack__"):
        return None
    import torch

    is_torch = isinstance(hidden, torch.Tensor)
    x = hidden if is_torch else torch.from_dlpack(hidden)
    if not x.is_cuda:
        return None
    return x, is_torch


def _same_framework(out: Any, is_torch: bool) -> Any:
    if is_torch:
        return out
    import cupy  # the other DLPack producer callers use

    return cupy.from_dlpack(out)


class OrtEngineRunner:
    """An ONNX Runtime engine: the offline-optimized model, opened with optimization off
    (it is already optimized) on the provider it was optimized for."""

    def __init__(self, path: Path, session: dict[str, Any], out_dim: int) -> None:
        from prism_deploy.ort_session import make_session

        self.provider = session["provider"]
        self.out_dim = out_dim
        self.session = make_session(path, self.provider,
                                    graph_optimization_level=session["load_graph_optimization_level"],
                                    session_config=session.get("load_session_config"))

    def run(self, hidden: Any) -> Any:
        dev = _as_torch_cuda(hidden)
        if dev is None:
            x = np.ascontiguousarray(np.asarray(hidden), dtype=np.float32)
            return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        return self._run_device(*dev)

    def _run_device(self, x: Any, is_torch: bool) -> Any:
        """CUDA tensors bound in place through IOBinding: no host copy (GPU only, untested here)."""
        import torch

        x = x.to(dtype=torch.float32).contiguous()
        out = torch.empty((*x.shape[:-1], self.out_dim), dtype=torch.float32, device=x.device)
        torch.cuda.current_stream(x.device).synchronize()  # ORT runs on its own stream
        binding = self.session.io_binding()
        index = x.device.index or 0
        binding.bind_input(INPUT_NAME, "cuda", index, np.float32, list(x.shape), x.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", index, np.float32, list(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        return _same_framework(out, is_torch)


def _open_runner(path: Path, entry: dict[str, Any], out_dim: int) -> Any:
    cfg = entry["configuration"]
    if entry["target"] == "trt":
        from prism_deploy.trt.engine import TrtRunner

        return TrtRunner(path, plugin=cfg["plugin"], version_compatible=cfg["version_compatible"])
    return OrtEngineRunner(path, entry["session"], out_dim)


def check_environment(entry: dict[str, Any]) -> None:
    """Refuse an engine built with another runtime version, or for another GPU."""
    from prism_deploy.build import environment

    target = entry["target"]
    version_compatible = target == "trt" and bool(entry["configuration"].get("version_compatible"))
    tool = environment.runtime_tool(target)
    built = entry["tools"].get(tool)
    # a version-compatible plan is meant for other (later) TensorRT runtimes, the lean one included
    here = built if version_compatible else environment.tool_versions(target).get(tool)
    if built != here:
        raise EngineFileError(f"engine {entry['id']}: built with {tool} {built}, this environment has "
                              f"{here}; rebuild with `prism-deploy build`")
    if target == "ort-cuda":
        from prism_deploy.ort_session import cuda_provider_available

        ok, why = cuda_provider_available()
        if not ok:  # ONNX Runtime would fall back to the CPU silently: refuse instead
            raise EngineFileError(f"engine {entry['id']}: needs ONNX Runtime's CUDA provider ({why})")
    if target == "trt":  # version compatibility is not hardware compatibility: the GPU must match
        gpu = environment.device_info(target)
        if gpu.get("compute_capability") != entry["device"].get("compute_capability"):
            raise EngineFileError(f"engine {entry['id']}: built for compute capability "
                                  f"{entry['device'].get('compute_capability')}, this GPU is "
                                  f"{gpu.get('compute_capability')}; rebuild with `prism-deploy build`")


@dataclass
class LoadedEngines:
    """One built configuration, ready to run: ``run(hidden [..., in_dim]) -> adapted [..., out_dim]``.

    numpy in, numpy (float32) out on any machine; torch or cupy CUDA tensors in and out on a GPU.
    """

    directory: Path
    entry: dict[str, Any]
    in_dim: int
    out_dim: int
    parts: list[tuple[float, Any]] = field(default_factory=list)  # (combine weight, runner)

    @property
    def id(self) -> str:
        return str(self.entry["id"])

    @property
    def precision(self) -> str:
        return str(self.entry["configuration"]["precision"])

    @property
    def target(self) -> str:
        return str(self.entry["target"])

    def run(self, hidden: Any) -> Any:
        shape = tuple(hidden.shape)
        if len(shape) not in (2, 3) or shape[-1] != self.in_dim:
            raise ValueError(f"hidden must be [batch, seq, {self.in_dim}] or [tokens, {self.in_dim}], "
                             f"got {list(shape)}")
        x = hidden.reshape(1, *shape) if len(shape) == 2 else hidden
        y = None
        for weight, runner in self.parts:
            out = runner.run(x)
            term = out if weight == 1.0 else out * weight
            y = term if y is None else y + term
        assert y is not None
        return y.reshape(*shape[:-1], self.out_dim)


def open_entry(directory: str | os.PathLike[str], entry: dict[str, Any], config: dict[str, Any]) -> LoadedEngines:
    """Verify and open one manifest entry whose files live in ``directory``."""
    base = Path(directory)
    check_environment(entry)
    paths = [verify_part(base, part) for part in entry["parts"]]
    weights = entry.get("combine_weights") or [1.0] * len(paths)
    loaded = LoadedEngines(base, entry, int(config["in_dim"]), int(config["out_dim"]))
    for weight, path in zip(weights, paths):
        loaded.parts.append((float(weight), _open_runner(path, entry, loaded.out_dim)))
    return loaded


def select_entry(manifest: dict[str, Any], directory: Path, *, precision: str | None = None,
                 target: str | None = None, per_pipe: bool | None = None, plugin: bool | None = None,
                 engine_id: str | None = None) -> dict[str, Any]:
    """The one entry matching the filters; none or several is an error listing what exists."""
    def matches(e: dict[str, Any]) -> bool:
        c = e["configuration"]
        return ((engine_id is None or e["id"] == engine_id)
                and (precision is None or c["precision"] == precision)
                and (target is None or e["target"] == target)
                and (per_pipe is None or (c["layout"] == "per-pipe") == per_pipe)
                and (plugin is None or bool(c["plugin"]) == plugin))

    found = [e for e in manifest["engines"] if matches(e)]
    have = ", ".join(e["id"] for e in manifest["engines"]) or "none"
    want = ", ".join(f"{k}={v}" for k, v in (("precision", precision), ("target", target), ("per_pipe", per_pipe),
                                             ("plugin", plugin), ("engine_id", engine_id)) if v is not None)
    if not found:
        raise EngineFileError(f"{directory}: no engine matches {want or 'any'} (built: {have})")
    if len(found) > 1:
        raise EngineFileError(f"{directory}: {len(found)} engines match {want or 'any'} ({', '.join(e['id'] for e in found)}); "
                              "pass precision=, target=, per_pipe=, plugin= or engine_id= to pick one")
    return found[0]


def load_engines(directory: str | os.PathLike[str], precision: str | None = None, target: str | None = None, *,
                 per_pipe: bool | None = None, plugin: bool | None = None,
                 engine_id: str | None = None) -> LoadedEngines:
    """Open the engine(s) of one configuration built into ``directory`` by ``prism-deploy build``."""
    base = Path(directory)
    manifest = read_manifest(base)
    if manifest is None:
        raise EngineFileError(f"{base}: no manifest.json (build engines with `prism-deploy build` first)")
    if "adapter" not in manifest:
        raise EngineFileError(f"{base}: a `build --model` folder (model graphs), not adapter engines")
    entry = select_entry(manifest, base, precision=precision, target=target, per_pipe=per_pipe,
                         plugin=plugin, engine_id=engine_id)
    return open_entry(base, entry, manifest["adapter"]["config"])
