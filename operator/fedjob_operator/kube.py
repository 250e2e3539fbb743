"""Idempotent Kubernetes API helpers and status conditions, shared by both reconcilers.

Deterministic names and create-if-absent make every step safe to repeat: an operator restarted
at any moment converges without duplicates.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

Emit = Callable[[str, str, str], None]  # (type, reason, message) -> a Kubernetes Event


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Apis:
    core: client.CoreV1Api
    apps: client.AppsV1Api
    batch: client.BatchV1Api

    @classmethod
    def default(cls) -> Apis:
        return cls(client.CoreV1Api(), client.AppsV1Api(), client.BatchV1Api())


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    m = body["metadata"]
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": m["name"],
        "uid": m["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def create_owned(
    create: Callable[..., Any], namespace: str, manifest: dict[str, Any], owner: dict[str, Any]
) -> bool:
    """Create unless it exists. Returns True when this call created it."""
    manifest["metadata"]["ownerReferences"] = [owner]
    try:
        create(namespace, manifest)
        return True
    except ApiException as exc:
        if exc.status == 409:
            return False
        raise


def read_or_none(read: Callable[..., Any], name: str, namespace: str) -> Any | None:
    try:
        return read(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def condition(ctype: str, status: bool, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": ctype,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": now(),
    }


def merge_conditions(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep lastTransitionTime when a condition's status did not change."""
    by_type = {c["type"]: c for c in old}
    out = []
    for c in new:
        prev = by_type.get(c["type"])
        if prev and prev.get("status") == c["status"]:
            c = {**c, "lastTransitionTime": prev.get("lastTransitionTime", c["lastTransitionTime"])}
        out.append(c)
    return out


def job_state(job: Any | None) -> str:
    """A batch Job's state: Absent, Failed (retries exhausted), Succeeded, Active or Pending."""
    if job is None:
        return "Absent"
    st = job.status
    conds = {c.type: c.status for c in (st.conditions or [])} if st else {}
    if conds.get("Failed") == "True":
        return "Failed"
    if conds.get("Complete") == "True" or (st and st.succeeded):
        return "Succeeded"
    return "Active" if st and st.active else "Pending"


def post_event(core: client.CoreV1Api, body: dict[str, Any], kind: str, reason: str, message: str) -> None:
    """A core/v1 Event about `body`, as `kubectl describe` shows it (posted directly, so that it
    works from the sync thread as well as from a Kopf handler)."""
    meta = body["metadata"]
    stamp = dt.datetime.now(dt.UTC)
    event = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": body.get("apiVersion", ""),
            "kind": body.get("kind", ""),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid", ""),
        },
        "type": kind,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": "fedjob-operator"},
        "firstTimestamp": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lastTimestamp": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "count": 1,
        "reportingComponent": "fedjob-operator",
    }
    try:
        create: Callable[..., Any] = core.create_namespaced_event  # takes a plain manifest
        create(meta["namespace"], event)
    except ApiException as exc:  # an event lost costs a line in `describe`, never the reconcile
        logging.getLogger("fedjob.operator").warning("event %s not posted: %s", reason, exc.reason)
