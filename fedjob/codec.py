"""Payload stages: how one slice of a float32 tensor becomes bytes on the wire, and back.

A codec is a chain of small stages named like ``int8+zstd`` or ``sparse+q2.128+zstd``:
an optional sparse layout (non-zero values and their positions), a quantizer that
turns float32 values into bytes (keeping any parameters it needs, such as a scale),
then stages that transform bytes. Decoding runs the chain backwards. The chain is
chosen per job (``spec.compression``) and its name travels with every chunk, so
the receiver can refuse what the job did not negotiate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import zstandard

F32 = npt.NDArray[np.float32]


class CodecError(ValueError):
    """A payload that cannot be decoded as its codec says."""


@dataclass
class Payload:
    data: bytes
    params: list[float] = field(default_factory=list)


class Quantizer(ABC):
    """First stage: float32 values <-> bytes."""

    name: str
    bytes_per_value: int

    @abstractmethod
    def encode(self, values: F32, rng: np.random.Generator) -> Payload: ...

    @abstractmethod
    def decode(self, payload: Payload, count: int) -> F32: ...

    def size(self, count: int) -> int:
        """Bytes of the encoding of `count` values."""
        return count * self.bytes_per_value

    def _check_size(self, payload: Payload, count: int) -> None:
        if len(payload.data) != self.size(count):
            raise CodecError(
                f"{self.name}: payload has {len(payload.data)} bytes, {count} values need {self.size(count)}"
            )


class RawFloat32(Quantizer):
    name = "raw"
    bytes_per_value = 4

    def encode(self, values: F32, rng: np.random.Generator) -> Payload:
        return Payload(values.astype("<f4", copy=False).tobytes())

    def decode(self, payload: Payload, count: int) -> F32:
        self._check_size(payload, count)
        return np.frombuffer(payload.data, dtype="<f4").astype(np.float32)


class Float16(Quantizer):
    name = "fp16"
    bytes_per_value = 2

    def encode(self, values: F32, rng: np.random.Generator) -> Payload:
        # Values beyond fp16's range would become inf and be refused at the
        # receiver; clipping keeps an honest but large update representable.
        return Payload(np.clip(values, -65504, 65504).astype("<f2").tobytes())

    def decode(self, payload: Payload, count: int) -> F32:
        self._check_size(payload, count)
        return np.frombuffer(payload.data, dtype="<f2").astype(np.float32)


class BFloat16(Quantizer):
    """bfloat16 by hand: numpy has no bf16 dtype; it is the top half of a float32."""

    name = "bf16"
    bytes_per_value = 2

    def encode(self, values: F32, rng: np.random.Generator) -> Payload:
        bits = values.astype(np.float32).view(np.uint32)
        # Round to nearest even on the 16 dropped bits.
        rounded = bits + (0x7FFF + ((bits >> 16) & 1))
        return Payload((rounded >> 16).astype("<u2").tobytes())

    def decode(self, payload: Payload, count: int) -> F32:
        self._check_size(payload, count)
        half = np.frombuffer(payload.data, dtype="<u2").astype(np.uint32)
        return (half << 16).view(np.float32)


class Int8(Quantizer):
    """Symmetric int8 with one scale per chunk and stochastic rounding (unbiased)."""

    name = "int8"
    bytes_per_value = 1

    def encode(self, values: F32, rng: np.random.Generator) -> Payload:
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        scaled = values.astype(np.float64) / scale
        q = np.floor(scaled + rng.random(values.shape))
        return Payload(np.clip(q, -127, 127).astype(np.int8).tobytes(), [scale])

    def decode(self, payload: Payload, count: int) -> F32:
        self._check_size(payload, count)
        if len(payload.params) != 1 or not np.isfinite(payload.params[0]) or payload.params[0] <= 0:
            raise CodecError("int8: needs one finite positive scale")
        q = np.frombuffer(payload.data, dtype=np.int8).astype(np.float32)
        return q * np.float32(payload.params[0])


def _bf16_up(x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """bfloat16 bits of the smallest bf16 >= each (non-negative, finite) value."""
    bits = x.astype(np.float32).view(np.uint32)
    up = (bits & 0xFFFF) != 0
    return np.asarray((bits >> 16) + up, dtype=np.uint16)


class BlockQuantizer(Quantizer):
    """Symmetric `bits`-bit integers with one scale per block of `block` values.

    Codes are q + L for q in [-L, L], L = 2^(bits-1) - 1 (127, 7 or 1: 2 bits is ternary),
    packed 8 / bits to a byte, with each block's scale as bfloat16. 2 bits with blocks of
    128 cost 0.27 bytes per value (15x smaller than float32). Two roundings:

    - `stochastic`: the scale is max|x| / L rounded up, so no value is clipped, and each
      value rounds up or down at random: unbiased, for chains without error feedback.
    - `nearest`: the scale is fitted to the block by least squares (a few Lloyd steps from
      max|x| / L) and each value rounds to the nearest code, clipping the largest when
      that lowers the block's error. Biased, but with half the error or less: the choice
      when error feedback owes the rounding to later rounds (the compressed downlink
      always does; top-k's residual does on the uplink). Stochastic rounding's extra
      variance is what a residual then has to carry.
    """

    ROUNDINGS = ("stochastic", "nearest")
    LLOYD_STEPS = 3

    def __init__(self, bits: int, block: int, rounding: str = "stochastic") -> None:
        if bits not in (2, 4, 8):
            raise CodecError(f"quantize: {bits} bits; 8, 4 or 2")
        if not 8 <= block <= 1 << 16:
            raise CodecError(f"quantize: block size {block}; 8 to 65536")
        if rounding not in self.ROUNDINGS:
            raise CodecError(f"quantize: rounding {rounding!r}; stochastic or nearest")
        self.bits, self.block, self.rounding = bits, block, rounding
        self.levels = (1 << (bits - 1)) - 1
        self.name = f"q{bits}.{block}" + ("n" if rounding == "nearest" else "")
        self.bytes_per_value = 1  # an upper bound, for sizing chunks; size() is exact

    def size(self, count: int) -> int:
        blocks = -(-count // self.block)
        return 2 * blocks + -(-count * self.bits // 8)

    def encode(self, values: F32, rng: np.random.Generator) -> Payload:
        n = values.size
        blocks = -(-n // self.block)
        padded = np.zeros(blocks * self.block, dtype=np.float32)
        padded[:n] = values
        rows = padded.reshape(blocks, self.block)
        peak = np.abs(rows).max(axis=1) if n else np.zeros(0, np.float32)
        scale_bits = _bf16_up(peak / np.float32(self.levels))
        if self.rounding == "nearest":
            scale_bits = self._fit(rows, scale_bits)
        scale = (scale_bits.astype(np.uint32) << 16).view(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1.0))
        if self.rounding == "nearest":
            q = np.rint(rows / safe[:, None])
        else:
            q = np.floor(rows.astype(np.float64) / safe[:, None] + rng.random(rows.shape))
        codes = (np.clip(q, -self.levels, self.levels) + self.levels).astype(np.uint8).reshape(-1)[:n]
        return Payload(scale_bits.astype("<u2").tobytes() + _pack(codes, self.bits))

    def _fit(self, rows: F32, start: npt.NDArray[np.uint16]) -> npt.NDArray[np.uint16]:
        """Least-squares block scales: alternate nearest codes and the best scale for them."""
        scale = (start.astype(np.uint32) << 16).view(np.float32)
        for _ in range(self.LLOYD_STEPS):
            safe = np.where(scale > 0, scale, np.float32(1.0))
            q = np.clip(np.rint(rows / safe[:, None]), -self.levels, self.levels)
            qq = np.einsum("ij,ij->i", q, q)
            best = np.einsum("ij,ij->i", rows, q) / np.where(qq > 0, qq, np.float32(1.0))
            scale = np.where(qq > 0, best, scale).astype(np.float32)
        # bfloat16 to nearest (the codes are rounded against the stored scale, so no drift)
        bits = scale.view(np.uint32)
        return np.asarray((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, dtype=np.uint16)

    def decode(self, payload: Payload, count: int) -> F32:
        self._check_size(payload, count)
        blocks = -(-count // self.block)
        scale = (np.frombuffer(payload.data, dtype="<u2", count=blocks).astype(np.uint32) << 16).view(
            np.float32
        )
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise CodecError(f"{self.name}: a block scale is negative or not finite")
        codes = _unpack(payload.data[2 * blocks :], self.bits, count)
        if count and int(codes.max()) > 2 * self.levels:
            raise CodecError(f"{self.name}: code {int(codes.max())} is beyond {2 * self.levels}")
        q = codes.astype(np.float32) - np.float32(self.levels)
        return q * np.repeat(scale, self.block)[:count]


def _pack(codes: npt.NDArray[np.uint8], bits: int) -> bytes:
    if bits == 8:
        return codes.tobytes()
    per = 8 // bits
    padded = np.zeros(-(-codes.size // per) * per, dtype=np.uint8)
    padded[: codes.size] = codes
    groups = padded.reshape(-1, per)
    out = np.zeros(groups.shape[0], dtype=np.uint8)
    for i in range(per):
        out |= groups[:, i] << np.uint8(i * bits)
    return out.tobytes()


def _unpack(data: bytes, bits: int, count: int) -> npt.NDArray[np.uint8]:
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw[:count]
    per, mask = 8 // bits, np.uint8((1 << bits) - 1)
    out = np.empty((raw.size, per), dtype=np.uint8)
    for i in range(per):
        out[:, i] = (raw >> np.uint8(i * bits)) & mask
    return out.reshape(-1)[:count]


class Sparse:
    """Sends a slice's non-zero values with their positions when that is smaller than all of it.

    Top-k leaves most of a slice zero. Per slice, the smaller of two layouts goes out:
    `0x00` + the quantizer's dense encoding, or `0x01` + nnz (uint32) + the gap width
    (1, 2 or 4 bytes) + the gaps between positions (the first from 0; every later gap
    >= 1, so a position never repeats) + the quantizer's encoding of the nnz values.
    A slice is thus never larger than its dense encoding plus one byte, which keeps
    chunks bounded whatever the sparsity. Decoding checks everything: positions in
    range, no duplicates, lengths that agree with nnz and with the chunk's count.
    """

    name = "sparse"

    def __init__(self, quantizer: Quantizer) -> None:
        self.quantizer = quantizer

    def max_size(self, count: int) -> int:
        return 1 + self.quantizer.size(count)

    def encode(self, values: F32, rng: np.random.Generator) -> Payload:
        sparse = self.encode_sparse(values, rng)
        return sparse if sparse is not None else self.encode_dense(values, rng)

    def encode_dense(self, values: F32, rng: np.random.Generator) -> Payload:
        inner = self.quantizer.encode(values, rng)
        return Payload(b"\x00" + inner.data, inner.params)

    def encode_sparse(self, values: F32, rng: np.random.Generator) -> Payload | None:
        """The sparse layout, or None when it would not be smaller than the dense one."""
        positions = np.flatnonzero(values)
        nnz = positions.size
        gaps = np.diff(positions, prepend=0) if nnz else positions
        widest = int(gaps.max()) if nnz else 0
        width = 1 if widest < 1 << 8 else 2 if widest < 1 << 16 else 4
        if 6 + nnz * width + self.quantizer.size(nnz) >= self.max_size(values.size):
            return None
        inner = self.quantizer.encode(np.ascontiguousarray(values[positions]), rng)
        head = b"\x01" + nnz.to_bytes(4, "little") + bytes([width])
        return Payload(head + gaps.astype(f"<u{width}").tobytes() + inner.data, inner.params)

    def decode(self, payload: Payload, count: int) -> F32:
        data = payload.data
        if not data or data[0] not in (0, 1):
            raise CodecError("sparse: the first byte must be 0 (dense) or 1 (sparse)")
        if data[0] == 0:
            return self.quantizer.decode(Payload(data[1:], payload.params), count)
        if len(data) < 6:
            raise CodecError("sparse: truncated header")
        nnz, width = int.from_bytes(data[1:5], "little"), data[5]
        if width not in (1, 2, 4):
            raise CodecError(f"sparse: gap width {width}; 1, 2 or 4")
        if nnz > count:
            raise CodecError(f"sparse: {nnz} values announced in a slice of {count}")
        end = 6 + nnz * width
        if len(data) != end + self.quantizer.size(nnz):
            raise CodecError(
                f"sparse: {len(data)} bytes, {nnz} values of {self.quantizer.name} need "
                f"{end + self.quantizer.size(nnz)}"
            )
        gaps = np.frombuffer(data[6:end], dtype=f"<u{width}").astype(np.int64)
        if nnz > 1 and int(gaps[1:].min()) < 1:
            raise CodecError("sparse: a position repeats (duplicate index)")
        positions = np.cumsum(gaps)
        if nnz and int(positions[-1]) >= count:
            raise CodecError(f"sparse: index {int(positions[-1])} out of range for a slice of {count}")
        out = np.zeros(count, dtype=np.float32)
        out[positions] = self.quantizer.decode(Payload(data[end:], payload.params), nnz)
        return out


class Zstd:
    """Lossless stage on bytes."""

    name = "zstd"

    def __init__(self, level: int = 3, max_output: int = 64 << 20) -> None:
        self._level = level
        self._max_output = max_output

    def encode(self, payload: Payload) -> Payload:
        return Payload(zstandard.ZstdCompressor(level=self._level).compress(payload.data), payload.params)

    def decode(self, payload: Payload, expected_size: int) -> Payload:
        try:
            # max_output_size bounds what a forged frame can make us allocate.
            data = zstandard.ZstdDecompressor().decompress(
                payload.data, max_output_size=min(expected_size, self._max_output)
            )
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd: {exc}") from None
        return Payload(data, payload.params)


# The global model goes down as raw float32: zstd saves about 8% on float weights and,
# encoded per download, would cost the aggregator CPU for every silo every round.
DOWNLOAD_CODEC = "raw"

QUANTIZERS: dict[str, type[Quantizer]] = {q.name: q for q in (RawFloat32, Float16, BFloat16, Int8)}
SPEC_TO_QUANTIZER = {"none": "raw", "fp16": "fp16", "bf16": "bf16", "int8": "int8"}


def quantizer_from_name(name: str) -> Quantizer:
    if name in QUANTIZERS:
        return QUANTIZERS[name]()
    if name.startswith("q") and "." in name:
        bits, _, block = name[1:].partition(".")
        nearest = block.endswith("n")
        block = block.removesuffix("n")
        if bits.isdigit() and block.isdigit():
            return BlockQuantizer(int(bits), int(block), "nearest" if nearest else "stochastic")
    raise CodecError(f"unknown codec stage {name!r}")


class Codec:
    """An optional sparse layout, a quantizer, then zero or more byte stages: 'sparse+q2.128+zstd' etc."""

    def __init__(self, quantizer: Quantizer, byte_stages: list[Zstd], sparse: bool = False) -> None:
        self.quantizer = quantizer
        self.sparse = Sparse(quantizer) if sparse else None
        self.byte_stages = byte_stages
        self.name = "+".join(
            [*(["sparse"] if sparse else []), quantizer.name, *(s.name for s in byte_stages)]
        )

    @classmethod
    def from_name(cls, name: str) -> Codec:
        parts = name.split("+")
        sparse = parts[0] == "sparse"
        if sparse:
            parts = parts[1:]
        if not parts:
            raise CodecError(f"codec {name!r} names no number format")
        try:
            quantizer = quantizer_from_name(parts[0])
        except CodecError as exc:
            raise CodecError(f"{exc} in {name!r}") from None
        stages = []
        for stage in parts[1:]:
            if stage != "zstd":
                raise CodecError(f"unknown codec stage {stage!r} in {name!r}")
            stages.append(Zstd())
        return cls(quantizer, stages, sparse)

    @classmethod
    def from_spec(cls, codec: str, zstd: bool) -> Codec:
        return cls.from_name(SPEC_TO_QUANTIZER[codec] + ("+zstd" if zstd else ""))

    def encode(self, values: F32, rng: np.random.Generator) -> Payload:
        if self.sparse is None:
            return self._bytes(self.quantizer.encode(values, rng))
        if not self.byte_stages:
            return self.sparse.encode(values, rng)
        # Before zstd the sparse layout is smaller, but zstd may shrink the dense codes of a
        # mostly-zero slice further than the gaps: send whichever ends up smaller.
        sparse = self.sparse.encode_sparse(values, rng)
        dense = self._bytes(self.sparse.encode_dense(values, rng))
        if sparse is None:
            return dense
        packed = self._bytes(sparse)
        return packed if len(packed.data) < len(dense.data) else dense

    def _bytes(self, payload: Payload) -> Payload:
        for stage in self.byte_stages:
            payload = stage.encode(payload)
        return payload

    def max_size(self, count: int) -> int:
        """The largest valid encoding of `count` values before the byte stages."""
        return self.sparse.max_size(count) if self.sparse is not None else self.quantizer.size(count)

    def decode(self, payload: Payload, count: int) -> F32:
        expected = self.max_size(count)
        for stage in reversed(self.byte_stages):
            payload = stage.decode(payload, expected)
        if self.sparse is not None:
            return self.sparse.decode(payload, count)
        return self.quantizer.decode(payload, count)

    def values_per_chunk(self, chunk_bytes: int) -> int:
        # Leave room for the compressor's frame overhead on incompressible data.
        budget = chunk_bytes - (64 + chunk_bytes // 128 if self.byte_stages else 0)
        n = max(1, budget // self.quantizer.bytes_per_value)
        if isinstance(self.quantizer, BlockQuantizer):
            q = self.quantizer
            n = max(1, int(budget * 8 / (q.bits + 16 / q.block)) - q.block)
        while n > 1 and self.max_size(n) > budget:
            n -= max(1, n // 1000)
        return n
