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

from fedjob.data_files import data_files, has_data
from fedjob.silo_data import supports_packing
from fedjob.spec import FederatedJob, RecordFormatSpec
from fedjob.tokenization import BYTE_VOCAB, ModelTokenizer, load_tokenizer, tokenizer_kind

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
    problems += _tokenizer_problems(job, vocab if isinstance(vocab, int) else None, where)
    if t.packing == "packed" and not supports_packing(model_type):
        problems.append(
            f"spec.training.packing: packed, but transformers' {model_type} model does not read packed "
            "sequences from position ids (its attention would cross examples); use padded or auto"
        )
    if not problems and t.mode in ("lora", "adapter"):
        problems += _target_problems(job)
    return problems


def _tokenizer_problems(job: FederatedJob, vocab: int | None, where: str) -> list[str]:
    """The tokenizer loads, fits the model's embedding table, has a chat template if chat data needs one."""
    if tokenizer_kind(job) == "bytes":
        if vocab is not None and vocab < BYTE_VOCAB:
            return [
                f"{where}: vocab_size {vocab} is below the {BYTE_VOCAB} byte-level tokens the silos' text "
                "is read as (training.tokenizer: bytes)"
            ]
        return []
    path = job.spec.model.path
    try:
        tok = ModelTokenizer(str(path))
    except Exception as exc:  # transformers raises many types for a broken tokenizer folder
        return [f"spec.training.tokenizer: cannot load the tokenizer in {path} ({exc})"]
    problems = []
    if vocab is not None and len(tok) > vocab:
        problems.append(
            f"spec.training.tokenizer: the tokenizer in {path} has {len(tok)} tokens, the model's "
            f"vocabulary only {vocab} (config.json vocab_size): ids past it have no embedding"
        )
    if not tok.chat_template:
        sources = [
            (f"spec.silos[{i}].data.format", s.data.format)
            for i, s in enumerate(job.spec.silos)
            if s.data is not None
        ]
        if job.spec.eval is not None:
            sources.append(("spec.eval.format", job.spec.eval.format))
        problems += [
            f"{field}: chat data is rendered with the chat template, and the tokenizer in {path} has none"
            for field, fmt in sources
            if fmt == "chat"
        ]
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


def data_problems(
    job: FederatedJob,
    silos: Collection[str] | None = None,
    with_eval: bool = True,
    report: list[str] | None = None,
) -> list[str]:
    """Each silo's data (and the shared eval set): readable in its format, every record whole, and
    at least one training window of tokens once tokenised. `report` gets what each path holds."""
    from fedjob.records import DataError
    from fedjob.silo_data import load

    try:
        tokenizer = load_tokenizer(job)
    except Exception:  # model_problems names it
        return []
    sources: list[tuple[str, str, RecordFormatSpec]] = []
    for i, s in enumerate(job.spec.silos):
        if (silos is not None and s.name not in silos) or s.data is None:
            continue
        sources.append((f"spec.silos[{i}].data.path", s.data.path, s.data))
        if s.data.eval is not None:
            sources.append((f"spec.silos[{i}].data.eval.path", s.data.eval.path, s.data))
    if with_eval and job.spec.eval is not None:
        sources.append(("spec.eval.path", job.spec.eval.path, job.spec.eval))
    problems = []
    for field, path, fmt in sources:
        if not has_data(Path(path), fmt.format):
            continue  # local_path_problems names it
        if fmt.format == "text":
            bad = [
                f"{field}: {f} is not UTF-8 text ({why})"
                for f in data_files(Path(path), "text")
                if (why := _utf8_size(f)[1]) is not None
            ]
            if bad:
                problems += bad
                continue
        try:
            loaded = load(path, fmt, job, tokenizer)
            if report is not None:
                report.append(f"{field}: {fmt.format}, {loaded.describe()}")
        except DataError as exc:
            problems.append(f"{field}: {exc}")
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
    job: FederatedJob,
    silos: Collection[str] | None = None,
    model: bool = True,
    report: list[str] | None = None,
) -> list[str]:
    """Everything above for a component: the aggregator (model), a silo (model and its data), validate."""
    return (model_problems(job) if model else []) + data_problems(job, silos, with_eval=model, report=report)
