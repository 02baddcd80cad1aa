"""The job store (SQLite, WAL) and the sweeper that recovers jobs of dead workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from osteonode.jobstore import JobStore
from osteonode.sweeper import MAX_REQUEUES, STRANDED_AFTER_S, sweep

REPO = Path(__file__).resolve().parents[2]


def _arrivals(path: str, study: str, n: int) -> None:
    store = JobStore(Path(path))
    for i in range(n):
        store.record_arrival(study, f"{study}.{i % 3}")


def test_concurrent_writers_in_several_processes_lose_nothing(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    JobStore(path)
    with ProcessPoolExecutor(4) as pool:
        list(pool.map(_arrivals, [str(path)] * 4, ["1.1", "1.2", "1.3", "1.1"], [200] * 4))
    store = JobStore(path)
    assert not store.created
    assert {s["study_uid"]: s["instances"] for s in store.studies()} == {"1.1": 400, "1.2": 200, "1.3": 200}
    assert store._rows("PRAGMA journal_mode")[0]["journal_mode"] == "wal"


def test_job_lifecycle_is_recorded_with_stages_deliveries_and_timeline(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.record_arrival("1.2", "1.2.3", at=100.0)
    store.close_study("1.2", 130.0, {"patient_id": "P1", "accession": "A1", "study_date": "20260101"})
    queued = store.job_queued("1.2", "f" * 64, {"study_instance_uid": "1.2"}, time.time())
    assert store.job_started("1.2", "f" * 64, {"study_instance_uid": "1.2"}, worker="h:1") == queued
    store.job_finished(queued, "ok", category="osteopenia", series_uid="1.2.3", timings_s={"segment": 2.5})
    store.record_delivery("1.2", tmp_path / "1.2", "pacs", "pending", 1, "refused", files=["sr.dcm"], next_at=5.0)
    store.record_delivery("1.2", tmp_path / "1.2", "pacs", "delivered", 2)
    (row,) = store.studies(accession="A1")
    assert row["status"] == "ok" and row["job"]["category"] == "osteopenia"
    assert row["deliveries"] == {"pacs": "delivered"}
    assert store.studies(patient_id="nobody") == []
    study = store.study("1.2")
    assert study["jobs"][0]["stages"] == {"segment": 2.5} and study["jobs"][0]["runs"] == 1
    assert [e["kind"] for e in study["events"]] == ["received", "series", "complete", "queued", "analysing", "ok",
                                                    "delivery pending", "delivery delivered"]
    assert store.delivery_totals() == [{"destination": "pacs", "attempts": 2, "failures": 1}]
    with pytest.raises(ValueError):
        store.job_finished(queued, "queued")


def test_an_instance_after_the_quiet_cutoff_keeps_the_study_open(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.record_arrival("1.2", "1.2.3", at=100.0)
    assert store.quiet_open_studies(110.0) == ["1.2"]
    store.record_arrival("1.2", "1.2.3", at=120.0)  # arrives while the watcher handles the study
    store.close_study("1.2", 110.0)
    assert store.quiet_open_studies(130.0) == ["1.2"]


_DYING_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from osteonode.jobstore import JobStore, start_heartbeat
    store = JobStore(Path(sys.argv[1]))
    store.job_started("1.2", "f" * 64, {"study_instance_uid": "1.2"})
    start_heartbeat(store, interval_s=0.1)
    print("analysing", flush=True)
    time.sleep(600)
""")


def test_sweeper_requeues_the_job_of_a_killed_worker_then_records_it_failed(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    requeued = []
    for attempt in range(MAX_REQUEUES + 1):
        worker = subprocess.Popen([sys.executable, "-c", _DYING_WORKER, str(path)], stdout=subprocess.PIPE,
                                  text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert worker.stdout.readline().strip() == "analysing"
        time.sleep(0.3)
        assert sweep(store, requeued.append, None, heartbeat_max_age_s=1.0)["jobs_requeued"] == 0  # alive
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        time.sleep(1.2)
        counts = sweep(store, requeued.append, None, heartbeat_max_age_s=1.0)
        if attempt < MAX_REQUEUES:
            assert counts["jobs_requeued"] == 1 and store.jobs_by_state()["queued"] == 1
        else:
            assert counts["jobs_failed"] == 1
    assert requeued == [{"study_instance_uid": "1.2"}] * MAX_REQUEUES
    (job,) = store.study("1.2")["jobs"]
    assert job["state"] == "failed" and "worker lost" in job["reason"] and job["runs"] == MAX_REQUEUES + 1


def test_sweeper_requeues_a_stranded_delivery_and_gives_up_after_bounded_requeues(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.record_arrival("1.2", "1.2.3")
    entry = tmp_path / "outbox" / "1.2"
    entry.mkdir(parents=True)
    store.record_delivery("1.2", entry, "pacs", "pending", 1, "refused", files=["seg.dcm"], next_at=time.time())
    calls = []
    now = time.time() + STRANDED_AFTER_S + 1
    assert sweep(store, None, lambda *a: calls.append(a), heartbeat_max_age_s=90, now=now)["deliveries_requeued"] == 1
    assert calls == [(str(entry), "pacs", ["seg.dcm"])]
    for _ in range(MAX_REQUEUES):
        now += STRANDED_AFTER_S + 1
        counts = sweep(store, None, lambda *a: calls.append(a), heartbeat_max_age_s=90, now=now)
    assert counts["deliveries_failed"] == 1 and len(calls) == MAX_REQUEUES
    assert json.loads((entry / "delivery-pacs.json").read_text())["state"] == "failed"
    assert store.study("1.2")["deliveries"] == {"pacs": "failed"}


def test_a_worker_quicker_than_the_queued_record_keeps_its_job_analysing(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    enqueued_at = time.time()
    job = store.job_started("1.2", "f" * 64, {}, worker="h:1")  # the worker took the message at once
    store.job_queued("1.2", "f" * 64, {}, enqueued_at)
    assert store.study("1.2")["jobs"][0]["state"] == "analysing"
    store.job_finished(job, "ok")
    store.job_queued("1.2", "f" * 64, {}, time.time())  # re-analysis of a finished job
    assert store.study("1.2")["jobs"][0]["state"] == "queued"


def test_a_worker_that_finished_before_the_queued_record_keeps_its_final_state(tmp_path):
    # the embedded queue under load: the worker took the message, analysed and finished the job before
    # serve wrote its "queued" record; the study must not show a queued job for good
    store = JobStore(tmp_path / "jobs.sqlite3")
    enqueued_at = time.time()
    job = store.job_started("1.2", "f" * 64, {}, worker="h:1")
    store.job_finished(job, "not_evaluable", reason="too few slices")
    store.job_queued("1.2", "f" * 64, {}, enqueued_at)
    assert [j["state"] for j in store.study("1.2")["jobs"]] == ["not_evaluable"]
    assert store.study("1.2")["status"] == "not_evaluable"
