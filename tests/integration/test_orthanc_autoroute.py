"""The admin guide's Orthanc auto-routing example works as shipped.

Orthanc runs with ``deploy/orthanc-autoroute.lua`` loaded the way
``deploy/orthanc.json`` loads it (``LuaScripts``) and the ``osteonode``
modality of that file (only host and port changed to the test node). The
multi-series study (``study`` fixture: localizer, soft and bone kernels,
coronal reformat, arterial copy, dose SR, Secondary Capture with Modality CT)
is uploaded to Orthanc over REST and nothing else is done: the Lua script
must send the stable study's CT series to the node, and exactly one SEG and
one SR, made from the soft axial series, must arrive in the same study,
before the key images and the PDF (Orthanc's change log orders the
arrivals), each instance once. The results make the study stable again, but
nothing is routed a second time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from node import write_config
from services import ORTHANC, OrthancServer, dciodvfy, require_tool, wait_for

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RESULT_TIMEOUT_S = 300


def _deploy_orthanc_config() -> dict:
    """``deploy/orthanc.json`` as a dict (it must be plain JSON)."""
    return json.loads((DEPLOY / "orthanc.json").read_text(encoding="utf-8"))


@pytest.fixture
def routing_orthanc(tmp_path_factory) -> Iterator[OrthancServer]:
    """Orthanc with the LuaScripts of deploy/orthanc.json (paths resolved against deploy/)."""
    require_tool(ORTHANC)
    scripts = [str((DEPLOY / p).resolve()) for p in _deploy_orthanc_config()["LuaScripts"]]
    assert scripts and all(Path(p).is_file() for p in scripts), scripts
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-autoroute"), stable_age_s=1,
                           extra_config={"LuaScripts": scripts})
    try:
        server.start()
        yield server
    finally:
        server.stop(background=True)


def _modalities(orthanc: OrthancServer, study_id: str) -> dict[str, list[dict]]:
    by_modality: dict[str, list[dict]] = {}
    for series in orthanc.series_of_study(study_id):
        by_modality.setdefault(series["MainDicomTags"]["Modality"], []).append(series)
    return by_modality


def test_orthanc_lua_routes_the_stable_study_and_one_result_set_comes_back(tmp_path, routing_orthanc, start_node,
                                                                          study):
    orthanc = routing_orthanc
    # the node accepts Orthanc's AE title only, as the example config recommends
    config, port = write_config(tmp_path / "node", broker_url=None,
                                destinations=[(orthanc.aet, "127.0.0.1", orthanc.dicom_port)],
                                extra=f'allowed_calling_ae_titles = ["{orthanc.aet}"]')
    node = start_node(config, "serve", port=port)
    # the "osteonode" modality of deploy/orthanc.json, pointed at the test node
    modality = _deploy_orthanc_config()["DicomModalities"]["osteonode"]
    orthanc.add_modality("osteonode", modality["AET"], "127.0.0.1", port)
    assert orthanc.echo_modality("osteonode"), "Orthanc cannot C-ECHO the node"

    for path in (p for paths in study.values() for p in paths):
        reply = orthanc.upload(path)  # REST upload only: no /store call from the test
    study_id = reply["ParentStudy"]

    def results_arrived() -> dict[str, list[dict]] | None:
        if "Traceback" in node.log_tail(400):  # a failed job would otherwise only time out
            pytest.fail(f"the node failed:\n{node.log_tail(80)}")
        found = _modalities(orthanc, study_id)
        return found if _node_series(found, "SEG") and _node_series(found, "SR") else None

    try:
        found = wait_for(results_arrived, timeout_s=RESULT_TIMEOUT_S, interval_s=0.5, what="SEG and SR routed back")
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n--- orthanc log ---\n{orthanc.log_tail(60)}\n--- node log ---\n{node.log_tail(60)}")
    # the six CT series (incl. the Secondary Capture with Modality CT) went in one job
    assert "auto-routing: 6 CT series of study" in orthanc.log_tail(400), "the Lua script did not run"

    soft = pydicom.dcmread(study["soft"][0], stop_before_pixels=True)
    for modality_name in ("SEG", "SR"):
        (series,) = _node_series(found, modality_name)
        (instance,) = orthanc.instances_of_series(series["ID"])
        path = orthanc.download_instance(instance["ID"], tmp_path)
        errors, _warnings = dciodvfy(path)
        assert errors == [], f"{modality_name}: {errors}"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == soft.StudyInstanceUID
        if modality_name == "SEG":
            assert [str(s.SeriesInstanceUID) for s in ds.ReferencedSeriesSequence] == [soft.SeriesInstanceUID]

    # the results make the study stable again, but nothing is routed again and no second set comes back
    time.sleep(3 * orthanc.stable_age_s + 4)
    routed = [line for line in orthanc.log_tail(1000).splitlines() if "auto-routing:" in line]
    assert len(routed) == 1, routed
    found = _modalities(orthanc, study_id)
    assert {m: len(v) for m, v in found.items() if m != "CT"} == {"SEG": 1, "SR": 2, "OT": 1, "DOC": 1}, found
    outbox = [p for p in node_dirs(tmp_path)["outbox"].iterdir() if p.is_dir()]
    assert len(outbox) == 1
    state = json.loads((outbox[0] / "delivery-dest0.json").read_text())
    assert state["state"] == "delivered"
    # the SEG and SR were stored before the key images and the PDF, each instance once
    arrivals = _arrival_order(orthanc, {s["ID"]: m for m, series in found.items() for s in _node_series(found, m)})
    assert sorted(arrivals) == ["DOC", "OT", "OT", "SEG", "SR"], arrivals
    assert set(arrivals[:2]) == {"SEG", "SR"}, arrivals


def _arrival_order(orthanc: OrthancServer, modality_of_series: dict[str, str]) -> list[str]:
    """Modalities of the instances of the given series, in the order Orthanc stored them (``/changes``)."""
    series_of = {i["ID"]: series_id for series_id in modality_of_series
                 for i in orthanc.instances_of_series(series_id)}
    changes = orthanc.get("/changes?since=0&limit=10000")["Changes"]
    return [modality_of_series[series_of[c["ID"]]] for c in sorted(changes, key=lambda c: c["Seq"])
            if c["ChangeType"] == "NewInstance" and c["ID"] in series_of]


def _node_series(found: dict[str, list[dict]], modality: str) -> list[dict]:
    """The node's result series of ``modality`` (the study's own dose report is an SR too)."""
    return [s for s in found.get(modality, [])
            if s["MainDicomTags"].get("SeriesDescription", "").startswith("osteonode")]


def node_dirs(tmp_path: Path) -> dict[str, Path]:
    """The spool and outbox that ``write_config`` created under ``tmp_path / "node"``."""
    return {"spool": tmp_path / "node" / "spool", "outbox": tmp_path / "node" / "outbox"}
