"""Level-triggered reconciliation of a FederatedSilo, in the external silo's own cluster.

The operator here makes the silo's key and keeps it in a Secret of this cluster (it never
travels: only a CSR does), enrolls with the bootstrap token against the pinned CA, renews the
certificate when a third of its life is left, fetches the job from the aggregator, and runs the
worker Job with this silo's data and model. Status says where it stands: phase, enrolled,
certificate expiry, and the silo's round and state as the aggregator sees them.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import yaml
from cryptography import x509

from fedjob.enrollment import BootstrapToken, Issued, load_key, needs_renewal
from fedjob.enrollment_client import EnrollmentFailed, channel, enroll, fetch_job, renew
from fedjob.silo_outcome import SiloOutcome
from fedjob.silo_spec import FederatedSilo, job_for_silo
from fedjob.spec import FederatedJob, SpecError
from fedjob.tls import key_pem, new_key
from fedjob.v1 import fedjob_pb2 as pb
from fedjob.v1 import fedjob_pb2_grpc as pb_grpc
from fedjob_operator import children
from fedjob_operator.children import Images, SiloPlacement
from fedjob_operator.kube import (
    Apis,
    Emit,
    condition,
    create_owned,
    job_state,
    merge_conditions,
    now,
    owner_reference,
    read_or_none,
)

log = logging.getLogger("fedjob.operator")
ENROLLED = "fedjob.io/enrolled"


def silo_names(name: str) -> dict[str, str]:
    return {"tls": f"{name}-silo-tls", "config": f"{name}-silo-job", "worker": f"{name}-silo-worker"}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class SiloReconciler:
    def __init__(self, apis: Apis, images: Images, body: dict[str, Any], emit: Emit) -> None:
        self.apis = apis
        self.images = images
        self.body = body
        self.emit = emit
        self.ns: str = body["metadata"]["namespace"]
        self.name: str = body["metadata"]["name"]
        self.owner = owner_reference(body)
        self.n = silo_names(self.name)

    def parse(self) -> FederatedSilo:
        from fedjob.silo_spec import parse_silo

        doc = {k: self.body[k] for k in ("apiVersion", "kind", "spec")}
        doc["metadata"] = {"name": self.name, "namespace": self.ns}
        return parse_silo(doc, f"FederatedSilo {self.ns}/{self.name}")

    # ----- certificate --------------------------------------------------------------------------------

    def _tls(self) -> Any | None:
        return read_or_none(self.apis.core.read_namespaced_secret, self.n["tls"], self.ns)

    def _token(self, silo: FederatedSilo) -> BootstrapToken:
        ref = silo.spec.token_secret
        if ref is None:
            raise EnrollmentFailed("no_token", "spec.tokenSecret: name the Secret holding the token", True)
        secret = read_or_none(self.apis.core.read_namespaced_secret, ref.name, self.ns)
        if secret is None or ref.key not in (secret.data or {}):
            raise EnrollmentFailed(
                "no_token", f"Secret {ref.name} with key {ref.key!r} not found in {self.ns}", permanent=False
            )
        try:
            return BootstrapToken.parse(base64.b64decode(secret.data[ref.key]).decode())
        except ValueError as exc:
            raise EnrollmentFailed(
                "bad_token", f"Secret {ref.name}/{ref.key}: {exc}", permanent=True
            ) from None

    def certificate(self, silo: FederatedSilo) -> tuple[Issued, bytes]:
        """The silo's certificate and key: enrolled, or renewed, as needed."""
        s = silo.spec
        secret = self._tls()
        if secret is None:
            # The key first, kept before enrolling: a lost reply is asked again with the same key,
            # and the owner answers with the same certificate.
            manifest = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {
                    "name": self.n["tls"],
                    "namespace": self.ns,
                    "labels": children.labels(s.job, "silo", s.silo),
                    "annotations": {ENROLLED: "false"},
                },
                "data": {"tls.key": _b64(key_pem(new_key()))},
            }
            create_owned(self.apis.core.create_namespaced_secret, self.ns, manifest, self.owner)
            secret = self._tls()
            assert secret is not None
        data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
        key = data["tls.key"]
        if "tls.crt" not in data:
            issued = enroll(
                s.aggregator.enrollment(), s.job, s.silo, self._token(silo), s.ca_hash, load_key(key)
            )
            self._store(issued, key)
            self.emit(
                "Normal", "Enrolled", f"silo {s.silo} enrolled in job {s.job}; its key stays in {self.ns}"
            )
            return issued, key
        held = Issued(data["ca.crt"], data["tls.crt"])
        if needs_renewal(held.cert_pem):
            fresh = new_key()
            server = s.aggregator.server_name or f"{s.job}-aggregator"
            issued = renew(s.aggregator.address, server, held, key, s.job, s.silo, fresh)
            self._store(issued, key_pem(fresh))
            self.emit("Normal", "Renewed", "renewed the silo's certificate")
            return issued, key_pem(fresh)
        return held, key

    def _store(self, issued: Issued, key: bytes) -> None:
        self.apis.core.patch_namespaced_secret(
            self.n["tls"],
            self.ns,
            {
                "metadata": {"annotations": {ENROLLED: "true"}},
                "data": {
                    "ca.crt": _b64(issued.ca_pem),
                    "tls.crt": _b64(issued.cert_pem),
                    "tls.key": _b64(key),
                },
            },
        )

    # ----- the job and its worker ---------------------------------------------------------------------

    def job(self, silo: FederatedSilo, issued: Issued, key: bytes) -> FederatedJob:
        """The job document, fetched once from the aggregator and kept in a ConfigMap (a job's spec
        does not change while it runs)."""
        cm = read_or_none(self.apis.core.read_namespaced_config_map, self.n["config"], self.ns)
        if cm is None:
            s = silo.spec
            doc = fetch_job(
                s.aggregator.address, s.aggregator.server_name or f"{s.job}-aggregator", issued, key
            )
            job = job_for_silo(doc, silo)
            manifest = children.config_map(job, self.ns)
            manifest["metadata"]["name"] = self.n["config"]
            create_owned(self.apis.core.create_namespaced_config_map, self.ns, manifest, self.owner)
            return job
        from fedjob.spec import parse_job

        return parse_job(yaml.safe_load(cm.data["job.yaml"]), f"ConfigMap {self.n['config']}")

    def ensure_worker(self, silo: FederatedSilo, job: FederatedJob) -> bool:
        s = silo.spec
        if children.silo_keeps_state(job):
            create_owned(
                self.apis.core.create_namespaced_persistent_volume_claim,
                self.ns,
                children.silo_state_pvc(job, s.silo, self.ns),
                self.owner,
            )
        placement = SiloPlacement(
            self.n["worker"],
            self.n["tls"],
            self.n["config"],
            s.aggregator.address,
            s.aggregator.server_name or f"{s.job}-aggregator",
        )
        images = Images(worker=s.image) if s.image else self.images
        manifest = children.silo_job(job, s.silo, self.ns, images, placement)
        return create_owned(self.apis.batch.create_namespaced_job, self.ns, manifest, self.owner)

    def worker_state(self) -> str:
        return job_state(read_or_none(self.apis.batch.read_namespaced_job, self.n["worker"], self.ns))

    def worker_outcome(self) -> SiloOutcome | None:
        """The record a worker pod that saw the job end left as its termination message."""
        pods = self.apis.core.list_namespaced_pod(self.ns, label_selector=f"job-name={self.n['worker']}")
        for p in pods.items:
            for cs in (p.status.container_statuses or []) if p.status else []:
                t = cs.state.terminated if cs.state is not None else None
                if t is not None and t.exit_code == 0:
                    outcome = SiloOutcome.from_message(t.message or "")
                    if outcome is not None:
                        return outcome
        return None

    @contextlib.contextmanager
    def _stub(
        self, silo: FederatedSilo, issued: Issued, key: bytes
    ) -> Iterator[pb_grpc.FederatedTrainingStub]:
        s = silo.spec
        with channel(
            s.aggregator.address,
            issued.ca_pem,
            issued.cert_pem,
            key,
            s.aggregator.server_name or f"{s.job}-aggregator",
        ) as ch:
            yield pb_grpc.FederatedTrainingStub(ch)

    def aggregator_view(self, silo: FederatedSilo, issued: Issued, key: bytes) -> pb.JobStatus | None:
        with self._stub(silo, issued, key) as stub:
            try:
                status: pb.JobStatus = stub.GetStatus(pb.StatusRequest(), timeout=3)
                return status
            except grpc.RpcError as exc:
                log.debug("aggregator not answering silo %s: %s", self.name, exc.code())
                return None


def certificate_expiry(cert_pem: bytes) -> str:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def silo_status(
    old: dict[str, Any],
    phase: str,
    reason: str,
    message: str,
    issued: Issued | None = None,
    view: pb.JobStatus | None = None,
    silo: str = "",
    outcome: SiloOutcome | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "enrolled": issued is not None}
    if issued is not None:
        status["certificateExpires"] = certificate_expiry(issued.cert_pem)
    if view is not None:
        status["round"] = view.round
        status["progress"] = f"{view.round}/{view.total_rounds}"
        status["jobPhase"] = view.phase
        own = next((s for s in view.silos if s.name == silo), None)
        if own is not None:
            status["state"] = own.state
            status["lastRound"] = own.last_round
    else:
        for kept in ("round", "progress", "jobPhase", "state", "lastRound"):
            if kept in old:
                status[kept] = old[kept]
    if outcome is not None:  # the worker's own last word outlives the aggregator
        status["round"] = outcome.round
        status["progress"] = f"{outcome.round}/{outcome.total_rounds}"
        status["jobPhase"] = outcome.job_phase
        status["state"] = "done"
    if phase in ("Succeeded", "Failed"):
        status["completionTime"] = old.get("completionTime") or now()
    status["conditions"] = merge_conditions(
        old.get("conditions", []),
        [
            condition(
                "Enrolled", issued is not None, "Enrolled" if issued else reason, "" if issued else message
            ),
            condition(
                "Failed",
                phase == "Failed",
                reason if phase == "Failed" else "NoFailure",
                message if phase == "Failed" else "",
            ),
        ],
    )
    if message:
        status["message"] = message
    return status


def reconcile_silo(r: SiloReconciler, old: dict[str, Any]) -> dict[str, Any]:
    """One pass; returns the status to write."""
    if old.get("phase") in ("Succeeded", "Failed"):
        return old
    try:
        silo = r.parse()
    except SpecError as exc:
        return silo_status(old, "Failed", "InvalidSpec", "; ".join(exc.problems))
    try:
        issued, key = r.certificate(silo)
    except EnrollmentFailed as exc:
        if exc.permanent:
            r.emit("Warning", "EnrollmentRefused", f"{exc.reason}: {exc.message}")
            return silo_status(old, "Failed", "EnrollmentRefused", f"{exc.reason}: {exc.message}")
        return silo_status(old, "Enrolling", "Enrolling", f"{exc.reason}: {exc.message}")
    try:
        job = r.job(silo, issued, key)
    except EnrollmentFailed as exc:
        if exc.permanent:
            return silo_status(old, "Failed", "Refused", f"{exc.reason}: {exc.message}", issued)
        return silo_status(old, "Enrolled", "WaitingForJob", f"{exc.reason}: {exc.message}", issued)
    except SpecError as exc:
        return silo_status(old, "Failed", "InvalidSpec", "; ".join(exc.problems), issued)
    if r.ensure_worker(silo, job):
        r.emit("Normal", "Created", f"created Job/{r.n['worker']}")
    worker = r.worker_state()
    view = r.aggregator_view(silo, issued, key)
    outcome = r.worker_outcome() if worker == "Succeeded" else None
    phase = {"Succeeded": "Succeeded", "Failed": "Failed"}.get(worker, "Running")
    message = "the worker exhausted its retries" if worker == "Failed" else ""
    return silo_status(
        old,
        phase,
        "WorkerFailed" if worker == "Failed" else "Running",
        message,
        issued,
        view,
        silo.spec.silo,
        outcome,
    )
