"""The FederatedJob status the operator writes from the aggregator's GetStatus (no cluster needed)."""

from __future__ import annotations

import threading
import time
from typing import Any

from fedjob_operator.reconcile import status_from
from fedjob_operator.sync_loop import Known, SyncLoop

from fedjob.spec import parse_job
from fedjob.v1 import fedjob_pb2 as pb
from tests.conftest import job_doc


def test_each_silos_latest_update_scores_reach_the_status_and_outlive_an_unreachable_aggregator() -> None:
    job = parse_job(job_doc())
    agg = pb.JobStatus(
        job="demo",
        phase="Running",
        round=3,
        total_rounds=5,
        silos=[
            pb.SiloStatus(
                name="alpha",
                state="reported",
                last_round=3,
                scored_round=3,
                update_norm=12.5,
                update_cosine=-0.25,
                update_norm_zscore=1.0,
                weight_share=0.5,
            ),
            pb.SiloStatus(name="beta", state="training", last_round=2),
        ],
    )
    jobs = {"alpha": "Running", "beta": "Running"}
    status = status_from(job, agg, jobs, {}, 1, False)
    alpha, beta = status["silos"]
    assert alpha["update"] == {
        "round": 3,
        "norm": 12.5,
        "cosine": -0.25,
        "normZScore": 1.0,
        "weightShare": 0.5,
    }
    assert "update" not in beta  # no update scored yet
    # The aggregator restarting (no answer): the last scores stay.
    again = status_from(job, None, jobs, status, 1, False)
    assert again["silos"][0]["update"] == alpha["update"]


def test_epsilon_and_a_budget_stop_reach_the_status_and_its_succeeded_condition() -> None:
    job = parse_job(job_doc(privacy={"dp": {"clipNorm": 1, "noiseMultiplier": 2, "delta": 1e-5}}))
    running = pb.JobStatus(
        job="demo", phase="Running", round=1, total_rounds=2, dp=True, dp_epsilon=1.234567891, dp_delta=1e-5
    )
    status = status_from(job, running, {}, {}, 1, False)
    assert status["privacy"] == {"epsilon": 1.234568, "delta": 1e-5}
    message = "privacy budget spent: stopped after round 1 of 2 at epsilon 1.235 (delta 1e-05); ..."
    stopped = pb.JobStatus(
        job="demo",
        phase="Succeeded",
        round=1,
        total_rounds=2,
        message=message,
        dp=True,
        dp_epsilon=1.2345,
        dp_delta=1e-5,
        dp_target_epsilon=2.0,
        privacy_budget_spent=True,
    )
    done = status_from(job, stopped, {}, status, 1, False)
    assert done["privacy"] == {"epsilon": 1.2345, "delta": 1e-5, "targetEpsilon": 2.0}
    cond = next(c for c in done["conditions"] if c["type"] == "Succeeded")
    assert (cond["status"], cond["reason"], cond["message"]) == ("True", "PrivacyBudgetSpent", message)
    # Once the aggregator is gone (scaled to zero), the status keeps both.
    later = status_from(job, None, {}, done, 1, False)
    assert later["privacy"] == done["privacy"]
    cond = next(c for c in later["conditions"] if c["type"] == "Succeeded")
    assert (cond["reason"], cond["message"]) == ("PrivacyBudgetSpent", message)


def test_a_federated_silo_ends_with_its_workers_own_outcome_when_the_aggregator_has_gone() -> None:
    """The silo operator's last look at the aggregator may be a round old when the job ends; the
    worker's termination message (written as it leaves) is what the status ends with."""
    from fedjob_operator.silo_side import silo_status

    from fedjob.silo_outcome import SiloOutcome

    last_look = {"round": 0, "progress": "0/2", "jobPhase": "Running", "state": "training"}
    outcome = SiloOutcome.from_message(SiloOutcome(2, 2, "Succeeded").to_message())
    assert outcome == SiloOutcome(2, 2, "Succeeded")
    status = silo_status(last_look, "Succeeded", "Running", "", outcome=outcome)
    assert (status["progress"], status["round"], status["jobPhase"], status["state"]) == (
        "2/2",
        2,
        "Succeeded",
        "done",
    )
    # Without an outcome the last look stays; other termination messages are no outcome.
    assert silo_status(last_look, "Succeeded", "Running", "")["progress"] == "0/2"
    for text in ("", "invalid FederatedJob\nspec.rounds: must be > 0", "[1, 2]", '{"kind": "other"}'):
        assert SiloOutcome.from_message(text) is None


def test_the_periodic_sync_walks_what_the_watch_saw_once_settled_and_drops_the_deleted() -> None:
    known = Known()
    body = {"metadata": {"namespace": "ml", "name": "fed"}}
    known.saw("federatedjobs", {"type": "ADDED"}, body)
    known.saw("federatedjobs", {"type": "MODIFIED"}, body)
    assert known.snapshot() == [("federatedjobs", "ml", "fed")]
    # Just created: its creation handler is still at work, the sync leaves it alone a while.
    assert known.snapshot(settled=60) == []
    known.saw("federatedjobs", {"type": "DELETED"}, body)
    assert known.snapshot() == []


class _ObjectsOnly:
    """Stands in for the API server's custom-objects endpoint (the real one is exercised by
    tests/cluster, where a silo that cannot run must leave exactly one pod)."""

    def __init__(self) -> None:
        self.patched: list[dict[str, Any]] = []

    def get_namespaced_custom_object(self, group: str, version: str, ns: str, plural: str, name: str) -> Any:
        return {"metadata": {"namespace": ns, "name": name}, "status": {}}

    def patch_namespaced_custom_object_status(self, *args: Any) -> None:
        self.patched.append(args[-1])


def test_a_poked_object_syncs_at_once_and_one_sync_at_a_time_per_object() -> None:
    """A child Job's change pokes its owner: it syncs now, not at the next tick (60 s here); a
    poke while its sync runs syncs it once more after that one, never beside it."""
    api = _ObjectsOnly()
    started = threading.Event()
    release = threading.Event()
    calls: list[str] = []

    def reconcile(body: dict[str, Any], patch: Any) -> None:
        calls.append(body["metadata"]["name"])
        started.set()
        release.wait(5)
        patch.status["phase"] = "Running"

    loop = SyncLoop(Known(), {"federatedjobs": reconcile}, 60.0, lambda: api)  # type: ignore[arg-type,return-value]
    loop.start()
    try:
        loop.poke(("federatedjobs", "ml", "fed"))
        assert started.wait(2), "a poke must not wait for the next tick"
        loop.poke(("federatedjobs", "ml", "fed"))  # its sync is still running
        time.sleep(0.3)
        assert calls == ["fed"]
        release.set()
        deadline = time.time() + 2
        while len(api.patched) < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert calls == ["fed", "fed"]
        assert api.patched == [{"status": {"phase": "Running"}}] * 2
    finally:
        release.set()
        loop.stop()
        loop.join(5)
