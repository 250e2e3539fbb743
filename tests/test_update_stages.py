"""The update stages: a silo's whole update runs through `spec.compression.uplink` before the codec.

Each stage's silo half is checked against a NumPy reference; a chain round-trips through
the wire codec; each stage's aggregator half holds the silo to its promise in the real
aggregator (mTLS on loopback); and stage state is transactional and durable: committed
when the aggregator accepted the round, rolled back when it did not, restored after a
restart exactly as it was.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedjob.chunking import ChunkValidator, State, assemble, iter_chunks, manifest_of
from fedjob.codec import Codec
from fedjob.spec import FederatedJob, SpecError, parse_job
from fedjob.stage_state import StageStateStore, StatefulUplink
from fedjob.update_stages import (
    ClipNorm,
    TopK,
    Update,
    UplinkPipeline,
    topk_count,
    uplink_codec,
    uplink_from_spec,
)
from fedjob.v1 import fedjob_pb2 as pb
from tests.conftest import job_doc, serve_live
from tests.test_aggregator_protocol import header, messages, wait_for_round_close


def deltas(seed: int, scale: float = 1.0) -> State:
    rng = np.random.default_rng(seed)
    return {
        "w": (scale * rng.normal(size=(40, 25))).astype(np.float32),
        "b": (scale * rng.normal(size=(7,))).astype(np.float32),
    }


def norm(state: State) -> float:
    return math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in state.values()))


def copy(state: State) -> State:
    return {k: v.copy() for k, v in state.items()}


# ----- the silo halves --------------------------------------------------------------------------


def test_clip_scales_a_large_update_to_its_bound_and_leaves_a_small_one_alone() -> None:
    big, small = deltas(1, 10.0), deltas(2, 0.01)
    u = Update(1, copy(big), extras={"c": np.ones(3, np.float32)})
    ClipNorm(5.0).apply(u)
    assert norm(u.deltas) == pytest.approx(5.0, rel=1e-6)
    np.testing.assert_allclose(u.deltas["w"], big["w"] * (5.0 / norm(big)), rtol=1e-6)
    assert (u.extras["c"] == 1).all()  # an algorithm's own tensors are not the update's to clip
    v = Update(1, copy(small))
    ClipNorm(5.0).apply(v)
    assert all((v.deltas[k] == small[k]).all() for k in small)


def test_topk_sends_each_tensors_largest_values_and_owes_the_rest() -> None:
    d = deltas(3)
    u = Update(1, copy(d))
    stage = TopK(0.1)
    stage.apply(u)
    for name, v in d.items():
        k = topk_count(v.size, 0.1)
        sent = u.deltas[name].reshape(-1)
        ref = np.zeros(v.size, np.float32)
        top = np.argsort(-np.abs(v.reshape(-1)), kind="stable")[:k]
        ref[top] = v.reshape(-1)[top]
        np.testing.assert_array_equal(sent, ref)
        # The residual is exactly what was not sent.
        np.testing.assert_array_equal(stage.residual[name] + sent, v.reshape(-1))


def test_topk_per_block_keeps_the_largest_values_of_every_block() -> None:
    d = deltas(6)
    u = Update(1, copy(d))
    stage = TopK(0.1, block=64)
    stage.apply(u)
    for name, v in d.items():
        flat, sent = v.reshape(-1), u.deltas[name].reshape(-1)
        if flat.size <= 64:  # a tensor no larger than a block: per tensor, as without blocks
            assert np.count_nonzero(sent) == topk_count(flat.size, 0.1)
            continue
        for start in range(0, flat.size, 64):
            block, got = flat[start : start + 64], sent[start : start + 64]
            k = min(topk_count(64, 0.1), block.size)
            want = np.zeros_like(block)
            top = np.argsort(-np.abs(block), kind="stable")[:k]
            want[top] = block[top]
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(stage.residual[name] + sent, flat)
        # The aggregator half allows exactly what the blocks may send, and no more.
        assert stage.limit(flat.size) == -(-flat.size // 64) * topk_count(64, 0.1)


def test_error_feedback_delivers_every_coordinates_mass_over_rounds() -> None:
    stage = TopK(0.05)
    total_in = {k: np.zeros(v.size) for k, v in deltas(0).items()}
    total_sent = {k: np.zeros(v.size) for k, v in deltas(0).items()}
    for r in range(1, 31):
        d = deltas(r)
        u = Update(r, copy(d))
        stage.apply(u)
        for k in d:
            total_in[k] += d[k].reshape(-1)
            total_sent[k] += u.deltas[k].reshape(-1)
    for k in total_in:
        # sent + owed = everything trained; nothing is silently dropped.
        np.testing.assert_allclose(total_sent[k] + stage.residual[k], total_in[k], atol=1e-4)
    without = TopK(0.05, error_feedback=False)
    u = Update(1, deltas(1))
    without.apply(u)
    assert without.state() == {} and np.count_nonzero(u.deltas["w"]) == topk_count(1000, 0.05)


def test_a_chain_round_trips_through_the_wire_codec() -> None:
    pipeline = UplinkPipeline([ClipNorm(3.0), TopK(0.2)])
    u = Update(1, deltas(4, 2.0))
    pipeline.apply(u)
    assert norm(u.deltas) <= 3.0 + 1e-5
    for codec_name, atol in (("raw", 0.0), ("int8+zstd", None)):
        codec = Codec.from_name(codec_name)
        manifest = manifest_of(u.deltas)
        chunks = list(iter_chunks(u.deltas, codec, 4096, np.random.default_rng(0)))
        got = assemble(iter(chunks), ChunkValidator(manifest, codec, 4096))
        for k, v in u.deltas.items():
            # What a stage zeroed stays exactly zero on the wire: the density check depends on it.
            assert ((got[k] == 0) == (v == 0)).all() or codec_name != "raw"
            assert np.count_nonzero(got[k]) <= np.count_nonzero(v)
            if atol == 0.0:
                np.testing.assert_array_equal(got[k], v)
            else:
                peak = float(np.abs(v).max())
                np.testing.assert_allclose(got[k], v, atol=peak / 127 + 1e-7)


def test_error_feedback_owes_what_the_codecs_rounding_took_too() -> None:
    codec = Codec.from_name("sparse+q2.64+zstd")
    stage = TopK(0.1)
    pipeline = UplinkPipeline([stage])
    d = deltas(5)
    u = Update(1, copy(d))
    pipeline.apply(u)
    pipeline.owe_wire_error(u, codec, 4096, seed=7)
    # What the aggregator decodes from the very bytes the upload will send (same seed) ...
    chunks = list(iter_chunks(u.deltas, codec, 4096, np.random.default_rng(7)))
    received = assemble(iter(chunks), ChunkValidator(manifest_of(u.deltas), codec, 4096))
    for k in d:
        # ... plus what the silo still owes is exactly the round's update: nothing lost, nothing twice.
        np.testing.assert_allclose(received[k].reshape(-1) + stage.residual[k], d[k].reshape(-1), atol=1e-6)
        assert not np.array_equal(received[k], u.deltas[k])  # 2 bits did round


# ----- state: committed, rolled back, restored ----------------------------------------------------


def run_rounds(uplink: StatefulUplink, rounds: range, refused: set[int] = frozenset()) -> list[State]:  # type: ignore[assignment]
    sent = []
    for r in rounds:
        u = Update(r, deltas(r))
        uplink.apply(u)
        sent.append(copy(u.deltas))
        if r in refused:
            uplink.rollback()
        else:
            uplink.commit(r)
    return sent


def chain() -> UplinkPipeline:
    return UplinkPipeline([ClipNorm(30.0), TopK(0.05)])


def test_a_checkpoint_taken_mid_job_restores_every_stages_state(tmp_path: Path) -> None:
    straight = run_rounds(StatefulUplink(chain(), None), range(1, 7))
    first = StatefulUplink(chain(), StageStateStore(tmp_path / "silo"))
    run_rounds(first, range(1, 4))
    del first  # the silo restarts: a new process, a new pipeline, the same folder
    again = StatefulUplink(chain(), StageStateStore(tmp_path / "silo"))
    assert again.restored_round == 3
    after = run_rounds(again, range(4, 7))
    for a, b in zip(straight[3:], after, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_a_refused_update_leaves_the_stage_state_as_if_it_had_never_been_made(tmp_path: Path) -> None:
    for store in (None, StageStateStore(tmp_path / "silo")):
        with_refusal = run_rounds(StatefulUplink(chain(), store), range(1, 6), refused={3})
        # Round 3's update was dropped: rounds 4 and 5 continue from round 2's residual.
        reference = StatefulUplink(chain(), None)
        run_rounds(reference, range(1, 3))
        expected = [run_rounds(reference, range(r, r + 1))[0] for r in (4, 5)]
        for a, b in zip(with_refusal[3:], expected, strict=True):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_state_saved_by_another_chain_is_not_loaded(tmp_path: Path) -> None:
    run_rounds(StatefulUplink(chain(), StageStateStore(tmp_path)), range(1, 3))
    other = StatefulUplink(UplinkPipeline([TopK(0.5)]), StageStateStore(tmp_path))
    assert other.restored_round == 0 and other.pipeline.state() == {}
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["uplink-state-000002.npz", "uplink-state.json"]  # one state file, no temporaries


# ----- the spec -----------------------------------------------------------------------------------


def test_the_spec_composes_the_chain_in_its_order() -> None:
    def built(uplink: list[dict[str, Any]], **compression: Any) -> tuple[str, str]:
        job = parse_job(job_doc(compression={"uplink": uplink, **compression}))
        return uplink_from_spec(job.spec.compression.uplink).name, uplink_codec(job.spec.compression).name

    clip_topk = [{"clip": {"maxNorm": 2}}, {"topk": {"fraction": 0.01}}]
    assert built(clip_topk) == ("clip(maxNorm=2) -> topk(fraction=0.01)", "sparse+int8+zstd")
    assert (
        built([*clip_topk, {"quantize": {"bits": 2, "blockSize": 64}}, {"zstd": {}}])[1]
        == "sparse+q2.64n+zstd"  # auto: nearest, since top-k's residual owes the rounding
    )
    assert built([{"quantize": {"bits": 4}}]) == ("none", "q4.128")
    ef_only = [{"topk": {"fraction": 1.0}}, {"quantize": {"bits": 2, "rounding": "nearest"}}]
    assert built(ef_only)[1] == "sparse+q2.128n"
    no_feedback = [{"topk": {"fraction": 0.1, "errorFeedback": False}}, {"quantize": {"bits": 2}}]
    assert built(no_feedback)[1] == "sparse+q2.128"  # nothing owes the rounding: unbiased
    assert built([*clip_topk, {"quantize": {"bits": 4, "rounding": "stochastic"}}])[1] == "sparse+q4.128"
    assert built([{"topk": {"fraction": 0.02, "blockSize": 4096}}])[0] == "topk(fraction=0.02, block=4096)"
    assert built([{"bf16": {}}, {"zstd": {"level": 9}}]) == ("none", "bf16+zstd")
    assert built([{"zstd": {}}]) == ("none", "raw+zstd")
    assert built([], codec="fp16", zstd=False) == ("none", "fp16")
    assert uplink_from_spec(parse_job(job_doc()).spec.compression.uplink).stateful is False


def test_an_uplink_encoding_and_the_codec_field_are_not_both_set() -> None:
    doc = job_doc(compression={"codec": "fp16", "uplink": [{"quantize": {"bits": 4}}]})
    with pytest.raises(SpecError) as info:
        parse_job(doc)
    assert "compression.codec: the uplink's encoding is set in compression.uplink" in str(info.value)


@pytest.mark.parametrize(
    ("uplink", "aggregation", "message"),
    [
        ([{}], {}, "spec.compression.uplink[0]: each stage names exactly one of clip, topk, quantize"),
        ([{"clip": {"maxNorm": 1}, "topk": {"fraction": 0.1}}], {}, "exactly one of clip, topk"),
        ([{"quantize": {"bits": 3}}], {}, "spec.compression.uplink[0].quantize.bits"),
        (
            [{"zstd": {}}, {"quantize": {}}],
            {},
            "compression.uplink[0]: zstd compresses the encoded bytes; it goes last",
        ),
        (
            [{"quantize": {}}, {"topk": {"fraction": 0.1}}],
            {},
            "compression.uplink[1]: topk transforms the whole update",
        ),
        ([{"quantize": {}}, {"fp16": {}}], {}, "compression.uplink[1]: fp16: one number format per chain"),
        ([{"clip": {"maxNorm": 0}}], {}, "spec.compression.uplink[0].clip.maxNorm"),
        ([{"topk": {"fraction": 1.5}}], {}, "spec.compression.uplink[0].topk.fraction"),
        ([{"clip": {"maxNorm": 1}}, {"clip": {"maxNorm": 2}}], {}, "clip appears twice"),
        (
            [{"topk": {"fraction": 0.1, "errorFeedback": False}}, {"quantize": {"rounding": "nearest"}}],
            {},
            "compression.uplink[1].quantize.rounding: nearest is biased",
        ),
        ([{"quantize": {"bits": 2, "rounding": "nearest"}}], {}, "needs a topk with errorFeedback"),
        (
            [{"topk": {"fraction": 0.1}}],
            {"minSilos": 3, "robust": {"rule": "median"}},
            "spec.compression.uplink: topk cannot combine with aggregation.robust.rule median",
        ),
    ],
)
def test_impossible_uplinks_are_refused_with_the_field_and_the_rule(
    uplink: list[dict[str, Any]], aggregation: dict[str, Any], message: str
) -> None:
    silos = [{"name": n, "data": {"path": f"/d/{n}"}} for n in ("a", "b", "c")]
    doc = job_doc(compression={"uplink": uplink}, aggregation={"minSilos": 1, **aggregation}, silos=silos)
    with pytest.raises(SpecError) as info:
        parse_job(doc)
    assert message in str(info.value)


# ----- the aggregator halves, in the real aggregator ----------------------------------------------


def one_silo_job(**compression: Any) -> FederatedJob:
    """A job of one silo, alpha, whose uploads are 4 KiB chunks through the given compression."""
    return parse_job(
        job_doc(
            compression={"chunkBytes": 4096, **compression},
            aggregation={"minSilos": 1, "roundDeadlineSeconds": 600},
            silos=[{"name": "alpha", "data": {"path": "/d"}}],
        )
    )


def test_the_aggregator_bounds_an_update_to_the_jobs_clip_norm_whatever_the_silo_did(
    tmp_path: Path, small_state: State
) -> None:
    job = one_silo_job(codec="none", zstd=False, uplink=[{"clip": {"maxNorm": 1.0}}])
    with serve_live(tmp_path, job, small_state) as agg:
        stub = agg.stub("silo-alpha")
        stub.Join(pb.JoinRequest(expected_silo="alpha"))
        unclipped = {k: np.full(v.shape, 2.0, np.float32) for k, v in small_state.items()}
        chunks = list(iter_chunks(unclipped, agg.coord.codec, 4096, np.random.default_rng(0)))
        assert stub.UploadUpdate(
            messages(agg, unclipped, hdr=header(agg, total_chunks=len(chunks)), chunks=chunks)
        ).accepted
        wait_for_round_close(agg)
        moved = {k: agg.coord.global_state[k] - small_state[k] for k in small_state}
        record = agg.coord.history[-1]["silo_updates"]["alpha"]
    assert norm(moved) == pytest.approx(1.0, rel=1e-5)
    # Recorded: the norm as sent, and the factor the job's clip applied (rounded to 1e-6).
    assert record["norm"] == pytest.approx(norm(unclipped))
    assert record["scale"] == pytest.approx(1.0 / norm(unclipped), abs=1e-6)


def test_a_denser_update_than_the_jobs_topk_is_refused_while_it_streams(
    tmp_path: Path, small_state: State
) -> None:
    job = one_silo_job(codec="int8", zstd=True, uplink=[{"topk": {"fraction": 0.1}}])
    with serve_live(tmp_path, job, small_state) as agg:
        stub = agg.stub("silo-alpha")
        stub.Join(pb.JoinRequest(expected_silo="alpha"))
        assert agg.coord.codec.name == "sparse+int8+zstd"  # a chain with top-k sends sparse slices

        def upload(delta: State) -> pb.UploadReceipt:
            chunks = list(iter_chunks(delta, agg.coord.codec, 4096, np.random.default_rng(0)))
            hdr = header(agg, total_chunks=len(chunks))
            receipt: pb.UploadReceipt = stub.UploadUpdate(messages(agg, delta, hdr=hdr, chunks=chunks))
            return receipt

        dense = {k: np.full(v.shape, 0.5, np.float32) for k, v in small_state.items()}
        with pytest.raises(grpc.RpcError) as info:
            upload(dense)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("too_dense: layer.lora_A: more than 120 non-zero values")
        assert agg.metrics.rejections_by_reason.labels("demo", "too_dense")._value.get() == 1
        # The same silo's honest, sparsified update counts.
        u = Update(1, dense)
        uplink_from_spec(job.spec.compression.uplink).apply(u)
        assert upload(u.deltas).accepted
        wait_for_round_close(agg)


def test_a_malformed_sparse_chunk_gets_invalid_argument_and_the_round_goes_on(
    tmp_path: Path, small_state: State
) -> None:
    job = one_silo_job(uplink=[{"topk": {"fraction": 0.1}}, {"quantize": {"bits": 4}}])
    with serve_live(tmp_path, job, small_state) as agg:
        codec = agg.coord.codec
        assert codec.name == "sparse+q4.128n"  # auto rounding after error-feedback top-k: nearest
        stub = agg.stub("silo-alpha")
        stub.Join(pb.JoinRequest(expected_silo="alpha"))
        u = Update(1, {k: np.full(v.shape, 0.5, np.float32) for k, v in small_state.items()})
        uplink_from_spec(job.spec.compression.uplink).apply(u)
        good = list(iter_chunks(u.deltas, codec, 4096, np.random.default_rng(0)))
        first = good[0].payload
        assert first[0] == 1  # the sparse layout: flag, nnz, gap width, gaps, values
        nnz, w = int.from_bytes(first[1:5], "little"), first[5]
        forged = {
            "index out of range": first[:6] + b"\xff" * w + first[6 + w :],
            "duplicate index": first[: 6 + w] + b"\x00" * w + first[6 + 2 * w :],
            "count mismatch": first[:1] + (nnz + 1).to_bytes(4, "little") + first[5:],
        }
        for what, payload in forged.items():
            bad = pb.Chunk()
            bad.CopyFrom(good[0])
            bad.payload, bad.crc32 = payload, zlib.crc32(payload)
            hdr = header(agg, total_chunks=len(good))
            with pytest.raises(grpc.RpcError) as info:
                stub.UploadUpdate(messages(agg, u.deltas, hdr=hdr, chunks=[bad, *good[1:]]))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            assert info.value.details().startswith("malformed: layer.lora_A: sparse:"), (
                what,
                info.value.details(),
            )
        hdr = header(agg, total_chunks=len(good))
        assert stub.UploadUpdate(messages(agg, u.deltas, hdr=hdr, chunks=good)).accepted
        wait_for_round_close(agg)
