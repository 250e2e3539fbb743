"""The operator against a real kube-apiserver (+ controller-manager), with the RBAC of operator/rbac.yaml.

No Pods run here (see test_kubernetes_end_to_end.py for that): these check what
the operator creates, how it reports, and that it converges without duplicates.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import yaml
from kubernetes import client

from fedjob.spec import parse_job
from tests.cluster.conftest import Cluster, OperatorProcess, create_job, events, get_job, wait_for
from tests.conftest import job_doc

CHILD_KINDS = ("secrets", "configmaps", "services", "persistentvolumeclaims", "deployments", "jobs")


def children(namespace: str, job: str = "demo") -> dict[str, list[str]]:
    sel = f"fedjob.io/job={job}"
    core, apps, batch = client.CoreV1Api(), client.AppsV1Api(), client.BatchV1Api()
    lists = {
        "secrets": core.list_namespaced_secret(namespace, label_selector=sel),
        "configmaps": core.list_namespaced_config_map(namespace, label_selector=sel),
        "services": core.list_namespaced_service(namespace, label_selector=sel),
        "persistentvolumeclaims": core.list_namespaced_persistent_volume_claim(namespace, label_selector=sel),
        "deployments": apps.list_namespaced_deployment(namespace, label_selector=sel),
        "jobs": batch.list_namespaced_job(namespace, label_selector=sel),
    }
    return {k: sorted(o.metadata.name for o in v.items) for k, v in lists.items()}


EXPECTED = {
    "secrets": [
        "demo-aggregator-tls",
        "demo-ca",
        "demo-observer-tls",
        "demo-silo-alpha-tls",
        "demo-silo-beta-tls",
    ],
    "configmaps": ["demo-job"],
    "services": ["demo-aggregator"],
    "persistentvolumeclaims": ["demo-aggregator-state"],
    "deployments": ["demo-aggregator"],
    "jobs": ["demo-silo-alpha", "demo-silo-beta"],
}


def all_created(namespace: str) -> bool:
    return children(namespace) == EXPECTED


def test_a_job_creates_its_children_with_the_expected_specs(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    started = time.monotonic()
    created = create_job(
        namespace,
        job_doc(
            silos=[
                {
                    "name": "alpha",
                    "data": {
                        "path": "/data",
                        "volume": {"persistentVolumeClaim": {"claimName": "alpha-text"}},
                    },
                    "resources": {"requests": {"cpu": "2"}, "gpus": 2},
                    "nodeSelector": {"site": "alpha"},
                    "tolerations": [{"key": "gpu", "operator": "Exists"}],
                    "backoffLimit": 2,
                    "processes": 2,
                },
                {
                    "name": "beta",
                    "data": {
                        "path": "/data/chat/train.jsonl",
                        "format": "chat",
                        "volume": {"hostPath": {"path": "/srv/beta"}},
                    },
                },
            ]
        ),
    )
    wait_for(lambda: all_created(namespace), 30, "all children")
    print(f"kubectl apply -> all children created: {time.monotonic() - started:.2f} s")
    uid = created["metadata"]["uid"]
    core, apps, batch = client.CoreV1Api(), client.AppsV1Api(), client.BatchV1Api()

    # Everything is owned by the FederatedJob, so deletion garbage-collects it.
    for obj in [
        *core.list_namespaced_secret(namespace, label_selector="fedjob.io/job=demo").items,
        apps.read_namespaced_deployment("demo-aggregator", namespace),
        batch.read_namespaced_job("demo-silo-alpha", namespace),
    ]:
        assert [o.uid for o in obj.metadata.owner_references] == [uid]

    # The pods read the very spec that was applied.
    cm = core.read_namespaced_config_map("demo-job", namespace)
    assert parse_job(yaml.safe_load(cm.data["job.yaml"])).silo("alpha").processes == 2

    # Each pod mounts only its own key; nothing mounts the CA key.
    alpha = batch.read_namespaced_job("demo-silo-alpha", namespace).spec.template.spec
    secrets = [v.secret.secret_name for v in alpha.volumes if v.secret]
    assert secrets == ["demo-silo-alpha-tls"]
    agg = apps.read_namespaced_deployment("demo-aggregator", namespace).spec.template.spec
    assert [v.secret.secret_name for v in agg.volumes if v.secret] == ["demo-aggregator-tls"]
    assert agg.containers[0].security_context.read_only_root_filesystem
    assert agg.containers[0].security_context.run_as_non_root

    # Silo placement, resources and data volume come from the spec.
    c = alpha.containers[0]
    assert c.command == ["fedjob"] and c.args[:4] == ["worker", "/etc/fedjob/job/job.yaml", "--silo", "alpha"]
    assert c.resources.limits["nvidia.com/gpu"] == "2" and c.resources.requests["cpu"] == "2"
    assert alpha.node_selector == {"site": "alpha"} and alpha.tolerations[0].key == "gpu"
    assert batch.read_namespaced_job("demo-silo-alpha", namespace).spec.backoff_limit == 2
    data = next(v for v in alpha.volumes if v.name == "data")
    assert data.persistent_volume_claim.claim_name == "alpha-text"
    assert any(m.mount_path == "/data" and m.read_only for m in c.volume_mounts)
    # A data path naming a file mounts its volume at the file's folder.
    beta = batch.read_namespaced_job("demo-silo-beta", namespace).spec.template.spec
    assert [m.mount_path for m in beta.containers[0].volume_mounts if m.name == "data"] == ["/data/chat"]

    # The aggregator certificate is valid for the Service name the silos dial.
    from cryptography import x509

    tls = core.read_namespaced_secret("demo-aggregator-tls", namespace)
    cert = x509.load_pem_x509_certificate(base64.b64decode(tls.data["tls.crt"]))
    dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    assert f"demo-aggregator.{namespace}.svc" in dns

    status = wait_for(lambda: get_job(namespace, "demo").get("status", {}).get("progress"), 20, "status")
    assert status == "0/2"
    assert ("Normal", "Created") in [(t, r) for t, r, _ in events(namespace, "demo")]


def test_a_silo_whose_uplink_keeps_state_gets_a_volume_for_it(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    silos = [
        {"name": "alpha", "data": {"path": "/data"}, "storage": {"size": "3Gi"}},
        {"name": "beta", "data": {"path": "/data"}},
    ]
    create_job(namespace, job_doc(silos=silos, compression={"uplink": [{"topk": {"fraction": 0.05}}]}))
    want = {
        **EXPECTED,
        "persistentvolumeclaims": ["demo-aggregator-state", "demo-silo-alpha-state", "demo-silo-beta-state"],
    }
    wait_for(lambda: children(namespace) == want or None, 30, "children with the silos' state volumes")
    core, batch = client.CoreV1Api(), client.BatchV1Api()
    pvc = core.read_namespaced_persistent_volume_claim("demo-silo-alpha-state", namespace)
    assert pvc.spec.resources.requests["storage"] == "3Gi"
    assert pvc.metadata.labels["fedjob.io/silo"] == "alpha"
    # The residual outlives a pod: the retried pod mounts the same claim and the worker is told so.
    pod = batch.read_namespaced_job("demo-silo-alpha", namespace).spec.template.spec
    state = next(v for v in pod.volumes if v.name == "state")
    assert state.persistent_volume_claim.claim_name == "demo-silo-alpha-state"
    c = pod.containers[0]
    assert c.args[-2:] == ["--state", "/var/lib/fedjob"]
    assert any(m.name == "state" and m.mount_path == "/var/lib/fedjob" for m in c.volume_mounts)


def test_deleting_the_job_garbage_collects_its_children(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    create_job(namespace, job_doc())
    wait_for(lambda: all_created(namespace), 30, "all children")
    client.CustomObjectsApi().delete_namespaced_custom_object(
        "fedjob.io", "v1alpha1", namespace, "federatedjobs", "demo"
    )
    wait_for(lambda: not any(children(namespace).values()) or None, 60, "garbage collection")


def test_a_job_deleted_while_the_operator_is_down_goes_at_once_with_its_children(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    create_job(namespace, job_doc())
    wait_for(lambda: all_created(namespace), 30, "all children")
    time.sleep(5)  # a few periodic syncs: nothing they do may hold the job back
    assert not get_job(namespace, "demo")["metadata"].get("finalizers")
    operator.stop()
    client.CustomObjectsApi().delete_namespaced_custom_object(
        "fedjob.io", "v1alpha1", namespace, "federatedjobs", "demo"
    )
    wait_for(
        lambda: (
            not client.CustomObjectsApi().list_namespaced_custom_object(
                "fedjob.io", "v1alpha1", namespace, "federatedjobs"
            )["items"]
        ),
        10,
        "the job to be gone without its operator",
    )
    wait_for(lambda: not any(children(namespace).values()) or None, 60, "garbage collection")


def test_an_operator_restart_creates_no_duplicates_and_keeps_the_ca(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    create_job(namespace, job_doc())
    wait_for(lambda: all_created(namespace), 30, "all children")
    ca_before = client.CoreV1Api().read_namespaced_secret("demo-ca", namespace).data["ca.crt"]
    for _ in range(2):
        operator.stop()
        operator.start()
        time.sleep(6)  # a few sync periods
        assert children(namespace) == EXPECTED
    assert client.CoreV1Api().read_namespaced_secret("demo-ca", namespace).data["ca.crt"] == ca_before
    assert len(client.BatchV1Api().list_namespaced_job(namespace).items) == 2


def test_a_rule_the_schema_cannot_express_is_reported_as_a_condition(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    create_job(namespace, job_doc(aggregation={"minSilos": 5}))
    status = wait_for(
        lambda: (
            get_job(namespace, "demo").get("status", {}).get("phase") == "Failed"
            and get_job(namespace, "demo")["status"]
        ),
        20,
        "Failed phase",
    )
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.aggregation.minSilos: must be at most the number of silos (2)" in failed["message"]
    assert any(r == "InvalidSpec" for _, r, _ in events(namespace, "demo"))
    assert children(namespace)["jobs"] == []


def test_suspend_stops_the_workers_and_resume_brings_them_back(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    api = client.CustomObjectsApi()
    create_job(namespace, job_doc())
    wait_for(lambda: all_created(namespace), 30, "all children")
    api.patch_namespaced_custom_object(
        "fedjob.io", "v1alpha1", namespace, "federatedjobs", "demo", {"spec": {"suspend": True}}
    )

    def suspended() -> bool:
        dep = client.AppsV1Api().read_namespaced_deployment("demo-aggregator", namespace)
        return (
            not children(namespace)["jobs"]
            and dep.spec.replicas == 0
            and get_job(namespace, "demo").get("status", {}).get("phase") == "Suspended"
        )

    wait_for(suspended, 30, "suspension")
    # The checkpoint volume and the PKI stay.
    assert children(namespace)["persistentvolumeclaims"] == ["demo-aggregator-state"]
    api.patch_namespaced_custom_object(
        "fedjob.io", "v1alpha1", namespace, "federatedjobs", "demo", {"spec": {"suspend": False}}
    )
    wait_for(
        lambda: (
            all_created(namespace)
            and client.AppsV1Api().read_namespaced_deployment("demo-aggregator", namespace).spec.replicas == 1
        ),
        30,
        "resume",
    )


def test_an_unsafe_spec_change_mid_run_is_refused_with_an_event(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    api = client.CustomObjectsApi()
    create_job(namespace, job_doc())
    wait_for(lambda: all_created(namespace), 30, "all children")
    api.patch_namespaced_custom_object(
        "fedjob.io",
        "v1alpha1",
        namespace,
        "federatedjobs",
        "demo",
        {"spec": {"training": {"learningRate": 0.5}}},
    )
    wait_for(
        lambda: any(r == "UnsafeSpecChange" for _, r, _ in events(namespace, "demo")), 20, "refusal event"
    )
    cm: Any = client.CoreV1Api().read_namespaced_config_map("demo-job", namespace)
    assert parse_job(yaml.safe_load(cm.data["job.yaml"])).spec.training.learning_rate == 0.001
