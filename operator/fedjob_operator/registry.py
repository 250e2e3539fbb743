"""The owner's side of enrollment in a cluster: tokens as Secrets, enrolled certificates in a ConfigMap.

One token Secret per external silo, `<job>-silo-<silo>-token`, owned by the FederatedJob (deleting
the job deletes every outstanding token). Its `token` key is what the owner hands to the silo's
admin, with `ca-hash`. A used token stays, marked; deleting it makes the operator issue a fresh
one at its next sync (a silo that lost its key enrolls again with it). Certificates are public:
the silos' valid ones live in the ConfigMap `<job>-enrolled`. No private key of a silo is here.
"""

from __future__ import annotations

import base64
import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fedjob.enrollment import TokenRecord, new_token_record, split_pem
from fedjob.spec import FederatedJob
from fedjob_operator import children

TOKEN_TYPE = "fedjob.io/bootstrap-token"


def token_name(job: str, silo: str) -> str:
    return f"{job}-silo-{silo}-token"


def enrolled_name(job: str) -> str:
    return f"{job}-enrolled"


def _rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _decode(secret: Any) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


class SecretRegistry:
    """`fedjob.enrollment.Registry` over the Kubernetes API, in the job's namespace."""

    def __init__(self, core: client.CoreV1Api, namespace: str, job: str, owner: dict[str, Any]) -> None:
        self.core = core
        self.ns = namespace
        self.job = job
        self.owner = owner
        self._enrolled: dict[str, str] | None = None  # the ConfigMap's data, read once per sync

    def token(self, token_id: str) -> TokenRecord | None:
        found = self.core.list_namespaced_secret(
            self.ns, label_selector=f"fedjob.io/job={self.job},fedjob.io/token-id={token_id}"
        ).items
        if len(found) != 1 or found[0].type != TOKEN_TYPE:
            return None
        d = _decode(found[0])
        expires = dt.datetime.strptime(d["expiration"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        return TokenRecord(
            d["token-id"],
            d["token-secret"],
            d["silo"],
            expires.timestamp(),
            d.get("used-by", ""),
            d.get("certificate", ""),
        )

    def mark_used(self, record: TokenRecord) -> None:
        self.core.patch_namespaced_secret(
            token_name(self.job, record.silo),
            self.ns,
            {
                "metadata": {"annotations": {"fedjob.io/used-at": _rfc3339(time.time())}},
                "stringData": {"used-by": record.used_by, "certificate": record.cert_pem},
            },
        )

    def certificates(self, silo: str) -> list[bytes]:
        if self._enrolled is None:
            try:
                cm = self.core.read_namespaced_config_map(enrolled_name(self.job), self.ns)
                self._enrolled = dict(cm.data or {})
            except ApiException as exc:
                if exc.status != 404:
                    raise
                self._enrolled = {}
        return split_pem((self._enrolled.get(f"{silo}.pem") or "").encode())

    def set_certificates(self, silo: str, certs: list[bytes]) -> None:
        data = {f"{silo}.pem": b"".join(certs).decode()}
        self._enrolled = None
        try:
            self.core.patch_namespaced_config_map(enrolled_name(self.job), self.ns, {"data": data})
        except ApiException as exc:
            if exc.status != 404:
                raise
            manifest: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": enrolled_name(self.job),
                    "namespace": self.ns,
                    "labels": children.labels(self.job, "enrollment"),
                    "ownerReferences": [self.owner],
                },
                "data": data,
            }
            create: Callable[..., Any] = self.core.create_namespaced_config_map  # takes a plain manifest
            create(self.ns, manifest)

    def ensure_tokens(self, job: FederatedJob, ca_hash: str) -> list[str]:
        """A token Secret for every external silo that has none; returns the Secrets created."""
        created = []
        for silo in job.external_silos():
            name = token_name(self.job, silo)
            try:
                self.core.read_namespaced_secret(name, self.ns)
                continue
            except ApiException as exc:
                if exc.status != 404:
                    raise
            token, record = new_token_record(silo, job.spec.enrollment.token_ttl_hours * 3600)
            labels = {**children.labels(self.job, "token", silo), "fedjob.io/token-id": token.id}
            manifest: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": TOKEN_TYPE,
                "metadata": {
                    "name": name,
                    "namespace": self.ns,
                    "labels": labels,
                    "ownerReferences": [self.owner],
                },
                "stringData": {
                    "token": str(token),
                    "token-id": token.id,
                    "token-secret": token.secret,
                    "silo": silo,
                    "job": self.job,
                    "ca-hash": ca_hash,
                    "expiration": _rfc3339(record.expires),
                },
            }
            try:
                create_secret: Callable[..., Any] = self.core.create_namespaced_secret
                create_secret(self.ns, manifest)
                created.append(f"Secret/{name}")
            except ApiException as exc:
                if exc.status != 409:
                    raise
        return created
