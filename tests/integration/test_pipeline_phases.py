"""The pipeline writes and publishes the SR, then the SEG, before the key images and the PDF, on real CT."""

from __future__ import annotations

import pydicom
import pytest

from osteonode.pipeline import analyze_files

pytestmark = pytest.mark.integration


def _recorder(out_dir):
    """A ``publish`` callback that records each batch and the files the folder held at that moment."""
    batches = []

    def publish(result, paths):
        batches.append((result.status, [p.name for p in paths], sorted(p.name for p in out_dir.iterdir()),
                        {p.name: p.read_bytes() for p in paths}))
    return batches, publish


def test_sr_and_seg_are_published_before_the_rest_is_written(abdomen_series, tmp_path):
    batches, publish = _recorder(tmp_path)
    result = analyze_files(abdomen_series, tmp_path, publish=publish)
    assert result.status == "ok"
    assert [names for _, names, _, _ in batches] == [["sr.dcm"], ["seg.dcm"], ["key_1.dcm", "key_2.dcm", "report.dcm"]]
    assert batches[0][0] == "ok"
    assert not {"seg.dcm", "key_1.dcm", "report.dcm", "labels.nii.gz"} & set(batches[0][2]), batches[0][2]
    assert not {"key_1.dcm", "key_2.dcm", "report.dcm", "labels.nii.gz"} & set(batches[1][2]), batches[1][2]
    # what was sent first is final: later batches do not rewrite it
    assert all((tmp_path / name).read_bytes() == data for _, _, _, sent in batches for name, data in sent.items())
    # the SR, built before the SEG, refers to the SEG's instance and to its segments by number and tracking UID
    sr, seg = pydicom.dcmread(tmp_path / "sr.dcm"), pydicom.dcmread(tmp_path / "seg.dcm")
    segments = {int(s.SegmentNumber): str(s.TrackingUID) for s in seg.SegmentSequence}
    referenced = _referenced_segments(sr)
    assert referenced and {uid for uid, _, _ in referenced} == {seg.SOPInstanceUID}
    assert all(segments[number] == tracking for _, number, tracking in referenced), (referenced, segments)
    assert {"encode_sr", "encode_seg", "labels", "key_images", "pdf"} <= set(result.timings_s)
    assert "radiomics" not in result.timings_s and result.radiomics_file is None  # no model, no export


def test_a_not_evaluable_series_publishes_its_sr_then_its_pdf(j2k_series, tmp_path):
    batches, publish = _recorder(tmp_path)
    result = analyze_files(j2k_series, tmp_path, publish=publish)
    assert result.status == "not_evaluable"
    assert [(status, names) for status, names, _, _ in batches] == [("not_evaluable", ["sr.dcm"]),
                                                                 ("not_evaluable", ["report.dcm"])]


def _referenced_segments(sr):
    """(SEG SOP Instance UID, segment number, tracking UID) of every TID 1411 group of an SR."""
    found = []

    def walk(items, tracking=None):
        for item in items:
            if item.get("ValueType") == "CONTAINER" and "ContentSequence" in item:
                uids = [str(c.UID) for c in item.ContentSequence  # 112040: Tracking Unique Identifier
                        if c.ConceptNameCodeSequence[0].CodeValue == "112040"]
                walk(item.ContentSequence, uids[0] if uids else tracking)
            if "ReferencedSOPSequence" in item and "ReferencedSegmentNumber" in item.ReferencedSOPSequence[0]:
                ref = item.ReferencedSOPSequence[0]
                found.append((str(ref.ReferencedSOPInstanceUID), int(ref.ReferencedSegmentNumber), tracking))
    walk(sr.ContentSequence)
    return found
