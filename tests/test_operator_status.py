"""The FederatedJob status the operator writes from the aggregator's GetStatus (no cluster needed)."""

from __future__ import annotations

from fedjob_operator.reconcile import status_from

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
