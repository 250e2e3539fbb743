"""External silos enroll with a one-time token; their keys never leave them; the owner can revoke them.

The rules (fedjob/enrollment.py) are checked directly; then the same over real gRPC: the
aggregator's enrollment port, its desk, and an owner that syncs with it over mTLS as the
operator does. The two-machine case, `fedjob run` plus `fedjob silo join`, is in
test_external_silos.py.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from fedjob_aggregator import servicer as servicer_module
from fedjob_aggregator.coordinator import Coordinator
from fedjob_aggregator.enrollment_desk import EnrollmentDesk
from fedjob_aggregator.metrics import AggregatorMetrics
from fedjob_aggregator.server import build_enrollment_server, build_server
from fedjob_aggregator.servicer import FederatedTrainingServicer

from fedjob.enrollment import (
    Authority,
    BootstrapToken,
    EnrollmentRequest,
    FileRegistry,
    Issued,
    Refused,
    RenewalRequest,
    accept,
    exchange,
    make_csr,
    new_token_record,
    request,
)
from fedjob.enrollment_client import EnrollmentFailed, enroll, fetch_job, renew
from fedjob.spec import SpecError, parse_job
from fedjob.strategies import make_strategy
from fedjob.tls import (
    CertFiles,
    Identity,
    KeyPair,
    ca_hash,
    create_ca,
    identity_of,
    key_pem,
    new_key,
    serial_of,
    write_job_certs,
)
from fedjob.v1 import fedjob_pb2 as pb
from fedjob.v1 import fedjob_pb2_grpc as pb_grpc
from tests.conftest import job_doc

JOB = "demo"


def external_job(**overrides: object) -> dict[str, object]:
    return job_doc(
        silos=[
            {"name": "alpha", "data": {"path": "/data/a"}},
            {"name": "beta", "external": True},
            {"name": "gamma", "external": True},
        ],
        **overrides,
    )


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(JOB, create_ca(JOB), FileRegistry(tmp_path / "owner"), {"beta"}, set(), days=30)


def token_for(authority: Authority, silo: str = "beta", ttl: float = 3600) -> BootstrapToken:
    token, record = new_token_record(silo, ttl)
    assert isinstance(authority.registry, FileRegistry)
    authority.registry.add_token(record)
    return token


# ----- the rules ---------------------------------------------------------------------------------------


def test_a_token_reads_as_kubeadm_writes_it_and_a_ca_hash_pins_the_public_key() -> None:
    token = BootstrapToken.new()
    assert BootstrapToken.parse(str(token)) == token
    with pytest.raises(ValueError, match=r"abcdef\.0123456789abcdef"):
        BootstrapToken.parse("abc.def")
    ca = create_ca(JOB)
    pin = ca_hash(ca.cert_pem)
    assert pin.startswith("sha256:") and len(pin) == 7 + 64
    assert ca_hash(create_ca(JOB).cert_pem) != pin


def test_the_silo_gets_a_certificate_for_its_own_key_and_the_request_carries_no_secret(
    authority: Authority,
) -> None:
    token = token_for(authority)
    key = new_key()
    req = request(token, JOB, "beta", key)
    everything = b"".join(
        [req.job.encode(), req.silo.encode(), req.token_id.encode(), req.proof.encode(), req.csr_pem]
    )
    assert token.secret.encode() not in everything
    assert b"PRIVATE KEY" not in everything
    issued = accept(authority.enroll(req), ca_hash(authority.ca.cert_pem), key, JOB, "beta")
    assert identity_of(issued.cert_pem) == Identity(JOB, "silo", "beta")
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    assert cert.public_key() == key.public_key()
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs(life.total_seconds() - 30 * 86400) < 1


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong secret", "wrong_token"),
        ("unknown id", "unknown_token"),
        ("another silo's name", "wrong_silo"),
        ("expired", "expired_token"),
        ("reused with another key", "used_token"),
        ("a hosted silo", "not_external"),
        ("revoked", "revoked"),
        ("a forged CSR", "bad_csr"),
    ],
)
def test_an_enrollment_is_refused_with_its_reason_and_changes_nothing(
    authority: Authority, case: str, reason: str
) -> None:
    token = token_for(authority, ttl=-1 if case == "expired" else 3600)
    silo = "beta"
    key = new_key()
    if case == "reused with another key":
        authority.enroll(request(token, JOB, "beta", new_key()))
    before = authority.valid_serials()
    if case == "wrong secret":
        token = BootstrapToken(token.id, "x" * 16)
    elif case == "unknown id":
        token = BootstrapToken("zzzzzz", token.secret)
    elif case == "another silo's name":
        authority.external.add("alpha")  # a token for beta, a CSR and name of alpha
        silo = "alpha"
    elif case == "a hosted silo":
        authority.external.discard("beta")
    elif case == "revoked":
        authority.revoked.add("beta")
    req = request(token, JOB, silo, key)
    if case == "a forged CSR":  # the CSR of one key, re-labelled with another's public key
        other = make_csr(new_key(), JOB, "beta")
        req = EnrollmentRequest(JOB, "beta", token.id, req.proof, other.replace(b"A", b"B", 1))
        from fedjob.enrollment import proof

        req = EnrollmentRequest(
            JOB, "beta", token.id, proof(token.secret, JOB, "beta", req.csr_pem), req.csr_pem
        )
    with pytest.raises(Refused) as refused:
        authority.enroll(req)
    assert refused.value.reason == reason, refused.value
    assert authority.valid_serials() == before


def test_the_same_request_again_gets_the_same_certificate(authority: Authority) -> None:
    """A reply lost on the way: the silo asks again with the same key and token."""
    token = token_for(authority)
    key = new_key()
    first = authority.enroll(request(token, JOB, "beta", key))
    again = authority.enroll(request(token, JOB, "beta", key))
    assert again.cert_pem == first.cert_pem
    assert [s for _, s in authority.valid_serials()] == [serial_of(first.cert_pem)]


def test_the_silo_refuses_a_reply_from_another_ca_before_it_stores_anything(authority: Authority) -> None:
    token = token_for(authority)
    key = new_key()
    issued = authority.enroll(request(token, JOB, "beta", key))
    with pytest.raises(Refused, match="ca_mismatch") as refused:
        accept(issued, ca_hash(create_ca(JOB).cert_pem), key, JOB, "beta")
    assert "not the pinned" in refused.value.message
    impostor = create_ca(JOB)  # a reply signed by another CA, claiming the pinned one
    with pytest.raises(Refused, match="bad_reply"):
        accept(
            Issued(authority.ca.cert_pem, impostor_cert(impostor, key)),
            ca_hash(authority.ca.cert_pem),
            key,
            JOB,
            "beta",
        )
    with pytest.raises(Refused, match="another key"):
        accept(issued, ca_hash(authority.ca.cert_pem), new_key(), JOB, "beta")


def impostor_cert(ca: KeyPair, key: object) -> bytes:
    from fedjob.tls import sign_public_key

    return sign_public_key(ca, key.public_key(), Identity(JOB, "silo", "beta"))  # type: ignore[attr-defined]


def test_a_new_enrollment_replaces_every_earlier_certificate_and_a_renewal_overlaps(
    authority: Authority,
) -> None:
    first = authority.enroll(request(token_for(authority), JOB, "beta", new_key()))
    renewed = authority.renew(
        RenewalRequest(JOB, "beta", serial_of(first.cert_pem), make_csr(new_key(), JOB, "beta"))
    )
    assert {s for _, s in authority.valid_serials()} == {
        serial_of(first.cert_pem),
        serial_of(renewed.cert_pem),
    }
    lost_key = authority.enroll(request(token_for(authority), JOB, "beta", new_key()))
    assert {s for _, s in authority.valid_serials()} == {serial_of(lost_key.cert_pem)}
    with pytest.raises(Refused, match="superseded"):
        authority.renew(
            RenewalRequest(JOB, "beta", serial_of(first.cert_pem), make_csr(new_key(), JOB, "beta"))
        )


def test_a_job_names_its_external_silos_without_their_data() -> None:
    job = parse_job(external_job())
    assert job.external_silos() == ["beta", "gamma"] and job.hosted_silos() == ["alpha"]
    with pytest.raises(SpecError) as err:
        parse_job(
            job_doc(
                silos=[{"name": "a"}, {"name": "b", "external": True, "data": {"path": "/d"}}],
                revokedSilos=["c"],
            )
        )
    text = str(err.value)
    assert "silos[0].data: required (unless the silo is external)" in text
    assert "silos[1].data: an external silo sets its data on its own side" in text
    assert "revokedSilos: not silos of this job: c" in text


# ----- over gRPC -----------------------------------------------------------------------------------------


@dataclass
class Federation:
    job_certs: CertFiles
    authority: Authority
    address: str
    enrollment: str
    desk: EnrollmentDesk
    metrics: AggregatorMetrics
    coord: Coordinator

    def counted(self, kind: str, outcome: str) -> float:
        labels = {"federatedjob": JOB, "kind": kind, "outcome": outcome}
        return self.metrics.registry.get_sample_value("fedjob_enrollments_total", labels) or 0.0

    def sync_once(self) -> int:
        ca, cert, key = self.job_certs.load("observer")
        with grpc.secure_channel(self.address, grpc.ssl_channel_credentials(ca, key, cert)) as ch:
            stub = pb_grpc.FederatedTrainingStub(ch)
            return exchange(self.authority, lambda m: stub.SyncEnrollments(m, timeout=5))

    def silo_stub(self, issued: Issued, key: bytes) -> pb_grpc.FederatedTrainingStub:
        creds = grpc.ssl_channel_credentials(issued.ca_pem, key, issued.cert_pem)
        ch = grpc.secure_channel(
            self.address, creds, options=[("grpc.ssl_target_name_override", "demo-aggregator")]
        )
        return pb_grpc.FederatedTrainingStub(ch)


@contextlib.contextmanager
def federation(tmp_path: Path, owner_running: bool = True) -> Iterator[Federation]:
    job = parse_job(external_job(aggregation={"minSilos": 1, "roundDeadlineSeconds": 600}))
    certs = write_job_certs(tmp_path / "certs", job.name, job.hosted_silos())
    ca = KeyPair(certs.ca.read_bytes(), (certs.root / "ca.key").read_bytes())
    authority = Authority(job.name, ca, FileRegistry(tmp_path / "owner"), {"beta", "gamma"}, set(), days=30)
    state = {"w": np.zeros(8, dtype=np.float32)}
    metrics = AggregatorMetrics(job)
    coord = Coordinator(job, make_strategy(job.spec), state, tmp_path / "work", observe=metrics.observe)
    desk = EnrollmentDesk(tmp_path / "work" / "certificates.json", job.external_silos())
    servicer = FederatedTrainingServicer(job, coord, metrics, desk=desk)
    server, port, _ = build_server(job, servicer, certs, "127.0.0.1", 0)
    enrollment, enrollment_port = build_enrollment_server(job, desk, ca.cert_pem, metrics, "127.0.0.1", 0)
    server.start()
    enrollment.start()
    fed = Federation(
        certs, authority, f"127.0.0.1:{port}", f"127.0.0.1:{enrollment_port}", desk, metrics, coord
    )
    stop = threading.Event()

    def owner() -> None:  # what the operator does every sync
        while not stop.wait(0.2):
            with contextlib.suppress(grpc.RpcError):
                fed.sync_once()

    thread = threading.Thread(target=owner, daemon=True)
    if owner_running:
        thread.start()
    try:
        yield fed
    finally:
        stop.set()
        if owner_running:
            thread.join(5)
        server.stop(0).wait()
        enrollment.stop(0).wait()
        servicer.watch.stop()


def _enroll(
    fed: Federation, token: BootstrapToken, silo: str = "beta", pin: str | None = None
) -> tuple[Issued, bytes]:
    key = new_key()
    pin = pin or ca_hash(fed.authority.ca.cert_pem)
    return enroll(fed.enrollment, JOB, silo, token, pin, key), key_pem(key)


def test_an_external_silo_enrolls_over_the_wire_then_joins_over_mtls(tmp_path: Path) -> None:
    with federation(tmp_path) as fed:
        issued, key = _enroll(fed, token_for(fed.authority))
        reply = fed.silo_stub(issued, key).Join(pb.JoinRequest(expected_silo="beta"), timeout=10)
        assert reply.silo == "beta"
        doc = fetch_job(fed.address, "demo-aggregator", issued, key)
        silos = doc["spec"]["silos"]  # type: ignore[index]
        assert {"name": "alpha", "external": True, "processes": 1} in silos  # no data of another silo
        assert not any("data" in s for s in silos)
        assert fed.counted("enroll", "signed") == 1 and fed.counted("enroll", "refused") == 0


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [
        ("wrong token", grpc.StatusCode.PERMISSION_DENIED, "wrong_token"),
        ("reused token", grpc.StatusCode.PERMISSION_DENIED, "used_token"),
        ("expired token", grpc.StatusCode.PERMISSION_DENIED, "expired_token"),
        ("another silo's name", grpc.StatusCode.PERMISSION_DENIED, "wrong_silo"),
        ("hosted silo", grpc.StatusCode.FAILED_PRECONDITION, "not_external"),
        ("a silo not in the job", grpc.StatusCode.PERMISSION_DENIED, "wrong_silo"),
    ],
)
def test_a_refused_enrollment_says_why_over_the_wire(
    tmp_path: Path, case: str, code: grpc.StatusCode, reason: str
) -> None:
    with federation(tmp_path) as fed:
        silo = {
            "another silo's name": "gamma",
            "hosted silo": "alpha",
            "a silo not in the job": "nobody",
        }.get(case, "beta")
        owner = "alpha" if case == "hosted silo" else "beta"  # whom the owner made the token for
        token = token_for(fed.authority, owner, ttl=-1 if case == "expired token" else 3600)
        if case == "wrong token":
            token = BootstrapToken(token.id, "q" * 16)
        if case == "reused token":
            _enroll(fed, token)
        before = fed.authority.valid_serials()
        with pytest.raises(EnrollmentFailed) as failed:
            _enroll(fed, token, silo=silo)
        assert failed.value.reason == reason and failed.value.permanent, failed.value
        assert fed.authority.valid_serials() == before


def test_a_silo_with_the_wrong_pin_sends_nothing_and_its_token_stays_usable(tmp_path: Path) -> None:
    with federation(tmp_path) as fed:
        token = token_for(fed.authority)
        with pytest.raises(EnrollmentFailed) as failed:
            _enroll(fed, token, pin=ca_hash(create_ca(JOB).cert_pem))
        assert failed.value.reason == "ca_mismatch" and failed.value.permanent
        assert "nothing was sent" in failed.value.message
        _enroll(fed, token)  # with the right pin, the same token still enrolls


def test_without_an_owner_to_answer_enrollment_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servicer_module, "ANSWER_SECONDS", 0.5)
    with federation(tmp_path, owner_running=False) as fed:
        with pytest.raises(EnrollmentFailed) as failed:
            _enroll(fed, token_for(fed.authority))
        assert failed.value.reason == "unavailable" and not failed.value.permanent
        assert "did not answer" in failed.value.message
        assert fed.counted("enroll", "unanswered") == 1


def _join(fed: Federation, issued: Issued, key: bytes) -> grpc.StatusCode | None:
    try:
        fed.silo_stub(issued, key).Join(pb.JoinRequest(), timeout=10)
        return None
    except grpc.RpcError as exc:
        return exc.code()


def test_revocation_and_reenrollment_refuse_the_old_certificate_from_the_next_call_on(tmp_path: Path) -> None:
    with federation(tmp_path) as fed:
        first, first_key = _enroll(fed, token_for(fed.authority))
        assert _join(fed, first, first_key) is None
        # The key is lost: the owner hands over a new token; the old certificate is refused.
        second, second_key = _enroll(fed, token_for(fed.authority))
        fed.sync_once()
        assert _join(fed, first, first_key) == grpc.StatusCode.PERMISSION_DENIED
        assert _join(fed, second, second_key) is None
        # Renewal over mTLS: both the calling certificate and the new one are valid.
        fresh = new_key()
        renewed = renew(fed.address, "demo-aggregator", second, second_key, JOB, "beta", fresh)
        fed.sync_once()
        assert _join(fed, renewed, key_pem(fresh)) is None and _join(fed, second, second_key) is None
        fed.authority.revoked.add("beta")
        fed.sync_once()
        try:
            fed.silo_stub(renewed, key_pem(fresh)).Join(pb.JoinRequest(), timeout=10)
            raise AssertionError("a revoked silo joined")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "revoked" in (exc.details() or "")
        with pytest.raises(EnrollmentFailed, match="revoked"):
            _enroll(fed, token_for(fed.authority))
        # Rounds no longer sample or wait for it, and the status says why.
        states = {s.name: s.state for s in fed.coord.status().silos}
        assert states["beta"] == "revoked" and fed.coord.revoked == {"beta"}
        assert fed.coord.current is None or "beta" not in fed.coord.current.sampled
        fed.authority.revoked.discard("beta")  # taken off the list: it may call again
        fed.sync_once()
        assert fed.coord.revoked == frozenset()
        assert _join(fed, renewed, key_pem(fresh)) is None


def test_the_aggregator_keeps_the_ledger_across_a_restart(tmp_path: Path) -> None:
    with federation(tmp_path) as fed:
        first, first_key = _enroll(fed, token_for(fed.authority))
        _enroll(fed, token_for(fed.authority))
        fed.sync_once()
    time.sleep(0.1)
    with federation(tmp_path, owner_running=False) as fed:  # no owner has synced this one yet
        assert _join(fed, first, first_key) == grpc.StatusCode.PERMISSION_DENIED


def test_only_the_owner_may_sync_enrollments(tmp_path: Path) -> None:
    with federation(tmp_path) as fed:
        ca, cert, key = fed.job_certs.load("silo-alpha")
        creds = grpc.ssl_channel_credentials(ca, key, cert)
        with grpc.secure_channel(fed.address, creds) as ch, pytest.raises(grpc.RpcError) as denied:
            pb_grpc.FederatedTrainingStub(ch).SyncEnrollments(pb.EnrollmentSync(), timeout=5)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_running_worker_picks_up_a_replaced_certificate_at_its_next_call(tmp_path: Path) -> None:
    """A renewal (or a new enrollment) rewrites the silo's certificate files; the worker's client
    uses them from its next call on, without a restart."""
    from fedjob_worker.client import AggregatorClient

    from fedjob.tls import write_file

    folder = CertFiles(tmp_path / "silo")
    folder.root.mkdir()

    def keep(issued: Issued, key: bytes) -> None:
        write_file(folder.ca, issued.ca_pem, 0o644)
        write_file(folder.cert("silo-beta"), issued.cert_pem, 0o644)
        write_file(folder.key("silo-beta"), key, 0o600)

    with federation(tmp_path) as fed:
        keep(*_enroll(fed, token_for(fed.authority)))
        client = AggregatorClient(fed.address, folder, "beta", 4096, server_name="demo-aggregator")
        try:
            assert client.join().silo == "beta"
            # The key is lost and the silo enrolls again: the first certificate is refused from now on.
            time.sleep(0.01)  # a new mtime on coarse file systems
            keep(*_enroll(fed, token_for(fed.authority)))
            fed.sync_once()
            assert client.join().silo == "beta"
        finally:
            client.close()
