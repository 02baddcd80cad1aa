"""Spool writes and quiet-period series completion."""

from __future__ import annotations

import os
import threading

import pytest

from osteonode.errors import InputRejected
from osteonode.ingest.completion import find_due_series, mark_enqueued, watch
from osteonode.ingest.spool import check_uid, instance_files, write_instance


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


def test_series_is_due_only_after_quiet_period_and_only_once(tmp_path):
    write_instance(tmp_path, "1.2", "1.2.3", "1.2.3.4", b"x")
    series = tmp_path / "1.2" / "1.2.3"
    assert find_due_series(tmp_path, quiet_period_s=5) == []  # still arriving
    _age(series, 10)
    (job,) = find_due_series(tmp_path, quiet_period_s=5)
    assert (job.study_instance_uid, job.series_instance_uid, job.instance_count) == ("1.2", "1.2.3", 1)
    mark_enqueued(tmp_path, job)
    assert find_due_series(tmp_path, quiet_period_s=5) == []
    # a late instance makes the series due again (whole series re-analysed)
    write_instance(tmp_path, "1.2", "1.2.3", "1.2.3.5", b"y")
    _age(series, 10)
    (again,) = find_due_series(tmp_path, quiet_period_s=5)
    assert again.instance_count == 2


def test_watch_retries_when_broker_is_down(tmp_path):
    write_instance(tmp_path, "1.2", "1.2.3", "1.2.3.4", b"x")
    _age(tmp_path / "1.2" / "1.2.3", 10)
    calls, stop = [], threading.Event()

    def enqueue(job):
        calls.append(job)
        if len(calls) == 1:
            raise ConnectionRefusedError("broker down")
        stop.set()

    watch(tmp_path, 5, enqueue, stop, poll_interval_s=0.01)
    assert len(calls) == 2 and find_due_series(tmp_path, 5) == []
