"""`fedjob run`: the aggregator and every silo as local processes on loopback, with mTLS and a live view.

Each component runs exactly the command its Kubernetes pod would run
(`fedjob aggregator`, `fedjob worker`), so a local run exercises the same code.
The aggregator is supervised: if it dies it is restarted on the same port and
resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import yaml
from fedjob_worker.runner import free_port
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from fedjob.enrollment import Authority, FileRegistry, exchange, new_token_record
from fedjob.errors import EXIT_PERMANENT, TERMINATION_LOG_ENV
from fedjob.modeling import result_folder
from fedjob.spec import FederatedJob, SpecError, identity_differences, job_document, load_job, state_identity
from fedjob.tls import KeyPair, ca_hash, write_job_certs
from fedjob.tokenization import load_tokenizer
from fedjob.update_stages import uplink_codec
from fedjob.uplink import job_uplink
from fedjob.v1 import fedjob_pb2 as pb
from fedjob.v1 import fedjob_pb2_grpc as pb_grpc
from fedjob_cli.parent_watch import ENV as PARENT_ENV

DEFAULT_MAX_RESTARTS = 10


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    restarts: int = 0

    env: dict[str, str] | None = None
    exited_at: float | None = None

    @property
    def reason_path(self) -> Path:
        """Where the component leaves the reason of a failure no restart can fix (exit code 2), or
        a silo its outcome (read only on exit code 2)."""
        return self.log_path.with_suffix(".reason")

    def permanent_failure(self) -> str | None:
        """Its one-line reason, when it exited with EXIT_PERMANENT."""
        if self.poll() != EXIT_PERMANENT:
            return None
        try:
            return self.reason_path.read_text(encoding="utf-8").strip() or "(no reason given)"
        except OSError:
            return "(no reason given; see its log)"

    def start(self) -> None:
        self._sweep()  # what a crashed predecessor left behind (the ranks of a killed silo)
        self.reason_path.unlink(missing_ok=True)
        self.env = {**(self.env or os.environ), TERMINATION_LOG_ENV: str(self.reason_path)}
        if self.log:
            self.log.close()
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        # Its own process group, like a pod: stopping it reaches every process it started, and
        # Ctrl-C reaches only `fedjob run`, which then stops the components in order.
        self.popen = subprocess.Popen(
            self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    def poll(self) -> int | None:
        return self.popen.poll() if self.popen else None

    def stop(self, timeout: float = 10) -> None:
        if self.popen and self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait()
        self._sweep()
        if self.log:
            self.log.close()
            self.log = None

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)

    def _sweep(self, grace: float = 3.0) -> None:
        """Kill what outlived the group's leader (a dead silo's ranks), after a short grace: the
        leader's exit is what tells multiprocessing's resource tracker to unlink the semaphores it
        left in /dev/shm, and killing it mid-way leaks them."""
        if self.popen is None or self.popen.poll() is None:
            return
        end = time.time() + grace
        while time.time() < end:
            try:
                os.killpg(self.popen.pid, 0)
            except (ProcessLookupError, PermissionError):
                return  # the group is empty
            time.sleep(0.1)
        self._signal_group(signal.SIGKILL)


@dataclass
class LocalRun:
    job_file: Path
    job: FederatedJob
    out: Path
    max_restarts: int = DEFAULT_MAX_RESTARTS
    console: Console = field(default_factory=Console)

    def __post_init__(self) -> None:
        self.port = free_port()
        self.enrollment_port = free_port()
        # External silos make their own keys (`fedjob silo join`): none is made for them here.
        self.certs = write_job_certs(self.out / "certs", self.job.name, self.job.hosted_silos())
        self.revoked = set(self.job.spec.revoked_silos)
        self.authority: Authority | None = None
        if self.job.external_silos() or self.revoked:
            self.authority = self._new_authority()
        self._job_stamp = self._stamp()
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        base = [sys.executable, "-m", "fedjob_cli.main"]
        self.aggregator = Proc(
            "aggregator",
            [
                *base,
                "aggregator",
                str(self.job_file),
                "--certs",
                str(self.certs.root),
                "--workdir",
                str(self.out),
                "--port",
                str(self.port),
                "--metrics-port",
                "0",
                "--enrollment-port",
                str(self.enrollment_port),
                "--exit-after",
                "20",
            ],
            self.out / "logs" / "aggregator.log",
        )
        self.workers = [
            Proc(
                s.name,
                [
                    *base,
                    "worker",
                    str(self.job_file),
                    "--silo",
                    s.name,
                    "--certs",
                    str(self.certs.root),
                    "--aggregator",
                    f"127.0.0.1:{self.port}",
                    "--state",
                    str(self.out / "silos" / s.name),
                ],
                self.out / "logs" / f"silo-{s.name}.log",
            )
            for s in self.job.spec.silos
            if not s.external
        ]
        # All silos share this machine: without a cap each process starts one busy-waiting
        # OpenMP thread per core and a round takes ten times longer.
        procs = sum(s.processes for s in self.job.spec.silos if not s.external)
        threads = str(max(1, (os.cpu_count() or 1) // procs))
        watched = {PARENT_ENV: str(os.getpid())}  # they stop if we are killed outright
        for w in self.workers:
            w.env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **watched}
        self.aggregator.env = {**os.environ, "OMP_NUM_THREADS": "1", **watched}
        ca, cert, key = self.certs.load("observer")
        creds = grpc.ssl_channel_credentials(ca, key, cert)
        self.channel = grpc.secure_channel(f"127.0.0.1:{self.port}", creds)
        self.stub = pb_grpc.FederatedTrainingStub(self.channel)

    def _new_authority(self) -> Authority:
        """Signs external silos' certificates and tells the aggregator whom to refuse."""
        return Authority(
            self.job.name,
            KeyPair(self.certs.ca.read_bytes(), (self.certs.root / "ca.key").read_bytes()),
            FileRegistry(self.out / "enrollment"),
            set(self.job.external_silos()),
            set(self.revoked),
            days=self.job.spec.enrollment.certificate_days,
        )

    def _running_silos(self) -> int:
        return sum(w.name not in self.revoked for w in self.workers)

    def _stamp(self) -> int:
        try:
            return self.job_file.stat().st_mtime_ns
        except OSError:
            return 0

    def _follow_revocations(self, running: bool) -> None:
        """spec.revokedSilos may change while the job runs, as in a cluster: follow the file.

        A newly revoked silo is refused by the aggregator from its next call on (the next
        sync) and, if it runs here, stopped; one taken off the list may call again (a hosted
        one is started again). Other changes to the file are not followed.
        """
        stamp = self._stamp()
        if stamp == self._job_stamp:
            return
        self._job_stamp = stamp
        try:
            revoked = set(load_job(self.job_file).spec.revoked_silos)
        except SpecError as exc:
            self.console.print(f"[yellow]{self.job_file} changed and does not load; ignored: {exc}[/]")
            return
        if revoked == self.revoked:
            return
        unknown = revoked - {s.name for s in self.job.spec.silos}
        if unknown:
            self.console.print(
                f"[yellow]spec.revokedSilos names no silo of this job: {sorted(unknown)}; ignored[/]"
            )
            return
        for w in self.workers:
            if w.name in revoked - self.revoked:
                w.stop()
            elif w.name in self.revoked - revoked and running:
                w.restarts, w.exited_at = 0, None
                w.start()
        for silo in sorted(revoked - self.revoked):
            self.console.print(
                f"[yellow]silo {silo} is revoked (spec.revokedSilos): its calls are refused[/]"
            )
        for silo in sorted(self.revoked - revoked):
            self.console.print(f"silo {silo} is no longer revoked")
        self.revoked = revoked
        if self.authority is None:
            self.authority = self._new_authority()
        self.authority.revoked = set(revoked)

    def tokens(self) -> dict[str, Path]:
        """A bootstrap token file per external silo that has none it could still use."""
        registry = FileRegistry(self.out / "enrollment")
        live = {t.silo for t in registry.tokens() if not t.used_by and t.expires > time.time()}
        out = {}
        for silo in self.job.external_silos():
            path = self.out / "enrollment" / f"{silo}.token"
            if silo not in live:
                token, record = new_token_record(silo, self.job.spec.enrollment.token_ttl_hours * 3600)
                registry.add_token(record)
                path.write_text(f"{token}\n")
                path.chmod(0o600)
            out[silo] = path
        return out

    def _sync_enrollments(self) -> None:
        if self.authority is None:
            return
        try:
            answered = exchange(self.authority, lambda m: self.stub.SyncEnrollments(m, timeout=5))
        except grpc.RpcError:
            return  # the aggregator is (re)starting; the next tick syncs
        if answered:
            self.console.print(f"answered {answered} enrollment request(s)")

    def status(self) -> pb.JobStatus | None:
        try:
            status: pb.JobStatus = self.stub.GetStatus(pb.StatusRequest(), timeout=2)
            return status
        except grpc.RpcError:
            return None

    def _checkpoint_index(self) -> dict[str, Any] | None:
        index = self.out / "checkpoints" / "checkpoint.json"
        try:
            loaded: dict[str, Any] = json.loads(index.read_text())
        except (OSError, ValueError):
            return None
        return loaded

    def _identity(self) -> dict[str, Any]:
        """What a checkpoint must have been made with (the aggregator checks the same)."""
        return state_identity(self.job.spec, load_tokenizer(self.job).vocabulary())

    def _already_finished(self, index: dict[str, Any], identity: dict[str, Any]) -> bool:
        """The checkpoint is this very job's, after its last round (and final evaluation)."""
        spec = self.job.spec
        extra = index.get("extra", {})
        return (
            int(index.get("round", 0)) >= spec.rounds
            and (bool(extra.get("final_evaluation_done")) or spec.evaluation.batches == 0)
            and "spec" in extra
            and not identity_differences(extra["spec"], identity)
            and (self.out / result_folder(self.job)).exists()
        )

    def run(self) -> int:
        started = time.time()
        self.console.print(
            f"[bold]fedjob run[/] job [cyan]{self.job.name}[/]: {self._running_silos()} silos, "
            f"{self.job.spec.rounds} rounds, mode {self.job.spec.training.mode}, "
            f"ZeRO-{self.job.spec.training.deepspeed.zero_stage}, uplink {self._uplink()}; "
            f"output in {self.out}"
        )
        index = self._checkpoint_index()
        saved = (index or {}).get("extra", {}).get("spec")
        identity = self._identity() if saved is not None else {}
        changed = identity_differences(saved, identity) if saved is not None else []
        if changed:
            # The aggregator would refuse it too, after starting; say so before starting anything.
            differences = "; ".join(changed)
            self.console.print(
                f"[red]Job failed (exit {EXIT_PERMANENT}, no restart can fix it): the checkpoint in "
                f"{self.out / 'checkpoints'} was made with another spec: {differences}; start afresh "
                "(--fresh, or another --out), or set those fields back[/]"
            )
            return EXIT_PERMANENT
        if index is not None and int(index.get("round", 0)) > 0:
            if self._already_finished(index, identity):
                self.console.print(f"already finished: all {self.job.spec.rounds} rounds are in {self.out}")
                return self._summary(started, True)
            self.console.print(
                f"resuming after round {index['round']} of {self.job.spec.rounds} (checkpoint in "
                f"{self.out / 'checkpoints'}; --fresh starts over)"
            )
        self.aggregator.start()
        for w in self.workers:
            if w.name not in self.revoked:  # refused anyway
                w.start()
        for silo, path in self.tokens().items():
            self.console.print(
                f"silo [cyan]{silo}[/] is external: it joins with `fedjob silo join` (aggregator "
                f"127.0.0.1:{self.port}, enrollment 127.0.0.1:{self.enrollment_port}, CA "
                f"{ca_hash(self.certs.ca.read_bytes())}, token in {path})"
            )
        last: pb.JobStatus | None = None
        failure: str | None = None
        succeeded = False
        shown_round = -1
        live = (
            Live(self._view(None, started), console=self.console, refresh_per_second=4)
            if self.console.is_terminal
            else None
        )
        # SIGTERM (a CI timeout, `kill`, a container stop) takes the same path as Ctrl-C, so the
        # aggregator and silos are stopped with us instead of living on as orphans.
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        interrupted = False
        try:
            if live:
                live.start()
            while True:
                time.sleep(0.5)
                self._follow_revocations(last is None or last.phase == "Running")
                self._sync_enrollments()
                st = self.status()
                last = st or last
                if live:
                    live.update(self._view(last, started))
                elif st and st.round != shown_round:
                    shown_round = st.round
                    self.console.print(self._line(st, started))
                failure = self._permanent_failure()
                if failure is not None:
                    break
                self._restart_failed_workers(last)
                rc = self.aggregator.poll()
                if rc is None:
                    continue
                if rc == 0 or (last is not None and last.phase == "Failed"):
                    succeeded = rc == 0  # the aggregator exits 0 only when the job succeeded
                    break
                if self.aggregator.restarts >= self.max_restarts:
                    self.console.print(
                        f"[red]aggregator failed {self.aggregator.restarts + 1} times; giving up[/]"
                    )
                    break
                self.aggregator.restarts += 1
                self.console.print(
                    f"[yellow]aggregator exited with {rc}; restarting from its last checkpoint[/]"
                )
                self.aggregator.start()
        except KeyboardInterrupt:
            interrupted = True
            # A second Ctrl-C while the components stop must not end in a traceback.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            self.console.print("[yellow]interrupted; stopping (checkpoints are kept, run again to resume)[/]")
        finally:
            signal.signal(signal.SIGTERM, previous)
            if live:
                live.stop()
            # After a normal end the silos leave by themselves once told the job is over; when
            # interrupted they are still waiting for the next round, so stop them at once.
            deadline = time.time() + (0 if interrupted else 30)
            for w in self.workers:
                while w.popen is not None and w.poll() is None and time.time() < deadline:
                    time.sleep(0.2)
                w.stop()
            self.aggregator.stop()
            self.channel.close()
        if failure is not None:
            # The reason is the last line: what to fix, not a log to dig through.
            self.console.print(
                f"[red]Job failed (exit {EXIT_PERMANENT}, no restart can fix it): {failure}[/]"
            )
            return EXIT_PERMANENT
        return self._summary(started, succeeded)

    def _permanent_failure(self) -> str | None:
        """'component: reason' of the first component that exited with EXIT_PERMANENT."""
        for proc in (self.aggregator, *self.workers):
            reason = proc.permanent_failure()
            if reason is not None:
                return f"{proc.name}: {reason}"
        return None

    def _restart_failed_workers(self, last: pb.JobStatus | None) -> None:
        """A silo that crashed is started again, like a Kubernetes Job retrying its pod."""
        if last is not None and last.phase != "Running":
            return
        for w in self.workers:
            rc = w.poll()
            if rc is None or rc in (0, EXIT_PERMANENT) or w.restarts >= self.max_restarts:
                continue
            if w.name in self.revoked:
                continue
            # Back off like a Kubernetes Job: 10 s, 20 s, 40 s ... (at most 5 minutes).
            w.exited_at = w.exited_at or time.time()
            if time.time() - w.exited_at < min(10 * 2**w.restarts, 300):
                continue
            w.exited_at = None
            w.restarts += 1
            self.console.print(f"[yellow]silo {w.name} exited with {rc}; restarting it ({w.restarts})[/]")
            w.start()

    # ----- display ----------------------------------------------------------------------------------

    def _line(self, st: pb.JobStatus, started: float) -> str:
        lr = st.last_round
        tail = ""
        if st.round and lr.round:
            ev = "" if math.isnan(lr.eval_loss) else f" eval {lr.eval_loss:.4f}"
            if st.federated_eval_round:
                ev += f" | held-out at silos {st.federated_eval_loss:.4f} (round {st.federated_eval_round})"
            dp = f" | epsilon {st.dp_epsilon:.3g}" if st.dp else ""
            tail = (
                f" | train {lr.train_loss:.4f}{ev} | {lr.participants} silos | up {lr.bytes_up:,} B"
                f" (x{lr.compression_ratio:.1f}){dp} | {lr.seconds:.1f} s"
            )
        elif not math.isnan(st.initial_eval_loss):
            tail = f" | starting model: eval {st.initial_eval_loss:.4f}"
        return f"[{time.time() - started:6.1f}s] round {st.round}/{st.total_rounds} {st.phase}{tail}"

    def _uplink(self) -> str:
        comp = self.job.spec.compression
        stages = job_uplink(self.job.spec)
        codec = uplink_codec(comp).name
        return f"{stages.name} -> {codec}" if stages.stages else codec

    def _view(self, st: pb.JobStatus | None, started: float) -> Group:
        if st is None:
            return Group(f"starting the aggregator and {self._running_silos()} silos ...")
        head = Table.grid(padding=(0, 1))
        head.add_row(
            f"round {st.round}/{st.total_rounds}",
            ProgressBar(total=st.total_rounds, completed=st.round, width=40),
            st.phase,
            f"{time.time() - started:.0f} s",
        )
        silos = Table(
            "silo",
            "state",
            "last round",
            "train loss",
            "bytes up",
            "weight",
            "cosine",
            title="silos",
            title_justify="left",
        )
        for s in st.silos:
            loss = "" if math.isnan(s.last_train_loss) else f"{s.last_train_loss:.4f}"
            # How its latest update counted, and how it compared with the round's aggregate.
            share = f"{s.weight_share:.2f}" if s.scored_round else ""
            cos = f"{s.update_cosine:+.2f}" if s.scored_round else ""
            # Within the round: downloading, evaluating, training k/n (from the silo's reports).
            state = s.progress if s.progress and s.state == "training" else s.state
            if state == "absent" and any(w.name == s.name and w.poll() is None for w in self.workers):
                state = "starting"  # its process loads the model before it calls in
            silos.add_row(s.name, state, str(s.last_round or ""), loss, f"{s.bytes_up:,}", share, cos)
        parts: list[Any] = [head, silos]
        if st.last_round.round:
            lr = st.last_round
            rounds = Table(
                "round",
                "train loss",
                "eval loss",
                "silos",
                "bytes up",
                "bytes down",
                "ratio",
                "seconds",
                title="last round",
                title_justify="left",
            )
            rounds.add_row(
                str(lr.round),
                f"{lr.train_loss:.4f}",
                "" if math.isnan(lr.eval_loss) else f"{lr.eval_loss:.4f}",
                str(lr.participants),
                f"{lr.bytes_up:,}",
                f"{lr.bytes_down:,}",
                f"{lr.compression_ratio:.2f}",
                f"{lr.seconds:.1f}",
            )
            parts.append(rounds)
        if st.federated_eval_round:
            parts.append(
                f"federated eval: {st.federated_eval_loss:.4f} (the silos' held-out text, "
                f"sample-weighted; model after round {st.federated_eval_round})"
            )
        if st.dp:
            target = f" of target {st.dp_target_epsilon:g}" if st.dp_target_epsilon else ""
            parts.append(f"privacy: epsilon {st.dp_epsilon:.4g}{target} spent (delta {st.dp_delta:g})")
        if st.updates_rejected:
            parts.append(
                f"[yellow]{st.updates_rejected} updates or chunks refused (see logs/aggregator.log)[/]"
            )
        return Group(*parts)

    def _summary(self, started: float, succeeded: bool) -> int:
        metrics = self.out / "metrics.jsonl"
        history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        if history:
            plot_losses(history, self.out / "loss.png")
        table = Table(
            "round",
            "train loss",
            *(f"{s.name}" for s in self.job.spec.silos),
            "eval loss",
            "federated eval",
            "bytes up",
            "ratio",
            *(["epsilon"] if self.job.spec.privacy.dp else []),
            "seconds",
            title=f"{self.job.name}: per-round results",
        )
        if history and ("initial_eval_loss" in history[0] or "initial_federated_eval_loss" in history[0]):
            first = history[0]
            table.add_row(  # the starting model: what every round is read against
                "0",
                "-",
                *("-" for _ in self.job.spec.silos),
                f"{first['initial_eval_loss']:.4f}" if "initial_eval_loss" in first else "-",
                f"{first['initial_federated_eval_loss']:.4f}"
                if "initial_federated_eval_loss" in first
                else "-",
                "-",
                "-",
                *(["-"] if self.job.spec.privacy.dp else []),
                "-",
            )
        for r in history:
            table.add_row(
                str(r["round"]),
                f"{r['train_loss']:.4f}",
                *(
                    f"{r['silo_train_loss'][s.name]:.4f}" if s.name in r["silo_train_loss"] else "-"
                    for s in self.job.spec.silos
                ),
                "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}",
                "-" if r.get("federated_eval_loss") is None else f"{r['federated_eval_loss']:.4f}",
                f"{r['bytes_up']:,}",
                f"{r['compression_ratio'] or 0:.2f}",
                *([f"{r['dp_epsilon']:.3f}"] if self.job.spec.privacy.dp else []),
                f"{r['seconds']:.1f}",
            )
        self.console.print(table)
        # Done: every round, or as many as the privacy budget allowed.
        done = len(history) >= self.job.spec.rounds or (succeeded and self.job.spec.privacy.dp is not None)
        result = self.out / result_folder(self.job)
        elapsed = time.time() - started
        if done and history and len(history) < self.job.spec.rounds:
            self.console.print(
                f"[yellow]privacy budget spent: stopped after round {len(history)} of {self.job.spec.rounds} "
                f"at epsilon {history[-1]['dp_epsilon']:.4g}; another round would exceed targetEpsilon[/]"
            )
        if done and result.exists():
            self.console.print(
                f"[green]Succeeded[/] in {elapsed:.0f} s. Result: {result}; metrics: {metrics}; "
                f"plot: {self.out / 'loss.png'}; logs: {self.out / 'logs'}"
            )
            return 0
        self.console.print(
            f"[red]Job did not finish[/] ({len(history)}/{self.job.spec.rounds} rounds, "
            f"{elapsed:.0f} s). See {self.out / 'logs'}."
        )
        return 1


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    silos = sorted({s for r in history for s in r["silo_train_loss"]})
    for s in silos:
        pts = [(r["round"], r["silo_train_loss"][s]) for r in history if s in r["silo_train_loss"]]
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"{s} (train)")
    ax.plot([r["round"] for r in history], [r["train_loss"] for r in history], "k--", label="mean train")
    ev = [(0, r["initial_eval_loss"]) for r in history[:1] if "initial_eval_loss" in r]
    ev += [(r["round"], r["eval_loss"]) for r in history if r["eval_loss"] is not None]
    if ev:
        ax.plot(*zip(*ev, strict=True), "k-", linewidth=2, label="global eval")
    # Federated: the silos' held-out losses, from the initial model (round 0) on.
    fed = [(0, r["initial_federated_eval_loss"]) for r in history[:1] if "initial_federated_eval_loss" in r]
    fed += [
        (r["round"], r["federated_eval_loss"]) for r in history if r.get("federated_eval_loss") is not None
    ]
    if fed:
        ax.plot(*zip(*fed, strict=True), "b-", linewidth=2, label="federated eval (silos' held-out)")
    ax.set_xlabel("round")
    ax.set_ylabel("loss (nats/byte)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_local(
    job_file: Path,
    job: FederatedJob,
    out: Path,
    fresh: bool = False,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    overridden: bool = False,
) -> int:
    """`overridden`: `--set` changed the file's job; the components get the job as changed."""
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if overridden:
        job_file = out / "job.yaml"
        job_file.write_text(yaml.safe_dump(job_document(job), sort_keys=False))
    return LocalRun(job_file, job, out, max_restarts).run()
