"""Faults: the aggregator killed at random moments, a silo killed mid-round, a quorum that cannot hold,
torn checkpoint writes, concurrent streams, and a fuzzed upload stream that must never crash the service."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedjob.aggregation import FedAvg
from fedjob.checkpoint import Checkpoint, CheckpointStore
from fedjob.chunking import iter_chunks
from fedjob.spec import parse_job
from fedjob.v1 import fedjob_pb2 as pb
from tests.conftest import LiveAggregator, job_doc
from tests.test_aggregator_protocol import CHUNK, CODEC, header, messages, ones_like


def write_job(
    tmp_path: Path, assets: Path, silos: list[str], processes: dict[str, int] | None = None, **spec: Any
) -> Path:
    procs = processes or {}
    doc = {
        "apiVersion": "fedjob.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "faults"},
        "spec": {
            "model": {"path": str(assets / "model")},
            "training": {
                "mode": "lora",
                "localSteps": 6,
                "batchSize": 4,
                "sequenceLength": 32,
                "lora": {"r": 4},
                "deepspeed": {"zeroStage": 1},
            },
            "silos": [
                {"name": s, "data": {"path": str(assets / "data" / s)}, "processes": procs.get(s, 1)}
                for s in silos
            ],
            **spec,
        },
    }
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


def start_run(job: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    log = open(out.parent / "run.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "fedjob_cli.main", "run", str(job), "--out", str(out), *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def rounds_in(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_the_aggregator_killed_ten_times_at_random_moments_still_finishes_every_round(
    assets: Path, tmp_path: Path
) -> None:
    job = write_job(
        tmp_path,
        assets,
        ["code", "docs"],
        rounds=30,
        aggregation={"minSilos": 2, "roundDeadlineSeconds": 120},
    )
    out = tmp_path / "out"
    run = start_run(job, out, "--max-restarts", "15")
    kills: list[dict[str, Any]] = []
    resume_seconds: list[float] = []
    rng = random.Random(7)
    try:
        while len(kills) < 10 and run.poll() is None:
            info_path = out / "aggregator.json"
            info = json.loads(info_path.read_text()) if info_path.exists() else None
            if info is None or (kills and info["pid"] == kills[-1]["pid"]):
                time.sleep(0.05)  # not (re)started yet
                continue
            if kills:
                resume_seconds.append(info["started"] - kills[-1]["killed"])
            # Each wait ends early when a round closes, so a fast machine (0.2 s rounds) cannot finish
            # the job between kills: every kill lands at most one round after the one it waits for.
            done = len(rounds_in(out))
            if len(kills) % 2 == 0:
                # Mid-job: once a round has closed since the last kill, kill it at a random
                # point of the next round (mid-download, mid-training, mid-upload, mid-checkpoint).
                before = kills[-1]["rounds_done"] if kills else 0
                while len(rounds_in(out)) <= before and run.poll() is None:
                    time.sleep(0.02)
                done = len(rounds_in(out))
                wait_for_a_round_or(out, done, rng.uniform(0.0, 0.6))
            else:
                # During start-up and the silos' reconnection.
                wait_for_a_round_or(out, done, rng.uniform(0.0, 2.5))
            try:
                os.kill(info["pid"], signal.SIGKILL)
            except ProcessLookupError:
                continue
            kills.append({"pid": info["pid"], "killed": time.time(), "rounds_done": len(rounds_in(out))})
        assert run.wait(600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    assert len(kills) >= 10, f"the job finished after only {len(kills)} kills"
    history = rounds_in(out)
    assert [r["round"] for r in history] == list(range(1, 31))  # none lost, none counted twice
    assert all(r["num_participants"] == 2 for r in history)
    assert (out / "adapter" / "adapter_config.json").exists()
    log = (out / "logs" / "aggregator.log").read_text()
    assert log.count("aggregator for job faults on") == len(kills) + 1
    print(
        f"{len(kills)} kills at rounds {[k['rounds_done'] for k in kills]}; aggregator back up "
        f"{min(resume_seconds):.1f}-{max(resume_seconds):.1f} s after each kill"
    )


@pytest.mark.slow
def test_a_silo_that_stalls_past_the_deadline_is_left_out_and_rejoins(assets: Path, tmp_path: Path) -> None:
    silos = ["code", "docs", "unicode", "code2"]
    (assets / "data" / "code2").mkdir(exist_ok=True)
    (assets / "data" / "code2" / "more.txt").write_text(
        (assets / "data" / "code" / "code.txt").read_text()[::-1]
    )
    job = write_job(
        # Rounds to spare: on a fast machine a round takes 0.2 s, and the stall must land mid-job.
        tmp_path,
        assets,
        silos,
        rounds=6,
        aggregation={"minSilos": 3, "roundDeadlineSeconds": 20},
    )
    out = tmp_path / "out"
    run = start_run(job, out)
    try:
        deadline = time.time() + 300
        victim = None
        while victim is None and time.time() < deadline:
            if len(rounds_in(out)) >= 1:
                victim = find_silo_process(run, "unicode")
            time.sleep(0.05)
        assert victim is not None
        victim.suspend()  # SIGSTOP: the silo hangs mid-round
        time.sleep(24)
        victim.resume()
        assert run.wait(600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    history = rounds_in(out)
    assert [r["round"] for r in history] == [1, 2, 3, 4, 5, 6]
    missed = [r for r in history if r["missing"] == ["unicode"]]
    assert missed and missed[0]["num_participants"] == 3, history
    assert "unicode" in history[-1]["participants"], "the silo rejoins after the stall"


def wait_for_a_round_or(out: Path, done: int, seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end and len(rounds_in(out)) <= done:
        time.sleep(0.02)


def wait_for_rounds(run: subprocess.Popen[bytes], out: Path, n: int, log: Path) -> None:
    end = time.time() + 300
    while len(rounds_in(out)) < n:
        assert time.time() < end and run.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)


def find_silo_process(run: subprocess.Popen[bytes], silo: str) -> psutil.Process | None:
    for child in psutil.Process(run.pid).children(recursive=True):
        cmd = child.cmdline()
        if "--silo" in cmd and cmd[cmd.index("--silo") + 1] == silo:
            return child
    return None


def code2(assets: Path) -> None:
    (assets / "data" / "code2").mkdir(exist_ok=True)
    (assets / "data" / "code2" / "more.txt").write_text(
        (assets / "data" / "code" / "code.txt").read_text()[::-1]
    )


@pytest.mark.slow
def test_a_silo_killed_mid_round_is_left_out_and_rejoins_a_later_round(assets: Path, tmp_path: Path) -> None:
    code2(assets)
    job = write_job(
        tmp_path,
        assets,
        ["code", "docs", "unicode", "code2"],
        # Enough rounds after the kill for the 10 s restart back-off and two rounds left out.
        rounds=7,
        aggregation={"minSilos": 3, "roundDeadlineSeconds": 8},
        # A stateful uplink: top-k's error-feedback residual must survive the kill; a compressed
        # downlink: the restarted silo lost its global copy and must get the whole one again.
        compression={
            "uplink": [{"clip": {"maxNorm": 5}}, {"topk": {"fraction": 0.2}}],
            "downlink": [{"topk": {"fraction": 0.25}}, {"quantize": {"bits": 8}}, {"zstd": {}}],
        },
    )
    out = tmp_path / "out"
    state_index = out / "silos" / "unicode" / "uplink-state.json"
    run = start_run(job, out)
    try:
        wait_for_rounds(run, out, 1, tmp_path / "run.log")
        # Kill it once it holds a global copy made of changes, so that the restart must fetch the
        # whole model again rather than merely never having had a copy to update.
        silo_log_path = out / "logs" / "silo-unicode.log"
        end = time.time() + 120
        while "(changes)" not in (silo_log_path.read_text() if silo_log_path.exists() else ""):
            assert time.time() < end and run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.05)
        victim = find_silo_process(run, "unicode")
        assert victim is not None
        killed_after = len(rounds_in(out))
        victim.send_signal(signal.SIGKILL)  # restarted by `fedjob run` after a 10 s back-off, like a Job
        victim.wait(10)
        committed = json.loads(state_index.read_text())["round"] if state_index.exists() else 0
        assert run.wait(600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    history = rounds_in(out)
    assert [r["round"] for r in history] == list(range(1, 8))
    left_out = [r for r in history if r["round"] > killed_after and "unicode" in r["missing"]]
    assert left_out and left_out[0]["num_participants"] == 3, history
    assert "unicode" in history[-1]["participants"], history
    assert "silo unicode exited with -9; restarting it" in (tmp_path / "run.log").read_text()
    # The restarted silo took up its residual as committed before the kill, and kept committing.
    assert committed >= 1
    silo_log = (out / "logs" / "silo-unicode.log").read_text()
    assert f"(state restored from round {committed})" in silo_log, silo_log[-3000:]
    assert json.loads(state_index.read_text())["round"] == 7
    copies = re.findall(r"global copy r\d+-\w+ \((\w+)\)", silo_log)
    assert copies.count("whole") == 2 and copies[1] == "changes", copies  # at the start, after the kill


@pytest.mark.slow
def test_a_silo_revoked_while_the_job_runs_is_stopped_and_no_longer_awaited(
    assets: Path, tmp_path: Path
) -> None:
    # A long deadline: were the revoked silo still awaited, every later round would wait it out
    # and list it as missing.
    job = write_job(
        tmp_path,
        assets,
        ["code", "docs", "unicode"],
        rounds=40,  # rounds of this tiny job take a fraction of a second: enough of them remain
        aggregation={"minSilos": 2, "roundDeadlineSeconds": 600},
    )
    out = tmp_path / "out"
    aggregator_log = out / "logs" / "aggregator.log"
    run = start_run(job, out)
    try:
        wait_for_rounds(run, out, 1, tmp_path / "run.log")
        doc = yaml.safe_load(job.read_text())
        doc["spec"]["revokedSilos"] = ["unicode"]  # as `kubectl patch` would in a cluster
        job.write_text(yaml.safe_dump(doc))
        end = time.time() + 60
        while "silo unicode is revoked: its calls are refused" not in aggregator_log.read_text():
            assert time.time() < end and run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.05)
        revoked_after = len(rounds_in(out))  # closed when the aggregator learnt of it
        assert run.wait(600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    log = (tmp_path / "run.log").read_text()
    assert "silo unicode is revoked (spec.revokedSilos)" in log, log[-3000:]
    assert "restarting it" not in log  # stopped for good, not retried like a crash
    history = rounds_in(out)
    assert [r["round"] for r in history] == list(range(1, 41))
    # The round open when the aggregator learnt of it may still hold its update; every later
    # one closes with the other two, not waiting for it and not counting it as missing.
    later = [r for r in history if r["round"] > revoked_after + 1]
    assert later, history
    for r in later:
        assert r["participants"] == ["code", "docs"] and r["missing"] == [], r


@pytest.mark.slow
def test_a_rank_that_dies_takes_its_silo_down_and_the_silo_is_retried(assets: Path, tmp_path: Path) -> None:
    # The ranks meet in collectives: the survivor must not be left waiting for a dead peer.
    job = write_job(
        tmp_path,
        assets,
        ["code", "docs"],
        processes={"code": 2},
        rounds=6,
        aggregation={"minSilos": 1, "roundDeadlineSeconds": 8},
    )
    out = tmp_path / "out"
    run = start_run(job, out)
    try:
        wait_for_rounds(run, out, 1, tmp_path / "run.log")
        silo = find_silo_process(run, "code")
        assert silo is not None
        ranks = [c for c in silo.children() if "--multiprocessing-fork" in c.cmdline()]
        assert len(ranks) == 2, [r.cmdline() for r in ranks]
        ranks[1].send_signal(signal.SIGKILL)
        _, alive = psutil.wait_procs([silo, ranks[0]], timeout=30)
        assert not alive, "the silo and its surviving rank must exit when a rank dies"
        assert run.wait(600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    assert "exited with -9; stopping the silo's other ranks" in (out / "logs" / "silo-code.log").read_text()
    assert "silo code exited with" in (tmp_path / "run.log").read_text()
    history = rounds_in(out)
    assert [r["round"] for r in history] == list(range(1, 7))
    assert "code" in history[-1]["participants"], history


@pytest.mark.slow
def test_stopping_fedjob_run_stops_every_process_and_running_it_again_resumes(
    assets: Path, tmp_path: Path
) -> None:
    # Rounds to spare: a few more can close (0.2 s each on a fast machine) while the silos stop.
    job = write_job(tmp_path, assets, ["code", "docs"], processes={"code": 2}, rounds=12)
    out = tmp_path / "out"
    run = start_run(job, out)
    try:
        wait_for_rounds(run, out, 1, tmp_path / "run.log")
        started = psutil.Process(run.pid).children(recursive=True)
        assert len(started) >= 5, [p.cmdline() for p in started]  # aggregator, 2 silos, 2 ranks
        run.send_signal(signal.SIGTERM)
        assert run.wait(60) == 1, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    assert "interrupted; stopping" in (tmp_path / "run.log").read_text()
    done_before = len(rounds_in(out))
    assert 1 <= done_before < 12

    again = start_run(job, out)
    assert again.wait(600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert [r["round"] for r in rounds_in(out)] == list(range(1, 13))
    log = (out / "logs" / "aggregator.log").read_text()
    assert f"resuming after round {done_before}" in log, log[-2000:]


@pytest.mark.slow
def test_fedjob_run_killed_outright_leaves_no_orphans(assets: Path, tmp_path: Path) -> None:
    # SIGKILL cannot be caught: each component notices its parent is gone and stops itself.
    # Rounds enough that orphans would still be training long after the check (a round can take 0.2 s).
    job = write_job(tmp_path, assets, ["code", "docs"], processes={"code": 2}, rounds=1000)
    out = tmp_path / "out"
    run = start_run(job, out)
    started: list[psutil.Process] = []
    alive: list[psutil.Process] = []
    try:
        wait_for_rounds(run, out, 1, tmp_path / "run.log")
        started = psutil.Process(run.pid).children(recursive=True)
        assert len(started) >= 5, [p.cmdline() for p in started]  # aggregator, 2 silos, 2 ranks
        run.kill()
        run.wait(10)
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, f"orphans: {[p.cmdline() for p in alive]}"
    finally:
        for p in [run, *alive]:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                p.kill()
    # The aggregator noticed by itself; a silo may notice, or find its aggregator gone first.
    log = (out / "logs" / "aggregator.log").read_text()
    assert f"fedjob run (pid {run.pid}) is gone; stopping" in log, log[-2000:]
    assert len(rounds_in(out)) < 1000


def test_a_stuck_upload_cannot_hold_the_round_past_its_deadline(tmp_path: Path, small_state) -> None:  # type: ignore[no-untyped-def]
    from fedjob_aggregator.coordinator import Coordinator

    job = parse_job(job_doc(aggregation={"minSilos": 1, "roundDeadlineSeconds": 1}))
    coord = Coordinator(job, FedAvg(), small_state, tmp_path)
    for silo in ("alpha", "beta"):
        coord.join(silo)
    stop = threading.Event()
    loop = threading.Thread(target=coord.run, args=(stop,), daemon=True)
    loop.start()
    while coord.current is None:
        time.sleep(0.01)
    chunks = list(iter_chunks(ones_like(small_state, 1.0), CODEC, CHUNK, np.random.default_rng(0)))

    def start(silo: str) -> Any:
        return coord.uploads.begin(
            silo,
            pb.UpdateHeader(
                round=1,
                upload_id=silo,
                num_samples=10,
                local_steps=5,
                train_loss=2.0,
                total_chunks=len(chunks),
            ),
        )

    stuck = start("alpha")
    coord.uploads.add_chunk(stuck, chunks[0])  # ... and never another byte
    honest = start("beta")
    for c in chunks:
        coord.uploads.add_chunk(honest, c)
    coord.uploads.finish(honest, pb.UpdateTrailer(total_chunks=len(chunks)))
    started = time.time()
    while coord.completed < 1:
        assert time.time() - started < 5, "the round must close at its deadline"
        time.sleep(0.02)
    assert coord.history[0]["participants"] == ["beta"] and coord.history[0]["missing"] == ["alpha"]
    for k, v in small_state.items():  # the stuck upload's chunk was taken back out
        np.testing.assert_allclose(coord.global_state[k], v + 1.0, atol=1e-5)
    stop.set()


def test_the_job_fails_with_a_message_when_the_quorum_cannot_be_reached(tmp_path: Path, small_state) -> None:  # type: ignore[no-untyped-def]
    from fedjob_aggregator.coordinator import Coordinator

    job = parse_job(job_doc(aggregation={"minSilos": 2, "roundDeadlineSeconds": 0.5}))
    coord = Coordinator(job, FedAvg(), small_state, tmp_path)
    assert coord.run() == "Failed"
    assert "quorum not reached, 0 of 2 required silos reported before the deadline" in coord.message
    assert "missing: alpha, beta" in coord.message


def test_a_torn_checkpoint_write_leaves_the_previous_round(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(Checkpoint(1, {"w": np.ones(3, np.float32)}, [{"round": 1}]))
    # A crash after the new weights were written but before the index was replaced,
    # and another in the middle of writing the index's temporary file.
    (tmp_path / "global-000002.npz").write_bytes(b"half a file")
    (tmp_path / ".checkpoint.json.tmp-999").write_text('{"round": 2, "fi')
    loaded = CheckpointStore(tmp_path).load()
    assert loaded is not None and loaded.round == 1 and loaded.history == [{"round": 1}]
    np.testing.assert_array_equal(loaded.state["w"], np.ones(3))


def test_only_one_upload_stream_per_silo_at_a_time(live_aggregator: LiveAggregator, small_state) -> None:  # type: ignore[no-untyped-def]
    agg = live_aggregator
    stub = agg.stub("silo-alpha")
    gate = threading.Event()
    chunks = list(iter_chunks(ones_like(small_state), CODEC, CHUNK, np.random.default_rng(0)))

    def slow() -> Any:
        yield pb.UploadMessage(header=header(agg))
        yield pb.UploadMessage(chunk=chunks[0])
        gate.wait(10)

    first = stub.UploadUpdate.future(slow())
    time.sleep(0.5)
    with pytest.raises(grpc.RpcError) as info:
        stub.UploadUpdate(messages(agg, ones_like(small_state)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Refused by admission, before the second stream could hold a handler thread.
    assert info.value.details().startswith("too_many_calls")
    gate.set()
    first.cancel()


FUZZ_CASES = {"n": 0}
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED,
}

chunk_strategy = st.builds(
    pb.Chunk,
    seq=st.integers(0, 8),
    tensor=st.builds(
        pb.TensorSpec,
        name=st.sampled_from(["layer.lora_A", "layer.lora_B", "bias", "x", ""]),
        shape=st.lists(st.integers(0, 400), max_size=3),
        dtype=st.sampled_from(["float32", "int8", ""]),
    ),
    offset=st.integers(0, 2000),
    count=st.integers(0, 3000),
    codec=st.sampled_from(["int8+zstd", "raw", "int8", "fp16+zstd", "bogus"]),
    payload=st.binary(max_size=6000),
    crc32=st.integers(0, 2**32 - 1),
    params=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=2),
)
message_strategy = st.one_of(
    st.builds(
        lambda h: pb.UploadMessage(header=h),
        st.builds(
            pb.UpdateHeader,
            round=st.integers(0, 3),
            upload_id=st.text(max_size=8),
            num_samples=st.integers(0, 5),
            local_steps=st.integers(0, 3),
            train_loss=st.floats(width=32),
            total_chunks=st.integers(0, 10),
            resume_from=st.integers(0, 3),
        ),
    ),
    st.builds(lambda c: pb.UploadMessage(chunk=c), chunk_strategy),
    st.builds(lambda n: pb.UploadMessage(trailer=pb.UpdateTrailer(total_chunks=n)), st.integers(0, 10)),
    st.just(pb.UploadMessage()),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=st.lists(message_strategy, max_size=8), valid_prefix=st.booleans())
def test_fuzzed_upload_streams_get_a_status_and_never_break_the_aggregator(
    live_aggregator: LiveAggregator, small_state, stream: list[pb.UploadMessage], valid_prefix: bool
) -> None:  # type: ignore[no-untyped-def]
    agg = live_aggregator
    stub = agg.stub("silo-alpha")
    if valid_prefix:  # a well-formed start, then garbage: exercises the checks after the header
        good = list(iter_chunks(ones_like(small_state), CODEC, CHUNK, np.random.default_rng(0)))
        stream = [
            pb.UploadMessage(header=header(agg, upload_id=uuid.uuid4().hex)),
            pb.UploadMessage(chunk=good[0]),
            *stream,
        ]
    FUZZ_CASES["n"] += 1
    try:
        receipt = stub.UploadUpdate(iter(stream), timeout=10)
        assert receipt.accepted
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, (exc.code(), exc.details())
    # The service is still whole: status answers, and an honest silo still gets its update in.
    assert agg.stub("observer").GetStatus(pb.StatusRequest(), timeout=5).phase in ("Running", "Succeeded")


def test_zz_report_fuzz_cases() -> None:
    print(f"fuzzed upload streams tried: {FUZZ_CASES['n']}")
