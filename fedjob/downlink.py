"""The compressed downlink: silos hold a copy of the global model and receive only its changes.

Without `spec.compression.downlink` every silo downloads the whole global model
as raw float32 every round. With it, the aggregator keeps a *broadcast copy* B,
the model every up-to-date silo holds, bit for bit. At each round's close it
encodes the change D = G - B (the new global model minus that copy) with the
downlink chain (top-k, then a number format, then zstd), decodes it exactly as a
silo will, and adds the decoded change to B. Silos add the very same decoded
change to their copies, in the same float32 arithmetic, so every party's copy is
bit-identical. What the chain drops or rounds away stays in G - B and goes out
in later rounds: the error feedback of the downlink needs no state of its own.

Each copy has an id: `r<round>-<hash>` of the previous id and the change's
bytes. A silo names the id it holds when it downloads; the aggregator sends the
changes since then if it still has them, else the whole copy (a new silo, or one
that lost its copy). Chunks say what they are: `base` is the id a change applies
to (empty for whole-state chunks) and `result` the id once the pass is applied.

`DownlinkEncoder` is the aggregator's half, `GlobalCopy` the silo's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from fedjob.chunking import ChunkRejected, ChunkValidator, State, TensorInfo, iter_chunks
from fedjob.codec import Codec, Payload
from fedjob.spec import CompressionSpec
from fedjob.update_stages import TopK, Update, chain_codec
from fedjob.v1 import fedjob_pb2 as pb

FULL_CODEC = "raw"  # a whole copy goes lossless: it starts a silo's chain of changes


def downlink_encoder(compression: CompressionSpec) -> DownlinkEncoder | None:
    """The job's downlink chain, or None when the whole model goes down every round."""
    if not compression.downlink:
        return None
    topk = next((st.topk for st in compression.downlink if st.topk is not None), None)
    return DownlinkEncoder(
        chain_codec(compression.downlink, error_feedback=True),  # G - B owes what is rounded away
        topk.fraction if topk is not None else None,
        compression.chunk_bytes,
        topk.block_size if topk is not None else None,
    )


def initial_id(state: Mapping[str, np.ndarray]) -> str:
    """The id of a starting copy: a hash of its bytes (two aggregators with one model agree)."""
    h = hashlib.sha256()
    for name, v in state.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(v, dtype="<f4").tobytes())
    return f"r0-{h.hexdigest()[:16]}"


@dataclass
class Change:
    """One round's encoded change to the broadcast copy: the chunks every silo applies."""

    base: str
    result: str
    chunks: list[pb.Chunk]

    @property
    def payload_bytes(self) -> int:
        return sum(len(c.payload) for c in self.chunks)


class DownlinkEncoder:
    """The aggregator's half: turn G - B into one encoded change and apply it to B."""

    def __init__(self, codec: Codec, topk: float | None, chunk_bytes: int, block: int | None = None) -> None:
        self.codec = codec
        # No residual: what top-k leaves out stays in G - B for the next round.
        self.topk = TopK(topk, error_feedback=False, block=block) if topk is not None else None
        self.chunk_bytes = chunk_bytes

    def advance(self, broadcast: State, broadcast_id: str, new_global: State, round_number: int) -> Change:
        """Encode new_global - broadcast, add its decoded value to `broadcast` in place."""
        chunks: list[pb.Chunk] = []
        h = hashlib.sha256(broadcast_id.encode())
        rng = np.random.default_rng([round_number, 0xD0])
        seq = 0
        for name, b in broadcast.items():
            # One tensor's change at a time: the temporaries stay O(largest tensor).
            change = {name: np.subtract(new_global[name], b, dtype=np.float32)}
            if self.topk is not None:
                self.topk.apply(Update(round_number, change))
            flat_b = b.reshape(-1)
            for chunk in iter_chunks(change, self.codec, self.chunk_bytes, rng, start_seq=seq):
                values = self.codec.decode(Payload(chunk.payload, list(chunk.params)), chunk.count)
                flat_b[chunk.offset : chunk.offset + chunk.count] += values
                h.update(chunk.payload)
                chunks.append(chunk)
                seq += 1
        result = f"r{round_number}-{h.hexdigest()[:16]}"
        for c in chunks:
            c.base, c.result = broadcast_id, result
        return Change(broadcast_id, result, chunks)


def full_chunks(state: State, state_id: str, chunk_bytes: int, start_seq: int = 0) -> Iterator[pb.Chunk]:
    """A whole copy, lossless, marked with its id (a silo starts its chain from it)."""
    codec = Codec.from_name(FULL_CODEC)
    for chunk in iter_chunks(state, codec, chunk_bytes, np.random.default_rng(0), start_seq=start_seq):
        chunk.result = state_id
        yield chunk


class GlobalCopy:
    """The silo's half: its copy of the broadcast model, and the id of that copy."""

    def __init__(self, manifest: Mapping[str, TensorInfo], codec: Codec, chunk_bytes: int) -> None:
        self.manifest = dict(manifest)
        self.codec = codec
        self.chunk_bytes = chunk_bytes
        self.state: State | None = None
        self.id = ""
        self.last = ""  # what the last download was: "whole", "changes" or "nothing"

    def receive(self, chunks: Iterable[pb.Chunk]) -> int:
        """Apply a download (a whole copy, or changes from the copy held); returns payload bytes.

        Raises ChunkRejected for anything that does not fit (a change to a copy this silo
        does not hold, a broken pass); the copy is then dropped and the next download is
        a whole one.
        """
        try:
            return self._receive(chunks)
        except BaseException:
            self.state, self.id = None, ""
            raise

    def _receive(self, chunks: Iterable[pb.Chunk]) -> int:
        total = 0
        validator: ChunkValidator | None = None
        target: State | None = None
        pending = ""
        for chunk in chunks:
            if validator is None or not validator.missing():  # a new pass begins
                if validator is not None:
                    self._finish(validator, target, pending)
                whole = not chunk.base
                self.last = "whole" if whole else "changes"
                if not whole and (self.state is None or chunk.base != self.id):
                    raise ChunkRejected(
                        "unknown_base", f"a change to {chunk.base!r}; this silo holds {self.id!r}"
                    )
                codec = Codec.from_name(FULL_CODEC) if whole else self.codec
                validator = ChunkValidator(self.manifest, codec, self.chunk_bytes, start_seq=chunk.seq)
                target = (
                    {n: np.empty(t.size, np.float32) for n, t in self.manifest.items()} if whole else None
                )
                pending = chunk.result
            if chunk.result != pending:
                raise ChunkRejected(
                    "malformed", f"chunk {chunk.seq} ends in {chunk.result!r}, its pass in {pending!r}"
                )
            name, offset, values = validator.check(chunk)
            if target is not None:
                target[name][offset : offset + values.size] = values
            else:
                assert self.state is not None
                self.state[name].reshape(-1)[offset : offset + values.size] += values
            total += len(chunk.payload)
        if validator is None:
            # Nothing to send: the aggregator's copy is the one this silo holds.
            if self.state is None:
                raise ChunkRejected("incomplete", "the download was empty")
            self.last = "nothing"
            return 0
        self._finish(validator, target, pending)
        return total

    def _finish(self, validator: ChunkValidator, target: State | None, result: str) -> None:
        missing = validator.missing()
        if missing:
            raise ChunkRejected("incomplete", f"stream ended before tensors {missing[:5]} were complete")
        if target is not None:
            self.state = {n: target[n].reshape(t.shape) for n, t in self.manifest.items()}
        self.id = result
