"""Split a set of named tensors into bounded, checksummed chunks, and check them on arrival.

Every chunk says which tensor it belongs to, where in it (element offset and
count), how it is encoded and its CRC-32, so a receiver can verify and place each
one on its own, fold it away, and forget it: nothing ever holds a whole encoded
model. The receiver refuses anything that does not fit the tensors it expects.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from fedjob.codec import F32, Codec, CodecError, Payload
from fedjob.v1 import fedjob_pb2 as pb

State = dict[str, F32]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def manifest_of(state: Mapping[str, F32]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(k, tuple(int(d) for d in v.shape)) for k, v in state.items()}


def raw_bytes(manifest: Mapping[str, TensorInfo]) -> int:
    return 4 * sum(t.size for t in manifest.values())


def iter_chunks(
    state: Mapping[str, F32], codec: Codec, chunk_bytes: int, rng: np.random.Generator, start_seq: int = 0
) -> Iterator[pb.Chunk]:
    per_chunk = codec.values_per_chunk(chunk_bytes)
    seq = start_seq
    for name, tensor in state.items():
        flat = np.ascontiguousarray(tensor, dtype=np.float32).reshape(-1)
        spec = pb.TensorSpec(name=name, shape=list(tensor.shape), dtype="float32")
        for offset in range(0, max(flat.size, 1), per_chunk):
            part = flat[offset : offset + per_chunk]
            payload = codec.encode(part, rng)
            yield pb.Chunk(
                seq=seq,
                tensor=spec,
                offset=offset,
                count=part.size,
                codec=codec.name,
                payload=payload.data,
                crc32=zlib.crc32(payload.data),
                params=payload.params,
            )
            seq += 1


def count_chunks(manifest: Mapping[str, TensorInfo], codec: Codec, chunk_bytes: int) -> int:
    per_chunk = codec.values_per_chunk(chunk_bytes)
    return sum(max(1, -(-t.size // per_chunk)) for t in manifest.values())


class ChunkRejected(Exception):
    """A chunk that must not be used. `reason` is a short, bounded label (metrics use it)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ChunkValidator:
    """Checks one stream of chunks against the expected tensors, in order, exactly once each."""

    def __init__(
        self, expected: Mapping[str, TensorInfo], codec: Codec, max_chunk_bytes: int, start_seq: int = 0
    ) -> None:
        self.expected = expected
        self.codec = codec
        self.max_chunk_bytes = max_chunk_bytes
        self.next_seq = start_seq
        self.filled: dict[str, int] = {}
        self.payload_bytes = 0

    def check(self, chunk: pb.Chunk) -> tuple[str, int, F32]:
        if chunk.seq != self.next_seq:
            kind = "duplicate_chunk" if chunk.seq < self.next_seq else "out_of_order"
            raise ChunkRejected(kind, f"chunk seq {chunk.seq}, expected {self.next_seq}")
        if len(chunk.payload) > self.max_chunk_bytes:
            raise ChunkRejected("oversized", f"chunk of {len(chunk.payload)} bytes > {self.max_chunk_bytes}")
        if zlib.crc32(chunk.payload) != chunk.crc32:
            raise ChunkRejected("checksum", f"CRC-32 mismatch in chunk {chunk.seq}")
        name = chunk.tensor.name
        info = self.expected.get(name)
        if info is None:
            raise ChunkRejected("unknown_tensor", f"tensor {name!r} is not a trainable parameter")
        if tuple(chunk.tensor.shape) != info.shape:
            raise ChunkRejected(
                "shape_mismatch", f"{name}: shape {tuple(chunk.tensor.shape)}, expected {info.shape}"
            )
        if chunk.tensor.dtype != "float32":
            raise ChunkRejected("dtype", f"{name}: dtype {chunk.tensor.dtype!r}, expected 'float32'")
        if chunk.codec != self.codec.name:
            raise ChunkRejected("codec", f"codec {chunk.codec!r}, this job uses {self.codec.name!r}")
        done = self.filled.get(name, 0)
        if chunk.offset != done or (chunk.count == 0 and info.size > 0):
            raise ChunkRejected("out_of_order", f"{name}: chunk at offset {chunk.offset}, expected {done}")
        if chunk.offset + chunk.count > info.size:
            raise ChunkRejected(
                "out_of_range", f"{name}: elements {chunk.offset}+{chunk.count} exceed size {info.size}"
            )
        try:
            values = self.codec.decode(Payload(chunk.payload, list(chunk.params)), chunk.count)
        except CodecError as exc:
            raise ChunkRejected("malformed", f"{name}: {exc}") from None
        if not np.isfinite(values).all():
            raise ChunkRejected("non_finite", f"{name}: NaN or Inf at offset {chunk.offset}")
        self.filled[name] = done + chunk.count
        self.next_seq += 1
        self.payload_bytes += len(chunk.payload)
        return name, int(chunk.offset), values

    def missing(self) -> list[str]:
        return [n for n, t in self.expected.items() if self.filled.get(n, 0) < t.size]


def assemble(chunks: Iterable[pb.Chunk], validator: ChunkValidator) -> State:
    """Rebuild whole tensors from a verified stream (the silo side of a download)."""
    out = {n: np.empty(t.size, dtype=np.float32) for n, t in validator.expected.items()}
    for chunk in chunks:
        name, offset, values = validator.check(chunk)
        out[name][offset : offset + values.size] = values
    missing = validator.missing()
    if missing:
        raise ChunkRejected("incomplete", f"stream ended before tensors {missing[:5]} were complete")
    return {n: out[n].reshape(t.shape) for n, t in validator.expected.items()}
