"""The FederatedSilo document: one external silo's side of a federation, in the silo's own cluster or machine.

It names the federation (aggregator endpoint, job, silo, the CA's pinned hash, the bootstrap
token) and what stays with the silo (its data, its copy of the model, its GPUs and placement).
The job itself (model, training, compression, ...) comes from the aggregator once the silo holds
a certificate: `job_for_silo` puts the two together into the FederatedJob the worker runs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedjob.spec import (
    DNS_LABEL,
    DataSpec,
    FederatedJob,
    ObjectMeta,
    ResourcesSpec,
    SpecError,
    StorageSpec,
    VolumeSpec,
    _Spec,
    format_errors,
    parse_job,
)

SILO_KIND = "FederatedSilo"
CA_HASH = r"^sha256:[0-9a-f]{64}$"
HOST_PORT = r"^[A-Za-z0-9.\-:\[\]]+:[0-9]{1,5}$"
ENROLLMENT_PORT = 50052


class EndpointSpec(_Spec):
    address: str = Field(pattern=HOST_PORT, description="host:port of the aggregator's mTLS gRPC port.")
    enrollment_address: str | None = Field(
        None,
        pattern=HOST_PORT,
        description=f"host:port of its enrollment port (default: the address's host, port "
        f"{ENROLLMENT_PORT}).",
    )
    server_name: str | None = Field(
        None,
        description="The name to expect in the aggregator's certificate (default <job>-aggregator): the "
        "certificate is checked against the pinned job CA, whatever address reaches it.",
    )

    def enrollment(self) -> str:
        if self.enrollment_address:
            return self.enrollment_address
        host = self.address.rsplit(":", 1)[0]
        return f"{host}:{ENROLLMENT_PORT}"


class SecretKeyRef(_Spec):
    name: Annotated[str, Field(min_length=1, max_length=253)]
    key: str = "token"


class SiloModelSpec(_Spec):
    path: str | None = Field(
        None, description="This silo's copy of the job's model (Hugging Face layout), when the job has one."
    )
    volume: VolumeSpec | None = Field(None, description="In a cluster: the volume holding `path`.")


class FederatedSiloSpec(_Spec):
    aggregator: EndpointSpec
    job: Annotated[str, Field(min_length=1, max_length=30, pattern=DNS_LABEL)]
    silo: Annotated[str, Field(min_length=1, max_length=24, pattern=DNS_LABEL)]
    ca_hash: str = Field(
        pattern=CA_HASH, description="sha256 of the job CA's public key, from the job's owner (pinned)."
    )
    token_secret: SecretKeyRef | None = Field(
        None,
        description="In a cluster: the Secret (in this namespace) holding the bootstrap token. Used once; "
        "the silo's key and certificate then live in a Secret of this cluster.",
    )
    model: SiloModelSpec = Field(default_factory=SiloModelSpec)
    data: DataSpec
    processes: int | None = Field(
        None, ge=1, le=64, description="Training processes; must match what the job's owner expects."
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    storage: StorageSpec = Field(default_factory=lambda: StorageSpec(size="1Gi"))
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    affinity: dict[str, Any] | None = None
    backoff_limit: int = Field(4, ge=0, le=100)
    image: str | None = Field(None, min_length=1, description="The worker image (default: the operator's).")


class FederatedSilo(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)
    api_version: Literal["fedjob.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FederatedSilo"]
    metadata: ObjectMeta
    spec: FederatedSiloSpec
    status: dict[str, Any] | None = None


def parse_silo(doc: Any, source: str = "<document>") -> FederatedSilo:
    from pydantic import ValidationError

    try:
        return FederatedSilo.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(source, format_errors(exc)) from None


def job_for_silo(owner_doc: dict[str, Any], silo: FederatedSilo) -> FederatedJob:
    """The job the aggregator sent, with this silo's own data, model path and processes filled in."""
    doc = dict(owner_doc)
    spec = dict(doc["spec"])
    s = silo.spec
    entries = []
    problems = []
    for entry in spec["silos"]:
        if entry["name"] != s.silo:
            entries.append(entry)
            continue
        expected = int(entry.get("processes", 1))
        if s.processes is not None and s.processes != expected:
            problems.append(
                f"spec.processes: the job's owner expects {expected} training processes for silo "
                f"{s.silo!r}, not {s.processes} (its evaluation and weights are checked against it)"
            )
        own = {k: v for k, v in entry.items() if k not in ("external", "data")}
        # Where and how it runs is the silo's business: its side's values, not the owner's.
        dumped = s.model_dump(mode="json", by_alias=True, exclude_none=True)
        for key in (
            "data",
            "resources",
            "storage",
            "nodeSelector",
            "tolerations",
            "affinity",
            "backoffLimit",
        ):
            if key in dumped:
                own[key] = dumped[key]
        entries.append(own)
    if len(entries) == len(spec["silos"]) and not any(e["name"] == s.silo for e in spec["silos"]):
        problems.append(f"spec.silo: job {s.job!r} has no silo {s.silo!r}")
    spec["silos"] = entries
    model = dict(spec["model"])
    if "path" in model:
        if not s.model.path:
            problems.append(
                "spec.model.path: the job trains a model from a folder; say where this silo's copy is"
            )
        else:
            model["path"] = s.model.path
        model.pop("volume", None)
        if s.model.volume is not None:
            model["volume"] = s.model.volume.model_dump(mode="json", by_alias=True, exclude_none=True)
    spec["model"] = model
    if problems:
        raise SpecError(f"FederatedSilo {silo.metadata.name}", tuple(problems))
    doc["spec"] = spec
    return parse_job(doc, f"job {s.job} for silo {s.silo}")
