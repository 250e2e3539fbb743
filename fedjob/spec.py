"""The FederatedJob document: one pydantic model for `fedjob run`, the operator and the CRD.

The same YAML goes to `kubectl apply` and to `fedjob run`, so field names are the
Kubernetes camelCase ones and every constraint is expressed as a JSON-schema
keyword (bounds, enums, patterns) where it can be: the CRD's schema is generated
from this model, and the API server then enforces the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from fedjob.data_files import describe_expected, has_data
from fedjob.privacy_budget import BudgetError, plan_for

API_VERSION = "fedjob.io/v1alpha1"
KIND = "FederatedJob"

# Children are named "<job>-<silo>-..."; both parts stay short enough that the
# derived names fit Kubernetes' 63-character label limit.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$"
ABSOLUTE_PATH = r"^/"
PATTERN_RULES = {
    DNS_LABEL: "must be a DNS-1123 label (lower-case letters, digits and '-', "
    "starting and ending with a letter or digit)",
    DNS_SUBDOMAIN: "must be a DNS-1123 subdomain (lower-case letters, digits, '-' and '.')",
    QUANTITY: "must be a Kubernetes quantity such as 500m, 2, 10Gi",
    ABSOLUTE_PATH: "must be an absolute path",
}

TrainingMode = Literal["pretrain", "full", "lora", "prefix", "prompt", "adapter"]
PEFT_MODES = ("lora", "prefix", "prompt", "adapter")
Codec = Literal["none", "fp16", "bf16", "int8"]
Algorithm = Literal["fedavg", "fedprox", "scaffold", "fednova", "fedadam", "fedyogi", "fedadagrad", "diloco"]
RobustRule = Literal["median", "trimmedMean", "multiKrum", "normBound"]
DataFormat = Literal["text", "jsonl", "instruction", "chat"]
DOCUMENT_FORMATS = ("text", "jsonl")  # trained on whole; instruction and chat: on answers


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ObjectMeta(BaseModel):
    # Kubernetes adds many fields (uid, resourceVersion, ...): accept them.
    model_config = ConfigDict(extra="allow", frozen=True)
    name: Annotated[str, Field(min_length=1, max_length=30, pattern=DNS_LABEL)]
    namespace: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)] | None = None
    labels: dict[str, str] = {}


class PvcSource(_Spec):
    claim_name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)
    read_only: bool = True


class HostPathSource(_Spec):
    path: str = Field(min_length=1, pattern=ABSOLUTE_PATH)


class VolumeSpec(_Spec):
    """Where a folder comes from in a cluster; mounted at the folder's `path` in the pod."""

    persistent_volume_claim: PvcSource | None = None
    host_path: HostPathSource | None = None

    @model_validator(mode="after")
    def _one_source(self) -> VolumeSpec:
        if (self.persistent_volume_claim is None) == (self.host_path is None):
            raise ValueError("set exactly one of persistentVolumeClaim or hostPath")
        return self


class ModelSpec(_Spec):
    """Where the model comes from: a local Hugging Face-layout folder, or a config."""

    path: str | None = Field(None, description="Folder in Hugging Face layout (config.json + weights).")
    volume: VolumeSpec | None = Field(None, description="In a cluster: the volume holding `path`.")
    config: dict[str, Any] | None = Field(
        None, description="A transformers config (with model_type) for from-scratch pre-training."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.config is None):
            raise ValueError("set exactly one of path or config")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("config must name its model_type")
        return self


class LoraSpec(_Spec):
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["c_attn"], min_length=1
    )
    freeze_a: bool = Field(
        False,
        description="FFA-LoRA: keep A at its shared initial value and train only B, so averaging "
        "the silos' B is exactly averaging their updates B*A (and half the traffic).",
    )


class PromptSpec(_Spec):
    """prefix / prompt tuning: the learned virtual tokens."""

    num_virtual_tokens: int = Field(8, ge=1, le=1024)


class AdapterSpec(_Spec):
    """adapter mode: PEFT's (IA)^3 rescaling vectors on these modules."""

    target_modules: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["c_attn", "c_fc"], min_length=1
    )
    feedforward_modules: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=lambda: ["c_fc"])


class DeepSpeedSpec(_Spec):
    zero_stage: int = Field(2, ge=0, le=3)
    bf16: bool = False
    offload_optimizer: bool = False
    offload_parameters: bool = False
    gradient_clipping: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedSpec:
        if self.offload_parameters and self.zero_stage != 3:
            raise ValueError("offloadParameters needs zeroStage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offloadOptimizer needs zeroStage 1, 2 or 3")
        return self


class TrainingSpec(_Spec):
    mode: TrainingMode = "lora"
    local_steps: int = Field(10, ge=1, le=1_000_000)
    batch_size: int = Field(8, ge=1, le=4096, description="Micro-batch per process.")
    sequence_length: int = Field(128, ge=8, le=131072)
    learning_rate: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="The silos' local optimiser, fresh each round (scaffold's analysis assumes sgd)."
    )
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd only.")
    seed: int = Field(0, ge=0)
    tokenizer: Literal["model", "bytes"] | None = Field(
        None,
        description="model: the tokenizer in the model folder (loaded locally, never downloaded); bytes: "
        "UTF-8 bytes as ids (vocabulary 256). Default: model when the folder has one, else bytes.",
    )
    packing: Literal["auto", "packed", "padded"] = Field(
        "auto",
        description="instruction and chat examples: packed several to a window (each attends only to "
        "itself: positions restart per example), or padded one to a window. auto: packed where the "
        "model and mode support it (transformers' packed-sequence masks; not prefix/prompt tuning).",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec)
    prompt: PromptSpec = Field(default_factory=PromptSpec)
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)


class HeldOutSpec(_Spec):
    path: str = Field(
        min_length=1, description="The silo's held-out data, in the silo's format; never trained on."
    )
    volume: VolumeSpec | None = Field(None, description="In a cluster: the volume holding `path`.")


class InstructionFieldsSpec(_Spec):
    """The record fields of instruction data (Alpaca's by default); `input` may be absent or empty."""

    instruction: str = Field("instruction", min_length=1)
    input: str = Field("input", min_length=1)
    output: str = Field("output", min_length=1)


class ChatFieldsSpec(_Spec):
    """The record fields of chat data: OpenAI-style by default; ShareGPT's is
    {messages: conversations, role: from, content: value} (its roles human and gpt are read as
    user and assistant)."""

    messages: str = Field("messages", min_length=1)
    role: str = Field("role", min_length=1)
    content: str = Field("content", min_length=1)


class RecordFormatSpec(_Spec):
    """How a data path is read: what its records are and which fields hold the text."""

    format: DataFormat = Field(
        "text",
        description="text: .txt files, trained on whole; jsonl: records whose textField is trained on "
        "whole; instruction: {instruction, input, output} records, loss on the output only; chat: "
        "{messages: [{role, content}]} records (chatFields) rendered with the tokenizer's chat "
        "template, loss on assistant turns only. Records are read from .jsonl files, .parquet files "
        "or a Hugging Face datasets folder (save_to_disk).",
    )
    text_field: str = Field("text", min_length=1, description="jsonl: the field holding the text.")
    instruction_fields: InstructionFieldsSpec = Field(default_factory=InstructionFieldsSpec)
    chat_fields: ChatFieldsSpec = Field(default_factory=ChatFieldsSpec)


class DataSpec(RecordFormatSpec):
    path: str = Field(
        min_length=1,
        description="A folder or file of the silo's data in `format` (in the pod: where it is mounted).",
    )
    volume: VolumeSpec | None = Field(None, description="In a cluster: the volume holding `path`.")
    eval: HeldOutSpec | None = Field(
        None,
        description="The silo's own held-out data for federated evaluation; without it, evalFraction "
        "of its data is held out.",
    )
    eval_fraction: float | None = Field(
        None,
        gt=0,
        le=0.5,
        description="Share held out for federated evaluation (default evaluation.heldOutFraction): the "
        "tail of text, or a seeded sample of instruction/chat examples.",
    )


class ResourcesSpec(_Spec):
    requests: dict[str, Annotated[str, Field(pattern=QUANTITY)]] = {}
    limits: dict[str, Annotated[str, Field(pattern=QUANTITY)]] = {}
    gpus: int = Field(
        0,
        ge=0,
        le=64,
        description="nvidia.com/gpu per pod; for a silo, equal to its processes (one rank per GPU).",
    )


class StorageSpec(_Spec):
    size: str = Field("1Gi", pattern=QUANTITY)
    storage_class_name: str | None = Field(None, pattern=DNS_SUBDOMAIN)


class SiloSpec(_Spec):
    name: Annotated[str, Field(min_length=1, max_length=24, pattern=DNS_LABEL)]
    external: bool = Field(
        False,
        description="The silo runs in its own cluster or machine and joins with a bootstrap token "
        "(a FederatedSilo there, or `fedjob silo join`): no pod is made for it here, its key never "
        "leaves it, and its data and model path are set on its side.",
    )
    data: DataSpec | None = Field(None, description="The silo's data (required unless external).")
    processes: int = Field(1, ge=1, le=64, description="Training processes in this silo (torch distributed).")
    local_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="This silo's local steps per round, when it differs from training.localSteps "
        "(silos with more data or more compute; fednova normalises for it).",
    )
    max_samples: int | None = Field(
        None,
        ge=1,
        description="Cap on the sample count this silo may claim in its updates (its FedAvg weight); "
        "larger claims count as this many.",
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    storage: StorageSpec = Field(
        default_factory=lambda: StorageSpec(size="1Gi"),
        description="In a cluster: the silo's state volume, created when its uplink keeps state "
        "(topk's residual, one float32 per trained parameter).",
    )
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    affinity: dict[str, Any] | None = None
    backoff_limit: int = Field(4, ge=0, le=100, description="Pod retries before the silo counts as lost.")


class EvaluationSpec(_Spec):
    """Federated evaluation: every silo evaluates each global model on its own held-out text."""

    batches: int = Field(
        0,
        ge=0,
        le=10000,
        description="Held-out batches each silo process evaluates per round; 0 turns federated "
        "evaluation off.",
    )
    held_out_fraction: float = Field(
        0.1,
        gt=0,
        le=0.5,
        description="Share of a silo's text (its tail) kept out of training and evaluated on, for "
        "silos without a data.eval folder.",
    )


class EvalSpec(RecordFormatSpec):
    """Aggregator-side evaluation: the aggregator loads the whole model (on its GPU if it has one)."""

    path: str = Field(min_length=1)
    volume: VolumeSpec | None = Field(None, description="In a cluster: the volume holding `path`.")
    batches: int = Field(8, ge=1, le=10000)


class RobustSpec(_Spec):
    """A robust rule in front of the algorithm: what one malicious or broken silo can do is bounded."""

    rule: RobustRule = Field(
        description="median / trimmedMean / multiKrum: combine every update of the round (kept on "
        "the aggregator's disk, silos weighted equally); normBound: scale each update to maxNorm "
        "and average as the algorithm does (streams)."
    )
    trim_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="trimmedMean: share of the largest and of the smallest values dropped."
    )
    byzantine: int = Field(1, ge=0, description="multiKrum: f, the malicious silos to tolerate.")
    select: int | None = Field(
        None, ge=1, description="multiKrum: updates averaged (default: those reporting minus byzantine)."
    )
    max_norm: float | None = Field(
        None,
        gt=0,
        description="L2 bound on each update (the parameter deltas): required by normBound, optional "
        "before the other rules.",
    )


class AggregationSpec(_Spec):
    algorithm: Algorithm = "fedavg"
    min_silos: int = Field(1, ge=1)
    round_deadline_seconds: float = Field(600.0, gt=0, le=7 * 24 * 3600)
    proximal_mu: float = Field(
        0.01, ge=0, description="fedprox: weight of the proximal term in the silos' loss."
    )
    server_learning_rate: float = Field(0.01, gt=0, description="fedadam, fedyogi, fedadagrad.")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, description="Adaptivity: the optimisers' epsilon.")
    outer_learning_rate: float = Field(
        0.7, gt=0, le=10, description="diloco: the outer SGD's learning rate on the mean delta."
    )
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="diloco: the outer Nesterov momentum.")
    robust: RobustSpec | None = None
    silos_per_round: int | None = Field(
        None,
        ge=1,
        description="Silos sampled (uniformly, without replacement) to train each round; the others "
        "wait. minSilos and the deadline apply to the sampled silos. Default: every silo.",
    )
    max_weight_share: float = Field(
        1.0,
        gt=0,
        le=1,
        description="No silo's update may carry more than this share of a round's total weight; the "
        "excess is spread over the others in proportion.",
    )


class ClipStageSpec(_Spec):
    max_norm: float = Field(gt=0, description="L2 bound on the whole update (the parameter deltas).")


class TopKStageSpec(_Spec):
    fraction: float = Field(gt=0, le=1, description="Share of each tensor's values sent, the largest.")
    error_feedback: bool = Field(
        True,
        description="Keep what is not sent in a residual on the silo (checkpointed with it) and add it "
        "to the next round's update.",
    )
    block_size: int | None = Field(
        None,
        ge=2,
        le=1 << 24,
        description="Select per block of this many consecutive values instead of per tensor (chunked "
        "top-k: the values sent are spread over the whole tensor).",
    )


class QuantizeStageSpec(_Spec):
    bits: Literal[8, 4, 2] = Field(8, description="Bits per value: symmetric integers (2 bits: -1, 0, +1).")
    block_size: int = Field(128, ge=8, le=65536, description="Values that share one scale.")
    rounding: Literal["auto", "stochastic", "nearest"] = Field(
        "auto",
        description="stochastic: unbiased, scale max|x|; nearest: least-squares scale and nearest "
        "codes, less than half the error at 2 bits but biased; auto: nearest where error feedback "
        "owes the rounding to later rounds (the downlink; an uplink after topk with errorFeedback), "
        "else stochastic.",
    )


class ZstdStageSpec(_Spec):
    level: int = Field(3, ge=1, le=22)


class EmptySpec(_Spec):
    pass


# Stages that transform the whole update, then the wire stages that encode its slices.
UPDATE_STAGES = ("clip", "topk")
NUMBER_FORMATS = ("quantize", "fp16", "bf16")
STAGE_KINDS = (*UPDATE_STAGES, *NUMBER_FORMATS, "zstd")


class UplinkStageSpec(_Spec):
    """One stage of the silo's uplink chain: exactly one of its fields."""

    clip: ClipStageSpec | None = None
    topk: TopKStageSpec | None = None
    quantize: QuantizeStageSpec | None = None
    fp16: EmptySpec | None = None
    bf16: EmptySpec | None = None
    zstd: ZstdStageSpec | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> UplinkStageSpec:
        set_ = [k for k in STAGE_KINDS if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(
                f"each stage names exactly one of {', '.join(STAGE_KINDS)} (got {set_ or 'none'})"
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in STAGE_KINDS if getattr(self, k) is not None)


class CompressionSpec(_Spec):
    uplink: list[UplinkStageSpec] = Field(
        default_factory=list,
        max_length=8,
        description="The silos' uplink, in order: stages on the whole update (clip: bound the L2 norm; "
        "topk: send the largest values, keep the rest as error feedback), then how its slices are "
        "encoded (quantize, fp16 or bf16; then zstd). Without an encoding stage, codec and zstd apply.",
    )
    downlink: list[UplinkStageSpec] = Field(
        default_factory=list,
        max_length=8,
        description="Compress the global model's download: silos keep a copy and receive its change each "
        "round through these stages (topk, then quantize, fp16 or bf16, then zstd); what they leave "
        "out is sent in later rounds. Empty: the whole model as raw float32 every round.",
    )
    codec: Codec = Field("int8", description="The uplink's number format when uplink names none.")
    zstd: bool = Field(True, description="zstd after codec, when uplink names no encoding.")
    chunk_bytes: int = Field(1 << 20, ge=4096, le=4 << 20, description="Largest chunk payload on the wire.")

    @property
    def uplink_error_feedback(self) -> bool:
        """Whether the uplink keeps a residual that owes the encoding's rounding to later rounds."""
        return any(st.topk is not None and st.topk.error_feedback for st in self.uplink)


class StreamDeadlinesSpec(_Spec):
    """How long the aggregator holds a quiet upload stream before it cancels it and frees its slot."""

    header_seconds: float = Field(
        30.0, gt=0, le=3600, description="From opening an upload stream to its header."
    )
    idle_seconds: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="Between two messages of an upload (raise it for slow links: one chunk of "
        "chunkBytes must arrive within it).",
    )


class ServiceSpec(_Spec):
    """How the aggregator is reached. External silos need it from outside the cluster: a NodePort or
    LoadBalancer, or an Ingress/Gateway with TLS passthrough (mTLS must end at the aggregator)."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    annotations: dict[str, str] = {}
    port: int = Field(50051, ge=1, le=65535, description="The mTLS gRPC port of the Service.")
    enrollment_port: int = Field(
        50052,
        ge=1,
        le=65535,
        description="The enrollment port of the Service (external silos get their first certificate "
        "there; opened only when the job has external silos).",
    )
    node_port: int | None = Field(None, ge=30000, le=32767, description="NodePort: the gRPC port's.")
    enrollment_node_port: int | None = Field(None, ge=30000, le=32767)

    @model_validator(mode="after")
    def _ports(self) -> ServiceSpec:
        if self.port == self.enrollment_port:
            raise ValueError("port and enrollmentPort must differ")
        if self.type == "ClusterIP" and (self.node_port or self.enrollment_node_port):
            raise ValueError("nodePort and enrollmentNodePort need type NodePort or LoadBalancer")
        return self


class AggregatorSpec(_Spec):
    storage: StorageSpec = Field(default_factory=StorageSpec)
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    streams: StreamDeadlinesSpec = Field(default_factory=StreamDeadlinesSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)


class AdaptiveClippingSpec(_Spec):
    """Andrew et al. 2021: the clip norm follows a quantile of the silos' update norms."""

    target_quantile: float = Field(
        0.5, gt=0, lt=1, description="Share of updates that should fit under the clip norm."
    )
    learning_rate: float = Field(
        0.2, gt=0, le=10, description="Geometric step of the clip norm per round (the paper's 0.2)."
    )
    count_stddev: float | None = Field(
        None,
        gt=0,
        description="Std of the noise on the count of unclipped updates (default: silos per round / 20, "
        "the paper's choice). It spends part of the budget: the update noise grows so that the "
        "accounted noiseMultiplier holds for both together.",
    )


class DpSpec(_Spec):
    """Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): each silo's whole update is
    clipped, Gaussian noise is added to their sum, silos count equally."""

    clip_norm: float = Field(
        gt=0, description="L2 bound on each silo's update (the initial bound with adaptiveClipping)."
    )
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Noise std on the sum / clipNorm. Without it, computed from targetEpsilon so that "
        "every round fits the budget.",
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="The budget: the job stops (Succeeded, saying why) before a round would exceed it.",
    )
    delta: float = Field(gt=0, lt=1, description="The delta of (epsilon, delta)-DP; below 1 / silos.")
    noise: Literal["central", "distributed"] = Field(
        "central",
        description="central: the aggregator clips and adds the noise. distributed: each silo clips and "
        "adds its share (std / sqrt(silos per round)), for use with secure aggregation.",
    )
    adaptive_clipping: AdaptiveClippingSpec | None = None
    accountant: Literal["rdp", "pld"] = Field(
        "rdp", description="dp-accounting's Renyi (rdp) or privacy-loss-distribution (pld) accountant."
    )


class PrivacySpec(_Spec):
    dp: DpSpec | None = None


class EnrollmentSpec(_Spec):
    """External silos: their bootstrap tokens and certificates."""

    token_ttl_hours: float = Field(
        24, gt=0, le=24 * 365, description="How long a bootstrap token may be used, from its creation."
    )
    certificate_days: float = Field(
        30,
        gt=0,
        le=3650,
        description="Validity of an enrolled silo's certificate; the silo renews it when a third is left.",
    )


class ImagesSpec(_Spec):
    aggregator: str | None = Field(None, min_length=1)
    worker: str | None = Field(None, min_length=1)


class JobSpec(_Spec):
    model: ModelSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    silos: list[SiloSpec] = Field(min_length=1, max_length=1000)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    eval: EvalSpec | None = None
    rounds: int = Field(3, ge=1, le=100_000)
    aggregation: AggregationSpec = Field(default_factory=AggregationSpec)
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    aggregator: AggregatorSpec = Field(default_factory=AggregatorSpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    images: ImagesSpec = Field(default_factory=ImagesSpec)
    enrollment: EnrollmentSpec = Field(default_factory=EnrollmentSpec)
    revoked_silos: list[str] = Field(
        [],
        description="Silos refused from their next call on (their certificates and any enrollment); "
        "may change while the job runs.",
    )
    suspend: bool = False

    @model_validator(mode="after")
    def _cross_field_rules(self) -> JobSpec:
        # Every rule runs and adds what it finds: `fedjob validate` lists all problems in one pass
        # (a rule returns early only where the later ones would make no sense without it).
        problems: list[str] = []
        for rules in (
            self._silo_rules,
            self._training_rules,
            self._aggregation_rules,
            self._uplink_rules,
            self._privacy_rules,
        ):
            rules(problems)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _silo_rules(self, problems: list[str]) -> None:
        names = [s.name for s in self.silos]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"silos: names must be unique, repeated: {', '.join(dupes)}")
        for i, s in enumerate(self.silos):
            if s.external and s.data is not None:
                problems.append(
                    f"silos[{i}].data: an external silo sets its data on its own side (its FederatedSilo "
                    "or `fedjob silo join` file); leave it out here"
                )
            if not s.external and s.data is None:
                problems.append(f"silos[{i}].data: required (unless the silo is external)")
        unknown = sorted(set(self.revoked_silos) - set(names))
        if unknown:
            problems.append(f"revokedSilos: not silos of this job: {', '.join(unknown)}")
        if self.aggregation.min_silos > len(self.silos):
            problems.append(f"aggregation.minSilos: must be at most the number of silos ({len(self.silos)})")
        k = self.aggregation.silos_per_round
        if k is not None and k > len(self.silos):
            problems.append(
                f"aggregation.silosPerRound: must be at most the number of silos ({len(self.silos)})"
            )
        if k is not None and self.aggregation.min_silos > k:
            problems.append(f"aggregation.minSilos: must be at most silosPerRound ({k})")
        for i, s in enumerate(self.silos):
            if s.resources.gpus and s.processes != s.resources.gpus:
                problems.append(
                    f"silos[{i}].processes: must equal resources.gpus ({s.resources.gpus}): one training "
                    "process per GPU (NCCL refuses two ranks on one GPU, and a GPU without a rank idles)"
                )
        for i, s in enumerate(self.silos):
            if s.data is None:
                continue
            if self.evaluation.batches == 0 and s.data.eval is not None:
                problems.append(
                    f"silos[{i}].data.eval: needs evaluation.batches > 0 (federated evaluation is off)"
                )
            if s.data.eval is not None and s.data.eval_fraction is not None:
                problems.append(
                    f"silos[{i}].data.evalFraction: set either it or data.eval (a held-out path), not both"
                )
            if self.training.tokenizer == "bytes" and s.data.format == "chat":
                problems.append(
                    f"silos[{i}].data.format: chat data is rendered with the model's chat template; "
                    "training.tokenizer: bytes has none"
                )

    def _training_rules(self, problems: list[str]) -> None:
        a = self.training.adapter
        if self.training.mode == "adapter" and set(a.feedforward_modules) - set(a.target_modules):
            extra = sorted(set(a.feedforward_modules) - set(a.target_modules))
            problems.append(
                f"training.adapter.feedforwardModules: {', '.join(extra)} must also be in targetModules "
                "(IA3 scales only the modules it targets)"
            )
        if self.training.mode != "pretrain" and self.model.path is None:
            problems.append(
                f"model.path: training mode {self.training.mode!r} starts from a pretrained model"
            )
        if self.training.packing == "packed" and self.training.mode in ("prefix", "prompt"):
            problems.append(
                f"training.packing: packed examples need positions that restart per example; "
                f"{self.training.mode} tuning prepends virtual tokens to the whole window (use padded, auto)"
            )
        if self.training.tokenizer == "model" and self.model.path is None:
            problems.append("training.tokenizer: 'model' needs model.path (a folder with the tokenizer)")

    def _uplink_rules(self, problems: list[str]) -> None:
        c = self.compression
        kinds = [st.kind for st in c.uplink]
        for i, kind in enumerate(kinds):
            if kind in kinds[:i]:
                problems.append(f"compression.uplink[{i}]: {kind} appears twice; each stage at most once")
            if kind in UPDATE_STAGES and any(k not in UPDATE_STAGES for k in kinds[:i]):
                problems.append(
                    f"compression.uplink[{i}]: {kind} transforms the whole update; it goes before the "
                    "encoding stages (quantize, fp16, bf16, zstd)"
                )
            if kind in NUMBER_FORMATS and any(k in NUMBER_FORMATS for k in kinds[:i]):
                problems.append(f"compression.uplink[{i}]: {kind}: one number format per chain")
            if kind == "zstd" and i != len(kinds) - 1:
                problems.append(f"compression.uplink[{i}]: zstd compresses the encoded bytes; it goes last")
        for i, st in enumerate(c.uplink):
            if st.quantize is not None and st.quantize.rounding == "nearest" and not c.uplink_error_feedback:
                problems.append(
                    f"compression.uplink[{i}].quantize.rounding: nearest is biased (values under half a "
                    "step always round to zero); it needs a topk with errorFeedback before it to owe the "
                    "rounding to later rounds (topk: {fraction: 1} for the rounding alone), or rounding "
                    "stochastic"
                )
        self._downlink_rules(problems)
        encodes = any(k not in UPDATE_STAGES for k in kinds)
        if encodes and ({"codec", "zstd"} & c.model_fields_set):
            problems.append(
                "compression.codec: the uplink's encoding is set in compression.uplink; leave codec and "
                "zstd out (they apply only when uplink names no encoding)"
            )
        r = self.aggregation.robust
        if "topk" in kinds and r is not None and r.rule in ("median", "trimmedMean"):
            problems.append(
                f"compression.uplink: topk cannot combine with aggregation.robust.rule {r.rule} (each "
                "silo sends a different few coordinates, so the coordinate-wise rule sees mostly zeros "
                "and the model barely moves); use multiKrum or normBound"
            )

    def _downlink_rules(self, problems: list[str]) -> None:
        kinds = [st.kind for st in self.compression.downlink]
        for i, kind in enumerate(kinds):
            where = f"compression.downlink[{i}]"
            if kind == "clip":
                problems.append(f"{where}: clip bounds a silo's update; the downlink sends the global model")
            if kind in kinds[:i]:
                problems.append(f"{where}: {kind} appears twice; each stage at most once")
            if kind == "topk" and i != 0:
                problems.append(f"{where}: topk selects from the whole change; it goes first")
            if kind in NUMBER_FORMATS and any(k in NUMBER_FORMATS for k in kinds[:i]):
                problems.append(f"{where}: {kind}: one number format per chain")
            if kind == "zstd" and i != len(kinds) - 1:
                problems.append(f"{where}: zstd compresses the encoded bytes; it goes last")
        if kinds and self.aggregation.algorithm == "scaffold":
            problems.append(
                "compression.downlink: scaffold sends each silo its own control variates with the model; "
                "a compressed downlink carries the shared model only"
            )

    @property
    def silos_per_round(self) -> int:
        """Silos that train each round (all of them unless aggregation.silosPerRound says fewer)."""
        return self.aggregation.silos_per_round or len(self.silos)

    def _privacy_rules(self, problems: list[str]) -> None:
        """What differential privacy cannot combine with, named with the reason."""
        dp, a = self.privacy.dp, self.aggregation
        if dp is None:
            return
        before = len(problems)
        n = len(self.silos)
        if dp.noise_multiplier is None and dp.target_epsilon is None:
            problems.append("privacy.dp: set noiseMultiplier, targetEpsilon or both")
            return
        if dp.delta >= 1 / n:
            problems.append(
                f"privacy.dp.delta: must be below 1 / number of silos ({1 / n:.3g}); a delta that large "
                "allows releasing one silo's update outright"
            )
        if a.robust is not None:
            why = (
                "privacy.dp.clipNorm already bounds every update"
                if a.robust.rule == "normBound"
                else "it needs the raw updates, and a differentially private sum has noise only on the whole"
            )
            problems.append(f"aggregation.robust: {a.robust.rule} cannot combine with privacy.dp ({why})")
        if a.algorithm in ("scaffold", "fednova"):
            why = (
                "its control variates would leave the silos unclipped and without noise"
                if a.algorithm == "scaffold"
                else "it weighs silos by their own sample and step counts, which the noise does not cover"
            )
            problems.append(f"aggregation.algorithm: {a.algorithm} cannot combine with privacy.dp ({why})")
        if a.max_weight_share < 1:
            problems.append(
                "aggregation.maxWeightShare: privacy.dp weighs every silo equally (a sample-count "
                "weight would change the sensitivity); leave it at 1"
            )
        if any(st.clip is not None for st in self.compression.uplink):
            problems.append(
                "compression.uplink: a clip stage cannot combine with privacy.dp, whose clipNorm is "
                "the bound (the silos clip with it when noise is distributed)"
            )
        k = self.silos_per_round
        if dp.noise == "distributed" and dp.adaptive_clipping is not None:
            problems.append(
                "privacy.dp.adaptiveClipping: needs noise central (with distributed noise the silos "
                "clip with a fixed clipNorm before adding their share)"
            )
        if dp.accountant == "pld" and k < n:
            problems.append(
                "privacy.dp.accountant: pld does not account sampling a fixed number of silos "
                "(aggregation.silosPerRound); use rdp"
            )
        ac = dp.adaptive_clipping
        if ac is not None and dp.noise_multiplier is not None:
            sb = ac.count_stddev or k / 20
            if dp.noise_multiplier >= 2 * sb:
                problems.append(
                    f"privacy.dp.adaptiveClipping.countStddev: the count's noise ({sb:.3g}) spends more than "
                    f"the whole noiseMultiplier {dp.noise_multiplier:g} allows; it needs countStddev > "
                    f"{dp.noise_multiplier / 2:.3g}"
                )
        if k > n or len(problems) > before:
            # silosPerRound is refused on its own, and the budget of a plan with other problems
            # would only repeat them.
            return
        # The budget: the noise multiplier it needs, or whether the one given fits.
        try:
            plan_for(self)
        except BudgetError as exc:
            problems.append(str(exc))

    def _aggregation_rules(self, problems: list[str]) -> None:
        """Combinations of algorithm and robust rule that cannot work, named with the reason."""
        a, r = self.aggregation, self.aggregation.robust
        if a.max_weight_share < 1 and a.algorithm == "fednova":
            problems.append(
                "aggregation.maxWeightShare: fednova normalises by the silos' own sample counts and "
                "steps; cap claims with silos[].maxSamples instead"
            )
        if r is None:
            return
        if r.rule == "normBound" and r.max_norm is None:
            problems.append("aggregation.robust.maxNorm: required by rule normBound")
        if r.rule == "normBound":
            return
        if a.algorithm in ("fednova", "scaffold"):
            problems.append(
                f"aggregation.robust.rule: {r.rule} cannot combine with {a.algorithm} ({a.algorithm} "
                "needs the sample-weighted mean of every update; use normBound)"
            )
        n = len(self.silos)
        if r.rule == "trimmedMean" and int(r.trim_fraction * n) == 0:
            problems.append(
                f"aggregation.robust.trimFraction: {r.trim_fraction} of {n} silos trims nothing; "
                f"needs at least {1 / n:.3g}"
            )
        if r.rule == "trimmedMean" and 2 * int(r.trim_fraction * a.min_silos) >= a.min_silos:
            problems.append(
                f"aggregation.robust.trimFraction: trimming {r.trim_fraction} of each end leaves nothing "
                f"of a round with minSilos = {a.min_silos}"
            )
        if r.rule == "multiKrum":
            if a.min_silos < 2 * r.byzantine + 3:
                problems.append(
                    f"aggregation.robust.byzantine: multiKrum tolerates f silos only when every round has "
                    f"at least 2f + 3; minSilos is {a.min_silos}, f = {r.byzantine} needs "
                    f"{2 * r.byzantine + 3}"
                )
            if r.select is not None and r.select > n:
                problems.append(f"aggregation.robust.select: at most the number of silos ({n})")
        if r.rule == "median" and a.min_silos < 3:
            problems.append(
                f"aggregation.robust.rule: a median of fewer than 3 updates is their mean; minSilos is "
                f"{a.min_silos}, needs at least 3"
            )


class FederatedJob(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)
    api_version: Literal["fedjob.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FederatedJob"]
    metadata: ObjectMeta
    spec: JobSpec
    # The API server owns status; accepted so a `kubectl get -o yaml` round-trips.
    status: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    def silo(self, name: str) -> SiloSpec:
        for s in self.spec.silos:
            if s.name == name:
                return s
        raise KeyError(f"silo {name!r} is not in job {self.name!r} (silos: {self.silo_names()})")

    def silo_names(self) -> list[str]:
        return [s.name for s in self.spec.silos]

    def silo_data(self, name: str) -> DataSpec:
        """The data a silo trains on; only the silo's own side knows an external silo's."""
        data = self.silo(name).data
        if data is None:
            raise ValueError(f"silo {name!r} is external: its data is set on its own side")
        return data

    def external_silos(self) -> list[str]:
        return [s.name for s in self.spec.silos if s.external]

    def hosted_silos(self) -> list[str]:
        """The silos whose pods the owner's side runs."""
        return [s.name for s in self.spec.silos if not s.external]


def state_identity(spec: JobSpec, vocabulary: str | None = None) -> dict[str, Any]:
    """The fields that shape what a checkpoint holds: the trainable tensors, what their rows
    mean (`vocabulary`: the tokenizer's id-to-token mapping, in a line), the server's memory
    and the privacy ledger. A checkpoint resumes only under the same values; the others
    (rounds, deadlines, resources, silos' data, packing) may change between runs."""
    t = spec.training
    out: dict[str, Any] = {
        "model.config": spec.model.config,
        "training.mode": t.mode,
        "aggregation.algorithm": spec.aggregation.algorithm,
    }
    if vocabulary is not None:
        out["training.tokenizer"] = vocabulary
    section = {"lora": t.lora, "prefix": t.prompt, "prompt": t.prompt, "adapter": t.adapter}.get(t.mode)
    if section is not None:
        name = "prompt" if t.mode in ("prefix", "prompt") else t.mode
        for key, value in section.model_dump(by_alias=True).items():
            out[f"training.{name}.{key}"] = value
    dp = spec.privacy.dp
    for key, value in (dp.model_dump(by_alias=True) if dp else {}).items():
        out[f"privacy.dp.{key}"] = value
    if dp is None:
        out["privacy.dp"] = None
    return out


# Recorded by checkpoints only since a later version: one made before does not name them and
# is not refused for that.
LATER_IDENTITY_FIELDS = frozenset({"training.tokenizer"})


def identity_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'field: X in the checkpoint, Y in this spec' for every field that differs."""
    return [
        f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} in this spec"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k) and not (k in LATER_IDENTITY_FIELDS and k not in saved)
    ]


@dataclass(frozen=True)
class SpecError(Exception):
    """Every problem found in a document, each as 'field.path: rule'."""

    source: str
    problems: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.source}: invalid FederatedJob\n" + "\n".join(f"  {p}" for p in self.problems)


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "literal"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(err: Any) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "string_pattern_mismatch":
        return PATTERN_RULES.get(ctx.get("pattern", ""), f"must match {ctx.get('pattern')}")
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    msg: str = err["msg"]
    return msg[0].lower() + msg[1:]


def format_errors(exc: ValidationError) -> tuple[str, ...]:
    problems = []
    for err in exc.errors():
        where = _field_path(tuple(err["loc"]))
        # Cross-field rules report several problems, a line each.
        for msg in _message(err).split("\n") if err["type"] == "value_error" else [_message(err)]:
            path = where
            # Cross-field rules name their own field ("silos: ...") relative to spec.
            if ": " in msg and err["type"] == "value_error":
                rel, _, rest = msg.partition(": ")
                if " " not in rel:
                    path, msg = f"{path}.{rel}" if path else rel, rest
            problems.append(f"{path}: {msg}" if path else msg)
    return tuple(problems)


def parse_job(doc: Any, source: str = "<document>") -> FederatedJob:
    if not isinstance(doc, dict):
        raise SpecError(source, ("document must be a mapping with apiVersion, kind, metadata and spec",))
    try:
        return FederatedJob.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(source, format_errors(exc)) from None


_OVERRIDE_PART = re.compile(r"^([A-Za-z][A-Za-z0-9]*)((?:\[\d+\])*)$")


def apply_overrides(doc: Any, overrides: Sequence[str], source: str) -> Any:
    """`PATH=VALUE` edits of a document before validation (`--set spec.rounds=4`): the value is
    YAML (a number, a string, a list ...); PATH is dotted, with [i] for list items."""
    for item in overrides:
        path, sep, raw = item.partition("=")
        problem = f"--set {item}: "
        if not sep or not path:
            raise SpecError(source, (problem + "expected PATH=VALUE, e.g. spec.rounds=4",))
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise SpecError(source, (problem + "the value is not valid YAML",)) from None
        steps: list[str | int] = []
        for part in path.split("."):
            m = _OVERRIDE_PART.match(part)
            if m is None:
                raise SpecError(source, (problem + f"{part!r} is not a field name (with optional [i])",))
            steps.append(m.group(1))
            steps += [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
        node = doc
        for i, step in enumerate(steps[:-1]):
            nxt = steps[i + 1]
            if isinstance(step, int):
                if not isinstance(node, list) or step >= len(node):
                    raise SpecError(source, (problem + f"no item [{step}] there",))
                node = node[step]
            else:
                if not isinstance(node, dict):
                    raise SpecError(source, (problem + f"{step!r} is not inside a mapping",))
                node = node.setdefault(step, [] if isinstance(nxt, int) else {})
        last = steps[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise SpecError(source, (problem + f"no item [{last}] there",))
            node[last] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise SpecError(source, (problem + f"{last!r} is not inside a mapping",))
    return doc


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> FederatedJob:
    """Read and validate a FederatedJob file; relative paths are resolved against its folder."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(str(p), (f"cannot read file: {exc.strerror}",)) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(str(p), (f"not valid YAML: {exc}".replace("\n", " "),)) from None
    if overrides:
        doc = apply_overrides(doc, overrides, str(p))
    return resolve_paths(parse_job(doc, str(p)), p.resolve().parent)


def job_document(job: FederatedJob) -> dict[str, Any]:
    """The job as a document again (camelCase, defaults filled in): what `fedjob run` hands its
    components when `--set` changed the file's."""
    doc: dict[str, Any] = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    return doc


def document_for_silo(job: FederatedJob, silo: str) -> dict[str, Any]:
    """The job as one silo runs it: its own entry; the other silos by name only (their data and
    placement are none of its business), and neither the owner's model folder nor its eval set."""
    doc = job_document(job)
    spec = doc["spec"]
    spec["silos"] = [
        s if s["name"] == silo else {"name": s["name"], "external": True, "processes": s.get("processes", 1)}
        for s in spec["silos"]
    ]
    spec.pop("eval", None)
    spec["model"].pop("volume", None)
    doc.pop("status", None)
    return doc


def resolve_paths(job: FederatedJob, base: Path) -> FederatedJob:
    def absolute(value: str) -> str:
        return str((base / value).resolve()) if not Path(value).is_absolute() else value

    spec = job.spec
    model = (
        spec.model.model_copy(update={"path": absolute(spec.model.path)}) if spec.model.path else spec.model
    )

    def data(d: DataSpec) -> DataSpec:
        ev = d.eval.model_copy(update={"path": absolute(d.eval.path)}) if d.eval else None
        return d.model_copy(update={"path": absolute(d.path), "eval": ev})

    silos = [s.model_copy(update={"data": data(s.data)}) if s.data else s for s in spec.silos]
    ev = spec.eval.model_copy(update={"path": absolute(spec.eval.path)}) if spec.eval else None
    return job.model_copy(
        update={"spec": spec.model_copy(update={"model": model, "silos": silos, "eval": ev})}
    )


def local_path_problems(
    job: FederatedJob, silos: Collection[str] | None = None, with_eval: bool = True
) -> list[str]:
    """Missing folders on this machine (in a cluster: inside the pod).

    `silos` limits the data folders checked (None: all); a worker needs the model
    and its own data, the aggregator the model and the eval set.
    """
    problems = []
    if job.spec.model.path is not None:
        mp = Path(job.spec.model.path)
        if not mp.is_dir():
            problems.append(f"spec.model.path: folder not found: {mp}")
        elif not (mp / "config.json").is_file():
            problems.append(
                f"spec.model.path: no config.json in {mp} (expected a Hugging Face-layout folder)"
            )
    for i, s in enumerate(job.spec.silos):
        if (silos is not None and s.name not in silos) or s.data is None:
            continue
        problems += _data_path_problems(f"spec.silos[{i}].data.path", s.data.path, s.data)
        if s.data.eval is not None:
            problems += _data_path_problems(f"spec.silos[{i}].data.eval.path", s.data.eval.path, s.data)
    if with_eval and job.spec.eval is not None:
        problems += _data_path_problems("spec.eval.path", job.spec.eval.path, job.spec.eval)
    return problems


def _data_path_problems(field: str, path: str, fmt: RecordFormatSpec) -> list[str]:
    p = Path(path)
    if not p.exists():
        return [f"{field}: not found: {p}"]
    if has_data(p, fmt.format):
        return []
    return [f"{field}: no {fmt.format} data at {p} (expected {describe_expected(fmt.format)})"]
