"""The job's round-by-round record: the history checkpoints carry, and metrics.jsonl beside it.

One JSON object per closed round. Federated evaluation arrives a round late (round
r's uploads score the model after round r-1, the final evaluation the last model),
so an earlier record can gain fields after it was written; metrics.jsonl is then
rewritten whole, otherwise appended to. Writing is the caller's to schedule: the
checkpoint writer runs it after the round's checkpoint is on disk, so the metrics
line never announces a round a crash could lose.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def evaluation_fields(evals: dict[str, tuple[float, int]]) -> Record:
    """silo: (loss, windows) -> the sample-weighted federated loss and each silo's."""
    samples = sum(n for _, n in evals.values())
    return {
        "federated_eval_loss": sum(loss * n for loss, n in evals.values()) / samples,
        "silo_eval_loss": {s: loss for s, (loss, _) in sorted(evals.items())},
    }


class RoundRecorder:
    def __init__(self, path: Path, history: list[Record]) -> None:
        self.path = path
        self.history = history
        self.rewrite()  # a resumed job's file matches its checkpoint again

    def add(self, record: Record, earlier_changed: bool) -> Callable[[], None]:
        """Keep a closed round's record; returns the write that brings metrics.jsonl up to date."""
        self.history.append(record)
        if earlier_changed:  # the previous round's line gained its federated evaluation
            text = "".join(_line(r) for r in self.history)
            return lambda: self._replace(text)
        line = _line(record)
        return lambda: self._append(line)

    def file_evaluation(self, round_number: int, evals: dict[str, tuple[float, int]], record: Record) -> bool:
        """Round r's uploads carry the silos' losses for the model after round r-1: file them there
        (round 1's, for the initial model, in its own record). Returns whether an earlier record changed."""
        if not evals:
            return False
        fields = evaluation_fields(evals)
        if round_number == 1:
            record["initial_federated_eval_loss"] = fields["federated_eval_loss"]
            record["initial_silo_eval_loss"] = fields["silo_eval_loss"]
            return False
        if self.history and self.history[-1]["round"] == round_number - 1:
            self.history[-1].update(fields)
            return True
        return False

    def file_final_evaluation(self, evals: dict[str, tuple[float, int]]) -> Record | None:
        """The silos' losses for the final model, into the last record (call after its checkpoint)."""
        if not evals or not self.history:
            return None
        fields = evaluation_fields(evals)
        self.history[-1].update(fields)
        return fields

    def latest_federated_eval(self) -> Record:
        for r in reversed(self.history):
            if r.get("federated_eval_loss") is not None:
                return {"federated_eval_loss": r["federated_eval_loss"], "federated_eval_round": r["round"]}
        return {}

    def snapshot(self) -> list[Record]:
        """A copy for a checkpoint (records can still change: evaluations are filed later)."""
        return [dict(r) for r in self.history]

    def rewrite(self) -> None:
        self._replace("".join(_line(r) for r in self.history))

    def _append(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line)

    def _replace(self, text: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)


def _line(record: Record) -> str:
    return json.dumps(record, sort_keys=False) + "\n"
