"""Checks of the model and data a job names, before anything trains: mistakes no restart can fix.

Each returns every problem it finds as 'spec.field: what is wrong', like the spec's own
validation, so `fedjob validate --check-paths` and every component at start-up refuse
a broken job at once, with the reason, instead of failing later inside DeepSpeed or
PEFT and being restarted in a loop. Nothing here loads weights: the model's structure
is built on the meta device from its config.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from fedjob.spec import FederatedJob
from fedjob.textdata import VOCAB_SIZE

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


def model_problems(job: FederatedJob) -> list[str]:
    """The model folder or config: parses, is a known type, has weights, fits the job's windows and
    tokens, and has every module the job's adapters attach to."""
    spec, problems = job.spec, []
    t = spec.training
    cfg: dict[str, Any]
    if spec.model.path is not None:
        folder = Path(spec.model.path)
        config_file = folder / "config.json"
        if not config_file.is_file():
            return []  # local_path_problems names a missing folder or config.json
        try:
            cfg = json.loads(config_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            return [f"spec.model.path: {config_file} is not valid JSON ({exc})"]
        if not isinstance(cfg, dict):
            return [f"spec.model.path: {config_file} is not a JSON object"]
        if t.mode != "pretrain" and not any(any(folder.glob(p)) for p in WEIGHT_FILES):
            problems.append(
                f"spec.model.path: no weights in {folder} (expected model.safetensors, sharded "
                f"*.safetensors with their index, or pytorch_model*.bin); mode {t.mode!r} starts from them"
            )
    else:
        cfg = dict(spec.model.config or {})
    where = "spec.model.path" if spec.model.path is not None else "spec.model.config"
    from transformers import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return [
            *problems,
            f"{where}: unknown model_type {model_type!r} (this transformers knows e.g. gpt2, llama)",
        ]
    positions = cfg.get("n_positions") or cfg.get("max_position_embeddings")
    if isinstance(positions, int) and t.sequence_length > positions:
        problems.append(
            f"spec.training.sequenceLength: {t.sequence_length} is above the model's {positions} positions"
        )
    vocab = cfg.get("vocab_size")
    if isinstance(vocab, int) and vocab < VOCAB_SIZE:
        problems.append(
            f"{where}: vocab_size {vocab} is below the {VOCAB_SIZE} byte-level tokens the silos' text "
            "is read as"
        )
    if not problems and t.mode in ("lora", "adapter"):
        problems += _target_problems(job)
    return problems


def _target_problems(job: FederatedJob) -> list[str]:
    """Every adapter target names a module of the model (PEFT's rule: the name or its last part)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t = job.spec.training
    m = job.spec.model
    try:
        if m.path is not None:
            config = AutoConfig.from_pretrained(m.path)
        else:
            cfg = dict(m.config or {})
            config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    except Exception as exc:  # a config transformers cannot build a model from
        return [f"spec.model: transformers cannot build a causal LM from its config ({exc})"]
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted(
        {n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if n and not list(mod.children())}
    )
    targets = t.lora.target_modules if t.mode == "lora" else t.adapter.target_modules
    field = "spec.training.lora.targetModules" if t.mode == "lora" else "spec.training.adapter.targetModules"
    missing = [k for k in targets if not any(n == k or n.endswith("." + k) for n in names)]
    if missing:
        return [
            f"{field}: no module named {', '.join(repr(k) for k in missing)} in this "
            f"{config.model_type} model (its layers: {', '.join(leaves)})"
        ]
    return []


def data_problems(job: FederatedJob, silos: Collection[str] | None = None) -> list[str]:
    """Each silo's text: UTF-8, and at least one training window of it (sequenceLength + 1 bytes)."""
    problems = []
    window = job.spec.training.sequence_length + 1
    for i, s in enumerate(job.spec.silos):
        if silos is not None and s.name not in silos:
            continue
        folder = Path(s.data.path)
        if not folder.is_dir():
            continue  # local_path_problems names it
        total = 0
        for path in sorted(folder.rglob("*.txt")):
            size, bad = _utf8_size(path)
            if bad is not None:
                problems.append(f"spec.silos[{i}].data.path: {path} is not UTF-8 text ({bad})")
            total += size
        if not problems and total < window:
            problems.append(
                f"spec.silos[{i}].data.path: {total} bytes of text in {folder}, fewer than one training "
                f"window (sequenceLength + 1 = {window})"
            )
    return problems


def _utf8_size(path: Path, block: int = 1 << 20) -> tuple[int, str | None]:
    """The file's size and, if it is not UTF-8, where it stops being (read in blocks, never whole)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return size, f"byte 0x{chunk[exc.start]:02x} at offset {size + exc.start}"
            size += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return size, "it ends inside a multi-byte character"
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if b"\x00" in head:
        return size, "NUL bytes: a binary file"
    return size, None


def preflight_problems(
    job: FederatedJob, silos: Collection[str] | None = None, model: bool = True
) -> list[str]:
    """Everything above for a component: the aggregator (model), a silo (model and its data), validate."""
    return (model_problems(job) if model else []) + data_problems(job, silos)
