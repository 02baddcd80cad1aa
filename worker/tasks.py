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

from osteonode.config import load_settings
from osteonode.dispatch import outbox_entry, record_delivery, send_files
from osteonode.errors import DeliveryFailed
from osteonode.ingest.completion import StudyJob, log_id
from osteonode.pipeline import analyze_study
from worker.app import app

log = logging.getLogger(__name__)


@app.task(name="osteonode.analyze_study")
def analyze_study_task(job: dict) -> str:
    """Analyse one complete study (payload: :class:`StudyJob` as JSON) and queue its delivery."""
    settings = load_settings()
    study_job = StudyJob.model_validate(job)
    entry = outbox_entry(settings.outbox_dir, study_job.study_instance_uid)
    result = analyze_study(study_job.ranking, entry, settings.analysis, settings.selection)
    if result.status == "not_evaluable" and settings.analysis.skip_not_evaluable:
        log.info("job %s: not evaluable, skipped by configuration (%s)", study_job.job_id, result.reason)
        return result.status
    for destination in settings.destinations:
        record_delivery(entry, destination.name, "pending", 0)
        deliver.delay(str(entry), destination.name)
    log.info("job %s: %s, queued for %d destination(s)", study_job.job_id, result.status,
             len(settings.destinations))
    return result.status


@app.task(name="osteonode.deliver", bind=True, max_retries=None)
def deliver(self, entry: str, destination_name: str) -> str:
    """Send the DICOM files of outbox ``entry`` to the configured destination ``destination_name``."""
    settings = load_settings()
    folder = Path(entry)
    job_id = log_id(folder.name)
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
    except DeliveryFailed as exc:
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
