"""`fedjob silo join`: an external silo on a machine without Kubernetes, from its FederatedSilo file.

It does what the operator does for a FederatedSilo in a cluster: make the silo's key here (it
never leaves this folder), enroll with the bootstrap token against the pinned CA, fetch the job
from the aggregator, add this silo's data and model path, and run `fedjob worker`, restarting it
after a crash like a Kubernetes Job would. Its certificate is renewed when a third of its
lifetime is left.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console

from fedjob.enrollment import BootstrapToken, Issued, load_key, needs_renewal
from fedjob.enrollment_client import EnrollmentFailed, enroll, fetch_job, renew
from fedjob.errors import EXIT_PERMANENT
from fedjob.silo_spec import FederatedSilo, job_for_silo
from fedjob.spec import SpecError, job_document
from fedjob.tls import CertFiles, key_pem, new_key, write_file
from fedjob_cli.local_run import Proc

RETRY_SECONDS = 5.0
RENEWAL_CHECK_SECONDS = 60.0
MAX_WAIT_SECONDS = 600.0  # for an owner that does not answer yet (its aggregator starting)


@dataclass
class SiloJoin:
    silo: FederatedSilo
    workdir: Path
    token: str | None
    max_restarts: int = 4
    console: Console = field(default_factory=Console)

    def __post_init__(self) -> None:
        s = self.silo.spec
        self.who = f"silo-{s.silo}"
        self.certs = CertFiles(self.workdir / "certs")
        self.server_name = s.aggregator.server_name or f"{s.job}-aggregator"
        self.certs.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    # ----- certificate ------------------------------------------------------------------------------

    def _key(self) -> bytes:
        # Made once and kept before enrolling: a reply lost on the way is asked again with the same
        # key, and the owner answers with the same certificate.
        path = self.certs.key(self.who)
        if not path.exists():
            write_file(path, key_pem(new_key()), 0o600)
        return path.read_bytes()

    def _held(self) -> Issued | None:
        if self.certs.ca.exists() and self.certs.cert(self.who).exists():
            return Issued(self.certs.ca.read_bytes(), self.certs.cert(self.who).read_bytes())
        return None

    def _store(self, issued: Issued) -> None:
        write_file(self.certs.ca, issued.ca_pem, 0o644)
        write_file(self.certs.cert(self.who), issued.cert_pem, 0o644)

    def _retrying(self, what: str, call: object) -> Issued:
        assert callable(call)
        end = time.time() + MAX_WAIT_SECONDS
        while True:
            try:
                result: Issued = call()
                return result
            except EnrollmentFailed as exc:
                if exc.permanent or time.time() > end:
                    raise
                self.console.print(f"[yellow]{what}: {exc}; asking again in {RETRY_SECONDS:.0f} s[/]")
                time.sleep(RETRY_SECONDS)

    def certificate(self) -> Issued:
        """Enroll if this silo holds no certificate yet; renew it when a third of its life is left."""
        s = self.silo.spec
        held = self._held()
        if held is None:
            if not self.token:
                raise EnrollmentFailed(
                    "no_token",
                    "this silo holds no certificate yet: give the bootstrap token from the job's owner "
                    "(--token-file, or FEDJOB_TOKEN)",
                    permanent=True,
                )
            token = BootstrapToken.parse(self.token)
            key = load_key(self._key())
            address = s.aggregator.enrollment()
            issued = self._retrying(
                "enrollment", lambda: enroll(address, s.job, s.silo, token, s.ca_hash, key)
            )
            self._store(issued)
            self.console.print(
                f"enrolled silo [cyan]{s.silo}[/] in job {s.job} (key kept in {self.certs.root})"
            )
            return issued
        if needs_renewal(held.cert_pem):
            fresh = new_key()
            current_key = self.certs.key(self.who).read_bytes()
            issued = self._retrying(
                "renewal",
                lambda: renew(
                    s.aggregator.address, self.server_name, held, current_key, s.job, s.silo, fresh
                ),
            )
            write_file(self.certs.key(self.who), key_pem(fresh), 0o600)
            self._store(issued)
            self.console.print("renewed this silo's certificate")
            return issued
        return held

    def _renew_quietly(self) -> None:
        """Renew while the worker runs (it picks the new certificate up at its next call); a failure
        is retried at the next check, the current certificate being valid for a third of its life."""
        try:
            self.certificate()
        except EnrollmentFailed as exc:
            self.console.print(f"[yellow]renewal: {exc}; trying again later[/]")

    # ----- the worker -------------------------------------------------------------------------------

    def run(self) -> int:
        s = self.silo.spec
        issued = self.certificate()
        doc = fetch_job(s.aggregator.address, self.server_name, issued, self.certs.key(self.who).read_bytes())
        job = job_for_silo(doc, self.silo)
        job_file = self.workdir / "job.yaml"
        job_file.write_text(yaml.safe_dump(job_document(job), sort_keys=False))
        self.console.print(
            f"silo [cyan]{s.silo}[/] joins job {job.name}: {job.spec.rounds} rounds, mode "
            f"{job.spec.training.mode}, data {s.data.path} ({s.data.format})"
        )
        (self.workdir / "logs").mkdir(exist_ok=True)
        worker = Proc(
            s.silo,
            [
                sys.executable,
                "-m",
                "fedjob_cli.main",
                "worker",
                str(job_file),
                "--silo",
                s.silo,
                "--certs",
                str(self.certs.root),
                "--aggregator",
                s.aggregator.address,
                "--server-name",
                self.server_name,
                "--state",
                str(self.workdir / "state"),
            ],
            self.workdir / "logs" / "worker.log",
            env=dict(os.environ),
        )
        while True:
            worker.start()
            checked = time.monotonic()
            while worker.poll() is None:
                time.sleep(0.5)
                if time.monotonic() - checked > RENEWAL_CHECK_SECONDS:
                    checked = time.monotonic()
                    self._renew_quietly()
            rc = worker.poll()
            worker.stop()
            if rc == 0:
                self.console.print(f"silo {s.silo}: the job has ended; log in {worker.log_path}")
                return 0
            if rc == EXIT_PERMANENT:
                reason = worker.permanent_failure() or ""
                self.console.print(f"[red]silo {s.silo} cannot run (no restart can fix it): {reason}[/]")
                return EXIT_PERMANENT
            if worker.restarts >= self.max_restarts:
                self.console.print(
                    f"[red]silo {s.silo}: worker failed {worker.restarts + 1} times; giving up[/]"
                )
                return 1
            worker.restarts += 1
            self.certificate()  # a certificate near its end is renewed before the next try
            wait = min(10 * 2 ** (worker.restarts - 1), 300)
            self.console.print(
                f"[yellow]worker exited with {rc}; restarting in {wait} s ({worker.restarts})[/]"
            )
            time.sleep(wait)


def join(silo: FederatedSilo, workdir: Path, token: str | None, console: Console) -> int:
    try:
        return SiloJoin(silo, workdir, token, console=console).run()
    except EnrollmentFailed as exc:
        console.print(f"[red]cannot join: {exc.reason}: {exc.message}[/]")
        return EXIT_PERMANENT if exc.permanent else 1
    except (SpecError, ValueError) as exc:
        console.print(f"[red]cannot join: {exc}[/]")
        return EXIT_PERMANENT
