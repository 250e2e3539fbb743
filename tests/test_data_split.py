"""`fedjob data split`: non-IID silos from several sources, nothing lost, skew set by alpha."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from fedjob.split import documents, split_sources

SOURCES = {
    name: "\n\n".join(f"{name} paragraph {i} " + "x" * 300 for i in range(300)) for name in ("a", "b", "c")
}


def shares(summary) -> np.ndarray:  # type: ignore[no-untyped-def]
    m = np.array([[summary.bytes[s].get(src, 0) for src in summary.sources] for s in summary.silos], float)
    return m / m.sum(axis=0, keepdims=True)  # per source: the fraction each silo got


def test_every_byte_lands_in_exactly_one_silo(tmp_path: Path) -> None:
    summary = split_sources(SOURCES, 4, tmp_path, alpha=0.5)
    total = sum(sum(row.values()) for row in summary.bytes.values())
    assert total == sum(len(d.encode()) for t in SOURCES.values() for d in documents(t, 2048))
    written = "".join((tmp_path / s / "text.txt").read_text() for s in summary.silos)
    for i in range(300):
        assert written.count(f"a paragraph {i} ") == 1


def test_small_alpha_is_skewed_and_large_alpha_is_nearly_uniform(tmp_path: Path) -> None:
    skewed = shares(split_sources(SOURCES, 3, tmp_path / "skewed", alpha=0.1, seed=1))
    mild = shares(split_sources(SOURCES, 3, tmp_path / "mild", alpha=100.0, seed=1))
    assert skewed.max(axis=0).mean() > 0.7
    assert np.abs(mild - 1 / 3).max() < 0.15


def test_by_source_gives_each_silo_one_source_and_the_cli_prints_a_summary(tmp_path: Path) -> None:
    for name, text in SOURCES.items():
        (tmp_path / "src" / name).mkdir(parents=True)
        (tmp_path / "src" / name / "t.txt").write_text(text)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedjob_cli.main",
            "data",
            "split",
            *(str(tmp_path / "src" / n) for n in "abc"),
            "--silos",
            "3",
            "--by-source",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["silo", "a", "b", "c"]
    row0 = lines[1].split()
    assert row0[0] == "silo-0" and int(row0[1]) > 0 and row0[2] == row0[3] == "0"


def test_no_silo_is_left_without_text_even_when_alpha_starves_it(tmp_path: Path) -> None:
    # 8 silos and 3 very skewed sources: the Dirichlet draw leaves some silos with nothing.
    summary = split_sources(SOURCES, 8, tmp_path, alpha=0.01, seed=0)
    assert all(sum(summary.bytes[s].values()) > 0 for s in summary.silos)
    assert all((tmp_path / s / "text.txt").stat().st_size > 0 for s in summary.silos)
    total = sum(sum(row.values()) for row in summary.bytes.values())
    assert total == sum(len(d.encode()) for t in SOURCES.values() for d in documents(t, 2048))
