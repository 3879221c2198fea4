"""What every target backend is: one object per target, the loader and the runner of its engines.

Polygraphy's split, kept small: a backend *builds* an engine from an ONNX graph (compile time,
the builder calls ``build``), *opens* it again (deploy time, the runtime calls ``open`` and
``open_graph``), says whether this machine can run it (``status``, ``check_environment``) and
what it is (``describe``). Every question the rest of the package used to answer with
``if target == ...`` is an attribute here (``provider``, ``gpu``, ``engine_options``, ...), so a
new target is one file beside ``ort_cpu.py``, ``ort_cuda.py`` and ``tensorrt.py`` and one line in
``__init__.py``.

This layer sits below the builder and the runtime (both use it), so it cannot import the
runtime's ``OnnxRunner``: ``open`` and ``open_graph`` are handed the runtime's graph loader
(``OnnxRunner.open``), which keeps ``OnnxRunner`` the one way to run an ONNX graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from prism_deploy.core import targets
from prism_deploy.core.precision import ModelPrecision, Precision
from prism_deploy.core.targets import Target
from prism_deploy.format.engine_manifest import EngineFileError


class AdapterRunner(Protocol):
    """Anything that runs an adapter: ``run(hidden [..., in_dim]) -> adapted [..., out_dim]``.
    Engines, exported graphs, the reference and user objects all offer it; the pipeline and the
    parity check need nothing else."""

    def run(self, hidden: np.ndarray) -> np.ndarray: ...


class GraphLoader(Protocol):
    """The runtime's loader of ONNX graphs (``OnnxRunner.open``)."""

    def __call__(
        self,
        model: Any,
        provider: str = "cpu",
        *,
        threads: int | None = None,
        optimization_level: str | None = None,
        session_config: dict[str, str] | None = None,
    ) -> Any: ...


@dataclass(frozen=True)
class EngineBuild:
    """What one engine is built with besides its ONNX graph; each backend uses what it needs."""

    precision: Precision | ModelPrecision | None = None
    source_bytes: int = 0  # the graph with its external data (large ONNX Runtime models keep theirs apart)
    # the graph keeps its weights in a data file beside it: so does the ONNX Runtime engine (ONNX
    # Runtime would otherwise write the engine with references into the source's data file)
    source_external: bool = False
    # the adapter's ``hidden`` input as (min, opt, max) shapes; models give ``input_shapes``
    # instead: one (name, min, opt, max) per dynamic input
    shapes: tuple[tuple[int, int, int], ...] | None = None
    input_shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...] = ()
    refittable: bool = False
    version_compatible: bool = False
    weight_streaming: bool = False
    plugin: bool = False
    refit_from: Path | None = None  # an engine of the same topology: only its weights are replaced
    cache_dir: Path | None = None  # where a timing cache may be kept (the build folder)


@dataclass
class BuiltEngine:
    """An engine file (or its bytes) in the build's work folder, and what opens it again."""

    engine: bytes | Path
    suffix: str  # of the engine file: ".engine", ".ort.onnx"
    session: dict[str, Any] | None = None  # the manifest's session record (ONNX Runtime)
    data_file: str | None = None  # external initializers beside the engine, by name


class TargetBackend:
    """One target: see the module docstring. Subclasses set the class attributes."""

    target: ClassVar[Target]
    # the ONNX Runtime provider of this target's model graphs and ONNX adapters (TensorRT
    # pipelines run their model graphs on ONNX Runtime CUDA)
    provider: ClassVar[str]
    gpu: ClassVar[bool]
    tool: ClassVar[str]  # in words, for messages: "ONNX Runtime", "TensorRT"
    # the build options only this target's engines take (the rest refuse them)
    engine_options: ClassVar[frozenset[str]] = frozenset()
    fuses_plugin: ClassVar[bool] = False  # gated pipes can be fused into the tile_dispatch plugin
    refits: ClassVar[bool] = False  # a refittable engine's weights can be replaced in place
    times_gated_forms: ClassVar[bool] = False  # builds time every gated form per token bucket
    nbits_export: ClassVar[bool] = False  # INT8 ungated pipes exported as MatMulNBits
    takes_nbits_models: ClassVar[bool] = True  # model graphs in the nbits (MatMulNBits) form build
    opens_model_graphs: ClassVar[bool] = True  # a built model graph can be opened (and checked)
    answers_zero_tokens: ClassVar[bool] = True  # the engine itself answers a call of zero tokens
    triton_platform: ClassVar[tuple[str, str]] = ("onnxruntime_onnx", "model.onnx")  # (platform, file)

    @property
    def runtime_tool(self) -> str:
        """The tool whose version must match between build and load."""
        return self.target.runtime_tool

    def __str__(self) -> str:
        return self.target.value

    def status(self) -> tuple[bool, str]:
        """Whether this target can build and run engines here, and why (not)."""
        return targets.target_status(self.target)

    def describe(self) -> dict[str, Any]:
        """What this target is, on this machine: for reports and benchmark records."""
        return {
            "target": self.target.value,
            "provider": self.provider,
            "tools": {k: v for k, v in targets.tool_versions(self.target).items() if k == self.runtime_tool},
        }

    def check_environment(self, entry: dict[str, Any]) -> None:
        """Refuse an engine built with another runtime version (``EngineFileError``)."""
        tool = self.runtime_tool
        built = entry["tools"].get(tool)
        here = self._version_here(entry, built)
        if built != here:
            raise EngineFileError(
                f"engine {entry['id']}: built with {tool} {built}, this environment has "
                f"{here}; rebuild with `prism-deploy build`"
            )

    def _version_here(self, entry: dict[str, Any], built: Any) -> Any:
        return targets.tool_versions(self.target).get(self.runtime_tool)

    def build(self, onnx_path: Path, work: Path, stem: str, request: EngineBuild) -> BuiltEngine:
        """Build ``onnx_path`` into an engine in ``work`` (a refused graph: ``CheckFailed``)."""
        raise NotImplementedError

    def open(self, path: Path, entry: dict[str, Any], load_graph: GraphLoader, out_dim: int) -> Any:
        """An adapter engine of ``entry`` at ``path``, ready to ``run(hidden)`` and say ``widths()``."""
        raise NotImplementedError

    def open_graph(
        self, path: Path, entry: dict[str, Any], load_graph: GraphLoader, *, threads: int | None = None
    ) -> Any:
        """A built model graph of ``entry`` at ``path``, as an ``OnnxRunner``."""
        raise EngineFileError(f"engine {entry['id']}: no {self.tool} runner for model graphs yet")


def cuda_tensor(hidden: Any) -> Any | None:
    """A torch CUDA tensor viewing ``hidden`` (torch, or any DLPack producer on a GPU), else None.
    torch is imported only when such a tensor is given: host callers never need it."""
    if isinstance(hidden, np.ndarray) or not hasattr(hidden, "__dlpack__"):
        return None
    if getattr(getattr(hidden, "device", None), "type", None) == "cpu":
        return None
    import torch

    x = hidden if isinstance(hidden, torch.Tensor) else torch.from_dlpack(hidden)
    return x if x.is_cuda else None
