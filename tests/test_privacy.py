"""Client-level differential privacy: what `spec.privacy.dp` promises, checked against its definition.

- every silo's contribution is bounded by the clip norm, however large its update;
- the noise has the specified std (a statistical test with fixed seeds), central or shared out;
- epsilon comes from dp-accounting: the ledger, metrics.jsonl, status and /metrics all
  equal what dp-accounting gives for the same events;
- the job stops before a round would exceed targetEpsilon, and says why;
- a restarted aggregator resumes the ledger (no epsilon reset);
- silo sampling (aggregation.silosPerRound): only the sampled silos train, the round
  closes on them, the others are refused;
- every impossible combination is refused naming the field and the reason.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import grpc
import numpy as np
import pytest
from dp_accounting import rdp
from prometheus_client import generate_latest

from fedjob.aggregation import FedAvg, UpdateMeta
from fedjob.chunking import State, iter_chunks
from fedjob.privacy import DifferentialPrivacy, DistributedNoise, update_noise_multiplier
from fedjob.privacy_budget import Ledger, Mechanism, plan_for
from fedjob.robust import ComputedAggregate
from fedjob.spec import FederatedJob, SpecError, parse_job
from fedjob.strategies import make_strategy
from fedjob.update_stages import Update
from fedjob.uplink import job_uplink
from fedjob.v1 import fedjob_pb2 as pb
from tests.conftest import LiveAggregator, job_doc, serve_live
from tests.test_aggregator_protocol import header, messages, wait_for_round_close

DELTA = 1e-5


def dp_job(dp: dict[str, Any], silos: int = 2, rounds: int = 3, **spec: Any) -> FederatedJob:
    aggregation = {"minSilos": 1, "roundDeadlineSeconds": 600, **spec.pop("aggregation", {})}
    return parse_job(
        job_doc(
            silos=[{"name": f"s{i}", "data": {"path": "/d"}} for i in range(silos)],
            rounds=rounds,
            aggregation=aggregation,
            compression={"codec": "none", "zstd": False, "chunkBytes": 4096},
            privacy={"dp": {"delta": DELTA, **dp}},
            **spec,
        )
    )


def norm(state: State) -> float:
    return math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in state.values()))


def upload(agg: LiveAggregator, silo: str, delta: State, round_number: int = 1) -> pb.UploadReceipt:
    stub = agg.stub(f"silo-{silo}")
    stub.Join(pb.JoinRequest(expected_silo=silo))
    chunks = list(iter_chunks(delta, agg.coord.codec, 4096, np.random.default_rng(0)))
    hdr = header(agg, round_number=round_number, total_chunks=len(chunks))
    receipt: pb.UploadReceipt = stub.UploadUpdate(messages(agg, delta, hdr=hdr, chunks=chunks))
    return receipt


def both_report(agg: LiveAggregator, delta: State, round_number: int) -> None:
    """Silos s0 and s1 upload `delta` for the round, which then closes."""
    for silo in ("s0", "s1"):
        upload(agg, silo, delta, round_number)
    wait_for_round_close(agg, round_number)


def accountant_epsilon(
    z: float, rounds: int, silos: int | None = None, per_round: int | None = None
) -> float:
    """dp-accounting itself, on the events a job releases (no fedjob code in between)."""
    if per_round is not None and silos is not None and per_round < silos:
        acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
        event = dpa.SampledWithoutReplacementDpEvent(silos, per_round, dpa.GaussianDpEvent(z / 2))
    else:
        acc = rdp.RdpAccountant()
        event = dpa.GaussianDpEvent(z)
    return float(acc.compose(event, rounds).get_epsilon(DELTA))


# ----- clipping and noise -------------------------------------------------------------------------


def test_an_update_of_norm_1e6_counts_with_norm_clip_norm(tmp_path: Path, small_state: State) -> None:
    job = dp_job({"clipNorm": 1.0, "noiseMultiplier": 1e-6})  # noise negligible: the clip is what shows
    huge = {k: np.full(v.shape, 1.0, np.float32) for k, v in small_state.items()}
    huge = {k: v * np.float32(1e6 / norm(huge)) for k, v in huge.items()}
    small = {
        k: np.full(v.shape, 0.3 / math.sqrt(sum(x.size for x in small_state.values())), np.float32)
        for k, v in small_state.items()
    }
    with serve_live(tmp_path, job, small_state) as agg:
        assert upload(agg, "s0", huge).accepted
        assert upload(agg, "s1", small).accepted
        wait_for_round_close(agg)
        moved = {k: agg.coord.global_state[k] - small_state[k] for k in small_state}
        record = agg.coord.history[-1]
    # Equal weights, divided by the 2 silos of the round: (clip(huge) + small) / 2.
    expected = {k: (huge[k] * np.float32(1e-6) + small[k]) / 2 for k in small_state}
    for k in small_state:
        np.testing.assert_allclose(moved[k], expected[k], atol=1e-5)
    assert record["silo_updates"]["s0"]["norm"] == pytest.approx(1e6, rel=1e-5)
    assert record["silo_updates"]["s0"]["scale"] == pytest.approx(1e-6, rel=1e-3)
    assert record["silo_updates"]["s1"]["scale"] == 1.0


def test_silos_count_equally_whatever_sample_count_they_claim() -> None:
    job = dp_job({"clipNorm": 1.0, "noiseMultiplier": 1.0})
    s = make_strategy(job.spec)
    assert s.weight(UpdateMeta("s0", 10**6, 1, 1.0)) == s.weight(UpdateMeta("s1", 1, 1, 1.0)) == 1.0


def apply_to_zero_updates(strategy: DifferentialPrivacy, reports: int, size: int) -> np.ndarray:
    mean = {"w": np.zeros(size, np.float32)}
    metas = [UpdateMeta(f"s{i}", 1, 1, 1.0) for i in range(reports)]
    out = strategy.apply({"w": np.zeros(size, np.float32)}, ComputedAggregate(mean, metas, reports), 1)
    return out["w"]


def test_central_noise_has_std_noise_multiplier_times_clip_norm_on_the_sum() -> None:
    job = dp_job({"clipNorm": 0.5, "noiseMultiplier": 1.3}, silos=4)
    strategy = DifferentialPrivacy(FedAvg(), job.spec, np.random.default_rng(7))
    n = 1_000_000
    w = apply_to_zero_updates(strategy, 4, n)
    # The mean of 4 silos carries noise of std z C / 4; the sample std of 1e6 draws is within
    # 0.5% of it with probability 1 - 1e-6 (its relative sd is 1 / sqrt(2n) = 0.07%).
    expected = 1.3 * 0.5 / 4
    assert float(w.std()) == pytest.approx(expected, rel=5e-3)
    assert abs(float(w.mean())) < 5 * expected / math.sqrt(n)


def test_distributed_noise_shares_add_up_to_the_specified_std() -> None:
    job = dp_job({"clipNorm": 2.0, "noiseMultiplier": 1.1, "noise": "distributed"}, silos=4)
    stage = job_uplink(job.spec).stages[0]
    assert isinstance(stage, DistributedNoise)
    n, shares = 250_000, []
    for i in range(4):
        stage.rng = np.random.default_rng(i)
        u = Update(1, {"w": np.zeros(n, np.float32)})
        stage.apply(u)
        shares.append(u.deltas["w"])
    total = np.sum(shares, axis=0)
    assert float(total.std()) == pytest.approx(1.1 * 2.0, rel=1e-2)  # z C on the sum of all 4
    assert float(shares[0].std()) == pytest.approx(1.1 * 2.0 / 2, rel=1e-2)  # z C / sqrt(4) each
    # The aggregator adds nothing of its own: its mean is the sum / 4.
    strategy = make_strategy(job.spec)
    assert isinstance(strategy, DifferentialPrivacy)
    assert not apply_to_zero_updates(strategy, 4, 1000).any()


def test_the_distributed_stage_clips_before_its_noise() -> None:
    job = dp_job({"clipNorm": 1.0, "noiseMultiplier": 1e-3, "noise": "distributed"})
    stage = job_uplink(job.spec).stages[0]
    u = Update(1, {"w": np.full(10_000, 5.0, np.float32)})
    stage.apply(u)
    assert norm(u.deltas) == pytest.approx(1.0, rel=0.02)


def test_an_update_without_its_noise_share_is_refused_and_the_round_goes_on(
    tmp_path: Path, small_state: State
) -> None:
    job = dp_job({"clipNorm": 1.0, "noiseMultiplier": 1.0, "noise": "distributed"})
    with serve_live(tmp_path, job, small_state) as agg:
        bare = {k: np.full(v.shape, 1e-3, np.float32) for k, v in small_state.items()}
        with pytest.raises(grpc.RpcError) as info:
            upload(agg, "s0", bare)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("noise_missing:")
        honest = Update(1, {k: v.copy() for k, v in bare.items()})
        job_uplink(job.spec).apply(honest)
        assert upload(agg, "s0", honest.deltas).accepted
        assert upload(agg, "s1", honest.deltas).accepted
        wait_for_round_close(agg)
        assert agg.metrics.rejections_by_reason.labels("demo", "noise_missing")._value.get() == 1


def test_adaptive_clipping_moves_the_clip_norm_towards_the_target_quantile() -> None:
    job = dp_job(
        {
            "clipNorm": 1.0,
            "noiseMultiplier": 1.0,
            "adaptiveClipping": {"targetQuantile": 0.5, "learningRate": 0.2, "countStddev": 1.0},
        },
        silos=10,
    )
    strategy = DifferentialPrivacy(FedAvg(), job.spec, np.random.default_rng(0))
    # Update noise grows so that both releases together are accounted with z = 1.
    assert strategy.update_multiplier == pytest.approx(update_noise_multiplier(1.0, 1.0))
    assert 1 / strategy.update_multiplier**2 + 1 / (2 * 1.0) ** 2 == pytest.approx(1.0)
    norms = np.linspace(0.1, 10.0, 10)  # median 5.05
    for _ in range(60):
        for x in norms:
            strategy.update_scale(float(x))
        apply_to_zero_updates(strategy, 10, 10)
    assert 3.0 < strategy.clip_norm < 8.0  # from 1.0, near the median despite the count's noise


# ----- the accountant -----------------------------------------------------------------------------


@pytest.mark.parametrize(("silos", "per_round"), [(4, 4), (10, 3)])
def test_the_ledger_equals_dp_accounting_for_the_same_events(silos: int, per_round: int) -> None:
    ledger = Ledger(Mechanism(silos, per_round, "rdp"), DELTA)
    for r in range(1, 6):
        eps = ledger.record(1.7)
        assert eps == pytest.approx(accountant_epsilon(1.7, r, silos, per_round), rel=1e-6)


def test_a_target_epsilon_is_met_by_the_calibrated_noise() -> None:
    job = dp_job({"clipNorm": 1.0, "targetEpsilon": 4.0}, silos=4, rounds=10)
    plan = plan_for(job.spec)
    assert plan.calibrated and plan.within_budget == 10
    assert accountant_epsilon(plan.noise_multiplier, 10) <= 4.0
    assert accountant_epsilon(plan.noise_multiplier * 0.999, 10) > 4.0  # and no more noise than it needs


def test_epsilon_in_records_status_and_metrics_agrees_and_survives_an_aggregator_restart(
    tmp_path: Path, small_state: State
) -> None:
    job = dp_job({"clipNorm": 1.0, "noiseMultiplier": 2.0}, rounds=4)
    step = {k: np.full(v.shape, 1e-3, np.float32) for k, v in small_state.items()}
    with serve_live(tmp_path, job, small_state) as agg:
        for r in (1, 2):
            both_report(agg, step, r)
        eps = agg.coord.history[-1]["dp_epsilon"]
        assert eps == pytest.approx(accountant_epsilon(2.0, 2), rel=1e-6)
        assert agg.coord.history[0]["dp_epsilon"] == pytest.approx(accountant_epsilon(2.0, 1), rel=1e-6)
        st = agg.coord.status()
        assert (st.dp, st.dp_delta) == (True, DELTA) and st.dp_epsilon == pytest.approx(eps, rel=1e-9)
        scraped = generate_latest(agg.metrics.registry).decode()
        line = next(x for x in scraped.splitlines() if x.startswith("fedjob_dp_epsilon{"))
        assert float(line.split()[-1]) == pytest.approx(eps, rel=1e-9)
    # A new aggregator on the same checkpoint: the ledger is back, and goes on from it.
    with serve_live(tmp_path, job, small_state) as agg:
        assert agg.coord.completed == 2
        assert agg.coord.status().dp_epsilon == pytest.approx(eps, rel=1e-9)
        both_report(agg, step, 3)
        assert agg.coord.history[-1]["dp_epsilon"] == pytest.approx(accountant_epsilon(2.0, 3), rel=1e-6)


def test_the_job_stops_before_a_round_would_exceed_target_epsilon(tmp_path: Path, small_state: State) -> None:
    z, target = 2.0, 0.5 * (accountant_epsilon(2.0, 2) + accountant_epsilon(2.0, 3))  # room for 2 rounds
    job = dp_job({"clipNorm": 1.0, "noiseMultiplier": z, "targetEpsilon": target}, rounds=5)
    assert plan_for(job.spec).within_budget == 2
    step = {k: np.full(v.shape, 1e-3, np.float32) for k, v in small_state.items()}
    with serve_live(tmp_path, job, small_state) as agg:
        for r in (1, 2):
            both_report(agg, step, r)
        st = agg.coord.status()
        assert st.phase == "Succeeded" and st.round == 2 and st.privacy_budget_spent
        assert st.message.startswith("privacy budget spent: stopped after round 2 of 5 at epsilon")
        assert st.dp_epsilon <= target < accountant_epsilon(z, 3)
        task = agg.stub("silo-s0").GetTask(pb.TaskRequest(after_round=2, wait_seconds=1))
        assert task.state == pb.Task.DONE
    with serve_live(tmp_path, job, small_state) as agg:  # and stays stopped after a restart
        assert agg.coord.phase == "Succeeded" and agg.coord.status().privacy_budget_spent


# ----- silo sampling ------------------------------------------------------------------------------


def test_only_the_sampled_silos_train_and_the_round_closes_on_them(
    tmp_path: Path, small_state: State
) -> None:
    job = parse_job(
        job_doc(
            silos=[{"name": n, "data": {"path": "/d"}} for n in ("a", "b", "c", "d")],
            aggregation={"minSilos": 2, "silosPerRound": 2, "roundDeadlineSeconds": 600},
            compression={"codec": "none", "zstd": False, "chunkBytes": 4096},
        )
    )
    with serve_live(tmp_path, job, small_state) as agg:
        for s in ("a", "b", "c", "d"):
            agg.stub(f"silo-{s}").Join(pb.JoinRequest(expected_silo=s))
        sampled = sorted(agg.coord.current.sampled)  # type: ignore[union-attr]
        rest = sorted({"a", "b", "c", "d"} - set(sampled))
        assert len(sampled) == 2
        for s in rest:
            task = agg.stub(f"silo-{s}").GetTask(pb.TaskRequest(after_round=0, wait_seconds=0.2))
            assert task.state == pb.Task.WAIT
        with pytest.raises(grpc.RpcError) as info:
            upload(agg, rest[0], {k: np.zeros_like(v) for k, v in small_state.items()})
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.details().startswith("not_sampled:")
        for s in sampled:
            assert agg.stub(f"silo-{s}").GetTask(pb.TaskRequest(after_round=0)).state == pb.Task.TRAIN
            upload(agg, s, {k: np.zeros_like(v) for k, v in small_state.items()})
        wait_for_round_close(agg)  # two of four reported: the round is complete
        record = agg.coord.history[-1]
    assert record["sampled"] == sampled and record["participants"] == sampled and record["missing"] == []
    # Without differential privacy the sample is reproducible from the job's seed.
    assert sorted(agg.coord._sample(1)) == sampled


# ----- validation ---------------------------------------------------------------------------------


def problems(dp: dict[str, Any], silos: int = 4, **spec: Any) -> str:
    with pytest.raises(SpecError) as info:
        dp_job(dp, silos=silos, **spec)
    return "\n".join(info.value.problems)


@pytest.mark.parametrize(
    ("dp", "spec", "expected"),
    [
        (
            {"clipNorm": 0, "noiseMultiplier": 1},
            {},
            "spec.privacy.dp.clipNorm: input should be greater than 0",
        ),
        ({"clipNorm": 1}, {}, "spec.privacy.dp: set noiseMultiplier, targetEpsilon or both"),
        (
            {"clipNorm": 1, "noiseMultiplier": 1, "delta": 0.3},
            {},
            "spec.privacy.dp.delta: must be below 1 / number of silos (0.25)",
        ),
        (
            {"clipNorm": 1, "noiseMultiplier": 1},
            {"aggregation": {"robust": {"rule": "median"}, "minSilos": 3}},
            "spec.aggregation.robust: median cannot combine with privacy.dp (it needs the raw updates",
        ),
        (
            {"clipNorm": 1, "noiseMultiplier": 1},
            {"aggregation": {"robust": {"rule": "normBound", "maxNorm": 1}}},
            "spec.aggregation.robust: normBound cannot combine with privacy.dp (privacy.dp.clipNorm already",
        ),
        (
            {"clipNorm": 1, "noiseMultiplier": 1},
            {"aggregation": {"algorithm": "scaffold"}},
            "spec.aggregation.algorithm: scaffold cannot combine with privacy.dp",
        ),
        (
            {"clipNorm": 1, "noiseMultiplier": 1},
            {"aggregation": {"maxWeightShare": 0.5}},
            "spec.aggregation.maxWeightShare: privacy.dp weighs every silo equally",
        ),
        (
            {"clipNorm": 1, "noiseMultiplier": 1, "noise": "distributed", "adaptiveClipping": {}},
            {},
            "spec.privacy.dp.adaptiveClipping: needs noise central",
        ),
        (
            {"clipNorm": 1, "noiseMultiplier": 1, "accountant": "pld"},
            {"aggregation": {"silosPerRound": 2}},
            "spec.privacy.dp.accountant: pld does not account sampling",
        ),
        (
            {"clipNorm": 1, "noiseMultiplier": 1, "adaptiveClipping": {}},
            {},
            "spec.privacy.dp.adaptiveClipping.countStddev: the count's noise (0.2) spends more than",
        ),
        (
            {"clipNorm": 1, "noiseMultiplier": 0.5, "targetEpsilon": 1},
            {},
            "spec.privacy.dp.targetEpsilon: a single round at noiseMultiplier 0.5 spends more than epsilon 1",
        ),
        (
            {"clipNorm": 1, "noiseMultiplier": 1},
            {"aggregation": {"silosPerRound": 5}},
            "spec.aggregation.silosPerRound: must be at most the number of silos (4)",
        ),
        (
            {"clipNorm": 1, "noiseMultiplier": 1},
            {"aggregation": {"silosPerRound": 2, "minSilos": 3}},
            "spec.aggregation.minSilos: must be at most silosPerRound (2)",
        ),
    ],
)
def test_impossible_privacy_plans_are_refused_with_the_field_and_the_reason(
    dp: dict[str, Any], spec: dict[str, Any], expected: str
) -> None:
    dp = {"delta": DELTA, **dp}
    assert expected in problems(dp, **spec)


def test_a_clip_stage_in_the_uplink_is_refused_with_dp() -> None:
    doc = job_doc(
        privacy={"dp": {"clipNorm": 1, "noiseMultiplier": 1, "delta": DELTA}},
        compression={"uplink": [{"clip": {"maxNorm": 1}}]},
    )
    with pytest.raises(SpecError) as info:
        parse_job(doc)
    assert "spec.compression.uplink: a clip stage cannot combine with privacy.dp" in str(info.value)


def test_counts_of_rounds_are_what_the_ledger_restores() -> None:
    job = dp_job({"clipNorm": 1.0, "noiseMultiplier": 1.5, "noise": "distributed"}, silos=4)
    strategy = DifferentialPrivacy(FedAvg(), job.spec, np.random.default_rng(0))
    for k in (4, 3, 4):  # one round with a silo missing: less noise, accounted as such
        apply_to_zero_updates(strategy, k, 10)
    again = DifferentialPrivacy(FedAvg(), job.spec)
    again.load_state(strategy.state())
    assert again.epsilon == strategy.epsilon
    expected = Mechanism(4, 4, "rdp").epsilon(Counter({1.5: 2, 1.5 * math.sqrt(3 / 4): 1}), DELTA)
    assert strategy.epsilon == pytest.approx(expected, rel=1e-12)
