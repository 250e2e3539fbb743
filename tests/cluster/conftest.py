"""A real kube-apiserver (hack/test-cluster.sh), the CRD, an operator process and a stand-in kubelet."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tests.cluster.kubelet import FakeKubelet
from tests.conftest import REPO

STATE = REPO / ".test-cluster"
GROUP, VERSION, PLURAL = "fedjob.io", "v1alpha1", "federatedjobs"


@dataclass
class Cluster:
    kubeconfig: Path
    operator_kubeconfig: Path
    kubectl: str
    state: Path = STATE

    def run(
        self, *args: str, check: bool = True, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        # A private discovery cache: a shared one may predate the CRD.
        proc = subprocess.run(
            [
                self.kubectl,
                "--kubeconfig",
                str(kubeconfig or self.kubeconfig),
                "--cache-dir",
                str(self.state / "kubectl-cache"),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}")
        return proc


def start_cluster(state: Path, helm: Path | None = None) -> Cluster:
    """A control plane from hack/test-cluster.sh in `state`, with both CRDs, the operator's RBAC and
    its namespace: applied from crds/ and operator/rbac.yaml, or, given `helm`, installed with the
    chart (release fedjob-operator in namespace fedjob, whose ServiceAccount is the identity the
    operator's kubeconfig carries)."""
    script = REPO / "hack" / "test-cluster.sh"
    env = {**os.environ, "TEST_CLUSTER_DIR": str(state)}
    started = subprocess.run([str(script), "up"], capture_output=True, text=True, timeout=1800, env=env)
    if started.returncode != 0:
        raise RuntimeError(f"test cluster did not start:\n{started.stderr}")
    kubectl = subprocess.run([str(script), "bin"], capture_output=True, text=True, check=True, env=env)
    c = Cluster(
        state / "kubeconfig", state / "operator.kubeconfig", f"{kubectl.stdout.strip()}/kubectl", state
    )
    if helm is not None:
        installed = subprocess.run(
            [
                str(helm),
                "--kubeconfig",
                str(c.kubeconfig),
                "upgrade",
                "--install",
                "fedjob-operator",
                str(REPO / "helm" / "fedjob"),
                "--namespace",
                "fedjob",
                "--create-namespace",
                "--set",
                "serviceAccount.name=fedjob-operator",
                "--wait=false",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if installed.returncode != 0:
            raise RuntimeError(f"helm install failed:\n{installed.stderr}")
        for crd in ("federatedjobs", "federatedsilos"):
            c.run("wait", "--for", "condition=Established", f"crd/{crd}.fedjob.io", "--timeout", "60s")
        shutil.rmtree(state / "kubectl-cache", ignore_errors=True)
        return c
    crds = REPO / "crds"
    c.run("apply", "-f", str(crds / "federatedjob.yaml"), "-f", str(crds / "federatedsilo.yaml"))
    c.run("wait", "--for", "condition=Established", "crd/federatedjobs.fedjob.io", "--timeout", "60s")
    c.run("wait", "--for", "condition=Established", "crd/federatedsilos.fedjob.io", "--timeout", "60s")
    shutil.rmtree(state / "kubectl-cache", ignore_errors=True)  # discovered before the CRDs existed
    # The operator runs with exactly the RBAC of operator/rbac.yaml, as its ServiceAccount would.
    c.run("create", "namespace", "fedjob", check=False)
    c.run("apply", "-f", str(REPO / "operator" / "rbac.yaml"))
    return c


def stop_cluster(state: Path) -> None:
    env = {**os.environ, "TEST_CLUSTER_DIR": str(state)}
    subprocess.run([str(REPO / "hack" / "test-cluster.sh"), "down"], capture_output=True, timeout=60, env=env)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    c = start_cluster(STATE)
    config.load_kube_config(str(c.kubeconfig))
    yield c
    stop_cluster(STATE)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api().create_namespace({"metadata": {"name": name}})
    yield name
    with contextlib.suppress(ApiException):
        client.CoreV1Api().delete_namespace(name, _preload_content=False)


class OperatorProcess:
    def __init__(self, cluster: Cluster, namespace: str, log: Path) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": str(self.cluster.operator_kubeconfig)}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fedjob_cli.main",
                    "operator",
                    "--namespace",
                    self.namespace,
                    "--metrics-port",
                    "0",
                    "--liveness",
                    "",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def operator(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster, namespace, tmp_path / "operator.log").start()
    yield op
    # Delete jobs while the operator runs (its children go with them).
    api = client.CustomObjectsApi()
    for item in api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, item["metadata"]["name"])
    wait_for(
        lambda: not api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"],
        30,
        "FederatedJobs to be deleted",
    )
    op.stop()


@pytest.fixture
def kubelet(namespace: str, tmp_path: Path) -> Iterator[FakeKubelet]:
    k = FakeKubelet(client.CoreV1Api(), namespace, tmp_path / "node", Path(sys.executable).parent).start()
    yield k
    k.stop()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    end = time.time() + timeout
    last: Any = None
    while time.time() < end:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def get_job(namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = client.CustomObjectsApi().get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return obj


def create_job(namespace: str, doc: dict[str, Any]) -> dict[str, Any]:
    obj: dict[str, Any] = client.CustomObjectsApi().create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, doc
    )
    return obj


def events(namespace: str, name: str) -> list[tuple[str, str, str]]:
    items = client.CoreV1Api().list_namespaced_event(namespace).items
    return [
        (e.type, e.reason, e.message)
        for e in items
        if e.involved_object.kind == "FederatedJob" and e.involved_object.name == name
    ]
