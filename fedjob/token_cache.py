"""Tokenised data kept on disk, so that a silo tokenises its data once, not once per process.

A silo checks its data before it starts (preflight) and then every training process loads
it: with eight GPUs, nine tokenisations of the same files. The first one writes the token
ids here; the others map them. The key covers everything the ids depend on: each file's
path, size and modification time, the tokenizer's files, the format's fields and the
window length. A cache entry is written atomically (rename), so a reader sees all of it
or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

VERSION = 1  # of the layout and of tokenisation rules: bump when either changes


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
            return {k: z[k] for k in z.files}
    except (OSError, ValueError):  # absent, or unreadable: tokenise again
        return None


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
    except OSError:
        return  # a read-only or full cache costs time, never the job
