"""The admin guide's Orthanc auto-routing example works as shipped.

Orthanc runs with ``deploy/orthanc-autoroute.lua`` loaded the way
``deploy/orthanc.json`` loads it (``LuaScripts``) and the ``osteonode``
modality of that file (only host and port changed to the test node). A CT
is uploaded to Orthanc over REST and nothing else is done: the Lua script
must send the stable CT series to the node, and the node's SEG and SR must
arrive in the same study. The results must not be routed back to the node
(the script only routes CT series).
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


def test_orthanc_lua_routes_stable_ct_series_to_the_node(tmp_path, routing_orthanc, start_node, abdomen_series):
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

    for path in abdomen_series:
        reply = orthanc.upload(path)  # REST upload only: no /store call from the test
    study_id = reply["ParentStudy"]

    def results_arrived() -> dict[str, list[dict]] | None:
        if "Traceback" in node.log_tail(400):  # a failed job would otherwise only time out
            pytest.fail(f"the node failed:\n{node.log_tail(80)}")
        found = _modalities(orthanc, study_id)
        return found if found.get("SEG") and found.get("SR") else None

    try:
        found = wait_for(results_arrived, timeout_s=RESULT_TIMEOUT_S, interval_s=0.5, what="SEG and SR routed back")
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n--- orthanc log ---\n{orthanc.log_tail(60)}\n--- node log ---\n{node.log_tail(60)}")
    assert "auto-routing: CT series" in orthanc.log_tail(400), "the Lua script did not run"

    ct = pydicom.dcmread(abdomen_series[0], stop_before_pixels=True)
    for modality_name in ("SEG", "SR"):
        (series,) = found[modality_name]
        (instance,) = orthanc.instances_of_series(series["ID"])
        path = orthanc.download_instance(instance["ID"], tmp_path)
        errors, _warnings = dciodvfy(path)
        assert errors == [], f"{modality_name}: {errors}"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == ct.StudyInstanceUID
    assert len(found["CT"][0]["Instances"]) == len(abdomen_series)

    # the results (SEG, SR) become stable too, but are not sent back to the node:
    # exactly one analysis job for exactly one spooled series
    time.sleep(3 * orthanc.stable_age_s + 2)
    spooled = [p for study in node_dirs(tmp_path)["spool"].iterdir() if not study.name.startswith(".")
               for p in study.iterdir()]
    assert len(spooled) == 1, spooled
    routed = [line for line in orthanc.log_tail(1000).splitlines() if "auto-routing: CT series" in line]
    assert len(routed) == 1, routed
    outbox = [p for p in node_dirs(tmp_path)["outbox"].iterdir() if p.is_dir()]
    assert len(outbox) == 1
    state = json.loads((outbox[0] / "delivery-dest0.json").read_text())
    assert state["state"] == "delivered"


def node_dirs(tmp_path: Path) -> dict[str, Path]:
    """The spool and outbox that ``write_config`` created under ``tmp_path / "node"``."""
    return {"spool": tmp_path / "node" / "spool", "outbox": tmp_path / "node" / "outbox"}
