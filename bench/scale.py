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
    .venv/bin/python bench/scale.py --lora 1.1B 6.7B --silos 2 8 32

`--lora` runs LoRA jobs (r 16 on q/k/v/o) on Llama-shaped models of those sizes instead:
the model folder holds only `config.json`, so a test that the aggregator never reads,
let alone materialises, the frozen base weights (the target: under 1.5 GiB for 6.7B).
The aggregator takes its manifest and initial adapters from the job as in production
(`modeling.trainable_manifest`, `modeling.initial_state`) and writes the trained adapter
at the end.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for sub in ("", "aggregator_service", "worker_image"):
    sys.path.insert(0, str(ROOT / sub))

from gpu import CASES, LORA  # noqa: E402  (bench/gpu.py, beside this file)

from fedjob.chunking import TensorInfo  # noqa: E402
from fedjob.spec import FederatedJob, parse_job  # noqa: E402

GIB = 1 << 30
CHUNK = 1 << 20
TENSOR = 32 << 20  # elements per synthetic tensor (a 4096 x 8192 projection)
STEPS = 10  # local steps per round, declared in every update header


# The Llama shapes and LoRA set-up bench/gpu.py measures on a GPU, by the size the table names.
LLAMA: dict[str, dict[str, int]] = {"1.1B": CASES["lora-1b"]["config"], "6.7B": CASES["lora-7b"]["config"]}


def make_job(silos: int, rounds: int, lora_model: str | None = None) -> FederatedJob:
    training: dict[str, Any] = {"mode": "lora", "lora": LORA} if lora_model else {"mode": "full"}
    return parse_job(
        {
            "apiVersion": "fedjob.io/v1alpha1",
            "kind": "FederatedJob",
            "metadata": {"name": "scale"},
            "spec": {
                "model": {"path": lora_model or "/synthetic"},
                "training": {**training, "localSteps": STEPS},
                "rounds": rounds,
                "silos": [{"name": f"s{i}", "data": {"path": "/synthetic"}} for i in range(silos)],
                "aggregation": {"minSilos": silos, "roundDeadlineSeconds": 7200},
                "compression": {"codec": "int8", "zstd": False, "chunkBytes": CHUNK},
            },
        }
    )


def config_only_model(folder: Path, size: str) -> Path:
    """A Llama model folder with its config and no weights: the aggregator must not need them."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32000, max_position_embeddings=2048, **LLAMA[size]).save_pretrained(folder)
    return folder


def llama_params(size: str) -> int:
    c = LLAMA[size]
    h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    return 2 * 32000 * h + n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h


def manifest(params: int) -> dict[str, TensorInfo]:
    out, left, i = {}, params, 0
    while left > 0:
        n = min(TENSOR, left)
        out[f"layers.{i}.weight"] = TensorInfo(f"layers.{i}.weight", (n,))
        left -= n
        i += 1
    return out


# ----- the aggregator process -------------------------------------------------------------------


def serve(params: int, silos: int, rounds: int, workdir: Path, certs: Path, lora_model: str | None) -> None:
    from fedjob_aggregator.coordinator import Coordinator
    from fedjob_aggregator.metrics import AggregatorMetrics
    from fedjob_aggregator.server import _return_large_buffers_to_the_kernel, build_server
    from fedjob_aggregator.servicer import FederatedTrainingServicer

    from fedjob.aggregation import FedAvg
    from fedjob.tls import CertFiles

    _return_large_buffers_to_the_kernel()
    job = make_job(silos, rounds, lora_model)
    finalize: Callable[[dict[str, Any]], None] | None = None
    if lora_model:
        # The production path: manifest and initial adapters over a hollow base, the
        # adapter written at the end. The baseline includes torch, transformers and peft.
        import peft  # noqa: F401
        import transformers  # noqa: F401

        from fedjob import modeling

        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        man = modeling.trainable_manifest(job)

        def initial() -> dict[str, Any]:
            return modeling.initial_state(job, man)

        def write_adapter(state: dict[str, Any]) -> None:
            modeling.save_result(job, state, workdir / "result")

        finalize = write_adapter

    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        man = manifest(params)

        def initial() -> dict[str, Any]:
            # Written, so resident: a loaded model, not lazily mapped zeros.
            return {n: np.full(t.shape, 0.01, np.float32) for n, t in man.items()}

    coord = Coordinator(job, FedAvg(), initial, workdir, manifest=man, finalize=finalize)
    metrics = AggregatorMetrics(job)
    server, port, _ = build_server(
        job, FederatedTrainingServicer(job, coord, metrics), CertFiles(certs), "127.0.0.1", 0
    )
    server.start()
    # The silos upload what the aggregator expects: its manifest goes with the port.
    print(json.dumps({"port": port, "manifest": {n: list(t.shape) for n, t in man.items()}}), flush=True)
    phase = coord.run()
    time.sleep(1)  # let the silos hear DONE
    server.stop(1).wait()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {
        "phase": phase,
        "baseline": baseline,
        "peak": peak,
        "history": coord.history,
        "trainable": sum(t.size for t in man.values()),
    }
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
                    local_steps=STEPS,  # what the job says each silo runs: anything else is refused
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


def one(
    params: int, silos: int, rounds: int, download_limit: float, lora: str | None = None
) -> dict[str, Any]:
    from fedjob.tls import write_job_certs

    job = make_job(silos, rounds)
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp) / "certs"
        write_job_certs(certs, job.name, job.silo_names())
        cmd = [sys.executable, __file__, "--serve", str(params), str(silos), str(rounds), tmp, str(certs)]
        if lora:
            cmd += ["--lora-model", str(config_only_model(Path(tmp) / "model", lora))]
        agg = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert agg.stdout is not None
        hello = json.loads(agg.stdout.readline())
        port = hello["port"]
        man = {n: TensorInfo(n, tuple(shape)) for n, shape in hello["manifest"].items()}
        downloaders = silos if params <= download_limit else min(2, silos)
        failed: list[BaseException] = []

        def silo_or_stop(i: int) -> None:
            try:
                silo(f"127.0.0.1:{port}", certs, f"s{i}", man, i < downloaders)
            except BaseException as exc:  # a silo that fails would leave the round open for hours
                failed.append(exc)
                agg.kill()

        threads = [threading.Thread(target=silo_or_stop, args=(i,), daemon=True) for i in range(silos)]
        for t in threads:
            t.start()
        line = agg.stdout.readline()
        if failed:
            raise RuntimeError(f"a silo failed: {failed[0]!r}") from failed[0]
        report = json.loads(line)
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
    ap.add_argument(
        "--lora", nargs="+", choices=sorted(LLAMA), help="LoRA jobs on these Llama shapes instead"
    )
    ap.add_argument("--lora-model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        p, s, r, workdir, certs = args.serve
        serve(int(p), int(s), int(r), Path(workdir), Path(certs), args.lora_model)
        return
    cpus = os.cpu_count()
    if args.lora:
        lora_table(args.lora, args.silos, args.rounds)
        return
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


def lora_table(sizes: list[str], silo_counts: list[int], rounds: int) -> None:
    cpus = os.cpu_count()
    print(f"fedjob aggregator, LoRA r16 q/k/v/o on Llama shapes (config only, no weights); {cpus} CPUs")
    print(
        "| model | base fp32 GiB | trainable | silos | peak RSS GiB | baseline GiB "
        "| (peak - baseline) / adapter "
        "| target < 1.5 GiB | transfer s/round | close-to-open s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for size in sizes:
        for silos in silo_counts:
            r = one(0, silos, rounds, float("inf"), lora=size)
            hist = r["history"]
            transfer = np.mean([h["seconds"] - h["close_seconds"] for h in hist])
            gap = np.mean([h["close_seconds"] for h in hist])
            adapter = 4 * r["trainable"]
            print(
                f"| {size} | {4 * llama_params(size) / GIB:.1f} | {r['trainable'] / 1e6:.1f}M | {silos} "
                f"| {r['peak'] / GIB:.2f} | {r['baseline'] / GIB:.2f} "
                f"| {(r['peak'] - r['baseline']) / adapter:.2f} "
                f"| {'yes' if r['peak'] < 1.5 * GIB else 'NO'} | {transfer:.1f} | {gap:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
