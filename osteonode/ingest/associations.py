"""Series received on an association that has not ended normally: possible fragments, held back.

A sender that aborts (A-ABORT), loses its connection, or whose peer (this
node) is killed mid-series leaves a fragment of the series in the spool. A
fragment must not be analysed and reported as if it were the series, so:

* the first instance of a series stored on an association writes a record
  ``<spool>/.associations/<StudyInstanceUID>/<SeriesInstanceUID>/<token>``
  (one token per association, written durably before the C-STORE success);
* a normal release (A-RELEASE) of that association removes the records of
  each of its series, those of earlier, abnormally ended associations too:
  the series has been (re-)sent completely;
* an association that ends otherwise (abort, reset, timeout, crash of
  ``serve``) leaves its records; the log says so.

:func:`held_series` then tells the completion watcher which series of a
study still have records and received an instance within
``incomplete_timeout_s``: such a study is not complete. After the timeout the
series is analysed as received and its records are removed, with a warning.
The records are files on disk, so a restart of ``serve`` keeps them (the
associations of a killed ``serve`` never ended normally).
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from pathlib import Path

from pynetdicom import evt
from pynetdicom.pdu_primitives import A_RELEASE

from osteonode.atomic import write_atomic

log = logging.getLogger(__name__)

ASSOCIATIONS_DIR = ".associations"


class AssociationTracker:
    """Keeps the on-disk records of the series each open association has stored (module docstring).

    Parameters
    ----------
    spool : pathlib.Path
        Spool root; the records go to ``<spool>/.associations``.
    """

    def __init__(self, spool: Path) -> None:
        self._root = spool / ASSOCIATIONS_DIR
        self._lock = threading.Lock()
        self._open: dict[int, tuple[str, set[tuple[str, str]]]] = {}  # id(assoc) -> (token, series)

    def stored(self, event: evt.Event, study_uid: str, series_uid: str) -> None:
        """After a C-STORE is on disk: record the series for its association (the first time only).

        A record that cannot be written is logged as an error (the series is
        then not protected against being analysed as a fragment).
        """
        with self._lock:
            token, series = self._open.setdefault(id(event.assoc), (uuid.uuid4().hex, set()))
            if (study_uid, series_uid) in series:
                return
            series.add((study_uid, series_uid))
        folder = self._root / study_uid / series_uid
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / token, b"")
        except OSError as exc:
            log.error("association from %s: record of an open series not written (%s); a fragment of it "
                      "could be analysed if the association ends abnormally", event.assoc.requestor.ae_title,
                      exc.strerror)

    def release_requested(self, event: evt.Event) -> None:
        """EVT_ACSE_RECV: on the peer's A-RELEASE request, its series were sent completely; remove their records.

        Bound to the request, not to EVT_RELEASED: pynetdicom fires EVT_RELEASED
        in the association's thread only after it has sent the A-RELEASE
        response, so the peer's close of the connection (EVT_CONN_CLOSE, in the
        DUL thread) can be handled first, and a normal release would be taken
        for an abnormal end. The request is received before the response is
        sent, hence before the peer can close. Other ACSE primitives are ignored.
        """
        primitive = getattr(event, "primitive", None)  # set by pynetdicom on ACSE events only
        if not isinstance(primitive, A_RELEASE) or primitive.result is not None:
            return
        with self._lock:
            _, series = self._open.pop(id(event.assoc), ("", set()))
        for study_uid, series_uid in series:
            shutil.rmtree(self._root / study_uid / series_uid, ignore_errors=True)
            _remove_if_empty(self._root / study_uid)

    def closed(self, event: evt.Event) -> None:
        """EVT_CONN_CLOSE: an association closed without a release leaves its records, and says so."""
        with self._lock:
            _, series = self._open.pop(id(event.assoc), ("", set()))
        if series:
            log.warning("association from %s ended abnormally (aborted, reset or timed out) after instances of "
                        "%d series: not complete until re-sent, or incomplete_timeout_s after their last instance",
                        event.assoc.requestor.ae_title, len(series))


def held_series(spool: Path, study_uid: str, now_ns: int, incomplete_timeout_s: float) -> list[str]:
    """Series of a study that may be fragments: records left by an abnormal end, last instance recent.

    Records of a series whose last instance (its spool folder's modification
    time) is ``incomplete_timeout_s`` or more ago are removed, with a warning:
    the series is then analysed as received.

    Parameters
    ----------
    spool : pathlib.Path
        Spool root.
    study_uid : str
        Study Instance UID (the study's spool folder name).
    now_ns : int
        Current time, ns since the epoch.
    incomplete_timeout_s : float
        How long a series with records is held after its last instance.

    Returns
    -------
    list of str
        Series Instance UIDs of the study that are held.

    Raises
    ------
    OSError
        If the records cannot be listed.
    """
    folder = spool / ASSOCIATIONS_DIR / study_uid
    if not folder.is_dir():
        return []
    held = []
    for records in folder.iterdir():
        series = spool / study_uid / records.name
        last_ns = series.stat().st_mtime_ns if series.is_dir() else 0
        if now_ns - last_ns < incomplete_timeout_s * 1e9:
            held.append(records.name)
            continue
        shutil.rmtree(records, ignore_errors=True)
        log.warning("a series whose association ended abnormally was not re-sent within incomplete_timeout_s "
                    "(%.0f s): analysed as received", incomplete_timeout_s)
    _remove_if_empty(folder)
    return held


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (or already gone): kept
        pass
