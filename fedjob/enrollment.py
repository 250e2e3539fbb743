"""Enrollment of an external silo: a one-time bootstrap token, a key that never leaves the silo, a pinned CA.

The enrollment call travels outside mTLS (the silo has no certificate yet), on a channel that
nobody authenticates, as kubeadm's discovery does. What makes it safe is in the messages:

- the token's secret never travels: the silo sends the token's id and an HMAC, keyed by the
  secret, of the job, its silo name and its CSR. A listener learns nothing it could enroll
  with, and a replayed request only certifies the silo's own public key again;
- the reply carries the job CA, which the silo accepts only if its hash equals the pin the
  owner handed over with the token, and a certificate that this CA signed for the silo's key.

The owner's side (the operator in a cluster, `fedjob run` locally) holds the CA key and the
tokens; it is the `Authority`. The aggregator only relays requests to it and enforces which
certificate of each silo is current.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from fedjob.tls import (
    Identity,
    KeyPair,
    ca_hash,
    identity_of,
    serial_of,
    sign_public_key,
    write_file,
)
from fedjob.v1 import fedjob_pb2 as pb

TOKEN = re.compile(r"^([a-z0-9]{6})\.([a-z0-9]{16})$")
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
DEFAULT_TTL_SECONDS = 24 * 3600
# A silo renews once less than this share of its certificate's lifetime is left.
RENEW_AT_REMAINING = 1 / 3


class Refused(Exception):
    """An enrollment the owner's side will not sign, with a reason code and a sentence for the silo."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class BootstrapToken:
    """`<id>.<secret>`, as kubeadm's bootstrap tokens: the id names the token, the secret proves it."""

    id: str
    secret: str

    @classmethod
    def new(cls) -> BootstrapToken:
        def draw(n: int) -> str:
            return "".join(secrets.choice(_ALPHABET) for _ in range(n))

        return cls(draw(6), draw(16))

    @classmethod
    def parse(cls, text: str) -> BootstrapToken:
        m = TOKEN.match(text.strip())
        if m is None:
            raise ValueError("a bootstrap token looks like abcdef.0123456789abcdef (6 + 16 of [a-z0-9])")
        return cls(m.group(1), m.group(2))

    def __str__(self) -> str:
        return f"{self.id}.{self.secret}"


@dataclass
class TokenRecord:
    """What the owner's side keeps of a token it issued."""

    id: str
    secret: str
    silo: str
    expires: float  # unix time
    used_by: str = ""  # fingerprint of the public key it enrolled
    cert_pem: str = ""  # and the certificate issued for it (a replay gets the same one)


@dataclass(frozen=True)
class EnrollmentRequest:
    job: str
    silo: str
    token_id: str
    proof: str  # hex HMAC-SHA256 keyed by the token's secret
    csr_pem: bytes


@dataclass(frozen=True)
class RenewalRequest:
    """A silo that holds a current certificate asks for a new one (over mTLS: no token)."""

    job: str
    silo: str
    serial: str  # of the certificate it called with
    csr_pem: bytes


@dataclass(frozen=True)
class Issued:
    ca_pem: bytes
    cert_pem: bytes


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("a silo key must be an EC key")
    return key


def make_csr(key: ec.EllipticCurvePrivateKey, job: str, silo: str) -> bytes:
    """A CSR for the silo's identity. Its signature proves the silo holds the key; the identity the
    certificate gets is decided by the owner's side, from the token, not taken from here."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, silo)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(Identity(job, "silo", silo).uri)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def proof(secret: str, job: str, silo: str, csr_pem: bytes) -> str:
    message = b"\0".join([b"fedjob-enroll-v1", job.encode(), silo.encode(), csr_pem])
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def request(token: BootstrapToken, job: str, silo: str, key: ec.EllipticCurvePrivateKey) -> EnrollmentRequest:
    csr = make_csr(key, job, silo)
    return EnrollmentRequest(job, silo, token.id, proof(token.secret, job, silo, csr), csr)


def fingerprint(public_key: object) -> str:
    assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _checked_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise Refused("bad_csr", f"not a PEM certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise Refused("bad_csr", "the CSR's signature does not verify (it must be signed by its own key)")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise Refused("bad_csr", f"EC curve {key.curve.name} is not accepted (P-256 or P-384)")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise Refused("bad_csr", f"an RSA key of {key.key_size} bits is too short (2048 at least)")
    else:
        raise Refused("bad_csr", "the key must be EC (P-256, P-384) or RSA")
    return csr


# ----- the owner's side --------------------------------------------------------------------------------


class Registry(Protocol):
    """Where the owner's side keeps tokens and each external silo's valid certificates."""

    def token(self, token_id: str) -> TokenRecord | None: ...

    def mark_used(self, record: TokenRecord) -> None: ...

    def certificates(self, silo: str) -> list[bytes]: ...

    def set_certificates(self, silo: str, certs: list[bytes]) -> None: ...


def _unexpired(certs: list[bytes], now: dt.datetime | None = None) -> list[bytes]:
    now = now or dt.datetime.now(dt.UTC)
    return [c for c in certs if x509.load_pem_x509_certificate(c).not_valid_after_utc > now]


class Authority:
    """Checks enrollment and renewal requests against the job and its tokens, and signs them.

    Only the holder of the CA key runs this: the operator, or `fedjob run` on one machine."""

    def __init__(
        self,
        job: str,
        ca: KeyPair,
        registry: Registry,
        external: set[str],
        revoked: set[str],
        days: float = 30,
    ) -> None:
        self.job = job
        self.ca = ca
        self.registry = registry
        self.external = external
        self.revoked = revoked
        self.days = days

    def _sign(self, silo: str, csr: x509.CertificateSigningRequest, keep: list[bytes]) -> Issued:
        key = csr.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)  # RSA is refused before
        cert = sign_public_key(self.ca, key, Identity(self.job, "silo", silo), days=self.days)
        self.registry.set_certificates(silo, [*_unexpired(keep), cert])
        return Issued(self.ca.cert_pem, cert)

    def _silo_may_enroll(self, silo: str) -> None:
        if silo in self.revoked:
            raise Refused("revoked", f"silo {silo!r} is revoked from job {self.job!r} (spec.revokedSilos)")
        if silo not in self.external:
            raise Refused(
                "not_external",
                f"silo {silo!r} of job {self.job!r} is not external: its certificate is issued by the "
                "operator",
            )

    def enroll(self, req: EnrollmentRequest, now: float | None = None) -> Issued:
        now = time.time() if now is None else now
        if req.job != self.job:
            raise Refused("wrong_job", f"this aggregator serves job {self.job!r}, not {req.job!r}")
        record = self.registry.token(req.token_id)
        if record is None:
            raise Refused(
                "unknown_token", f"no bootstrap token {req.token_id!r} was issued for job {self.job!r}"
            )
        if not hmac.compare_digest(proof(record.secret, req.job, req.silo, req.csr_pem), req.proof):
            raise Refused("wrong_token", f"the proof does not match token {req.token_id!r}'s secret")
        if record.silo != req.silo:
            raise Refused(
                "wrong_silo", f"token {req.token_id!r} is for silo {record.silo!r}, not {req.silo!r}"
            )
        self._silo_may_enroll(req.silo)
        csr = _checked_csr(req.csr_pem)
        if isinstance(csr.public_key(), rsa.RSAPublicKey):
            raise Refused("bad_csr", "enrollment signs EC keys (P-256 or P-384)")
        if record.used_by:
            if record.used_by == fingerprint(csr.public_key()) and record.cert_pem:
                return Issued(self.ca.cert_pem, record.cert_pem.encode())  # the same request again
            raise Refused(
                "used_token", f"token {req.token_id!r} has been used; ask the job's owner for a new one"
            )
        if now >= record.expires:
            when = dt.datetime.fromtimestamp(record.expires, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            raise Refused("expired_token", f"token {req.token_id!r} expired at {when}")
        issued = self._sign(req.silo, csr, keep=[])  # a new enrollment replaces every earlier certificate
        record.used_by = fingerprint(csr.public_key())
        record.cert_pem = issued.cert_pem.decode()
        self.registry.mark_used(record)
        return issued

    def renew(self, req: RenewalRequest) -> Issued:
        if req.job != self.job:
            raise Refused("wrong_job", f"this aggregator serves job {self.job!r}, not {req.job!r}")
        self._silo_may_enroll(req.silo)
        valid = _unexpired(self.registry.certificates(req.silo))
        if req.serial not in {serial_of(c) for c in valid}:
            raise Refused(
                "superseded",
                f"certificate {req.serial} is no longer valid for silo {req.silo!r}; enroll again",
            )
        csr = _checked_csr(req.csr_pem)
        if isinstance(csr.public_key(), rsa.RSAPublicKey):
            raise Refused("bad_csr", "enrollment signs EC keys (P-256 or P-384)")
        # The calling certificate stays valid until it expires: the silo switches at its own pace.
        return self._sign(req.silo, csr, keep=[c for c in valid if serial_of(c) == req.serial])

    def valid_serials(self) -> list[tuple[str, str]]:
        """(silo, serial) of every external silo's certificates that may call."""
        return [
            (silo, serial_of(c))
            for silo in sorted(self.external)
            for c in _unexpired(self.registry.certificates(silo))
        ]


def new_token_record(
    silo: str, ttl_seconds: float = DEFAULT_TTL_SECONDS
) -> tuple[BootstrapToken, TokenRecord]:
    token = BootstrapToken.new()
    return token, TokenRecord(token.id, token.secret, silo, time.time() + ttl_seconds)


@dataclass
class FileRegistry:
    """Tokens and current certificates as files in a private folder (`fedjob run`, one machine)."""

    root: Path

    def _dir(self, sub: str) -> Path:
        d = self.root / sub
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return d

    def add_token(self, record: TokenRecord) -> None:
        write_file(self._dir("tokens") / f"{record.id}.json", json.dumps(asdict(record)).encode(), 0o600)

    def tokens(self) -> list[TokenRecord]:
        return [TokenRecord(**json.loads(p.read_text())) for p in sorted(self._dir("tokens").glob("*.json"))]

    def token(self, token_id: str) -> TokenRecord | None:
        if not re.fullmatch(r"[a-z0-9]{6}", token_id):
            return None
        path = self._dir("tokens") / f"{token_id}.json"
        return TokenRecord(**json.loads(path.read_text())) if path.exists() else None

    def mark_used(self, record: TokenRecord) -> None:
        self.add_token(record)

    def certificates(self, silo: str) -> list[bytes]:
        path = self._dir("enrolled") / f"{silo}.pem"
        return split_pem(path.read_bytes()) if path.exists() else []

    def set_certificates(self, silo: str, certs: list[bytes]) -> None:
        write_file(self._dir("enrolled") / f"{silo}.pem", b"".join(certs), 0o600)


def split_pem(data: bytes) -> list[bytes]:
    """The certificates of a PEM bundle, each as its own PEM."""
    end = b"-----END CERTIFICATE-----"
    return [part.strip() + b"\n" + end + b"\n" for part in data.split(end) if part.strip()]


# ----- the silo's side ---------------------------------------------------------------------------------


def accept(issued: Issued, pin: str, key: ec.EllipticCurvePrivateKey, job: str, silo: str) -> Issued:
    """Check a reply before trusting anything in it: the CA must be the pinned one, and the certificate
    must be that CA's, for this silo's own key and identity."""
    try:
        ca = x509.load_pem_x509_certificate(issued.ca_pem)
        cert = x509.load_pem_x509_certificate(issued.cert_pem)
    except ValueError as exc:
        raise Refused("bad_reply", f"the reply holds no valid certificate: {exc}") from None
    got = ca_hash(issued.ca_pem)
    if not hmac.compare_digest(got, pin):
        raise Refused(
            "ca_mismatch",
            f"the aggregator presented CA {got}, not the pinned {pin}: not the job's owner, or a wrong pin",
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise Refused("bad_reply", f"the certificate is not signed by the pinned CA ({exc!r})") from None
    if fingerprint(cert.public_key()) != fingerprint(key.public_key()):
        raise Refused("bad_reply", "the certificate is for another key than this silo's")
    ident = identity_of(issued.cert_pem)
    if ident != Identity(job, "silo", silo):
        raise Refused("bad_reply", f"the certificate names {ident.uri}, not this silo")
    return issued


def check_pin(pin: str) -> str:
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", pin):
        raise ValueError("a CA hash looks like sha256:<64 hex digits> (`fedjob silo token` prints it)")
    return pin


def needs_renewal(cert_pem: bytes, now: dt.datetime | None = None) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    now = now or dt.datetime.now(dt.UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return (end - now) < (end - start) * RENEW_AT_REMAINING


# ----- the owner's half of SyncEnrollments ------------------------------------------------------------


def resolve(authority: Authority, pending: pb.PendingEnrollment) -> pb.EnrollmentOutcome:
    """One waiting request, signed or refused with its reason."""
    try:
        if pending.renew_serial:
            issued = authority.renew(
                RenewalRequest(authority.job, pending.silo, pending.renew_serial, bytes(pending.csr_pem))
            )
        else:
            issued = authority.enroll(
                EnrollmentRequest(
                    authority.job, pending.silo, pending.token_id, pending.proof, bytes(pending.csr_pem)
                )
            )
    except Refused as exc:
        return pb.EnrollmentOutcome(
            request_id=pending.request_id, refusal_reason=exc.reason, refusal_message=exc.message
        )
    return pb.EnrollmentOutcome(request_id=pending.request_id, ca_pem=issued.ca_pem, cert_pem=issued.cert_pem)


def exchange(authority: Authority, send: Callable[[pb.EnrollmentSync], pb.PendingEnrollments]) -> int:
    """One sync with the aggregator: push the ledger, take what waits, hand back its outcomes.
    Returns how many requests were answered. `send` is the SyncEnrollments call."""

    def ledger(outcomes: list[pb.EnrollmentOutcome]) -> pb.EnrollmentSync:
        return pb.EnrollmentSync(
            outcomes=outcomes,
            certificates=[pb.SiloCertificate(silo=s, serial=n) for s, n in authority.valid_serials()],
            revoked=sorted(authority.revoked),
        )

    pending = send(ledger([]))
    if not pending.requests:
        return 0
    outcomes = [resolve(authority, p) for p in pending.requests]
    send(ledger(outcomes))
    return len(outcomes)
