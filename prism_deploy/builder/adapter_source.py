"""An adapter file as a build source: one engine per configuration (precision x layout).

Each configuration exports the adapter (``prism_deploy.lower``), fuses its gated pipes when
the plugin is on (``prism_deploy.fuse``), and builds a TensorRT engine or an ONNX Runtime
optimized model from it; ``--per-pipe`` makes one engine per pipe, combined by the loader.
The weights are read only when something has to be built: a cache hit reads the header.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prism_deploy.builder.forms import CANDIDATE_FORMS, FORMS_RULES, time_forms, token_buckets
from prism_deploy.builder.loop import BuildOptions, BuildResult, Unit, build, build_part
from prism_deploy.builder.options import PLUGIN_MODES, EngineConfig, Profile, check_calibrator, default_precisions
from prism_deploy.core import defaults
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.fsutil import file_sha256
from prism_deploy.core.precision import Precision
from prism_deploy.core.targets import Target
from prism_deploy.format import AdapterConfig, AdapterTensors, read_adapter_config, read_adapter_file
from prism_deploy.format.engine_manifest import (
    EngineFileError,
    canonical_hash,
    parts_intact,
    read_manifest,
    source_kind,
)
from prism_deploy.target_backends import EngineBuild, backend_for

FORM_MODES = ("timed", "auto")


@dataclass
class BuildRequest:
    """The inputs of one ``prism-deploy build ADAPTER`` call (see the CLI for their meaning).

    The settings of an adapter build: its options are checked here, once, when it is made
    (a precision given by name is parsed here; the CLI passes them parsed)."""

    adapter: Path
    out_dir: Path | None = None
    target: str = "auto"
    precisions: tuple[Precision, ...] | None = None
    profile: Profile = field(default_factory=Profile)
    per_pipe: bool = False
    plugin: str = "auto"
    calib: Path | None = None
    calibrator: str = defaults.CALIBRATOR
    force: bool = False
    refittable: bool = False
    version_compatible: bool = False
    weight_streaming: bool = False
    progress: bool = False
    # "timed": ONNX Runtime builds of gated adapters time every candidate gated form per token
    # bucket and keep the fastest (builder/forms.py); "auto": the lowering's own rule, one graph
    forms: str = "timed"
    form_timer: Any = None  # builder.forms.FormTimer; None: the lower quartile of a few calls

    def __post_init__(self) -> None:
        if self.precisions:
            self.precisions = tuple(p if isinstance(p, Precision) else Precision.parse(p) for p in self.precisions)
        if self.plugin not in PLUGIN_MODES:
            raise PrismInputError(f"--plugin: {self.plugin!r} is not one of {', '.join(PLUGIN_MODES)}")
        if self.forms not in FORM_MODES:
            raise PrismInputError(f"--forms: {self.forms!r} is not one of {', '.join(FORM_MODES)}")
        if self.precisions and Precision.INT8_QDQ in self.precisions:
            if self.calib is None:
                raise PrismInputError(
                    "--precision int8-qdq: needs --calib FILE (model-A hidden states, [n, in_dim]) "
                    "for its activation scales"
                )
            check_calibrator(self.calibrator)
        if self.calib is not None and not self.calib.is_file():
            raise PrismInputError(f"--calib: {self.calib}: no such file")


def topology_key(topo: dict[str, Any], cfg: EngineConfig, tools: dict[str, Any], device: dict[str, Any]) -> str:
    """Same key = an engine of identical structure: only the weights differ (refit them)."""
    arch = device.get("compute_capability", device.get("machine"))
    return canonical_hash({"topology": topo, "configuration": cfg.to_json(), "tools": tools, "arch": arch})


def resolve_plugin(mode: str, target: Target, config: AdapterConfig) -> tuple[bool, str | None]:
    """Whether gated pipes are fused into the tile_dispatch plugin, and a note saying why not."""
    if mode == "off":
        return False, None
    if not backend_for(target).fuses_plugin:
        if mode == "on":
            raise PrismInputError(
                f"--plugin on: the tile_dispatch plugin runs inside TensorRT engines only, not with --target {target}"
            )
        return False, None
    if not config.gated_pipes:
        return False, "plugin off: the adapter has no gated pipe to fuse"
    from prism_deploy.trt import plugin_support

    ok, why = plugin_support()  # Quickly Deployable Plugins with AOT kernels (TensorRT 10.9+)
    if not ok:
        if mode == "on":
            raise PrismInputError(f"--plugin on: {why}")
        return False, f"plugin off: {why}"
    return True, None


class AdapterSource:
    """``build ADAPTER``: see the module docstring."""

    kind = "adapter"

    def __init__(self, request: BuildRequest) -> None:
        self.request = request
        self.path = Path(request.adapter)
        self.config = read_adapter_config(self.path)
        self.sha256 = file_sha256(self.path)
        self.label = self.path.name
        self.calib_sha = file_sha256(request.calib) if request.calib is not None and request.calib.is_file() else None
        self.topology = self.config.topology()
        self.record = {
            "file": self.path.name,
            "sha256": self.sha256,
            "config": self.config.to_json(),
            "topology_sha256": canonical_hash(self.topology),
        }
        self.notes: list[str] = []
        self._data: AdapterTensors | None = None

    @property
    def data(self) -> AdapterTensors:
        """The full adapter, read (and validated) only when something has to be built."""
        if self._data is None:
            self._data = read_adapter_file(self.path)
        return self._data

    def default_out_dir(self) -> Path:
        return Path("engines") / f"{self.path.stem}-{self.sha256[:8]}"

    def same_source(self, old: dict[str, Any]) -> bool:
        return source_kind(old) == "adapter" and old["adapter"]["sha256"] == self.sha256

    def owns(self, old: dict[str, Any]) -> bool:
        """A folder of this adapter file's engines (a retrained version of the same file counts)."""
        return source_kind(old) == "adapter" and old["adapter"].get("file") == self.path.name

    def copies(self) -> list[tuple[str, Path]]:
        return []

    def units(self, target: Target) -> list[Unit]:
        from prism_deploy.core import targets

        request = self.request
        plugin, note = resolve_plugin(request.plugin, target, self.config)
        if note:
            self.notes.append(note)
        precisions = request.precisions or default_precisions(target)
        for flag, on in (
            ("--refittable", request.refittable),
            ("--version-compatible", request.version_compatible),
            ("--weight-streaming", request.weight_streaming),
        ):
            if on and flag not in backend_for(target).engine_options:
                raise PrismInputError(f"{flag}: a TensorRT engine option, but the target is {target}")
        tools, device = targets.tool_versions(target), targets.device_info(target)
        units = []
        for p in precisions:
            cfg = EngineConfig(
                target=target,
                precision=p,
                profile=request.profile,
                plugin=plugin,
                layout="per-pipe" if request.per_pipe else "whole",
                refittable=request.refittable,
                version_compatible=request.version_compatible,
                weight_streaming=request.weight_streaming,
                calibrator=request.calibrator,
            )
            sources: dict[str, Any] = {"adapter": self.sha256}
            if p is Precision.INT8_QDQ:
                sources["calib"] = self.calib_sha
            if self._times_forms(cfg):
                sources["forms"] = FORMS_RULES
            units.append(
                Unit(
                    cfg,
                    sources,
                    group=cfg.id,
                    topology_key=topology_key(self.topology, cfg, tools, device),
                    extra={"combine_weights": None},
                )
            )
        return units

    def refit_source(
        self, unit: Unit, directory: Path, old: dict[str, Any] | None
    ) -> tuple[Path, dict[str, Any]] | None:
        """A refittable engine of the same topology: in DIR, or in a sibling DIR of the same adapter stem."""
        cfg = unit.config
        if not (cfg.refittable and backend_for(cfg.target).refits):
            return None
        candidates: list[tuple[Path, dict[str, Any] | None]] = [(directory, old)]
        if self.request.out_dir is None:  # default layout: engines/<stem>-<sha8>/ for each retrained version
            for sibling in sorted(directory.parent.glob(f"{self.path.stem}-*")):
                if sibling != directory and sibling.is_dir():
                    with contextlib.suppress(EngineFileError):
                        candidates.append((sibling, read_manifest(sibling)))
        for folder, manifest in candidates:
            for entry in (manifest or {}).get("engines", []):
                if entry.get("topology_key") == unit.topology_key and parts_intact(folder, entry):
                    return folder, entry
        return None

    def _times_forms(self, cfg: EngineConfig) -> bool:
        """Whether this engine is built in every candidate gated form and chosen per bucket."""
        return (
            self.request.forms == "timed"
            and backend_for(cfg.target).times_gated_forms
            and not cfg.per_pipe
            and not cfg.plugin
            and bool(self.config.gated_pipes)
        )

    def _make_timed(self, unit: Unit, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """Every candidate form built; per token bucket the fastest that agrees with the
        baseline (the form the lowering's own rule picks) is kept, one part per chosen form."""
        from prism_deploy.core import tolerances
        from prism_deploy.core.ort_session import make_session
        from prism_deploy.lower import choose_gated_form

        cfg, data = unit.config, self.data
        # the baseline is the graph the lowering's own rule gives (what builds made before the
        # forms were timed): one of the candidates when every gated pipe gets the same form,
        # else "auto" (A and B mixed per pipe) is a candidate too, so the choice is never slower
        auto = {choose_gated_form(spec, cfg.adapter_precision) for spec in self.config.pipes if spec.gated}
        baseline = auto.pop() if len(auto) == 1 else "auto"
        candidates = list(CANDIDATE_FORMS) if baseline != "auto" else ["auto", *CANDIDATE_FORMS]
        built: dict[str, tuple[dict[str, Any], Any]] = {}  # form -> (part, session record)
        for form in candidates:
            stem = f"{cfg.slug}.{form}"
            onnx_path = work / f"{stem}.onnx"
            exported = export_graph(data, onnx_path, cfg, self.request.calib, gated_form=form)
            built[form] = build_part(
                backend_for(cfg.target),
                onnx_path,
                work,
                stem,
                EngineBuild(precision=cfg.precision, source_bytes=exported),
            )
            onnx_path.unlink()
            for extra in work.glob(f"{stem}.onnx.data"):
                extra.unlink()
        sessions = {
            form: make_session(
                work / part["file"],
                session["provider"],
                graph_optimization_level=session["load_graph_optimization_level"],
                session_config=session.get("load_session_config"),
            )
            for form, (part, session) in built.items()
        }
        runs = {form: (lambda x, s=s: s.run(["adapted"], {"hidden": x})[0]) for form, s in sessions.items()}
        records = time_forms(
            runs,
            token_buckets(cfg.profile),
            self.config.in_dim,
            baseline,
            tolerances.adapter(cfg.precision).rel_l2_max,
            self.request.form_timer,
        )
        del sessions, runs
        chosen = list(dict.fromkeys(r["form"] for r in records))
        for form, (part, _) in built.items():
            if form not in chosen:
                (work / part["file"]).unlink()
                if part.get("data_file"):
                    (work / part["data_file"]).unlink()
        unit.extra["forms"] = {
            "candidates": candidates,
            "baseline": baseline,
            "method": "lower quartile of 5-50 calls' seconds on the build machine, one input of "
            "timed_tokens tokens; passed = relative L2 to the baseline form "
            "within the precision's parity bound",
            "buckets": records,
        }
        parts = [{"pipe": None, "pipe_name": None, "form": form, **built[form][0]} for form in chosen]
        return parts, built[chosen[0]][1]

    def make(
        self, unit: Unit, work: Path, directory: Path, refit_from: tuple[Path, dict[str, Any]] | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        cfg = unit.config
        if self._times_forms(cfg):
            return self._make_timed(unit, work)
        data = self.data
        if cfg.per_pipe:  # the loader applies them: one engine per pipe
            unit.extra["combine_weights"] = data.betas()
        pieces: list[tuple[int | None, AdapterTensors]] = (
            [(None, data)] if not cfg.per_pipe else [(i, data.pipe(i)) for i in range(self.config.num_pipes)]
        )
        parts = []
        session = None
        for index, piece in pieces:
            stem = cfg.slug if index is None else f"{cfg.slug}.pipe{index}"
            onnx_path = work / f"{stem}.onnx"
            exported_bytes = export_graph(piece, onnx_path, cfg, self.request.calib)
            refit_part = None
            if refit_from is not None:
                folder, entry = refit_from
                refit_part = folder / next(p for p in entry["parts"] if p["pipe"] == index)["file"]
            request = EngineBuild(
                precision=cfg.precision,
                source_bytes=exported_bytes,
                shapes=cfg.profile.shapes(self.config.in_dim),
                refittable=cfg.refittable,
                version_compatible=cfg.version_compatible,
                weight_streaming=cfg.weight_streaming,
                plugin=cfg.plugin,
                refit_from=refit_part,
                cache_dir=directory,
            )
            part, session = build_part(backend_for(cfg.target), onnx_path, work, stem, request)
            parts.append({"pipe": index, "pipe_name": None if index is None else self.config.pipes[index].name, **part})
        return parts, session


def export_graph(
    adapter: AdapterTensors, path: Path, cfg: EngineConfig, calib: Path | None, gated_form: str = "auto"
) -> int:
    """The lowering (``prism_deploy.lower``), then with the plugin on the fusion pass; the bytes
    written (model and external data)."""
    from prism_deploy.lower import export_onnx

    # ONNX Runtime CPU: INT8 ungated pipes as MatMulNBits, weights read at 8 bits (lower/adapter_onnx.py)
    nbits = backend_for(cfg.target).nbits_export and not cfg.plugin
    if cfg.adapter_precision == "int4" and not nbits:  # int4 is MatMulNBits only (docs/precision.md)
        raise PrismInputError(f"--precision int4: target {cfg.target} has no MatMulNBits (ONNX Runtime CPU only)")
    result = export_onnx(
        adapter,
        path,
        precision=cfg.adapter_precision,
        io_dtype="float32",
        calib=str(calib) if calib is not None else None,
        calibrator=cfg.calibrator,
        gated_form=gated_form,
        ort_nbits=nbits,
    )
    if cfg.plugin and adapter.config.gated_pipes:
        from prism_deploy.fuse import fuse_onnx_file

        fused = fuse_onnx_file(path, path)
        return sum(Path(p).stat().st_size for p in fused["paths"])
    return int(result.bytes)


def build_engines(request: BuildRequest, check: Any = None, log: Any = None) -> BuildResult:
    """``prism-deploy build ADAPTER``: the engines of every requested configuration, checked by
    ``check`` (``prism_deploy.parity.adapter_engine_check``; None: unchecked)."""
    options = BuildOptions(
        out_dir=request.out_dir, target=request.target, check=check, force=request.force, progress=request.progress
    )
    return build(AdapterSource(request), options, log)
