"""Series completion by quiet period, and the job that is enqueued for a complete series.

DICOM has no "series complete" message, so a series is taken as complete
once no instance has arrived for ``quiet_period_s`` seconds (the approach of
mercure and most routers). The state lives on disk, in the spool: the
series folder's modification time is the time of the last arrival (every
instance is renamed into it), and ``<spool>/.jobs/<SeriesInstanceUID>.json``
records which arrival time a job was enqueued for. A restart therefore
neither loses nor repeats a job; instances that arrive after a job was
enqueued cause a new job for the whole series, whose outputs replace the
earlier ones (output UIDs are deterministic).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from osteonode.ingest.spool import instance_files

log = logging.getLogger(__name__)

JOBS_DIR = ".jobs"


class SeriesJob(BaseModel):
    """The broker payload for one complete series: paths and UIDs only (JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_instance_uid: str
    series_instance_uid: str
    series_dir: str
    instance_count: int
    last_arrival_ns: int

    @property
    def job_id(self) -> str:
        """Short, non-identifying handle for logs (UIDs themselves are not logged)."""
        return log_id(self.series_instance_uid)


def log_id(uid: str) -> str:
    """A 10-character hash of a UID, to correlate log lines without logging the UID."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


Enqueue = Callable[[SeriesJob], None]


def find_due_series(spool: Path, quiet_period_s: float, now_s: float | None = None) -> list[SeriesJob]:
    """Series folders quiet for at least ``quiet_period_s`` seconds and not yet enqueued.

    Parameters
    ----------
    spool : pathlib.Path
        Spool root (``<study>/<series>/<sop>.dcm``).
    quiet_period_s : float
        Seconds without a new instance after which a series counts as complete.
    now_s : float, optional
        Current time (epoch seconds); defaults to :func:`time.time`.
    """
    now_ns = int((time.time() if now_s is None else now_s) * 1e9)
    quiet_ns = int(quiet_period_s * 1e9)
    due = []
    for study in _subdirs(spool):
        for series in _subdirs(study):
            last_arrival_ns = series.stat().st_mtime_ns
            if now_ns - last_arrival_ns < quiet_ns or _enqueued_arrival_ns(spool, series.name) >= last_arrival_ns:
                continue
            files = instance_files(series)
            if files:
                due.append(SeriesJob(study_instance_uid=study.name, series_instance_uid=series.name,
                                     series_dir=str(series.resolve()), instance_count=len(files),
                                     last_arrival_ns=last_arrival_ns))
    return due


def mark_enqueued(spool: Path, job: SeriesJob) -> None:
    """Record on disk that ``job`` was enqueued (atomic replace)."""
    jobs = spool / JOBS_DIR
    jobs.mkdir(parents=True, exist_ok=True)
    tmp = jobs / f".{job.series_instance_uid}.tmp"
    tmp.write_text(job.model_dump_json(), encoding="utf-8")
    os.replace(tmp, jobs / f"{job.series_instance_uid}.json")


def _enqueued_arrival_ns(spool: Path, series_uid: str) -> int:
    marker = spool / JOBS_DIR / f"{series_uid}.json"
    if not marker.is_file():
        return -1
    return SeriesJob.model_validate_json(marker.read_text(encoding="utf-8")).last_arrival_ns


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]


def watch(spool: Path, quiet_period_s: float, enqueue: Enqueue, stop: threading.Event,
          poll_interval_s: float = 1.0, retry_on: tuple[type[Exception], ...] = (OSError,)) -> None:
    """Poll the spool until ``stop`` is set, enqueueing each series once it is complete.

    An enqueue error of a type in ``retry_on`` (broker down) is logged and
    retried at the next poll; the series stays due because it was not marked.
    """
    while not stop.is_set():
        for job in find_due_series(spool, quiet_period_s):
            try:
                enqueue(job)
            except retry_on as exc:
                log.error("job %s: cannot enqueue (%s); will retry", job.job_id, exc)
                continue
            mark_enqueued(spool, job)
            log.info("job %s: series quiet for %.1f s, enqueued (%d instances)",
                     job.job_id, quiet_period_s, job.instance_count)
        stop.wait(poll_interval_s)
