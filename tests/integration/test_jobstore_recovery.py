"""Recovery by the sweeper (issue 12) with real processes: a Celery worker killed with -9 mid-analysis."""

from __future__ import annotations

import json
import os
import signal
from functools import partial

import pydicom
import pytest
from node import write_config
from services import storescu, wait_for

from osteonode.config import load_settings
from osteonode.jobstore import JobStore

pytestmark = pytest.mark.integration


def _first_job(store: JobStore, study_uid: str) -> dict | None:
    """The study's first job in the store, or None before it is recorded."""
    study = store.study(study_uid)
    return study["jobs"][0] if study and study["jobs"] else None


def test_the_job_of_a_killed_worker_is_requeued_and_finished_by_another(tmp_path, redis_server, start_node,
                                                                        abdomen_series):
    """The probe: Redis mode, whole worker killed (-9): the job sat unacked for visibility_timeout (1 h)."""
    config, port = write_config(tmp_path / "node", broker_url=redis_server.url, destinations=[],
                                web="heartbeat_max_age_s = 6")  # sweeps and heartbeats every 2 s
    settings = load_settings(config)
    worker = start_node(config, "worker")
    serve = start_node(config, "serve", port=port)
    study_uid = str(pydicom.dcmread(abdomen_series[0], stop_before_pixels=True).StudyInstanceUID)
    storescu("127.0.0.1", port, "OSTEONODE", abdomen_series)
    store = JobStore(settings.jobstore_file)
    job = partial(_first_job, store, study_uid)

    running = wait_for(lambda: (j := job()) and j["state"] == "analysing" and j, timeout_s=60,
                       interval_s=0.05, what="the analysis to start")
    pool_process = int(running["worker"].rsplit(":", 1)[1])
    for pid in (worker.proc.pid, pool_process):  # the whole worker: main process and its pool process
        os.kill(pid, signal.SIGKILL)
    start_node(config, "worker")
    done = wait_for(lambda: (j := job()) and j["state"] in ("ok", "not_evaluable", "failed") and j,
                    timeout_s=240, interval_s=0.5, what="the requeued job to finish")
    assert done["state"] == "ok" and done["runs"] == 2 and done["requeues"] == 1, done
    assert json.loads((settings.outbox_dir / study_uid / "result.json").read_text())["status"] == "ok"
    assert "its worker stopped during the analysis; job queued again" in serve.log_tail(400)
    kinds = [e["kind"] for e in store.study(study_uid)["events"]]
    assert kinds.count("analysing") == 2 and "requeued" in kinds


def test_embedded_serve_killed_mid_analysis_requeues_the_job_after_restart(tmp_path, start_node, abdomen_series):
    """The probe: embedded queue, `serve` killed during an analysis: the job was lost, nothing logged."""
    config, port = write_config(tmp_path / "node", broker_url=None, destinations=[], web="heartbeat_max_age_s = 6")
    settings = load_settings(config)
    serve = start_node(config, "serve", port=port)
    study_uid = str(pydicom.dcmread(abdomen_series[0], stop_before_pixels=True).StudyInstanceUID)
    storescu("127.0.0.1", port, "OSTEONODE", abdomen_series)
    store = JobStore(settings.jobstore_file)
    job = partial(_first_job, store, study_uid)

    wait_for(lambda: (j := job()) and j["state"] == "analysing", timeout_s=60, interval_s=0.05,
             what="the analysis to start")
    os.kill(serve.proc.pid, signal.SIGKILL)
    serve.proc.wait()
    restarted = start_node(config, "serve", port=port)
    done = wait_for(lambda: (j := job()) and j["state"] in ("ok", "not_evaluable", "failed") and j,
                    timeout_s=240, interval_s=0.5, what="the requeued job to finish")
    assert done["state"] == "ok" and done["runs"] == 2 and done["requeues"] == 1, done
    assert json.loads((settings.outbox_dir / study_uid / "result.json").read_text())["status"] == "ok"
    assert "its worker stopped during the analysis; job queued again" in restarted.log_tail(400)
