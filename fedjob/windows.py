"""Token ids laid out as training windows of sequenceLength, and the batches drawn from them.

Documents (text, jsonl) form one stream, cut into windows anywhere, every token a target:
pre-training's convention. Examples (instruction, chat) keep their own boundaries, either
packed several to a window, positions restarting at 0 for each so that transformers'
packed-sequence masks keep each example attending only to itself, or padded one to a
window. Labels are -100 on every token that is not a target: prompts, padding, and the
first token of each example (in a packed window, predicting it would read the example
before).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

IGNORE = -100  # the label transformers' loss skips
Array = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Batch:
    input_ids: Array  # (batch, sequenceLength)
    labels: Array  # IGNORE where the token is no target
    position_ids: Array | None = None  # packed: restarting at each example
    attention_mask: Array | None = None  # padded: 0 on padding

    def model_inputs(self, device: Any) -> dict[str, Any]:
        """The forward pass's keyword arguments, on the rank's device."""
        import torch

        out = {"input_ids": self.input_ids}
        if self.labels is not self.input_ids:  # a document stream's labels are its ids: one copy up
            out["labels"] = self.labels
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        inputs: dict[str, Any] = {
            k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in out.items()
        }
        inputs.setdefault("labels", inputs["input_ids"])
        if self.position_ids is not None:
            # transformers reads packed sequences from the positions only without a KV cache,
            # which forward builds by default (use_cache) even when training: attention would cross.
            inputs["use_cache"] = False
        return inputs


class TrainingData(Protocol):
    def num_samples(self) -> int:
        """Training windows: the silo's weight in FedAvg."""
        ...

    def random_batch(self, rng: np.random.Generator, batch_size: int) -> Batch: ...

    def fixed_batches(self, batches: int, batch_size: int) -> list[Batch]:
        """The same windows every time: comparable eval losses."""
        ...


@dataclass(frozen=True)
class TokenStream:
    """Documents joined into one stream; any sequenceLength span is a window."""

    tokens: npt.NDArray[np.integer[Any]]
    sequence_length: int

    def num_samples(self) -> int:
        return max(1, (self.tokens.size - 1) // self.sequence_length)

    def _span(self) -> int:
        span = self.tokens.size - self.sequence_length
        if span <= 0:
            raise ValueError(f"{self.tokens.size} tokens are fewer than one window ({self.sequence_length})")
        return span

    def _windows(self, starts: npt.NDArray[np.int64]) -> Batch:
        ids = np.stack([self.tokens[s : s + self.sequence_length] for s in starts]).astype(np.int64)
        return Batch(ids, ids)

    def random_batch(self, rng: np.random.Generator, batch_size: int) -> Batch:
        return self._windows(rng.integers(0, self._span(), size=batch_size))

    def fixed_batches(self, batches: int, batch_size: int) -> list[Batch]:
        starts = np.linspace(0, self._span(), num=batches * batch_size, dtype=np.int64)
        return [self._windows(starts[i * batch_size : (i + 1) * batch_size]) for i in range(batches)]

    def split_tail(self, fraction: float) -> tuple[TokenStream, TokenStream]:
        """The head for training, the tail held out: no window straddles the two."""
        cut = int(self.tokens.size * (1 - fraction))
        return TokenStream(self.tokens[:cut], self.sequence_length), TokenStream(
            self.tokens[cut:], self.sequence_length
        )


@dataclass(frozen=True)
class Example:
    ids: npt.NDArray[np.int32]
    trainable: npt.NDArray[np.bool_]


@dataclass(frozen=True)
class WindowSet:
    """Examples laid out in windows (packed or padded), each window a training sample."""

    input_ids: Array  # (windows, sequenceLength)
    labels: Array
    position_ids: Array | None
    attention_mask: Array | None

    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])

    def _rows(self, rows: npt.NDArray[np.int64]) -> Batch:
        return Batch(
            self.input_ids[rows],
            self.labels[rows],
            None if self.position_ids is None else self.position_ids[rows],
            None if self.attention_mask is None else self.attention_mask[rows],
        )

    def random_batch(self, rng: np.random.Generator, batch_size: int) -> Batch:
        return self._rows(rng.integers(0, self.num_samples(), size=batch_size))

    def fixed_batches(self, batches: int, batch_size: int) -> list[Batch]:
        rows = np.arange(batches * batch_size, dtype=np.int64) % self.num_samples()
        return [self._rows(rows[i * batch_size : (i + 1) * batch_size]) for i in range(batches)]


def _labels(e: Example) -> Array:
    labels = np.where(e.trainable, e.ids, IGNORE).astype(np.int64)
    labels[:1] = IGNORE
    return labels


def pack(examples: Sequence[Example], sequence_length: int, pad_id: int) -> WindowSet:
    """Greedily, in order: an example starts a new window when it does not fit in the current one.

    Examples are at most sequenceLength long (truncated before). The rest of a window is
    padding, a segment of its own (positions restart) that is never a target.
    """
    if not examples:
        raise ValueError("no examples to pack")
    rows: list[list[Example]] = [[]]
    used = 0
    for e in examples:
        if used + e.ids.size > sequence_length:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += e.ids.size
    n = len(rows)
    ids = np.full((n, sequence_length), pad_id, dtype=np.int64)
    labels = np.full((n, sequence_length), IGNORE, dtype=np.int64)
    positions = np.zeros((n, sequence_length), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            k = e.ids.size
            ids[r, at : at + k] = e.ids
            labels[r, at : at + k] = _labels(e)
            positions[r, at : at + k] = np.arange(k)
            at += k
        positions[r, at:] = np.arange(sequence_length - at)
    return WindowSet(ids, labels, positions, None)


def pad(examples: Sequence[Example], sequence_length: int, pad_id: int) -> WindowSet:
    """One example per window, padded on the right and masked out of attention and loss."""
    if not examples:
        raise ValueError("no examples to pad")
    n = len(examples)
    ids = np.full((n, sequence_length), pad_id, dtype=np.int64)
    labels = np.full((n, sequence_length), IGNORE, dtype=np.int64)
    mask = np.zeros((n, sequence_length), dtype=np.int64)
    for r, e in enumerate(examples):
        k = e.ids.size
        ids[r, :k] = e.ids
        labels[r, :k] = _labels(e)
        mask[r, :k] = 1
    return WindowSet(ids, labels, None, mask)
