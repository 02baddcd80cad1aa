"""One result per study: dcmtk storescu -> osteonode serve (embedded queue) -> dcmtk storescp.

The multi-series study (``study`` fixture, tests/conftest.py) is built from
the shared real CT: a localizer, the axial soft-kernel series, a thin
bone-kernel series, a coronal reformat, an arterial-phase copy, an X-Ray
Radiation Dose SR and a Secondary Capture with Modality CT. Exactly one SEG
and one SR (plus key images and PDF) must come back, made from the axial
soft-kernel series; re-sending the study must add nothing. Further tests: the fallback when the best series is not
evaluable,
a study with no usable series (one not-evaluable SR naming each reason), a late better series (real Orthanc: a new
result with new UIDs whose SR names the earlier SR as its predecessor; the study re-sent adds nothing) and a
restart of ``serve`` in the middle of a study.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pydicom
import pytest
from node import write_config
from services import dciodvfy, storescu, wait_for

from tests.conftest import STUDY_PATIENT as PATIENT

pytestmark = pytest.mark.integration

RESULT_TIMEOUT_S = 300
QUIET_S = 2.0


def _uid(paths: list[Path], keyword: str = "SeriesInstanceUID") -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).get(keyword))


def _received(storescp) -> dict[str, list[pydicom.Dataset]]:
    by_modality: dict[str, list[pydicom.Dataset]] = {}
    for path in storescp.files():
        ds = pydicom.dcmread(path)
        by_modality.setdefault(str(ds.Modality), []).append(ds)
    return by_modality


def _sr_texts(ds: pydicom.Dataset) -> list[str]:
    out = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out += _sr_texts(item)
    return out


def _evidence_series(sr: pydicom.Dataset) -> set[str]:
    return {str(s.SeriesInstanceUID) for study in sr.CurrentRequestedProcedureEvidenceSequence
            for s in study.ReferencedSeriesSequence}


def _wait_delivered(node_dir: Path, study_uid: str) -> dict:
    entry = node_dir / "outbox" / study_uid
    state = wait_for(lambda: (p := entry / "delivery-dest0.json").is_file()
                     and json.loads(p.read_text())["state"] == "delivered" and p,
                     RESULT_TIMEOUT_S, what="delivery of the study's results")
    assert state
    return json.loads((entry / "result.json").read_text())


def _start(tmp_path, destination, start_node, quiet_period_s: float = QUIET_S):
    """``osteonode serve`` on the embedded queue, sending to ``destination`` (storescp or Orthanc);
    returns (node dir, port, process)."""
    node_dir = tmp_path / "node"
    port = destination.dicom_port if hasattr(destination, "dicom_port") else destination.port
    config, port = write_config(node_dir, broker_url=None, quiet_period_s=quiet_period_s,
                                destinations=[(destination.aet, "127.0.0.1", port)])
    return node_dir, port, start_node(config, "serve", port=port)


def test_multi_series_study_gives_one_seg_and_one_sr_from_the_soft_axial_series(tmp_path, storescp, start_node,
                                                                                 study):
    node_dir, port, node = _start(tmp_path, storescp, start_node)
    everything = [p for paths in study.values() for p in paths]
    storescu("127.0.0.1", port, "OSTEONODE", everything)
    study_uid = _uid(study["soft"], "StudyInstanceUID")
    result = _wait_delivered(node_dir, study_uid)
    assert result["status"] == "ok" and result["series_instance_uid"] == _uid(study["soft"])
    received = _received(storescp)
    assert sorted((m, len(v)) for m, v in received.items()) == [("DOC", 1), ("OT", 2), ("SEG", 1), ("SR", 1)]
    (seg,), (sr,) = received["SEG"], received["SR"]
    assert {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence} == {_uid(study["soft"])}
    assert _uid(study["soft"]) in _evidence_series(sr)
    assert not {_uid(study[k]) for k in ("localizer", "bone", "coronal", "arterial")} & _evidence_series(sr)
    for ds in (seg, sr):
        assert ds.StudyInstanceUID == study_uid
    selection = next(t for t in _sr_texts(sr) if t.startswith("Series used:"))
    print(f"received: {sorted((m, len(v)) for m, v in received.items())}\n{selection}")  # pytest -s
    assert selection.startswith('Series used: series 2 "Abdomen 3.0 B30f" (kernel B30f, 3 mm).')
    for number, why in ((1, "localizer"), (3, "ranked lower"), (4, "not axial"), (5, "ranked lower")):
        assert f"series {number} " in selection and why in selection
    assert "Dose screen" not in selection  # discarded at ingest, never a series of the study
    for path in storescp.files():
        assert dciodvfy(path)[0] == [], path.name
    node_log = node.log_path.read_text()
    assert "discarded 2 instance(s)" in node_log
    assert "enqueued (3 candidate series, 2 not candidates)" in node_log

    # the same study sent again: no new job, no new object
    first = sorted(p.name for p in storescp.files())
    storescu("127.0.0.1", port, "OSTEONODE", everything)
    wait_for(lambda: "candidate series did not; not analysed again" in node.log_path.read_text(),
             QUIET_S + 30, what="the re-sent study to be seen as unchanged")
    time.sleep(2)
    assert sorted(p.name for p in storescp.files()) == first


def test_best_series_not_evaluable_falls_back_to_the_next(tmp_path, storescp, start_node, study, j2k_series):
    """A non-contrast series without L1-L4 (T11-T12 only) ranks first; the portal venous series is used."""
    node_dir, port, node = _start(tmp_path, storescp, start_node)
    study_uid = _uid(study["soft"], "StudyInstanceUID")
    short = []
    for path in j2k_series:  # the real JPEG 2000 T11-T12 series, moved into the study, decompressed
        ds = pydicom.dcmread(path)
        ds.decompress()
        ds.StudyInstanceUID, ds.PatientName, ds.PatientID = study_uid, PATIENT["patient_name"], PATIENT["patient_id"]
        ds.SeriesNumber, ds.SeriesDescription = 7, "Abdomen nativ 3.0 Br38f"
        short.append(tmp_path / path.name)
        ds.save_as(short[-1], enforce_file_format=True)
    venous = []
    for path in study["arterial"]:
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = "Abdomen portal venous 3.0 B30f"
        venous.append(tmp_path / f"pv-{path.name}")
        ds.save_as(venous[-1], enforce_file_format=True)
    storescu("127.0.0.1", port, "OSTEONODE", [*short, *venous, *study["localizer"]])
    result = _wait_delivered(node_dir, study_uid)
    assert result["status"] == "ok" and result["series_instance_uid"] == _uid(venous)
    received = _received(storescp)
    assert (len(received["SEG"]), len(received["SR"])) == (1, 1)
    assert {str(s.SeriesInstanceUID) for s in received["SEG"][0].ReferencedSeriesSequence} == {_uid(venous)}
    not_used = {s["series_number"]: s["reason"] for s in result["series_selection"]["not_used"]}
    assert "cannot be identified" in not_used[7] and "localizer" in not_used[1]
    assert result["series_selection"]["used"]["series_number"] == 5


def test_study_without_usable_series_gives_one_not_evaluable_sr(tmp_path, storescp, start_node, study):
    node_dir, port, node = _start(tmp_path, storescp, start_node)
    storescu("127.0.0.1", port, "OSTEONODE", [*study["localizer"], *study["coronal"], *study["non_ct"]])
    result = _wait_delivered(node_dir, _uid(study["soft"], "StudyInstanceUID"))
    assert result["status"] == "not_evaluable" and result["series_selection"]["used"] is None
    received = _received(storescp)
    assert sorted(received) == ["DOC", "SR"] and len(received["SR"]) == 1
    text = " ".join(_sr_texts(received["SR"][0]))
    assert "none of the study's 2 series could be analysed" in text
    assert 'series 1 "Topogram 0.6 T20f": the series is a localizer' in text
    assert 'series 4 "Cor MPR 3.0": the series is not axial (coronal or sagittal' in text
    assert dciodvfy(storescp.files()[0])[0] == []


def _sop_uids_by_modality(storescp) -> dict[str, set[str]]:
    return {m: {str(ds.SOPInstanceUID) for ds in v} for m, v in _received(storescp).items()}


def _orthanc_instances(orthanc, study_uid: str, tmp_path: Path) -> dict[str, pydicom.Dataset]:
    """Every instance of the study stored in Orthanc, by SOP Instance UID."""
    folder = tmp_path / "from-orthanc"
    folder.mkdir(exist_ok=True)
    study_id = orthanc.find_study(study_uid)
    instances = orthanc.get(f"/studies/{study_id}/instances") if study_id else []
    return {str(ds.SOPInstanceUID): ds for ds in
            (pydicom.dcmread(orthanc.download_instance(i["ID"], folder)) for i in instances)}


def test_late_better_series_supersedes_the_result_at_orthanc(tmp_path, orthanc, start_node, study):
    """Arterial series first (used), then the non-contrast soft series: re-analysed, new UIDs, the new SR
    names the earlier one as its predecessor (PS3.3 C.17.2); the whole study re-sent adds nothing."""
    node_dir, port, node = _start(tmp_path, orthanc, start_node)
    study_uid = _uid(study["soft"], "StudyInstanceUID")
    storescu("127.0.0.1", port, "OSTEONODE", study["arterial"])
    first = _wait_delivered(node_dir, study_uid)
    assert first["series_instance_uid"] == _uid(study["arterial"]) and first["supersedes"] is None
    (sr_first,) = [ds for ds in _orthanc_instances(orthanc, study_uid, tmp_path).values() if ds.Modality == "SR"]
    (node_dir / "outbox" / study_uid / "delivery-dest0.json").unlink()
    storescu("127.0.0.1", port, "OSTEONODE", study["soft"])
    second = _wait_delivered(node_dir, study_uid)
    assert second["series_instance_uid"] == _uid(study["soft"])
    (not_used,) = second["series_selection"]["not_used"]
    assert (not_used["series_number"], not_used["description"]) == (5, "Abdomen arterial 3.0 B30f")
    # the soft series names no phase: measured (the example CT is non-contrast)
    assert not_used["reason"].startswith("ranked lower than the series used: contrast phase arterial (series "
                                         "description), the series used non-contrast (aortic attenuation ")
    assert second["supersedes"]["sop_instance_uid"] == sr_first.SOPInstanceUID
    stored = _orthanc_instances(orthanc, study_uid, tmp_path)
    by_modality = {m: [ds for ds in stored.values() if ds.Modality == m] for m in ("SEG", "SR", "OT", "DOC")}
    # the new set stands beside the earlier one
    assert {m: len(v) for m, v in by_modality.items()} == {"SEG": 2, "SR": 2, "OT": 4, "DOC": 2}
    (sr_new,) = [ds for ds in by_modality["SR"] if ds.SOPInstanceUID != sr_first.SOPInstanceUID]
    assert sr_new.SeriesInstanceUID != sr_first.SeriesInstanceUID
    (predecessor,) = sr_new.PredecessorDocumentsSequence
    assert predecessor.StudyInstanceUID == study_uid
    assert [(s.SeriesInstanceUID, [i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence])
            for s in predecessor.ReferencedSeriesSequence] == [(sr_first.SeriesInstanceUID, [sr_first.SOPInstanceUID])]
    statement = next(t for t in _sr_texts(sr_new) if "supersedes" in t)
    assert 'from series 5 "Abdomen arterial 3.0 B30f" (112 instances)' in statement
    assert "another series was analysed" in statement
    (seg_new,) = [ds for ds in by_modality["SEG"]
                  if {str(s.SeriesInstanceUID) for s in ds.ReferencedSeriesSequence} == {_uid(study["soft"])}]
    for ds in (sr_new, seg_new):
        path = tmp_path / f"{ds.Modality}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy(path)[0] == [], ds.Modality

    # the whole study again, unchanged: no job, no new instance at Orthanc
    storescu("127.0.0.1", port, "OSTEONODE", [*study["arterial"], *study["soft"]])
    wait_for(lambda: "candidate series did not; not analysed again" in node.log_path.read_text(),
             QUIET_S + 30, what="the re-sent study to be seen as unchanged")
    time.sleep(2)
    assert set(_orthanc_instances(orthanc, study_uid, tmp_path)) == set(stored)
    assert node.log_path.read_text().count("study quiet for") == 2


def test_restart_of_serve_in_the_middle_of_a_study_gives_one_job(tmp_path, storescp, start_node, study):
    """Half of the study, a restart of ``serve``, the other half: one job with both series, one result set."""
    quiet_s = 15.0  # longer than a stop plus a start of serve, so the first half is not complete on its own
    node_dir, port, node = _start(tmp_path, storescp, start_node, quiet_period_s=quiet_s)
    study_uid = _uid(study["soft"], "StudyInstanceUID")
    storescu("127.0.0.1", port, "OSTEONODE", study["soft"])
    node.stop(timeout_s=30)
    node.start()
    storescu("127.0.0.1", port, "OSTEONODE", study["bone"])
    result = _wait_delivered(node_dir, study_uid)
    assert result["status"] == "ok" and result["series_instance_uid"] == _uid(study["soft"])
    time.sleep(3)
    log = node.log_path.read_text()
    assert log.count("study quiet for") == 1 and "enqueued (2 candidate series, 0 not candidates)" in log
    assert {m: len(v) for m, v in _sop_uids_by_modality(storescp).items()} == {"DOC": 1, "OT": 2, "SEG": 1, "SR": 1}
