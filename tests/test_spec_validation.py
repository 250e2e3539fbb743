"""A FederatedJob is checked before anything runs; every problem names its field and the rule."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedjob.spec import SpecError, job_document, load_job, local_path_problems, parse_job
from tests.conftest import job_doc


def problems_of(doc: object) -> tuple[str, ...]:
    with pytest.raises(SpecError) as info:
        parse_job(doc)
    return info.value.problems


def test_a_complete_document_is_accepted_with_defaults_filled_in() -> None:
    job = parse_job(job_doc())
    assert job.name == "demo"
    assert job.spec.training.deepspeed.zero_stage == 2
    assert job.silo("beta").processes == 1


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["spec"]["silos"][1].update(name="Beta_1"),
            "spec.silos[1].name: must be a DNS-1123 label",
        ),
        (lambda d: d["spec"]["training"].update(mode="dreaming"), "spec.training.mode: must be one of"),
        (
            lambda d: d["spec"]["training"].update(localSteps=0),
            "spec.training.localSteps: input should be greater than or equal to 1",
        ),
        (
            lambda d: d["spec"]["training"].update(deepspeed={"zeroStage": 4}),
            "spec.training.deepspeed.zeroStage: input should be less than or equal to 3",
        ),
        (
            lambda d: d["spec"]["training"].update(deepspeed={"offloadParameters": True, "zeroStage": 2}),
            "spec.training.deepspeed: offloadParameters needs zeroStage 3",
        ),
        (lambda d: d["spec"].update(silos=[]), "spec.silos: list should have at least 1 item"),
        (
            lambda d: d["spec"]["silos"].append({"name": "alpha", "data": {"path": "/x"}}),
            "spec.silos: names must be unique, repeated: alpha",
        ),
        (
            lambda d: d["spec"]["aggregation"].update(minSilos=3),
            "spec.aggregation.minSilos: must be at most the number of silos (2)",
        ),
        (
            lambda d: d["spec"]["silos"][0].update(processes=2, resources={"gpus": 4}),
            "spec.silos[0].processes: must equal resources.gpus (4)",
        ),
        (
            lambda d: d["spec"]["silos"][0]["data"].update(eval={"path": "/held-out"}),
            "spec.silos[0].data.eval: needs evaluation.batches > 0",
        ),
        (
            lambda d: d["spec"].update(evaluation={"batches": 2, "heldOutFraction": 0.9}),
            "spec.evaluation.heldOutFraction: input should be less than or equal to 0.5",
        ),
        (lambda d: d["spec"]["compression"].update(codec="int4"), "spec.compression.codec: must be one of"),
        (
            lambda d: d["spec"]["compression"].update(chunkBytes=64 << 20),
            "spec.compression.chunkBytes: input should be less than or equal to 4194304",
        ),
        (lambda d: d["spec"].update(rounds=-1), "spec.rounds: input should be greater than or equal to 1"),
        (lambda d: d["spec"]["silos"][0].pop("data"), "spec.silos[0].data: required"),
        (
            lambda d: d["spec"].update(model={"path": "/m", "config": {"model_type": "gpt2"}}),
            "spec.model: set exactly one of path or config",
        ),
        (lambda d: d["spec"].update(learningRate=0.1), "spec.learningRate: unknown field"),
        (lambda d: d.update(kind="Job"), "kind: must be one of"),
        (
            lambda d: d["metadata"].update(name="x" * 40),
            "metadata.name: string should have at most 30 characters",
        ),
        (
            lambda d: d["spec"]["training"].update(learningRate="fast"),
            "spec.training.learningRate: input should be a valid number",
        ),
    ],
)
def test_each_invalid_field_is_named_with_its_rule(mutate, expected: str) -> None:  # type: ignore[no-untyped-def]
    doc = job_doc()
    mutate(doc)
    problems = problems_of(doc)
    assert any(p.startswith(expected) for p in problems), problems


def test_the_readmes_reference_document_is_a_valid_job() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "kind: FederatedJob" in b]
    assert blocks, "the README shows a FederatedJob"
    for block in blocks:
        job = parse_job(yaml.safe_load(block), "README.md")
        assert job.spec.compression.uplink  # it shows the update stages too


def test_every_problem_is_reported_at_once() -> None:
    doc = job_doc(rounds=0)
    doc["spec"]["silos"][0]["name"] = "NO"
    doc["spec"]["training"]["batchSize"] = 0
    problems = problems_of(doc)
    assert len(problems) == 3
    assert {p.split(":")[0] for p in problems} == {
        "spec.rounds",
        "spec.silos[0].name",
        "spec.training.batchSize",
    }


def test_a_document_that_is_not_a_mapping_is_refused() -> None:
    assert "mapping" in problems_of(["a", "list"])[0]


def test_relative_paths_resolve_against_the_job_file(tmp_path: Path) -> None:
    doc = job_doc(model={"path": "models/tiny"}, silos=[{"name": "a", "data": {"path": "data/a"}}])
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(doc))
    job = load_job(f)
    assert job.spec.model.path == str(tmp_path / "models" / "tiny")
    assert job.silo("a").data.path == str(tmp_path / "data" / "a")
    assert local_path_problems(job) == [
        f"spec.model.path: folder not found: {tmp_path / 'models' / 'tiny'}",
        f"spec.silos[0].data.path: not found: {tmp_path / 'data' / 'a'}",
    ]


def test_a_silo_not_in_the_job_is_a_clear_error() -> None:
    job = parse_job(job_doc())
    with pytest.raises(KeyError, match="silo 'gamma' is not in job 'demo'"):
        job.silo("gamma")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedjob_cli.main", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_validate_lists_problems_and_exits_non_zero(tmp_path: Path) -> None:
    doc = job_doc()
    doc["spec"]["silos"][1]["name"] = "Beta"
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(doc))
    r = _cli("validate", str(f))
    assert r.returncode == 2
    assert "spec.silos[1].name: must be a DNS-1123 label" in r.stderr


def test_cli_validate_reports_broken_yaml(tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("spec: [unclosed\n")
    r = _cli("validate", str(f))
    assert r.returncode == 2
    assert "not valid YAML" in r.stderr


def test_cli_validate_checks_local_folders_on_request(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(job_doc()))
    assert _cli("validate", str(f)).returncode == 0
    r = _cli("validate", "--check-paths", str(f))
    assert r.returncode == 2
    assert "spec.model.path: folder not found: /models/tiny" in r.stderr


def test_cli_worker_refuses_a_silo_that_is_not_in_the_job(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(job_doc()))
    r = _cli("worker", str(f), "--silo", "gamma", "--certs", str(tmp_path), "--aggregator", "127.0.0.1:1")
    assert r.returncode == 2
    assert "silo 'gamma' is not in job 'demo'" in r.stderr


def test_every_problem_is_listed_in_one_pass() -> None:
    doc = job_doc(
        aggregation={"minSilos": 9, "robust": {"rule": "median"}},
        training={"mode": "adapter", "adapter": {"targetModules": ["c_attn"], "feedforwardModules": ["mlp"]}},
        compression={"uplink": [{"topk": {"fraction": 0.1}}]},
    )
    with pytest.raises(SpecError) as info:
        parse_job(doc)
    assert [p.split(":")[0] for p in info.value.problems] == [
        "spec.aggregation.minSilos",
        "spec.training.adapter.feedforwardModules",
        "spec.compression.uplink",  # topk with a median: its own group, reported too
    ]
    # Several problems of one kind are all named too.
    twice = job_doc(
        silos=[{"name": "a", "data": {"path": "/d"}}, {"name": "a", "data": {"path": "/d"}}],
        aggregation={"minSilos": 3},
        compression={"uplink": [{"zstd": {}}, {"quantize": {"bits": 4}}, {"fp16": {}}]},
    )
    with pytest.raises(SpecError) as info:
        parse_job(twice)
    assert info.value.problems == (
        "spec.silos: names must be unique, repeated: a",
        "spec.aggregation.minSilos: must be at most the number of silos (2)",
        "spec.compression.uplink[0]: zstd compresses the encoded bytes; it goes last",
        "spec.compression.uplink[2]: fp16: one number format per chain",
    )


def test_set_overrides_fields_with_yaml_values_and_names_a_path_that_does_not_exist(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_doc()))
    job = load_job(
        path, ["spec.rounds=7", "spec.silos[1].localSteps=3", "spec.training.lora.targetModules=[c_fc]"]
    )
    assert (job.spec.rounds, job.spec.silos[1].local_steps) == (7, 3)
    assert job.spec.training.lora.target_modules == ["c_fc"]
    assert parse_job(job_document(job)) == job  # what `fedjob run` hands its components
    for bad, why in [
        ("spec.rounds", "expected PATH=VALUE"),
        ("spec.silos[5].localSteps=3", "no item [5] there"),
        ("spec.rounds.x=3", "'x' is not inside a mapping"),
        ("spec.bad-name=1", "is not a field name"),
    ]:
        with pytest.raises(SpecError) as info:
            load_job(path, [bad])
        assert info.value.problems == (f"--set {bad}: {why}",) or why in info.value.problems[0]
    with pytest.raises(SpecError) as info:
        load_job(path, ["spec.rounds=many"])
    assert info.value.problems == (
        "spec.rounds: input should be a valid integer, unable to parse string as an integer",
    )
