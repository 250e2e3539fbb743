"""The Helm chart with a real helm: lint, render every values toggle, validate what it renders."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO

CHART = REPO / "helm" / "fedjob"
TOGGLES = {
    "metrics.enabled": [True, False],
    "metrics.serviceMonitor.enabled": [True, False],
    "metrics.podMonitor.enabled": [True, False],
    "prometheusRule.enabled": [True, False],
    "grafanaDashboard.enabled": [True, False],
    "rbac.create": [True, False],
    "serviceAccount.create": [True, False],
}
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def helm(tools: Path, *args: str) -> str:
    proc = subprocess.run([str(tools / "helm"), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


def render(tools: Path, values: dict[str, Any], extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    sets = ",".join(f"{k}={str(v).lower()}" for k, v in values.items())
    out = helm(tools, "template", "fedjob", str(CHART), "--namespace", "fedjob", "--set", sets, *extra)
    return [d for d in yaml.safe_load_all(out) if d]


def test_helm_lint_strict_is_clean(tools: Path) -> None:
    helm(tools, "lint", "--strict", str(CHART))


def all_toggle_combinations() -> list[dict[str, bool]]:
    """Everything on, everything off, and each toggle flipped alone from each of those."""
    out = []
    for base in (True, False):
        everything = dict.fromkeys(TOGGLES, base)
        out.append(everything)
        out += [{**everything, key: not base} for key in TOGGLES]
    return out


def test_every_values_combination_renders_valid_objects(tools: Path, tmp_path: Path) -> None:
    combos = all_toggle_combinations()
    kinds_seen: set[str] = set()
    for i, values in enumerate(combos):
        docs = render(tools, values)
        kinds = {d["kind"] for d in docs}
        kinds_seen |= kinds
        assert ("ServiceMonitor" in kinds) == (
            values["metrics.enabled"] and values["metrics.serviceMonitor.enabled"]
        )
        assert ("PodMonitor" in kinds) == values["metrics.podMonitor.enabled"]
        assert ("PrometheusRule" in kinds) == values["prometheusRule.enabled"]
        assert ("ClusterRole" in kinds) == values["rbac.create"]
        assert ("ServiceAccount" in kinds) == values["serviceAccount.create"]
        builtin = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
        f = tmp_path / f"render-{i}.yaml"
        f.write_text(yaml.safe_dump_all(builtin))
        # Offline schema validation of every built-in kind (Kubernetes 1.30 schemas).
        check = subprocess.run(
            ["kubernetes-validate", "--strict", "-k", "1.30.0", "--quiet", str(f)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=_venv_env(),
        )
        assert check.returncode == 0, f"{values}: {check.stdout}{check.stderr}"
    assert {
        "Deployment",
        "Service",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
    } <= kinds_seen


def _venv_env() -> dict[str, str]:
    import os
    import sys

    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def test_watch_namespaces_reach_the_operator(tools: Path) -> None:
    docs = render(tools, {}, ("--set", "watchNamespaces={team-a,team-b}"))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_the_chart_ships_the_generated_crd_and_the_operator_rbac() -> None:
    for crd in ("federatedjob.yaml", "federatedsilo.yaml"):
        assert yaml.safe_load((CHART / "crds" / crd).read_text()) == yaml.safe_load(
            (REPO / "crds" / crd).read_text()
        )
    rbac = list(yaml.safe_load_all((REPO / "operator" / "rbac.yaml").read_text()))
    assert yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text()) == rbac[1]["rules"]


def test_the_dashboard_configmap_is_picked_up_by_the_grafana_sidecar(tools: Path) -> None:
    docs = render(tools, {"grafanaDashboard.enabled": True})
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["fedjob-rounds.json"])
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"namespace", "federatedjob"}
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in (
        "Progress",
        "Train loss per silo",
        "Global eval loss (aggregator-side)",
        "Federated eval loss (each silo on its own held-out text)",
        "Participating vs expected silos",
        "Bytes per second per silo",
        "Compression ratio",
        "Round duration",
        "Refused updates by reason",
        "Stragglers and dropouts (rounds missed per silo)",
    ):
        assert wanted in titles
