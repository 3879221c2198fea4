"""What one engine is built for: target, precision, shape profile, layout, plugin, engine flags.

``EngineConfig`` is the one settings object of an engine (Torch-TensorRT's one-settings-dataclass
idea): its ``id`` names the engine in the manifest and in file names, its ``to_json`` enters
the cache key. Every user-facing option of ``prism-deploy build`` is parsed here, so that each
bad value becomes one ``PrismInputError`` naming the option (exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prism_deploy.core import defaults
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.precision import CALIBRATORS, ModelPrecision, Precision
from prism_deploy.core.targets import Target
from prism_deploy.format.engine_manifest import PROFILE_MAX

PLUGIN_MODES = ("auto", "on", "off")
# Largest batch or sequence a profile may name: far beyond any engine, small enough that no
# shape arithmetic downstream overflows.
# What part of its source an engine holds: an adapter whole or one engine per pipe, or one
# graph of an exported model.
ADAPTER_LAYOUTS = ("whole", "per-pipe")


def default_precisions(target: Target | str) -> tuple[Precision, ...]:
    """The precisions a build for ``target`` makes when none is named (core/defaults)."""
    return defaults.GPU_BUILD_PRECISIONS if Target(target).gpu else defaults.CPU_BUILD_PRECISIONS


def parse_range(text: str, option: str) -> tuple[int, int, int]:
    """``MIN:OPT:MAX`` (or one number N for N:N:N) with 1 <= MIN <= OPT <= MAX <= 2^20."""
    parts = str(text).split(":")
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise PrismInputError(f"{option}: {text!r} is not MIN:OPT:MAX (three integers, e.g. 1:8:64)")
    if any(len(p.strip()) > 9 for p in parts):  # far past PROFILE_MAX, and no int() of 250 digits
        raise PrismInputError(f"{option}: {text!r}: MAX must be at most {PROFILE_MAX}")
    lo, opt, hi = (int(p) for p in parts)
    if not 1 <= lo <= opt <= hi:
        raise PrismInputError(f"{option}: {text!r} must satisfy 1 <= MIN <= OPT <= MAX")
    if hi > PROFILE_MAX:
        raise PrismInputError(f"{option}: {text!r}: MAX must be at most {PROFILE_MAX}")
    return lo, opt, hi


@dataclass(frozen=True)
class Profile:
    """The batch and sequence ranges an engine accepts (one TensorRT optimization profile)."""

    batch: tuple[int, int, int] = defaults.BATCH_RANGE
    seq: tuple[int, int, int] = defaults.SEQ_RANGE

    def shapes(self, in_dim: int) -> tuple[tuple[int, int, int], ...]:
        """(min, opt, max) shapes of the ``hidden`` input ``[batch, seq, in_dim]``."""
        return tuple((self.batch[i], self.seq[i], in_dim) for i in range(3))

    @property
    def slug(self) -> str:
        return f"b{'-'.join(map(str, self.batch))}.s{'-'.join(map(str, self.seq))}"

    def to_json(self) -> dict[str, list[int]]:
        return {"batch": list(self.batch), "seq": list(self.seq)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Profile:
        return cls(tuple(obj["batch"]), tuple(obj["seq"]))


@dataclass(frozen=True)
class EngineConfig:
    """One engine to build: what it holds (``layout``) and everything it is built with.

    ``precision`` is typed: an adapter engine's ``Precision``, a model graph's ``ModelPrecision``
    (what its ``model.json`` says); both serialise as their plain names."""

    target: Target
    precision: Precision | ModelPrecision
    profile: Profile
    plugin: bool = False
    layout: str = "whole"  # "whole" | "per-pipe" (adapters) | the graph key of a model ("graph", ...)
    refittable: bool = False
    version_compatible: bool = False
    weight_streaming: bool = False
    calibrator: str = defaults.CALIBRATOR

    def __post_init__(self) -> None:
        # the settings object is an edge of the API: a name given here is parsed once, here
        if not isinstance(self.precision, (Precision, ModelPrecision)):
            kind = Precision if self.layout in ADAPTER_LAYOUTS else ModelPrecision
            object.__setattr__(self, "precision", kind.parse(self.precision, "precision"))

    @property
    def adapter_precision(self) -> Precision:
        """The precision of an adapter engine (a model graph's engine has a ``ModelPrecision``)."""
        if not isinstance(self.precision, Precision):
            raise TypeError(f"{self.layout}: a model graph's engine, of model precision {self.precision}")
        return self.precision

    @property
    def per_pipe(self) -> bool:
        return self.layout == "per-pipe"

    @property
    def id(self) -> str:
        """Stable, readable identity: the manifest's key and the stem of the engine files."""
        parts = [
            str(self.target),
            self.precision.value,
            self.layout,
            self.profile.slug,
            "plugin" if self.plugin else "noplugin",
        ]
        if self.precision is Precision.INT8_QDQ:
            parts.append(f"calib-{self.calibrator}")
        flags = [
            name
            for name, on in (("refit", self.refittable), ("vc", self.version_compatible), ("ws", self.weight_streaming))
            if on
        ]
        if flags:
            parts.append("+".join(flags))
        return "/".join(parts)

    @property
    def slug(self) -> str:
        return self.id.replace("/", "_").replace("+", "-")

    def to_json(self) -> dict[str, Any]:
        graph = {} if self.layout in ADAPTER_LAYOUTS else {"graph": self.layout}  # model entries name their graph
        return {
            **graph,
            "target": str(self.target),
            "precision": self.precision.value,
            "layout": self.layout,
            "profile": self.profile.to_json(),
            "plugin": self.plugin,
            "refittable": self.refittable,
            "version_compatible": self.version_compatible,
            "weight_streaming": self.weight_streaming,
            "calibrator": self.calibrator if self.precision is Precision.INT8_QDQ else None,
            # engines take and return float32 adapters' I/O; model graphs keep their own types
            "io_dtype": "float32" if self.layout in ADAPTER_LAYOUTS else None,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> EngineConfig:
        return cls(
            target=obj["target"],
            precision=obj["precision"],
            profile=Profile.from_json(obj["profile"]),
            plugin=bool(obj.get("plugin")),
            layout=str(obj.get("layout", "whole")),
            refittable=bool(obj.get("refittable")),
            version_compatible=bool(obj.get("version_compatible")),
            weight_streaming=bool(obj.get("weight_streaming")),
            calibrator=obj.get("calibrator") or defaults.CALIBRATOR,
        )


def check_calibrator(calibrator: str) -> str:
    if calibrator not in CALIBRATORS:
        raise PrismInputError(f"--calibrator: {calibrator!r} is not one of {', '.join(CALIBRATORS)}")
    return calibrator
