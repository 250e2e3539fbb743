"""`fedjob run` for real: aggregator and silos as processes, gRPC over mTLS, DeepSpeed ZeRO, PEFT."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow
REQUIRED = {
    "round",
    "train_loss",
    "silo_train_loss",
    "eval_loss",
    "participants",
    "bytes_up",
    "bytes_down",
    "compression_ratio",
    "seconds",
}


def run_job(
    assets: Path, tmp_path: Path, spec: dict[str, Any]
) -> tuple[subprocess.CompletedProcess[str], Path]:
    doc = {
        "apiVersion": "fedjob.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "e2e"},
        "spec": spec,
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fedjob_cli.main", "run", str(job), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, out


def logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((out / "logs").glob("*.log")))


def test_lora_job_with_zero2_trains_and_the_adapter_loads(assets: Path, tmp_path: Path) -> None:
    spec = {
        "model": {"path": str(assets / "model")},
        "training": {
            "mode": "lora",
            "localSteps": 12,
            "batchSize": 4,
            "sequenceLength": 32,
            "learningRate": 0.01,
            "lora": {"r": 4, "targetModules": ["c_attn", "c_fc"]},
            "deepspeed": {"zeroStage": 2},
        },
        "silos": [
            # Federated evaluation: one silo holds out the tail of its own text, the other
            # has a held-out folder of its own.
            {"name": "code", "data": {"path": str(assets / "data/code")}, "processes": 2},
            {
                "name": "docs",
                "data": {"path": str(assets / "data/docs"), "eval": {"path": str(assets / "data/eval")}},
            },
        ],
        "evaluation": {"batches": 2, "heldOutFraction": 0.2},
        "eval": {"path": str(assets / "data/eval"), "batches": 2},
        "rounds": 2,
        "aggregation": {"minSilos": 2, "roundDeadlineSeconds": 300},
        "compression": {"codec": "int8", "zstd": True, "chunkBytes": 8192},
    }
    proc, out = run_job(assets, tmp_path, spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + logs(out)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert set(r) >= REQUIRED
        assert r["participants"] == ["code", "docs"]
        assert r["compression_ratio"] > 3  # int8 + zstd against float32
        assert r["eval_loss"] is not None
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"]
    # Every global model was evaluated by both silos on their own held-out text: the initial
    # one with round 1's uploads, round 1's with round 2's, the final one in an evaluation step.
    for r in rounds:
        assert set(r["silo_eval_loss"]) == {"code", "docs"}, r
        losses = r["silo_eval_loss"]
        # Sample-weighted: the two-process silo evaluated twice the windows.
        assert r["federated_eval_loss"] == pytest.approx((2 * losses["code"] + losses["docs"]) / 3)
    assert set(rounds[0]["initial_silo_eval_loss"]) == {"code", "docs"}
    assert rounds[-1]["federated_eval_loss"] < rounds[0]["initial_federated_eval_loss"]
    # The aggregator evaluated the starting model too: the round-0 baseline, in the summary's first row.
    assert rounds[-1]["eval_loss"] < rounds[0]["initial_eval_loss"]
    assert (
        "│ 0 " in proc.stdout
        or "0 │" in proc.stdout
        or f"{rounds[0]['initial_eval_loss']:.4f}" in proc.stdout
    )
    assert (out / "loss.png").stat().st_size > 1000
    # The two-process silo trained on both ranks and exited cleanly.
    silo_log = (out / "logs" / "silo-code.log").read_text()
    assert "rank1" in silo_log and "Traceback" not in silo_log

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(assets / "model")
    model = PeftModel.from_pretrained(base, out / "adapter")
    final = np.load(sorted((out / "checkpoints").glob("global-*.npz"))[-1])
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == len(final.files) == 8  # A and B for c_attn and c_fc in 2 layers
    for name, param in lora.items():
        np.testing.assert_allclose(param.detach().numpy(), final[name], atol=1e-6)


def test_full_weights_with_zero3_and_a_two_process_silo_write_a_model(assets: Path, tmp_path: Path) -> None:
    spec = {
        "model": {"path": str(assets / "model")},
        "training": {
            "mode": "full",
            "localSteps": 6,
            "batchSize": 4,
            "sequenceLength": 32,
            "learningRate": 0.002,
            "deepspeed": {"zeroStage": 3},
        },
        "silos": [
            {"name": "docs", "data": {"path": str(assets / "data/docs")}, "processes": 2},
            {"name": "unicode", "data": {"path": str(assets / "data/unicode")}},
        ],
        "rounds": 2,
        "aggregation": {"minSilos": 2},
        "compression": {"codec": "fp16", "zstd": False},
    }
    proc, out = run_job(assets, tmp_path, spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + logs(out)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"]
    assert rounds[0]["eval_loss"] is None
    assert 1.9 < rounds[0]["compression_ratio"] < 2.1  # fp16 halves float32

    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(assets / "model")
    moved = [
        not np.allclose(a.detach().numpy(), b.detach().numpy())
        for a, b in zip(trained.parameters(), base.parameters(), strict=True)
    ]
    assert all(moved), "ZeRO-3 must gather every partitioned parameter before the update is computed"


def two_silo_spec(assets: Path, training: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """A small LoRA-style job on the `code` and `docs` silos; keyword arguments override spec fields."""
    return {
        "model": {"path": str(assets / "model")},
        "training": {"localSteps": 10, "batchSize": 4, "sequenceLength": 32, **training},
        "silos": [
            {"name": "code", "data": {"path": str(assets / "data/code")}},
            {"name": "docs", "data": {"path": str(assets / "data/docs")}},
        ],
        "aggregation": {"minSilos": 2},
        **spec,
    }


@pytest.mark.parametrize(
    "algorithm", ["fedprox", "scaffold", "fednova", "fedadam", "fedyogi", "fedadagrad", "diloco"]
)
def test_other_strategies_train_for_real(assets: Path, tmp_path: Path, algorithm: str) -> None:
    spec = two_silo_spec(
        assets,
        {"mode": "lora", "learningRate": 0.01, "lora": {"r": 4}, "deepspeed": {"zeroStage": 1}},
        eval={"path": str(assets / "data/eval"), "batches": 2},
        rounds=3,
        aggregation={
            "algorithm": algorithm,
            "minSilos": 2,
            "proximalMu": 0.1,
            "serverLearningRate": 0.01,
            # Three rounds: DiLoCo's momentum of 0.9 would still be overshooting its first steps.
            "outerMomentum": 0.5,
        },
    )
    if algorithm == "fednova":  # silos that run different numbers of steps: what FedNova is for
        spec["silos"][0]["localSteps"] = 4
    proc, out = run_job(assets, tmp_path, spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + logs(out)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]
    if algorithm == "fednova":
        assert "round 3: 4 local steps" in (out / "logs" / "silo-code.log").read_text()
        assert "round 3: 10 local steps" in (out / "logs" / "silo-docs.log").read_text()
    final = np.load(sorted((out / "checkpoints").glob("global-*.npz"))[-1])
    kept = {k.split("/")[2] for k in final.files if k.startswith("__strategy__/ci/")}
    if algorithm == "scaffold":
        # Both silos' control variates came back through the update stream and were kept.
        assert kept == {"code", "docs"}
        assert all(np.abs(final[k]).max() > 0 for k in final.files if k.startswith("__strategy__/"))
    else:
        assert not kept
    if algorithm == "diloco":  # its outer momentum is in the checkpoint, for a restart to resume
        assert any(k.startswith("__strategy__/b/") for k in final.files)


@pytest.mark.parametrize("mode", ["prefix", "prompt", "adapter"])
def test_prompt_and_adapter_modes_train_and_load_back(assets: Path, tmp_path: Path, mode: str) -> None:
    spec = two_silo_spec(
        assets,
        {
            "mode": mode,
            "learningRate": 0.03,
            "prompt": {"numVirtualTokens": 4},
            "deepspeed": {"zeroStage": 2},
        },
        rounds=2,
        compression={"codec": "fp16", "zstd": True},
    )
    proc, out = run_job(assets, tmp_path, spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + logs(out)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets / "model"), out / "adapter")
    final = np.load(sorted((out / "checkpoints").glob("global-*.npz"))[-1])
    # Only the method's own parameters travelled: a few thousand numbers, not the model.
    assert sum(final[k].size for k in final.files) < 10_000
    trained = dict(model.named_parameters())
    assert set(final.files) <= set(trained), sorted(set(final.files) - set(trained))[:3]
    for name in final.files:
        np.testing.assert_allclose(trained[name].detach().numpy(), final[name], atol=1e-6)
    # Trained for real: every transmitted tensor moved away from its initial value.
    from fedjob.modeling import build_model, get_state
    from fedjob.spec import load_job

    initial = get_state(build_model(load_job(tmp_path / "job.yaml")))
    assert set(initial) == set(final.files)
    assert all(not np.allclose(initial[n], final[n]) for n in final.files)


# Every mode once more, each under a different DeepSpeed set-up, so that together they cover
# ZeRO 0-3, optimizer and parameter offload, bf16 and two-process silos.
MATRIX = {
    "pretrain-zero0-bf16": ("pretrain", {"zeroStage": 0, "bf16": True}, 1),
    "full-zero1-offload-2proc": ("full", {"zeroStage": 1, "offloadOptimizer": True}, 2),
    "lora-zero3-offload-all-bf16": (
        "lora",
        {"zeroStage": 3, "offloadOptimizer": True, "offloadParameters": True, "bf16": True},
        1,
    ),
    "prefix-zero1-2proc": ("prefix", {"zeroStage": 1}, 2),
    "prompt-zero3-bf16": ("prompt", {"zeroStage": 3, "bf16": True}, 1),
    "adapter-zero2-offload-2proc": ("adapter", {"zeroStage": 2, "offloadOptimizer": True}, 2),
}


@pytest.mark.parametrize(("mode", "deepspeed", "processes"), MATRIX.values(), ids=MATRIX.keys())
def test_every_mode_trains_under_deepspeed_and_sends_only_its_trainable_deltas(
    assets: Path, tmp_path: Path, mode: str, deepspeed: dict[str, Any], processes: int
) -> None:
    from transformers import AutoConfig

    model: dict[str, Any] = {"path": str(assets / "model")}
    if mode == "pretrain":  # from a config: random initial weights, nothing loaded
        model = {"config": AutoConfig.from_pretrained(assets / "model").to_dict()}
    spec = two_silo_spec(
        assets,
        {"mode": mode, "learningRate": 0.01, "prompt": {"numVirtualTokens": 4}, "deepspeed": deepspeed},
        model=model,
        rounds=2,
        compression={"codec": "none", "zstd": False},
    )
    spec["silos"][0]["processes"] = processes
    proc, out = run_job(assets, tmp_path, spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + logs(out)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]

    from fedjob.modeling import build_model, get_state
    from fedjob.spec import load_job

    job = load_job(tmp_path / "job.yaml")
    initial = get_state(build_model(job))
    final = np.load(sorted((out / "checkpoints").glob("global-*.npz"))[-1])
    # What travels is exactly the trainable tensors: with codec none, every silo's upload is
    # 4 bytes per trainable number, whatever the size of the frozen model around them.
    assert set(final.files) == set(initial)
    trainable = sum(v.size for v in initial.values())
    assert all(b == 4 * trainable for b in rounds[0]["silo_bytes_up"].values()), (trainable, rounds[0])
    assert all(not np.allclose(initial[n], final[n]) for n in final.files), "every tensor trained"

    from transformers import AutoModelForCausalLM

    if mode in ("full", "pretrain"):
        loaded = AutoModelForCausalLM.from_pretrained(out / "model")
        got = {n: p.detach().numpy() for n, p in loaded.named_parameters()}
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(assets / "model")
        got = {
            n: p.detach().numpy()
            for n, p in PeftModel.from_pretrained(base, out / "adapter").named_parameters()
        }
    for name in final.files:
        np.testing.assert_allclose(got[name], final[name], atol=1e-6, err_msg=name)


def test_a_private_job_with_sampled_silos_stops_when_its_budget_is_spent(
    assets: Path, tmp_path: Path
) -> None:
    """Distributed noise (each silo clips and adds its share), 2 of 3 silos per round, and a
    budget that allows 3 of the 4 rounds: the job succeeds after round 3 and says why."""
    import dp_accounting as dpa
    from dp_accounting import rdp

    spec = two_silo_spec(
        assets,
        {"mode": "lora", "learningRate": 0.01, "lora": {"r": 4}, "deepspeed": {"zeroStage": 1}},
        rounds=4,
        aggregation={"minSilos": 2, "silosPerRound": 2},
        privacy={
            "dp": {
                "clipNorm": 0.5,
                "noiseMultiplier": 3.0,
                "targetEpsilon": 6.0,
                "delta": 1e-5,
                "noise": "distributed",
            }
        },
    )
    spec["silos"].append({"name": "unicode", "data": {"path": str(assets / "data/unicode")}})
    proc, out = run_job(assets, tmp_path, spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + logs(out)
    assert "privacy budget spent: stopped after round 3 of 4" in " ".join(proc.stdout.split())
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert len(r["sampled"]) == 2 and r["participants"] == r["sampled"]
        acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
        event = dpa.SampledWithoutReplacementDpEvent(3, 2, dpa.GaussianDpEvent(3.0 / 2))
        assert r["dp_epsilon"] == pytest.approx(acc.compose(event, r["round"]).get_epsilon(1e-5), rel=1e-6)
    assert rounds[-1]["dp_epsilon"] <= 6.0
    sampled = {s for r in rounds for s in r["sampled"]}
    assert any(
        "uplink stages: dpNoise(clip=0.5" in (out / "logs" / f"silo-{s}.log").read_text() for s in sampled
    )
    assert (out / "adapter").is_dir()
