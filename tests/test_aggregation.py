"""FedAvg folded slice by slice into a float32 running sum equals the textbook formula."""

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
    before = {k: v.copy() for k, v in global_state.items()}
    got = strategy.apply(global_state, total, 1)
    want = reference_fedavg(global_state, deltas, samples)
    for k in global_state:
        # float32 accumulation: a few ulps of values of order 1.
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=2e-6)
        # Silos may still be downloading the old model: apply() leaves it alone.
        np.testing.assert_array_equal(global_state[k], before[k])


def test_the_sum_reuses_the_previous_models_buffers_and_starts_from_zero() -> None:
    old = {"w": np.full((3, 4), 7.0, np.float32)}
    total = RunningSum(manifest_of(old), buffers=old)
    total.fold("w", 0, np.ones(12, np.float32), 2.0)
    total.commit(UpdateMeta("s", 2, 1, 0.0), 2.0)
    mean = total.take_mean()
    np.testing.assert_array_equal(mean["w"], np.ones((3, 4)))
    assert np.shares_memory(mean["w"], old["w"])  # no new copy of the model


def test_equal_sample_counts_give_the_plain_mean() -> None:
    g = {"w": np.zeros(4, np.float32)}
    total = RunningSum(manifest_of(g))
    for v in (1.0, 2.0, 6.0):
        total.fold("w", 0, np.full(4, v, np.float32), 10.0)
        total.commit(UpdateMeta("s", 10, 1, 0.0), 10.0)
    np.testing.assert_allclose(FedAvg().apply(g, total, 1)["w"], np.full(4, 3.0))
