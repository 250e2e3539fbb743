"""Bytes on the wire against learning: each uplink chain against the fp32 sync, same rounds, same split.

The learning-quality set-up (bench/learning_quality.py: a byte-level GPT-2 fine-tuned in
full by 4 silos on a strongly non-IID split of three sources, alpha 0.1), run as a real
`fedjob run` once per uplink chain and aggregation algorithm. The baseline is measured in
the same run: the fp32 sync (no stages, raw float32). For each chain the table gives the
bytes each silo sent and received per round, their ratio to fp32, the final eval loss
(aggregator-side, on the held-out tails of the three sources) and its ratio to the fp32
sync's with the same algorithm.

    .venv/bin/python bench/communication.py             # FedAvg and DiLoCo, DEFAULT_CHAINS
    .venv/bin/python bench/communication.py --algorithms fedavg --chains fp32,topk25b-q2n.512-z15 \
        --downlink topk25b-q2n.512-z15,fp32:topk25b-q2n.512-z15 --seed 1

Besides the named chains (NAMED, ALIASES), `topk<percent>[b[<size>]]-q<bits>[n][.<block>][-z<level>]`
spells top-k (b: per block of <size> values, 128 if none given), 2/4/8-bit quantisation
(n: nearest rounding, else stochastic; .<block>: values per scale) and zstd (its level).

`--downlink` also compresses the download: CHAIN runs that chain both ways, UP:DOWN the
uplink chain UP and the downlink chain DOWN. The silos then receive each round's change
to the global model instead of the whole model in float32. The first round's download is
always whole, so the downlink's ratio is given twice: averaged over all rounds, and per
sync after the first (what a silo that holds the model receives).
"""

from __future__ import annotations

import argparse
import json
import re
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

# The chains that are not spelled by the grammar below: (uplink stages, legacy codec fields
# when the chain names no encoding).
NAMED: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "fp32": ([], {"codec": "none", "zstd": False}),
    "int8+zstd": ([], {"codec": "int8", "zstd": True}),
    "q4+zstd": ([{"quantize": {"bits": 4, "rounding": "stochastic"}}, {"zstd": {}}], {}),
}
# Error feedback on the 2-bit rounding alone: top-k keeping everything.
ALIASES = {"ef-q2": "topk100-q2", "ef-q2n": "topk100-q2n"}
# What a bare run measures.
DEFAULT_CHAINS = ",".join(
    ["fp32", "int8+zstd", "q4+zstd", "ef-q2n"] + [f"topk{p}b-q2n.512-z15" for p in (25, 22, 3, 2)]
)
GRAMMAR = r"topk(\d+(?:\.\d+)?)(?:b(\d*))?-q([248])(n?)(?:\.(\d+))?(?:-z(\d+))?"


def chain_stages(name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A named chain, or one spelled `topk<percent>[b[<size>]]-q<bits>[n][.<block>][-z<level>]`.

    b: top-k per block of <size> values (128); n: nearest rounding, else stochastic;
    .<block>: values per scale (128); z: the zstd level (3).
    """
    if name in NAMED:
        return NAMED[name]
    m = re.fullmatch(GRAMMAR, ALIASES.get(name, name))
    if m is None:
        raise SystemExit(
            f"unknown chain {name!r}: one of {', '.join([*NAMED, *ALIASES])} "
            "or topk<percent>[b[<size>]]-q<bits>[n][.<block>][-z<level>]"
        )
    topk: dict[str, Any] = {"fraction": float(m[1]) / 100}
    if m[2] is not None:
        topk["blockSize"] = int(m[2] or 128)
    quantize: dict[str, Any] = {"bits": int(m[3]), "rounding": "nearest" if m[4] else "stochastic"}
    if m[5]:
        quantize["blockSize"] = int(m[5])
    return [{"topk": topk}, {"quantize": quantize}, {"zstd": {"level": int(m[6])} if m[6] else {}}], {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chains", default=DEFAULT_CHAINS)
    p.add_argument("--algorithms", default="fedavg,diloco")
    add_setup_arguments(p, "communication")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument(
        "--downlink",
        default="",
        help="also compress the downlink (comma-separated; one job each): CHAIN runs that chain both ways, "
        "UP:DOWN the uplink chain UP and the downlink chain DOWN (only their stages)",
    )
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    sources = model_and_sources(args.work, args.seed, args.source_bytes, args.pretrain_steps)
    tag, silos, _ = split_silos(args, sources, args.alpha, args.seed)
    steps = [int(s["localSteps"]) for s in silos]
    print(f"alpha {args.alpha}, seed {args.seed}: local steps per round {steps}", flush=True)

    rows: list[dict[str, Any]] = []
    for algorithm in args.algorithms.split(","):
        agg: dict[str, Any] = {"algorithm": algorithm}
        if algorithm == "diloco":
            agg.update(outerLearningRate=args.outer_lr, outerMomentum=args.outer_momentum)
        for chain in args.chains.split(","):
            uplink, legacy = chain_stages(chain)
            doc = job_document(args, f"comm-{algorithm}", silos, args.rounds, args.seed, **agg)
            doc["spec"]["compression"] = {**legacy, **({"uplink": uplink} if uplink else {})}
            history = run_job(args, doc, f"comm-{algorithm}-{chain}-{tag}")
            rows.append(measure(algorithm, chain, history))
        for chain in filter(None, args.downlink.split(",")):
            up_name, _, down_name = chain.partition(":")
            uplink, legacy = chain_stages(up_name)
            downlink = chain_stages(down_name)[0] if down_name else uplink
            doc = job_document(args, f"comm-{algorithm}", silos, args.rounds, args.seed, **agg)
            doc["spec"]["compression"] = {**legacy, "uplink": uplink, "downlink": downlink}
            if down_name:
                history = run_job(args, doc, f"comm-{algorithm}-{up_name}-down-{down_name}-{tag}")
                rows.append(measure(algorithm, f"{up_name}, downlink {down_name}", history))
            else:
                history = run_job(args, doc, f"comm-{algorithm}-{chain}-both-{tag}")
                rows.append(measure(algorithm, f"{chain}, downlink too", history))

    table = render(rows)
    print("\n" + table)
    setup = (
        f"{args.rounds} rounds, {args.silos} silos (alpha {args.alpha}, seed {args.seed}; local steps "
        f"{', '.join(map(str, steps))}), full fine-tuning of the learning-quality GPT-2, {args.optimizer} lr "
        f"{args.lr}, diloco outer lr {args.outer_lr} momentum {args.outer_momentum}; bytes are payload bytes "
        "per silo per round (chunk headers excluded), averaged over rounds"
    )
    (args.out / "table.md").write_text(table + "\n\n" + setup + "\n")
    (args.out / "results.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    print(f"\n{setup}\nwrote {args.out / 'table.md'}")


def measure(algorithm: str, chain: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    up = sum(r["bytes_up"] / r["num_participants"] for r in history) / len(history)
    down = sum(r["bytes_down"] / r["num_participants"] for r in history) / len(history)
    later = history[1:] or history
    down_later = sum(r["bytes_down"] / r["num_participants"] for r in later) / len(later)
    raw = sum(r["bytes_up"] * (r["compression_ratio"] or 1.0) / r["num_participants"] for r in history)
    return {
        "algorithm": algorithm,
        "chain": chain,
        "bytes_up": up,
        "bytes_down": down,
        "bytes_down_after_first": down_later,
        "raw_up": raw / len(history),
        "eval_loss": history[-1]["eval_loss"],
        "eval_curve": [r["eval_loss"] for r in history],
    }


def render(rows: list[dict[str, Any]]) -> str:
    head = (
        "| algorithm | uplink chain | up KB/silo/round | up vs fp32 | down KB/silo/round | down vs fp32 "
        "| down vs fp32 after round 1 | final eval loss | vs fp32 sync |"
    )
    out = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = next((b for b in rows if b["algorithm"] == r["algorithm"] and b["chain"] == "fp32"), None)
        up_ratio = r["raw_up"] / r["bytes_up"]
        down_ratio = base["bytes_down"] / r["bytes_down"] if base else float("nan")
        later = r.get("bytes_down_after_first", r["bytes_down"])
        later_ratio = base.get("bytes_down_after_first", base["bytes_down"]) / later if base else float("nan")
        loss_ratio = r["eval_loss"] / base["eval_loss"] if base else float("nan")
        out.append(
            f"| {r['algorithm']} | {r['chain']} | {r['bytes_up'] / 1e3:,.1f} | {up_ratio:.1f}x "
            f"| {r['bytes_down'] / 1e3:,.1f} | {down_ratio:.1f}x | {later_ratio:.1f}x "
            f"| {r['eval_loss']:.4f} | {loss_ratio:.4f} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
