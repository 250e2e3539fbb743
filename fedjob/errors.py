"""Failures that no restart can fix, and the exit code that says so.

A component that meets one (a spec the checkpoint was not made with, a model or data
it cannot use) exits with `EXIT_PERMANENT` and a one-line reason instead of being
restarted in a loop: `fedjob run` stops at once and prints the reason, and in a cluster
the reason is the container's termination message, which the operator puts in the
FederatedJob's Failed condition.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

EXIT_PERMANENT = 2
# Where the reason goes: the container's terminationMessagePath in a pod (the operator sets
# it), a file in the run's logs folder under `fedjob run`.
TERMINATION_LOG_ENV = "FEDJOB_TERMINATION_LOG"


class PermanentError(Exception):
    """`reason` is a CamelCase label (for conditions and metrics), the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


def write_termination_message(text: str) -> None:
    """Leave the reason where the process's supervisor reads it (4 KiB, as Kubernetes keeps)."""
    path = os.environ.get(TERMINATION_LOG_ENV)
    if not path:
        return
    with contextlib.suppress(OSError):  # the reason is on stderr too
        Path(path).write_text(text[-4096:], encoding="utf-8")
