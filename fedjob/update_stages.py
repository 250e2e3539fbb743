"""Update stages: what happens to a whole update between training and the wire, on both sides.

A silo's update (its parameter deltas for one round) runs through an ordered chain
of stages from `spec.compression.uplink` before the wire codec chunks and encodes
it: each stage is a small class with one job and, where it needs one, its own
state (top-k's error-feedback residual), checkpointed with the silo. NVFlare's
`DXOFilter` chains and Flower's client mods are the pattern.

Each stage also has its aggregator half, an `UpdateCheck` made fresh for every
upload: it sees the decoded values as they arrive and, once the upload is whole,
says how the update may count (a scale) or refuses it. The aggregator never
trusts the silo half to have run: `clip` is re-applied to what arrived, `topk`'s
density is counted. Both halves of an algorithm live together, here.

A stage's state changes in memory for the round in flight; `fedjob.stage_state`
commits it once the aggregator accepted the update and rolls it back otherwise.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedjob.chunking import State, TensorInfo, iter_chunks
from fedjob.codec import F32, BFloat16, BlockQuantizer, Codec, Float16, Payload, Quantizer, RawFloat32, Zstd
from fedjob.spec import CompressionSpec, UplinkStageSpec


class UpdateRejected(Exception):
    """A whole update breaks a stage's rule; `reason` is a short label (metrics use it)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Update:
    """One silo's update for one round, whole."""

    round: int
    deltas: State  # the parameter deltas: what the stages transform and norms measure
    extras: State = field(default_factory=dict)  # an algorithm's own tensors (SCAFFOLD's), untouched

    def norm(self) -> float:
        return math.sqrt(sum(_sum_sq(v) for v in self.deltas.values()))


def _sum_sq(values: F32) -> float:
    flat = values.reshape(-1)
    return float(np.einsum("i,i->", flat, flat, dtype=np.float64))


class UpdateCheck(ABC):
    """A stage's aggregator half for one upload: sees the decoded parameter values, then decides."""

    def observe(self, name: str, offset: int, values: F32) -> None:  # noqa: B027 - optional hook
        """One decoded slice of a parameter delta, in stream order."""

    @abstractmethod
    def finish(self, norm: float) -> float:
        """The upload is whole (its L2 norm as received): the factor it counts with, or raise
        `UpdateRejected`."""


class UplinkStage(ABC):
    """One step of the silo's uplink chain."""

    kind: str  # its name in spec.compression.uplink

    @abstractmethod
    def apply(self, update: Update) -> None:
        """Transform `update.deltas` in place (and the stage's state, uncommitted)."""

    def state(self) -> State:
        """What must survive a silo restart (committed by the pipeline)."""
        return {}

    def load_state(self, state: State) -> None:  # noqa: B027 - stateless by default
        """Restore what `state()` returned."""

    def check(self, manifest: Mapping[str, TensorInfo]) -> UpdateCheck | None:
        """The aggregator half for one upload, or None when there is nothing to verify."""
        return None

    def describe(self) -> str:
        return self.kind


# ----- clip ---------------------------------------------------------------------------------------


class ClipNorm(UplinkStage):
    """Scale the whole update down to L2 norm `max_norm` (a bound on any one silo's pull).

    Aggregator half: the same bound on what arrived, so a silo that skips its half (or
    whose codec's rounding added a little) still counts with norm at most `max_norm`.
    """

    kind = "clip"

    def __init__(self, max_norm: float) -> None:
        if not max_norm > 0:
            raise ValueError("clip: maxNorm must be > 0")
        self.max_norm = max_norm
        self.last_norm = 0.0  # before clipping, for the silo's log

    def apply(self, update: Update) -> None:
        self.last_norm = update.norm()
        if self.last_norm > self.max_norm:
            factor = np.float32(self.max_norm / self.last_norm)
            for v in update.deltas.values():
                v *= factor

    def check(self, manifest: Mapping[str, TensorInfo]) -> UpdateCheck:
        return _NormClip(self.max_norm)

    def describe(self) -> str:
        return f"clip(maxNorm={self.max_norm:g})"


class _NormClip(UpdateCheck):
    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def finish(self, norm: float) -> float:
        return 1.0 if norm <= self.max_norm else self.max_norm / norm


# ----- top-k with error feedback ------------------------------------------------------------------


def topk_count(size: int, fraction: float) -> int:
    """Values kept of a tensor of `size` (at least one)."""
    return max(1, min(size, math.ceil(fraction * size)))


class TopK(UplinkStage):
    """Send only the largest `fraction` of each tensor's values; keep the rest for later.

    With error feedback (Stich et al. 2018; Karimireddy et al. 2019) what is not sent
    is added to the next round's update instead of being lost, so over rounds every
    coordinate's mass arrives: the residual is the stage's state, one float32 per
    parameter, kept on the silo and restored after a restart. The update stays dense
    on the wire (zeros where nothing is sent), which zstd shrinks; a sparse wire
    format is the codec's business.

    With `block`, the largest `fraction` of every block of `block` consecutive values
    is kept instead (chunked top-k, as in SparseLoCo): the selection is spread over the
    whole tensor rather than concentrated where its values are largest.

    Aggregator half: each tensor may carry at most its k non-zero values.
    """

    kind = "topk"

    def __init__(self, fraction: float, error_feedback: bool = True, block: int | None = None) -> None:
        if not 0 < fraction <= 1:
            raise ValueError("topk: fraction must be in (0, 1]")
        if block is not None and block < 2:
            raise ValueError("topk: block must be at least 2")
        self.fraction = fraction
        self.error_feedback = error_feedback
        self.block = block
        self.residual: State = {}

    def limit(self, size: int) -> int:
        """The most values this stage sends of a tensor of `size`."""
        if self.block is None or self.block >= size:
            return topk_count(size, self.fraction)
        return -(-size // self.block) * topk_count(self.block, self.fraction)

    def apply(self, update: Update) -> None:
        for name, v in update.deltas.items():
            flat = v.reshape(-1)
            if self.error_feedback:
                r = self.residual.get(name)
                if r is None or r.shape != flat.shape:
                    r = self.residual[name] = np.zeros(flat.shape, dtype=np.float32)
                r += flat  # the accumulated update: this round's delta plus what is owed
                acc = r
            else:
                acc = flat
            if self.block is not None and self.block < flat.size:
                self._select_blocks(acc, flat)
            else:
                k = topk_count(flat.size, self.fraction)
                if k < flat.size:
                    keep = np.argpartition(np.abs(acc), flat.size - k)[flat.size - k :]
                    kept = acc[keep]  # a copy: without error feedback `acc` is `flat` itself
                    flat[:] = 0.0
                    flat[keep] = kept
                else:
                    flat[:] = acc
            if self.error_feedback:
                acc -= flat  # what is sent leaves the residual; the rest waits

    def _select_blocks(self, acc: F32, out: F32) -> None:
        """Per block of `self.block` values (the last one zero-padded), keep the k largest."""
        assert self.block is not None
        b, n = self.block, acc.size
        k = topk_count(b, self.fraction)
        rows = np.zeros(-(-n // b) * b, dtype=np.float32)
        rows[:n] = acc
        rows2 = rows.reshape(-1, b)
        keep = np.argpartition(np.abs(rows2), b - k, axis=1)[:, b - k :]
        chosen = np.zeros_like(rows2)
        np.put_along_axis(chosen, keep, np.take_along_axis(rows2, keep, axis=1), axis=1)
        out[:] = chosen.reshape(-1)[:n]

    def state(self) -> State:
        return dict(self.residual) if self.error_feedback else {}

    def load_state(self, state: State) -> None:
        self.residual = {n: np.ascontiguousarray(v, dtype=np.float32).reshape(-1) for n, v in state.items()}

    def check(self, manifest: Mapping[str, TensorInfo]) -> UpdateCheck:
        return _Density({n: self.limit(t.size) for n, t in manifest.items()})

    def describe(self) -> str:
        ef = "" if self.error_feedback else ", no error feedback"
        per = f", block={self.block}" if self.block is not None else ""
        return f"topk(fraction={self.fraction:g}{per}{ef})"


class _Density(UpdateCheck):
    def __init__(self, limit: dict[str, int]) -> None:
        self.limit = limit
        self.nonzero: dict[str, int] = {}

    def observe(self, name: str, offset: int, values: F32) -> None:
        count = self.nonzero.get(name, 0) + int(np.count_nonzero(values))
        self.nonzero[name] = count
        if count > self.limit[name]:
            # Refused while it streams: a dense update would otherwise count as a sparse one.
            raise UpdateRejected(
                "too_dense",
                f"{name}: more than {self.limit[name]} non-zero values; the job's topk sends at most that",
            )

    def finish(self, norm: float) -> float:
        return 1.0


# ----- the chain ----------------------------------------------------------------------------------


class UplinkPipeline:
    """The silo's ordered stages, and their aggregator halves."""

    def __init__(self, stages: Sequence[UplinkStage]) -> None:
        kinds = [s.kind for s in stages]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"uplink stages repeat: {kinds}")
        self.stages = list(stages)
        self.committed_round = 0  # the last round whose update the aggregator accepted

    @property
    def name(self) -> str:
        return " -> ".join(s.describe() for s in self.stages) or "none"

    @property
    def stateful(self) -> bool:
        return any(isinstance(s, TopK) and s.error_feedback for s in self.stages)

    def apply(self, update: Update) -> None:
        for stage in self.stages:
            stage.apply(update)

    def owe_wire_error(self, update: Update, codec: Codec, chunk_bytes: int, seed: int) -> None:
        """Error feedback owes what the codec's rounding takes away, too, not only what top-k left.

        Encodes the update exactly as the upload will (same chunks, same seed: the same
        bytes), decodes it as the aggregator will, and adds the difference to the
        residual, so over rounds the aggregator receives the whole of every update.
        """
        owed = [s for s in self.stages if isinstance(s, TopK) and s.error_feedback]
        if not owed:
            return
        residual = owed[-1].residual
        for chunk in iter_chunks(update.deltas, codec, chunk_bytes, np.random.default_rng(seed)):
            received = codec.decode(Payload(chunk.payload, list(chunk.params)), chunk.count)
            name, lo, hi = chunk.tensor.name, chunk.offset, chunk.offset + chunk.count
            sent = update.deltas[name].reshape(-1)[lo:hi]
            residual[name][lo:hi] += sent - received

    def checks(self, manifest: Mapping[str, TensorInfo]) -> list[UpdateCheck]:
        """Fresh aggregator halves for one upload of the parameter deltas in `manifest`."""
        return [c for s in self.stages if (c := s.check(manifest)) is not None]

    def state(self) -> State:
        return {f"{i}.{s.kind}/{n}": v for i, s in enumerate(self.stages) for n, v in s.state().items()}

    def load_state(self, state: State) -> None:
        for i, s in enumerate(self.stages):
            prefix = f"{i}.{s.kind}/"
            s.load_state({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

    def fingerprint(self) -> str:
        """Identifies the chain's configuration: a state saved by another chain is not loaded."""
        return hashlib.sha256(self.name.encode()).hexdigest()[:16]


def uplink_from_spec(stages: Sequence[UplinkStageSpec]) -> UplinkPipeline:
    """The whole-update stages `spec.compression.uplink` names, in its order."""
    out: list[UplinkStage] = []
    for st in stages:
        if st.clip is not None:
            out.append(ClipNorm(st.clip.max_norm))
        elif st.topk is not None:
            out.append(TopK(st.topk.fraction, st.topk.error_feedback, st.topk.block_size))
    return UplinkPipeline(out)


def uplink_codec(compression: CompressionSpec) -> Codec:
    """How the uplink's slices are encoded: the encoding stages of `uplink`, or `codec` and `zstd`.

    A chain with top-k sends its slices in the sparse layout.
    """
    wire = [st for st in compression.uplink if st.clip is None and st.topk is None]
    if not wire:
        sparse = any(st.topk is not None for st in compression.uplink)
        legacy = Codec.from_spec(compression.codec, compression.zstd)
        return Codec(legacy.quantizer, legacy.byte_stages, sparse)
    return chain_codec(compression.uplink, compression.uplink_error_feedback)


def chain_codec(stages: Sequence[UplinkStageSpec], error_feedback: bool) -> Codec:
    """The encoding a chain's stages name: sparse after top-k, its number format (raw if none), zstd.

    `error_feedback`: whether what the encoding rounds away is owed to later rounds, which
    makes nearest the rounding `auto` picks.
    """
    sparse = any(st.topk is not None for st in stages)
    wire = [st for st in stages if st.clip is None and st.topk is None]
    quantizer: Quantizer = RawFloat32()
    byte_stages: list[Zstd] = []
    for st in wire:
        if st.quantize is not None:
            rounding = st.quantize.rounding
            if rounding == "auto":
                rounding = "nearest" if error_feedback else "stochastic"
            quantizer = BlockQuantizer(st.quantize.bits, st.quantize.block_size, rounding)
        elif st.fp16 is not None:
            quantizer = Float16()
        elif st.bf16 is not None:
            quantizer = BFloat16()
        elif st.zstd is not None:
            byte_stages.append(Zstd(level=st.zstd.level))
    return Codec(quantizer, byte_stages, sparse)
