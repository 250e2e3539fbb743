"""Failures explain themselves: what no restart can fix fails fast, with its reason, and loses nothing.

- a broken model or data ends `fedjob run` in seconds with exit code 2 and the reason on the
  last line of its output (before: 95-150 s of restarts and "see logs");
- a checkpoint made under other state-shaping fields or another tokenizer vocabulary is refused
  naming them; `--fresh` starts over; a changed number of rounds resumes;
- a stale DeepSpeed build lock cannot hang a silo;
- a second Ctrl-C while `fedjob run` stops leaves no traceback and no process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import yaml
from fedjob_aggregator.coordinator import Coordinator
from fedjob_worker.build_locks import StaleLockWatch

from fedjob.aggregation import FedAvg
from fedjob.errors import EXIT_PERMANENT, PermanentError
from fedjob.spec import parse_job
from tests.conftest import job_doc


def job_spec(assets: Path, **spec: Any) -> dict[str, Any]:
    return {
        "model": {"path": str(assets / "model")},
        "training": {
            "mode": "lora",
            "localSteps": 4,
            "batchSize": 2,
            "sequenceLength": 32,
            "lora": {"r": 4, "targetModules": ["c_attn"]},
            "deepspeed": {"zeroStage": 1},
        },
        "silos": [
            {"name": "code", "data": {"path": str(assets / "data/code")}},
            {"name": "docs", "data": {"path": str(assets / "data/docs")}},
        ],
        "rounds": 1,
        "aggregation": {"minSilos": 2, "roundDeadlineSeconds": 120},
        **spec,
    }


def fedjob_run(
    tmp_path: Path, spec: dict[str, Any], *extra: str, name: str = "job"
) -> subprocess.CompletedProcess[str]:
    doc = {
        "apiVersion": "fedjob.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "fails"},
        "spec": spec,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return subprocess.run(
        [sys.executable, "-m", "fedjob_cli.main", "run", str(path), "--out", str(tmp_path / "out"), *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The output's last message, its console line wraps joined."""
    text = (proc.stdout + proc.stderr).strip()
    return " ".join(text.split())


def copy_model(assets: Path, tmp_path: Path, edit: Callable[[Path], None]) -> str:
    folder = tmp_path / "model"
    shutil.copytree(assets / "model", folder)
    edit(folder)
    return str(folder)


def set_config(**fields: Any) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(fields)
        (folder / "config.json").write_text(json.dumps(cfg))

    return edit


def text_silo(tmp_path: Path, content: bytes) -> str:
    folder = tmp_path / "silo-text"
    folder.mkdir()
    (folder / "a.txt").write_bytes(content)
    return str(folder)


# Each: how to break the job, and what the reason must say.
BROKEN: dict[str, tuple[Callable[[Path, Path, dict[str, Any]], None], str]] = {
    "a LoRA target module the model lacks": (
        lambda a, t, s: s["training"]["lora"].update(targetModules=["q_proj"]),
        "spec.training.lora.targetModules: no module named 'q_proj' in this gpt2 model",
    ),
    "an adapter feed-forward module that is not a target": (
        lambda a, t, s: s["training"].update(
            mode="adapter", adapter={"targetModules": ["c_attn"], "feedforwardModules": ["c_fc"]}
        ),
        "spec.training.adapter.feedforwardModules: c_fc must also be in targetModules",
    ),
    "an empty .txt": (
        lambda a, t, s: s["silos"][0]["data"].update(path=text_silo(t, b"")),
        "silo-text: 0 tokens, fewer than one training window",
    ),
    "text shorter than one window": (
        lambda a, t, s: s["silos"][0]["data"].update(path=text_silo(t, b"too short")),
        "silo-text: 9 tokens, fewer than one training window",
    ),
    "a binary file": (
        lambda a, t, s: s["silos"][0]["data"].update(path=text_silo(t, bytes(range(256)) * 4)),
        "is not UTF-8 text (byte 0x80 at offset 128)",
    ),
    "Latin-1 text": (
        lambda a, t, s: s["silos"][0]["data"].update(path=text_silo(t, "café crème ".encode("latin-1") * 20)),
        "is not UTF-8 text (byte 0xe9 at offset 3)",
    ),
    "an unparsable config.json": (
        lambda a, t, s: s["model"].update(
            path=copy_model(a, t, lambda f: (f / "config.json").write_text("{not json"))
        ),
        "config.json is not valid JSON",
    ),
    "no weight files": (
        lambda a, t, s: s["model"].update(
            path=copy_model(a, t, lambda f: [p.unlink() for p in f.glob("*.safetensors")])
        ),
        "spec.model.path: no weights in",
    ),
    "sequenceLength above n_positions": (
        lambda a, t, s: s["training"].update(sequenceLength=100_000),
        "spec.training.sequenceLength: 100000 is above the model's",
    ),
    "a vocabulary below 256": (
        lambda a, t, s: s["model"].update(path=copy_model(a, t, set_config(vocab_size=100))),
        "vocab_size 100 is below the 256 byte-level tokens",
    ),
    "an unknown model_type": (
        lambda a, t, s: s["model"].update(path=copy_model(a, t, set_config(model_type="gpt9"))),
        "unknown model_type 'gpt9'",
    ),
}


@pytest.mark.parametrize("mistake", BROKEN)
def test_a_mistake_no_restart_can_fix_ends_fedjob_run_fast_with_its_reason(
    assets: Path, tmp_path: Path, mistake: str
) -> None:
    breaks, reason = BROKEN[mistake]
    spec = job_spec(assets)
    breaks(assets, tmp_path, spec)
    started = time.time()
    proc = fedjob_run(tmp_path, spec)
    assert proc.returncode == EXIT_PERMANENT, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert time.time() - started < 30
    assert reason in last_line(proc)
    # `fedjob validate --check-paths` finds the same, without running anything.
    check = subprocess.run(
        [sys.executable, "-m", "fedjob_cli.main", "validate", "--check-paths", str(tmp_path / "job.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == EXIT_PERMANENT and reason in " ".join(check.stderr.split())


# ----- checkpoints belong to their spec --------------------------------------------------------------


def test_a_checkpoint_made_under_other_state_shaping_fields_is_refused_naming_them(tmp_path: Path) -> None:
    state = {"w": np.zeros(4, np.float32)}
    Coordinator(parse_job(job_doc()), FedAvg(), state, tmp_path)  # saves round 0 with its spec
    changed = parse_job(
        job_doc(training={"mode": "lora", "lora": {"r": 16}}, aggregation={"algorithm": "fedprox"})
    )
    with pytest.raises(PermanentError) as info:
        Coordinator(changed, FedAvg(), state, tmp_path)
    assert info.value.reason == "IncompatibleCheckpoint"
    assert "aggregation.algorithm: 'fedavg' in the checkpoint, 'fedprox' in this spec" in str(info.value)
    assert "training.lora.r: 8 in the checkpoint, 16 in this spec" in str(info.value)
    # Fields that do not shape the state may change.
    same = parse_job(job_doc(rounds=7, aggregation={"minSilos": 2, "roundDeadlineSeconds": 99}))
    assert Coordinator(same, FedAvg(), state, tmp_path).completed == 0


def test_a_checkpoint_made_under_another_tokenizer_vocabulary_is_refused(tmp_path: Path) -> None:
    state = {"w": np.zeros(4, np.float32)}
    job = parse_job(job_doc())
    Coordinator(job, FedAvg(), state, tmp_path / "a", vocabulary="bytes (256 ids)")
    with pytest.raises(PermanentError) as info:
        Coordinator(
            job, FedAvg(), state, tmp_path / "a", vocabulary="model (2048 ids, vocabulary sha256 1a2b)"
        )
    assert (
        "training.tokenizer: 'bytes (256 ids)' in the checkpoint, "
        "'model (2048 ids, vocabulary sha256 1a2b)' in this spec" in str(info.value)
    )
    # A checkpoint from before the vocabulary was recorded does not name one, and resumes.
    Coordinator(job, FedAvg(), state, tmp_path / "b")
    assert Coordinator(job, FedAvg(), state, tmp_path / "b", vocabulary="bytes (256 ids)").completed == 0


@pytest.mark.slow
def test_fedjob_run_refuses_a_changed_lora_rank_starts_over_with_fresh_and_resumes_more_rounds(
    assets: Path, tmp_path: Path
) -> None:
    spec = job_spec(assets)
    assert fedjob_run(tmp_path, spec).returncode == 0
    spec["training"]["lora"]["r"] = 8
    refused = fedjob_run(tmp_path, spec)
    assert refused.returncode == EXIT_PERMANENT
    assert "training.lora.r: 4 in the checkpoint, 8 in this spec" in last_line(refused)
    fresh = fedjob_run(tmp_path, spec, "--fresh")
    assert fresh.returncode == 0, fresh.stdout[-2000:]
    spec["rounds"] = 2
    more = fedjob_run(tmp_path, spec)
    assert more.returncode == 0, more.stdout[-2000:]
    assert "resuming after round 1 of 2" in " ".join(more.stdout.split())
    rounds = [json.loads(x)["round"] for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]
    again = fedjob_run(tmp_path, spec)  # finished: reported at once, nothing started
    assert again.returncode == 0 and "already finished: all 2 rounds" in " ".join(again.stdout.split())


# ----- stale build locks -------------------------------------------------------------------------------


def test_a_lock_whose_build_shows_no_progress_is_removed_and_a_live_one_is_kept(tmp_path: Path) -> None:
    stale, live = tmp_path / "op_a", tmp_path / "op_b"
    for d in (stale, live):
        d.mkdir()
        (d / "build.ninja").write_text("x")
        (d / "lock").write_text("")
    old = time.time() - 1000
    for p in stale.iterdir():
        os.utime(p, (old, old))
    watch = StaleLockWatch(tmp_path, stale_after=180)
    assert watch.sweep() == [stale / "lock"]
    assert not (stale / "lock").exists() and (live / "lock").exists()


@pytest.mark.slow
def test_a_planted_stale_lock_does_not_hang_deepspeeds_start(tmp_path: Path) -> None:
    cache = Path(os.environ.get("FEDJOB_CACHE", Path.home() / ".cache" / "fedjob")) / "torch_extensions"
    extensions = tmp_path / "torch_extensions"
    if cache.exists():
        shutil.copytree(cache, extensions)
    folder = extensions / "deepspeed_shm_comm"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lock").write_text("")  # what a build stopped mid-way leaves
    old = time.time() - 60
    os.utime(folder / "lock", (old, old))  # the built op keeps its times: nothing to rebuild
    proc = subprocess.run(
        [sys.executable, "-m", "fedjob_cli.main", "warmup"],
        capture_output=True,
        text=True,
        timeout=300,
        # No progress for 10 s counts as stale here (180 s by default).
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "FEDJOB_STALE_LOCK_SECONDS": "10"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "removed a stale build lock" in proc.stderr


# ----- Ctrl-C --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_ctrl_c_while_stopping_leaves_no_traceback_and_no_process(
    assets: Path, tmp_path: Path
) -> None:
    spec = job_spec(assets, rounds=1000)
    doc = {
        "apiVersion": "fedjob.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "ctrlc"},
        "spec": spec,
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    run = subprocess.Popen(
        [sys.executable, "-m", "fedjob_cli.main", "run", str(tmp_path / "job.yaml"), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As from a terminal: a shell that started the suite in the background ignores SIGINT, and
        # its children would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    end = time.time() + 180
    while not (out / "metrics.jsonl").exists():  # a round closed: every component is up
        assert time.time() < end and run.poll() is None
        time.sleep(0.2)
    children = psutil.Process(run.pid).children(recursive=True)
    run.send_signal(signal.SIGINT)
    time.sleep(0.3)
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=120)
    assert "Traceback" not in output, output[-3000:]
    assert "interrupted; stopping" in output
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.pid for p in alive]


def test_an_unknown_log_level_is_a_usage_error_not_a_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedjob_cli.main", "--log-level", "LOUD", "validate", "x.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --log-level: invalid choice: 'loud'" in proc.stderr


def test_every_option_has_help_text() -> None:
    import argparse

    from fedjob_cli.main import build_parser

    def parsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
        out = [p]
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    out += parsers(sub)
        return out

    bare = [
        f"{p.prog} {a.dest}"
        for p in parsers(build_parser())
        for a in p._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help
    ]
    assert not bare, bare
