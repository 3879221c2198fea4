"""``build_engines``: adapter file -> checked engines in a folder, with a manifest and a cache.

For each requested configuration (precision, profile, plugin, whole or per-pipe), in order:
1. reuse: an entry of the folder's manifest with the same cache key (adapter sha256,
   configuration, tool versions, device) whose files still hash as recorded;
2. refit (TensorRT, ``--refittable`` only): an entry with the same topology key (a retrained
   adapter of the same shape) has its weights replaced instead of being rebuilt;
3. build: export (``prism_deploy.lower``), fuse when the plugin is on, build the engine,
   then parity against the PyTorch reference (``prism_deploy.parity``).

Everything is written in a private temporary folder inside DIR, checked there, and only then
moved in under content-addressed names; the manifest is replaced atomically at the end and
old files are collected only after that. A file lock serialises builds into one DIR. So a
failed or interrupted build leaves the previous engines and manifest as they were.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prism_deploy.build import environment
from prism_deploy.fsutil import file_sha256
from prism_deploy.build.manifest import (
    EngineFileError,
    canonical_hash,
    new_manifest,
    part_files,
    parts_intact,
    read_manifest,
    unreferenced_engine_files,
    write_manifest,
)
from prism_deploy.build.options import (
    CALIBRATORS,
    PLUGIN_MODES,
    EngineConfig,
    Profile,
    default_precisions,
)
from prism_deploy.errors import CheckFailed, PrismInputError
from prism_deploy.format import AdapterConfig

LOCK_NAME = ".build.lock"
TMP_PREFIX = ".build-"
# Parity runs the engine on this many random batches of the profile's OPT shape.
PARITY_SAMPLES = 2
# Exports larger than this (bytes) get ONNX Runtime engines with external initializers.
ORT_EXTERNAL_THRESHOLD = 1536 * 1024**2


@dataclass
class BuildRequest:
    """The inputs of one ``prism-deploy build`` call (see the CLI for their meaning)."""

    adapter: Path
    out_dir: Path | None = None
    target: str = "auto"
    precisions: tuple[str, ...] | None = None
    profile: Profile = field(default_factory=Profile)
    per_pipe: bool = False
    plugin: str = "auto"
    calib: Path | None = None
    calibrator: str = "max"
    parity: bool = True
    force: bool = False
    refittable: bool = False
    version_compatible: bool = False
    weight_streaming: bool = False
    progress: bool = False


@dataclass
class Outcome:
    """What happened to one configuration: ``built``, ``reused``, ``refit`` or ``failed``."""

    config: EngineConfig
    action: str
    entry: dict[str, Any] | None
    seconds: float
    detail: str = ""


@dataclass
class BuildResult:
    directory: Path
    target: str
    target_reason: str
    notes: list[str]
    outcomes: list[Outcome]
    manifest_written: bool

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.action == "failed"]

    def raise_for_failures(self) -> None:
        if self.failed:
            raise CheckFailed("; ".join(f"{o.config.id}: {o.detail}" for o in self.failed))


# ---- inputs ------------------------------------------------------------------------------

def read_adapter_config(path: Path) -> AdapterConfig:
    """The adapter's config from the file header only: a cache hit never reads the weights."""
    from safetensors import safe_open

    from prism_deploy.errors import AdapterFormatError
    from prism_deploy.format.adapter_file import config_from_metadata

    if not path.is_file():
        raise AdapterFormatError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # the container parser's own error types
        raise AdapterFormatError(f"{path}: not a valid safetensors file ({' '.join(str(exc).split())})") from None
    try:
        return config_from_metadata(metadata)
    except AdapterFormatError as exc:
        raise AdapterFormatError(f"{path}: {exc}") from None


def default_out_dir(adapter: Path, sha256: str) -> Path:
    return Path("engines") / f"{adapter.stem}-{sha256[:8]}"


def topology(config: AdapterConfig) -> dict[str, Any]:
    """What fixes an engine's graph (and so decides whether a refit can replace its weights)."""
    return {
        "in_dim": config.in_dim,
        "out_dim": config.out_dim,
        "combine": config.combine,
        "pipes": [{"name": p.name, "grid": list(p.grid), "tile": list(p.tile), "top_k": p.top_k,
                   "gate_scale": p.gate_scale if p.gated else None} for p in config.pipes],
    }


def resolve_plugin(mode: str, target: str, config: AdapterConfig) -> tuple[bool, str | None]:
    """Whether gated pipes are fused into the tile_dispatch plugin, and a note saying why not."""
    if mode not in PLUGIN_MODES:
        raise PrismInputError(f"--plugin: {mode!r} is not one of {', '.join(PLUGIN_MODES)}")
    if mode == "off":
        return False, None
    if target != "trt":
        if mode == "on":
            raise PrismInputError(f"--plugin on: the tile_dispatch plugin runs inside TensorRT engines only, "
                                  f"not with --target {target}")
        return False, None
    if not config.gated_pipes:
        return False, "plugin off: the adapter has no gated pipe to fuse"
    from prism_deploy.trt import tensorrt_available as plugin_support

    ok, why = plugin_support()  # Quickly Deployable Plugins with AOT kernels (TensorRT 10.9+)
    if ok:
        try:
            import prism_deploy.fuse  # noqa: F401
        except ImportError as exc:
            ok, why = False, f"the fusion pass is not available ({exc})"
    if not ok:
        if mode == "on":
            raise PrismInputError(f"--plugin on: {why}")
        return False, f"plugin off: {why}"
    return True, None


def plan_configs(request: BuildRequest, target: str, plugin: bool) -> list[EngineConfig]:
    precisions = request.precisions or default_precisions(target)
    if "int8-qdq" in precisions:
        if request.calib is None:
            raise PrismInputError("--precision int8-qdq: needs --calib FILE (model-A hidden states, [n, in_dim]) "
                                  "for its activation scales")
        if request.calibrator not in CALIBRATORS:
            raise PrismInputError(f"--calibrator: {request.calibrator!r} is not one of {', '.join(CALIBRATORS)}")
    if request.calib is not None and not request.calib.is_file():
        raise PrismInputError(f"--calib: {request.calib}: no such file")
    for flag, on in (("--refittable", request.refittable), ("--version-compatible", request.version_compatible),
                     ("--weight-streaming", request.weight_streaming)):
        if on and target != "trt":
            raise PrismInputError(f"{flag}: a TensorRT engine option, but the target is {target}")
    return [EngineConfig(target=target, precision=p, profile=request.profile, plugin=plugin,
                         per_pipe=request.per_pipe, refittable=request.refittable,
                         version_compatible=request.version_compatible,
                         weight_streaming=request.weight_streaming, calibrator=request.calibrator)
            for p in precisions]


# ---- keys --------------------------------------------------------------------------------

def cache_key(adapter_sha: str, cfg: EngineConfig, tools: dict[str, Any], device: dict[str, Any],
              calib_sha: str | None) -> str:
    """Same key = same engine: any change to the adapter, options, tools or device rebuilds."""
    return canonical_hash({"adapter": adapter_sha, "configuration": cfg.to_json(), "tools": tools,
                           "device": device, "calib": calib_sha if cfg.precision == "int8-qdq" else None})


def topology_key(topo: dict[str, Any], cfg: EngineConfig, tools: dict[str, Any], device: dict[str, Any]) -> str:
    """Same key = an engine of identical structure: only the weights differ (refit them)."""
    arch = device.get("compute_capability", device.get("machine"))
    return canonical_hash({"topology": topo, "configuration": cfg.to_json(), "tools": tools, "arch": arch})


# ---- the build ---------------------------------------------------------------------------

@contextlib.contextmanager
def locked(directory: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold DIR's build lock; clear temporary folders that a killed build left behind."""
    from filelock import FileLock, Timeout

    if directory.exists() and not directory.is_dir():
        raise PrismInputError(f"-o {directory}: exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"waiting for another build into {directory} to finish")
        lock.acquire()
    try:
        for stale in directory.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        lock.release()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def build_engines(request: BuildRequest, log: Callable[[str], None] = _stderr) -> BuildResult:
    """Build (or reuse, or refit) every requested configuration; see the module docstring."""

    adapter_path = Path(request.adapter)
    config = read_adapter_config(adapter_path)
    adapter_sha = file_sha256(adapter_path)
    target, target_reason = environment.resolve_target(request.target)
    plugin, plugin_note = resolve_plugin(request.plugin, target, config)
    configs = plan_configs(request, target, plugin)
    calib_sha = file_sha256(request.calib) if request.calib is not None else None
    directory = Path(request.out_dir) if request.out_dir is not None else default_out_dir(adapter_path, adapter_sha)
    notes = [plugin_note] if plugin_note else []
    tools = environment.tool_versions(target)
    device = environment.device_info(target)
    topo = topology(config)
    adapter_record = {"file": adapter_path.name, "sha256": adapter_sha, "config": config.to_json(),
                      "topology_sha256": canonical_hash(topo)}

    with locked(directory, log):
        try:
            old = read_manifest(directory)
        except EngineFileError as exc:
            log(f"warning: {exc}; starting a new manifest")
            old = None
        same_adapter = old is not None and old["adapter"]["sha256"] == adapter_sha
        old_entries = {e["id"]: e for e in old["engines"]} if old is not None and same_adapter else {}
        session = _Session(request, directory, config, adapter_path, tools, device, log)
        outcomes = []
        try:
            for cfg in _progress(configs, request.progress):
                key = cache_key(adapter_sha, cfg, tools, device, calib_sha)
                tkey = topology_key(topo, cfg, tools, device)
                previous = old_entries.get(cfg.id)
                if (not request.force and previous is not None and previous.get("cache_key") == key
                        and parts_intact(directory, previous)):
                    outcomes.append(Outcome(cfg, "reused", previous, 0.0, "cache hit"))
                    continue
                outcomes.append(session.make(cfg, key, tkey, _refit_source(request, cfg, tkey, directory, old)))
            written = _commit(directory, old, same_adapter, adapter_record, outcomes)
        finally:
            session.cleanup()
    return BuildResult(directory, target, target_reason, notes, outcomes, written)


def _progress(configs: list[EngineConfig], enabled: bool) -> Any:
    if not enabled:
        return configs
    from tqdm import tqdm

    return tqdm(configs, desc="build", unit="config", file=sys.stderr)


def _refit_source(request: BuildRequest, cfg: EngineConfig, tkey: str, directory: Path,
                  old: dict[str, Any] | None) -> tuple[Path, dict[str, Any]] | None:
    """A refittable engine of the same topology: in DIR, or in a sibling DIR of the same adapter stem."""
    if not (cfg.refittable and cfg.target == "trt") or request.force:
        return None
    candidates: list[tuple[Path, dict[str, Any] | None]] = [(directory, old)]
    if request.out_dir is None:  # default layout: engines/<stem>-<sha8>/ for each retrained version
        for sibling in sorted(directory.parent.glob(f"{Path(request.adapter).stem}-*")):
            if sibling != directory and sibling.is_dir():
                with contextlib.suppress(EngineFileError):
                    candidates.append((sibling, read_manifest(sibling)))
    for folder, manifest in candidates:
        for entry in (manifest or {}).get("engines", []):
            if entry.get("topology_key") == tkey and parts_intact(folder, entry):
                return folder, entry
    return None


def _commit(directory: Path, old: dict[str, Any] | None, same_adapter: bool, adapter_record: dict[str, Any],
            outcomes: list[Outcome]) -> bool:
    """Write the new manifest (only if something new was made), then collect superseded files."""
    fresh = {o.entry["id"]: o.entry for o in outcomes if o.action in ("built", "refit") and o.entry is not None}
    if not fresh:
        return False
    engines: list[dict[str, Any]] = []
    if old is not None and same_adapter:
        # keep every earlier entry (a configuration that failed now keeps its previous engine)
        engines = [fresh.pop(e["id"], e) for e in old["engines"]]
    engines += list(fresh.values())
    manifest = new_manifest(adapter_record, engines)
    write_manifest(directory, manifest)
    for stale in unreferenced_engine_files(directory, manifest):
        with contextlib.suppress(OSError):
            stale.unlink()
    return True


class _Session:
    """Makes engines for one build call, in a private temporary folder inside DIR."""

    def __init__(self, request: BuildRequest, directory: Path, config: AdapterConfig, adapter_path: Path,
                 tools: dict[str, Any], device: dict[str, Any], log: Callable[[str], None]) -> None:
        self.request = request
        self.directory = directory
        self.config = config
        self.adapter_path = adapter_path
        self.tools = tools
        self.device = device
        self.log = log
        self.tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=directory))
        self._adapter: Any = None

    @property
    def adapter(self) -> Any:
        """The full adapter, read (and validated) only when something has to be built."""
        if self._adapter is None:
            from prism_deploy.reference import load_adapter

            self._adapter = load_adapter(self.adapter_path)
        return self._adapter

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def make(self, cfg: EngineConfig, key: str, tkey: str,
             refit_from: tuple[Path, dict[str, Any]] | None) -> Outcome:
        work = Path(tempfile.mkdtemp(prefix=f"{cfg.slug}.", dir=self.tmp))
        self.adapter  # read and validate the adapter once, outside the build time
        start = time.perf_counter()
        action = "refit" if refit_from is not None else "built"
        try:
            parts, session = self._make_parts(cfg, work, refit_from)
        except CheckFailed as exc:
            return Outcome(cfg, "failed", None, time.perf_counter() - start, str(exc))
        seconds = time.perf_counter() - start
        entry: dict[str, Any] = {
            "id": cfg.id,
            "configuration": cfg.to_json(),
            "target": cfg.target,
            "parts": parts,
            "combine_weights": self._combine_weights() if cfg.per_pipe else None,
            "session": session,
            "tools": self.tools,
            "device": self.device,
            "cache_key": key,
            "topology_key": tkey,
            "build_seconds": round(seconds, 3),
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "how": action if refit_from is None else f"refit from {refit_from[0] / refit_from[1]['parts'][0]['file']}",
            "parity": None,
        }
        if self.request.parity:
            passed, figures, detail = self._parity(cfg, work, entry)
            entry["parity"] = figures
            if not passed:
                return Outcome(cfg, "failed", None, seconds, f"parity failed: {detail}")
        for part in parts:  # checked: move in under the content-addressed name
            for name, _ in part_files(part):
                os.replace(work / name, self.directory / name)
        return Outcome(cfg, action, entry, seconds, "cache miss" if refit_from is None else "same topology")

    def _combine_weights(self) -> list[float]:
        return [float(b) for b in self.adapter.betas().tolist()]

    def _units(self, cfg: EngineConfig) -> list[tuple[int | None, Any]]:
        if not cfg.per_pipe:
            return [(None, self.adapter)]
        return [(i, pipe_adapter(self.adapter, i)) for i in range(self.config.num_pipes)]

    def _make_parts(self, cfg: EngineConfig, work: Path,
                    refit_from: tuple[Path, dict[str, Any]] | None) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        parts = []
        session = None
        for index, unit in self._units(cfg):
            stem = cfg.slug if index is None else f"{cfg.slug}.pipe{index}"
            onnx_path = work / f"{stem}.onnx"
            exported_bytes = export_graph(unit, onnx_path, cfg, self.request.calib)
            if cfg.target == "trt":
                from prism_deploy.trt.engine import TensorRTError

                try:
                    part = engine_part(work, stem, ".engine", self._trt_engine(cfg, onnx_path, index, refit_from))
                except TensorRTError as exc:
                    raise CheckFailed(f"TensorRT build failed: {exc}") from None
            else:
                part, session = ort_engine_part(onnx_path, work, stem, cfg.target, exported_bytes, cfg.precision)
            part = {"pipe": index, "pipe_name": None if index is None else self.config.pipes[index].name, **part}
            parts.append(part)
        return parts, session

    def _trt_engine(self, cfg: EngineConfig, onnx_path: Path, index: int | None,
                    refit_from: tuple[Path, dict[str, Any]] | None) -> bytes:
        from prism_deploy.trt import engine as trt_engine

        if refit_from is not None:
            folder, entry = refit_from
            part = next(p for p in entry["parts"] if p["pipe"] == index)
            return trt_engine.refit_serialized_engine((folder / part["file"]).read_bytes(), onnx_path,
                                                      plugin=cfg.plugin)
        lo, opt, hi = cfg.profile.shapes(self.config.in_dim)
        settings = trt_engine.TrtBuildSettings(min_shape=lo, opt_shape=opt, max_shape=hi,
                                               refittable=cfg.refittable, version_compatible=cfg.version_compatible,
                                               weight_streaming=cfg.weight_streaming, plugin=cfg.plugin)
        cc = str(self.device.get("compute_capability", "unknown")).replace(".", "")
        cache = self.directory / f"timing-trt{self.tools.get('tensorrt')}-sm{cc}.cache"
        return trt_engine.build_serialized_engine(onnx_path, settings, cache)

    def _parity(self, cfg: EngineConfig, work: Path, entry: dict[str, Any]) -> tuple[bool, dict[str, Any], str]:
        """Run the just-built engine(s), through the same loader users get, against the reference."""
        from prism_deploy.parity import check_parity
        from prism_deploy.runtime.engines import open_entry

        loaded = open_entry(work, entry, self.config.to_json())
        report = check_parity(self.adapter, loaded, precision=cfg.precision, samples=PARITY_SAMPLES,
                              batch=cfg.profile.batch[1], seq=cfg.profile.seq[1], seed=0)
        figures = report.to_json()
        return bool(report.passed), figures, parity_shortfall(figures)


def parity_shortfall(figures: dict[str, Any]) -> str:
    """One line saying by how much parity missed: each failed figure beside its tolerance."""
    if figures.get("failures"):
        return "; ".join(str(f) for f in figures["failures"])
    tolerances = figures.get("tolerances") or {}
    shown = []
    for name in ("max_abs", "rel_l2", "cosine"):
        if name in figures:
            limit = tolerances.get(name)
            shown.append(f"{name}={figures[name]:.3g}" + (f" (tolerance {limit:.3g})" if limit is not None else ""))
    return ", ".join(shown) or "figures outside the precision's tolerances"


def engine_part(work: Path, stem: str, suffix: str, engine: bytes | Path) -> dict[str, Any]:
    """Move an engine (bytes, or a file in ``work``) to its content-addressed name
    ``<stem>.<sha12><suffix>`` in ``work``; the manifest part record for it."""
    tmp = work / f"{stem}{suffix}.tmp"
    if isinstance(engine, bytes):
        tmp.write_bytes(engine)
    elif engine != tmp:
        engine.rename(tmp)
    digest = file_sha256(tmp)
    name = f"{stem}.{digest[:12]}{suffix}"
    tmp.rename(work / name)
    return {"file": name, "sha256": digest, "bytes": (work / name).stat().st_size}


def ort_engine_part(onnx_path: Path, work: Path, stem: str, target: str,
                    source_bytes: int, precision: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """ONNX Runtime's offline-optimized model of ``onnx_path`` in ``work``: (part record, session record).
    A refused graph is a failed build (``CheckFailed``), not bad input."""
    from prism_deploy.build.ort_backend import build_ort_engine

    engine = work / f"{stem}.ort.onnx.tmp"
    data_file = None
    if source_bytes > ORT_EXTERNAL_THRESHOLD:
        # the model refers to its data file by name: a fresh name never clobbers the data of
        # an engine the current manifest lists
        data_file = f"{stem}.{secrets.token_hex(6)}.ort.data"
    try:
        session = build_ort_engine(onnx_path, engine, target, external_data=data_file, precision=precision)
    except PrismInputError as exc:  # ORT refused a graph we were given to build: a failed build
        raise CheckFailed(f"ONNX Runtime build failed: {exc}") from None
    part = engine_part(work, stem, ".ort.onnx", engine)
    if data_file is not None:
        part.update(data_file=data_file, data_sha256=file_sha256(work / data_file),
                    data_bytes=(work / data_file).stat().st_size)
    return part, session


def export_graph(adapter: Any, path: Path, cfg: EngineConfig, calib: Path | None) -> int:
    """The lowering issue's exporter; then, with the plugin on, the fusion pass. Returns the
    bytes written (model and external data)."""
    from prism_deploy.lower import export_onnx

    result = export_onnx(adapter, path, precision=cfg.precision, io_dtype="float32",
                         calib=str(calib) if calib is not None else None, calibrator=cfg.calibrator)
    if cfg.plugin and adapter.config.gated_pipes:
        from prism_deploy.fuse import fuse_onnx_file

        fused = fuse_onnx_file(path, path)
        return sum(Path(p).stat().st_size for p in fused["paths"])
    return int(result.bytes)


def pipe_adapter(adapter: Any, index: int) -> Any:
    """Pipe ``index`` of ``adapter`` as a one-pipe adapter (combine ``sum``: the loader applies
    the combine weight), so that pipes can be built, loaded and swapped one by one."""
    from prism_deploy.reference import PrismAdapter

    cfg = adapter.config
    sub = AdapterConfig(cfg.in_dim, cfg.out_dim, (cfg.pipes[index],), "sum")
    prefix = f"pipes.{index}."
    tensors = {f"pipes.0.{name[len(prefix):]}": t for name, t in adapter.tensors().items() if name.startswith(prefix)}
    return PrismAdapter(sub, tensors)
