"""Prometheus metrics of the aggregator. Silos' figures reach Prometheus through here.

Labels are bounded: federatedjob, silo (from the spec), direction, phase and
reason (fixed sets). The round number is a value, never a label. There is no
`job` or `namespace` label: Prometheus attaches its own (scrape job, pod
namespace) and ours would collide with them.
"""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedjob.spec import FederatedJob

PHASES = ("Running", "Succeeded", "Failed")
REASONS = (
    "bad_header",
    "unknown_tensor",
    "shape_mismatch",
    "dtype",
    "codec",
    "out_of_range",
    "malformed",
    "non_finite",
    "bad_message",
    "checksum",
    "oversized",
    "stale_round",
    "no_open_round",
    "out_of_order",
    "duplicate_chunk",
    "incomplete",
    "future_round",
    "replay",
    "unknown_silo",
    "identity_mismatch",
    "bad_eval",
    "not_evaluating",
    "not_training",
    "implausible_header",
    "concurrent_upload",
    "too_many_calls",
    "idle_stream",
    "too_dense",
    "not_sampled",
    "noise_missing",
    "revoked",
    "superseded",
)
ENROLLMENT_OUTCOMES = ("signed", "refused", "unanswered")


class AggregatorMetrics:
    def __init__(self, job: FederatedJob, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.job = job.name
        jl = ["federatedjob"]
        sl = [*jl, "silo"]
        r = self.registry
        self.round = Gauge("fedjob_round", "Rounds completed.", jl, registry=r)
        self.enrollments = Counter(
            "fedjob_enrollments",
            "External silos' enrollment and renewal requests, by outcome.",
            [*jl, "kind", "outcome"],
            registry=r,
        )
        for kind in ("enroll", "renew"):
            for outcome in ENROLLMENT_OUTCOMES:
                self.enrollments.labels(self.job, kind, outcome)
        self.rounds_total = Gauge("fedjob_rounds_total", "Rounds the job runs in all.", jl, registry=r)
        self.phase = Gauge("fedjob_job_phase", "1 for the job's current phase.", [*jl, "phase"], registry=r)
        self.round_seconds = Histogram(
            "fedjob_round_duration_seconds",
            "Wall time of a round, open to close.",
            jl,
            registry=r,
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200),
        )
        self.train_loss = Gauge(
            "fedjob_train_loss", "Mean local training loss a silo reported.", sl, registry=r
        )
        self.mean_train_loss = Gauge(
            "fedjob_round_train_loss", "Mean train loss over the round's silos.", jl, registry=r
        )
        self.eval_loss = Gauge(
            "fedjob_eval_loss", "Aggregator-side held-out loss of the global model.", jl, registry=r
        )
        self.federated_eval_loss = Gauge(
            "fedjob_federated_eval_loss",
            "Sample-weighted mean of the silos' held-out losses for the global model.",
            jl,
            registry=r,
        )
        self.federated_eval_round = Gauge(
            "fedjob_federated_eval_round",
            "The round whose global model fedjob_federated_eval_loss measured.",
            jl,
            registry=r,
        )
        self.silo_eval_loss = Gauge(
            "fedjob_silo_eval_loss",
            "A silo's loss on its own held-out text for the global model.",
            sl,
            registry=r,
        )
        self.participants = Gauge(
            "fedjob_round_participants", "Silos whose update was aggregated.", jl, registry=r
        )
        self.expected = Gauge("fedjob_silos_expected", "Silos in the job.", jl, registry=r)
        self.bytes_total = Counter(
            "fedjob_silo_bytes",
            "Bytes of model traffic per silo and direction.",
            [*sl, "direction"],
            registry=r,
        )
        self.compression = Gauge(
            "fedjob_compression_ratio", "Raw update bytes / bytes on the wire.", jl, registry=r
        )
        self.downlink_debt = Gauge(
            "fedjob_downlink_debt",
            "Compressed downlink: L2 norm of what the silos' copy still lacks of the global model.",
            jl,
            registry=r,
        )
        self.downlink_change_bytes = Gauge(
            "fedjob_downlink_change_bytes",
            "Compressed downlink: bytes of the last round's change to the silos' copy.",
            jl,
            registry=r,
        )
        # Differential privacy (set only for jobs with spec.privacy.dp).
        self.dp_epsilon = Gauge(
            "fedjob_dp_epsilon",
            "Privacy spent so far: epsilon at fedjob_dp_delta over the rounds released (dp-accounting).",
            jl,
            registry=r,
        )
        self.dp_delta = Gauge(
            "fedjob_dp_delta", "The delta of the job's (epsilon, delta)-DP.", jl, registry=r
        )
        self.dp_target_epsilon = Gauge(
            "fedjob_dp_target_epsilon",
            "privacy.dp.targetEpsilon: the job stops before a round would exceed it.",
            jl,
            registry=r,
        )
        self.dp_clip_norm = Gauge(
            "fedjob_dp_clip_norm", "The clip norm in force (adaptive clipping moves it).", jl, registry=r
        )
        self.rejections = Counter(
            "fedjob_updates_rejected",
            "Updates or chunks refused, by silo and reason.",
            [*sl, "reason"],
            registry=r,
        )
        self.rejections_by_reason = Counter(
            "fedjob_rejections",
            "Updates or chunks refused, by reason (all silos).",
            [*jl, "reason"],
            registry=r,
        )
        self.deadline = Gauge("fedjob_round_deadline_seconds", "The round deadline.", jl, registry=r)
        self.last_round_time = Gauge(
            "fedjob_last_round_timestamp_seconds",
            "When the last round closed (or the job started).",
            jl,
            registry=r,
        )
        self.missed = Counter(
            "fedjob_silo_rounds_missed", "Rounds a silo did not report in time.", sl, registry=r
        )
        self.updates = Counter("fedjob_updates_accepted", "Updates aggregated.", sl, registry=r)
        # Anomaly scores of each silo's latest update (docs/metrics.md says how to read them).
        self.update_norm = Gauge(
            "fedjob_silo_update_norm", "L2 norm of the silo's latest update's deltas.", sl, registry=r
        )
        self.update_cosine = Gauge(
            "fedjob_silo_update_cosine",
            "Cosine of the silo's latest update to its round's aggregate delta.",
            sl,
            registry=r,
        )
        self.update_norm_zscore = Gauge(
            "fedjob_silo_update_norm_zscore",
            "z-score of the silo's latest update norm among its round's updates.",
            sl,
            registry=r,
        )
        self.weight_share = Gauge(
            "fedjob_silo_weight_share",
            "Share of its round's aggregate the silo's latest update carried (after caps; 0: left out).",
            sl,
            registry=r,
        )
        self.rounds_total.labels(self.job).set(job.spec.rounds)
        self.expected.labels(self.job).set(len(job.spec.silos))
        self.deadline.labels(self.job).set(job.spec.aggregation.round_deadline_seconds)
        self.last_round_time.labels(self.job).set_to_current_time()
        for s in job.silo_names():
            for d in ("up", "down"):
                self.bytes_total.labels(self.job, s, d)
            self.missed.labels(self.job, s)
            self.updates.labels(self.job, s)
        # Every reason exists from the start, so dashboards and alerts see zeros, not gaps.
        for reason in REASONS:
            self.rejections_by_reason.labels(self.job, reason)
        self.set_phase("Running")

    def set_phase(self, phase: str) -> None:
        for p in PHASES:
            self.phase.labels(self.job, p).set(1 if p == phase else 0)

    def set_privacy(self, fields: dict[str, Any]) -> None:
        j = (self.job,)
        self.dp_epsilon.labels(*j).set(fields["dp_epsilon"])
        self.dp_delta.labels(*j).set(fields["dp_delta"])
        self.dp_clip_norm.labels(*j).set(fields["dp_clip_norm"])
        if "dp_target_epsilon" in fields:
            self.dp_target_epsilon.labels(*j).set(fields["dp_target_epsilon"])

    def rejected(self, silo: str, reason: str) -> None:
        self.rejections.labels(self.job, silo, reason).inc()
        self.rejections_by_reason.labels(self.job, reason).inc()

    def bytes(self, silo: str, direction: str, n: int) -> None:
        self.bytes_total.labels(self.job, silo, direction).inc(n)

    def observe(self, event: str, fields: dict[str, Any]) -> None:
        """Coordinator events -> metrics."""
        j = (self.job,)
        if event == "round_closed":
            self.last_round_time.labels(*j).set_to_current_time()
            self.round.labels(*j).set(fields["round"])
            self.round_seconds.labels(*j).observe(fields["seconds"])
            self.mean_train_loss.labels(*j).set(fields["train_loss"])
            if fields["eval_loss"] is not None and math.isfinite(fields["eval_loss"]):
                self.eval_loss.labels(*j).set(fields["eval_loss"])
            self.participants.labels(*j).set(fields["num_participants"])
            if fields["compression_ratio"]:
                self.compression.labels(*j).set(fields["compression_ratio"])
            if "downlink_debt" in fields:
                self.downlink_debt.labels(*j).set(fields["downlink_debt"])
                self.downlink_change_bytes.labels(*j).set(fields["downlink_change_bytes"])
            for silo, loss in fields["silo_train_loss"].items():
                self.train_loss.labels(*j, silo).set(loss)
                self.updates.labels(*j, silo).inc()
            for silo in fields["missing"]:
                self.missed.labels(*j, silo).inc()
            for silo, sc in fields.get("silo_updates", {}).items():
                self.update_norm.labels(*j, silo).set(sc["norm"])
                self.update_cosine.labels(*j, silo).set(sc["cosine"])
                self.update_norm_zscore.labels(*j, silo).set(sc["norm_zscore"])
                self.weight_share.labels(*j, silo).set(sc["weight_share"])
            if "dp_epsilon" in fields:
                self.set_privacy(fields)
        elif event == "privacy":
            self.set_privacy(fields)
        elif event == "federated_eval":
            self.federated_eval_loss.labels(*j).set(fields["federated_eval_loss"])
            self.federated_eval_round.labels(*j).set(fields["round"])
            for silo, loss in fields["silo_eval_loss"].items():
                self.silo_eval_loss.labels(*j, silo).set(loss)
        elif event == "succeeded":
            self.set_phase("Succeeded")
        elif event == "failed":
            self.set_phase("Failed")
