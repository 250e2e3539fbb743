"""Who may hold one of the server's handler threads, how many at once, and for how long.

The gRPC server runs each call on a thread from a fixed pool, and a streaming call
holds its thread while it waits for the client's next message. Without limits, one
certified silo that opens streams and never writes to them exhausts the pool:
honest uploads, `GetStatus` and health checks then wait. Two rules prevent that:

- **admission**: each caller identity may run at most a fixed number of calls of
  each kind at once (one upload, one download, two others per silo); a call over
  its limit is refused at once, before it waits on anything. The pool is sized to
  the sum of the limits plus a reserve for status callers, so no silo can take a
  thread another caller is owed;
- **idle streams**: an upload whose header or next chunk does not come within its
  deadline is cancelled, which frees the thread even when the client just stopped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

# Concurrent calls per caller identity and kind. "other": Join, GetTask (a long poll),
# QueryUpload, ReportEvaluation; "status": GetStatus from any identity of the job.
SILO_LIMITS: Mapping[str, int] = {"upload": 1, "download": 1, "other": 2}
STATUS_LIMIT = 4
STATUS_RESERVE = 16  # handler threads kept for status callers (operator, CLI, dashboards)


def pool_size(num_silos: int) -> int:
    """Handler threads: every silo at its limits, plus the status reserve."""
    return num_silos * sum(SILO_LIMITS.values()) + STATUS_RESERVE


class TooManyCalls(Exception):
    def __init__(self, identity: str, kind: str, limit: int) -> None:
        super().__init__(f"{identity} already has {limit} {kind} call(s) open; at most {limit} at once")
        self.identity = identity
        self.kind = kind


class Admission:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], int] = {}

    @staticmethod
    def limit(kind: str) -> int:
        return STATUS_LIMIT if kind == "status" else SILO_LIMITS[kind]

    def acquire(self, identity: str, kind: str) -> None:
        """Take one of `identity`'s `kind` slots, or raise TooManyCalls at once."""
        key, limit = (identity, kind), self.limit(kind)
        with self._lock:
            if self._open.get(key, 0) >= limit:
                raise TooManyCalls(identity, kind, limit)
            self._open[key] = self._open.get(key, 0) + 1

    def release(self, identity: str, kind: str) -> None:
        key = (identity, kind)
        with self._lock:
            self._open[key] -= 1
            if not self._open[key]:
                del self._open[key]


class Cancellable(Protocol):
    def cancel(self) -> None: ...


@dataclass
class _Watched:
    call: Cancellable
    deadline: float
    why: str = ""
    cancelled: bool = False


@dataclass
class IdleWatch:
    """Cancels streams that go quiet: `header_seconds` for the first message, `idle_seconds` after."""

    header_seconds: float = 30.0
    idle_seconds: float = 120.0
    tick: float = 1.0
    _streams: dict[int, _Watched] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="idle-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @contextmanager
    def watching(self, call: Cancellable) -> Iterator[StreamClock]:
        key = id(call)
        with self._lock:
            self._streams[key] = _Watched(call, time.monotonic() + self.header_seconds, "no header")
        try:
            yield StreamClock(self, key)
        finally:
            with self._lock:
                self._streams.pop(key, None)

    def _touch(self, key: int) -> None:
        with self._lock:
            w = self._streams.get(key)
            if w is not None:
                w.deadline, w.why = time.monotonic() + self.idle_seconds, "no chunk"

    def _cancelled(self, key: int) -> bool:
        with self._lock:
            w = self._streams.get(key)
            return w is not None and w.cancelled

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            with self._lock:
                late = [w for w in self._streams.values() if w.deadline <= now]
            for w in late:
                w.cancelled = True  # before the cancel: the handler reads it once its read ends
                w.call.cancel()  # the handler's next read raises; its finally blocks free the slot


@dataclass
class StreamClock:
    watch: IdleWatch
    key: int

    def touch(self) -> None:
        """A message arrived: the stream has `idle_seconds` again."""
        self.watch._touch(self.key)

    @property
    def cancelled(self) -> bool:
        """The watch cancelled this stream for going quiet."""
        return self.watch._cancelled(self.key)
