"""No starvation: stalled or abusive connections cannot stop status, health or an honest silo's upload.

A certified silo that opens upload streams and never writes to them used to hold a
handler thread per stream; twelve were enough to keep an honest update out and leave
`GetStatus` unanswered. Now each identity gets one upload stream at a time (more are
refused at once), and a stream that goes quiet is cancelled at its deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedjob_aggregator.admission import (
    SILO_LIMITS,
    STATUS_RESERVE,
    Admission,
    TooManyCalls,
    pool_size,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedjob.chunking import State
from fedjob.spec import parse_job
from fedjob.v1 import fedjob_pb2 as pb
from tests.conftest import job_doc, serve_live
from tests.test_aggregator_protocol import header, messages


def test_each_identity_has_its_own_slots_per_kind_of_call() -> None:
    admission = Admission()
    admission.acquire("silo-a", "upload")
    with pytest.raises(TooManyCalls, match="at most 1 at once"):
        admission.acquire("silo-a", "upload")
    admission.acquire("silo-b", "upload")  # another silo is not affected
    admission.acquire("silo-a", "download")  # nor another kind of call
    admission.release("silo-a", "upload")
    admission.acquire("silo-a", "upload")  # a released slot is free again
    assert pool_size(3) == 3 * sum(SILO_LIMITS.values()) + STATUS_RESERVE


def test_two_hundred_stalled_streams_from_one_silo_delay_neither_status_nor_an_honest_upload(
    tmp_path: Path, small_state: State
) -> None:
    job = parse_job(
        job_doc(
            aggregation={"minSilos": 2, "roundDeadlineSeconds": 600},
            aggregator={"streams": {"headerSeconds": 4, "idleSeconds": 4}},
        )
    )
    release = threading.Event()

    def stalled() -> Iterator[pb.UploadMessage]:
        release.wait(60)  # opens the stream, never sends a message
        return
        yield

    with serve_live(tmp_path, job, small_state) as agg:
        alpha = agg.stub("silo-alpha")
        opened = time.monotonic()
        calls = [alpha.UploadUpdate.future(stalled()) for _ in range(200)]
        try:
            # Status, health checks and the other silo answer while the streams are open.
            observer = agg.stub("observer")
            started = time.monotonic()
            for _ in range(16):
                assert observer.GetStatus(pb.StatusRequest(), timeout=2).job == "demo"
            health = health_pb2_grpc.HealthStub(agg.channel("observer"))
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1
            beta = agg.stub("silo-beta")
            beta.Join(pb.JoinRequest(expected_silo="beta"), timeout=2)
            task = beta.GetTask(pb.TaskRequest(after_round=0, wait_seconds=2), timeout=5)
            delta = {k: np.full(v.shape, 0.5, np.float32) for k, v in small_state.items()}
            receipt = beta.UploadUpdate(messages(agg, delta, hdr=header(agg, task.round)), timeout=5)
            assert receipt.accepted
            assert time.monotonic() - started < 4.0, (
                "status or the honest upload waited on the stalled streams"
            )

            # 199 refused at once; the one admitted is cancelled when its header is overdue.
            codes = [c.exception(timeout=15).code() for c in calls]  # type: ignore[union-attr]
            waited = time.monotonic() - opened
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 199
            assert codes.count(grpc.StatusCode.CANCELLED) == 1
            assert 3.5 < waited < 15
            refused = agg.metrics.rejections_by_reason
            assert refused.labels("demo", "too_many_calls")._value.get() == 199
            # The client sees CANCELLED at once; the handler counts it when its blocked read ends.
            counted = time.monotonic() + 5
            while refused.labels("demo", "idle_stream")._value.get() < 1 and time.monotonic() < counted:
                time.sleep(0.05)
            assert refused.labels("demo", "idle_stream")._value.get() == 1
        finally:
            release.set()

        # Its slot is free again: the same silo, uploading properly, is accepted.
        alpha.Join(pb.JoinRequest(expected_silo="alpha"))
        assert alpha.UploadUpdate(messages(agg, delta, hdr=header(agg, task.round)), timeout=5).accepted
