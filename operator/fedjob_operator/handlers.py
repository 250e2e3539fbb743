"""Kopf handlers: on create/resume, reconcile the children and refresh status; every few seconds
the sync loop (fedjob_operator.sync_loop) does it again for every object the watch has seen."""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf
import yaml
from kubernetes import client, config
from prometheus_client import Counter, Gauge, Histogram

from fedjob.crd import GROUP, PLURAL, SILO_PLURAL, VERSION
from fedjob.spec import FederatedJob, SpecError, parse_job
from fedjob_operator.children import Images
from fedjob_operator.kube import Apis, post_event
from fedjob_operator.reconcile import JobReconciler, invalid_status, spec_hash, status_from
from fedjob_operator.silo_side import SiloReconciler, reconcile_silo
from fedjob_operator.sync_loop import Known, SyncLoop

log = logging.getLogger("fedjob.operator")
TERMINAL = ("Succeeded", "Failed")
SYNC_SECONDS = 2.0

RECONCILES = Counter("fedjob_operator_reconciles", "Reconcile passes, by result.", ["result"])
RECONCILE_SECONDS = Histogram(
    "fedjob_operator_reconcile_duration_seconds",
    "Time of one reconcile pass.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
JOBS = Gauge("fedjob_operator_jobs", "FederatedJobs by phase.", ["namespace", "phase"])
_phases: dict[tuple[str, str], str] = {}

_apis: Apis | None = None


def apis() -> Apis:
    global _apis
    if _apis is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        _apis = Apis.default()
    return _apis


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="fedjob.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="fedjob.io")
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 60


def _emit(body: Any) -> Any:
    def emit(kind: str, reason: str, message: str) -> None:
        post_event(apis().core, dict(body), kind, reason, message)

    return emit


def _record_phase(namespace: str, name: str, phase: str | None) -> None:
    key = (namespace, name)
    if phase is None:
        _phases.pop(key, None)
    else:
        _phases[key] = phase
    for ns, p in {(ns, p) for (ns, _), p in _phases.items()} | {(namespace, "Running")}:
        JOBS.labels(ns, p).set(sum(1 for (n, _), q in _phases.items() if n == ns and q == p))


def reconcile(body: Any, patch: kopf.Patch) -> None:
    started = time.monotonic()
    try:
        _reconcile(body, patch)
        RECONCILES.labels("ok").inc()
    except Exception:
        RECONCILES.labels("error").inc()
        raise
    finally:
        RECONCILE_SECONDS.observe(time.monotonic() - started)


def _accepted_job(r: JobReconciler) -> FederatedJob:
    """The spec the pods run (from the ConfigMap), when the live object has drifted from it."""
    cm = apis().core.read_namespaced_config_map(r.n["config"], r.ns)
    if not cm.data or "job.yaml" not in cm.data:
        raise kopf.TemporaryError(f"ConfigMap {r.n['config']} holds no job.yaml yet", delay=5)
    return parse_job(yaml.safe_load(cm.data["job.yaml"]), "accepted spec")


def _reconcile(body: Any, patch: kopf.Patch) -> None:
    body = dict(body)
    old: dict[str, Any] = dict(body.get("status") or {})
    generation = int(body["metadata"].get("generation", 1))
    r = JobReconciler(apis(), Images(), body, _emit(body))
    if old.get("phase") in TERMINAL:
        r.scale_aggregator(0)
        _record_phase(r.ns, r.name, old["phase"])
        return
    try:
        job = r.parse()
    except SpecError as exc:
        if old.get("phase") != "Failed":
            r.emit("Warning", "InvalidSpec", "; ".join(exc.problems)[:1000])
        patch.status.update(invalid_status(exc, old, generation))
        _record_phase(r.ns, r.name, "Failed")
        return
    accepted, current = r.accepted_hash(), spec_hash(body["spec"])
    if accepted is not None and accepted != current:
        if old.get("refusedSpecHash") != current:
            r.emit(
                "Warning",
                "UnsafeSpecChange",
                "only spec.suspend may change while a job runs; the job keeps its original spec "
                "(delete and re-create the FederatedJob to change anything else)",
            )
        patch.status["refusedSpecHash"] = current
        job = _accepted_job(r)
    suspended = bool(body["spec"].get("suspend", False))
    created = r.ensure_children(job, running=not suspended)
    if created:
        r.emit("Normal", "Created", f"created {', '.join(created)}")
    # revokedSilos may change while the job runs: the live spec's list counts, not the accepted one.
    revoked = list(body["spec"].get("revokedSilos", []))
    assert r.ca is not None
    answered = r.sync_enrollments(job, r.ca, revoked)
    if answered:
        r.emit("Normal", "Enrollment", f"answered {answered} enrollment or renewal request(s)")
    permanent = r.permanent_failures()
    for silo in (set(permanent) | set(revoked)) & set(job.hosted_silos()):
        r.stop_retries(silo)
    status = status_from(job, r.aggregator_status(), r.silo_jobs(job), old, generation, suspended, permanent)
    enrolled = r.enrollment_status(job)
    for entry in status["silos"]:
        entry.update(enrolled.get(entry["name"], {}))
        if entry["name"] in revoked:
            entry["revoked"] = True
    _announce(r, old, status)
    if status["phase"] in TERMINAL:
        r.scale_aggregator(0)
    patch.status.update(status)
    _record_phase(r.ns, r.name, status["phase"])


def _announce(r: JobReconciler, old: dict[str, Any], new: dict[str, Any]) -> None:
    # One event per sync that saw progress: it names every round that ended since the
    # previous sync ("rounds 1-2/3") and carries the last round's figures.
    first, last = int(old.get("round", 0)) + 1, new["round"]
    if last >= first:
        span = f"round {last}" if first == last else f"rounds {first}-{last}"
        lr = new.get("lastRound", {})
        detail = ""
        if lr:
            ev = "" if lr.get("evalLoss") is None else f", eval loss {lr['evalLoss']}"
            detail = (
                f": train loss {lr['trainLoss']}{ev}, {lr['participants']} silos, "
                f"{lr['bytesUp']} bytes up, {lr['seconds']} s"
            )
        r.emit("Normal", "RoundCompleted", f"{span}/{new['totalRounds']}{detail}")
    failures = {s["name"]: s["failure"] for s in new.get("silos", []) if "failure" in s}
    for silo in set(new.get("lostSilos", [])) - set(old.get("lostSilos", [])):
        why = (
            f"cannot run, and no retry can fix it: {failures[silo]}"
            if silo in failures
            else "exhausted its retries"
        )
        r.emit("Warning", "SiloLost", f"silo {silo} {why}; the job goes on while the quorum holds")
    if new["phase"] != old.get("phase"):
        kind = "Warning" if new["phase"] == "Failed" else "Normal"
        message = next(
            (c["message"] for c in new["conditions"] if c["type"] == "Failed" and c["status"] == "True"), ""
        )
        r.emit(kind, new["phase"], message or f"phase {new['phase']} at round {new['progress']}")


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_change(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    reconcile(body, patch)


# Watch events, not on.delete handlers or timers: those add a finalizer, and a FederatedJob
# could then not be deleted while the operator is down (sync_loop says more).
@kopf.on.event(GROUP, VERSION, PLURAL)
def seen(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    KNOWN.saw(PLURAL, dict(event), dict(body))
    if event.get("type") == "DELETED":
        _record_phase(body["metadata"]["namespace"], body["metadata"]["name"], None)


# ----- FederatedSilo: an external silo's side, in its own cluster ---------------------------------------


def reconcile_federated_silo(body: Any, patch: kopf.Patch) -> None:
    body = dict(body)
    old: dict[str, Any] = dict(body.get("status") or {})
    status = reconcile_silo(SiloReconciler(apis(), Images(), body, _emit(body)), old)
    if status != old:
        if status.get("phase") != old.get("phase"):
            kind = "Warning" if status["phase"] == "Failed" else "Normal"
            post_event(apis().core, body, kind, status["phase"], status.get("message", "") or status["phase"])
        patch.status.update(status)


@kopf.on.create(GROUP, VERSION, SILO_PLURAL)
@kopf.on.resume(GROUP, VERSION, SILO_PLURAL)
def on_silo(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    reconcile_federated_silo(body, patch)


@kopf.on.event(GROUP, VERSION, SILO_PLURAL)
def silo_seen(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    KNOWN.saw(SILO_PLURAL, dict(event), dict(body))


# (namespace, silo Job) -> the FederatedJob or FederatedSilo that owns it, from the Job watch;
# a silo pod names only its Job.
_job_owners: dict[tuple[str, str], tuple[str, str, str]] = {}


# A silo's Job changed: its owner syncs at once.
@kopf.on.event("batch", "v1", "jobs", labels={"app.kubernetes.io/managed-by": "fedjob-operator"})
def child_job_changed(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    _job_owners.pop((ns, name), None)
    for ref in body["metadata"].get("ownerReferences") or []:
        plural = {"FederatedJob": PLURAL, "FederatedSilo": SILO_PLURAL}.get(ref.get("kind", ""))
        if plural is not None:
            key = (plural, ns, ref["name"])
            if event.get("type") != "DELETED":
                _job_owners[(ns, name)] = key
            if _loop is not None:
                _loop.poke(key)


# A silo pod failed: its owner syncs at once. This is the earliest sign, seen when the Job
# controller sees it, so a silo that cannot run (exit 2) gets parallelism 0 before that
# controller's retry pod (Kubernetes 1.20 has no podFailurePolicy) gets far.
@kopf.on.event(
    "v1",
    "pods",
    labels={"app.kubernetes.io/managed-by": "fedjob-operator", "app.kubernetes.io/component": "silo"},
)
def silo_pod_changed(body: kopf.Body, **_: Any) -> None:
    if (body.get("status") or {}).get("phase") != "Failed" or _loop is None:
        return
    ns = body["metadata"]["namespace"]
    for ref in body["metadata"].get("ownerReferences") or []:
        key = _job_owners.get((ns, ref.get("name", ""))) if ref.get("kind") == "Job" else None
        if key is not None:
            _loop.poke(key)


KNOWN = Known()
_loop: SyncLoop | None = None


def sync_loop() -> SyncLoop:
    """The periodic sync of everything the watch has seen (main starts and stops it)."""
    global _loop
    _loop = SyncLoop(
        KNOWN,
        {PLURAL: reconcile, SILO_PLURAL: reconcile_federated_silo},
        SYNC_SECONDS,
        lambda: client.CustomObjectsApi(apis().core.api_client),
    )
    return _loop
