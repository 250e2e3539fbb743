"""The API server itself refuses invalid FederatedJobs, naming the field (the generated CRD schema).

Kubernetes 1.20 names list items without their index (`spec.silos.name`); rules
that span fields and have no structural form (minSilos <= number of silos) are
reported by the operator instead (tests/cluster/test_operator.py), as is a silo without data
that is not external (the API server's anyOf message would name neither field).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from tests.cluster.conftest import Cluster, create_job
from tests.conftest import job_doc


def refused(namespace: str, doc: dict[str, Any]) -> str:
    with pytest.raises(ApiException) as info:
        create_job(namespace, doc)
    assert info.value.status == 422, info.value.body
    return str(json.loads(info.value.body)["message"])


def mutated(change: Any) -> dict[str, Any]:
    doc = copy.deepcopy(job_doc())
    change(doc)
    return doc


CASES = [
    (lambda d: d["spec"]["silos"][1].update(name="Beta_1"), "spec.silos.name in body should match"),
    (lambda d: d["spec"]["training"].update(mode="dreaming"), "spec.training.mode"),
    (lambda d: d["spec"]["training"].update(localSteps=0), "spec.training.localSteps"),
    (lambda d: d["spec"]["training"].update(deepspeed={"zeroStage": 4}), "spec.training.deepspeed.zeroStage"),
    (lambda d: d["spec"].update(silos=[]), "spec.silos"),
    (lambda d: d["spec"]["silos"].append({"name": "alpha", "data": {"path": "/x"}}), "spec.silos[2]"),
    (lambda d: d["spec"]["compression"].update(codec="int4"), "spec.compression.codec"),
    (lambda d: d["spec"]["compression"].update(chunkBytes=64 << 20), "spec.compression.chunkBytes"),
    (lambda d: d["spec"].update(rounds=-1), "spec.rounds"),
    (
        lambda d: d["spec"].update(model={"path": "/m", "config": {"model_type": "gpt2"}}),
        '"spec.model" must validate one and only one',
    ),
    (lambda d: d["spec"].pop("model"), "spec.model: Required value"),
    (lambda d: d["metadata"].update(name="x" * 40), "metadata.name"),
    (lambda d: d["spec"]["training"].update(learningRate="fast"), "spec.training.learningRate"),
    (
        lambda d: d["spec"]["silos"][0].update(resources={"requests": {"cpu": "lots"}}),
        "spec.silos.resources.requests.cpu",
    ),
    (
        lambda d: d["spec"]["silos"][0]["data"].update(volume={"hostPath": {"path": "relative"}}),
        "spec.silos.data.volume.hostPath.path",
    ),
]


@pytest.mark.parametrize(("change", "field"), CASES)
def test_the_api_server_refuses_an_invalid_job_naming_the_field(
    cluster: Cluster, namespace: str, change, field: str
) -> None:  # type: ignore[no-untyped-def]
    message = refused(namespace, mutated(change))
    assert field in message, message


def test_a_valid_job_is_accepted_with_printer_columns(cluster: Cluster, namespace: str) -> None:
    create_job(namespace, job_doc())
    out = cluster.run("get", "fj", "-n", namespace).stdout
    assert out.split()[:5] == ["NAME", "PHASE", "ROUND", "SILOS", "AGE"]


def test_status_is_a_subresource(cluster: Cluster, namespace: str) -> None:
    from kubernetes import client

    api = client.CustomObjectsApi()
    create_job(namespace, job_doc())
    api.patch_namespaced_custom_object(
        "fedjob.io", "v1alpha1", namespace, "federatedjobs", "demo", {"status": {"phase": "Forged"}}
    )
    got = api.get_namespaced_custom_object("fedjob.io", "v1alpha1", namespace, "federatedjobs", "demo")
    assert "status" not in got or got["status"].get("phase") != "Forged"
