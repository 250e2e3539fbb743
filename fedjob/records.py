"""A data path's records: .jsonl lines, .parquet rows or a Hugging Face datasets folder's rows,
each with where it came from, so that every problem can name its file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedjob.data_files import data_files, is_datasets_folder


class DataError(ValueError):
    """Data that cannot be trained on; the message names the file, line and field."""


@dataclass(frozen=True)
class Record:
    where: str  # "file:line" or "folder row N"
    fields: dict[str, Any]


def read_records(path: Path) -> Iterator[Record]:
    if is_datasets_folder(path):
        yield from _datasets_records(path)
        return
    for f in data_files(path, "jsonl"):
        if f.suffix == ".parquet":
            yield from _parquet_records(f)
            continue
        with open(f, encoding="utf-8") as lines:
            try:
                for n, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        value = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(
                            f"{f}:{n}: not valid JSON ({exc.msg} at column {exc.colno})"
                        ) from None
                    if not isinstance(value, dict):
                        raise DataError(
                            f"{f}:{n}: a record must be a JSON object, not {type(value).__name__}"
                        )
                    yield Record(f"{f}:{n}", value)
            except UnicodeDecodeError as exc:
                raise DataError(f"{f}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x})") from None


def _parquet_records(f: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(f)
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"{f}: not a readable parquet file ({exc})") from None
    for n, row in enumerate(table.to_pylist(), 1):
        yield Record(f"{f} row {n}", row)


def _datasets_records(path: Path) -> Iterator[Record]:
    from datasets import Dataset, DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (it has {', '.join(ds)})")
        ds = ds["train"]
    assert isinstance(ds, Dataset)
    for n, row in enumerate(ds, 1):
        yield Record(f"{path} row {n}", dict(row))


def text_field(record: Record, field: str, required: bool = True) -> str:
    value = record.fields.get(field)
    if value is None and not required:
        return ""
    if field not in record.fields:
        raise DataError(
            f"{record.where}: the record has no field {field!r} (it has {', '.join(record.fields)})"
        )
    if not isinstance(value, str):
        raise DataError(f"{record.where}: field {field!r} must be a string, not {type(value).__name__}")
    return value
