"""The strategy a job names: an algorithm, wrapped by a robust rule or by differential privacy."""

from __future__ import annotations

import numpy as np

from fedjob.aggregation import (
    DiLoCo,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedNova,
    FedProx,
    FedYogi,
    Scaffold,
    ServerOptimizer,
    Strategy,
)
from fedjob.privacy import DifferentialPrivacy
from fedjob.robust import CoordinateMedian, MultiKrum, NormBound, TrimmedMean
from fedjob.spec import AggregationSpec, JobSpec


def make_strategy(spec: JobSpec, noise_rng: np.random.Generator | None = None) -> Strategy:
    """The algorithm with its parameters; a robust rule wraps it and a norm bound wraps that, or
    differential privacy wraps it (the spec refuses both at once). `noise_rng` is for tests: DP
    noise otherwise comes from the operating system's entropy."""
    aggregation = spec.aggregation
    strategy = _algorithm(aggregation, len(spec.silos))
    if spec.privacy.dp is not None:
        return DifferentialPrivacy(strategy, spec, noise_rng)
    r = aggregation.robust
    if r is None:
        return strategy
    if r.rule == "median":
        strategy = CoordinateMedian(strategy)
    elif r.rule == "trimmedMean":
        strategy = TrimmedMean(strategy, r.trim_fraction)
    elif r.rule == "multiKrum":
        strategy = MultiKrum(strategy, r.byzantine, r.select)
    if r.max_norm is not None:
        strategy = NormBound(strategy, r.max_norm)
    return strategy


def _algorithm(a: AggregationSpec, num_silos: int) -> Strategy:
    if a.algorithm == "scaffold":
        return Scaffold(num_silos)
    if a.algorithm == "diloco":
        return DiLoCo(a.outer_learning_rate, a.outer_momentum)
    simple: dict[str, type[Strategy]] = {"fedavg": FedAvg, "fedprox": FedProx, "fednova": FedNova}
    if a.algorithm in simple:
        return simple[a.algorithm]()
    optimisers: dict[str, type[ServerOptimizer]] = {
        "fedadam": FedAdam,
        "fedyogi": FedYogi,
        "fedadagrad": FedAdagrad,
    }
    if a.algorithm in optimisers:
        return optimisers[a.algorithm](a.server_learning_rate, a.beta1, a.beta2, a.tau)
    raise ValueError(f"unknown aggregation algorithm {a.algorithm!r}")
