"""A silo's local round under DeepSpeed: what client-side algorithms do to its gradients, per ZeRO stage.

FedProx and SCAFFOLD change each step's gradient between backward and step through
DeepSpeed's safe_get/set_full_grad. These tests train for real (tiny GPT-2, LoRA,
CPU) and check that the change reaches the optimiser under every ZeRO stage, with
optimizer offload and bf16, and with a two-process silo.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedjob.aggregation import Scaffold
from tests.conftest import REPO, job_doc

pytestmark = pytest.mark.slow

# Runs in its own process (DeepSpeed's process group is per process): one silo rank trains
# three rounds from the same global model, plain, with a SCAFFOLD correction, with FedProx.
SCRIPT = r"""
import json, sys
import numpy as np
from fedjob.spec import parse_job
from fedjob.aggregation import Scaffold
from fedjob_worker.trainer import LocalTrainer, init_distributed

doc, out = json.loads(sys.argv[1]), sys.argv[5]
rank, world, port = (int(a) for a in sys.argv[2:5])
init_distributed(rank, world, port)
report = {}
for algorithm, extra in (("fedavg", {}), ("scaffold", {}), ("fedprox", {"proximalMu": 1000.0})):
    d = json.loads(json.dumps(doc))
    d["spec"]["aggregation"].update(algorithm=algorithm, **extra)
    job = parse_job(d)
    trainer = LocalTrainer(job, "alpha", rank, world)
    start = trainer.manifest_state()
    extras = {Scaffold.CORRECTION + n: np.full(v.shape, 1.0, np.float32) for n, v in start.items()}
    result = trainer.train(1, start, extras if algorithm == "scaffold" else None)
    if rank != 0:  # the trained state comes back on rank 0, which uploads it
        assert result.state == {}
        continue
    delta = np.concatenate([(result.state[n] - start[n]).ravel() for n in start])
    variate = np.concatenate([v.ravel() for v in result.extras.values()]) if result.extras else np.zeros(1)
    report[algorithm] = {
        "mean_delta": float(delta.mean()),
        "delta_norm": float(np.linalg.norm(delta)),
        "variate_abs_mean": float(np.abs(variate).mean()),
        "variate_names": sorted(result.extras),
        "params": sorted(start),
    }
if rank == 0:
    open(out, "w").write(json.dumps(report))
import torch.distributed as dist
dist.barrier()  # as the runner does: no rank tears down while another still uses the group
dist.destroy_process_group()  # left to atexit, DeepSpeed's shm communicator can abort the process
"""


def local_rounds(
    assets: Path, tmp_path: Path, deepspeed: dict[str, Any], world: int = 1, optimizer: str = "adamw"
) -> dict[str, Any]:
    doc = job_doc(
        model={"path": str(assets / "model")},
        training={
            "mode": "lora",
            "localSteps": 6,
            "batchSize": 2,
            "sequenceLength": 32,
            "learningRate": 0.01,
            "weightDecay": 0.0,
            "optimizer": optimizer,
            "lora": {"r": 4},
            "deepspeed": deepspeed,
        },
    )
    doc["spec"]["silos"][0]["data"]["path"] = str(assets / "data/code")
    from fedjob_worker.runner import free_port

    port, out = free_port(), tmp_path / "report.json"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, json.dumps(doc), str(r), str(world), str(port), str(out)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    # DeepSpeed's CPU all-reduce buffers (66 MiB a rank) must not outlive the silo in /dev/shm.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return dict(json.loads(out.read_text()))


CASES = {
    "zero0": {"zeroStage": 0},
    "zero1": {"zeroStage": 1},
    "zero2-offload": {"zeroStage": 2, "offloadOptimizer": True},
    "zero3-bf16": {"zeroStage": 3, "bf16": True},
}


@pytest.mark.parametrize("deepspeed", CASES.values(), ids=CASES.keys())
def test_scaffold_and_fedprox_reach_the_optimiser(
    assets: Path, tmp_path: Path, deepspeed: dict[str, Any]
) -> None:
    r = local_rounds(assets, tmp_path, deepspeed)
    lr_steps = 0.01 * 6
    # A correction of +1 on every coordinate dominates the gradient: Adam then moves every
    # parameter down by about lr per step. Without it the steps have no common sign.
    assert r["scaffold"]["mean_delta"] < -0.7 * lr_steps, r
    assert abs(r["fedavg"]["mean_delta"]) < 0.3 * lr_steps, r
    # The silo's new c_i is its raw gradient: the correction is not folded back into it.
    assert r["scaffold"]["variate_abs_mean"] < 0.5, r
    assert r["scaffold"]["variate_names"] == sorted(Scaffold.VARIATE + p for p in r["scaffold"]["params"])
    assert r["fedavg"]["variate_names"] == [] and r["fedprox"]["variate_names"] == []
    # A strong proximal term holds the silo near the global model.
    assert r["fedprox"]["delta_norm"] < 0.5 * r["fedavg"]["delta_norm"], r


def test_a_two_process_silo_applies_the_correction_on_every_rank(assets: Path, tmp_path: Path) -> None:
    r = local_rounds(assets, tmp_path, {"zeroStage": 2}, world=2)
    assert r["scaffold"]["mean_delta"] < -0.7 * 0.01 * 6, r
    assert r["fedprox"]["delta_norm"] < 0.5 * r["fedavg"]["delta_norm"], r


def test_with_sgd_the_correction_moves_every_parameter_by_exactly_lr_per_step(
    assets: Path, tmp_path: Path
) -> None:
    # Plain SGD (SCAFFOLD's own setting): delta = -lr * sum_k (g_k + 1), and the mean raw
    # gradient that comes back as c_i is what separates the two.
    r = local_rounds(assets, tmp_path, {"zeroStage": 1, "gradientClipping": 0.0}, optimizer="sgd")
    lr_steps = 0.01 * 6
    assert abs(r["scaffold"]["mean_delta"] - r["fedavg"]["mean_delta"] + lr_steps) < 0.05 * lr_steps, r
