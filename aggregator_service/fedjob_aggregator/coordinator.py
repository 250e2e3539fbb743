"""The round state machine: open a round, collect updates, close it, checkpoint, repeat.

All mutable state sits behind one condition variable. gRPC handler threads call
`begin_upload` / `add_chunk` / `finish_upload`; the main thread runs `run()`, which
waits for "every silo reported" or the deadline and then closes the round.

Memory is two copies of the trainable state: the global model (immutable while a
round is open; downloads stream straight from it) and the round's running sum.
Closing a round turns the sum, in place, into the next global model; the old
global's buffers become the next round's sum. The heavy parts of a close (folding
a finished upload, the strategy's math, evaluation, the checkpoint write) run
without the lock, so status and long polls keep answering.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedjob.aggregation import Strategy, UpdateMeta
from fedjob.checkpoint import Checkpoint, CheckpointStore, CheckpointWriter
from fedjob.chunking import (
    ChunkRejected,
    State,
    TensorInfo,
    count_chunks,
    iter_chunks,
    manifest_of,
)
from fedjob.codec import DOWNLOAD_CODEC, Codec
from fedjob.robust import CoordinateSample
from fedjob.spec import FederatedJob
from fedjob.update_stages import UpdateRejected, uplink_from_spec
from fedjob.v1 import fedjob_pb2 as pb
from fedjob_aggregator.recorder import RoundRecorder, evaluation_fields
from fedjob_aggregator.round_aggregators import (
    CollectingAggregator,
    RoundAggregator,
    StreamingAggregator,
    UpdateScore,
)
from fedjob_aggregator.upload_session import SessionClosed, UploadSession

log = logging.getLogger("fedjob.aggregator")


class Refused(Exception):
    """A request that breaks a protocol rule; `code` names the gRPC status to answer with."""

    def __init__(self, code: str, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.reason = reason
        self.detail = detail


CHUNK_REASON_CODES = {
    "checksum": "DATA_LOSS",
    "oversized": "RESOURCE_EXHAUSTED",
    "duplicate_chunk": "FAILED_PRECONDITION",
    "out_of_order": "FAILED_PRECONDITION",
}


@dataclass
class SiloState:
    state: str = "absent"
    last_round: int = 0
    last_train_loss: float = math.nan
    bytes_up: int = 0
    bytes_down: int = 0
    last_score: UpdateScore | None = None
    scored_round: int = 0


# A sample count beyond any corpus (2^40 windows): a header claiming more is implausible.
MAX_CLAIMED_SAMPLES = 1 << 40


@dataclass
class RoundState:
    number: int
    opened: float
    deadline: float
    aggregator: RoundAggregator
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


Observer = Callable[[str, dict[str, Any]], None]


class Coordinator:
    def __init__(
        self,
        job: FederatedJob,
        strategy: Strategy,
        initial_state: State | Callable[[], State],
        workdir: Path,
        evaluate: Callable[[State], float] | None = None,
        finalize: Callable[[State], None] | None = None,
        observe: Observer | None = None,
        manifest: Mapping[str, TensorInfo] | None = None,
    ) -> None:
        """`initial_state` may be a function, called only when there is no checkpoint to resume
        (then `manifest` names the tensors it will return, for the resume check)."""
        self.job = job
        self.spec = job.spec
        self.strategy = strategy
        if manifest is None:
            if callable(initial_state):
                raise TypeError("a lazy initial_state needs its manifest")
            manifest = manifest_of(initial_state)
        self.manifest = dict(manifest)
        # What an update carries: the parameter deltas, then any tensors the strategy adds.
        self.upload_manifest = {**self.manifest, **strategy.upload_extras_manifest(self.manifest)}
        self.codec = Codec.from_spec(job.spec.compression.codec, job.spec.compression.zstd)
        self.download_codec = Codec.from_name(DOWNLOAD_CODEC)
        self.chunk_bytes = job.spec.compression.chunk_bytes
        self.expected_chunks = count_chunks(self.upload_manifest, self.codec, self.chunk_bytes)
        # The silos' uplink stages: their aggregator halves check every upload.
        self.uplink = uplink_from_spec(job.spec.compression.uplink)
        self.evaluate = evaluate
        self.finalize = finalize
        self.observe = observe or (lambda event, fields: None)
        self.store = CheckpointStore(workdir / "checkpoints")
        self.writer = CheckpointWriter(self.store)
        self.spool_dir = workdir / "spool"
        # Whatever a crash left here belonged to the round in flight, which restarts.
        if self.spool_dir.exists():
            shutil.rmtree(self.spool_dir)
        self.spool_dir.mkdir(parents=True)
        self.sample = CoordinateSample(self.manifest, seed=job.spec.training.seed)
        self.cond = threading.Condition()
        self._fold_lock = threading.Lock()  # one update at a time into the sum
        self._checking = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))  # chunks decoded at once
        self.silos = {s: SiloState() for s in job.silo_names()}
        self.phase = "Running"
        self.message = ""
        self.rejected_total = 0
        ckpt = self.store.load()
        if ckpt is None:
            # The coordinator reuses the global model's buffers: it owns what a function returns,
            # and copies a state it was handed.
            state = (
                initial_state()
                if callable(initial_state)
                else {k: v.copy() for k, v in initial_state.items()}
            )
            if manifest_of(state) != self.manifest:
                raise RuntimeError("the initial state does not match its manifest")
            ckpt = Checkpoint(0, state, [])
            self.store.save(ckpt)
        elif manifest_of(ckpt.state) != self.manifest:
            raise RuntimeError(f"checkpoint in {self.store.dir} does not belong to this job's model")
        self.completed = ckpt.round
        self.global_state = {n: ckpt.state[n] for n in self.manifest}
        # Bumped whenever the global model's buffers change hands: a download that sees it move
        # stops instead of sending a slice that may be half overwritten.
        self.generation = 0
        self._spare: State | None = None  # the previous global's buffers, for the next sum
        self.strategy.load_state(ckpt.strategy_state)
        self.recorder = RoundRecorder(workdir / "metrics.jsonl", ckpt.history)
        self.final_evaluation_done = bool(ckpt.extra.get("final_evaluation_done", False))
        del ckpt
        self.current: RoundState | None = None
        self.seen: set[str] = set()  # silos that called in since this process started
        self._first_round = True
        self.evaluates = job.spec.evaluation.batches > 0
        if self.completed >= self.spec.rounds and (self.final_evaluation_done or not self.evaluates):
            self.phase = "Succeeded"
        log.info("job %s: resuming after round %d of %d", job.name, self.completed, self.spec.rounds)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every closed round's record (what metrics.jsonl holds)."""
        return self.recorder.history

    # ----- rounds -------------------------------------------------------------------------------

    def _open_round(self) -> None:
        number = self.completed + 1
        now = time.time()
        limit = self.spec.aggregation.round_deadline_seconds
        # The first round after a (re)start waits for minSilos silos to call in before its
        # clock starts (pods may still be scheduling, silos backing off), at most one deadline.
        waiting = self._first_round and len(self.seen) < self.spec.aggregation.min_silos
        self._first_round = False
        evaluation_only = number > self.spec.rounds
        self.current = RoundState(
            number=number,
            opened=now,
            deadline=now + (2 * limit if waiting else limit),
            aggregator=self._round_aggregator(number, evaluation_only),
            clock_started=not waiting,
            evaluation_only=evaluation_only,
        )
        self._spare = None
        for s in self.silos.values():
            s.state = "waiting" if s.state != "absent" else "absent"
        log.info("round %d open (deadline in %.0f s)", number, self.spec.aggregation.round_deadline_seconds)
        self.observe("round_open", {"round": number})
        self.cond.notify_all()

    def _round_aggregator(self, number: int, evaluation_only: bool) -> RoundAggregator:
        if evaluation_only:  # the final evaluation folds nothing
            return StreamingAggregator({}, self.strategy, self.sample)
        if self.strategy.collects:
            return CollectingAggregator(
                self.manifest, self.strategy, self.sample, self.spool_dir / f"r{number}", buffers=self._spare
            )
        return StreamingAggregator(
            self.manifest,
            self.strategy,
            self.sample,
            buffers=self._spare,
            max_share=self.spec.aggregation.max_weight_share,
        )

    def run(self, stop: threading.Event | None = None) -> str:
        """Drive rounds until the job ends; returns the final phase."""
        stop = stop or threading.Event()
        with self.cond:
            while self.phase == "Running" and not stop.is_set():
                if self.current is None:
                    self._open_round()
                rnd = self.current
                assert rnd is not None
                self.cond.wait_for(functools.partial(self._over_or_stopped, rnd, stop), timeout=0.5)
                if stop.is_set():
                    break
                if self._round_over(rnd):
                    self._close_round(rnd)
            self.cond.notify_all()
        self.writer.wait()
        return self.phase

    def _over_or_stopped(self, rnd: RoundState, stop: threading.Event) -> bool:
        return self._round_over(rnd) or stop.is_set()

    def _round_over(self, rnd: RoundState) -> bool:
        return len(rnd.reported) == len(self.silos) or time.time() >= rnd.deadline

    def _close_round(self, rnd: RoundState) -> None:
        """Called with the lock held; releases it for the slow parts."""
        close_started = time.time()
        rnd.closing = True
        if rnd.evaluation_only:
            self._close_final_evaluation(rnd)
            return
        # A completed upload being folded right now still counts: it arrived in time.
        self.cond.wait_for(lambda: rnd.folding == 0)
        for up in list(rnd.in_flight.values()):
            self._discard(rnd, up, "round closed before the upload completed")
        missing = sorted(set(self.silos) - set(rnd.reported))
        for silo in missing:
            self.silos[silo].state = "missed"
        needed = self.spec.aggregation.min_silos
        if len(rnd.reported) < needed:
            self.phase = "Failed"
            self.message = (
                f"round {rnd.number}: quorum not reached, {len(rnd.reported)} of {needed} required silos "
                f"reported before the deadline (missing: {', '.join(missing)})"
            )
            log.error(self.message)
            self.observe("failed", {"round": rnd.number, "message": self.message})
            rnd.aggregator.close()
            self.current = None
            return
        started = time.time()
        last = rnd.number >= self.spec.rounds
        old_state = self.global_state
        self.cond.release()
        try:
            # The previous round's checkpoint is streamed from old_state and the strategy's
            # state, which apply() is about to change in place: it must be on disk first.
            self.writer.wait()
            try:
                aggregate = rnd.aggregator.finish(self.spec.aggregation.max_weight_share)
                new_state = self.strategy.apply(old_state, aggregate, rnd.number)
                scores = rnd.aggregator.scores(self.strategy)
            finally:
                rnd.aggregator.close()
            eval_loss = self.evaluate(new_state) if self.evaluate else math.nan
            if last and self.finalize:
                self.finalize(new_state)
        finally:
            self.cond.acquire()
        losses = {m.silo: m.train_loss for m in rnd.reported.values()}
        sent_up = sum(rnd.bytes_up.values())
        record = {
            "round": rnd.number,
            "train_loss": float(np.mean(list(losses.values()))),
            "silo_train_loss": dict(sorted(losses.items())),
            "eval_loss": None if math.isnan(eval_loss) else eval_loss,
            "participants": sorted(rnd.reported),
            "num_participants": len(rnd.reported),
            "missing": missing,
            "bytes_up": sent_up,
            "bytes_down": sum(rnd.bytes_down.values()),
            "silo_bytes_up": dict(sorted(rnd.bytes_up.items())),
            "compression_ratio": rnd.raw_up / sent_up if sent_up else None,
            "rejected_updates": rnd.rejected,
            # How each update counted (weight share after caps, norm bound) and how it compared.
            "silo_updates": {sc.silo: sc.record() for sc in sorted(scores, key=lambda sc: sc.silo)},
            "seconds": round(time.time() - rnd.opened, 3),
            "aggregation_seconds": round(time.time() - started, 3),
            # From "every update is in (or the deadline)" to the next round opening.
            "close_seconds": round(time.time() - close_started, 3),
        }
        for sc in scores:
            self.silos[sc.silo].last_score, self.silos[sc.silo].scored_round = sc, rnd.number
        evals = rnd.evaluations()
        earlier_changed = self.recorder.file_evaluation(rnd.number, evals, record)
        if earlier_changed:
            self.observe("federated_eval", {"round": rnd.number - 1, **evaluation_fields(evals)})
        write_metrics = self.recorder.add(record, earlier_changed)
        # Downloads still streaming the old model stop at their next slice; its buffers
        # become the next round's running sum.
        self.generation += 1
        self.global_state = new_state
        self._spare = old_state
        self.completed = rnd.number
        self.current = None
        # The write runs beside the next round; the next close waits for it, so a crash
        # loses at most the round in flight. The metrics line follows the checkpoint.
        self.writer.submit(
            Checkpoint(
                rnd.number,
                new_state,
                self.recorder.snapshot(),
                strategy_state=self.strategy.state(),
            ),
            then=write_metrics,
        )
        log.info(
            "round %d closed: %d silos, train loss %.4f, eval loss %s, %.1f s",
            rnd.number,
            len(rnd.reported),
            record["train_loss"],
            record["eval_loss"],
            record["seconds"],
        )
        self.observe("round_closed", record)
        if last and not self.evaluates:
            self.phase = "Succeeded"
            self.observe("succeeded", {"round": self.completed})

    # ----- federated evaluation ------------------------------------------------------------------

    def _close_final_evaluation(self, rnd: RoundState) -> None:
        self.writer.wait()  # the last round's checkpoint, before its record changes
        evals = rnd.evaluations()
        fields = self.recorder.file_final_evaluation(evals)
        if fields is not None:
            self.observe("federated_eval", {"round": rnd.number - 1, **fields})
        missing = sorted(set(self.silos) - set(evals))
        if missing:
            log.warning("final evaluation: no loss from %s before the deadline", ", ".join(missing))
        self.final_evaluation_done = True
        self.current = None
        self.store.update_index(self.recorder.snapshot(), {"final_evaluation_done": True})
        self.recorder.rewrite()
        log.info(
            "final evaluation: %d silos, federated eval loss %s",
            len(evals),
            fields["federated_eval_loss"] if fields else None,
        )
        self.phase = "Succeeded"
        self.observe("succeeded", {"round": self.completed})

    def report_evaluation(self, silo: str, round_number: int, loss: float, samples: int) -> None:
        with self.cond:
            self._saw(silo)
            rnd = self._round_for(silo, round_number)
            if not rnd.evaluation_only:
                raise Refused(
                    "FAILED_PRECONDITION",
                    "not_evaluating",
                    f"round {rnd.number} trains; its evaluation rides in the update header",
                )
            self._check_evaluation(silo, loss, samples)
            if silo in rnd.reported:
                raise Refused("ALREADY_EXISTS", "replay", f"{silo} already reported its evaluation")
            rnd.reported[silo] = UpdateMeta(silo, 1, 1, math.nan, loss, samples)
            self.silos[silo].state = "reported"
            self.cond.notify_all()

    def _check_evaluation(self, silo: str, loss: float, samples: int) -> None:
        """A silo evaluates a fixed number of windows: anything else would buy it weight."""
        if not self.evaluates:
            raise Refused("INVALID_ARGUMENT", "bad_eval", "this job runs no federated evaluation")
        t = self.spec.training
        expected = self.spec.evaluation.batches * t.batch_size * self.job.silo(silo).processes
        if samples != expected:
            raise Refused(
                "INVALID_ARGUMENT",
                "bad_eval",
                f"evaluation of {samples} windows; this silo evaluates {expected}",
            )
        if not math.isfinite(loss) or loss < 0:
            raise Refused("INVALID_ARGUMENT", "bad_eval", f"evaluation loss {loss} is not a finite loss")

    # ----- what handlers call ----------------------------------------------------------------------

    def _saw(self, silo: str) -> None:
        self.seen.add(silo)
        rnd = self.current
        if rnd is not None and not rnd.clock_started and len(self.seen) >= self.spec.aggregation.min_silos:
            rnd.clock_started = True
            rnd.deadline = min(rnd.deadline, time.time() + self.spec.aggregation.round_deadline_seconds)

    def join(self, silo: str) -> None:
        with self.cond:
            self._saw(silo)
            if self.silos[silo].state == "absent":
                self.silos[silo].state = "joined"
            self.observe("joined", {"silo": silo})

    def next_task(self, silo: str, after_round: int, wait: float) -> pb.Task:
        end = time.time() + max(0.0, min(wait, 60.0))
        with self.cond:
            self._saw(silo)
            while True:
                if self.phase == "Succeeded":
                    self.silos[silo].state = "done"
                    return pb.Task(state=pb.Task.DONE, round=self.completed)
                if self.phase == "Failed":
                    self.silos[silo].state = "done"
                    return pb.Task(state=pb.Task.FAILED, round=self.completed, message=self.message)
                rnd = self.current
                if (
                    rnd is not None
                    and not rnd.closing
                    and rnd.number > after_round
                    and silo not in rnd.reported
                ):
                    if rnd.evaluation_only:
                        self.silos[silo].state = "evaluating"
                        return pb.Task(state=pb.Task.EVALUATE, round=rnd.number, deadline_unix=rnd.deadline)
                    self.silos[silo].state = "training"
                    return pb.Task(state=pb.Task.TRAIN, round=rnd.number, deadline_unix=rnd.deadline)
                left = end - time.time()
                if left <= 0:
                    return pb.Task(state=pb.Task.WAIT, round=self.completed)
                self.cond.wait(timeout=left)

    def download(self, silo: str, round_number: int) -> Iterator[pb.Chunk]:
        """The global model (and the strategy's per-silo tensors), encoded slice by slice as sent.

        Nothing is pre-encoded: each call streams from the stored global state, so a
        download costs one chunk of memory, not a copy of the model.
        """
        with self.cond:
            rnd = self._round_for(silo, round_number)
            generation = self.generation
            state = self.global_state
            extras = self.strategy.download_extras(silo, self.manifest)
        # The same rng for every silo: a lossy download codec would round identically for all.
        rng = np.random.default_rng(rnd.number)
        chunks = iter_chunks(state, self.download_codec, self.chunk_bytes, rng)
        for chunk in chunks:
            if self.generation != generation:
                raise Refused(
                    "FAILED_PRECONDITION",
                    "stale_round",
                    f"round {round_number} closed during the download",
                )
            yield self._sent(rnd, silo, chunk)
        if extras:  # per-silo tensors (SCAFFOLD's c - c_i) continue the same stream
            n = count_chunks(self.manifest, self.download_codec, self.chunk_bytes)
            extra_rng = np.random.default_rng([rnd.number, n])
            for chunk in iter_chunks(extras, self.download_codec, self.chunk_bytes, extra_rng, start_seq=n):
                yield self._sent(rnd, silo, chunk)

    def _sent(self, rnd: RoundState, silo: str, chunk: pb.Chunk) -> pb.Chunk:
        with self.cond:
            rnd.bytes_down[silo] = rnd.bytes_down.get(silo, 0) + len(chunk.payload)
            self.silos[silo].bytes_down += len(chunk.payload)
        return chunk

    def _round_for(self, silo: str, round_number: int) -> RoundState:
        rnd = self.current
        if rnd is None or self.phase != "Running":
            raise Refused("FAILED_PRECONDITION", "no_open_round", f"no round is open (job {self.phase})")
        if round_number < rnd.number or (round_number == rnd.number and rnd.closing):
            raise Refused(
                "FAILED_PRECONDITION",
                "stale_round",
                f"round {round_number} is closed; round {rnd.number} is open",
            )
        if round_number > rnd.number:
            raise Refused(
                "OUT_OF_RANGE", "future_round", f"round {round_number} is not open; round {rnd.number} is"
            )
        return rnd

    def begin_upload(self, silo: str, header: pb.UpdateHeader) -> UploadSession:
        with self.cond:
            rnd = self._round_for(silo, header.round)
            if silo in rnd.reported:
                raise Refused(
                    "ALREADY_EXISTS", "replay", f"{silo} already delivered its update for round {rnd.number}"
                )
            if header.eval_samples:
                self._check_evaluation(silo, header.eval_loss, int(header.eval_samples))
            if rnd.evaluation_only:
                raise Refused(
                    "FAILED_PRECONDITION",
                    "not_training",
                    f"round {rnd.number} only evaluates the final model; use ReportEvaluation",
                )
            self._check_claims(silo, header)
            if header.total_chunks != self.expected_chunks:
                raise Refused(
                    "INVALID_ARGUMENT",
                    "bad_header",
                    f"update announces {header.total_chunks} chunks; "
                    f"this model and codec make {self.expected_chunks}",
                )
            held = rnd.in_flight.get(silo)
            if held is not None and held.streaming:
                raise Refused(
                    "RESOURCE_EXHAUSTED",
                    "concurrent_upload",
                    f"{silo} already has an upload streaming; one at a time per silo",
                )
            if held is not None and held.folding:
                raise Refused(
                    "ALREADY_EXISTS", "replay", f"{silo}'s update for round {rnd.number} is being aggregated"
                )
            if held is not None and held.upload_id == header.upload_id:
                if header.resume_from != held.next_seq:
                    raise Refused(
                        "FAILED_PRECONDITION",
                        "out_of_order",
                        f"resume from chunk {header.resume_from}, the aggregator holds up to {held.next_seq}",
                    )
                held.streaming = True
                return held
            if held is not None:
                self._discard(rnd, held, "superseded by a new upload")
            if header.resume_from != 0:
                raise Refused(
                    "FAILED_PRECONDITION",
                    "out_of_order",
                    f"nothing held for upload {header.upload_id!r}; start at chunk 0",
                )
            claimed = int(header.num_samples)
            cap = self.job.silo(silo).max_samples
            meta = UpdateMeta(
                silo,
                min(claimed, cap) if cap else claimed,
                int(header.local_steps),
                float(header.train_loss),
                float(header.eval_loss) if header.eval_samples else math.nan,
                int(header.eval_samples),
                claimed_samples=claimed if cap and claimed > cap else 0,
            )
            up = UploadSession.open(
                silo=silo,
                round_number=rnd.number,
                upload_id=header.upload_id,
                meta=meta,
                weight=self.strategy.weight(meta),
                total_chunks=header.total_chunks,
                spool=self.spool_dir / f"r{rnd.number}-{silo}.spool",
                manifest=self.upload_manifest,
                codec=self.codec,
                chunk_bytes=self.chunk_bytes,
                parameters=frozenset(self.manifest),
                checks=self.uplink.checks(self.manifest),
            )
            rnd.in_flight[silo] = up
            self.silos[silo].state = "uploading"
            return up

    def _check_claims(self, silo: str, header: pb.UpdateHeader) -> None:
        """The header's numbers are the silo's word: refuse what no honest silo of this job sends."""
        if header.num_samples == 0 or header.local_steps == 0 or not math.isfinite(header.train_loss):
            raise Refused(
                "INVALID_ARGUMENT",
                "bad_header",
                "header needs num_samples > 0, local_steps > 0 and a finite train_loss",
            )
        expected_steps = self.job.silo(silo).local_steps or self.spec.training.local_steps
        if header.local_steps != expected_steps:
            raise Refused(
                "INVALID_ARGUMENT",
                "implausible_header",
                f"local_steps {header.local_steps}; {silo} runs {expected_steps} per round",
            )
        if header.num_samples > MAX_CLAIMED_SAMPLES:
            raise Refused(
                "INVALID_ARGUMENT",
                "implausible_header",
                f"num_samples {header.num_samples}; no corpus has more than {MAX_CLAIMED_SAMPLES} windows",
            )
        if header.train_loss < 0:
            raise Refused("INVALID_ARGUMENT", "implausible_header", f"train_loss {header.train_loss} < 0")

    def add_chunk(self, up: UploadSession, chunk: pb.Chunk) -> None:
        with self.cond:
            rnd = self._live(up)
        # Checking (decode, CRC, finite) and spooling touch only this session, which one handler
        # at a time owns: outside the lock, so silos upload in parallel and status answers.
        # The semaphore bounds the decoded temporaries alive at once, whatever the silo count.
        try:
            with self._checking:
                size = up.receive(chunk)
        except SessionClosed as exc:
            raise Refused("FAILED_PRECONDITION", "stale_round", str(exc)) from None
        except ChunkRejected as exc:
            with self.cond:
                if rnd.in_flight.get(up.silo) is up:
                    self._discard(rnd, up, exc.detail)
            raise Refused(
                CHUNK_REASON_CODES.get(exc.reason, "INVALID_ARGUMENT"), exc.reason, exc.detail
            ) from None
        with self.cond:
            self._live(up)  # the round may have closed meanwhile: the spool is gone with it
            rnd.bytes_up[up.silo] = rnd.bytes_up.get(up.silo, 0) + size
            self.silos[up.silo].bytes_up += size

    def finish_upload(self, up: UploadSession, trailer: pb.UpdateTrailer) -> None:
        """The trailer arrived: fold the whole update into the round's sum, or refuse it."""
        with self.cond:
            rnd = self._live(up)
            why = up.incomplete(trailer.total_chunks)
            if why is not None:
                self._discard(rnd, up, f"incomplete: {why}")
                raise Refused("FAILED_PRECONDITION", "incomplete", f"update incomplete: {why}")
            try:
                up.settle()
            except UpdateRejected as exc:
                self._discard(rnd, up, exc.detail)
                raise Refused("INVALID_ARGUMENT", exc.reason, exc.detail) from None
            up.folding = True
            rnd.folding += 1
            self.silos[up.silo].state = "aggregating"
        try:
            # Outside the lock: folding a large update takes seconds and must not stall
            # status or other silos. The round's close waits for rnd.folding to drop.
            with self._fold_lock:
                rnd.aggregator.add(up)
        except BaseException:
            with self.cond:
                rnd.folding -= 1
                up.folding = False
                self._discard(rnd, up, "its spool could not be read back")
                self.cond.notify_all()
            raise
        with self.cond:
            rnd.reported[up.silo] = up.meta
            rnd.raw_up += up.raw_bytes
            rnd.in_flight.pop(up.silo, None)
            rnd.folding -= 1
            s = self.silos[up.silo]
            s.state, s.last_round, s.last_train_loss = "reported", rnd.number, up.meta.train_loss
            self.observe(
                "update_accepted", {"silo": up.silo, "round": rnd.number, "train_loss": up.meta.train_loss}
            )
            self.cond.notify_all()

    def resume_point(self, silo: str, round_number: int, upload_id: str) -> int:
        with self.cond:
            rnd = self.current
            if rnd is None or rnd.number != round_number:
                return 0
            held = rnd.in_flight.get(silo)
            return held.next_seq if held is not None and held.upload_id == upload_id else 0

    def stream_ended(self, up: UploadSession) -> None:
        with self.cond:
            up.streaming = False

    def _live(self, up: UploadSession) -> RoundState:
        rnd = self.current
        if (
            rnd is None
            or rnd.number != up.round
            or rnd.closing
            or rnd.in_flight.get(up.silo) is not up
            or up.folding
        ):
            raise Refused("FAILED_PRECONDITION", "stale_round", f"round {up.round} closed during the upload")
        return rnd

    def _discard(self, rnd: RoundState, up: UploadSession, why: str) -> None:
        """Drop an unfinished upload: nothing of it was folded, so its spool is all there is."""
        up.discard()
        rnd.in_flight.pop(up.silo, None)
        self.silos[up.silo].state = "rejected"
        log.warning("round %d: dropped the upload of %s: %s", rnd.number, up.silo, why)

    def count_rejection(self, silo: str) -> None:
        with self.cond:
            self.rejected_total += 1
            if self.current is not None:
                self.current.rejected += 1

    def status(self) -> pb.JobStatus:
        with self.cond:
            last = self.recorder.history[-1] if self.recorder.history else None
            rm = None
            if last is not None:
                rm = pb.RoundMetrics(
                    round=last["round"],
                    train_loss=last["train_loss"],
                    eval_loss=math.nan if last["eval_loss"] is None else last["eval_loss"],
                    participants=last["num_participants"],
                    bytes_up=last["bytes_up"],
                    bytes_down=last["bytes_down"],
                    compression_ratio=last["compression_ratio"] or 0.0,
                    seconds=last["seconds"],
                )
            return pb.JobStatus(
                job=self.job.name,
                phase=self.phase,
                round=self.completed,
                total_rounds=self.spec.rounds,
                silos=[_silo_status(n, s) for n, s in self.silos.items()],
                last_round=rm,
                message=self.message,
                updates_rejected=self.rejected_total,
                **self.recorder.latest_federated_eval(),
            )


def _silo_status(name: str, s: SiloState) -> pb.SiloStatus:
    out = pb.SiloStatus(
        name=name,
        state=s.state,
        last_round=s.last_round,
        last_train_loss=s.last_train_loss,
        bytes_up=s.bytes_up,
    )
    if s.last_score is not None:
        sc = s.last_score
        out.scored_round = s.scored_round
        out.update_norm = sc.norm
        out.update_cosine = sc.cosine
        out.update_norm_zscore = sc.norm_zscore
        out.weight_share = sc.weight_share
    return out
