"""Per-job PKI: a job CA, a server certificate for the aggregator, one client certificate per silo.

Identity lives in a URI subject-alternative name, ``fedjob://<job>/<role>[/<silo>]``,
so the aggregator can authorise a caller from its verified certificate alone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

URI_SCHEME = "fedjob"


@dataclass(frozen=True)
class Identity:
    job: str
    role: str  # "aggregator", "silo" or "observer"
    name: str  # the silo's name; the role for the others

    @property
    def uri(self) -> str:
        tail = f"silo/{self.name}" if self.role == "silo" else self.role
        return f"{URI_SCHEME}://{self.job}/{tail}"

    @classmethod
    def from_uri(cls, uri: str) -> Identity:
        prefix = f"{URI_SCHEME}://"
        if not uri.startswith(prefix):
            raise ValueError(f"not a fedjob identity: {uri!r}")
        parts = uri[len(prefix) :].split("/")
        if len(parts) == 3 and parts[1] == "silo" and parts[2]:
            return cls(parts[0], "silo", parts[2])
        if len(parts) == 2 and parts[1] in ("aggregator", "observer"):
            return cls(parts[0], parts[1], parts[1])
        raise ValueError(f"not a fedjob identity: {uri!r}")


@dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(job: str, days: int = 365) -> KeyPair:
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedjob CA for {job}")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), key_pem(key))


def issue(
    ca: KeyPair,
    identity: Identity,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
    not_before: dt.datetime | None = None,
    days: float = 365,
) -> KeyPair:
    """A new key and a certificate for `identity` (the aggregator's for servers, the rest for clients)."""
    key = new_key()
    cert_pem = sign_public_key(ca, key.public_key(), identity, dns_names, ip_addresses, not_before, days)
    return KeyPair(cert_pem, key_pem(key))


def sign_public_key(
    ca: KeyPair,
    public_key: ec.EllipticCurvePublicKey,
    identity: Identity,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
    not_before: dt.datetime | None = None,
    days: float = 365,
) -> bytes:
    """Certify a key someone else holds (an enrolling silo's): the identity is ours to set, never theirs."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the job CA key must be an EC key")
    start = not_before or (_now() - dt.timedelta(minutes=5))
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    sans += [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH if identity.role == "aggregator" else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def ca_hash(ca_cert_pem: bytes) -> str:
    """The CA's pin, as `kubeadm join --discovery-token-ca-cert-hash` writes it: sha256 of its public key."""
    cert = x509.load_pem_x509_certificate(ca_cert_pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def serial_of(cert_pem: bytes) -> str:
    """A certificate's serial number in hex: how revocation and supersession name it."""
    return format(x509.load_pem_x509_certificate(cert_pem).serial_number, "x")


def identity_of(cert_pem: bytes) -> Identity:
    """The fedjob identity in a (TLS-verified) certificate; ValueError if it has none."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("certificate has no subject alternative name") from None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(URI_SCHEME)]
    if len(uris) != 1:
        raise ValueError(f"certificate must carry exactly one fedjob identity, has {len(uris)}")
    return Identity.from_uri(uris[0])


def aggregator_dns_names(job: str, namespace: str | None) -> tuple[str, ...]:
    names = ["localhost", f"{job}-aggregator"]
    if namespace:
        names += [f"{job}-aggregator.{namespace}", f"{job}-aggregator.{namespace}.svc"]
    return tuple(names)


@dataclass(frozen=True)
class CertFiles:
    """File layout of a job's certificates (the same names as the keys of the Kubernetes Secrets)."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    def cert(self, who: str) -> Path:
        return self.root / f"{who}.crt"

    def key(self, who: str) -> Path:
        return self.root / f"{who}.key"

    def load(self, who: str) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) PEM bytes for `who` ('aggregator', 'observer' or 'silo-<name>')."""
        return self.ca.read_bytes(), self.cert(who).read_bytes(), self.key(who).read_bytes()


def write_job_certs(
    root: Path, job: str, silos: list[str], namespace: str | None = None, days: int = 365
) -> CertFiles:
    """Create (or keep, if present and complete) the CA and every certificate of a job."""
    files = CertFiles(root)
    root.mkdir(parents=True, exist_ok=True)
    if files.ca.exists() and (root / "ca.key").exists():
        ca = KeyPair(files.ca.read_bytes(), (root / "ca.key").read_bytes())
    else:
        ca = create_ca(job, days)
        write_file(files.ca, ca.cert_pem, 0o644)
        write_file(root / "ca.key", ca.key_pem, 0o600)
    wanted = {
        "aggregator": Identity(job, "aggregator", "aggregator"),
        "observer": Identity(job, "observer", "observer"),
    }
    wanted |= {f"silo-{s}": Identity(job, "silo", s) for s in silos}
    for who, ident in wanted.items():
        if files.cert(who).exists() and files.key(who).exists():
            continue
        dns = aggregator_dns_names(job, namespace) if who == "aggregator" else ()
        ips = ("127.0.0.1", "::1") if who == "aggregator" else ()
        pair = issue(ca, ident, dns, ips, days=days)
        write_file(files.key(who), pair.key_pem, 0o600)
        write_file(files.cert(who), pair.cert_pem, 0o644)
    return files


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically, created with `mode` (a key is never readable by others, not even for a moment)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
