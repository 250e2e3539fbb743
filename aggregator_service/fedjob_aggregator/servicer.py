"""gRPC front of the coordinator: authorise by certificate, admit per identity, map refusals to statuses."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import yaml

from fedjob.spec import FederatedJob, document_for_silo
from fedjob.tls import Identity, identity_of, serial_of
from fedjob.v1 import fedjob_pb2 as pb
from fedjob.v1 import fedjob_pb2_grpc as pb_grpc
from fedjob_aggregator.admission import Admission, IdleWatch, StreamClock, TooManyCalls
from fedjob_aggregator.coordinator import Coordinator
from fedjob_aggregator.enrollment_desk import DeskFull, EnrollmentDesk, NoAnswer
from fedjob_aggregator.metrics import AggregatorMetrics
from fedjob_aggregator.round_state import Refused

log = logging.getLogger("fedjob.aggregator")
VERSION = "0.1.0"


class _QuietStream(Exception):
    """The idle watch cancelled an upload before its header came."""


class FederatedTrainingServicer(pb_grpc.FederatedTrainingServicer):
    def __init__(
        self,
        job: FederatedJob,
        coordinator: Coordinator,
        metrics: AggregatorMetrics,
        watch: IdleWatch | None = None,
        desk: EnrollmentDesk | None = None,
    ) -> None:
        self.job = job
        self.coord = coordinator
        self.metrics = metrics
        self.desk = desk or EnrollmentDesk(None, job.external_silos(), job.spec.revoked_silos)
        self.admission = Admission()
        deadlines = job.spec.aggregator.streams
        self.watch = watch or IdleWatch(deadlines.header_seconds, deadlines.idle_seconds)
        self.watch.start()

    @contextmanager
    def _admitted(self, context: grpc.ServicerContext, who: str, kind: str) -> Iterator[None]:
        """Hold a slot of `who`'s calls of this kind, or answer RESOURCE_EXHAUSTED at once."""
        try:
            self.admission.acquire(who, kind)
        except TooManyCalls as exc:
            self.metrics.rejected(who, "too_many_calls")
            log.warning("refused %s: too_many_calls (%s)", who, exc)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too_many_calls: {exc}")
        try:
            yield
        finally:
            self.admission.release(who, kind)

    # ----- identity ---------------------------------------------------------------------------------

    def _certificate(self, context: grpc.ServicerContext) -> bytes:
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate from the job CA is required")
        pem: bytes = pems[0]
        return pem

    def _identity(self, context: grpc.ServicerContext) -> Identity:
        """Who is calling, from the certificate the TLS layer verified against the job CA."""
        pem = self._certificate(context)
        try:
            ident = identity_of(pem)
        except ValueError as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"certificate carries no fedjob identity: {exc}")
        if ident.job != self.job.name:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate is for job {ident.job!r}, not {self.job.name!r}",
            )
        return ident

    def _silo(self, context: grpc.ServicerContext) -> str:
        ident = self._identity(context)
        if ident.role != "silo":
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"only silos may do this; caller is the {ident.role}"
            )
        if ident.name not in self.coord.silos:
            self.metrics.rejected(ident.name, "unknown_silo")
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"silo {ident.name!r} is not part of job {self.job.name!r}"
            )
        # A revoked silo, or an external silo's superseded certificate: refused from this call on.
        refusal = self.desk.refusal(ident.name, serial_of(self._certificate(context)))
        if refusal is not None:
            self.metrics.rejected(ident.name, refusal.split(":", 1)[0])
            context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        return ident.name

    def _refuse(self, context: grpc.ServicerContext, silo: str, exc: Refused, counted: bool = True) -> Any:
        if counted:
            self.metrics.rejected(silo, exc.reason)
            self.coord.count_rejection(silo)
            log.warning("refused %s: %s (%s)", silo, exc.reason, exc.detail)
        else:
            log.info("told %s: %s (%s)", silo, exc.reason, exc.detail)
        context.abort(getattr(grpc.StatusCode, exc.code), f"{exc.reason}: {exc.detail}")

    # ----- RPCs -------------------------------------------------------------------------------------

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        silo = self._silo(context)
        if request.expected_silo and request.expected_silo != silo:
            self.metrics.rejected(silo, "identity_mismatch")
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"identity_mismatch: this certificate belongs to silo {silo!r}, "
                f"not {request.expected_silo!r}",
            )
        with self._admitted(context, silo, "other"):
            self.coord.join(silo)
        log.info("silo %s joined (worker %s)", silo, request.worker_version or "?")
        return pb.JoinReply(
            job=self.job.name,
            silo=silo,
            current_round=self.coord.completed + 1,
            total_rounds=self.job.spec.rounds,
            max_chunk_bytes=self.coord.chunk_bytes,
            codecs=[self.coord.codec.name],
        )

    def GetTask(self, request: pb.TaskRequest, context: grpc.ServicerContext) -> pb.Task:
        silo = self._silo(context)
        with self._admitted(context, silo, "other"):
            return self.coord.next_task(silo, request.after_round, request.wait_seconds or 30.0)

    def DownloadGlobal(
        self, request: pb.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        silo = self._silo(context)
        sent = 0
        with self._admitted(context, silo, "download"):
            try:
                for chunk in self.coord.download(silo, request.round, request.have):
                    sent += len(chunk.payload)
                    yield chunk
            except Refused as exc:
                # A late silo asking for the round that just closed: a race, not a bad update, so
                # it is not counted among the rejections; the silo asks for the next task.
                self._refuse(context, silo, exc, counted=exc.reason != "stale_round")
            finally:
                self.metrics.bytes(silo, "down", sent)

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UploadMessage], context: grpc.ServicerContext
    ) -> pb.UploadReceipt:
        silo = self._silo(context)
        # One upload stream per silo, refused before it can wait on anything; a stream that
        # goes quiet is cancelled, so a stalled client never keeps a thread (admission.py).
        with self._admitted(context, silo, "upload"), self.watch.watching(context) as clock:
            try:
                return self._upload(silo, request_iterator, context, clock)
            except (grpc.RpcError, _QuietStream):
                if not clock.cancelled and context.is_active():
                    raise
                # Cancelled for going quiet: the client has its CANCELLED already; count it once.
                self.metrics.rejected(silo, "idle_stream")
                log.warning("cancelled %s's upload: it went quiet past its deadline", silo)
                return pb.UploadReceipt()

    def _upload(
        self,
        silo: str,
        request_iterator: Iterator[pb.UploadMessage],
        context: grpc.ServicerContext,
        clock: StreamClock,
    ) -> pb.UploadReceipt:
        received = 0
        try:
            first = next(request_iterator, None)
            if clock.cancelled:  # the read ended because the watch cancelled the stream
                raise _QuietStream
            clock.touch()
            if first is None or first.WhichOneof("part") != "header":
                raise Refused("INVALID_ARGUMENT", "bad_header", "an upload starts with an UpdateHeader")
            up = self.coord.uploads.begin(silo, first.header)
        except Refused as exc:
            self._refuse(context, silo, exc)
        try:
            for msg in request_iterator:
                clock.touch()
                part = msg.WhichOneof("part")
                if part == "chunk":
                    self.coord.uploads.add_chunk(up, msg.chunk)
                    received += len(msg.chunk.payload)
                elif part == "trailer":
                    self.coord.uploads.finish(up, msg.trailer)
                    self.metrics.bytes(silo, "up", received)
                    return pb.UploadReceipt(round=up.round, bytes_received=received, accepted=True)
                else:
                    raise Refused(
                        "INVALID_ARGUMENT",
                        "bad_message",
                        f"unexpected {part or 'empty'} message inside an upload",
                    )
            # The stream ended without a trailer: keep what arrived so the silo can resume.
            self.metrics.bytes(silo, "up", received)
            if clock.cancelled:
                raise _QuietStream
            context.abort(
                grpc.StatusCode.ABORTED,
                f"incomplete: stream ended after chunk {up.next_seq}; resume with QueryUpload",
            )
        except Refused as exc:
            self.metrics.bytes(silo, "up", received)
            self._refuse(context, silo, exc)
        finally:
            self.coord.uploads.stream_ended(up)
        raise AssertionError("unreachable")

    def QueryUpload(
        self, request: pb.QueryUploadRequest, context: grpc.ServicerContext
    ) -> pb.QueryUploadReply:
        silo = self._silo(context)
        with self._admitted(context, silo, "other"):
            held = self.coord.uploads.resume_point(silo, request.round, request.upload_id)
        return pb.QueryUploadReply(next_seq=held)

    def ReportEvaluation(
        self, request: pb.EvaluationReport, context: grpc.ServicerContext
    ) -> pb.EvaluationReceipt:
        silo = self._silo(context)
        with self._admitted(context, silo, "other"):
            try:
                self.coord.report_evaluation(silo, request.round, request.loss, int(request.samples))
            except Refused as exc:
                self._refuse(context, silo, exc, counted=exc.reason != "stale_round")
        return pb.EvaluationReceipt(round=request.round)

    def ReportProgress(self, request: pb.ProgressReport, context: grpc.ServicerContext) -> pb.ProgressReceipt:
        silo = self._silo(context)
        with self._admitted(context, silo, "other"):
            try:
                self.coord.report_progress(silo, request.round, request.phase, request.step, request.steps)
            except Refused as exc:
                self._refuse(context, silo, exc)
        return pb.ProgressReceipt()

    def RenewCertificate(self, request: pb.RenewRequest, context: grpc.ServicerContext) -> pb.EnrollReply:
        silo = self._silo(context)
        pending = pb.PendingEnrollment(
            silo=silo, renew_serial=serial_of(self._certificate(context)), csr_pem=request.csr_pem
        )
        with self._admitted(context, silo, "other"):
            return answer(self.desk, self.metrics, pending, context)

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.JobDocument:
        silo = self._silo(context)
        return pb.JobDocument(yaml=yaml.safe_dump(document_for_silo(self.job, silo), sort_keys=False))

    def SyncEnrollments(
        self, request: pb.EnrollmentSync, context: grpc.ServicerContext
    ) -> pb.PendingEnrollments:
        ident = self._identity(context)
        if ident.role != "observer":
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"only the job's owner may; caller is {ident.uri}"
            )
        with self._admitted(context, "observer/enrollment", "status"):
            pending = self.desk.sync(request)
        self.coord.revoke(self.desk.ledger.revoked)
        return pending

    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.JobStatus:
        ident = self._identity(context)
        if ident.role == "silo":
            self._silo(context)  # refused when revoked or superseded, like every other call
        with self._admitted(context, f"{ident.role}/{ident.name}", "status"):
            status = self.coord.status()
        if ident.role == "silo":  # a silo (maybe another organisation's) sees itself, not the others
            own = [s for s in status.silos if s.name == ident.name]
            del status.silos[:]
            status.silos.extend(own)
        return status


# How the owner's refusals reach the silo: a token or identity problem is PERMISSION_DENIED, a
# malformed CSR INVALID_ARGUMENT, a silo that does not enroll this way FAILED_PRECONDITION.
REFUSAL_CODES = {
    "bad_csr": grpc.StatusCode.INVALID_ARGUMENT,
    "not_external": grpc.StatusCode.FAILED_PRECONDITION,
}
ANSWER_SECONDS = 30.0


def answer(
    desk: EnrollmentDesk,
    metrics: AggregatorMetrics,
    pending: pb.PendingEnrollment,
    context: grpc.ServicerContext,
) -> pb.EnrollReply:
    """Wait at the desk for the owner's outcome and turn it into the reply or a status."""
    kind = "renew" if pending.renew_serial else "enroll"
    try:
        outcome = desk.submit(pending, ANSWER_SECONDS)
    except DeskFull as exc:
        metrics.enrollments.labels(metrics.job, kind, "unanswered").inc()
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    except NoAnswer as exc:
        metrics.enrollments.labels(metrics.job, kind, "unanswered").inc()
        context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    metrics.enrollments.labels(metrics.job, kind, "refused" if outcome.refusal_reason else "signed").inc()
    if outcome.refusal_reason:
        log.warning("refused enrollment of %s: %s", pending.silo, outcome.refusal_reason)
        code = REFUSAL_CODES.get(outcome.refusal_reason, grpc.StatusCode.PERMISSION_DENIED)
        context.abort(code, f"{outcome.refusal_reason}: {outcome.refusal_message}")
    log.info("silo %s %s", pending.silo, "renewed its certificate" if pending.renew_serial else "enrolled")
    return pb.EnrollReply(ca_pem=outcome.ca_pem, cert_pem=outcome.cert_pem)


class EnrollmentServicer(pb_grpc.EnrollmentServicer):
    """The enrollment port's one call. It runs without TLS: nothing in it is secret (enrollment.py)."""

    def __init__(
        self, job: FederatedJob, desk: EnrollmentDesk, ca_pem: bytes, metrics: AggregatorMetrics
    ) -> None:
        self.job = job
        self.desk = desk
        self.ca_pem = ca_pem
        self.metrics = metrics

    def Discover(self, request: pb.DiscoverRequest, context: grpc.ServicerContext) -> pb.DiscoverReply:
        if request.job != self.job.name:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"wrong_job: this aggregator serves job {self.job.name!r}, not {request.job!r}",
            )
        return pb.DiscoverReply(ca_pem=self.ca_pem)

    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> pb.EnrollReply:
        if request.job != self.job.name:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"wrong_job: this aggregator serves job {self.job.name!r}, not {request.job!r}",
            )
        # No check of the silo's name here: an unauthenticated caller must not learn which silos
        # a job has. The owner's side checks the token first, and names the silo only to its holder.
        pending = pb.PendingEnrollment(
            silo=request.silo, token_id=request.token_id, proof=request.proof, csr_pem=request.csr_pem
        )
        return answer(self.desk, self.metrics, pending, context)
