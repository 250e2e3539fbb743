"""The aggregator's side of the compressed downlink: the broadcast copy, its recent changes on disk.

Each round's close advances the copy by one encoded change (`fedjob/downlink.py`),
written to `<workdir>/downlink/<result id>.chunks` before the round's checkpoint,
which holds the copy itself. A silo's download names the copy it holds: it gets
the chain of changes from there, or the whole copy when the chain is gone (a new
silo, a lost copy, one that fell more than `keep` rounds behind). After a restart
only changes that lead to the checkpoint's copy are kept: one written for a round
the crash lost would lead a silo to a copy no one else holds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedjob.checkpoint import atomic_write
from fedjob.chunking import State
from fedjob.downlink import Change, DownlinkEncoder, full_chunks, initial_id
from fedjob.v1 import fedjob_pb2 as pb

log = logging.getLogger("fedjob.aggregator")
_LENGTH = 4


class Broadcast:
    def __init__(
        self,
        encoder: DownlinkEncoder,
        folder: Path,
        state: State,
        state_id: str | None,
        keep: int = 4,
    ) -> None:
        self.encoder = encoder
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state = state
        self.id = state_id or initial_id(state)
        self.keep = keep
        self.index = self.folder / "index.json"
        # result id -> (base id, file), oldest first
        self.changes: dict[str, tuple[str, Path]] = {}
        self._load_index()

    def _load_index(self) -> None:
        entries = json.loads(self.index.read_text()) if self.index.exists() else []
        by_result = {e["result"]: e for e in entries}
        # Walk back from the checkpoint's copy: only that chain is still valid.
        chain: list[dict[str, str]] = []
        at = self.id
        while at in by_result and len(chain) < self.keep:
            e = by_result[at]
            chain.append(e)
            at = e["base"]
        for e in reversed(chain):
            self.changes[e["result"]] = (e["base"], self.folder / e["file"])
        kept = {p.name for _, p in self.changes.values()}
        for f in self.folder.glob("*.chunks"):
            if f.name not in kept:
                f.unlink(missing_ok=True)
        self._write_index()

    def _write_index(self) -> None:
        entries = [{"base": b, "result": r, "file": p.name} for r, (b, p) in self.changes.items()]
        atomic_write(self.index, json.dumps(entries).encode())

    def advance(self, new_global: State, round_number: int) -> Change:
        """The round closed: encode and apply its change (the caller has stopped full downloads)."""
        change = self.encoder.advance(self.state, self.id, new_global, round_number)
        path = self.folder / f"{change.result}.chunks"
        with open(path, "wb") as f:
            for c in change.chunks:
                data = c.SerializeToString()
                f.write(len(data).to_bytes(_LENGTH, "little"))
                f.write(data)
        self.changes[change.result] = (change.base, path)
        while len(self.changes) > self.keep:
            oldest = next(iter(self.changes))
            self.changes.pop(oldest)[1].unlink(missing_ok=True)
        self._write_index()
        self.id = change.result
        return change

    def stream(self, have: str, chunk_bytes: int) -> Iterator[pb.Chunk]:
        """What a silo holding copy `have` needs: the changes since it, or the whole copy.

        Call under the caller's lock (the chain is read now; the chunks stream later).
        """
        files = self._chain_from(have)
        if files is None:
            return full_chunks(self.state, self.id, chunk_bytes)
        return self._read(files)

    def _chain_from(self, have: str) -> list[Path] | None:
        """The change files that take a copy `have` to the current one, or None (send it whole)."""
        if have == self.id:
            return []
        files: list[Path] = []
        at = self.id
        while at != have:
            entry = self.changes.get(at)
            if entry is None:
                return None
            files.append(entry[1])
            at = entry[0]
        return list(reversed(files))

    @staticmethod
    def _read(files: list[Path]) -> Iterator[pb.Chunk]:
        """Stored changes, one after another, renumbered into one stream."""
        seq = 0
        for path in files:
            with open(path, "rb") as f:
                while header := f.read(_LENGTH):
                    chunk = pb.Chunk.FromString(f.read(int.from_bytes(header, "little")))
                    chunk.seq = seq
                    seq += 1
                    yield chunk

    def error(self, global_state: State) -> float:
        """L2 norm of what the silos' copy still lacks of the global model (the downlink's debt)."""
        return float(
            np.sqrt(
                sum(
                    float(np.square(global_state[n] - b, dtype=np.float64).sum())
                    for n, b in self.state.items()
                )
            )
        )
