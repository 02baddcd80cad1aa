"""Never lose, never hide (issue 12) with a real `osteonode serve`: faults in one study do not stop the node."""

from __future__ import annotations

import json

import pydicom
import pytest
from node import write_config
from pydicom.uid import generate_uid
from services import storescu, wait_for

from osteonode.ingest.completion import log_id

pytestmark = pytest.mark.integration
J2K = ["--propose-j2k-lossless"]  # the series stays JPEG 2000 as sent


def _as_new_study(files, folder):
    """Copies of ``files`` as another study (new Study, Series and SOP Instance UIDs)."""
    folder.mkdir(parents=True)
    study, series, paths = generate_uid(), generate_uid(), []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(folder / path.name)
        ds.save_as(paths[-1], enforce_file_format=True)
    return study, paths


def test_an_oserror_in_one_study_does_not_stop_later_studies_being_analysed(tmp_path, start_node, j2k_series):
    """The probe: ENOSPC in mark_enqueued killed the watcher and every later study was never analysed."""
    config, port = write_config(tmp_path / "node", broker_url=None, destinations=[], quiet_period_s=3.0)
    spool, outbox = tmp_path / "node" / "spool", tmp_path / "node" / "outbox"
    study_a = str(pydicom.dcmread(j2k_series[0], stop_before_pixels=True).StudyInstanceUID)
    blocker = spool / ".jobs" / f"{study_a}.json"
    blocker.mkdir(parents=True)  # the study's marker cannot be written (IsADirectoryError, an OSError like ENOSPC)
    node = start_node(config, "serve", port=port)
    storescu("127.0.0.1", port, "OSTEONODE", j2k_series, extra_args=J2K)
    wait_for(lambda: "study not handled (IsADirectoryError" in node.log_tail(400), timeout_s=60,
             what="the marker error in the log")
    study_b, files_b = _as_new_study(j2k_series, tmp_path / "b")
    storescu("127.0.0.1", port, "OSTEONODE", files_b, extra_args=J2K)
    result_b = wait_for(lambda: (outbox / study_b / "result.json").is_file() and
                        json.loads((outbox / study_b / "result.json").read_text()), timeout_s=180,
                        what="the later study's result")
    assert result_b["status"] in ("ok", "not_evaluable")
    assert node.proc.poll() is None
    blocker.rmdir()  # space again: the marker is written, study A is not queued again
    wait_for(lambda: (spool / ".jobs" / f"{study_a}.json").is_file(), timeout_s=30, what="study A's marker")
    assert (outbox / study_a / "result.json").is_file()
    assert node.log_tail(2000).count(f"job {log_id(study_a)}: study quiet") == 1, "study A was queued again"
