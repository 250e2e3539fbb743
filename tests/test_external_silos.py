"""Two parties on one machine: the owner runs `fedjob run` with an external silo, the silo runs
`fedjob silo join` from its own FederatedSilo file, folder and data. Real gRPC, mTLS, DeepSpeed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_end_to_end import logs

pytestmark = pytest.mark.slow


def wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"fedjob run exited with {proc.returncode} before writing {path}")
        if time.time() > end:
            raise AssertionError(f"no {path} after {timeout:.0f} s")
        time.sleep(0.2)


def test_an_external_silo_joins_with_its_own_key_and_data_and_the_job_succeeds(
    assets: Path, tmp_path: Path
) -> None:
    owner, silo_side = tmp_path / "owner", tmp_path / "hospital"
    owner.mkdir()
    job = {
        "apiVersion": "fedjob.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "fed"},
        "spec": {
            "model": {"path": str(assets / "model")},
            "training": {"mode": "lora", "localSteps": 4, "batchSize": 4, "sequenceLength": 32},
            "silos": [
                {"name": "lab", "data": {"path": str(assets / "data/code")}},
                {"name": "hospital", "external": True},
            ],
            "rounds": 2,
            "aggregation": {"minSilos": 2, "roundDeadlineSeconds": 300},
        },
    }
    (owner / "job.yaml").write_text(yaml.safe_dump(job))
    out = owner / "out"
    run = subprocess.Popen(
        [sys.executable, "-m", "fedjob_cli.main", "run", str(owner / "job.yaml"), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_file(out / "aggregator.json", run)
        wait_for_file(out / "enrollment" / "hospital.token", run)
        endpoint = json.loads((out / "aggregator.json").read_text())
        from fedjob.tls import ca_hash

        # What the owner hands over out of band: the endpoint, the CA's hash and the token.
        silo = {
            "apiVersion": "fedjob.io/v1alpha1",
            "kind": "FederatedSilo",
            "metadata": {"name": "hospital"},
            "spec": {
                "aggregator": {
                    "address": f"127.0.0.1:{endpoint['port']}",
                    "enrollmentAddress": f"127.0.0.1:{endpoint['enrollment_port']}",
                },
                "job": "fed",
                "silo": "hospital",
                "caHash": ca_hash((out / "certs" / "ca.crt").read_bytes()),
                "model": {"path": str(assets / "model")},
                "data": {"path": str(assets / "data/docs")},
            },
        }
        silo_side.mkdir()
        (silo_side / "silo.yaml").write_text(yaml.safe_dump(silo))
        token_file = silo_side / "token"
        token_file.write_text((out / "enrollment" / "hospital.token").read_text())
        joined = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedjob_cli.main",
                "silo",
                "join",
                str(silo_side / "silo.yaml"),
                "--token-file",
                str(token_file),
                "--workdir",
                str(silo_side / "work"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        owner_output, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    worker_log = (silo_side / "work" / "logs" / "worker.log").read_text()[-3000:]
    assert run.returncode == 0, owner_output + logs(out)
    assert joined.returncode == 0, joined.stdout + joined.stderr + worker_log
    assert "enrolled silo hospital in job fed" in joined.stdout

    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r["participants"]) for r in rounds if "participants" in r] == [["hospital", "lab"]] * 2
    # The key was made on the silo's side, private to it, and exists nowhere on the owner's.
    key_path = silo_side / "work" / "certs" / "silo-hospital.key"
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    key = key_path.read_bytes()
    for path in owner.rglob("*"):
        if path.is_file():
            assert key not in path.read_bytes(), path
    assert not list(out.rglob("*hospital.key"))
    # The silo trained the job the aggregator gave it, on its own data.
    ran = yaml.safe_load((silo_side / "work" / "job.yaml").read_text())
    own = next(s for s in ran["spec"]["silos"] if s["name"] == "hospital")
    assert own["data"]["path"] == str(assets / "data/docs") and own["external"] is False
    lab = next(s for s in ran["spec"]["silos"] if s["name"] == "lab")
    assert lab["external"] is True and "data" not in lab  # the other silo's data is not its business
