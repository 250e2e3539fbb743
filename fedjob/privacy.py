"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): both halves, together.

Each round releases the sum of the silos' updates, each clipped to L2 norm C, plus
Gaussian noise of std z x C, divided by the fixed number of silos expected in the
round (not the number that reported, which would change the sensitivity). Silos count
equally: a sample-count weight is what a silo controls, and would scale its pull.

- `noise: central` (the aggregator is trusted with the raw updates):
  `DifferentialPrivacy` clips each update as it is folded and adds all the noise to
  the sum. With adaptive clipping (Andrew et al. 2021) it also counts, privately,
  how many updates fit under C and moves C towards the target quantile; the count's
  noise spends part of the budget, so the update noise grows to keep the accounted z.
- `noise: distributed`: each silo's `DistributedNoise` stage clips its update and adds
  its share of the noise (std z C / sqrt(m) for m silos per round), so no party sees
  an un-noised update once secure aggregation hides the individual ones. The
  aggregator adds nothing; if fewer than m silos report, the sum carries less noise
  and the ledger accounts the round with z sqrt(k / m).

Noise comes from the operating system's entropy (numpy's PCG64 seeded from it), never
from the job's seed: anyone with the spec could otherwise subtract it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedjob.aggregation import RoundAggregate, Strategy, UpdateMeta, wrapped
from fedjob.chunking import State, TensorInfo
from fedjob.codec import F32
from fedjob.privacy_budget import Ledger, plan_for
from fedjob.robust import ComputedAggregate, RobustStrategy
from fedjob.spec import JobSpec
from fedjob.update_stages import Update, UpdateCheck, UpdateRejected, UplinkStage


def update_noise_multiplier(z: float, count_stddev: float | None) -> float:
    """The update's own multiplier when a noised count shares the budget (Andrew et al., Thm. 1).

    Two Gaussian releases with multipliers z_u (sensitivity C) and 2 sigma_b (the count,
    sensitivity 1/2) compose like one with z^-2 = z_u^-2 + (2 sigma_b)^-2.
    """
    if count_stddev is None:
        return z
    rest = z**-2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(f"the count's noise {count_stddev:g} leaves nothing of noise multiplier {z:g}")
    return float(rest**-0.5)


class DifferentialPrivacy(RobustStrategy):
    """The aggregator's half: equal weights, clipping (central), noise, the fixed divisor, the ledger."""

    def __init__(self, inner: Strategy, spec: JobSpec, rng: np.random.Generator | None = None) -> None:
        super().__init__(inner)
        dp = spec.privacy.dp
        if dp is None:
            raise ValueError("the job has no privacy.dp")
        plan = plan_for(spec)
        self.name = f"dp({inner.name})"
        self.collects = inner.collects
        self.central = dp.noise == "central"
        self.noise_multiplier = plan.noise_multiplier  # accounted
        self.per_round = spec.silos_per_round
        self.clip_norm = dp.clip_norm
        self.target_epsilon = dp.target_epsilon
        self.adaptive = dp.adaptive_clipping
        self.count_stddev = (
            (self.adaptive.count_stddev or self.per_round / 20) if self.adaptive is not None else None
        )
        self.update_multiplier = update_noise_multiplier(self.noise_multiplier, self.count_stddev)
        self.ledger = Ledger(plan.mechanism, dp.delta)
        self.reports: list[int] = []  # per released round: updates in it (the ledger's source)
        self.rng = rng if rng is not None else np.random.default_rng()
        self._fits = 0  # this round: updates whose norm was within the clip norm (adaptive clipping)

    @property
    def delta(self) -> float:
        return self.ledger.delta

    @property
    def epsilon(self) -> float:
        return self.ledger.epsilon

    def weight(self, meta: UpdateMeta) -> float:
        return 1.0

    def update_scale(self, norm: float) -> float:
        if not self.central:
            return 1.0  # the silo clipped before its noise; DistributedNoise's check bounds it
        if norm <= self.clip_norm:
            self._fits += 1
            return 1.0
        return self.clip_norm / norm

    def round_multiplier(self, reports: int) -> float:
        """The multiplier a round with `reports` updates is accounted with."""
        if self.central:
            return self.noise_multiplier
        return self.noise_multiplier * math.sqrt(min(reports, self.per_round) / self.per_round)

    def would_exceed(self) -> bool:
        """Another full round would take epsilon past targetEpsilon."""
        if self.target_epsilon is None:
            return False
        after = self.ledger.epsilon_after(self.round_multiplier(self.per_round))
        return after > self.target_epsilon * (1 + 1e-9)

    def apply(self, global_state: State, total: RoundAggregate, round_number: int) -> State:
        k = len(total.contributors)
        mean = total.take_mean()  # sum of clipped updates / k (weights are 1)
        factor = np.float32(k / self.per_round)
        std = self.update_multiplier * self.clip_norm / self.per_round if self.central else 0.0
        for v in mean.values():
            v *= factor
            if std:
                v += self.rng.standard_normal(v.shape, dtype=np.float32) * np.float32(std)
        self.reports.append(k)
        self.ledger.record(self.round_multiplier(k))
        if self.adaptive is not None and self.count_stddev is not None:
            # The noised share of updates that fit; C moves geometrically towards the quantile.
            share = (self._fits + self.rng.normal(0.0, self.count_stddev)) / self.per_round
            self.clip_norm *= math.exp(-self.adaptive.learning_rate * (share - self.adaptive.target_quantile))
        self._fits = 0
        return self.inner.apply(
            global_state, ComputedAggregate(mean, list(total.contributors), k), round_number
        )

    def state(self) -> dict[str, F32]:
        return {
            **self.inner.state(),
            # Report counts are integers (exact in float32); with the spec's multiplier they
            # recompose the same events, so a restarted aggregator reports the same epsilon.
            "dp/reports": np.asarray(self.reports, dtype=np.float32),
            "dp/noise_multiplier": np.asarray([self.noise_multiplier], dtype=np.float32),
            "dp/clip_norm": np.asarray([self.clip_norm], dtype=np.float32),
        }

    def load_state(self, state: dict[str, F32]) -> None:
        own = {k: v for k, v in state.items() if k.startswith("dp/")}
        self.inner.load_state({k: v for k, v in state.items() if not k.startswith("dp/")})
        if not own:
            return
        saved = float(own["dp/noise_multiplier"][0])
        if not math.isclose(saved, self.noise_multiplier, rel_tol=1e-6):
            raise ValueError(
                f"the checkpoint's rounds were released with noise multiplier {saved:.6g}; this spec gives "
                f"{self.noise_multiplier:.6g} (start the job afresh to change privacy settings)"
            )
        self.reports = [round(float(x)) for x in own["dp/reports"]]
        self.ledger = Ledger(
            self.ledger.mechanism, self.ledger.delta, [self.round_multiplier(k) for k in self.reports]
        )
        self.clip_norm = float(own["dp/clip_norm"][0])


def differential_privacy(strategy: Strategy) -> DifferentialPrivacy | None:
    """The DP wrapper in a chain of strategies, if any."""
    return wrapped(strategy, DifferentialPrivacy)


class DistributedNoise(UplinkStage):
    """The silo's half of distributed DP: clip the whole update to C, add N(0, (z C)^2 / m) to each value.

    Aggregator half: the noise's norm concentrates tightly around std x sqrt(d), so an
    update far above C + std (sqrt(d) + 6) did not come from this stage (it is scaled
    down to that), and one far below half the noise's norm carries no noise: refused
    (`noise_missing`), unless a later stage (topk) drops values on purpose.
    """

    kind = "dpNoise"

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        per_round: int,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.clip_norm = clip_norm
        self.std = noise_multiplier * clip_norm / math.sqrt(per_round)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.sparse_later = False  # set by the chain when topk follows

    def apply(self, update: Update) -> None:
        norm = update.norm()
        factor = np.float32(min(1.0, self.clip_norm / norm) if norm > 0 else 1.0)
        for v in update.deltas.values():
            v *= factor
            v += self.rng.standard_normal(v.shape, dtype=np.float32) * np.float32(self.std)

    def check(self, manifest: Mapping[str, TensorInfo]) -> UpdateCheck:
        d = sum(t.size for t in manifest.values())
        return _NoiseBound(self.clip_norm, self.std, d, self.sparse_later)

    def describe(self) -> str:
        return f"dpNoise(clip={self.clip_norm:g}, std={self.std:.4g})"


class _NoiseBound(UpdateCheck):
    def __init__(self, clip_norm: float, std: float, size: int, sparse: bool) -> None:
        # Twice the bound: a 2-bit codec's stochastic rounding inflates the noise's norm by ~1.5x.
        self.upper = 2 * (clip_norm + std * (math.sqrt(size) + 6))
        self.lower = 0.0 if sparse else 0.5 * std * math.sqrt(size)

    def finish(self, norm: float) -> float:
        if norm < self.lower:
            raise UpdateRejected(
                "noise_missing",
                f"update norm {norm:.4g} is below half the norm of its noise share alone "
                f"({self.lower:.4g}); the silo did not add its noise",
            )
        return 1.0 if norm <= self.upper else self.upper / norm
