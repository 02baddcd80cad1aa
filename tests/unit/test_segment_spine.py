"""Tests of the built-in vertebra segmentation and level labelling.

Real data: ../shared/data/ct (TotalSegmentator test files, Apache-2.0). The
TotalSegmentator masks are model output and are used here only to measure.
Our labels are compared on the reference grid after resampling them by
physical coordinates (nearest neighbour), never by raw array indexing.
"""

from __future__ import annotations


import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from osteonode.anatomy import VERTEBRA_IDS
from osteonode.segment import SpineSegmentation
from osteonode.segment.spine import CanonicalFrame, segment_spine
from osteonode.volume import Volume, load_series
from tests.conftest import DATA, require_data

ABDOMEN = DATA / "totalseg-example-abdomen"
CTA = DATA / "totalseg-thoracic-cta-crop"

#: VerSe ID -> TotalSegmentator v2 vertebra ID (ref_v2_spine_vertebrae.nii.gz)
V2_ID = {VERTEBRA_IDS["T12"]: 32, VERTEBRA_IDS["L1"]: 31, VERTEBRA_IDS["L2"]: 30,
         VERTEBRA_IDS["L3"]: 29, VERTEBRA_IDS["L4"]: 28, VERTEBRA_IDS["L5"]: 27}
LUMBAR_REQUIRED = [VERTEBRA_IDS[n] for n in ("L1", "L2", "L3", "L4")]
#: Dice of our body vs the reference body (vertebra & body mask); measured on example_ct:
#: T12 0.72 (cut by the field of view), L1 0.85, L2 0.89, L3 0.89, L4 0.88, L5 0.83.
MIN_DICE_L1_L4 = 0.83
MIN_DICE_T12_L5 = 0.70

def _flip_z_y(volume: Volume) -> Volume:
    """Same patient, array z and y reversed (feet-first slice order, mirrored rows)."""
    n0, n1, _ = volume.shape
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, 3] + volume.affine[:3, 0] * (n0 - 1) + volume.affine[:3, 1] * (n1 - 1)
    affine[:3, 0] = -volume.affine[:3, 0]
    affine[:3, 1] = -volume.affine[:3, 1]
    return Volume(hu=np.ascontiguousarray(volume.hu[::-1, ::-1]), affine=affine)


def _on_reference_grid(volume: Volume, labels: np.ndarray, reference: sitk.Image) -> np.ndarray:
    image = sitk.Resample(volume.to_sitk(labels), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(image)


@pytest.fixture(scope="module")
def abdomen():
    image = sitk.ReadImage(str(require_data(ABDOMEN / "example_ct.nii.gz")))
    volume = Volume.from_sitk(image)
    ref_img = sitk.ReadImage(str(ABDOMEN / "ref_v2_spine_vertebrae.nii.gz"))
    vertebrae = sitk.GetArrayFromImage(ref_img)
    body = sitk.GetArrayFromImage(sitk.ReadImage(str(ABDOMEN / "ref_v2_vertebrae_body.nii.gz")))
    ct = sitk.GetArrayFromImage(image).astype(np.float32)
    return volume, ref_img, vertebrae, body, ct


@pytest.fixture(scope="module")
def abdomen_seg(abdomen) -> SpineSegmentation:
    return segment_spine(abdomen[0])


def _centroid_levels(seg: SpineSegmentation, volume: Volume, ref_img, vertebrae) -> dict[int, int]:
    """VerSe ID -> reference v2 vertebra ID at our body's centroid (on the reference grid)."""
    ours = _on_reference_grid(volume, seg.bodies, ref_img)
    found = {}
    for vid in V2_ID:
        mask = ours == vid
        if mask.any():
            c = tuple(int(round(v)) for v in ndi.center_of_mass(mask))
            found[vid] = int(vertebrae[c])
    return found


def test_real_ct_levels_are_correct(abdomen, abdomen_seg):
    volume, ref_img, vertebrae, _, _ = abdomen
    assert abdomen_seg.not_evaluable_reason is None
    assert "sacrum" in abdomen_seg.method and "T12" in abdomen_seg.method
    found = _centroid_levels(abdomen_seg, volume, ref_img, vertebrae)
    for vid in LUMBAR_REQUIRED + [VERTEBRA_IDS["T12"], VERTEBRA_IDS["L5"]]:
        assert found.get(vid) == V2_ID[vid], f"level {vid}: centroid in reference vertebra {found.get(vid)}"
    # both anchors seen and agreeing -> high confidence for every complete level
    for vid in LUMBAR_REQUIRED:
        assert abdomen_seg.confidence[vid] >= 0.85
    assert abdomen_seg.bodies.shape == volume.shape and abdomen_seg.bodies.dtype == np.uint8


def test_real_ct_body_dice(abdomen, abdomen_seg):
    volume, ref_img, vertebrae, body, _ = abdomen
    ours = _on_reference_grid(volume, abdomen_seg.bodies, ref_img)
    dice = {}
    for vid, rid in V2_ID.items():
        a = ours == vid
        b = (vertebrae == rid) & (body == 1)
        dice[vid] = 2.0 * (a & b).sum() / (a.sum() + b.sum())
    for vid in LUMBAR_REQUIRED:
        assert dice[vid] >= MIN_DICE_L1_L4, dice
    for vid in (VERTEBRA_IDS["T12"], VERTEBRA_IDS["L5"]):
        assert dice[vid] >= MIN_DICE_T12_L5, dice


def test_real_ct_bodies_exclude_posterior_elements_and_discs(abdomen, abdomen_seg):
    volume, ref_img, vertebrae, body, _ = abdomen
    ours = _on_reference_grid(volume, abdomen_seg.bodies, ref_img) > 0
    # almost nothing of ours lies on the reference neural arches (vertebra but not body) or discs
    arch = (vertebrae > 0) & (body == 0)
    disc = body == 2
    assert (ours & arch).sum() / ours.sum() < 0.03
    assert (ours & disc).sum() / ours.sum() < 0.08


def test_real_ct_trabecular_roi(abdomen, abdomen_seg):
    volume, _, _, _, _ = abdomen
    voxel_cm3 = float(np.prod(volume.spacing)) / 1000.0
    for vid in LUMBAR_REQUIRED:
        roi = abdomen_seg.trabecular == vid
        body = abdomen_seg.bodies == vid
        assert roi.sum() * voxel_cm3 >= 1.0, f"ROI of {vid} too small"
        assert np.all(body[roi]), "ROI leaves its body"
        # clear of the cortex: every ROI voxel is >= 3 mm inside the body
        dist = ndi.distance_transform_edt(np.pad(body, 1), sampling=volume.spacing)[1:-1, 1:-1, 1:-1]
        assert dist[roi].min() >= 3.0
        mean_hu = float(volume.hu[roi].mean())
        # trabecular bone of an adult: well below cortex, above fat/soft tissue
        assert 50.0 < mean_hu < 300.0, mean_hu
        # and lower than the whole body (which includes the cortical shell and endplates)
        assert mean_hu < float(volume.hu[body].mean())


def test_reoriented_ct_gives_same_levels(abdomen, abdomen_seg):
    volume, ref_img, vertebrae, _, _ = abdomen
    flipped = _flip_z_y(volume)
    seg = segment_spine(flipped)
    assert seg.not_evaluable_reason is None
    assert set(seg.confidence) == set(abdomen_seg.confidence)
    found = _centroid_levels(seg, flipped, ref_img, vertebrae)
    for vid in LUMBAR_REQUIRED:
        assert found.get(vid) == V2_ID[vid]
    # and the labels land on the same physical voxels
    back = _on_reference_grid(flipped, seg.bodies, ref_img)
    orig = _on_reference_grid(volume, abdomen_seg.bodies, ref_img)
    for vid in LUMBAR_REQUIRED:
        a, b = back == vid, orig == vid
        assert 2.0 * (a & b).sum() / (a.sum() + b.sum()) > 0.95


def test_thin_slice_resampling_gives_same_levels(abdomen):
    # the same CT on a thin-slice grid (0.8 x 0.8 x 1.25 mm, ~460 x 380 x 270 voxels) with
    # quantum noise added: levels unchanged, bodies still match the reference
    _, ref_img, vertebrae, body, _ = abdomen
    image = sitk.ReadImage(str(require_data(ABDOMEN / "example_ct.nii.gz")))
    spacing = (0.8, 0.8, 1.25)
    size = [int(round(image.GetSize()[i] * image.GetSpacing()[i] / spacing[i])) for i in range(3)]
    thin = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                         image.GetDirection(), -1024, sitk.sitkFloat32)
    volume = Volume.from_sitk(thin)
    rng = np.random.default_rng(0)
    volume = Volume(hu=volume.hu + rng.normal(0, 20, volume.shape).astype(np.float32), affine=volume.affine)
    seg = segment_spine(volume)
    assert seg.not_evaluable_reason is None
    found = _centroid_levels(seg, volume, ref_img, vertebrae)
    ours = _on_reference_grid(volume, seg.bodies, ref_img)
    for vid in LUMBAR_REQUIRED:
        assert found.get(vid) == V2_ID[vid]
        a, b = ours == vid, (vertebrae == V2_ID[vid]) & (body == 1)
        assert 2.0 * (a & b).sum() / (a.sum() + b.sum()) >= 0.80


def test_thoracic_crop_is_not_evaluable():
    volume = Volume.from_sitk(sitk.ReadImage(str(require_data(CTA / "ct_cropped.nii.gz"))))
    seg = segment_spine(volume)
    assert seg.not_evaluable_reason
    assert not any(vid in seg.confidence for vid in LUMBAR_REQUIRED)
    assert not np.isin(seg.bodies, LUMBAR_REQUIRED).any()


def test_jpeg2000_series_is_not_evaluable(j2k_series):
    series = load_series(j2k_series)
    seg = segment_spine(series.volume)
    assert seg.not_evaluable_reason
    assert "L1" not in seg.not_evaluable_reason or "not in the field of view" in seg.not_evaluable_reason
    assert not np.isin(seg.bodies, LUMBAR_REQUIRED).any()
    assert seg.bodies.shape == series.volume.shape


def _synthetic_column(n_vertebrae: int = 5, ribs_on: int | None = None) -> Volume:
    """A 2 mm CT of a straight column of vertebrae with discs and no pelvis.

    ``ribs_on``: index (0 = lowest) of the lowest vertebra carrying a pair of ribs;
    every vertebra above it carries ribs too. ``None``: no ribs.
    """
    g = 2.0
    nz, ny, nx = int(np.ceil((30 + n_vertebrae * 38) / g)), 120, 120
    z, y, x = np.meshgrid(np.arange(nz) * g, np.arange(ny) * g, np.arange(nx) * g, indexing="ij")
    hu = np.full((nz, ny, nx), -1000.0, np.float32)
    patient = ((x - 120) / 110) ** 2 + ((y - 120) / 90) ** 2 <= 1
    hu[patient] = 40.0
    cy, cx = 100.0, 120.0  # body centre (y increases anterior in this synthetic frame)
    period, height = 38.0, 28.0
    for k in range(n_vertebrae):
        z0 = 10.0 + k * period
        zin = (z >= z0) & (z < z0 + height)
        outer = ((x - cx) / 22) ** 2 + ((y - cy) / 16) ** 2 <= 1
        inner = ((x - cx) / 19.5) ** 2 + ((y - cy) / 13.5) ** 2 <= 1
        hu[zin & outer] = 400.0
        hu[zin & inner & (z >= z0 + 2) & (z < z0 + height - 2)] = 160.0
        # neural arch: bone ring around a 16 mm canal behind the body
        ring = ((x - cx) ** 2 + (y - (cy - 28)) ** 2 <= 14 ** 2) & ((x - cx) ** 2 + (y - (cy - 28)) ** 2 > 8 ** 2)
        hu[zin & ring & (z < z0 + 18)] = 500.0
        disc = (z >= z0 + height) & (z < z0 + period) & outer
        hu[disc] = 80.0
        if ribs_on is not None and k >= ribs_on:
            for side in (-1.0, 1.0):
                start = np.array([z0 + 20.0, cy - 12.0, cx + side * 22.0])
                end = np.array([z0 - 5.0, cy - 25.0, cx + side * 95.0])
                d = end - start
                t = np.clip(((z - start[0]) * d[0] + (y - start[1]) * d[1] + (x - start[2]) * d[2]) / (d @ d), 0, 1)
                dist2 = (z - start[0] - t * d[0]) ** 2 + (y - start[1] - t * d[1]) ** 2 + (x - start[2] - t * d[2]) ** 2
                hu[(dist2 <= 4.5 ** 2) & patient] = 450.0
    canal = (x - cx) ** 2 + (y - (cy - 28)) ** 2 <= 8 ** 2
    hu[canal & patient] = 10.0
    # LPS affine: z superior, y anterior (-P), x left -> array axes (S, A, L)
    affine = np.eye(4)
    affine[:3, 0] = [0, 0, g]
    affine[:3, 1] = [0, -g, 0]
    affine[:3, 2] = [g, 0, 0]
    return Volume(hu=hu, affine=affine)


def test_synthetic_column_without_anchors_is_not_evaluable():
    seg = segment_spine(_synthetic_column())
    assert seg.not_evaluable_reason is not None
    assert "neither the sacrum nor the lowest rib-bearing vertebra" in seg.not_evaluable_reason
    assert seg.confidence == {}
    assert not seg.bodies.any() and not seg.trabecular.any()


def test_synthetic_column_with_ribs_counts_from_t12():
    # six vertebrae, ribs on the top two: the upper rib-bearing one is T11, the lower T12,
    # then L1..L4 below; no sacrum, so the T12 anchor alone names the levels
    seg = segment_spine(_synthetic_column(6, ribs_on=4))
    assert "T12" in seg.method
    names = {VERTEBRA_IDS[n] for n in ("T12", "L1", "L2", "L3")}
    assert names <= set(seg.confidence)
    assert all(0.3 <= seg.confidence[v] <= 0.7 for v in seg.confidence)
    # the lowest vertebra (L4) is cut by the field of view -> L1-L4 not all complete
    assert seg.not_evaluable_reason is not None and "L1-L4" in seg.not_evaluable_reason
    # T12 is the 5th vertebra from the bottom: its centroid is at ~ 10 + 4 * 38 + 14 mm
    zc = ndi.center_of_mass(seg.bodies == VERTEBRA_IDS["T12"])[0] * 2.0
    assert abs(zc - (10 + 4 * 38 + 14)) < 8.0


def test_empty_volume_is_not_evaluable():
    hu = np.full((40, 64, 64), -1000.0, np.float32)
    seg = segment_spine(Volume(hu=hu, affine=np.diag([2.5, 2.5, 2.5, 1.0])))
    assert seg.not_evaluable_reason
    assert seg.bodies.shape == hu.shape and not seg.bodies.any()


def test_non_3d_volume_raises():
    with pytest.raises(ValueError):
        segment_spine(Volume(hu=np.zeros((4, 4), np.float32), affine=np.eye(4)))


def test_canonical_frame_round_trip():
    rng = np.random.default_rng(1)
    arr = rng.normal(size=(5, 6, 7)).astype(np.float32)
    # axes: z -> posterior, y -> inferior, x -> right (a feet-first sagittal-like layout)
    affine = np.eye(4)
    affine[:3, 0] = [0, 1.5, 0]
    affine[:3, 1] = [0, 0, -0.7]
    affine[:3, 2] = [-0.7, 0, 0]
    frame = CanonicalFrame.from_volume(Volume(hu=arr, affine=affine))
    canon = frame.to_canonical(arr)
    assert canon.shape == (6, 5, 7)
    np.testing.assert_allclose(frame.spacing, [0.7, 1.5, 0.7])
    # canonical axes: superior = native y reversed, anterior = native z reversed,
    # left = native x reversed
    np.testing.assert_array_equal(canon[:, 0, 0], arr[-1, ::-1, -1])
    np.testing.assert_array_equal(canon[0, :, 0], arr[::-1, -1, -1])
    np.testing.assert_array_equal(frame.to_native(canon), arr)
