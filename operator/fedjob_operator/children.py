"""The Kubernetes objects a FederatedJob turns into, as plain manifests (pure functions, no API calls).

Every pod runs the `fedjob` CLI: the aggregator Deployment runs `fedjob
aggregator`, each silo's Job runs `fedjob worker`. Each pod mounts only its own
certificate and key; the CA key stays in a Secret that only the operator reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import yaml

from fedjob.data_files import mount_folder
from fedjob.errors import TERMINATION_LOG_ENV
from fedjob.spec import FederatedJob, ResourcesSpec, StorageSpec, VolumeSpec

GRPC_PORT = 50051
METRICS_PORT = 9090
ENROLL_PORT = 50052  # opened only for a job with external silos
JOB_MOUNT = "/etc/fedjob/job"
TLS_MOUNT = "/etc/fedjob/tls"
STATE_MOUNT = "/var/lib/fedjob"
# Where the image keeps DeepSpeed's prebuilt CPU ops (`fedjob warmup` at image build).
EXTENSIONS_DIR = "/opt/fedjob/torch_extensions"
RUN_AS = 1000


@dataclass(frozen=True)
class Images:
    aggregator: str = os.environ.get("FEDJOB_AGGREGATOR_IMAGE", "ghcr.io/fedjob/aggregator:0.1.0")
    worker: str = os.environ.get("FEDJOB_WORKER_IMAGE", "ghcr.io/fedjob/worker:0.1.0")


def names(job: str) -> dict[str, str]:
    return {
        "ca": f"{job}-ca",
        "aggregator": f"{job}-aggregator",
        "aggregator_tls": f"{job}-aggregator-tls",
        "observer_tls": f"{job}-observer-tls",
        "config": f"{job}-job",
        "state": f"{job}-aggregator-state",
    }


def silo_job_name(job: str, silo: str) -> str:
    return f"{job}-silo-{silo}"


def silo_tls_name(job: str, silo: str) -> str:
    return f"{job}-silo-{silo}-tls"


def silo_state_name(job: str, silo: str) -> str:
    return f"{job}-silo-{silo}-state"


def silo_keeps_state(job: FederatedJob) -> bool:
    """The job's uplink has a stage whose state must outlive a silo pod (top-k's residual)."""
    return any(st.topk is not None and st.topk.error_feedback for st in job.spec.compression.uplink)


def labels(job: str, component: str, silo: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "fedjob",
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "fedjob-operator",
        "fedjob.io/job": job,
    }
    if silo:
        out["fedjob.io/silo"] = silo
    return out


def _meta(name: str, namespace: str, lbls: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": lbls}


def job_document(job: FederatedJob) -> str:
    """The FederatedJob as the pods read it (status and cluster bookkeeping left out)."""
    doc = {
        "apiVersion": job.api_version,
        "kind": job.kind,
        "metadata": {"name": job.name, "namespace": job.metadata.namespace},
        "spec": job.spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
    }
    return yaml.safe_dump(doc, sort_keys=False)


def config_map(job: FederatedJob, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(names(job.name)["config"], namespace, labels(job.name, "config")),
        "data": {"job.yaml": job_document(job)},
    }


def tls_secret(
    name: str,
    namespace: str,
    job: str,
    component: str,
    ca: bytes,
    cert: bytes,
    key: bytes,
    silo: str | None = None,
) -> dict[str, Any]:
    import base64

    def enc(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": _meta(name, namespace, labels(job, component, silo)),
        "data": {"ca.crt": enc(ca), "tls.crt": enc(cert), "tls.key": enc(key)},
    }


def _tls_volume(secret: str, who: str) -> dict[str, Any]:
    # Renamed to the layout `fedjob` expects: ca.crt, <who>.crt, <who>.key.
    return {
        "name": "tls",
        "secret": {
            "secretName": secret,
            "defaultMode": 0o440,
            "items": [
                {"key": "ca.crt", "path": "ca.crt"},
                {"key": "tls.crt", "path": f"{who}.crt"},
                {"key": "tls.key", "path": f"{who}.key", "mode": 0o400},
            ],
        },
    }


def _shared_volumes(job: str, tls_secret: str, who: str, config: str | None = None) -> list[dict[str, Any]]:
    """What every pod of a job mounts: the job document, its own certificate, a writable /tmp."""
    return [
        {"name": "job", "configMap": {"name": config or names(job)["config"]}},
        _tls_volume(tls_secret, who),
        {"name": "tmp", "emptyDir": {}},
    ]


def _shared_mounts() -> list[dict[str, Any]]:
    return [
        {"name": "job", "mountPath": JOB_MOUNT, "readOnly": True},
        {"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]


def _volume_source(v: VolumeSpec) -> dict[str, Any]:
    if v.persistent_volume_claim is not None:
        return {
            "persistentVolumeClaim": {
                "claimName": v.persistent_volume_claim.claim_name,
                "readOnly": v.persistent_volume_claim.read_only,
            }
        }
    assert v.host_path is not None
    return {"hostPath": {"path": v.host_path.path, "type": "Directory"}}


def _data_volumes(
    job: FederatedJob, silo: str | None, with_eval: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes + mounts for the model, one silo's data and (aggregator) the eval set."""
    wanted: list[tuple[str, str, VolumeSpec | None]] = []
    if job.spec.model.path:
        wanted.append(("model", job.spec.model.path, job.spec.model.volume))
    if silo is not None:
        data = job.silo_data(silo)
        wanted.append(("data", data.path, data.volume))
        if data.eval is not None:
            wanted.append(("held-out", data.eval.path, data.eval.volume))
    if with_eval and job.spec.eval is not None:
        wanted.append(("eval", job.spec.eval.path, job.spec.eval.volume))
    volumes, mounts = [], []
    for name, path, vol in wanted:
        if vol is None:
            continue  # baked into the image, or nothing to mount
        volumes.append({"name": name, **_volume_source(vol)})
        mounts.append({"name": name, "mountPath": mount_folder(path), "readOnly": True})
    return volumes, mounts


def _resources(r: ResourcesSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if r.requests:
        out["requests"] = dict(r.requests)
    limits = dict(r.limits)
    if r.gpus:
        limits["nvidia.com/gpu"] = str(r.gpus)
    if limits:
        out["limits"] = limits
    return out


def _security(read_only_root: bool = True) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": read_only_root,
        "capabilities": {"drop": ["ALL"]},
    }


TERMINATION_LOG = "/dev/termination-log"


def _common_env() -> list[dict[str, Any]]:
    return [
        {"name": "HOME", "value": "/tmp"},
        # A failure no restart can fix leaves its one-line reason here (exit code 2): the operator
        # reads it from the container's terminated state.
        {"name": TERMINATION_LOG_ENV, "value": TERMINATION_LOG},
        {"name": "TORCH_EXTENSIONS_DIR", "value": EXTENSIONS_DIR},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
    ]


def _threads_env(r: ResourcesSpec, container: str) -> list[dict[str, Any]]:
    """One OpenMP thread per CPU the pod asked for: PyTorch would otherwise start one per node core."""
    for kind in ("limits", "requests"):
        if "cpu" in getattr(r, kind):
            ref = {
                "resourceFieldRef": {"containerName": container, "resource": f"{kind}.cpu", "divisor": "1"}
            }
            return [{"name": "OMP_NUM_THREADS", "valueFrom": ref}]
    return []


def _pvc(st: StorageSpec, name: str, namespace: str, lbls: dict[str, str]) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": st.size}}}
    if st.storage_class_name:
        spec["storageClassName"] = st.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(name, namespace, lbls),
        "spec": spec,
    }


def state_pvc(job: FederatedJob, namespace: str) -> dict[str, Any]:
    return _pvc(
        job.spec.aggregator.storage, names(job.name)["state"], namespace, labels(job.name, "aggregator")
    )


def silo_state_pvc(job: FederatedJob, silo: str, namespace: str) -> dict[str, Any]:
    """Where a silo's update-stage state survives its pods (a retried pod resumes its residual)."""
    return _pvc(
        job.silo(silo).storage,
        silo_state_name(job.name, silo),
        namespace,
        labels(job.name, "silo", silo),
    )


def aggregator_deployment(
    job: FederatedJob, namespace: str, images: Images, replicas: int = 1
) -> dict[str, Any]:
    n = names(job.name)
    lbl = labels(job.name, "aggregator")
    volumes, mounts = _data_volumes(job, None, with_eval=True)
    container = {
        "name": "aggregator",
        "image": job.spec.images.aggregator or images.aggregator,
        "command": ["fedjob"],
        "args": [
            "aggregator",
            f"{JOB_MOUNT}/job.yaml",
            "--certs",
            TLS_MOUNT,
            "--workdir",
            STATE_MOUNT,
            "--host",
            "$(POD_IP)",
            "--port",
            str(GRPC_PORT),
            "--metrics-port",
            str(METRICS_PORT),
            "--enrollment-port",
            str(ENROLL_PORT),
        ],
        "env": [*_common_env(), {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
            {"name": "enroll", "containerPort": ENROLL_PORT},
        ],
        "readinessProbe": {"tcpSocket": {"port": GRPC_PORT}, "periodSeconds": 5},
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": _resources(job.spec.aggregator.resources),
        "securityContext": _security(),
        "volumeMounts": [
            *_shared_mounts(),
            {"name": "state", "mountPath": STATE_MOUNT},
            *mounts,
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(n["aggregator"], namespace, lbl),
        "spec": {
            "replicas": replicas,
            # Never two aggregators on one checkpoint volume.
            "strategy": {"type": "Recreate"},
            "selector": {
                "matchLabels": {"fedjob.io/job": job.name, "app.kubernetes.io/component": "aggregator"}
            },
            "template": {
                "metadata": {
                    "labels": lbl,
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT)},
                },
                "spec": {
                    "securityContext": {"fsGroup": RUN_AS},
                    "automountServiceAccountToken": False,
                    "containers": [container],
                    "volumes": [
                        *_shared_volumes(job.name, n["aggregator_tls"], "aggregator"),
                        {"name": "state", "persistentVolumeClaim": {"claimName": n["state"]}},
                        *volumes,
                    ],
                },
            },
        },
    }


def aggregator_service(job: FederatedJob, namespace: str) -> dict[str, Any]:
    """The aggregator's Service: mTLS gRPC, metrics, and (with external silos) the enrollment port.

    External silos reach it from outside: type NodePort or LoadBalancer, or an Ingress/Gateway
    route with TLS passthrough to `grpc` (mTLS must end at the aggregator) and a plain route to
    `enroll` (docs/external-silos.md)."""
    svc = job.spec.aggregator.service
    grpc_port: dict[str, Any] = {"name": "grpc", "port": svc.port, "targetPort": "grpc"}
    if svc.node_port:
        grpc_port["nodePort"] = svc.node_port
    ports = [grpc_port]
    if job.external_silos():
        enroll: dict[str, Any] = {"name": "enroll", "port": svc.enrollment_port, "targetPort": "enroll"}
        if svc.enrollment_node_port:
            enroll["nodePort"] = svc.enrollment_node_port
        ports.append(enroll)
    ports.append({"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"})
    meta = _meta(names(job.name)["aggregator"], namespace, labels(job.name, "aggregator"))
    if svc.annotations:
        meta["annotations"] = dict(svc.annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": svc.type,
            "selector": {"fedjob.io/job": job.name, "app.kubernetes.io/component": "aggregator"},
            "ports": ports,
        },
    }


@dataclass(frozen=True)
class SiloPlacement:
    """Where a silo's worker finds the aggregator, its certificate and its job document: by default
    the owner's cluster; an external silo's FederatedSilo names its own (silo_side.py)."""

    job_name: str
    tls_secret: str
    config: str
    aggregator: str
    server_name: str

    @classmethod
    def hosted(cls, job: FederatedJob, silo: str, namespace: str) -> SiloPlacement:
        n = names(job.name)
        return cls(
            silo_job_name(job.name, silo),
            silo_tls_name(job.name, silo),
            n["config"],
            f"{n['aggregator']}.{namespace}.svc:{job.spec.aggregator.service.port}",
            n["aggregator"],
        )


def silo_job(
    job: FederatedJob, silo: str, namespace: str, images: Images, placement: SiloPlacement | None = None
) -> dict[str, Any]:
    s = job.silo(silo)
    at = placement or SiloPlacement.hosted(job, silo, namespace)
    lbl = labels(job.name, "silo", silo)
    volumes, mounts = _data_volumes(job, silo, with_eval=False)
    keeps_state = silo_keeps_state(job)
    if keeps_state:
        volumes.append(
            {"name": "state", "persistentVolumeClaim": {"claimName": silo_state_name(job.name, silo)}}
        )
        mounts.append({"name": "state", "mountPath": STATE_MOUNT})
    container = {
        "name": "worker",
        "image": job.spec.images.worker or images.worker,
        "command": ["fedjob"],
        "args": [
            "worker",
            f"{JOB_MOUNT}/job.yaml",
            "--silo",
            silo,
            "--certs",
            TLS_MOUNT,
            "--aggregator",
            at.aggregator,
            "--server-name",
            at.server_name,
            *(["--state", STATE_MOUNT] if keeps_state else []),
        ],
        "env": [*_common_env(), *_threads_env(s.resources, "worker")],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": _resources(s.resources),
        "securityContext": _security(),
        "volumeMounts": [
            *_shared_mounts(),
            # torch.distributed's shared-memory transport between the silo's processes.
            {"name": "shm", "mountPath": "/dev/shm"},
            *mounts,
        ],
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {"fsGroup": RUN_AS},
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": [
            *_shared_volumes(job.name, at.tls_secret, f"silo-{silo}", at.config),
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
            *volumes,
        ],
    }
    if s.node_selector:
        pod["nodeSelector"] = dict(s.node_selector)
    if s.tolerations:
        pod["tolerations"] = list(s.tolerations)
    if s.affinity:
        pod["affinity"] = dict(s.affinity)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(at.job_name, namespace, lbl),
        "spec": {
            "backoffLimit": s.backoff_limit,
            "completions": 1,
            "parallelism": 1,
            "template": {"metadata": {"labels": lbl}, "spec": pod},
        },
    }
