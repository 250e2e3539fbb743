"""Aggregation math: a running weighted sum that chunks fold into, and server strategies.

Memory is O(model): each arriving chunk is multiplied by its silo's weight and
added to one float64 buffer per tensor, then dropped. A strategy decides the
weight of an update when it starts, and turns the finished sum into the next
global model. New algorithms are small `Strategy` subclasses (see docs/algorithms.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedjob.chunking import State, TensorInfo

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class UpdateMeta:
    """What a silo declares about its update (the header), after identity checks."""

    silo: str
    num_samples: int
    local_steps: int
    train_loss: float


class RunningSum:
    """sum_i w_i * delta_i, built chunk by chunk; a broken upload can be taken back out."""

    def __init__(self, manifest: Mapping[str, TensorInfo]) -> None:
        self._sum: dict[str, F64] = {n: np.zeros(t.size, dtype=np.float64) for n, t in manifest.items()}
        self._shapes = {n: t.shape for n, t in manifest.items()}
        self.total_weight = 0.0
        self.contributors: list[UpdateMeta] = []

    def fold(self, name: str, offset: int, values: npt.NDArray[np.float32], weight: float) -> None:
        self._sum[name][offset : offset + values.size] += weight * values.astype(np.float64)

    def unfold(self, name: str, offset: int, values: npt.NDArray[np.float32], weight: float) -> None:
        # float64 makes add-then-subtract exact to ~1e-16 relative, far below float32's resolution.
        self._sum[name][offset : offset + values.size] -= weight * values.astype(np.float64)

    def commit(self, meta: UpdateMeta, weight: float) -> None:
        self.total_weight += weight
        self.contributors.append(meta)

    def weighted_mean(self) -> dict[str, F64]:
        if self.total_weight <= 0:
            raise ValueError("no update was committed")
        return {n: (s / self.total_weight).reshape(self._shapes[n]) for n, s in self._sum.items()}


class Strategy(ABC):
    """A server-side federated algorithm.

    The aggregator calls `weight` once per accepted update header, folds
    `weight * delta` chunk by chunk, and at the end of the round calls `apply`
    with the current global model and the finished sum.
    """

    name: str

    @abstractmethod
    def weight(self, meta: UpdateMeta) -> float: ...

    @abstractmethod
    def apply(self, global_state: State, total: RunningSum, round_number: int) -> State: ...


class FedAvg(Strategy):
    """McMahan et al. 2017: the sample-weighted mean of the silos' deltas is added to the model."""

    name = "fedavg"

    def weight(self, meta: UpdateMeta) -> float:
        return float(max(meta.num_samples, 1))

    def apply(self, global_state: State, total: RunningSum, round_number: int) -> State:
        mean = total.weighted_mean()
        return {n: (global_state[n].astype(np.float64) + mean[n]).astype(np.float32) for n in global_state}


STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg}


def make_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown aggregation algorithm {name!r}; known: {sorted(STRATEGIES)}") from None
