"""A silo: its training processes, and rank 0's conversation with the aggregator, round after round."""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import socket
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np

from fedjob.chunking import State, TensorInfo
from fedjob.codec import DOWNLOAD_CODEC, Codec
from fedjob.downlink import GlobalCopy, downlink_encoder
from fedjob.silo_outcome import SiloOutcome
from fedjob.spec import FederatedJob
from fedjob.stage_state import StageStateStore, StatefulUplink
from fedjob.strategies import make_strategy
from fedjob.tls import CertFiles
from fedjob.update_stages import Update, uplink_codec
from fedjob.uplink import job_uplink
from fedjob.v1 import fedjob_pb2 as pb

log = logging.getLogger("fedjob.worker")


@dataclass(frozen=True)
class WorkerOptions:
    silo: str
    address: str
    certs: Path
    server_name: str | None = None
    state: Path | None = None  # where the silo's update-stage state survives a restart


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_silo(job: FederatedJob, opts: WorkerOptions) -> int:
    """Run every process of the silo (or just this one, under torchrun / a launcher that set RANK)."""
    job.silo(opts.silo)  # KeyError with a clear message when the silo is not in the job
    world = job.silo(opts.silo).processes
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _rank_main(
            job,
            opts,
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("MASTER_PORT", "29500")),
        )
    if world == 1:
        return _rank_main(job, opts, 0, 1, free_port())
    port = free_port()
    ctx = mp.get_context("spawn")
    procs: list[BaseProcess] = [
        ctx.Process(target=_rank_entry, args=(job, opts, r, world, port), name=f"{opts.silo}-rank{r}")
        for r in range(world)
    ]
    for p in procs:
        p.start()
    return _supervise_ranks(procs)


def _supervise_ranks(procs: list[BaseProcess]) -> int:
    """Wait for the ranks; one that fails takes the others down, and so does SIGTERM/SIGINT.

    The ranks meet in collectives, so a rank killed by the OOM killer would leave the others
    blocked for good: the silo would hang instead of failing and being retried. And without
    this, a SIGTERM to the silo would kill only this parent and orphan its ranks.
    """
    stopping: list[int] = []

    def stop(signum: int, frame: object) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        running = list(procs)
        while running and not stopping:
            mp_connection.wait([p.sentinel for p in running], timeout=0.5)
            running = [p for p in running if p.exitcode is None]
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if failed and running:
                log.error(
                    "%s exited with %s; stopping the silo's other ranks", failed[0].name, failed[0].exitcode
                )
                break
        for p in procs:
            if p.exitcode is None:
                p.terminate()
        for p in procs:
            p.join(10)
            if p.exitcode is None:
                p.kill()
                p.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping:
        return 128 + stopping[0]
    return max((p.exitcode or 0 for p in procs), key=abs)


def _rank_entry(job: FederatedJob, opts: WorkerOptions, rank: int, world: int, port: int) -> None:
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s"
    )
    raise SystemExit(_rank_main(job, opts, rank, world, port))


def _broadcast_state(received: State | None, manifest: dict[str, TensorInfo], rank: int, world: int) -> State:
    """Rank 0's downloaded tensors to every rank, tensor by tensor on the ranks' device.

    (Not broadcast_object_list: that would pickle the whole model into one host buffer.)
    """
    if world == 1:
        assert received is not None
        return received
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    out: State = {}
    for name, info in manifest.items():
        if rank == 0:
            assert received is not None
            t = torch.from_numpy(np.ascontiguousarray(received[name])).to(device)
        else:
            t = torch.empty(info.shape, dtype=torch.float32, device=device)
        dist.broadcast(t, src=0)
        out[name] = received[name] if rank == 0 and received is not None else t.cpu().numpy()
    return out


def _progress(client: Any, round_number: int, every: float = 2.0) -> Callable[[int, int], None] | None:
    """Rank 0's training-step callback: a progress report at most every `every` seconds."""
    if client is None:
        return None
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.time()
        if now - last[0] >= every:
            last[0] = now
            client.report_progress(round_number, "training", done, total)

    return report


def _rank_main(job: FederatedJob, opts: WorkerOptions, rank: int, world: int, port: int) -> int:
    import torch.distributed as dist

    from fedjob_worker.client import AggregatorClient, RoundClosed, UpdateRefused
    from fedjob_worker.trainer import LocalTrainer, init_distributed

    init_distributed(rank, world, port)
    trainer = LocalTrainer(job, opts.silo, rank, world)
    comp = job.spec.compression
    codec = uplink_codec(comp)
    download_codec = Codec.from_name(DOWNLOAD_CODEC)
    manifest = trainer.manifest()  # loads the model and builds the engine, once for the whole job
    # Tensors the job's algorithm adds to the stream (SCAFFOLD's control variates).
    strategy = make_strategy(job.spec)
    download_manifest = {**manifest, **strategy.download_extras_manifest(manifest)}
    # Compressed downlink: rank 0 keeps the global copy and receives its changes.
    encoder = downlink_encoder(comp)
    copy = (
        GlobalCopy(manifest, encoder.codec, comp.chunk_bytes) if encoder is not None and rank == 0 else None
    )
    client = None
    uplink: StatefulUplink | None = None
    if rank == 0:
        uplink = StatefulUplink(
            job_uplink(job.spec), StageStateStore(opts.state) if opts.state is not None else None
        )
        if uplink.pipeline.stages:
            log.info(
                "uplink stages: %s%s",
                uplink.pipeline.name,
                f" (state restored from round {uplink.restored_round})" if uplink.restored_round else "",
            )
        if uplink.pipeline.stateful and opts.state is None:
            log.warning("no --state folder: the uplink's stage state is lost if this silo restarts")
        client = AggregatorClient(
            opts.address, CertFiles(opts.certs), opts.silo, comp.chunk_bytes, server_name=opts.server_name
        )
        reply = client.join()
        log.info(
            "silo %s joined job %s at round %d/%d",
            reply.silo,
            reply.job,
            reply.current_round,
            reply.total_rounds,
        )
    delivered = 0  # the last round whose update the aggregator accepted
    evaluated = 0  # the last EVALUATE round whose loss the aggregator took
    while True:
        box: list[Any] = [None]
        if client is not None:
            # "Any round I have not delivered": a restarted aggregator that lost this
            # silo's update for the open round hands that round out again.
            task = client.next_task(max(delivered - 1, evaluated, 0))
            box[0] = (task.state, task.round, task.message)
        dist.broadcast_object_list(box, src=0)
        state, round_number, message = box[0]
        if state in (pb.Task.DONE, pb.Task.FAILED):
            if state == pb.Task.DONE:
                log.info("job finished after round %d", round_number)
            else:
                # The job's failure is the aggregator's to report; a non-zero exit here
                # would only make Kubernetes retry a silo that did nothing wrong.
                log.error("the job failed at the aggregator: %s", message)
            if client is not None:
                phase = "Succeeded" if state == pb.Task.DONE else "Failed"
                SiloOutcome(round_number, reply.total_rounds, phase).write()
            break
        ok: list[Any] = [True]
        received: State | None = None
        if client is not None:
            started = time.time()
            client.report_progress(round_number, "downloading")
            try:
                if copy is not None:
                    nbytes = client.download_copy(round_number, copy)
                    assert copy.state is not None
                    received = copy.state
                    log.info("round %d: global copy %s (%s)", round_number, copy.id, copy.last)
                else:
                    received, nbytes = client.download(
                        round_number, download_manifest, download_codec, comp.chunk_bytes
                    )
                log.info(
                    "round %d: downloaded %d bytes in %.2f s", round_number, nbytes, time.time() - started
                )
            except RoundClosed as exc:
                log.info(
                    "round %d closed before this silo could start it (%s); asking again", round_number, exc
                )
                ok[0] = False
        dist.broadcast_object_list(ok, src=0)
        if not ok[0]:  # every rank skips the closed round together
            continue
        received = _broadcast_state(received, download_manifest, rank, world)
        global_state = {n: received[n] for n in manifest}
        extras = {n: v for n, v in received.items() if n not in manifest}
        # Federated evaluation of the model this round starts from, on this silo's held-out text.
        started = time.time()
        trainer.load_global(global_state)
        if client is not None and trainer.eval_samples:
            client.report_progress(round_number, "evaluating")
        evaluation = trainer.evaluate()
        if evaluation is not None:
            log.info(
                "round %d: held-out loss of the global model %.4f (%d windows, %.1f s)",
                round_number,
                evaluation.loss,
                evaluation.samples,
                time.time() - started,
            )
        if state == pb.Task.EVALUATE:
            if client is not None and evaluation is not None:
                try:
                    client.report_evaluation(round_number, evaluation.loss, evaluation.samples)
                except UpdateRefused as exc:
                    log.error("round %d: evaluation refused: %s", round_number, exc)
            evaluated = round_number
            continue
        started = time.time()
        result = trainer.train(
            round_number, global_state, extras, load=False, on_step=_progress(client, round_number)
        )
        log.info(
            "round %d: %d local steps, loss %.4f, %.1f s",
            round_number,
            result.steps,
            result.train_loss,
            time.time() - started,
        )
        if client is not None and uplink is not None:
            deltas = result.state  # trainer-owned arrays: the delta is computed in place
            for n, g in global_state.items():
                deltas[n] -= g
            update = Update(round_number, deltas, dict(result.extras))
            uplink.apply(update)
            # The upload encodes with this seed; error feedback sees the very same encoding.
            seed = zlib.crc32(f"{job.spec.training.seed}/{round_number}/{opts.silo}".encode())
            uplink.pipeline.owe_wire_error(update, codec, comp.chunk_bytes, seed)
            delta = {**update.deltas, **update.extras}
            client.report_progress(round_number, "uploading")
            try:
                sent = client.upload(
                    round_number,
                    delta,
                    codec,
                    comp.chunk_bytes,
                    seed=seed,
                    num_samples=trainer.num_samples,
                    local_steps=result.steps,
                    train_loss=result.train_loss,
                    eval_loss=evaluation.loss if evaluation is not None else 0.0,
                    eval_samples=evaluation.samples if evaluation is not None else 0,
                )
                log.info("round %d: update sent, %d bytes (%s)", round_number, sent, codec.name)
                delivered = round_number
                uplink.commit(round_number)
            except UpdateRefused as exc:
                log.error("round %d: update refused: %s", round_number, exc)
                uplink.rollback()
    if client is not None:
        client.close()
    trainer.close()
    dist.barrier()
    # Tear the process group down before interpreter exit: left to atexit, DeepSpeed's
    # shared-memory communicator aborts the process and the pod would read as failed.
    dist.destroy_process_group()
    return 0
