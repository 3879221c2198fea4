"""Loading what ``prism-deploy build`` built: ``load_engines(DIR, precision=..., target=...)``.

Every engine file is checked against the manifest's sha256 before it is opened (and must lie
inside DIR), and against the tool version (ONNX Runtime or TensorRT) it was built with: a
corrupt, replaced or stale engine is refused with one clean error (``EngineFileError``, exit 2
on the CLI). The manifest itself is validated whole before any field is used.

A per-pipe build is one engine per pipe; the loader adds the pipes' outputs weighted by the
adapter's combine weights (the "tiny combine step").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.core import targets
from prism_deploy.core.errors import PrismInputError, brief
from prism_deploy.core.onnx_io import INPUT_NAME, OUTPUT_NAME
from prism_deploy.format.engine_manifest import EngineFileError, bucket_for, read_manifest, source_kind, verify_part
from prism_deploy.runtime.onnx_runner import OnnxRunner



def _cuda_tensor(hidden: Any) -> Any | None:
    """A torch CUDA tensor viewing ``hidden`` (torch, or any DLPack producer on a GPU), else None.
    torch is imported only when such a tensor is given: host callers never need it."""
    if isinstance(hidden, np.ndarray) or not hasattr(hidden, "__dlpack__"):
        return None
    if getattr(getattr(hidden, "device", None), "type", None) == "cpu":
        return None
    import torch

    x = hidden if isinstance(hidden, torch.Tensor) else torch.from_dlpack(hidden)
    return x if x.is_cuda else None


def as_hidden(hidden: Any, in_dim: int) -> np.ndarray:
    """Host input as a float32 numpy array ``[..., in_dim]``; anything else is bad input, said in one line."""
    if hasattr(hidden, "detach") and hasattr(hidden, "numpy"):  # a CPU tensor (grad or not)
        hidden = hidden.detach().cpu().numpy()
    try:
        x = np.asarray(hidden)
    except (ValueError, TypeError) as exc:
        raise PrismInputError(f"hidden: not an array ({brief(exc, 120)})") from None
    if x.dtype.kind not in "fiu" or x.dtype == np.bool_:
        raise PrismInputError(f"hidden: dtype {x.dtype} is not a number type")
    if x.ndim not in (2, 3) or x.shape[-1] != in_dim:
        raise PrismInputError(f"hidden must be [batch, seq, {in_dim}] or [tokens, {in_dim}], got {list(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.float32)


class OrtEngineRunner:
    """An ONNX Runtime engine: the offline-optimized model, opened as it was built (optimization
    off, or constant folding for weight-only int8) on the provider it was optimized for."""

    def __init__(self, path: Path, session: dict[str, Any], out_dim: int) -> None:
        self.provider = session["provider"]
        self.out_dim = out_dim
        self.runner = OnnxRunner.open(path, self.provider, optimization_level=session["load_graph_optimization_level"],
                                      session_config=session.get("load_session_config"))
        self.session = self.runner.session

    def widths(self) -> tuple[Any, Any]:
        """The last dimension of ``hidden`` and of ``adapted``, as the engine file says."""
        dims = {i.name: i.shape[-1] for i in [*self.session.get_inputs(), *self.session.get_outputs()]}
        return dims.get(INPUT_NAME), dims.get(OUTPUT_NAME)

    def run(self, hidden: Any) -> Any:
        dev = _cuda_tensor(hidden)
        if dev is None:
            return self.runner.run({INPUT_NAME: np.asarray(hidden, np.float32)}, [OUTPUT_NAME])[OUTPUT_NAME]
        return self._run_device(dev, hidden)

    def _run_device(self, x: Any, given: Any) -> Any:
        """CUDA tensors bound in place through I/O binding: no host copy (GPU only; not run yet)."""
        import torch

        x = x.to(dtype=torch.float32).contiguous()
        out = torch.empty((*x.shape[:-1], self.out_dim), dtype=torch.float32, device=x.device)
        torch.cuda.current_stream(x.device).synchronize()  # ORT runs on its own stream
        binding = self.session.io_binding()
        index = x.device.index or 0
        binding.bind_input(INPUT_NAME, "cuda", index, np.float32, list(x.shape), x.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", index, np.float32, list(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        if isinstance(given, torch.Tensor):
            return out
        import cupy  # the other DLPack producer callers use

        return cupy.from_dlpack(out)


def _open_runner(path: Path, entry: dict[str, Any], in_dim: int, out_dim: int) -> Any:
    cfg = entry["configuration"]
    if entry["target"] == targets.Target.TRT:
        from prism_deploy.trt.engine import TrtRunner

        trt_runner = TrtRunner(path, plugin=bool(cfg.get("plugin")), version_compatible=bool(cfg.get("version_compatible")))
        _check_widths(path, trt_runner, in_dim, out_dim)
        return trt_runner
    if not isinstance(entry.get("session"), dict) or "provider" not in entry["session"]:
        raise EngineFileError(f"engine {entry['id']}: the manifest lacks its session record")
    runner = OrtEngineRunner(path, entry["session"], out_dim)
    _check_widths(path, runner, in_dim, out_dim)
    return runner


def _check_widths(path: Path, runner: Any, in_dim: int, out_dim: int) -> None:
    """The file is the one the manifest hashed; its interface must also be the one it states."""
    have = runner.widths()
    if have != (in_dim, out_dim):
        raise EngineFileError(f"{path}: is {have[0]} -> {have[1]} wide, the manifest says {in_dim} -> {out_dim}")


def check_environment(entry: dict[str, Any]) -> None:
    """Refuse an engine built with another runtime version, or for another GPU."""
    target = targets.Target(entry["target"])
    version_compatible = target is targets.Target.TRT and bool(entry["configuration"].get("version_compatible"))
    tool = target.runtime_tool
    built = entry["tools"].get(tool)
    # a version-compatible plan is meant for other (later) TensorRT runtimes, the lean one included
    here = built if version_compatible else targets.tool_versions(target).get(tool)
    if built != here:
        raise EngineFileError(f"engine {entry['id']}: built with {tool} {built}, this environment has "
                              f"{here}; rebuild with `prism-deploy build`")
    if target is targets.Target.ORT_CUDA:
        ok, why = targets.cuda_provider_available()
        if not ok:  # ONNX Runtime would fall back to the CPU silently: refuse instead
            raise EngineFileError(f"engine {entry['id']}: needs ONNX Runtime's CUDA provider ({why})")
    if target is targets.Target.TRT:  # version compatibility is not hardware compatibility: the GPU must match
        gpu = targets.device_info(target)
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
    # an entry with ``forms``: one runner per chosen gated form; a call runs only the one its
    # token count's bucket chose (the parts are alternatives, not terms of a sum)
    by_form: dict[str, Any] = field(default_factory=dict)
    kind = "engines"

    def form_for(self, tokens: int) -> str | None:
        """The gated form that runs a call of ``tokens`` tokens (None: the entry has one graph)."""
        forms = self.entry.get("forms")
        return bucket_for(forms["buckets"], tokens)["form"] if forms else None

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
        device = _cuda_tensor(hidden)
        x = hidden if device is not None else as_hidden(hidden, self.in_dim)
        shape = tuple(x.shape)
        if len(shape) not in (2, 3) or shape[-1] != self.in_dim:
            raise PrismInputError(f"hidden must be [batch, seq, {self.in_dim}] or [tokens, {self.in_dim}], "
                                  f"got {list(shape)}")
        if device is None and 0 in shape and self.target == "trt":
            # zero tokens: the ONNX graphs answer them themselves (lower/adapter_graph.py); a
            # TensorRT engine's profile starts at one token, so the answer is made here
            return np.zeros((*shape[:-1], self.out_dim), np.float32)
        x3 = x.reshape(1, *shape) if len(shape) == 2 else x
        if self.by_form:
            form = self.form_for(int(np.prod(shape[:-1])))
            assert form is not None  # by_form is filled only for entries with forms
            return self.by_form[form].run(x3).reshape(*shape[:-1], self.out_dim)
        y = None
        for weight, runner in self.parts:
            out = runner.run(x3)
            term = out if weight == 1.0 else out * np.float32(weight)
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
    for weight, path, part in zip(weights, paths, entry["parts"], strict=True):
        runner = _open_runner(path, entry, loaded.in_dim, loaded.out_dim)
        loaded.parts.append((float(weight), runner))
        if entry.get("forms"):
            loaded.by_form[part["form"]] = runner
    return loaded


class AmbiguousEngines(EngineFileError):
    """Several engines of a build folder match; ``how`` says how the caller's API picks one."""

    def __init__(self, directory: Any, want: str, ids: list[str],
                 how: str = "pass precision=, target=, per_pipe=, plugin= or engine_id= to pick one") -> None:
        self.directory, self.want, self.ids = directory, want, ids
        super().__init__(f"{directory}: {len(ids)} engines match {want or 'any'} ({', '.join(ids)}); {how}")

    def saying(self, how: str) -> AmbiguousEngines:
        return AmbiguousEngines(self.directory, self.want, self.ids, how)


def select_entry(manifest: dict[str, Any], directory: Path, *, precision: str | None = None,
                 target: str | None = None, per_pipe: bool | None = None, plugin: bool | None = None,
                 layout: str | None = None, engine_id: str | None = None) -> dict[str, Any]:
    """The one entry matching the filters; none or several is an error listing what exists."""
    def matches(e: dict[str, Any]) -> bool:
        c = e["configuration"]
        return ((engine_id is None or e["id"] == engine_id)
                and (precision is None or c["precision"] == precision)
                and (target is None or e["target"] == target)
                and (per_pipe is None or (c.get("layout") == "per-pipe") == per_pipe)
                and (layout is None or c.get("layout") == layout)
                and (plugin is None or bool(c.get("plugin")) == plugin))

    found = [e for e in manifest["engines"] if matches(e)]
    have = ", ".join(e["id"] for e in manifest["engines"]) or "none"
    want = ", ".join(f"{k}={v}" for k, v in (("precision", precision), ("target", target), ("per_pipe", per_pipe),
                                             ("plugin", plugin), ("layout", layout), ("engine_id", engine_id))
                     if v is not None)
    if not found:
        raise EngineFileError(f"{directory}: no engine matches {want or 'any'} (built: {have})")
    if len(found) > 1:
        raise AmbiguousEngines(directory, want, [e["id"] for e in found])
    return found[0]


def load_engines(directory: str | os.PathLike[str], precision: str | None = None, target: str | None = None, *,
                 per_pipe: bool | None = None, plugin: bool | None = None,
                 engine_id: str | None = None) -> LoadedEngines:
    """Open the engine(s) of one configuration built into ``directory`` by ``prism-deploy build``."""
    base = Path(directory)
    manifest = read_manifest(base)
    if manifest is None:
        raise EngineFileError(f"{base}: no manifest.json (build engines with `prism-deploy build` first)")
    if source_kind(manifest) != "adapter":
        raise EngineFileError(f"{base}: a `build --model` folder (model graphs), not adapter engines")
    entry = select_entry(manifest, base, precision=precision, target=target, per_pipe=per_pipe,
                         plugin=plugin, engine_id=engine_id)
    return open_entry(base, entry, manifest["adapter"]["config"])
