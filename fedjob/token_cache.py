"""Tokenised data kept on disk, so that a silo tokenises its data once, not once per process.

A silo checks its data before it starts (preflight) and then every training process loads
it: with eight GPUs, nine tokenisations of the same files. The first one writes the token
ids here; the others map them. The key covers everything the ids depend on: each file's
path, size and modification time, the tokenizer's files, the format's fields and the
window length. A cache entry is written atomically (rename), so a reader sees all of it
or none.

The folder is bounded: every changed file or window length makes a new entry, and a
long-lived silo (a persistent volume, a workstation) would otherwise keep them all. A
hit marks its entry used; after each write the least recently used entries go until the
folder holds at most `FEDJOB_TOKEN_CACHE_BYTES` (16 GiB by default). The entry just
written always stays, whatever its size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

VERSION = 1  # of the layout and of tokenisation rules: bump when either changes
DEFAULT_MAX_BYTES = 16 << 30
STALE_TMP_SECONDS = 3600  # a half-written entry this old lost its writer


def cache_dir() -> Path:
    root = os.environ.get("FEDJOB_CACHE") or str(Path.home() / ".cache" / "fedjob")
    return Path(root) / "tokens"


def file_stamp(paths: list[Path]) -> list[tuple[str, int, int]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return out


def key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"version": VERSION, **parts}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def load(name: str) -> dict[str, npt.NDArray[Any]] | None:
    path = cache_dir() / f"{name}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError):  # absent, or unreadable: tokenise again
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # used now: the last to be evicted
    return arrays


def max_bytes() -> int:
    raw = os.environ.get("FEDJOB_TOKEN_CACHE_BYTES", "")
    try:
        return int(raw) if raw else DEFAULT_MAX_BYTES
    except ValueError:
        return DEFAULT_MAX_BYTES


def evict(folder: Path, keep: str, limit: int) -> list[Path]:
    """Remove least recently used entries (never `keep`) until the folder holds at most `limit`
    bytes, and half-written files whose writer is gone; returns what was removed."""
    now = time.time()
    removed: list[Path] = []
    entries: list[tuple[float, int, Path]] = []
    for p in folder.iterdir():
        try:
            st = p.stat()
        except OSError:
            continue  # another process removed it
        if p.suffix == ".tmp" and now - st.st_mtime > STALE_TMP_SECONDS:
            removed.append(p)
        elif p.suffix == ".npz":
            entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries):  # oldest use first
        if total <= limit:
            break
        if p.name != keep:
            removed.append(p)
            total -= size
    for p in removed:
        with contextlib.suppress(OSError):
            p.unlink(missing_ok=True)
    return removed


def save(name: str, arrays: dict[str, npt.NDArray[Any]]) -> None:
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, allow_pickle=False, **arrays)
            os.replace(tmp, folder / f"{name}.npz")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        evict(folder, f"{name}.npz", max_bytes())
    except OSError:
        return  # a read-only or full cache costs time, never the job
