"""The adapter's configuration (the ``config`` metadata entry of format v1), validated.

Everything here is plain Python: no tensors. ``AdapterConfig.from_json`` is the single place
where a config object from a file or a user is checked against docs/adapter-format.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from prism_deploy.core import jsontext
from prism_deploy.core.errors import AdapterFormatError
from prism_deploy.core.limits import FLOAT32_MAX
from prism_deploy.core.tiles import padded_shape, real_blocks

FORMAT_NAME = "prism-adapter"
FORMAT_VERSION = "1"
COMBINE_MODES = ("sum", "weighted")


@dataclass(frozen=True)
class PipeSpec:
    """One pipe: a grid of ``R x C`` workers, each a ``tr x tc`` tile, optionally gated."""

    name: str
    grid: tuple[int, int]  # (R row-blocks over the output, C column-blocks over the input)
    tile: tuple[int, int]  # (tr output rows, tc input columns)
    top_k: int | None = None  # None: ungated, every worker always on
    gate_scale: float = 1.0

    @property
    def rows(self) -> int:
        return self.grid[0]

    @property
    def cols(self) -> int:
        return self.grid[1]

    @property
    def tile_rows(self) -> int:
        return self.tile[0]

    @property
    def tile_cols(self) -> int:
        return self.tile[1]

    @property
    def workers(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def gated(self) -> bool:
        return self.top_k is not None

    @property
    def padded_in(self) -> int:
        return padded_shape(self.grid, self.tile)[1]

    @property
    def padded_out(self) -> int:
        return padded_shape(self.grid, self.tile)[0]

    @property
    def tile_params(self) -> int:
        return self.workers * self.tile[0] * self.tile[1]

    @property
    def active_workers(self) -> int:
        """Workers that run for one token: ``top_k`` when gated, all of them otherwise."""
        return self.top_k if self.top_k is not None else self.workers

    def padding_blocks(self, in_dim: int, out_dim: int) -> tuple[list[int], list[int]]:
        """Row-blocks wholly past ``out_dim`` and column-blocks wholly past ``in_dim``."""
        rows = list(range(min(self.rows, real_blocks(out_dim, self.tile_rows)), self.rows))
        cols = list(range(min(self.cols, real_blocks(in_dim, self.tile_cols)), self.cols))
        return rows, cols

    def padding_workers(self, in_dim: int, out_dim: int) -> list[int]:
        """Workers whose tile lies wholly in the padding (legal, but pure waste)."""
        rows, cols = self.padding_blocks(in_dim, out_dim)
        row_set, col_set = set(rows), set(cols)
        return [r * self.cols + c for r in range(self.rows) for c in range(self.cols) if r in row_set or c in col_set]

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "name": self.name,
            "grid": list(self.grid),
            "tile": list(self.tile),
            "top_k": self.top_k,
        }
        if self.gated:
            obj["gate_scale"] = self.gate_scale
        return obj


@dataclass(frozen=True)
class AdapterConfig:
    in_dim: int
    out_dim: int
    pipes: tuple[PipeSpec, ...]
    combine: str = "sum"
    # provenance: the models the adapter maps between (the file's "source" and "target" keys;
    # named apart from a build's --target, the deployment backend)
    source_model: dict[str, Any] | None = field(default=None, compare=False)
    target_model: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Constructed in code (not from JSON) configs go through the same checks.
        _validate(self)

    @property
    def num_pipes(self) -> int:
        return len(self.pipes)

    @property
    def gated_pipes(self) -> list[int]:
        return [i for i, p in enumerate(self.pipes) if p.gated]

    def expected_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor a v1 file with this config must hold, and no other."""
        shapes: dict[str, tuple[int, ...]] = {}
        for i, p in enumerate(self.pipes):
            shapes[f"pipes.{i}.tiles"] = (p.workers, p.tile_rows, p.tile_cols)
            if p.gated:
                shapes[f"pipes.{i}.gate.weight"] = (p.workers, self.in_dim)
                shapes[f"pipes.{i}.gate.bias"] = (p.workers,)
        if self.combine == "weighted":
            shapes["combine.weight"] = (self.num_pipes,)
        return shapes

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "combine": self.combine,
            "pipes": [p.to_json() for p in self.pipes],
        }
        if self.source_model is not None:
            obj["source"] = self.source_model
        if self.target_model is not None:
            obj["target"] = self.target_model
        return obj

    def topology(self) -> dict[str, Any]:
        """What fixes the structure of a lowered graph or engine: the same topology with other
        weights is the same graph with other initializers (a refit, not a rebuild)."""
        return {
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "combine": self.combine,
            "pipes": [
                {
                    "name": p.name,
                    "grid": list(p.grid),
                    "tile": list(p.tile),
                    "top_k": p.top_k,
                    "gate_scale": p.gate_scale if p.gated else None,
                }
                for p in self.pipes
            ],
        }

    def dumps(self) -> str:
        try:
            return jsontext.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        except ValueError as exc:  # NaN or an infinity in a note: the file would not be JSON
            raise AdapterFormatError(f"config: {exc} (a note holds NaN or an infinity)") from None

    @classmethod
    def from_json(cls, obj: Any) -> AdapterConfig:
        """Parse and validate a config object; every error names the offending key."""
        if not isinstance(obj, dict):
            raise AdapterFormatError("config: must be a JSON object")
        known = {"in_dim", "out_dim", "combine", "pipes", "source", "target"}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise AdapterFormatError(f"config: unknown key(s) {unknown}")
        in_dim = _positive_int(obj, "in_dim", "config")
        out_dim = _positive_int(obj, "out_dim", "config")
        combine = obj.get("combine", "sum")
        if combine not in COMBINE_MODES:
            raise AdapterFormatError(f"config.combine: {combine!r} is not one of {list(COMBINE_MODES)}")
        raw_pipes = obj.get("pipes")
        if not isinstance(raw_pipes, list) or not raw_pipes:
            raise AdapterFormatError("config.pipes: must be a non-empty list")
        pipes = tuple(_parse_pipe(p, i) for i, p in enumerate(raw_pipes))
        extras = {}
        for key in ("source", "target"):
            value = obj.get(key)
            if value is not None and not isinstance(value, dict):
                raise AdapterFormatError(f"config.{key}: must be a JSON object")
            extras[key] = value
        return cls(in_dim, out_dim, pipes, combine, extras["source"], extras["target"])

    @classmethod
    def loads(cls, text: str) -> AdapterConfig:
        return cls.from_json(jsontext.loads(text, "config", AdapterFormatError))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise AdapterFormatError(f"{where}.name: must be a non-empty string")
    if not _is_utf8(name):  # a lone surrogate (legal in JSON escapes) cannot be printed
        raise AdapterFormatError(f"{where}.name: {name!r} is not valid Unicode text")
    return name


def _positive_int(obj: dict[str, Any], key: str, where: str) -> int:
    if key not in obj:
        raise AdapterFormatError(f"{where}.{key}: missing")
    value = obj[key]
    if not _is_int(value) or value <= 0:
        raise AdapterFormatError(f"{where}.{key}: must be a positive integer, got {value!r}")
    return int(value)


def _int_pair(obj: dict[str, Any], key: str, where: str) -> tuple[int, int]:
    value = obj.get(key)
    if not isinstance(value, list) or len(value) != 2 or not all(_is_int(v) and v > 0 for v in value):
        raise AdapterFormatError(f"{where}.{key}: must be a list of two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _parse_pipe(obj: Any, index: int) -> PipeSpec:
    where = f"config.pipes[{index}]"
    if not isinstance(obj, dict):
        raise AdapterFormatError(f"{where}: must be a JSON object")
    unknown = sorted(set(obj) - {"name", "grid", "tile", "top_k", "gate_scale"})
    if unknown:
        raise AdapterFormatError(f"{where}: unknown key(s) {unknown}")
    name = _check_name(obj.get("name"), where)
    grid = _int_pair(obj, "grid", where)
    tile = _int_pair(obj, "tile", where)
    if "top_k" not in obj:
        raise AdapterFormatError(f"{where}.top_k: missing (use null for an ungated pipe)")
    top_k = obj["top_k"]
    if top_k is not None and not _is_int(top_k):
        raise AdapterFormatError(f"{where}.top_k: must be an integer or null, got {top_k!r}")
    gate_scale = obj.get("gate_scale", 1.0)
    # A writer that emits the default for every pipe is harmless; any other value on an
    # ungated pipe (where no gate weight exists to scale) is a mistake worth naming.
    if top_k is None and "gate_scale" in obj and gate_scale != 1.0:
        raise AdapterFormatError(f"{where}.gate_scale: only a gated pipe has a gate_scale (got {gate_scale!r})")
    if not isinstance(gate_scale, (int, float)) or isinstance(gate_scale, bool):
        raise AdapterFormatError(f"{where}.gate_scale: must be a number, got {gate_scale!r}")
    try:
        gate_scale = float(gate_scale)
    except OverflowError:  # an integer literal too large for a float
        raise AdapterFormatError(f"{where}.gate_scale: must be finite, got an integer too large for a float") from None
    return PipeSpec(name, grid, tile, top_k, gate_scale)


def _validate(cfg: AdapterConfig) -> None:
    if not (_is_int(cfg.in_dim) and cfg.in_dim > 0):
        raise AdapterFormatError(f"config.in_dim: must be a positive integer, got {cfg.in_dim!r}")
    if not (_is_int(cfg.out_dim) and cfg.out_dim > 0):
        raise AdapterFormatError(f"config.out_dim: must be a positive integer, got {cfg.out_dim!r}")
    if cfg.combine not in COMBINE_MODES:
        raise AdapterFormatError(f"config.combine: {cfg.combine!r} is not one of {list(COMBINE_MODES)}")
    if not cfg.pipes:
        raise AdapterFormatError("config.pipes: must be a non-empty list")
    names: set[str] = set()
    for i, p in enumerate(cfg.pipes):
        where = f"config.pipes[{i}]"
        _check_name(p.name, where)  # a writer never writes a name the loader refuses
        if p.name in names:
            raise AdapterFormatError(f"{where}.name: {p.name!r} is not unique")
        names.add(p.name)
        if p.padded_in < cfg.in_dim:
            raise AdapterFormatError(
                f"{where}: grid {list(p.grid)} of {list(p.tile)} tiles spans {p.padded_in} input "
                f"columns (C*tc), fewer than in_dim={cfg.in_dim}"
            )
        if p.padded_out < cfg.out_dim:
            raise AdapterFormatError(
                f"{where}: grid {list(p.grid)} of {list(p.tile)} tiles spans {p.padded_out} output "
                f"rows (R*tr), fewer than out_dim={cfg.out_dim}"
            )
        if p.top_k is not None and not (1 <= p.top_k <= p.workers):
            raise AdapterFormatError(f"{where}.top_k: {p.top_k} is out of range [1, {p.workers}] (R*C)")
        if not math.isfinite(p.gate_scale) or abs(p.gate_scale) > FLOAT32_MAX:
            # the gate's logits are scaled in float32: a larger value is infinite there
            raise AdapterFormatError(
                f"{where}.gate_scale: must be finite in float32 (|x| <= {FLOAT32_MAX:.6g}), got {p.gate_scale!r}"
            )
