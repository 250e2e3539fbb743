"""`kubectl apply -f examples/quickstart-k8s.yaml` trains to Succeeded: operator, real API server and
controllers, and Pods run by the stand-in kubelet (tests/cluster/kubelet.py) exactly as specified."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.cluster.conftest import Cluster, OperatorProcess, create_job, events, get_job, wait_for
from tests.cluster.kubelet import FakeKubelet
from tests.conftest import REPO

pytestmark = pytest.mark.slow
EXAMPLES = Path("/tmp/fedjob-examples")  # the hostPath folders examples/quickstart-k8s.yaml names


@pytest.fixture(scope="module")
def example_assets() -> Path:
    if (
        not (EXAMPLES / "data" / "eval").exists()
        or not (EXAMPLES / "models" / "tiny-gpt2" / "config.json").exists()
    ):
        subprocess.run(
            [sys.executable, "-m", "fedjob_cli.main", "example", "--out", str(EXAMPLES)],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return EXAMPLES


def finished(namespace: str, name: str) -> dict[str, Any] | None:
    status = get_job(namespace, name).get("status", {})
    return status if status.get("phase") in ("Succeeded", "Failed") else None


def test_the_k8s_quickstart_trains_to_succeeded(
    cluster: Cluster, namespace: str, operator: OperatorProcess, kubelet: FakeKubelet, example_assets: Path
) -> None:
    cluster.run("apply", "-n", namespace, "-f", str(REPO / "examples" / "quickstart-k8s.yaml"))
    status = wait_for(lambda: finished(namespace, "quickstart"), 420, "the job to finish", interval=1)
    assert not kubelet.failures, kubelet.failures
    assert status["phase"] == "Succeeded", (status, kubelet.logs("quickstart"))
    assert status["round"] == status["totalRounds"] == 3
    assert status["progress"] == "3/3"
    assert status["lastRound"]["participants"] == 3 and status["lastRound"]["evalLoss"] is not None
    assert {s["name"] for s in status["silos"]} == {"code", "docs", "unicode"}
    # The docs silo asks for two processes: both ranks trained every round inside its one Pod.
    docs = kubelet.logs("quickstart-silo-docs", tail=1 << 20)
    assert all(f"rank1 fedjob.worker INFO round {n}: 20 local steps" in docs for n in (1, 2, 3)), docs[-4000:]
    evs = events(namespace, "quickstart")
    covered: list[int] = []
    for _, reason, message in evs:  # "round 2/3: ..." or "rounds 1-2/3: ..."
        if reason == "RoundCompleted":
            lo, _, hi = message.split("/")[0].split()[-1].partition("-")
            covered += range(int(lo), int(hi or lo) + 1)
    assert sorted(covered) == [1, 2, 3], evs
    assert "Succeeded" in [r for _, r, _ in evs]
    out = cluster.run("get", "fj", "-n", namespace).stdout
    assert "Succeeded" in out and "3/3" in out
    # Done: the aggregator is scaled to zero, its checkpoint volume kept; every silo Job completed.
    wait_for(
        lambda: (
            client.AppsV1Api().read_namespaced_deployment("quickstart-aggregator", namespace).spec.replicas
            == 0
        ),
        20,
        "aggregator scaled down",
    )
    wait_for(
        lambda: (
            [j.status.succeeded for j in client.BatchV1Api().list_namespaced_job(namespace).items]
            == [1, 1, 1]
        ),
        60,
        "every silo Job to complete",
    )


def lossy_job(min_silos: int) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "quickstart-k8s.yaml").read_text())
    doc = copy.deepcopy(doc)
    doc["metadata"]["name"] = "lossy"
    doc["spec"]["rounds"] = 2
    doc["spec"]["silos"] = doc["spec"]["silos"][:2]
    # This silo's data folder on the node holds no text: its worker exits with code 2 and the
    # reason, and the operator counts it lost at once instead of burning its 4 retries.
    (EXAMPLES / "no-text").mkdir(exist_ok=True)
    doc["spec"]["silos"][1]["data"]["volume"]["hostPath"]["path"] = str(EXAMPLES / "no-text")
    doc["spec"]["silos"][1]["backoffLimit"] = 4
    doc["spec"]["aggregation"] = {"minSilos": min_silos, "roundDeadlineSeconds": 60}
    return doc


def test_a_lost_silo_is_reported_and_the_job_goes_on_while_the_quorum_holds(
    cluster: Cluster, namespace: str, operator: OperatorProcess, kubelet: FakeKubelet, example_assets: Path
) -> None:
    create_job(namespace, lossy_job(min_silos=1))
    status = wait_for(lambda: finished(namespace, "lossy"), 420, "the job to finish", interval=1)
    assert status["phase"] == "Succeeded", (status, kubelet.logs("lossy"))
    assert status["lostSilos"] == ["docs"]
    docs = next(s for s in status["silos"] if s["name"] == "docs")
    assert (
        "spec.silos[1].data.path: no text data at /data" in docs["failure"] or "not found" in docs["failure"]
    )
    assert any(
        r == "SiloLost" and "docs cannot run, and no retry can fix it" in m
        for _, r, m in events(namespace, "lossy")
    )
    # No retry ran: the operator stopped the Job at its first failed pod. Kubernetes 1.20 has no
    # podFailurePolicy, so the Job controller may create its retry pod in the moment before the
    # operator's parallelism 0; that removes it before it runs the silo again.
    job = client.BatchV1Api().read_namespaced_job("lossy-silo-docs", namespace)
    assert job.spec.parallelism == 0
    pods = client.CoreV1Api().list_namespaced_pod(namespace, label_selector="fedjob.io/silo=docs").items
    failed = [p.metadata.name for p in pods if p.status.phase == "Failed"]
    assert len(failed) == 1 and len(pods) <= 2, [(p.metadata.name, p.status.phase) for p in pods]


def test_the_job_fails_with_a_clear_condition_when_the_quorum_is_lost(
    cluster: Cluster, namespace: str, operator: OperatorProcess, kubelet: FakeKubelet, example_assets: Path
) -> None:
    create_job(namespace, lossy_job(min_silos=2))
    status = wait_for(lambda: finished(namespace, "lossy"), 300, "the job to finish", interval=1)
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "QuorumLost"
    assert "silo docs cannot run (no retry can fix it): spec.silos[1].data.path" in failed["message"]
    assert "minSilos is 2" in failed["message"]


def test_a_model_mistake_fails_the_job_at_once_with_its_reason(
    cluster: Cluster, namespace: str, operator: OperatorProcess, kubelet: FakeKubelet, example_assets: Path
) -> None:
    doc = yaml.safe_load((REPO / "examples" / "quickstart-k8s.yaml").read_text())
    doc["metadata"]["name"] = "mistaken"
    doc["spec"]["training"]["lora"]["targetModules"] = ["q_proj"]  # a Llama name; this is a GPT-2
    started = time.time()
    create_job(namespace, doc)
    status = wait_for(lambda: finished(namespace, "mistaken"), 180, "the job to fail", interval=1)
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    # Every component meets the mistake within seconds: the aggregator's exit (PermanentFailure)
    # or the silos' (QuorumLost, once too few are left) is seen first; both carry the reason.
    assert failed["reason"] in ("PermanentFailure", "QuorumLost"), failed
    assert "spec.training.lora.targetModules: no module named 'q_proj'" in failed["message"]
    assert time.time() - started < 120
    assert any(r == "Failed" and "q_proj" in m for _, r, m in events(namespace, "mistaken"))
