"""The upload protocol: which uploads a silo may open, resume, complete, and when one is dropped.

One silo, one upload at a time, for the open round only, never twice: a header is
checked (round, replay, claims, chunk count) before a session opens; chunks are
checked and spooled outside the lock, so silos upload in parallel and status keeps
answering; the trailer hands the whole update to the round's aggregator. Round
policy (when rounds open and close, quorum, deadlines) is the coordinator's; this
module only reads the open round it is given.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedjob.aggregation import Strategy
from fedjob.chunking import ChunkRejected, TensorInfo, count_chunks
from fedjob.codec import Codec
from fedjob.update_stages import UpdateRejected, UplinkPipeline
from fedjob.v1 import fedjob_pb2 as pb
from fedjob_aggregator.claims import Claims
from fedjob_aggregator.round_state import Refused, RoundState, SiloState
from fedjob_aggregator.upload_session import SessionClosed, UploadSession

CHUNK_REASON_CODES = {
    "checksum": "DATA_LOSS",
    "oversized": "RESOURCE_EXHAUSTED",
    "duplicate_chunk": "FAILED_PRECONDITION",
    "out_of_order": "FAILED_PRECONDITION",
}


class UploadProtocol:
    def __init__(
        self,
        *,
        cond: threading.Condition,
        round_for: Callable[[str, int], RoundState],
        current: Callable[[], RoundState | None],
        silos: dict[str, SiloState],
        claims: Claims,
        strategy: Strategy,
        codec: Codec,
        chunk_bytes: int,
        manifest: Mapping[str, TensorInfo],
        upload_manifest: Mapping[str, TensorInfo],
        uplink: UplinkPipeline,
        spool_dir: Path,
        observe: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self.cond = cond  # the coordinator's: round state changes only under it
        self._round_for = round_for
        self._current = current
        self.silos = silos
        self.claims = claims
        self.strategy = strategy
        self.codec = codec
        self.chunk_bytes = chunk_bytes
        self.manifest = manifest
        self.upload_manifest = upload_manifest
        self.uplink = uplink
        self.spool_dir = spool_dir
        self.observe = observe
        self.expected_chunks = count_chunks(upload_manifest, codec, chunk_bytes)
        self._fold_lock = threading.Lock()  # one update at a time into the sum
        self._checking = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))  # chunks decoded at once

    def begin(self, silo: str, header: pb.UpdateHeader) -> UploadSession:
        with self.cond:
            rnd = self._round_for(silo, header.round)
            if silo in rnd.reported:
                raise Refused(
                    "ALREADY_EXISTS", "replay", f"{silo} already delivered its update for round {rnd.number}"
                )
            if header.eval_samples:
                self.claims.check_evaluation(silo, header.eval_loss, int(header.eval_samples))
            if rnd.evaluation_only:
                raise Refused(
                    "FAILED_PRECONDITION",
                    "not_training",
                    f"round {rnd.number} only evaluates the final model; use ReportEvaluation",
                )
            self.claims.check_header(silo, header)
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
                rnd.drop(held, self.silos[silo], "superseded by a new upload")
            if header.resume_from != 0:
                raise Refused(
                    "FAILED_PRECONDITION",
                    "out_of_order",
                    f"nothing held for upload {header.upload_id!r}; start at chunk 0",
                )
            meta = self.claims.meta(silo, header)
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
                    rnd.drop(up, self.silos[up.silo], exc.detail)
            raise Refused(
                CHUNK_REASON_CODES.get(exc.reason, "INVALID_ARGUMENT"), exc.reason, exc.detail
            ) from None
        with self.cond:
            self._live(up)  # the round may have closed meanwhile: the spool is gone with it
            rnd.bytes_up[up.silo] = rnd.bytes_up.get(up.silo, 0) + size
            self.silos[up.silo].bytes_up += size

    def finish(self, up: UploadSession, trailer: pb.UpdateTrailer) -> None:
        """The trailer arrived: hand the whole update to the round's aggregator, or refuse it."""
        with self.cond:
            rnd = self._live(up)
            why = up.incomplete(trailer.total_chunks)
            if why is not None:
                rnd.drop(up, self.silos[up.silo], f"incomplete: {why}")
                raise Refused("FAILED_PRECONDITION", "incomplete", f"update incomplete: {why}")
            try:
                up.settle()
            except UpdateRejected as exc:
                rnd.drop(up, self.silos[up.silo], exc.detail)
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
                rnd.drop(up, self.silos[up.silo], "its spool could not be read back")
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
            rnd = self._current()
            if rnd is None or rnd.number != round_number:
                return 0
            held = rnd.in_flight.get(silo)
            return held.next_seq if held is not None and held.upload_id == upload_id else 0

    def stream_ended(self, up: UploadSession) -> None:
        with self.cond:
            up.streaming = False

    def drop_unfinished(self, rnd: RoundState, why: str) -> None:
        """The round closes: uploads still streaming do not count (called under the lock)."""
        for up in list(rnd.in_flight.values()):
            rnd.drop(up, self.silos[up.silo], why)

    def _live(self, up: UploadSession) -> RoundState:
        rnd = self._current()
        if (
            rnd is None
            or rnd.number != up.round
            or rnd.closing
            or rnd.in_flight.get(up.silo) is not up
            or up.folding
        ):
            raise Refused("FAILED_PRECONDITION", "stale_round", f"round {up.round} closed during the upload")
        return rnd
