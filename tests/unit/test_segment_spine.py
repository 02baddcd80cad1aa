"""Tests of the built-in vertebra segmentation and level labelling.

Real data: ../shared/data/ct (TotalSegmentator test files, Apache-2.0). The
TotalSegmentator masks are model output and are used here only to measure.
Our labels are compared on the reference grid after resampling them by
physical coordinates (nearest neighbour), never by raw array indexing; the
variants and the measures are those of ``bench/segmentation.py``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from bench.segmentation import (
    LUMBAR,
    NOISE_HU,
    crop_below,
    dice,
    evaluate,
    example_image,
    grade_label_map,
    noisy,
    on_reference_grid,
    reference_bodies,
    reversed_axes,
    thin,
)
from osteonode.anatomy import VERTEBRA_IDS
from osteonode.measure.genant import grade_levels
from osteonode.segment import FemurSegmentation, SpineSegmentation
from osteonode.segment.body import _star_fill
from osteonode.segment.column import (
    FLAT_DISC_HALF_MM,
    MIN_NOTCH_HU,
    PROFILE_TILTS_DEG,
    DiscCandidates,
    _beside_foramina,
    _foramina,
    _lowest_tilt,
    ambiguous_fracture_discs,
    below_lowest_rib,
    choose_discs,
    disc_chain,
    foramen_depth,
    is_short_segment,
    partial_end_slices,
    without_focal_dense,
)
from osteonode.segment.frame import COARSE_MM, CanonicalFrame, canonical_view
from osteonode.segment.levels import (
    UNCERTAIN_CONFIDENCE,
    caudal_anchor,
    name_levels,
    open_segment_extent,
    reference_height,
    rib_levels,
    rib_segment,
    ribs_observable,
    unexplained_spacing_jump,
)
from osteonode.segment.roi import trabecular_roi
from osteonode.segment.spine import DISC_TILT_DEADBAND_DEG, _ColumnPlanes, segment_spine
from osteonode.volume import Volume, load_series
from tests.conftest import DATA, require_data

ABDOMEN = DATA / "totalseg-example-abdomen"
CTA = DATA / "totalseg-thoracic-cta-crop"
#: Target of issue 3: every L1-L4 body at Dice >= 0.85 against the reference body.
MIN_DICE_L1_L4 = 0.85
#: T12 is cut by the field of view; L5 is tilted: looser floor.
MIN_DICE_T12_L5 = 0.70


@pytest.fixture(scope="module")
def seg(volume) -> SpineSegmentation:
    return segment_spine(volume)


def _no_femurs(volume: Volume) -> FemurSegmentation:
    return FemurSegmentation(labels=np.zeros(volume.shape, np.uint8))


def test_real_ct_levels_are_correct(refs, volume, seg):
    result = evaluate(volume, seg, _no_femurs(volume), refs)
    assert seg.not_evaluable_reason is None
    assert "sacrum" in seg.method and "T12" in seg.method and "agree" in seg.method
    assert result["levels"] == {name: "ok" for name in ("T12", "L1", "L2", "L3", "L4", "L5")}
    for vid in LUMBAR:  # both anchors seen and agreeing
        assert seg.confidence[vid] >= 0.85
    assert seg.bodies.shape == volume.shape and seg.bodies.dtype == np.uint8


def test_real_ct_bodies_do_not_depend_on_the_threads(volume, seg, monkeypatch):
    monkeypatch.setattr("osteonode.segment.spine.SEGMENTATION_THREADS", 1)
    one_thread = segment_spine(volume)
    for name in ("bodies", "trabecular", "whole"):
        np.testing.assert_array_equal(getattr(one_thread, name), getattr(seg, name))
    assert one_thread.confidence == seg.confidence


def test_real_ct_body_dice(refs, volume, seg):
    result = evaluate(volume, seg, _no_femurs(volume), refs)
    for name in ("L1", "L2", "L3", "L4"):
        assert result["dice"][name] >= MIN_DICE_L1_L4, result["dice"]
    ours = on_reference_grid(volume, seg.bodies, refs)
    for name, rid in (("T12", 32), ("L5", 27)):
        ref = (refs.vertebrae == rid) & (refs.body == 1)
        assert dice(ours == VERTEBRA_IDS[name], ref) >= MIN_DICE_T12_L5


def test_real_ct_bodies_exclude_posterior_elements_and_discs(refs, volume, seg):
    ours = on_reference_grid(volume, seg.bodies, refs) > 0
    arch = (refs.vertebrae > 0) & (refs.body == 0)
    disc = refs.body == 2
    assert (ours & arch).sum() / ours.sum() < 0.03
    assert (ours & disc).sum() / ours.sum() < 0.08


def test_real_ct_whole_vertebrae(refs, volume, seg):
    # whole vertebra = body + posterior elements; measured Dice vs the reference 0.75-0.77 (L1-L4)
    assert np.all(seg.whole[seg.bodies > 0] == seg.bodies[seg.bodies > 0])
    ours = on_reference_grid(volume, seg.whole, refs)
    for name, rid in (("L1", 31), ("L2", 30), ("L3", 29), ("L4", 28)):
        vid = VERTEBRA_IDS[name]
        assert dice(ours == vid, refs.vertebrae == rid) >= 0.70
        # the arch adds at least a fifth to the body (the reference: 40 %)
        assert (seg.whole == vid).sum() >= 1.2 * (seg.bodies == vid).sum()


def test_real_ct_trabecular_roi(volume, seg):
    voxel_cm3 = float(np.prod(volume.spacing)) / 1000.0
    for vid in LUMBAR:
        roi = seg.trabecular == vid
        body = seg.bodies == vid
        assert roi.sum() * voxel_cm3 >= 1.0, f"ROI of {vid} too small"
        assert np.all(body[roi]), "ROI leaves its body"
        dist = ndi.distance_transform_edt(np.pad(body, 1), sampling=volume.spacing)[1:-1, 1:-1, 1:-1]
        assert dist[roi].min() >= 3.0  # clear of the cortex and the endplates
        mean_hu = float(volume.hu[roi].mean())
        assert 50.0 < mean_hu < 300.0, mean_hu  # adult trabecular bone
        assert mean_hu < float(volume.hu[body].mean())  # the body includes the cortical shell


def test_real_ct_l1_middle_height_is_the_reference_body_s(refs, volume, seg):
    # L1 holds a dense focus (400-580 HU on the sagittal planes) 5-11 mm below its superior endplate; its
    # flank was taken for the endplate on three of the five planes: middle height 24.5 mm, loss 0.176 (four
    # points from grade 1, so that every darker copy of L1 was graded at Genant's limit)
    reference = grade_label_map(volume, reference_bodies(volume, refs))["L1"]
    ours = grade_levels(volume, seg)["L1"]
    assert abs(ours.height_middle_mm - reference.height_middle_mm) <= 1.0
    assert ours.height_loss < 0.16


@pytest.mark.parametrize("variant", ["feet_first", "thin", "crop_L4", "noise35"])
def test_variants_levels_and_dice(refs, volume, variant):
    """Issue 3 targets on each variant: no level wrong with confidence, L1-L4 bodies at Dice >= 0.85."""
    moved = {"feet_first": lambda: reversed_axes(volume, (0, 2)),
             "thin": lambda: thin(example_image()),
             "crop_L4": lambda: crop_below(volume, refs),
             "noise35": lambda: noisy(volume, NOISE_HU, seed=0)}[variant]()
    seg = segment_spine(moved)
    result = evaluate(moved, seg, _no_femurs(moved), refs)
    assert seg.not_evaluable_reason is None, seg.not_evaluable_reason
    assert all(state in ("ok", "uncertain") for state in result["levels"].values()), result["levels"]
    assert all(result["levels"].get(n) == "ok" for n in ("L1", "L2", "L3", "L4")), result["levels"]
    for name in ("L1", "L2", "L3", "L4"):
        assert result["dice"][name] >= MIN_DICE_L1_L4, (variant, result["dice"])
    if variant == "crop_L4":  # no sacrum: named from the T12 ribs alone, with a lower confidence
        assert "sacrum" not in seg.method.split(",")[0] and "T12" in seg.method
        assert all(seg.confidence[v] <= 0.7 for v in LUMBAR)


def test_feet_first_labels_the_same_voxels(refs, volume, seg):
    flipped = reversed_axes(volume, (0, 2))
    other = segment_spine(flipped)
    assert set(other.confidence) == set(seg.confidence)
    back = on_reference_grid(flipped, other.bodies, refs)
    orig = on_reference_grid(volume, seg.bodies, refs)
    for vid in LUMBAR:
        assert dice(back == vid, orig == vid) > 0.95


@pytest.mark.integration
def test_thoracic_crop_is_not_evaluable():
    volume = Volume.from_sitk(sitk.ReadImage(str(require_data(CTA / "ct_cropped.nii.gz"))))
    seg = segment_spine(volume)
    assert seg.not_evaluable_reason
    assert not any(vid in seg.confidence for vid in LUMBAR)
    assert not np.isin(seg.bodies, LUMBAR).any()


def test_jpeg2000_series_is_not_evaluable(j2k_series):
    series = load_series(j2k_series)
    seg = segment_spine(series.volume)
    assert seg.not_evaluable_reason
    assert not np.isin(seg.bodies, LUMBAR).any()
    assert seg.bodies.shape == series.volume.shape


# ------------------------------------------------------------------ synthetic


def _synthetic_column(n_vertebrae: int = 5, ribs_on: int | None = None, crest: bool = False) -> Volume:
    """A 2 mm CT of a straight column of vertebrae with discs and no pelvis.

    ``ribs_on``: index (0 = lowest) of the lowest vertebra carrying a pair of ribs;
    every vertebra above it carries ribs too. ``None``: no ribs. ``crest``: a pair
    of plates 24-100 mm lateral, rising from the bottom of the field of view like
    iliac crests (joined to transverse processes) cut by it.
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
        ring = ((x - cx) ** 2 + (y - (cy - 28)) ** 2 <= 14 ** 2) & ((x - cx) ** 2 + (y - (cy - 28)) ** 2 > 8 ** 2)
        hu[zin & ring & (z < z0 + 18)] = 500.0
        hu[(z >= z0 + height) & (z < z0 + period) & outer] = 80.0
        if ribs_on is not None and k >= ribs_on:
            for side in (-1.0, 1.0):
                start = np.array([z0 + 20.0, cy - 12.0, cx + side * 22.0])
                end = np.array([z0 - 5.0, cy - 25.0, cx + side * 95.0])
                d = end - start
                t = np.clip(((z - start[0]) * d[0] + (y - start[1]) * d[1] + (x - start[2]) * d[2]) / (d @ d), 0, 1)
                dist2 = (z - start[0] - t * d[0]) ** 2 + (y - start[1] - t * d[1]) ** 2 + (x - start[2] - t * d[2]) ** 2
                hu[(dist2 <= 4.5 ** 2) & patient] = 450.0
    if crest:
        for side in (-1.0, 1.0):
            plate = (np.abs(x - cx - side * 62.0) <= 38.0) & (np.abs(y - cy + 20.0) <= 4.0) & (z < 30.0)
            hu[plate & patient] = 450.0
    hu[((x - cx) ** 2 + (y - (cy - 28)) ** 2 <= 8 ** 2) & patient] = 10.0  # canal
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


def test_synthetic_iliac_crests_cut_by_the_field_of_view_are_not_ribs():
    # ribs on the top two of six vertebrae, and crest-like plates beside the lowest one,
    # with the field of view starting at that vertebra's lower endplate: the plates are
    # cut by it, so they do not count as ribs, and T12 is still the fifth vertebra
    column = _synthetic_column(6, ribs_on=4, crest=True)
    affine = column.affine.copy()
    affine[:3, 3] += column.affine[:3, 0] * 5
    seg = segment_spine(Volume(hu=column.hu[5:].copy(), affine=affine))
    assert "T12" in seg.method
    assert seg.not_evaluable_reason is None
    zc = ndi.center_of_mass(seg.bodies == VERTEBRA_IDS["L4"])[0] * 2.0 + 10.0
    assert abs(zc - (10 + 14)) < 8.0


def test_synthetic_column_with_ribs_counts_from_t12():
    # six vertebrae, ribs on the top two: the upper rib-bearing one is T11, the lower T12,
    # then L1..L4 below; no sacrum, so the T12 anchor alone names the levels
    seg = segment_spine(_synthetic_column(6, ribs_on=4))
    assert "T12" in seg.method
    assert {VERTEBRA_IDS[n] for n in ("T12", "L1", "L2", "L3", "L4")} <= set(seg.confidence)
    assert all(0.3 <= seg.confidence[v] <= 0.7 for v in seg.confidence)
    # L4 lacks the disc below it, but its whole body (28 mm, as tall as L3's) is in view
    assert seg.confidence[VERTEBRA_IDS["L4"]] == seg.confidence[VERTEBRA_IDS["L3"]]
    assert seg.not_evaluable_reason is None
    # T12 is the 5th vertebra from the bottom: its centroid is at ~ 10 + 4 * 38 + 14 mm
    zc = ndi.center_of_mass(seg.bodies == VERTEBRA_IDS["T12"])[0] * 2.0
    assert abs(zc - (10 + 4 * 38 + 14)) < 8.0


def test_synthetic_body_cut_by_the_field_of_view_is_incomplete():
    column = _synthetic_column(6, ribs_on=4)
    cut = 12  # slices (24 mm): the field of view now starts 14 mm into the lowest body (L4)
    affine = column.affine.copy()
    affine[:3, 3] += column.affine[:3, 0] * cut
    seg = segment_spine(Volume(hu=column.hu[cut:].copy(), affine=affine))
    l4 = VERTEBRA_IDS["L4"]
    assert l4 in seg.confidence and seg.confidence[l4] < seg.confidence[VERTEBRA_IDS["L3"]]
    assert seg.not_evaluable_reason is not None and "L4" in seg.not_evaluable_reason


def test_synthetic_outline_is_blur_invariant():
    # noise of SD 35 HU widens the smoothing Gaussian (0 -> 1.1 mm on this 2 mm grid); the bodies
    # (400 HU shell and endplates, 160 HU core, 80 HU discs) must keep their outline and their ROI.
    # Thresholded without clipping the shell, they grew by 18-24 % and the ROI moved by up to +7 HU.
    column = _synthetic_column(6, ribs_on=4)
    clean = segment_spine(column)
    rng = np.random.default_rng(1)
    noisy = segment_spine(Volume(hu=(column.hu + rng.normal(0.0, 35.0, column.shape)).astype(np.float32),
                                 affine=column.affine))
    for name in ("L1", "L2", "L3"):
        vid = VERTEBRA_IDS[name]
        assert (noisy.bodies == vid).sum() == pytest.approx((clean.bodies == vid).sum(), rel=0.05), name
        shift = column.hu[noisy.trabecular == vid].mean() - column.hu[clean.trabecular == vid].mean()
        assert abs(shift) <= 3.0, (name, shift)


def test_noise_estimate_and_smoothing():
    rng = np.random.default_rng(3)
    hu = np.full((40, 64, 64), 40.0, np.float32) + rng.normal(0.0, 35.0, (40, 64, 64)).astype(np.float32)
    view = canonical_view(Volume(hu=hu, affine=np.diag([3.0, 1.0, 1.0, 1.0])))
    assert 28.0 < view.noise_hu < 40.0  # the soft-tissue window clips the widest differences
    sigma = view.smoothing_mm()
    assert sigma[0] > 0.0 and np.all(sigma[1:] >= 0.8)  # noisy: smoothed; 1 mm pixels: at least 0.8 mm
    clean = canonical_view(Volume(hu=np.full((40, 64, 64), 40.0, np.float32), affine=np.diag([3.0, 3.0, 3.0, 1])))
    np.testing.assert_array_equal(clean.smoothing_mm(), 0.0)


def test_trabecular_roi_rule_on_a_box():
    # a 40 x 30 x 24 mm (left-right, anterior-posterior, height) box body on a 1 mm grid
    body = np.zeros((40, 50, 60), bool)
    body[8:32, 10:40, 10:50] = True
    coords = tuple(np.arange(n, dtype=float) for n in body.shape)
    roi = trabecular_roi(body, coords, np.ones(3), np.array([1.0, 0.0, 0.0]))
    s, a, lr = np.nonzero(roi)
    assert roi.any() and np.all(body[roi])
    assert sorted(set(s)) == list(range(14, 26))  # 12 mm slab [13.5, 25.5) about mid-height 19.5
    # the equivalent ellipse of the section: centre 24.5 / 29.5, semi-axes 2 SD of 30 and 40 voxels
    half_a, half_l = 2 * np.sqrt((30**2 - 1) / 12), 2 * np.sqrt((40**2 - 1) / 12)
    posterior = 24.5 - half_a + 0.25 * 2 * half_a
    assert a.min() >= posterior - 0.5  # not in the posterior quarter of its depth
    dist = ndi.distance_transform_edt(body)
    assert dist[roi].min() >= 4.0  # clear of every surface
    # inside the ellipse 5 mm within the equivalent ellipse's anterior and lateral ends
    anterior = 24.5 + half_a - 5.0
    inside = ((a - 0.5 * (anterior + posterior)) / (0.5 * (anterior - posterior))) ** 2 \
        + ((lr - 29.5) / (half_l - 5.0)) ** 2
    assert np.all(inside <= 1.0 + 1e-9)


def test_trabecular_roi_ignores_a_dark_core_and_follows_the_discs():
    # the same box with its trabecular core out of the mask (an osteoporotic body whose
    # threshold outline missed it): the same ellipse, as it depends on the outline only
    body = np.zeros((40, 50, 60), bool)
    body[8:32, 10:40, 10:50] = True
    coords = tuple(np.arange(n, dtype=float) for n in body.shape)
    axis = np.array([1.0, 0.0, 0.0])
    full = trabecular_roi(body, coords, np.ones(3), axis)
    hollow = body.copy()
    hollow[10:30, 14:36, 16:44] = False
    np.testing.assert_array_equal(trabecular_roi(hollow, coords, np.ones(3), axis), full & hollow)
    # the slab is centred midway between the disc centres (4 mm below, 8 mm above the body)
    discs = (8 - 4.0, 31 + 8.0)
    roi = trabecular_roi(body, coords, np.ones(3), axis, discs)
    assert sorted(set(np.nonzero(roi)[0])) == list(range(16, 28))  # [15.5, 27.5)


def test_trabecular_roi_keeps_its_slices_when_the_discs_move():
    # 3 mm slices: the 12 mm slab is 4 slices wherever the disc midpoint falls between slices
    # (a slab set from the disc spacing had 4 or 5, and a voxel count jumping by 20-25 %)
    body = np.zeros((12, 50, 60), bool)
    body[1:11, 10:40, 10:50] = True
    coords = (np.arange(12) * 3.0, np.arange(50, dtype=float), np.arange(60, dtype=float))
    spacing, axis = np.array([3.0, 1.0, 1.0]), np.array([1.0, 0.0, 0.0])
    counts = set()
    for shift in np.arange(0.0, 3.0, 0.25):
        roi = trabecular_roi(body, coords, spacing, axis, (-1.0 + shift, 34.0 + shift))
        assert len(set(np.nonzero(roi)[0])) == 4
        counts.add(int(roi.sum()))
    assert len(counts) == 1


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
    affine[:3, 3] = [10.0, 20.0, 30.0]
    volume = Volume(hu=arr, affine=affine)
    frame = CanonicalFrame.from_volume(volume)
    canon = frame.to_canonical(arr)
    assert canon.shape == (6, 5, 7)
    np.testing.assert_allclose(frame.spacing, [0.7, 1.5, 0.7])
    # canonical axes: superior = native y reversed, anterior = native z reversed,
    # left = native x reversed
    np.testing.assert_array_equal(canon[:, 0, 0], arr[-1, ::-1, -1])
    np.testing.assert_array_equal(canon[0, :, 0], arr[::-1, -1, -1])
    np.testing.assert_array_equal(frame.to_native(canon), arr)
    # canonical index (1, 2, 3) is native (z, y, x) = (4 - 2, 5 - 1, 6 - 3)
    lps = frame.canonical_mm_to_lps(np.array([1, 2, 3]) * frame.spacing, volume)
    np.testing.assert_allclose(lps, affine[:3, :3] @ [2, 4, 3] + affine[:3, 3])


# ------------------------------------------------------------------ disc chain (level naming input)

def _pedicles(discs: list[int], ns: int = 80) -> np.ndarray:
    """A pedicle profile on 2 mm slices: 500 HU at the pedicles, 150 HU at the foramina at the discs."""
    out = np.full(ns, 500.0)
    for z in discs:
        out[z:z + 3] = 150.0  # the foramen: at the disc and just above it
    return out


def test_foramen_depth_is_deep_at_discs_and_none_without_pedicles():
    pedicles = _pedicles([10, 27, 44, 61])
    assert foramen_depth(pedicles, 27) == pytest.approx(0.7)
    assert foramen_depth(pedicles, 35) == 0.0  # mid-body: the pedicles
    assert foramen_depth(np.full(80, 200.0), 27) is None  # no bone beside the canal: no evidence


def test_foramina_mark_the_discs_whatever_the_bodies():
    pedicles = _pedicles([10, 27, 44, 61])
    valid = np.ones(80, bool)
    assert _foramina(pedicles, valid) == [10, 27, 44, 61]  # the first slice of each 3-slice foramen
    # a shallower dip 6 mm above a foramen (noise, a pedicle's own waist) is the same foramen
    noisy = pedicles.copy()
    noisy[31] = 200.0
    assert _foramina(noisy, valid) == [10, 27, 44, 61]
    # a dip of a quarter of the pedicles' HU is no foramen (FORAMEN_FRACTION: 0.4)
    shallow = pedicles.copy()
    shallow[44:47] = 375.0
    assert _foramina(shallow, valid) == [10, 27, 61]
    # only where the column is confirmed; without pedicles in view, none
    valid[40:] = False
    assert _foramina(pedicles, valid) == [10, 27]
    assert _foramina(np.full(80, 200.0), np.ones(80, bool)) == []


def test_a_mid_body_candidate_loses_to_a_disc_at_a_foramen():
    pedicles = _pedicles([10, 27, 44, 61])
    # a dark body's mid-height dip at 36, at its pedicles, 8 slices (16 mm) below the disc at 44
    assert _beside_foramina([10, 27, 36, 44, 61], pedicles) == [10, 27, 44, 61]
    # alone (no candidate at a foramen within 16 mm) it stays: the chain decides
    assert _beside_foramina([10, 36, 61], pedicles) == [10, 36, 61]
    # a shallow foramen (the lumbosacral junction: sacral ala beside the canal) with no deeper neighbour stays
    shallow = pedicles.copy()
    shallow[10:13] = 400.0
    assert _beside_foramina([10, 27], shallow) == [10, 27]
    # no pedicles in view: nothing is dropped
    assert _beside_foramina([27, 36], np.full(80, 200.0)) == [27, 36]


def test_without_focal_dense_fills_a_bone_island_and_keeps_plates():
    # 2 mm grid: a body of 40 HU with a 900 HU island 12 mm across and a 700 HU endplate 40 mm wide
    coarse = np.full((30, 30, 30), 40.0, np.float32)
    coarse[10:16, 10:16, 10:16] = 900.0
    coarse[24, 5:25, 5:25] = 700.0
    out = without_focal_dense(coarse)
    np.testing.assert_array_equal(out[10:16, 10:16, 10:16], 40.0)
    np.testing.assert_array_equal(out[24], coarse[24])  # the plate is no focus
    assert coarse[12, 12, 12] == 900.0  # the input is left alone
    np.testing.assert_array_equal(without_focal_dense(coarse[20:]), coarse[20:])


def test_rib_levels_drops_a_rib_merged_with_a_transverse_process():
    # 2 mm coarse grid, column centre at (a, l) = (40, 60); a rib 24-90 mm to the left, 18 mm thick
    coarse = np.full((100, 80, 120), -100.0, np.float32)
    path = np.tile([40.0, 60.0], (100, 1))
    coarse[46:55, 35:41, 72:106] = 800.0
    assert rib_levels(coarse, path) == [pytest.approx(50.0)]
    # the same rib joined to a transverse process reaching 50 mm below it: its medial end cannot be told
    coarse[20:55, 35:41, 72:76] = 800.0
    assert rib_levels(coarse, path) == []


def test_disc_chain_keeps_regular_discs_and_drops_mid_body_dips():
    """Discs 36 mm apart with a deeper mid-body dip between two of them: the regular chain wins."""
    positions = [0.0, 36.0, 54.0, 72.0, 108.0, 144.0]
    depths = [60.0, 60.0, 70.0, 60.0, 60.0, 60.0]  # 54 mm: an osteoporotic body's mid-height dip
    assert disc_chain(positions, depths) == [0, 1, 3, 4, 5]


def test_disc_chain_follows_slowly_changing_spacing():
    """Segments grow caudally (T12 ~32 mm to L5 ~40 mm): a chain of slowly changing spacing is kept whole."""
    positions = [0.0, 40.0, 78.0, 114.0, 148.0, 180.0]
    assert disc_chain(positions, [50.0] * 6) == [0, 1, 2, 3, 4, 5]


def test_lowest_tilt_refined_between_sampled_tilts():
    """The disc plane's tilt: the sampled tilt of the lowest percentile, refined by a parabola through its
    neighbours."""
    tilts = np.asarray(PROFILE_TILTS_DEG)
    true = np.array([0.0, 13.0, -7.5, 20.0])
    planes = (tilts[:, None] - true[None, :]) ** 2 + 100.0  # a parabola in the tilt, lowest at the true tilt
    assert _lowest_tilt(planes) == pytest.approx(true, abs=1e-6)
    flat = np.full((tilts.size, 1), 100.0)  # no preference (inside a body): no refinement, a sampled tilt
    assert _lowest_tilt(flat)[0] in tilts


def test_star_fill_closes_a_wide_gap_in_the_cortex():
    """A ring (radius 15 mm, 1 mm grid) missing a quarter -- wider than any hole filling bridges -- is filled."""
    coords = tuple(np.arange(n, dtype=float) for n in (3, 41, 41))
    a, lr = np.meshgrid(coords[1] - 20.0, coords[2] - 20.0, indexing="ij")
    r, angle = np.hypot(a, lr), np.degrees(np.arctan2(lr, a))
    ring = (np.abs(r - 15.0) <= 0.8) & ~((angle > 0.0) & (angle < 90.0))
    shell = np.zeros((3, 41, 41), bool)
    shell[1] = ring
    filled = _star_fill(shell, coords, np.array([1.0, 20.0, 20.0]))
    assert not filled[0].any() and not filled[2].any()  # planes without shell stay empty
    assert filled[1][r <= 14.0].all() and not filled[1][r >= 17.0].any()


def test_star_fill_takes_a_faint_plane_s_radius_from_the_planes_above_and_below():
    """A cortex barely seen on one plane (a thin waist at 3 mm) is filled from its neighbours, not left empty.

    Planes 1 and 3 hold the full ring (radius 12 and 14 mm); plane 2 shows two
    short arcs only (fewer than a third of the sectors), so on its own it would
    stay empty. Each unseen sector takes the mean of its neighbours' radii (13
    mm); beyond the outermost planes with shell nothing is extrapolated.
    """
    coords = tuple(np.arange(n, dtype=float) for n in (5, 41, 41))
    a, lr = np.meshgrid(coords[1] - 20.0, coords[2] - 20.0, indexing="ij")
    r, angle = np.hypot(a, lr), np.degrees(np.arctan2(lr, a))
    shell = np.zeros((5, 41, 41), bool)
    shell[1] = np.abs(r - 12.0) <= 0.8
    shell[3] = np.abs(r - 14.0) <= 0.8
    shell[2] = (np.abs(r - 13.0) <= 0.8) & (np.abs(angle) < 30.0)
    filled = _star_fill(shell, coords, np.array([2.0, 20.0, 20.0]))
    assert not filled[0].any() and not filled[4].any()
    assert filled[2][r <= 12.0].all() and not filled[2][r >= 14.5].any()


def test_ribs_observable_needs_the_field_of_view_beside_the_column():
    path = np.column_stack([np.full(20, 30.0), np.full(20, 50.0)])  # (a, l) coarse indices, 2 mm
    assert ribs_observable(path, 101, 2.0, 12.0, 2.0)  # 100 mm either side of the centreline
    assert not ribs_observable(path, 80, 2.0, 12.0, 2.0)  # 58 mm on the left: a rib reaching 60 mm is cut


def test_disc_chain_edge_cases():
    assert disc_chain([], []) == []
    assert disc_chain([10.0], [30.0]) == [0]
    assert disc_chain([0.0, 10.0], [30.0, 50.0]) == [1]  # 10 mm apart: not two discs
    with pytest.raises(ValueError):
        disc_chain([0.0, 1.0], [1.0])
    with pytest.raises(ValueError):
        disc_chain([5.0, 1.0], [1.0, 1.0])


# ------------------------------------------------------------------ fractured vertebrae (pure)

#: Disc positions (mm along the column) of the sacrum's top, L5/S1 ... T12/L1 with L3 crushed by
#: about 45 %: its segment (disc to disc) is 21 mm between segments of 34-37 mm.
CRUSHED_L3 = [0.0, 37.0, 71.0, 92.0, 128.0, 164.0]


def test_disc_chain_keeps_the_short_segment_of_a_crushed_vertebra():
    """A crushed body's short segment, bounded by a weak disc, beats a spurious dip in its middle.

    The candidates of the example CT with L3 crushed by 45 %: the dip at the
    crushed body's mid-height (82 mm, 42 HU) would make two long segments of
    45 and 46 mm; the weak disc above the crushed body (92 mm, 38 HU) makes one
    short segment (0.6 of its neighbours) instead, and the levels count right.
    """
    positions = [0.0, 37.0, 71.0, 82.0, 92.0, 128.0, 164.0]
    depths = [90.0, 145.0, 76.0, 42.0, 38.0, 84.0, 51.0]
    chosen = disc_chain(positions, depths)
    assert [positions[i] for i in chosen] == CRUSHED_L3
    # segments above the discs: sacrum, L5, L4, L3 (short), L2, L1, T12 -- the anchors agree
    labels, conf, _ = name_levels(len(chosen) + 1, 0, len(chosen))
    assert [labels[i] for i in range(len(chosen) + 1)] == [26, 24, 23, 22, 21, 20, 19]
    assert conf == 0.9


def test_disc_chain_does_not_split_low_density_bodies_into_short_segments():
    """Mid-body dips of osteoporotic bodies (half a segment from the discs) never pass for fractures.

    The candidates of the example CT with every core at -120 HU: the dips
    of L3 and L2 (231 and 266 mm) are deeper than the L2/L3 disc (249 mm);
    taking them would need short segments of about half a segment, or two
    short segments one normal segment apart.
    """
    positions = [140.0, 177.0, 197.0, 213.0, 223.0, 231.0, 249.0, 266.0, 286.0, 320.0]
    depths = [90.0, 124.0, 40.0, 81.0, 24.0, 54.0, 65.0, 74.0, 46.0, 42.0]
    assert [positions[i] for i in disc_chain(positions, depths)] == [140.0, 177.0, 213.0, 249.0, 286.0, 320.0]
    # the same with a phase shift of half a segment: two dips around one disc
    positions = [0.0, 36.0, 54.0, 72.0, 90.0, 108.0, 144.0]
    depths = [60.0, 60.0, 75.0, 40.0, 75.0, 60.0, 60.0]
    assert disc_chain(positions, depths) == [0, 1, 3, 5, 6]


def test_disc_chain_extends_past_a_fractured_top_vertebra_only_when_the_column_goes_on():
    """At the cranial end a weak disc above a wedge-compressed body is taken when the view goes on past it."""
    positions = [0.0, 37.0, 71.0, 107.0, 143.0, 169.0]  # 26 mm: L1 wedge-compressed
    depths = [90.0, 145.0, 158.0, 121.0, 120.0, 26.0]
    assert disc_chain(positions, depths) == [0, 1, 2, 3, 4]  # without the field of view: the regular chain
    # 54 mm of column beyond the last regular disc: more than one vertebra, so a disc lies in it
    assert disc_chain(positions, depths, cranial_end_mm=197.0) == [0, 1, 2, 3, 4, 5]
    # 30 mm beyond: one vertebra, the open segment may be whole: nothing added
    assert disc_chain(positions, depths, cranial_end_mm=173.0) == [0, 1, 2, 3, 4]
    # 40 mm beyond (under one segment and a bit): the crushed body's disc, with 11 mm of the vertebra above
    # it in view, is taken (a crushed top vertebra would otherwise be an open segment of two vertebrae)
    assert disc_chain(positions, depths, cranial_end_mm=183.0) == [0, 1, 2, 3, 4, 5]
    # a mid-body dip (half a segment) is not a short segment at the end
    positions[-1] = 161.0
    assert disc_chain(positions, depths, cranial_end_mm=197.0) == [0, 1, 2, 3, 4]


def test_disc_chain_ends_at_a_crushed_top_vertebra_s_disc_not_at_a_weak_regular_notch():
    """The candidates of the example CT with L1 (the top vertebra in view) crushed by 45 %.

    Everything above L1 came down by 9 mm: the T12/L1 disc (314 mm, 58 HU)
    closes a short segment of 25 mm, and a weak notch inside T12 (324 mm,
    18 HU) lies at the regular spacing of 35 mm. The deeper disc wins: the
    crushed body must not take in its disc and the bottom of T12.
    """
    positions = [117.0, 140.0, 177.0, 211.0, 232.0, 252.0, 274.0, 289.0, 299.0, 314.0, 324.0]
    depths = [36.0, 90.0, 145.0, 162.0, 28.0, 121.0, 28.0, 112.0, 76.0, 58.0, 18.0]
    expected = [140.0, 177.0, 211.0, 252.0, 289.0, 314.0]
    assert [positions[i] for i in disc_chain(positions, depths)] == expected
    assert [positions[i] for i in disc_chain(positions, depths, cranial_end_mm=345.0)] == expected
    # a notch nearly as deep at the regular spacing keeps the regular chain
    depths[-1] = 40.0
    assert positions[disc_chain(positions, depths)[-1]] == 324.0
    # a mid-body dip (half a segment above the last disc) is no crushed body's disc
    positions[-2], depths[-1] = 307.0, 18.0
    assert positions[disc_chain(positions, depths)[-1]] == 324.0


def test_disc_chain_holds_the_discs_the_ribs_ask_for_below_them():
    """Crushed, dark vertebrae whose disc the best chain misses: the anchors ask for one more below the rib.

    Candidates of the example CT with every core at -60 HU and L2 crushed by
    30 % (the variant built from the bodies of the final pass along the
    neighbours' axis): the L1 mid-body dip (293.5 mm, 52 HU) outscores the
    crushed L2's upper disc (277.3 mm, 49 HU), and the regular chain holds a
    segment of two vertebrae, L2 and half of L1 (44 mm). The lowest rib lies at
    326.6 mm: six discs (L5/S1 to T12/L1) lie below it.
    """
    positions = [116.6, 140.1, 176.6, 211.0, 249.4, 277.3, 293.5, 310.8]
    depths = [35.8, 89.8, 146.1, 105.8, 77.7, 48.6, 52.5, 44.6]
    assert [positions[i] for i in disc_chain(positions, depths, 335.8)] == [140.1, 176.6, 211.0, 249.4, 293.5]
    chosen = disc_chain(positions, depths, 335.8, below=(326.6, 6))
    assert [positions[i] for i in chosen] == [140.1, 176.6, 211.0, 249.4, 277.3, 310.8]
    # every core at -100 HU and L1 crushed by 45 %: the T12/L1 disc lies 20 mm (0.55 of the spacing) above
    # L1/L2, under OPEN_SHORT_MIN, where a mid-body dip may lie; with a disc missing below the rib, the
    # extension takes it down to FRACTURE_SPACING[0]
    positions = [116.6, 140.1, 176.4, 210.6, 247.4, 285.8, 297.8, 305.8]
    depths = [35.8, 89.9, 153.3, 92.8, 69.7, 66.7, 48.9, 14.6]
    assert positions[disc_chain(positions, depths, 329.2)[-1]] == 285.8
    assert positions[disc_chain(positions, depths, 329.2, below=(319.1, 6))[-1]] == 305.8
    # ... but not above the rib, nor when the chain already holds the discs asked for
    assert positions[disc_chain(positions, depths, 329.2, below=(305.0, 6))[-1]] == 285.8
    assert positions[disc_chain(positions, depths, 329.2, below=(319.1, 5))[-1]] == 285.8
    # no chain can hold that many: the unconstrained one, extended as far as it goes
    assert [positions[i] for i in disc_chain(positions, depths, 329.2, below=(319.1, 9))] == \
        [140.1, 176.4, 210.6, 247.4, 285.8, 305.8]


def test_disc_chain_extends_past_a_crushed_vertebra_that_ends_the_regular_chain():
    """The candidates of the example CT with every core at -100 HU and L3 crushed by 30 %.

    The regular chain ends with the crushed L3's segment (26.8 mm after
    34.2 mm: taken as a normal one, there being nothing above it). The discs
    above (L1/L2 at 275.7, T12/L1 at 308.0 mm) are found at the spacing of
    the normal segments, not of the crushed one.
    """
    positions = [116.6, 140.1, 176.4, 210.6, 237.4, 275.7, 289.9, 308.0]
    depths = [36.0, 90.0, 153.0, 100.0, 23.0, 23.0, 46.0, 29.0]
    assert [positions[i] for i in disc_chain(positions, depths)] == [140.1, 176.4, 210.6, 237.4]
    chosen = disc_chain(positions, depths, cranial_end_mm=331.75)
    assert [positions[i] for i in chosen] == [140.1, 176.4, 210.6, 237.4, 275.7, 308.0]


def test_disc_chain_prefers_regular_discs_to_a_phase_shift_through_one_short_segment():
    """In a low-density spine the mid-body dips form a regular chain too, half a segment off the discs'.

    One short segment (0.65) would shift the chain onto the dips (the
    candidates of the example CT with every core at -80 HU and L2 wedged by
    45 %); the dips are a little deeper than the discs, but not by the cost
    of a fracture.
    """
    positions = [116.6, 140.1, 176.6, 197.0, 211.0, 233.3, 249.5, 266.0, 284.5, 296.6, 312.6]
    depths = [36.0, 90.0, 148.0, 38.0, 97.0, 49.0, 46.0, 58.0, 77.0, 59.0, 38.0]
    assert [positions[i] for i in disc_chain(positions, depths)] == [140.1, 176.6, 211.0, 249.5, 284.5, 312.6]


def test_unexplained_spacing_jump():
    assert unexplained_spacing_jump([37.0, 34.0, 40.0, 36.0, 34.0]) is None  # the example CT, S1 to T12
    assert unexplained_spacing_jump([37.0, 34.0, 21.0, 36.0, 36.0]) is None  # L3 crushed: down and back up
    assert unexplained_spacing_jump([37.0, 36.0, 34.0, 26.0]) is None  # a wedge-compressed top vertebra
    # a disc missed and a mid-body dip taken instead: the spacing falls by 30 % and stays there
    assert unexplained_spacing_jump([37.0, 36.0, 34.0, 24.0, 27.0]) == 3
    assert unexplained_spacing_jump([34.0, 50.0, 36.0]) == 1  # two segments merged
    labels, conf, method = name_levels(7, 0, 6, spacings_mm=[37.0, 36.0, 34.0, 24.0, 27.0])
    assert labels[6] == 19 and conf == 0.4 and "UNCERTAIN" in method
    assert name_levels(7, 0, 6, spacings_mm=[37.0, 34.0, 21.0, 36.0, 36.0])[1] == 0.9


def test_disc_chain_keeps_the_short_segment_of_a_vertebra_crushed_by_two_thirds():
    """The candidates of the example CT with L4 crushed by 65 % (bench/variants.deform).

    L4 and its disc keep 18 mm (176-194 mm) between segments of 36 and 38 mm,
    under half of them: as no short segment the chain started above it, at
    194 mm, and lost L4, L5 and the sacrum (the study not evaluable).
    """
    positions = [116.6, 140.1, 176.4, 194.5, 232.1, 270.6, 288.6, 304.7]
    depths = [35.8, 89.9, 153.7, 108.4, 73.8, 76.8, 28.4, 57.2]
    chosen = disc_chain(positions, depths, cranial_end_mm=326.5)
    assert [positions[i] for i in chosen] == [140.1, 176.4, 194.5, 232.1, 270.6, 304.7]


def test_disc_chain_ends_at_a_vertebra_plana_under_the_lowest_rib():
    """The candidates of the example CT with L1 crushed by 75 % (bench/variants.deform).

    The best chain ends at L1/L2 (288.8 mm); above it the crushed L1 and its
    disc keep 14.6 mm, 0.39 of the segment below. The ribs ask for six discs
    below 310.3 mm: the best chain holding six took a mid-body dip of L2
    (274.4 mm, 28 HU) instead, and named L2 and L1 one level off. The best
    chain with the crushed top vertebra's disc added scores higher and holds
    the six.
    """
    positions = [116.6, 140.1, 176.6, 210.9, 231.6, 251.8, 274.4, 288.8, 303.4]
    depths = [35.8, 89.8, 145.4, 162.1, 28.3, 121.0, 28.4, 111.9, 48.5]
    assert [positions[i] for i in disc_chain(positions, depths, 326.3)] == [140.1, 176.6, 210.9, 251.8, 288.8]
    chosen = disc_chain(positions, depths, 326.3, below=(310.3, 6))
    assert [positions[i] for i in chosen] == [140.1, 176.6, 210.9, 251.8, 288.8, 303.4]


def test_is_short_segment():
    assert is_short_segment(21.0, 34.0, 36.0)  # crushed by 45 %: 0.6 of its neighbours
    assert is_short_segment(29.0, 36.0)  # wedge: 0.8
    assert is_short_segment(17.0, 34.0, 36.0)  # crushed by 65 %, or a mid-body dip (disc_chain tells them apart)
    assert not is_short_segment(11.0, 34.0, 36.0)  # a third of a segment: shorter than a vertebra plana and its disc
    assert not is_short_segment(32.0, 36.0)  # within the normal change of spacing
    assert not is_short_segment(13.0, 24.0)  # shorter than any body and disc


def test_reference_height_ignores_a_fractured_neighbour():
    """An open segment's neighbours: the median of three, so a crushed neighbour does not lower it."""
    heights = [None, 28.0, 27.0, 26.0, 15.0, None]  # sacrum (open), L5..L2, L1 crushed, T12 open
    assert reference_height(heights, 5) == 26.0
    assert reference_height([None, None], 1) == np.inf
    assert open_segment_extent(20.0, 26.0) == "cut"  # 20 mm of T12 in view: cut by the field of view
    assert open_segment_extent(24.0, 26.0) == "whole"
    assert open_segment_extent(48.0, 26.0) == "more than one vertebra"  # a disc in it was not found


def test_partial_end_slices_of_a_field_of_view_padded_with_air():
    area = np.full(60, 18000.0)
    area[-4:] = [10000.0, 9500.0, 7800.0, 5800.0]  # the spine's side of the top slices is outside the scan
    area[:2] = [17500.0, 17800.0]  # a slowly changing cross-section is not partial
    out = partial_end_slices(area, 2.0)
    assert out[-4:].all() and not out[:-4].any()
    assert not partial_end_slices(area[:10], 2.0).any()  # too short to judge


# ------------------------------------------------------------------ level naming (pure)

def test_name_levels_from_both_anchors():
    labels, conf, method = name_levels(8, 0, 6)  # sacrum, L5..L1, T12, T11
    assert [labels[i] for i in range(8)] == [26, 24, 23, 22, 21, 20, 19, 18]
    assert conf == 0.9 and "agree" in method


def test_name_levels_disagreeing_anchors_count_from_the_sacrum():
    labels, conf, method = name_levels(8, 0, 7)  # six mobile segments between: L6 or a missed rib
    assert labels[1] == 24 and labels[5] == 20 and conf == 0.4 and "DISAGREE" in method


def test_name_levels_agreeing_only_on_the_chain_the_ribs_asked_for_is_uncertain():
    labels, conf, method = name_levels(8, 0, 6, rib_guided=True)
    assert labels[1] == 24 and labels[6] == 19 and conf == 0.4 and "found below the lowest rib" in method


def test_name_levels_with_a_disc_placed_from_the_lowest_rib_is_uncertain():
    labels, conf, method = name_levels(8, 0, 6, rib_placed=True)
    assert labels[1] == 24 and labels[6] == 19 and conf == 0.4 and "placed from the rib" in method


def _candidates(z: list[int], notch: dict[int, float], n: int = 60,
                pedicles: np.ndarray | None = None) -> DiscCandidates:
    """Candidates on a straight column of 2 mm slices (arc = 2 mm per slice)."""
    depth = np.zeros(n)
    for k, v in notch.items():
        depth[k] = v
    return DiscCandidates(z=z, arc_mm=np.arange(n) * 2.0, notch=depth, hu=np.zeros(n), tilt_deg=np.zeros(n),
                          cranial_end_mm=(n - 1) * 2.0, pedicles=pedicles)


def test_disc_boundary_on_a_side_as_dark_as_the_disc_keeps_a_disc_half_thickness():
    """Below the disc at slice 20 a crushed body is as dark as the disc: the profile rises 8 HU within
    10 mm, and the walk to the half-way level would end 9 mm inside the body (bench/beyond.py's
    crush45_L1 with T12-L5 80 HU darker)."""
    hu = np.full(44, 150.0)
    hu[[2, 38]] = 90.0
    hu[15:21] = (108.0, 101.0, 102.0, 103.0, 102.0, 100.0)
    candidates = replace(_candidates([2, 20, 38], {2: 60, 20: 40, 38: 60}, n=44), hu=hu)
    disc = next(d for d in choose_discs(candidates) if d.z == 20)
    assert disc.lower == 20 - FLAT_DISC_HALF_MM / COARSE_MM and disc.upper == 20.5  # above: the body at 150 HU
    # a body that stands a disc's notch above the disc: the walk to the half-way level (110 HU) stands
    hu[15] = 108.0 + MIN_NOTCH_HU
    disc = next(d for d in choose_discs(replace(candidates, hu=hu)) if d.z == 20)
    assert disc.lower == 15.5


def test_below_lowest_rib_drops_a_dip_at_the_rib_head_and_places_the_disc_below_it():
    """Rib end at slice 50 (100 mm): a candidate at 102 mm is the middle of T12's body; none lies 4-24 mm
    below, where the deepest notch (slice 45, 90 mm) stands in for T12/L1."""
    out = below_lowest_rib(_candidates([10, 28, 51], {10: 80, 28: 60, 51: 55, 44: 20, 45: 30, 47: 25}), 50.0)
    assert out.z == [10, 28, 45] and out.by_rib == (45,)
    discs = choose_discs(out)
    assert [d.by_rib for d in discs if d.z == 45] == [True]


def test_below_lowest_rib_places_the_disc_at_the_neural_foramen_when_the_pedicles_show_one():
    """Rib end at slice 50: the deepest notch 4-24 mm below (slice 39, 30 HU) lies inside a dark L1; the
    pedicle profile falls by 45 % at slice 45 (the T12/L1 foramen), where the notch is shallow but there."""
    pedicles = np.full(60, 250.0)
    pedicles[44:47] = (180.0, 137.0, 170.0)
    notch = {10: 80, 28: 60, 39: 30, 45: 8}
    out = below_lowest_rib(_candidates([10, 28], notch, pedicles=pedicles), 50.0)
    assert out.z == [10, 28, 45] and out.by_rib == (45,)
    # no notch at the foramen, or a fall of the pedicle profile under FORAMEN_FRACTION: the deepest notch
    assert below_lowest_rib(_candidates([10, 28], {**notch, 45: 0}, pedicles=pedicles), 50.0).by_rib == (39,)
    shallow = np.where(pedicles < 250.0, 200.0, pedicles)  # a fall of 20 %
    assert below_lowest_rib(_candidates([10, 28], notch, pedicles=shallow), 50.0).by_rib == (39,)


def test_below_lowest_rib_keeps_a_disc_found_below_it_and_places_none_without_a_notch():
    found = below_lowest_rib(_candidates([10, 28, 44], {10: 80, 28: 60, 44: 50, 46: 70}), 50.0)
    assert found.z == [10, 28, 44] and found.by_rib == ()
    flat = below_lowest_rib(_candidates([10, 28], {10: 80, 28: 60}), 50.0)  # no bone brighter on both sides
    assert flat.z == [10, 28] and flat.by_rib == ()
    shallow = below_lowest_rib(_candidates([10, 28], {10: 80, 28: 60, 45: 5}), 50.0)
    assert shallow.z == [10, 28, 45] and shallow.by_rib == (45,)
    near = below_lowest_rib(_candidates([10, 28, 47], {10: 80, 28: 60, 47: 40}), 50.0)  # 6 mm below: a disc
    assert near.z == [10, 28, 47] and near.by_rib == ()


def test_rib_segment_is_the_lowest_holding_a_rib_end_or_the_one_left_out_above_the_last_disc():
    bounds = [(None, 10.0), (10.0, 28.0), (28.0, 45.0), (45.0, None)]
    assert rib_segment([50.0, 47.0], bounds) == 3
    assert rib_segment([30.0, 50.0], bounds) == 2  # the lowest of two
    assert rib_segment([], bounds) is None
    # the segment above the disc at 45 held too little of the field of view for a body and was left out
    closed = bounds[:3]
    assert rib_segment([47.0], closed) == 3
    assert rib_segment([40.0, 47.0], closed) == 2
    assert rib_segment([5.0], [(10.0, 28.0)]) is None  # below the lowest disc of a chain without that segment
    assert rib_segment([5.0], []) is None


def test_caudal_anchor_between_a_residual_s1_s2_disc_and_the_lumbosacral_disc():
    assert caudal_anchor(True, False, {0: True}) == (0, False)
    assert caudal_anchor(False, True, {1: True}) == (1, False)  # the lowest notch lies inside the sacrum
    assert caudal_anchor(None, True, {1: True}) == (None, False)  # no test below the lowest: L5 may be flanked
    assert caudal_anchor(False, False, {}) == (None, False)
    # both pass (a residual S1/S2 disc, or L5 between high iliac crests): the cranial anchor decides,
    # and taking the next disc on its word alone is uncertain
    assert caudal_anchor(True, True, {0: True, 1: False}) == (0, False)
    assert caudal_anchor(True, True, {0: False, 1: False}) == (0, False)
    assert caudal_anchor(True, True, {0: False, 1: True}) == (1, True)
    # the segment above the lowest disc short against the next (25 against 34 mm): S1 below a residual
    # S1/S2 disc, not a crushed L5, even where the cranial anchor agrees with the lowest
    assert caudal_anchor(True, True, {0: True, 1: False}, lowest_short=True) == (1, True)
    assert caudal_anchor(True, False, {0: True}, lowest_short=True) == (0, False)  # the next fails the test
    labels, conf, method = name_levels(7, 0, 6, caudal_ambiguous=True)
    assert labels[1] == 24 and labels[6] == 19 and conf == 0.4 and "UNCERTAIN" in method


def test_name_levels_single_anchor_and_none():
    labels, conf, _ = name_levels(4, None, 3)  # T12 anchor only: L3, L2, L1, T12
    assert labels == {0: 22, 1: 21, 2: 20, 3: 19} and conf == 0.6
    labels, conf, _ = name_levels(3, 0, None)
    assert labels == {0: 26, 1: 24, 2: 23} and conf == 0.7
    assert name_levels(5, None, None) is None


def test_a_fracture_that_another_chain_nearly_explains_flags_the_levels_uncertain():
    """A weak disc beside a dark crushed body against a mid-body dip of its neighbour: never confidently wrong.

    Candidates (arc mm, notch HU) of the example CT with every core at -60 HU and L2 crushed by 45 %:
    the L2/L3 disc (247 mm) is weaker than a mid-body dip of L3 (233 mm), so the best chain puts the
    short segment on L3 (211-233) where the truth has it on L2 (247-268). The chain without that
    short segment scores within FRACTURE_AMBIGUITY_HU: the levels are flagged uncertain. The same
    image with normal cores (L3 crushed by 45 %) leaves no doubt.
    """
    positions = [117.0, 140.0, 177.0, 197.0, 211.0, 233.0, 247.0, 260.0, 268.0, 286.0, 303.0]
    depths = [36.0, 90.0, 147.0, 34.0, 108.0, 49.0, 31.0, 54.0, 48.0, 34.0, 66.0]
    assert [positions[i] for i in disc_chain(positions, depths)] == [140.0, 177.0, 211.0, 233.0, 268.0, 303.0]
    assert {positions[i] for i in ambiguous_fracture_discs(positions, depths)} == {211.0, 233.0}
    labels, conf, method = name_levels(6, 0, 6, spacings_mm=[37.0, 34.0, 22.0, 35.0, 35.0], fracture_ambiguous=True)
    assert conf == UNCERTAIN_CONFIDENCE and "UNCERTAIN" in method
    clear = [117.0, 140.0, 177.0, 195.0, 211.0, 221.0, 231.0, 255.0, 268.0, 288.0, 303.0]
    clear_depths = [36.0, 90.0, 145.0, 44.0, 83.0, 55.0, 73.0, 21.0, 89.0, 21.0, 30.0]
    assert ambiguous_fracture_discs(clear, clear_depths) == set()
    assert ambiguous_fracture_discs([], []) == set()


def test_a_fracture_left_out_that_a_chain_with_it_nearly_explains_flags_the_levels_uncertain():
    """The other way round: the best chain holds no short segment, and one that does nearly ties.

    Candidates (arc mm, notch HU) of the example CT with L1-L4 at -80 HU and L3 crushed by 45 %: a notch
    of 12 HU (244 mm) at the regular spacing beats the crushed L3's disc of 62 HU (234 mm), which costs a
    fracture, by 29 HU; L3 took in its disc and the bottom of L2. The chain's 244 mm disc is flagged.
    The unedited CT's candidates leave no doubt.
    """
    positions = [117.0, 140.0, 177.0, 211.0, 234.0, 244.0, 273.0, 289.0, 305.0]
    depths = [36.0, 90.0, 148.0, 99.0, 62.0, 12.0, 57.0, 61.0, 63.0]
    assert [positions[i] for i in disc_chain(positions, depths)] == [140.0, 177.0, 211.0, 244.0, 273.0, 305.0]
    assert {positions[i] for i in ambiguous_fracture_discs(positions, depths)} == {244.0}
    unedited = [117.0, 140.0, 177.0, 211.0, 231.0, 251.0, 287.0, 305.0, 321.0, 328.0]
    unedited_depths = [36.0, 90.0, 145.0, 158.0, 38.0, 120.0, 126.0, 27.0, 60.0, 35.0]
    assert ambiguous_fracture_discs(unedited, unedited_depths) == set()


def test_column_planes_lie_across_the_centreline_and_tilt_like_a_disc_beyond_the_deadband():
    # a straight column along canonical s, one centreline point per 2 mm slice
    pts_mm = np.column_stack([np.arange(20) * 2.0, np.full(20, 50.0), np.full(20, 60.0)])
    tangent = np.tile([1.0, 0.0, 0.0], (20, 1))
    planes = _ColumnPlanes(pts_mm, tangent, 2.0)
    point, normal = planes.at(3.4)
    assert np.allclose(point, [6.8, 50.0, 60.0]) and np.allclose(normal, [1.0, 0.0, 0.0])
    _, small = planes.at(3.4, 0.5 * DISC_TILT_DEADBAND_DEG)
    assert np.allclose(small, [1.0, 0.0, 0.0])  # within the estimate's noise: flat
    _, tilted = planes.at(3.4, 20.0)
    assert np.isclose(np.linalg.norm(tilted), 1.0)
    assert np.isclose(np.degrees(np.arccos(tilted @ tangent[3])), 20.0)
