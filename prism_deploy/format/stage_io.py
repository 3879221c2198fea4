"""The stage I/O contract of a chain: what each kind of stage takes and gives, written once.

A chain is ``first, adapter, (middle, adapter)*, last``; each stage hands its output to the
next. This table is the one description of that hand-off (names, dtypes, named dims); the
others are read from it: ``model.json``'s ``io`` record and the role's input and output names
(:mod:`prism_deploy.format.model_folder`, which the exporter writes and the runtime's
``ModelStage`` feeds), and the Triton side (the stage and decode configs of
:mod:`prism_deploy.serving.stage_runtime`, the names :mod:`prism_deploy.serving.backend` and the
ensembles read and write).

Dims are named: ``batch``, ``seq`` (the positions of this call), ``total_seq`` / ``past_seq``
(a decoding step's past + new and past positions) and widths: a model's ``hidden``, ``vocab``,
``kv_heads`` and ``head_dim`` (``model.json``'s ``dims``), an adapter's ``in_dim`` and
``out_dim`` (its config). Dtypes are the interface's: ids and masks int64, floats float32 (a
float16 graph's runner casts at its door).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("first", "adapter", "middle", "last")  # in the order a chain holds them


@dataclass(frozen=True)
class StageTensor:
    """One tensor of the contract: its name, numpy dtype name and named dims (batch first)."""

    name: str
    dtype: str
    dims: tuple[str, ...]

    def sized(self, sizes: dict[str, int]) -> list[int]:
        """The dims as numbers: the named widths from ``sizes``, every other dim -1 (free)."""
        return [int(sizes[d]) if d in sizes else -1 for d in self.dims]


_IDS = StageTensor("input_ids", "int64", ("batch", "seq"))
_MASK = StageTensor("attention_mask", "int64", ("batch", "seq"))
_EMBEDS = StageTensor("inputs_embeds", "float32", ("batch", "seq", "hidden"))
_HIDDEN = StageTensor("hidden", "float32", ("batch", "seq", "hidden"))

# kind -> (inputs, outputs); the first input is what the stage before hands over. An adapter's
# names are its graph's own (core.onnx_io.INPUT_NAME, OUTPUT_NAME; not imported: that module
# needs onnx, which the serving backend's environment may lack).
STAGE_IO: dict[str, tuple[tuple[StageTensor, ...], tuple[StageTensor, ...]]] = {
    "first": ((_IDS, _MASK), (_HIDDEN,)),
    "adapter": (
        (StageTensor("hidden", "float32", ("batch", "seq", "in_dim")),),
        (StageTensor("adapted", "float32", ("batch", "seq", "out_dim")),),
    ),
    "middle": ((_EMBEDS, _MASK), (_HIDDEN,)),
    "last": ((_EMBEDS, _MASK), (StageTensor("logits", "float32", ("batch", "seq", "vocab")),)),
}


def input_names(kind: str) -> tuple[str, ...]:
    """What a stage of ``kind`` reads, in order (the handed-over tensor first, then the mask)."""
    return tuple(t.name for t in STAGE_IO[kind][0])


def output_name(kind: str) -> str:
    """What a stage of ``kind`` gives the next one."""
    return STAGE_IO[kind][1][0].name


def past_names(layers: int, prefix: str = "past_key_values") -> list[str]:
    """The KV-cache inputs (``past_key_values``) or outputs (``present``) of the decoding graph."""
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def decode_io(layers: int) -> tuple[tuple[StageTensor, ...], tuple[StageTensor, ...]]:
    """The last model's KV-cache graph (``graph_with_past``): the new positions' embeddings, the
    mask over past + new positions and the past cache -> logits and the grown cache."""
    kv_in = ("batch", "kv_heads", "past_seq", "head_dim")
    kv_out = ("batch", "kv_heads", "total_seq", "head_dim")
    inputs = (
        _EMBEDS,
        StageTensor("attention_mask", "int64", ("batch", "total_seq")),
        *(StageTensor(n, "float32", kv_in) for n in past_names(layers)),
    )
    outputs = (STAGE_IO["last"][1][0], *(StageTensor(n, "float32", kv_out) for n in past_names(layers, "present")))
    return inputs, outputs
