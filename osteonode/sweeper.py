"""The sweeper: recover jobs and deliveries that a dead worker or ``serve`` left unfinished.

Runs in ``serve`` every ``SWEEP_INTERVAL_S`` (or a third of ``web.heartbeat_max_age_s``, if
shorter; workers write their heartbeat as often) over the job store
(:mod:`osteonode.jobstore`):

* a job ``analysing`` whose worker's heartbeat is older than
  ``web.heartbeat_max_age_s`` (the worker process died: killed, out of
  memory, host restart; the embedded broker had already handed the message
  over, and Redis would hold it unacknowledged for ``visibility_timeout``)
  is queued again, at most ``MAX_REQUEUES`` times; after that it is recorded
  ``failed``. A requeued job that keeps dying ends ``failed`` by itself
  (``worker.tasks.MAX_ANALYSIS_STARTS``), with its "processing failed" SR;
* a delivery ``pending`` whose retry was due more than ``STRANDED_AFTER_S``
  ago while no job of its study is still running (its ``deliver`` task died
  with the process that held it) is queued again, at most ``MAX_REQUEUES``
  times; after that it is recorded ``failed`` (outputs stay in the outbox,
  ``osteonode send`` re-sends them).

With the defaults a job or delivery is recovered within 3 minutes of the
death of its process (heartbeat 90 s or due time + 120 s, plus one sweep
interval of 30 s).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from osteonode.errors import describe
from osteonode.ingest.completion import log_id
from osteonode.jobstore import JobStore
from osteonode.outbox import record_delivery

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 30.0
#: Seconds after its due time a pending delivery retry counts as lost.
STRANDED_AFTER_S = 120.0
#: Times the sweeper queues one job or delivery again before recording it failed.
MAX_REQUEUES = 2
#: Longest a job may stay ``analysing`` whatever its heartbeat (the worker's hard time limit, plus margin).
MAX_ANALYSIS_S = 1800 + 300

RequeueJob = Callable[[dict], None]
RequeueDelivery = Callable[[str, str, list[str] | None], None]


def sweep(store: JobStore, requeue_job: RequeueJob, requeue_delivery: RequeueDelivery, *,
          heartbeat_max_age_s: float, now: float | None = None) -> dict[str, int]:
    """One sweep over the store; returns how many jobs and deliveries were requeued or failed.

    Parameters
    ----------
    store : JobStore
    requeue_job : callable
        Enqueues a job payload (``StudyJob`` as JSON) again.
    requeue_delivery : callable
        Queues ``osteonode.deliver`` for (outbox entry, destination name, files or None for all).
    heartbeat_max_age_s : float
        A worker whose last heartbeat is older is taken as dead.
    now : float, optional
        POSIX seconds; default :func:`time.time`.
    """
    now = time.time() if now is None else now
    counts = {"jobs_requeued": 0, "jobs_failed": 0, "deliveries_requeued": 0, "deliveries_failed": 0}
    for job in store.stale_jobs(now - heartbeat_max_age_s, now - MAX_ANALYSIS_S):
        job_id = log_id(job["study_uid"])
        try:
            if job["requeues"] >= MAX_REQUEUES:
                reason = f"worker lost: the job was queued again {MAX_REQUEUES} times and never finished"
                store.job_finished(job["id"], "failed", reason=reason)
                counts["jobs_failed"] += 1
                log.error("job %s: analysis FAILED: %s", job_id, reason)
                continue
            enqueued_at = time.time()
            requeue_job(json.loads(job["payload"]))
            store.job_requeued(job["id"], f"worker {job['worker']} silent; queued again", enqueued_at)
            counts["jobs_requeued"] += 1
            log.warning("job %s: its worker stopped during the analysis; job queued again", job_id)
        except Exception as exc:  # noqa: BLE001 - one job's error must not stop the sweep; retried next sweep
            log.error("job %s: stale job not recovered (%s); will retry", job_id, describe(exc))
    for delivery in store.stranded_deliveries(now - STRANDED_AFTER_S):
        study, name = delivery["study_uid"], delivery["destination"]
        if store.job_running(study):
            continue
        try:
            if delivery["requeues"] >= MAX_REQUEUES:
                detail = f"retry lost {MAX_REQUEUES + 1} times (worker stopped); re-send with `osteonode send`"
                entry = Path(delivery["entry"])
                if entry.is_dir():
                    record_delivery(entry, name, "failed", delivery["attempts"], detail)
                store.record_delivery(study, entry, name, "failed", delivery["attempts"], detail)
                counts["deliveries_failed"] += 1
                log.error("job %s: NOT (fully) delivered to %s: %s", log_id(study), name, detail)
                continue
            files = json.loads(delivery["files"]) if delivery["files"] else None
            requeue_delivery(delivery["entry"], name, files)
            store.delivery_requeued(study, name, now)
            counts["deliveries_requeued"] += 1
            log.warning("job %s: delivery retry to %s was lost; queued again", log_id(study), name)
        except Exception as exc:  # noqa: BLE001 - one delivery's error must not stop the sweep
            log.error("job %s: stranded delivery not recovered (%s); will retry", log_id(study), describe(exc))
    return counts


def run_sweeper(store: JobStore, requeue_job: RequeueJob, requeue_delivery: RequeueDelivery,
                stop: threading.Event, *, heartbeat_max_age_s: float, interval_s: float = SWEEP_INTERVAL_S) -> None:
    """Sweep every ``interval_s`` until ``stop`` is set; errors are logged and the sweep repeated."""
    while not stop.wait(interval_s):
        try:
            sweep(store, requeue_job, requeue_delivery, heartbeat_max_age_s=heartbeat_max_age_s)
        except Exception as exc:  # noqa: BLE001 - the sweeper must outlive a locked or full store; retried
            log.error("sweep failed (%s); retrying in %.0f s", describe(exc), interval_s)
