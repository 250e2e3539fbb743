"""Level-triggered reconciliation: make the children exist as the FederatedJob says, then report status.

Every step is idempotent (deterministic names, create-if-absent), so an operator
restarted at any moment converges without duplicates and loses nothing: the
checkpoint lives on the aggregator's volume, the CA in a Secret.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import grpc
from cryptography import x509
from kubernetes.client.exceptions import ApiException

from fedjob.enrollment import Authority, exchange
from fedjob.errors import EXIT_PERMANENT
from fedjob.spec import FederatedJob, SpecError, parse_job
from fedjob.tls import Identity, KeyPair, aggregator_dns_names, ca_hash, create_ca, issue
from fedjob.v1 import fedjob_pb2 as pb
from fedjob.v1 import fedjob_pb2_grpc as pb_grpc
from fedjob_operator import children
from fedjob_operator.children import Images, names, silo_job_name, silo_tls_name
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
from fedjob_operator.registry import SecretRegistry

log = logging.getLogger("fedjob.operator")
SPEC_HASH = "fedjob.io/spec-hash"
# Fields that may change while a job runs; anything else would change what the
# rounds already aggregated mean.
MUTABLE_FIELDS = {"suspend", "revokedSilos"}


def spec_hash(spec: dict[str, Any]) -> str:
    frozen = {k: v for k, v in spec.items() if k not in MUTABLE_FIELDS}
    return hashlib.sha256(json.dumps(frozen, sort_keys=True).encode()).hexdigest()[:16]


def _secret_bytes(secret: Any, key: str) -> bytes:
    return base64.b64decode(secret.data[key])


class JobReconciler:
    def __init__(self, apis: Apis, images: Images, body: dict[str, Any], emit: Emit) -> None:
        self.apis = apis
        self.images = images
        self.body = body
        self.emit = emit
        self.ns: str = body["metadata"]["namespace"]
        self.name: str = body["metadata"]["name"]
        self.owner = owner_reference(body)
        self.n = names(self.name)
        self.ca: KeyPair | None = None  # the job CA, once ensure_children has run
        self._registry: SecretRegistry | None = None

    def parse(self) -> FederatedJob:
        doc = {k: self.body[k] for k in ("apiVersion", "kind", "spec")}
        doc["metadata"] = {"name": self.name, "namespace": self.ns}
        return parse_job(doc, f"FederatedJob {self.ns}/{self.name}")

    # ----- children ---------------------------------------------------------------------------------

    def ensure_pki(self, job: FederatedJob) -> KeyPair:
        core = self.apis.core
        ca_secret = read_or_none(core.read_namespaced_secret, self.n["ca"], self.ns)
        if ca_secret is None:
            pair = create_ca(f"{self.ns}/{self.name}")
            manifest = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {
                    "name": self.n["ca"],
                    "namespace": self.ns,
                    "labels": children.labels(self.name, "ca"),
                },
                "data": {
                    "ca.crt": base64.b64encode(pair.cert_pem).decode(),
                    "ca.key": base64.b64encode(pair.key_pem).decode(),
                },
            }
            if not create_owned(core.create_namespaced_secret, self.ns, manifest, self.owner):
                ca_secret = core.read_namespaced_secret(self.n["ca"], self.ns)  # a racing create won
        if ca_secret is not None:
            pair = KeyPair(_secret_bytes(ca_secret, "ca.crt"), _secret_bytes(ca_secret, "ca.key"))
        wanted: list[tuple[str, str, Identity, str | None]] = [
            (self.n["aggregator_tls"], "aggregator", Identity(self.name, "aggregator", "aggregator"), None),
            (self.n["observer_tls"], "operator", Identity(self.name, "observer", "observer"), None),
        ]
        # External silos make their own keys and enroll: nothing is issued for them here.
        wanted += [
            (silo_tls_name(self.name, s), "silo", Identity(self.name, "silo", s), s)
            for s in job.hosted_silos()
        ]
        for secret_name, component, ident, silo in wanted:
            if read_or_none(core.read_namespaced_secret, secret_name, self.ns) is not None:
                continue
            dns = aggregator_dns_names(self.name, self.ns) if ident.role == "aggregator" else ()
            leaf = issue(pair, ident, dns)
            manifest = children.tls_secret(
                secret_name, self.ns, self.name, component, pair.cert_pem, leaf.cert_pem, leaf.key_pem, silo
            )
            create_owned(core.create_namespaced_secret, self.ns, manifest, self.owner)
        return pair

    def registry(self) -> SecretRegistry:
        if self._registry is None:
            self._registry = SecretRegistry(self.apis.core, self.ns, self.name, self.owner)
        return self._registry

    def ensure_children(self, job: FederatedJob, running: bool) -> list[str]:
        """Create what is missing; scale/remove what `running` says. Returns the names created."""
        created = []
        core, apps, batch = self.apis.core, self.apis.apps, self.apis.batch
        ca = self.ca = self.ensure_pki(job)
        created += self.registry().ensure_tokens(job, ca_hash(ca.cert_pem))
        cm = children.config_map(job, self.ns)
        cm["metadata"]["annotations"] = {SPEC_HASH: spec_hash(self.body["spec"])}
        if create_owned(core.create_namespaced_config_map, self.ns, cm, self.owner):
            created.append(f"ConfigMap/{self.n['config']}")
        if create_owned(
            core.create_namespaced_persistent_volume_claim,
            self.ns,
            children.state_pvc(job, self.ns),
            self.owner,
        ):
            created.append(f"PersistentVolumeClaim/{self.n['state']}")
        if create_owned(
            core.create_namespaced_service, self.ns, children.aggregator_service(job, self.ns), self.owner
        ):
            created.append(f"Service/{self.n['aggregator']}")
        deployment = children.aggregator_deployment(job, self.ns, self.images, replicas=1 if running else 0)
        if create_owned(apps.create_namespaced_deployment, self.ns, deployment, self.owner):
            created.append(f"Deployment/{self.n['aggregator']}")
        else:
            self.scale_aggregator(1 if running else 0)
        for silo in job.hosted_silos():
            name = silo_job_name(self.name, silo)
            if children.silo_keeps_state(job) and create_owned(
                core.create_namespaced_persistent_volume_claim,
                self.ns,
                children.silo_state_pvc(job, silo, self.ns),
                self.owner,
            ):
                created.append(f"PersistentVolumeClaim/{children.silo_state_name(self.name, silo)}")
            if running:
                if create_owned(
                    batch.create_namespaced_job,
                    self.ns,
                    children.silo_job(job, silo, self.ns, self.images),
                    self.owner,
                ):
                    created.append(f"Job/{name}")
            elif read_or_none(batch.read_namespaced_job, name, self.ns) is not None:
                batch.delete_namespaced_job(name, self.ns, propagation_policy="Background")
        return created

    def scale_aggregator(self, replicas: int) -> None:
        current = read_or_none(self.apis.apps.read_namespaced_deployment, self.n["aggregator"], self.ns)
        if current is not None and current.spec.replicas != replicas:
            self.apis.apps.patch_namespaced_deployment(
                self.n["aggregator"], self.ns, {"spec": {"replicas": replicas}}
            )

    def accepted_hash(self) -> str | None:
        cm = read_or_none(self.apis.core.read_namespaced_config_map, self.n["config"], self.ns)
        if cm is None:
            return None
        return str((cm.metadata.annotations or {}).get(SPEC_HASH)) or None

    # ----- observation ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _observer(self) -> Iterator[pb_grpc.FederatedTrainingStub | None]:
        """A stub for the running aggregator, over mTLS with the operator's observer certificate."""
        pods = self.apis.core.list_namespaced_pod(
            self.ns, label_selector=f"fedjob.io/job={self.name},app.kubernetes.io/component=aggregator"
        )
        ips = [
            p.status.pod_ip
            for p in pods.items
            if p.status
            and p.status.pod_ip
            and p.status.phase == "Running"
            and not (p.metadata and p.metadata.deletion_timestamp)
        ]
        secret = read_or_none(self.apis.core.read_namespaced_secret, self.n["observer_tls"], self.ns)
        if not ips or secret is None:
            yield None
            return
        creds = grpc.ssl_channel_credentials(
            _secret_bytes(secret, "ca.crt"),
            _secret_bytes(secret, "tls.key"),
            _secret_bytes(secret, "tls.crt"),
        )
        # Pod IP, verified against the aggregator's certificate name: no DNS needed.
        with grpc.secure_channel(
            f"{ips[0]}:{children.GRPC_PORT}",
            creds,
            options=[("grpc.ssl_target_name_override", self.n["aggregator"])],
        ) as ch:
            yield pb_grpc.FederatedTrainingStub(ch)

    def aggregator_status(self) -> pb.JobStatus | None:
        with self._observer() as stub:
            if stub is None:
                return None
            try:
                status: pb.JobStatus = stub.GetStatus(pb.StatusRequest(), timeout=3)
                return status
            except grpc.RpcError as exc:
                log.debug("aggregator of %s/%s not answering: %s", self.ns, self.name, exc.code())
                return None

    def sync_enrollments(self, job: FederatedJob, ca: KeyPair, revoked: list[str]) -> int:
        """Answer the enrollment and renewal requests waiting at the aggregator, push the silos'
        valid certificates and the revoked silos. Returns how many requests were answered."""
        if not job.external_silos() and not revoked:
            return 0
        authority = Authority(
            self.name,
            ca,
            self.registry(),
            set(job.external_silos()),
            set(revoked),
            days=job.spec.enrollment.certificate_days,
        )
        with self._observer() as stub:
            if stub is None:
                return 0
            try:
                return exchange(authority, lambda m: stub.SyncEnrollments(m, timeout=5))
            except grpc.RpcError as exc:
                log.debug("aggregator of %s/%s not syncing: %s", self.ns, self.name, exc.code())
                return 0

    def permanent_failures(self) -> dict[str, str]:
        """Components whose container exited with EXIT_PERMANENT: 'aggregator' or a silo -> its reason.

        Kubernetes 1.20 has no podFailurePolicy: the exit code and the termination message in
        the container's (last) terminated state are how the operator learns that no retry helps.
        """
        out: dict[str, str] = {}
        pods = self.apis.core.list_namespaced_pod(self.ns, label_selector=f"fedjob.io/job={self.name}")
        for p in pods.items:
            lbl = (p.metadata.labels if p.metadata else None) or {}
            component = lbl.get("fedjob.io/silo") or lbl.get("app.kubernetes.io/component", "")
            for cs in (p.status.container_statuses or []) if p.status else []:
                for st in (cs.state, cs.last_state):
                    t = st.terminated if st is not None else None
                    if t is not None and t.exit_code == EXIT_PERMANENT:
                        out[component] = _reason_line(t.message or "") or f"exit code {EXIT_PERMANENT}"
        return out

    def stop_retries(self, silo: str) -> None:
        """No more pods for a silo that cannot run: a Job with parallelism 0 starts none."""
        name = silo_job_name(self.name, silo)
        job = read_or_none(self.apis.batch.read_namespaced_job, name, self.ns)
        if job is not None and job.spec.parallelism != 0:
            try:
                self.apis.batch.patch_namespaced_job(name, self.ns, {"spec": {"parallelism": 0}})
            except ApiException as exc:  # the status must still say why; retries merely go on
                log.warning("could not stop the retries of Job %s/%s: %s", self.ns, name, exc.reason)

    def enrollment_status(self, job: FederatedJob) -> dict[str, dict[str, Any]]:
        """Per external silo: whether it enrolled, and until when its newest certificate is valid."""
        registry = self.registry()
        out: dict[str, dict[str, Any]] = {}
        for silo in job.external_silos():
            certs = registry.certificates(silo)
            if not certs:
                out[silo] = {"enrolled": False}
                continue
            newest = max(x509.load_pem_x509_certificate(c).not_valid_after_utc for c in certs)
            out[silo] = {"enrolled": True, "certificateExpires": newest.strftime("%Y-%m-%dT%H:%M:%SZ")}
        return out

    def silo_jobs(self, job: FederatedJob) -> dict[str, str]:
        """Per silo: Pending, Active, Succeeded, Lost (retries exhausted) or Absent."""
        out = {silo: "External" for silo in job.external_silos()}
        for silo in job.hosted_silos():
            state = job_state(
                read_or_none(self.apis.batch.read_namespaced_job, silo_job_name(self.name, silo), self.ns)
            )
            out[silo] = "Lost" if state == "Failed" else state
        return out


def _reason_line(message: str) -> str:
    """The reason in a termination message: its lines after a 'file: invalid FederatedJob' heading,
    or the last line (FallbackToLogsOnError hands over the log's tail)."""
    lines = [x.strip() for x in message.strip().splitlines() if x.strip()]
    for i, line in enumerate(lines):
        if line.endswith("invalid FederatedJob"):
            return "; ".join(lines[i + 1 :])[:1000]
    return lines[-1][:1000] if lines else ""


def status_from(
    job: FederatedJob,
    agg: pb.JobStatus | None,
    jobs: dict[str, str],
    old: dict[str, Any],
    generation: int,
    suspended: bool,
    permanent: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The FederatedJob status, from what the aggregator says and what the silo Jobs show.

    `permanent`: components that exited with a failure no restart can fix, with the reason: such
    a silo counts as lost at once, the aggregator fails the job."""
    permanent = permanent or {}
    total = job.spec.rounds
    rounds_done = agg.round if agg else int(old.get("round", 0))
    silo_states = {s.name: s for s in agg.silos} if agg else {}
    silos = []
    for name in job.silo_names():
        entry: dict[str, Any] = {"name": name, "job": jobs.get(name, "Absent")}
        if name in permanent:
            entry.update(job="Lost", failure=permanent[name])
        s = silo_states.get(name)
        if s is not None:
            entry.update(state=s.state, lastRound=s.last_round, bytesUp=s.bytes_up)
            if s.progress:
                entry["progress"] = s.progress
            if not math.isnan(s.last_train_loss):
                entry["trainLoss"] = round(float(s.last_train_loss), 5)
            if s.scored_round:  # its latest update's anomaly scores (docs/algorithms.md)
                entry["update"] = {
                    "round": s.scored_round,
                    "norm": float(f"{s.update_norm:.6g}"),
                    "cosine": round(float(s.update_cosine), 4),
                    "normZScore": round(float(s.update_norm_zscore), 3),
                    "weightShare": round(float(s.weight_share), 4),
                }
        else:
            prev: dict[str, Any] = next((p for p in old.get("silos", []) if p.get("name") == name), {})
            kept = ("state", "lastRound", "bytesUp", "trainLoss", "update")
            entry.update({k: v for k, v in prev.items() if k in kept})
        silos.append(entry)
    lost = [s["name"] for s in silos if s["job"] == "Lost"]
    # Ready: the silo's pod runs and it has joined the aggregator.
    joined = ("joined", "waiting", "training", "uploading", "reported", "done")
    ready = sum(
        1 for s in silos if s["job"] in ("Active", "Succeeded", "External") and s.get("state") in joined
    )
    phase = old.get("phase", "Pending")
    message = ""
    failure_reason = ""
    if agg is not None and agg.phase in ("Succeeded", "Failed"):
        phase, message = agg.phase, agg.message
    elif phase not in ("Succeeded", "Failed"):
        if "aggregator" in permanent:
            phase, failure_reason = "Failed", "PermanentFailure"
            message = f"the aggregator cannot run (no restart can fix it): {permanent['aggregator']}"
        elif len(job.silo_names()) - len(lost) < job.spec.aggregation.min_silos:
            phase = "Failed"
            why = "; ".join(
                f"silo {n} cannot run (no retry can fix it): {permanent[n]}" for n in lost if n in permanent
            )
            retried = [n for n in lost if n not in permanent]
            if retried:
                why = "; ".join(filter(None, [f"silos {', '.join(retried)} exhausted their retries", why]))
            message = (
                f"quorum lost: {why}; "
                f"{len(job.silo_names()) - len(lost)} left, minSilos is {job.spec.aggregation.min_silos}"
            )
        elif suspended:
            phase = "Suspended"
        elif agg is not None:
            phase = "Running"
    status: dict[str, Any] = {
        "phase": phase,
        "round": rounds_done,
        "totalRounds": total,
        "progress": f"{rounds_done}/{total}",
        "silosReady": f"{ready}/{len(silos)}",
        "silos": silos,
        "observedGeneration": generation,
        "startTime": old.get("startTime") or now(),
    }
    if agg is not None and agg.last_round.round:
        lr = agg.last_round
        status["lastRound"] = {
            "round": lr.round,
            "trainLoss": round(float(lr.train_loss), 5),
            "evalLoss": None if math.isnan(lr.eval_loss) else round(float(lr.eval_loss), 5),
            "participants": lr.participants,
            "bytesUp": lr.bytes_up,
            "bytesDown": lr.bytes_down,
            "compressionRatio": round(float(lr.compression_ratio), 3),
            "seconds": round(float(lr.seconds), 2),
        }
    elif "lastRound" in old:
        status["lastRound"] = old["lastRound"]
    if agg is not None and agg.federated_eval_round:
        status["federatedEval"] = {
            "round": agg.federated_eval_round,
            "loss": round(float(agg.federated_eval_loss), 5),
        }
    elif "federatedEval" in old:
        status["federatedEval"] = old["federatedEval"]
    if agg is not None and agg.dp:
        status["privacy"] = {
            "epsilon": round(float(agg.dp_epsilon), 6),
            "delta": float(agg.dp_delta),
            **({"targetEpsilon": float(agg.dp_target_epsilon)} if agg.dp_target_epsilon else {}),
        }
    elif "privacy" in old:
        status["privacy"] = old["privacy"]
    # The aggregator says why it stopped early; once it is gone, the condition it left says so.
    was: dict[str, Any] = next((c for c in old.get("conditions", []) if c.get("type") == "Succeeded"), {})
    budget_spent = agg.privacy_budget_spent if agg is not None else was.get("reason") == "PrivacyBudgetSpent"
    if budget_spent and not message:
        message = str(was.get("message", ""))
    if phase in ("Succeeded", "Failed"):
        status["completionTime"] = old.get("completionTime") or now()
    conds = [
        condition(
            "Ready",
            agg is not None and phase == "Running",
            "AggregatorServing" if agg else "AggregatorNotServing",
            "the aggregator answers" if agg else "waiting for the aggregator",
        ),
        condition(
            "Suspended",
            phase == "Suspended",
            "SpecSuspend" if suspended else "NotSuspended",
            "spec.suspend is true" if suspended else "",
        ),
        condition(
            "Succeeded",
            phase == "Succeeded",
            ("PrivacyBudgetSpent" if budget_spent else "AllRoundsDone")
            if phase == "Succeeded"
            else "InProgress",
            message if phase == "Succeeded" and budget_spent else f"{rounds_done}/{total} rounds",
        ),
        condition(
            "Failed",
            phase == "Failed",
            failure_reason
            or ("QuorumLost" if "quorum" in message else ("JobFailed" if phase == "Failed" else "NoFailure")),
            message,
        ),
    ]
    status["conditions"] = merge_conditions(old.get("conditions", []), conds)
    if lost:
        status["lostSilos"] = lost
    return status


def invalid_status(exc: SpecError, old: dict[str, Any], generation: int) -> dict[str, Any]:
    message = "; ".join(exc.problems)
    return {
        "phase": "Failed",
        "observedGeneration": generation,
        "message": message,
        "conditions": merge_conditions(
            old.get("conditions", []), [condition("Failed", True, "InvalidSpec", message)]
        ),
    }
