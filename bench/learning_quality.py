"""Learning quality on non-IID silos: each algorithm against centralised training, measured in one run.

Same model, same total tokens and steps. The baseline trains one DeepSpeed engine on
the union of the silos' text for rounds x steps-per-round steps. Each federated run
splits that text into silos with `fedjob data split` (Dirichlet over the three
sources, alpha 1.0 = mild, 0.1 = strong skew) and runs a real `fedjob run`
(aggregator and silo processes, gRPC + mTLS, DeepSpeed): every round the silos
share steps-per-round local steps in proportion to their data (local epochs, so
silos run different step counts, as real ones do). Prints the held-out eval loss
of the final global model per method and its ratio to centralised, writes the
table as markdown and a plot of eval loss per round.

    .venv/bin/python bench/learning_quality.py            # about 10 min on 2 CPU cores (11 jobs)
    .venv/bin/python bench/learning_quality.py --rounds 4 --algorithms fedavg,scaffold   # a quick look
    .venv/bin/python bench/learning_quality.py --seeds 0,1,2 --alphas 0.1   # mean and spread over 3 splits

With several seeds, each seed draws its own Dirichlet split and its own training
randomness (the model and the eval set stay the same); the table gives the mean
and standard deviation over seeds and, per method, on how many seeds it ended
below FedAvg on the same split.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedjob.corpora import SOURCES, python_docstrings  # noqa: E402
from fedjob.modeling import build_tiny_model  # noqa: E402
from fedjob.split import split_sources  # noqa: E402

ALGORITHMS = "fedavg,fedprox,scaffold,fednova,fedadam"


def job_document(
    args: argparse.Namespace, name: str, silos: list[dict[str, Any]], rounds: int, seed: int, **agg: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "fedjob.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"path": str(args.work / "model")},
            "training": {
                "mode": "full",
                "localSteps": args.steps_per_round,
                "batchSize": args.batch,
                "sequenceLength": args.seq,
                "learningRate": args.lr,
                "weightDecay": 0.0,
                "optimizer": args.optimizer,
                "seed": seed,
                "deepspeed": {"zeroStage": 1},
            },
            "silos": silos,
            "eval": {"path": str(args.work / "eval"), "batches": args.eval_batches},
            "rounds": rounds,
            "aggregation": {"minSilos": len(silos), "roundDeadlineSeconds": 1800, **agg},
            # Lossless on the wire: this measures the algorithms, not the codecs.
            "compression": {"codec": "none", "zstd": False},
        },
    }


def run_job(args: argparse.Namespace, doc: dict[str, Any], name: str) -> list[dict[str, Any]]:
    out = args.work / "runs" / name
    done = out / "metrics.jsonl"
    same_job = (out / "job.yaml").exists() and yaml.safe_load((out / "job.yaml").read_text()) == doc
    if (
        same_job
        and not args.fresh
        and done.exists()
        and len(done.read_text().splitlines()) == doc["spec"]["rounds"]
    ):
        return [json.loads(line) for line in done.read_text().splitlines()]  # this very job, run before
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    (out / "job.yaml").write_text(yaml.safe_dump(doc))
    started = time.time()
    with open(out / "run.log", "wb") as log:
        rc = subprocess.call(
            [sys.executable, "-m", "fedjob_cli.main", "run", str(out / "job.yaml"), "--out", str(out)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    if rc != 0:
        raise SystemExit(f"{name}: fedjob run failed ({rc}); see {out / 'run.log'}")
    history = [json.loads(line) for line in done.read_text().splitlines()]
    print(f"  {name}: eval loss {history[-1]['eval_loss']:.4f} ({time.time() - started:.0f} s)", flush=True)
    return history


def model_and_sources(work: Path, seed: int, source_bytes: int, pretrain_steps: int) -> dict[str, str]:
    """The set-up the quality benchmarks share; returns each source's training text.

    A tiny byte-level GPT-2 from a config (work/model), three local sources; the tail of
    each source is held out as the eval set (work/eval: the union's distribution). The
    model first learns a little from a fourth, public source (docstrings, none of the
    silos' text), so the federated runs fine-tune, as in real use.
    """
    if not (work / "model" / "config.json").exists():
        build_tiny_model(
            work / "model",
            seed=seed,
            n_embd=128,
            n_layer=2,
            n_head=4,
            pretrain_text=python_docstrings(200_000) if pretrain_steps else None,
            pretrain_steps=pretrain_steps,
        )
    sources = {}
    (work / "eval").mkdir(parents=True, exist_ok=True)
    for name, make in SOURCES.items():
        text = make(source_bytes)
        cut = int(len(text) * 0.9)
        sources[name] = text[:cut]
        (work / "eval" / f"{name}.txt").write_text(text[cut:], encoding="utf-8")
    return sources


def steps_per_silo(sizes: list[int], total: int) -> list[int]:
    """Split `total` steps in proportion to data (largest remainder), at least one each."""
    share = [total * s / sum(sizes) for s in sizes]
    steps = [max(1, int(x)) for x in share]
    order = sorted(range(len(sizes)), key=lambda i: share[i] - int(share[i]), reverse=True)
    i = 0
    while sum(steps) < total:
        steps[order[i % len(order)]] += 1
        i += 1
    while sum(steps) > total:
        j = max(range(len(steps)), key=lambda k: steps[k])
        steps[j] -= 1
    return steps


def add_setup_arguments(p: argparse.ArgumentParser, out: str) -> None:
    """The learning-quality set-up's options, shared by the benchmarks built on it."""
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--silos", type=int, default=4)
    p.add_argument(
        "--steps-per-round", type=int, default=40, help="local steps per round, all silos together"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--optimizer", choices=["adamw", "sgd"], default="adamw", help="the silos' local optimiser"
    )
    p.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo outer learning rate")
    p.add_argument("--outer-momentum", type=float, default=0.9, help="DiLoCo outer Nesterov momentum")
    p.add_argument("--source-bytes", type=int, default=150_000)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="the model's seed (and the split's, where one)")
    p.add_argument("--pretrain-steps", type=int, default=300, help="0: start from random weights")
    p.add_argument(
        "--work",
        type=Path,
        default=Path(os.environ.get("FEDJOB_CACHE", Path.home() / ".cache/fedjob"))
        / "bench-learning-quality",
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs" / out)
    p.add_argument("--fresh", action="store_true", help="rerun jobs whose results are cached in --work")


def split_silos(
    args: argparse.Namespace, sources: dict[str, str], alpha: float, seed: int
) -> tuple[str, list[dict[str, Any]], Any]:
    """The Dirichlet split for (alpha, seed), written once under --work: its tag, the silos'
    spec entries (local steps in proportion to their data) and the split's summary. Seed 0
    keeps the names of the single-seed runs, so their cached results are reused."""
    tag = f"alpha{alpha}" + (f"-seed{seed}" if seed else "")
    folder = args.work / f"split-{tag}"
    summary = split_sources(sources, args.silos, folder, alpha=alpha, seed=seed)
    steps = steps_per_silo([sum(summary.bytes[s].values()) for s in summary.silos], args.steps_per_round)
    silos = [
        {"name": s, "data": {"path": str(folder / s)}, "localSteps": k}
        for s, k in zip(summary.silos, steps, strict=True)
    ]
    return tag, silos, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_arguments(p, "learning-quality")
    p.add_argument("--mu", type=float, default=0.1, help="FedProx proximal weight")
    p.add_argument("--server-lr", type=float, default=0.01, help="FedAdam server learning rate")
    p.add_argument("--alphas", default="1.0,0.1")
    p.add_argument("--algorithms", default=ALGORITHMS)
    p.add_argument(
        "--seeds", default=None, help="comma-separated split and training seeds (default: --seed alone)"
    )
    args = p.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    sources = model_and_sources(args.work, args.seed, args.source_bytes, args.pretrain_steps)
    union = args.work / "union"
    union.mkdir(exist_ok=True)
    for name, text in sources.items():
        (union / f"{name}.txt").write_text(text, encoding="utf-8")

    total_steps = args.rounds * args.steps_per_round
    print(f"centralised: {total_steps} steps of {args.batch}x{args.seq} tokens on the union", flush=True)
    central_doc = job_document(
        args,
        "central",
        [{"name": "union", "data": {"path": str(union)}, "localSteps": total_steps}],
        1,
        args.seed,
    )
    central = run_job(args, central_doc, "centralised")[-1]["eval_loss"]

    algorithms = args.algorithms.split(",")
    # results[algorithm][alpha]: one round-by-round history per seed.
    results: dict[str, dict[float, list[list[dict[str, Any]]]]] = {a: {} for a in algorithms}
    splits: dict[float, list[list[int]]] = {}
    for alpha in (float(a) for a in args.alphas.split(",")):
        splits[alpha] = []
        for seed in seeds:
            tag, silos, summary = split_silos(args, sources, alpha, seed)
            steps = [int(s["localSteps"]) for s in silos]
            splits[alpha].append(steps)
            print(
                f"\nalpha {alpha}, seed {seed}: bytes per silo and source, local steps per round {steps}\n"
                f"{summary.table()}",
                flush=True,
            )
            for algorithm in algorithms:
                agg: dict[str, Any] = {"algorithm": algorithm}
                if algorithm == "fedprox":
                    agg["proximalMu"] = args.mu
                if algorithm in ("fedadam", "fedyogi", "fedadagrad"):
                    agg["serverLearningRate"] = args.server_lr
                if algorithm == "diloco":
                    agg["outerLearningRate"] = args.outer_lr
                    agg["outerMomentum"] = args.outer_momentum
                name = f"{algorithm}-{alpha}".replace(".", "-")
                doc = job_document(args, name, silos, args.rounds, seed, **agg)
                results[algorithm].setdefault(alpha, []).append(run_job(args, doc, f"{algorithm}-{tag}"))

    alphas = list(splits)
    table = results_table(results, central, alphas, seeds)
    print("\n" + table)
    setup = (
        f"{args.rounds} rounds, {args.silos} silos, {args.steps_per_round} local steps per round in all "
        f"(per silo, in proportion to its data: "
        + "; ".join(f"alpha {a}: {', '.join(map(str, splits[a]))}" for a in alphas)
        + f"), batch {args.batch} x {args.seq} bytes, {args.optimizer} lr {args.lr}, full fine-tuning of a "
        f"byte-level GPT-2 (128 wide, 2 layers; {args.pretrain_steps} steps of pre-training on docstrings), "
        f"ZeRO-1, FedProx mu {args.mu}, "
        f"FedAdam server lr {args.server_lr}, eval on {args.eval_batches} held-out batches (3 sources), "
        f"seeds {', '.join(map(str, seeds))}"
    )
    (args.out / "table.md").write_text(table + "\n\n" + setup + "\n")
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "setup": vars(args) | {"work": str(args.work), "out": str(args.out)},
                "centralised_eval_loss": central,
                "seeds": seeds,
                "eval_loss": {
                    alg: {
                        str(a): [[r["eval_loss"] for r in runs] for runs in per_seed]
                        for a, per_seed in by_alpha.items()
                    }
                    for alg, by_alpha in results.items()
                },
                "local_steps": {str(a): s for a, s in splits.items()},
            },
            indent=1,
        )
    )
    plot(results, central, alphas, args.out / "eval-loss.png")
    print(f"\n{setup}\nwrote {args.out / 'table.md'}, {args.out / 'eval-loss.png'}")


def results_table(
    results: dict[str, dict[float, list[list[dict[str, Any]]]]],
    central: float,
    alphas: list[float],
    seeds: list[int],
) -> str:
    """Final held-out eval loss per method; over several seeds, mean +- sd and wins against FedAvg."""
    several = len(seeds) > 1
    cols = ["eval loss", "ratio to centralised"] + (["below FedAvg"] if several else [])
    head = (
        "| method | "
        + " | ".join(f"{c}, alpha {a}" if i == 0 else c for a in alphas for i, c in enumerate(cols))
        + " |"
    )
    rule = "|---|" + "---|" * len(cols) * len(alphas)
    rows = [
        "| centralised | "
        + " | ".join(" | ".join([f"{central:.4f}", "1.000"] + (["-"] if several else [])) for _ in alphas)
        + " |"
    ]
    for algorithm, by_alpha in results.items():
        cells = []
        for a in alphas:
            final = np.array([runs[-1]["eval_loss"] for runs in by_alpha[a]])
            mean = float(final.mean())
            loss = f"{mean:.4f} +- {final.std(ddof=1):.4f}" if several else f"{mean:.4f}"
            cells += [loss, f"{mean / central:.3f}"]
            if several:
                fedavg = np.array([runs[-1]["eval_loss"] for runs in results.get("fedavg", {}).get(a, [])])
                wins = (
                    "-"
                    if algorithm == "fedavg" or len(fedavg) != len(final)
                    else (f"{int((final < fedavg).sum())}/{len(final)}")
                )
                cells.append(wins)
        rows.append(f"| {algorithm} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def plot(
    results: dict[str, dict[float, list[list[dict[str, Any]]]]],
    central: float,
    alphas: list[float],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(alphas), figsize=(6 * len(alphas), 4), sharey=True)
    axes = axes if len(alphas) > 1 else [axes]
    for ax, a in zip(axes, alphas, strict=True):
        for algorithm, by_alpha in results.items():
            # The mean over seeds, round by round.
            curves = np.array([[r["eval_loss"] for r in runs] for runs in by_alpha[a]])
            ax.plot(range(1, curves.shape[1] + 1), curves.mean(axis=0), marker="o", label=algorithm)
        ax.axhline(central, color="k", linestyle="--", label="centralised (same steps)")
        ax.set_title(
            f"Dirichlet alpha {a}" + (f", mean of {len(by_alpha[a])} seeds" if len(by_alpha[a]) > 1 else "")
        )
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out eval loss (nats/byte)")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
