"""DICOM TLS interoperability: dcmtk (storescu, echoscu, storescp with +tls) and Orthanc (DicomTlsEnabled).

Certificates come from the ``tls_pki`` fixture (a throw-away CA); every peer
uses dcmtk's default profile, the Non-downgrading BCP 195 TLS profile
(``+py``), and requires the other side's certificate.
"""

from __future__ import annotations

import subprocess
import sys

import pydicom
import pytest
from node import write_config
from services import ECHOSCU, STORESCU, OrthancServer, StoreSCP, run_tool, wait_for

pytestmark = pytest.mark.integration


def _tls_section(pki, cert: str = "node") -> str:
    return (f'[tls]\ncertificate = "{getattr(pki, cert + "_cert")}"\nprivate_key = "{getattr(pki, cert + "_key")}"\n'
            f'ca_bundle = "{pki.ca}"\n')


def _dcmtk_tls(pki) -> list[str]:
    """dcmtk's options: the peer certificate, the test CA, BCP 195 non-downgrading (the default, made explicit)."""
    return ["+tls", str(pki.peer_key), str(pki.peer_cert), "+cf", str(pki.ca), "+py"]


def _osteonode(*args: str, config) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "osteonode", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120)


def _spooled(spool) -> list:
    return sorted(p for p in spool.rglob("*.dcm"))


@pytest.fixture
def tls_serve(tmp_path, tls_pki, start_node):
    """``osteonode serve`` with [tls]: (spool folder, port)."""
    config, port = write_config(tmp_path / "node", broker_url=None, destinations=[], quiet_period_s=600,
                                extra=_tls_section(tls_pki))
    start_node(config, "serve", port=port)
    return tmp_path / "node" / "spool", port


def test_dcmtk_storescu_and_echoscu_over_tls_to_the_node(tls_serve, tls_pki, tmp_path, tiny_ct):
    spool, port = tls_serve
    ct = tiny_ct(tmp_path / "ct.dcm")
    run_tool([ECHOSCU, *_dcmtk_tls(tls_pki), "-aec", "OSTEONODE", "127.0.0.1", str(port)])
    run_tool([STORESCU, *_dcmtk_tls(tls_pki), "-aec", "OSTEONODE", "127.0.0.1", str(port), str(ct)])
    assert [p.name for p in _spooled(spool)] == [f"{pydicom.dcmread(ct).SOPInstanceUID}.dcm"]
    # without TLS, or with a certificate the node's CA did not sign, nothing gets in
    plain = run_tool([STORESCU, "-aec", "OSTEONODE", "127.0.0.1", str(port), str(ct)], check=False)
    rogue = run_tool([STORESCU, "+tls", str(tls_pki.rogue_key), str(tls_pki.rogue_cert), "+cf", str(tls_pki.ca),
                      "-aec", "OSTEONODE", "127.0.0.1", str(port), str(ct)], check=False)
    assert plain.returncode != 0 and rogue.returncode != 0
    assert len(_spooled(spool)) == 1


def test_osteonode_send_and_echo_over_tls_to_dcmtk_storescp(tmp_path, tls_pki, tiny_ct):
    scp = StoreSCP(tmp_path / "storescp", extra_args=_dcmtk_tls(tls_pki))
    scp.start()
    try:
        config, _ = write_config(tmp_path / "node", broker_url=None, destinations=[], extra=_tls_section(tls_pki))
        peer = ["--host", "127.0.0.1", "--port", str(scp.port), "--called-aet", "STORESCP", "--tls"]
        ct = tiny_ct(tmp_path / "ct.dcm")
        echo = _osteonode("echo", *peer, config=config)
        assert echo.returncode == 0 and "C-ECHO status 0x0000" in echo.stdout, echo.stderr
        sent = _osteonode("send", str(ct), *peer, config=config)
        assert sent.returncode == 0, sent.stderr
        received = scp.wait_for_files(1)
        assert pydicom.dcmread(received[0]).SOPInstanceUID == pydicom.dcmread(ct).SOPInstanceUID
        plain = _osteonode("echo", *peer[:-1], config=config)  # plain TCP to a TLS peer fails, exit 1
        assert plain.returncode == 1 and "echo failed" in plain.stderr
    finally:
        scp.stop()


def test_orthanc_with_dicom_tls_both_ways(tmp_path, tls_pki, tls_serve, tiny_ct):
    spool, node_port = tls_serve
    orthanc = OrthancServer(tmp_path / "orthanc", extra_config={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(tls_pki.peer_cert),
        "DicomTlsPrivateKey": str(tls_pki.peer_key),
        "DicomTlsTrustedCertificates": str(tls_pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": {"osteonode": {"AET": "OSTEONODE", "Host": "127.0.0.1", "Port": node_port,
                                          "UseDicomTls": True}},
    })
    orthanc.start()
    try:
        config, _ = write_config(tmp_path / "cli", broker_url=None, destinations=[], extra=_tls_section(tls_pki))
        ct = tiny_ct(tmp_path / "ct.dcm")
        study_uid = pydicom.dcmread(ct).StudyInstanceUID
        # osteonode -> Orthanc over TLS
        sent = _osteonode("send", str(ct), "--host", "127.0.0.1", "--port", str(orthanc.dicom_port),
                          "--called-aet", orthanc.aet, "--tls", config=config)
        assert sent.returncode == 0, sent.stderr
        orthanc_id = orthanc.wait_for_study(study_uid)
        # Orthanc -> osteonode over TLS (its C-STORE SCU with UseDicomTls)
        orthanc.store_to_modality("osteonode", orthanc_id)
        wait_for(lambda: _spooled(spool), timeout_s=10, what="the instance in the spool")
        assert _spooled(spool)[0].parent.parent.name == study_uid
    finally:
        orthanc.stop()
