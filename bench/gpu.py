"""fedjob's end-to-end training throughput on one GPU against a bare DeepSpeed loop, same model and batches.

For each case a Llama-shaped model is built from a config (random init, saved locally),
then measured twice in the same run:

- baseline: a bare DeepSpeed loop (bf16, ZeRO-2, torch AdamW, the same LoRA or full set-up,
  micro-batch and sequence length as the job) over the same number of steps;
- fedjob: `fedjob run` of a one-silo job (real aggregator, gRPC + mTLS, live engine),
  `--rounds` rounds of `--steps` local steps; its tokens/s counts every second of the
  rounds after the first (download, load into the engine, training, gathering, encoding,
  upload, aggregation, checkpoint), and the first round is reported apart (it includes
  loading the model and building the engine, which the baseline's figure excludes too).

    python bench/gpu.py --work /tmp/w [--cases lora-1b full-336m lora-7b] [--steps 20 200]
    python bench/gpu.py --work /tmp/w --tiny     # CPU smoke run of the same code path

Targets (issue 10): fedjob >= 90% of bare DeepSpeed with 20 local steps, >= 97% with 200.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent

CASES: dict[str, dict[str, Any]] = {
    "lora-1b": {
        "mode": "lora",
        "config": dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
        ),
        "codec": "int8",
    },
    "full-336m": {
        "mode": "full",
        "config": dict(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=4,
        ),
        "codec": "bf16",
    },
    "lora-7b": {
        "mode": "lora",
        "config": dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
        ),
        "codec": "int8",
    },
    "tiny": {
        "mode": "lora",
        "config": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        ),
        "codec": "int8",
    },
}
LORA = {"r": 16, "alpha": 32, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]}

BARE = textwrap.dedent(
    r"""
    import json, os, sys, time
    import numpy as np, torch
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29611"))
    import deepspeed
    from transformers import AutoModelForCausalLM
    path, mode, steps, bs, seq, data, bf16 = sys.argv[1:8]
    steps, bs, seq, bf16 = int(steps), int(bs), int(seq), bf16 == "1"
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cfg = {"train_micro_batch_size_per_gpu": bs, "gradient_accumulation_steps": 1, "train_batch_size": bs,
           "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}, "bf16": {"enabled": bf16},
           "zero_force_ds_cpu_optimizer": False, "steps_per_print": 1 << 30}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    from pathlib import Path
    blob = b"".join(p.read_bytes() for p in sorted(Path(data).rglob("*.txt")))
    toks = np.frombuffer(blob, dtype=np.uint8)
    rng = np.random.default_rng(0)
    def step():
        s = rng.integers(0, toks.size - seq, size=bs)
        b = torch.from_numpy(np.stack([toks[j:j + seq] for j in s]).astype(np.int64)).to(engine.device)
        loss = engine(input_ids=b, labels=b).loss
        engine.backward(loss)
        engine.step()
    for _ in range(3):  # warm-up, as fedjob's first round is reported apart
        step()
    if cuda:
        torch.cuda.synchronize()
    t = time.time()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    took = time.time() - t
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    report = {"seconds": took, "tokens_per_s": steps * bs * seq / took, "gpu_mem_gib": mem}
    print("BARE " + json.dumps(report))
    """
)


def build_model(work: Path, name: str, config: dict[str, Any], bf16: bool) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = work / "models" / name
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, **config)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg)
    if bf16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    return out


def build_data(work: Path) -> Path:
    out = work / "data" / "silo"
    if not out.exists():
        out.mkdir(parents=True)
        std = Path(sysconfig.get_paths()["stdlib"])
        for pkg in ("email", "json", "asyncio", "http", "unittest"):
            (out / f"{pkg}.txt").write_bytes(
                b"\n".join(f.read_bytes() for f in sorted((std / pkg).rglob("*.py")))
            )
    return out


def env() -> dict[str, str]:
    paths = [str(ROOT), str(ROOT / "aggregator_service"), str(ROOT / "worker_image"), str(ROOT / "operator")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}


def bare(model: Path, mode: str, steps: int, bs: int, seq: int, data: Path, bf16: bool) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            BARE,
            str(model),
            mode,
            str(steps),
            str(bs),
            str(seq),
            str(data),
            "1" if bf16 else "0",
        ],
        capture_output=True,
        text=True,
        env=env(),
        check=False,
    )
    line = [x for x in out.stdout.splitlines() if x.startswith("BARE ")]
    if not line:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-4000:])
    return dict(json.loads(line[-1][5:]))


def fedjob(
    work: Path,
    case: str,
    model: Path,
    steps: int,
    bs: int,
    seq: int,
    data: Path,
    rounds: int,
    bf16: bool,
    gpus: int,
) -> dict[str, Any]:
    c = CASES[case]
    job = {
        "apiVersion": "fedjob.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": f"bench-{case}".replace("_", "-")[:30]},
        "spec": {
            "model": {"path": str(model)},
            "training": {
                "mode": c["mode"],
                "localSteps": steps,
                "batchSize": bs,
                "sequenceLength": seq,
                "learningRate": 1e-4,
                "lora": LORA,
                "deepspeed": {"zeroStage": 2, "bf16": bf16},
            },
            "silos": [
                {"name": "silo", "data": {"path": str(data)}, "processes": 1, "resources": {"gpus": gpus}}
            ],
            "rounds": rounds,
            "aggregation": {"minSilos": 1, "roundDeadlineSeconds": 3600},
            "compression": {"codec": c["codec"], "zstd": False},
        },
    }
    path = work / f"{case}-{steps}.yaml"
    path.write_text(yaml.safe_dump(job))
    out_dir = work / "runs" / f"{case}-{steps}"
    t = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "fedjob_cli.main", "run", str(path), "--out", str(out_dir), "--fresh"],
        capture_output=True,
        text=True,
        env=env(),
        check=False,
    )
    wall = time.time() - t
    if proc.returncode != 0:
        logs = "".join(p.read_text()[-3000:] for p in sorted((out_dir / "logs").glob("*.log")))
        raise RuntimeError(proc.stdout[-2000:] + logs)
    hist = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steady = hist[1:]
    seconds = sum(h["seconds"] for h in steady)
    return {
        "first_round_s": hist[0]["seconds"],
        "steady_round_s": seconds / len(steady),
        "tokens_per_s": len(steady) * steps * bs * seq / seconds,
        "bytes_up_per_round": steady[-1]["bytes_up"],
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--cases", nargs="+", default=["lora-1b", "full-336m", "lora-7b"])
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 200])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on CPU: checks the harness, not speed")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    cases, bs, seq = (["tiny"], 2, 32) if args.tiny else (args.cases, args.batch, args.seq)
    if args.tiny:
        args.steps, args.rounds = [4], 3
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(
        f"fedjob vs bare DeepSpeed on {device}, {time.strftime('%Y-%m-%d')}: batch {bs} x {seq}, "
        f"ZeRO-2, bf16 {cuda}, {args.rounds} rounds (first reported apart)"
    )
    print(
        "| case | local steps | bare tokens/s | fedjob tokens/s | ratio | first round s | steady round s "
        "| training s (bare) | bytes up/round |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    args.work.mkdir(parents=True, exist_ok=True)
    data = build_data(args.work)
    for case in cases:
        model = build_model(args.work, case, CASES[case]["config"], bf16=cuda)
        for steps in args.steps:
            b = bare(model, CASES[case]["mode"], steps, bs, seq, data, bf16=cuda)
            f = fedjob(
                args.work, case, model, steps, bs, seq, data, args.rounds, bf16=cuda, gpus=1 if cuda else 0
            )
            print(
                f"| {case} | {steps} | {b['tokens_per_s']:,.0f} | {f['tokens_per_s']:,.0f} "
                f"| {f['tokens_per_s'] / b['tokens_per_s']:.1%} | {f['first_round_s']:.1f} "
                f"| {f['steady_round_s']:.2f} | {b['seconds']:.2f} | {f['bytes_up_per_round']:,} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
