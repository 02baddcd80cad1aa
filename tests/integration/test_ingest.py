"""The SCP on a live loopback association: dcmtk as sender, bad input answered correctly."""

from __future__ import annotations

import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification
from services import free_port, run_tool, wait_for

from osteonode.config import Settings
from osteonode.ingest.scp import start_scp
from osteonode.ingest.spool import instance_files
from osteonode.volume import load_series
from tests.conftest import recompress_series

pytestmark = pytest.mark.integration


@pytest.fixture
def node(tmp_path, request):
    """The SCP on loopback; ``accept_all_storage`` from an indirect parameter (default True)."""
    settings = Settings(ae_title="OSTEONODE", bind_address="127.0.0.1", port=free_port(),
                        allowed_calling_ae_titles=["STORESCU", "TESTSCU", "ECHOSCU"],
                        spool_dir=tmp_path / "spool", outbox_dir=tmp_path / "outbox", queue_dir=tmp_path / "q",
                        accept_all_storage=getattr(request, "param", True))
    server = start_scp(settings)
    yield settings
    server.shutdown()


def _echo_ok(settings, calling="ECHOSCU") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return status.Status == 0x0000


def _dcmtk(tool: str, *args: str) -> subprocess.CompletedProcess:
    return run_tool([f"/usr/bin/{tool}", *args], timeout_s=120, check=False)


def test_dcmtk_echo_and_store_land_in_spool(node, abdomen_series, j2k_series):
    assert _dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", "OSTEONODE", "127.0.0.1", str(node.port)).returncode == 0
    for series, options in ((abdomen_series, []), (j2k_series, ["--propose-j2k-lossless"])):
        run = _dcmtk("storescu", *options, "-aet", "STORESCU", "-aec", "OSTEONODE", "127.0.0.1", str(node.port),
                     *map(str, series))
        assert run.returncode == 0, run.stderr
        uid = pydicom.dcmread(series[0], stop_before_pixels=True)
        stored = instance_files(node.spool_dir / uid.StudyInstanceUID / uid.SeriesInstanceUID)
        assert len(stored) == len(series)
        # the encoded data set is kept as sent: JPEG 2000 stays JPEG 2000
        back = pydicom.dcmread(stored[0])
        assert back.file_meta.TransferSyntaxUID == uid.file_meta.TransferSyntaxUID
        assert back.SOPInstanceUID == stored[0].stem
        # patient data are not world-readable: files 0640, folders 0750
        assert {p.stat().st_mode & 0o777 for p in stored} == {0o640}
        assert stored[0].parent.stat().st_mode & 0o777 == stored[0].parent.parent.stat().st_mode & 0o777 == 0o750


def _stored_series(node, files):
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return instance_files(node.spool_dir / first.StudyInstanceUID / first.SeriesInstanceUID)


@pytest.mark.parametrize("syntax", [JPEGLSLossless, RLELossless, JPEG2000Lossless], ids=lambda s: s.name)
def test_compressed_series_are_stored_as_sent_and_load_to_the_same_hu(node, abdomen_series, tmp_path, syntax):
    files = recompress_series(abdomen_series, tmp_path / "ct", syntax)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="OSTEONODE")
    assert assoc.is_established
    assert all(assoc.send_c_store(p).Status == 0x0000 for p in files)
    assoc.release()
    stored = _stored_series(node, files)
    assert len(stored) == len(files)
    assert pydicom.dcmread(stored[0]).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_series(stored).volume.hu, load_series(abdomen_series).volume.hu)


def test_enhanced_ct_is_accepted_and_loads_to_the_same_volume(node, abdomen_series, tmp_path):
    singles = [pydicom.dcmread(p) for p in abdomen_series]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        singles, series_instance_uid=generate_uid(), series_number=9, sop_instance_uid=generate_uid(),
        instance_number=1)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(enhanced.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="OSTEONODE")
    assert assoc.send_c_store(path).Status == 0x0000
    assoc.release()
    (stored,) = _stored_series(node, [path])
    loaded, reference = load_series([stored]).volume, load_series(abdomen_series).volume
    np.testing.assert_array_equal(loaded.hu, reference.hu)
    np.testing.assert_allclose(loaded.affine, reference.affine, atol=1e-3)


@pytest.mark.parametrize("node", [False], indirect=True, ids=["ct-only"])
def test_bad_input_is_answered_and_the_node_keeps_running(node, abdomen_series, tmp_path, caplog):
    # 1. truncated file: sent raw (not decodable) -> failure status, nothing spooled
    truncated = tmp_path / "truncated.dcm"
    data = abdomen_series[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="OSTEONODE")
    assert assoc.is_established
    # only the CT context is accepted: other SOP classes are refused at association
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    assert accepted == {CTImageStorage}
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(truncated)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    assert status.Status in (0xA900, 0xC210), hex(status.Status)
    # 2. an MR instance: no accepted context, so the SCU cannot even send it
    mr = pydicom.dcmread(abdomen_series[0])
    mr.SOPClassUID = MRImageStorage
    with pytest.raises(ValueError, match="No presentation context"):
        assoc.send_c_store(mr)
    assoc.release()
    # dcmtk agrees: storescu of an MR file fails with no accepted context
    mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    mr_path = tmp_path / "mr.dcm"
    mr.save_as(mr_path, enforce_file_format=True)
    run = _dcmtk("storescu", "-aet", "STORESCU", "-aec", "OSTEONODE", "127.0.0.1", str(node.port), str(mr_path))
    assert run.returncode != 0 and "no presentation context" in (run.stdout + run.stderr).lower()
    # 3. unknown calling AE title -> association rejected
    assert not _echo_ok(node, calling="INTRUDER")
    run = _dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "OSTEONODE", "127.0.0.1", str(node.port))
    assert run.returncode != 0 and "rejected" in (run.stdout + run.stderr).lower()
    # a called AE title that is not ours -> association rejected
    run = _dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", "NOT_THE_NODE", "127.0.0.1", str(node.port))
    assert run.returncode != 0 and "rejected" in (run.stdout + run.stderr).lower()
    # nothing bad reached the spool, and the node still answers
    assert not list(node.spool_dir.rglob("*.dcm"))
    assert _echo_ok(node)
    # the refusals were logged, without patient identifiers
    assert "refused" in caplog.text
    assert "association from INTRUDER (127.0.0.1) rejected: calling AE title not allowed" in caplog.text
    assert "rejected: called AE title 'NOT_THE_NODE' is not ours" in caplog.text
    assert "presentation contexts not accepted for MR Image Storage" in caplog.text
    patient = pydicom.dcmread(abdomen_series[0], stop_before_pixels=True)
    for identifier in (str(patient.PatientName), str(patient.PatientID), str(patient.StudyInstanceUID)):
        assert identifier not in caplog.text


def _store_one(node, ds: pydicom.Dataset, transfer_syntax: str) -> int:
    """C-STORE ``ds`` in one association; the status answered."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, transfer_syntax)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="OSTEONODE")
    status = assoc.send_c_store(ds)
    assoc.release()
    return status.Status


def test_dataset_whose_pixel_data_is_short_is_refused(node, abdomen_series):
    ds = pydicom.dcmread(abdomen_series[0])
    ds.PixelData = ds.PixelData[:1000]
    assert _store_one(node, ds, ExplicitVRLittleEndian) == 0xA900
    assert not list(node.spool_dir.rglob("*.dcm"))


def test_an_image_claiming_16384_squared_is_refused_before_any_decode(node, j2k_series, caplog):
    """A 2 KB JPEG 2000 instance claiming 16384 x 16384 is answered 0xA900 from its header alone."""
    ds = pydicom.dcmread(j2k_series[0])
    ds.Rows = ds.Columns = 16384
    assert _store_one(node, ds, JPEG2000Lossless) == 0xA900
    assert "refused (0xA900): image size 16384 x 16384 outside 1..4096" in caplog.text
    assert not list(node.spool_dir.rglob("*.dcm"))
    assert _echo_ok(node)


def test_ten_stalled_connections_lock_a_sender_out_for_at_most_30_s(node, caplog):
    """10 connections each send a 6-byte PDU header and then nothing; a real sender gets in within 30 s."""
    import socket
    import time

    stalled = []
    for _ in range(10):
        sock = socket.create_connection(("127.0.0.1", node.port))
        sock.sendall(bytes([0x01, 0x00, 0x00, 0x00, 0x01, 0x00]))  # A-ASSOCIATE-RQ, 256 bytes announced, none sent
        stalled.append(sock)
    start = time.monotonic()
    try:
        time.sleep(1)
        while not _echo_ok(node):
            assert time.monotonic() - start < 30, "still locked out after 30 s"
            time.sleep(1)
        waited = time.monotonic() - start
    finally:
        for sock in stalled:
            sock.close()
    assert waited < 30
    assert "rejected: local limit exceeded (10 of 10 associations in use)" in caplog.text
    assert "calling AE title not allowed" not in caplog.text


def test_accept_all_storage_stores_ct_and_discards_the_rest_with_a_count(node, abdomen_series, tmp_path, caplog):
    """A routed study's dose SR, Secondary Capture (Modality CT) and MR are accepted, counted and not stored."""
    ct = pydicom.dcmread(abdomen_series[0])
    others = []
    for name, sop_class in (("sc", SecondaryCaptureImageStorage), ("mr", MRImageStorage)):
        ds = pydicom.dcmread(abdomen_series[1])
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        others.append(tmp_path / f"{name}.dcm")
        ds.save_as(others[-1], enforce_file_format=True)
    dose = pydicom.Dataset()
    dose.file_meta = pydicom.dataset.FileMetaDataset()
    dose.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dose.SOPClassUID = dose.file_meta.MediaStorageSOPClassUID = XRayRadiationDoseSRStorage
    dose.SOPInstanceUID = dose.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dose.StudyInstanceUID, dose.SeriesInstanceUID, dose.Modality = ct.StudyInstanceUID, generate_uid(), "SR"
    others.append(tmp_path / "dose.dcm")
    dose.save_as(others[-1], enforce_file_format=True)
    with caplog.at_level("INFO", logger="osteonode.ingest.scp"):
        run = _dcmtk("storescu", "-aet", "STORESCU", "-aec", "OSTEONODE", "127.0.0.1", str(node.port),
                     str(abdomen_series[0]), *map(str, others))
        assert run.returncode == 0, run.stdout + run.stderr
        wait_for(lambda: "discarded 3 instance(s)" in caplog.text, 5, what="the discard log line")
    stored = sorted(p.parent.name for p in node.spool_dir.rglob("*.dcm"))
    assert stored == [ct.SeriesInstanceUID]  # only the CT image is in the spool
    line = next(r.getMessage() for r in caplog.records if "discarded" in r.getMessage())
    assert "1 x MR Image Storage" in line and "1 x Secondary Capture Image Storage" in line
    assert "1 x X-Ray Radiation Dose SR Storage" in line
    assert ct.StudyInstanceUID not in caplog.text and "OSTEO-DEMO" not in caplog.text  # no UIDs, no patient
