"""End to end with real peers: Orthanc as the PACS, Redis + Celery worker processes, dcmtk.

CT goes in by C-STORE, the node analyses it and sends a DICOM SEG and a
TID 1500 SR back into the same study; every returned object is checked with
dciodvfy.
"""

from __future__ import annotations

import json

import pydicom
import pytest
from node import write_config
from services import dciodvfy, storescu, wait_for

pytestmark = pytest.mark.integration

RESULT_TIMEOUT_S = 300


def _modalities(orthanc, study_id: str) -> dict[str, list[dict]]:
    by_modality: dict[str, list[dict]] = {}
    for series in orthanc.series_of_study(study_id):
        by_modality.setdefault(series["MainDicomTags"]["Modality"], []).append(series)
    return by_modality


def _download_one(orthanc, series: dict, dest) -> pydicom.Dataset:
    (instance,) = orthanc.instances_of_series(series["ID"])
    path = orthanc.download_instance(instance["ID"], dest)
    errors, _warnings = dciodvfy(path)
    assert errors == [], f"{path.name}: {errors}"
    return pydicom.dcmread(path)


def _sr_text(ds: pydicom.Dataset) -> str:
    """All TEXT and CODE meanings of an SR content tree, flattened."""
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(str(item.get("TextValue", "")))
        for code in item.get("ConceptCodeSequence", []):
            out.append(str(code.CodeMeaning))
        out.append(_sr_text(item))
    return " ".join(out)


def test_orthanc_round_trip_with_redis_and_celery_worker(tmp_path, orthanc, redis_server, start_node,
                                                         abdomen_series, j2k_series):
    config, port = write_config(tmp_path / "node", broker_url=redis_server.url,
                                destinations=[(orthanc.aet, "127.0.0.1", orthanc.dicom_port)])
    start_node(config, "worker")
    start_node(config, "serve", port=port)
    orthanc.add_modality("osteonode", "OSTEONODE", "127.0.0.1", port)

    studies = {}
    for name, files in (("abdomen", abdomen_series), ("j2k", j2k_series)):
        for path in files:
            reply = orthanc.upload(path)
        studies[name] = reply["ParentStudy"]
        orthanc.store_to_modality("osteonode", studies[name])  # the PACS auto-routes the study

    abdomen = wait_for(lambda: (m := _modalities(orthanc, studies["abdomen"])).get("SR") and m.get("SEG") and m,
                       timeout_s=RESULT_TIMEOUT_S, what="SEG and SR in the abdomen study")
    seg = _download_one(orthanc, abdomen["SEG"][0], tmp_path)
    sr = _download_one(orthanc, abdomen["SR"][0], tmp_path)
    ct = pydicom.dcmread(abdomen_series[0], stop_before_pixels=True)
    for ds in (seg, sr):
        assert ds.StudyInstanceUID == ct.StudyInstanceUID and ds.PatientID == ct.PatientID
    assert {str(s.SegmentLabel) for s in seg.SegmentSequence} >= {f"L{i} vertebra" for i in range(1, 5)}
    assert "Measurement Report" in str(sr.ConceptNameCodeSequence[0].CodeMeaning)

    j2k = wait_for(lambda: _modalities(orthanc, studies["j2k"]).get("SR"), timeout_s=RESULT_TIMEOUT_S,
                   what="SR in the JPEG 2000 study")
    sr_j2k = _download_one(orthanc, j2k[0], tmp_path)
    assert "SEG" not in _modalities(orthanc, studies["j2k"])
    text = _sr_text(sr_j2k).lower()
    assert "not evaluable" in text or "not_evaluable" in text
    assert "lumbar" in text or "l1" in text  # the reason names the missing lumbar levels


def test_dcmtk_storescu_in_storescp_out_on_embedded_queue(tmp_path, storescp, start_node, abdomen_series):
    config, port = write_config(tmp_path / "node", broker_url=None,
                                destinations=[(storescp.aet, "127.0.0.1", storescp.port)])
    start_node(config, "serve", port=port)  # embedded queue: the worker runs inside `serve`
    storescu("127.0.0.1", port, "OSTEONODE", abdomen_series)
    files = storescp.wait_for_files(5, timeout_s=RESULT_TIMEOUT_S)
    modalities = sorted(pydicom.dcmread(f, stop_before_pixels=True).Modality for f in files)
    assert modalities == ["DOC", "OT", "OT", "SEG", "SR"]  # PDF report, two key images, SEG, SR
    for f in files:
        assert dciodvfy(f) == ([], [])
    (entry,) = [p for p in (tmp_path / "node" / "outbox").iterdir() if p.is_dir()]
    result = json.loads((entry / "result.json").read_text())
    assert result["status"] == "ok" and set(result["levels"]) >= {"L1", "L2", "L3", "L4"}
    state = json.loads((entry / "delivery-dest0.json").read_text())
    assert state["state"] == "delivered"
