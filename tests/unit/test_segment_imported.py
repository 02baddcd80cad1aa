"""Tests of the TotalSegmentator label-map import (v1 and v2 class IDs).

The label maps are the TotalSegmentator outputs shipped with the test data
(model output). The DICOM example's map is stored with a flipped y axis, so it
only lands on the right voxels when resampled by physical coordinates.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from bench.segmentation import LUMBAR, REF_V2_ID, dice
from osteonode.anatomy import FEMUR_LEFT, FEMUR_RIGHT, VERTEBRA_IDS
from osteonode.segment.imported import load_totalsegmentator
from osteonode.volume import load_series
from tests.conftest import DATA, require_data

ABDOMEN = DATA / "totalseg-example-abdomen"
J2K_SEG = DATA / "totalseg-example-dicom" / "ref_v2_multilabel_seg.nii.gz"


def _body_dice(seg, refs) -> dict[int, float]:
    # the example CT and the reference masks share one grid
    return {vid: dice(seg.bodies == vid, (refs.vertebrae == REF_V2_ID[vid]) & (refs.body == 1)) for vid in LUMBAR}


def test_v1_multilabel_is_detected_and_converted(refs, volume):
    seg = load_totalsegmentator(require_data(ABDOMEN / "ref_v1_multilabel_seg.nii.gz"), volume)
    assert "TotalSegmentator v1" in seg.method
    assert seg.not_evaluable_reason is None
    v1 = sitk.GetArrayFromImage(sitk.ReadImage(str(ABDOMEN / "ref_v1_multilabel_seg.nii.gz")))
    for name, v1_id in (("L1", 22), ("L4", 19), ("T12", 23)):  # whole vertebrae keep their voxels
        np.testing.assert_array_equal(seg.whole == VERTEBRA_IDS[name], v1 == v1_id)
    # bodies: the vertebra in front of its canal; compared with the v2 body model's output
    assert min(_body_dice(seg, refs).values()) >= 0.80
    assert all(seg.confidence[v] == pytest.approx(0.9) for v in LUMBAR)
    # femurs: right as labelled, left (implant) excluded for metal
    assert seg.femurs.sides["right"].status == "segmented"
    np.testing.assert_array_equal(seg.femurs.labels == FEMUR_RIGHT, v1 == 89)
    assert seg.femurs.sides["left"].status == "excluded" and "metal" in seg.femurs.sides["left"].reason
    assert not (seg.femurs.labels == FEMUR_LEFT).any()


def test_v2_map_is_detected(refs, volume):
    seg = load_totalsegmentator(require_data(ABDOMEN / "ref_v2_spine_vertebrae.nii.gz"), volume)
    assert "TotalSegmentator v2" in seg.method
    assert min(_body_dice(seg, refs).values()) >= 0.90
    assert {s.status for s in seg.femurs.sides.values()} == {"not_in_view"}  # a spine-only map


def test_trabecular_roi_follows_the_builtin_rule(volume, refs):
    seg = load_totalsegmentator(ABDOMEN / "ref_v2_spine_vertebrae.nii.gz", volume)
    for vid in LUMBAR:
        roi, body = seg.trabecular == vid, seg.bodies == vid
        assert roi.sum() * np.prod(volume.spacing) >= 1000.0  # >= 1 cm3
        assert np.all(body[roi])
        dist = ndi.distance_transform_edt(np.pad(body, 1), sampling=volume.spacing)[1:-1, 1:-1, 1:-1]
        assert dist[roi].min() >= 3.0
        assert 50.0 < float(volume.hu[roi].mean()) < float(volume.hu[body].mean())


def test_explicit_version_is_used(volume):
    seg = load_totalsegmentator(ABDOMEN / "ref_v1_multilabel_seg.nii.gz", volume, version="v1")
    assert "version given" in seg.method
    wrong = load_totalsegmentator(ABDOMEN / "ref_v1_multilabel_seg.nii.gz", volume, version="v2")
    assert not np.isin(wrong.bodies, LUMBAR).any()  # v1 has no vertebrae at the v2 lumbar IDs here


def test_flipped_map_is_resampled_by_physical_coordinates(j2k_series):
    series = load_series(j2k_series)
    seg = load_totalsegmentator(require_data(J2K_SEG), series.volume)
    assert "v2" in seg.method  # ribs 103/115 etc.: IDs above 104
    t12 = seg.whole == VERTEBRA_IDS["T12"]
    assert t12.any()
    assert float(series.volume.hu[t12].mean()) > 150.0  # bone (naive indexing lands on soft tissue)
    assert seg.not_evaluable_reason is not None and "L1" in seg.not_evaluable_reason
    assert not np.isin(seg.bodies, LUMBAR).any()


def test_bad_inputs(tmp_path, volume):
    with pytest.raises(FileNotFoundError):
        load_totalsegmentator(tmp_path / "missing.nii.gz", volume)
    with pytest.raises(ValueError):
        load_totalsegmentator(ABDOMEN / "ref_v1_multilabel_seg.nii.gz", volume, version="v3")
    floats = volume.to_sitk(np.full(volume.shape, 0.5, np.float32))
    sitk.WriteImage(floats, str(tmp_path / "prob.nii.gz"))
    with pytest.raises(ValueError, match="non-integer"):
        load_totalsegmentator(tmp_path / "prob.nii.gz", volume)
    # only a liver (ID 5 in both versions): nothing tells v1 from v2
    liver = volume.to_sitk(np.where(volume.hu > 40, 5, 0).astype(np.uint8))
    sitk.WriteImage(liver, str(tmp_path / "liver.nii.gz"))
    with pytest.raises(ValueError, match="cannot tell"):
        load_totalsegmentator(tmp_path / "liver.nii.gz", volume)
