"""Thin Celery tasks: each validates its JSON payload and calls plain functions.

* ``osteonode.analyze_study``: run the pipeline on the best candidate series of a
  spooled study (falling back to the next while not evaluable), write the one
  set of outputs to the study's outbox entry, then enqueue one delivery per destination.
* ``osteonode.deliver``: C-STORE an outbox entry to one destination; retried
  with exponential back-off; after the last retry the files stay in the
  outbox, ``delivery-<name>.json`` records why, and the log says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kombu.exceptions import OperationalError
from pydantic import ValidationError

from osteonode.config import load_settings
from osteonode.dispatch import outbox_entry, record_delivery, send_files
from osteonode.errors import DeliveryFailed, InputRejected, describe
from osteonode.failure import record_failure
from osteonode.ingest.completion import StudyJob, log_id, validate_job
from osteonode.pipeline import analyze_study
from worker.app import app

log = logging.getLogger(__name__)


#: Times a job may start before it is recorded as failed without running again: a job whose worker
#: process dies (out of memory, hard time limit, kill -9) is redelivered (acks_late), which must not loop.
MAX_ANALYSIS_STARTS = 2
_STARTS_FILE = ".starts-{fingerprint}"


@app.task(name="osteonode.analyze_study")
def analyze_study_task(job: dict) -> str:
    """Analyse one complete study (payload: :class:`StudyJob` as JSON) and queue its delivery.

    Every job ends in a recorded state: ``ok`` or ``not_evaluable`` from the
    pipeline, ``failed`` (``result.json`` with the error class and reason,
    plus a "processing failed" SR when ``analysis.failed_sr``) for an
    unexpected error, or ``rejected`` (logged; nothing read or written) for
    a payload that fails :func:`validate_job`. The analysis is not retried;
    a job that was started ``MAX_ANALYSIS_STARTS`` times without finishing
    (its worker died) is recorded as failed instead of being run again.
    """
    settings = load_settings()
    try:
        study_job = StudyJob.model_validate(job)
        validate_job(study_job, settings.spool_dir)
    except (ValidationError, InputRejected) as exc:
        log.error("job rejected: invalid payload (%s)", _payload_error(exc))
        return "rejected"
    entry = outbox_entry(settings.outbox_dir, study_job.study_instance_uid)
    starts = _starts_file(entry, study_job.fingerprint)
    try:
        if _count_start(starts) > MAX_ANALYSIS_STARTS:
            raise WorkerLost(f"the analysis was started {MAX_ANALYSIS_STARTS} times and never finished "
                             "(worker killed, out of memory or over the time limit)")
        result = analyze_study(study_job.ranking, entry, settings.analysis, settings.selection)
    except Exception as exc:  # noqa: BLE001 - top-level recorder: the class and reason go to result.json and the log
        result = record_failure(exc, study_job.study_instance_uid, study_job.ranking, entry, settings.analysis)
        log.error("job %s: analysis FAILED: %s", study_job.job_id, result.reason)
    finally:
        starts.unlink(missing_ok=True)
    if result.status == "failed" and not settings.analysis.failed_sr:
        return result.status
    if result.status == "not_evaluable" and settings.analysis.skip_not_evaluable:
        log.info("job %s: not evaluable, skipped by configuration (%s)", study_job.job_id, result.reason)
        return result.status
    for destination in settings.destinations:
        record_delivery(entry, destination.name, "pending", 0)
        try:
            deliver.delay(str(entry), destination.name)
        except OperationalError as exc:  # broker gone since the job started: say so instead of "pending" forever
            record_delivery(entry, destination.name, "failed", 0, f"delivery not queued: {describe(exc)}")
            log.error("job %s: delivery to %s NOT queued, the broker cannot be reached (%s); outputs kept in "
                      "the outbox, re-send with `osteonode send`", study_job.job_id, destination.name,
                      describe(exc))
    log.info("job %s: %s, queued for %d destination(s)", study_job.job_id, result.status,
             len(settings.destinations))
    return result.status


class WorkerLost(RuntimeError):
    """A job whose earlier runs never finished (recorded as failed, not run again)."""


def _starts_file(entry: Path, fingerprint: str) -> Path:
    """Where the number of starts of the job ``fingerprint`` is kept (in its outbox entry, never delivered)."""
    return entry / _STARTS_FILE.format(fingerprint=fingerprint[:16])


def _count_start(path: Path) -> int:
    """Record one more start in the counter file ``path``; return the number of starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    starts = int(path.read_text(encoding="ascii") or 0) + 1 if path.is_file() else 1
    path.write_text(str(starts), encoding="ascii")
    return starts


def _payload_error(exc: ValidationError | InputRejected) -> str:
    """What is wrong with a payload, without its values (field names only)."""
    if isinstance(exc, InputRejected):
        return str(exc)
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['type']}" for e in exc.errors()[:5])


@app.task(name="osteonode.deliver", bind=True, max_retries=None)
def deliver(self, entry: str, destination_name: str) -> str:
    """Send the DICOM files of outbox ``entry`` to the configured destination ``destination_name``."""
    settings = load_settings()
    folder = Path(entry)
    job_id = log_id(folder.name)
    if not folder.resolve().is_relative_to(settings.outbox_dir.resolve()):
        log.error("delivery rejected: invalid payload (the entry lies outside the outbox)")
        return "rejected"
    destination = next((d for d in settings.destinations if d.name == destination_name), None)
    if destination is None:
        log.error("job %s: destination %r is no longer configured; outputs stay in the outbox",
                  job_id, destination_name)
        record_delivery(folder, destination_name, "failed", self.request.retries, "destination not configured")
        return "failed"
    attempt = self.request.retries + 1
    try:
        send_files(sorted(folder.glob("*.dcm")), destination, calling_ae_title=settings.ae_title,
                   timeout_s=settings.dispatch.timeout_s)
    except Exception as exc:  # noqa: BLE001 - top-level recorder: any error becomes a (bounded) failed attempt
        if not isinstance(exc, DeliveryFailed):
            exc = DeliveryFailed(f"unexpected {describe(exc)}")
        if exc.permanent or self.request.retries >= settings.dispatch.max_retries:
            record_delivery(folder, destination.name, "failed", attempt, str(exc))
            log.error("job %s: NOT (fully) delivered after %d attempt(s), outputs kept in the outbox: %s",
                      job_id, attempt, exc)
            return "failed"
        delay = min(settings.dispatch.retry_backoff_s * 2 ** self.request.retries,
                    settings.dispatch.retry_backoff_max_s)
        record_delivery(folder, destination.name, "pending", attempt, str(exc))
        log.warning("job %s: delivery attempt %d failed (%s); retry in %.0f s", job_id, attempt, exc, delay)
        raise self.retry(exc=exc, countdown=delay) from exc
    record_delivery(folder, destination.name, "delivered", attempt)
    return "delivered"
