"""Aggregator memory and round-turnaround at LLM scale, on CPU: synthetic full-weight states.

For each model size and silo count, a real aggregator (Coordinator + servicer + gRPC
server with mTLS, in its own process) runs a full-weight FedAvg job whose global model
is a synthetic float32 state of P parameters (Llama-like tensor sizes). S silos (threads
of a second process, each on its own mTLS channel with its own certificate) take every
round's task, stream the global model down, and upload an int8 update of every
parameter. The aggregator process reports:

- peak RSS (ru_maxrss) against the fp32 state size, and against its own RSS before the
  state existed (the interpreter with numpy and grpc: the baseline, measured in the same
  run): the target is peak <= 2 x state + 0.5 GiB, flat from 2 to 32 silos;
- the close-to-next-open gap (wait for folds, FedAvg in place, checkpoint hand-off) and
  the transfer time (round open until the last update is folded).

    .venv/bin/python bench/scale.py [--params 50e6 200e6 1e9] [--silos 2 8 32] [--rounds 2]

Downloads are streamed by every silo while the model is at most --download-limit
parameters (default 250M); above it by two silos only (32 silos x 4 GB of float32 per
round is hours of loopback traffic on two cores), which the table says.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for sub in ("", "aggregator_service", "worker_image"):
    sys.path.insert(0, str(ROOT / sub))

from fedjob.chunking import TensorInfo  # noqa: E402
from fedjob.spec import FederatedJob, parse_job  # noqa: E402

GIB = 1 << 30
CHUNK = 1 << 20
TENSOR = 32 << 20  # elements per synthetic tensor (a 4096 x 8192 projection)


def make_job(silos: int, rounds: int) -> FederatedJob:
    return parse_job(
        {
            "apiVersion": "fedjob.io/v1alpha1",
            "kind": "FederatedJob",
            "metadata": {"name": "scale"},
            "spec": {
                "model": {"path": "/synthetic"},
                "training": {"mode": "full"},
                "rounds": rounds,
                "silos": [{"name": f"s{i}", "data": {"path": "/synthetic"}} for i in range(silos)],
                "aggregation": {"minSilos": silos, "roundDeadlineSeconds": 7200},
                "compression": {"codec": "int8", "zstd": False, "chunkBytes": CHUNK},
            },
        }
    )


def manifest(params: int) -> dict[str, TensorInfo]:
    out, left, i = {}, params, 0
    while left > 0:
        n = min(TENSOR, left)
        out[f"layers.{i}.weight"] = TensorInfo(f"layers.{i}.weight", (n,))
        left -= n
        i += 1
    return out


# ----- the aggregator process -------------------------------------------------------------------


def serve(params: int, silos: int, rounds: int, workdir: Path, certs: Path) -> None:
    from fedjob_aggregator.coordinator import Coordinator
    from fedjob_aggregator.metrics import AggregatorMetrics
    from fedjob_aggregator.server import _return_large_buffers_to_the_kernel, build_server
    from fedjob_aggregator.servicer import FederatedTrainingServicer

    from fedjob.aggregation import FedAvg
    from fedjob.tls import CertFiles

    _return_large_buffers_to_the_kernel()
    job = make_job(silos, rounds)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    man = manifest(params)

    def initial() -> dict[str, Any]:
        # Written, so resident: a loaded model, not lazily mapped zeros.
        return {n: np.full(t.shape, 0.01, np.float32) for n, t in man.items()}

    coord = Coordinator(job, FedAvg(), initial, workdir, manifest=man)
    metrics = AggregatorMetrics(job)
    server, port, _ = build_server(
        job, FederatedTrainingServicer(job, coord, metrics), CertFiles(certs), "127.0.0.1", 0
    )
    server.start()
    print(json.dumps({"port": port}), flush=True)
    phase = coord.run()
    time.sleep(1)  # let the silos hear DONE
    server.stop(1).wait()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {"phase": phase, "baseline": baseline, "peak": peak, "history": coord.history}
    print(json.dumps(report), flush=True)


# ----- the silos ---------------------------------------------------------------------------------


def silo(address: str, certs: Path, name: str, man: dict[str, TensorInfo], download: bool) -> None:
    import grpc

    from fedjob.tls import CertFiles
    from fedjob.v1 import fedjob_pb2 as pb
    from fedjob.v1 import fedjob_pb2_grpc as pb_grpc

    ca, cert, key = CertFiles(certs).load(f"silo-{name}")
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    opts = [("grpc.max_receive_message_length", CHUNK + (1 << 20))]
    stub = pb_grpc.FederatedTrainingStub(grpc.secure_channel(address, creds, options=opts))
    stub.Join(pb.JoinRequest(expected_silo=name))
    # One int8 payload, reused for every chunk: the silo side costs nothing, the aggregator
    # still checks (CRC, decode, finite) and folds every chunk.
    payload = np.random.default_rng(zlib.crc32(name.encode())).integers(-127, 128, CHUNK, np.int8).tobytes()
    crc = zlib.crc32(payload)
    total = sum(-(-t.size // CHUNK) for t in man.values())
    done = 0
    while True:
        task = stub.GetTask(pb.TaskRequest(after_round=done, wait_seconds=30), timeout=60)
        if task.state in (pb.Task.DONE, pb.Task.FAILED):
            return
        if task.state != pb.Task.TRAIN:
            continue
        if download:
            for _ in stub.DownloadGlobal(pb.DownloadRequest(round=task.round)):
                pass

        def messages(rnd: int = task.round) -> Any:
            yield pb.UploadMessage(
                header=pb.UpdateHeader(
                    round=rnd,
                    upload_id=uuid.uuid4().hex,
                    num_samples=100,
                    local_steps=1,
                    train_loss=1.0,
                    total_chunks=total,
                )
            )
            seq = 0
            for info in man.values():
                spec = pb.TensorSpec(name=info.name, shape=list(info.shape), dtype="float32")
                for offset in range(0, info.size, CHUNK):
                    count = min(CHUNK, info.size - offset)
                    data = payload if count == CHUNK else payload[:count]
                    yield pb.UploadMessage(
                        chunk=pb.Chunk(
                            seq=seq,
                            tensor=spec,
                            offset=offset,
                            count=count,
                            codec="int8",
                            payload=data,
                            crc32=crc if count == CHUNK else zlib.crc32(data),
                            params=[1e-4],
                        )
                    )
                    seq += 1
            yield pb.UploadMessage(trailer=pb.UpdateTrailer(total_chunks=total))

        stub.UploadUpdate(messages())
        done = task.round


def one(params: int, silos: int, rounds: int, download_limit: float) -> dict[str, Any]:
    from fedjob.tls import write_job_certs

    job = make_job(silos, rounds)
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp) / "certs"
        write_job_certs(certs, job.name, job.silo_names())
        agg = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(params), str(silos), str(rounds), tmp, str(certs)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert agg.stdout is not None
        port = json.loads(agg.stdout.readline())["port"]
        man = manifest(params)
        downloaders = silos if params <= download_limit else min(2, silos)
        threads = [
            threading.Thread(
                target=silo, args=(f"127.0.0.1:{port}", certs, f"s{i}", man, i < downloaders), daemon=True
            )
            for i in range(silos)
        ]
        for t in threads:
            t.start()
        report = json.loads(agg.stdout.readline())
        agg.wait()
        for t in threads:
            t.join(10)
    report["downloaders"] = downloaders
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", nargs=5)
    ap.add_argument("--params", type=float, nargs="+", default=[50e6, 200e6, 1e9])
    ap.add_argument("--silos", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--download-limit", type=float, default=250e6)
    args = ap.parse_args()
    if args.serve:
        p, s, r, workdir, certs = args.serve
        serve(int(p), int(s), int(r), Path(workdir), Path(certs))
        return
    cpus = os.cpu_count()
    print(f"fedjob aggregator at scale: full-weight FedAvg, int8 uploads, 1 MiB chunks; {cpus} CPUs")
    print(
        "| parameters | silos | fp32 state GiB | peak RSS GiB | peak / state | (peak - baseline) / state "
        "| bound 2x+0.5 GiB | within | transfer s/round | close-to-open s | silos downloading |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for params in (int(p) for p in args.params):
        for silos in args.silos:
            r = one(params, silos, args.rounds, args.download_limit)
            state = 4 * params
            hist = r["history"]
            transfer = np.mean([h["seconds"] - h["close_seconds"] for h in hist])
            gap = np.mean([h["close_seconds"] for h in hist])
            bound = 2 * state + GIB / 2
            print(
                f"| {params / 1e6:,.0f}M | {silos} | {state / GIB:.2f} "
                f"| {r['peak'] / GIB:.2f} "
                f"| {r['peak'] / state:.2f} | {(r['peak'] - r['baseline']) / state:.2f} | {bound / GIB:.2f} "
                f"| {'yes' if r['peak'] <= bound else 'NO'} | {transfer:.1f} | {gap:.2f} "
                f"| {r['downloaders']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
