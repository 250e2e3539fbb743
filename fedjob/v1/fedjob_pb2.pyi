from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DiscoverRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class DiscoverReply(_message.Message):
    __slots__ = ("ca_pem",)
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    ca_pem: bytes
    def __init__(self, ca_pem: _Optional[bytes] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("job", "silo", "token_id", "proof", "csr_pem")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SILO_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    job: str
    silo: str
    token_id: str
    proof: str
    csr_pem: bytes
    def __init__(self, job: _Optional[str] = ..., silo: _Optional[str] = ..., token_id: _Optional[str] = ..., proof: _Optional[str] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class EnrollReply(_message.Message):
    __slots__ = ("ca_pem", "cert_pem")
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    ca_pem: bytes
    cert_pem: bytes
    def __init__(self, ca_pem: _Optional[bytes] = ..., cert_pem: _Optional[bytes] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    def __init__(self, csr_pem: _Optional[bytes] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JobDocument(_message.Message):
    __slots__ = ("yaml",)
    YAML_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    def __init__(self, yaml: _Optional[str] = ...) -> None: ...

class PendingEnrollment(_message.Message):
    __slots__ = ("request_id", "silo", "token_id", "proof", "csr_pem", "renew_serial")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SILO_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    RENEW_SERIAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    silo: str
    token_id: str
    proof: str
    csr_pem: bytes
    renew_serial: str
    def __init__(self, request_id: _Optional[str] = ..., silo: _Optional[str] = ..., token_id: _Optional[str] = ..., proof: _Optional[str] = ..., csr_pem: _Optional[bytes] = ..., renew_serial: _Optional[str] = ...) -> None: ...

class PendingEnrollments(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[PendingEnrollment]
    def __init__(self, requests: _Optional[_Iterable[_Union[PendingEnrollment, _Mapping]]] = ...) -> None: ...

class EnrollmentOutcome(_message.Message):
    __slots__ = ("request_id", "ca_pem", "cert_pem", "refusal_reason", "refusal_message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_REASON_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    ca_pem: bytes
    cert_pem: bytes
    refusal_reason: str
    refusal_message: str
    def __init__(self, request_id: _Optional[str] = ..., ca_pem: _Optional[bytes] = ..., cert_pem: _Optional[bytes] = ..., refusal_reason: _Optional[str] = ..., refusal_message: _Optional[str] = ...) -> None: ...

class SiloCertificate(_message.Message):
    __slots__ = ("silo", "serial")
    SILO_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    silo: str
    serial: str
    def __init__(self, silo: _Optional[str] = ..., serial: _Optional[str] = ...) -> None: ...

class EnrollmentSync(_message.Message):
    __slots__ = ("outcomes", "certificates", "revoked")
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[EnrollmentOutcome]
    certificates: _containers.RepeatedCompositeFieldContainer[SiloCertificate]
    revoked: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[EnrollmentOutcome, _Mapping]]] = ..., certificates: _Optional[_Iterable[_Union[SiloCertificate, _Mapping]]] = ..., revoked: _Optional[_Iterable[str]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("expected_silo", "worker_version")
    EXPECTED_SILO_FIELD_NUMBER: _ClassVar[int]
    WORKER_VERSION_FIELD_NUMBER: _ClassVar[int]
    expected_silo: str
    worker_version: str
    def __init__(self, expected_silo: _Optional[str] = ..., worker_version: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("job", "silo", "current_round", "total_rounds", "max_chunk_bytes", "codecs")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SILO_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    job: str
    silo: str
    current_round: int
    total_rounds: int
    max_chunk_bytes: int
    codecs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job: _Optional[str] = ..., silo: _Optional[str] = ..., current_round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., codecs: _Optional[_Iterable[str]] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("after_round", "wait_seconds")
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    after_round: int
    wait_seconds: float
    def __init__(self, after_round: _Optional[int] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("state", "round", "deadline_unix", "message")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Task.State]
        TRAIN: _ClassVar[Task.State]
        WAIT: _ClassVar[Task.State]
        DONE: _ClassVar[Task.State]
        FAILED: _ClassVar[Task.State]
        EVALUATE: _ClassVar[Task.State]
    STATE_UNSPECIFIED: Task.State
    TRAIN: Task.State
    WAIT: Task.State
    DONE: Task.State
    FAILED: Task.State
    EVALUATE: Task.State
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    state: Task.State
    round: int
    deadline_unix: float
    message: str
    def __init__(self, state: _Optional[_Union[Task.State, str]] = ..., round: _Optional[int] = ..., deadline_unix: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("round", "have")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    HAVE_FIELD_NUMBER: _ClassVar[int]
    round: int
    have: str
    def __init__(self, round: _Optional[int] = ..., have: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("seq", "tensor", "offset", "count", "codec", "payload", "crc32", "params", "base", "result")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    tensor: TensorSpec
    offset: int
    count: int
    codec: str
    payload: bytes
    crc32: int
    params: _containers.RepeatedScalarFieldContainer[float]
    base: str
    result: str
    def __init__(self, seq: _Optional[int] = ..., tensor: _Optional[_Union[TensorSpec, _Mapping]] = ..., offset: _Optional[int] = ..., count: _Optional[int] = ..., codec: _Optional[str] = ..., payload: _Optional[bytes] = ..., crc32: _Optional[int] = ..., params: _Optional[_Iterable[float]] = ..., base: _Optional[str] = ..., result: _Optional[str] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "upload_id", "num_samples", "local_steps", "train_loss", "total_chunks", "raw_bytes", "resume_from", "eval_loss", "eval_samples")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    round: int
    upload_id: str
    num_samples: int
    local_steps: int
    train_loss: float
    total_chunks: int
    raw_bytes: int
    resume_from: int
    eval_loss: float
    eval_samples: int
    def __init__(self, round: _Optional[int] = ..., upload_id: _Optional[str] = ..., num_samples: _Optional[int] = ..., local_steps: _Optional[int] = ..., train_loss: _Optional[float] = ..., total_chunks: _Optional[int] = ..., raw_bytes: _Optional[int] = ..., resume_from: _Optional[int] = ..., eval_loss: _Optional[float] = ..., eval_samples: _Optional[int] = ...) -> None: ...

class EvaluationReport(_message.Message):
    __slots__ = ("round", "loss", "samples")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    round: int
    loss: float
    samples: int
    def __init__(self, round: _Optional[int] = ..., loss: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class EvaluationReceipt(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class ProgressReport(_message.Message):
    __slots__ = ("round", "phase", "step", "steps")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: str
    step: int
    steps: int
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[str] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ...) -> None: ...

class ProgressReceipt(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateTrailer(_message.Message):
    __slots__ = ("total_chunks",)
    TOTAL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    total_chunks: int
    def __init__(self, total_chunks: _Optional[int] = ...) -> None: ...

class UploadMessage(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: Chunk
    trailer: UpdateTrailer
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., trailer: _Optional[_Union[UpdateTrailer, _Mapping]] = ...) -> None: ...

class UploadReceipt(_message.Message):
    __slots__ = ("round", "bytes_received", "accepted")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    round: int
    bytes_received: int
    accepted: bool
    def __init__(self, round: _Optional[int] = ..., bytes_received: _Optional[int] = ..., accepted: _Optional[bool] = ...) -> None: ...

class QueryUploadRequest(_message.Message):
    __slots__ = ("round", "upload_id")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    round: int
    upload_id: str
    def __init__(self, round: _Optional[int] = ..., upload_id: _Optional[str] = ...) -> None: ...

class QueryUploadReply(_message.Message):
    __slots__ = ("next_seq",)
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    next_seq: int
    def __init__(self, next_seq: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SiloStatus(_message.Message):
    __slots__ = ("name", "state", "last_round", "last_train_loss", "bytes_up", "scored_round", "update_norm", "update_cosine", "update_norm_zscore", "weight_share", "progress")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    SCORED_ROUND_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    UPDATE_COSINE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_ZSCORE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SHARE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    last_round: int
    last_train_loss: float
    bytes_up: int
    scored_round: int
    update_norm: float
    update_cosine: float
    update_norm_zscore: float
    weight_share: float
    progress: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., last_round: _Optional[int] = ..., last_train_loss: _Optional[float] = ..., bytes_up: _Optional[int] = ..., scored_round: _Optional[int] = ..., update_norm: _Optional[float] = ..., update_cosine: _Optional[float] = ..., update_norm_zscore: _Optional[float] = ..., weight_share: _Optional[float] = ..., progress: _Optional[str] = ...) -> None: ...

class RoundMetrics(_message.Message):
    __slots__ = ("round", "train_loss", "eval_loss", "participants", "bytes_up", "bytes_down", "compression_ratio", "seconds")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_RATIO_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    round: int
    train_loss: float
    eval_loss: float
    participants: int
    bytes_up: int
    bytes_down: int
    compression_ratio: float
    seconds: float
    def __init__(self, round: _Optional[int] = ..., train_loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., participants: _Optional[int] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., compression_ratio: _Optional[float] = ..., seconds: _Optional[float] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job", "phase", "round", "total_rounds", "silos", "last_round", "message", "updates_rejected", "federated_eval_loss", "federated_eval_round", "dp", "dp_epsilon", "dp_delta", "dp_target_epsilon", "privacy_budget_spent", "initial_eval_loss")
    JOB_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SILOS_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    UPDATES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_EVAL_ROUND_FIELD_NUMBER: _ClassVar[int]
    DP_FIELD_NUMBER: _ClassVar[int]
    DP_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    DP_TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_BUDGET_SPENT_FIELD_NUMBER: _ClassVar[int]
    INITIAL_EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    job: str
    phase: str
    round: int
    total_rounds: int
    silos: _containers.RepeatedCompositeFieldContainer[SiloStatus]
    last_round: RoundMetrics
    message: str
    updates_rejected: int
    federated_eval_loss: float
    federated_eval_round: int
    dp: bool
    dp_epsilon: float
    dp_delta: float
    dp_target_epsilon: float
    privacy_budget_spent: bool
    initial_eval_loss: float
    def __init__(self, job: _Optional[str] = ..., phase: _Optional[str] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., silos: _Optional[_Iterable[_Union[SiloStatus, _Mapping]]] = ..., last_round: _Optional[_Union[RoundMetrics, _Mapping]] = ..., message: _Optional[str] = ..., updates_rejected: _Optional[int] = ..., federated_eval_loss: _Optional[float] = ..., federated_eval_round: _Optional[int] = ..., dp: _Optional[bool] = ..., dp_epsilon: _Optional[float] = ..., dp_delta: _Optional[float] = ..., dp_target_epsilon: _Optional[float] = ..., privacy_budget_spent: _Optional[bool] = ..., initial_eval_loss: _Optional[float] = ...) -> None: ...
