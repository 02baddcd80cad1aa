"""Self-tests of the integration fixtures, against the real tools.

Checks that each service starts, answers and is reachable the way the node's
integration tests will use it: dcmtk echoscu/storescu -> Orthanc, Orthanc
REST lookup and download, Orthanc C-STORE -> dcmtk storescp, Redis PING, and
the dciodvfy wrapper.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from services import (
    RedisServer,
    ServiceError,
    dciodvfy,
    echoscu,
    free_port,
    port_is_listening,
    require_tool,
    storescu,
    wait_for,
)

from osteonode.ctseries import write_ct_series

pytestmark = pytest.mark.integration


@pytest.fixture
def ct_files(tmp_path: Path) -> list[Path]:
    """A tiny two-slice CT Image Storage series (16 x 16 x 2) written by osteonode."""
    hu = np.full((2, 16, 16), -1000, dtype=np.int16)  # (z, y, x)
    hu[:, 4:12, 4:12] = 300
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.8, 0.8, 3.0))
    image.SetOrigin((-6.0, -6.0, 100.0))
    return write_ct_series(image, tmp_path / "ct", patient_id="OSTEO-IT-1")


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    assert not port_is_listening(port)


def test_require_tool_fails_instead_of_skipping(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        require_tool(tmp_path / "no-such-tool")
    assert require_tool("/usr/bin/echoscu") == "/usr/bin/echoscu"


def test_redis_ping(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.ping()
    assert redis_server.command("SET", "osteonode:k", "v") == b"OK"
    assert redis_server.command("GET", "osteonode:k") == b"v"
    assert redis_server.command("DBSIZE") == 1


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "r") as server:
        proc, port = server.proc, server.port
        assert proc is not None and proc.poll() is None
    assert proc.poll() is not None
    wait_for(lambda: not port_is_listening(port), 5, what="port to close")
    server.stop()  # idempotent


def test_echoscu_to_orthanc(orthanc) -> None:
    assert orthanc.aet == "ORTHANC"
    assert orthanc.get("/system")["DicomAet"] == "ORTHANC"
    assert set(orthanc.get("/plugins")) <= {"explorer.js"}  # built-in, not a plugin
    echoscu("127.0.0.1", orthanc.dicom_port, orthanc.aet)


def test_echoscu_to_wrong_port_raises() -> None:
    with pytest.raises(ServiceError, match="echoscu"):
        echoscu("127.0.0.1", free_port(), "NOBODY")


def test_storescu_to_orthanc_then_find_via_rest(orthanc, ct_files: list[Path], tmp_path: Path) -> None:
    storescu("127.0.0.1", orthanc.dicom_port, orthanc.aet, ct_files)
    first = pydicom.dcmread(ct_files[0])

    study_id = orthanc.wait_for_study(first.StudyInstanceUID, timeout_s=10, min_instances=2)
    assert [s["ID"] for s in orthanc.studies()] == [study_id]
    assert orthanc.find_study("1.2.3.4.5.6.7.8.9") is None

    (series,) = orthanc.series_of_study(study_id)
    assert series["MainDicomTags"]["Modality"] == "CT"
    assert series["MainDicomTags"]["SeriesInstanceUID"] == first.SeriesInstanceUID
    instances = orthanc.instances_of_series(series["ID"])
    sop_uids = {i["MainDicomTags"]["SOPInstanceUID"] for i in instances}
    assert sop_uids == {pydicom.dcmread(p).SOPInstanceUID for p in ct_files}

    target = next(i for i in instances if i["MainDicomTags"]["SOPInstanceUID"] == first.SOPInstanceUID)
    out = orthanc.download_instance(target["ID"], tmp_path)
    downloaded = pydicom.dcmread(out)
    assert downloaded.SOPInstanceUID == first.SOPInstanceUID
    assert downloaded.PixelData == first.PixelData


def test_orthanc_store_to_storescp(orthanc, storescp, ct_files: list[Path]) -> None:
    uploaded = orthanc.upload(ct_files[0])
    assert uploaded["Status"] == "Success"

    orthanc.add_modality("peer", storescp.aet, storescp.host, storescp.port)
    assert orthanc.echo_modality("peer")
    result = orthanc.store_to_modality("peer", [uploaded["ID"]])
    assert result["InstancesCount"] == 1

    (received,) = storescp.wait_for_files(1, timeout_s=10)
    ds = pydicom.dcmread(received)
    assert ds.SOPInstanceUID == pydicom.dcmread(ct_files[0]).SOPInstanceUID


def test_store_to_unknown_modality_reports_log(orthanc) -> None:
    with pytest.raises(ServiceError, match=r"HTTP 4\d\d[\s\S]*last lines of"):
        orthanc.store_to_modality("nobody", ["0" * 8 + "-" + "-".join(["1" * 8] * 4)])


def test_dciodvfy_clean_ct(ct_files: list[Path]) -> None:
    errors, warnings = dciodvfy(ct_files[0])
    assert errors == [], "\n".join(errors)
    assert all(w.startswith("Warning") for w in warnings)


def test_dciodvfy_reports_errors(ct_files: list[Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(ct_files[0])
    del ds.Rows  # Type 1 in Image Pixel
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    errors, _ = dciodvfy(broken)
    assert errors and all(e.startswith("Error") for e in errors)
