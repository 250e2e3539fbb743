"""A job's uplink chain: the privacy stage the job needs first, then its compression stages."""

from __future__ import annotations

from fedjob.privacy import DistributedNoise
from fedjob.privacy_budget import plan_for
from fedjob.spec import JobSpec
from fedjob.update_stages import TopK, UplinkPipeline, UplinkStage, uplink_from_spec


def job_uplink(spec: JobSpec) -> UplinkPipeline:
    """What every silo of the job runs on its update before the wire (the aggregator checks each half)."""
    stages: list[UplinkStage] = []
    dp = spec.privacy.dp
    compression = uplink_from_spec(spec.compression.uplink).stages
    if dp is not None and dp.noise == "distributed":
        noise = DistributedNoise(dp.clip_norm, plan_for(spec).noise_multiplier, spec.silos_per_round)
        noise.sparse_later = any(isinstance(s, TopK) for s in compression)
        stages.append(noise)
    return UplinkPipeline([*stages, *compression])
