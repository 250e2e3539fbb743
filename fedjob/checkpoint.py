"""Atomic, resumable checkpoints of the global state and the round history.

A checkpoint is written to a temporary file, fsynced and renamed over the
previous one, so a crash at any instant leaves either the old or the new round
on disk, never a torn file. The round history travels inside the checkpoint so
that metrics and state can never disagree after a restart.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedjob.chunking import State


@dataclass
class Checkpoint:
    round: int
    state: State
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    strategy_state: State = field(default_factory=dict)  # e.g. server optimiser moments
    broadcast: State = field(default_factory=dict)  # the compressed downlink's copy (silos hold it too)


STRATEGY_PREFIX = "__strategy__/"
BROADCAST_PREFIX = "__broadcast__/"


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CheckpointStore:
    """`<dir>/global-<round>.npz` plus `<dir>/checkpoint.json` naming the newest complete one."""

    def __init__(self, directory: Path, keep: int = 2) -> None:
        self.dir = directory
        self.keep = keep
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def index(self) -> Path:
        return self.dir / "checkpoint.json"

    def save(self, ckpt: Checkpoint) -> None:
        name = f"global-{ckpt.round:06d}.npz"
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            arrays = {
                **ckpt.state,
                **{STRATEGY_PREFIX + k: v for k, v in ckpt.strategy_state.items()},
                **{BROADCAST_PREFIX + k: v for k, v in ckpt.broadcast.items()},
            }
            np.savez(f, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)
        # The index is replaced last: until then the previous checkpoint stays the current one.
        index = {"round": ckpt.round, "file": name, "history": ckpt.history, "extra": ckpt.extra}
        atomic_write(self.index, json.dumps(index, indent=1).encode())
        for old in sorted(self.dir.glob("global-*.npz"))[: -self.keep]:
            old.unlink(missing_ok=True)

    def update_index(self, history: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        """Rewrite the history and add to the extras of the current checkpoint, keeping its state file."""
        index = json.loads(self.index.read_text())
        index.update(history=history, extra={**index.get("extra", {}), **extra})
        atomic_write(self.index, json.dumps(index, indent=1).encode())

    def load(self) -> Checkpoint | None:
        if not self.index.exists():
            return None
        index = json.loads(self.index.read_text())
        with np.load(self.dir / index["file"]) as z:
            # One array at a time, never a second copy (astype(copy=False) keeps float32 as read).
            arrays = {k: z[k].astype(np.float32, copy=False) for k in z.files}
        state = {k: v for k, v in arrays.items() if not k.startswith((STRATEGY_PREFIX, BROADCAST_PREFIX))}
        strategy = {k[len(STRATEGY_PREFIX) :]: v for k, v in arrays.items() if k.startswith(STRATEGY_PREFIX)}
        broadcast = {
            k[len(BROADCAST_PREFIX) :]: v for k, v in arrays.items() if k.startswith(BROADCAST_PREFIX)
        }
        return Checkpoint(
            int(index["round"]),
            state,
            list(index["history"]),
            dict(index.get("extra", {})),
            strategy,
            broadcast,
        )


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time.

    `np.savez` streams each array to the file in 16 MiB pieces, so a write needs
    no second copy of the model; the caller promises not to modify the arrays of
    a submitted checkpoint until `wait()` returns (the aggregator's next global
    model lives in other buffers, and it waits before it reuses these).
    """

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, ckpt: Checkpoint, then: Callable[[], None] | None = None) -> None:
        """Start writing `ckpt`; `then` runs on the writer thread once it is durable."""
        self.wait()

        def write() -> None:
            try:
                self.store.save(ckpt)
                if then is not None:
                    then()
            except BaseException as exc:  # surfaced by wait(), on the caller's thread
                self._error = exc

        self._thread = threading.Thread(target=write, name=f"checkpoint-{ckpt.round}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the last submitted checkpoint is on disk; re-raise what its write raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {err}") from err
