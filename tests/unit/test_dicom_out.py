"""Tests of the DICOM outputs: binary SEG and TID 1500 Comprehensive 3D SR.

A small synthetic CT (64 x 64 x 20 voxels, three box "vertebrae" L1-L3 of
different sizes so that any flip or shift shows) is written with
:func:`osteonode.ctseries.write_ct_series` in several orientations, loaded
with :func:`osteonode.volume.load_series`, and encoded.

dciodvfy (dicom3tools) and dsrdump (DCMTK) are required: the tests FAIL when
they are missing. dciodvfy must report no error. Its only accepted warnings
are "Unrecognized defined term <99OSTEO>" for the Coding Scheme Designator:
this dciodvfy build checks designators against a fixed list and ignores the
Coding Scheme Identification Sequence in which the SR declares 99OSTEO.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from osteonode.ctseries import write_ct_series
from osteonode.dicom_out import build_seg, build_sr, write
from osteonode.dicom_out import seg as seg_module
from osteonode.dicom_out import sr as sr_module
from osteonode.result import AnalysisResult, BoneStatus, LevelResult
from osteonode.segment import SpineSegmentation
from osteonode.volume import Series, load_series

DCIODVFY = "/usr/bin/dciodvfy"
DSRDUMP = "/usr/bin/dsrdump"
#: Warnings of dciodvfy that are accepted (see module docstring).
ALLOWED_WARNING = re.compile(
    r"^Warning - Unrecognized defined term <99OSTEO> for value 1 of attribute <Coding Scheme Designator>$")

#: VerSe ID -> (z range, y range, x range) of its box in the SimpleITK (z, y, x) array.
BOXES = {
    20: ((2, 7), (20, 40), (25, 45)),   # L1
    21: ((8, 13), (22, 44), (24, 40)),  # L2
    22: ((14, 19), (18, 36), (30, 50)),  # L3
}
DIRECTIONS = {
    "axial_head_first": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "axial_reversed_slices": (1, 0, 0, 0, 1, 0, 0, 0, -1),   # feet-first slice order
    "coronal_flipped": (1, 0, 0, 0, 0, 1, 0, -1, 0),
}


def _tool(path: str) -> str:
    if not Path(path).is_file():
        pytest.fail(f"{path} is required for this test and is missing")
    return path


def _make_case(tmp_path: Path, direction: tuple[int, ...]) -> tuple[Series, SpineSegmentation, list[Path], np.ndarray]:
    """Write the synthetic CT; return the series, a segmentation on its grid, files, label array.

    The returned label array is in SimpleITK's ``(z, y, x)`` order, i.e. file ``k``
    (``CT_{k+1}``) shows ``labels[k]``: the ground truth for the SEG read-back.
    """
    labels = np.zeros((20, 64, 64), dtype=np.uint8)
    for vid, ((z0, z1), (y0, y1), (x0, x1)) in BOXES.items():
        labels[z0:z1, y0:y1, x0:x1] = vid
    hu = np.where(labels > 0, 180, -50).astype(np.int16)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.8, 0.7, 2.5))
    image.SetOrigin((-25.0, -30.0, 100.0))
    image.SetDirection(tuple(float(v) for v in direction))
    files = write_ct_series(image, tmp_path / "ct", study_instance_uid=pydicom.uid.generate_uid(),
                            series_instance_uid=pydicom.uid.generate_uid())
    series = load_series(files)

    # Resample the labels onto the loaded grid through patient coordinates (not array order).
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    zz, yy, xx = np.indices(series.volume.shape)
    points = series.volume.affine @ np.stack([zz.ravel(), yy.ravel(), xx.ravel(), np.ones(zz.size)])
    bodies = np.zeros(series.volume.shape, dtype=np.uint8)
    flat = bodies.reshape(-1)
    for n, point in enumerate(points[:3].T):
        i, j, k = label_image.TransformPhysicalPointToIndex(tuple(float(v) for v in point))
        flat[n] = labels[k, j, i]
    segmentation = SpineSegmentation(bodies=bodies, trabecular=bodies.copy(),
                                     confidence={20: 0.95, 21: 0.9, 22: 0.85},
                                     method="sacrum anchor and disc counting")
    return series, segmentation, files, labels


def _result(series: Series) -> AnalysisResult:
    levels = {
        name: LevelResult(label_confidence=conf, trabecular_hu_mean=mean, trabecular_hu_median=mean - 2.0,
                          trabecular_hu_sd=25.0, trabecular_voxel_count=500, trabecular_roi_volume_mm3=700.0)
        for name, conf, mean in (("L1", 0.95, 121.5), ("L2", 0.9, 118.25), ("L3", 0.85, 115.0))
    }
    return AnalysisResult(status="ok", study_instance_uid=series.study_instance_uid,
                          series_instance_uid=series.series_instance_uid,
                          labelling_method="sacrum anchor and disc counting", levels=levels,
                          bone_status=BoneStatus(category="osteopenia",
                                                 basis="L1 mean trabecular attenuation 121.5 HU (100-160 HU)"))


def _round_trip(dataset: pydicom.Dataset) -> pydicom.Dataset:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    proc = subprocess.run([_tool(DCIODVFY), str(path)], capture_output=True, text=True, check=False)
    lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings


@pytest.fixture(scope="module")
def axial(tmp_path_factory):
    series, segmentation, files, labels = _make_case(tmp_path_factory.mktemp("axial"),
                                                     DIRECTIONS["axial_head_first"])
    seg = build_seg(series, segmentation)
    sr = build_sr(series, _result(series), seg)
    return series, segmentation, files, labels, seg, sr


@pytest.mark.parametrize("orientation", sorted(DIRECTIONS))
def test_seg_maps_segments_exactly_onto_source_voxels(tmp_path, orientation):
    series, segmentation, files, labels = _make_case(tmp_path, DIRECTIONS[orientation])
    seg = hd.seg.Segmentation.from_dataset(_round_trip(build_seg(series, segmentation)))

    assert seg.SegmentationType == "BINARY"
    numbers = {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}
    assert numbers == {"L1 vertebra": 1, "L2 vertebra": 2, "L3 vertebra": 3}
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "osteonode"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "66794005"

    # Ground truth per source file, independent of highdicom's volume ordering.
    source = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    uids = [str(ds.SOPInstanceUID) for ds in source]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3],
                                               assert_missing_frames_are_empty=True)
    assert pixels.shape == (len(files), 64, 64, 3)
    for number, vid in enumerate((20, 21, 22)):
        np.testing.assert_array_equal(pixels[..., number].astype(bool), labels == vid)

    # Each frame lies exactly on the plane of the source image it references.
    positions = {str(ds.SOPInstanceUID): np.array(ds.ImagePositionPatient, dtype=float) for ds in source}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(position, positions[ref], atol=1e-3)
    np.testing.assert_allclose(
        np.array(seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient,
                 dtype=float),
        np.array(source[0].ImageOrientationPatient, dtype=float), atol=1e-5)


def test_seg_and_sr_headers_follow_the_source(axial):
    series, _, _, _, seg, sr = axial
    source = series.datasets[0]
    for ds in (_round_trip(seg), _round_trip(sr)):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.PatientName == source.PatientName
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.SeriesDescription == "osteonode SEG"
    assert sr.SeriesDescription == "osteonode Bone Health SR"
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID


def test_sr_content_round_trips(axial):
    series, _, _, _, seg, sr = axial
    report = hd.sr.Comprehensive3DSR.from_dataset(_round_trip(sr))
    assert report.CompletionFlag == "COMPLETE"
    assert report.VerificationFlag == "UNVERIFIED"
    assert report.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99OSTEO"
    root = report.ContentSequence
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    groups = report.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["L1 vertebral body", "L2 vertebral body",
                                                      "L3 vertebral body"]
    seg_tracking = {int(item.SegmentNumber): str(item.TrackingUID) for item in seg.SegmentSequence}
    hu_code = hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient")
    for number, (group, mean) in enumerate(zip(groups, (121.5, 118.25, 115.0)), start=1):
        items = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in group.referenced_segment}
        ref = items["Referenced Segment"].ReferencedSOPSequence[0]
        assert ref.ReferencedSegmentNumber == number
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert items["Source Series for Segmentation"].UID == series.series_instance_uid
        assert str(group.tracking_uid) == seg_tracking[number]
        values = {m.derivation.meaning: (m.value, m.unit.value) for m in group.get_measurements(name=hu_code)}
        assert values["Mean"] == (mean, "[hnsf'U]")
        assert values["Median"] == (mean - 2.0, "[hnsf'U]")
        assert group.finding_sites[0].value.scheme_designator == "SCT"

    # TID 1500 row 12: bone status and its texts.
    qual = [item for item in root if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert len(qual) == 1
    children = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in qual[0].ContentSequence}
    assert children["Finding"].ConceptCodeSequence[0].CodeValue == "312894000"  # osteopenia
    assert children["Basis of bone status"].TextValue.startswith("L1 mean")
    assert children["Vertebral level identification method"].TextValue == "sacrum anchor and disc counting"


def test_outputs_pass_dciodvfy_and_dsrdump(axial, tmp_path):
    _, _, _, _, seg, sr = axial
    seg_path = write(seg, tmp_path / "seg.dcm")
    sr_path = write(sr, tmp_path / "sr.dcm")
    for path in (seg_path, sr_path):
        errors, warnings = _dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
        assert [w for w in warnings if not ALLOWED_WARNING.match(w)] == [], f"{path.name}: {warnings}"
    assert _dciodvfy(seg_path)[1] == []  # the SEG uses standard codes only

    proc = subprocess.run([_tool(DSRDUMP), "+Pt", str(sr_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Comprehensive 3D SR Document" in proc.stdout
    assert "# TID 1500" in proc.stdout
    assert proc.stdout.count("# TID 1411") == 3
    assert "Osteopenia" in proc.stdout


def test_not_evaluable_sr_is_valid_and_references_the_source(tmp_path):
    series, _, files, _ = _make_case(tmp_path, DIRECTIONS["axial_head_first"])
    result = AnalysisResult.not_evaluable("no lumbar vertebra could be identified",
                                          series.study_instance_uid, series.series_instance_uid)
    sr = build_sr(series, result, None)
    path = write(sr, tmp_path / "sr_not_evaluable.dcm")

    errors, warnings = _dciodvfy(path)
    assert errors == []
    assert [w for w in warnings if not ALLOWED_WARNING.match(w)] == []
    proc = subprocess.run([_tool(DSRDUMP), "+Pl", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Not evaluable" in proc.stdout
    assert "no lumbar vertebra could be identified" in proc.stdout

    ds = _round_trip(sr)
    assert ds.StudyInstanceUID == series.study_instance_uid
    assert ds.PatientID == series.datasets[0].PatientID
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in evidence] == [series.series_instance_uid]
    referenced = {r.ReferencedSOPInstanceUID for r in evidence[0].ReferencedSOPSequence}
    assert referenced == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    report = hd.sr.Comprehensive3DSR.from_dataset(ds)
    groups = report.content.get_planar_roi_measurement_groups() + \
        report.content.get_volumetric_roi_measurement_groups()
    assert groups == []


def test_not_evaluable_sr_from_bare_headers_without_type2_attributes(tmp_path):
    """The pipeline reports on headers it could not load as a volume; anonymised data lack Type 2 values."""
    _, _, files, _ = _make_case(tmp_path, DIRECTIONS["axial_reversed_slices"])
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for ds in headers:
        for keyword in ("PatientName", "PatientBirthDate", "StudyID", "AccessionNumber",
                        "ReferringPhysicianName"):
            delattr(ds, keyword)
    result = AnalysisResult.not_evaluable("the series cannot be assembled into a volume",
                                          str(headers[0].StudyInstanceUID), str(headers[0].SeriesInstanceUID))
    sr = build_sr(headers, result, None)
    assert "PatientName" not in headers[0]  # the caller's headers are left alone
    errors, warnings = _dciodvfy(write(sr, tmp_path / "sr.dcm"))
    assert errors == []
    # Only the accepted 99OSTEO warnings and the one about the (empty, inherited) Study ID.
    assert [w for w in warnings if not ALLOWED_WARNING.match(w) and not w.endswith("- Study ID")] == []
    assert sr.PatientID == headers[0].PatientID


def test_uids_are_identical_when_built_twice(axial):
    """Re-processing must yield the same UIDs (osteonode.uids.derived_uid)."""
    series, segmentation, _, _, seg, sr = axial
    seg2 = build_seg(series, segmentation)
    sr2 = build_sr(series, _result(series), seg2)
    assert (seg2.SeriesInstanceUID, seg2.SOPInstanceUID) == (seg.SeriesInstanceUID, seg.SOPInstanceUID)
    assert (sr2.SeriesInstanceUID, sr2.SOPInstanceUID) == (sr.SeriesInstanceUID, sr.SOPInstanceUID)
    assert [i.TrackingUID for i in seg2.SegmentSequence] == [i.TrackingUID for i in seg.SegmentSequence]


def test_every_output_uid_comes_from_derived_uid(axial, monkeypatch):
    """Independent of the implementation of derived_uid: each output UID is one of its results."""
    series, segmentation, _, _, _, _ = axial
    calls: dict[str, str] = {}

    def fake(source_series_uid: str, role: str) -> pydicom.uid.UID:
        assert source_series_uid == series.series_instance_uid
        calls[role] = f"2.25.{len(calls) + 1}{abs(hash(role)) % 10**12}"
        return pydicom.uid.UID(calls[role])

    for module in (seg_module, sr_module):
        monkeypatch.setattr(module, "derived_uid", fake)
    seg = build_seg(series, segmentation)
    sr = build_sr(series, _result(series), seg)
    produced = {seg.SeriesInstanceUID, seg.SOPInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID,
                *(item.TrackingUID for item in seg.SegmentSequence)}
    assert produced <= set(calls.values())
    assert {"seg-series", "seg-instance", "sr-series", "sr-instance"} <= set(calls)


def test_evaluable_result_without_seg_is_rejected(axial):
    series, *_ = axial
    with pytest.raises(ValueError):
        build_sr(series, _result(series), None)


def test_seg_rejects_unknown_label(axial):
    series, segmentation, *_ = axial
    bodies = segmentation.bodies.copy()
    bodies[bodies == 22] = 77
    with pytest.raises(ValueError):
        build_seg(series, SpineSegmentation(bodies=bodies, trabecular=bodies))


def test_dciodvfy_is_installed():
    """The validator is part of the test environment; its absence is a failure, not a skip."""
    assert shutil.which("dciodvfy") or Path(DCIODVFY).is_file(), "dciodvfy (dicom3tools) is missing"
    _tool(DCIODVFY)
