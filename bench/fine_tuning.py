"""Fine-tuning on chat data: what packing buys, and what tokenisation costs.

Set-up: the chat example (`fedjob example`): a tiny Llama-shaped model with its own BPE
tokenizer and chat template, three silos of standard-library questions and answers,
LoRA, answers-only loss, 15% of each silo's conversations held out.

1. Tokenisation: conversations rendered with the chat template, tokenised with offsets
   and masked, per second (the silos' data repeated to 20,000+ conversations).
2. Layout: windows per silo and the share of window tokens that are targets, packed vs
   padded (the baseline: one example per window).
3. Training: `fedjob run` of examples/chat-lora.yaml, packed vs padded, same rounds, steps
   and batch: held-out answer loss of the base model and after the last round, and the
   median seconds per round after the first.

    python bench/fine_tuning.py [--rounds 6] [--work ~/.cache/fedjob/bench-fine-tuning]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedjob.chat_example import build_tiny_chat_model, write_chat_silos  # noqa: E402
from fedjob.silo_data import examples  # noqa: E402
from fedjob.spec import load_job  # noqa: E402
from fedjob.tokenization import ModelTokenizer  # noqa: E402
from fedjob.windows import IGNORE, pack, pad  # noqa: E402


def assets(work: Path) -> Path:
    """The chat example under `work`, built once."""
    if not (work / "models/tiny-chat/config.json").exists():
        build_tiny_chat_model(work / "models/tiny-chat")
    if not (work / "data/chat").exists():
        write_chat_silos(work / "data/chat")
    job = work / "chat-lora.yaml"
    job.write_text((ROOT / "examples/chat-lora.yaml").read_text())
    return job


def tokenisation(work: Path, copies: int) -> tuple[int, int, float]:
    """Conversations, tokens, seconds: rendering, tokenising with offsets, masking."""
    big = work / "big.jsonl"
    lines = "".join((work / f"data/chat/{s}/train.jsonl").read_text() for s in ("text", "files", "numbers"))
    big.write_text(lines * copies)
    job = load_job(work / "chat-lora.yaml")
    tok = ModelTokenizer(work / "models/tiny-chat")
    fmt = job.spec.silos[0].data
    start = time.perf_counter()
    n = tokens = 0
    for e in examples(big, fmt, tok):
        n += 1
        tokens += e.ids.size
    return n, tokens, time.perf_counter() - start


def layouts(work: Path) -> list[tuple[str, int, int, int, float, float]]:
    """Per silo: examples, packed windows, padded windows, target share packed and padded."""
    job = load_job(work / "chat-lora.yaml")
    tok = ModelTokenizer(work / "models/tiny-chat")
    t = job.spec.training
    rows = []
    for s in job.spec.silos:
        exs = list(examples(Path(s.data.path), s.data, tok))
        packed, padded = pack(exs, t.sequence_length, tok.pad_id), pad(exs, t.sequence_length, tok.pad_id)
        share = [float((w.labels != IGNORE).mean()) for w in (packed, padded)]
        rows.append((s.name, len(exs), packed.num_samples(), padded.num_samples(), *share))
    return rows


def train(work: Path, packing: str, rounds: int) -> tuple[float, float, float]:
    """Held-out answer loss before and after, and the median round time after the first (which
    also pays for start-up and one-off builds)."""
    out = work / "runs" / packing
    subprocess.run(["rm", "-rf", str(out)], check=True)
    started = time.time()
    with open(work / f"{packing}.log", "wb") as log:
        job = str(work / "chat-lora.yaml")
        rc = subprocess.call(
            [
                sys.executable, "-m", "fedjob_cli.main", "run", job, "--out", str(out),
                "--set", f"spec.training.packing={packing}", "--set", f"spec.rounds={rounds}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    if rc != 0:
        raise SystemExit(f"fedjob run ({packing}) failed ({rc}); see {work / f'{packing}.log'}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"  {packing}: {time.time() - started:.0f} s", file=sys.stderr)
    seconds = float(np.median([r["seconds"] for r in records[1:]]))
    return records[0]["initial_federated_eval_loss"], records[-1]["federated_eval_loss"], seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "fedjob" / "bench-fine-tuning")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument(
        "--copies", type=int, default=50, help="repeats of the silos' data for the tokenisation rate"
    )
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    assets(args.work)
    print(f"# Fine-tuning on chat data ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, no GPU)\n")
    n, tokens, seconds = tokenisation(args.work, args.copies)
    print(
        f"tokenisation (chat template, offsets, answer mask): {n:,} conversations, {tokens:,} tokens in "
        f"{seconds:.2f} s: {n / seconds:,.0f} conversations/s, {tokens / seconds:,.0f} tokens/s\n"
    )
    print("| silo | examples | packed windows | padded windows | target tokens, packed | padded |")
    print("|---|---|---|---|---|---|")
    for name, exs, pk, pd, share_pk, share_pd in layouts(args.work):
        print(f"| {name} | {exs} | {pk} | {pd} | {share_pk:.1%} | {share_pd:.1%} |")
    print(f"\n| layout | held-out answer loss, base | after {args.rounds} rounds | seconds per round |")
    print("|---|---|---|---|")
    results = {}
    for packing in ("packed", "padded"):
        results[packing] = train(args.work, packing, args.rounds)
        base, final, secs = results[packing]
        print(f"| {packing} | {base:.4f} | {final:.4f} | {secs:.2f} |", flush=True)
    print(f"\npadded / packed final loss: {results['padded'][1] / results['packed'][1]:.3f}")
    (args.work / "results.yaml").write_text(yaml.safe_dump({k: list(v) for k, v in results.items()}))


if __name__ == "__main__":
    main()
