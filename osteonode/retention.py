"""Retention and disk protection: prune delivered studies, refuse instances before the disk fills.

* :func:`prune_delivered` removes, for each study whose outputs were
  delivered to **every** configured destination more than ``retention_days``
  ago (the ``delivery-<destination>.json`` records of its outbox entry, the
  source of truth for deliveries), its spool folder, its ``.jobs`` marker and
  its outbox entry. A study with a pending or failed delivery, or none
  recorded, is kept until it is handled (re-sent). Each removal is audited as
  "DICOM Study Deleted" (PS3.15 A.5.3.5). ``serve`` runs it every
  ``retention_interval_s`` (:func:`retention_loop`).
* :class:`Watermark` tells the Storage SCP when the spool's file system has
  less free space than ``min_free_percent`` / ``min_free_bytes``; the SCP then
  answers C-STORE with 0xA700 (Refused: Out of Resources, PS3.4 B.2.3), as
  MONAI Informatics Gateway does below its ``watermarkPercent``, before the
  disk is full.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pydicom

from osteonode.atomic import TMP_PREFIX
from osteonode.audit import audit_event
from osteonode.config import Settings
from osteonode.errors import describe
from osteonode.ingest.completion import JOBS_DIR, study_last_arrival_ns
from osteonode.outbox import delivery_states, outbox_entry

log = logging.getLogger(__name__)

DAY_S = 86400.0


class Pruned(NamedTuple):
    """What one :func:`prune_delivered` pass removed."""

    studies: int
    bytes_freed: int


def prune_delivered(settings: Settings, now_s: float | None = None) -> Pruned:
    """Remove the spool and outbox data of studies delivered everywhere more than ``retention_days`` ago.

    A study qualifies when its outbox entry has a ``delivered`` record for
    each configured destination, the newest record is older than
    ``retention_days``, and no instance of it arrived within that time. Does
    nothing without ``retention_days`` or without destinations (nothing is
    ever delivered then).

    Parameters
    ----------
    settings : Settings
        ``retention_days``, ``destinations``, ``spool_dir``, ``outbox_dir``.
    now_s : float, optional
        Current time, epoch seconds (default :func:`time.time`).

    Returns
    -------
    Pruned
        Number of studies removed and bytes freed. A study that cannot be
        removed (permissions) is logged and left; the others are still pruned.
    """
    if settings.retention_days is None or not settings.destinations or not settings.outbox_dir.is_dir():
        return Pruned(0, 0)
    cutoff_s = (time.time() if now_s is None else now_s) - settings.retention_days * DAY_S
    names = {d.name for d in settings.destinations}
    studies = freed = 0
    for entry in sorted(p for p in settings.outbox_dir.iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX)):
        if not _expired(entry, names, cutoff_s, settings.spool_dir):
            continue
        try:
            patient_id = _patient_id(entry)
            freed += _remove_study(settings.spool_dir, entry)
        except OSError as exc:
            log.error("retention: a delivered study could not be removed (%s); will retry", exc.strerror or exc)
            continue
        studies += 1
        audit_event("study_deleted", study_uids=[entry.name], patient_id=patient_id,
                    detail=f"retention: delivered more than {settings.retention_days:g} days ago")
    if studies:
        log.info("retention: removed %d delivered study(ies) older than %g days, %.1f MB freed",
                 studies, settings.retention_days, freed / 1e6)
    return Pruned(studies, freed)


def _expired(entry: Path, destinations: set[str], cutoff_s: float, spool: Path) -> bool:
    """True when ``entry`` was delivered to every destination before ``cutoff_s`` and its study is as old."""
    states = delivery_states(entry)
    if not destinations <= states.keys() or any(states[name].get("state") != "delivered" for name in destinations):
        return False
    records = [entry / f"delivery-{name}.json" for name in destinations]
    if max(p.stat().st_mtime for p in records) >= cutoff_s:
        return False
    study = spool / entry.name
    return not study.is_dir() or study_last_arrival_ns(study) < cutoff_s * 1e9


def _patient_id(entry: Path) -> str | None:
    """Patient ID (0010,0020) of an outbox entry's outputs, for the audit message (None if no file has one)."""
    for path in sorted(entry.glob("*.dcm")):
        try:
            return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"]).PatientID)
        except (OSError, AttributeError, pydicom.errors.InvalidDicomError):
            continue
    return None


def _remove_study(spool: Path, entry: Path) -> int:
    """Delete a study's spool folder, then its ``.jobs`` marker, then its outbox entry; return bytes freed.

    The spool folder goes first: while it exists, a marker-less study would be queued again by the watcher.
    """
    study = spool / entry.name
    freed = _size(study) + _size(entry)
    if study.is_dir():
        shutil.rmtree(study)
    (spool / JOBS_DIR / f"{entry.name}.json").unlink(missing_ok=True)
    shutil.rmtree(outbox_entry(entry.parent, entry.name))
    return freed


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def retention_loop(settings: Settings, stop: threading.Event) -> None:
    """Run :func:`prune_delivered` now and every ``retention_interval_s`` until ``stop`` is set (a thread of serve)."""
    while not stop.is_set():
        try:
            prune_delivered(settings)
        except Exception as exc:  # noqa: BLE001 - the thread must outlive a bad pass; the next one retries
            log.error("retention pass failed: %s", describe(exc))
        stop.wait(settings.retention_interval_s)


class Watermark:
    """Whether the file system of ``path`` has at least ``min_free_percent`` % and ``min_free_bytes`` free.

    The first check below the watermark, and the first one above it again,
    are logged (WARNING, INFO), not every check.

    Parameters
    ----------
    path : pathlib.Path
        A folder on the file system to watch (the spool).
    min_free_percent : float
        Free space below this share of the file system's size is too little (0: no limit).
    min_free_bytes : int
        Free space below this many bytes is too little (0: no limit).
    """

    def __init__(self, path: Path, min_free_percent: float, min_free_bytes: int) -> None:
        self.path, self.min_free_percent, self.min_free_bytes = path, min_free_percent, min_free_bytes
        self._low = False
        self._lock = threading.Lock()

    def free(self) -> tuple[int, int]:
        """(bytes available to the node, file-system size in bytes), from :func:`os.statvfs`.

        A ``path`` not created yet is measured at its nearest existing parent (the file system it will be on).
        """
        path = self.path
        while not path.exists() and path != path.parent:
            path = path.parent
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def ok(self) -> bool:
        """True when there is enough free space; an unreadable file system counts as not enough."""
        try:
            available, size = self.free()
        except OSError:
            available, size = 0, 1
        needed = max(self.min_free_percent / 100 * size, self.min_free_bytes)
        low = available < needed
        with self._lock:
            changed, self._low = low != self._low, low
        if changed and low:
            log.warning("disk below the watermark: %.1f GB free of %.1f GB, %.1f GB needed "
                        "(min_free_percent %g, min_free_bytes %d); C-STORE answered 0xA700 until space is freed",
                        available / 1e9, size / 1e9, needed / 1e9, self.min_free_percent, self.min_free_bytes)
        elif changed:
            log.info("disk above the watermark again (%.1f GB free): receiving", available / 1e9)
        return not low
