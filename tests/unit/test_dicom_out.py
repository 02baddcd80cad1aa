"""Tests of the DICOM outputs: binary SEG and TID 1500 Comprehensive 3D SR; shared helpers.

A small synthetic CT holds three box "vertebrae" L1-L3 of different sizes,
defined in patient space (LPS, mm), so that any flip or shift shows. It is
written with :func:`osteonode.ctseries.write_ct_series` on a grid of any
orientation (:func:`make_case`), loaded with :func:`osteonode.volume.load_series`
and encoded. The other ``test_dicom_out_*`` modules import the helpers here.

dciodvfy (dicom3tools), dsrdump (DCMTK) and pdftotext / pdfinfo (poppler-utils)
are required: the tests FAIL when they are missing. Every object must pass
dciodvfy with no error and no warning.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import dicom_templates
from osteonode import __version__
from osteonode.ctseries import write_ct_series
from osteonode.dicom_out import build_key_images, build_pdf_report, build_seg, build_sr, write
from osteonode.dicom_out import keyimage as keyimage_module
from osteonode.dicom_out import pdf as pdf_module
from osteonode.dicom_out import seg as seg_module
from osteonode.dicom_out import sr as sr_module
from osteonode.dicom_out.seg import seg_reference
from osteonode.result import AnalysisResult, BoneStatus, Calibration, ContrastPhase, LevelResult, PriorReport
from osteonode.segment import SpineSegmentation
from osteonode.uids import derived_uid, input_key
from osteonode.volume import Series, load_series

DCIODVFY = "/usr/bin/dciodvfy"
DSRDUMP = "/usr/bin/dsrdump"
PDFTOTEXT = "/usr/bin/pdftotext"
PDFINFO = "/usr/bin/pdfinfo"
BANNER = "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE"
#: Coding schemes of PS3.16 Section 8 that every validator knows.
STANDARD_SCHEMES = {"DCM", "SCT", "LN", "UCUM", "UMLS", "RFC5646"}

#: VerSe ID -> ((x0, x1), (y0, y1), (z0, z1)) of its box in LPS mm (bounds off the voxel lattices).
BOXES = {
    20: ((-11.93, 6.07), (-9.93, 4.07), (104.37, 116.37)),   # L1
    21: ((-7.93, 10.07), (-5.93, 8.07), (119.37, 129.37)),   # L2
    22: ((-3.93, 14.07), (-11.93, 2.07), (132.37, 144.37)),  # L3
}
#: Margin in mm between a body and its trabecular ROI.
ROI_MARGIN_MM = 2.0
#: Centre (LPS mm) of every synthetic grid.
CENTRE = np.array([0.0, 0.0, 125.0])
#: SimpleITK direction matrices (row-major; column i = direction of image axis i).
DIRECTIONS = {
    "axial_hfs": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "axial_ffs": (-1, 0, 0, 0, 1, 0, 0, 0, -1),
    "axial_reversed_slices": (1, 0, 0, 0, 1, 0, 0, 0, -1),
    "axial_mirrored_rows": (-1, 0, 0, 0, 1, 0, 0, 0, 1),
    "axial_mirrored_columns": (1, 0, 0, 0, -1, 0, 0, 0, 1),
    "coronal": (1, 0, 0, 0, 0, 1, 0, -1, 0),
    "sagittal": (0, 0, 1, 1, 0, 0, 0, -1, 0),
}
#: Patient Position (0018,5100) written with each direction (HFS unless listed).
PATIENT_POSITIONS = {"axial_ffs": "FFS"}


def oblique_direction(about_x_deg: float = 20.0, about_z_deg: float = 10.0) -> tuple[float, ...]:
    """An axial grid rotated about L-R then S-I: a non-axial, orthogonal slice stack."""
    a, b = np.radians(about_x_deg), np.radians(about_z_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return tuple(float(v) for v in (rz @ rx).ravel())


DIRECTIONS["oblique"] = oblique_direction()


@dataclass
class Case:
    """A synthetic CT on disk and in memory.

    ``truth[k]`` is the ``(rows, columns)`` label image of file ``files[k]``,
    computed from that file's own Image Plane attributes.
    """

    series: Series
    segmentation: SpineSegmentation
    files: list[Path]
    truth: list[np.ndarray]


def require_tool(path: str) -> str:
    """``path`` if it is an installed file; fail the test otherwise."""
    if not Path(path).is_file():
        pytest.fail(f"{path} is required for this test and is missing")
    return path


def phantom_labels(points: np.ndarray, margin_mm: float = 0.0) -> np.ndarray:
    """VerSe labels of the boxes at ``points`` (``(..., 3)`` LPS mm), boxes shrunk by ``margin_mm``."""
    labels = np.zeros(points.shape[:-1], dtype=np.uint8)
    for vid, bounds in BOXES.items():
        inside = np.ones(points.shape[:-1], dtype=bool)
        for axis, (low, high) in enumerate(bounds):
            inside &= (points[..., axis] > low + margin_mm) & (points[..., axis] < high - margin_mm)
        labels[inside] = vid
    return labels


def file_pixel_centres(ds: pydicom.Dataset) -> np.ndarray:
    """``(rows, columns, 3)`` LPS centres of the pixels of a single-frame image (PS3.3 C.7.6.2.1.1)."""
    position = np.array(ds.ImagePositionPatient, dtype=float)
    orientation = np.array(ds.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    rows, columns = np.indices((int(ds.Rows), int(ds.Columns)), dtype=float)
    return (position + rows[..., None] * row_spacing * orientation[3:]
            + columns[..., None] * column_spacing * orientation[:3])


def volume_voxel_centres(series: Series) -> np.ndarray:
    """``(z, y, x, 3)`` LPS centres of the voxels of the loaded volume."""
    index = np.indices(series.volume.shape, dtype=float)
    homogeneous = np.concatenate([index, np.ones((1, *series.volume.shape))])
    return np.moveaxis(np.tensordot(series.volume.affine, homogeneous, axes=1)[:3], 0, -1)


def make_case(tmp_path: Path, direction: tuple[float, ...], *, patient_position: str = "HFS",
              header_updates: Mapping[str, object] | None = None) -> Case:
    """Write the synthetic CT on a grid with ``direction`` centred on :data:`CENTRE`; load it.

    ``header_updates`` (keyword -> value) are set in every file after writing,
    e.g. a Specific Character Set and a Patient's Name in it; ``None`` deletes
    the attribute.
    """
    size, spacing = np.array([64, 64, 20]), np.array([0.8, 0.7, 2.5])  # (x, y, z)
    matrix = np.array(direction, dtype=float).reshape(3, 3)
    image = sitk.Image(*(int(n) for n in size), sitk.sitkInt16)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in matrix.ravel()))
    image.SetOrigin(tuple(float(v) for v in CENTRE - matrix @ (spacing * (size - 1) / 2)))
    index = np.indices(size[::-1], dtype=float)[::-1]  # (x, y, z) index of each (z, y, x) voxel
    points = np.moveaxis(np.tensordot(matrix * spacing, index, axes=1), 0, -1) + np.array(image.GetOrigin())
    hu = np.where(phantom_labels(points) > 0, 180, -50).astype(np.int16)
    hu_image = sitk.GetImageFromArray(hu)
    hu_image.CopyInformation(image)
    files = write_ct_series(hu_image, tmp_path / "ct", study_instance_uid=pydicom.uid.generate_uid(),
                            series_instance_uid=pydicom.uid.generate_uid())
    updates = {"PatientPosition": patient_position, **(header_updates or {})}
    truth = []
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in updates.items():
            if value is not None:
                setattr(ds, keyword, value)
            elif keyword in ds:
                delattr(ds, keyword)
        ds.save_as(path, enforce_file_format=True)
        truth.append(phantom_labels(file_pixel_centres(ds)))
    series = load_series(files)
    centres = volume_voxel_centres(series)
    segmentation = SpineSegmentation(bodies=phantom_labels(centres),
                                     trabecular=phantom_labels(centres, ROI_MARGIN_MM),
                                     confidence={20: 0.95, 21: 0.9, 22: 0.85},
                                     method="sacrum anchor and disc counting")
    return Case(series=series, segmentation=segmentation, files=files, truth=truth)


def make_result(series: Series) -> AnalysisResult:
    """An evaluable result of L1-L3; vBMD and Genant grade only for L2."""
    levels = {
        name: LevelResult(label_confidence=conf, trabecular_hu_mean=mean, trabecular_hu_median=mean - 2.0,
                          trabecular_hu_sd=25.0, trabecular_voxel_count=500, trabecular_roi_volume_mm3=700.0)
        for name, conf, mean in (("L1", 0.95, 121.5), ("L2", 0.9, 118.25), ("L3", 0.85, 115.0))
    }
    levels["L2"].vbmd_mg_cm3 = 96.4
    levels["L2"].genant_grade = 2
    return AnalysisResult(status="ok", study_instance_uid=series.study_instance_uid,
                          series_instance_uid=series.series_instance_uid,
                          labelling_method="sacrum anchor and disc counting", levels=levels,
                          bone_status=BoneStatus(category="osteopenia",
                                                 basis="L1 mean trabecular attenuation 121.5 HU (100-160 HU)"))


Group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations


def level_groups(report: hd.sr.Comprehensive3DSR) -> list[tuple[Group, Group]]:
    """The TID 1411 groups of each level in order: (vertebral body group, trabecular ROI group)."""
    groups = report.content.get_volumetric_roi_measurement_groups()
    return list(zip(groups[0::2], groups[1::2], strict=True))


def round_trip(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """``dataset`` written as a PS3.10 stream and read back."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` lines of dciodvfy on ``path``."""
    proc = subprocess.run([require_tool(DCIODVFY), str(path)], capture_output=True, text=True, check=False)
    lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return ([line for line in lines if line.startswith("Error")],
            [line for line in lines if line.startswith("Warning")])


def assert_valid(dataset: pydicom.Dataset, path: Path) -> Path:
    """Write ``dataset`` to ``path`` and assert that dciodvfy reports no error and no warning."""
    write(dataset, path)
    assert dciodvfy(path) == ([], []), path.name
    return path


def all_outputs(case: Case, result: AnalysisResult) -> dict[str, pydicom.Dataset]:
    """SEG, SR, both key images and the PDF of ``case``, keyed by a short name."""
    seg = build_seg(case.series, case.segmentation)
    sagittal, axial = build_key_images(case.series, case.segmentation, result, banner=BANNER)
    return {"seg": seg, "sr": build_sr(case.series, result, seg), "key_sagittal": sagittal,
            "key_axial": axial, "pdf": build_pdf_report(case.series, result, banner=BANNER)}


def pdf_document(ds: pydicom.Dataset) -> bytes:
    """The PDF bytes of an Encapsulated PDF instance (without the padding byte)."""
    return bytes(ds.EncapsulatedDocument[:int(ds.EncapsulatedDocumentLength)])


def pdf_text(document: bytes, tmp_path: Path) -> str:
    """Text of the PDF in reading order (pdftotext -layout)."""
    path = tmp_path / "report.pdf"
    path.write_bytes(document)
    proc = subprocess.run([require_tool(PDFTOTEXT), "-layout", str(path), "-"], capture_output=True, text=True,
                          check=True)
    return proc.stdout


def pdf_pages(document: bytes, tmp_path: Path) -> int:
    """Number of pages of the PDF (pdfinfo)."""
    path = tmp_path / "pages.pdf"
    path.write_bytes(document)
    info = subprocess.run([require_tool(PDFINFO), str(path)], capture_output=True, text=True, check=True).stdout
    return int(next(line.split()[-1] for line in info.splitlines() if line.startswith("Pages:")))


@pytest.fixture(scope="module")
def axial(tmp_path_factory):
    case = make_case(tmp_path_factory.mktemp("axial"), DIRECTIONS["axial_hfs"])
    seg = build_seg(case.series, case.segmentation)
    sr = build_sr(case.series, make_result(case.series), seg)
    return case, seg, sr


def test_seg_and_sr_headers_follow_the_source(axial):
    case, seg, sr = axial
    source = case.series.datasets[0]
    for ds in (round_trip(seg), round_trip(sr)):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.PatientName == source.PatientName
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.SoftwareVersions == __version__
    assert (seg.SeriesDescription, seg.SeriesNumber) == ("osteonode SEG", 901)
    assert (sr.SeriesDescription, sr.SeriesNumber) == ("osteonode Bone Health SR", 902)
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID


def test_sr_content_round_trips(axial):
    case, seg, sr = axial
    report = hd.sr.Comprehensive3DSR.from_dataset(round_trip(sr))
    assert report.CompletionFlag == "COMPLETE"
    assert report.VerificationFlag == "UNVERIFIED"
    assert "CodingSchemeIdentificationSequence" not in report  # no private scheme to declare
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    groups = report.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [
        text for level in ("L1", "L2", "L3")
        for text in (f"{level} vertebral body", f"Trabecular bone ROI of the {level} vertebral body")]
    seg_tracking = {int(item.SegmentNumber): str(item.TrackingUID) for item in seg.SegmentSequence}
    hu_code = hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient")
    certainty = hd.sr.CodedConcept("111012", "DCM", "Certainty of Finding")
    expected = zip(level_groups(report), (121.5, 118.25, 115.0), (95.0, 90.0, 85.0), strict=True)
    for number, ((body, roi), mean, confidence) in enumerate(expected, start=1):
        # body group on the body segment (1..3), ROI group on the ROI segment (4..6) of the same level
        for group, segment_number in ((body, number), (roi, number + 3)):
            items = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in group.referenced_segment}
            ref = items["Referenced Segment"].ReferencedSOPSequence[0]
            assert ref.ReferencedSegmentNumber == segment_number
            assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
            assert items["Source Series for Segmentation"].UID == case.series.series_instance_uid
            assert str(group.tracking_uid) == seg_tracking[segment_number]
            assert group.finding_sites[0].value == body.finding_type  # the vertebra
        assert (roi.finding_type.value, roi.finding_type.scheme_designator) == ("3138006", "SCT")  # Bone
        values = {m.derivation.meaning: (m.value, m.unit.value) for m in roi.get_measurements(name=hu_code)}
        assert values["Mean"] == (mean, "[hnsf'U]")
        assert values["Median"] == (mean - 2.0, "[hnsf'U]")
        assert body.get_measurements(name=hu_code) == []  # HU only on the ROI
        [level_certainty] = body.get_measurements(name=certainty)
        assert (level_certainty.value, level_certainty.unit.value) == (confidence, "%")
        assert body.finding_sites[0].value.scheme_designator == "SCT"

    # TID 1500 row 12: bone status and its texts.
    qual = [item for item in report.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert len(qual) == 1
    children = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in qual[0].ContentSequence}
    assert children["Finding"].ConceptCodeSequence[0].CodeValue == "312894000"  # osteopenia
    assert children["Comment"].TextValue.startswith("L1 mean")
    assert children["Measurement Method"].TextValue == "sacrum anchor and disc counting"


def _coding_schemes(dataset: pydicom.Dataset) -> set[str]:
    return {str(element.value) for element in dataset.iterall() if element.keyword == "CodingSchemeDesignator"}


def test_only_standard_coding_schemes_are_used(axial):
    """No private scheme: validators know every designator, nothing needs declaring (PS3.3 C.12.1.1.2)."""
    _, seg, sr = axial
    assert _coding_schemes(seg) | _coding_schemes(sr) <= STANDARD_SCHEMES
    templates = [dicom_templates.load(name) for name in ("sr_codes", "segments", "algorithm", "report")]

    def schemes(node: object) -> set[str]:
        if isinstance(node, dict):
            own = {node["scheme"]} if "scheme" in node else set()
            return own.union(*(schemes(value) for value in node.values()))
        if isinstance(node, list):
            return set().union(*(schemes(value) for value in node))
        return set()

    assert set().union(*map(schemes, templates)) <= STANDARD_SCHEMES


@pytest.mark.integration
def test_seg_and_sr_pass_dciodvfy_without_warnings_and_dsrdump(axial, tmp_path):
    _, seg, sr = axial
    assert_valid(seg, tmp_path / "seg.dcm")
    sr_path = assert_valid(sr, tmp_path / "sr.dcm")
    proc = subprocess.run([require_tool(DSRDUMP), "+Pt", str(sr_path)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "Comprehensive 3D SR Document" in proc.stdout
    assert "# TID 1500" in proc.stdout
    assert proc.stdout.count("# TID 1411") == 6  # body and trabecular ROI of each level
    assert "Osteopenia" in proc.stdout


@pytest.mark.integration
def test_not_evaluable_sr_is_valid_and_references_the_source(tmp_path):
    case = make_case(tmp_path, DIRECTIONS["axial_hfs"])
    result = AnalysisResult.not_evaluable("no lumbar vertebra could be identified",
                                          case.series.study_instance_uid, case.series.series_instance_uid)
    path = assert_valid(build_sr(case.series, result, None), tmp_path / "sr_not_evaluable.dcm")
    proc = subprocess.run([require_tool(DSRDUMP), "+Pl", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "(373121007,SCT,\"Not Evaluated\")" in proc.stdout
    assert "no lumbar vertebra could be identified" in proc.stdout

    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == case.series.study_instance_uid
    assert ds.PatientID == case.series.datasets[0].PatientID
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in evidence] == [case.series.series_instance_uid]
    referenced = {r.ReferencedSOPInstanceUID for r in evidence[0].ReferencedSOPSequence}
    assert referenced == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in case.files}
    report = hd.sr.Comprehensive3DSR.from_dataset(ds)
    groups = report.content.get_planar_roi_measurement_groups() + \
        report.content.get_volumetric_roi_measurement_groups()
    assert groups == []
    qual = [item for item in report.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    comments = [item.TextValue for item in qual[0].ContentSequence if item.ValueType == "TEXT"]
    assert comments == ["not evaluable: no lumbar vertebra could be identified"]  # the reason, once


@pytest.mark.integration
def test_not_evaluable_sr_from_bare_headers_without_type2_attributes(tmp_path):
    """The pipeline reports on headers it could not load as a volume; anonymised data lack Type 2 values."""
    case = make_case(tmp_path, DIRECTIONS["axial_reversed_slices"])
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in case.files]
    for ds in headers:
        for keyword in ("PatientName", "PatientBirthDate", "StudyID", "AccessionNumber",
                        "ReferringPhysicianName"):
            delattr(ds, keyword)
    result = AnalysisResult.not_evaluable("the series cannot be assembled into a volume",
                                          str(headers[0].StudyInstanceUID), str(headers[0].SeriesInstanceUID))
    sr = build_sr(headers, result, None)
    assert "PatientName" not in headers[0]  # the caller's headers are left alone
    errors, warnings = dciodvfy(write(sr, tmp_path / "sr.dcm"))
    assert errors == []
    # Only the warning about the (empty, inherited) Study ID.
    assert [w for w in warnings if not w.endswith("- Study ID")] == []
    assert sr.PatientID == headers[0].PatientID
    assert sr.PatientName == ""


def test_uids_are_identical_when_built_twice(axial):
    """Re-processing must yield the same UIDs (osteonode.uids.derived_uid)."""
    case, seg, sr = axial
    seg2 = build_seg(case.series, case.segmentation)
    sr2 = build_sr(case.series, make_result(case.series), seg2)
    assert (seg2.SeriesInstanceUID, seg2.SOPInstanceUID) == (seg.SeriesInstanceUID, seg.SOPInstanceUID)
    assert (sr2.SeriesInstanceUID, sr2.SOPInstanceUID) == (sr.SeriesInstanceUID, sr.SOPInstanceUID)
    assert [i.TrackingUID for i in seg2.SegmentSequence] == [i.TrackingUID for i in seg.SegmentSequence]


def test_seg_reference_stands_for_the_seg_in_the_sr(axial):
    """The SR is built before the SEG is encoded, from seg_reference: the same UIDs, segments and SR content."""
    case, seg, sr = axial
    reference = seg_reference(case.series, case.segmentation)
    uids = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
    assert [reference[k].value for k in uids] == [seg[k].value for k in uids]

    def segments(ds):
        return [(int(i.SegmentNumber), i.SegmentLabel, i.TrackingUID, i.TrackingID) for i in ds.SegmentSequence]

    assert segments(reference) == segments(seg) and len(segments(seg)) > 1
    early = build_sr(case.series, make_result(case.series), reference)
    assert early.SOPInstanceUID == sr.SOPInstanceUID
    assert early.ContentSequence == sr.ContentSequence
    assert early.CurrentRequestedProcedureEvidenceSequence == sr.CurrentRequestedProcedureEvidenceSequence


def test_a_new_version_yields_new_series_uids(axial):
    """The documented version policy: same version -> same UIDs, new version -> new series."""
    case, seg, _ = axial
    inputs = input_key(case.series.datasets)
    assert seg.SeriesInstanceUID == derived_uid(inputs, "seg-series")
    assert derived_uid(inputs, "seg-series", version="999.0") != seg.SeriesInstanceUID


def test_other_input_instances_yield_new_uids_and_the_same_instances_in_any_order_the_same(axial):
    """Issue 12 item 2: output UIDs follow the exact set of input instances, not only the series UID."""
    case, seg, sr = axial
    headers = case.series.datasets
    fewer = headers[:-1]  # a fragment of the same series: same Series Instance UID, one instance missing
    assert input_key(list(reversed(headers))) == input_key(headers)
    assert input_key(fewer) != input_key(headers)
    fragment = AnalysisResult.not_evaluable("too short", case.series.study_instance_uid,
                                            case.series.series_instance_uid)
    full = AnalysisResult.not_evaluable("too short", case.series.study_instance_uid, case.series.series_instance_uid)
    fragment_sr, full_sr = build_sr(fewer, fragment, None), build_sr(headers, full, None)
    assert fragment_sr.SOPInstanceUID != full_sr.SOPInstanceUID
    assert fragment_sr.SeriesInstanceUID != full_sr.SeriesInstanceUID
    assert build_pdf_report(fewer, fragment, banner="").SOPInstanceUID != \
        build_pdf_report(headers, full, banner="").SOPInstanceUID
    assert build_sr(list(reversed(headers)), full, None).SOPInstanceUID == full_sr.SOPInstanceUID


@pytest.mark.integration  # dciodvfy, pdftotext
def test_a_superseding_sr_names_its_predecessor_and_says_so(axial, tmp_path):
    """PS3.3 C.17.2: Predecessor Documents Sequence (0040,A360) refers to the earlier SR; a comment and the PDF
    say so."""
    case, seg, earlier = axial
    prior = PriorReport(study_instance_uid=str(earlier.StudyInstanceUID),
                        series_instance_uid=str(earlier.SeriesInstanceUID),
                        sop_class_uid=str(earlier.SOPClassUID), sop_instance_uid="2.25.1234",
                        created="2026-12-04 10:00", made_from='series 5 "Abdomen arterial" (112 instances)',
                        reason="the study changed and another series was analysed")
    result = make_result(case.series)
    result.supersedes = prior
    sr = build_sr(case.series, result, seg)
    (study,) = sr.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == earlier.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == earlier.SeriesInstanceUID
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in series.ReferencedSOPSequence] == [
        (earlier.SOPClassUID, "2.25.1234")]
    texts = [str(item.TextValue) for item in sr.ContentSequence[-1].ContentSequence if "TextValue" in item]
    assert prior.text() in texts and "supersedes the earlier osteonode report" in prior.text()
    assert "PredecessorDocumentsSequence" not in earlier
    assert_valid(sr, tmp_path / "sr.dcm")
    pdf = build_pdf_report(case.series, result, banner=BANNER)
    assert "supersedes the earlier osteonode report" in " ".join(pdf_text(pdf_document(pdf), tmp_path).split())


def test_every_output_uid_comes_from_derived_uid(axial, monkeypatch):
    """Independent of the implementation of derived_uid: each output UID is one of its results."""
    case, _, _ = axial
    calls: dict[str, str] = {}

    def fake(key: str, role: str) -> pydicom.uid.UID:
        assert key == input_key(case.series.datasets)
        return pydicom.uid.UID(calls.setdefault(role, f"2.25.{len(calls) + 1}{abs(hash(role)) % 10**12}"))

    for module in (seg_module, sr_module, keyimage_module, pdf_module):
        monkeypatch.setattr(module, "derived_uid", fake)
    outputs = all_outputs(case, make_result(case.series))
    produced = {uid for ds in outputs.values() for uid in (ds.SeriesInstanceUID, ds.SOPInstanceUID)}
    produced |= {item.TrackingUID for item in outputs["seg"].SegmentSequence}
    produced |= {item.DimensionOrganizationUID for item in (*outputs["seg"].DimensionOrganizationSequence,
                                                            *outputs["seg"].DimensionIndexSequence)}
    assert produced <= set(calls.values())
    assert {"seg-series", "seg-instance", "seg-dimension-organization", "sr-series", "sr-instance",
            "key-images-series", "key-image-sagittal", "key-image-axial", "pdf-series", "pdf-instance"} <= set(calls)


def test_all_outputs_are_new_series_of_the_source_study(axial):
    case, _, _ = axial
    outputs = all_outputs(case, make_result(case.series))
    source = case.series.datasets[0]
    assert {ds.StudyInstanceUID for ds in outputs.values()} == {source.StudyInstanceUID}
    series = {name: (ds.SeriesInstanceUID, ds.SeriesDescription, int(ds.SeriesNumber))
              for name, ds in outputs.items()}
    assert {name: value[1:] for name, value in series.items()} == {
        "seg": ("osteonode SEG", 901), "sr": ("osteonode Bone Health SR", 902),
        "key_sagittal": ("osteonode Key Images", 903), "key_axial": ("osteonode Key Images", 903),
        "pdf": ("osteonode Report", 904)}
    assert series["key_sagittal"][0] == series["key_axial"][0]
    assert len({value[0] for value in series.values()} | {source.SeriesInstanceUID}) == 5
    assert len({ds.SOPInstanceUID for ds in outputs.values()}) == 5


def test_evaluable_result_without_seg_is_rejected(axial):
    case, _, _ = axial
    with pytest.raises(ValueError, match="needs the SEG"):
        build_sr(case.series, make_result(case.series), None)


def test_seg_rejects_unknown_label(axial):
    case, _, _ = axial
    bodies = case.segmentation.bodies.copy()
    bodies[bodies == 22] = 77
    with pytest.raises(ValueError, match="77"):
        build_seg(case.series, SpineSegmentation(bodies=bodies, trabecular=bodies))


@pytest.mark.parametrize("overlap", [False, True])
def test_seg_pixel_check_agrees_with_highdicom(overlap):
    """The one-pass check of the stacked segments gives highdicom's SegmentsOverlap and rejects what it rejects."""
    stacked = np.zeros((4, 5, 6, 3), dtype=np.uint8)
    stacked[0, :2, :2, 0] = stacked[1, 3:, 3:, 1] = stacked[2, :3, :3, 2] = 1
    if overlap:
        stacked[0, 1, 1, 1] = 1
    numbers = np.array([1, 2, 3])
    binary = hd.seg.SegmentationTypeValues.BINARY
    _, ours = seg_module._Segmentation._check_and_cast_pixel_array(stacked, numbers, binary, np.uint8)
    _, theirs = hd.seg.Segmentation._check_and_cast_pixel_array(stacked, numbers, binary, np.uint8)
    assert ours == theirs == (hd.seg.SegmentsOverlapValues.YES if overlap else hd.seg.SegmentsOverlapValues.NO)
    stacked[0, 0, 0, 0] = 2
    with pytest.raises(ValueError, match="binary"):
        seg_module._Segmentation._check_and_cast_pixel_array(stacked, numbers, binary, np.uint8)


@pytest.mark.integration
def test_validators_are_installed():
    """The validators are part of the test environment; their absence is a failure, not a skip."""
    for tool in (DCIODVFY, DSRDUMP, PDFTOTEXT, PDFINFO):
        require_tool(tool)


@pytest.mark.integration
def test_optional_identity_attributes_are_carried_into_every_output(tmp_path):
    """Issuer of Patient ID, study description and de-identification status follow the source."""
    updates = {"IssuerOfPatientID": "HOSPITAL-A", "StudyDescription": "CT ABDOMEN", "PatientIdentityRemoved": "YES",
               "DeidentificationMethod": "research export profile 2"}
    case = make_case(tmp_path, DIRECTIONS["axial_hfs"], header_updates=updates)
    for name, ds in all_outputs(case, make_result(case.series)).items():
        back = pydicom.dcmread(assert_valid(ds, tmp_path / f"{name}.dcm"))
        assert {keyword: back.get(keyword) for keyword in updates} == updates, name


# --- vBMD, heights, Genant grade, calibration and contrast in the SR (issue 4 item 6) ---------------------------

CALIBRATION_NOTE = "fitted air, adipose, blood; scanner gain 0.997, offset +2.1 HU"
#: Concept names and values the SR must use (docs/conformance.md, "SR codes").
BONE_DENSITY = hd.sr.CodedConcept("C0005938", "UMLS", "Bone Density")
HEIGHT = hd.sr.CodedConcept("121207", "DCM", "Height")
RATIO = hd.sr.CodedConcept("118586006", "SCT", "Ratio")
FRACTURE = hd.sr.CodedConcept("125605004", "SCT", "Fracture of bone")
EQUIVALENT_MEANING = ("121050", "DCM")
COMMENT = ("121106", "DCM")
#: Seed 003 features of a fractured level, as pyradiomics names them.
FRACTURE_TEXTURE = {"original_firstorder_Variance": 1234.5678, "original_firstorder_Skewness": -0.25,
                    "original_glcm_JointEnergy": 0.0812, "original_glcm_JointEntropy": 4.1,
                    "original_glrlm_ShortRunEmphasis": 0.85, "original_glrlm_LongRunEmphasis": 1.9,
                    "original_glrlm_RunLengthNonUniformity": 3456.0, "original_glrlm_RunPercentage": 0.81}


def complete_result(series: Series) -> AnalysisResult:
    """:func:`make_result` with every field the pipeline fills: vBMD, heights, ratios, Genant, calibration, contrast.

    L1 is graded 0, L2 grade 2 (fracture suspected), L3 measured but not graded;
    the calibration is plausible and the scan portal venous.
    """
    result = make_result(series)
    grades = {"L1": (0, False), "L2": (2, True), "L3": (None, None)}
    for number, (name, (grade, suspected)) in enumerate(grades.items()):
        result.levels[name] = result.levels[name].model_copy(update={
            "vbmd_mg_cm3": 100.0 - 5.0 * number,
            "height_anterior_mm": 25.0 - number, "height_middle_mm": 26.0, "height_posterior_mm": 28.0,
            "height_ratios": {"anterior_posterior": round((25.0 - number) / 28.0, 3), "middle_posterior": 0.929,
                              "posterior_reference": 1.0},
            "genant_grade": grade, "fracture_suspected": suspected})
    result.levels["L2"].fracture_texture = dict(FRACTURE_TEXTURE)
    result.calibration = Calibration(method="internal (phantomless) calibration: air, fat, blood",
                                     slope_mg_cm3_per_hu=0.766, intercept_mg_cm3=-1.6, plausible=True,
                                     note=CALIBRATION_NOTE)
    result.contrast = ContrastPhase(phase="portal_venous", aorta_hu=185.0,
                                    handling="corrected: trabecular HU x 0.87 before calibration")
    return result


def _code(item: pydicom.Dataset) -> tuple[str, str]:
    """``(code value, scheme)`` of a content item's concept name."""
    concept = item.ConceptNameCodeSequence[0]
    return str(concept.CodeValue), str(concept.CodingSchemeDesignator)


def _children(item: pydicom.Dataset) -> dict[tuple[str, str], pydicom.Dataset]:
    """Child content items of ``item`` keyed by concept name code."""
    return {_code(child): child for child in item.get("ContentSequence", [])}


def _report_evaluations(report: hd.sr.Comprehensive3DSR) -> dict[tuple[str, str], pydicom.Dataset]:
    """Items of the TID 1500 row 12 Qualitative Evaluations container keyed by concept name code."""
    [container] = [item for item in report.ContentSequence if _code(item) == ("C0034375", "UMLS")]
    return {_code(item): item for item in container.ContentSequence if item.ValueType == "CODE"}


@pytest.fixture(scope="module")
def complete(axial):
    """The SR of :func:`complete_result` on the axial case, read back from bytes."""
    case, seg, _ = axial
    sr = build_sr(case.series, complete_result(case.series), seg)
    return case, sr, hd.sr.Comprehensive3DSR.from_dataset(round_trip(sr))


def test_sr_reports_vbmd_with_its_unit_derivation_and_meaning(complete):
    _, _, report = complete
    for number, (body, group) in enumerate(level_groups(report)):
        assert body.get_measurements(name=BONE_DENSITY) == []  # vBMD is of the trabecular ROI
        [vbmd] = group.get_measurements(name=BONE_DENSITY)
        assert vbmd.value == 100.0 - 5.0 * number
        assert (vbmd.unit.value, vbmd.unit.scheme_designator, vbmd.unit.meaning) == ("mg/cm3", "UCUM", "mg/cm^3")
        assert (vbmd.derivation.value, vbmd.derivation.scheme_designator) == ("373098007", "SCT")  # Mean
        meaning = _children(vbmd[0])[EQUIVALENT_MEANING]
        assert meaning.RelationshipType == "HAS CONCEPT MOD"
        assert "Volumetric" in meaning.TextValue and "phantomless" in meaning.TextValue


def test_sr_reports_heights_with_topographical_modifiers_and_ratios(complete):
    _, _, report = complete
    for number, (group, roi) in enumerate(level_groups(report)):
        assert roi.get_measurements(name=HEIGHT) == roi.get_measurements(name=RATIO) == []
        vertebra = group.finding_sites[0].value
        heights = {}
        for height in group.get_measurements(name=HEIGHT):
            [site] = height.finding_sites
            assert site.value == vertebra
            assert site.topographical_modifier.scheme_designator == "SCT"
            heights[site.topographical_modifier.value] = (height.value, height.unit.value)
        # Anterior, Central, Posterior (PS3.16 CID 2).
        assert heights == {"255549009": (25.0 - number, "mm"), "26216008": (26.0, "mm"),
                           "255551008": (28.0, "mm")}
        ratios = {_children(ratio[0])[EQUIVALENT_MEANING].TextValue: (ratio.value, ratio.unit.value)
                  for ratio in group.get_measurements(name=RATIO)}
        assert ratios == {
            "Anterior to posterior vertebral body height ratio": (round((25.0 - number) / 28.0, 3), "1"),
            "Middle to posterior vertebral body height ratio": (0.929, "1"),
            "Posterior vertebral body height to mean posterior height of the adjacent vertebrae ratio": (1.0, "1")}


def test_sr_reports_fracture_suspicion_with_the_genant_grade(complete):
    _, _, report = complete
    groups = [body for body, _ in level_groups(report)]
    expected = [("272519000", "0 (normal)"), ("415684004", "2 (moderate)"), ("373068000", "not graded")]
    for group, (value, grade) in zip(groups, expected, strict=True):
        [evaluation] = group.get_qualitative_evaluations(name=FRACTURE)
        assert (evaluation.value.value, evaluation.value.scheme_designator) == (value, "SCT")
        # highdicom's QualitativeEvaluation keeps name and value only: read the Comment from the group itself.
        [fracture] = [item for item in group[0].ContentSequence if _code(item) == ("125605004", "SCT")]
        comments = [child for child in fracture.ContentSequence if _code(child) == COMMENT]
        assert all(comment.RelationshipType == "HAS PROPERTIES" for comment in comments)
        assert comments[0].TextValue == f"Genant semi-quantitative grade: {grade} (Genant et al. 1993)"
        if value == "415684004":  # L2, suspected: seed 003's texture features, in the paper's order
            assert comments[1].TextValue == (
                "Texture of L2 (suspected fracture; features of Goller et al. 2023, not a benign/malignant "
                "classification): variance 1235, skewness -0.25, GLCM joint energy 0.0812, GLCM joint entropy 4.1, "
                "GLRLM short-run emphasis 0.85, GLRLM long-run emphasis 1.9, GLRLM run-length non-uniformity "
                "3456, GLRLM run percentage 0.81.")
        else:
            assert len(comments) == 1


def test_sr_reports_calibration_and_contrast_phase(complete):
    _, _, report = complete
    evaluations = _report_evaluations(report)
    calibration = evaluations[("122505", "DCM")]
    assert calibration.ConceptCodeSequence[0].CodeValue == "111222"  # Succeeded
    texts = _children(calibration)
    assert texts[("122422", "DCM")].TextValue == "internal (phantomless) calibration: air, fat, blood"
    assert texts[COMMENT].TextValue == CALIBRATION_NOTE
    contrast = evaluations[("385420005", "SCT")]
    assert (contrast.ConceptCodeSequence[0].CodeValue, contrast.ConceptCodeSequence[0].CodeMeaning) == (
        "52101004", "Present")
    assert _children(contrast)[COMMENT].TextValue == (
        "contrast phase: portal venous (aortic attenuation 185 HU); "
        "corrected: trabecular HU x 0.87 before calibration")
    assert ("C0005938", "UMLS") not in evaluations  # vBMD is evaluable


@pytest.mark.parametrize("phase, value", [("non_contrast", "272519000"), ("arterial", "52101004"),
                                          ("delayed", "52101004"), ("unknown", "373068000")])
def test_sr_codes_every_contrast_phase(axial, phase, value):
    case, seg, _ = axial
    result = complete_result(case.series)
    result.contrast = ContrastPhase(phase=phase)
    report = hd.sr.Comprehensive3DSR.from_dataset(round_trip(build_sr(case.series, result, seg)))
    contrast = _report_evaluations(report)[("385420005", "SCT")]
    assert contrast.ConceptCodeSequence[0].CodeValue == value
    assert _children(contrast)[COMMENT].TextValue == f"contrast phase: {sr_module.CONTRAST_PHASE_NAMES[phase]}"


@pytest.mark.integration
def test_complete_sr_passes_dciodvfy_and_dsrdump(complete, tmp_path):
    _, sr, _ = complete
    path = assert_valid(sr, tmp_path / "sr_complete.dcm")
    proc = subprocess.run([require_tool(DSRDUMP), "+Pt", "+Pc", str(path)], capture_output=True, text=True,
                          check=False)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "# TID 1500" in proc.stdout
    assert proc.stdout.count("# TID 1411") == 6
    assert proc.stdout.count('(C0005938,UMLS,"Bone Density")="') == 3
    assert '(125605004,SCT,"Fracture of bone")=(415684004,SCT,"Suspected")' in proc.stdout
    assert '(122505,DCM,"Calibration")=(111222,DCM,"Succeeded")' in proc.stdout


@pytest.mark.integration
def test_implausible_calibration_says_vbmd_not_evaluable_with_the_reason(axial, tmp_path):
    case, seg, _ = axial
    result = complete_result(case.series)
    for name, level in result.levels.items():
        result.levels[name] = level.model_copy(update={"vbmd_mg_cm3": None})
    result.calibration = Calibration(method="internal (phantomless) calibration: air, fat, blood", plausible=False,
                                     note="adipose -40 HU outside -135..-65 HU")
    sr = build_sr(case.series, result, seg)
    report = hd.sr.Comprehensive3DSR.from_dataset(round_trip(sr))
    for body, roi in level_groups(report):
        assert roi.get_measurements(name=BONE_DENSITY) == []
        assert len(roi.get_measurements(name=hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient"))) == 3
        assert len(body.get_measurements(name=HEIGHT)) == 3  # the rest of the level stays
    evaluations = _report_evaluations(report)
    assert evaluations[("122505", "DCM")].ConceptCodeSequence[0].CodeValue == "111224"  # Failed
    vbmd = evaluations[("C0005938", "UMLS")]
    assert vbmd.ConceptCodeSequence[0].CodeValue == "373121007"  # Not Evaluated
    assert _children(vbmd)[COMMENT].TextValue == "vBMD not evaluable: adipose -40 HU outside -135..-65 HU"
    assert_valid(sr, tmp_path / "sr_vbmd_not_evaluable.dcm")


def test_vbmd_without_calibration_is_not_evaluable_for_that_reason(axial):
    case, seg, _ = axial
    result = make_result(case.series)
    result.levels["L2"] = result.levels["L2"].model_copy(update={"vbmd_mg_cm3": None})
    report = hd.sr.Comprehensive3DSR.from_dataset(round_trip(build_sr(case.series, result, seg)))
    evaluations = _report_evaluations(report)
    assert ("122505", "DCM") not in evaluations
    assert _children(evaluations[("C0005938", "UMLS")])[COMMENT].TextValue == (
        "vBMD not evaluable: no phantomless calibration was performed")


def test_unknown_height_ratio_is_rejected(axial):
    case, seg, _ = axial
    result = complete_result(case.series)
    result.levels["L1"].height_ratios["anterior_middle"] = 0.9
    with pytest.raises(ValueError, match="anterior_middle"):
        build_sr(case.series, result, seg)


def _without_dates_and_times(dataset: pydicom.Dataset) -> bytes:
    """``dataset`` as PS3.10 bytes with every DA, TM and DT value emptied."""
    copy = round_trip(dataset)

    def clear(ds: pydicom.Dataset, elem: pydicom.DataElement) -> None:
        if elem.VR in ("DA", "TM", "DT"):
            elem.value = ""

    copy.walk(clear)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, copy, enforce_file_format=True)
    return buffer.getvalue()


def test_seg_rebuild_is_identical_apart_from_dates_and_times(axial):
    """The Dimension Organization UID is derived too, so a rebuild yields the same content (issue 5 item 1)."""
    case, seg, _ = axial
    again = build_seg(case.series, case.segmentation)
    expected = derived_uid(input_key(case.series.datasets), "seg-dimension-organization")
    uids = {item.DimensionOrganizationUID for item in (*again.DimensionOrganizationSequence,
                                                       *again.DimensionIndexSequence)}
    assert uids == {expected}
    assert _without_dates_and_times(again) == _without_dates_and_times(seg)
