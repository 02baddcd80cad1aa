"""Prometheus metrics at ``/metrics`` (prometheus-client text format).

Two sources:

* events of ``serve``'s own SCP (C-STORE statuses, associations):
  counters in this process, fed by pynetdicom notification handlers bound to
  the running server (:func:`bind_scp_metrics`);
* everything the workers do (jobs, stage times, deliveries): read from the
  job store at each scrape (:class:`StoreCollector`), so several worker
  processes need no shared metrics directory and restarts lose nothing.

Metric names are listed in docs/admin.md §6 with example alert rules.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.utils import floatToGoString
from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

from osteonode.config import Settings
from osteonode.jobstore import JobStore

C_STORE_RSP = 0x8001
#: Upper bounds (seconds) of the analysis stage histograms.
STAGE_BUCKETS_S = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
#: Seconds a measured spool size is reused (walking a large spool costs disk reads).
SPOOL_SIZE_TTL_S = 60.0


class ScpMetrics:
    """Counters of the SCP running in this process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.cstore = Counter("osteonode_cstore_responses", "C-STORE responses sent, by status code",
                              ["status"], registry=registry)
        self.associations = Counter("osteonode_associations", "Associations requested of the SCP, by outcome",
                                    ["outcome"], registry=registry)

    def on_sent(self, event: evt.Event) -> None:
        """EVT_DIMSE_SENT: count C-STORE responses (Command Field 0x8001, PS3.7 E.1) by status (PS3.4 B.2.3)."""
        command = event.message.command_set
        if command.get("CommandField") == C_STORE_RSP and "Status" in command:
            self.cstore.labels(status=f"0x{int(command.Status):04X}").inc()


def bind_scp_metrics(server: ThreadedAssociationServer, metrics: ScpMetrics) -> None:
    """Bind the counters to a running SCP (notification events, which never change its answers)."""
    server.bind(evt.EVT_DIMSE_SENT, metrics.on_sent)
    server.bind(evt.EVT_ACCEPTED, lambda event: metrics.associations.labels(outcome="accepted").inc())
    server.bind(evt.EVT_REJECTED, lambda event: metrics.associations.labels(outcome="rejected").inc())


class StoreCollector:
    """Metrics derived from the job store and the disks at each scrape."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store, self.settings = store, settings
        self._spool_size: tuple[float, int] | None = None

    def collect(self):
        store = self.store
        completed = store.completed_counts()
        instances = CounterMetricFamily("osteonode_instances_received", "CT instances stored in the spool")
        instances.add_metric([], completed["instances"])
        yield instances
        studies = CounterMetricFamily("osteonode_studies_completed", "Studies complete (quiet period elapsed)")
        studies.add_metric([], completed["studies"])
        series = CounterMetricFamily("osteonode_series_completed", "Series of complete studies")
        series.add_metric([], completed["series"])
        yield from (studies, series)
        jobs = GaugeMetricFamily("osteonode_jobs", "Jobs by state", labels=["state"])
        for state, n in store.jobs_by_state().items():
            jobs.add_metric([state], n)
        yield jobs
        stages = HistogramMetricFamily("osteonode_stage_duration_seconds", "Analysis stage durations",
                                       labels=["stage"])
        for stage, (buckets, total) in store.stage_histograms(STAGE_BUCKETS_S).items():
            stages.add_metric([stage], [(floatToGoString(b), n) for b, n in buckets], total)
        yield stages
        attempts = CounterMetricFamily("osteonode_delivery_attempts", "Delivery attempts", labels=["destination"])
        failures = CounterMetricFamily("osteonode_delivery_failures", "Failed delivery attempts",
                                       labels=["destination"])
        for row in store.delivery_totals():
            attempts.add_metric([row["destination"]], row["attempts"] or 0)
            failures.add_metric([row["destination"]], row["failures"] or 0)
        yield from (attempts, failures)
        spool = GaugeMetricFamily("osteonode_spool_bytes", "Bytes of instance files in the spool")
        spool.add_metric([], self._spool_bytes())
        yield spool
        free = GaugeMetricFamily("osteonode_disk_free_bytes", "Free bytes on the disk of a folder", labels=["folder"])
        for name, folder in (("spool", self.settings.spool_dir), ("outbox", self.settings.outbox_dir)):
            free.add_metric([name], shutil.disk_usage(folder).free)
        yield free
        beats = GaugeMetricFamily("osteonode_heartbeat_age_seconds", "Seconds since the last heartbeat",
                                  labels=["name"])
        now = time.time()
        for name, at in store.heartbeats().items():
            beats.add_metric([name], now - at)
        yield beats

    def _spool_bytes(self) -> int:
        if self._spool_size is None or time.monotonic() - self._spool_size[0] > SPOOL_SIZE_TTL_S:
            self._spool_size = (time.monotonic(), folder_bytes(self.settings.spool_dir))
        return self._spool_size[1]


def folder_bytes(folder: Path) -> int:
    """Total size of the files below ``folder`` (0 if missing)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed while walking
                pass
    return total
