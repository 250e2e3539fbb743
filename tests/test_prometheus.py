"""Alerts and dashboard queries against a real Prometheus: promtool, then a live scrape of `fedjob run`."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.conftest import REPO
from tests.test_helm_chart import CHART, helm

COMPARISON = re.compile(r"\s*(>|<|==|!=|>=|<=)\s*[0-9.]+\s*$")


def rendered_rules(tools: Path) -> dict[str, Any]:
    out = helm(tools, "template", "fedjob", str(CHART), "--set", "prometheusRule.enabled=true")
    rule = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "PrometheusRule")
    spec: dict[str, Any] = rule["spec"]
    return spec


def dashboard_queries() -> list[str]:
    dash = json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return [e.replace("$federatedjob", ".*").replace("$namespace", ".*") for e in exprs]


def test_promtool_checks_and_unit_tests_the_alerts(tools: Path, tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered_rules(tools)))
    check = subprocess.run(
        [str(tools / "promtool"), "check", "rules", str(tmp_path / "rules.yaml")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "7 rules found" in check.stdout
    shutil.copy(REPO / "tests" / "prometheus" / "alerts_test.yaml", tmp_path)
    unit = subprocess.run(
        [str(tools / "promtool"), "test", "rules", "alerts_test.yaml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, prom: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Prometheus answers 503 until its TSDB has opened: wait for /-/ready, not for the port."""
    end = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:  # refused, reset, HTTP 503 (URLError) or a read timeout while it starts
            pass
        assert prom.poll() is None, "prometheus exited during start-up"
        assert time.time() < end, f"prometheus was not ready within {timeout} s"
        time.sleep(0.2)


def describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {p.status()} {' '.join(p.cmdline())}"
    except psutil.Error as e:
        return f"{p.pid} {e!r}"


def component_logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((out / "logs").glob("*.log")))


def api(port: int, path: str, **params: Any) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


@pytest.mark.slow
def test_every_dashboard_and_alert_query_returns_data_from_a_real_scrape(
    tools: Path, tmp_path: Path, assets: Path
) -> None:
    job = {
        "apiVersion": "fedjob.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "scraped"},
        "spec": {
            "model": {"path": str(assets / "model")},
            "training": {
                "mode": "lora",
                "localSteps": 30,
                "batchSize": 4,
                "sequenceLength": 32,
                "deepspeed": {"zeroStage": 1},
            },
            "silos": [
                {"name": "code", "data": {"path": str(assets / "data/code")}},
                {"name": "docs", "data": {"path": str(assets / "data/docs")}},
            ],
            "eval": {"path": str(assets / "data/eval"), "batches": 1},
            "evaluation": {"batches": 1},  # federated: the silos' held-out losses
            # Far more rounds than the queries need: on a fast machine 30 rounds took 16 s, less than
            # Prometheus took to open its TSDB. The test stops the job once the queries have run.
            "rounds": 1000,
            "aggregation": {"minSilos": 2},
            # A compressed downlink, for the downlink panel's series.
            "compression": {"downlink": [{"quantize": {"bits": 8}}, {"zstd": {}}]},
            # Differential privacy with a target, for the privacy panel and alert (a tiny clip
            # norm: the noise must not wreck the model while the queries run).
            "privacy": {"dp": {"clipNorm": 1e-4, "noiseMultiplier": 50, "targetEpsilon": 20, "delta": 1e-5}},
        },
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    out = tmp_path / "out"
    with open(tmp_path / "run.log", "wb") as log:
        run = subprocess.Popen(
            [sys.executable, "-m", "fedjob_cli.main", "run", str(tmp_path / "job.yaml"), "--out", str(out)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom = None
    try:
        end = time.time() + 120
        while not (out / "aggregator.json").exists():
            assert time.time() < end and run.poll() is None, "the aggregator did not start"
            time.sleep(0.2)
        metrics_port = json.loads((out / "aggregator.json").read_text())["metrics_port"]
        prom_port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "fedjob-aggregator",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                        }
                    ],
                }
            )
        )
        prom = subprocess.Popen(
            [
                str(tools / "prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Query while the job runs (two rounds closed, four scrapes: enough for rate()):
        # after it exits, its series go stale.
        queries = dashboard_queries() + [
            COMPARISON.sub("", r["expr"]) for g in rendered_rules(tools)["groups"] for r in g["rules"]
        ]
        wait_ready(prom_port, prom)
        end = time.time() + 240
        # rate() needs two samples of a series; the round histogram exists only from the first
        # close, so on a loaded machine "two rounds" alone can come before its second scrape.
        ready = (
            "fedjob_round >= 2 and count_over_time(fedjob_round[1m]) >= 4 "
            "and on(federatedjob) count_over_time(fedjob_round_duration_seconds_count[1m]) >= 2"
        )
        while not api(prom_port, "query", query=ready)["result"]:
            assert time.time() < end and run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.3)
        when = time.time()
        scraped = api(prom_port, "query", query="count({__name__=~'fedjob_.+'})", time=when)["result"]
        empty = [q for q in queries if not api(prom_port, "query", query=q, time=when)["result"]]
        print(f"{len(queries)} queries, {scraped[0]['value'][1]} fedjob series scraped")
        assert not empty, f"queries that returned no data: {empty}"
        # SIGTERM stops `fedjob run` and every process it started: nothing is left behind.
        children = psutil.Process(run.pid).children(recursive=True)
        assert len(children) >= 3, children
        sent = time.time()
        run.send_signal(signal.SIGTERM)
        try:
            rc = run.wait(60)
        except subprocess.TimeoutExpired:
            rc = None
        _, alive = psutil.wait_procs(children, timeout=30)
        # The whole log: on a fast machine the round table printed after the message is longer than any tail.
        log = (tmp_path / "run.log").read_text()
        after_sigterm = (
            f"exit status {rc} after {time.time() - sent:.1f} s; "
            f"still running: {[describe(p) for p in alive]}\n"
            f"{log[-3000:]}\n{component_logs(out)}"
        )
        assert rc == 1 and not alive and "interrupted; stopping" in log, after_sigterm
    finally:
        for p in (run, prom):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(20)
