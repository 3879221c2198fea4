"""Running a model folder of the ``ort`` graph form (docs/model-forms.md).

One graph per role, with ONNX Runtime's fused operators; its ``GroupQueryAttention`` takes a KV
cache that past and present share. Plain calls feed an empty past. Generation preallocates one
buffer per layer's key and value at the run's maximum length, ``[batch, kv_heads, max_seq,
head_dim]``, and binds it (IO binding) as both the past input and the present output: each step
writes its new positions in place, with no allocation or copy of the cache per step. The
generation keeps one IO binding (docs/model-forms.md, "The step loop"). On the CPU a decode step
(one new token per row, after the first such step) binds only what must change: the mask, whose
shape grows by one each step, and the step's own logits array. Its input goes by a copy into a
buffer bound once, and ``logits_start`` stays bound, so the Python around the graph run (the part
of a step ONNX Runtime GenAI does in C++) is a few numpy calls and two binds.

GroupQueryAttention counts a row's real tokens from position 0 (right padding); this project's
batches are left-padded. The runner feeds each row rolled left by its padding
(:func:`prism_deploy.format.model_folder.right_padding_shifts`) and gives results back in the
caller's layout, so the ``ort`` form is a drop-in for the portable one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prism_deploy.format.model_folder import LOGITS_START, past_names, right_padding_shifts, roll_rows
from prism_deploy.format.model_folder import OUTPUT_ORT_FORM as OUTPUT
from prism_deploy.runtime.onnx_runner import OnnxRunner, host, shape_of


class KvCache:
    """One generation's cache: per past name an OrtValue ``[batch, kv_heads, max_seq, head_dim]``,
    bound as past and present at once, and each row's left padding (fixed at the prefill).

    It also holds the generation's one IO binding (the past/present buffers bound once, each step
    rebinding only its input, mask and logits) and a mask buffer of ``batch * max_seq`` whose
    first ``batch * length`` entries are each step's mask: the step's Python work stays a few
    binds instead of a new binding, mask and copies per token. On the CPU the first decode step
    makes ``step_input``, the ``[batch, 1, hidden]`` input buffer the binding keeps pointing at
    (with ``logits_start``) for every later decode step."""

    def __init__(self, values: dict[str, Any], batch: int) -> None:
        self.values = values
        self.batch = batch
        self.shifts: np.ndarray | None = None  # set by the prefill
        self.binding: Any = None  # made by the first step
        self.real = np.zeros(batch, dtype=np.int64)  # each row's real tokens so far (set by the prefill)
        self.real_column = self.real[:, None]  # a view of ``real`` as [batch, 1], the mask's comparand
        self.length = 0  # the mask's length so far, padding included
        self.mask_buffer = np.empty(0, dtype=np.int64)  # made by the prefill
        self.mask_address = 0  # where mask_buffer's data lies, for binding it by pointer
        # the host arrays the binding points at, kept alive until the next step rebinds them
        self.bound: tuple[np.ndarray, ...] = ()
        # the decode steps' input buffer, bound once (CPU only; None until the first decode step)
        self.step_input: np.ndarray | None = None


class OrtFormGraph:
    """An ``ort``-form graph: ``run(x, mask)`` (an empty past) and ``step(x, mask, cache)``."""

    def __init__(self, runner: OnnxRunner, role: str, dims: dict[str, Any], max_seq: int) -> None:
        self.runner = runner
        self.session = runner.session
        self.device = runner.device
        self.role = role
        self.layers, self.kv_heads, self.head_dim = int(dims["layers"]), int(dims["kv_heads"]), int(dims["head_dim"])
        self.max_seq = max_seq
        self.input_name = "input_ids" if role == "first" else "inputs_embeds"
        self.output_name = OUTPUT[role]
        self.names = past_names(self.layers)
        self.presents = past_names(self.layers, "present")
        self.dtype = runner.input_dtype(self.names[0]) or np.dtype(np.float32)
        self._arange: np.ndarray | None = None
        self.vocab = int(dims["vocab"])
        self.output_dtype = runner.output_dtype(self.output_name) or np.dtype(np.float32)
        # a last graph that takes logits_start: a step computes logits at the positions it reads only
        self.selects_positions = LOGITS_START in runner.optional_inputs
        self._starts: dict[int, np.ndarray] = {}
        # the dtype a step's input is cast to (runner.feed's cast), None where it is fed as given
        self._input_cast = runner.input_dtype(self.input_name)

    def input_dtype(self, name: str) -> np.dtype | None:
        return self.runner.input_dtype(name)

    def run(self, x: Any, attention_mask: Any) -> np.ndarray:
        """The role's output over every position, in the caller's (left-padded) layout."""
        mask = np.asarray(host(attention_mask), dtype=np.int64)
        shifts = right_padding_shifts(mask)
        empty = np.zeros((mask.shape[0], self.kv_heads, 0, self.head_dim), dtype=self.dtype)
        feeds = {
            self.input_name: roll_rows(host(x), shifts),
            "attention_mask": roll_rows(mask, shifts),
            **{n: empty for n in self.names},
        }
        out = self.runner.run(feeds, [self.output_name])[self.output_name]
        return roll_rows(out, shifts, sign=1)

    def new_cache(self, batch: int) -> KvCache:
        """Zeroed buffers at the maximum length, on the session's device."""
        import onnxruntime as ort

        shape = (batch, self.kv_heads, self.max_seq, self.head_dim)
        # on the CPU the OrtValue wraps the numpy array (and keeps it alive): no copy
        values = {
            n: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self.dtype), self.device, 0) for n in self.names
        }
        return KvCache(values, batch)

    def step(self, x: Any, attention_mask: Any, cache: KvCache) -> np.ndarray:
        """Logits of each row's last position [batch, vocab]; the new positions written into
        ``cache`` in place. The first call is the prefill (any left padding); later calls add
        real tokens only. ``attention_mask`` covers past + new tokens, left-padded as elsewhere.

        Each call returns a new array: logits kept from earlier steps stay as they were."""
        buffer = cache.step_input
        if buffer is not None:
            x = host(x)
            if x.shape == buffer.shape and (self._input_cast is not None or x.dtype == buffer.dtype):
                return self._decode_step(x, attention_mask, cache, buffer)
        return self._step(x, attention_mask, cache)

    def _decode_step(self, x: np.ndarray, attention_mask: Any, cache: KvCache, buffer: np.ndarray) -> np.ndarray:
        """A CPU decode step once the binding holds the input buffer and ``logits_start``: the
        input copied into the buffer, the grown mask and a new logits array bound, the run."""
        length = int(shape_of(attention_mask)[1])
        if length > self.max_seq:
            raise ValueError(f"{length} tokens exceed the cache's {self.max_seq}")
        if length != cache.length + 1:
            raise ValueError(f"a mask of {length} tokens after {cache.length} cached and 1 new")
        cache.real += 1
        cache.length = length
        np.copyto(buffer, x, casting="unsafe")  # runner.feed's cast, into the bound buffer
        batch = buffer.shape[0]
        feed_mask = cache.mask_buffer[: batch * length].reshape(batch, length)
        np.less(self._positions(length), cache.real_column, out=feed_mask, casting="unsafe")
        logits = np.empty((batch, 1, self.vocab), dtype=self.output_dtype)
        binding = cache.binding
        # the mask by the buffer's address, known since the prefill (numpy's ctypes.data is slow)
        binding.bind_input("attention_mask", "cpu", 0, feed_mask.dtype, [batch, length], cache.mask_address)
        self._bind_array(binding.bind_output, self.output_name, logits)
        cache.bound = (buffer, feed_mask, logits)
        self.session.run_with_iobinding(binding)
        return logits[:, 0]

    def _step(self, x: Any, attention_mask: Any, cache: KvCache) -> np.ndarray:
        """Any step: the prefill, a step of several tokens, any step off the CPU, and the first
        decode step, which binds the input buffer and ``logits_start`` that later ones keep."""
        import onnxruntime as ort

        length = int(shape_of(attention_mask)[1])
        if length > self.max_seq:
            raise ValueError(f"{length} tokens exceed the cache's {self.max_seq}")
        x = host(x)
        batch, new = int(x.shape[0]), int(x.shape[1])
        prefill = cache.shifts is None
        if prefill:
            mask = np.asarray(host(attention_mask), dtype=np.int64)
            shifts = cache.shifts = right_padding_shifts(mask)
            x = roll_rows(x, shifts)
            cache.real = mask.sum(axis=1)
            cache.real_column = cache.real[:, None]
            cache.mask_buffer = np.empty(batch * self.max_seq, dtype=np.int64)
            cache.mask_address = cache.mask_buffer.ctypes.data
            cache.binding = self._bind_cache(cache)
        elif length != cache.length + new:
            raise ValueError(f"a mask of {length} tokens after {cache.length} cached and {new} new")
        else:
            cache.real += new  # later calls add real tokens only
        cache.length = length
        # right-padded: each row's real tokens counted from position 0, written into the buffer
        feed_mask = cache.mask_buffer[: batch * length].reshape(batch, length)
        np.less(self._positions(length), cache.real_column, out=feed_mask, casting="unsafe")
        binding = cache.binding
        value = np.ascontiguousarray(self.runner.feed(self.input_name, x))
        # the positions whose logits are read: each row's last real one. The prefill's rows are fed
        # right-padded and end early by their padding; later steps add real tokens only.
        keep = new
        if self.selects_positions:
            keep = min(new, int(shifts.max()) + 1) if prefill else 1
        # the step's logits land in an array made here (one allocation, no copy out of ONNX Runtime)
        logits = np.empty((batch, keep, self.vocab), dtype=self.output_dtype)
        start = self._start(keep)
        if self.device == "cpu":  # bind the host arrays where they are: no OrtValue per step
            cache.step_input = None
            if not prefill and new == 1:  # the decode steps' input buffer, bound from here on
                value = cache.step_input = value.copy()
            self._bind_array(binding.bind_input, self.input_name, value)
            self._bind_array(binding.bind_input, "attention_mask", feed_mask)
            if self.selects_positions:
                self._bind_array(binding.bind_input, LOGITS_START, start)
            self._bind_array(binding.bind_output, self.output_name, logits)
            cache.bound = (value, feed_mask, logits)
        else:
            binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(value, self.device, 0))
            binding.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(feed_mask, self.device, 0))
            if self.selects_positions:
                binding.bind_cpu_input(LOGITS_START, start)
            binding.bind_output(self.output_name, self.device)
        self.session.run_with_iobinding(binding)
        if self.device != "cpu":
            logits = host(binding.get_outputs()[0])
        if not prefill:  # each row's last token is the step's last: a view, no copy
            return logits[:, keep - 1]
        return logits[np.arange(batch), keep - 1 - shifts]

    def _bind_cache(self, cache: KvCache) -> Any:
        """The generation's IO binding, with each layer's buffer bound as past and present."""
        binding = self.session.io_binding()
        # the output first: get_outputs() keeps the binding order, and a rebind keeps its place
        binding.bind_output(self.output_name, self.device)
        for past, present in zip(self.names, self.presents):
            binding.bind_ortvalue_input(past, cache.values[past])
            binding.bind_ortvalue_output(present, cache.values[past])
        return binding

    def _start(self, keep: int) -> np.ndarray:
        """``logits_start`` for the last ``keep`` positions (kept: the binding points at it)."""
        if keep not in self._starts:
            self._starts[keep] = np.array([-keep], dtype=np.int64)
        return self._starts[keep]

    def _positions(self, length: int) -> np.ndarray:
        if self._arange is None or len(self._arange) < self.max_seq:
            self._arange = np.arange(self.max_seq)
        return self._arange[:length]

    @staticmethod
    def _bind_array(bind: Any, name: str, array: np.ndarray) -> None:
        """Bind a contiguous host array by its pointer (``KvCache.bound`` keeps it alive)."""
        bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
