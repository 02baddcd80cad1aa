"""The record of the last SR sent per study, and which earlier SR a new result supersedes (osteonode.lineage)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from osteonode.ctseries import write_ct_series
from osteonode.dicom_out import build_sr, write
from osteonode.lineage import SENT_RECORD, last_sent, record_sent, superseded_report
from osteonode.result import AnalysisResult, SeriesSelection, SeriesUsed


@pytest.fixture(scope="module")
def headers(tmp_path_factory) -> list[pydicom.Dataset]:
    image = sitk.GetImageFromArray(np.zeros((10, 16, 16), np.int16))
    image.SetSpacing((1.0, 1.0, 3.0))
    files = write_ct_series(image, tmp_path_factory.mktemp("ct"), series_description="Abdomen 3.0 B30f")
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in files]


def _sent(entry, source: list[pydicom.Dataset], number: int = 2, failed: bool = False) -> pydicom.Dataset:
    """Write and record a not-evaluable (or "processing failed") SR made from ``source`` as the worker does."""
    first = source[0]
    result = AnalysisResult.not_evaluable(
        "L1-L4 not found", str(first.StudyInstanceUID), str(first.SeriesInstanceUID),
        series_selection=SeriesSelection(used=SeriesUsed(series_number=number, description="Abdomen 3.0 B30f")),
        supersedes=None if failed else superseded_report(entry, source))
    sr = build_sr(source, result, None, processing_failed=failed)
    write(sr, entry / "sr.dcm")
    record_sent(entry, entry / "sr.dcm", result.model_copy(update={"status": "failed"}) if failed else result)
    return sr


def test_nothing_sent_before_means_no_predecessor(tmp_path, headers):
    assert last_sent(tmp_path) is None and superseded_report(tmp_path, headers) is None


def test_a_fragment_is_superseded_by_the_complete_series_with_the_reason(tmp_path, headers):
    fragment_sr = _sent(tmp_path, headers[:6])
    record = last_sent(tmp_path)
    assert record.source_instance_count == 6 and record.report.sop_instance_uid == fragment_sr.SOPInstanceUID
    assert record.report.made_from == 'series 2 "Abdomen 3.0 B30f" (6 instances)'
    prior = superseded_report(tmp_path, headers)
    assert prior.sop_instance_uid == fragment_sr.SOPInstanceUID
    assert prior.reason.startswith("the series changed (10 instances instead of 6)")
    full_sr = _sent(tmp_path, headers)
    assert full_sr.SOPInstanceUID != fragment_sr.SOPInstanceUID
    assert full_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == fragment_sr.SOPInstanceUID
    assert last_sent(tmp_path).supersedes.sop_instance_uid == fragment_sr.SOPInstanceUID


def test_the_same_inputs_again_give_the_same_sr_with_the_same_predecessor(tmp_path, headers):
    """A re-delivered job must make an identical object: it must not name itself as its predecessor."""
    first = _sent(tmp_path, headers[:6])
    second = _sent(tmp_path, headers)
    again = _sent(tmp_path, list(reversed(headers)))
    assert again.SOPInstanceUID == second.SOPInstanceUID
    assert again.PredecessorDocumentsSequence == second.PredecessorDocumentsSequence
    assert again.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == first.SOPInstanceUID


def test_another_series_analysed_is_named_as_the_reason(tmp_path, headers):
    _sent(tmp_path, headers)
    other = []
    for ds in headers:
        copy = pydicom.Dataset(ds)
        copy.SeriesInstanceUID = "1.2.3.4"
        other.append(copy)
    assert superseded_report(tmp_path, other).reason == "the study changed and another series was analysed"


def test_an_unreadable_record_names_no_predecessor(tmp_path, headers, caplog):
    (tmp_path / SENT_RECORD).write_text("{not json")
    assert superseded_report(tmp_path, headers) is None
    assert "cannot be read" in caplog.text


def test_a_result_after_a_failed_analysis_of_the_same_images_supersedes_the_failed_sr(tmp_path, headers):
    """The failed-job SR has UIDs of its own: re-run after the cause was fixed, the real SR is not a duplicate."""
    failed = _sent(tmp_path, headers, failed=True)
    prior = superseded_report(tmp_path, headers)
    assert prior.sop_instance_uid == failed.SOPInstanceUID
    assert prior.reason == "the earlier analysis of the same images failed"
    real = _sent(tmp_path, headers)
    assert real.SOPInstanceUID != failed.SOPInstanceUID and real.SeriesInstanceUID != failed.SeriesInstanceUID
