"""The round state machine: open a round, collect updates, close it, checkpoint, repeat.

All mutable state sits behind one condition variable. gRPC handler threads call
`begin_upload` / `add_chunk` / `finish_upload`; the main thread runs `run()`, which
waits for "every silo reported" or the deadline and then closes the round.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedjob.aggregation import RunningSum, Strategy, UpdateMeta
from fedjob.checkpoint import Checkpoint, CheckpointStore
from fedjob.chunking import (
    ChunkRejected,
    ChunkValidator,
    State,
    count_chunks,
    iter_chunks,
    manifest_of,
    raw_bytes,
)
from fedjob.codec import Codec
from fedjob.spec import FederatedJob
from fedjob.v1 import fedjob_pb2 as pb

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
class Upload:
    silo: str
    round: int
    upload_id: str
    meta: UpdateMeta
    weight: float
    validator: ChunkValidator
    total_chunks: int
    spool: Path
    raw_bytes: int
    streaming: bool = True  # a handler is reading this upload's stream right now


@dataclass
class SiloState:
    state: str = "absent"
    last_round: int = 0
    last_train_loss: float = math.nan
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class RoundState:
    number: int
    opened: float
    deadline: float
    total: RunningSum
    download: list[pb.Chunk]
    download_bytes: int
    reported: dict[str, UpdateMeta] = field(default_factory=dict)
    in_flight: dict[str, Upload] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    raw_up: int = 0
    rejected: int = 0
    clock_started: bool = True


Observer = Callable[[str, dict[str, Any]], None]


class Coordinator:
    def __init__(
        self,
        job: FederatedJob,
        strategy: Strategy,
        initial_state: State,
        workdir: Path,
        evaluate: Callable[[State], float] | None = None,
        finalize: Callable[[State], None] | None = None,
        observe: Observer | None = None,
    ) -> None:
        self.job = job
        self.spec = job.spec
        self.strategy = strategy
        self.manifest = manifest_of(initial_state)
        # What an update carries: the parameter deltas, then any tensors the strategy adds.
        self.upload_manifest = {**self.manifest, **strategy.upload_extras_manifest(self.manifest)}
        self.codec = Codec.from_spec(job.spec.compression.codec, job.spec.compression.zstd)
        self.download_codec = Codec.from_spec("none", job.spec.compression.zstd)
        self.chunk_bytes = job.spec.compression.chunk_bytes
        self.expected_chunks = count_chunks(self.upload_manifest, self.codec, self.chunk_bytes)
        self.evaluate = evaluate
        self.finalize = finalize
        self.observe = observe or (lambda event, fields: None)
        self.store = CheckpointStore(workdir / "checkpoints")
        self.spool_dir = workdir / "spool"
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = workdir / "metrics.jsonl"
        self.cond = threading.Condition()
        self.silos = {s: SiloState() for s in job.silo_names()}
        self.phase = "Running"
        self.message = ""
        self.rejected_total = 0
        ckpt = self.store.load()
        if ckpt is None:
            ckpt = Checkpoint(0, initial_state, [])
            self.store.save(ckpt)
        elif set(ckpt.state) != set(self.manifest):
            raise RuntimeError(f"checkpoint in {self.store.dir} does not belong to this job's model")
        self.completed = ckpt.round
        self.global_state = {n: ckpt.state[n] for n in self.manifest}
        self.strategy.load_state(ckpt.strategy_state)
        self.history = ckpt.history
        self._rewrite_metrics()
        self.current: RoundState | None = None
        self.seen: set[str] = set()  # silos that called in since this process started
        self._first_round = True
        if self.completed >= self.spec.rounds:
            self.phase = "Succeeded"
        log.info("job %s: resuming after round %d of %d", job.name, self.completed, self.spec.rounds)

    # ----- rounds -------------------------------------------------------------------------------

    def _open_round(self) -> None:
        number = self.completed + 1
        rng = np.random.default_rng(number)
        download = list(iter_chunks(self.global_state, self.download_codec, self.chunk_bytes, rng))
        now = time.time()
        limit = self.spec.aggregation.round_deadline_seconds
        # The first round after a (re)start waits for minSilos silos to call in before its
        # clock starts (pods may still be scheduling, silos backing off), at most one deadline.
        waiting = self._first_round and len(self.seen) < self.spec.aggregation.min_silos
        self._first_round = False
        self.current = RoundState(
            number=number,
            opened=now,
            deadline=now + (2 * limit if waiting else limit),
            total=RunningSum(self.manifest),
            download=download,
            download_bytes=sum(len(c.payload) for c in download),
            clock_started=not waiting,
        )
        for s in self.silos.values():
            s.state = "waiting" if s.state != "absent" else "absent"
        log.info("round %d open (deadline in %.0f s)", number, self.spec.aggregation.round_deadline_seconds)
        self.observe("round_open", {"round": number})
        self.cond.notify_all()

    def run(self, stop: threading.Event | None = None) -> str:
        """Drive rounds until the job ends; returns the final phase."""
        stop = stop or threading.Event()
        with self.cond:
            while self.phase == "Running" and not stop.is_set():
                if self.current is None:
                    self._open_round()
                rnd = self.current
                assert rnd is not None
                self.cond.wait_for(lambda r=rnd: self._round_over(r) or stop.is_set(), timeout=0.5)
                if stop.is_set():
                    break
                if self._round_over(rnd):
                    self._close_round(rnd)
            self.cond.notify_all()
        return self.phase

    def _round_over(self, rnd: RoundState) -> bool:
        return len(rnd.reported) == len(self.silos) or time.time() >= rnd.deadline

    def _close_round(self, rnd: RoundState) -> None:
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
            self.current = None
            return
        started = time.time()
        new_state = self.strategy.apply(self.global_state, rnd.total, rnd.number)
        eval_loss = self.evaluate(new_state) if self.evaluate else math.nan
        losses = {m.silo: m.train_loss for m in rnd.reported.values()}
        up = sum(rnd.bytes_up.values())
        record = {
            "round": rnd.number,
            "train_loss": float(np.mean(list(losses.values()))),
            "silo_train_loss": dict(sorted(losses.items())),
            "eval_loss": None if math.isnan(eval_loss) else eval_loss,
            "participants": sorted(rnd.reported),
            "num_participants": len(rnd.reported),
            "missing": missing,
            "bytes_up": up,
            "bytes_down": sum(rnd.bytes_down.values()),
            "silo_bytes_up": dict(sorted(rnd.bytes_up.items())),
            "compression_ratio": rnd.raw_up / up if up else None,
            "rejected_updates": rnd.rejected,
            "seconds": round(time.time() - rnd.opened, 3),
            "aggregation_seconds": round(time.time() - started, 3),
        }
        self.history.append(record)
        self.store.save(Checkpoint(rnd.number, new_state, self.history, strategy_state=self.strategy.state()))
        self.global_state = new_state
        self.completed = rnd.number
        self.current = None
        with open(self.metrics_path, "a") as f:
            f.write(_json(record) + "\n")
        log.info(
            "round %d closed: %d silos, train loss %.4f, eval loss %s, %.1f s",
            rnd.number,
            len(rnd.reported),
            record["train_loss"],
            record["eval_loss"],
            record["seconds"],
        )
        self.observe("round_closed", record)
        if self.completed >= self.spec.rounds:
            if self.finalize:
                self.finalize(self.global_state)
            self.phase = "Succeeded"
            self.observe("succeeded", {"round": self.completed})

    def _rewrite_metrics(self) -> None:
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(_json(r) + "\n" for r in self.history))
        os.replace(tmp, self.metrics_path)

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
                if rnd is not None and rnd.number > after_round and silo not in rnd.reported:
                    self.silos[silo].state = "training"
                    return pb.Task(state=pb.Task.TRAIN, round=rnd.number, deadline_unix=rnd.deadline)
                left = end - time.time()
                if left <= 0:
                    return pb.Task(state=pb.Task.WAIT, round=self.completed)
                self.cond.wait(timeout=left)

    def download(self, silo: str, round_number: int) -> list[pb.Chunk]:
        with self.cond:
            rnd = self._round_for(silo, round_number)
            chunks = rnd.download
            extras = self.strategy.download_extras(silo, self.manifest)
            if extras:  # per-silo tensors (SCAFFOLD's c - c_i) continue the same stream
                rng = np.random.default_rng([rnd.number, len(rnd.download)])
                chunks = chunks + list(
                    iter_chunks(extras, self.download_codec, self.chunk_bytes, rng, start_seq=len(chunks))
                )
            sent = sum(len(c.payload) for c in chunks)
            rnd.bytes_down[silo] = rnd.bytes_down.get(silo, 0) + sent
            self.silos[silo].bytes_down += sent
            return chunks

    def _round_for(self, silo: str, round_number: int) -> RoundState:
        rnd = self.current
        if rnd is None or self.phase != "Running":
            raise Refused("FAILED_PRECONDITION", "no_open_round", f"no round is open (job {self.phase})")
        if round_number < rnd.number:
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

    def begin_upload(self, silo: str, header: pb.UpdateHeader) -> Upload:
        with self.cond:
            rnd = self._round_for(silo, header.round)
            if silo in rnd.reported:
                raise Refused(
                    "ALREADY_EXISTS", "replay", f"{silo} already delivered its update for round {rnd.number}"
                )
            if header.num_samples == 0 or not math.isfinite(header.train_loss) or header.local_steps == 0:
                raise Refused(
                    "INVALID_ARGUMENT",
                    "bad_header",
                    "header needs num_samples > 0, local_steps > 0 and a finite train_loss",
                )
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
            if held is not None and held.upload_id == header.upload_id:
                if header.resume_from != held.validator.next_seq:
                    raise Refused(
                        "FAILED_PRECONDITION",
                        "out_of_order",
                        f"resume from chunk {header.resume_from}, "
                        f"the aggregator holds up to {held.validator.next_seq}",
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
            meta = UpdateMeta(
                silo, int(header.num_samples), int(header.local_steps), float(header.train_loss)
            )
            up = Upload(
                silo=silo,
                round=rnd.number,
                upload_id=header.upload_id,
                meta=meta,
                weight=self.strategy.weight(meta),
                validator=ChunkValidator(self.upload_manifest, self.codec, self.chunk_bytes),
                total_chunks=header.total_chunks,
                spool=self.spool_dir / f"r{rnd.number}-{silo}.spool",
                raw_bytes=raw_bytes(self.upload_manifest),
            )
            up.spool.write_bytes(b"")
            rnd.in_flight[silo] = up
            self.silos[silo].state = "uploading"
            return up

    def add_chunk(self, up: Upload, chunk: pb.Chunk) -> None:
        with self.cond:
            rnd = self._live(up)
            try:
                name, offset, values = up.validator.check(chunk)
            except ChunkRejected as exc:
                self._discard(rnd, up, exc.detail)
                raise Refused(
                    CHUNK_REASON_CODES.get(exc.reason, "INVALID_ARGUMENT"), exc.reason, exc.detail
                ) from None
            if name in self.manifest:
                rnd.total.fold(name, offset, values, up.weight)
            else:
                self.strategy.fold_extra(up.silo, self.upload_manifest[name], offset, values)
            # Keep what was folded, so a broken upload can be taken out again exactly.
            data = chunk.SerializeToString()
            with open(up.spool, "ab") as f:
                f.write(len(data).to_bytes(4, "little") + data)
            rnd.bytes_up[up.silo] = rnd.bytes_up.get(up.silo, 0) + len(chunk.payload)
            self.silos[up.silo].bytes_up += len(chunk.payload)

    def finish_upload(self, up: Upload, trailer: pb.UpdateTrailer) -> None:
        with self.cond:
            rnd = self._live(up)
            missing = up.validator.missing()
            if trailer.total_chunks != up.total_chunks or up.validator.next_seq != up.total_chunks or missing:
                self._discard(rnd, up, f"incomplete: {up.validator.next_seq} of {up.total_chunks} chunks")
                raise Refused(
                    "FAILED_PRECONDITION",
                    "incomplete",
                    f"update incomplete: got {up.validator.next_seq} of {up.total_chunks} chunks",
                )
            rnd.total.commit(up.meta, up.weight)
            rnd.reported[up.silo] = up.meta
            rnd.raw_up += up.raw_bytes
            del rnd.in_flight[up.silo]
            up.spool.unlink(missing_ok=True)
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
            return held.validator.next_seq if held is not None and held.upload_id == upload_id else 0

    def stream_ended(self, up: Upload) -> None:
        with self.cond:
            up.streaming = False

    def _live(self, up: Upload) -> RoundState:
        rnd = self.current
        if rnd is None or rnd.number != up.round or rnd.in_flight.get(up.silo) is not up:
            raise Refused("FAILED_PRECONDITION", "stale_round", f"round {up.round} closed during the upload")
        return rnd

    def _discard(self, rnd: RoundState, up: Upload, why: str) -> None:
        """Take a partial upload back out of the running sum, from its spool."""
        validator = ChunkValidator(self.upload_manifest, self.codec, self.chunk_bytes)
        if up.spool.exists():
            data = up.spool.read_bytes()
            pos = 0
            while pos < len(data):
                n = int.from_bytes(data[pos : pos + 4], "little")
                chunk = pb.Chunk.FromString(data[pos + 4 : pos + 4 + n])
                pos += 4 + n
                name, offset, values = validator.check(chunk)
                # Extras are written in place and only used for committed uploads: nothing to undo.
                if name in self.manifest:
                    rnd.total.unfold(name, offset, values, up.weight)
            up.spool.unlink(missing_ok=True)
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
            last = self.history[-1] if self.history else None
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
                silos=[
                    pb.SiloStatus(
                        name=n,
                        state=s.state,
                        last_round=s.last_round,
                        last_train_loss=s.last_train_loss,
                        bytes_up=s.bytes_up,
                    )
                    for n, s in self.silos.items()
                ],
                last_round=rm,
                message=self.message,
                updates_rejected=self.rejected_total,
            )


def _json(record: dict[str, Any]) -> str:
    import json

    return json.dumps(record, sort_keys=False)
