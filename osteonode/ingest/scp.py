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
presentation contexts are logged at WARNING.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pydicom
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
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from osteonode.config import Settings
from osteonode.dispatch import set_tcp_nodelay
from osteonode.errors import InputRejected
from osteonode.ingest.spool import STATUS_DATA_SET_DOES_NOT_MATCH_SOP_CLASS, UMASK, check_uid, write_instance

log = logging.getLogger(__name__)

ACCEPTED_SOP_CLASSES = (CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEG2000Lossless, JPEG2000, JPEGLSLossless, JPEGLSNearLossless, RLELossless,
    JPEGLosslessSV1, JPEGLossless, JPEGBaseline8Bit, JPEGExtended12Bit,
]
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3: Refused: Out of Resources
STATUS_CANNOT_UNDERSTAND = 0xC210  # PS3.4 B.2.3 Error: Cannot understand (pynetdicom's decode failure code)

#: Called with (study_uid, series_uid) after an instance is safely on disk.
OnStored = Callable[[str, str], None]


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: always success (PS3.7 9.3.5)."""
    return STATUS_SUCCESS


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


def handle_store(event: evt.Event, spool: Path, on_stored: OnStored | None = None,
                 discarded: DiscardCounter | None = None, limits: PixelLimits | None = None) -> int:
    """C-STORE: check the data set, write it durably to the spool, then answer.

    An instance of a SOP class other than the CT image classes (accepted
    only with ``accept_all_storage``) is not decoded nor stored: it is
    counted in ``discarded`` and answered with success. An image larger
    than ``limits`` (default :class:`PixelLimits`) is refused before its
    pixel data are decoded.

    Returns
    -------
    int
        0x0000 once the file is fsynced under its final name (or discarded);
        0xA900 when the data set does not match its SOP class (wrong class,
        missing or bad UIDs, an image over ``limits``, pixel data that does not decode); 0xC210 when it
        cannot be parsed at all; 0xA700 when it cannot be written to disk.
    """
    if event.context.abstract_syntax not in ACCEPTED_SOP_CLASSES:
        if discarded is not None:
            discarded.add(event)
        return STATUS_SUCCESS
    caller = event.assoc.requestor.ae_title
    try:
        study_uid, series_uid, sop_uid = _check_dataset(event, limits or PixelLimits())
    except InputRejected as exc:
        log.warning("C-STORE from %s refused (0x%04X): %s", caller, exc.status, exc)
        return exc.status
    except Exception as exc:  # noqa: BLE001 - a DIMSE handler must answer with a status, never raise
        log.warning("C-STORE from %s refused (0x%04X): data set cannot be decoded (%s)",
                    caller, STATUS_CANNOT_UNDERSTAND, type(exc).__name__)
        return STATUS_CANNOT_UNDERSTAND
    try:
        write_instance(spool, study_uid, series_uid, sop_uid, event.encoded_dataset())
    except OSError as exc:
        log.error("C-STORE from %s refused (0x%04X): spool write failed: %s",
                  caller, STATUS_OUT_OF_RESOURCES, exc.strerror)
        return STATUS_OUT_OF_RESOURCES
    if on_stored is not None:
        on_stored(study_uid, series_uid)
    return STATUS_SUCCESS


def _check_dataset(event: evt.Event, limits: PixelLimits) -> tuple[str, str, str]:
    """Decode the request's data set and check it against its SOP class.

    Returns ``(study_uid, series_uid, sop_instance_uid)``; raises InputRejected.
    """
    ds = event.dataset
    context_class = event.context.abstract_syntax
    if ds.get("SOPClassUID") != context_class:
        raise InputRejected("SOP Class UID in the data set differs from the presentation context",
                            status=STATUS_DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
    if sop_uid != event.request.AffectedSOPInstanceUID:
        raise InputRejected("SOP Instance UID differs from the C-STORE request's Affected SOP Instance UID",
                            status=STATUS_DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    study_uid = check_uid(ds.get("StudyInstanceUID"), "Study Instance UID")
    series_uid = check_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
    if "PixelData" not in ds:
        raise InputRejected("the data set has no Pixel Data", status=STATUS_DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    check_pixel_bounds(ds, limits)
    _check_pixel_data(ds, event)
    return study_uid, series_uid, sop_uid


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
                            status=STATUS_DATA_SET_DOES_NOT_MATCH_SOP_CLASS) from exc
    if not (0 < rows <= limits.max_rows_columns and 0 < columns <= limits.max_rows_columns):
        raise InputRejected(f"image size {rows} x {columns} outside 1..{limits.max_rows_columns}",
                            status=STATUS_DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    decoded = rows * columns * frames * samples * ((bits + 7) // 8)
    if frames < 1 or decoded > limits.max_decoded_bytes:
        raise InputRejected(f"decoded pixel data of {decoded} bytes ({frames} frame(s)) over the limit of "
                            f"{limits.max_decoded_bytes}", status=STATUS_DATA_SET_DOES_NOT_MATCH_SOP_CLASS)


class PixelLimits(NamedTuple):
    """Largest image the C-STORE handler decodes (``Settings.max_rows_columns``, ``max_decoded_bytes``)."""

    max_rows_columns: int = 4096
    max_decoded_bytes: int = 2 * 1024**3


def _check_pixel_data(ds: pydicom.Dataset, event: evt.Event) -> None:
    """Raise InputRejected (0xA900) if the pixel data are truncated or cannot be decoded.

    Native (uncompressed) pixel data are checked by length, which is exact and
    costs nothing; encapsulated pixel data are decoded, since only a decoder
    can tell a truncated or corrupt codestream.
    """
    try:
        if not event.context.transfer_syntax.is_compressed:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            expected = ds.Rows * ds.Columns * ds.SamplesPerPixel * frames * ds.BitsAllocated // 8
            if len(ds.PixelData) < expected:
                raise InputRejected(f"pixel data truncated ({len(ds.PixelData)} of {expected} bytes)",
                                    status=STATUS_DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
            return
        ds.file_meta = event.file_meta
        ds.pixel_array  # noqa: B018 - decoding is the check
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError, TypeError) as exc:
        raise InputRejected(f"pixel data cannot be decoded ({type(exc).__name__})",
                            status=STATUS_DATA_SET_DOES_NOT_MATCH_SOP_CLASS) from exc


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


def set_socket_timeout(event: evt.Event, timeout_s: float) -> None:
    """EVT_CONN_OPEN handler: make every read of an accepted connection time out after ``timeout_s``.

    pynetdicom sets ``network_timeout`` on the listening socket only; the
    sockets it accepts block forever, so a peer that sends a PDU header and
    then nothing holds one of ``maximum_associations`` slots for good.
    """
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.settimeout(timeout_s)


def log_refused_contexts(event: evt.Event) -> None:
    """EVT_ACCEPTED: list the abstract syntaxes we did not accept (SOP classes we do not store)."""
    refused = sorted({str(cx.abstract_syntax.name) for cx in event.assoc.rejected_contexts})
    if refused:
        log.warning("association from %s: presentation contexts not accepted for %s",
                    event.assoc.requestor.ae_title, ", ".join(refused))


def make_ae(settings: Settings) -> AE:
    """Build the Application Entity with the node's association policy."""
    ae = AE(ae_title=settings.ae_title)
    sop_classes = list(ACCEPTED_SOP_CLASSES)
    if settings.accept_all_storage:
        sop_classes += [cx.abstract_syntax for cx in AllStoragePresentationContexts
                        if cx.abstract_syntax not in ACCEPTED_SOP_CLASSES]
    for sop_class in sop_classes:
        ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    if settings.allowed_calling_ae_titles:
        ae.require_calling_aet = list(settings.allowed_calling_ae_titles)
    ae.require_called_aet = True  # answer only to our own AE title
    ae.maximum_pdu_size = 0  # no limit on what we receive
    # stalled or half-sent PDUs: reads time out after network_timeout_s (also set on each accepted
    # socket, see set_socket_timeout), so idle connections cannot hold the max_associations slots
    ae.network_timeout = settings.network_timeout_s
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.maximum_associations = settings.max_associations
    return ae


def start_scp(settings: Settings, on_stored: OnStored | None = None) -> ThreadedAssociationServer:
    """Start the SCP in background threads and return the server (call ``.shutdown()``).

    Raises
    ------
    OSError
        If the port cannot be bound.
    """
    os.umask(UMASK)  # spooled instances 0640, their folders 0750
    ae = make_ae(settings)
    discarded = DiscardCounter()
    handlers = [
        (evt.EVT_CONN_OPEN, set_tcp_nodelay),
        (evt.EVT_CONN_OPEN, set_socket_timeout, [settings.network_timeout_s]),
        (evt.EVT_REJECTED, log_association_rejected),
        (evt.EVT_ACCEPTED, log_refused_contexts),
        (evt.EVT_RELEASED, discarded.log_and_forget),
        (evt.EVT_ABORTED, discarded.log_and_forget),
        (evt.EVT_CONN_CLOSE, discarded.log_and_forget),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store,
         [settings.spool_dir, on_stored, discarded,
          PixelLimits(settings.max_rows_columns, settings.max_decoded_bytes)]),
    ]
    server = ae.start_server((settings.bind_address, settings.port), block=False, evt_handlers=handlers)
    log.info("SCP %s listening on %s:%d", settings.ae_title, settings.bind_address, settings.port)
    return server

