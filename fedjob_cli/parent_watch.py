"""Components started by `fedjob run` stop when it dies, even by SIGKILL.

`fedjob run` gives each component its own process group (so Ctrl-C reaches only itself), which also
means nothing stops them if it is killed outright (`kill -9`, the OOM killer, a CI runner's hard
timeout): they would keep their ports, their GPUs and the CPU. Each component therefore watches its
parent and sends itself SIGTERM, the signal a pod gets, when the parent is gone. Pods started by
Kubernetes do not set the variable and are unaffected.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

ENV = "FEDJOB_PARENT_PID"
log = logging.getLogger("fedjob.cli")


def watch_parent_from_env(interval: float = 1.0) -> threading.Thread | None:
    """Start the watch when `fedjob run` asked for it; returns the watching thread."""
    value = os.environ.pop(ENV, None)  # not inherited further (a silo's ranks have their own parent)
    if not value:
        return None
    parent = int(value)
    thread = threading.Thread(target=_watch, args=(parent, interval), name="parent-watch", daemon=True)
    thread.start()
    return thread


def _watch(parent: int, interval: float) -> None:
    # An orphan is re-parented (to init or a subreaper), so a changed parent pid means ours died.
    while os.getppid() == parent:
        time.sleep(interval)
    log.warning("fedjob run (pid %d) is gone; stopping", parent)
    os.kill(os.getpid(), signal.SIGTERM)
