"""How a silo's worker ended, in the words its supervisor reads after the aggregator is gone.

A worker that leaves because the job ended writes this record as its termination message. In a
silo's own cluster the aggregator stops with the job, so the last look the silo's operator took
at it may be a round old; the worker's own record is what the FederatedSilo's status ends with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fedjob.errors import write_termination_message

_KIND = "fedjob.io/silo-outcome"


@dataclass(frozen=True)
class SiloOutcome:
    round: int  # the last round the job completed
    total_rounds: int
    job_phase: str  # Succeeded or Failed, as the aggregator said

    def to_message(self) -> str:
        return json.dumps(
            {"kind": _KIND, "round": self.round, "totalRounds": self.total_rounds, "jobPhase": self.job_phase}
        )

    def write(self) -> None:
        write_termination_message(self.to_message())

    @classmethod
    def from_message(cls, text: str) -> SiloOutcome | None:
        """None for anything else a termination message may hold (a failure's reason, a log tail)."""
        try:
            doc = json.loads(text)
        except ValueError:
            return None
        if not isinstance(doc, dict) or doc.get("kind") != _KIND:
            return None
        rnd, total, phase = doc.get("round"), doc.get("totalRounds"), doc.get("jobPhase")
        if not (isinstance(rnd, int) and isinstance(total, int) and isinstance(phase, str)):
            return None
        return cls(rnd, total, phase)
