"""Two organisations, two Kubernetes API servers: the owner's FederatedJob trains with a silo that
runs in its own cluster, from a FederatedSilo there, and whose private key never leaves it.

Each cluster is a real kube-apiserver + controller-manager from hack/test-cluster.sh with its own
stand-in kubelet (tests/cluster/kubelet.py; its Pods get their own loopback range) and its own
operator process with the chart's RBAC. In the silo's cluster the chart is installed with real
helm (CRDs, ClusterRole, binding to the operator's ServiceAccount); the operator runs as a local
process with that ServiceAccount's identity, since the stand-in kubelet has no image to run.
The silo reaches the aggregator at its Pod IP, as it would
at a LoadBalancer's address: both "networks" are this machine's loopback.
"""

from __future__ import annotations

import base64
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config

from tests.cluster.conftest import (
    GROUP,
    VERSION,
    Cluster,
    OperatorProcess,
    create_job,
    get_job,
    start_cluster,
    stop_cluster,
    wait_for,
)
from tests.cluster.kubelet import FakeKubelet
from tests.cluster.test_kubernetes_end_to_end import example_assets  # noqa: F401 (fixture)
from tests.conftest import REPO

pytestmark = pytest.mark.slow
SILO_STATE = REPO / ".test-cluster-silo"


@pytest.fixture(scope="module")
def silo_cluster(cluster: Cluster, tools: Path) -> Iterator[tuple[Cluster, client.ApiClient]]:
    """The external silo's own cluster, where the fedjob chart is installed with real helm: its
    CRDs and RBAC are what the silo's operator process runs with."""
    c = start_cluster(SILO_STATE, helm=tools / "helm")
    api = config.new_client_from_config(str(c.kubeconfig))
    yield c, api
    stop_cluster(SILO_STATE)


def owner_job() -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "quickstart-k8s.yaml").read_text())
    doc["metadata"]["name"] = "fed"
    doc["spec"]["rounds"] = 2
    doc["spec"]["silos"] = [doc["spec"]["silos"][0], {"name": "hospital", "external": True}]
    doc["spec"]["aggregation"] = {"minSilos": 2, "roundDeadlineSeconds": 300}
    return doc


def federated_silo(name: str, pod_ip: str, ca_hash: str, token_secret: str) -> dict[str, Any]:
    model = owner_job()["spec"]["model"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FederatedSilo",
        "metadata": {"name": name},
        "spec": {
            "aggregator": {"address": f"{pod_ip}:50051", "enrollmentAddress": f"{pod_ip}:50052"},
            "job": "fed",
            "silo": "hospital",
            "caHash": ca_hash,
            "tokenSecret": {"name": token_secret},
            "model": model,
            "data": {"path": "/data", "volume": {"hostPath": {"path": "/tmp/fedjob-examples/data/docs"}}},
        },
    }


def test_a_silo_in_its_own_cluster_enrolls_and_trains_and_its_key_stays_there(
    cluster: Cluster,
    silo_cluster: tuple[Cluster, client.ApiClient],
    namespace: str,
    operator: OperatorProcess,
    kubelet: FakeKubelet,
    example_assets: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    other, api = silo_cluster
    core_b, custom_b = client.CoreV1Api(api), client.CustomObjectsApi(api)
    ns_b = f"s-{uuid.uuid4().hex[:8]}"
    core_b.create_namespace({"metadata": {"name": ns_b}})
    operator_b = OperatorProcess(other, ns_b, tmp_path / "operator-b.log").start()
    kubelet_b = FakeKubelet(
        core_b, ns_b, tmp_path / "node-b", Path(sys.executable).parent, "127.0.1."
    ).start()
    try:
        create_job(namespace, owner_job())
        core_a = client.CoreV1Api()
        # What the owner hands over: the token (one Secret per external silo), the CA's hash and
        # the aggregator's address.
        token = wait_for(
            lambda: next(
                iter(
                    core_a.list_namespaced_secret(
                        namespace, label_selector="fedjob.io/silo=hospital,app.kubernetes.io/component=token"
                    ).items
                ),
                None,
            ),
            60,
            "the token Secret",
        )
        data = {k: base64.b64decode(v).decode() for k, v in token.data.items()}
        pod_ip = wait_for(
            lambda: next(
                (
                    p.status.pod_ip
                    for p in core_a.list_namespaced_pod(
                        namespace, label_selector="app.kubernetes.io/component=aggregator"
                    ).items
                    if p.status.pod_ip
                ),
                None,
            ),
            120,
            "the aggregator's Pod IP",
        )
        core_b.create_namespaced_secret(
            ns_b, {"metadata": {"name": "fed-token"}, "stringData": {"token": data["token"]}}
        )

        def silo_status(name: str) -> dict[str, Any]:
            obj = custom_b.get_namespaced_custom_object(GROUP, VERSION, ns_b, "federatedsilos", name)
            return dict(obj.get("status") or {})

        # First a silo admin with a wrong pin: refused before sending anything; the token survives.
        wrong = federated_silo("impostor", pod_ip, "sha256:" + "0" * 64, "fed-token")
        custom_b.create_namespaced_custom_object(GROUP, VERSION, ns_b, "federatedsilos", wrong)
        impostor = wait_for(
            lambda: (lambda s: s if s.get("phase") == "Failed" else None)(silo_status("impostor")),
            60,
            "the wrongly pinned FederatedSilo to fail",
        )
        assert "ca_mismatch" in impostor["message"] and "nothing was sent" in impostor["message"], impostor
        custom_b.create_namespaced_custom_object(
            GROUP,
            VERSION,
            ns_b,
            "federatedsilos",
            federated_silo("hospital", pod_ip, data["ca-hash"], "fed-token"),
        )

        status = wait_for(
            lambda: (lambda s: s if s.get("phase") in ("Succeeded", "Failed") else None)(
                get_job(namespace, "fed").get("status", {})
            ),
            420,
            "the federated job to finish",
            interval=1,
        )
        assert status["phase"] == "Succeeded", (status, kubelet.logs("fed"), kubelet_b.logs("hospital"))
        assert status["lastRound"]["participants"] == 2
        hospital = next(s for s in status["silos"] if s["name"] == "hospital")
        assert hospital["job"] == "External" and hospital["enrolled"] is True
        silo = wait_for(
            lambda: (lambda s: s if s.get("phase") == "Succeeded" else None)(silo_status("hospital")),
            60,
            "the FederatedSilo to succeed",
        )
        assert silo["enrolled"] and silo["certificateExpires"]
        # The silo's status ends with its worker's own outcome, even when the owner's aggregator
        # stopped before the silo operator looked at it again.
        assert (silo["progress"], silo["jobPhase"], silo["state"]) == ("2/2", "Succeeded", "done"), silo
        # The silo's key is in its own cluster's Secret, and in no Secret of the owner's.
        key = base64.b64decode(core_b.read_namespaced_secret("hospital-silo-tls", ns_b).data["tls.key"])
        assert b"PRIVATE KEY" in key
        for secret in core_a.list_namespaced_secret(namespace).items:
            for value in (secret.data or {}).values():
                assert key not in base64.b64decode(value), secret.metadata.name
        assert kubelet_b.failures == [] and kubelet.failures == []
        # Deleting the FederatedJob deletes its tokens (they are owned by it): none stays usable.
        client.CustomObjectsApi().delete_namespaced_custom_object(
            GROUP, VERSION, namespace, "federatedjobs", "fed"
        )
        wait_for(
            lambda: (
                not core_a.list_namespaced_secret(
                    namespace, label_selector="app.kubernetes.io/component=token"
                ).items
            ),
            60,
            "the token Secrets to be garbage-collected",
        )
    finally:
        kubelet_b.stop()
        operator_b.stop()
        core_b.delete_namespace(ns_b, _preload_content=False)
