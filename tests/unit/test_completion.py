"""Spool writes and quiet-period series completion."""

from __future__ import annotations

import io
import os
import threading
import time

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from osteonode.config import SelectionSettings
from osteonode.errors import InputRejected
from osteonode.ingest.completion import find_due_studies, mark_handled, needs_job, watch
from osteonode.ingest.spool import check_uid, instance_files, write_instance
from osteonode.jobstore import JobStore

RULES = SelectionSettings()


def _age(path, seconds):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def test_write_is_atomic_and_listed(tmp_path):
    p = write_instance(tmp_path, "1.2", "1.2.3", "1.2.3.4", b"DICM-bytes")
    assert p.read_bytes() == b"DICM-bytes"
    assert instance_files(p.parent) == [p]
    assert not [f for f in p.parent.iterdir() if f.name.startswith(".tmp-")]


@pytest.mark.parametrize("bad", ["", None, "../../etc", "1.2.a", "1." * 40])
def test_bad_uids_are_rejected_with_a900(bad):
    with pytest.raises(InputRejected) as err:
        check_uid(bad, "SOP Instance UID")
    assert err.value.status == 0xA900


def _ct(path, series_uid, number, sop_uid, *, image_type=("ORIGINAL", "PRIMARY", "AXIAL"), kernel="B30f"):
    """Spool one minimal CT header (no pixel data: the completion watcher never reads pixels)."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, sop_uid, "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = "1.2", series_uid, number
    ds.ImageType, ds.ConvolutionKernel, ds.SliceThickness = list(image_type), kernel, 3.0
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return write_instance(path, "1.2", series_uid, sop_uid, buffer.getvalue())


def _spool_series(spool, series_uid, number, n=10, **kwargs):
    for i in range(n):
        _ct(spool, series_uid, number, f"{series_uid}.{i}", **kwargs)


def _age_study(spool, seconds):
    for folder in [spool / "1.2", *(p for p in (spool / "1.2").iterdir() if p.is_dir())]:
        _age(folder, seconds)


def test_study_is_due_after_quiet_period_with_ranked_series_and_only_once(tmp_path):
    _spool_series(tmp_path, "1.2.3", 2)
    _spool_series(tmp_path, "1.2.4", 1, n=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    _spool_series(tmp_path, "1.2.5", 3, kernel="B70f")
    assert find_due_studies(tmp_path, 5, RULES) == []  # still arriving
    _age_study(tmp_path, 10)
    (job,) = find_due_studies(tmp_path, 5, RULES)
    assert job.study_instance_uid == "1.2"
    assert [s.series_instance_uid for s in job.ranking.candidates] == ["1.2.3", "1.2.5"]
    assert [r.series.series_instance_uid for r in job.ranking.rejected] == ["1.2.4"]
    assert job.ranking.candidates[0].series_dir == str(tmp_path / "1.2" / "1.2.3")
    assert needs_job(tmp_path, job)
    mark_handled(tmp_path, job)
    assert find_due_studies(tmp_path, 5, RULES) == []
    # JSON only: the payload round-trips through JSON unchanged
    assert type(job).model_validate_json(job.model_dump_json()) == job


def test_resent_study_or_new_non_candidate_needs_no_job_but_new_candidate_does(tmp_path):
    _spool_series(tmp_path, "1.2.3", 2)
    _age_study(tmp_path, 10)
    (job,) = find_due_studies(tmp_path, 5, RULES)
    mark_handled(tmp_path, job)
    # the same instances again: due (the study changed on disk) but no new job
    _spool_series(tmp_path, "1.2.3", 2)
    _age_study(tmp_path, 10)
    (again,) = find_due_studies(tmp_path, 5, RULES)
    assert not needs_job(tmp_path, again)
    mark_handled(tmp_path, again)
    # a late localizer is no candidate: no new job
    _spool_series(tmp_path, "1.2.6", 1, n=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    _age_study(tmp_path, 10)
    (late,) = find_due_studies(tmp_path, 5, RULES)
    assert not needs_job(tmp_path, late)
    mark_handled(tmp_path, late)
    # an instance more in the candidate series, or a new candidate series: a new job
    _ct(tmp_path, "1.2.3", 2, "1.2.3.99")
    _age_study(tmp_path, 10)
    (grown,) = find_due_studies(tmp_path, 5, RULES)
    assert needs_job(tmp_path, grown) and grown.ranking.candidates[0].instance_count == 11


def test_watch_retries_when_broker_is_down_and_state_survives_a_restart(tmp_path):
    _spool_series(tmp_path, "1.2.3", 2, n=8)
    _age_study(tmp_path, 10)
    calls, stop = [], threading.Event()

    def enqueue(job):
        calls.append(job)
        if len(calls) == 1:
            raise ConnectionRefusedError("broker down")
        stop.set()

    store = JobStore(tmp_path / "jobs.sqlite3")  # new: its index is rebuilt from the spool
    watch(tmp_path, 5, RULES, enqueue, stop, store, poll_interval_s=0.01)
    assert len(calls) == 2 and find_due_studies(tmp_path, 5, RULES) == []
    assert store.quiet_open_studies(float("inf")) == [] and store.jobs_by_state()["queued"] == 1
    # a new watcher (restart) on the same spool enqueues nothing, with the same store or a lost one
    for store in (JobStore(tmp_path / "jobs.sqlite3"), JobStore(tmp_path / "new.sqlite3")):
        again, stop = [], threading.Event()
        threading.Timer(0.2, stop.set).start()
        watch(tmp_path, 5, RULES, again.append, stop, store, poll_interval_s=0.01)
        assert again == [] and store.quiet_open_studies(float("inf")) == []


def test_watch_enqueues_a_study_recorded_in_the_store_and_reopens_it_on_a_late_series(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.rebuild_open_index(tmp_path)  # empty spool: the watcher must not rebuild again
    _spool_series(tmp_path, "1.2.3", 2, n=8)
    store.record_arrival("1.2", "1.2.3", at=0.0)  # long ago: quiet
    _age_study(tmp_path, 10)
    jobs, stop = [], threading.Event()
    threading.Timer(0.3, stop.set).start()
    watch(tmp_path, 5, RULES, jobs.append, stop, store, poll_interval_s=0.01)
    assert len(jobs) == 1 and store.study("1.2")["open"] == 0
    store.record_arrival("1.2", "1.2.4", at=1.0)  # a late series reopens the study
    assert store.quiet_open_studies(2.0) == ["1.2"] and store.study("1.2")["status"] == "receiving"


def _finished_studies(spool, store, n):
    """``n`` studies spooled and handled long ago (closed in the store)."""
    for i in range(n):
        (spool / f"2.{i}" / f"2.{i}.1").mkdir(parents=True)
        store.record_arrival(f"2.{i}", f"2.{i}.1", at=float(i))
        store.close_study(f"2.{i}", float(n))


def _poll_seconds(spool, store, polls=50):
    from osteonode.ingest.completion import _poll

    start = time.perf_counter()
    for _ in range(polls):
        _poll(spool, 5, RULES, lambda job: None, store, (OSError,), {})
    return (time.perf_counter() - start) / polls


def test_idle_poll_cost_does_not_grow_with_finished_studies(tmp_path):
    empty = JobStore(tmp_path / "empty.sqlite3")
    (tmp_path / "a").mkdir()
    full = JobStore(tmp_path / "full.sqlite3")
    _finished_studies(tmp_path / "b", full, 3000)
    base, loaded = _poll_seconds(tmp_path / "a", empty), _poll_seconds(tmp_path / "b", full)
    # one indexed query either way (the old whole-spool scan: ~170 ms per 1000 studies, bench/idle_poll.py)
    assert loaded < 0.002 and loaded < 3 * base + 0.0005, (base, loaded)


def test_a_study_that_cannot_be_checked_stays_open_and_is_retried(tmp_path):
    from osteonode.ingest.completion import _poll

    store = JobStore(tmp_path / "jobs.sqlite3")
    _spool_series(tmp_path, "1.2.3", 2, n=8)
    store.record_arrival("1.2", "1.2.3", at=0.0)
    _age_study(tmp_path, 10)
    marker = tmp_path / ".jobs" / "1.2.json"
    marker.parent.mkdir()
    marker.write_text("not json")  # a corrupt marker
    jobs = []
    _poll(tmp_path, 5, RULES, jobs.append, store, (OSError,), {})
    assert jobs == [] and store.quiet_open_studies(float("inf")) == ["1.2"]
    marker.unlink()
    _poll(tmp_path, 5, RULES, jobs.append, store, (OSError,), {})
    assert len(jobs) == 1 and store.quiet_open_studies(float("inf")) == []
