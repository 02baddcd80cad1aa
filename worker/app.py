"""The Celery application.

JSON serialisation only, late acks, explicit time limits. The broker is
Redis when ``broker_url`` is configured, otherwise kombu's filesystem
transport on ``queue_dir`` (durable, no server; message files written
atomically, :mod:`worker.embedded_queue`), with the same tasks.
"""

from __future__ import annotations

import gc

from celery import Celery
from celery.signals import worker_process_init, worker_ready

from osteonode.config import Settings, load_settings
from osteonode.jobstore import HEARTBEAT_INTERVAL_S, open_store, start_heartbeat

#: Longest expected analysis; hard limit kills a stuck job.
ANALYSIS_TIME_LIMIT_S = 1800

app = Celery("osteonode", include=["worker.tasks"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_time_limit=ANALYSIS_TIME_LIMIT_S,
    task_soft_time_limit=ANALYSIS_TIME_LIMIT_S - 60,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


def run_worker(celery_app: Celery, concurrency: int, *options: str) -> None:
    """Run the Celery worker (blocks): ``concurrency`` prefork processes, a fresh one per analysis.

    Each analysis runs in a child process that exits after it (max tasks per
    child 1): the 1-2 GiB an analysis takes go back to the system when it
    ends, instead of staying in a long-lived process. The children are forked
    from this process, which has imported the tasks and the pipeline module,
    so a new child starts in milliseconds. highdicom's tables of the DICOM
    standard (which attributes each module holds), which it reads on the first
    SR or SEG it builds, are read here once (0.4-0.8 s and about 110 MB,
    shared by the children) instead of in every child: measured as half the
    time of a "not evaluable" analysis (tests/integration/test_load.py). The objects alive now are moved
    out of the garbage collector's reach first (``gc.freeze``): a collection
    in this process would otherwise write to every object's header and so
    unshare the pages the idle children share with it. Celery's start-up
    banner is left out (``--quiet``): the node logs its own start-up line.
    """
    from highdicom._standard_utils import get_module_attribute_map  # cached (lru_cache); no public equivalent

    get_module_attribute_map()
    gc.freeze()
    celery_app.worker_main(["--quiet", "worker", "--pool=prefork", f"--concurrency={concurrency}",
                            "--max-tasks-per-child=1", "--loglevel=INFO", *options])


def configure(settings: Settings) -> Celery:
    """Point the app at the configured broker and return it."""
    if settings.embedded_broker:
        queue = settings.queue_dir.resolve()
        for sub in ("messages", "processed", "control"):
            (queue / sub).mkdir(parents=True, exist_ok=True)
        app.conf.update(
            broker_url=None,  # the transport below, by its class: kombu's filesystem one, writing atomically
            broker_transport="worker.embedded_queue:Transport",
            broker_transport_options={
                "data_folder_in": str(queue / "messages"),
                "data_folder_out": str(queue / "messages"),
                "processed_folder": str(queue / "processed"),
                "control_folder": str(queue / "control"),
                "store_processed": False,
                # the worker looks for a new message every 0.1 s instead of kombu's 1 s: a job waits
                # 0.05 s on average, not 0.5 s (a directory listing each time, negligible)
                "polling_interval": 0.1,
            },
        )
    else:
        app.conf.update(
            broker_url=settings.broker_url,
            broker_transport=None,
            # visibility timeout longer than the longest job, so a running job is not redelivered
            broker_transport_options={"visibility_timeout": 2 * ANALYSIS_TIME_LIMIT_S},
        )
    return app


@worker_ready.connect  # the solo pool (embedded mode): the main process runs the tasks
@worker_process_init.connect  # each prefork pool process
def _start_heartbeat(**_kwargs) -> None:
    """Write this worker process's heartbeat to the job store (``/api/health``, the sweeper)."""
    settings = load_settings()
    start_heartbeat(open_store(settings.jobstore_file),
                    interval_s=min(HEARTBEAT_INTERVAL_S, settings.web.heartbeat_max_age_s / 3))
