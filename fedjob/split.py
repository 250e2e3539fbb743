"""Make non-IID silo folders from a corpus of several sources (`fedjob data split`).

Each source's text is cut into documents (paragraph-aligned pieces of about
`doc_bytes`); for every source, the share each silo gets is drawn from a
Dirichlet(alpha) distribution (Hsu et al. 2019): large alpha gives every silo
a similar mix, small alpha gives each silo mostly one source. `by_source`
gives silo i exactly source i.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class SplitSummary:
    silos: list[str]
    sources: list[str]
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # silo -> source -> bytes

    def table(self) -> str:
        width = max(len(s) for s in [*self.sources, "silo"]) + 2
        lines = ["silo".ljust(12) + "".join(s.rjust(width) for s in self.sources) + "total".rjust(width)]
        for silo in self.silos:
            row = self.bytes[silo]
            lines.append(
                silo.ljust(12)
                + "".join(str(row.get(s, 0)).rjust(width) for s in self.sources)
                + str(sum(row.values())).rjust(width)
            )
        return "\n".join(lines)


def documents(text: str, doc_bytes: int) -> list[str]:
    docs, current = [], ""
    for para in text.split("\n\n"):
        current = f"{current}\n\n{para}" if current else para
        if len(current.encode()) >= doc_bytes:
            docs.append(current)
            current = ""
    if current:
        docs.append(current)
    return docs


def split_sources(
    sources: dict[str, str],
    silos: int,
    out: Path,
    alpha: float = 1.0,
    by_source: bool = False,
    seed: int = 0,
    doc_bytes: int = 2048,
) -> SplitSummary:
    if silos < 1:
        raise ValueError("silos must be at least 1")
    if by_source and silos != len(sources):
        raise ValueError(f"by_source needs one silo per source ({len(sources)}), got {silos}")
    if not by_source and alpha <= 0:
        raise ValueError("alpha must be positive")
    rng = np.random.default_rng(seed)
    names = [f"silo-{i}" for i in range(silos)]
    summary = SplitSummary(names, list(sources), {n: {} for n in names})
    assigned: dict[str, list[tuple[str, str]]] = {n: [] for n in names}  # silo -> (source, document)
    for k, (source, text) in enumerate(sources.items()):
        docs = documents(text, doc_bytes)
        if by_source:
            owners = np.full(len(docs), k)
        else:
            shares = rng.dirichlet(np.full(silos, alpha))
            owners = rng.choice(silos, size=len(docs), p=shares)
        for doc, owner in zip(docs, owners, strict=True):
            assigned[names[int(owner)]].append((source, doc))
    # A silo with no text could not train at all: give each empty one a document from the largest.
    for silo in names:
        if not assigned[silo]:
            donor = max(names, key=lambda n: len(assigned[n]))
            if len(assigned[donor]) < 2:
                raise ValueError(f"too little text for {silos} silos: make doc_bytes smaller")
            assigned[silo].append(assigned[donor].pop())
    for silo, pairs in assigned.items():
        for source, doc in pairs:
            summary.bytes[silo][source] = summary.bytes[silo].get(source, 0) + len(doc.encode())
        folder = out / silo
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "text.txt").write_text("\n\n".join(doc for _, doc in pairs), encoding="utf-8")
    return summary


def read_sources(paths: list[Path]) -> dict[str, str]:
    """One source per folder (its .txt files) or file."""
    out = {}
    for p in paths:
        files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"no .txt files in {p}")
        out[p.stem if p.is_file() else p.name] = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    return out
