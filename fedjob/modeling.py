"""Build the model a job trains and move its trainable parameters in and out as NumPy.

Shared by the aggregator (initial global state, evaluation, the final artefact)
and the worker (local training), so both agree on names and shapes by
construction. Only trainable parameters ever travel: LoRA factors for `lora`,
every weight for `full` and `pretrain`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedjob.chunking import State, TensorInfo
from fedjob.spec import PEFT_MODES, FederatedJob

# transformers/peft/torch are heavy: import them where used, so that `fedjob
# validate` and the operator start in well under a second.


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _config(job: FederatedJob) -> Any:
    from transformers import AutoConfig

    m = job.spec.model
    if m.path is not None:
        return AutoConfig.from_pretrained(m.path)
    assert m.config is not None
    cfg = dict(m.config)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def load_base_model(job: FederatedJob, dtype: Any = None) -> Any:
    """The base model with real weights (from the folder, or a seeded init for pretraining).

    `dtype`: torch.bfloat16 loads the frozen weights straight in bf16 (half the host memory
    of fp32 for a model DeepSpeed would cast to bf16 anyway).
    """
    import torch
    from transformers import AutoModelForCausalLM

    m = job.spec.model
    dtype = dtype or torch.float32
    if m.path is not None and job.spec.training.mode != "pretrain":
        return AutoModelForCausalLM.from_pretrained(m.path, dtype=dtype)
    seed_everything(job.spec.training.seed)
    model = AutoModelForCausalLM.from_config(_config(job))  # type: ignore[no-untyped-call]
    return model.to(dtype)


def _hollow_base_model(job: FederatedJob) -> Any:
    """The base model's structure with memory that is reserved but never written.

    Built on the meta device and then given uninitialised CPU storage: the kernel
    maps those pages only when something writes them, and nothing does, so the
    frozen weights never become resident. PEFT can then attach (and initialise)
    real adapters to it, which is all the aggregator of a PEFT job needs.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(job))  # type: ignore[no-untyped-call]
    return model.to_empty(device="cpu")


def _uses_conv1d(model: Any, targets: list[str]) -> bool:
    """GPT-2 style Conv1D projections need LoRA's fan_in_fan_out=True."""
    from transformers.pytorch_utils import Conv1D

    return any(
        isinstance(mod, Conv1D) and name.split(".")[-1] in targets for name, mod in model.named_modules()
    )


def build_model(job: FederatedJob, dtype: Any = None, hollow_base: bool = False) -> Any:
    """The model with exactly the job's trainable parameters marked requires_grad.

    `hollow_base`: for PEFT modes, the frozen base weights are never materialised
    (see `_hollow_base_model`): enough for the adapters' names, shapes, initial
    values and saving them, not for a forward pass.
    """
    mode = job.spec.training.mode
    if hollow_base and mode not in PEFT_MODES:
        raise ValueError(f"mode {mode!r} trains the base weights: they cannot be left out")
    model = _hollow_base_model(job) if hollow_base else load_base_model(job, dtype)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = job.spec.training.lora
        seed_everything(job.spec.training.seed)  # the same initial A everywhere
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            fan_in_fan_out=_uses_conv1d(model, lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
        if lora.freeze_a:
            # FFA-LoRA (Sun et al. 2024): with A fixed and shared, mean(B_i) A == mean(B_i A).
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.requires_grad_(False)
    elif mode in ("prefix", "prompt", "adapter"):
        from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig, get_peft_model

        t = job.spec.training
        seed_everything(t.seed)
        peft_config: Any
        if mode == "prefix":
            peft_config = PrefixTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=t.prompt.num_virtual_tokens
            )
        elif mode == "prompt":
            peft_config = PromptTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=t.prompt.num_virtual_tokens
            )
        else:
            peft_config = IA3Config(
                task_type="CAUSAL_LM",
                target_modules=t.adapter.target_modules,
                feedforward_modules=t.adapter.feedforward_modules,
                fan_in_fan_out=_uses_conv1d(model, t.adapter.target_modules),
            )
        model = get_peft_model(model, peft_config)
    return model


def result_folder(job: FederatedJob) -> str:
    """Where the trained artefact goes: a PEFT adapter folder or a Hugging Face model folder."""
    return "adapter" if job.spec.training.mode in PEFT_MODES else "model"


def trainable_parameters(model: Any) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def get_state(model: Any) -> State:
    """Trainable parameters as float32 NumPy (of a plain module, not a ZeRO-partitioned one)."""
    return {n: p.detach().float().cpu().numpy().copy() for n, p in trainable_parameters(model)}


def trainable_manifest(job: FederatedJob) -> dict[str, TensorInfo]:
    """Names and shapes of what the silos train, from a model built on the meta device (no weights)."""
    import torch

    if job.spec.training.mode in PEFT_MODES:
        model = build_model(job, hollow_base=True)
    else:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(_config(job))  # type: ignore[no-untyped-call]
    return {n: TensorInfo(n, tuple(int(d) for d in p.shape)) for n, p in trainable_parameters(model)}


def initial_state(job: FederatedJob, manifest: dict[str, TensorInfo] | None = None) -> State:
    """The global model's starting point, holding at most one copy of the trainable state.

    PEFT modes: the adapters' initial values, over a hollow base. `full`: every weight,
    read tensor by tensor from the folder's safetensors files (fp32, whatever they were
    saved in). `pretrain`: a seeded random init, whose float32 tensors NumPy then shares.
    """
    mode = job.spec.training.mode
    if mode in PEFT_MODES:
        return get_state(build_model(job, hollow_base=True))
    if mode == "full":
        streamed = _read_safetensors(job, manifest or trainable_manifest(job))
        if streamed is not None:
            return streamed
    model = load_base_model(job)
    # .numpy() of a float32 CPU tensor shares its memory: the model's own storage becomes the state.
    return {n: p.detach().numpy() for n, p in trainable_parameters(model)}


def _read_safetensors(job: FederatedJob, manifest: dict[str, TensorInfo]) -> State | None:
    """Each trainable tensor straight from the weight files, or None when names or shapes differ."""
    from safetensors import safe_open

    assert job.spec.model.path is not None
    files = sorted(Path(job.spec.model.path).glob("*.safetensors"))
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                where[key] = f
    if not files or not set(manifest) <= set(where):
        return None  # another layout (renamed keys, .bin files): load through transformers
    out: State = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in (n for n in manifest if where[n] == f):
                t = handle.get_tensor(name)
                if tuple(t.shape) != manifest[name].shape:
                    return None
                out[name] = t.float().numpy()
    return {n: out[n] for n in manifest}


def save_result(job: FederatedJob, state: State, target: Path) -> None:
    """Write the trained artefact: a PEFT adapter folder, or a Hugging Face model folder.

    Without materialising what the state does not hold: a PEFT adapter is saved from a
    hollow base, full weights are assigned (shared, not copied) into a meta skeleton.
    """
    import torch

    if job.spec.training.mode in PEFT_MODES:
        model = build_model(job, hollow_base=True)
        set_state(model, state)
        model.save_pretrained(target)
        return
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(job))  # type: ignore[no-untyped-call]
    tensors = {n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in state.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"the state lacks {left[:3]}: cannot write a complete model")
    model.save_pretrained(target)


def set_state(model: Any, state: State) -> None:
    import torch

    params = dict(trainable_parameters(model))
    if set(params) != set(state):
        extra, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise ValueError(f"state does not match the model: unexpected {extra[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            p = params[name]
            if tuple(p.shape) != value.shape:
                raise ValueError(f"{name}: shape {value.shape}, model has {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(p.dtype))


def mean_loss(model: Any, batches: list[Any]) -> float:
    """Mean loss over the batches, on the model's device; one host sync at the end."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float32, device=device)
    with torch.no_grad():
        for b in batches:
            total += model(**b.model_inputs(device)).loss.float()
    return float(total) / max(len(batches), 1)


def build_tiny_model(
    out: Path,
    seed: int = 0,
    n_embd: int = 128,
    n_layer: int = 2,
    n_head: int = 4,
    pretrain_text: str | None = None,
    pretrain_steps: int = 300,
) -> Path:
    """A small byte-level GPT-2 built from a config (no download), saved in Hugging Face layout.

    With `pretrain_text`, it is first trained briefly on that public text, so the
    federated job fine-tunes a model that already knows something, as in real use.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedjob.tokenization import BYTE_VOCAB

    seed_everything(seed)
    config = GPT2Config(
        vocab_size=BYTE_VOCAB,
        n_positions=512,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    if pretrain_text:
        from fedjob.windows import TokenStream

        pretrain(
            model,
            TokenStream(np.frombuffer(pretrain_text.encode(), dtype=np.uint8), 64),
            pretrain_steps,
            seed,
        )
    model.save_pretrained(out)
    return out


def pretrain(model: Any, stream: Any, steps: int, seed: int) -> None:
    """A brief pre-training of an example model on public text (AdamW, batches of 16), on the CPU."""
    import torch

    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**stream.random_batch(rng, 16).model_inputs("cpu")).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
