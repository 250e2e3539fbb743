"""What a silo says about its own work (sample count, steps, losses), checked against the job.

A header's numbers are the silo's word, and the FedAvg weight follows them: the
rules here refuse what no honest silo of this job sends, and cap what the job
caps (`silos[].maxSamples`), before anything is counted.
"""

from __future__ import annotations

import math

from fedjob.aggregation import UpdateMeta
from fedjob.spec import FederatedJob
from fedjob.v1 import fedjob_pb2 as pb
from fedjob_aggregator.round_state import Refused

# A sample count beyond any corpus (2^40 windows): a header claiming more is implausible.
MAX_CLAIMED_SAMPLES = 1 << 40


class Claims:
    def __init__(self, job: FederatedJob) -> None:
        self.job = job
        self.evaluates = job.spec.evaluation.batches > 0

    def check_header(self, silo: str, header: pb.UpdateHeader) -> None:
        if header.num_samples == 0 or header.local_steps == 0 or not math.isfinite(header.train_loss):
            raise Refused(
                "INVALID_ARGUMENT",
                "bad_header",
                "header needs num_samples > 0, local_steps > 0 and a finite train_loss",
            )
        expected_steps = self.job.silo(silo).local_steps or self.job.spec.training.local_steps
        if header.local_steps != expected_steps:
            raise Refused(
                "INVALID_ARGUMENT",
                "implausible_header",
                f"local_steps {header.local_steps}; {silo} runs {expected_steps} per round",
            )
        if header.num_samples > MAX_CLAIMED_SAMPLES:
            raise Refused(
                "INVALID_ARGUMENT",
                "implausible_header",
                f"num_samples {header.num_samples}; no corpus has more than {MAX_CLAIMED_SAMPLES} windows",
            )
        if header.train_loss < 0:
            raise Refused("INVALID_ARGUMENT", "implausible_header", f"train_loss {header.train_loss} < 0")

    def check_evaluation(self, silo: str, loss: float, samples: int) -> None:
        """A silo evaluates a fixed number of windows: anything else would buy it weight."""
        if not self.evaluates:
            raise Refused("INVALID_ARGUMENT", "bad_eval", "this job runs no federated evaluation")
        spec = self.job.spec
        expected = spec.evaluation.batches * spec.training.batch_size * self.job.silo(silo).processes
        if samples != expected:
            raise Refused(
                "INVALID_ARGUMENT",
                "bad_eval",
                f"evaluation of {samples} windows; this silo evaluates {expected}",
            )
        if not math.isfinite(loss) or loss < 0:
            raise Refused("INVALID_ARGUMENT", "bad_eval", f"evaluation loss {loss} is not a finite loss")

    def meta(self, silo: str, header: pb.UpdateHeader) -> UpdateMeta:
        """The update's record as it will count: its sample claim capped where the job caps it."""
        claimed = int(header.num_samples)
        cap = self.job.silo(silo).max_samples
        return UpdateMeta(
            silo,
            min(claimed, cap) if cap else claimed,
            int(header.local_steps),
            float(header.train_loss),
            float(header.eval_loss) if header.eval_samples else math.nan,
            int(header.eval_samples),
            claimed_samples=claimed if cap and claimed > cap else 0,
        )
