"""A poisoning silo: the real `fedjob worker`, whose update is tampered with just before it is sent.

Everything else is the product's own code (training under DeepSpeed, the gRPC client
with mTLS, chunking, the codec), so the aggregator sees exactly what a malicious silo
holding a valid certificate could send. Used by tests/test_poisoning_run.py and
bench/poisoning.py:

    python tests/doubles/poisoning_silo.py ATTACK worker JOB.yaml --silo NAME ...

ATTACK: `scaled` (its update x100), `flipped` (x-4), `noise` (Gaussian noise with the
norm of its update), `inflated` (its update sign-flipped, claiming 2^40 samples).
The silo must run one process (the tampering is in this process's client).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from fedjob_worker.client import AggregatorClient

from fedjob_cli.main import main

ATTACKS = ("scaled", "flipped", "noise", "inflated")


def tamper(attack: str, delta: dict[str, Any], num_samples: int) -> int:
    """Change the update in place; returns the sample count to claim."""
    params = [n for n in delta if "/" not in n]  # SCAFFOLD's extra tensors carry a "/"
    if attack == "scaled":
        for n in params:
            delta[n] *= np.float32(100)
    elif attack in ("flipped", "inflated"):
        for n in params:
            delta[n] *= np.float32(-4 if attack == "flipped" else -1)
        if attack == "inflated":
            return 1 << 40
    elif attack == "noise":
        rng = np.random.default_rng(0)
        norm = np.sqrt(sum(float(np.square(delta[n], dtype=np.float64).sum()) for n in params))
        noise = {n: rng.normal(size=delta[n].shape) for n in params}
        scale = norm / max(np.sqrt(sum(float(np.square(v).sum()) for v in noise.values())), 1e-30)
        for n in params:
            delta[n][...] = (noise[n] * scale).astype(np.float32)
    else:
        raise SystemExit(f"unknown attack {attack!r}; one of {', '.join(ATTACKS)}")
    return num_samples


def install(attack: str) -> None:
    honest = AggregatorClient.upload

    def upload(
        self: AggregatorClient, round_number: int, delta: dict[str, Any], *args: Any, **kw: Any
    ) -> int:
        kw["num_samples"] = tamper(attack, delta, kw["num_samples"])
        return honest(self, round_number, delta, *args, **kw)

    AggregatorClient.upload = upload  # type: ignore[method-assign]


if __name__ == "__main__":
    install(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
