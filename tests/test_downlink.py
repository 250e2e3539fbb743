"""The compressed downlink: silos hold the global copy bit for bit and receive only its changes.

First the two halves on their own (the aggregator's encoder, the silo's copy); then the
real aggregator behind mTLS with the real worker client for ten rounds, across an
aggregator restart, checking after every round that the silo's copy and the
aggregator's broadcast copy are identical to the last bit.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fedjob_worker.client import AggregatorClient

from fedjob.chunking import ChunkRejected, State, manifest_of
from fedjob.codec import Codec
from fedjob.downlink import DownlinkEncoder, GlobalCopy, full_chunks, initial_id
from fedjob.spec import SpecError, parse_job
from tests.conftest import LiveAggregator, job_doc, serve_live

CHAIN = [{"topk": {"fraction": 0.1}}, {"quantize": {"bits": 4}}, {"zstd": {}}]


def model(seed: int) -> State:
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(50, 40)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32)}


def identical(x: State, y: State) -> bool:
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize(
    ("codec_name", "block"),
    [("sparse+q4.128+zstd", None), ("sparse+q2.512n+zstd", 16)],  # 16: top-k per block, nearest 2-bit
)
def test_every_copy_stays_bit_identical_and_the_dropped_rest_follows_later(
    codec_name: str, block: int | None
) -> None:
    rng = np.random.default_rng(1)
    g = model(0)
    b = {k: v.copy() for k, v in g.items()}
    bid = initial_id(b)
    codec = Codec.from_name(codec_name)
    encoder = DownlinkEncoder(codec, 0.1, 4096, block)
    early = GlobalCopy(manifest_of(g), codec, 4096)
    early.receive(full_chunks(b, bid, 4096))
    behind = GlobalCopy(manifest_of(g), codec, 4096)
    behind.receive(full_chunks(b, bid, 4096))
    missed = []
    raw = 4 * sum(v.size for v in g.values())
    for r in range(1, 11):
        g = {k: v + np.float32(0.01) * rng.normal(size=v.shape).astype(np.float32) for k, v in g.items()}
        change = encoder.advance(b, bid, g, r)
        assert change.base == bid and change.result != bid
        bid = change.result
        assert change.payload_bytes * 10 < raw  # a tenth of the values at 4 or 2 bits, then zstd
        early.receive(iter(change.chunks))
        assert early.id == bid and identical(early.state or {}, b)
        missed.append(change)
        if r % 3 == 0:  # a silo three rounds behind applies the three changes in one stream
            behind.receive(c for ch in missed for c in ch.chunks)
            missed.clear()
            assert behind.id == bid and identical(behind.state or {}, b)
    # What top-k left out is not lost: the debt G - B stays at a few rounds' worth of change.
    debt = np.sqrt(sum(float(((g[k] - b[k]) ** 2).sum()) for k in g))
    moved = np.sqrt(sum(float(((g[k] - model(0)[k]) ** 2).sum()) for k in g))
    assert debt < 0.5 * moved
    late = GlobalCopy(manifest_of(g), codec, 4096)
    late.receive(full_chunks(b, bid, 4096))  # a new silo starts from the whole copy
    assert late.id == bid and identical(late.state or {}, b)


def test_a_change_to_a_copy_the_silo_does_not_hold_is_refused_and_the_copy_dropped() -> None:
    g = model(0)
    codec = Codec.from_name("sparse+q4.128")
    b = {k: v.copy() for k, v in g.items()}
    change = DownlinkEncoder(codec, 0.1, 4096).advance(b, initial_id(b), model(1), 1)
    copy = GlobalCopy(manifest_of(g), codec, 4096)
    copy.receive(full_chunks(model(2), "r0-other", 4096))
    with pytest.raises(ChunkRejected, match="unknown_base"):
        copy.receive(iter(change.chunks))
    assert copy.state is None and copy.id == ""  # the next download asks for the whole copy


def test_impossible_downlinks_are_refused() -> None:
    for downlink, message in [
        ([{"clip": {"maxNorm": 1}}], "compression.downlink[0]: clip bounds a silo's update"),
        ([{"quantize": {}}, {"topk": {"fraction": 0.1}}], "compression.downlink[1]: topk selects"),
    ]:
        with pytest.raises(SpecError) as info:
            parse_job(job_doc(compression={"downlink": downlink}))
        assert message in str(info.value)
    with pytest.raises(SpecError) as info:
        parse_job(job_doc(compression={"downlink": CHAIN}, aggregation={"algorithm": "scaffold"}))
    assert "scaffold sends each silo its own control variates" in str(info.value)


def run_round(agg: LiveAggregator, client: AggregatorClient, copy: GlobalCopy, after: int) -> int:
    task = client.next_task(after)
    client.download_copy(task.round, copy)
    broadcast = agg.coord.broadcast
    assert broadcast is not None and copy.state is not None
    # Bit-identical: the silo's copy is the aggregator's broadcast copy, to the last bit.
    assert copy.id == broadcast.id and identical(copy.state, broadcast.state)
    rng = np.random.default_rng(task.round)
    delta = {k: (0.05 * rng.normal(size=v.shape)).astype(np.float32) for k, v in copy.state.items()}
    client.upload(
        task.round,
        delta,
        agg.coord.codec,
        4096,
        seed=task.round,
        num_samples=10,
        local_steps=5,
        train_loss=1.0,
    )
    deadline = time.monotonic() + 10
    while agg.coord.completed < task.round:
        assert time.monotonic() < deadline, f"round {task.round} did not close"
        time.sleep(0.02)
    return int(task.round)


def test_silo_and_aggregator_hold_the_same_copy_for_ten_rounds_and_across_a_restart(
    tmp_path: Path, small_state: State
) -> None:
    job = parse_job(
        job_doc(
            silos=[{"name": "alpha", "data": {"path": "/d"}}],
            rounds=20,
            aggregation={"minSilos": 1, "roundDeadlineSeconds": 60},
            compression={"chunkBytes": 4096, "downlink": CHAIN},
        )
    )
    copy: GlobalCopy | None = None
    done = 0
    received: list[str] = []
    for stop_after in (7, 10):  # the aggregator stops after round 7 and starts again on its workdir
        with serve_live(tmp_path, job, small_state) as agg:
            assert agg.coord.broadcast is not None
            if copy is None:
                copy = GlobalCopy(agg.coord.manifest, agg.coord.broadcast.encoder.codec, 4096)
            client = AggregatorClient(agg.address, agg.certs, "alpha", 4096)
            client.join()
            while done < stop_after:
                done = run_round(agg, client, copy, done)
                received.append(copy.last)
            client.close()
            history = agg.coord.history
    # The whole copy once, at the start; changes from then on, also across the restart.
    assert received == ["whole"] + ["changes"] * 9
    raw = 4 * sum(v.size for v in small_state.values())
    down = [r["bytes_down"] for r in history]
    assert down[0] == raw and max(down[1:]) * 8 < raw, down
    assert all(r["downlink_debt"] >= 0 and r["downlink_change_bytes"] > 0 for r in history)
