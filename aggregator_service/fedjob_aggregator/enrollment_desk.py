"""Where enrollment and renewal requests wait for the job's owner, and which silo certificates are current.

The aggregator never holds the CA key. A request that arrives here waits until the observer that
does (the operator, or `fedjob run`) takes it with SyncEnrollments, checks and signs it, and hands
the outcome back on its next sync (every few seconds). Each request is handed out once: an answer
lost with a crashed operator times the request out and the silo asks again.

The same sync carries every external silo's current certificate serial and the revoked silos:
the servicer refuses any other certificate of theirs from the next call on. They are kept on the
aggregator's volume, so a restarted aggregator enforces them before the first sync.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fedjob.checkpoint import atomic_write
from fedjob.v1 import fedjob_pb2 as pb

log = logging.getLogger("fedjob.aggregator")
MAX_WAITING = 64  # requests waiting at once; more are refused RESOURCE_EXHAUSTED


class DeskFull(Exception):
    pass


class NoAnswer(Exception):
    """The job's owner did not answer within the wait (no operator running, or it lost the request)."""


@dataclass
class _Waiting:
    request: pb.PendingEnrollment
    handed_out: bool = False
    outcome: pb.EnrollmentOutcome | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Ledger:
    valid: frozenset[tuple[str, str]]  # (external silo, serial in hex) of the certificates that may call
    revoked: frozenset[str]


class EnrollmentDesk:
    def __init__(self, path: Path | None, external: Iterable[str], revoked: Iterable[str] = ()) -> None:
        """`revoked`: the spec's revokedSilos, enforced until the owner's first sync says more."""
        self.path = path
        self.external = frozenset(external)
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiting] = {}
        self.ledger = Ledger(frozenset(), frozenset(revoked))
        if path is not None and path.exists():
            saved = json.loads(path.read_text())
            self.ledger = Ledger(frozenset((s, n) for s, n in saved["valid"]), frozenset(saved["revoked"]))

    def submit(self, request: pb.PendingEnrollment, wait_seconds: float) -> pb.EnrollmentOutcome:
        request_id = uuid.uuid4().hex
        request.request_id = request_id
        entry = _Waiting(request)
        with self._lock:
            if len(self._waiting) >= MAX_WAITING:
                raise DeskFull(f"{MAX_WAITING} enrollment requests are already waiting")
            self._waiting[request_id] = entry
        try:
            if not entry.done.wait(wait_seconds) or entry.outcome is None:
                raise NoAnswer(
                    f"the job's owner did not answer within {wait_seconds:.0f} s (is its operator running?); "
                    "ask again"
                )
            return entry.outcome
        finally:
            with self._lock:
                self._waiting.pop(request_id, None)

    def sync(self, sync: pb.EnrollmentSync) -> pb.PendingEnrollments:
        """Apply the owner's outcomes and ledger; hand out the requests it has not seen yet."""
        ledger = Ledger(frozenset((c.silo, c.serial) for c in sync.certificates), frozenset(sync.revoked))
        if ledger != self.ledger and self.path is not None:
            atomic_write(
                self.path,
                json.dumps({"valid": sorted(ledger.valid), "revoked": sorted(ledger.revoked)}).encode(),
            )
        if ledger != self.ledger:
            for silo in ledger.revoked - self.ledger.revoked:
                log.warning("silo %s is revoked: its calls are refused from now on", silo)
            self.ledger = ledger
        out = pb.PendingEnrollments()
        with self._lock:
            for outcome in sync.outcomes:
                entry = self._waiting.get(outcome.request_id)
                if entry is not None:
                    entry.outcome = outcome
                    entry.done.set()
            for entry in self._waiting.values():
                if not entry.handed_out:
                    entry.handed_out = True
                    out.requests.append(entry.request)
        return out

    def refusal(self, silo: str, serial: str) -> str | None:
        """Why a silo's certificate may not call (revoked, or not its current one); None if it may."""
        if silo in self.ledger.revoked:
            return f"revoked: silo {silo!r} is revoked from this job"
        if silo in self.external and (silo, serial) not in self.ledger.valid:
            return (
                f"superseded: certificate {serial} is not a valid certificate of silo {silo!r} "
                "(a later enrollment replaced it, or it expired)"
            )
        return None
