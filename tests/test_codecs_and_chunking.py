"""The update path's encoding: every codec round-trips within its error bound, chunks stay bounded,
and a receiver refuses any chunk that does not fit what it expects."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedjob.chunking import ChunkRejected, ChunkValidator, assemble, count_chunks, iter_chunks, manifest_of
from fedjob.codec import Codec, CodecError, Payload
from fedjob.v1 import fedjob_pb2 as pb

CODECS = ["raw", "raw+zstd", "fp16", "fp16+zstd", "bf16", "bf16+zstd", "int8", "int8+zstd"]
finite_f32 = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
tensors = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=40), elements=finite_f32)


def error_bound(codec: str, values: np.ndarray) -> float:
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    return {"raw": 0.0, "fp16": peak * 2**-10 + 1e-7, "bf16": peak * 2**-7, "int8": peak / 127 + 1e-7}[
        codec.split("+")[0]
    ]


@settings(max_examples=60, deadline=None)
@given(values=tensors, name=st.sampled_from(CODECS))
def test_every_codec_round_trips_within_its_error_bound(values: np.ndarray, name: str) -> None:
    codec = Codec.from_name(name)
    flat = values.reshape(-1)
    decoded = codec.decode(codec.encode(flat, np.random.default_rng(1)), flat.size)
    assert decoded.dtype == np.float32 and decoded.shape == flat.shape
    assert np.all(np.abs(decoded - flat) <= error_bound(name, flat) * 1.0001)


def test_int8_stochastic_rounding_is_unbiased() -> None:
    codec = Codec.from_name("int8")
    values = np.full(20000, 0.3, dtype=np.float32)
    values[0] = 1.0  # sets the scale: 0.3 falls between two int8 levels
    decoded = codec.decode(codec.encode(values, np.random.default_rng(0)), values.size)
    assert abs(float(decoded[1:].mean()) - 0.3) < 1e-3


@settings(max_examples=40, deadline=None)
@given(
    state=st.dictionaries(
        st.from_regex(r"[a-z]{1,8}(\.[a-z]{1,8}){0,2}", fullmatch=True), tensors, min_size=1, max_size=4
    ),
    name=st.sampled_from(CODECS),
    chunk_bytes=st.sampled_from([4096, 5000, 1 << 16]),
)
def test_chunked_streams_reassemble_and_respect_the_chunk_limit(
    state: dict[str, np.ndarray], name: str, chunk_bytes: int
) -> None:
    codec = Codec.from_name(name)
    chunks = list(iter_chunks(state, codec, chunk_bytes, np.random.default_rng(0)))
    manifest = manifest_of(state)
    assert len(chunks) == count_chunks(manifest, codec, chunk_bytes)
    assert all(len(c.payload) <= chunk_bytes for c in chunks)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    rebuilt = assemble(chunks, ChunkValidator(manifest, codec, chunk_bytes))
    for k, v in state.items():
        assert rebuilt[k].shape == v.shape
        assert np.all(np.abs(rebuilt[k] - v) <= error_bound(name, v) * 1.0001)


@pytest.fixture
def stream() -> tuple[dict[str, np.ndarray], list[pb.Chunk], ChunkValidator]:
    state = {"w": np.linspace(-1, 1, 3000, dtype=np.float32).reshape(30, 100), "b": np.ones(10, np.float32)}
    codec = Codec.from_name("int8+zstd")
    chunks = list(iter_chunks(state, codec, 4096, np.random.default_rng(0)))
    return state, chunks, ChunkValidator(manifest_of(state), codec, 4096)


def _reseal(chunk: pb.Chunk) -> pb.Chunk:
    chunk.crc32 = zlib.crc32(chunk.payload)
    return chunk


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda c: setattr(c, "seq", 5), "out_of_order"),
        (lambda c: setattr(c, "payload", c.payload[:-1] + b"x"), "checksum"),
        (lambda c: c.tensor.__setattr__("name", "evil"), "unknown_tensor"),
        (lambda c: c.tensor.shape.__setitem__(0, 31), "shape_mismatch"),
        (lambda c: setattr(c, "codec", "raw"), "codec"),
        (lambda c: c.tensor.__setattr__("dtype", "float64"), "dtype"),
        (lambda c: setattr(c, "offset", 10), "out_of_order"),
        (lambda c: setattr(c, "count", 4000), "out_of_range"),
        (lambda c: setattr(c, "payload", b"\x00" * 5000), "oversized"),
        (lambda c: (setattr(c, "payload", b"not zstd"), _reseal(c)), "malformed"),
        (lambda c: c.params.__setitem__(0, float("nan")), "malformed"),
    ],
)
def test_a_tampered_chunk_is_refused_with_a_specific_reason(stream, tamper, reason: str) -> None:  # type: ignore[no-untyped-def]
    _, chunks, validator = stream
    bad = pb.Chunk()
    bad.CopyFrom(chunks[0])
    tamper(bad)
    with pytest.raises(ChunkRejected) as info:
        validator.check(bad)
    assert info.value.reason == reason


def test_non_finite_values_are_refused(stream) -> None:  # type: ignore[no-untyped-def]
    state, _, validator = stream
    codec = Codec.from_name("raw")
    poisoned = dict(state)
    poisoned["w"] = state["w"].copy()
    poisoned["w"][3, 3] = np.inf
    chunk = next(iter_chunks(poisoned, codec, 4096, np.random.default_rng(0)))
    validator.codec = codec
    with pytest.raises(ChunkRejected) as info:
        validator.check(chunk)
    assert info.value.reason == "non_finite"


def test_a_replayed_chunk_is_a_duplicate(stream) -> None:  # type: ignore[no-untyped-def]
    _, chunks, validator = stream
    validator.check(chunks[0])
    with pytest.raises(ChunkRejected) as info:
        validator.check(chunks[0])
    assert info.value.reason == "duplicate_chunk"


def test_a_truncated_stream_is_incomplete(stream) -> None:  # type: ignore[no-untyped-def]
    _, chunks, validator = stream
    with pytest.raises(ChunkRejected) as info:
        assemble(chunks[:-1], validator)
    assert info.value.reason == "incomplete"


def test_a_zstd_bomb_cannot_expand_past_the_expected_size() -> None:
    import zstandard

    codec = Codec.from_name("raw+zstd")
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * (4 << 20))
    with pytest.raises(CodecError):
        codec.decode(Payload(bomb), 100)


def test_unknown_codec_stages_are_refused() -> None:
    for name in ("int4", "int8+gzip", ""):
        with pytest.raises(CodecError):
            Codec.from_name(name)
