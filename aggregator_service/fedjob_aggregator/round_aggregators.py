"""A round's aggregator: combines the round's finished updates, separately from how they arrived.

Upload sessions receive and check bytes; an aggregator takes each *finished* update
(`add`), and at the round's close hands the strategy what it needs (`finish`):

- `StreamingAggregator` folds every update into a float32 running sum as it
  completes: memory O(model) whatever the number of silos (the FedAvg family,
  norm bounds). It keeps each update's spool until the close, so the job's weight
  caps (`maxWeightShare`), which depend on every claim of the round, can re-weigh
  the few updates they change by reading them once more.
- `CollectingAggregator` keeps every update decoded on disk (float32, one file per
  silo) and gives a collecting rule (median, trimmed mean, Multi-Krum) block-wise
  access to all of them: memory O(silos x block), disk O(silos x model).

Both keep each update's values at a fixed sample of coordinates, from which the
round's anomaly scores (norm, cosine to the aggregate, norm z-score) are computed.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedjob.aggregation import RoundAggregate, RunningSum, Strategy, UpdateMeta, wrapped
from fedjob.chunking import State, TensorInfo
from fedjob.codec import F32
from fedjob.robust import CollectedRound, CollectingRule, CoordinateSample, cap_shares, cosine, norm_zscores
from fedjob_aggregator.upload_session import UploadSession


@dataclass(frozen=True)
class UpdateScore:
    """How one silo's update counted in a round, and how it compared with the others'."""

    silo: str
    claimed_samples: int  # what its header said
    weight_share: float  # of the round's total weight, after caps (0 when a rule left it out)
    scale: float  # the norm bound's factor (1: untouched)
    norm: float  # L2 norm of the parameter deltas as sent
    cosine: float  # to the round's aggregate delta (on the coordinate sample)
    norm_zscore: float  # of its norm among the round's updates
    selected: bool  # a rule that drops whole updates (Multi-Krum) kept it

    def record(self) -> dict[str, float | int | bool]:
        return {
            "claimed_samples": self.claimed_samples,
            "weight_share": round(self.weight_share, 6),
            "scale": round(self.scale, 6),
            "norm": self.norm,
            "cosine": round(self.cosine, 6),
            "norm_zscore": round(self.norm_zscore, 4),
            "selected": self.selected,
        }


@dataclass
class _Entry:
    meta: UpdateMeta
    weight: float  # the strategy's weight for it (before the round's caps)
    scale: float
    norm: float
    row: F32  # its values at the sample coordinates, unscaled


class RoundAggregator(ABC):
    def __init__(
        self, manifest: Mapping[str, TensorInfo], strategy: Strategy, sample: CoordinateSample
    ) -> None:
        self.manifest = manifest
        self.strategy = strategy
        self.sample = sample
        self.entries: list[_Entry] = []
        self.weights: list[float] = []  # after caps, set by finish()

    def add(self, up: UploadSession) -> None:
        """Take one complete, checked update (called one at a time, outside the coordinator's lock)."""
        norm = math.sqrt(up.norm_sq)
        # The uplink stages' bound first (clip's aggregator half), then the strategy's own.
        scale = up.stage_scale * self.strategy.update_scale(norm * up.stage_scale)
        row = np.zeros(self.sample.size, dtype=np.float32)
        self._begin(up, up.weight * scale)
        try:
            for name, offset, values in up.values():
                if name in self.manifest:
                    self._take(name, offset, values)
                    self.sample.take(row, name, offset, values)
                else:
                    self.strategy.fold_extra(up.silo, up.validator.expected[name], offset, values)
        except BaseException:
            self._abandon(up)
            raise
        self.entries.append(_Entry(up.meta, up.weight, scale, norm, row))
        self._kept(up)

    @abstractmethod
    def _begin(self, up: UploadSession, factor: float) -> None: ...

    @abstractmethod
    def _take(self, name: str, offset: int, values: F32) -> None: ...

    @abstractmethod
    def _abandon(self, up: UploadSession) -> None:
        """The update's spool could not be read back to the end (a disk error: it was checked
        on arrival): leave nothing of it, or refuse to finish the round."""

    @abstractmethod
    def _kept(self, up: UploadSession) -> None:
        """The update is in; what of its files to keep."""

    @abstractmethod
    def finish(self, max_share: float) -> RoundAggregate:
        """The round's updates, ready for `strategy.apply` (call once, after the last add)."""

    @abstractmethod
    def close(self) -> None:
        """Delete what the round kept on disk."""

    def scores(self, strategy: Strategy, aggregate_row: F32 | None = None) -> list[UpdateScore]:
        """Per-update scores, after `strategy.apply` (a rule's selection is known by then)."""
        if not self.entries:
            return []
        rule = collecting_rule(strategy)
        chosen = set(rule.selected) if rule is not None else set(range(len(self.entries)))
        rows = np.stack([e.row * np.float32(e.scale) for e in self.entries])
        if aggregate_row is None:
            if rule is not None:
                aggregate_row = rule.combine(rows[sorted(chosen)])
            else:
                w = np.asarray(self.weights, dtype=np.float64)
                aggregate_row = (rows.astype(np.float64) * w[:, None]).sum(axis=0) / w.sum()
        zs = norm_zscores([e.norm for e in self.entries])
        if rule is not None:
            shares = [1.0 / len(chosen) if i in chosen else 0.0 for i in range(len(self.entries))]
        else:
            total = sum(self.weights)
            shares = [w / total for w in self.weights]
        return [
            UpdateScore(
                silo=e.meta.silo,
                claimed_samples=e.meta.claimed_samples or e.meta.num_samples,
                weight_share=shares[i],
                scale=e.scale,
                norm=e.norm,
                cosine=cosine(rows[i], aggregate_row),
                norm_zscore=zs[i],
                selected=i in chosen,
            )
            for i, e in enumerate(self.entries)
        ]


def collecting_rule(strategy: Strategy) -> CollectingRule | None:
    """The collecting rule inside a chain of wrappers, if any."""
    # mypy refuses abstract classes as type[...] arguments; isinstance() takes them.
    return wrapped(strategy, CollectingRule)  # type: ignore[type-abstract]


class StreamingAggregator(RoundAggregator):
    def __init__(
        self,
        manifest: Mapping[str, TensorInfo],
        strategy: Strategy,
        sample: CoordinateSample,
        buffers: State | None = None,
        max_share: float = 1.0,
    ) -> None:
        super().__init__(manifest, strategy, sample)
        self.total = RunningSum(manifest, buffers=buffers)
        # Without a share cap no update is ever re-weighed: its spool goes as soon as it is
        # folded, so the aggregator's disk holds at most the uploads in flight.
        self.keep_spools = max_share < 1.0
        self._factor = 0.0
        self._sessions: list[UploadSession | None] = []
        self._tainted: str | None = None

    def _begin(self, up: UploadSession, factor: float) -> None:
        self._factor = factor

    def _abandon(self, up: UploadSession) -> None:
        # Part of it may be in the sum already, and nothing can take it back out: the round
        # must not close on this sum. The aggregator restarts from the last checkpoint.
        self._tainted = f"the spool of {up.silo}'s update could not be read back"

    def _take(self, name: str, offset: int, values: F32) -> None:
        self.total.fold(name, offset, values, self._factor)

    def _kept(self, up: UploadSession) -> None:
        if self.keep_spools:
            up.seal()
            self._sessions.append(up)  # its spool stays until the close, for a re-weighing
        else:
            up.discard()
            self._sessions.append(None)

    def finish(self, max_share: float) -> RoundAggregate:
        if self._tainted:
            raise RuntimeError(f"the round's sum is incomplete: {self._tainted}")
        raw = [e.weight for e in self.entries]
        self.weights = cap_shares(raw, max_share)
        for e, up, w in zip(self.entries, self._sessions, self.weights, strict=True):
            if up is not None and not math.isclose(w, e.weight, rel_tol=1e-9):
                # Re-weigh: add (w - w_claimed) x the update, read once more from its spool.
                extra = (w - e.weight) * e.scale
                for name, offset, values in up.values():
                    if name in self.manifest:
                        self.total.fold(name, offset, values, extra)
            self.total.commit(e.meta, w)
        return self.total

    def close(self) -> None:
        kept = [up for up in self._sessions if up is not None]
        self._sessions.clear()
        _delete_in_background([up.spool for up in kept])  # sealed when kept


class CollectingAggregator(RoundAggregator):
    """Every update decoded to float32 in its own file; rules read the same block of all of them."""

    def __init__(
        self,
        manifest: Mapping[str, TensorInfo],
        strategy: Strategy,
        sample: CoordinateSample,
        folder: Path,
        buffers: State | None = None,
    ) -> None:
        super().__init__(manifest, strategy, sample)
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._buffers = buffers
        self._starts: dict[str, int] = {}
        flat = 0
        for name, info in manifest.items():
            self._starts[name] = flat
            flat += info.size
        self.size = flat
        self.files: list[Path] = []
        self._file: Path | None = None
        self._handle: BinaryIO | None = None

    def _begin(self, up: UploadSession, factor: float) -> None:
        self._file = self.folder / f"r{up.round}-{up.silo}.f32"
        f = open(self._file, "wb")  # noqa: SIM115 - closed in _kept or _abandon
        f.truncate(4 * self.size)
        self._handle = f

    def _take(self, name: str, offset: int, values: F32) -> None:
        f = self._handle
        assert f is not None
        f.seek(4 * (self._starts[name] + offset))
        f.write(np.ascontiguousarray(values, dtype="<f4").tobytes())

    def _abandon(self, up: UploadSession) -> None:
        self._close_handle()
        if self._file is not None:
            self._file.unlink(missing_ok=True)

    def _kept(self, up: UploadSession) -> None:
        self._close_handle()
        assert self._file is not None
        self.files.append(self._file)
        up.discard()  # the decoded file replaces the wire spool

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = None

    def finish(self, max_share: float) -> RoundAggregate:
        self.weights = cap_shares([e.weight for e in self.entries], max_share)
        return CollectedRound(_OnDisk(self))

    def close(self) -> None:
        files, self.files = self.files, []
        _delete_in_background(files)


def _delete_in_background(paths: list[Path]) -> None:
    """Unlinking gigabytes of round files takes a second or more: not on the round's close path."""

    def delete() -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    if paths:
        threading.Thread(target=delete, name="round-files", daemon=True).start()


class _OnDisk:
    """`CollectedUpdates` over the collecting aggregator's files."""

    def __init__(self, agg: CollectingAggregator) -> None:
        self._agg = agg
        self.metas: Sequence[UpdateMeta] = [e.meta for e in agg.entries]
        self.weights: Sequence[float] = agg.weights
        self.scales: Sequence[float] = [e.scale for e in agg.entries]
        self.manifest: Mapping[str, TensorInfo] = agg.manifest

    def rows(self, start: int, stop: int) -> F32:
        out = np.empty((len(self._agg.files), stop - start), dtype=np.float32)
        for i, path in enumerate(self._agg.files):
            out[i] = np.fromfile(path, dtype="<f4", count=stop - start, offset=4 * start)
        return out

    def output(self) -> State:
        b = self._agg._buffers
        if b is not None and set(b) == set(self.manifest):
            for v in b.values():
                v.fill(0.0)
            return {n: b[n].reshape(t.shape) for n, t in self.manifest.items()}
        return {n: np.zeros(t.shape, dtype=np.float32) for n, t in self.manifest.items()}
