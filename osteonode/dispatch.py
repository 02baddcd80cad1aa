"""Send DICOM files to a destination by C-STORE (SCU), checking every status.

The files are streamed from disk as encoded (pynetdicom's chunked send), in
the transfer syntax they were written in. A destination that cannot be
reached, rejects the association or answers a failure status raises
:class:`~osteonode.errors.DeliveryFailed`; the caller (the worker's deliver
task) retries with back-off and leaves the files in the outbox when retries
run out.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification
from pynetdicom.status import code_to_category

from osteonode.atomic import write_atomic
from osteonode.config import Destination
from osteonode.errors import DeliveryFailed

log = logging.getLogger(__name__)

#: Send files as stored, without decoding them into memory.
_config.STORE_SEND_CHUNKED_DATASET = True

STATUS_SUCCESS, STATUS_WARNING = "Success", "Warning"  # pynetdicom's status categories (PS3.7 C.4.2.3)


def is_stored(code: int) -> bool:
    """True when a C-STORE status means the instance was stored: Success or Warning.

    Warnings include 0x0001 (PS3.7 C), 0x0107 (attribute list error), 0x0116
    (attribute value out of range) and 0xBxxx (coercion, elements discarded,
    SOP class mismatch, PS3.4 B.2.3); the category comes from
    :func:`pynetdicom.status.code_to_category`, not a hand-written list.
    """
    return code_to_category(code) in (STATUS_SUCCESS, STATUS_WARNING)


def send_files(paths: Sequence[Path], destination: Destination, *, calling_ae_title: str,
               timeout_s: float = 30.0) -> None:
    """C-STORE each file to ``destination`` in one association.

    Files whose SOP class (in their transfer syntax) the destination does not
    accept are not sent; the others are, and the refusal is then raised as a
    permanent failure, since a retry cannot change the peer's configuration.

    Parameters
    ----------
    paths : sequence of pathlib.Path
        PS3.10 files.
    destination : Destination
        Called AE title, host and port.
    calling_ae_title : str
        Our AE title.
    timeout_s : float
        Connection, ACSE and DIMSE timeout in seconds.

    Raises
    ------
    DeliveryFailed
        Association not established or rejected, a C-STORE answered with a
        failure status or not at all (retryable); or presentation contexts not
        accepted (``permanent=True``, after the accepted files were sent).
    """
    if not paths:
        return
    syntaxes = _file_syntaxes(paths)
    ae = _scu_ae(calling_ae_title, timeout_s)
    contexts = [build_context(sop_class, syntax) for sop_class, syntax in sorted(set(syntaxes.values()))]
    assoc = ae.associate(destination.host, destination.port, contexts, ae_title=destination.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)])
    if not assoc.is_established:
        raise DeliveryFailed(f"{destination.name}: association with {destination.ae_title}@"
                             f"{destination.host}:{destination.port} not established "
                             f"({'rejected' if assoc.is_rejected else 'aborted or no answer'})")
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    refused = sorted({syntaxes[p][0].name for p in paths if syntaxes[p] not in accepted})
    try:
        for path in (p for p in paths if syntaxes[p] in accepted):
            status = assoc.send_c_store(path)
            code = int(status.Status) if "Status" in status else None
            if code is None:
                raise DeliveryFailed(f"{destination.name}: no C-STORE response for {path.name}")
            if not is_stored(code):
                raise DeliveryFailed(f"{destination.name}: C-STORE of {path.name} failed with status 0x{code:04X}")
            if code != 0x0000:
                log.warning("%s: C-STORE answered warning 0x%04X (stored)", destination.name, code)
    finally:
        if assoc.is_established:
            assoc.release()
    sent = sum(syntaxes[p] in accepted for p in paths)
    log.info("%s: delivered %d file(s) to %s", destination.name, sent, destination.ae_title)
    if refused:
        raise DeliveryFailed(f"{destination.name}: {destination.ae_title} does not accept "
                             f"{', '.join(refused)} (presentation context rejected); {sent} other file(s) "
                             "delivered", permanent=True)


def _scu_ae(calling_ae_title: str, timeout_s: float) -> AE:
    """Our AE as an SCU, with one timeout for connection, ACSE, DIMSE and network reads."""
    ae = AE(ae_title=calling_ae_title)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    return ae


def echo(destination: Destination, *, calling_ae_title: str, timeout_s: float = 10.0) -> str:
    """C-ECHO ``destination`` (Verification, PS3.7 9.3.5): ``"Success"`` or why not.

    Returns
    -------
    str
        ``Success``, ``association rejected``, ``no association (aborted or no answer)``
        or ``C-ECHO status 0x....``.
    """
    ae = _scu_ae(calling_ae_title, timeout_s)
    ae.add_requested_context(Verification)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        return "association rejected" if assoc.is_rejected else "no association (aborted or no answer)"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(status.Status) if "Status" in status else None
    return "Success" if code == 0 else f"C-ECHO status {'none' if code is None else f'0x{code:04X}'}"


def set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle's algorithm on the association's socket.

    Without it each C-STORE waits for the peer's delayed ACK (~40 ms on Linux),
    capping throughput near 20 instances/s.
    """
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _file_syntaxes(paths: Sequence[Path]) -> dict[Path, tuple[UID, UID]]:
    """(SOP class, transfer syntax) of each file, from its File Meta Information.

    Only the file's own transfer syntax is offered: files are streamed as
    stored, so the accepted syntax must be the one they are encoded in.
    """
    syntaxes = {}
    for path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        syntaxes[path] = (UID(meta.MediaStorageSOPClassUID), UID(meta.TransferSyntaxUID))
    if len(set(syntaxes.values())) > 128:
        raise DeliveryFailed(f"{len(set(syntaxes.values()))} presentation contexts needed; at most 128 fit "
                             "one association", permanent=True)
    return syntaxes


def outbox_entry(outbox_dir: Path, study_uid: str) -> Path:
    """The outbox folder holding the one set of outputs made for a source study."""
    return outbox_dir / study_uid


def record_delivery(entry: Path, destination: str, state: str, attempts: int, detail: str = "") -> None:
    """Write ``entry/delivery-<destination>.json``: state (pending/delivered/failed), attempts, last error."""
    write_atomic(entry / f"delivery-{destination}.json",
                 json.dumps({"destination": destination, "state": state, "attempts": attempts,
                             "detail": detail}, indent=2).encode())


def delivery_state(entry: Path, destination: str) -> dict | None:
    """The recorded delivery state of ``entry`` for ``destination``, or None."""
    path = entry / f"delivery-{destination}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
