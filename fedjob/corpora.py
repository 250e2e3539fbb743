"""Small real text corpora generated on the spot from what every Python install carries.

No downloads: the sources are the standard library's own code, its reference
documentation (pydoc's topic texts) and the Unicode character database. They
differ in vocabulary, layout and byte statistics, which makes silos built from
them genuinely non-IID.
"""

from __future__ import annotations

import sysconfig
import unicodedata
from collections.abc import Callable, Collection
from pathlib import Path

CODE_PACKAGES = ("json", "email", "http", "logging", "asyncio", "importlib", "xml", "urllib", "concurrent")


def python_code(limit: int) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    size = 0
    for pkg in CODE_PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            text = path.read_text(encoding="utf-8", errors="replace")
            parts.append(f"# file: {path.relative_to(root)}\n{text}")
            size += len(text)
            if size >= limit:
                return "\n".join(parts)[:limit]
    return "\n".join(parts)[:limit]


def python_docs(limit: int) -> str:
    from pydoc_data import topics

    texts = [f"{name}\n{'=' * len(name)}\n{body}" for name, body in sorted(topics.topics.items())]
    return "\n\n".join(texts)[:limit]


def unicode_names(limit: int) -> str:
    lines = []
    size = 0
    for cp in range(0x20, 0x30000):
        name = unicodedata.name(chr(cp), "")
        if not name:
            continue
        line = f"U+{cp:04X}\t{name}\t{unicodedata.category(chr(cp))}\n"
        lines.append(line)
        size += len(line)
        if size >= limit:
            break
    return "".join(lines)


def python_docstrings(limit: int, exclude: Collection[str] = ()) -> str:
    """Docstrings of standard-library modules the silos do not use: a 'public' corpus for the base model."""
    import ast

    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    size = 0
    for path in sorted(root.glob("*.py")):
        if path.stem in exclude:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(doc)
                    size += len(doc)
        if size >= limit:
            break
    return "\n\n".join(parts)[:limit]


SOURCES: dict[str, Callable[[int], str]] = {
    "code": python_code,
    "docs": python_docs,
    "unicode": unicode_names,
}


def write_silo_folders(out: Path, size: int = 200_000, eval_fraction: float = 0.1) -> dict[str, Path]:
    """One folder per source (the silos) plus `eval/` holding the tail of each source, unseen in training."""
    folders: dict[str, Path] = {}
    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    for name, make in SOURCES.items():
        text = make(size)
        cut = int(len(text) * (1 - eval_fraction))
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.txt").write_text(text[:cut], encoding="utf-8")
        (eval_dir / f"{name}.txt").write_text(text[cut:], encoding="utf-8")
        folders[name] = folder
    folders["eval"] = eval_dir
    return folders
