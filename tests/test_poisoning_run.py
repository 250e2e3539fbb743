"""A real `fedjob run` with one poisoning silo, for each robust rule.

The run is the product's own supervisor, aggregator and honest workers; the
poisoning silo is the real worker with its update tampered with just before it is
sent (tests/doubles/poisoning_silo.py). Each rule meets a different attack, so the
four attacks are all exercised end to end; tests/test_robust_aggregation.py checks
every rule against every attack on the aggregator alone.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from fedjob.spec import load_job
from fedjob_cli.local_run import LocalRun
from tests.test_end_to_end import logs

DOUBLE = Path(__file__).parent / "doubles" / "poisoning_silo.py"

CASES: dict[str, tuple[str, dict[str, Any], int]] = {
    # rule: (attack, aggregation, honest silos)
    "median": ("noise", {"robust": {"rule": "median"}}, 3),
    "trimmedMean": ("flipped", {"robust": {"rule": "trimmedMean", "trimFraction": 0.25}}, 3),
    "multiKrum": ("scaled", {"robust": {"rule": "multiKrum", "byzantine": 1}}, 4),
    "normBound": ("inflated", {"maxWeightShare": 0.3, "robust": {"rule": "normBound", "maxNorm": 0.5}}, 3),
}


@pytest.mark.parametrize("rule", sorted(CASES))
def test_a_poisoning_silo_does_not_derail_a_real_run(assets: Path, tmp_path: Path, rule: str) -> None:
    attack, aggregation, honest = CASES[rule]
    sources = ["code", "docs", "unicode", "code"]
    silos = [
        {"name": f"honest{i}", "data": {"path": str(assets / "data" / sources[i])}} for i in range(honest)
    ]
    silos.append({"name": "evil", "data": {"path": str(assets / "data/docs")}})
    doc = {
        "apiVersion": "fedjob.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "poisoned"},
        "spec": {
            "model": {"path": str(assets / "model")},
            "training": {
                "mode": "lora",
                "localSteps": 6,
                "batchSize": 4,
                "sequenceLength": 32,
                "learningRate": 0.01,
                "lora": {"r": 4, "targetModules": ["c_attn", "c_fc"]},
                "deepspeed": {"zeroStage": 0},
            },
            "silos": silos,
            "evaluation": {"batches": 1},
            "rounds": 2,
            "aggregation": {"minSilos": len(silos), "roundDeadlineSeconds": 300, **aggregation},
            "compression": {"codec": "int8", "zstd": True, "chunkBytes": 8192},
        },
    }
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    run = LocalRun(job_file, load_job(job_file), out, console=Console(file=io.StringIO()))
    evil = next(w for w in run.workers if w.name == "evil")
    # The same command line, through the tampering double instead of `python -m fedjob_cli.main`.
    evil.argv = [sys.executable, str(DOUBLE), attack, *evil.argv[3:]]
    assert run.run() == 0, logs(out)

    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in rounds] == [sorted(s["name"] for s in silos)] * 2
    for r in rounds:
        scores = r["silo_updates"]
        mine, others = scores["evil"], [v for k, v in scores.items() if k != "evil"]
        if attack == "scaled":  # the largest norm by far, and Multi-Krum leaves it out
            assert mine["norm"] > 20 * max(o["norm"] for o in others), r
            assert not mine["selected"] and mine["weight_share"] == 0, r
        if attack == "flipped":  # the trimmed mean mostly drops it: the lowest cosine by far
            assert mine["cosine"] < min(o["cosine"] for o in others) / 2, r
        # Noise of an honest norm has no tell-tale score on non-IID silos (an honest silo on
        # other text is about as far from the rest): the median simply out-votes it, below.
        if attack == "inflated":  # its claim is capped, its norm bounded
            assert mine["claimed_samples"] == 1 << 40 and mine["weight_share"] <= 0.3 + 1e-6, r
    # Training went on: the global model's held-out loss after the attack rounds is no worse
    # than before them (with plain FedAvg, x100 sends it to 10^2-10^3; see the benchmark).
    initial = rounds[0]["initial_federated_eval_loss"]
    final = rounds[-1]["federated_eval_loss"]
    assert final < initial * 1.02, (initial, final)
