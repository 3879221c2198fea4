"""``export-model ... --calibration-chain CHAIN --hop N``: calibrate a middle or last model on
what it reads in its chain, the upstream adapter's outputs on text (docs/quantized-models.md).

The text goes through the hop's upstream model from its own tokens and then through the hop's
adapter (its reference ``.safetensors``), as ``collect --chain --hop N`` pairs them; the model
exported is the chain's model N+1. Composed here because it joins the reference adapter
(``prism_deploy.reference``) with the transformers models (``prism_deploy.models``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.fsutil import file_sha256


def chain_calibration_inputs(
    chain_file: str, hop: int | None, hf_dir: str, text: str | None
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The embeddings the chain's model ``hop + 1`` reads on calibration ``text`` (default: the
    calibration part of the default corpus), one array per paragraph, and their record."""
    import torch

    from prism_deploy.cli.collect_cmd import hop_models
    from prism_deploy.core import corpus
    from prism_deploy.format.chain_file import read_chain_file
    from prism_deploy.models.collect import hidden_states_on_texts
    from prism_deploy.models.lm_export import CALIBRATION_TOKENS, CALIBRATION_WINDOW
    from prism_deploy.reference import load_adapter

    if hop is None:
        raise PrismInputError("--calibration-chain: needs --hop N, the hop whose adapter feeds this model")
    upstream, model = hop_models(chain_file, hop)
    if Path(model).resolve() != Path(hf_dir).resolve():
        raise PrismInputError(
            f"--hop {hop}: {chain_file}'s model {hop + 1} is {model}, not {hf_dir}; "
            "the model exported must be the one the hop's adapter feeds"
        )
    spec = read_chain_file(chain_file)
    first, second = spec.models[hop - 1], spec.models[hop]
    between = [s for s in spec.adapters if first.index < s.index < second.index]
    if len(between) != 1:
        raise PrismInputError(f"{chain_file}: hop {hop} has {len(between)} adapters; calibration runs one")
    stage = between[0]
    weights = stage.reference if stage.reference is not None else stage.path
    if weights.suffix != ".safetensors" or not weights.is_file():
        raise PrismInputError(
            f"{chain_file}: {stage.label}: calibration runs its adapter file (.safetensors; "
            "give `reference = ...` for a built adapter)"
        )
    if text is None:
        default = corpus.default()
        texts, text_source = list(default.calibration), f"{default.name} (calibration part)"
    else:
        texts = [p.strip() for p in text.split("\n\n") if p.strip()]
        text_source = "--calibration-text"
    adapter = load_adapter(weights)
    hidden = hidden_states_on_texts(upstream, texts, tokens=CALIBRATION_TOKENS, max_seq=CALIBRATION_WINDOW)
    if hidden and hidden[0].shape[1] != adapter.config.in_dim:
        raise PrismInputError(
            f"{chain_file}: {stage.label}: reads {adapter.config.in_dim} wide states, "
            f"model {hop} ({upstream}) gives {hidden[0].shape[1]}"
        )
    with torch.no_grad():
        inputs = [adapter(torch.from_numpy(h)).numpy() for h in hidden]
    return inputs, {
        "source": "chain",
        "chain": str(chain_file),
        "hop": hop,
        "upstream_model": str(upstream),
        "adapter": str(weights),
        "adapter_sha256": file_sha256(weights),
        "text": text_source,
    }
