"""Bytes on the wire per update, per codec, against raw float32 measured in the same run.

The update is a real one: the quickstart's tiny GPT-2 trained for a few steps on
one silo's text, as LoRA factors and as full weights. Prints, for each codec,
the bytes per update, the ratio to raw float32, the relative error it adds and
the encode+decode throughput relative to raw.

    .venv/bin/python bench/compression.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedjob.chunking import ChunkValidator, assemble, iter_chunks, manifest_of  # noqa: E402
from fedjob.codec import Codec  # noqa: E402
from fedjob.corpora import python_code  # noqa: E402
from fedjob.modeling import build_model, build_tiny_model, get_state  # noqa: E402
from fedjob.spec import parse_job  # noqa: E402
from fedjob.windows import TokenStream  # noqa: E402

CODECS = [
    "raw",
    "raw+zstd",
    "fp16",
    "fp16+zstd",
    "bf16+zstd",
    "int8",
    "int8+zstd",
    "q8.128+zstd",
    "q4.128+zstd",
    "q2.128+zstd",
    "q4.128n+zstd",
    "q2.128n+zstd",
]
CHUNK = 1 << 20


def real_delta(model_dir: Path, mode: str, steps: int = 30) -> dict[str, np.ndarray]:
    job = parse_job(
        {
            "apiVersion": "fedjob.io/v1alpha1",
            "kind": "FederatedJob",
            "metadata": {"name": "bench"},
            "spec": {
                "model": {"path": str(model_dir)},
                "silos": [{"name": "a", "data": {"path": "."}}],
                "training": {"mode": mode, "lora": {"targetModules": ["c_attn", "c_proj", "c_fc"]}},
            },
        }
    )
    model = build_model(job)
    before = get_state(model)
    corpus = TokenStream(np.frombuffer(python_code(200_000).encode(), np.uint8), 64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        model(**corpus.random_batch(rng, 8).model_inputs("cpu")).loss.backward()
        opt.step()
        opt.zero_grad()
    after = get_state(model)
    return {k: after[k] - before[k] for k in before}


def measure(delta: dict[str, np.ndarray], name: str) -> tuple[int, float, float]:
    codec = Codec.from_name(name)
    start = time.perf_counter()
    chunks = list(iter_chunks(delta, codec, CHUNK, np.random.default_rng(0)))
    decoded = assemble(chunks, ChunkValidator(manifest_of(delta), codec, CHUNK))
    seconds = time.perf_counter() - start
    wire = sum(len(c.payload) for c in chunks)
    flat = np.concatenate([v.reshape(-1) for v in delta.values()])
    err = np.concatenate([(decoded[k] - delta[k]).reshape(-1) for k in delta])
    return wire, float(np.linalg.norm(err) / max(np.linalg.norm(flat), 1e-30)), seconds


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "m")
        for mode in ("lora", "full"):
            delta = real_delta(model_dir, mode)
            params = sum(v.size for v in delta.values())
            raw_bytes, _, raw_s = measure(delta, "raw")
            for _ in range(2):  # warm-up; then take the best of three
                measure(delta, "raw")
            raw_s = min(measure(delta, "raw")[2] for _ in range(3))
            print(f"\n{mode}: {params:,} trainable parameters, raw float32 update = {raw_bytes:,} bytes")
            print(f"{'codec':<13} {'bytes':>12} {'vs raw':>8} {'rel. error':>11} {'time vs raw':>12}")
            for name in CODECS:
                wire, rel, _ = measure(delta, name)
                seconds = min(measure(delta, name)[2] for _ in range(3))
                print(
                    f"{name:<13} {wire:>12,} {raw_bytes / wire:>7.2f}x {rel:>11.2e} {seconds / raw_s:>11.2f}x"
                )


if __name__ == "__main__":
    main()
