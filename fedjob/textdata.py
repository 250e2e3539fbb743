"""A silo's text as training windows: byte-level tokens, so no tokenizer has to be downloaded.

Token ids are the UTF-8 bytes (vocabulary 256), which any causal LM with a
vocabulary of at least 256 can model. Real deployments swap in the model's own
tokenizer; the federated path does not care which.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

VOCAB_SIZE = 256
Tokens = npt.NDArray[np.int64]


@dataclass(frozen=True)
class TextCorpus:
    tokens: npt.NDArray[np.uint8]
    files: int

    @classmethod
    def from_folder(cls, folder: str | Path) -> TextCorpus:
        paths = sorted(Path(folder).rglob("*.txt"))
        if not paths:
            raise FileNotFoundError(f"no .txt files in {folder}")
        blob = b"\n".join(p.read_bytes() for p in paths)
        return cls(np.frombuffer(blob, dtype=np.uint8), len(paths))

    def num_samples(self, sequence_length: int) -> int:
        """Whole training windows in the corpus: the silo's weight in FedAvg."""
        return max(1, (self.tokens.size - 1) // sequence_length)

    def random_batch(self, rng: np.random.Generator, batch_size: int, sequence_length: int) -> Tokens:
        if self.tokens.size <= sequence_length:
            raise ValueError(f"corpus of {self.tokens.size} bytes is shorter than one window")
        starts = rng.integers(0, self.tokens.size - sequence_length, size=batch_size)
        return np.stack([self.tokens[s : s + sequence_length] for s in starts]).astype(np.int64)

    def fixed_batches(self, batches: int, batch_size: int, sequence_length: int) -> list[Tokens]:
        """Evenly spaced windows, the same every time: for comparable eval losses."""
        n = batches * batch_size
        span = self.tokens.size - sequence_length
        if span <= 0:
            raise ValueError(f"corpus of {self.tokens.size} bytes is shorter than one window")
        starts = np.linspace(0, span, num=n, dtype=np.int64)
        windows = np.stack([self.tokens[s : s + sequence_length] for s in starts]).astype(np.int64)
        return [windows[i * batch_size : (i + 1) * batch_size] for i in range(batches)]
