"""No stale build lock can hang a silo.

DeepSpeed compiles its CPU communication op once into a cache shared by every job
(TORCH_EXTENSIONS_DIR), under a lock file that torch's FileBaton waits on with no
timeout. A process stopped mid-build leaves the lock behind, and every later silo
would wait on it forever, silently. While a silo starts, `StaleLockWatch` looks at
each extension's lock: a lock whose build folder has shown no progress for
`stale_after` seconds (no file written: a real build writes its objects and ninja's
log as it goes) is removed with a warning, and the waiting build goes ahead.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger("fedjob.worker")
# A real build writes an object file or ninja's log at least every minute or so.
STALE_AFTER_ENV = "FEDJOB_STALE_LOCK_SECONDS"


class StaleLockWatch:
    def __init__(self, root: Path, stale_after: float | None = None, every: float = 2.0) -> None:
        self.root = root
        self.stale_after = (
            stale_after if stale_after is not None else float(os.environ.get(STALE_AFTER_ENV, "180"))
        )
        self.every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> list[Path]:
        """Remove the stale locks now; returns them."""
        removed = []
        now = time.time()
        for lock in self.root.glob("*/lock"):
            try:
                last = max(p.stat().st_mtime for p in lock.parent.rglob("*"))
            except (OSError, ValueError):  # the lock went away while we looked
                continue
            if now - last < self.stale_after:
                continue
            try:
                lock.unlink()
            except FileNotFoundError:
                continue
            removed.append(lock)
            log.warning(
                "removed a stale build lock %s: nothing in %s changed for %.0f s (a build stopped "
                "mid-way left it); building again",
                lock,
                lock.parent,
                now - last,
            )
        return removed

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sweep()

    def __enter__(self) -> StaleLockWatch:
        self.sweep()
        self._thread = threading.Thread(target=self._run, name="stale-lock-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def extensions_dir() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
