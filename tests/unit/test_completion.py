"""Spool writes and quiet-period series completion."""

from __future__ import annotations

import io
import os
import threading

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from osteonode.config import SelectionSettings
from osteonode.errors import InputRejected
from osteonode.ingest.completion import find_due_studies, mark_handled, needs_job, watch
from osteonode.ingest.spool import check_uid, instance_files, write_instance

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

    watch(tmp_path, 5, RULES, enqueue, stop, poll_interval_s=0.01)
    assert len(calls) == 2 and find_due_studies(tmp_path, 5, RULES) == []
    # a new watcher (restart) on the same spool enqueues nothing
    again, stop = [], threading.Event()
    threading.Timer(0.1, stop.set).start()
    watch(tmp_path, 5, RULES, again.append, stop, poll_interval_s=0.01)
    assert again == []
