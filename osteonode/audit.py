"""The audit trail: DICOM audit messages (PS3.15 A.5, the RFC 3881-derived schema) to a file and to syslog.

Configure once at start-up with :func:`configure_audit`, then record events
with :func:`audit_event` from anywhere (thread-safe; it never raises: a sink
that fails is logged and the node goes on). Each message is one XML
``<AuditMessage>`` built with :mod:`xml.etree.ElementTree`:

=====================  =========================================  ==========  ===============================
kind                   EventID (DCM, CID 400)                     ActionCode  EventTypeCode
=====================  =========================================  ==========  ===============================
application_start      110100 Application Activity                E           110120 Application Start
application_stop       110100 Application Activity                E           110121 Application Stop
begin_transfer         110102 Begin Transferring DICOM Instances  E
instances_received     110104 DICOM Instances Transferred         C
instances_sent         110104 DICOM Instances Transferred         R
security_alert         110113 Security Alert                      E           110126 Node Authentication
login                  110114 User Authentication                 E           110122 Login
logout                 110114 User Authentication                 E           110123 Logout
export                 110106 Export                              R
study_deleted          110105 DICOM Study Deleted                 D
=====================  =========================================  ==========  ===============================

A failed login is a ``login`` with a failure ``outcome`` (PS3.15 A.5.3.12:
User Authentication records attempts "whether successful or not").

Active participants carry the Role ID codes of CID 402 (110150 Application,
110151 Application Launcher, 110152 Destination Role ID, 110153 Source Role
ID); participant objects are studies (type 2 system object, role 3 report,
ID type 110180 Study Instance UID, with one ``SOPClass`` element per SOP
class and its number of instances), the patient (type 1 person, role 1
patient, ID type RFC-3881 2 Patient Number) and, for a security alert, the
alert subject (type 2, role 13 security resource, ID type 110182 Node ID,
with an "Alert Description" detail).

Sinks: an append-only file (one message per line, fsynced) and a syslog
collector: RFC 5424 messages (facility 10 authpriv, severity 5 notice, MSGID
``IHE+RFC-3881``, the XML as MSG after a UTF-8 BOM) over UDP (RFC 5426, one
message per datagram), TCP (RFC 6587 octet counting) or TLS (RFC 5425,
TLS 1.2 or higher).
"""

from __future__ import annotations

import base64
import datetime
import getpass
import ipaddress
import logging
import os
import socket
import ssl
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    from osteonode.config import AuditSettings, Settings

log = logging.getLogger(__name__)

AuditKind = Literal["application_start", "application_stop", "begin_transfer", "instances_received",
                    "instances_sent", "security_alert", "login", "logout", "export", "study_deleted"]
Outcome = Literal["success", "minor_failure", "serious_failure", "major_failure"]
#: EventOutcomeIndicator values (PS3.15 A.5.1, from RFC 3881).
OUTCOME_INDICATORS: dict[str, str] = {"success": "0", "minor_failure": "4", "serious_failure": "8",
                                      "major_failure": "12"}
APP_NAME = "osteonode"
#: RFC 5424 PRI of audit messages: facility 10 (security/authorization, authpriv) x 8 + severity 5 (notice).
SYSLOG_PRI = 10 * 8 + 5
SYSLOG_MSGID = "IHE+RFC-3881"


class Code(NamedTuple):
    """A coded value: ``csd-code``, ``codeSystemName`` and ``originalText`` (the code meaning)."""

    value: str
    scheme: str
    meaning: str


# CID 400 Audit Event ID
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
BEGIN_TRANSFERRING = Code("110102", "DCM", "Begin Transferring DICOM Instances")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED = Code("110105", "DCM", "DICOM Study Deleted")
EXPORT = Code("110106", "DCM", "Export")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
# CID 401 Audit Event Type Code and CID 403 Security Alert Type Code
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
LOGIN = Code("110122", "DCM", "Login")
LOGOUT = Code("110123", "DCM", "Logout")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
# CID 402 Audit Active Participant Role ID Code
ROLE_APPLICATION = Code("110150", "DCM", "Application")
ROLE_LAUNCHER = Code("110151", "DCM", "Application Launcher")
ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")
# CID 404 Audit Participant Object ID Type Code (and RFC 3881's own)
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
NODE_ID = Code("110182", "DCM", "Node ID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
#: AuditSourceTypeCode 4 (RFC 3881 5.4.3): application server process.
SOURCE_APPLICATION_SERVER = Code("4", "RFC-3881", "Application Server Process")

#: kind -> (EventID, EventActionCode, EventTypeCode or None)
EVENTS: dict[str, tuple[Code, str, Code | None]] = {
    "application_start": (APPLICATION_ACTIVITY, "E", APPLICATION_START),
    "application_stop": (APPLICATION_ACTIVITY, "E", APPLICATION_STOP),
    "begin_transfer": (BEGIN_TRANSFERRING, "E", None),
    "instances_received": (INSTANCES_TRANSFERRED, "C", None),
    "instances_sent": (INSTANCES_TRANSFERRED, "R", None),
    "security_alert": (SECURITY_ALERT, "E", NODE_AUTHENTICATION),
    "login": (USER_AUTHENTICATION, "E", LOGIN),
    "logout": (USER_AUTHENTICATION, "E", LOGOUT),
    "export": (EXPORT, "R", None),
    "study_deleted": (STUDY_DELETED, "D", None),
}

#: ``study_uids`` of :func:`audit_event`: UIDs, or UID -> {SOP Class UID: number of instances}.
Studies = Iterable[str] | Mapping[str, Mapping[str, int]]


class _Identity(NamedTuple):
    """Who the node is in its audit messages."""

    ae_title: str
    source_id: str
    enterprise_site_id: str | None


def build_message(kind: AuditKind, identity: _Identity, *, outcome: Outcome = "success", user: str | None = None,
                  remote_host: str | None = None, remote_ae: str | None = None, study_uids: Studies = (),
                  patient_id: str | None = None, detail: str | None = None,
                  when: datetime.datetime | None = None) -> ET.Element:
    """One ``<AuditMessage>`` element for an event (parameters as in :func:`audit_event`).

    Raises
    ------
    ValueError
        Unknown ``kind`` or ``outcome``.
    """
    if kind not in EVENTS:
        raise ValueError(f"unknown audit event kind {kind!r}")
    if outcome not in OUTCOME_INDICATORS:
        raise ValueError(f"unknown audit outcome {outcome!r}")
    event_id, action, type_code = EVENTS[kind]
    root = ET.Element("AuditMessage")
    event = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": action,
        "EventDateTime": (when or datetime.datetime.now(datetime.UTC)).isoformat(timespec="milliseconds"),
        "EventOutcomeIndicator": OUTCOME_INDICATORS[outcome]})
    _code(event, "EventID", event_id)
    if type_code is not None:
        _code(event, "EventTypeCode", type_code)
    if detail and outcome != "success":
        ET.SubElement(event, "EventOutcomeDescription").text = detail
    for participant in _participants(kind, identity, user, remote_host, remote_ae):
        root.append(participant)
    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": identity.source_id})
    if identity.enterprise_site_id:
        source.set("AuditEnterpriseSiteID", identity.enterprise_site_id)
    _code(source, "AuditSourceTypeCode", SOURCE_APPLICATION_SERVER)
    for obj in _objects(kind, identity, study_uids, patient_id, remote_host, detail):
        root.append(obj)
    return root


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code.value, "codeSystemName": code.scheme,
                                       "originalText": code.meaning})


def _participant(user_id: str, requestor: bool, role: Code | None, *, alternative: str | None = None,
                 name: str | None = None, host: str | None = None) -> ET.Element:
    """An ``<ActiveParticipant>``; ``host`` becomes the network access point (IP address or machine name)."""
    element = ET.Element("ActiveParticipant", {"UserID": user_id, "UserIsRequestor": str(requestor).lower()})
    if alternative:
        element.set("AlternativeUserID", alternative)
    if name:
        element.set("UserName", name)
    if host:
        element.set("NetworkAccessPointID", host)
        element.set("NetworkAccessPointTypeCode", "2" if _is_ip(host) else "1")
    if role is not None:
        _code(element, "RoleIDCode", role)
    return element


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _participants(kind: str, identity: _Identity, user: str | None, remote_host: str | None,
                  remote_ae: str | None) -> list[ET.Element]:
    """The active participants of ``kind`` (PS3.15 A.5.3): the node, the remote node and/or the user."""
    node = {"alternative": f"AETITLES={identity.ae_title}", "name": APP_NAME, "host": socket.gethostname()}
    process = str(os.getpid())
    remote_id = remote_ae or remote_host or "unknown"
    remote = {"alternative": f"AETITLES={remote_ae}" if remote_ae else None, "host": remote_host}
    if kind in ("application_start", "application_stop"):
        return [_participant(process, False, ROLE_APPLICATION, **node),
                _participant(user or os_user(), True, ROLE_LAUNCHER)]
    if kind in ("begin_transfer", "instances_received"):  # the remote node sends, we receive
        return [_participant(remote_id, True, ROLE_SOURCE, **remote),
                _participant(process, False, ROLE_DESTINATION, **node)]
    if kind in ("instances_sent", "export"):  # we send, the remote node receives
        sender = [_participant(process, kind == "instances_sent", ROLE_SOURCE, **node)]
        if kind == "export":
            sender.append(_participant(user or os_user(), True, None))
        return [*sender, _participant(remote_id, False, ROLE_DESTINATION, **remote)]
    if kind == "security_alert":  # the node reports; the remote node is the one that was refused
        reporters = [_participant(process, False, ROLE_APPLICATION, **node)]
        return reporters + ([_participant(remote_id, True, None, **remote)] if remote_host or remote_ae else [])
    if kind in ("login", "logout"):
        return [_participant(user or "unknown", True, None, host=remote_host),
                _participant(process, False, ROLE_APPLICATION, **node)]
    # study_deleted: whoever deleted (a user, or the node's retention), then the node
    deleter = [_participant(user, True, None, host=remote_host)] if user else []
    return deleter + [_participant(process, not user, ROLE_APPLICATION, **node)]


def _objects(kind: str, identity: _Identity, study_uids: Studies, patient_id: str | None,
             remote_host: str | None, detail: str | None) -> list[ET.Element]:
    """The participant objects: studies and patient, or the alert subject of a security alert.

    Application Activity and User Authentication messages have none (PS3.15 A.5.3.1, A.5.3.12).
    """
    if kind in ("application_start", "application_stop", "login", "logout"):
        return []
    if kind == "security_alert":
        subject = ET.Element("ParticipantObjectIdentification", {
            "ParticipantObjectID": remote_host or identity.source_id, "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "13"})
        _code(subject, "ParticipantObjectIDTypeCode", NODE_ID)
        if detail:
            ET.SubElement(subject, "ParticipantObjectDetail", {
                "type": "Alert Description", "value": _base64(detail)})
        return [subject]
    objects = []
    studies = study_uids if isinstance(study_uids, Mapping) else {uid: {} for uid in study_uids}
    for uid, sop_classes in studies.items():
        study = ET.Element("ParticipantObjectIdentification", {
            "ParticipantObjectID": uid, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3"})
        _code(study, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
        for sop_class, count in sorted(sop_classes.items()):
            ET.SubElement(study, "SOPClass", {"UID": sop_class, "NumberOfInstances": str(count)})
        objects.append(study)
    if patient_id is not None:
        patient = ET.Element("ParticipantObjectIdentification", {
            "ParticipantObjectID": patient_id, "ParticipantObjectTypeCode": "1", "ParticipantObjectTypeCodeRole": "1"})
        _code(patient, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)
        objects.append(patient)
    return objects


def _base64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class AuditTrail:
    """The configured sinks of one process: the append-only file and the syslog collector.

    Parameters
    ----------
    settings : AuditSettings
        ``[audit]``.
    identity : _Identity
        The node's AE title and audit source.
    tls_context : ssl.SSLContext, optional
        For ``syslog_transport = "tls"``.
    """

    def __init__(self, settings: AuditSettings, identity: _Identity, tls_context: ssl.SSLContext | None = None):
        self.settings, self.identity, self.tls_context = settings, identity, tls_context
        self._lock = threading.Lock()
        self._stream: socket.socket | None = None
        self._stream_pid = 0

    def record(self, message: ET.Element) -> None:
        """Write ``message`` to every sink; a failing sink is logged at WARNING, never raised."""
        xml = ET.tostring(message, encoding="unicode")
        with self._lock:
            if self.settings.file is not None:
                try:
                    _append_line(self.settings.file, xml)
                except OSError as exc:
                    log.warning("audit message not written to the audit file: %s", exc.strerror or exc)
            if self.settings.syslog_host is not None:
                try:
                    self._send_syslog(xml)
                except OSError as exc:
                    log.warning("audit message not sent to the syslog collector %s: %s",
                                self.settings.syslog_host, exc)

    def _send_syslog(self, xml: str) -> None:
        frame = syslog_frame(xml, hostname=socket.gethostname())
        host, transport = str(self.settings.syslog_host), self.settings.syslog_transport
        port = self.settings.syslog_port or (6514 if transport == "tls" else 514)
        if transport == "udp":
            with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
                sock.sendto(frame, (host, port))
            return
        framed = f"{len(frame)} ".encode("ascii") + frame  # octet counting, RFC 5425 4.3 / RFC 6587 3.4.1
        for attempt in (1, 2):  # a collector restart breaks the kept connection: reconnect once
            try:
                self._connection(host, port).sendall(framed)
                return
            except OSError:
                self.close()
                if attempt == 2:
                    raise

    def _connection(self, host: str, port: int) -> socket.socket:
        """The kept TCP/TLS connection of this process (a forked worker opens its own)."""
        if self._stream is None or self._stream_pid != os.getpid():
            sock = socket.create_connection((host, port), timeout=10)
            if self.tls_context is not None:  # syslog_transport = "tls"
                sock = self.tls_context.wrap_socket(sock, server_hostname=host)
            self._stream, self._stream_pid = sock, os.getpid()
        return self._stream

    def close(self) -> None:
        """Close the kept syslog connection, if any."""
        if self._stream is not None and self._stream_pid == os.getpid():
            try:
                self._stream.close()
            except OSError:
                pass
        self._stream = None


def os_user() -> str:
    """The operating-system user running this process (``unknown`` where it has no name, e.g. a bare container UID)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _append_line(path: Path, line: str) -> None:
    """Append one line to ``path`` with O_APPEND (concurrent writers never interleave a line) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def syslog_frame(msg: str, *, hostname: str, when: datetime.datetime | None = None) -> bytes:
    """An RFC 5424 syslog message carrying an audit message.

    Format: ``<85>1 TIMESTAMP HOST osteonode PID IHE+RFC-3881 - BOM MSG``.
    The MSG is UTF-8 with a leading BOM (RFC 5424 6.4); no structured data
    (``-``). Fields longer than RFC 5424 allows are cut (HOSTNAME 255, APP-NAME 48).
    """
    stamp = (when or datetime.datetime.now(datetime.UTC)).isoformat(timespec="milliseconds")
    header = f"<{SYSLOG_PRI}>1 {stamp} {hostname[:255] or '-'} {APP_NAME} {os.getpid()} {SYSLOG_MSGID} - "
    return header.encode("ascii", "replace") + b"\xef\xbb\xbf" + msg.encode("utf-8")


_trail: AuditTrail | None = None


def configure_audit(settings: Settings) -> None:
    """Set up the audit trail of this process from ``settings.audit`` (call once at start-up).

    Without ``[audit] file`` or ``syslog_host`` :func:`audit_event` does nothing.

    Raises
    ------
    OSError
        The audit file's folder does not exist or is not writable.
    ssl.SSLError
        ``syslog_transport = "tls"`` and the CA bundle or the node's certificate cannot be loaded.
    """
    global _trail
    audit = settings.audit
    if _trail is not None:
        _trail.close()
    if not audit.enabled:
        _trail = None
        return
    if audit.file is not None and not os.access(audit.file.parent, os.W_OK):
        raise OSError(f"audit file folder not writable: {audit.file.parent}")
    identity = _Identity(settings.ae_title, audit.source_id or f"{settings.ae_title}@{socket.gethostname()}",
                         audit.enterprise_site_id)
    context = None
    if audit.syslog_transport == "tls":
        context = ssl.create_default_context(cafile=audit.syslog_ca_bundle or (
            settings.tls.ca_bundle if settings.tls else None))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.tls is not None:  # RFC 5425 mutual authentication with the node's certificate
            context.load_cert_chain(settings.tls.certificate, settings.tls.private_key)
    _trail = AuditTrail(audit, identity, context)


def audit_event(kind: AuditKind, *, outcome: Outcome = "success", user: str | None = None,
                remote_host: str | None = None, remote_ae: str | None = None, study_uids: Studies = (),
                patient_id: str | None = None, detail: str | None = None) -> None:
    """Record one audit event (PS3.15 A.5.3) in the configured sinks; a no-op when auditing is off.

    Never raises: an audit sink that fails is logged at WARNING; a bad
    ``kind`` or ``outcome`` (a programming error) is logged at ERROR.

    Parameters
    ----------
    kind : str
        One of :data:`EVENTS` (see the module's table).
    outcome : str
        ``success``, ``minor_failure`` (e.g. a rejected association, a failed
        login, a failed delivery), ``serious_failure`` or ``major_failure``.
    user : str, optional
        The person or process that asked for it: the console user (login,
        logout, study_deleted, export), the launcher (application_start/stop;
        default the OS user).
    remote_host, remote_ae : str, optional
        The other node's address (IP address or host name) and AE title.
    study_uids : iterable of str, or mapping
        Study Instance UIDs, or Study Instance UID -> {SOP Class UID: number of instances}.
    patient_id : str, optional
        Patient ID (0010,0020) of the studies (transfer, export, deletion messages).
    detail : str, optional
        Why it failed (EventOutcomeDescription) or, for a security alert,
        the alert description.
    """
    if _trail is None:
        return
    try:
        message = build_message(kind, _trail.identity, outcome=outcome, user=user, remote_host=remote_host,
                                remote_ae=remote_ae, study_uids=study_uids, patient_id=patient_id, detail=detail)
    except ValueError as exc:
        log.error("audit event not recorded: %s", exc)
        return
    _trail.record(message)
