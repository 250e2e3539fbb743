"""Start the aggregator: mTLS gRPC server, health, Prometheus endpoint, and the round loop."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from fedjob import modeling
from fedjob.checkpoint import atomic_write
from fedjob.chunking import State
from fedjob.silo_data import eval_data
from fedjob.spec import FederatedJob
from fedjob.strategies import make_strategy
from fedjob.tls import CertFiles
from fedjob.tokenization import load_tokenizer
from fedjob.v1 import fedjob_pb2_grpc as pb_grpc
from fedjob_aggregator.admission import pool_size
from fedjob_aggregator.coordinator import Coordinator
from fedjob_aggregator.enrollment_desk import EnrollmentDesk
from fedjob_aggregator.metrics import AggregatorMetrics
from fedjob_aggregator.servicer import EnrollmentServicer, FederatedTrainingServicer

log = logging.getLogger("fedjob.aggregator")
SERVICE = "fedjob.v1.FederatedTraining"


@dataclass
class AggregatorOptions:
    certs: Path
    workdir: Path
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9090
    # Opened only for a job with external silos (0: any free port).
    enrollment_port: int = 50052
    # After the last round: stay up this long for silos to hear the end, then exit
    # (`fedjob run`). None: keep serving status until SIGTERM (a Deployment's pod
    # must not exit, or it is restarted; the operator scales it to zero).
    linger_seconds: float | None = None


class _ModelHooks:
    """What the aggregator needs of the model: the trainable tensors' manifest and initial values,
    evaluation (only when the job asks for aggregator-side eval) and writing the result.

    None of it loads the frozen base weights, except evaluation, which needs the whole model:
    it is built at the first evaluation, on this pod's GPU when it has one (in bf16 when the
    job trains in bf16), else on the CPU.
    """

    def __init__(self, job: FederatedJob, workdir: Path) -> None:
        self.job = job
        self.workdir = workdir
        self.manifest = modeling.trainable_manifest(job)
        tokenizer = load_tokenizer(job)
        self.vocabulary = tokenizer.vocabulary()
        self.batches: list[Any] = []
        self._model: Any = None
        shared = eval_data(job, tokenizer)
        if shared is not None and job.spec.eval is not None:
            self.batches = shared.fixed_batches(job.spec.eval.batches, job.spec.training.batch_size)

    def initial_state(self) -> State:
        return modeling.initial_state(self.job, self.manifest)

    def evaluate(self, state: State) -> float:
        if self._model is None:
            import torch

            cuda = torch.cuda.is_available()
            dtype = torch.bfloat16 if cuda and self.job.spec.training.deepspeed.bf16 else torch.float32
            self._model = modeling.build_model(self.job, dtype=dtype)
            if cuda:
                self._model.to("cuda")
            log.info("aggregator-side evaluation on %s (%s)", "cuda" if cuda else "cpu", dtype)
        modeling.set_state(self._model, state)
        return modeling.mean_loss(self._model, self.batches)

    def finalize(self, state: State) -> None:
        target = self.workdir / modeling.result_folder(self.job)
        modeling.save_result(self.job, state, target)
        log.info("wrote the trained result to %s", target)


def build_server(
    job: FederatedJob, servicer: FederatedTrainingServicer, certs: CertFiles, host: str, port: int
) -> tuple[grpc.Server, int, health.HealthServicer]:
    ca, cert, key = certs.load("aggregator")
    limit = job.spec.compression.chunk_bytes + (1 << 20)
    server = grpc.server(
        # Every silo at its admission limits plus a reserve for status: no caller can take
        # a thread another is owed (admission.py).
        futures.ThreadPoolExecutor(max_workers=pool_size(len(job.spec.silos))),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # Keepalive so a silo whose network vanished is noticed within a minute.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # Each upload stream may buffer up to its HTTP/2 window in the server. BDP probing
            # grows windows to several MiB per stream on a fast link (0.3 GiB more at 32 silos
            # than at 2, bench/scale.py); a fixed window of one chunk bounds that and still
            # carries chunkBytes per round trip (1 MiB chunks over 50 ms: 20 MB/s per silo).
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", job.spec.compression.chunk_bytes),
        ],
    )
    pb_grpc.add_FederatedTrainingServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
    bound = server.add_secure_port(f"{host}:{port}", creds)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    return server, bound, health_servicer


def build_enrollment_server(
    job: FederatedJob, desk: EnrollmentDesk, ca_pem: bytes, metrics: AggregatorMetrics, host: str, port: int
) -> tuple[grpc.Server, int]:
    """The enrollment port: plaintext, one small call, its own few threads (a flood of enrollments
    cannot take a thread from training), messages capped at 64 KiB."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", 1 << 16), ("grpc.max_send_message_length", 1 << 16)],
        maximum_concurrent_rpcs=16,
    )
    pb_grpc.add_EnrollmentServicer_to_server(EnrollmentServicer(job, desk, ca_pem, metrics), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} for enrollment")
    return server, bound


def _return_large_buffers_to_the_kernel() -> None:
    """Make glibc serve every buffer of 1 MiB or more with its own mapping, unmapped when freed.

    The aggregator's temporaries are chunk-sized (decoded slices, encoded payloads) and come
    from many handler threads. By default glibc raises its mmap threshold after such a buffer
    is freed and later keeps them in per-thread heaps, where they stay resident: about
    0.15 GiB of a 100M-parameter job's peak. Fixing the threshold keeps the peak at the two
    copies of the state the aggregator needs.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 20)
        libc.mallopt(m_trim_threshold, 4 << 20)
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        log.debug("mallopt unavailable; leaving the allocator's defaults")


def serve(job: FederatedJob, opts: AggregatorOptions) -> int:
    _return_large_buffers_to_the_kernel()
    opts.workdir.mkdir(parents=True, exist_ok=True)
    hooks = _ModelHooks(job, opts.workdir)
    # Libraries loaded, no tensor of the model held yet: what the model's state adds is measured
    # against this (benchmarks and tests read both lines).
    log.info("start-up RSS %.0f MiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    metrics = AggregatorMetrics(job)
    coord = Coordinator(
        job,
        make_strategy(job.spec),
        hooks.initial_state,
        opts.workdir,
        evaluate=hooks.evaluate if hooks.batches else None,
        finalize=hooks.finalize,
        observe=metrics.observe,
        manifest=hooks.manifest,
        vocabulary=hooks.vocabulary,
    )
    metrics.round.labels(metrics.job).set(coord.completed)
    desk = EnrollmentDesk(opts.workdir / "certificates.json", job.external_silos(), job.spec.revoked_silos)
    coord.revoke(desk.ledger.revoked)
    servicer = FederatedTrainingServicer(job, coord, metrics, desk=desk)
    server, port, health_servicer = build_server(job, servicer, CertFiles(opts.certs), opts.host, opts.port)
    enrollment: grpc.Server | None = None
    enrollment_port = 0
    if job.external_silos():
        ca_pem = CertFiles(opts.certs).ca.read_bytes()
        enrollment, enrollment_port = build_enrollment_server(
            job, desk, ca_pem, metrics, opts.host, opts.enrollment_port
        )
        enrollment.start()
    http, _ = start_http_server(opts.metrics_port, addr=opts.host, registry=metrics.registry)
    server.start()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    atomic_write(
        opts.workdir / "aggregator.json",
        json.dumps(
            {
                "port": port,
                "metrics_port": http.server_port,
                "enrollment_port": enrollment_port,
                "host": opts.host,
                "pid": os.getpid(),
                "started": time.time(),
                "resumed_after_round": coord.completed,
            }
        ).encode(),
    )
    log.info("aggregator for job %s on %s:%d (metrics :%d)", job.name, opts.host, port, http.server_port)
    if enrollment is not None:
        log.info("enrollment for external silos on %s:%d", opts.host, enrollment_port)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    phase = coord.run(stop)
    metrics.set_phase(phase)
    if opts.linger_seconds is None:
        log.info("job %s: %s; serving status until stopped", job.name, phase)
        stop.wait()
    else:
        end = time.time() + opts.linger_seconds
        while time.time() < end and not stop.is_set():
            if all(s.state in ("done", "absent", "revoked") for s in coord.silos.values()):
                break
            time.sleep(0.2)
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.stop(grace=2).wait()
    if enrollment is not None:
        enrollment.stop(grace=1).wait()
    servicer.watch.stop()
    http.shutdown()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info("aggregator stopped: %s (peak RSS %.0f MiB)", phase, peak_mib)
    return 0 if phase == "Succeeded" else (3 if stop.is_set() else 1)
