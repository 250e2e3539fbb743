"""The silo's committed update-stage state: durable across restarts, rolled back when an update did not count.

A stage changes its state (top-k's residual) while it processes the round's
update. Only when the aggregator has accepted that update does the state become
the committed one, written atomically next to the silo's other files; when the
update is refused or its round closes without it, the stages return to the last
committed state, so the round's update is dropped whole, as it would be without
the stages, and nothing is counted twice.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from fedjob.checkpoint import atomic_write
from fedjob.chunking import State
from fedjob.update_stages import Update, UplinkPipeline

log = logging.getLogger("fedjob.stages")


class StageStateStore:
    """The silo's committed stage state: `<dir>/uplink-state.npz` and its index, written atomically."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index = self.dir / "uplink-state.json"

    def save(self, pipeline: UplinkPipeline, round_number: int) -> None:
        tmp = self.dir / f".uplink-state.npz.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, **pipeline.state())  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        name = f"uplink-state-{round_number:06d}.npz"
        os.replace(tmp, self.dir / name)
        # The index names the new file last: a crash before it leaves the previous state current.
        index = {
            "round": round_number,
            "file": name,
            "pipeline": pipeline.name,
            "fingerprint": pipeline.fingerprint(),
        }
        atomic_write(self.index, json.dumps(index).encode())
        for old in self.dir.glob("uplink-state-*.npz"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load(self, pipeline: UplinkPipeline) -> int:
        """Restore the committed state into `pipeline`; returns its round (0: none, or not this chain's)."""
        if not self.index.exists():
            return 0
        index = json.loads(self.index.read_text())
        if index.get("fingerprint") != pipeline.fingerprint():
            log.warning(
                "stage state in %s belongs to uplink %r, this job's is %r: starting without it",
                self.dir,
                index.get("pipeline"),
                pipeline.name,
            )
            return 0
        with np.load(self.dir / index["file"]) as z:
            pipeline.load_state({k: z[k].astype(np.float32, copy=False) for k in z.files})
        pipeline.committed_round = int(index["round"])
        return pipeline.committed_round


class StatefulUplink:
    """A pipeline with its store: apply for a round, then commit or roll back (the silo's view)."""

    def __init__(self, pipeline: UplinkPipeline, store: StageStateStore | None) -> None:
        self.pipeline = pipeline
        self.store = store
        self.restored_round = store.load(pipeline) if store is not None else 0
        self._committed: State | None = None if store is not None else _copy(pipeline.state())

    def apply(self, update: Update) -> None:
        self.pipeline.apply(update)

    def commit(self, round_number: int) -> None:
        """The aggregator accepted the round's update: its stage state becomes the committed one."""
        self.pipeline.committed_round = round_number
        if self.store is not None:
            if self.pipeline.stateful:
                self.store.save(self.pipeline, round_number)
        else:
            self._committed = _copy(self.pipeline.state())

    def rollback(self) -> None:
        """The update did not count: back to the state of the last accepted one."""
        if self.store is not None:
            if self.store.load(self.pipeline) == 0:
                self.pipeline.load_state({})
        elif self._committed is not None:
            self.pipeline.load_state(_copy(self._committed))


def _copy(state: State) -> State:
    return {k: v.copy() for k, v in state.items()}
