"""One silo's upload of one update: receive chunks, check each, spool it to disk until it is complete.

An upload session knows nothing of the round's sum. Every chunk is checked as it
arrives (order, CRC-32, tensor, shape, codec, bounds, finite values), so a bad
one is refused while the silo is still streaming, and its wire bytes are
appended to a spool file. Only when the trailer confirms the whole update does
the coordinator fold it, from the spool, into the running sum; a broken or
abandoned upload is just a spool file to delete. The spool holds the encoded
bytes (an int8 update spools a quarter of its float32 size), and an interrupted
stream resumes from the next chunk it lacks.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedjob.aggregation import UpdateMeta
from fedjob.chunking import ChunkRejected, ChunkValidator, TensorInfo, raw_bytes
from fedjob.codec import F32, Codec
from fedjob.update_stages import UpdateCheck, UpdateRejected
from fedjob.v1 import fedjob_pb2 as pb

_LENGTH = 4  # each spooled chunk: a little-endian length, then the serialised Chunk


class SessionClosed(Exception):
    """The session was discarded (its round closed, or it was superseded) while a chunk arrived."""


@dataclass
class UploadSession:
    silo: str
    round: int
    upload_id: str
    meta: UpdateMeta
    weight: float
    total_chunks: int
    spool: Path
    raw_bytes: int
    validator: ChunkValidator
    parameters: frozenset[str] = frozenset()  # the tensors whose norm is the update's norm
    norm_sq: float = 0.0  # sum of squares of the parameter deltas received so far
    checks: list[UpdateCheck] = field(default_factory=list)  # the uplink stages' aggregator halves
    stage_scale: float = 1.0  # what the checks allowed, set by settle()
    streaming: bool = True  # a handler is reading this upload's stream right now
    folding: bool = False  # complete; being folded into the sum
    _file: BinaryIO | None = field(default=None, repr=False)
    # receive() runs outside the coordinator's lock; discard() may come from another thread.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(
        cls,
        *,
        silo: str,
        round_number: int,
        upload_id: str,
        meta: UpdateMeta,
        weight: float,
        total_chunks: int,
        spool: Path,
        manifest: Mapping[str, TensorInfo],
        codec: Codec,
        chunk_bytes: int,
        parameters: frozenset[str] = frozenset(),
        checks: list[UpdateCheck] | None = None,
    ) -> UploadSession:
        session = cls(
            silo=silo,
            round=round_number,
            upload_id=upload_id,
            meta=meta,
            weight=weight,
            total_chunks=total_chunks,
            spool=spool,
            raw_bytes=raw_bytes(manifest),
            validator=ChunkValidator(manifest, codec, chunk_bytes),
            parameters=parameters,
            checks=list(checks or []),
        )
        session._file = open(spool, "wb")  # noqa: SIM115 - lives as long as the session
        return session

    @property
    def next_seq(self) -> int:
        return self.validator.next_seq

    def receive(self, chunk: pb.Chunk) -> int:
        """Check one chunk and spool it; raises ChunkRejected or SessionClosed. Returns its payload size."""
        with self._lock:
            if self._file is None:
                raise SessionClosed(f"the upload of {self.silo} for round {self.round} was dropped")
            name, _, values = self.validator.check(chunk)
            if name in self.parameters:
                # Decoded anyway for the checks: the norm costs one dot product more.
                self.norm_sq += float(np.einsum("i,i->", values, values, dtype=np.float64))
                try:
                    for c in self.checks:
                        c.observe(name, int(chunk.offset), values)
                except UpdateRejected as exc:
                    raise ChunkRejected(exc.reason, exc.detail) from None
            data = chunk.SerializeToString()
            self._file.write(len(data).to_bytes(_LENGTH, "little"))
            self._file.write(data)
            return len(chunk.payload)

    def incomplete(self, trailer_chunks: int) -> str | None:
        """Why the update is not whole, or None when every tensor arrived."""
        v = self.validator
        if trailer_chunks != self.total_chunks or v.next_seq != self.total_chunks or v.missing():
            return f"got {v.next_seq} of {self.total_chunks} chunks"
        return None

    def settle(self) -> float:
        """The update is whole: the factor its stages' checks allow (raises UpdateRejected)."""
        norm = math.sqrt(self.norm_sq)
        scale = 1.0
        for c in self.checks:
            scale *= c.finish(norm * scale)
        self.stage_scale = scale
        return scale

    def seal(self) -> None:
        """The last chunk is in (or the session ends): close the spool for writing."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def values(self) -> Iterator[tuple[str, int, F32]]:
        """The spooled update, decoded slice by slice: (tensor, element offset, values).

        Decoding runs again here (the receive-time check kept nothing decoded), which
        costs CPU but keeps the session's memory at one chunk whatever the model size.
        """
        self.seal()
        check = ChunkValidator(self.validator.expected, self.validator.codec, self.validator.max_chunk_bytes)
        with open(self.spool, "rb") as f:
            while header := f.read(_LENGTH):
                chunk = pb.Chunk.FromString(f.read(int.from_bytes(header, "little")))
                yield check.check(chunk)

    def discard(self) -> None:
        self.seal()
        self.spool.unlink(missing_ok=True)
