"""The chat example: a tiny Llama-shaped model with its own BPE tokenizer and chat template, and
per-silo chat data, all made locally from the standard library (nothing is downloaded).

Each silo holds questions and answers about different standard-library modules (text
processing, files, numbers): the answers are the first paragraph of each function's
docstring. The tokenizer is trained with the `tokenizers` library and the base model
pre-trained briefly on docstrings of modules no silo uses, so fine-tuning teaches the
chat format and the silos' modules, not English from nothing.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

import numpy as np

from fedjob.corpora import python_docstrings

SILO_MODULES: dict[str, tuple[str, ...]] = {
    "text": ("string.py", "textwrap.py", "difflib.py", "shlex.py", "re/__init__.py", "csv.py", "codecs.py"),
    "files": (
        "shutil.py",
        "tempfile.py",
        "posixpath.py",
        "glob.py",
        "fnmatch.py",
        "tarfile.py",
        "filecmp.py",
    ),
    "numbers": ("statistics.py", "fractions.py", "random.py", "heapq.py", "bisect.py", "_pydecimal.py"),
}
QUESTIONS = ("What does {name} do?", "Explain {name} from the {module} module.", "How would I use {name}?")
SYSTEM = "You answer questions about the Python standard library."
# ChatML, as many open chat models use; each turn ends with <|im_end|>, the tokenizer's EOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _module_name(rel: str) -> str:
    return rel.removesuffix("/__init__.py").removesuffix(".py").replace("/", ".")


def qa_pairs(modules: tuple[str, ...]) -> list[tuple[str, str]]:
    """(question, answer) for each public function and method with a docstring, read with ast."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pairs: list[tuple[str, str]] = []
    for rel in modules:
        module = _module_name(rel).removeprefix("_py")
        if not (root / rel).is_file():
            continue  # another Python version's layout
        tree = ast.parse((root / rel).read_text(encoding="utf-8"))
        scopes: list[tuple[str, ast.AST]] = [(module, tree)]
        scopes += [(f"{module}.{n.name}", n) for n in tree.body if isinstance(n, ast.ClassDef)]
        for prefix, scope in scopes:
            for node in getattr(scope, "body", []):
                if not isinstance(node, ast.FunctionDef | ast.ClassDef) or node.name.startswith("_"):
                    continue
                doc = ast.get_docstring(node)
                if not doc or len(doc) < 30:
                    continue
                answer = " ".join(doc.split("\n\n")[0].split())[:400]
                name = f"{prefix}.{node.name}"
                ask = "What is {name}?" if isinstance(node, ast.ClassDef) else QUESTIONS[len(pairs) % 3]
                pairs.append((ask.format(name=name, module=module), answer))
    return pairs


def conversation(question: str, answer: str) -> dict[str, list[dict[str, str]]]:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def write_chat_silos(out: Path) -> dict[str, Path]:
    """One train.jsonl per silo (its held-out share is split off by the job: data.evalFraction)."""
    folders = {}
    for silo, modules in SILO_MODULES.items():
        folder = out / silo
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
            for q, a in qa_pairs(modules):
                f.write(json.dumps(conversation(q, a)) + "\n")
        folders[silo] = folder
    return folders


def public_text(limit: int) -> str:
    """Docstrings of modules no silo uses: the tokenizer's and the base model's training text."""
    used = {_module_name(m).split(".")[0] for ms in SILO_MODULES.values() for m in ms}
    return python_docstrings(limit, exclude=used)


def build_tokenizer(out: Path, text: str, vocab_size: int = 2048) -> None:
    """A byte-level BPE tokenizer (GPT-2's scheme) with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in text.splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def build_tiny_chat_model(out: Path, seed: int = 0, pretrain_steps: int = 300) -> Path:
    """A tiny Llama-shaped model and its tokenizer, pre-trained briefly on public docstrings."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedjob.modeling import pretrain, seed_everything
    from fedjob.windows import TokenStream

    seed_everything(seed)
    text = public_text(400_000)
    build_tokenizer(out, text)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    ids = np.asarray(tok(text)["input_ids"], dtype=np.int32)
    pretrain(model, TokenStream(ids, 128), pretrain_steps, seed)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out
