"""Robust aggregation: rules that bound what one silo can do to the global model.

Each rule is a `Strategy` that wraps another (Flower's `FedMedian` and
`DifferentialPrivacyServerSideFixedClipping` are the pattern): the rule decides
what the round's aggregate delta is, the wrapped strategy what to do with it
(FedAvg adds it, FedAdam treats it as a pseudo-gradient).

- `NormBound` (Sun et al. 2019) scales every update down to L2 norm `max_norm`
  before it is averaged. It streams: the aggregator knows an update's norm when
  the upload completes, so the scale goes into the fold weight.
- `CoordinateMedian` (Yin et al. 2018), `TrimmedMean` (Yin et al. 2018) and
  `MultiKrum` (Blanchard et al. 2017) need every update of the round at once:
  they collect (`collects = True`); the aggregator keeps the updates on disk and
  hands them over as `CollectedUpdates`, read block by block.

The collecting rules weigh silos equally: a silo's claimed sample count is exactly
what a malicious silo controls, and a coordinate-wise median of weighted points is
no longer robust to one heavy point.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fedjob.aggregation import RoundAggregate, Strategy, UpdateMeta
from fedjob.chunking import State, TensorInfo
from fedjob.codec import F32

F64 = npt.NDArray[np.float64]
# Elements of each update read at once while combining: k silos x BLOCK x 4 bytes.
BLOCK = 1 << 20


class CollectedUpdates(Protocol):
    """Every accepted update of a round, for rules that need them all (kept by the aggregator)."""

    metas: Sequence[UpdateMeta]  # one per update, in row order
    weights: Sequence[float]  # the strategy's weights after the job's caps
    scales: Sequence[float]  # per-update factor applied when read (norm bounds)
    manifest: Mapping[str, TensorInfo]

    def rows(self, start: int, stop: int) -> F32:
        """Elements [start, stop) of the flattened updates (manifest order), one row per update."""

    def output(self) -> State:
        """Zeroed buffers shaped like the manifest, for the aggregate (reused memory)."""


def blocks(manifest: Mapping[str, TensorInfo], block: int = BLOCK) -> Iterator[tuple[str, int, int, int]]:
    """(tensor, offset in it, flat start, flat stop) covering the flattened manifest in bounded blocks."""
    flat = 0
    for name, info in manifest.items():
        for offset in range(0, info.size, block):
            n = min(block, info.size - offset)
            yield name, offset, flat + offset, flat + offset + n
        flat += info.size


class ComputedAggregate:
    """A round aggregate already computed into buffers (the `RoundAggregate` a wrapped strategy sees)."""

    def __init__(self, mean: State, contributors: list[UpdateMeta], total_weight: float) -> None:
        self._mean = mean
        self.contributors = contributors
        self.total_weight = total_weight

    def take_mean(self) -> State:
        return self._mean


class RobustStrategy(Strategy):
    """A rule in front of another strategy; silo-side behaviour and state belong to the inner one."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def weight(self, meta: UpdateMeta) -> float:
        return self.inner.weight(meta)

    def update_scale(self, norm: float) -> float:
        return self.inner.update_scale(norm)

    def state(self) -> dict[str, F32]:
        return self.inner.state()

    def load_state(self, state: dict[str, F32]) -> None:
        self.inner.load_state(state)

    def download_extras_manifest(self, manifest: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
        return self.inner.download_extras_manifest(manifest)

    def download_extras(self, silo: str, manifest: Mapping[str, TensorInfo]) -> State:
        return self.inner.download_extras(silo, manifest)

    def upload_extras_manifest(self, manifest: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
        return self.inner.upload_extras_manifest(manifest)

    def fold_extra(self, silo: str, info: TensorInfo, offset: int, values: F32) -> None:
        self.inner.fold_extra(silo, info, offset, values)


class NormBound(RobustStrategy):
    """Every update is scaled to L2 norm at most `max_norm`, then the inner strategy averages."""

    def __init__(self, inner: Strategy, max_norm: float) -> None:
        super().__init__(inner)
        self.max_norm = max_norm
        self.name = f"normbound({inner.name})"
        self.collects = inner.collects

    def update_scale(self, norm: float) -> float:
        own = 1.0 if norm <= self.max_norm else self.max_norm / norm
        return own * self.inner.update_scale(norm * own)

    def apply(self, global_state: State, total: RoundAggregate, round_number: int) -> State:
        return self.inner.apply(global_state, total, round_number)


class CollectingRule(RobustStrategy):
    """A rule that combines all of a round's updates; `selected` says which rows it kept (for scores)."""

    collects = True

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.selected: list[int] = []

    def apply(self, global_state: State, total: RoundAggregate, round_number: int) -> State:
        if not isinstance(total, CollectedRound):
            raise TypeError(f"{self.name} needs the round's updates collected, got {type(total).__name__}")
        updates = total.updates
        chosen = self.select(updates)
        self.selected = chosen
        out = updates.output()
        flat = {n: v.reshape(-1) for n, v in out.items()}
        scales = np.asarray(updates.scales, dtype=np.float32)[:, None]
        for name, offset, start, stop in blocks(updates.manifest):
            rows = updates.rows(start, stop) * scales
            flat[name][offset : offset + stop - start] = self.combine(rows[chosen])
        metas = [updates.metas[i] for i in chosen]
        # The inner strategy sees an aggregate of equal weights (see the module docstring).
        return self.inner.apply(global_state, ComputedAggregate(out, metas, float(len(chosen))), round_number)

    def select(self, updates: CollectedUpdates) -> list[int]:
        """The rows the rule combines (all, unless it drops outliers as whole updates)."""
        return list(range(len(updates.metas)))

    @abstractmethod
    def combine(self, rows: F32) -> F32:
        """One block of the aggregate from the same block of every chosen update (rows x elements)."""


class CollectedRound:
    """What the aggregator hands a collecting rule: a `RoundAggregate` that carries the updates."""

    def __init__(self, updates: CollectedUpdates) -> None:
        self.updates = updates
        self.contributors = list(updates.metas)
        self.total_weight = float(sum(updates.weights))

    def take_mean(self) -> State:
        raise TypeError("a collected round has no running sum: wrap the strategy in a collecting rule")


class CoordinateMedian(CollectingRule):
    """The coordinate-wise median of the updates (Yin et al. 2018)."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.name = f"median({inner.name})"

    def combine(self, rows: F32) -> F32:
        return median(rows)


class TrimmedMean(CollectingRule):
    """Per coordinate, the mean without the `fraction` largest and smallest values (Yin et al. 2018)."""

    def __init__(self, inner: Strategy, fraction: float) -> None:
        super().__init__(inner)
        self.fraction = fraction
        self.name = f"trimmedmean({inner.name})"

    def combine(self, rows: F32) -> F32:
        return trimmed_mean(rows, self.fraction)


class MultiKrum(CollectingRule):
    """Blanchard et al. 2017: average the `select` updates closest to their n - f - 2 nearest neighbours."""

    def __init__(self, inner: Strategy, byzantine: int, select: int | None) -> None:
        super().__init__(inner)
        self.byzantine = byzantine
        self.keep = select
        self.name = f"multikrum({inner.name})"

    def select(self, updates: CollectedUpdates) -> list[int]:
        k = len(updates.metas)
        scales = np.asarray(updates.scales, dtype=np.float64)
        dist = np.zeros((k, k), dtype=np.float64)
        for _, _, start, stop in blocks(updates.manifest):
            rows = updates.rows(start, stop).astype(np.float64) * scales[:, None]
            dist += pairwise_sq_distances(rows)
        keep = self.keep if self.keep is not None else max(1, k - self.byzantine)
        return multi_krum(dist, self.byzantine, min(keep, k))

    def combine(self, rows: F32) -> F32:
        return np.asarray(rows.mean(axis=0, dtype=np.float64), dtype=np.float32)


# ----- the math, on plain arrays (tests check these against NumPy references) -----------------


def median(rows: F32) -> F32:
    return np.median(rows, axis=0).astype(np.float32)


def trimmed_mean(rows: F32, fraction: float) -> F32:
    k = rows.shape[0]
    cut = math.floor(fraction * k)
    if 2 * cut >= k:
        raise ValueError(f"trimming {cut} of each end leaves nothing of {k} updates")
    ordered = np.sort(rows, axis=0)
    return np.asarray(ordered[cut : k - cut].mean(axis=0, dtype=np.float64), dtype=np.float32)


def pairwise_sq_distances(rows: F64) -> F64:
    """||x_i - x_j||^2 for every pair of rows (float64: distances are sums over millions of elements)."""
    sq = np.einsum("ij,ij->i", rows, rows)
    d: F64 = np.asarray(sq[:, None] + sq[None, :] - 2.0 * rows @ rows.T, dtype=np.float64)
    np.fill_diagonal(d, 0.0)
    return np.maximum(d, 0.0)


def multi_krum(dist: F64, byzantine: int, select: int) -> list[int]:
    """Indices of the `select` rows with the lowest Krum scores, in row order.

    A row's score is the sum of its squared distances to its n - f - 2 nearest
    other rows. With fewer rows than that needs, every other row counts.
    """
    k = dist.shape[0]
    neighbours = max(1, k - byzantine - 2)
    scores = []
    for i in range(k):
        others = np.sort(np.delete(dist[i], i))
        scores.append(float(others[: min(neighbours, k - 1)].sum()))
    order = sorted(range(k), key=lambda i: (scores[i], i))
    return sorted(order[:select])


def cap_shares(weights: Sequence[float], max_share: float) -> list[float]:
    """Weights in which no entry exceeds `max_share` of the total, the excess spread over the others.

    Water-filling: capped entries are fixed at max_share of the (unchanged) total, the
    rest keep their proportions. When max_share x n < 1 no cap can hold: equal weights.
    """
    w = [float(x) for x in weights]
    n, total = len(w), sum(w)
    if n == 0 or total <= 0 or max_share >= 1.0:
        return w
    if max_share * n <= 1.0:
        return [total / n] * n
    capped: set[int] = set()
    while True:
        free = [i for i in range(n) if i not in capped]
        budget = total * (1.0 - max_share * len(capped))
        free_sum = sum(w[i] for i in free)
        over = [i for i in free if w[i] / free_sum * budget > max_share * total * (1 + 1e-12)]
        if not over:
            return [max_share * total if i in capped else w[i] / free_sum * budget for i in range(n)]
        capped.update(over)


def norm_zscores(norms: Sequence[float]) -> list[float]:
    """Each norm's z-score among the round's (0 when they are all equal or there is one)."""
    a = np.asarray(norms, dtype=np.float64)
    sd = float(a.std())
    if len(a) < 2 or sd == 0.0:
        return [0.0] * len(a)
    return [float(x) for x in (a - a.mean()) / sd]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a.astype(np.float64), b.astype(np.float64)) / (na * nb))


class CoordinateSample:
    """A fixed subset of the flattened trainable coordinates, for cosines between updates.

    An update's cosine to the round's aggregate needs the aggregate, which a streaming
    aggregator only has after the last update is folded and gone. Keeping each update's
    values at `size` coordinates (all of them for models up to that size, so exact for
    adapters of that size) costs 4 x size bytes per silo and estimates the cosine of a
    high-dimensional update closely. The subset is random but fixed per job, so rounds
    compare like with like.
    """

    def __init__(self, manifest: Mapping[str, TensorInfo], size: int = 1 << 16, seed: int = 0) -> None:
        total = sum(t.size for t in manifest.values())
        if total <= size:
            picks = np.arange(total, dtype=np.int64)
        else:
            picks = np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))
        self.size = int(picks.size)
        self._by_tensor: dict[str, tuple[np.ndarray, int]] = {}  # name: (positions in tensor, first slot)
        flat = 0
        for name, info in manifest.items():
            lo, hi = np.searchsorted(picks, [flat, flat + info.size])
            self._by_tensor[name] = (picks[lo:hi] - flat, int(lo))
            flat += info.size

    def take(self, row: F32, name: str, offset: int, values: F32) -> None:
        """Copy the sampled coordinates of one slice of a tensor into `row`."""
        pos, first = self._by_tensor.get(name, (np.empty(0, np.int64), 0))
        lo, hi = np.searchsorted(pos, [offset, offset + values.size])
        if hi > lo:
            row[first + lo : first + hi] = values[pos[lo:hi] - offset]

    def of_state(self, state: Mapping[str, F32]) -> F32:
        row = np.zeros(self.size, dtype=np.float32)
        for name, v in state.items():
            if name in self._by_tensor:
                self.take(row, name, 0, v.reshape(-1))
        return row
