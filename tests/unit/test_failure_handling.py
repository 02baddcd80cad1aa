"""Never lose, never hide (issue 12): failed jobs are recorded, the watcher survives, payloads are checked."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from osteonode.config import SelectionSettings
from osteonode.errors import describe
from osteonode.ingest.completion import JOBS_DIR, find_due_studies, watch
from osteonode.ingest.spool import INCOMING_DIR, move_instance, write_instance
from osteonode.jobstore import JobStore
from osteonode.pipeline import analyze_files

RULES = SelectionSettings()
UID_IN_TEXT = re.compile(r"\d+\.\d+\.\d+")


def _header(study_uid: str, series_uid: str, sop_uid: str) -> bytes:
    """A minimal CT header as PS3.10 bytes (the watcher never reads pixels)."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, sop_uid, "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study_uid, series_uid, 1
    ds.ImageType, ds.ConvolutionKernel, ds.SliceThickness = ["ORIGINAL", "PRIMARY", "AXIAL"], "B30f", 3.0
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _spool_quiet_study(spool: Path, study_uid: str) -> None:
    """Ten instances of one series, their folders aged 60 s (quiet)."""
    for i in range(10):
        write_instance(spool, study_uid, f"{study_uid}.1", f"{study_uid}.1.{i}",
                       _header(study_uid, f"{study_uid}.1", f"{study_uid}.1.{i}"))
    for folder in (spool / study_uid, spool / study_uid / f"{study_uid}.1"):
        st = folder.stat()
        os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns - 60 * 10**9))


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_watcher_survives_an_oserror_in_one_study_and_handles_later_ones(tmp_path, caplog):
    """An OSError in mark_handled (as ENOSPC did) must not kill the watcher; a later study is still enqueued."""
    spool = tmp_path
    _spool_quiet_study(spool, "1.2.1")
    blocker = spool / JOBS_DIR / "1.2.1.json"
    blocker.mkdir(parents=True)  # a folder in the way: renaming the marker onto it raises IsADirectoryError
    enqueued: list[str] = []
    stop = threading.Event()
    store = JobStore(tmp_path / "jobs.sqlite3")  # new: indexes the spool (study 1.2.1) at the first poll
    thread = threading.Thread(target=watch, args=(spool, 5, RULES, lambda j: enqueued.append(j.study_instance_uid),
                                                  stop, store), kwargs={"poll_interval_s": 0.02}, daemon=True)
    with caplog.at_level(logging.INFO, logger="osteonode.ingest.completion"):
        thread.start()
        try:
            assert _wait_for(lambda: "study not handled (IsADirectoryError" in caplog.text)
            _spool_quiet_study(spool, "1.2.2")  # a later study, recorded as the SCP does
            store.record_arrival("1.2.2", "1.2.2.1", at=time.time() - 60)
            assert _wait_for(lambda: "1.2.2" in enqueued), "a later study was not enqueued"
            assert thread.is_alive()
            blocker.rmdir()  # the disk has room again
            assert _wait_for(lambda: (spool / JOBS_DIR / "1.2.1.json").is_file()), "the marker was not retried"
            time.sleep(0.2)
        finally:
            stop.set()
            thread.join(5)
    assert sorted(enqueued) == ["1.2.1", "1.2.2"], "a study was enqueued again while its marker was missing"
    assert not thread.is_alive()
    assert not UID_IN_TEXT.search(caplog.text), "a UID was logged"


def test_a_corrupt_marker_does_not_stall_other_studies(tmp_path):
    _spool_quiet_study(tmp_path, "1.2.1")
    _spool_quiet_study(tmp_path, "1.2.2")
    (tmp_path / JOBS_DIR).mkdir()
    (tmp_path / JOBS_DIR / "1.2.1.json").write_text("{not json", encoding="utf-8")
    assert [job.study_instance_uid for job in find_due_studies(tmp_path, 5, RULES)] == ["1.2.2"]


def test_describe_masks_uids_and_paths():
    assert describe(FileNotFoundError(2, "No such file or directory", "/spool/1.2.3/4.5.6.dcm")) == \
        "FileNotFoundError: No such file or directory"
    text = describe(KeyError("series 1.2.840.1234.5 in /data/spool/1.2.3/x.dcm"))
    assert "1.2.840" not in text and "/data" not in text and text.startswith("KeyError: ")
    assert len(describe(ValueError("x" * 1000))) < 230


def _copy_with_bad_position(files: list[Path], out: Path, index: int) -> list[Path]:
    """Copy a series, one slice with ImagePositionPatient ``-100.0\\1x0\\5.0`` (a malformed DS, written raw)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, src in enumerate(files):
        ds = pydicom.dcmread(src)
        if i == index:
            value = b"-100.0\\1x0\\5.0"
            ds._dict[Tag(0x00200032)] = RawDataElement(Tag(0x00200032), "DS", len(value), value, 0, False, True)
        paths.append(out / src.name)
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def test_one_malformed_slice_position_makes_the_series_not_evaluable(j2k_series, tmp_path):
    files = _copy_with_bad_position(j2k_series, tmp_path / "in", index=5)
    result = analyze_files(files, tmp_path / "out")
    assert result.status == "not_evaluable"
    assert "malformed Image Orientation or Image Position" in result.reason
    assert "1x0" not in result.reason
    assert json.loads((tmp_path / "out" / "result.json").read_text())["status"] == "not_evaluable"
    assert (tmp_path / "out" / "sr.dcm").is_file()


@pytest.fixture
def node_dirs(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """Spool and outbox of a node configured by environment only (no destinations: no broker needed)."""
    spool, outbox = tmp_path / "spool", tmp_path / "outbox"
    spool.mkdir(), outbox.mkdir()
    monkeypatch.delenv("OSTEONODE_CONFIG", raising=False)
    monkeypatch.setenv("OSTEONODE_SPOOL_DIR", str(spool))
    monkeypatch.setenv("OSTEONODE_OUTBOX_DIR", str(outbox))
    monkeypatch.setenv("OSTEONODE_QUEUE_DIR", str(tmp_path / "queue"))
    return spool, outbox


def _spooled_job(files: list[Path], spool: Path) -> dict:
    """Spool a real series as the SCP would and return its study's job payload (JSON)."""
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        write_instance(spool, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, path.read_bytes())
    (job,) = find_due_studies(spool, 0, RULES, now_s=time.time() + 60)
    return job.model_dump(mode="json")


def _sr_texts(ds: pydicom.Dataset) -> list[str]:
    """Every TEXT value of an SR content tree."""
    texts = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            texts.append(str(item.TextValue))
        texts += _sr_texts(item)
    return texts


def _analysis_log_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "analysis FAILED" in r.getMessage()]


def _unexpected_error(monkeypatch) -> None:
    """The pipeline raises an error that is neither bad input nor "not evaluable" (as a bug or a disk would)."""
    def broken(datasets):
        raise IsADirectoryError(21, "Is a directory", "somewhere")
    monkeypatch.setattr("osteonode.pipeline.series_from_datasets", broken)


def test_an_unexpected_error_is_recorded_as_failed_with_an_sr(j2k_series, node_dirs, caplog, monkeypatch):
    from worker.tasks import analyze_study_task

    spool, outbox = node_dirs
    job = _spooled_job(j2k_series, spool)
    entry = outbox / job["study_instance_uid"]
    _unexpected_error(monkeypatch)
    with caplog.at_level(logging.INFO):
        assert analyze_study_task(job) == "failed"
    result = json.loads((entry / "result.json").read_text())
    assert result["status"] == "failed" and result["error_class"] == "IsADirectoryError"
    assert result["reason"].startswith("IsADirectoryError: ")
    sr = pydicom.dcmread(entry / "sr.dcm")
    assert sr.StudyInstanceUID == job["study_instance_uid"]
    assert any("processing failed: IsADirectoryError" in text for text in _sr_texts(sr))
    lines = _analysis_log_lines(caplog)
    assert len(lines) == 1 and re.match(r"job [0-9a-f]{10}: analysis FAILED: IsADirectoryError: ", lines[0])
    assert not UID_IN_TEXT.search(lines[0])


def test_failed_sr_can_be_switched_off(j2k_series, node_dirs, monkeypatch):
    from worker.tasks import analyze_study_task

    monkeypatch.setenv("OSTEONODE_ANALYSIS__FAILED_SR", "false")
    spool, outbox = node_dirs
    job = _spooled_job(j2k_series, spool)
    entry = outbox / job["study_instance_uid"]
    _unexpected_error(monkeypatch)
    assert analyze_study_task(job) == "failed"
    assert json.loads((entry / "result.json").read_text())["status"] == "failed"
    assert not list(entry.glob("*.dcm"))


def test_a_job_whose_worker_died_twice_is_failed_not_run_again(j2k_series, node_dirs, caplog):
    """acks_late redelivers a job whose worker died; the third start records the failure instead of a loop."""
    from worker.tasks import MAX_ANALYSIS_STARTS, analyze_study_task

    spool, outbox = node_dirs
    job = _spooled_job(j2k_series, spool)
    entry = outbox / job["study_instance_uid"]
    entry.mkdir()
    (entry / f".starts-{job['fingerprint'][:16]}").write_text(str(MAX_ANALYSIS_STARTS))
    with caplog.at_level(logging.INFO):
        assert analyze_study_task(job) == "failed"
    result = json.loads((entry / "result.json").read_text())
    assert result["error_class"] == "WorkerLost" and "never finished" in result["reason"]
    assert "timings_s" in result and result["timings_s"] == {}  # the analysis was not run again
    assert not list(entry.glob(".starts-*"))
    assert len(_analysis_log_lines(caplog)) == 1


@pytest.mark.parametrize("forge", ["series_uid", "series_dir", "study_uid"])
def test_a_forged_payload_is_rejected_before_any_file_is_touched(j2k_series, node_dirs, tmp_path, forge, caplog):
    from worker.tasks import analyze_study_task

    spool, outbox = node_dirs
    job = _spooled_job(j2k_series, spool)
    candidate = job["ranking"]["candidates"][0]
    if forge == "series_uid":
        candidate["series_instance_uid"] = "../escape-outbox"
    elif forge == "series_dir":
        outside = tmp_path / "elsewhere"
        shutil.copytree(candidate["series_dir"], outside)
        candidate["series_dir"] = str(outside)
    else:
        job["study_instance_uid"] = "../escape-outbox"
    with caplog.at_level(logging.ERROR):
        assert analyze_study_task(job) == "rejected"
    assert list(outbox.iterdir()) == [] and not (tmp_path / "escape-outbox").exists()
    assert "job rejected: invalid payload" in caplog.text and "escape" not in caplog.text


def test_an_unexpected_delivery_error_is_recorded_as_failed(node_dirs, monkeypatch, caplog):
    from worker.tasks import deliver

    monkeypatch.setenv("OSTEONODE_DESTINATIONS", '[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", '
                                                 '"port": 1}]')
    monkeypatch.setenv("OSTEONODE_DISPATCH__MAX_RETRIES", "0")
    _, outbox = node_dirs
    entry = outbox / "1.2.3"
    entry.mkdir()
    (entry / "sr.dcm").write_bytes(b"not DICOM at all")
    with caplog.at_level(logging.INFO):
        assert deliver(str(entry), "pacs") == "failed"
    record = json.loads((entry / "delivery-pacs.json").read_text())
    assert record["state"] == "failed" and record["detail"].startswith("unexpected InvalidDicomError")
    assert "NOT (fully) delivered after 1 attempt(s)" in caplog.text
    assert deliver(str(outbox.parent / "elsewhere"), "pacs") == "rejected"


@pytest.mark.parametrize(("status", "stored"), [(0x0000, True), (0x0001, True), (0x0107, True), (0x0116, True),
                                                (0xB000, True), (0xA700, False), (0xC210, False)])
def test_cstore_status_categories_come_from_pynetdicom(tmp_path, status, stored):
    """A real SCP on loopback answers ``status``; warnings count as stored (PS3.7 C.4.2.3), failures raise."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage as CTStorage

    from osteonode.config import Destination
    from osteonode.dispatch import send_files
    from osteonode.errors import DeliveryFailed

    scp = AE(ae_title="PACS")
    scp.add_supported_context(CTStorage, ExplicitVRLittleEndian)
    server = scp.start_server(("127.0.0.1", 0), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, lambda event: status)])
    try:
        path = tmp_path / "sr.dcm"
        path.write_bytes(_header("1.2.3", "1.2.3.4", "1.2.3.4.5"))
        destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=server.server_address[1])
        if stored:
            send_files([path], destination, calling_ae_title="OSTEONODE", timeout_s=5)
        else:
            with pytest.raises(DeliveryFailed, match=f"0x{status:04X}"):
                send_files([path], destination, calling_ae_title="OSTEONODE", timeout_s=5)
    finally:
        server.shutdown()


@pytest.fixture
def info_log():
    """The node's logging at INFO into a buffer; third-party levels restored afterwards."""
    from osteonode.logs import QUIET_LOGGERS, configure_logging

    levels = {name: logging.getLogger(name).level for name in (*QUIET_LOGGERS, "")}
    buffer = io.StringIO()
    handler = configure_logging("INFO", buffer)
    yield buffer
    logging.getLogger().removeHandler(handler)
    logging.captureWarnings(False)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_an_analysis_logged_at_info_holds_no_uid_or_patient_data(j2k_series, tmp_path, info_log):
    """highdicom logs source UIDs at INFO and pydicom quotes malformed values: neither may reach the log."""
    files = _copy_with_bad_position(j2k_series, tmp_path / "in", index=5)
    for path in files:  # malformed input that pydicom warns about, quoting the value
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = "SECRET^PATIENT", "SECRETID42"
        value = b"SECRET\\ID\\" + b"X" * 80
        ds._dict[Tag(0x00100021)] = RawDataElement(Tag(0x00100021), "LO", len(value), value, 0, False, True)
        ds.save_as(path, enforce_file_format=True)
    assert analyze_files(files, tmp_path / "bad").status == "not_evaluable"
    assert analyze_files(j2k_series, tmp_path / "ok").status in ("ok", "not_evaluable")
    text = info_log.getvalue()
    assert "analysis not_evaluable" in text  # the log was written
    headers = pydicom.dcmread(files[0], stop_before_pixels=True)
    for secret in ("SECRET", str(headers.StudyInstanceUID), str(headers.SeriesInstanceUID),
                   *(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files[:3])):
        assert secret not in text, f"{secret[:6]}... logged"
    assert not UID_IN_TEXT.search(text)


def test_orphan_tmp_files_are_removed_and_writes_are_atomic(tmp_path, caplog):
    from osteonode.atomic import remove_orphans, write_atomic

    spool, outbox = tmp_path / "spool", tmp_path / "outbox"
    final = write_instance(spool, "1.2", "1.2.3", "1.2.3.4", b"DICM")
    orphan = final.parent / ".tmp-0123abcd"  # what a kill -9 during a write leaves
    orphan.write_bytes(b"half a file with patient data")
    (outbox / "1.2").mkdir(parents=True)
    write_atomic(outbox / "1.2" / "result.json", b"{}")
    (outbox / "1.2" / ".tmp-feed").write_bytes(b"{")
    # the listener streams data sets into <spool>/.incoming and moves each checked one into place
    incoming = spool / INCOMING_DIR
    incoming.mkdir()
    (incoming / ".tmp-abcd.dcm").write_bytes(b"half a data set of an aborted association")
    received = incoming / ".tmp-ef01.dcm"
    received.write_bytes(b"DICM2")
    received.chmod(0o600)  # as NamedTemporaryFile creates it
    moved = move_instance(spool, "1.2", "1.2.3", "1.2.3.5", received)
    assert moved == final.parent / "1.2.3.5.dcm" and moved.read_bytes() == b"DICM2" and not received.exists()
    assert moved.stat().st_mode & 0o777 == 0o640
    with caplog.at_level(logging.WARNING):
        assert remove_orphans(spool, outbox, tmp_path / "absent") == 3
    assert not orphan.exists() and final.read_bytes() == b"DICM"
    assert sorted(p.name for p in (outbox / "1.2").iterdir()) == ["result.json"]
    assert not list(incoming.iterdir())
    assert "removed 3 incomplete file(s)" in caplog.text and "1.2" not in caplog.text


def test_a_delivery_that_cannot_be_queued_is_recorded_for_the_sweeper(j2k_series, node_dirs, monkeypatch, caplog):
    """Redis gone between the analysis and the delivery: the record says why (pending, for the sweeper to queue
    once Redis is back), the log says so."""
    from osteonode.config import Settings
    from worker.app import app, configure
    from worker.tasks import analyze_study_task

    monkeypatch.setenv("OSTEONODE_DESTINATIONS", '[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", '
                                                 '"port": 1}]')
    spool, outbox = node_dirs
    job = _spooled_job(j2k_series, spool)
    entry = outbox / job["study_instance_uid"]
    _unexpected_error(monkeypatch)  # fail fast: the point here is the delivery
    saved = {key: app.conf[key] for key in ("broker_url", "broker_transport_options")}
    configure(Settings(broker_url="redis://127.0.0.1:1/0"))  # nothing listens on port 1
    try:
        with caplog.at_level(logging.INFO):
            assert analyze_study_task(job) == "failed"
    finally:
        app.close()  # drop the connection pool made for the unreachable broker
        app.conf.update(saved)
    record = json.loads((entry / "delivery-pacs.json").read_text())
    assert record["state"] == "pending" and record["detail"].startswith("delivery not queued: OperationalError")
    assert "delivery to pacs NOT queued" in caplog.text
    from osteonode.jobstore import open_store
    from osteonode.sweeper import STRANDED_AFTER_S, sweep

    store = open_store(Settings().jobstore_file)
    (stranded,) = store.stranded_deliveries(time.time() + STRANDED_AFTER_S + 1)
    queued = []
    sweep(store, queued.append, lambda *args: queued.append(args), heartbeat_max_age_s=90,
          now=time.time() + STRANDED_AFTER_S + 1)  # the broker is back
    assert queued == [(str(entry), "pacs", json.loads(stranded["files"]))]


def test_two_jobs_of_one_study_run_one_after_the_other(tmp_path, caplog):
    from worker.tasks import _one_analysis_per_study

    entry, order = tmp_path / "outbox" / "1.2", []
    first_in, release_first = threading.Event(), threading.Event()

    def first() -> None:
        with _one_analysis_per_study(entry, "job-a"):
            order.append("a starts")
            first_in.set()
            release_first.wait(10)
            order.append("a ends")

    def second() -> None:
        with _one_analysis_per_study(entry, "job-b"):
            order.append("b starts")

    a = threading.Thread(target=first)
    a.start()
    assert first_in.wait(10)
    with caplog.at_level(logging.INFO, logger="worker.tasks"):
        b = threading.Thread(target=second)
        b.start()
        deadline = time.monotonic() + 10
        while "job job-b: waiting for the running analysis" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        release_first.set()
        a.join(10)
        b.join(10)
    assert order == ["a starts", "a ends", "b starts"]
    assert "job job-b: waiting for the running analysis of the same study to end" in caplog.text
