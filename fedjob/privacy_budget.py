"""The privacy budget: Google's dp-accounting over a job's rounds, and the noise a target needs.

Each training round releases one noised sum of clipped silo updates: a Gaussian
mechanism with the job's noise multiplier z (noise std / clip norm), on every silo
or on a fixed-size uniform sample of them. fedjob writes no accountant of its own:
every epsilon comes from dp-accounting (RDP or PLD) composing these events.

Neighbouring jobs: with every silo training each round, one silo added or removed
(the sum moves by at most clipNorm; the divisor is the fixed number of silos). With
`aggregation.silosPerRound`, the number of silos is public and neighbours replace one
silo (REPLACE_ONE, which dp-accounting requires for sampling without replacement):
the sum then moves by up to 2 x clipNorm, so the accounted multiplier is z / 2, and
the sampling amplifies.

dp-accounting is imported when first used: it costs a second, and most jobs are not
private.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedjob.spec import JobSpec


PLD_GRID = 1e-3


class BudgetError(ValueError):
    """A plan that cannot meet its budget, with what would."""


@dataclass(frozen=True)
class Mechanism:
    """One round's release as the accountant sees it."""

    silos: int  # in the job
    per_round: int  # sampled each round
    accountant: str  # "rdp" or "pld"

    @property
    def sampled(self) -> bool:
        return self.per_round < self.silos

    def event(self, noise_multiplier: float, rounds: int = 1) -> Any:
        import dp_accounting as dpa

        if self.sampled:
            one: Any = dpa.SampledWithoutReplacementDpEvent(
                self.silos, self.per_round, dpa.GaussianDpEvent(noise_multiplier / 2)
            )
        else:
            one = dpa.GaussianDpEvent(noise_multiplier)
        return one if rounds == 1 else dpa.SelfComposedDpEvent(one, rounds)

    def fresh_accountant(self) -> Any:
        import dp_accounting as dpa
        from dp_accounting import pld, rdp

        relation = (
            dpa.NeighboringRelation.REPLACE_ONE if self.sampled else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
        )
        if self.accountant == "pld":
            # A 1e-3 grid on the privacy loss: epsilon to about 1e-3, ten times faster than the default.
            return pld.PLDAccountant(relation, value_discretization_interval=PLD_GRID)
        return rdp.RdpAccountant(neighboring_relation=relation)

    def epsilon(self, multipliers: Counter[float], delta: float) -> float:
        """epsilon(delta) after rounds released with these noise multipliers (value: how many rounds)."""
        if not multipliers:
            return 0.0
        acc = self.fresh_accountant()
        for z, count in sorted(multipliers.items()):
            acc.compose(self.event(z, count))
        return float(acc.get_epsilon(delta))


class Ledger:
    """The rounds released so far (their effective noise multipliers) and epsilon over them.

    The multipliers are the ledger's whole state: checkpointed with the model, so a
    restarted aggregator recomposes the same events and reports the same epsilon.
    """

    def __init__(self, mechanism: Mechanism, delta: float, multipliers: list[float] | None = None) -> None:
        self.mechanism = mechanism
        self.delta = delta
        self.multipliers: list[float] = list(multipliers or [])
        self._epsilon = self._compute(self.multipliers)

    def _compute(self, multipliers: list[float]) -> float:
        return self.mechanism.epsilon(Counter(multipliers), self.delta)

    @property
    def epsilon(self) -> float:
        return self._epsilon

    def record(self, noise_multiplier: float) -> float:
        """One more round released; returns epsilon after it."""
        self.multipliers.append(noise_multiplier)
        self._epsilon = self._compute(self.multipliers)
        return self._epsilon

    def epsilon_after(self, noise_multiplier: float) -> float:
        """What epsilon would be after one more round with this multiplier (nothing recorded)."""
        return self._compute([*self.multipliers, noise_multiplier])


@dataclass(frozen=True)
class Plan:
    """What a job's privacy settings come to over its rounds."""

    noise_multiplier: float  # accounted (the spec's, or calibrated for targetEpsilon)
    calibrated: bool
    rounds: int  # spec.rounds
    within_budget: int  # the rounds targetEpsilon allows (rounds when it allows all)
    epsilon: float  # after within_budget rounds
    delta: float
    mechanism: Mechanism

    def describe(self) -> str:
        how = "calibrated for targetEpsilon" if self.calibrated else "from noiseMultiplier"
        sampled = (
            f", {self.mechanism.per_round} of {self.mechanism.silos} silos sampled per round"
            if self.mechanism.sampled
            else ""
        )
        stop = (
            f"; the budget allows {self.within_budget} of {self.rounds} rounds: the job stops after round "
            f"{self.within_budget}"
            if self.within_budget < self.rounds
            else ""
        )
        return (
            f"noise multiplier {self.noise_multiplier:.4g} ({how}){sampled}; epsilon {self.epsilon:.4g} at "
            f"delta {self.delta:g} after {self.within_budget} rounds ({self.mechanism.accountant} "
            f"accountant){stop}"
        )


def plan_for(spec: JobSpec) -> Plan:
    """The job's plan; `BudgetError` names what would fit when it cannot meet targetEpsilon."""
    dp = spec.privacy.dp
    if dp is None:
        raise ValueError("the job has no privacy.dp")
    count_stddev = None
    if dp.adaptive_clipping is not None:
        count_stddev = dp.adaptive_clipping.count_stddev or spec.silos_per_round / 20
    return _plan(
        Mechanism(len(spec.silos), spec.silos_per_round, dp.accountant),
        spec.rounds,
        dp.noise_multiplier,
        dp.target_epsilon,
        dp.delta,
        count_stddev,
    )


@functools.lru_cache(maxsize=64)
def _plan(
    mech: Mechanism,
    rounds: int,
    noise_multiplier: float | None,
    target: float | None,
    delta: float,
    count_stddev: float | None,
) -> Plan:
    if noise_multiplier is not None:
        eps = mech.epsilon(Counter({noise_multiplier: rounds}), delta)
        if target is None or eps <= target:
            return Plan(noise_multiplier, False, rounds, rounds, eps, delta, mech)
        # Train with this noise until the budget is spent: the job stops after `fits` rounds.
        fits = _rounds_within(mech, noise_multiplier, target, delta, rounds)
        if fits == 0:
            needed = _calibrate(mech, 1, target, delta)
            raise BudgetError(
                f"privacy.dp.targetEpsilon: a single round at noiseMultiplier {noise_multiplier:g} spends "
                f"more than epsilon {target:g}; it needs noiseMultiplier >= {needed:.4g}"
            )
        fit_eps = mech.epsilon(Counter({noise_multiplier: fits}), delta)
        return Plan(noise_multiplier, False, rounds, fits, fit_eps, delta, mech)
    assert target is not None
    z = _calibrate(mech, rounds, target, delta)
    if count_stddev is not None and z >= 2 * count_stddev:
        raise BudgetError(
            f"privacy.dp.adaptiveClipping.countStddev: targetEpsilon {target:g} needs noise multiplier "
            f"{z:.4g}, which the count's noise ({count_stddev:.3g}) alone exceeds; it needs countStddev > "
            f"{z / 2:.4g}"
        )
    return Plan(z, True, rounds, rounds, mech.epsilon(Counter({z: rounds}), delta), delta, mech)


def _calibrate(mech: Mechanism, rounds: int, target: float, delta: float) -> float:
    """The smallest noise multiplier whose `rounds` rounds stay within `target` (dp-accounting's search)."""
    from dp_accounting import mechanism_calibration as mc

    try:
        z = float(
            mc.calibrate_dp_mechanism(
                mech.fresh_accountant,
                lambda z: mech.event(z, rounds),
                target,
                delta,
                # Below 0.3 a single round costs epsilon in the hundreds, and PLD's grid explodes.
                mc.LowerEndpointAndGuess(0.3, 1.0),
                tol=1e-5,
            )
        )
    except mc.NoBracketIntervalFoundError:
        raise BudgetError(
            f"privacy.dp.targetEpsilon: no noise multiplier meets epsilon {target:g} at delta {delta:g} "
            f"over {rounds} rounds"
        ) from None
    # The search returns a value within tol of the boundary, possibly just under it.
    while mech.epsilon(Counter({z: rounds}), delta) > target:
        z *= 1 + 1e-5
    return z


def _rounds_within(mech: Mechanism, z: float, target: float, delta: float, upper: int) -> int:
    """The most rounds at multiplier z that stay within target (epsilon grows with rounds)."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mech.epsilon(Counter({z: mid}), delta) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo
