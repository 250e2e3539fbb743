"""Shared fixtures: job documents, a job's PKI, and a real mTLS aggregator on loopback."""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from fedjob_aggregator.admission import IdleWatch
from fedjob_aggregator.coordinator import Coordinator
from fedjob_aggregator.metrics import AggregatorMetrics
from fedjob_aggregator.server import build_server
from fedjob_aggregator.servicer import FederatedTrainingServicer

from fedjob.aggregation import Strategy
from fedjob.spec import FederatedJob, parse_job
from fedjob.strategies import make_strategy
from fedjob.tls import CertFiles, write_job_certs
from fedjob.v1 import fedjob_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent


def job_doc(**spec_overrides: Any) -> dict[str, Any]:
    """A valid FederatedJob document; keyword arguments replace top-level spec fields."""
    doc: dict[str, Any] = {
        "apiVersion": "fedjob.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "demo"},
        "spec": {
            "model": {"path": "/models/tiny"},
            "training": {"mode": "lora", "localSteps": 5, "batchSize": 4, "sequenceLength": 32},
            "silos": [
                {"name": "alpha", "data": {"path": "/data/a"}},
                {"name": "beta", "data": {"path": "/data/b"}},
            ],
            "rounds": 2,
            "aggregation": {"minSilos": 1, "roundDeadlineSeconds": 30},
            "compression": {"codec": "int8", "zstd": True, "chunkBytes": 4096},
        },
    }
    doc["spec"].update(copy.deepcopy(spec_overrides))
    return doc


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level GPT-2 (built from a config) and the example silos' text, made once."""
    from fedjob.corpora import write_silo_folders
    from fedjob.modeling import build_tiny_model

    root = tmp_path_factory.mktemp("assets")
    build_tiny_model(root / "model", n_embd=64, n_layer=2, n_head=2)
    write_silo_folders(root / "data", size=60_000)
    return root


@pytest.fixture(scope="session")
def chat_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chat example, smaller: a tiny Llama-shaped model with its own BPE tokenizer and chat
    template (pre-trained for a few steps), and the three silos' chat data."""
    from fedjob.chat_example import build_tiny_chat_model, write_chat_silos

    root = tmp_path_factory.mktemp("chat")
    build_tiny_chat_model(root / "model", pretrain_steps=60)
    write_chat_silos(root / "data")
    return root


@pytest.fixture(scope="session")
def tools() -> Path:
    """Real helm, prometheus and promtool (hack/tools.sh installs them once, cached)."""
    import subprocess

    out = subprocess.run(
        [str(REPO / "hack" / "tools.sh"), "bin"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip())


@pytest.fixture
def small_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layer.lora_A": rng.normal(size=(4, 300)).astype(np.float32),
        "layer.lora_B": np.zeros((300, 4), dtype=np.float32),
        "bias": rng.normal(size=(7,)).astype(np.float32),
    }


@dataclass
class LiveAggregator:
    job: FederatedJob
    coord: Coordinator
    certs: CertFiles
    address: str
    metrics: AggregatorMetrics
    server: grpc.Server

    def channel(self, who: str, certs: CertFiles | None = None) -> grpc.Channel:
        ca, cert, key = (certs or self.certs).load(who)
        creds = grpc.ssl_channel_credentials(ca, key, cert)
        return grpc.secure_channel(self.address, creds)

    def stub(self, who: str, certs: CertFiles | None = None) -> pb_grpc.FederatedTrainingStub:
        return pb_grpc.FederatedTrainingStub(self.channel(who, certs))


@pytest.fixture
def live_aggregator(tmp_path: Path, small_state: dict[str, np.ndarray]) -> Iterator[LiveAggregator]:
    """The real servicer and coordinator behind real mTLS on loopback, with a small numeric state."""
    job = parse_job(job_doc(aggregation={"minSilos": 1, "roundDeadlineSeconds": 600}))
    with serve_live(tmp_path, job, small_state) as agg:
        yield agg


@contextlib.contextmanager
def serve_live(
    tmp_path: Path,
    job: FederatedJob,
    state: dict[str, np.ndarray],
    watch: IdleWatch | None = None,
    strategy: Strategy | None = None,
) -> Iterator[LiveAggregator]:
    """A real aggregator for `job` (its strategy over `state`, unless given) on loopback with mTLS,
    until the block ends; in `tmp_path`, so a second one there resumes from the first's checkpoint."""
    small_state = state
    certs = write_job_certs(tmp_path / "certs", job.name, job.silo_names())
    strategy = strategy or make_strategy(job.spec)
    metrics = AggregatorMetrics(job)
    coord = Coordinator(job, strategy, small_state, tmp_path / "work", observe=metrics.observe)
    servicer = FederatedTrainingServicer(job, coord, metrics, watch)
    server, port, _ = build_server(job, servicer, certs, "127.0.0.1", 0)
    server.start()
    stop = threading.Event()
    loop = threading.Thread(target=coord.run, args=(stop,), daemon=True)
    loop.start()
    try:
        yield LiveAggregator(job, coord, certs, f"127.0.0.1:{port}", metrics, server)
    finally:
        stop.set()
        loop.join(5)
        server.stop(0).wait()
        servicer.watch.stop()
