"""DICOM TLS of the SCP and the SCUs on loopback: BCP 195 non-downgrading, peer certificates checked."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
import warnings
import xml.etree.ElementTree as ET

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from osteonode import audit
from osteonode.config import AuditSettings, Destination, Settings, TLSSettings
from osteonode.dispatch import echo, send_files
from osteonode.errors import DeliveryFailed
from osteonode.ingest.scp import start_scp
from osteonode.network import client_context


@contextlib.contextmanager
def _node(tmp_path, tls_pki, cert="node"):
    """The node's SCP in this process, TLS only, with the test CA and certificate ``cert``; yields the settings."""
    tls = TLSSettings(certificate=getattr(tls_pki, f"{cert}_cert"), private_key=getattr(tls_pki, f"{cert}_key"),
                      ca_bundle=tls_pki.ca)
    settings = Settings(bind_address="127.0.0.1", port=_free_port(), spool_dir=tmp_path / "spool",
                        outbox_dir=tmp_path / "outbox", queue_dir=tmp_path / "queue", tls=tls,
                        network_timeout_s=2.0)
    server = start_scp(settings)
    try:
        yield settings
    finally:
        server.shutdown()


@pytest.fixture
def tls_node(tmp_path, tls_pki):
    """(settings, port) of a TLS-only node SCP with the ``node`` certificate."""
    with _node(tmp_path, tls_pki) as settings:
        yield settings, settings.port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peer(tls_pki, *, cert=None, key=None) -> TLSSettings:
    return TLSSettings(certificate=cert or tls_pki.peer_cert, private_key=key or tls_pki.peer_key,
                       ca_bundle=tls_pki.ca)


def test_store_and_echo_over_tls_reach_the_spool(tls_node, tls_pki, tmp_path, tiny_ct):
    settings, port = tls_node
    ct = tiny_ct(tmp_path / "ct.dcm")
    destination = Destination(name="node", ae_title="OSTEONODE", host="127.0.0.1", port=port, tls=True)
    assert echo(destination, calling_ae_title="PEER", timeout_s=5, tls=_peer(tls_pki)) == 0x0000
    send_files([ct], destination, calling_ae_title="PEER", timeout_s=5, tls=_peer(tls_pki))
    ds = pydicom.dcmread(ct)
    assert (settings.spool_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm").is_file()


def test_plain_tcp_caller_and_untrusted_certificate_are_refused_and_audited(tls_node, tls_pki, tmp_path):
    settings, port = tls_node
    audit_file = tmp_path / "audit.log"
    audit.configure_audit(settings.model_copy(update={"audit": AuditSettings(file=audit_file)}))
    plain = Destination(name="node", ae_title="OSTEONODE", host="127.0.0.1", port=port)
    with pytest.raises(DeliveryFailed, match="not established"):
        echo(plain, calling_ae_title="PEER", timeout_s=3)
    rogue = Destination(name="node", ae_title="OSTEONODE", host="127.0.0.1", port=port, tls=True)
    # the rogue certificate is self-signed: the node refuses it; and the rogue trusts only itself
    rogue_tls = TLSSettings(certificate=tls_pki.rogue_cert, private_key=tls_pki.rogue_key,
                            ca_bundle=tls_pki.ca)
    try:
        with pytest.raises(DeliveryFailed, match="TLS"):
            echo(rogue, calling_ae_title="PEER", timeout_s=3, tls=rogue_tls)
        deadline = time.monotonic() + 5
        while (audit_file.read_text() if audit_file.exists() else "").count("<AuditMessage>") < 2 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        audit._trail = None
    alerts = [ET.fromstring(line) for line in audit_file.read_text().splitlines()]
    assert [a.find("EventIdentification/EventID").get("csd-code") for a in alerts] == ["110113", "110113"]
    reasons = [a.find("EventIdentification/EventOutcomeDescription").text for a in alerts]
    assert "TLS handshake failed: WRONG_VERSION_NUMBER" in reasons  # plain TCP
    assert "TLS handshake failed: CERTIFICATE_VERIFY_FAILED" in reasons  # the self-signed certificate


def test_tls_1_1_is_refused_and_a_stalled_handshake_does_not_block_others(tls_node, tls_pki):
    _, port = tls_node
    ctx = client_context(_peer(tls_pki))
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: that is the point
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")  # let this client really offer TLS 1.1
    with socket.create_connection(("127.0.0.1", port), timeout=3) as raw:
        with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", port), timeout=3):  # connects, never says hello
        ae = AE(ae_title="PEER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="OSTEONODE",
                             tls_args=(client_context(_peer(tls_pki)), "127.0.0.1"))
        assert assoc.is_established
        assoc.release()


def test_server_certificate_must_name_the_host(tmp_path, tls_pki):
    with _node(tmp_path, tls_pki, cert="elsewhere") as settings:
        destination = Destination(name="node", ae_title="OSTEONODE", host="127.0.0.1", port=settings.port, tls=True)
        with pytest.raises(DeliveryFailed, match="not established"):
            echo(destination, calling_ae_title="PEER", timeout_s=3, tls=_peer(tls_pki))
        lax = _peer(tls_pki).model_copy(update={"check_hostname": False})
        assert echo(destination, calling_ae_title="PEER", timeout_s=3, tls=lax) == 0x0000
