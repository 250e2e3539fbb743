"""A silo's data becomes training windows the way a fine-tuner expects.

- the tokenizer is the model folder's own (never downloaded), bytes only when asked or when there is none;
- instruction and chat examples are trained on their answers only: labels are -100 exactly on
  prompt tokens, padding and each example's first token, and every example ends with EOS;
- short examples are packed into windows without attending across examples, or padded;
- records come from .jsonl, .parquet or a datasets folder, in any of the formats;
- each silo holds out its own examples for federated evaluation;
- bad data is refused before anything starts, naming the file, line and field.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedjob import token_cache
from fedjob.preflight import preflight_problems
from fedjob.records import DataError
from fedjob.silo_data import ALPACA_PROMPT, ExampleSet, layout, load, silo_data
from fedjob.spec import FederatedJob, SpecError, parse_job
from fedjob.tokenization import ByteTokenizer, Message, ModelTokenizer, load_tokenizer, tokenizer_kind
from fedjob.windows import IGNORE, Example, TokenStream, pack, pad
from tests.conftest import job_doc

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def job(model: Path, data: dict[str, Any], **training: Any) -> FederatedJob:
    t = {"mode": "lora", "sequenceLength": 32, "lora": {"targetModules": ["q_proj"]}, **training}
    return parse_job(
        job_doc(model={"path": str(model)}, training=t, silos=[{"name": "a", "data": data}], evaluation={})
    )


# ----- tokenisation ------------------------------------------------------------------------------


def test_bytes_encode_each_segment_exactly_with_its_trainable_flag() -> None:
    ids, mask = ByteTokenizer().encode([("ab", False), ("é", True)])
    assert ids.tolist() == [97, 98, 0xC3, 0xA9]
    assert mask.tolist() == [False, False, True, True]


def test_the_model_folder_tokenizer_is_the_default_and_bytes_the_fallback(
    chat_assets: Path, assets: Path
) -> None:
    data = {"path": str(chat_assets / "data/text"), "format": "chat"}
    assert tokenizer_kind(job(chat_assets / "model", data)) == "model"
    assert isinstance(load_tokenizer(job(chat_assets / "model", data)), ModelTokenizer)
    plain = {"path": str(assets / "data/code")}
    assert tokenizer_kind(job(assets / "model", plain)) == "bytes"  # the byte-level model has none
    assert tokenizer_kind(job(chat_assets / "model", plain, tokenizer="bytes")) == "bytes"


def test_a_tokenizers_vocabulary_line_names_what_its_ids_mean(chat_assets: Path, tmp_path: Path) -> None:
    # The checkpoint records this line: another id-to-token mapping means other embedding rows.
    line = ModelTokenizer(chat_assets / "model").vocabulary()
    assert line.startswith(f"model ({len(ModelTokenizer(chat_assets / 'model'))} ids, vocabulary sha256 ")
    assert ByteTokenizer().vocabulary() == "bytes (256 ids)"
    # A copy whose chat template changed keeps its line (the ids mean the same) ...
    same = tmp_path / "same"
    shutil.copytree(chat_assets / "model", same)
    config = json.loads((same / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (same / "tokenizer_config.json").write_text(json.dumps(config))
    assert ModelTokenizer(same).vocabulary() == line
    # ... one with two tokens' ids swapped does not.
    swapped = tmp_path / "swapped"
    shutil.copytree(chat_assets / "model", swapped)
    tok = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tok))
    assert ModelTokenizer(swapped).vocabulary() != line


def test_a_long_document_is_tokenised_in_chunks_that_lose_nothing(chat_assets: Path) -> None:
    from fedjob.corpora import python_docs

    tok = ModelTokenizer(chat_assets / "model")
    short = "def f():\n    return 1\n"
    assert tok.document(short).tolist() == tok.tok(short)["input_ids"]
    text = python_docs(300_000)
    ids = tok.document(text)
    whole = tok.tok(text)["input_ids"]
    assert tok.tok.decode(ids) == text
    assert abs(ids.size - len(whole)) <= len(text) // (1 << 16) + 1  # at most a split per chunk
    assert ByteTokenizer().document("é").tolist() == [0xC3, 0xA9]


def test_chat_turns_are_trainable_exactly_where_the_assistant_speaks(chat_assets: Path) -> None:
    tok = ModelTokenizer(chat_assets / "model")
    segments = tok.chat([Message(m["role"], m["content"]) for m in CHAT])
    assert [s for s, trainable in segments if trainable] == ["4<|im_end|>\n", "6<|im_end|>\n"]
    assert "".join(s for s, _ in segments) == tok.tok.apply_chat_template(CHAT, tokenize=False)
    ids, mask = tok.encode(segments, special=False)
    assert tok.tok.decode(ids[mask]) == "4<|im_end|>\n6<|im_end|>\n"
    assert ids.tolist() == tok.tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]


def test_a_chat_example_ends_with_the_templates_eos_once(chat_assets: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}] * 40)
    j = job(chat_assets / "model", {"path": str(path), "format": "chat"}, sequenceLength=64)
    tok = load_tokenizer(j)
    data = load(path, j.spec.silos[0].data, j, tok).data
    row = data.fixed_batches(1, 1)[0]
    ids, labels = row.input_ids[0], row.labels[0]
    one = tok.encode(tok.chat([Message(m["role"], m["content"]) for m in CHAT]), special=False)[0]
    assert ids[: one.size].tolist() == one.tolist()  # no EOS appended: <|im_end|> ends the turn
    assert (labels[: one.size] != IGNORE).sum() == len(tok.encode([("4<|im_end|>\n6<|im_end|>\n", True)])[0])


def test_instruction_records_render_alpaca_prompts_and_train_on_the_output_plus_eos() -> None:
    tok = ByteTokenizer()
    prompt = ALPACA_PROMPT.format(with_input="", instruction="Say hi", input_block="")
    assert prompt.endswith("### Instruction:\nSay hi\n\n### Response:\n")
    with_input = ALPACA_PROMPT.format(
        with_input=", paired with an input", instruction="Add", input_block="### Input:\n2 2\n\n"
    )
    assert "### Input:\n2 2\n\n### Response:\n" in with_input
    ids, mask = tok.encode([(prompt, False), ("hi", True)])
    assert mask.sum() == 2 and ids[mask].tolist() == [104, 105]


# ----- windows: labels, packing, padding -----------------------------------------------------------


def ex(ids: list[int], trainable: list[int]) -> Example:
    return Example(np.array(ids, np.int32), np.array(trainable, bool))


def test_packing_fills_windows_in_order_with_positions_restarting_and_labels_on_answers_only() -> None:
    a = ex([11, 12, 13], [0, 1, 1])
    b = ex([21, 22, 23, 24], [0, 0, 1, 1])
    c = ex([31, 32], [1, 1])
    w = pack([a, b, c], sequence_length=8, pad_id=0)
    assert w.input_ids.tolist() == [[11, 12, 13, 21, 22, 23, 24, 0], [31, 32, 0, 0, 0, 0, 0, 0]]
    x = IGNORE
    # First token of each example is never a target (in a packed window it would be predicted
    # from the example before); prompt tokens and padding never are.
    assert w.labels.tolist() == [[x, 12, 13, x, x, 23, 24, x], [x, 32, x, x, x, x, x, x]]
    assert w.position_ids is not None
    assert w.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert w.attention_mask is None


def test_padding_puts_one_example_per_window_and_masks_the_rest() -> None:
    w = pad([ex([11, 12, 13], [0, 1, 1]), ex([31, 32], [1, 1])], sequence_length=4, pad_id=9)
    x = IGNORE
    assert w.input_ids.tolist() == [[11, 12, 13, 9], [31, 32, 9, 9]]
    assert w.labels.tolist() == [[x, 12, 13, x], [x, 32, x, x]]
    assert w.attention_mask is not None and w.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert w.position_ids is None


def test_document_streams_train_on_every_token() -> None:
    s = TokenStream(np.arange(100, dtype=np.int32), 10)
    b = s.random_batch(np.random.default_rng(0), 4)
    assert (b.labels == b.input_ids).all() and b.input_ids.shape == (4, 10)
    train, held = s.split_tail(0.2)
    assert train.tokens.tolist() == list(range(80)) and held.tokens.tolist() == list(range(80, 100))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_packed_examples_attend_only_to_themselves(model_type: str) -> None:
    """The second example's logits in a packed window equal its logits alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedjob.silo_data import supports_packing

    assert supports_packing(model_type)
    small = {"gpt2": dict(n_embd=32, n_layer=2, n_head=2), "llama": dict(hidden_size=32, num_hidden_layers=2,
             num_attention_heads=2, intermediate_size=64)}[model_type]  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=64, **small)).eval()
    first, second = ex([5, 6, 7, 8, 9], [1] * 5), ex([10, 11, 12], [1] * 3)
    w = pack([first, second], sequence_length=10, pad_id=0)
    batch = w.fixed_batches(1, 1)[0].model_inputs("cpu")
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, 5:8]
        alone = model(input_ids=torch.tensor([[10, 11, 12]])).logits[0]
        leaked = model(input_ids=batch["input_ids"]).logits[0, 5:8]  # without positions: one sequence
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leaked, alone, atol=1e-3)


def test_prefix_and_prompt_tuning_pad_instead_of_packing(chat_assets: Path) -> None:
    data = {"path": str(chat_assets / "data/text"), "format": "chat"}
    assert layout(job(chat_assets / "model", data)) == "packed"
    assert layout(job(chat_assets / "model", data, packing="padded")) == "padded"
    assert layout(job(chat_assets / "model", data, mode="prompt")) == "padded"
    with pytest.raises(SpecError, match=r"training\.packing: packed examples need positions"):
        job(chat_assets / "model", data, mode="prefix", packing="packed")


# ----- formats and storage ---------------------------------------------------------------------------

QA = [
    {"instruction": f"Repeat {i}", "input": "" if i % 2 else f"x{i}", "output": f"{i} " * 8}
    for i in range(30)
]


def test_every_storage_gives_the_same_examples(chat_assets: Path, tmp_path: Path) -> None:
    import datasets

    model = chat_assets / "model"
    jsonl = write_jsonl(tmp_path / "qa/train.jsonl", QA)
    parquet = tmp_path / "qa.parquet"
    datasets.Dataset.from_list(QA).to_parquet(str(parquet))
    folder = tmp_path / "qa-ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(QA)}).save_to_disk(str(folder))
    windows = []
    for path in (jsonl.parent, parquet, folder):
        j = job(model, {"path": str(path), "format": "instruction"}, sequenceLength=64)
        data = load(path, j.spec.silos[0].data, j, load_tokenizer(j)).data
        windows.append(data.fixed_batches(1, data.num_samples())[0].input_ids)
    assert all((w == windows[0]).all() for w in windows[1:])


def test_configured_field_names_are_read(chat_assets: Path, tmp_path: Path) -> None:
    records = [{"prompt": f"Say {i}", "answer": f"{i} " * 10} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    fields = {"instruction": "prompt", "input": "context", "output": "answer"}
    data = {"path": str(path), "format": "instruction", "instructionFields": fields}
    j = job(chat_assets / "model", data, sequenceLength=128)
    assert load(path, j.spec.silos[0].data, j, load_tokenizer(j)).data.num_samples() > 0
    docs = write_jsonl(tmp_path / "t.jsonl", [{"body": "some text " * 20}] * 5)
    j = job(chat_assets / "model", {"path": str(docs), "format": "jsonl", "textField": "body"})
    assert isinstance(load(docs, j.spec.silos[0].data, j, load_tokenizer(j)).data, TokenStream)


def test_sharegpt_conversations_read_like_openai_messages(chat_assets: Path, tmp_path: Path) -> None:
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in CHAT]}] * 20
    openai = [{"messages": CHAT}] * 20
    windows = []
    for name, records, fields in (
        ("sharegpt", sharegpt, {"messages": "conversations", "role": "from", "content": "value"}),
        ("openai", openai, {}),
    ):
        path = write_jsonl(tmp_path / f"{name}.jsonl", records)
        j = job(chat_assets / "model", {"path": str(path), "format": "chat", "chatFields": fields})
        data = load(path, j.spec.silos[0].data, j, load_tokenizer(j)).data
        windows.append(data.fixed_batches(1, 1)[0])
    assert (windows[0].input_ids == windows[1].input_ids).all()
    assert (windows[0].labels == windows[1].labels).all()


def test_each_silo_holds_out_a_seeded_sample_of_its_examples(chat_assets: Path) -> None:
    data = {"path": str(chat_assets / "data/numbers"), "format": "chat", "evalFraction": 0.2}
    j = parse_job(
        job_doc(
            model={"path": str(chat_assets / "model")},
            training={"mode": "lora", "sequenceLength": 128, "lora": {"targetModules": ["q_proj"]}},
            silos=[{"name": "a", "data": data}],
            evaluation={"batches": 1},
        )
    )
    train, held = silo_data(j, "a")
    assert isinstance(train, ExampleSet) and isinstance(held, ExampleSet)
    n = len((chat_assets / "data/numbers/train.jsonl").read_text().splitlines())
    train_set = {tuple(e.ids.tolist()) for e in train.items}
    held_set = {tuple(e.ids.tolist()) for e in held.items}
    assert len(held.items) == round(0.2 * n) and len(train.items) + len(held.items) == n
    assert not train_set & held_set
    again = silo_data(j, "a")[1]
    assert isinstance(again, ExampleSet)
    assert [e.ids.tolist() for e in again.items] == [e.ids.tolist() for e in held.items]


# ----- bad data and bad models: refused before anything starts, saying where ---------------------------


def problems_for(model: Path, data: dict[str, Any], **training: Any) -> list[str]:
    return preflight_problems(job(model, data, **training))


def test_a_malformed_json_line_is_named_by_file_and_line(chat_assets: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + '{"messages": [\n')
    (p,) = problems_for(chat_assets / "model", {"path": str(path), "format": "chat"})
    assert p.startswith(f"spec.silos[0].data.path: {path}:2: not valid JSON")


@pytest.mark.parametrize(
    ("record", "fmt", "says"),
    [
        ({"instruction": "x"}, "instruction", "the record has no field 'output'"),
        ({"instruction": "x", "output": 3}, "instruction", "field 'output' must be a string, not int"),
        ({"text": "x"}, "chat", "the record has no field 'messages'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "chat", "has no assistant message"),
        ({"messages": [{"role": "user"}]}, "chat", "messages[0]: a message needs a string 'content'"),
        ({"body": "x"}, "jsonl", "the record has no field 'text' (it has body)"),
        ([1, 2], "jsonl", "a record must be a JSON object, not list"),
    ],
)
def test_a_record_missing_or_mistyping_a_field_names_it(
    chat_assets: Path, tmp_path: Path, record: Any, fmt: str, says: str
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    (p,) = problems_for(chat_assets / "model", {"path": str(path), "format": fmt})
    assert f"{path}:1: " in p and says in p


def test_data_that_tokenises_to_less_than_one_window_is_refused(chat_assets: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    (p,) = problems_for(chat_assets / "model", {"path": str(path), "format": "chat"}, sequenceLength=256)
    assert "tokens in 1 examples, fewer than one training window (sequenceLength + 1 = 257)" in p
    long_prompt = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    path = write_jsonl(tmp_path / "e.jsonl", [{"messages": long_prompt}] * 3)
    (p,) = problems_for(chat_assets / "model", {"path": str(path), "format": "chat"}, sequenceLength=64)
    assert "no chat example with an answer inside one window (sequenceLength 64; 3 examples, all prompt)" in p


def test_a_tokenizer_larger_than_the_models_vocabulary_names_both_sizes(
    chat_assets: Path, tmp_path: Path
) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(chat_assets / "model", model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "vocab_size": 1000}))
    data = {"path": str(chat_assets / "data/text"), "format": "chat"}
    assert (
        f"spec.training.tokenizer: the tokenizer in {model} has 2048 tokens, the model's vocabulary only 1000"
        in problems_for(model, data)[0]
    )


def test_chat_data_needs_a_chat_template(chat_assets: Path, tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(chat_assets / "model", model)
    (model / "chat_template.jinja").unlink()
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    data = {"path": str(chat_assets / "data/text"), "format": "chat"}
    assert problems_for(model, data)[0] == (
        f"spec.silos[0].data.format: chat data is rendered with the chat template, and the tokenizer in "
        f"{model} has none"
    )
    with pytest.raises(SpecError, match=r"silos\[0\].data.format: chat data is rendered with the model's"):
        job(chat_assets / "model", data, tokenizer="bytes")


def validate(chat_assets: Path, tmp_path: Path, path: Path) -> subprocess.CompletedProcess[str]:
    doc = job_doc(
        model={"path": str(chat_assets / "model")},
        training={"mode": "lora", "lora": {"targetModules": ["q_proj"]}},
        silos=[{"name": "a", "data": {"path": str(path), "format": "chat"}}],
    )
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(doc))
    return subprocess.run(
        [sys.executable, "-m", "fedjob_cli.main", "validate", "--check-paths", str(f)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_validate_check_paths_refuses_bad_data_with_the_reason(chat_assets: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": oops}\n')
    proc = validate(chat_assets, tmp_path, path)
    assert proc.returncode != 0
    assert f"spec.silos[0].data.path: {path}:1: not valid JSON" in proc.stdout + proc.stderr


def test_validate_check_paths_says_what_each_silo_trains_on(chat_assets: Path, tmp_path: Path) -> None:
    proc = validate(chat_assets, tmp_path, chat_assets / "data/text/train.jsonl")
    assert proc.returncode == 0, proc.stderr
    n = len((chat_assets / "data/text/train.jsonl").read_text().splitlines())
    assert "tokenizer: model; sequenceLength 128; examples packed" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if "spec.silos[0].data.path: chat," in x)
    assert f"chat, {n} examples" in line and "packed into" in line and line.endswith(" windows")


def test_a_loader_error_is_a_data_error(chat_assets: Path, tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    path.write_bytes(b"not parquet")
    j = job(chat_assets / "model", {"path": str(path), "format": "chat"})
    with pytest.raises(DataError, match="not a readable parquet file"):
        load(path, j.spec.silos[0].data, j, load_tokenizer(j))


def test_a_records_file_that_is_not_utf8_is_named(chat_assets: Path, tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"text": "caf\u00e9 " * 20}, ensure_ascii=False).encode("latin-1") + b"\n")
    (p,) = problems_for(chat_assets / "model", {"path": str(path), "format": "jsonl"})
    assert p == f"spec.silos[0].data.path: {path}: not UTF-8 text (byte 0xe9)"


@pytest.mark.parametrize("mode", ["prompt", "prefix"])
def test_prompt_and_prefix_tuning_train_on_padded_chat_windows(chat_assets: Path, mode: str) -> None:
    """PEFT prepends virtual tokens (or keys) to each window; padding and labels must still line up."""
    import torch

    from fedjob import modeling

    data = {"path": str(chat_assets / "data/text"), "format": "chat"}
    j = job(chat_assets / "model", data, mode=mode, sequenceLength=128)
    train, _ = silo_data(j, "a")
    batch = train.random_batch(np.random.default_rng(0), 2)
    assert batch.attention_mask is not None and batch.position_ids is None
    model = modeling.build_model(j)
    loss = model(**batch.model_inputs("cpu")).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for _, p in modeling.trainable_parameters(model))


# ----- tokenised once per silo, not once per process ------------------------------------------------


def test_tokenised_data_is_cached_and_the_cache_follows_the_files(
    chat_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDJOB_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}] * 30)
    j = job(chat_assets / "model", {"path": str(path), "format": "chat"}, sequenceLength=64)
    fmt = j.spec.silos[0].data
    first = load(path, fmt, j, load_tokenizer(j))
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npz"))) == 1

    class Refuses(ModelTokenizer):
        def encode(self, *a: Any, **k: Any) -> Any:
            raise AssertionError("tokenised again")

    again = load(path, fmt, j, Refuses(chat_assets / "model"))
    assert isinstance(again.data, ExampleSet) and isinstance(first.data, ExampleSet)
    assert (again.data.windows.input_ids == first.data.windows.input_ids).all()
    assert (again.data.windows.labels == first.data.windows.labels).all()
    assert again.examples == first.examples

    write_jsonl(path, [{"messages": CHAT}] * 31)  # changed data: tokenised afresh
    with pytest.raises(AssertionError, match="tokenised again"):
        load(path, fmt, j, Refuses(chat_assets / "model"))
    other = job(chat_assets / "model", {"path": str(path), "format": "chat"}, sequenceLength=32)
    with pytest.raises(AssertionError, match="tokenised again"):  # another window length truncates otherwise
        load(path, other.spec.silos[0].data, other, Refuses(chat_assets / "model"))


def test_the_cache_keeps_to_its_size_by_dropping_the_least_recently_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDJOB_CACHE", str(tmp_path))
    monkeypatch.setenv("FEDJOB_TOKEN_CACHE_BYTES", str(3 * 4096 + 2000))  # three entries, not four
    folder = tmp_path / "tokens"
    ids = np.arange(1024, dtype=np.int32)  # 4 KiB of ids, plus the npz headers
    for i, name in enumerate(["a", "b", "c"]):
        token_cache.save(name, {"ids": ids})
        os.utime(folder / f"{name}.npz", (1000 + i, 1000 + i))  # written in this order
    assert token_cache.load("a") is not None  # a hit: "a" is now the most recently used
    (folder / "dead.tmp").write_bytes(b"half an entry")
    os.utime(folder / "dead.tmp", (1, 1))  # its writer died long ago
    token_cache.save("d", {"ids": ids})
    assert sorted(p.name for p in folder.iterdir()) == ["a.npz", "c.npz", "d.npz"]
    # An entry larger than the whole limit is still kept: it was just paid for.
    monkeypatch.setenv("FEDJOB_TOKEN_CACHE_BYTES", "10")
    token_cache.save("huge", {"ids": ids})
    assert [p.name for p in folder.iterdir()] == ["huge.npz"]
    assert token_cache.load("huge") is not None


def test_an_unwritable_cache_costs_time_not_the_job(
    chat_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("FEDJOB_CACHE", str(blocker))
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}] * 30)
    j = job(chat_assets / "model", {"path": str(path), "format": "chat"}, sequenceLength=64)
    assert load(path, j.spec.silos[0].data, j, load_tokenizer(j)).examples == 30
