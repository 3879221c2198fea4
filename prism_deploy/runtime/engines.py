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

from prism_deploy.core.errors import PrismInputError, brief
from prism_deploy.format.engine_manifest import EngineFileError, bucket_for, read_manifest, source_kind, verify_part
from prism_deploy.runtime.onnx_runner import OnnxRunner
from prism_deploy.target_backends import backend_for
from prism_deploy.target_backends.base import cuda_tensor


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


def _open_runner(path: Path, entry: dict[str, Any], in_dim: int, out_dim: int) -> Any:
    runner = backend_for(entry["target"]).open(path, entry, OnnxRunner.open, out_dim)
    _check_widths(path, runner, in_dim, out_dim)
    return runner


def _check_widths(path: Path, runner: Any, in_dim: int, out_dim: int) -> None:
    """The file is the one the manifest hashed; its interface must also be the one it states."""
    have = runner.widths()
    if have != (in_dim, out_dim):
        raise EngineFileError(f"{path}: is {have[0]} -> {have[1]} wide, the manifest says {in_dim} -> {out_dim}")


def check_environment(entry: dict[str, Any]) -> None:
    """Refuse an engine built with another runtime version, or for another GPU (its target says how)."""
    backend_for(entry["target"]).check_environment(entry)


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
        device = cuda_tensor(hidden)
        x = hidden if device is not None else as_hidden(hidden, self.in_dim)
        shape = tuple(x.shape)
        if len(shape) not in (2, 3) or shape[-1] != self.in_dim:
            raise PrismInputError(
                f"hidden must be [batch, seq, {self.in_dim}] or [tokens, {self.in_dim}], got {list(shape)}"
            )
        if device is None and 0 in shape and not backend_for(self.target).answers_zero_tokens:
            # zero tokens: the ONNX graphs answer them themselves (lower/adapter_onnx.py); a
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

    def __init__(
        self,
        directory: Any,
        want: str,
        ids: list[str],
        how: str = "pass precision=, target=, per_pipe=, plugin= or engine_id= to pick one",
    ) -> None:
        self.directory, self.want, self.ids = directory, want, ids
        super().__init__(f"{directory}: {len(ids)} engines match {want or 'any'} ({', '.join(ids)}); {how}")

    def saying(self, how: str) -> AmbiguousEngines:
        return AmbiguousEngines(self.directory, self.want, self.ids, how)


def select_entry(
    manifest: dict[str, Any],
    directory: Path,
    *,
    precision: str | None = None,
    target: str | None = None,
    per_pipe: bool | None = None,
    plugin: bool | None = None,
    layout: str | None = None,
    engine_id: str | None = None,
) -> dict[str, Any]:
    """The one entry matching the filters; none or several is an error listing what exists."""

    def matches(e: dict[str, Any]) -> bool:
        c = e["configuration"]
        return (
            (engine_id is None or e["id"] == engine_id)
            and (precision is None or c["precision"] == precision)
            and (target is None or e["target"] == target)
            and (per_pipe is None or (c.get("layout") == "per-pipe") == per_pipe)
            and (layout is None or c.get("layout") == layout)
            and (plugin is None or bool(c.get("plugin")) == plugin)
        )

    found = [e for e in manifest["engines"] if matches(e)]
    have = ", ".join(e["id"] for e in manifest["engines"]) or "none"
    want = ", ".join(
        f"{k}={v}"
        for k, v in (
            ("precision", precision),
            ("target", target),
            ("per_pipe", per_pipe),
            ("plugin", plugin),
            ("layout", layout),
            ("engine_id", engine_id),
        )
        if v is not None
    )
    if not found:
        raise EngineFileError(f"{directory}: no engine matches {want or 'any'} (built: {have})")
    if len(found) > 1:
        raise AmbiguousEngines(directory, want, [e["id"] for e in found])
    return found[0]


def load_engines(
    directory: str | os.PathLike[str],
    precision: str | None = None,
    target: str | None = None,
    *,
    per_pipe: bool | None = None,
    plugin: bool | None = None,
    engine_id: str | None = None,
) -> LoadedEngines:
    """Open the engine(s) of one configuration built into ``directory`` by ``prism-deploy build``."""
    base = Path(directory)
    manifest = read_manifest(base)
    if manifest is None:
        raise EngineFileError(f"{base}: no manifest.json (build engines with `prism-deploy build` first)")
    if source_kind(manifest) != "adapter":
        raise EngineFileError(f"{base}: a `build --model` folder (model graphs), not adapter engines")
    entry = select_entry(
        manifest, base, precision=precision, target=target, per_pipe=per_pipe, plugin=plugin, engine_id=engine_id
    )
    return open_entry(base, entry, manifest["adapter"]["config"])
