"""Tests of the rendered outputs: key images (Secondary Capture) and the PDF report (Encapsulated PDF).

Uses the synthetic phantom of :mod:`test_dicom_out` and, at the end, the real
abdominal CT (``../shared/data/ct``) through the whole pipeline. dciodvfy must
report no error and no warning for every object. The PDF's text is read back
with pdftotext and its pages counted with pdfinfo (Debian ``poppler-utils``):
the tests FAIL when a tool is missing.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest
from test_dicom_out import (
    BANNER,
    DIRECTIONS,
    DSRDUMP,
    assert_valid,
    dciodvfy,
    make_case,
    make_result,
    pdf_document,
    pdf_pages,
    pdf_text,
    require_tool,
    round_trip,
)

from osteonode.dicom_out import build_key_images, build_pdf_report, summary, write
from osteonode.dicom_out.render import BANNER_COLOR
from osteonode.pipeline import analyze_files
from osteonode.result import AnalysisResult, Calibration, ContrastPhase
from osteonode.segment.spine import segment_spine
from osteonode.volume import load_series

BANNER_RGB = tuple(int(BANNER_COLOR[i:i + 2], 16) for i in (1, 3, 5))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return make_case(tmp_path_factory.mktemp("keyimage"), DIRECTIONS["axial_hfs"])


@pytest.fixture(scope="module")
def key_images(case):
    return build_key_images(case.series, case.segmentation, make_result(case.series), banner=BANNER)


@pytest.mark.integration
def test_key_images_are_valid_secondary_captures_of_the_source_study(case, key_images, tmp_path):
    source = case.series.datasets[0]
    assert [int(image.InstanceNumber) for image in key_images] == [1, 2]
    for image in key_images:
        ds = round_trip(image)
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert (ds.StudyInstanceUID, ds.PatientID, ds.PatientName) == (
            source.StudyInstanceUID, source.PatientID, source.PatientName)
        assert (ds.SeriesDescription, int(ds.SeriesNumber)) == ("osteonode Key Images", 903)
        assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.Rows, ds.Columns) == ("RGB", 3, 640, 1024)
        assert (ds.BurnedInAnnotation, ds.ConversionType) == ("YES", "WSD")
        assert ds.pixel_array.shape == (640, 1024, 3)
        assert ds.DerivationDescription
        assert_valid(image, tmp_path / f"key_{int(ds.InstanceNumber)}.dcm")
    assert "sagittal" in key_images[0].DerivationDescription
    assert "through the L1" in key_images[1].DerivationDescription
    assert len({image.SeriesInstanceUID for image in key_images}) == 1


def test_key_images_show_the_banner(case, key_images):
    """The banner band; the level colours are tested in test_dicom_out_palette."""
    sagittal = key_images[0].pixel_array
    band = sagittal[4:26, 100:200].reshape(-1, 3)
    assert (np.abs(band.astype(int) - BANNER_RGB).max(axis=1) <= 2).mean() > 0.9

    no_banner = build_key_images(case.series, case.segmentation, make_result(case.series), banner="")
    top = no_banner[0].pixel_array[4:26, 100:200].reshape(-1, 3)
    assert (np.abs(top.astype(int) - BANNER_RGB).max(axis=1) <= 2).mean() == 0.0


def test_key_images_are_reproducible(case, key_images):
    again = build_key_images(case.series, case.segmentation, make_result(case.series), banner=BANNER)
    for first, second in zip(key_images, again, strict=True):
        assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (second.SeriesInstanceUID, second.SOPInstanceUID)
        np.testing.assert_array_equal(first.pixel_array, second.pixel_array)


def test_key_images_need_an_evaluable_result_with_the_axial_level(case):
    not_evaluable = AnalysisResult.not_evaluable("metal", case.series.study_instance_uid,
                                                 case.series.series_instance_uid)
    with pytest.raises(ValueError, match="evaluable"):
        build_key_images(case.series, case.segmentation, not_evaluable, banner=BANNER)
    with pytest.raises(ValueError, match="L4 is not in the segmentation"):
        build_key_images(case.series, case.segmentation, make_result(case.series), banner=BANNER, axial_level="L4")


def test_level_rows_print_na_for_missing_values(case):
    rows = {row.level: row for row in summary.level_rows(make_result(case.series))}
    assert list(rows) == ["L1", "L2", "L3"]
    assert (rows["L1"].hu_mean, rows["L1"].confidence_percent, rows["L1"].roi_volume_cm3) == ("122", "95", "0.7")
    assert (rows["L1"].vbmd_mg_cm3, rows["L1"].genant, rows["L1"].heights_mm) == ("n/a", "n/a", "n/a")
    assert (rows["L2"].vbmd_mg_cm3, rows["L2"].genant) == ("96", "2 (moderate)")


@pytest.mark.integration
def test_pdf_report_is_a_valid_encapsulated_pdf_with_the_results(case, tmp_path):
    result = make_result(case.series)
    result.contrast = ContrastPhase(phase="portal_venous", aorta_hu=190.0)
    result.calibration = Calibration(method="internal: air, fat, muscle", plausible=False, note="slope out of range")
    result.levels["L2"].fracture_texture = {"original_glrlm_RunPercentage": 0.8123456,
                                            "original_firstorder_Variance": 1500.0}
    ds = build_pdf_report(case.series, result, banner=BANNER)
    assert_valid(ds, tmp_path / "report.dcm")
    back = round_trip(ds)
    assert back.SOPClassUID == pydicom.uid.EncapsulatedPDFStorage
    assert (back.Modality, back.MIMETypeOfEncapsulatedDocument) == ("DOC", "application/pdf")
    assert (back.SeriesDescription, int(back.SeriesNumber)) == ("osteonode Report", 904)
    assert back.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert (back.StudyInstanceUID, back.PatientName) == (case.series.study_instance_uid,
                                                         case.series.datasets[0].PatientName)
    assert len(back.EncapsulatedDocument) % 2 == 0
    assert {item.ReferencedSOPInstanceUID for item in back.SourceInstanceSequence} == {
        ds.SOPInstanceUID for ds in case.series.datasets}
    document = pdf_document(back)
    assert document.startswith(b"%PDF-") and document.rstrip().endswith(b"%%EOF")
    assert pdf_pages(document, tmp_path) == 1

    text = pdf_text(document, tmp_path)
    assert BANNER in text
    assert "Patient: OSTEONODE, DEMO" in text
    assert "Result: Osteopenia" in text
    assert "L1 mean trabecular attenuation 121.5 HU" in text
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()[:2] in ("L1", "L2", "L3")}
    assert lines["L1"][:6] == ["L1", "95", "122", "120", "25", "0.7"]
    assert lines["L1"][6:8] == ["n/a", "n/a"]
    assert lines["L2"][6:9] == ["96", "2", "(moderate)"]
    assert "Contrast phase portal venous" in text
    assert "GLRLM run percentage 0.8123" in " ".join(text.split())  # seed 003 texture of the fractured L2
    assert "Texture of L2" in text and "Texture of L1" not in text
    assert "vBMD calibration: internal: air, fat, muscle (slope out of range)." in text
    assert "calibration is not plausible (see Method)" in text
    assert "Uncertain level identification" not in text  # every confidence >= 50 %


@pytest.mark.integration
def test_pdf_report_of_a_not_evaluable_series(case, tmp_path):
    result = AnalysisResult.not_evaluable("L1-L4 are not in the field of view", case.series.study_instance_uid,
                                          case.series.series_instance_uid)
    ds = build_pdf_report([ds for ds in case.series.datasets], result, banner="")
    assert_valid(ds, tmp_path / "report.dcm")
    text = pdf_text(pdf_document(ds), tmp_path)
    assert "Result: Not evaluable" in text
    assert "L1-L4 are not in the field of view" in text
    assert "No vertebral level was measured." in text
    assert BANNER not in text


def test_pdf_report_is_reproducible(case):
    first = build_pdf_report(case.series, make_result(case.series), banner=BANNER)
    second = build_pdf_report(case.series, make_result(case.series), banner=BANNER)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (second.SeriesInstanceUID, second.SOPInstanceUID)
    assert pdf_document(first) == pdf_document(second)


def test_thick_slices_get_no_heights_and_say_why(abdomen_series, tmp_path):
    """The real CT with a nominal Slice Thickness of 5 mm (its spacing stays 3 mm): the trabecular HU is
    measured, no level gets heights or a Genant grade, and the SR says why for every level."""
    thick = []
    for n, path in enumerate(abdomen_series):
        ds = pydicom.dcmread(path)
        ds.SliceThickness = "5"
        thick.append(tmp_path / "in" / f"{n}.dcm")
        thick[-1].parent.mkdir(exist_ok=True)
        ds.save_as(thick[-1])
    result = analyze_files(thick, tmp_path / "out")
    assert result.status == "ok"
    for level in result.levels.values():
        assert level.trabecular_hu_mean > 0 and level.genant_grade is None and level.height_anterior_mm is None
        assert "slices_too_thick" in level.quality_flags
    proc = subprocess.run([require_tool(DSRDUMP), "+Pt", str(tmp_path / "out" / "sr.dcm")], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and "slices thicker than 3.5 mm" in proc.stdout, proc.stderr


def test_pdf_report_rejects_a_result_of_another_series(case):
    other = make_result(case.series).model_copy(update={"series_instance_uid": "1.2.3"})
    with pytest.raises(ValueError, match="does not belong"):
        build_pdf_report(case.series, other, banner=BANNER)


def test_every_output_of_the_real_ct_is_valid(abdomen_series, tmp_path):
    """The real abdominal CT through the pipeline (SEG, SR) and the key-image and PDF builders."""
    result = analyze_files(abdomen_series, tmp_path)
    assert result.status == "ok"
    series = load_series(abdomen_series)
    segmentation = segment_spine(series.volume)
    paths = [tmp_path / "seg.dcm", tmp_path / "sr.dcm"]
    for n, image in enumerate(build_key_images(series, segmentation, result, banner=BANNER), start=1):
        paths.append(write(image, tmp_path / f"key_{n}.dcm"))
    paths.append(write(build_pdf_report(series, result, banner=BANNER), tmp_path / "report.dcm"))
    for path in paths:
        assert dciodvfy(path) == ([], []), path.name
    proc = subprocess.run([require_tool(DSRDUMP), "+Pt", str(paths[1])], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0 and "# TID 1500" in proc.stdout, proc.stderr
    text = pdf_text(pdf_document(pydicom.dcmread(paths[-1])), tmp_path)
    for level in result.levels:
        # the level's row; its name may carry a mark (summary.MARK_NOT_USED / MARK_NOTES)
        assert any(line.split()[:1] and line.split()[0].rstrip(summary.MARK_NOT_USED + summary.MARK_NOTES) == level
                   for line in text.splitlines()), level
