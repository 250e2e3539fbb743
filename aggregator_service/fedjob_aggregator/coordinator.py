"""Round policy: open a round, wait for its silos or its deadline, close it, checkpoint, repeat.

All mutable state sits behind one condition variable, shared with the upload
protocol (`upload_protocol.py`, which gRPC handler threads drive: which uploads
may open, resume and complete). The main thread runs `run()`, which waits for
"every silo reported" or the deadline and then closes the round: quorum, the
strategy's math, evaluation, the checkpoint and the round's record.

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
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedjob.aggregation import Strategy, UpdateMeta
from fedjob.checkpoint import Checkpoint, CheckpointStore, CheckpointWriter
from fedjob.chunking import State, TensorInfo, count_chunks, iter_chunks, manifest_of
from fedjob.codec import DOWNLOAD_CODEC, Codec
from fedjob.downlink import downlink_encoder
from fedjob.errors import PermanentError
from fedjob.privacy import differential_privacy
from fedjob.robust import CoordinateSample
from fedjob.spec import FederatedJob, identity_differences, state_identity
from fedjob.update_stages import uplink_codec
from fedjob.uplink import job_uplink
from fedjob.v1 import fedjob_pb2 as pb
from fedjob_aggregator.broadcast import Broadcast
from fedjob_aggregator.claims import Claims
from fedjob_aggregator.recorder import RoundRecorder, evaluation_fields
from fedjob_aggregator.round_aggregators import CollectingAggregator, RoundAggregator, StreamingAggregator
from fedjob_aggregator.round_state import Refused, RoundState, SiloState
from fedjob_aggregator.upload_protocol import UploadProtocol

log = logging.getLogger("fedjob.aggregator")


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
        vocabulary: str | None = None,
    ) -> None:
        """`initial_state` may be a function, called only when there is no checkpoint to resume
        (then `manifest` names the tensors it will return, for the resume check). `vocabulary`:
        what the model's token ids mean (Tokenizer.vocabulary()); a checkpoint made under
        another is refused."""
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
        self.codec = uplink_codec(job.spec.compression)
        self.download_codec = Codec.from_name(DOWNLOAD_CODEC)
        self.chunk_bytes = job.spec.compression.chunk_bytes
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
        self.silos = {s: SiloState() for s in job.silo_names()}
        self.revoked: frozenset[str] = frozenset()  # silos the owner revoked: neither sampled nor awaited
        self.claims = Claims(job)
        self.uploads = UploadProtocol(
            cond=self.cond,
            round_for=self._round_for,
            current=lambda: self.current,
            silos=self.silos,
            claims=self.claims,
            strategy=strategy,
            codec=self.codec,
            chunk_bytes=self.chunk_bytes,
            manifest=self.manifest,
            upload_manifest=self.upload_manifest,
            # The silos' uplink stages: their aggregator halves check every upload.
            uplink=job_uplink(job.spec),
            spool_dir=self.spool_dir,
            observe=self.observe,
        )
        self.phase = "Running"
        self.message = ""
        self.rejected_total = 0
        self.dp = differential_privacy(strategy)
        # Which silos train: reproducible from the job's seed, except under differential privacy,
        # whose amplification by sampling assumes nobody can predict the sample.
        self._sampling_rng = np.random.default_rng() if self.dp is not None else None
        self.budget_stop: int | None = None  # the round after which the privacy budget ended the job
        # What the checkpoint must have been made with (training.lora.r, the algorithm, privacy, ...).
        self.identity = state_identity(job.spec, vocabulary)
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
            extra: dict[str, Any] = {"spec": self.identity}
            if self.evaluate is not None:
                # The baseline every round's eval loss is read against: the model before round 1.
                extra["initial_eval_loss"] = self.evaluate(state)
                log.info("round 0: eval loss %.4f (the starting model)", extra["initial_eval_loss"])
            ckpt = Checkpoint(0, state, [], extra=extra)
            self.store.save(ckpt)
        else:
            self._check_resumable(ckpt)
        self.completed = ckpt.round
        self.global_state = {n: ckpt.state[n] for n in self.manifest}
        # Bumped whenever the global model's buffers change hands: a download that sees it move
        # stops instead of sending a slice that may be half overwritten.
        self.generation = 0
        self._spare: State | None = None  # the previous global's buffers, for the next sum
        self.strategy.load_state(ckpt.strategy_state)
        self._check_budget()
        # The compressed downlink's copy: what the silos hold (from the checkpoint, or the model).
        self.broadcast: Broadcast | None = None
        encoder = downlink_encoder(job.spec.compression)
        if encoder is not None:
            resumed = bool(ckpt.broadcast) and manifest_of(ckpt.broadcast) == self.manifest
            copy = ckpt.broadcast if resumed else {n: v.copy() for n, v in self.global_state.items()}
            broadcast_id = str(ckpt.extra["broadcast_id"]) if resumed else None
            self.broadcast = Broadcast(encoder, workdir / "downlink", copy, broadcast_id)
        self.recorder = RoundRecorder(workdir / "metrics.jsonl", ckpt.history)
        self.initial_eval_loss = float(ckpt.extra.get("initial_eval_loss", math.nan))
        self.final_evaluation_done = bool(ckpt.extra.get("final_evaluation_done", False))
        del ckpt
        self.current: RoundState | None = None
        self.seen: set[str] = set()  # silos that called in since this process started
        self._first_round = True
        self.evaluates = self.claims.evaluates
        if self.completed >= self.final_round and (self.final_evaluation_done or not self.evaluates):
            self.phase = "Succeeded"
        log.info("job %s: resuming after round %d of %d", job.name, self.completed, self.spec.rounds)
        if self.dp is not None:
            self.observe("privacy", self.privacy_fields())

    def _check_resumable(self, ckpt: Checkpoint) -> None:
        """A checkpoint made under other state-shaping fields is refused, naming them."""
        saved = ckpt.extra.get("spec")
        where = f"the checkpoint in {self.store.dir} (after round {ckpt.round})"
        fix = "start afresh (fedjob run --fresh, or a new job name), or set those fields back"
        if saved is not None:
            differences = identity_differences(saved, self.identity)
            if differences:
                raise PermanentError(
                    "IncompatibleCheckpoint",
                    f"{where} was made with another spec: {'; '.join(differences)}; {fix}",
                )
        if manifest_of(ckpt.state) != self.manifest:
            raise PermanentError(
                "IncompatibleCheckpoint", f"{where} holds other tensors than this job's model trains; {fix}"
            )

    @property
    def final_round(self) -> int:
        """The last training round: spec.rounds, or earlier when the privacy budget ran out."""
        return self.budget_stop if self.budget_stop is not None else self.spec.rounds

    def _check_budget(self) -> None:
        """Stop before a round that would take epsilon past privacy.dp.targetEpsilon."""
        if self.dp is None or self.completed >= self.spec.rounds or not self.dp.would_exceed():
            return
        self.budget_stop = self.completed
        self.message = (
            f"privacy budget spent: stopped after round {self.completed} of {self.spec.rounds} at epsilon "
            f"{self.dp.epsilon:.4g} (delta {self.dp.delta:g}); another round would exceed targetEpsilon "
            f"{self.dp.target_epsilon:g}"
        )
        log.warning(self.message)

    def privacy_fields(self) -> dict[str, float]:
        """epsilon so far, for the round's record, status and metrics (differential privacy only)."""
        assert self.dp is not None
        out = {
            "dp_epsilon": self.dp.epsilon,
            "dp_delta": self.dp.delta,
            "dp_noise_multiplier": self.dp.noise_multiplier,
            "dp_clip_norm": self.dp.clip_norm,
        }
        if self.dp.target_epsilon is not None:
            out["dp_target_epsilon"] = self.dp.target_epsilon
        return out

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
        evaluation_only = number > self.final_round
        sampled = frozenset(self.silos) - self.revoked if evaluation_only else self._sample(number)
        self.current = RoundState(
            number=number,
            opened=now,
            deadline=now + (2 * limit if waiting else limit),
            aggregator=self._round_aggregator(number, evaluation_only),
            sampled=sampled,
            clock_started=not waiting,
            evaluation_only=evaluation_only,
        )
        self._spare = None
        for name, s in self.silos.items():
            s.progress = ""
            if s.state not in ("absent", "revoked"):
                s.state = "waiting" if name in sampled else "resting"
        log.info("round %d open (deadline in %.0f s)", number, self.spec.aggregation.round_deadline_seconds)
        self.observe("round_open", {"round": number})
        self.cond.notify_all()

    def revoke(self, silos: frozenset[str]) -> None:
        """The owner's revocations as they stand: a revoked silo is no longer sampled, and the
        open round stops waiting for it (an update it already delivered still counts)."""
        with self.cond:
            silos = silos & frozenset(self.silos)
            if silos == self.revoked:
                return
            for name, st in self.silos.items():
                if name in silos:
                    st.state = "revoked"
                elif st.state == "revoked":
                    st.state = "absent"  # may call again; counted once it does
            self.revoked = silos
            rnd = self.current
            if rnd is not None and not rnd.closing:
                rnd.sampled = rnd.sampled - (silos - rnd.reported.keys())
            self.cond.notify_all()

    def _sample(self, number: int) -> frozenset[str]:
        """The silos that train in round `number`: aggregation.silosPerRound of them, uniformly
        (of those not revoked)."""
        names = [n for n in self.silos if n not in self.revoked]
        k = self.spec.silos_per_round
        if k >= len(names):
            return frozenset(names)
        rng = self._sampling_rng or np.random.default_rng([self.spec.training.seed, number])
        return frozenset(str(x) for x in rng.choice(names, size=k, replace=False))

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
        return len(rnd.reported) == len(rnd.sampled) or time.time() >= rnd.deadline

    def _close_round(self, rnd: RoundState) -> None:
        """Called with the lock held; releases it for the slow parts."""
        close_started = time.time()
        rnd.closing = True
        if self.broadcast is not None:
            # Whole-copy downloads stream from the broadcast copy, which this close changes in place.
            self.generation += 1
        if rnd.evaluation_only:
            self._close_final_evaluation(rnd)
            return
        # A completed upload being folded right now still counts: it arrived in time.
        self.cond.wait_for(lambda: rnd.folding == 0)
        self.uploads.drop_unfinished(rnd, "round closed before the upload completed")
        missing = sorted(rnd.sampled - set(rnd.reported))
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
            # The last round: the spec's, or this one when the privacy budget allows no other.
            privacy = self.privacy_fields() if self.dp is not None else {}
            out_of_budget = self.dp is not None and rnd.number < self.spec.rounds and self.dp.would_exceed()
            last = rnd.number >= self.spec.rounds or out_of_budget
            # Compressed downlink: one change's bytes, and what the silos' copy still lacks (L2).
            downlink: dict[str, float] = {}
            if self.broadcast is not None:
                change = self.broadcast.advance(new_state, rnd.number)
                downlink = {
                    "downlink_change_bytes": change.payload_bytes,
                    "downlink_debt": self.broadcast.error(new_state),
                }
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
            # The first round's record carries the starting model's eval loss (the baseline).
            **(
                {"initial_eval_loss": self.initial_eval_loss}
                if rnd.number == 1 and not math.isnan(self.initial_eval_loss)
                else {}
            ),
            **({"sampled": sorted(rnd.sampled)} if len(rnd.sampled) < len(self.silos) else {}),
            **downlink,
            **privacy,
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
        if out_of_budget:
            self._check_budget()
        # The write runs beside the next round; the next close waits for it, so a crash
        # loses at most the round in flight. The metrics line follows the checkpoint.
        self.writer.submit(
            Checkpoint(
                rnd.number,
                new_state,
                self.recorder.snapshot(),
                strategy_state=self.strategy.state(),
                broadcast=self.broadcast.state if self.broadcast is not None else {},
                extra={
                    "spec": self.identity,
                    **(
                        {}
                        if math.isnan(self.initial_eval_loss)
                        else {"initial_eval_loss": self.initial_eval_loss}
                    ),
                    **({"broadcast_id": self.broadcast.id} if self.broadcast is not None else {}),
                },
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
            self.claims.check_evaluation(silo, loss, samples)
            if silo in rnd.reported:
                raise Refused("ALREADY_EXISTS", "replay", f"{silo} already reported its evaluation")
            rnd.reported[silo] = UpdateMeta(silo, 1, 1, math.nan, loss, samples)
            self.silos[silo].state = "reported"
            self.cond.notify_all()

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
                    and silo in rnd.sampled
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

    def download(self, silo: str, round_number: int, have: str = "") -> Iterator[pb.Chunk]:
        """The global model (and the strategy's per-silo tensors), encoded slice by slice as sent.

        Nothing is pre-encoded: each call streams from the stored global state, so a
        download costs one chunk of memory, not a copy of the model. With a compressed
        downlink, the changes since the copy the silo holds (`have`), or the whole copy.
        """
        if self.broadcast is not None:
            yield from self._download_copy(silo, round_number, have)
            return
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

    def _download_copy(self, silo: str, round_number: int, have: str) -> Iterator[pb.Chunk]:
        assert self.broadcast is not None
        with self.cond:
            rnd = self._round_for(silo, round_number)
            generation = self.generation
            chunks = self.broadcast.stream(have, self.chunk_bytes)
        for chunk in chunks:
            if self.generation != generation:
                raise Refused(
                    "FAILED_PRECONDITION", "stale_round", f"round {round_number} closed during the download"
                )
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
        if silo not in rnd.sampled:
            raise Refused(
                "FAILED_PRECONDITION",
                "not_sampled",
                f"{silo} is not among round {rnd.number}'s sampled silos",
            )
        return rnd

    PROGRESS_PHASES = ("downloading", "training", "evaluating", "uploading")

    def report_progress(self, silo: str, round_number: int, phase: str, step: int, steps: int) -> None:
        """Where a silo is within the open round, for status (a stale round's report is dropped)."""
        if phase not in self.PROGRESS_PHASES or step > steps or steps > 10_000_000:
            raise Refused("INVALID_ARGUMENT", "bad_message", f"not a progress report: {phase} {step}/{steps}")
        with self.cond:
            self._saw(silo)
            rnd = self.current
            if rnd is None or rnd.number != round_number or silo in rnd.reported:
                return
            self.silos[silo].progress = f"{phase} {step}/{steps}" if steps else phase

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
            status = pb.JobStatus(
                job=self.job.name,
                phase=self.phase,
                round=self.completed,
                total_rounds=self.spec.rounds,
                silos=[_silo_status(n, s) for n, s in self.silos.items()],
                last_round=rm,
                message=self.message,
                updates_rejected=self.rejected_total,
                initial_eval_loss=self.initial_eval_loss,
                **self.recorder.latest_federated_eval(),
            )
            if self.dp is not None:
                status.dp = True
                status.dp_epsilon = self.dp.epsilon
                status.dp_delta = self.dp.delta
                status.dp_target_epsilon = self.dp.target_epsilon or 0.0
                status.privacy_budget_spent = self.budget_stop is not None
            return status


def _silo_status(name: str, s: SiloState) -> pb.SiloStatus:
    out = pb.SiloStatus(
        name=name,
        state=s.state,
        last_round=s.last_round,
        last_train_loss=s.last_train_loss,
        bytes_up=s.bytes_up,
        progress=s.progress,
    )
    if s.last_score is not None:
        sc = s.last_score
        out.scored_round = s.scored_round
        out.update_norm = sc.norm
        out.update_cosine = sc.cosine
        out.update_norm_zscore = sc.norm_zscore
        out.weight_share = sc.weight_share
    return out
