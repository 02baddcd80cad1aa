"""Geometry of the outputs for every source orientation.

The synthetic phantom of :mod:`test_dicom_out` is defined in patient space,
written on grids of every orientation (HFS and FFS, reversed slice order,
mirrored rows or columns, coronal, sagittal, oblique), loaded and encoded:

* SEG frames read back with highdicom lie exactly on their source images and
  equal the label image that each source file's own geometry implies;
* the key-image reformats find each level where it is in patient space,
  whatever the source grid;
* a gantry-tilted (sheared) series is rejected with a reason, and the reports
  from its headers stay valid.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
from test_dicom_out import (
    BANNER,
    BOXES,
    DIRECTIONS,
    PATIENT_POSITIONS,
    ROI_MARGIN_MM,
    assert_valid,
    file_pixel_centres,
    make_case,
    make_result,
    phantom_labels,
    round_trip,
)

from osteonode.dicom_out import build_key_images, build_pdf_report, build_seg, build_sr
from osteonode.dicom_out.keyimage import VIEWS, body_centre_lps, plane_through, reformat
from osteonode.errors import NotEvaluable
from osteonode.result import AnalysisResult
from osteonode.volume import load_series

ORIENTATIONS = sorted(DIRECTIONS)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_seg_frames_lie_exactly_on_the_source_voxels(tmp_path, orientation):
    case = make_case(tmp_path, DIRECTIONS[orientation],
                     patient_position=PATIENT_POSITIONS.get(orientation, "HFS"))
    seg = hd.seg.Segmentation.from_dataset(round_trip(build_seg(case.series, case.segmentation)))

    assert seg.SegmentationType == "BINARY"
    numbers = {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}
    assert numbers == {"L1 vertebra": 1, "L2 vertebra": 2, "L3 vertebra": 3,
                       "L1 trabecular ROI": 4, "L2 trabecular ROI": 5, "L3 trabecular ROI": 6}
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "66794005"

    # Ground truth per source file, from that file's own Image Plane attributes: bodies, then ROIs.
    source = [pydicom.dcmread(f, stop_before_pixels=True) for f in case.files]
    uids = [str(ds.SOPInstanceUID) for ds in source]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3, 4, 5, 6],
                                               assert_missing_frames_are_empty=True)
    assert pixels.shape == (len(case.files), *case.truth[0].shape, 6)
    truth = np.stack(case.truth)
    roi_truth = np.stack([phantom_labels(file_pixel_centres(ds), ROI_MARGIN_MM) for ds in source])
    assert all((truth == vid).any() and (roi_truth == vid).any() for vid in BOXES)
    for number, vid in enumerate(sorted(BOXES)):
        np.testing.assert_array_equal(pixels[..., number].astype(bool), truth == vid)
        np.testing.assert_array_equal(pixels[..., 3 + number].astype(bool), roi_truth == vid)

    # Each frame lies on the plane of the source image it references, with its orientation and spacing.
    positions = {str(ds.SOPInstanceUID): np.array(ds.ImagePositionPatient, dtype=float) for ds in source}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(position, positions[ref], atol=1e-3)
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float),
                               np.array(source[0].ImageOrientationPatient, dtype=float), atol=1e-5)
    np.testing.assert_allclose(np.array(shared.PixelMeasuresSequence[0].PixelSpacing, dtype=float),
                               np.array(source[0].PixelSpacing, dtype=float), atol=1e-6)
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID


def _box_centre(vid: int) -> np.ndarray:
    return np.array([(low + high) / 2 for low, high in BOXES[vid]])


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_key_image_reformats_find_each_level_where_it_is(tmp_path, orientation):
    """Mid-sagittal and axial planes are placed in patient space, independent of the source grid."""
    case = make_case(tmp_path, DIRECTIONS[orientation])
    volume, bodies = case.series.volume, case.segmentation.bodies
    centres = {"sagittal": body_centre_lps(volume, bodies), "axial": body_centre_lps(volume, bodies, 20)}
    np.testing.assert_allclose(centres["axial"], _box_centre(20), atol=1.0)
    for view, (row_direction, column_direction) in VIEWS.items():
        plane = plane_through(volume, centres[view], row_direction, column_direction)
        labels = reformat(volume, bodies, plane, order=0, fill=0)
        points = plane.points()
        # The plane contains its centre and is perpendicular to the view's normal.
        normal = np.cross(row_direction, column_direction)
        np.testing.assert_allclose(points.reshape(-1, 3) @ normal, centres[view] @ normal, atol=1e-6)
        expected = sorted(BOXES) if view == "sagittal" else [20]
        assert sorted(int(v) for v in np.unique(labels[labels > 0])) == expected
        for vid in expected:
            found = points[labels == vid].mean(axis=0)
            in_plane = np.array([row_direction, column_direction])
            # Within a voxel (2.5 mm at most) of the box centre, in the plane.
            np.testing.assert_allclose(in_plane @ found, in_plane @ _box_centre(vid), atol=2.5)


def test_key_images_have_the_same_orientation_for_every_source_grid(tmp_path):
    orientations = {}
    for name in ("axial_ffs", "coronal", "oblique"):
        case = make_case(tmp_path / name, DIRECTIONS[name], patient_position=PATIENT_POSITIONS.get(name, "HFS"))
        images = build_key_images(case.series, case.segmentation, make_result(case.series), banner=BANNER)
        orientations[name] = [list(image.PatientOrientation) for image in images]
    assert all(value == [["P", "F"], ["L", "P"]] for value in orientations.values()), orientations


def test_plane_directions_must_be_orthonormal(tmp_path):
    case = make_case(tmp_path, DIRECTIONS["axial_hfs"])
    with pytest.raises(ValueError, match="orthogonal unit"):
        plane_through(case.series.volume, np.zeros(3), (1.0, 0.0, 0.0), (1.0, 1.0, 0.0))


@pytest.mark.integration
def test_gantry_tilt_is_rejected_and_still_reported(tmp_path):
    """A sheared slice stack cannot be a SEG grid: load_series rejects it; SR and PDF say why."""
    case = make_case(tmp_path, DIRECTIONS["axial_hfs"])
    tilt = np.radians(15.0)
    for k, path in enumerate(case.files):
        ds = pydicom.dcmread(path)
        position = np.array(ds.ImagePositionPatient, dtype=float)
        position[1] += k * 2.5 * np.tan(tilt)  # slices shift along y: positions leave the slice normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.GantryDetectorTilt = 15.0
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(NotEvaluable) as excinfo:
        load_series(case.files)
    reason = str(excinfo.value)
    assert "gantry tilt or sheared slice stack (15.0 degrees from the slice normal)" in reason

    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in case.files]
    result = AnalysisResult.not_evaluable(reason, str(headers[0].StudyInstanceUID),
                                          str(headers[0].SeriesInstanceUID))
    sr = assert_valid(build_sr(headers, result, None), tmp_path / "sr.dcm")
    assert reason in str(pydicom.dcmread(sr).ContentSequence[-1].ContentSequence[1].TextValue)
    assert_valid(build_pdf_report(headers, result, banner=BANNER), tmp_path / "report.dcm")
