"""Server strategies against NumPy references, and on a problem whose answer is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedjob.aggregation import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedNova,
    FedYogi,
    RunningSum,
    ServerOptimizer,
    Strategy,
    UpdateMeta,
    make_strategy,
)
from fedjob.checkpoint import Checkpoint, CheckpointStore
from fedjob.chunking import manifest_of
from fedjob.spec import parse_job
from tests.conftest import job_doc


def aggregate(
    strategy: Strategy, g: dict[str, np.ndarray], deltas: list[np.ndarray], metas: list[UpdateMeta]
) -> dict[str, np.ndarray]:
    total = RunningSum(manifest_of(g))
    for d, m in zip(deltas, metas, strict=True):
        w = strategy.weight(m)
        total.fold("w", 0, d.astype(np.float32), w)
        total.commit(m, w)
    return strategy.apply(g, total, 1)


def test_fednova_matches_its_formula() -> None:
    rng = np.random.default_rng(0)
    g = {"w": rng.normal(size=50).astype(np.float32)}
    deltas = [rng.normal(size=50) for _ in range(3)]
    n, tau = [100, 300, 50], [5, 20, 1]
    metas = [UpdateMeta(f"s{i}", n[i], tau[i], 1.0) for i in range(3)]
    p = np.array(n) / sum(n)
    tau_eff = float(np.dot(p, tau))
    want = g["w"] + tau_eff * sum(p[i] * deltas[i] / tau[i] for i in range(3))
    np.testing.assert_allclose(aggregate(FedNova(), g, deltas, metas)["w"], want, rtol=1e-5, atol=1e-6)


def reference_fedopt(
    kind: str, rounds: list[np.ndarray], lr: float, b1: float, b2: float, tau: float
) -> np.ndarray:
    """Reddi et al. 2021, Algorithm 2, written out in NumPy."""
    x = np.zeros_like(rounds[0])
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    for d in rounds:
        m = b1 * m + (1 - b1) * d
        if kind == "fedadam":
            v = b2 * v + (1 - b2) * d**2
        elif kind == "fedyogi":
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        else:
            v = v + d**2
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_server_optimisers_match_the_reference_over_several_rounds(
    cls: type[ServerOptimizer], tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    rounds = [rng.normal(size=20) for _ in range(5)]
    strategy = cls(0.05, 0.9, 0.99, 1e-3)
    g = {"w": np.zeros(20, np.float32)}
    for i, d in enumerate(rounds):
        # Two silos with equal weight whose mean delta is d.
        g = aggregate(
            strategy, g, [d - 1.0, d + 1.0], [UpdateMeta("a", 10, 5, 1.0), UpdateMeta("b", 10, 5, 1.0)]
        )
        if i == 2:  # the moments survive a checkpoint and an aggregator restart
            store = CheckpointStore(tmp_path)
            store.save(Checkpoint(3, g, [], strategy_state=strategy.state()))
            strategy = cls(0.05, 0.9, 0.99, 1e-3)
            loaded = store.load()
            assert loaded is not None
            strategy.load_state(loaded.strategy_state)
    want = reference_fedopt(cls.name, rounds, 0.05, 0.9, 0.99, 1e-3)
    np.testing.assert_allclose(g["w"], want, rtol=1e-4, atol=1e-5)


def test_the_spec_chooses_the_strategy_and_its_parameters() -> None:
    job = parse_job(job_doc(aggregation={"algorithm": "fedyogi", "serverLearningRate": 0.2, "tau": 0.01}))
    s = make_strategy(job.spec.aggregation)
    assert isinstance(s, FedYogi) and s.lr == 0.2 and s.tau == 0.01
    assert isinstance(make_strategy(parse_job(job_doc()).spec.aggregation), FedAvg)


def test_fedprox_refuses_zero3_with_a_clear_message() -> None:
    from fedjob.spec import SpecError

    doc = job_doc(aggregation={"algorithm": "fedprox"})
    doc["spec"]["training"]["deepspeed"] = {"zeroStage": 3}
    with pytest.raises(SpecError) as info:
        parse_job(doc)
    assert any(
        p.startswith("spec.aggregation.algorithm: fedprox needs training.deepspeed.zeroStage 0-2")
        for p in info.value.problems
    )


def simulate(strategy: Strategy, rounds: int = 1500) -> float:
    """Silos minimising 0.5 * a_i (w - c_i)^2 with tau_i local gradient steps of size eta.

    The federated objective sum_i n_i f_i has its optimum at sum n_i a_i c_i / sum n_i a_i.
    With unequal local steps FedAvg converges elsewhere (objective inconsistency,
    Wang et al. 2020); FedNova's normalisation removes it.
    """
    a, c, n, tau, eta = [1.0, 2.0, 0.5], [0.0, 3.0, -2.0], [100, 100, 100], [1, 10, 3], 0.002
    w = {"w": np.zeros(1, np.float32)}
    for _ in range(rounds):
        deltas, metas = [], []
        for i in range(3):
            x = float(w["w"][0])
            for _ in range(tau[i]):
                x -= eta * a[i] * (x - c[i])
            deltas.append(np.array([x - float(w["w"][0])]))
            metas.append(UpdateMeta(f"s{i}", n[i], tau[i], 0.0))
        w = aggregate(strategy, w, deltas, metas)
    return float(w["w"][0])


def test_fednova_removes_the_objective_inconsistency_that_fedavg_shows() -> None:
    optimum = (1.0 * 0.0 + 2.0 * 3.0 + 0.5 * -2.0) / (1.0 + 2.0 + 0.5)
    fedavg, fednova = simulate(FedAvg()), simulate(FedNova())
    assert abs(fednova - optimum) < 0.02
    assert abs(fedavg - optimum) > 5 * abs(fednova - optimum)
