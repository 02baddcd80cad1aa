"""Never lose, never hide (issue 12) with a real `osteonode serve`: faults in one study do not stop the node;
fragments of aborted associations are held back; 1,000 fuzzed files. A killed Redis-mode worker:
test_jobstore_recovery.py."""

from __future__ import annotations

import copy
import json
import time

import pydicom
import pytest
from node import write_config
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
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


FUZZ_STATUSES = {0x0000, 0xA900, 0xC210}  # stored; does not match SOP class; cannot understand (PS3.4 B.2.3)


def _fuzzed(sources, folder, count: int, seed: int = 12):
    """``count`` PS3.10 files: valid file meta (so an SCU sends them) and a mutated or garbage data set.

    Mutations, chosen at random per file from the real CT slices ``sources`` (native and JPEG 2000):
    flipped bytes, a truncation, inserted bytes, pure garbage, or one header attribute set to a hostile
    value or removed. Each file has its own Affected SOP Instance UID (file meta).
    """
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True)
    hostile = {"Rows": [0, 65535, 16384], "Columns": [0, 65535], "BitsAllocated": [0, 7, 64],
               "SamplesPerPixel": [0, 3, 255], "NumberOfFrames": ["0", "-1", "99999"],
               "PixelRepresentation": [7], "ImagePositionPatient": [["-100.0", "1x0", "5.0"], ["nan", "inf", "0"]],
               "SOPInstanceUID": ["", "../../etc/passwd", "1.2.a"], "SeriesInstanceUID": ["", "1..2"],
               "StudyInstanceUID": ["", "9" * 80], "SOPClassUID": ["1.2.840.10008.5.1.4.1.1.4"],
               "PixelData": [b"", b"\x00" * 7]}
    templates = [pydicom.dcmread(p) for p in sources]
    paths = []
    for i in range(count):
        ds = copy.deepcopy(rng.choice(templates))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        kind = rng.choice(["flip", "truncate", "insert", "garbage", "attribute", "remove"])
        if kind in ("attribute", "remove"):
            keyword = rng.choice(sorted(hostile))
            encapsulated = keyword == "PixelData" and ds.file_meta.TransferSyntaxUID.is_compressed
            if (kind == "remove" or encapsulated) and keyword in ds:
                delattr(ds, keyword)
            else:  # written as given, unvalidated (a raw element)
                value = rng.choice(hostile[keyword])
                if isinstance(value, list):
                    value = "\\".join(value)
                if isinstance(value, int):
                    value = value.to_bytes(2, "little")
                raw = value if isinstance(value, bytes) else value.encode()
                raw += b"\0" * (len(raw) % 2)
                tag = pydicom.tag.Tag(pydicom.datadict.tag_for_keyword(keyword))
                ds[tag] = pydicom.dataelem.RawDataElement(tag, pydicom.datadict.dictionary_VR(tag), len(raw), raw,
                                                          0, False, True)
        path = folder / f"fuzz-{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        if kind in ("flip", "truncate", "insert", "garbage"):
            data = bytearray(path.read_bytes())
            start = _dataset_offset(path)
            if kind == "flip":
                for _ in range(rng.randint(1, 30)):
                    data[rng.randrange(start, len(data))] ^= 1 << rng.randrange(8)
            elif kind == "truncate":
                del data[rng.randrange(start, len(data)):]
            elif kind == "insert":
                at = rng.randrange(start, len(data))
                data[at:at] = rng.randbytes(rng.randint(1, 64))
            else:
                data[start:] = rng.randbytes(rng.randint(0, 4000))
            path.write_bytes(bytes(data))
        paths.append(path)
    return paths


def _dataset_offset(path) -> int:
    """Byte offset of the data set in a PS3.10 file (after preamble and File Meta Information)."""
    with open(path, "rb") as fh:
        pydicom.filereader.read_preamble(fh, False)
        pydicom.filereader._read_file_meta_info(fh)
        return fh.tell()


def test_a_thousand_fuzzed_files_are_answered_and_serve_still_analyses_a_new_study(tmp_path, start_node, storescp,
                                                                                    abdomen_series, j2k_series):
    """Issue 12 item 5: 1,000 mutated or garbage data sets over 10 associations; every C-STORE answered with
    a proper status, serve alive, no patient data in its log, and a clean study sent afterwards is analysed
    and delivered exactly once."""
    from pynetdicom import _config

    config, port = write_config(tmp_path / "node", broker_url=None, quiet_period_s=2.0,
                                destinations=[(storescp.aet, "127.0.0.1", storescp.port)])
    node = start_node(config, "serve", port=port)
    files = _fuzzed([*abdomen_series[40:60], *j2k_series[:5]], tmp_path / "fuzz", 1000)
    statuses = []
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True  # sent as written
    try:
        ae = AE(ae_title="FUZZER")
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.add_requested_context(CTImageStorage, [JPEG2000Lossless])
        for batch in range(10):
            assoc = ae.associate("127.0.0.1", port, ae_title="OSTEONODE")
            assert assoc.is_established, f"association {batch} refused"
            for path in files[batch * 100:(batch + 1) * 100]:
                try:
                    status = assoc.send_c_store(path)
                except (ValueError, AttributeError, OSError) as exc:  # the SCU itself cannot send this file
                    statuses.append(type(exc).__name__)
                    continue
                statuses.append(int(status.Status) if "Status" in status else None)
            assoc.release() if assoc.is_established else None
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    answered = [s for s in statuses if isinstance(s, int)]
    assert len(answered) >= 900, statuses[:20]
    assert set(answered) <= FUZZ_STATUSES, sorted({hex(s) for s in answered})
    assert None not in statuses
    assert {0x0000, 0xA900} <= set(answered)  # some mutations are harmless, most are refused
    assert node.proc.poll() is None
    study_b, files_b = _as_new_study(j2k_series, tmp_path / "b")
    storescu("127.0.0.1", port, "OSTEONODE", files_b, extra_args=J2K)
    outbox = tmp_path / "node" / "outbox"
    result = wait_for(lambda: (p := outbox / study_b / "delivery-dest0.json").is_file()
                      and json.loads(p.read_text())["state"] == "delivered"
                      and json.loads((outbox / study_b / "result.json").read_text()), timeout_s=300,
                      what="the new study's delivered result")
    assert result["status"] == "not_evaluable"  # T11-T12 only: analysed, reported, not evaluable
    srs = [ds for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in storescp.files())
           if ds.Modality == "SR" and ds.StudyInstanceUID == study_b]
    assert len(srs) == 1
    log = node.log_path.read_text()
    assert "Traceback" not in log
    for identifier in {str(pydicom.dcmread(p, stop_before_pixels=True).PatientName) for p in abdomen_series[:1]}:
        assert identifier not in log
