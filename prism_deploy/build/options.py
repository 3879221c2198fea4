"""What one engine is built for: precision, shape profile, plugin, layout, target.

Every user-facing option of ``prism-deploy build`` is parsed here, so that each bad value
becomes one ``PrismInputError`` naming the option (exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prism_deploy.errors import PrismInputError

PRECISIONS = ("fp32", "fp16", "int8", "int8-qdq")
TARGETS = ("trt", "ort-cuda", "ort-cpu")
GPU_TARGETS = ("trt", "ort-cuda")
PLUGIN_MODES = ("auto", "on", "off")
CALIBRATORS = ("max", "percentile")
DEFAULT_BATCH = (1, 4, 32)
DEFAULT_SEQ = (1, 64, 1024)


def default_precisions(target: str) -> tuple[str, ...]:
    """FP16 and weight-only INT8 where a GPU runs them; FP32 on the CPU, which has no fast FP16."""
    return ("fp16", "int8") if target in GPU_TARGETS else ("fp32",)


def parse_range(text: str, option: str) -> tuple[int, int, int]:
    """``MIN:OPT:MAX`` (or one number N for N:N:N) with 1 <= MIN <= OPT <= MAX."""
    parts = text.split(":")
    if len(parts) == 1:
        parts = parts * 3
    try:
        if len(parts) != 3:
            raise ValueError
        lo, opt, hi = (int(p) for p in parts)
    except ValueError:
        raise PrismInputError(f"{option}: {text!r} is not MIN:OPT:MAX (three integers, e.g. 1:8:64)") from None
    if not 1 <= lo <= opt <= hi:
        raise PrismInputError(f"{option}: {text!r} must satisfy 1 <= MIN <= OPT <= MAX")
    return lo, opt, hi


def parse_precisions(text: str) -> tuple[str, ...]:
    """Comma-separated precisions, in the order given, duplicates dropped."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise PrismInputError("--precision: empty list")
    for name in names:
        if name not in PRECISIONS:
            raise PrismInputError(f"--precision: {name!r} is not one of {', '.join(PRECISIONS)}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Profile:
    """The batch and sequence ranges an engine accepts (one TensorRT optimization profile)."""

    batch: tuple[int, int, int] = DEFAULT_BATCH
    seq: tuple[int, int, int] = DEFAULT_SEQ

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
    """One pipe configuration: the command builds one engine (or one per pipe) for each."""

    target: str
    precision: str
    profile: Profile
    plugin: bool
    per_pipe: bool
    refittable: bool = False
    version_compatible: bool = False
    weight_streaming: bool = False
    calibrator: str = "max"

    @property
    def layout(self) -> str:
        return "per-pipe" if self.per_pipe else "whole"

    @property
    def id(self) -> str:
        """Stable, readable identity: also the stem of the engine files."""
        parts = [self.target, self.precision, self.layout, self.profile.slug, "plugin" if self.plugin else "noplugin"]
        if self.precision == "int8-qdq":
            parts.append(f"calib-{self.calibrator}")
        flags = [name for name, on in (("refit", self.refittable), ("vc", self.version_compatible),
                                       ("ws", self.weight_streaming)) if on]
        if flags:
            parts.append("+".join(flags))
        return "/".join(parts)

    @property
    def slug(self) -> str:
        return self.id.replace("/", "_").replace("+", "-")

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "precision": self.precision,
            "layout": self.layout,
            "profile": self.profile.to_json(),
            "plugin": self.plugin,
            "refittable": self.refittable,
            "version_compatible": self.version_compatible,
            "weight_streaming": self.weight_streaming,
            "calibrator": self.calibrator if self.precision == "int8-qdq" else None,
            # engines take and return float32: the precision lives inside the graph
            "io_dtype": "float32",
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> EngineConfig:
        return cls(
            target=obj["target"], precision=obj["precision"], profile=Profile.from_json(obj["profile"]),
            plugin=bool(obj["plugin"]), per_pipe=obj["layout"] == "per-pipe",
            refittable=bool(obj.get("refittable")), version_compatible=bool(obj.get("version_compatible")),
            weight_streaming=bool(obj.get("weight_streaming")), calibrator=obj.get("calibrator") or "max",
        )
