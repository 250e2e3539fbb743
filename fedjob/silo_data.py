"""A silo's data, in its format, as training windows and held-out windows.

Formats (`data.format`): `text` (.txt files) and `jsonl` (records with a text field) are
documents, trained on whole as one stream; `instruction` and `chat` records are examples,
trained on their answers only, each ending with EOS, packed or padded into windows
(windows.py). Records come from .jsonl files, .parquet files or a Hugging Face datasets
folder (save_to_disk). Every problem names where it is: the file and line of a malformed
record, the field a record lacks.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedjob import token_cache
from fedjob.data_files import data_files, is_datasets_folder
from fedjob.records import DataError, read_records, text_field
from fedjob.spec import DOCUMENT_FORMATS, FederatedJob, RecordFormatSpec
from fedjob.tokenization import Tokenizer, load_tokenizer, messages_from
from fedjob.windows import Batch, Example, TokenStream, TrainingData, WindowSet, pack, pad

log = logging.getLogger("fedjob.data")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def documents(path: Path, fmt: RecordFormatSpec) -> Iterator[str]:
    """The texts trained on whole: each .txt file, or each record's text field."""
    if fmt.format == "text":
        for f in data_files(path, "text"):
            try:
                yield f.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{f}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
                ) from None
        return
    for r in read_records(path):
        yield text_field(r, fmt.text_field)


def examples(path: Path, fmt: RecordFormatSpec, tokenizer: Tokenizer) -> Iterator[Example]:
    """Instruction or chat records as token ids with their trainable (answer) mask, EOS-terminated."""
    for r in read_records(path):
        if fmt.format == "instruction":
            f = fmt.instruction_fields
            instruction, extra, output = (
                text_field(r, f.instruction),
                text_field(r, f.input, False),
                text_field(r, f.output),
            )
            prompt = ALPACA_PROMPT.format(
                with_input=", paired with an input that provides further context" if extra else "",
                instruction=instruction,
                input_block=f"### Input:\n{extra}\n\n" if extra else "",
            )
            ids, trainable = tokenizer.encode([(prompt, False), (output, True)])
            eos_seen = bool(ids.size) and int(ids[-1]) == tokenizer.eos_id
        else:
            c = fmt.chat_fields
            if c.messages not in r.fields:
                raise DataError(
                    f"{r.where}: the record has no field {c.messages!r} (it has {', '.join(r.fields)})"
                )
            try:
                messages = messages_from(r.fields[c.messages], c.messages, c.role, c.content)
                segments = tokenizer.chat(messages)
            except ValueError as exc:
                raise DataError(f"{r.where}: {exc}") from None
            # The template renders its own turn ends and special tokens.
            ids, trainable = tokenizer.encode(segments, special=False)
            eos_seen = bool(np.any(ids[trainable] == tokenizer.eos_id))
        if not eos_seen:
            ids = np.append(ids, np.int32(tokenizer.eos_id))
            trainable = np.append(trainable, True)
        yield Example(ids, trainable)


def model_type(job: FederatedJob) -> str | None:
    if job.spec.model.config is not None:
        return str(job.spec.model.config.get("model_type"))
    cfg = Path(str(job.spec.model.path)) / "config.json"
    try:
        value = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def supports_packing(kind: str | None) -> bool:
    """The model's attention builds its mask with transformers' masking utilities, which read
    packed sequences from position ids that restart (models written before them do not)."""
    if kind is None:
        return False
    try:
        module = importlib.import_module(f"transformers.models.{kind.replace('-', '_')}.modeling_{kind}")
    except ImportError:
        return False
    return hasattr(module, "create_causal_mask")


def layout(job: FederatedJob) -> str:
    """How examples go into windows: `training.packing`, with auto resolved for this model."""
    t = job.spec.training
    if t.packing == "padded" or t.mode in ("prefix", "prompt"):
        return "padded"
    if t.packing == "packed":
        return "packed"
    return "packed" if supports_packing(model_type(job)) else "padded"


class ExampleSet:
    """Instruction or chat examples, laid out in windows; split before layout, so that no window
    holds both training and held-out examples."""

    def __init__(self, items: list[Example], packed: bool, sequence_length: int, pad_id: int) -> None:
        self.items = items
        self.packed = packed
        self._args = (sequence_length, pad_id)

    @functools.cached_property
    def windows(self) -> WindowSet:
        """Laid out on first use: a set that is split is never laid out whole."""
        return (pack if self.packed else pad)(self.items, *self._args)

    def num_samples(self) -> int:
        return self.windows.num_samples()

    def random_batch(self, rng: np.random.Generator, batch_size: int) -> Batch:
        return self.windows.random_batch(rng, batch_size)

    def fixed_batches(self, batches: int, batch_size: int) -> list[Batch]:
        return self.windows.fixed_batches(batches, batch_size)

    def split(self, fraction: float, seed: int) -> tuple[ExampleSet, ExampleSet]:
        """A sample of the examples drawn from the job's seed held out (at least one, and at least
        one left to train on)."""
        n = len(self.items)
        if n < 2:
            raise DataError("one example cannot be split into training and held-out data")
        k = min(max(1, round(n * fraction)), n - 1)
        held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
        train = [e for i, e in enumerate(self.items) if i not in held]
        out = [e for i, e in enumerate(self.items) if i in held]
        return ExampleSet(train, self.packed, *self._args), ExampleSet(out, self.packed, *self._args)


@dataclass(frozen=True)
class LoadedData:
    data: TokenStream | ExampleSet
    examples: int = 0  # kept (instruction, chat)
    truncated: int = 0  # examples cut to one window (the dropped ones included)
    dropped: int = 0  # examples whose answer lay beyond the window

    def describe(self) -> str:
        d = self.data
        if isinstance(d, TokenStream):
            return f"{d.tokens.size:,} tokens in {d.num_samples():,} windows"
        cut = f" ({self.truncated} truncated, {self.dropped} of them dropped)" if self.truncated else ""
        how = "packed into" if d.packed else "padded to"
        return f"{self.examples:,} examples{cut} {how} {d.num_samples():,} windows"


def load(path: str | Path, fmt: RecordFormatSpec, job: FederatedJob, tokenizer: Tokenizer) -> LoadedData:
    """The data at `path` tokenised and laid out in windows; DataError when nothing can be trained on."""
    where = Path(path)
    if fmt.format in DOCUMENT_FORMATS:
        return _load_documents(where, fmt, job, tokenizer)
    return _load_examples(where, fmt, job, tokenizer)


def _cache_key(where: Path, fmt: RecordFormatSpec, job: FederatedJob, tokenizer: Tokenizer) -> str:
    """What the token ids depend on: the files (by path, size, mtime), the tokenizer's files,
    the format's fields and the window length (which truncates examples)."""
    files = sorted(p for p in where.rglob("*") if p.is_file()) if is_datasets_folder(where) else []
    files = files or data_files(where, fmt.format)
    tokenizer_files: list[Path] = []
    if tokenizer.name != "bytes" and job.spec.model.path is not None:
        prefixes = ("tokenizer", "chat_template", "special_tokens", "vocab", "merges", "added_tokens")
        tokenizer_files = sorted(
            p for p in Path(job.spec.model.path).iterdir() if p.name.startswith(prefixes)
        )
    return token_cache.key(
        {
            "files": token_cache.file_stamp(files),
            "tokenizer": [tokenizer.name, token_cache.file_stamp(tokenizer_files)],
            "format": fmt.model_dump(include=set(RecordFormatSpec.model_fields)),
            "sequence_length": job.spec.training.sequence_length,
        }
    )


def _load_documents(
    where: Path, fmt: RecordFormatSpec, job: FederatedJob, tokenizer: Tokenizer
) -> LoadedData:
    t = job.spec.training
    name = _cache_key(where, fmt, job, tokenizer)
    cached = token_cache.load(name)
    if cached is not None:
        tokens = cached["tokens"]
    else:
        parts = []
        # Documents are separated by EOS; bytes have none to spare, a newline does.
        sep = np.asarray([10 if tokenizer.name == "bytes" else tokenizer.eos_id], dtype=np.int32)
        for text in documents(where, fmt):
            parts += [tokenizer.document(text), sep]
        tokens = np.concatenate(parts[:-1]) if parts else np.zeros(0, np.int32)
        if tokenizer.name == "bytes":
            tokens = tokens.astype(np.uint8)  # a quarter of the memory
        token_cache.save(name, {"tokens": tokens})
    if tokens.size <= t.sequence_length:
        raise DataError(
            f"{where}: {tokens.size} tokens, fewer than one training window (sequenceLength + 1 = "
            f"{t.sequence_length + 1})"
        )
    return LoadedData(TokenStream(tokens, t.sequence_length))


def _examples_within(
    where: Path, fmt: RecordFormatSpec, job: FederatedJob, tokenizer: Tokenizer
) -> tuple[list[Example], int, int, int]:
    """Examples cut to one window, those with no answer left dropped; and truncated, dropped, tokens."""
    t = job.spec.training
    name = _cache_key(where, fmt, job, tokenizer)
    cached = token_cache.load(name)
    if cached is not None:
        ends = np.cumsum(cached["lengths"])[:-1]
        ids, masks = np.split(cached["ids"], ends), np.split(cached["trainable"], ends)
        kept = [Example(i, m) for i, m in zip(ids, masks, strict=True)] if cached["lengths"].size else []
        truncated, dropped, total = (int(v) for v in cached["counts"])
        return kept, truncated, dropped, total
    kept, truncated, dropped, total = [], 0, 0, 0
    for e in examples(where, fmt, tokenizer):
        total += e.ids.size
        if e.ids.size > t.sequence_length:
            truncated += 1
            e = Example(e.ids[: t.sequence_length], e.trainable[: t.sequence_length])
        if not e.trainable[1:].any():  # the first token is never a target
            dropped += 1
            continue
        kept.append(e)
    token_cache.save(
        name,
        {
            "ids": np.concatenate([e.ids for e in kept]) if kept else np.zeros(0, np.int32),
            "trainable": np.concatenate([e.trainable for e in kept]) if kept else np.zeros(0, np.bool_),
            "lengths": np.asarray([e.ids.size for e in kept], dtype=np.int64),
            "counts": np.asarray([truncated, dropped, total], dtype=np.int64),
        },
    )
    return kept, truncated, dropped, total


def _load_examples(where: Path, fmt: RecordFormatSpec, job: FederatedJob, tokenizer: Tokenizer) -> LoadedData:
    t = job.spec.training
    kept, truncated, dropped, total = _examples_within(where, fmt, job, tokenizer)
    if not kept:
        raise DataError(
            f"{where}: no {fmt.format} example with an answer inside one window (sequenceLength "
            f"{t.sequence_length}; {dropped} examples, all prompt)"
            if dropped
            else f"{where}: no {fmt.format} records"
        )
    if total <= t.sequence_length:
        raise DataError(
            f"{where}: {total} tokens in {len(kept)} examples, fewer than one training window "
            f"(sequenceLength + 1 = {t.sequence_length + 1})"
        )
    if truncated:
        log.warning(
            "%s: %d examples longer than sequenceLength %d were truncated, %d of them dropped "
            "(their answer began beyond the window)",
            where,
            truncated,
            t.sequence_length,
            dropped,
        )
    data = ExampleSet(kept, layout(job) == "packed", t.sequence_length, tokenizer.pad_id)
    return LoadedData(data, len(kept), truncated, dropped)


def silo_data(job: FederatedJob, silo: str) -> tuple[TrainingData, TrainingData | None]:
    """A silo's training windows and its held-out windows (None when federated evaluation is off)."""
    spec = job.silo_data(silo)
    tokenizer = load_tokenizer(job)
    loaded = load(spec.path, spec, job, tokenizer)
    train: TrainingData = loaded.data
    held: TrainingData | None = None
    ev = job.spec.evaluation
    if ev.batches > 0 and spec.eval is not None:
        held = load(spec.eval.path, spec, job, tokenizer).data
    elif ev.batches > 0:
        fraction = spec.eval_fraction or ev.held_out_fraction
        if isinstance(loaded.data, TokenStream):
            train, held = loaded.data.split_tail(fraction)
        else:
            train, held = loaded.data.split(fraction, job.spec.training.seed)
    log.info(
        "silo %s: %s data, %s tokenizer (%d ids), %s; %d training windows%s",
        silo,
        spec.format,
        tokenizer.name,
        len(tokenizer),
        loaded.describe(),
        train.num_samples(),
        "" if held is None else f", {held.num_samples()} held out",
    )
    return train, held


def eval_data(job: FederatedJob, tokenizer: Tokenizer | None = None) -> TrainingData | None:
    """The aggregator's shared held-out set (spec.eval), in its format (`tokenizer`: the job's,
    when the caller has loaded it already)."""
    if job.spec.eval is None:
        return None
    return load(job.spec.eval.path, job.spec.eval, job, tokenizer or load_tokenizer(job)).data
