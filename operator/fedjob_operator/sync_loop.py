"""The operator's periodic sync, without a Kopf timer.

Every few seconds each FederatedJob and FederatedSilo the operator watches is reconciled again:
status follows the aggregator, enrollments are answered, lost children are made again. A Kopf
timer would do that per object, but Kopf puts a finalizer on every object a timer serves: a job
could then not be deleted while the operator is down, and in a rare race the finalizer stays
after the timer stopped (kopf#1305), keeping the deleted job, and the tokens it owns, forever.

So the watch only keeps a list of the objects it has seen (`Known`, fed by Kopf's event
handlers, which need no finalizer), and one thread (`SyncLoop`) walks that list and syncs each
object on a pool thread, one sync per object at a time: it reads the object afresh, skips one
being deleted, reconciles it into a patch and writes the patch's status with a merge patch, as
Kopf would.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fedjob.crd import GROUP, VERSION

log = logging.getLogger("fedjob.operator")

Reconcile = Callable[[dict[str, Any], kopf.Patch], None]
Key = tuple[str, str, str]  # plural, namespace, name


class Known:
    """The objects the watch has seen and not yet seen deleted, with when each was first seen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._first_seen: dict[Key, float] = {}

    def saw(self, plural: str, event: dict[str, Any], body: dict[str, Any]) -> None:
        key = (plural, body["metadata"]["namespace"], body["metadata"]["name"])
        with self._lock:
            if event.get("type") == "DELETED":
                self._first_seen.pop(key, None)
            else:
                self._first_seen.setdefault(key, time.monotonic())

    def forget(self, key: Key) -> None:
        with self._lock:
            self._first_seen.pop(key, None)

    def snapshot(self, settled: float = 0.0) -> list[Key]:
        """The objects first seen at least `settled` seconds ago (a new one is still being
        handled by its creation handler)."""
        now = time.monotonic()
        with self._lock:
            return sorted(k for k, t in self._first_seen.items() if now - t >= settled)


class SyncLoop(threading.Thread):
    def __init__(
        self,
        known: Known,
        reconcilers: dict[str, Reconcile],
        interval: float,
        custom: Callable[[], client.CustomObjectsApi],
        workers: int = 16,
    ) -> None:
        super().__init__(name="fedjob-sync", daemon=True)
        self.known = known
        self.reconcilers = reconcilers
        self.interval = interval
        self.custom = custom
        self.stopped = threading.Event()
        self.workers = workers
        self._lock = threading.Lock()
        self._in_flight: set[Key] = set()
        self._due: set[Key] = set()
        self._wake = threading.Event()

    def poke(self, key: Key) -> None:
        """Sync this object now, not at the next tick: one of its children changed (a silo's pod
        failed, and its retry must be stopped before it runs)."""
        with self._lock:
            self._due.add(key)
        self._wake.set()

    def run(self) -> None:
        # Each object syncs on its own thread, as a Kopf timer would: one whose aggregator does
        # not answer (seconds of gRPC timeouts) must not hold up another's.
        with ThreadPoolExecutor(self.workers, thread_name_prefix="fedjob-sync") as pool:
            next_tick = time.monotonic() + self.interval
            while not self.stopped.is_set():
                self._wake.wait(max(0.0, next_tick - time.monotonic()))
                self._wake.clear()
                with self._lock:
                    keys, self._due = self._due, set()
                if time.monotonic() >= next_tick:
                    keys.update(self.known.snapshot(settled=self.interval))
                    next_tick = time.monotonic() + self.interval
                for key in sorted(keys):
                    with self._lock:
                        if key in self._in_flight:  # still at its previous sync: once more after it
                            self._due.add(key)
                            continue
                        self._in_flight.add(key)
                    pool.submit(self._sync_one, key)

    def _sync_one(self, key: Key) -> None:
        try:
            if not self.stopped.is_set():
                self.sync(key)
        except Exception:  # one object's trouble must not stop the others' sync
            log.exception("sync of %s %s/%s failed; retried in %.0f s", *key, self.interval)
        finally:
            with self._lock:
                self._in_flight.discard(key)
                if key in self._due:
                    self._wake.set()

    def sync(self, key: Key) -> None:
        plural, ns, name = key
        api = self.custom()
        try:
            raw: Any = api.get_namespaced_custom_object(GROUP, VERSION, ns, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                self.known.forget(key)
                return
            raise
        body = dict(raw)
        if body["metadata"].get("deletionTimestamp"):
            return  # its children go with it (owner references); nothing to keep up
        patch = kopf.Patch()
        try:
            self.reconcilers[plural](body, patch)
        except kopf.TemporaryError as exc:
            log.info("%s %s/%s: %s; again in %.0f s", plural, ns, name, exc, self.interval)
            return
        status = patch.get("status")
        if status:
            try:
                api.patch_namespaced_custom_object_status(
                    GROUP, VERSION, ns, plural, name, {"status": status}
                )
            except ApiException as exc:
                if exc.status != 404:  # deleted meanwhile
                    raise

    def stop(self) -> None:
        self.stopped.set()
        self._wake.set()
