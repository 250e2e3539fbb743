"""`helm install` of the chart into the real test cluster: the operator's objects appear."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kubernetes import client

from tests.cluster.conftest import Cluster, wait_for
from tests.conftest import REPO


def test_helm_install_creates_the_operator_objects(cluster: Cluster, namespace: str, tools: Path) -> None:
    helm = [str(tools / "helm"), "--kubeconfig", str(cluster.kubeconfig)]
    installed = subprocess.run(
        [
            *helm,
            "install",
            "fedjob-test",
            str(REPO / "helm" / "fedjob"),
            "--namespace",
            namespace,
            "--set",
            "grafanaDashboard.enabled=true",
            "--set",
            f"watchNamespaces={{{namespace}}}",
            "--wait=false",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert installed.returncode == 0, installed.stderr
        assert "kubectl get fj -w" in installed.stdout  # NOTES.txt tells the user what to do next
        apps, core, rbac = client.AppsV1Api(), client.CoreV1Api(), client.RbacAuthorizationV1Api()
        deployment = wait_for(
            lambda: apps.read_namespaced_deployment("fedjob-test", namespace), 10, "deployment"
        )
        args = deployment.spec.template.spec.containers[0].args
        assert args[0] == "operator" and f"--namespace={namespace}" in args
        assert core.read_namespaced_service_account("fedjob-test", namespace)
        assert core.read_namespaced_service("fedjob-test-metrics", namespace)
        assert (
            core.read_namespaced_config_map("fedjob-test-dashboard", namespace).metadata.labels[
                "grafana_dashboard"
            ]
            == "1"
        )
        role = rbac.read_cluster_role("fedjob-test")
        assert any("federatedjobs" in (r.resources or []) for r in role.rules)
        binding = rbac.read_cluster_role_binding("fedjob-test")
        assert binding.subjects[0].namespace == namespace
        # The controllers act on what helm created: the Deployment gets its ReplicaSet and Pod.
        wait_for(
            lambda: (
                core.list_namespaced_pod(
                    namespace, label_selector="app.kubernetes.io/component=operator"
                ).items
            ),
            30,
            "the operator pod",
        )
        listed = subprocess.run([*helm, "list", "--namespace", namespace], capture_output=True, text=True)
        assert "fedjob-test" in listed.stdout and "deployed" in listed.stdout
    finally:
        subprocess.run(
            [*helm, "uninstall", "fedjob-test", "--namespace", namespace], capture_output=True, timeout=120
        )
