"""The node's Storage and Verification SCP (pynetdicom).

Handlers are plain functions bound to pynetdicom events; they return a
status and never raise (PS3.4 B.2.3 C-STORE statuses, PS3.7 9.1.1).
Association policy (PS3.8): with ``accept_all_storage`` (the default) every
Storage SOP class is accepted at association, so a PACS that routes whole
studies (dose reports, Secondary Captures, presentation states) does not fail
on a refused presentation context; only CT Image Storage, Enhanced CT Image
Storage and Legacy Converted Enhanced CT Image Storage instances are stored,
the others are answered with success, discarded unread and counted per SOP
class in one log line per association. Without it, only the three CT classes
and Verification are accepted. When
``allowed_calling_ae_titles`` is set, other callers are rejected with
"calling AE title not recognized"; a called AE title other than ours is
rejected with "called AE title not recognized". Rejections and refused
presentation contexts are logged at WARNING and rejections recorded as
Security Alerts in the audit trail, as are the studies received
(:class:`ReceivedStudies`). With ``[tls]`` (and ``tls.scp``)
the listener accepts DICOM TLS connections only
(:func:`osteonode.network.server_context`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import ssl
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypedDict, cast

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    LegacyConvertedEnhancedCTImageStorage,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, dimse_messages, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import, unseen by mypy
from pynetdicom.transport import ThreadedAssociationServer

from osteonode.atomic import TMP_PREFIX
from osteonode.audit import audit_event
from osteonode.config import Settings
from osteonode.dimse_status import CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH_SOP_CLASS, OUT_OF_RESOURCES, SUCCESS
from osteonode.errors import InputRejected
from osteonode.ingest.associations import AssociationTracker
from osteonode.ingest.spool import INCOMING_DIR, UMASK, check_uid, move_instance
from osteonode.network import server_context, set_tcp_nodelay
from osteonode.retention import Watermark

log = logging.getLogger(__name__)

ACCEPTED_SOP_CLASSES = (CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEG2000Lossless, JPEG2000, JPEGLSLossless, JPEGLSNearLossless, RLELossless,
    JPEGLosslessSV1, JPEGLossless, JPEGBaseline8Bit, JPEGExtended12Bit,
]
#: Largest PDU we receive (bytes of the variable field), announced as Maximum Length (PS3.8 D.1) and enforced
#: on every PDU read: dcmtk sends at most 128 KiB, pynetdicom SCUs up to the announced length.
MAX_PDU_BYTES = 1024 * 1024
_DEFER_BYTES = 1024  # values longer than this (pixel data) are not read while checking a received data set

#: Called with (event, study_uid, series_uid) after an instance is safely on disk; a
#: ``sqlite3.Error`` (the job store's ``record_arrival``) makes the C-STORE answer 0xA700.
OnStored = Callable[[evt.Event, str, str], None]


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: always success (PS3.7 9.3.5)."""
    return SUCCESS


class DiscardCounter:
    """Counts, per association, the instances of non-CT SOP classes answered with success and discarded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[int, Counter[str]] = {}

    def add(self, event: evt.Event) -> None:
        """Count the C-STORE request of ``event`` under its SOP class name."""
        with self._lock:
            self._counts.setdefault(id(event.assoc), Counter())[str(event.context.abstract_syntax.name)] += 1

    def log_and_forget(self, event: evt.Event) -> None:
        """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: log (once) the association's discarded counts.

        Only SOP class names are logged.
        """
        with self._lock:
            counts = self._counts.pop(id(event.assoc), None)
        if counts:
            log.info("association from %s: discarded %d instance(s) that are not CT images: %s",
                     event.assoc.requestor.ae_title, sum(counts.values()),
                     ", ".join(f"{n} x {name}" for name, n in sorted(counts.items())))


class ReceivedStudies:
    """The audit trail of each association: what it stored, by patient and study (PS3.15 A.5.3.3, A.5.3.4).

    The first instance of a study in an association records "Begin
    Transferring DICOM Instances"; the end of the association (release,
    abort or closed connection) records one "DICOM Instances Transferred"
    per patient with the instances per study and SOP class, not one message
    per instance.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received: dict[int, dict[str, dict[str, Counter[str]]]] = {}  # assoc -> patient -> study -> class

    def add(self, event: evt.Event, patient_id: str, study_uid: str) -> None:
        """Count one stored instance of the association of ``event``."""
        with self._lock:
            studies = self._received.setdefault(id(event.assoc), {}).setdefault(patient_id, {})
            first = study_uid not in studies
            studies.setdefault(study_uid, Counter())[str(event.context.abstract_syntax)] += 1
        if first:
            audit_event("begin_transfer", **_remote(event), study_uids=[study_uid], patient_id=patient_id)

    def finish(self, event: evt.Event) -> None:
        """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: record what the association stored (once)."""
        with self._lock:
            patients = self._received.pop(id(event.assoc), None)
        for patient_id, studies in (patients or {}).items():
            audit_event("instances_received", **_remote(event), study_uids=studies, patient_id=patient_id)


class _Remote(TypedDict):
    remote_host: str
    remote_ae: str


def _remote(event: evt.Event) -> _Remote:
    """The requestor of ``event``'s association as :func:`~osteonode.audit.audit_event` keywords."""
    return {"remote_host": str(event.assoc.requestor.address), "remote_ae": str(event.assoc.requestor.ae_title)}


def handle_store(event: evt.Event, spool: Path, on_stored: OnStored | None = None,
                 discarded: DiscardCounter | None = None, limits: PixelLimits | None = None,
                 received: ReceivedStudies | None = None, watermark: Watermark | None = None) -> int:
    """C-STORE: check the data set streamed to disk, move it durably into the spool, then answer.

    pynetdicom has already written the request's data set, as a PS3.10 file,
    to ``event.dataset_path`` in the spool's incoming folder (see
    :func:`stream_data_sets_to`). Only the attributes the checks need are
    parsed: the pixel data are neither read nor decoded unless compressed.
    An instance of a SOP class other than the CT image classes (accepted only
    with ``accept_all_storage``) is not read nor stored: it is counted in
    ``discarded`` and answered with success. An image larger than ``limits``
    (default :class:`PixelLimits`) is refused before its pixel data are
    decoded. Below the disk ``watermark`` a CT instance is refused with
    0xA700 before it is read.

    Returns
    -------
    int
        0x0000 once the file is fsynced under its final name (or discarded);
        0xA900 when the data set does not match its SOP class (wrong class,
        missing or bad UIDs, an image over ``limits``, pixel data that does not decode); 0xC210 when it
        cannot be parsed at all; 0xA700 when it cannot be written to disk or
        the disk is below the watermark.
    """
    if event.context.abstract_syntax not in ACCEPTED_SOP_CLASSES:
        if discarded is not None:
            discarded.add(event)
        return SUCCESS
    caller = event.assoc.requestor.ae_title
    if watermark is not None and not watermark.ok():
        return OUT_OF_RESOURCES
    try:
        incoming = event.dataset_path
        study_uid, series_uid, sop_uid, patient_id = _check_dataset(incoming, event, limits or PixelLimits())
    except InputRejected as exc:
        log.warning("C-STORE from %s refused (0x%04X): %s", caller, exc.status, exc)
        return exc.status
    except Exception as exc:  # noqa: BLE001 - a DIMSE handler must answer with a status, never raise
        log.warning("C-STORE from %s refused (0x%04X): data set cannot be decoded (%s)",
                    caller, CANNOT_UNDERSTAND, type(exc).__name__)
        return CANNOT_UNDERSTAND
    try:
        move_instance(spool, study_uid, series_uid, sop_uid, incoming)
    except OSError as exc:
        log.error("C-STORE from %s refused (0x%04X): spool write failed: %s",
                  caller, OUT_OF_RESOURCES, exc.strerror)
        return OUT_OF_RESOURCES
    if received is not None:
        received.add(event, patient_id, study_uid)
    if on_stored is not None:
        try:
            on_stored(event, study_uid, series_uid)
        except sqlite3.Error as exc:  # not indexed, the study would never complete: the sender re-sends
            log.error("C-STORE from %s refused (0x%04X): arrival not recorded in the job store (%s)",
                      caller, OUT_OF_RESOURCES, type(exc).__name__)
            return OUT_OF_RESOURCES
    return SUCCESS


def _check_dataset(path: Path, event: evt.Event, limits: PixelLimits) -> tuple[str, str, str, str]:
    """Parse the received file's attributes (values over 1 KiB deferred) and check them against its SOP class.

    Returns ``(study_uid, series_uid, sop_instance_uid, patient_id)`` (the Patient ID for the audit
    trail only); raises InputRejected.
    """
    ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    context_class = event.context.abstract_syntax
    if ds.get("SOPClassUID") != context_class:
        raise InputRejected("SOP Class UID in the data set differs from the presentation context",
                            status=DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
    if sop_uid != cast(C_STORE, event.request).AffectedSOPInstanceUID:
        raise InputRejected("SOP Instance UID differs from the C-STORE request's Affected SOP Instance UID",
                            status=DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    study_uid = check_uid(ds.get("StudyInstanceUID"), "Study Instance UID")
    series_uid = check_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
    if "PixelData" not in ds:
        raise InputRejected("the data set has no Pixel Data", status=DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    check_pixel_bounds(ds, limits)
    _check_pixel_data(ds, event)
    return study_uid, series_uid, sop_uid, str(ds.get("PatientID", ""))


def check_pixel_bounds(ds: pydicom.Dataset, limits: PixelLimits) -> None:
    """Refuse an image too large to decode safely, from its Image Pixel attributes alone (no decode).

    Rows (0028,0010), Columns (0028,0011), Number of Frames (0028,0008),
    Samples per Pixel (0028,0002) and Bits Allocated (0028,0100) give the
    decoded size (PS3.3 C.7.6.3); a 2 KB JPEG-LS instance may claim
    16384 x 16384 and would cost gigabytes to decode.

    Raises
    ------
    InputRejected
        0xA900 when an attribute is missing or not an integer, Rows or Columns
        exceed ``limits.max_rows_columns``, or the decoded size exceeds
        ``limits.max_decoded_bytes``.
    """
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputRejected(f"Image Pixel attributes missing or malformed ({type(exc).__name__})",
                            status=DATA_SET_DOES_NOT_MATCH_SOP_CLASS) from exc
    if not (0 < rows <= limits.max_rows_columns and 0 < columns <= limits.max_rows_columns):
        raise InputRejected(f"image size {rows} x {columns} outside 1..{limits.max_rows_columns}",
                            status=DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    decoded = rows * columns * frames * samples * ((bits + 7) // 8)
    if frames < 1 or decoded > limits.max_decoded_bytes:
        raise InputRejected(f"decoded pixel data of {decoded} bytes ({frames} frame(s)) over the limit of "
                            f"{limits.max_decoded_bytes}", status=DATA_SET_DOES_NOT_MATCH_SOP_CLASS)


class PixelLimits(NamedTuple):
    """Largest image the C-STORE handler decodes (``Settings.max_rows_columns``, ``max_decoded_bytes``)."""

    max_rows_columns: int = 4096
    max_decoded_bytes: int = 2 * 1024**3


def _check_pixel_data(ds: pydicom.Dataset, event: evt.Event) -> None:
    """Raise InputRejected (0xA900) if the pixel data are truncated or cannot be decoded.

    Native (uncompressed) pixel data are checked by the length of their
    element and of the file, which is exact and reads nothing; encapsulated
    pixel data are decoded, since only a decoder can tell a truncated or
    corrupt codestream.
    """
    try:
        if not event.context.transfer_syntax.is_compressed:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            expected = ds.Rows * ds.Columns * ds.SamplesPerPixel * frames * ds.BitsAllocated // 8
            element = ds.get_item("PixelData")
            if isinstance(element, RawDataElement) and element.value is None:  # deferred: not read
                present = min(element.length, os.path.getsize(ds.filename) - element.value_tell)
            else:
                present = len(ds.PixelData)
            if present < expected:
                raise InputRejected(f"pixel data truncated ({present} of {expected} bytes)",
                                    status=DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
            return
        ds.pixel_array  # noqa: B018 - decoding is the check
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError, TypeError) as exc:
        raise InputRejected(f"pixel data cannot be decoded ({type(exc).__name__})",
                            status=DATA_SET_DOES_NOT_MATCH_SOP_CLASS) from exc


def log_association_rejected(event: evt.Event) -> None:
    """EVT_REJECTED: say who was turned away and why (no patient data involved).

    pynetdicom does not pass the reason with the event, so it is derived the
    way the acceptor decided it (PS3.8 9.3.4: the A-ASSOCIATE-RJ reasons).
    """
    assoc = event.assoc
    request = assoc.requestor.primitive
    acceptors = sum(a.is_acceptor for a in assoc.ae.active_associations)
    allowed = [t.strip() for t in assoc.ae.require_calling_aet]
    if acceptors > assoc.ae.maximum_associations:
        reason = f"local limit exceeded ({acceptors - 1} of {assoc.ae.maximum_associations} associations in use)"
    elif request is not None and assoc.ae.require_called_aet and \
            request.called_ae_title != assoc.acceptor.ae_title.strip():
        reason = f"called AE title {request.called_ae_title!r} is not ours"
    elif allowed and assoc.requestor.ae_title not in allowed:
        reason = "calling AE title not allowed"
    else:
        reason = "refused during negotiation"
    log.warning("association from %s (%s) rejected: %s",
                assoc.requestor.ae_title, assoc.requestor.address, reason)
    audit_event("security_alert", outcome="minor_failure", **_remote(event),
                detail=f"association from {assoc.requestor.ae_title} rejected: {reason}")


def set_socket_timeout(event: evt.Event, timeout_s: float) -> None:
    """EVT_CONN_OPEN handler: make every read of an accepted connection time out after ``timeout_s``.

    pynetdicom sets ``network_timeout`` on the listening socket only; the
    sockets it accepts block forever, so a peer that sends a PDU header and
    then nothing holds one of ``maximum_associations`` slots for good.
    """
    transport = event.assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is not None:
        sock.settimeout(timeout_s)


def handshake_tls(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler of a TLS listener: run the TLS handshake now, in the connection's own thread.

    A peer that fails it (no certificate, one no trusted CA signed, plain
    TCP, TLS below 1.2) is logged at WARNING and recorded as a Security Alert
    (Node Authentication); the association then ends at its first read. The
    handshake is bounded by the socket timeout set before (``set_socket_timeout``).
    """
    transport = event.assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if not isinstance(sock, ssl.SSLSocket):
        return
    try:
        sock.do_handshake()
    except OSError as exc:  # ssl.SSLError, a timeout or a reset connection
        reason = getattr(exc, "reason", None) or type(exc).__name__
        log.warning("TLS handshake with %s failed: %s", event.assoc.requestor.address, reason)
        audit_event("security_alert", outcome="minor_failure", remote_host=str(event.assoc.requestor.address),
                    detail=f"TLS handshake failed: {reason}")


def bound_pdu_length(event: evt.Event, max_bytes: int) -> None:
    """EVT_CONN_OPEN handler: close the connection when a PDU header announces more than ``max_bytes``.

    pynetdicom reads a whole PDU into memory as its header announces (up to
    4 GiB), whatever Maximum Length it negotiated, so a peer could make the
    node allocate gigabytes per connection. The read of an over-long PDU
    fails instead, before any of it is read; pynetdicom then closes the
    connection (its "transport connection closed" event) and the log says why.
    """
    sock = event.assoc.dul.socket
    if sock is None:
        return
    receive, peer = sock.recv, event.assoc.requestor.address

    def bounded_recv(nr_bytes: int) -> bytearray:
        if nr_bytes > max_bytes:
            log.warning("connection from %s closed: a PDU of %d bytes announced, over the limit of %d bytes",
                        peer, nr_bytes, max_bytes)
            raise ConnectionAbortedError(f"PDU of {nr_bytes} bytes over the limit of {max_bytes}")
        return receive(nr_bytes)

    sock.recv = bounded_recv  # type: ignore[method-assign]  # this socket's reads are bounded


def log_refused_contexts(event: evt.Event) -> None:
    """EVT_ACCEPTED: list the abstract syntaxes we did not accept (SOP classes we do not store)."""
    refused = sorted({str(cx.abstract_syntax.name) for cx in event.assoc.rejected_contexts if cx.abstract_syntax})
    if refused:
        log.warning("association from %s: presentation contexts not accepted for %s",
                    event.assoc.requestor.ae_title, ", ".join(refused))


def stream_data_sets_to(folder: Path) -> None:
    """Make pynetdicom write every received C-STORE data set to a ``.tmp-*`` file in ``folder`` (process-wide).

    pynetdicom's chunked receive (``_config.STORE_RECV_CHUNKED_DATASET``)
    appends the P-DATA fragments to a ``NamedTemporaryFile`` as they arrive,
    in its network thread, and gives the handler the file's path; it deletes
    the file after the handler unless the handler moved it. Its temporary
    folder is not configurable, so the module's ``NamedTemporaryFile`` is
    replaced by one that creates the file in ``folder`` (made again if
    removed): inside the spool, a checked file is renamed into place on the
    same file system instead of being decoded, re-encoded and written again.
    Every pynetdicom SCP of the process streams there (the node runs one).
    The prefix lets :func:`osteonode.atomic.remove_orphans` delete what an
    abort or a crash leaves there.
    """
    def incoming_file(**kwargs):
        folder.mkdir(parents=True, exist_ok=True)
        return tempfile.NamedTemporaryFile(dir=folder, prefix=TMP_PREFIX, **kwargs)

    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = incoming_file  # type: ignore[assignment]  # same call, other folder


def make_ae(settings: Settings) -> AE:
    """Build the Application Entity with the node's association policy."""
    ae = AE(ae_title=settings.ae_title)
    sop_classes = list(ACCEPTED_SOP_CLASSES)
    if settings.accept_all_storage:
        sop_classes += [cx.abstract_syntax for cx in AllStoragePresentationContexts
                        if cx.abstract_syntax is not None and cx.abstract_syntax not in ACCEPTED_SOP_CLASSES]
    for sop_class in sop_classes:
        ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    if settings.allowed_calling_ae_titles:
        ae.require_calling_aet = list(settings.allowed_calling_ae_titles)
    ae.require_called_aet = True  # answer only to our own AE title
    ae.maximum_pdu_size = MAX_PDU_BYTES  # announced; enforced on each read by bound_pdu_length
    # stalled or half-sent PDUs: reads time out after network_timeout_s (also set on each accepted
    # socket, see set_socket_timeout), so idle connections cannot hold the max_associations slots
    ae.network_timeout = settings.network_timeout_s
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.maximum_associations = settings.max_associations
    return ae


def start_scp(settings: Settings, record_arrival: Callable[[str, str], None] | None = None
              ) -> ThreadedAssociationServer:
    """Start the SCP in background threads and return the server (call ``.shutdown()``).

    ``record_arrival(study_uid, series_uid)`` (the job store's) is called for
    each instance once it is on disk, before the C-STORE answer. The series
    each association stores are recorded until it is released normally
    (:class:`~osteonode.ingest.associations.AssociationTracker`), so a
    fragment left by an abort is not analysed as a complete series.

    Raises
    ------
    OSError
        If the port cannot be bound.
    """
    os.umask(UMASK)  # spooled instances 0640, their folders 0750
    stream_data_sets_to(settings.spool_dir / INCOMING_DIR)
    ae = make_ae(settings)
    discarded, received = DiscardCounter(), ReceivedStudies()
    tracker = AssociationTracker(settings.spool_dir)

    def stored(event: evt.Event, study_uid: str, series_uid: str) -> None:
        if record_arrival is not None:
            record_arrival(study_uid, series_uid)
        tracker.stored(event, study_uid, series_uid)

    handlers: list[EventHandlerType] = [
        (evt.EVT_CONN_OPEN, set_tcp_nodelay),
        (evt.EVT_CONN_OPEN, set_socket_timeout, [settings.network_timeout_s]),
        (evt.EVT_CONN_OPEN, bound_pdu_length, [MAX_PDU_BYTES]),
        (evt.EVT_CONN_OPEN, handshake_tls),
        (evt.EVT_REJECTED, log_association_rejected),
        (evt.EVT_ACCEPTED, log_refused_contexts),
        (evt.EVT_RELEASED, discarded.log_and_forget),
        (evt.EVT_ABORTED, discarded.log_and_forget),
        (evt.EVT_CONN_CLOSE, discarded.log_and_forget),
        (evt.EVT_RELEASED, received.finish),
        (evt.EVT_ABORTED, received.finish),
        (evt.EVT_CONN_CLOSE, received.finish),
        (evt.EVT_ACSE_RECV, tracker.release_requested),
        (evt.EVT_CONN_CLOSE, tracker.closed),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store,
         [settings.spool_dir, stored, discarded, PixelLimits(settings.max_rows_columns, settings.max_decoded_bytes),
          received, Watermark(settings.spool_dir, settings.min_free_percent, settings.min_free_bytes)]),
    ]
    tls = settings.tls if settings.tls is not None and settings.tls.scp else None
    server = cast(ThreadedAssociationServer,  # not None: block=False
                  ae.start_server((settings.bind_address, settings.port), block=False, evt_handlers=handlers,
                                  ssl_context=server_context(tls) if tls else None))
    log.info("SCP %s listening on %s:%d%s", settings.ae_title, settings.bind_address, settings.port,
             " (DICOM TLS)" if tls else "")
    return server

