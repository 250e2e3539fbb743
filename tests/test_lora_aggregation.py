"""LoRA aggregation: averaging A and B separately is not averaging B*A; FFA-LoRA (freeze A) is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedjob.modeling import build_model, get_state
from fedjob.spec import parse_job
from tests.conftest import job_doc


def lora_job(model: Path, freeze_a: bool):  # type: ignore[no-untyped-def]
    return parse_job(
        job_doc(
            model={"path": str(model)},
            training={"mode": "lora", "lora": {"r": 4, "targetModules": ["c_attn"], "freezeA": freeze_a}},
        )
    )


def test_freeze_a_sends_only_b(assets: Path) -> None:
    full = get_state(build_model(lora_job(assets / "model", False)))
    ffa = get_state(build_model(lora_job(assets / "model", True)))
    assert any("lora_A" in n for n in full) and any("lora_B" in n for n in full)
    assert ffa and all("lora_B" in n for n in ffa)
    assert sum(v.size for v in ffa.values()) < sum(v.size for v in full.values())


def test_averaging_factors_is_inexact_and_freezing_a_makes_it_exact() -> None:
    rng = np.random.default_rng(0)
    a = [rng.normal(size=(4, 32)) for _ in range(3)]
    b = [rng.normal(size=(32, 4)) for _ in range(3)]
    exact = np.mean([bi @ ai for ai, bi in zip(a, b, strict=True)], axis=0)
    separately = np.mean(b, axis=0) @ np.mean(a, axis=0)
    assert np.abs(separately - exact).max() > 0.1  # plain FedAvg of the factors drifts
    shared_a = a[0]
    exact_ffa = np.mean([bi @ shared_a for bi in b], axis=0)
    np.testing.assert_allclose(np.mean(b, axis=0) @ shared_a, exact_ffa, atol=1e-12)
