"""Payload stages: how one slice of a float32 tensor becomes bytes on the wire, and back.

A codec is a chain of small stages named like ``int8+zstd``: the first stage turns
the float32 slice into bytes (keeping any parameters it needs, such as a scale), the
following ones transform bytes. Decoding runs the chain backwards. The chain is
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

    def _check_size(self, payload: Payload, count: int) -> None:
        if len(payload.data) != count * self.bytes_per_value:
            raise CodecError(
                f"{self.name}: payload has {len(payload.data)} bytes, {count} values need "
                f"{count * self.bytes_per_value}"
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


class Codec:
    """A quantizer followed by zero or more byte stages; named 'int8+zstd' etc."""

    def __init__(self, quantizer: Quantizer, byte_stages: list[Zstd]) -> None:
        self.quantizer = quantizer
        self.byte_stages = byte_stages
        self.name = "+".join([quantizer.name, *(s.name for s in byte_stages)])

    @classmethod
    def from_name(cls, name: str) -> Codec:
        first, *rest = name.split("+")
        if first not in QUANTIZERS:
            raise CodecError(f"unknown codec stage {first!r} in {name!r}")
        stages = []
        for stage in rest:
            if stage != "zstd":
                raise CodecError(f"unknown codec stage {stage!r} in {name!r}")
            stages.append(Zstd())
        return cls(QUANTIZERS[first](), stages)

    @classmethod
    def from_spec(cls, codec: str, zstd: bool) -> Codec:
        return cls.from_name(SPEC_TO_QUANTIZER[codec] + ("+zstd" if zstd else ""))

    def encode(self, values: F32, rng: np.random.Generator) -> Payload:
        payload = self.quantizer.encode(values, rng)
        for stage in self.byte_stages:
            payload = stage.encode(payload)
        return payload

    def decode(self, payload: Payload, count: int) -> F32:
        expected = count * self.quantizer.bytes_per_value
        for stage in reversed(self.byte_stages):
            payload = stage.decode(payload, expected)
        return self.quantizer.decode(payload, count)

    def values_per_chunk(self, chunk_bytes: int) -> int:
        # Leave room for the compressor's frame overhead on incompressible data.
        margin = 64 + chunk_bytes // 128 if self.byte_stages else 0
        return max(1, (chunk_bytes - margin) // self.quantizer.bytes_per_value)
