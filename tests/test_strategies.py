"""Server strategies against NumPy references, and on a problem whose answer is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedjob.aggregation import (
    DiLoCo,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedNova,
    FedYogi,
    RunningSum,
    Scaffold,
    ServerOptimizer,
    Strategy,
    UpdateMeta,
)
from fedjob.checkpoint import Checkpoint, CheckpointStore
from fedjob.chunking import manifest_of
from fedjob.spec import parse_job
from fedjob.strategies import make_strategy
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


def test_diloco_is_nesterov_sgd_on_the_mean_delta_and_its_momentum_survives_a_restart(
    tmp_path: Path,
) -> None:
    import torch

    rng = np.random.default_rng(2)
    rounds = [rng.normal(size=20) for _ in range(6)]
    strategy = DiLoCo(0.7, 0.9)
    g = {"w": np.zeros(20, np.float32)}
    for i, d in enumerate(rounds):
        g = aggregate(
            strategy, g, [d - 1.0, d + 1.0], [UpdateMeta("a", 10, 5, 1.0), UpdateMeta("b", 10, 5, 1.0)]
        )
        if i == 2:
            store = CheckpointStore(tmp_path)
            store.save(Checkpoint(3, g, [], strategy_state=strategy.state()))
            strategy = DiLoCo(0.7, 0.9)
            loaded = store.load()
            assert loaded is not None
            strategy.load_state(loaded.strategy_state)
    # The reference: PyTorch's own SGD(nesterov=True), fed the outer gradient -D each round.
    w = torch.zeros(20, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.7, momentum=0.9, nesterov=True)
    for d in rounds:
        w.grad = -torch.from_numpy(d)
        opt.step()
    np.testing.assert_allclose(g["w"], w.detach().numpy(), rtol=1e-5, atol=1e-5)
    # lr 1 without momentum is FedAvg.
    plain = aggregate(
        DiLoCo(1.0, 0.0), {"w": np.ones(20, np.float32)}, [rounds[0]], [UpdateMeta("a", 1, 1, 1.0)]
    )
    np.testing.assert_allclose(plain["w"], 1.0 + rounds[0].astype(np.float32), rtol=1e-6)


def test_the_spec_chooses_the_strategy_and_its_parameters() -> None:
    job = parse_job(job_doc(aggregation={"algorithm": "fedyogi", "serverLearningRate": 0.2, "tau": 0.01}))
    s = make_strategy(job.spec)
    assert isinstance(s, FedYogi) and s.lr == 0.2 and s.tau == 0.01
    assert isinstance(make_strategy(parse_job(job_doc()).spec), FedAvg)
    scaffold = make_strategy(parse_job(job_doc(aggregation={"algorithm": "scaffold"})).spec)
    assert isinstance(scaffold, Scaffold) and scaffold.num_silos == 2  # job_doc's silos
    diloco = make_strategy(
        parse_job(job_doc(aggregation={"algorithm": "diloco", "outerLearningRate": 0.5})).spec
    )
    assert isinstance(diloco, DiLoCo) and (diloco.lr, diloco.momentum) == (0.5, 0.9)


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


# ----- SCAFFOLD --------------------------------------------------------------------------------------
# Silos minimise f_i(w) = 0.5 (w - b_i)' A_i (w - b_i) with K local SGD steps of size eta.
# Heterogeneous curvature A_i makes FedAvg's fixed point drift away from the optimum of
# sum_i f_i; SCAFFOLD's control variates remove the drift (Karimireddy et al. 2020).
A = [np.diag([1.0, 0.1]), np.diag([0.1, 2.0]), np.array([[1.5, 0.5], [0.5, 0.5]])]
B = [np.array([1.0, -2.0]), np.array([-3.0, 1.0]), np.array([2.0, 2.0])]
K, ETA = 20, 0.1
OPTIMUM = np.linalg.solve(sum(A), sum(a @ b for a, b in zip(A, B, strict=True)))


def grad(i: int, w: np.ndarray) -> np.ndarray:
    return np.asarray(A[i] @ (w - B[i]))


def reference_scaffold(rounds: int, schedule: list[list[int]], paper_c: bool) -> list[np.ndarray]:
    """Algorithm 1 of the paper, option II, global step size 1, written out in NumPy.

    paper_c: c += |S|/N mean(dc_i), silos not heard from yet counting as c_i = 0. Else
    c = the mean of the c_i of the silos heard from (fedjob's choice; the same once
    every silo has reported). Returns x after every round.
    """
    x, c = np.zeros(2), np.zeros(2)
    ci = [np.zeros(2) for _ in A]
    heard: set[int] = set()
    xs = []
    for r in range(rounds):
        chosen = schedule[r % len(schedule)]
        dy, dc = [], []
        for i in chosen:
            y = x.copy()
            for _ in range(K):
                y -= ETA * (grad(i, y) - ci[i] + c)
            new_ci = ci[i] - c + (x - y) / (K * ETA)
            dy.append(y - x)
            dc.append(new_ci - ci[i])
            ci[i] = new_ci
        heard.update(chosen)
        x = x + np.mean(dy, axis=0)
        if paper_c:
            c = c + len(chosen) / len(A) * np.mean(dc, axis=0)
        else:
            c = np.mean([ci[i] for i in sorted(heard)], axis=0)
        xs.append(x)
    return xs


def silo_round(i: int, x: np.ndarray, correction: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """What fedjob's trainer does: step on g + (c - c_i), and return the mean raw gradient as c_i."""
    y, raw = x.copy(), np.zeros(2)
    for _ in range(K):
        g = grad(i, y)
        raw += g
        y -= ETA * (g + (correction if correction is not None else 0.0))
    return y - x, raw / K


def run_fedjob(
    strategy: Strategy, rounds: int, schedule: list[list[int]], tmp_path: Path | None = None
) -> list[np.ndarray]:
    g = {"w": np.zeros(2, np.float32)}
    xs = []
    manifest = manifest_of(g)
    up_extra = strategy.upload_extras_manifest(manifest)
    for r in range(rounds):
        total = RunningSum(manifest)
        for i in schedule[r % len(schedule)]:
            silo = f"s{i}"
            extras = strategy.download_extras(silo, manifest)
            corr = extras[Scaffold.CORRECTION + "w"].astype(np.float64) if extras else None
            delta, variate = silo_round(i, g["w"].astype(np.float64), corr)
            meta = UpdateMeta(silo, 100, K, 0.0)
            w = strategy.weight(meta)
            total.fold("w", 0, delta.astype(np.float32), w)
            for info in up_extra.values():  # two chunks, as a stream would deliver them
                strategy.fold_extra(silo, info, 0, variate[:1].astype(np.float32))
                strategy.fold_extra(silo, info, 1, variate[1:].astype(np.float32))
            total.commit(meta, w)
        g = strategy.apply(g, total, r + 1)
        if tmp_path is not None and r == rounds // 2:  # variates survive an aggregator restart
            store = CheckpointStore(tmp_path)
            store.save(Checkpoint(r + 1, g, [], strategy_state=strategy.state()))
            loaded = store.load()
            assert loaded is not None
            strategy = Scaffold(len(A))
            strategy.load_state(loaded.strategy_state)
        xs.append(g["w"].astype(np.float64))
    return xs


@pytest.mark.parametrize("schedule", [[[0, 1, 2]], [[0, 1], [1, 2], [0, 2]]], ids=["all", "two-of-three"])
def test_scaffold_matches_the_papers_algorithm(schedule: list[list[int]], tmp_path: Path) -> None:
    # The trainer's c_i (mean raw gradient) equals option II's c_i - c + (x - y) / (K eta) under SGD.
    # Round by round, through a checkpoint restart halfway.
    ours = run_fedjob(Scaffold(len(A)), 40, schedule, tmp_path)
    ref = reference_scaffold(40, schedule, paper_c=False)
    paper = reference_scaffold(40, schedule, paper_c=True)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    if len(schedule) == 1:  # full participation: exactly the paper's c as well
        np.testing.assert_allclose(ours, paper, rtol=1e-4, atol=1e-5)
    else:  # partial: the two choices of c differ early on, and reach the same optimum
        assert np.abs(ours[1] - paper[1]).max() > 1e-3
        np.testing.assert_allclose(ours[-1], paper[-1], atol=1e-3)


def test_scaffold_removes_the_client_drift_that_fedavg_shows() -> None:
    fedavg = run_fedjob(FedAvg(), 300, [[0, 1, 2]])[-1]
    scaffold = run_fedjob(Scaffold(len(A)), 300, [[0, 1, 2]])[-1]
    assert np.linalg.norm(scaffold - OPTIMUM) < 1e-3
    assert np.linalg.norm(fedavg - OPTIMUM) > 0.2  # FedAvg settles where the silos' drifts balance


def test_scaffold_uses_only_committed_variates() -> None:
    s = Scaffold(2)
    g = {"w": np.zeros(2, np.float32)}
    info = s.upload_extras_manifest(manifest_of(g))[Scaffold.VARIATE + "w"]
    total = RunningSum(manifest_of(g))
    s.fold_extra("a", info, 0, np.array([2.0, 4.0], np.float32))
    s.fold_extra("b", info, 0, np.array([100.0, 100.0], np.float32))  # b's upload never completes
    meta = UpdateMeta("a", 1, 1, 0.0)
    total.fold("w", 0, np.zeros(2, np.float32), 1.0)
    total.commit(meta, 1.0)
    s.apply(g, total, 1)
    np.testing.assert_allclose(s.c["w"], [2.0, 4.0])  # only a has reported: c = c_a
    correction = Scaffold.CORRECTION + "w"
    np.testing.assert_allclose(s.download_extras("a", manifest_of(g))[correction], [0.0, 0.0])
    np.testing.assert_allclose(s.download_extras("b", manifest_of(g))[correction], [2.0, 4.0])


def test_scaffold_weights_the_variates_as_it_weights_the_deltas() -> None:
    s = Scaffold(2)
    g = {"w": np.zeros(1, np.float32)}
    info = s.upload_extras_manifest(manifest_of(g))[Scaffold.VARIATE + "w"]
    total = RunningSum(manifest_of(g))
    for silo, n, variate in (("a", 300, 1.0), ("b", 100, 5.0)):
        meta = UpdateMeta(silo, n, 1, 0.0)
        s.fold_extra(silo, info, 0, np.array([variate], np.float32))
        total.fold("w", 0, np.zeros(1, np.float32), s.weight(meta))
        total.commit(meta, s.weight(meta))
    s.apply(g, total, 1)
    np.testing.assert_allclose(s.c["w"], [(300 * 1.0 + 100 * 5.0) / 400])
    # So the corrections cancel in the weighted aggregate: 300 (c - c_a) + 100 (c - c_b) = 0.
    corr = {x: s.download_extras(x, manifest_of(g))[Scaffold.CORRECTION + "w"][0] for x in "ab"}
    assert abs(300 * corr["a"] + 100 * corr["b"]) < 1e-4
