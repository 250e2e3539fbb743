"""Fine-tuning on real data, end to end: one `fedjob run` whose silos each bring another format.

The model folder's own BPE tokenizer and chat template are used by every silo; the chat
silo's federated evaluation scores the assistant's answers in conversations it never
trained on, and the trained adapter scores them better than the base model. The README's
snippet loads that adapter and generates an answer with the chat template.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedjob.chat_example import SILO_MODULES, qa_pairs
from fedjob.corpora import python_docs

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def four_formats(chat_assets: Path, tmp_path: Path) -> list[dict[str, Any]]:
    """text (.txt folder), jsonl (a parquet file, custom text field), instruction (a datasets
    folder, custom field names), chat (.jsonl)."""
    import datasets

    text = tmp_path / "text"
    text.mkdir()
    (text / "reference.txt").write_text(python_docs(40_000))
    docs = [{"body": p} for p in python_docs(60_000).split("\n\n") if p.strip()]
    datasets.Dataset.from_list(docs).to_parquet(str(tmp_path / "docs.parquet"))
    qa = [{"task": q, "answer": a} for q, a in qa_pairs(SILO_MODULES["files"])]
    datasets.Dataset.from_list(qa).save_to_disk(str(tmp_path / "instructions"))
    return [
        {"name": "text", "data": {"path": str(text)}},
        {
            "name": "docs",
            "data": {"path": str(tmp_path / "docs.parquet"), "format": "jsonl", "textField": "body"},
        },
        {
            "name": "instructions",
            "data": {
                "path": str(tmp_path / "instructions"),
                "format": "instruction",
                "instructionFields": {"instruction": "task", "output": "answer"},
            },
        },
        {
            "name": "chat",
            "data": {
                "path": str(chat_assets / "data/numbers/train.jsonl"),
                "format": "chat",
                "evalFraction": 0.15,
            },
        },
    ]


@pytest.fixture(scope="module")
def trained(chat_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("formats")
    spec = {
        "model": {"path": str(chat_assets / "model")},
        "training": {
            "mode": "lora",
            "localSteps": 8,
            "batchSize": 4,
            "sequenceLength": 128,
            "learningRate": 0.01,
            "lora": {"r": 8, "targetModules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]},
            "deepspeed": {"zeroStage": 2},
        },
        "silos": four_formats(chat_assets, tmp),
        "evaluation": {"batches": 2},
        "rounds": 3,
        "aggregation": {"minSilos": 4, "roundDeadlineSeconds": 300},
    }
    doc = {"apiVersion": "fedjob.io/v1alpha1", "kind": "FederatedJob", "metadata": {"name": "formats"}}
    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump({**doc, "spec": spec}))
    out = tmp / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fedjob_cli.main", "run", str(job), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((out / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, records


def test_every_format_trains_in_one_federated_job(trained: tuple[Path, list[dict[str, Any]]]) -> None:
    out, records = trained
    assert [r["round"] for r in records] == [1, 2, 3]
    for r in records:
        assert set(r["silo_train_loss"]) == {"text", "docs", "instructions", "chat"}
        assert all(0 < loss < 20 for loss in r["silo_train_loss"].values())
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_the_adapter_scores_held_out_answers_better_than_the_base_model(
    trained: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, records = trained
    base = records[0]["initial_silo_eval_loss"]["chat"]
    final = records[-1]["silo_eval_loss"]["chat"]
    assert final < base - 0.1, (base, final)


def test_the_readme_loads_the_adapter_and_generates_an_answer(
    chat_assets: Path, trained: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The README's snippet, run as written against this run's adapter (paths linked in place)."""
    out, _ = trained
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- chat-generate -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README lost its chat generation snippet"
    (tmp_path / "examples/models").mkdir(parents=True)
    (tmp_path / "examples/models/tiny-chat").symlink_to(chat_assets / "model")
    (tmp_path / "runs/chat-lora").mkdir(parents=True)
    (tmp_path / "runs/chat-lora/adapter").symlink_to(out / "adapter")
    proc = subprocess.run(
        [sys.executable, "-c", match.group(1)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert answer and "<|im_start|>" not in answer, proc.stdout
