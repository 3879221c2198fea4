"""The one greedy decoding loop: a chain's, a graph's, and the served ``generate`` models'.

Every caller runs its prefix its own way (in process, or through Triton by Business Logic
Scripting) and hands the loop the logits of the prefix's last position; the loop picks tokens
and asks the caller's ``step`` for the next logits, so one set of rules holds everywhere:

- the token is the argmax of the logits (a graph's step returns its fused log-probabilities:
  several last models, one distribution, so the multi-head case is the caller's step);
- with ``eos_token_id``, a finished row keeps emitting it and the loop stops once every row has
  finished;
- at most ``max_new_tokens`` tokens; no step runs after the last one is chosen;
- each step extends the attention mask by one real position (the chosen token), so the mask
  ``step`` receives covers past + new positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

# step(tokens [batch], attention mask [batch, past + 1]) -> the next logits [batch, vocab]
Step = Callable[[np.ndarray, np.ndarray], Any]


def greedy_tokens(
    logits: Any, attention_mask: np.ndarray, step: Step, max_new_tokens: int, eos_token_id: int | None = None
) -> Iterator[np.ndarray]:
    """The chosen tokens [batch], one per step, starting from the prefix's last-position
    ``logits`` [batch, vocab] under ``attention_mask`` [batch, prefix]."""
    mask = attention_mask
    batch = mask.shape[0]
    finished = np.zeros(batch, dtype=bool)
    token = logits.argmax(-1)
    for i in range(max_new_tokens):
        if eos_token_id is not None:
            token = np.where(finished, eos_token_id, token)
            finished |= token == eos_token_id
        yield token
        if i == max_new_tokens - 1 or finished.all():
            return
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        token = step(token, mask).argmax(-1)
