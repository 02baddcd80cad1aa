"""Thin Celery tasks: each validates its JSON payload and calls plain functions.

* ``osteonode.analyze_study``: run the pipeline on the best candidate series of a
  spooled study (falling back to the next while not evaluable), write the one
  set of outputs to the study's outbox entry and send them in batches as
  they are written: the SR, the SEG, then the key images and PDF
  (:class:`PhasedDelivery`). A batch a destination did not take is handed to
  ``osteonode.deliver``.
* ``osteonode.deliver``: C-STORE an outbox entry (or some of its files) to one
  destination; retried with exponential back-off; after the last retry the
  files stay in the outbox, ``delivery-<name>.json`` records why, and the log says so.
"""

from __future__ import annotations

import fcntl
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from kombu.exceptions import OperationalError
from pydantic import ValidationError

from osteonode.atomic import write_atomic
from osteonode.config import DispatchSettings, Settings, load_settings
from osteonode.dispatch import send_files
from osteonode.errors import DeliveryFailed, InputRejected, describe
from osteonode.failure import record_failure
from osteonode.ingest.completion import StudyJob, log_id, validate_job
from osteonode.jobstore import JobStore, open_store
from osteonode.lineage import record_sent
from osteonode.outbox import DeliveryState, outbox_entry, record_delivery
from osteonode.pipeline import SR_FILE, analyze_study
from osteonode.result import AnalysisResult
from worker.app import app

log = logging.getLogger(__name__)


#: Times a job may start before it is recorded as failed without running again: a job whose worker
#: process dies (out of memory, hard time limit, kill -9) is redelivered (acks_late), which must not loop.
MAX_ANALYSIS_STARTS = 2
_STARTS_FILE = ".starts-{fingerprint}"


@app.task(name="osteonode.analyze_study")
def analyze_study_task(job: dict) -> str:
    """Analyse one complete study (payload: :class:`StudyJob` as JSON) and send its outputs as they are written.

    Every job ends in a recorded state: ``ok`` or ``not_evaluable`` from the
    pipeline, ``failed`` (``result.json`` with the error class and reason,
    plus a "processing failed" SR when ``analysis.failed_sr``) for an
    unexpected error before anything was sent, or ``rejected`` (logged;
    nothing read or written) for a payload that fails :func:`validate_job`.
    An error after the SR and SEG were sent (key images, PDF, radiomics
    export) leaves what was sent and is logged and recorded with the
    deliveries. The analysis is not retried; a job that was started
    ``MAX_ANALYSIS_STARTS`` times without finishing (its worker died) is
    recorded as failed instead of being run again.
    """
    settings = load_settings()
    try:
        study_job = StudyJob.model_validate(job)
        validate_job(study_job, settings.spool_dir)
    except (ValidationError, InputRejected) as exc:
        log.error("job rejected: invalid payload (%s)", _payload_error(exc))
        return "rejected"
    entry = outbox_entry(settings.outbox_dir, study_job.study_instance_uid)
    with _one_analysis_per_study(entry, study_job.job_id):
        return _analyze_job(study_job, job, entry, settings)


@contextmanager
def _one_analysis_per_study(entry: Path, job_id: str) -> Iterator[None]:
    """Hold an exclusive lock on the study's outbox entry while its job runs.

    With several analyses at once (``analysis_concurrency`` > 1, or several
    workers on the entry's file system), a job queued for a late series would
    otherwise run while the study's first job still writes the same entry. The
    lock (``flock`` on ``<entry>/.lock``) makes the second wait for the first;
    the kernel releases it if the process dies.
    """
    entry.mkdir(parents=True, exist_ok=True)
    with open(entry / ".lock", "a", encoding="ascii") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("job %s: waiting for the running analysis of the same study to end", job_id)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _analyze_job(study_job: StudyJob, job: dict, entry: Path, settings: Settings) -> str:
    """Run one validated job (its outbox entry locked; ``job`` its payload) and send its outputs; the recorded
    status."""
    store = open_store(settings.jobstore_file)
    job_row = _recorded(store.job_started, study_job.study_instance_uid, study_job.fingerprint, job)
    delivery = PhasedDelivery(entry, settings, study_job.job_id, store)
    starts = _starts_file(entry, study_job.fingerprint)
    error: BaseException | None = None
    result: AnalysisResult | None = None
    try:
        if _count_start(starts) > MAX_ANALYSIS_STARTS:
            raise WorkerLost(f"the analysis was started {MAX_ANALYSIS_STARTS} times and never finished "
                             "(worker killed, out of memory or over the time limit)")
        result = analyze_study(study_job.ranking, entry, settings.analysis, settings.selection,
                               publish=delivery.publish)
    except Exception as exc:  # noqa: BLE001 - top-level recorder: the class and reason go to result.json and the log
        error = exc
        if delivery.batches:  # the SR (and SEG) went out: keep them, the later outputs are missing
            log.error("job %s: analysis FAILED after the SR was sent: %s", study_job.job_id, describe(exc))
        else:
            result = record_failure(exc, study_job.study_instance_uid, study_job.ranking, entry, settings.analysis)
            log.error("job %s: analysis FAILED: %s", study_job.job_id, result.reason)
            if settings.analysis.failed_sr and (entry / SR_FILE).is_file():
                delivery.publish(result, [entry / SR_FILE])
    finally:
        starts.unlink(missing_ok=True)
    status = "failed" if error is not None or result is None else result.status
    if job_row is not None:
        _recorded(store.job_finished, job_row, status,
                  category=result.bone_status.category if result and status != "failed" else None,
                  reason=describe(error) if error is not None else result.reason if result else None,
                  series_uid=result.series_instance_uid if result else None,
                  timings_s=result.timings_s if result else None)
    delivery.finish(error=error)
    return status


_T = TypeVar("_T")


def _recorded(write: Callable[..., _T], *args, **kwargs) -> _T | None:
    """Call a job store write; an error of the store (disk full, locked too long) is logged, the job goes on."""
    try:
        return write(*args, **kwargs)
    except sqlite3.Error as exc:
        log.error("job store not updated (%s); the job goes on", describe(exc))
        return None


def record_delivery_state(store: JobStore, entry: Path, destination: str, state: DeliveryState, attempts: int,
                          detail: str = "", *, files: list[str] | None = None, next_at: float | None = None) -> None:
    """Record a delivery state beside the outputs (``delivery-<name>.json``) and in the job store."""
    record_delivery(entry, destination, state, attempts, detail)
    _recorded(store.record_delivery, entry.name, entry, destination, state, attempts, detail, files=files,
              next_at=next_at)


class PhasedDelivery:
    """The first delivery attempt of a study's outputs, batch by batch, from inside the analysis task.

    The SR and the SEG are each sent the moment they are written, before the
    key images and PDF are rendered: a ``deliver`` task queued instead would wait for the
    whole analysis in the embedded mode's single worker. Per destination:

    * each batch is sent once, at once;
    * a batch that fails for a reason a retry can change (no association, a
      failure status) is not followed by the next batch; :meth:`finish`
      queues ``osteonode.deliver`` with the files not yet sent, retried with
      back-off as any delivery;
    * a permanent refusal (SOP class not accepted) does not stop the other
      batches and ends as ``failed``, as in ``deliver``.

    ``delivery-<name>.json`` says ``pending`` from the first batch until
    :meth:`finish`, which records ``delivered``, ``failed`` or (retry queued)
    ``pending``; exactly one ``deliver`` task at most is queued per
    destination, so no two writers share a record.

    Parameters
    ----------
    entry : pathlib.Path
        The study's outbox folder.
    settings : Settings
        Destinations, ``dispatch`` settings, ``analysis.skip_not_evaluable``.
    job_id : str
        For the log.
    store : JobStore
        Where each delivery state is recorded too.
    """

    def __init__(self, entry: Path, settings: Settings, job_id: str, store: JobStore) -> None:
        self.entry, self.settings, self.job_id, self.store = entry, settings, job_id, store
        self.unsent: dict[str, list[str]] = {}  # destination -> files left for the deliver task
        self.errors: dict[str, str] = {}  # destination -> last retryable error
        self.refused: dict[str, str] = {}  # destination -> permanent failure
        self.batches = 0
        self.skipped = False

    def publish(self, result: AnalysisResult, paths: list[Path]) -> None:
        """Send one batch of written outputs to every destination (the pipeline's ``publish`` callback)."""
        if result.status == "not_evaluable" and self.settings.analysis.skip_not_evaluable:
            self.skipped = True
            return
        self.batches += 1
        for sr in (p for p in paths if p.name == SR_FILE):  # the next SR of the study will name this one as superseded
            try:
                record_sent(self.entry, sr, result)
            except OSError as exc:  # the SR still goes out; a later SR of the study then names no predecessor
                log.warning("job %s: record of the SR sent not written (%s)", self.job_id, describe(exc))
        for destination in self.settings.destinations:
            if self.batches == 1:
                record_delivery_state(self.store, self.entry, destination.name, "pending", 0, "being sent")
            if destination.name in self.unsent:  # an earlier batch failed: the retry sends this one too
                self.unsent[destination.name] += [p.name for p in paths]
                continue
            try:
                send_files(paths, destination, calling_ae_title=self.settings.ae_title,
                           timeout_s=self.settings.dispatch.timeout_s,
                           tls=self.settings.tls)
            except DeliveryFailed as exc:
                if exc.permanent:
                    self.refused[destination.name] = str(exc)
                else:
                    self.unsent[destination.name], self.errors[destination.name] = [p.name for p in paths], str(exc)
                    log.warning("job %s: first delivery attempt failed (%s)", self.job_id, exc)

    def finish(self, error: BaseException | None = None) -> None:
        """Record each destination's state and queue the retry of what was not sent.

        Parameters
        ----------
        error : BaseException, optional
            The exception that ended the analysis, if it failed after some
            batch was sent: the record then says which outputs are missing.
        """
        if self.skipped:
            log.info("job %s: not evaluable, skipped by configuration", self.job_id)
            return
        if not self.batches:
            return  # the analysis failed before it wrote anything: nothing was sent, nothing recorded
        note = f"the analysis failed after the SR was written ({type(error).__name__})" if error else ""
        for destination in self.settings.destinations:
            name = destination.name
            if name in self.refused:
                record_delivery_state(self.store, self.entry, name, "failed", 1, self.refused[name])
                log.error("job %s: NOT (fully) delivered, outputs kept in the outbox: %s", self.job_id,
                          self.refused[name])
            elif name in self.unsent:
                delay = retry_delay_s(self.settings.dispatch, 0)
                record_delivery_state(self.store, self.entry, name, "pending", 1, self.errors[name],
                                      files=self.unsent[name], next_at=time.time() + delay)
                try:
                    deliver.apply_async((str(self.entry), name, self.unsent[name]), countdown=delay)
                except OperationalError as exc:  # broker gone: the sweeper queues it once the broker is back
                    record_delivery_state(self.store, self.entry, name, "pending", 1,
                                          f"delivery not queued: {describe(exc)}; the sweeper retries",
                                          files=self.unsent[name], next_at=time.time())
                    log.error("job %s: retry of the delivery to %s NOT queued, the broker cannot be reached "
                              "(%s); outputs kept in the outbox, queued again by serve's sweeper once the "
                              "broker answers", self.job_id, name, describe(exc))
            else:
                record_delivery_state(self.store, self.entry, name, "delivered", 1, note)
        log.info("job %s: %d batch(es) sent to %d destination(s)%s", self.job_id, self.batches,
                 len(self.settings.destinations), f"; {note}" if note else "")


def retry_delay_s(dispatch: DispatchSettings, retries: int) -> float:
    """Seconds before retry number ``retries + 1``: exponential back-off, capped."""
    return min(dispatch.retry_backoff_s * 2 ** retries, dispatch.retry_backoff_max_s)


class WorkerLost(RuntimeError):
    """A job whose earlier runs never finished (recorded as failed, not run again)."""


def _starts_file(entry: Path, fingerprint: str) -> Path:
    """Where the number of starts of the job ``fingerprint`` is kept (in its outbox entry, never delivered)."""
    return entry / _STARTS_FILE.format(fingerprint=fingerprint[:16])


def _count_start(path: Path) -> int:
    """Record one more start in the counter file ``path``; return the number of starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    starts = int(path.read_text(encoding="ascii") or 0) + 1 if path.is_file() else 1
    write_atomic(path, str(starts).encode("ascii"))
    return starts


def _payload_error(exc: ValidationError | InputRejected) -> str:
    """What is wrong with a payload, without its values (field names only)."""
    if isinstance(exc, InputRejected):
        return str(exc)
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['type']}" for e in exc.errors()[:5])


@app.task(name="osteonode.deliver", bind=True, max_retries=None)
def deliver(self, entry: str, destination_name: str, files: list[str] | None = None) -> str:
    """Send the DICOM files of outbox ``entry`` (``files``, names in it; default all) to ``destination_name``."""
    settings = load_settings()
    store = open_store(settings.jobstore_file)
    folder = Path(entry)
    job_id = log_id(folder.name)
    if not folder.resolve().is_relative_to(settings.outbox_dir.resolve()):
        log.error("delivery rejected: invalid payload (the entry lies outside the outbox)")
        return "rejected"
    destination = next((d for d in settings.destinations if d.name == destination_name), None)
    if destination is None:
        log.error("job %s: destination %r is no longer configured; outputs stay in the outbox",
                  job_id, destination_name)
        record_delivery_state(store, folder, destination_name, "failed", self.request.retries,
                              "destination not configured")
        return "failed"
    attempt = self.request.retries + 1
    paths = [folder / name for name in files] if files else sorted(folder.glob("*.dcm"))
    try:
        send_files(paths, destination, calling_ae_title=settings.ae_title, timeout_s=settings.dispatch.timeout_s,
                   tls=settings.tls)
    except Exception as exc:  # noqa: BLE001 - top-level recorder: any error becomes a (bounded) failed attempt
        if not isinstance(exc, DeliveryFailed):
            exc = DeliveryFailed(f"unexpected {describe(exc)}")
        if exc.permanent or self.request.retries >= settings.dispatch.max_retries:
            record_delivery_state(store, folder, destination.name, "failed", attempt, str(exc))
            log.error("job %s: NOT (fully) delivered after %d attempt(s), outputs kept in the outbox: %s",
                      job_id, attempt, exc)
            return "failed"
        delay = retry_delay_s(settings.dispatch, self.request.retries)
        record_delivery_state(store, folder, destination.name, "pending", attempt, str(exc), files=files,
                              next_at=time.time() + delay)
        log.warning("job %s: delivery attempt %d failed (%s); retry in %.0f s", job_id, attempt, exc, delay)
        raise self.retry(exc=exc, countdown=delay) from exc
    record_delivery_state(store, folder, destination.name, "delivered", attempt)
    return "delivered"
