"""What client-level differential privacy costs in learning: the learning-quality set-up at several epsilons.

The set-up of bench/learning_quality.py (a byte-level GPT-2 fine-tuned in full by 4 silos
on a strongly non-IID split, alpha 0.1, 20 rounds, FedAvg), run as a real `fedjob run` with
`privacy.dp.targetEpsilon` at each epsilon (delta 1e-5; the noise multiplier is calibrated
by dp-accounting so that all rounds fit) and each clip norm, against the same job without
DP, measured in the same run. Also the starting model's eval loss: what "learned nothing"
scores. The table gives the noise multiplier, the noise std per parameter that the mean
update carries each round (z x clipNorm / silos), the final eval loss and its ratio to the
job without DP.

    .venv/bin/python bench/privacy.py                                    # 3 epsilons x 2 clip norms
    .venv/bin/python bench/privacy.py --epsilons 8 --clip-norms 0.01     # one job
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from learning_quality import (  # noqa: E402
    add_setup_arguments,
    job_document,
    model_and_sources,
    run_job,
    split_silos,
)

from fedjob.privacy_budget import plan_for  # noqa: E402
from fedjob.spec import parse_job  # noqa: E402


def starting_loss(doc: dict[str, Any]) -> float:
    """The held-out eval loss of the model every job starts from (the aggregator's own evaluation)."""
    from fedjob import modeling
    from fedjob.silo_data import eval_data

    job = parse_job(doc)
    shared = eval_data(job)
    assert job.spec.eval is not None and shared is not None
    batches = shared.fixed_batches(job.spec.eval.batches, job.spec.training.batch_size)
    return float(modeling.mean_loss(modeling.build_model(job), batches))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epsilons", default="1,4,8")
    p.add_argument("--clip-norms", default="0.01,0.1", help="privacy.dp.clipNorm values to try")
    p.add_argument("--delta", type=float, default=1e-5)
    add_setup_arguments(p, "privacy")
    p.add_argument("--alpha", type=float, default=0.1)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    sources = model_and_sources(args.work, args.seed, args.source_bytes, args.pretrain_steps)
    tag, silos, _ = split_silos(args, sources, args.alpha, args.seed)
    steps = [int(s["localSteps"]) for s in silos]
    print(f"alpha {args.alpha}, seed {args.seed}: local steps per round {steps}", flush=True)

    # The baseline: the same job without DP (lossless wire, as every job here).
    base_doc = job_document(args, "comm-fedavg", silos, args.rounds, args.seed, algorithm="fedavg")
    start = starting_loss(base_doc)
    print(f"starting model: eval loss {start:.4f}", flush=True)
    rows: list[dict[str, Any]] = [
        row("none", None, None, None, run_job(args, base_doc, f"comm-fedavg-fp32-{tag}"))
    ]
    for eps in (float(x) for x in args.epsilons.split(",")):
        for clip in (float(x) for x in args.clip_norms.split(",")):
            doc = job_document(
                args, f"dp-e{eps:g}-c{clip:g}".replace(".", "-"), silos, args.rounds, args.seed
            )
            doc["spec"]["privacy"] = {"dp": {"clipNorm": clip, "targetEpsilon": eps, "delta": args.delta}}
            z = plan_for(parse_job(doc).spec).noise_multiplier
            history = run_job(args, doc, f"dp-eps{eps:g}-clip{clip:g}-{tag}")
            rows.append(row(f"{eps:g}", clip, z, z * clip / args.silos, history))

    table = render(rows, start)
    print("\n" + table)
    setup = (
        f"{args.rounds} rounds, {args.silos} silos (alpha {args.alpha}, seed {args.seed}; local steps "
        f"{', '.join(map(str, steps))}), full fine-tuning of the learning-quality GPT-2 "
        f"(~0.45M parameters), {args.optimizer} lr {args.lr}, FedAvg, central noise, delta {args.delta:g}, "
        f"every silo every round (no sampling); the starting model scores {start:.4f}"
    )
    (args.out / "table.md").write_text(table + "\n\n" + setup + "\n")
    (args.out / "results.json").write_text(
        json.dumps({"setup": setup, "starting_eval_loss": start, "rows": rows}, indent=1)
    )
    plot(rows, start, args.out / "eval-loss.png")
    print(f"\n{setup}\nwrote {args.out / 'table.md'}, {args.out / 'eval-loss.png'}")


def row(
    epsilon: str, clip: float | None, z: float | None, std: float | None, history: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "target_epsilon": epsilon,
        "clip_norm": clip,
        "noise_multiplier": z,
        "noise_std_per_parameter": std,
        "epsilon_spent": history[-1].get("dp_epsilon"),
        "eval_loss": history[-1]["eval_loss"],
        "eval_curve": [r["eval_loss"] for r in history],
    }


def render(rows: list[dict[str, Any]], start: float) -> str:
    base = rows[0]["eval_loss"]
    out = [
        "| target epsilon | clip norm | noise multiplier | noise std per parameter per round | epsilon spent "
        "| final eval loss | vs no DP |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| (starting model) | | | | | {start:.4f} | {start / base:.3f} |",
    ]
    for r in rows:
        dp = r["noise_multiplier"] is not None
        out.append(
            f"| {r['target_epsilon']} | {r['clip_norm'] if dp else ''} | "
            f"{r['noise_multiplier']:.3f} | {r['noise_std_per_parameter']:.2e} | {r['epsilon_spent']:.3f} "
            if dp
            else "| no DP | | | | "
        )
        out[-1] += f"| {r['eval_loss']:.4f} | {r['eval_loss'] / base:.3f} |"
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], start: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        label = (
            "no DP"
            if r["noise_multiplier"] is None
            else f"eps {r['target_epsilon']}, clip {r['clip_norm']:g}"
        )
        ax.plot(range(1, len(r["eval_curve"]) + 1), r["eval_curve"], marker="o", ms=3, label=label)
    ax.axhline(start, color="k", linestyle="--", label="starting model")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out eval loss (nats/byte)")
    ax.set_title("client-level DP, 4 silos (delta 1e-5)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
