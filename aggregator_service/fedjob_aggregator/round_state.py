"""What the aggregator knows about the open round and each silo: plain records, and the refusal type.

The coordinator (round policy) and the upload protocol share these under the
coordinator's lock; neither keeps round state of its own.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from fedjob.aggregation import UpdateMeta
from fedjob_aggregator.round_aggregators import RoundAggregator, UpdateScore
from fedjob_aggregator.upload_session import UploadSession

log = logging.getLogger("fedjob.aggregator")


class Refused(Exception):
    """A request that breaks a protocol rule; `code` names the gRPC status to answer with."""

    def __init__(self, code: str, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.reason = reason
        self.detail = detail


@dataclass
class SiloState:
    state: str = "absent"
    last_round: int = 0
    last_train_loss: float = math.nan
    bytes_up: int = 0
    bytes_down: int = 0
    last_score: UpdateScore | None = None
    scored_round: int = 0
    progress: str = ""  # within the open round, as the silo last reported it


@dataclass
class RoundState:
    number: int
    opened: float
    deadline: float
    aggregator: RoundAggregator
    sampled: frozenset[str]  # the silos that take part (aggregation.silosPerRound; else all)
    reported: dict[str, UpdateMeta] = field(default_factory=dict)
    in_flight: dict[str, UploadSession] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    raw_up: int = 0
    rejected: int = 0
    clock_started: bool = True
    folding: int = 0  # completed uploads being folded into the sum right now
    closing: bool = False  # the close has begun: no new downloads or uploads
    evaluation_only: bool = False  # after the last round: silos evaluate the final model

    def evaluations(self) -> dict[str, tuple[float, int]]:
        """silo: (held-out loss, windows) of the silos that evaluated (in their header, or reported)."""
        return {m.silo: (m.eval_loss, m.eval_samples) for m in self.reported.values() if m.eval_samples}

    def drop(self, up: UploadSession, silo: SiloState, why: str) -> None:
        """Drop an unfinished upload: nothing of it was folded, so its spool is all there is."""
        up.discard()
        self.in_flight.pop(up.silo, None)
        silo.state = "rejected"
        log.warning("round %d: dropped the upload of %s: %s", self.number, up.silo, why)
