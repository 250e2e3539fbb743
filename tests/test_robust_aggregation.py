"""Robust aggregation: one poisoning silo cannot take over the global model, and says so in its scores.

The rules' math is checked against plain NumPy references on hand-made updates; then
every rule runs in the real aggregator (servicer, coordinator, round aggregator behind
mTLS) against four attacks from one certified silo of five: its update x100, its
update sign-flipped x5, noise of an honest norm, and its sign-flipped update claiming
2^40 samples. FedAvg shows the damage each attack does without a rule.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedjob.chunking import State, iter_chunks, manifest_of
from fedjob.robust import (
    CoordinateSample,
    blocks,
    cap_shares,
    median,
    multi_krum,
    pairwise_sq_distances,
    trimmed_mean,
)
from fedjob.spec import SpecError, parse_job
from fedjob.strategies import make_strategy
from fedjob.v1 import fedjob_pb2 as pb
from tests.conftest import LiveAggregator, job_doc, serve_live
from tests.test_aggregator_protocol import header, messages, wait_for_round_close

# Lossless on the wire, so the aggregate is compared with the honest updates exactly.
LOSSLESS = {"codec": "none", "zstd": False, "chunkBytes": 4096}

SILOS = ["a", "b", "c", "d", "evil"]
HONEST = SILOS[:-1]


# ----- the math against references -------------------------------------------------------------


def test_median_and_trimmed_mean_match_per_coordinate_references() -> None:
    rows = np.random.default_rng(1).normal(size=(7, 50)).astype(np.float32)
    rows[3] *= 1000
    ref_median = [statistics.median(rows[:, j].tolist()) for j in range(50)]
    np.testing.assert_allclose(median(rows), ref_median, rtol=1e-6)
    for fraction in (0.15, 0.3):
        cut = int(fraction * 7)
        ref = [np.mean(sorted(rows[:, j].tolist())[cut : 7 - cut]) for j in range(50)]
        np.testing.assert_allclose(trimmed_mean(rows, fraction), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="leaves nothing"):
        trimmed_mean(rows[:2], 0.49 + 0.01)


def test_multi_krum_keeps_the_updates_closest_to_their_neighbours() -> None:
    rng = np.random.default_rng(2)
    honest = rng.normal(1.0, 0.05, size=(6, 40))
    rows = np.vstack([honest, -5 * honest[:1], rng.normal(0, 3, size=(1, 40))])
    dist = pairwise_sq_distances(rows)
    brute = np.array([[float(((a - b) ** 2).sum()) for b in rows] for a in rows])
    np.testing.assert_allclose(dist, brute, rtol=1e-9, atol=1e-9)
    f, k = 2, len(rows)
    scores = [sorted(brute[i][[j for j in range(k) if j != i]])[: k - f - 2] for i in range(k)]
    expected = sorted(sorted(range(k), key=lambda i: sum(scores[i]))[:4])
    assert multi_krum(dist, byzantine=f, select=4) == expected
    assert set(multi_krum(dist, byzantine=f, select=6)) == set(range(6))


def test_weight_caps_spread_the_excess_and_keep_the_total() -> None:
    capped = cap_shares([1e12, 10, 10, 20], 0.4)
    assert sum(capped) == pytest.approx(1e12 + 40)
    shares = [c / sum(capped) for c in capped]
    assert shares[0] == pytest.approx(0.4)
    assert shares[1:] == pytest.approx([0.15, 0.15, 0.3])  # the rest keep their proportions
    assert cap_shares([3, 1], 0.25) == [2, 2]  # no cap can hold for 2 silos at 25%: equal
    assert cap_shares([5, 1], 1.0) == [5, 1]


def test_the_coordinate_sample_reads_the_same_coordinates_from_slices_and_from_a_state() -> None:
    state = {"a": np.arange(5000, dtype=np.float32), "b": -np.arange(300, dtype=np.float32).reshape(3, 100)}
    sample = CoordinateSample(manifest_of(state), size=1000, seed=3)
    row = np.zeros(sample.size, np.float32)
    for name, offset, start, stop in blocks(manifest_of(state), block=777):
        flat = state[name].reshape(-1)
        sample.take(row, name, offset, flat[offset : offset + stop - start])
    np.testing.assert_array_equal(row, sample.of_state(state))
    assert sample.size == 1000 and len(set(row.tolist())) == 1000
    small = CoordinateSample(manifest_of(state), size=1 << 16)
    assert small.size == 5300  # every coordinate: scores are exact for small models


# ----- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("aggregation", "message"),
    [
        ({"robust": {"rule": "normBound"}}, "aggregation.robust.maxNorm: required by rule normBound"),
        (
            {"algorithm": "scaffold", "robust": {"rule": "median"}},
            "median cannot combine with scaffold",
        ),
        ({"algorithm": "fednova", "maxWeightShare": 0.5}, "fednova normalises"),
        ({"minSilos": 4, "robust": {"rule": "multiKrum", "byzantine": 1}}, "needs 5"),
        ({"minSilos": 2, "robust": {"rule": "median"}}, "needs at least 3"),
        ({"minSilos": 5, "robust": {"rule": "trimmedMean", "trimFraction": 0.1}}, "trims nothing"),
    ],
)
def test_impossible_robust_combinations_are_refused_with_the_reason(
    aggregation: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError) as info:
        parse_job(robust_doc({"minSilos": 5, **aggregation}))
    assert message in str(info.value)


# ----- in the real aggregator, against a poisoning silo -----------------------------------------


def robust_doc(aggregation: dict[str, Any]) -> dict[str, Any]:
    return job_doc(
        silos=[{"name": s, "data": {"path": f"/data/{s}"}} for s in SILOS],
        aggregation={"roundDeadlineSeconds": 600, **aggregation},
        compression=LOSSLESS,
    )


def honest_deltas(state: State) -> dict[str, State]:
    rng = np.random.default_rng(7)
    return {
        s: {k: (0.01 + rng.normal(0, 0.002, v.shape)).astype(np.float32) for k, v in state.items()}
        for s in HONEST
    }


def attack(kind: str, honest: dict[str, State]) -> tuple[State, int]:
    """The malicious silo's update and claimed sample count."""
    own = honest["a"]
    if kind == "scaled":
        return {k: 100 * v for k, v in own.items()}, 10
    if kind == "flipped":
        return {k: -5 * v for k, v in own.items()}, 10
    if kind == "noise":
        norm = np.sqrt(sum(float((v**2).sum()) for v in own.values()))
        rng = np.random.default_rng(9)
        noise = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in own.items()}
        scale = norm / np.sqrt(sum(float((v**2).sum()) for v in noise.values()))
        return {k: (v * scale).astype(np.float32) for k, v in noise.items()}, 10
    if kind == "inflated":
        return {k: -5 * v for k, v in own.items()}, 1 << 40
    raise ValueError(kind)


def one_round(agg: LiveAggregator, updates: dict[str, tuple[State, int]]) -> dict[str, Any]:
    """Every silo uploads its update over its own mTLS channel; returns the round's metrics record."""
    import grpc

    errors: list[grpc.RpcError] = []

    def silo(name: str) -> None:
        stub = agg.stub(f"silo-{name}")
        stub.Join(pb.JoinRequest(expected_silo=name))
        task = stub.GetTask(pb.TaskRequest(after_round=0, wait_seconds=10))
        delta, samples = updates[name]
        codec = agg.coord.codec
        chunks = list(iter_chunks(delta, codec, agg.coord.chunk_bytes, np.random.default_rng(0)))
        hdr = header(agg, task.round, num_samples=samples, total_chunks=len(chunks))
        try:
            stub.UploadUpdate(messages(agg, delta, hdr=hdr, chunks=chunks))
        except grpc.RpcError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=silo, args=(s,)) for s in updates]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, [e.details() for e in errors]
    wait_for_round_close(agg)
    return agg.coord.history[-1]


def left_files(folder: Path, within: float = 5.0) -> list[Path]:
    """Files still in `folder` after the round's files had `within` seconds to go (in the background)."""
    end = time.monotonic() + within
    while (files := [p for p in folder.rglob("*") if p.is_file()]) and time.monotonic() < end:
        time.sleep(0.05)
    return files


def applied(agg: LiveAggregator, start: State) -> State:
    return {k: agg.coord.global_state[k] - start[k] for k in start}


def flat(state: State) -> np.ndarray:
    return np.concatenate([v.reshape(-1) for v in state.values()])


ATTACKS = ["scaled", "flipped", "noise", "inflated"]


@pytest.mark.parametrize("kind", ATTACKS)
def test_plain_fedavg_is_taken_over_by_each_attack(tmp_path: Path, small_state: State, kind: str) -> None:
    honest = honest_deltas(small_state)
    with serve_live(tmp_path, parse_job(robust_doc({"minSilos": 5})), small_state) as agg:
        one_round(agg, {**{s: (d, 10) for s, d in honest.items()}, "evil": attack(kind, honest)})
        moved = flat(applied(agg, small_state))
    clean = flat({k: np.mean([honest[s][k] for s in HONEST], axis=0) for k in small_state})
    # The damage this suite's robust rules must prevent: noise of an honest norm moves the mean by
    # a fifth of that norm (one of five); the others throw it further than the mean itself.
    damage = np.linalg.norm(moved - clean) / np.linalg.norm(clean)
    assert damage > (0.25 if kind == "noise" else 1.0)


RULES: dict[str, dict[str, Any]] = {
    "median": {"rule": "median"},
    "trimmedMean": {"rule": "trimmedMean", "trimFraction": 0.2},
    "multiKrum": {"rule": "multiKrum", "byzantine": 1},
}


@pytest.mark.parametrize("kind", ATTACKS)
@pytest.mark.parametrize("rule", sorted(RULES))
def test_collecting_rules_keep_the_model_within_the_honest_updates(
    tmp_path: Path, small_state: State, rule: str, kind: str
) -> None:
    honest = honest_deltas(small_state)
    job = parse_job(robust_doc({"minSilos": 5, "robust": RULES[rule]}))
    with serve_live(tmp_path, job, small_state) as agg:
        record = one_round(agg, {**{s: (d, 10) for s, d in honest.items()}, "evil": attack(kind, honest)})
        moved = applied(agg, small_state)
        spooled = left_files(tmp_path / "work" / "spool")
    stack = {k: np.stack([honest[s][k] for s in HONEST]) for k in small_state}
    for k, v in moved.items():
        # Every coordinate lies within the honest silos' range (1e-6: float32 rounding).
        assert (v >= stack[k].min(axis=0) - 1e-6).all() and (v <= stack[k].max(axis=0) + 1e-6).all(), k
    scores = record["silo_updates"]
    assert set(scores) == set(SILOS)
    if rule == "multiKrum":
        assert scores["evil"]["selected"] is False and scores["evil"]["weight_share"] == 0
        assert all(scores[s]["selected"] and scores[s]["weight_share"] == 0.25 for s in HONEST)
    if kind in ("flipped", "inflated"):
        assert scores["evil"]["cosine"] < 0 < min(scores[s]["cosine"] for s in HONEST)
    if kind == "scaled":
        assert scores["evil"]["norm_zscore"] == max(sc["norm_zscore"] for sc in scores.values()) > 1.5
    assert not spooled, f"the round's update files outlive it: {spooled}"


@pytest.mark.parametrize("kind", ATTACKS)
def test_a_norm_bound_limits_what_one_update_can_move(tmp_path: Path, small_state: State, kind: str) -> None:
    honest = honest_deltas(small_state)
    honest_norm = max(np.linalg.norm(flat(d)) for d in honest.values())
    bound = 1.2 * honest_norm
    job = parse_job(
        robust_doc({"minSilos": 5, "maxWeightShare": 0.3, "robust": {"rule": "normBound", "maxNorm": bound}})
    )
    with serve_live(tmp_path, job, small_state) as agg:
        record = one_round(agg, {**{s: (d, 10) for s, d in honest.items()}, "evil": attack(kind, honest)})
        moved = flat(applied(agg, small_state))
    clean = flat({k: np.mean([honest[s][k] for s in HONEST], axis=0) for k in small_state})
    # The attacker carries at most maxWeightShare of the mean, and at most `bound` of norm.
    assert np.linalg.norm(moved - clean) <= 0.3 * (bound + honest_norm) + 1e-4
    evil = record["silo_updates"]["evil"]
    assert evil["weight_share"] <= 0.3 + 1e-6
    if kind == "scaled":
        assert evil["scale"] == pytest.approx(bound / evil["norm"], rel=1e-4)
    if kind == "inflated":
        assert evil["claimed_samples"] == 1 << 40


def test_a_silos_claims_are_capped_and_the_weight_used_is_recorded(
    tmp_path: Path, small_state: State
) -> None:
    doc = robust_doc({"minSilos": 5})
    for s in doc["spec"]["silos"]:
        s["maxSamples"] = 100
    honest = honest_deltas(small_state)
    with serve_live(tmp_path, parse_job(doc), small_state) as agg:
        updates = {**{s: (d, 100) for s, d in honest.items()}, "evil": attack("inflated", honest)}
        record = one_round(agg, updates)
    # The metrics line follows the round's checkpoint, written before the aggregator stops.
    lines = [json.loads(x) for x in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    evil = record["silo_updates"]["evil"]
    assert evil["claimed_samples"] == 1 << 40 and evil["weight_share"] == pytest.approx(0.2)
    assert lines[-1]["silo_updates"]["evil"]["weight_share"] == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"local_steps": 2**32 - 1}, "implausible_header: local_steps 4294967295; alpha runs 5 per round"),
        ({"num_samples": 2**64 - 1}, "implausible_header: num_samples 18446744073709551615"),
        ({"train_loss": -1.0}, "implausible_header: train_loss -1.0 < 0"),
    ],
)
def test_implausible_headers_are_refused_and_the_round_goes_on(
    live_aggregator: LiveAggregator, small_state: State, fields: dict[str, Any], reason: str
) -> None:
    import grpc

    agg = live_aggregator
    stub = agg.stub("silo-alpha")
    stub.Join(pb.JoinRequest(expected_silo="alpha"))
    delta = {k: np.full(v.shape, 0.5, np.float32) for k, v in small_state.items()}
    with pytest.raises(grpc.RpcError) as info:
        stub.UploadUpdate(messages(agg, delta, hdr=header(agg, **fields)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(reason)
    assert stub.UploadUpdate(messages(agg, delta)).accepted  # the same silo, honest now
    assert agg.metrics.rejections_by_reason.labels("demo", "implausible_header")._value.get() == 1


def test_robust_rules_wrap_the_algorithm() -> None:
    def built(aggregation: dict[str, Any]) -> str:
        return make_strategy(parse_job(robust_doc(aggregation)).spec).name

    assert built({"minSilos": 5, "robust": {"rule": "median"}}) == "median(fedavg)"
    krum = {"algorithm": "fedadam", "minSilos": 5, "robust": {"rule": "multiKrum"}}
    assert built(krum) == "multikrum(fedadam)"
    assert (
        built({"minSilos": 5, "robust": {"rule": "trimmedMean", "trimFraction": 0.2, "maxNorm": 1.0}})
        == "normbound(trimmedmean(fedavg))"
    )
    bound = {"algorithm": "scaffold", "robust": {"rule": "normBound", "maxNorm": 2}}
    assert built(bound) == "normbound(scaffold)"
