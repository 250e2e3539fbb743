"""Text to token ids: the model's own tokenizer from its folder, or bytes as the explicit fallback.

Both turn a list of segments (text, trainable?) into ids and a per-token trainable mask,
which is how answers-only loss is expressed: the prompt's segments are not trainable. A
fast Hugging Face tokenizer encodes the whole text at once (so merges across segment
boundaries are the model's own) and assigns each token to the segment its first character
falls in; bytes are exact per segment. Nothing is ever downloaded: the tokenizer loads
from the model folder with local_files_only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fedjob.spec import FederatedJob

BYTE_VOCAB = 256
# Files any Hugging Face tokenizer folder has at least one of.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

Ids = npt.NDArray[np.int32]
Mask = npt.NDArray[np.bool_]
DOCUMENT_CHUNK = 1 << 16  # characters
Segment = tuple[str, bool]  # text, and whether the model learns to produce it


@dataclass(frozen=True)
class Message:
    role: str
    content: str


class Tokenizer(Protocol):
    name: str
    eos_id: int
    pad_id: int

    def __len__(self) -> int: ...

    def vocabulary(self) -> str:
        """What the ids mean, in a line: the same line for the same id-to-token mapping."""
        ...

    def encode(self, segments: Sequence[Segment], special: bool = True) -> tuple[Ids, Mask]:
        """Ids and the trainable mask; `special`: the tokenizer's own BOS/EOS wrapping, if any."""
        ...

    def chat(self, messages: Sequence[Message]) -> list[Segment]:
        """A conversation rendered with the chat template, assistant turns trainable."""
        ...

    def document(self, text: str) -> Ids:
        """A whole text, every token a target (no mask needed)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids (vocabulary 256). NUL (never in text the checks accept) ends examples."""

    name = "bytes"
    eos_id = 0
    pad_id = 0

    def __len__(self) -> int:
        return BYTE_VOCAB

    def vocabulary(self) -> str:
        return f"bytes ({BYTE_VOCAB} ids)"

    def encode(self, segments: Sequence[Segment], special: bool = True) -> tuple[Ids, Mask]:
        if not segments:
            return np.zeros(0, np.int32), np.zeros(0, np.bool_)
        parts = [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text, _ in segments]
        flags = [trainable for _, trainable in segments]
        ids = np.concatenate(parts).astype(np.int32)
        mask = np.concatenate([np.full(p.size, t, dtype=np.bool_) for p, t in zip(parts, flags, strict=True)])
        return ids, mask

    def chat(self, messages: Sequence[Message]) -> list[Segment]:
        raise ValueError("chat data needs the model's tokenizer and its chat template, not bytes")

    def document(self, text: str) -> Ids:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


class ModelTokenizer:
    """A Hugging Face fast tokenizer loaded from the model folder."""

    name = "model"

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if not getattr(tok, "is_fast", False):
            raise ValueError(
                f"{folder}: {type(tok).__name__} is not a fast tokenizer (tokenizer.json); "
                "answers-only loss needs its offsets"
            )
        self.tok: Any = tok
        eos = tok.eos_token_id
        if eos is None:
            raise ValueError(f"{folder}: the tokenizer has no eos_token (examples end with it)")
        self.eos_id = int(eos)
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else eos)
        self.chat_template: str | None = tok.chat_template

    def __len__(self) -> int:
        return len(self.tok)

    def vocabulary(self) -> str:
        # The id-to-token mapping is what the embedding rows mean; merges, normalisation and
        # the chat template may change without changing it.
        vocab = sorted(self.tok.get_vocab().items(), key=lambda item: item[1])
        digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:12]
        return f"model ({len(vocab)} ids, vocabulary sha256 {digest})"

    def encode(self, segments: Sequence[Segment], special: bool = True) -> tuple[Ids, Mask]:
        text = "".join(s for s, _ in segments)
        enc = self.tok(text, add_special_tokens=special, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        # Where each segment starts, in characters; a token belongs to the segment of its first character.
        bounds = np.cumsum([0] + [len(s) for s, _ in segments])
        trainable = np.array([t for _, t in segments] + [False])
        starts = np.array([a if b > a else -1 for a, b in enc["offset_mapping"]], dtype=np.int64)
        seg = np.searchsorted(bounds, starts, side="right") - 1
        mask = np.where(starts >= 0, trainable[np.clip(seg, 0, len(segments))], False)
        return ids, mask.astype(np.bool_)

    def document(self, text: str) -> Ids:
        """Without offsets (a list per token); a long text in line-aligned chunks encoded as one batch,
        which the Rust tokenizer spreads over cores. A token that would have merged across a chunk's
        last newline is split there: at most one per 64 KiB."""
        if len(text) <= DOCUMENT_CHUNK:
            return np.asarray(self.tok(text)["input_ids"], dtype=np.int32)
        chunks, start = [], 0
        while start < len(text):
            end = text.find("\n", start + DOCUMENT_CHUNK)
            end = len(text) if end < 0 else end + 1
            chunks.append(text[start:end])
            start = end
        # What the tokenizer wraps a text in (BOS, for some EOS), around the whole document only.
        bare = self.tok("a", add_special_tokens=False)["input_ids"]
        wrapped = self.tok("a")["input_ids"]
        at = next(i for i in range(len(wrapped)) if wrapped[i : i + len(bare)] == bare)
        parts = [
            wrapped[:at],
            *self.tok(chunks, add_special_tokens=False)["input_ids"],
            wrapped[at + len(bare) :],
        ]
        return np.concatenate([np.asarray(p, dtype=np.int32) for p in parts])

    def chat(self, messages: Sequence[Message]) -> list[Segment]:
        """Each assistant turn is what the template adds after the generation prompt for it."""
        if not self.chat_template:
            raise ValueError(
                "the model's tokenizer has no chat template (chat_template in tokenizer_config.json)"
            )
        segments: list[Segment] = []
        done = ""
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            prompt = self._render(messages[:i], generation_prompt=True)
            full = self._render(messages[: i + 1], generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ValueError(
                    "the chat template does not render a conversation as a prefix of its continuation, "
                    "so assistant turns cannot be told from prompts"
                )
            segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        rest = self._render(messages, generation_prompt=False)[len(done) :]
        if rest:
            segments.append((rest, False))
        return segments

    def _render(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        text = self.tok.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
        return str(text)


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def tokenizer_kind(job: FederatedJob) -> str:
    """`training.tokenizer`, or by default the model's own when its folder has one, else bytes."""
    chosen = job.spec.training.tokenizer
    if chosen is not None:
        return chosen
    path = job.spec.model.path
    return "model" if path is not None and has_tokenizer(path) else "bytes"


def load_tokenizer(job: FederatedJob) -> Tokenizer:
    if tokenizer_kind(job) == "bytes":
        return ByteTokenizer()
    path = job.spec.model.path
    if path is None or not has_tokenizer(path):
        raise ValueError(f"spec.training.tokenizer: 'model', but the model folder {path} has no tokenizer")
    return ModelTokenizer(path)


# ShareGPT's (FastChat's) role names, read as the chat templates' own.
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}


def messages_from(value: Any, field: str, role: str = "role", content: str = "content") -> list[Message]:
    """A record's conversation: a list of {role, content}; the error says which part is wrong."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"field {field!r} must be a non-empty list of {{{role}, {content}}} messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get(role), str):
            raise ValueError(f"{field}[{j}]: a message needs a string {role!r}")
        if not isinstance(m.get(content), str):
            raise ValueError(f"{field}[{j}]: a message needs a string {content!r}")
        name = str(m[role])
        out.append(Message(ROLE_ALIASES.get(name, name), str(m[content])))
    if not any(m.role == "assistant" for m in out):
        raise ValueError(f"field {field!r} has no assistant message: nothing to learn")
    return out
