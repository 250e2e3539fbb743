"""The aggregator over real gRPC + mTLS: rounds, refusals with precise statuses, resumable uploads.

These run the production servicer and coordinator with a small numeric model
state, so every protocol rule is checked without training anything.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid

import grpc
import numpy as np
import pytest

from fedjob.chunking import count_chunks, iter_chunks
from fedjob.codec import DOWNLOAD_CODEC, Codec
from fedjob.v1 import fedjob_pb2 as pb
from tests.conftest import LiveAggregator

CODEC = Codec.from_name("int8+zstd")
CHUNK = 4096


def header(agg: LiveAggregator, round_number: int = 1, **kw) -> pb.UpdateHeader:  # type: ignore[no-untyped-def]
    fields = dict(
        round=round_number,
        upload_id=uuid.uuid4().hex,
        num_samples=10,
        local_steps=5,
        train_loss=2.0,
        total_chunks=count_chunks(agg.coord.manifest, CODEC, CHUNK),
    )
    fields.update(kw)
    return pb.UpdateHeader(**fields)


def messages(agg: LiveAggregator, delta, hdr=None, chunks=None, trailer=True):  # type: ignore[no-untyped-def]
    hdr = hdr or header(agg)
    chunks = (
        chunks if chunks is not None else list(iter_chunks(delta, CODEC, CHUNK, np.random.default_rng(0)))
    )
    yield pb.UploadMessage(header=hdr)
    for c in chunks:
        yield pb.UploadMessage(chunk=c)
    if trailer:
        yield pb.UploadMessage(trailer=pb.UpdateTrailer(total_chunks=hdr.total_chunks))


def ones_like(state, value: float = 1.0):  # type: ignore[no-untyped-def]
    return {k: np.full(v.shape, value, np.float32) for k, v in state.items()}


def wait_for_round_close(agg: LiveAggregator, number: int = 1) -> None:
    deadline = time.time() + 10
    while agg.coord.completed < number:
        assert time.time() < deadline, f"round {number} did not close"
        time.sleep(0.05)


def assert_global_moved_by(agg: LiveAggregator, state, step: float) -> None:  # type: ignore[no-untyped-def]
    for k, v in state.items():
        np.testing.assert_allclose(agg.coord.global_state[k], v + step, atol=1e-5)


def refused(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_a_round_collects_both_silos_and_applies_fedavg(live_aggregator: LiveAggregator, small_state) -> None:  # type: ignore[no-untyped-def]
    agg = live_aggregator
    for silo, value in (("alpha", 1.0), ("beta", 3.0)):
        stub = agg.stub(f"silo-{silo}")
        assert stub.Join(pb.JoinRequest(expected_silo=silo)).silo == silo
        task = stub.GetTask(pb.TaskRequest(after_round=0, wait_seconds=5))
        assert (task.state, task.round) == (pb.Task.TRAIN, 1)
        got = list(stub.DownloadGlobal(pb.DownloadRequest(round=1)))
        assert all(len(c.payload) <= CHUNK for c in got)
        receipt = stub.UploadUpdate(messages(agg, ones_like(small_state, value)))
        assert receipt.accepted
    wait_for_round_close(agg)
    assert agg.coord.completed == 1
    # Equal sample counts: the mean delta is 2.0 everywhere (int8 of a constant is exact).
    for k, v in small_state.items():
        np.testing.assert_allclose(agg.coord.global_state[k], v + 2.0, atol=1e-5)
    record = agg.coord.history[0]
    assert record["participants"] == ["alpha", "beta"]
    assert record["compression_ratio"] > 1


def test_identity_comes_from_the_certificate_not_from_the_request(live_aggregator: LiveAggregator) -> None:
    stub = live_aggregator.stub("silo-beta")
    err = refused(lambda: stub.Join(pb.JoinRequest(expected_silo="alpha")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "belongs to silo 'beta', not 'alpha'" in err.details()


def test_an_observer_may_read_status_but_not_upload(live_aggregator: LiveAggregator) -> None:
    stub = live_aggregator.stub("observer")
    assert stub.GetStatus(pb.StatusRequest()).job == "demo"
    err = refused(lambda: stub.GetTask(pb.TaskRequest()))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("make", "code", "reason"),
    [
        (
            lambda agg, d: messages(agg, d, hdr=header(agg, round_number=7)),
            grpc.StatusCode.OUT_OF_RANGE,
            "future_round",
        ),
        (
            lambda agg, d: messages(agg, d, hdr=header(agg, total_chunks=1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad_header",
        ),
        (
            lambda agg, d: messages(agg, d, hdr=header(agg, num_samples=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad_header",
        ),
        (
            lambda agg, d: messages(agg, d, hdr=header(agg, train_loss=float("nan"))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad_header",
        ),
        (
            lambda agg, d: messages(agg, {"evil": np.ones(3, np.float32)}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown_tensor",
        ),
        (
            lambda agg, d: messages(agg, {k: np.ones((2, 2), np.float32) for k in d}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "shape_mismatch",
        ),
        (
            lambda agg, d: messages(
                agg,
                {**d, "bias": np.full(7, np.nan, np.float32)},
                chunks=list(
                    iter_chunks(
                        {**d, "bias": np.full(7, np.nan, np.float32)},
                        Codec.from_name("raw+zstd"),
                        CHUNK,
                        np.random.default_rng(0),
                    )
                ),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "codec",
        ),
        (
            lambda agg, d: messages(
                agg, d, chunks=list(iter_chunks(d, CODEC, CHUNK, np.random.default_rng(0)))[1:]
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "out_of_order",
        ),
        (
            lambda agg, d: messages(
                agg, d, chunks=list(iter_chunks(d, CODEC, CHUNK, np.random.default_rng(0)))[:-1]
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "incomplete",
        ),
        (
            lambda agg, d: iter([pb.UploadMessage(trailer=pb.UpdateTrailer())]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad_header",
        ),
    ],
)
def test_bad_updates_get_a_precise_status_and_the_round_goes_on(
    live_aggregator: LiveAggregator, small_state, make, code, reason
) -> None:  # type: ignore[no-untyped-def]
    agg = live_aggregator
    bad = agg.stub("silo-alpha")
    err = refused(lambda: bad.UploadUpdate(make(agg, ones_like(small_state, 5.0))))
    assert err.code() == code, err.details()
    assert err.details().startswith(reason)
    assert agg.metrics.rejections.labels("demo", "alpha", reason)._value.get() == 1
    # The honest silo is unaffected, and the refused one may still deliver a good update.
    assert agg.stub("silo-beta").UploadUpdate(messages(agg, ones_like(small_state, 1.0))).accepted
    assert bad.UploadUpdate(messages(agg, ones_like(small_state, 3.0))).accepted
    wait_for_round_close(agg)
    assert_global_moved_by(agg, small_state, 2.0)


def test_non_finite_values_are_refused(live_aggregator: LiveAggregator, small_state) -> None:  # type: ignore[no-untyped-def]
    agg = live_aggregator
    chunks = list(iter_chunks(ones_like(small_state), CODEC, CHUNK, np.random.default_rng(0)))
    chunks[-1].params[0] = float("inf")
    err = refused(lambda: agg.stub("silo-alpha").UploadUpdate(messages(agg, None, chunks=chunks)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("malformed")


def test_a_replayed_update_is_refused(live_aggregator: LiveAggregator, small_state) -> None:  # type: ignore[no-untyped-def]
    agg = live_aggregator
    stub = agg.stub("silo-alpha")
    assert stub.UploadUpdate(messages(agg, ones_like(small_state))).accepted
    err = refused(lambda: stub.UploadUpdate(messages(agg, ones_like(small_state))))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS


def test_an_interrupted_upload_resumes_where_it_stopped(live_aggregator: LiveAggregator, small_state) -> None:  # type: ignore[no-untyped-def]
    agg = live_aggregator
    stub = agg.stub("silo-alpha")
    delta = ones_like(small_state, 4.0)
    chunks = list(iter_chunks(delta, CODEC, CHUNK, np.random.default_rng(0)))
    hdr = header(agg)
    err = refused(lambda: stub.UploadUpdate(messages(agg, None, hdr=hdr, chunks=chunks[:2], trailer=False)))
    assert err.code() == grpc.StatusCode.ABORTED
    held = stub.QueryUpload(pb.QueryUploadRequest(round=1, upload_id=hdr.upload_id)).next_seq
    assert held == 2
    resumed = pb.UpdateHeader()
    resumed.CopyFrom(hdr)
    resumed.resume_from = held
    assert stub.UploadUpdate(messages(agg, None, hdr=resumed, chunks=chunks[2:])).accepted
    assert agg.stub("silo-beta").UploadUpdate(messages(agg, ones_like(small_state, 0.0))).accepted
    wait_for_round_close(agg)
    assert_global_moved_by(agg, small_state, 2.0)


def test_a_partial_upload_that_is_replaced_leaves_no_trace(
    live_aggregator: LiveAggregator, small_state
) -> None:  # type: ignore[no-untyped-def]
    agg = live_aggregator
    stub = agg.stub("silo-alpha")
    poison = list(iter_chunks(ones_like(small_state, 100.0), CODEC, CHUNK, np.random.default_rng(0)))
    refused(lambda: stub.UploadUpdate(messages(agg, None, chunks=poison[:3], trailer=False)))
    assert stub.UploadUpdate(messages(agg, ones_like(small_state, 2.0))).accepted
    assert agg.stub("silo-beta").UploadUpdate(messages(agg, ones_like(small_state, 2.0))).accepted
    wait_for_round_close(agg)
    assert_global_moved_by(agg, small_state, 2.0)


def test_stale_rounds_are_refused_after_a_round_closes(live_aggregator: LiveAggregator, small_state) -> None:  # type: ignore[no-untyped-def]
    agg = live_aggregator
    for silo in ("alpha", "beta"):
        assert agg.stub(f"silo-{silo}").UploadUpdate(messages(agg, ones_like(small_state))).accepted
    wait_for_round_close(agg)
    err = refused(
        lambda: agg.stub("silo-alpha").UploadUpdate(messages(agg, ones_like(small_state), hdr=header(agg, 1)))
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details().startswith("stale_round")
    err = refused(lambda: list(agg.stub("silo-alpha").DownloadGlobal(pb.DownloadRequest(round=1))))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_late_silo_asking_for_a_round_that_just_closed_waits_for_the_next(
    live_aggregator: LiveAggregator, small_state
) -> None:  # type: ignore[no-untyped-def]
    # A restarted silo still loading its model can be handed a round that its deadline closes before
    # the download: that is a race, not a bad update, and the silo must take the next round, not crash.
    from fedjob_worker.client import AggregatorClient, RoundClosed

    agg = live_aggregator
    for silo in ("alpha", "beta"):
        assert agg.stub(f"silo-{silo}").UploadUpdate(messages(agg, ones_like(small_state))).accepted
    wait_for_round_close(agg)
    late = AggregatorClient(agg.address, agg.certs, "alpha", CHUNK)
    download = Codec.from_name(DOWNLOAD_CODEC)
    try:
        with pytest.raises(RoundClosed, match="stale_round: round 1 is closed; round 2 is open"):
            late.download(1, agg.coord.manifest, download, CHUNK)
        assert agg.coord.rejected_total == 0, "a late download is not a rejected update"
        task = late.next_task(0)
        assert (task.state, task.round) == (pb.Task.TRAIN, 2)
        state, _ = late.download(2, agg.coord.manifest, download, CHUNK)
        assert_global_moved_by(agg, small_state, 1.0)
        for k, v in state.items():
            np.testing.assert_allclose(v, agg.coord.global_state[k], atol=1e-6)
    finally:
        late.close()


def test_a_silo_waiting_on_an_aggregator_that_shuts_down_reconnects_instead_of_failing(
    live_aggregator: LiveAggregator, caplog: pytest.LogCaptureFixture
) -> None:
    # SIGTERM to the aggregator (a rolling update, a drained node) cancels the silos' long polls; the
    # successor resumes from the checkpoint, so a silo must keep trying as it does after a crash.
    from fedjob_worker.client import AggregatorClient, Backoff

    agg = live_aggregator
    client = AggregatorClient(
        agg.address, agg.certs, "alpha", CHUNK, backoff=Backoff(initial=0.1, maximum=0.2, give_up_after=3)
    )
    failures: list[grpc.RpcError] = []

    def wait_for_round_2() -> None:
        try:
            client.next_task(1)  # a long poll: round 1 is still open
        except grpc.RpcError as exc:
            failures.append(exc)

    waiter = threading.Thread(target=wait_for_round_2)
    with caplog.at_level(logging.INFO, logger="fedjob.worker"):
        waiter.start()
        time.sleep(0.5)
        agg.server.stop(grace=0.2).wait()
        waiter.join(20)
    client.close()
    assert not waiter.is_alive()
    # gRPC reports the shutdown as CANCELLED or UNAVAILABLE depending on timing; both are retried.
    assert re.search(r"task: (CANCELLED|UNAVAILABLE \(Cancelling all calls\))", caplog.text), caplog.text
    # It kept retrying (nobody came back here) and gave up only when its patience ran out.
    assert [f.code() for f in failures] == [grpc.StatusCode.UNAVAILABLE]


# ----- federated evaluation ------------------------------------------------------------------------


@pytest.fixture
def evaluating_aggregator(tmp_path, small_state):  # type: ignore[no-untyped-def]
    """One training round, then the final evaluation: each silo evaluates 2 batches of 4 windows."""
    from fedjob.spec import parse_job
    from tests.conftest import job_doc, serve_live

    job = parse_job(
        job_doc(rounds=1, evaluation={"batches": 2}, aggregation={"minSilos": 1, "roundDeadlineSeconds": 600})
    )
    with serve_live(tmp_path, job, small_state) as agg:
        yield agg


def test_silos_evaluate_each_global_model_and_the_final_one_in_an_evaluation_step(
    evaluating_aggregator: LiveAggregator, small_state
) -> None:  # type: ignore[no-untyped-def]
    agg = evaluating_aggregator
    # Round 1's headers carry each silo's loss for the initial model (8 windows each).
    for silo, loss in (("alpha", 3.0), ("beta", 5.0)):
        stub = agg.stub(f"silo-{silo}")
        assert stub.GetTask(pb.TaskRequest(after_round=0, wait_seconds=5)).state == pb.Task.TRAIN
        hdr = header(agg, eval_loss=loss, eval_samples=8)
        assert stub.UploadUpdate(messages(agg, ones_like(small_state), hdr=hdr)).accepted
    wait_for_round_close(agg)
    assert agg.coord.history[0]["initial_federated_eval_loss"] == pytest.approx(4.0)
    assert agg.coord.phase == "Running"  # the final model is still to be evaluated
    # The last round is over: the silos evaluate its model, and train no more.
    for silo, loss in (("alpha", 2.0), ("beta", 4.0)):
        stub = agg.stub(f"silo-{silo}")
        task = stub.GetTask(pb.TaskRequest(after_round=1, wait_seconds=5))
        assert (task.state, task.round) == (pb.Task.EVALUATE, 2)
        state = {c.tensor.name for c in stub.DownloadGlobal(pb.DownloadRequest(round=2))}
        assert state == set(small_state)
        err = refused(
            lambda s=stub: s.UploadUpdate(messages(agg, ones_like(small_state), hdr=header(agg, 2)))
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "not_training" in err.details()
        stub.ReportEvaluation(pb.EvaluationReport(round=2, loss=loss, samples=8))
    deadline = time.time() + 10
    while agg.coord.phase != "Succeeded":
        assert time.time() < deadline, "the job did not finish after its final evaluation"
        time.sleep(0.05)
    record = agg.coord.history[0]
    assert record["federated_eval_loss"] == pytest.approx(3.0)
    assert record["silo_eval_loss"] == {"alpha": 2.0, "beta": 4.0}
    status = agg.stub("silo-alpha").GetStatus(pb.StatusRequest())
    assert (status.federated_eval_round, status.federated_eval_loss) == (1, pytest.approx(3.0))
    # The checkpoint's history has it too: a restarted aggregator reports the same.
    from fedjob.checkpoint import CheckpointStore

    stored = CheckpointStore(agg.coord.store.dir).load()
    assert stored is not None and stored.history[0]["federated_eval_loss"] == pytest.approx(3.0)


def test_an_evaluation_with_another_window_count_is_refused(
    evaluating_aggregator: LiveAggregator, small_state
) -> None:  # type: ignore[no-untyped-def]
    agg = evaluating_aggregator
    stub = agg.stub("silo-alpha")
    stub.GetTask(pb.TaskRequest(after_round=0, wait_seconds=5))
    for bad in (dict(eval_loss=0.1, eval_samples=10_000), dict(eval_loss=float("nan"), eval_samples=8)):
        hdr = header(agg, **bad)
        err = refused(lambda h=hdr: stub.UploadUpdate(messages(agg, ones_like(small_state), hdr=h)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad_eval" in err.details(), err.details()
    hdr = header(agg, eval_loss=3.0, eval_samples=8)
    assert stub.UploadUpdate(messages(agg, ones_like(small_state), hdr=hdr)).accepted
    assert agg.metrics.rejections_by_reason.labels(agg.job.name, "bad_eval")._value.get() == 2


def test_a_silos_progress_within_the_round_reaches_the_status(live_aggregator: LiveAggregator) -> None:  # type: ignore[no-untyped-def]
    agg = live_aggregator
    stub = agg.stub("silo-alpha")
    stub.Join(pb.JoinRequest(expected_silo="alpha"))
    assert stub.GetTask(pb.TaskRequest(after_round=0, wait_seconds=5)).state == pb.Task.TRAIN
    stub.ReportProgress(pb.ProgressReport(round=1, phase="training", step=12, steps=30))
    alpha = next(s for s in agg.coord.status().silos if s.name == "alpha")
    assert alpha.progress == "training 12/30"
    stub.ReportProgress(pb.ProgressReport(round=0, phase="uploading"))  # a stale round: dropped
    assert next(s for s in agg.coord.status().silos if s.name == "alpha").progress == "training 12/30"
    err = refused(lambda: stub.ReportProgress(pb.ProgressReport(round=1, phase="napping")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("bad_message:")
