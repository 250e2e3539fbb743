"""Only the job's silos get in: the TLS layer checks the CA, the aggregator checks the identity."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest

from fedjob.tls import Identity, KeyPair, create_ca, identity_of, issue
from fedjob.v1 import fedjob_pb2 as pb
from fedjob.v1 import fedjob_pb2_grpc as pb_grpc
from tests.conftest import LiveAggregator


def stub_with(agg: LiveAggregator, pair: KeyPair | None) -> pb_grpc.FederatedTrainingStub:
    ca = agg.certs.ca.read_bytes()
    creds = (
        grpc.ssl_channel_credentials(ca, pair.key_pem, pair.cert_pem)
        if pair
        else grpc.ssl_channel_credentials(ca)
    )
    return pb_grpc.FederatedTrainingStub(grpc.secure_channel(agg.address, creds))


def job_ca(agg: LiveAggregator) -> KeyPair:
    return KeyPair(agg.certs.ca.read_bytes(), (agg.certs.root / "ca.key").read_bytes())


def join(stub: pb_grpc.FederatedTrainingStub) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Join(pb.JoinRequest(), timeout=10)
    return info.value


def test_certificates_carry_the_identity_in_a_uri(tmp_path: Path) -> None:
    ca = create_ca("demo")
    pair = issue(ca, Identity("demo", "silo", "alpha"))
    assert identity_of(pair.cert_pem) == Identity("demo", "silo", "alpha")
    assert Identity.from_uri("fedjob://demo/aggregator").role == "aggregator"
    with pytest.raises(ValueError):
        Identity.from_uri("spiffe://demo/silo/alpha")


def test_each_silo_key_file_is_private(live_aggregator: LiveAggregator) -> None:
    for key in live_aggregator.certs.root.glob("*.key"):
        assert key.stat().st_mode & 0o077 == 0, key


def test_the_job_silo_gets_in(live_aggregator: LiveAggregator) -> None:
    _, cert, key = live_aggregator.certs.load("silo-alpha")
    reply = stub_with(live_aggregator, KeyPair(cert, key)).Join(pb.JoinRequest())
    assert reply.silo == "alpha"


def test_no_client_certificate_is_refused_at_the_tls_layer(live_aggregator: LiveAggregator) -> None:
    assert join(stub_with(live_aggregator, None)).code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_is_refused_at_the_tls_layer(live_aggregator: LiveAggregator) -> None:
    rogue = issue(create_ca("demo"), Identity("demo", "silo", "alpha"))
    assert join(stub_with(live_aggregator, rogue)).code() == grpc.StatusCode.UNAVAILABLE


def test_an_expired_certificate_is_refused_at_the_tls_layer(live_aggregator: LiveAggregator) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired = issue(job_ca(live_aggregator), Identity("demo", "silo", "alpha"), not_before=old, days=1)
    assert join(stub_with(live_aggregator, expired)).code() == grpc.StatusCode.UNAVAILABLE


def test_a_silo_that_is_not_in_the_job_is_refused(live_aggregator: LiveAggregator) -> None:
    stranger = issue(job_ca(live_aggregator), Identity("demo", "silo", "gamma"))
    err = join(stub_with(live_aggregator, stranger))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'gamma' is not part of job 'demo'" in err.details()


def test_a_certificate_for_another_job_is_refused(live_aggregator: LiveAggregator) -> None:
    other = issue(job_ca(live_aggregator), Identity("other-job", "silo", "alpha"))
    err = join(stub_with(live_aggregator, other))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_one_silo_cannot_upload_as_another(live_aggregator: LiveAggregator) -> None:
    """The request has no silo field to forge: beta's certificate makes every call beta's."""
    stub = live_aggregator.stub("silo-beta")
    with pytest.raises(grpc.RpcError) as info:
        stub.Join(pb.JoinRequest(expected_silo="alpha"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stub.Join(pb.JoinRequest()).silo == "beta"
