"""Study completion by quiet period, and the one job that is enqueued per complete study.

DICOM has no "study complete" message, so a study is taken as complete once
no instance of it has arrived for ``study_quiet_period_s`` seconds (mercure's
study trigger; mercure waits 900 s by default, osteonode 30 s, see
docs/admin.md). Its series are then described and ranked by the selection
rules (:mod:`osteonode.series`; a candidate whose contrast phase must be
measured has a coarse subset of its slices read, 1-2 s) and one job is
enqueued: the study UID and the ranked candidate series (paths and header
summaries, JSON; no pixel data).

Which studies are still open (receiving) is indexed in the job store
(:mod:`osteonode.jobstore`), so an idle node does not scan the spool. The
state of each study lives on disk, in the spool, so a restart neither loses nor repeats
a job: a series folder's modification time is the time of its last arrival
(every instance is renamed into it), and ``<spool>/.jobs/<StudyInstanceUID>.json``
records the arrival time a job was enqueued for and the fingerprint of its
candidates (series UIDs and SOP Instance UIDs). A study that changes after its
job was enqueued is ranked again; a new job follows only when its candidates
changed (a new or grown candidate series). A re-sent identical study, or a new
series that is not a candidate, enqueues nothing. A study holding a series
whose association ended abnormally waits until that series is re-sent or
``incomplete_timeout_s`` passes (:mod:`osteonode.ingest.associations`).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydantic import BaseModel, ConfigDict
from pydicom.errors import InvalidDicomError

from osteonode.atomic import write_atomic
from osteonode.config import SelectionSettings
from osteonode.errors import InputRejected, describe
from osteonode.ingest.associations import held_series
from osteonode.ingest.spool import check_uid, instance_files
from osteonode.jobstore import JobStore
from osteonode.series import SeriesInfo, SeriesRanking, describe_series, rank_series

log = logging.getLogger(__name__)

JOBS_DIR = ".jobs"


class StudyJob(BaseModel):
    """The broker payload for one complete study: paths, UIDs and header summaries only (JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_instance_uid: str
    last_arrival_ns: int
    ranking: SeriesRanking
    fingerprint: str

    @property
    def job_id(self) -> str:
        """Short, non-identifying handle for logs (UIDs themselves are not logged)."""
        return log_id(self.study_instance_uid)


class _Marker(BaseModel):
    """What ``.jobs/<StudyInstanceUID>.json`` records: the last arrival handled and the candidates enqueued."""

    model_config = ConfigDict(extra="forbid")

    last_arrival_ns: int
    fingerprint: str


def log_id(uid: str) -> str:
    """A 10-character hash of a UID, to correlate log lines without logging the UID."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


Enqueue = Callable[[StudyJob], None]


def validate_job(job: StudyJob, spool: Path) -> None:
    """Check a job payload from the broker before anything reads or writes a path of it.

    Anyone who can write to the broker can forge a payload, so its UIDs must
    follow the UID grammar (PS3.5 9.1; they become outbox folder names) and
    every series folder must resolve inside ``spool``.

    Raises
    ------
    InputRejected
        Naming the first offending field (not its value).
    """
    check_uid(job.study_instance_uid, "Study Instance UID")
    root = spool.resolve()
    for info in [*job.ranking.candidates, *(r.series for r in job.ranking.rejected)]:
        check_uid(info.series_instance_uid, "Series Instance UID")
        folder = Path(info.series_dir).resolve()
        if not folder.is_relative_to(root):
            raise InputRejected("a series folder of the job lies outside the spool")


def candidates_fingerprint(candidates: list[SeriesInfo]) -> str:
    """SHA-256 of the candidates' Series and SOP Instance UIDs (file names), in rank order."""
    digest = hashlib.sha256()
    for info in candidates:
        digest.update(info.series_instance_uid.encode() + b"\0")
        for path in instance_files(Path(info.series_dir)):
            digest.update(path.name.encode() + b"\0")
        digest.update(b"\n")
    return digest.hexdigest()


def study_last_arrival_ns(study: Path) -> int:
    """Time of the latest arrival in a study folder: the newest modification time of it and its series folders."""
    return max([study.stat().st_mtime_ns, *(series.stat().st_mtime_ns for series in _subdirs(study))])


def find_due_studies(spool: Path, study_quiet_period_s: float, rules: SelectionSettings,
                     now_s: float | None = None, incomplete_timeout_s: float = 600.0) -> list[StudyJob]:
    """Studies quiet for at least ``study_quiet_period_s`` seconds that changed since they were last handled.

    Parameters
    ----------
    spool : pathlib.Path
        Spool root (``<study>/<series>/<sop>.dcm``).
    study_quiet_period_s : float
        Seconds without a new instance of a study after which it counts as complete.
    rules : SelectionSettings
        Series selection rules used to rank the study's series.
    now_s : float, optional
        Current time (epoch seconds); defaults to :func:`time.time`.
    incomplete_timeout_s : float
        A study with a series whose association ended abnormally is not due
        until that series is re-sent or this long after its last instance
        (:func:`osteonode.ingest.associations.held_series`).

    Returns
    -------
    list of StudyJob
        One per due study, its series ranked. Whether it must be enqueued is
        :func:`needs_job`'s decision (a study whose candidates are unchanged
        does not).
    """
    now_ns = int((time.time() if now_s is None else now_s) * 1e9)
    quiet_ns = int(study_quiet_period_s * 1e9)
    due = []
    for study in _subdirs(spool):
        _, job = _checked_due_job(spool, study, now_ns, quiet_ns, rules, incomplete_timeout_s)
        if job is not None:
            due.append(job)
    return due


def _checked_due_job(spool: Path, study: Path, now_ns: int, quiet_ns: int, rules: SelectionSettings,
                     incomplete_timeout_s: float) -> tuple[bool, StudyJob | None]:
    """``(checked, job)``: :func:`_due_job`, with an error of one study (broken marker or folder) logged and
    ``checked`` False, so that it is retried and does not stall the others."""
    try:
        return True, _due_job(spool, study, now_ns, quiet_ns, rules, incomplete_timeout_s)
    except (OSError, ValueError) as exc:
        log.error("study %s: cannot be checked for completion (%s); will retry", log_id(study.name), describe(exc))
        return False, None


def _due_job(spool: Path, study: Path, now_ns: int, quiet_ns: int, rules: SelectionSettings,
             incomplete_timeout_s: float) -> StudyJob | None:
    """The job of ``study`` if it is quiet, changed since it was handled and holds no fragment, else None."""
    last_arrival_ns = study_last_arrival_ns(study)
    marker = _read_marker(spool, study.name)
    if now_ns - last_arrival_ns < quiet_ns or (marker is not None and marker.last_arrival_ns >= last_arrival_ns):
        return None
    if held_series(spool, study.name, now_ns, incomplete_timeout_s):
        return None
    series = []
    for folder in _subdirs(study):
        files = instance_files(folder)
        if not files:
            continue
        try:
            series.append(describe_series(files, rules))
        except (InvalidDicomError, OSError, ValueError) as exc:  # a broken file must not stall the study
            log.warning("study %s: a series cannot be described (%s); it is not a candidate",
                        log_id(study.name), type(exc).__name__)
    if not series:
        return None
    ranking = rank_series(series, rules, files_of=lambda info: instance_files(Path(info.series_dir)))
    return StudyJob(study_instance_uid=study.name, last_arrival_ns=last_arrival_ns, ranking=ranking,
                    fingerprint=candidates_fingerprint(ranking.candidates))


def needs_job(spool: Path, job: StudyJob) -> bool:
    """True unless a job with the same candidates (same series and instances) was enqueued before."""
    marker = _read_marker(spool, job.study_instance_uid)
    return marker is None or marker.fingerprint != job.fingerprint


def mark_handled(spool: Path, job: StudyJob) -> None:
    """Record on disk that ``job``'s study was handled up to its last arrival (atomic replace)."""
    jobs = spool / JOBS_DIR
    jobs.mkdir(parents=True, exist_ok=True)
    write_atomic(jobs / f"{job.study_instance_uid}.json",
                 _Marker(last_arrival_ns=job.last_arrival_ns, fingerprint=job.fingerprint).model_dump_json().encode())


def _read_marker(spool: Path, study_uid: str) -> _Marker | None:
    marker = spool / JOBS_DIR / f"{study_uid}.json"
    if not marker.is_file():
        return None
    return _Marker.model_validate_json(marker.read_text(encoding="utf-8"))


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]


def watch(spool: Path, study_quiet_period_s: float, rules: SelectionSettings, enqueue: Enqueue,
          stop: threading.Event, store: JobStore, poll_interval_s: float = 1.0,
          retry_on: tuple[type[Exception], ...] = (OSError,), incomplete_timeout_s: float = 600.0) -> None:
    """Poll the job store's open studies until ``stop`` is set, enqueueing one job per complete, changed study.

    Each poll asks the store (:meth:`JobStore.quiet_open_studies`, an index)
    for the studies that are open and quiet; finished studies cost nothing,
    so idle polling does not grow with the spool. The spool stays the truth
    for each due study (:func:`find_due_studies` with its folder mtimes and
    ``.jobs`` marker); when the store is new its index is rebuilt from the
    spool once (:meth:`JobStore.rebuild_open_index`) before the first poll.
    A study holding a fragment (a series of an association that ended
    abnormally, ``incomplete_timeout_s``) stays open until it is due.

    An enqueue error of a type in ``retry_on`` (broker down) is logged and
    retried at the next poll; the study stays open because it was not marked.
    An error while handling one study (e.g. ENOSPC writing its marker) is
    logged with its class and the study is retried at the next poll; a job
    already enqueued is not enqueued again while only its marker is
    missing. An error of the store or the poll itself is logged and the
    poll repeated. Each poll writes the ``completion-watcher`` heartbeat,
    which ``/api/health`` checks; the watcher itself only ends when ``stop``
    is set.
    """
    unmarked: dict[str, StudyJob] = {}  # enqueued, but the marker could not be written yet
    rebuilt = not store.created
    while not stop.is_set():
        try:
            if not rebuilt:
                log.info("job store is new: %d study folder(s) of the spool indexed",
                         store.rebuild_open_index(spool))
                rebuilt = True
            store.beat(WATCHER_HEARTBEAT)
            _poll(spool, study_quiet_period_s, rules, enqueue, store, retry_on, unmarked, incomplete_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the watcher thread must outlive any error; class logged, retried
            log.error("completion poll failed (%s); retrying in %.0f s", describe(exc), poll_interval_s)
        stop.wait(poll_interval_s)


#: Heartbeat name of the series-completion watcher in the job store.
WATCHER_HEARTBEAT = "completion-watcher"


def _poll(spool: Path, study_quiet_period_s: float, rules: SelectionSettings, enqueue: Enqueue, store: JobStore,
          retry_on: tuple[type[Exception], ...], unmarked: dict[str, StudyJob],
          incomplete_timeout_s: float = 600.0) -> None:
    """One poll: check the open, quiet studies; enqueue and close the due ones, close those with nothing to do."""
    now_s = time.time()
    cutoff = now_s - study_quiet_period_s
    for uid in store.quiet_open_studies(cutoff):
        folder = spool / uid
        if not folder.is_dir():  # deleted (console, retention): nothing to complete
            store.close_study(uid, cutoff)
            continue
        now_ns = int(now_s * 1e9)
        checked, job = _checked_due_job(spool, folder, now_ns, int(study_quiet_period_s * 1e9), rules,
                                        incomplete_timeout_s)
        if job is None:
            if (checked and _quiet_on_disk(folder, now_s, study_quiet_period_s)  # handled before, or empty
                    and not held_series(spool, uid, now_ns, incomplete_timeout_s)):
                store.close_study(uid, cutoff)
            continue
        try:
            if unmarked.get(job.study_instance_uid) != job:  # not enqueued yet (or changed since)
                if not _enqueue_if_needed(spool, job, study_quiet_period_s, enqueue, retry_on, store):
                    continue
                unmarked[job.study_instance_uid] = job
            mark_handled(spool, job)
            unmarked.pop(job.study_instance_uid, None)
            store.close_study(job.study_instance_uid, cutoff, study_identifiers(job))
        except Exception as exc:  # noqa: BLE001 - one study's error must not stop the others; logged, retried
            log.error("job %s: study not handled (%s); will retry", job.job_id, describe(exc))


def _quiet_on_disk(study: Path, now_s: float, study_quiet_period_s: float) -> bool:
    """True when the study folder's last arrival on disk is older than the quiet period."""
    return now_s * 1e9 - study_last_arrival_ns(study) >= study_quiet_period_s * 1e9


def study_identifiers(job: StudyJob) -> dict[str, str]:
    """Patient ID, Accession Number and Study Date of a job's study, from one header (for the console search)."""
    for info in job.ranking.candidates:
        files = instance_files(Path(info.series_dir))
        if files:
            try:
                ds = pydicom.dcmread(files[0], stop_before_pixels=True,
                                     specific_tags=["PatientID", "AccessionNumber", "StudyDate"])
            except (InvalidDicomError, OSError, ValueError):
                continue
            return {"patient_id": str(ds.get("PatientID", "")), "accession": str(ds.get("AccessionNumber", "")),
                    "study_date": str(ds.get("StudyDate", ""))}
    return {}


def _enqueue_if_needed(spool: Path, job: StudyJob, study_quiet_period_s: float, enqueue: Enqueue,
                       retry_on: tuple[type[Exception], ...], store: JobStore) -> bool:
    """Enqueue one due study unless its candidates are unchanged; False when the broker refused (retry)."""
    if not needs_job(spool, job):
        log.info("job %s: study changed but its candidate series did not; not analysed again", job.job_id)
        return True
    enqueued_at = time.time()
    try:
        enqueue(job)
    except retry_on as exc:
        log.error("job %s: cannot enqueue (%s); will retry", job.job_id, describe(exc))
        return False
    try:
        store.job_queued(job.study_instance_uid, job.fingerprint, job.model_dump(mode="json"), enqueued_at)
    except sqlite3.Error as exc:  # the job is queued; the worker creates the row when it starts
        log.error("job %s: enqueued, but not recorded in the job store (%s)", job.job_id, describe(exc))
    log.info("job %s: study quiet for %.1f s, enqueued (%d candidate series, %d not candidates)",
             job.job_id, study_quiet_period_s, len(job.ranking.candidates), len(job.ranking.rejected))
    return True
