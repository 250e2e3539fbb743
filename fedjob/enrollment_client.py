"""The silo's calls of enrollment: enroll with a token, renew, fetch the job. Used by `fedjob silo join` and
by the operator reconciling a FederatedSilo; each keeps the key where it belongs (a folder, a Secret)."""

from __future__ import annotations

import grpc
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from fedjob.enrollment import BootstrapToken, Issued, Refused, accept, make_csr, request
from fedjob.tls import ca_hash
from fedjob.v1 import fedjob_pb2 as pb
from fedjob.v1 import fedjob_pb2_grpc as pb_grpc

CALL_SECONDS = 60.0


class EnrollmentFailed(Exception):
    """The owner's side refused (permanent: `reason` says which rule) or could not be reached."""

    def __init__(self, reason: str, message: str, permanent: bool) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.permanent = permanent


# Statuses after which asking again with the same input cannot succeed.
_PERMANENT = (
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
)


def _failed(exc: grpc.RpcError, where: str) -> EnrollmentFailed:
    code = exc.code()
    details = exc.details() or ""
    reason, _, message = details.partition(": ")
    if not message or " " in reason:
        reason, message = code.name.lower(), details or f"{where} answered {code.name}"
    return EnrollmentFailed(reason, message, code in _PERMANENT)


def enroll(
    address: str, job: str, silo: str, token: BootstrapToken, pin: str, key: ec.EllipticCurvePrivateKey
) -> Issued:
    """Ask the enrollment port to certify `key`; accept the reply only from the pinned CA.

    The CA is checked first: a silo with a wrong pin (or facing another server) sends nothing,
    and its token stays unused."""
    req = request(token, job, silo, key)
    message = pb.EnrollRequest(
        job=job, silo=silo, token_id=req.token_id, proof=req.proof, csr_pem=req.csr_pem
    )
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.EnrollmentStub(channel)
        try:
            found = stub.Discover(pb.DiscoverRequest(job=job), timeout=CALL_SECONDS)
            try:
                got = ca_hash(found.ca_pem)
            except ValueError as exc:
                raise EnrollmentFailed(
                    "bad_reply", f"the enrollment port sent no valid CA: {exc}", True
                ) from None
            if got != pin:
                raise EnrollmentFailed(
                    "ca_mismatch",
                    f"the aggregator at {address} presents CA {got}, not the pinned {pin}: not the job's "
                    "owner, or a wrong pin; nothing was sent",
                    permanent=True,
                )
            reply = stub.Enroll(message, timeout=CALL_SECONDS)
        except grpc.RpcError as exc:
            raise _failed(exc, f"the enrollment port {address}") from None
    try:
        return accept(Issued(reply.ca_pem, reply.cert_pem), pin, key, job, silo)
    except Refused as exc:
        raise EnrollmentFailed(exc.reason, exc.message, permanent=True) from None


def channel(address: str, ca: bytes, cert: bytes, key: bytes, server_name: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", server_name)])


def renew(
    address: str,
    server_name: str,
    current: Issued,
    current_key: bytes,
    job: str,
    silo: str,
    new_key: ec.EllipticCurvePrivateKey,
) -> Issued:
    """A new certificate for `new_key`, asked with the current one (over mTLS, no token)."""
    with channel(address, current.ca_pem, current.cert_pem, current_key, server_name) as ch:
        try:
            reply = pb_grpc.FederatedTrainingStub(ch).RenewCertificate(
                pb.RenewRequest(csr_pem=make_csr(new_key, job, silo)), timeout=CALL_SECONDS
            )
        except grpc.RpcError as exc:
            raise _failed(exc, f"the aggregator at {address}") from None
    try:
        return accept(Issued(reply.ca_pem, reply.cert_pem), ca_hash(current.ca_pem), new_key, job, silo)
    except Refused as exc:
        raise EnrollmentFailed(exc.reason, exc.message, permanent=True) from None


def fetch_job(address: str, server_name: str, issued: Issued, key: bytes) -> dict[str, object]:
    """The job document as the aggregator gives it to this silo."""
    with channel(address, issued.ca_pem, issued.cert_pem, key, server_name) as ch:
        try:
            reply = pb_grpc.FederatedTrainingStub(ch).GetJob(pb.GetJobRequest(), timeout=CALL_SECONDS)
        except grpc.RpcError as exc:
            raise _failed(exc, f"the aggregator at {address}") from None
    doc = yaml.safe_load(reply.yaml)
    if not isinstance(doc, dict):
        raise EnrollmentFailed("bad_reply", "the aggregator's job document is not a mapping", permanent=False)
    return doc
