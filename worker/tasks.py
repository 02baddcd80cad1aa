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

import logging
from pathlib import Path

from osteonode.config import DispatchSettings, Settings, load_settings
from osteonode.dispatch import outbox_entry, record_delivery, send_files
from osteonode.errors import DeliveryFailed
from osteonode.ingest.completion import StudyJob, log_id
from osteonode.pipeline import analyze_study
from osteonode.result import AnalysisResult
from worker.app import app

log = logging.getLogger(__name__)


@app.task(name="osteonode.analyze_study")
def analyze_study_task(job: dict) -> str:
    """Analyse one complete study (payload: :class:`StudyJob` as JSON) and send its outputs as they are written."""
    settings = load_settings()
    study_job = StudyJob.model_validate(job)
    entry = outbox_entry(settings.outbox_dir, study_job.study_instance_uid)
    delivery = PhasedDelivery(entry, settings, study_job.job_id)
    try:
        result = analyze_study(study_job.ranking, entry, settings.analysis, settings.selection,
                               publish=delivery.publish)
    except BaseException as exc:
        delivery.finish(error=exc)
        raise
    delivery.finish()
    return result.status


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
    """

    def __init__(self, entry: Path, settings: Settings, job_id: str) -> None:
        self.entry, self.settings, self.job_id = entry, settings, job_id
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
        for destination in self.settings.destinations:
            if self.batches == 1:
                record_delivery(self.entry, destination.name, "pending", 0, "being sent")
            if destination.name in self.unsent:  # an earlier batch failed: the retry sends this one too
                self.unsent[destination.name] += [p.name for p in paths]
                continue
            try:
                send_files(paths, destination, calling_ae_title=self.settings.ae_title,
                           timeout_s=self.settings.dispatch.timeout_s)
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
                record_delivery(self.entry, name, "failed", 1, self.refused[name])
                log.error("job %s: NOT (fully) delivered, outputs kept in the outbox: %s", self.job_id,
                          self.refused[name])
            elif name in self.unsent:
                record_delivery(self.entry, name, "pending", 1, self.errors[name])
                deliver.apply_async((str(self.entry), name, self.unsent[name]),
                                    countdown=retry_delay_s(self.settings.dispatch, 0))
            else:
                record_delivery(self.entry, name, "delivered", 1, note)
        log.info("job %s: %d batch(es) sent to %d destination(s)%s", self.job_id, self.batches,
                 len(self.settings.destinations), f"; {note}" if note else "")


def retry_delay_s(dispatch: DispatchSettings, retries: int) -> float:
    """Seconds before retry number ``retries + 1``: exponential back-off, capped."""
    return min(dispatch.retry_backoff_s * 2 ** retries, dispatch.retry_backoff_max_s)


@app.task(name="osteonode.deliver", bind=True, max_retries=None)
def deliver(self, entry: str, destination_name: str, files: list[str] | None = None) -> str:
    """Send the DICOM files of outbox ``entry`` (``files``, names in it; default all) to ``destination_name``."""
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
    paths = [folder / name for name in files] if files else sorted(folder.glob("*.dcm"))
    try:
        send_files(paths, destination, calling_ae_title=settings.ae_title, timeout_s=settings.dispatch.timeout_s)
    except DeliveryFailed as exc:
        if exc.permanent or self.request.retries >= settings.dispatch.max_retries:
            record_delivery(folder, destination.name, "failed", attempt, str(exc))
            log.error("job %s: NOT (fully) delivered after %d attempt(s), outputs kept in the outbox: %s",
                      job_id, attempt, exc)
            return "failed"
        delay = retry_delay_s(settings.dispatch, self.request.retries)
        record_delivery(folder, destination.name, "pending", attempt, str(exc))
        log.warning("job %s: delivery attempt %d failed (%s); retry in %.0f s", job_id, attempt, exc, delay)
        raise self.retry(exc=exc, countdown=delay) from exc
    record_delivery(folder, destination.name, "delivered", attempt)
    return "delivered"
