"""One poisoning silo against FedAvg and every robust rule: final eval loss, measured in one run.

Five silos on non-IID text (a Dirichlet(1.0) split of three sources), one of them
malicious: it trains honestly on its own share, then, just before sending, replaces
its update (the real worker with a tampered client, tests/doubles/poisoning_silo.py):

- `scaled`: its update x100;          - `flipped`: its update x-4;
- `noise`: Gaussian noise of its update's norm;
- `inflated`: its update sign-flipped, claiming 2^40 samples.

For FedAvg and each rule (median, trimmed mean 20%, Multi-Krum f=1, norm bound at the
clean run's median honest norm with maxWeightShare 0.25), a clean run and one run per
attack, all real `fedjob run`s (aggregator, silos, gRPC + mTLS, DeepSpeed), same seed.
Prints the held-out eval loss of the final global model and its ratio to the same
rule's clean run and to clean FedAvg; writes docs/poisoning/table.md and results.json.
Five silos, not four: Multi-Krum tolerates f silos only among at least 2f + 3.

    .venv/bin/python bench/poisoning.py                  # 25 jobs, about 15 min on 2 CPU cores
    .venv/bin/python bench/poisoning.py --rules fedavg,median --attacks clean,scaled
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
for sub in ("", "aggregator_service", "worker_image"):
    sys.path.insert(0, str(ROOT / sub))

from learning_quality import model_and_sources  # noqa: E402  (bench/learning_quality.py)
from rich.console import Console  # noqa: E402

from fedjob.spec import load_job  # noqa: E402
from fedjob.split import split_sources  # noqa: E402
from fedjob_cli.local_run import LocalRun  # noqa: E402

DOUBLE = ROOT / "tests" / "doubles" / "poisoning_silo.py"
RULES = "fedavg,median,trimmedMean,multiKrum,normBound"
ATTACKS = "clean,scaled,flipped,noise,inflated"
SILOS = 5


def aggregation(rule: str, max_norm: float | None) -> dict[str, Any]:
    if rule == "fedavg":
        return {}
    if rule == "median":
        return {"robust": {"rule": "median"}}
    if rule == "trimmedMean":
        return {"robust": {"rule": "trimmedMean", "trimFraction": 0.2}}
    if rule == "multiKrum":
        return {"robust": {"rule": "multiKrum", "byzantine": 1}}
    if rule == "normBound":
        assert max_norm is not None
        return {"maxWeightShare": 0.25, "robust": {"rule": "normBound", "maxNorm": max_norm}}
    raise SystemExit(f"unknown rule {rule!r}")


def job_document(
    args: argparse.Namespace, name: str, silos: list[dict[str, Any]], agg: dict[str, Any]
) -> Any:
    return {
        "apiVersion": "fedjob.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"path": str(args.work / "model")},
            "training": {
                "mode": "full",
                "localSteps": args.steps,
                "batchSize": args.batch,
                "sequenceLength": args.seq,
                "learningRate": args.lr,
                "seed": args.seed,
                "deepspeed": {"zeroStage": 1},
            },
            "silos": silos,
            "eval": {"path": str(args.work / "eval"), "batches": args.eval_batches},
            "rounds": args.rounds,
            "aggregation": {"minSilos": len(silos), "roundDeadlineSeconds": 1800, **agg},
            "compression": {"codec": "none", "zstd": False},
        },
    }


def run(args: argparse.Namespace, name: str, doc: Any, attack: str) -> list[dict[str, Any]]:
    out = args.work / "runs" / name
    done = out / "metrics.jsonl"
    if (
        (out / "job.yaml").exists()
        and yaml.safe_load((out / "job.yaml").read_text()) == doc
        and not args.fresh
    ):
        lines = done.read_text().splitlines() if done.exists() else []
        if len(lines) == args.rounds:
            return [json.loads(x) for x in lines]  # this very job, run before
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "job.yaml").write_text(yaml.safe_dump(doc))
    started = time.time()
    local = LocalRun(out / "job.yaml", load_job(out / "job.yaml"), out, console=Console(file=io.StringIO()))
    if attack != "clean":
        evil = next(w for w in local.workers if w.name == "evil")
        evil.argv = [sys.executable, str(DOUBLE), attack, *evil.argv[3:]]
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "aggregator_service"), str(ROOT / "worker_image")]
    )
    if local.run() != 0:
        raise SystemExit(f"{name}: fedjob run failed; see {out / 'logs'}")
    history = [json.loads(x) for x in done.read_text().splitlines()]
    print(f"  {name}: eval loss {history[-1]['eval_loss']:.4f} ({time.time() - started:.0f} s)", flush=True)
    return history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", default=RULES)
    p.add_argument("--attacks", default=ATTACKS)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=8, help="local steps per silo per round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--source-bytes", type=int, default=150_000)
    p.add_argument(
        "--work",
        type=Path,
        default=Path(os.environ.get("FEDJOB_CACHE", Path.home() / ".cache/fedjob")) / "bench-poisoning",
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "poisoning")
    p.add_argument("--fresh", action="store_true", help="rerun jobs whose results are cached in --work")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    # The set-up of bench/learning_quality.py: a byte-level GPT-2 with some pre-training on
    # docstrings (in no silo), fine-tuned on three sources split among the silos.
    sources = model_and_sources(args.work, args.seed, args.source_bytes, pretrain_steps=300)
    summary = split_sources(sources, SILOS, args.work / "split", alpha=args.alpha, seed=args.seed)
    names = [*summary.silos[:-1], "evil"]
    silos = [
        {"name": n, "data": {"path": str(args.work / "split" / s)}}
        for n, s in zip(names, summary.silos, strict=True)
    ]
    print(f"silos (the last is malicious):\n{summary.table()}", flush=True)

    rules, attacks = args.rules.split(","), args.attacks.split(",")
    results: dict[str, dict[str, float]] = {}
    max_norm: float | None = None
    for rule in rules:
        if rule == "normBound" and max_norm is None:
            # The bound an operator would set from a clean run: the honest updates' median norm.
            clean = run(args, "fedavg-clean", job_document(args, "fedavg-clean", silos, {}), "clean")
            max_norm = float(
                f"{statistics.median(v['norm'] for r in clean for v in r['silo_updates'].values()):.3g}"
            )
            print(f"normBound: maxNorm {max_norm} (median update norm of clean FedAvg)", flush=True)
        for attack in attacks:
            name = f"{rule.lower()}-{attack}"
            doc = job_document(args, name, silos, aggregation(rule, max_norm))
            results.setdefault(rule, {})[attack] = run(args, name, doc, attack)[-1]["eval_loss"]

    base = results.get("fedavg", {}).get("clean")
    head = "| rule | " + " | ".join(attacks) + " | worst / own clean | worst / clean FedAvg |"
    lines = [head, "|---|" + "---:|" * (len(attacks) + 2)]
    for rule in rules:
        row = results[rule]
        poisoned = [row[a] for a in attacks if a != "clean"]
        worst = max(poisoned) if poisoned else float("nan")
        own = worst / row["clean"] if "clean" in row else float("nan")
        vs_base = worst / base if base else float("nan")
        cells = " | ".join(f"{row[a]:.4f}" for a in attacks)
        lines.append(f"| {rule} | {cells} | {own:.3f} | {vs_base:.3f} |")
    table = "\n".join(lines)
    setup = (
        f"{SILOS} silos (Dirichlet alpha {args.alpha} over 3 sources; the last malicious), "
        f"{args.rounds} rounds x {args.steps} local steps, batch {args.batch} x {args.seq} bytes, "
        f"AdamW lr {args.lr}, full fine-tune "
        f"of a byte-level GPT-2 (128 wide, 2 layers), eval loss of the final model on {args.eval_batches} "
        f"held-out batches; normBound: maxNorm {max_norm}, maxWeightShare 0.25"
    )
    print("\n" + table + "\n\n" + setup)
    (args.out / "table.md").write_text(table + "\n\n" + setup + "\n")
    (args.out / "results.json").write_text(
        json.dumps(
            {"setup": vars(args) | {"work": str(args.work), "out": str(args.out)}, "eval_loss": results},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
