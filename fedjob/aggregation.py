"""Aggregation math: a running weighted sum that finished updates fold into, and server strategies.

Memory is O(trainable state) with a small constant: one float32 buffer per
tensor holds sum_i w_i * delta_i; each completed update is folded in slice by
slice and dropped. At the end of a round a strategy turns the sum, in place,
into the next global model, so the aggregator holds two copies of the trainable
state (the global model and the sum) and no more. A strategy decides the weight
of an update and the math; new algorithms are small `Strategy` subclasses (see
docs/algorithms.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from fedjob.chunking import State, TensorInfo
from fedjob.codec import F32


@dataclass(frozen=True)
class UpdateMeta:
    """What a silo declares about its update (the header), after identity checks."""

    silo: str
    num_samples: int
    local_steps: int
    train_loss: float
    # Federated evaluation of the model the round started from (samples 0: none).
    eval_loss: float = float("nan")
    eval_samples: int = 0
    # The sample count the header claimed, when a cap (silos[].maxSamples) lowered it; 0: as num_samples.
    claimed_samples: int = 0


class RoundAggregate(Protocol):
    """What a strategy gets at the end of a round: the updates' weighted mean, and who contributed."""

    @property
    def contributors(self) -> Sequence[UpdateMeta]: ...

    @property
    def total_weight(self) -> float: ...

    def take_mean(self) -> State:
        """The weighted mean delta, in buffers the strategy may keep (call once)."""


class RunningSum:
    """sum_i w_i * delta_i in float32, folded slice by slice from completed updates.

    float32 is enough: the sum of a few hundred weighted deltas loses about
    1e-7 relative per addition, far below what int8/bf16 codecs already round
    away, and float64 would double the aggregator's largest buffer. Only
    complete, verified updates are folded (the upload session spools chunks until
    the trailer), so nothing ever has to be taken back out.
    """

    def __init__(self, manifest: Mapping[str, TensorInfo], buffers: State | None = None) -> None:
        if buffers is not None and set(buffers) == set(manifest):
            # Reuse the previous global model's memory instead of allocating another copy.
            self._sum = {n: buffers[n].reshape(-1) for n in manifest}
            for v in self._sum.values():
                v.fill(0.0)
        else:
            self._sum = {n: np.zeros(t.size, dtype=np.float32) for n, t in manifest.items()}
        self._shapes = {n: t.shape for n, t in manifest.items()}
        self.total_weight = 0.0
        self.contributors: list[UpdateMeta] = []
        self._consumed = False

    def fold(self, name: str, offset: int, values: npt.NDArray[np.float32], weight: float) -> None:
        target = self._sum[name][offset : offset + values.size]
        target += np.float32(weight) * values

    def commit(self, meta: UpdateMeta, weight: float) -> None:
        self.total_weight += weight
        self.contributors.append(meta)

    def take_mean(self) -> State:
        """The weighted mean, computed in place: the sum's buffers now hold it (call once)."""
        if self.total_weight <= 0:
            raise ValueError("no update was committed")
        if self._consumed:
            raise RuntimeError("the running sum was already turned into its mean")
        self._consumed = True
        inv = np.float32(1.0 / self.total_weight)
        out: State = {}
        for n, s in self._sum.items():
            s *= inv
            out[n] = s.reshape(self._shapes[n])
        return out


S = TypeVar("S", bound="Strategy")


class Strategy(ABC):
    """A server-side federated algorithm.

    The aggregator calls `weight` once per accepted update header, folds
    `weight * delta` of each completed update, and at the end of the round calls
    `apply` with the current global model and the finished sum. `apply` may
    reuse the sum's buffers for the state it returns (it must not modify
    `global_state`, which silos may still be downloading). A strategy with memory
    across rounds (server optimiser moments) exposes it through `state` /
    `load_state`, and the aggregator checkpoints it with the model.
    """

    name: str
    # True when the strategy needs every update of the round at once (robust rules):
    # the aggregator then collects them on disk instead of keeping a running sum.
    collects: bool = False

    @abstractmethod
    def weight(self, meta: UpdateMeta) -> float: ...

    def update_scale(self, norm: float) -> float:
        """Factor applied to an update of L2 norm `norm` before it counts (a norm bound); 1 keeps it."""
        return 1.0

    @abstractmethod
    def apply(self, global_state: State, total: RoundAggregate, round_number: int) -> State: ...

    def state(self) -> dict[str, F32]:
        return {}

    def load_state(self, state: dict[str, F32]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, got {sorted(state)[:3]}")

    # Extra tensors in the stream (SCAFFOLD's control variates). Names carry a "/",
    # which parameter names never do, so they cannot collide with the model's tensors.

    def download_extras_manifest(self, manifest: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
        """Tensors sent to every silo after the global parameters."""
        return {}

    def download_extras(self, silo: str, manifest: Mapping[str, TensorInfo]) -> State:
        """Their values for one silo."""
        return {}

    def upload_extras_manifest(self, manifest: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
        """Tensors every update carries after the parameter deltas."""
        return {}

    def fold_extra(self, silo: str, info: TensorInfo, offset: int, values: npt.NDArray[np.float32]) -> None:
        """One verified chunk of an extra tensor. Writes, never adds: a resent chunk lands in place."""
        raise ValueError(f"{self.name} takes no extra tensors, got {info.name!r}")


def wrapped(strategy: Strategy, kind: type[S]) -> S | None:
    """The strategy of type `kind` in a chain of wrappers (each holds the next as `inner`), if any."""
    s: Strategy | None = strategy
    while s is not None:
        if isinstance(s, kind):
            return s
        s = getattr(s, "inner", None)
    return None


def _add(global_state: State, step: State) -> State:
    """global + step, written into step's buffers (no new copy of the model)."""
    for n, g in global_state.items():
        step[n] += g
    return step


class FedAvg(Strategy):
    """McMahan et al. 2017: the sample-weighted mean of the silos' deltas is added to the model."""

    name = "fedavg"

    def weight(self, meta: UpdateMeta) -> float:
        return float(max(meta.num_samples, 1))

    def apply(self, global_state: State, total: RoundAggregate, round_number: int) -> State:
        return _add(global_state, total.take_mean())


class FedProx(FedAvg):
    """Li et al. 2020: FedAvg on the server; the silos add mu/2 ||w - w_global||^2 to their loss."""

    name = "fedprox"


class FedNova(Strategy):
    """Wang et al. 2020: each delta normalised by its silo's local steps, rescaled by the mean step count.

    w <- w + tau_eff * sum_i p_i d_i / tau_i, with p_i = n_i / n and tau_eff = sum_i p_i tau_i,
    so silos that ran more steps do not pull the model further just for that.
    """

    name = "fednova"

    def weight(self, meta: UpdateMeta) -> float:
        return float(max(meta.num_samples, 1)) / max(meta.local_steps, 1)

    def apply(self, global_state: State, total: RoundAggregate, round_number: int) -> State:
        n = sum(max(m.num_samples, 1) for m in total.contributors)
        tau_eff = sum(max(m.num_samples, 1) * max(m.local_steps, 1) for m in total.contributors) / n
        raw = total.take_mean()  # sum_i (n_i / tau_i) d_i / sum_i (n_i / tau_i)
        scale = np.float32(total.total_weight / n * tau_eff)
        for v in raw.values():
            v *= scale
        return _add(global_state, raw)


class ServerOptimizer(Strategy):
    """Reddi et al. 2021 (FedOpt): the FedAvg mean delta is a pseudo-gradient for an adaptive server step.

    m <- b1 m + (1 - b1) D;  v <- (per optimiser);  w <- w + lr m / (sqrt(v) + tau)
    """

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float) -> None:
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        # float32 like the model: the moments are two more copies of the trainable state.
        self.m: dict[str, F32] = {}
        self.v: dict[str, F32] = {}

    def weight(self, meta: UpdateMeta) -> float:
        return float(max(meta.num_samples, 1))

    @abstractmethod
    def second_moment(self, v: F32, d: F32) -> F32:
        """The new second moment; may update `v` in place and return it."""

    def apply(self, global_state: State, total: RoundAggregate, round_number: int) -> State:
        delta = total.take_mean()
        for k, d in delta.items():
            if k not in self.m:
                self.m[k] = np.zeros_like(d)
                self.v[k] = np.full_like(d, self.tau**2)
            m = self.m[k]
            m *= np.float32(self.beta1)
            m += np.float32(1 - self.beta1) * d
            self.v[k] = self.second_moment(self.v[k], d)
            # The step overwrites the mean delta's buffer: one tensor of temporaries at a time.
            np.divide(m, np.sqrt(self.v[k]) + np.float32(self.tau), out=d)
            d *= np.float32(self.lr)
        return _add(global_state, delta)

    def state(self) -> dict[str, F32]:
        out: dict[str, F32] = {}
        for k in self.m:
            out[f"m/{k}"] = self.m[k]
            out[f"v/{k}"] = self.v[k]
        return out

    def load_state(self, state: dict[str, F32]) -> None:
        self.m = {k[2:]: v.astype(np.float32) for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: v.astype(np.float32) for k, v in state.items() if k.startswith("v/")}


class DiLoCo(Strategy):
    """Douillard et al. 2023: the mean delta is an outer gradient for SGD with Nesterov momentum.

    b <- mu b + D;  w <- w + lr (D + mu b)   (D = -outer gradient; PyTorch's Nesterov SGD)

    With many local steps per round this trains like synchronous data-parallel SGD with
    hundreds of times less communication (the paper: lr 0.7, mu 0.9). lr 1, mu 0 is FedAvg.
    The momentum is one more float32 copy of the trainable state, checkpointed.
    """

    name = "diloco"

    def __init__(self, lr: float, momentum: float) -> None:
        self.lr, self.momentum = lr, momentum
        self.b: dict[str, F32] = {}

    def weight(self, meta: UpdateMeta) -> float:
        return float(max(meta.num_samples, 1))

    def apply(self, global_state: State, total: RoundAggregate, round_number: int) -> State:
        delta = total.take_mean()
        mu = np.float32(self.momentum)
        for k, d in delta.items():
            b = self.b.get(k)
            if b is None:
                b = self.b[k] = np.zeros_like(d)
            b *= mu
            b += d
            # The step overwrites the mean delta's buffer: d + mu b, times lr.
            d += mu * b
            d *= np.float32(self.lr)
        return _add(global_state, delta)

    def state(self) -> dict[str, F32]:
        return {f"b/{k}": v for k, v in self.b.items()}

    def load_state(self, state: dict[str, F32]) -> None:
        self.b = {k[2:]: v.astype(np.float32) for k, v in state.items() if k.startswith("b/")}


class FedAdam(ServerOptimizer):
    name = "fedadam"

    def second_moment(self, v: F32, d: F32) -> F32:
        v *= np.float32(self.beta2)
        v += np.float32(1 - self.beta2) * d * d
        return v


class FedYogi(ServerOptimizer):
    name = "fedyogi"

    def second_moment(self, v: F32, d: F32) -> F32:
        d2 = d * d
        v -= np.float32(1 - self.beta2) * d2 * np.sign(v - d2)
        return v


class FedAdagrad(ServerOptimizer):
    name = "fedadagrad"

    def second_moment(self, v: F32, d: F32) -> F32:
        v += d * d
        return v


class Scaffold(Strategy):
    """Karimireddy et al. 2020: control variates correct each silo's drift towards its own optimum.

    Silo i trains on gradients g + (c - c_i), where c_i estimates its own mean gradient
    and c the mean over all silos, then returns its delta and its new c_i (the mean of
    its raw gradients over the round). The server keeps every c_i, so a restarted
    silo pod needs no state of its own: it receives c - c_i with the global model.

    c is the mean of the c_i with the weights the deltas are averaged with (samples),
    over the silos that have reported: the corrections then cancel in the aggregate,
    sum_i p_i (c - c_i) = 0. With equal weights and full participation this is the
    paper's c += |S|/N mean(dc_i); the paper's zeros for silos not yet heard from
    would pull c towards zero until each has reported once, a bias this avoids.
    Aggregator memory: O(N x trainable parameters).
    """

    name = "scaffold"
    CORRECTION = "scaffold/correction/"  # download: c - c_i
    VARIATE = "scaffold/variate/"  # upload: the silo's new c_i

    def __init__(self, num_silos: int) -> None:
        self.num_silos = num_silos
        self.c: dict[str, F32] = {}
        self.ci: dict[str, dict[str, F32]] = {}
        self.weights: dict[str, float] = {}  # each silo's latest weight, for c
        self.pending: dict[str, dict[str, F32]] = {}

    def weight(self, meta: UpdateMeta) -> float:
        return float(max(meta.num_samples, 1))

    def download_extras_manifest(self, manifest: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
        return {self.CORRECTION + n: TensorInfo(self.CORRECTION + n, t.shape) for n, t in manifest.items()}

    def download_extras(self, silo: str, manifest: Mapping[str, TensorInfo]) -> State:
        mine = self.ci.get(silo, {})
        out: State = {}
        for n, t in manifest.items():
            c = self.c.get(n, np.zeros(t.shape, dtype=np.float32))
            out[self.CORRECTION + n] = (c - mine[n]) if n in mine else c.copy()
        return out

    def upload_extras_manifest(self, manifest: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
        return {self.VARIATE + n: TensorInfo(self.VARIATE + n, t.shape) for n, t in manifest.items()}

    def fold_extra(self, silo: str, info: TensorInfo, offset: int, values: npt.NDArray[np.float32]) -> None:
        if not info.name.startswith(self.VARIATE):
            raise ValueError(f"scaffold: unexpected extra tensor {info.name!r}")
        name = info.name[len(self.VARIATE) :]
        buf = self.pending.setdefault(silo, {}).setdefault(name, np.zeros(info.size, dtype=np.float32))
        buf[offset : offset + values.size] = values

    def apply(self, global_state: State, total: RoundAggregate, round_number: int) -> State:
        new = _add(global_state, total.take_mean())
        for meta in total.contributors:
            got = self.pending.get(meta.silo, {})
            self.ci[meta.silo] = {n: got[n].reshape(v.shape) for n, v in global_state.items()}
            self.weights[meta.silo] = self.weight(meta)
        # Uploads that never completed leave nothing behind.
        self.pending.clear()
        weight_sum = sum(self.weights.values())
        self.c = {}
        for n, v in global_state.items():
            acc = np.zeros(v.shape, dtype=np.float64)
            for silo, variates in self.ci.items():
                acc += self.weights[silo] * variates[n]
            self.c[n] = (acc / weight_sum).astype(np.float32)
        return new

    def state(self) -> dict[str, F32]:
        out = {f"c/{n}": v for n, v in self.c.items()}
        for silo, variates in self.ci.items():
            out.update({f"ci/{silo}/{n}": v for n, v in variates.items()})
            out[f"weight/{silo}"] = np.array([self.weights[silo]], dtype=np.float32)
        return out

    def load_state(self, state: dict[str, F32]) -> None:
        self.c, self.ci, self.weights, self.pending = {}, {}, {}, {}
        for key, v in state.items():
            kind, _, rest = key.partition("/")
            if kind == "c":
                self.c[rest] = v
            elif kind == "ci":
                silo, _, name = rest.partition("/")
                self.ci.setdefault(silo, {})[name] = v
            elif kind == "weight":
                self.weights[rest] = float(v[0])
            else:
                raise ValueError(f"scaffold: unexpected checkpoint entry {key!r}")
