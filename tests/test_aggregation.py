"""FedAvg built chunk by chunk equals the textbook formula; a broken upload leaves no trace."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjob.aggregation import FedAvg, RunningSum, UpdateMeta
from fedjob.chunking import ChunkValidator, iter_chunks, manifest_of
from fedjob.codec import Codec


def reference_fedavg(global_state, deltas, samples):  # type: ignore[no-untyped-def]
    """McMahan et al.: w <- w + sum_k (n_k / n) * delta_k, in float64."""
    n = sum(samples)
    return {
        k: global_state[k].astype(np.float64)
        + sum(s / n * d[k].astype(np.float64) for d, s in zip(deltas, samples, strict=True))
        for k in global_state
    }


def fold_stream(total: RunningSum, delta, weight: float, chunk_bytes: int) -> None:  # type: ignore[no-untyped-def]
    codec = Codec.from_name("raw")
    validator = ChunkValidator(manifest_of(delta), codec, chunk_bytes)
    for chunk in iter_chunks(delta, codec, chunk_bytes, np.random.default_rng(0)):
        name, offset, values = validator.check(chunk)
        total.fold(name, offset, values, weight)


@settings(max_examples=30, deadline=None)
@given(
    silos=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    chunk_bytes=st.sampled_from([4096, 8192]),
)
def test_fedavg_from_chunks_matches_the_numpy_reference(silos: int, seed: int, chunk_bytes: int) -> None:
    rng = np.random.default_rng(seed)
    global_state = {
        "a": rng.normal(size=(37, 91)).astype(np.float32),
        "b": rng.normal(size=(5,)).astype(np.float32),
    }
    deltas = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in global_state.items()}
        for _ in range(silos)
    ]
    samples = [int(x) for x in rng.integers(1, 1000, size=silos)]
    strategy = FedAvg()
    total = RunningSum(manifest_of(global_state))
    for i, (delta, n) in enumerate(zip(deltas, samples, strict=True)):
        meta = UpdateMeta(f"s{i}", n, 10, 1.0)
        w = strategy.weight(meta)
        fold_stream(total, delta, w, chunk_bytes)
        total.commit(meta, w)
    got = strategy.apply(global_state, total, 1)
    want = reference_fedavg(global_state, deltas, samples)
    for k in global_state:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)


def test_equal_sample_counts_give_the_plain_mean() -> None:
    g = {"w": np.zeros(4, np.float32)}
    total = RunningSum(manifest_of(g))
    for v in (1.0, 2.0, 6.0):
        total.fold("w", 0, np.full(4, v, np.float32), 10.0)
        total.commit(UpdateMeta("s", 10, 1, 0.0), 10.0)
    np.testing.assert_allclose(FedAvg().apply(g, total, 1)["w"], np.full(4, 3.0))


def test_unfolding_a_broken_upload_restores_the_sum_exactly_enough() -> None:
    rng = np.random.default_rng(3)
    g = {"w": np.zeros(10_000, np.float32)}
    honest = {"w": rng.normal(size=10_000).astype(np.float32)}
    broken = {"w": (rng.normal(size=10_000) * 1e3).astype(np.float32)}
    total = RunningSum(manifest_of(g))
    fold_stream(total, honest, 3.0, 4096)
    total.commit(UpdateMeta("honest", 3, 1, 0.0), 3.0)
    before = total.weighted_mean()["w"].copy()
    fold_stream(total, broken, 7.0, 4096)
    codec = Codec.from_name("raw")
    validator = ChunkValidator(manifest_of(broken), codec, 4096)
    for chunk in iter_chunks(broken, codec, 4096, np.random.default_rng(0)):
        name, offset, values = validator.check(chunk)
        total.unfold(name, offset, values, 7.0)
    after = total.weighted_mean()["w"]
    # Far below float32 resolution of the result.
    assert np.max(np.abs(after - before)) < 1e-9
