"""The silo's side of the wire: mTLS channel, retries with backoff, chunked download and upload."""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np

from fedjob.chunking import ChunkValidator, State, TensorInfo, assemble, count_chunks, iter_chunks
from fedjob.codec import Codec
from fedjob.downlink import GlobalCopy
from fedjob.tls import CertFiles
from fedjob.v1 import fedjob_pb2 as pb
from fedjob.v1 import fedjob_pb2_grpc as pb_grpc

log = logging.getLogger("fedjob.worker")
T = TypeVar("T")

# Worth trying again: the aggregator restarting, a network blip, a resumable upload.
# CANCELLED: an aggregator shutting down (SIGTERM: a rolling update, a drained node) cancels the
# calls in flight; its successor resumes from the checkpoint, so the silo reconnects like after a crash.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}


def _retryable(exc: grpc.RpcError) -> bool:
    # too_many_calls: the aggregator still holds this silo's previous call (a stream whose end it
    # has not seen yet, after a network blip); it frees the slot when it does, or at the deadline.
    held = (exc.details() or "").startswith("too_many_calls")
    return exc.code() in RETRYABLE or (exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and held)


class UpdateRefused(Exception):
    """The aggregator refused this update for good (bad content, closed round, replay)."""


class RoundClosed(Exception):
    """The round this silo was given closed (deadline, or job over) before it fetched the model."""


@dataclass
class Backoff:
    initial: float = 0.5
    maximum: float = 15.0
    give_up_after: float = 900.0

    def delays(self) -> Iterator[float]:
        delay, start = self.initial, time.monotonic()
        while time.monotonic() - start < self.give_up_after:
            yield delay * (0.5 + random.random())  # jitter: silos must not reconnect in lockstep
            delay = min(delay * 2, self.maximum)


class AggregatorClient:
    def __init__(
        self,
        address: str,
        certs: CertFiles,
        silo: str,
        chunk_bytes: int,
        backoff: Backoff | None = None,
        server_name: str | None = None,
    ) -> None:
        limit = chunk_bytes + (1 << 20)
        self.options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", 30_000),
        ]
        if server_name:
            self.options.append(("grpc.ssl_target_name_override", server_name))
        self.address = address
        self.certs = certs
        self.silo = silo
        self.backoff = backoff or Backoff()
        self._connect()

    def _stamp(self) -> tuple[float, float]:
        who = f"silo-{self.silo}"
        return os.stat(self.certs.cert(who)).st_mtime, os.stat(self.certs.key(who)).st_mtime

    def _connect(self) -> None:
        self.stamp = self._stamp()
        ca, cert, key = self.certs.load(f"silo-{self.silo}")
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        self.channel = grpc.secure_channel(self.address, creds, options=self.options)
        self.stub = pb_grpc.FederatedTrainingStub(self.channel)

    def _pick_up_renewal(self) -> None:
        """A renewed certificate (an external silo's, replaced on disk or in its mounted Secret) is
        used from the next call on; the one it replaces stays valid until it expires."""
        try:
            if self._stamp() == self.stamp:
                return
        except OSError:
            return  # mid-replacement: the next call looks again
        old = self.channel
        self._connect()
        old.close()
        log.info("using the silo's renewed certificate from now on")

    def close(self) -> None:
        self.channel.close()

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        last: grpc.RpcError | None = None
        for delay in self.backoff.delays():
            self._pick_up_renewal()
            try:
                return call()
            except grpc.RpcError as exc:
                if not _retryable(exc):
                    raise
                last = exc
                log.info("%s: %s (%s); retrying in %.1f s", what, exc.code().name, exc.details(), delay)
                time.sleep(delay)
        assert last is not None
        raise last

    def join(self) -> pb.JoinReply:
        reply: pb.JoinReply = self._retry(
            "join", lambda: self.stub.Join(pb.JoinRequest(expected_silo=self.silo, worker_version="0.1.0"))
        )
        return reply

    def next_task(self, after_round: int) -> pb.Task:
        while True:
            task: pb.Task = self._retry(
                "task",
                lambda: self.stub.GetTask(
                    pb.TaskRequest(after_round=after_round, wait_seconds=20), timeout=40
                ),
            )
            if task.state != pb.Task.WAIT:
                return task

    def download(
        self, round_number: int, manifest: dict[str, TensorInfo], codec: Codec, chunk_bytes: int
    ) -> tuple[State, int]:
        def once() -> tuple[State, int]:
            validator = ChunkValidator(manifest, codec, chunk_bytes)
            state = assemble(self.stub.DownloadGlobal(pb.DownloadRequest(round=round_number)), validator)
            return state, validator.payload_bytes

        return self._download(once)

    def download_copy(self, round_number: int, copy: GlobalCopy) -> int:
        """Compressed downlink: bring the silo's copy up to the round's (changes, or the whole copy).

        Returns the payload bytes received. A broken download drops the copy: the retry
        asks for the whole one.
        """

        def once() -> int:
            return copy.receive(
                self.stub.DownloadGlobal(pb.DownloadRequest(round=round_number, have=copy.id))
            )

        return self._download(once)

    def _download(self, once: Callable[[], T]) -> T:
        try:
            return self._retry("download", once)
        except grpc.RpcError as exc:
            # A silo that starts late (a restarted pod still loading its model) can ask for a round
            # the deadline has just closed: that is a reason to wait for the next, not to crash.
            details = exc.details() or ""
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and details.startswith(
                ("stale_round", "no_open_round")
            ):
                raise RoundClosed(details) from None
            raise

    def report_progress(self, round_number: int, phase: str, step: int = 0, steps: int = 0) -> None:
        """Where this silo is within the round, for the job's status: one try, never in the way."""
        try:
            self.stub.ReportProgress(
                pb.ProgressReport(round=round_number, phase=phase, step=step, steps=steps), timeout=2
            )
        except grpc.RpcError as exc:
            log.debug("progress not reported: %s", exc.code())

    def report_evaluation(self, round_number: int, loss: float, samples: int) -> None:
        """The final model's held-out loss (task EVALUATE)."""
        try:
            self._retry(
                "evaluation",
                lambda: self.stub.ReportEvaluation(
                    pb.EvaluationReport(round=round_number, loss=loss, samples=samples), timeout=60
                ),
            )
        except grpc.RpcError as exc:
            raise UpdateRefused(f"{exc.code().name}: {exc.details()}") from None

    def upload(
        self,
        round_number: int,
        delta: State,
        codec: Codec,
        chunk_bytes: int,
        seed: int,
        num_samples: int,
        local_steps: int,
        train_loss: float,
        eval_loss: float = 0.0,
        eval_samples: int = 0,
    ) -> int:
        """Stream one update, resuming where the aggregator stopped if the stream breaks.

        Returns the payload bytes sent.
        """
        upload_id = uuid.uuid4().hex
        manifest = {n: TensorInfo(n, tuple(v.shape)) for n, v in delta.items()}
        total = count_chunks(manifest, codec, chunk_bytes)
        raw = 4 * sum(v.size for v in delta.values())
        sent = 0

        def attempt() -> pb.UploadReceipt:
            nonlocal sent
            start = self.stub.QueryUpload(
                pb.QueryUploadRequest(round=round_number, upload_id=upload_id)
            ).next_seq
            header = pb.UpdateHeader(
                round=round_number,
                upload_id=upload_id,
                num_samples=num_samples,
                local_steps=local_steps,
                train_loss=train_loss,
                total_chunks=total,
                raw_bytes=raw,
                resume_from=start,
                eval_loss=eval_loss,
                eval_samples=eval_samples,
            )

            def messages() -> Iterator[pb.UploadMessage]:
                nonlocal sent
                yield pb.UploadMessage(header=header)
                # Same seed each attempt: a resumed upload continues the very same encoding.
                for chunk in iter_chunks(delta, codec, chunk_bytes, np.random.default_rng(seed)):
                    if chunk.seq >= start:
                        sent += len(chunk.payload)
                        yield pb.UploadMessage(chunk=chunk)
                yield pb.UploadMessage(trailer=pb.UpdateTrailer(total_chunks=total))

            receipt: pb.UploadReceipt = self.stub.UploadUpdate(messages())
            return receipt

        try:
            self._retry("upload", attempt)
        except grpc.RpcError as exc:
            raise UpdateRefused(f"{exc.code().name}: {exc.details()}") from None
        return sent
