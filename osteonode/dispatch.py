"""Send DICOM files to a destination by C-STORE (SCU), checking every status; C-ECHO a destination.

The files are streamed from disk as encoded (pynetdicom's chunked send, set
by :func:`osteonode.network.init_pynetdicom`), in the transfer syntax they
were written in. A destination that cannot be
reached, rejects the association or answers a failure status raises
:class:`~osteonode.errors.DeliveryFailed`; the caller (the worker's deliver
task) retries with back-off and leaves the files in the outbox when retries
run out. A destination with ``tls = true`` is reached over DICOM TLS
(:func:`osteonode.network.client_context`). Every send is recorded in the
audit trail ("DICOM Instances Transferred", :mod:`osteonode.audit`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pydicom
from pydicom.uid import UID
from pynetdicom import AE, Association, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import, unseen by mypy

from osteonode.audit import audit_event
from osteonode.config import Destination, TLSSettings
from osteonode.dimse_status import SUCCESS, is_stored
from osteonode.errors import DeliveryFailed
from osteonode.network import client_context, init_pynetdicom, set_tcp_nodelay

log = logging.getLogger(__name__)


def send_files(paths: Sequence[Path], destination: Destination, *, calling_ae_title: str,
               timeout_s: float = 30.0, tls: TLSSettings | None = None, exported_by: str | None = None) -> None:
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
    tls : TLSSettings, optional
        The node's TLS settings; used when ``destination.tls``.
    exported_by : str, optional
        A person who sent the files by hand (``osteonode send``): the audit
        trail records an Export by them instead of "DICOM Instances
        Transferred".

    Raises
    ------
    DeliveryFailed
        Association not established or rejected (or the TLS handshake failed), a C-STORE answered with a
        failure status or not at all (retryable); or presentation contexts not
        accepted (``permanent=True``, after the accepted files were sent).
    """
    if not paths:
        return
    files = _read_files(paths)
    stored: list[Path] = []
    try:
        contexts = [build_context(*context) for context in sorted({f.context for f in files.values()})]
        assoc = _associate(destination, contexts, calling_ae_title, timeout_s, tls)
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        refused = sorted({files[p].context[0].name for p in paths if files[p].context not in accepted})
        try:
            for path in (p for p in paths if files[p].context in accepted):
                _store(assoc, path, destination)
                stored.append(path)
        finally:
            if assoc.is_established:
                assoc.release()
        log.info("%s: delivered %d file(s) to %s", destination.name, len(stored), destination.ae_title)
        if refused:
            raise DeliveryFailed(f"{destination.name}: {destination.ae_title} does not accept "
                                 f"{', '.join(refused)} (presentation context rejected); {len(stored)} other "
                                 "file(s) delivered", permanent=True)
    except DeliveryFailed as exc:
        _audit_sent(files, stored or list(paths), destination, exported_by, str(exc))
        raise
    _audit_sent(files, stored, destination, exported_by)


def _store(assoc: Association, path: Path, destination: Destination) -> None:
    """C-STORE one file; raise DeliveryFailed unless its status is Success or Warning."""
    status = assoc.send_c_store(path)
    code = int(status.Status) if "Status" in status else None
    if code is None:
        raise DeliveryFailed(f"{destination.name}: no C-STORE response for {path.name}")
    if not is_stored(code):
        raise DeliveryFailed(f"{destination.name}: C-STORE of {path.name} failed with status 0x{code:04X}")
    if code != SUCCESS:
        log.warning("%s: C-STORE answered warning 0x%04X (stored)", destination.name, code)


def _audit_sent(files: dict[Path, _File], paths: Sequence[Path], destination: Destination,
                exported_by: str | None, failure: str | None = None) -> None:
    """One "DICOM Instances Transferred" (or Export) audit message per patient: studies and SOP classes of ``paths``.

    On ``failure``, ``paths`` are the files that were to be sent and the outcome is a minor failure.
    """
    by_patient: dict[str, dict[str, Counter[str]]] = {}
    for path in paths:
        info = files[path]
        by_patient.setdefault(info.patient_id, {}).setdefault(info.study_uid, Counter())[str(info.context[0])] += 1
    for patient_id, studies in by_patient.items():
        audit_event("export" if exported_by else "instances_sent", outcome="minor_failure" if failure else "success",
                    user=exported_by, remote_host=destination.host, remote_ae=destination.ae_title, study_uids=studies,
                    patient_id=patient_id, detail=failure)


def echo(destination: Destination, *, calling_ae_title: str, timeout_s: float = 30.0,
         tls: TLSSettings | None = None) -> int:
    """C-ECHO ``destination`` (Verification SOP Class, PS3.4 A.4) and return its status (0x0000: success).

    Parameters are those of :func:`send_files`.

    Raises
    ------
    DeliveryFailed
        Association not established (refused, rejected, TLS handshake failed) or no C-ECHO response.
    """
    assoc = _associate(destination, [build_context(Verification)], calling_ae_title, timeout_s, tls)
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        raise DeliveryFailed(f"{destination.name}: no C-ECHO response")
    return int(status.Status)


def _associate(destination: Destination, contexts: list[PresentationContext], calling_ae_title: str,
               timeout_s: float, tls: TLSSettings | None) -> Association:
    """Open an association to ``destination`` (over TLS when ``destination.tls``) or raise DeliveryFailed."""
    init_pynetdicom()
    ae = AE(ae_title=calling_ae_title)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    tls_args = None
    if destination.tls:
        if tls is None:
            raise DeliveryFailed(f"{destination.name}: TLS requested but no [tls] settings", permanent=True)
        tls_args = (client_context(tls), destination.host)
    assoc = ae.associate(destination.host, destination.port, contexts, ae_title=destination.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)], tls_args=tls_args)
    if not assoc.is_established:
        raise DeliveryFailed(f"{destination.name}: association with {destination.ae_title}@"
                             f"{destination.host}:{destination.port}{' (TLS)' if tls_args else ''} not "
                             f"established ({'rejected' if assoc.is_rejected else 'aborted or no answer'})")
    return assoc


class _File(NamedTuple):
    """What the dispatcher reads of a file: its presentation context and, for the audit trail, study and patient."""

    context: tuple[UID, UID]  # (SOP Class UID, Transfer Syntax UID) from the File Meta Information
    study_uid: str
    patient_id: str


def _read_files(paths: Sequence[Path]) -> dict[Path, _File]:
    """(SOP class, transfer syntax), Study Instance UID and Patient ID of each file.

    Only the file's own transfer syntax is offered: files are streamed as
    stored, so the accepted syntax must be the one they are encoded in.
    """
    files = {}
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "StudyInstanceUID", "PatientID"])
        files[path] = _File((UID(ds.file_meta.MediaStorageSOPClassUID), UID(ds.file_meta.TransferSyntaxUID)),
                            str(ds.get("StudyInstanceUID", "")), str(ds.get("PatientID", "")))
    contexts = {f.context for f in files.values()}
    if len(contexts) > 128:
        raise DeliveryFailed(f"{len(contexts)} presentation contexts needed; at most 128 fit "
                             "one association", permanent=True)
    return files
