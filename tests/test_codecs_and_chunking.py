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

CODECS = [
    "raw",
    "raw+zstd",
    "fp16",
    "fp16+zstd",
    "bf16",
    "bf16+zstd",
    "int8",
    "int8+zstd",
    "q8.128",
    "q4.64+zstd",
    "q2.128+zstd",
    "sparse+raw",
    "sparse+int8+zstd",
    "sparse+q4.32+zstd",
    "sparse+q2.128",
    "q4.64n+zstd",
    "q2.128n",
    "sparse+q2.128n+zstd",
]
LEVELS = {"q8": 127, "q4": 7, "q2": 1}
finite_f32 = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
tensors = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=40), elements=finite_f32)


def error_bound(codec: str, values: np.ndarray) -> float:
    """At most one rounding step of the coarsest block (a block's scale is its peak / levels)."""
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    number = codec.removeprefix("sparse+").split("+")[0]
    if number.startswith("q") and number.endswith("n"):
        # Nearest codes at a least-squares scale may clip a block's peak: the bound is per block
        # (test_nearest_rounding_fits_each_blocks_scale), not per value.
        return np.inf
    if number.startswith("q"):
        return peak / LEVELS[number.split(".")[0]] * (1 + 2**-7) + 1e-30
    # bf16: a subnormal value may flush to zero.
    return {
        "raw": 0.0,
        "fp16": peak * 2**-10 + 1e-7,
        "bf16": peak * 2**-7 + 1.2e-38,
        "int8": peak / 127 + 1e-7,
    }[number]


@settings(max_examples=60, deadline=None)
@given(values=tensors, name=st.sampled_from(CODECS))
def test_every_codec_round_trips_within_its_error_bound(values: np.ndarray, name: str) -> None:
    codec = Codec.from_name(name)
    flat = values.reshape(-1)
    decoded = codec.decode(codec.encode(flat, np.random.default_rng(1)), flat.size)
    assert decoded.dtype == np.float32 and decoded.shape == flat.shape
    assert np.all(np.abs(decoded - flat) <= error_bound(name, flat) * 1.0001)


@pytest.mark.parametrize("name", ["q8.128", "q4.128", "q2.128"])
def test_block_quantizers_round_stochastically_and_without_bias(name: str) -> None:
    codec = Codec.from_name(name)
    values = np.full(128 * 200, 0.3, dtype=np.float32)
    values[::128] = 1.0  # sets each block's scale: 0.3 falls between two levels
    decoded = codec.decode(codec.encode(values, np.random.default_rng(0)), values.size)
    rest = np.delete(decoded, np.s_[::128])
    # Each value lands on one of the two levels around it, in proportion: unbiased.
    assert len(np.unique(rest)) == 2 and rest.min() < 0.3 < rest.max()
    assert abs(float(rest.mean()) - 0.3) < 0.01  # and 0.3 on average
    bits = int(name[1])
    assert len(codec.encode(values, np.random.default_rng(0)).data) == 2 * 200 + values.size * bits // 8


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(1, 5000),
    density=st.floats(0.0, 1.0),
    name=st.sampled_from(["sparse+raw", "sparse+q4.32", "sparse+int8+zstd"]),
)
def test_the_sparse_layout_keeps_every_position_and_is_never_much_larger_than_dense(
    size: int, density: float, name: str
) -> None:
    rng = np.random.default_rng(size)
    values = rng.normal(size=size).astype(np.float32)
    values[rng.random(size) >= density] = 0.0
    codec = Codec.from_name(name)
    payload = codec.encode(values, np.random.default_rng(0))
    decoded = codec.decode(payload, size)
    assert (decoded[values == 0] == 0).all()  # a zero stays exactly zero
    if name == "sparse+raw":
        np.testing.assert_array_equal(decoded, values)
    dense = Codec.from_name(name.removeprefix("sparse+"))
    if not dense.byte_stages:
        assert len(payload.data) <= len(dense.encode(values, np.random.default_rng(0)).data) + 1


def sparse_payload(positions: list[int], nnz: int | None = None, width: int = 2) -> Payload:
    """A hand-built sparse+raw slice: gaps between the given positions, then one float each."""
    gaps = np.diff(np.asarray(positions), prepend=0).astype(f"<u{width}")
    count = len(positions) if nnz is None else nnz
    head = b"\x01" + count.to_bytes(4, "little") + bytes([width])
    return Payload(head + gaps.tobytes() + np.ones(len(positions), "<f4").tobytes())


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (sparse_payload([3, 7, 100]), "index 100 out of range for a slice of 50"),
        (sparse_payload([3, 7, 7]), "a position repeats (duplicate index)"),
        (sparse_payload([3, 7], nnz=3), "sparse: 18 bytes, 3 values of raw need 24"),
        (sparse_payload([3, 7], nnz=60), "60 values announced in a slice of 50"),
        (Payload(b"\x02"), "the first byte must be 0 (dense) or 1 (sparse)"),
        (Payload(b"\x01" + (1).to_bytes(4, "little") + b"\x03" + b"\x00" * 7), "gap width 3"),
    ],
)
def test_a_malformed_sparse_slice_is_refused_with_what_is_wrong(payload: Payload, message: str) -> None:
    with pytest.raises(CodecError, match=None) as info:
        Codec.from_name("sparse+raw").decode(payload, 50)
    assert message in str(info.value)


@settings(max_examples=60, deadline=None)
@given(
    values=hnp.arrays(np.float32, st.integers(1, 700), elements=finite_f32),
    bits=st.sampled_from([2, 4, 8]),
    block=st.sampled_from([8, 64, 128]),
)
def test_nearest_rounding_fits_each_blocks_scale(values: np.ndarray, bits: int, block: int) -> None:
    codec = Codec.from_name(f"q{bits}.{block}n")
    payload = codec.encode(values, np.random.default_rng(1))
    # Deterministic: the same values give the same bytes whatever the generator.
    assert payload.data == codec.encode(values, np.random.default_rng(2)).data
    decoded = codec.decode(payload, values.size)
    levels = LEVELS[f"q{bits}"]
    for lo in range(0, values.size, block):
        x, d = values[lo : lo + block].astype(np.float64), decoded[lo : lo + block].astype(np.float64)
        peak = float(np.abs(x).max())
        # No worse than nearest codes at the block's peak / levels (the fit starts there and each
        # Lloyd step can only lower the error), give or take storing the scale as bfloat16.
        rms = float(np.sqrt(np.mean((d - x) ** 2)))
        assert rms <= peak / levels * (1 + 2**-7) / 2 + peak * 2**-8 + 1e-30


def test_nearest_rounding_has_less_than_half_the_error_of_stochastic_at_two_bits() -> None:
    values = np.random.default_rng(0).standard_normal(128 * 500).astype(np.float32)

    def error(name: str) -> float:
        codec = Codec.from_name(name)
        decoded = codec.decode(codec.encode(values, np.random.default_rng(1)), values.size)
        return float(np.linalg.norm(decoded - values) / np.linalg.norm(values))

    # Stochastic 2-bit rounding adds more noise than the values carry (an error feedback residual
    # then grows); nearest codes at a fitted scale keep it well below them.
    assert error("q2.128") > 1.0
    assert error("q2.128n") < 0.5 * error("q2.128")
    assert error("q4.128n") < error("q4.128")


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
