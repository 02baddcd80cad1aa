"""Quality flags, a cut-off level and the bone status's statistic and uncertainty in the SR, PDF and key images.

Hand-built results on the synthetic phantom of :mod:`test_dicom_out`:

* L1: heterogeneous, a focal lesion excluded (1.2 cm3, 8 % of the ROI), used; its height loss near
  a Genant grade limit (a note on the body);
* L2: body cut by the edge of the scan, although the level result still holds
  heights and ratios (they must not be reported);
* L3: over 30 % excluded, not used for the bone status;
* the bone status names its statistic and has an uncertainty note.
"""

from __future__ import annotations

import subprocess

import highdicom as hd
import pydicom
import pytest
from test_dicom_out import (
    BANNER,
    DIRECTIONS,
    DSRDUMP,
    HEIGHT,
    RATIO,
    assert_valid,
    complete_result,
    level_groups,
    make_case,
    pdf_document,
    pdf_pages,
    pdf_text,
    require_tool,
    round_trip,
)

from osteonode.dicom_out import build_key_images, build_pdf_report, build_seg, build_sr, summary
from osteonode.result import AnalysisResult

STATISTIC = "mean trabecular HU of L1-L2 (L3 excluded)"
UNCERTAINTY = "within 5 HU of the 100 HU threshold: osteoporosis within the measurement uncertainty"
COMMENT = ("121106", "DCM")


def flagged_result(series) -> AnalysisResult:
    """:func:`test_dicom_out.complete_result` with the flags of the module docstring."""
    result = complete_result(series)
    levels = result.levels
    levels["L1"] = levels["L1"].model_copy(update={
        "quality_flags": ["heterogeneous", "focal_lesion_excluded", "genant_borderline"],
        "excluded_focal_volume_mm3": 1200.0,
        "excluded_fraction": 0.08})
    levels["L2"] = levels["L2"].model_copy(update={"cut_by_field_of_view": True,
                                                   "quality_flags": ["cut_by_field_of_view"]})
    levels["L3"] = levels["L3"].model_copy(update={
        "quality_flags": ["excluded_over_limit"], "excluded_focal_volume_mm3": 300.0, "excluded_fraction": 0.35,
        "used_for_bone_status": False})
    result.bone_status = result.bone_status.model_copy(update={"statistic": STATISTIC,
                                                               "uncertainty_note": UNCERTAINTY})
    return result


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return make_case(tmp_path_factory.mktemp("quality"), DIRECTIONS["axial_hfs"])


@pytest.fixture(scope="module")
def sr(case):
    seg = build_seg(case.series, case.segmentation)
    return seg, build_sr(case.series, flagged_result(case.series), seg)


def _code(item: pydicom.Dataset) -> tuple[str, str]:
    concept = item.ConceptNameCodeSequence[0]
    return str(concept.CodeValue), str(concept.CodingSchemeDesignator)


def _comments(group) -> list[str]:
    """CONTAINS TEXT Comments directly in a TID 1411 group."""
    return [str(item.TextValue) for item in group[0].ContentSequence
            if item.ValueType == "TEXT" and _code(item) == COMMENT and item.RelationshipType == "CONTAINS"]


def test_level_notes_in_words(case):
    levels = flagged_result(case.series).levels
    assert summary.level_notes(levels["L1"]) == [
        summary.QUALITY_FLAG_TEXT["genant_borderline"],  # on the body: first
        summary.QUALITY_FLAG_TEXT["heterogeneous"], summary.QUALITY_FLAG_TEXT["focal_lesion_excluded"],
        "1.2 cm3 of focal foci excluded from the ROI (8 % of the ROI)"]
    assert summary.level_notes(levels["L2"], "body") == [summary.QUALITY_FLAG_TEXT["cut_by_field_of_view"]]
    assert summary.level_notes(levels["L2"], "roi") == []
    # excluded_over_limit already says "not used for the bone status": not said twice
    assert summary.level_notes(levels["L3"]) == [summary.QUALITY_FLAG_TEXT["excluded_over_limit"],
                                                 "0.3 cm3 of focal foci excluded from the ROI (35 % of the ROI)"]
    unused = levels["L1"].model_copy(update={"used_for_bone_status": False, "quality_flags": [],
                                             "excluded_focal_volume_mm3": 0.0})
    assert summary.level_notes(unused) == [summary.NOT_USED]
    # cut_by_field_of_view set without the flag still says why
    assert summary.level_notes(levels["L2"].model_copy(update={"quality_flags": []})) == [
        summary.QUALITY_FLAG_TEXT["cut_by_field_of_view"]]
    assert summary.reported_heights(levels["L2"]) == (None, None, None)


@pytest.mark.integration
def test_sr_states_flags_in_the_level_groups_and_omits_cut_heights(sr, tmp_path):
    seg, dataset = sr
    assert_valid(seg, tmp_path / "seg.dcm")
    assert_valid(dataset, tmp_path / "sr.dcm")
    report = hd.sr.Comprehensive3DSR.from_dataset(round_trip(dataset))
    (l1_body, l1_roi), (l2_body, l2_roi), (l3_body, l3_roi) = level_groups(report)
    assert _comments(l1_body) == [summary.QUALITY_FLAG_TEXT["genant_borderline"]]
    assert _comments(l1_roi) == [summary.QUALITY_FLAG_TEXT["heterogeneous"],
                                 summary.QUALITY_FLAG_TEXT["focal_lesion_excluded"],
                                 "1.2 cm3 of focal foci excluded from the ROI (8 % of the ROI)"]
    assert _comments(l2_body) == [summary.QUALITY_FLAG_TEXT["cut_by_field_of_view"]]
    assert _comments(l2_roi) == []
    assert l2_body.get_measurements(name=HEIGHT) == [] and l2_body.get_measurements(name=RATIO) == []
    assert not any(_code(item) == ("125605004", "SCT") for item in l2_body[0].ContentSequence)  # no fracture call
    assert len(l1_body.get_measurements(name=HEIGHT)) == 3 and len(l3_body.get_measurements(name=HEIGHT)) == 3
    assert _comments(l3_roi)[0] == summary.QUALITY_FLAG_TEXT["excluded_over_limit"]
    assert "not used for the bone status" in _comments(l3_roi)[0]


def test_sr_hu_measurements_reference_the_roi_segment(sr):
    seg, dataset = sr
    numbers = {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}
    report = hd.sr.Comprehensive3DSR.from_dataset(round_trip(dataset))
    hu = hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient")
    for level, (body, roi) in zip(("L1", "L2", "L3"), level_groups(report), strict=True):
        referenced = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in roi.referenced_segment}
        assert referenced["Referenced Segment"].ReferencedSOPSequence[0].ReferencedSegmentNumber == \
            numbers[f"{level} trabecular ROI"]
        assert len(roi.get_measurements(name=hu)) == 3 and body.get_measurements(name=hu) == []


@pytest.mark.integration
def test_sr_states_the_statistic_and_uncertainty_next_to_the_category(sr, tmp_path):
    _, dataset = sr
    [container] = [item for item in dataset.ContentSequence if _code(item) == ("C0034375", "UMLS")]
    [finding] = [item for item in container.ContentSequence if _code(item) == ("121071", "DCM")]
    assert finding.ConceptCodeSequence[0].CodeMeaning == "Osteopenia"
    texts = [(str(child.RelationshipType), str(child.TextValue)) for child in finding.ContentSequence]
    assert texts == [("HAS PROPERTIES", f"Statistic: {STATISTIC}"), ("HAS PROPERTIES", f"Uncertainty: {UNCERTAINTY}")]
    path = assert_valid(dataset, tmp_path / "sr_status.dcm")
    proc = subprocess.run([require_tool(DSRDUMP), "+Pl", str(path)], capture_output=True, text=True, check=False,
                          errors="replace")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert f"Uncertainty: {UNCERTAINTY}" in proc.stdout


def test_sr_without_statistic_has_a_plain_finding(case):
    seg = build_seg(case.series, case.segmentation)
    result = complete_result(case.series)
    dataset = build_sr(case.series, result, seg)
    [container] = [item for item in dataset.ContentSequence if _code(item) == ("C0034375", "UMLS")]
    [finding] = [item for item in container.ContentSequence if _code(item) == ("121071", "DCM")]
    assert "ContentSequence" not in finding


@pytest.mark.integration
def test_pdf_states_flags_marks_statistic_and_uncertainty_on_one_page(case, tmp_path):
    ds = build_pdf_report(case.series, flagged_result(case.series), banner=BANNER)
    assert_valid(ds, tmp_path / "report.dcm")
    document = pdf_document(ds)
    assert pdf_pages(document, tmp_path) == 1
    text = " ".join(pdf_text(document, tmp_path).split())
    result_at = text.index("Result: Osteopenia")
    assert text.index(f"Statistic: {STATISTIC}") > result_at
    assert text.index(f"Uncertainty: {UNCERTAINTY}") < text.index("Measurements per vertebral level")
    assert "L1* " in text and "L3† " in text and "L2* " in text
    assert "† not used for the bone status; * see the notes on the level" in text
    assert (f"L1*: {summary.QUALITY_FLAG_TEXT['genant_borderline']}; {summary.QUALITY_FLAG_TEXT['heterogeneous']}; "
            f"{summary.QUALITY_FLAG_TEXT['focal_lesion_excluded']}; "
            "1.2 cm3 of focal foci excluded from the ROI (8 % of the ROI).") in text
    assert f"L2*: {summary.QUALITY_FLAG_TEXT['cut_by_field_of_view']}." in text
    assert f"L3†: {summary.QUALITY_FLAG_TEXT['excluded_over_limit']}" in text
    lines = {line.split()[0]: line.split() for line in pdf_text(document, tmp_path).splitlines()
             if line.strip()[:2] in ("L1", "L2", "L3") and len(line.split()) > 8}
    assert lines["L2*"][-1] == "n/a"  # heights of the cut body
    assert lines["L1*"][-1] == "25/26/28"


@pytest.mark.integration
def test_key_images_with_flags_are_valid(case, tmp_path):
    images = build_key_images(case.series, case.segmentation, flagged_result(case.series), banner=BANNER)
    for number, image in enumerate(images, start=1):
        assert_valid(image, tmp_path / f"key_{number}.dcm")


@pytest.mark.integration
def test_levels_with_the_same_notes_share_a_line_and_the_pdf_keeps_one_page(case, tmp_path):
    result = flagged_result(case.series)
    for name in ("L1", "L2", "L3"):
        result.levels[name] = result.levels[name].model_copy(update={
            "quality_flags": ["heterogeneous", "mean_median_discordant", "focal_lesion_excluded",
                              "excluded_over_limit"],
            "excluded_focal_volume_mm3": 4321.0, "excluded_fraction": 0.37, "used_for_bone_status": False})
    shared, cut = summary.level_note_lines(result)  # L2 is also cut by the edge of the scan
    assert shared.startswith("L1†, L3†: " + summary.QUALITY_FLAG_TEXT["heterogeneous"])
    assert cut.startswith("L2†: " + summary.QUALITY_FLAG_TEXT["cut_by_field_of_view"])
    document = pdf_document(build_pdf_report(case.series, result, banner=BANNER))
    assert pdf_pages(document, tmp_path) == 1
    text = " ".join(pdf_text(document, tmp_path).split())
    assert "Fractures, metal, sclerotic lesions and surgery" in text  # the caveats still fit on the page


@pytest.mark.integration
def test_sr_and_pdf_say_why_a_level_with_implausible_heights_is_not_graded(case, tmp_path):
    """L3 measured beyond its endplates (osteonode.measure.genant, "Implausible heights"): no heights, no
    ratios, no fracture call in the SR; the reason on its body group and in the PDF's notes."""
    result = flagged_result(case.series)
    result.levels["L3"] = result.levels["L3"].model_copy(update={
        "quality_flags": ["heights_implausible"], "height_anterior_mm": None, "height_middle_mm": None,
        "height_posterior_mm": None, "height_ratios": None, "genant_grade": None, "fracture_suspected": None,
        "excluded_focal_volume_mm3": 0.0, "excluded_fraction": 0.0, "used_for_bone_status": True})
    seg = build_seg(case.series, case.segmentation)
    dataset = build_sr(case.series, result, seg)
    assert_valid(dataset, tmp_path / "sr.dcm")
    report = hd.sr.Comprehensive3DSR.from_dataset(round_trip(dataset))
    _, _, (l3_body, l3_roi) = level_groups(report)
    assert _comments(l3_body) == [summary.QUALITY_FLAG_TEXT["heights_implausible"]] and _comments(l3_roi) == []
    assert l3_body.get_measurements(name=HEIGHT) == [] and l3_body.get_measurements(name=RATIO) == []
    assert not any(_code(item) == ("125605004", "SCT") for item in l3_body[0].ContentSequence)
    document = pdf_document(build_pdf_report(case.series, result, banner=BANNER))
    text = " ".join(pdf_text(document, tmp_path).split())
    assert f"L3*: {summary.QUALITY_FLAG_TEXT['heights_implausible']}." in text
