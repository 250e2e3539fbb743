"""Which files a data path holds in its format: one rule for the spec's path checks and the loaders."""

from __future__ import annotations

from pathlib import Path

DATA_SUFFIXES = (".txt", ".jsonl", ".parquet")


def mount_folder(path: str) -> str:
    """Where a volume holding this data path is mounted: a file's folder, or the folder itself."""
    p = Path(path)
    return str(p.parent) if p.suffix in DATA_SUFFIXES else path


def is_datasets_folder(path: Path) -> bool:
    """A Hugging Face datasets folder written by save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json"))


def data_files(path: Path, fmt: str) -> list[Path]:
    """The files a path holds in this format (a file itself, or a folder's, recursively)."""
    suffixes = (".txt",) if fmt == "text" else (".jsonl", ".parquet")
    if path.is_file():
        return [path] if path.suffix in suffixes else []
    if not path.is_dir() or (fmt != "text" and is_datasets_folder(path)):
        return []
    return sorted(p for p in path.rglob("*") if p.suffix in suffixes and p.is_file())


def has_data(path: Path, fmt: str) -> bool:
    return bool(data_files(path, fmt)) or (fmt != "text" and is_datasets_folder(path))


def describe_expected(fmt: str) -> str:
    if fmt == "text":
        return "a .txt file or a folder of .txt files"
    return "a .jsonl or .parquet file, a folder of them, or a Hugging Face datasets folder (save_to_disk)"
