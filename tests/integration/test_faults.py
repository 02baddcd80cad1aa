"""Never lose, never hide (issue 12) with a real `osteonode serve`: faults in one study do not stop the node."""

from __future__ import annotations

import json
import time

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association

from node import write_config
from osteonode.ingest.completion import log_id
from services import storescu, wait_for

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


def _send_without_release(port: int, files) -> Association:
    """A pynetdicom SCU that stores ``files`` and leaves the association open; returns it."""
    ae = AE(ae_title="FRAGMENT")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEONODE")
    assert assoc.is_established
    for path in files:
        assert assoc.send_c_store(path).Status == 0x0000
    return assoc


def _assert_not_queued(node, outbox, study_uid, seconds: float) -> None:
    time.sleep(seconds)
    assert "study quiet for" not in node.log_path.read_text()
    assert not (outbox / study_uid).exists()


def test_a_series_aborted_midway_is_not_analysed_until_re_sent(tmp_path, start_node, storescp, study):
    """Issue 12 item 2: 40 of 112 slices then A-ABORT -> no job (quiet period long past); the series
    re-sent whole -> one job, one SR made from all 112 instances."""
    quiet_s = 2.0
    config, port = write_config(tmp_path / "node", broker_url=None, quiet_period_s=quiet_s,
                                destinations=[(storescp.aet, "127.0.0.1", storescp.port)])
    outbox = tmp_path / "node" / "outbox"
    node = start_node(config, "serve", port=port)
    study_uid = str(pydicom.dcmread(study["soft"][0], stop_before_pixels=True).StudyInstanceUID)
    _send_without_release(port, study["soft"][:40]).abort()
    wait_for(lambda: "ended abnormally" in node.log_path.read_text(), timeout_s=10, what="the abort in the log")
    _assert_not_queued(node, outbox, study_uid, quiet_s + 4)
    storescu("127.0.0.1", port, "OSTEONODE", study["soft"])
    wait_for(lambda: len([p for p in storescp.files()
                          if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"]) == 1,
             timeout_s=180, what="the SR")
    result = json.loads((outbox / study_uid / "result.json").read_text())
    assert result["status"] == "ok" and result["supersedes"] is None
    (sr,) = [ds for ds in (pydicom.dcmread(p) for p in storescp.files()) if ds.Modality == "SR"]
    evidence = [i for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
                if s.SeriesInstanceUID == result["series_instance_uid"] for i in s.ReferencedSOPSequence]
    assert len(evidence) == 112
    assert node.log_path.read_text().count("study quiet for") == 1


def test_a_series_cut_by_a_killed_serve_is_held_after_the_restart(tmp_path, start_node, study):
    """``serve`` killed (-9) with an association open mid-series: after the restart the fragment is held."""
    quiet_s = 2.0
    config, port = write_config(tmp_path / "node", broker_url=None, quiet_period_s=quiet_s, destinations=[])
    node = start_node(config, "serve", port=port)
    study_uid = str(pydicom.dcmread(study["bone"][0], stop_before_pixels=True).StudyInstanceUID)
    assoc = _send_without_release(port, study["bone"][:30])
    node.proc.kill()
    node.proc.wait(timeout=10)
    assoc.abort()
    node.stop()
    node.start()
    _assert_not_queued(node, tmp_path / "node" / "outbox", study_uid, quiet_s + 4)
    assert (tmp_path / "node" / "spool" / ".associations" / study_uid).is_dir()
