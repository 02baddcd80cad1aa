"""Audit messages against the field lists of DICOM PS3.15 A.5.3, and their file and syslog sinks."""

from __future__ import annotations

import base64
import datetime
import re
import socket
import socketserver
import ssl
import threading
import xml.etree.ElementTree as ET

import pydicom
import pytest

from osteonode import audit
from osteonode.config import AuditSettings, Destination, Settings, TLSSettings

IDENTITY = audit._Identity("OSTEONODE", "OSTEONODE@testhost", "HOSPITAL")
STUDY, PATIENT = "1.2.826.0.1.3680043.8.498.1", "PAT-42"
CT = "1.2.840.10008.5.1.4.1.1.2"

#: Per kind, from PS3.15 A.5.3: EventID, EventActionCode, EventTypeCode, the Role ID codes the active participants
#: must carry (one participant each; "requestor" marks the one with UserIsRequestor true), and whether the study
#: and patient participant objects are mandatory.
FIELDS = {
    "application_start": ("110100", "E", "110120", {"110150": False, "110151": True}, False),
    "application_stop": ("110100", "E", "110121", {"110150": False, "110151": True}, False),
    "begin_transfer": ("110102", "E", None, {"110153": True, "110152": False}, True),
    "instances_received": ("110104", "C", None, {"110153": True, "110152": False}, True),
    "instances_sent": ("110104", "R", None, {"110153": True, "110152": False}, True),
    "export": ("110106", "R", None, {"110153": False, "110152": False}, True),
    "study_deleted": ("110105", "D", None, {}, True),
    "security_alert": ("110113", "E", "110126", {"110150": False}, False),
    "login": ("110114", "E", "110122", {"110150": False}, False),
    "logout": ("110114", "E", "110123", {"110150": False}, False),
}


def _message(kind, **kwargs) -> ET.Element:
    """Build, serialise and parse back: what a reader of the audit file gets."""
    args = {"remote_host": "10.0.0.5", "remote_ae": "PACS", "study_uids": {STUDY: {CT: 3}}, "patient_id": PATIENT,
            "user": "alice"} | kwargs
    return ET.fromstring(ET.tostring(audit.build_message(kind, IDENTITY, **args), encoding="unicode"))


def _assert_coded(element: ET.Element, code: str | None = None) -> None:
    """A coded value has csd-code, codeSystemName and originalText (PS3.15 A.5.1 CodedValueType)."""
    assert element is not None
    assert element.get("csd-code") and element.get("codeSystemName") and element.get("originalText")
    if code is not None:
        assert element.get("csd-code") == code


@pytest.mark.parametrize("kind", sorted(FIELDS))
def test_every_message_has_the_mandatory_fields_of_ps3_15(kind):
    event_id, action, type_code, roles, with_objects = FIELDS[kind]
    root = _message(kind)
    assert root.tag == "AuditMessage"
    # element order of the schema: EventIdentification, ActiveParticipant+, AuditSourceIdentification, objects*
    tags = [child.tag for child in root]
    assert tags[0] == "EventIdentification" and tags.count("AuditSourceIdentification") == 1
    source_at = tags.index("AuditSourceIdentification")
    assert set(tags[1:source_at]) == {"ActiveParticipant"} and set(tags[source_at + 1:]) <= {
        "ParticipantObjectIdentification"}
    event = root.find("EventIdentification")
    assert event.get("EventActionCode") == action
    assert datetime.datetime.fromisoformat(event.get("EventDateTime")).tzinfo is not None
    assert event.get("EventOutcomeIndicator") == "0"
    _assert_coded(event.find("EventID"), event_id)
    types = event.findall("EventTypeCode")
    assert [t.get("csd-code") for t in types] == ([type_code] if type_code else [])
    for t in types:
        _assert_coded(t)
    participants = root.findall("ActiveParticipant")
    for participant in participants:
        assert participant.get("UserID") and participant.get("UserIsRequestor") in ("true", "false")
        if participant.get("NetworkAccessPointID"):
            assert participant.get("NetworkAccessPointTypeCode") in ("1", "2")
        for role in participant.findall("RoleIDCode"):
            _assert_coded(role)
    by_role = {p.find("RoleIDCode").get("csd-code"): p for p in participants if p.find("RoleIDCode") is not None}
    for role, requestor in roles.items():
        assert by_role[role].get("UserIsRequestor") == str(requestor).lower(), role
    assert sum(p.get("UserIsRequestor") == "true" for p in participants) >= 1
    source = root.find("AuditSourceIdentification")
    assert source.get("AuditSourceID") == "OSTEONODE@testhost" and source.get("AuditEnterpriseSiteID") == "HOSPITAL"
    _assert_coded(source.find("AuditSourceTypeCode"), "4")
    objects = root.findall("ParticipantObjectIdentification")
    for obj in objects:
        assert obj.get("ParticipantObjectID") and obj.get("ParticipantObjectTypeCode")
        _assert_coded(obj.find("ParticipantObjectIDTypeCode"))
    if with_objects:
        study = next(o for o in objects if o.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180")
        assert (study.get("ParticipantObjectID"), study.get("ParticipantObjectTypeCode"),
                study.get("ParticipantObjectTypeCodeRole")) == (STUDY, "2", "3")
        assert [(c.get("UID"), c.get("NumberOfInstances")) for c in study.findall("SOPClass")] == [(CT, "3")]
        patient = next(o for o in objects if o.find("ParticipantObjectIDTypeCode").get("codeSystemName") == "RFC-3881")
        assert patient.find("ParticipantObjectIDTypeCode").get("csd-code") == "2"
        assert (patient.get("ParticipantObjectID"), patient.get("ParticipantObjectTypeCode"),
                patient.get("ParticipantObjectTypeCodeRole")) == (PATIENT, "1", "1")
    elif kind != "security_alert":
        assert objects == []


def test_security_alert_names_the_refused_node_and_why():
    root = _message("security_alert", outcome="minor_failure", detail="calling AE title not allowed")
    assert root.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert root.find("EventIdentification/EventOutcomeDescription").text == "calling AE title not allowed"
    subject = root.find("ParticipantObjectIdentification")
    assert (subject.get("ParticipantObjectID"), subject.get("ParticipantObjectTypeCode"),
            subject.get("ParticipantObjectTypeCodeRole")) == ("10.0.0.5", "2", "13")
    _assert_coded(subject.find("ParticipantObjectIDTypeCode"), "110182")
    detail = subject.find("ParticipantObjectDetail")
    assert detail.get("type") == "Alert Description"
    assert base64.b64decode(detail.get("value")).decode() == "calling AE title not allowed"
    refused = [p for p in root.findall("ActiveParticipant") if p.get("UserID") == "PACS"]
    assert refused and refused[0].get("NetworkAccessPointID") == "10.0.0.5"


def test_failed_login_is_a_user_authentication_with_a_failure_outcome():
    root = _message("login", outcome="minor_failure", detail="wrong password", user="mallory")
    assert root.find("EventIdentification/EventID").get("csd-code") == "110114"
    assert root.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert any(p.get("UserID") == "mallory" and p.get("UserIsRequestor") == "true"
               for p in root.findall("ActiveParticipant"))


def test_unknown_kind_or_outcome_is_refused():
    with pytest.raises(ValueError, match="kind"):
        audit.build_message("coffee", IDENTITY)
    with pytest.raises(ValueError, match="outcome"):
        audit.build_message("login", IDENTITY, outcome="meh")


def _settings(tmp_path, **audit_keys) -> Settings:
    return Settings(ae_title="OSTEONODE", spool_dir=tmp_path / "spool", outbox_dir=tmp_path / "outbox",
                    queue_dir=tmp_path / "queue", audit=AuditSettings(**audit_keys))


@pytest.fixture
def audit_off():
    yield
    audit._trail = None  # other tests run without an audit trail


def _lines(path) -> list[ET.Element]:
    return [ET.fromstring(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_scp_and_scu_record_transfers_and_rejections_in_the_audit_file(tmp_path, tiny_ct, audit_off):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from osteonode.dispatch import send_files
    from osteonode.ingest.scp import start_scp

    log_file = tmp_path / "audit.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = _settings(tmp_path, file=log_file).model_copy(
        update={"bind_address": "127.0.0.1", "port": port, "allowed_calling_ae_titles": ["PACS"]})
    audit.configure_audit(settings)
    server = start_scp(settings)
    try:
        ct = tiny_ct(tmp_path / "ct.dcm", study_uid=STUDY, patient_id=PATIENT)
        node = Destination(name="node", ae_title="OSTEONODE", host="127.0.0.1", port=port)
        send_files([ct], node, calling_ae_title="PACS", timeout_s=5)
        send_files([ct], node, calling_ae_title="PACS", timeout_s=5, exported_by="alice")  # osteonode send
        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(Verification)
        assert stranger.associate("127.0.0.1", port, ae_title="OSTEONODE").is_rejected
    finally:
        server.shutdown()
    messages = _lines(log_file)
    events = [(m.find("EventIdentification/EventID").get("csd-code"),
               m.find("EventIdentification").get("EventActionCode")) for m in messages]
    assert sorted(events) == sorted([("110102", "E"), ("110104", "C"), ("110104", "R"), ("110113", "E"),
                                     ("110102", "E"), ("110104", "C"), ("110106", "R")])
    export = next(m for m in messages if m.find("EventIdentification/EventID").get("csd-code") == "110106")
    assert any(p.get("UserID") == "alice" and p.get("UserIsRequestor") == "true"
               for p in export.findall("ActiveParticipant"))
    received = [m for m in messages if m.find("EventIdentification").get("EventActionCode") == "C"][0]
    source = next(p for p in received.findall("ActiveParticipant") if p.find("RoleIDCode").get("csd-code") == "110153")
    assert (source.get("UserID"), source.get("NetworkAccessPointID")) == ("PACS", "127.0.0.1")
    ids = {o.get("ParticipantObjectID") for o in received.findall("ParticipantObjectIdentification")}
    assert ids == {STUDY, PATIENT}
    assert received.find(".//SOPClass").get("NumberOfInstances") == "1"
    alert = next(m for m in messages if m.find("EventIdentification/EventID").get("csd-code") == "110113")
    assert "calling AE title not allowed" in alert.find("EventIdentification/EventOutcomeDescription").text
    assert pydicom.dcmread(ct).PatientID == PATIENT


_SYSLOG = re.compile(rb"^<85>1 (\S+) (\S+) osteonode (\d+) IHE\+RFC-3881 - \xef\xbb\xbf"
                     rb"(<AuditMessage>.*</AuditMessage>)$", re.S)


def _check_syslog(frame: bytes) -> ET.Element:
    match = _SYSLOG.match(frame)
    assert match, frame[:120]
    datetime.datetime.fromisoformat(match.group(1).decode())
    return ET.fromstring(match.group(4).decode("utf-8"))


def test_syslog_over_udp_one_message_per_datagram(tmp_path, audit_off):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as collector:
        collector.bind(("127.0.0.1", 0))
        collector.settimeout(5)
        audit.configure_audit(_settings(tmp_path, syslog_host="127.0.0.1", syslog_port=collector.getsockname()[1]))
        audit.audit_event("application_start")
        message = _check_syslog(collector.recv(65535))
    assert message.find("EventIdentification/EventTypeCode").get("csd-code") == "110120"


class _Collector(socketserver.ThreadingTCPServer):
    """A syslog collector reading octet-counted frames (RFC 6587 / RFC 5425), optionally over TLS."""

    daemon_threads = allow_reuse_address = True

    def __init__(self, context: ssl.SSLContext | None = None):
        self.frames: list[bytes] = []
        self.context = context
        super().__init__(("127.0.0.1", 0), _Reader)

    def get_request(self):
        sock, address = super().get_request()
        return (self.context.wrap_socket(sock, server_side=True) if self.context else sock), address


class _Reader(socketserver.StreamRequestHandler):
    def handle(self):
        while True:
            length = b""
            while (c := self.rfile.read(1)) not in (b" ", b""):
                length += c
            if not length:
                return
            self.server.frames.append(self.rfile.read(int(length)))


def _serve(collector: _Collector) -> int:
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    return collector.server_address[1]


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_syslog_over_tcp_and_tls_with_octet_counting(tmp_path, tls_pki, transport, audit_off):
    context = None
    if transport == "tls":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls_pki.peer_cert, tls_pki.peer_key)
    collector = _Collector(context)
    try:
        port = _serve(collector)
        settings = _settings(tmp_path, syslog_host="127.0.0.1", syslog_port=port, syslog_transport=transport,
                             syslog_ca_bundle=tls_pki.ca if transport == "tls" else None)
        audit.configure_audit(settings)
        audit.audit_event("login", user="alice", remote_host="10.1.1.1")
        audit.audit_event("logout", user="alice", remote_host="10.1.1.1")
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=5)
        while len(collector.frames) < 2 and datetime.datetime.now() < deadline:
            threading.Event().wait(0.05)
        codes = [_check_syslog(f).find("EventIdentification/EventTypeCode").get("csd-code") for f in collector.frames]
        assert codes == ["110122", "110123"]
    finally:
        audit._trail.close()
        collector.shutdown()
        collector.server_close()


def test_an_unreachable_collector_is_logged_not_raised(tmp_path, caplog, audit_off):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    log_file = tmp_path / "audit.log"
    audit.configure_audit(_settings(tmp_path, file=log_file, syslog_host="127.0.0.1", syslog_port=port,
                                    syslog_transport="tcp"))
    audit.audit_event("study_deleted", user="admin", study_uids=[STUDY], patient_id=PATIENT)
    assert "not sent to the syslog collector" in caplog.text
    assert len(_lines(log_file)) == 1  # the file still has it


def test_audit_tls_uses_the_nodes_certificate_settings(tmp_path, tls_pki, audit_off):
    tls = TLSSettings(certificate=tls_pki.node_cert, private_key=tls_pki.node_key, ca_bundle=tls_pki.ca)
    settings = _settings(tmp_path, syslog_host="127.0.0.1", syslog_transport="tls").model_copy(update={"tls": tls})
    audit.configure_audit(settings)
    assert audit._trail.tls_context.minimum_version == ssl.TLSVersion.TLSv1_2
