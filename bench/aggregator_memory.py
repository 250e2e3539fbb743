"""Aggregator memory: folding chunks into a running sum versus holding every update.

Drives the real Coordinator (begin_upload / add_chunk / finish_upload, exactly
what the gRPC handlers call) with S silos uploading a P-parameter update, and a
baseline in the same run that first decodes every silo's whole update and then
averages them (what whole-model-message FL systems do). Peak Python-heap bytes
come from tracemalloc (NumPy reports its buffers to it).

    .venv/bin/python bench/aggregator_memory.py [--params 4000000] [--silos 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import tracemalloc
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "aggregator_service"))

from fedjob_aggregator.coordinator import Coordinator  # noqa: E402

from fedjob.aggregation import FedAvg  # noqa: E402
from fedjob.chunking import ChunkValidator, assemble, count_chunks, iter_chunks, manifest_of  # noqa: E402
from fedjob.codec import Codec  # noqa: E402
from fedjob.spec import parse_job  # noqa: E402
from fedjob.v1 import fedjob_pb2 as pb  # noqa: E402


def make_job(silos: int):  # type: ignore[no-untyped-def]
    return parse_job(
        {
            "apiVersion": "fedjob.io/v1alpha1",
            "kind": "FederatedJob",
            "metadata": {"name": "bench"},
            "spec": {
                "model": {"path": "/unused"},
                "rounds": 1,
                "silos": [{"name": f"s{i}", "data": {"path": "."}} for i in range(silos)],
                "compression": {"codec": "int8", "zstd": True},
            },
        }
    )


def chunk_stream(params: int, silo: int):  # type: ignore[no-untyped-def]
    """A silo's encoded chunks, produced lazily (the network delivers them one by one)."""
    rng = np.random.default_rng(silo)
    delta = {"w": rng.normal(size=params).astype(np.float32)}
    return iter_chunks(delta, Codec.from_name("int8+zstd"), 1 << 20, rng)


def streaming(params: int, silos: int, workdir: Path) -> int:
    state = {"w": np.zeros(params, np.float32)}
    job = make_job(silos)
    coord = Coordinator(job, FedAvg(), state, workdir)
    with coord.cond:
        coord._open_round()
    del state
    tracemalloc.start()
    for i in range(silos):
        header = pb.UpdateHeader(
            round=1,
            upload_id=uuid.uuid4().hex,
            num_samples=10,
            local_steps=1,
            train_loss=1.0,
            total_chunks=count_chunks(coord.manifest, coord.codec, coord.chunk_bytes),
        )
        up = coord.begin_upload(f"s{i}", header)
        for chunk in chunk_stream(params, i):
            coord.add_chunk(up, chunk)
        coord.finish_upload(up, pb.UpdateTrailer(total_chunks=header.total_chunks))
    assert coord.current is not None
    with coord.cond:
        coord._close_round(coord.current)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def buffered(params: int, silos: int) -> int:
    state = {"w": np.zeros(params, np.float32)}
    codec = Codec.from_name("int8+zstd")
    tracemalloc.start()
    updates = [
        assemble(chunk_stream(params, i), ChunkValidator(manifest_of(state), codec, 1 << 20))
        for i in range(silos)
    ]
    mean = np.mean([u["w"] for u in updates], axis=0)
    _ = state["w"] + mean
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=4_000_000)
    ap.add_argument("--silos", type=int, nargs="+", default=[2, 8, 16])
    args = ap.parse_args()
    model_mib = args.params * 4 / 2**20
    print(f"update of {args.params:,} float32 parameters ({model_mib:.1f} MiB), int8+zstd, 1 MiB chunks")
    print(
        f"{'silos':>5} {'streaming MiB':>14} {'x model':>8} {'buffered MiB':>13} {'x model':>8}"
        f" {'buffered/streaming':>19}"
    )
    for s in args.silos:
        with tempfile.TemporaryDirectory() as tmp:
            a = streaming(args.params, s, Path(tmp)) / 2**20
        b = buffered(args.params, s) / 2**20
        print(f"{s:>5} {a:>14.1f} {a / model_mib:>8.2f} {b:>13.1f} {b / model_mib:>8.2f} {b / a:>18.2f}x")


if __name__ == "__main__":
    main()
