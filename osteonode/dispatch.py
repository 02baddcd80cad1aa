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

from osteonode.config import Destination
from osteonode.errors import DeliveryFailed

log = logging.getLogger(__name__)

#: Send files as stored, without decoding them into memory.
_config.STORE_SEND_CHUNKED_DATASET = True

WARNING_STATUSES = {0xB000, 0xB007, 0xB006}  # PS3.4 B.2.3: coercion / elements discarded / mismatch


def send_files(paths: Sequence[Path], destination: Destination, *, calling_ae_title: str,
               timeout_s: float = 30.0) -> None:
    """C-STORE each file to ``destination`` in one association.

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
        Association not established or rejected, a presentation context not
        accepted, or a C-STORE answered with a failure status or not at all.
    """
    if not paths:
        return
    contexts = _contexts_for(paths)
    ae = AE(ae_title=calling_ae_title)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    assoc = ae.associate(destination.host, destination.port, contexts, ae_title=destination.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)])
    if not assoc.is_established:
        raise DeliveryFailed(f"{destination.name}: association with {destination.ae_title}@"
                             f"{destination.host}:{destination.port} not established "
                             f"({'rejected' if assoc.is_rejected else 'aborted or no answer'})")
    try:
        for path in paths:
            status = assoc.send_c_store(path)
            code = int(status.Status) if "Status" in status else None
            if code is None:
                raise DeliveryFailed(f"{destination.name}: no C-STORE response for {path.name}")
            if code in WARNING_STATUSES:
                log.warning("%s: C-STORE of %s answered warning 0x%04X", destination.name, path.name, code)
            elif code != 0x0000:
                raise DeliveryFailed(f"{destination.name}: C-STORE of {path.name} failed with status 0x{code:04X}")
    except (ValueError, RuntimeError) as exc:  # pynetdicom: no accepted context for the SOP class/syntax
        raise DeliveryFailed(f"{destination.name}: cannot send: {exc}") from exc
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("%s: delivered %d file(s) to %s", destination.name, len(paths), destination.ae_title)


def set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle's algorithm on the association's socket.

    Without it each C-STORE waits for the peer's delayed ACK (~40 ms on Linux),
    capping throughput near 20 instances/s.
    """
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _contexts_for(paths: Sequence[Path]) -> list:
    """One presentation context per (SOP class, transfer syntax) among the files.

    Only the file's own transfer syntax is offered: files are streamed as
    stored, so the accepted syntax must be the one they are encoded in.
    """
    pairs: dict[UID, set[UID]] = {}
    for path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        syntaxes = pairs.setdefault(meta.MediaStorageSOPClassUID, set())
        syntaxes.add(meta.TransferSyntaxUID)
    contexts = []
    for sop_class, syntaxes in pairs.items():
        contexts.extend(build_context(sop_class, syntax) for syntax in sorted(syntaxes))
    if len(contexts) > 128:
        raise DeliveryFailed(f"{len(contexts)} presentation contexts needed; at most 128 fit one association")
    return contexts


def outbox_entry(outbox_dir: Path, series_uid: str) -> Path:
    """The outbox folder holding the outputs made from one source series."""
    return outbox_dir / series_uid


def record_delivery(entry: Path, destination: str, state: str, attempts: int, detail: str = "") -> None:
    """Write ``entry/delivery-<destination>.json``: state (pending/delivered/failed), attempts, last error."""
    path = entry / f"delivery-{destination}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"destination": destination, "state": state, "attempts": attempts,
                               "detail": detail}, indent=2), encoding="utf-8")
    tmp.replace(path)


def delivery_state(entry: Path, destination: str) -> dict | None:
    """The recorded delivery state of ``entry`` for ``destination``, or None."""
    path = entry / f"delivery-{destination}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
