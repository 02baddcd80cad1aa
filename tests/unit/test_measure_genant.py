"""Vertebral heights and Genant grading on synthetic spines with known deformity, and on real CT.

Synthetic spine: five cylindrical bodies T12-L4 (radius 18 mm, 28 mm high,
8 mm discs) on a 0.5 mm grid whose array axes are reversed and permuted
against the patient axes. L2 is deformed: a wedge (height falls linearly from
the posterior to the anterior margin), a biconcave body (both endplates
depressed in the middle) or a crush (the whole body lower). The expected
ratios are computed at the centres of the measurement windows (10 % of the
depth from either margin, and mid-depth).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from osteonode.anatomy import VERTEBRA_IDS
from osteonode.dicom_out.summary import QUALITY_FLAG_TEXT, level_notes
from osteonode.measure.genant import (
    IMPLAUSIBLE_MIDDLE_REASON,
    IMPLAUSIBLE_POSTERIOR_REASON,
    MAX_SLICE_MM,
    PLANE_OFFSETS_MM,
    THICK_SLICE_REASON,
    WINDOWS,
    GenantMeasurement,
    apply_genant,
    endplate_edge,
    genant_grade,
    grade_levels,
    measurement_windows,
    near_grade_limit,
    reference_posterior,
)
from osteonode.measure.hu import measure_levels
from osteonode.result import LevelResult
from osteonode.segment import SpineSegmentation
from osteonode.segment.spine import segment_spine
from osteonode.volume import Volume
from tests.conftest import ABDOMEN_NIFTI, require_data

NAMES = ("T12", "L1", "L2", "L3", "L4")
RADIUS, HEIGHT, PITCH = 18.0, 28.0, 36.0


def _spine(deform=None, deformed=("L2",)):
    """Label map of five bodies; ``deform(a, r) -> height`` shapes the ``deformed`` levels (a: anterior mm,
    r: radial mm)."""
    shape = (90, 400, 90)  # array (z, y, x) -> patient (anterior, inferior, left), 0.5 mm
    affine = np.zeros((4, 4))
    affine[:3, 0] = [0.0, -0.5, 0.0]  # z -> anterior
    affine[:3, 1] = [0.0, 0.0, -0.5]  # y -> inferior
    affine[:3, 2] = [0.5, 0.0, 0.0]  # x -> left
    affine[3, 3] = 1.0
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    volume = Volume(hu=np.zeros(shape, np.float32), affine=affine)
    lr, post, sup = volume.index_to_lps(np.indices(shape).reshape(3, -1).T).T.reshape(3, *shape)
    ant, r = -post, np.hypot(lr, post)
    bodies = np.zeros(shape, np.uint8)
    for i, name in enumerate(NAMES):  # T12 on top
        zc = 2 * PITCH - i * PITCH
        height = deform(ant, r) if (name in deformed and deform) else np.full(shape, HEIGHT)
        bodies[(r <= RADIUS) & (np.abs(sup - zc) <= height / 2.0)] = VERTEBRA_IDS[name]
    return volume, SpineSegmentation(bodies=bodies, trabecular=np.zeros(shape, np.uint8))


def _wedge(edge_ratio):
    """Height HEIGHT at the posterior margin, ``edge_ratio * HEIGHT`` at the anterior margin."""
    return lambda a, r: HEIGHT * (1.0 - (1.0 - edge_ratio) * (a + RADIUS) / (2 * RADIUS))


def _biconcave(depth):
    """Height reduced by ``depth`` (fraction) at the centre, parabolically to none at the rim."""
    return lambda a, r: HEIGHT * (1.0 - depth * (1.0 - (r / RADIUS) ** 2))


def test_normal_spine_grade_0_and_true_heights():
    volume, seg = _spine()
    result = grade_levels(volume, seg)
    assert list(result) == list(NAMES)
    for m in result.values():
        for h in (m.height_anterior_mm, m.height_middle_mm, m.height_posterior_mm):
            assert h == pytest.approx(HEIGHT, abs=0.6)
        assert m.genant_grade == 0 and m.fracture_suspected is False and m.reason is None
        assert all(r == pytest.approx(1.0, abs=0.03) for r in m.height_ratios.values())


@pytest.mark.parametrize("edge_ratio, grade", [(0.90, 0), (0.73, 1), (0.65, 2), (0.45, 3)])
def test_wedge_graded(edge_ratio, grade):
    volume, seg = _spine(_wedge(edge_ratio))
    m = grade_levels(volume, seg)["L2"]
    h = _wedge(edge_ratio)
    expected = h(0.8 * RADIUS, 0.0) / h(-0.8 * RADIUS, 0.0)  # windows centred 10 % of the depth in
    assert m.height_ratios["anterior_posterior"] == pytest.approx(expected, abs=0.03)
    assert m.height_posterior_mm == pytest.approx(h(-0.8 * RADIUS, 0.0), abs=0.6)
    assert genant_grade(1.0 - expected) == grade
    assert m.genant_grade == grade and m.fracture_suspected is (grade >= 1)
    # the neighbours are untouched
    assert grade_levels(volume, seg)["L1"].genant_grade == 0


@pytest.mark.parametrize("depth, grade", [(0.4, 2), (0.6, 3)])
def test_biconcave_graded(depth, grade):
    volume, seg = _spine(_biconcave(depth))
    m = grade_levels(volume, seg)["L2"]
    h = _biconcave(depth)
    # median over the five sagittal planes 0, ±3 and ±6 mm: the ±3 mm planes set it (radial offset 3 mm)
    expected = h(0.0, 3.0) / h(-0.8 * RADIUS, np.hypot(0.8 * RADIUS, 3.0))
    assert m.height_ratios["middle_posterior"] == pytest.approx(expected, abs=0.03)
    assert m.height_ratios["anterior_posterior"] == pytest.approx(1.0, abs=0.03)
    assert m.genant_grade == grade


@pytest.mark.parametrize("fraction, grade", [(0.85, 0), (0.70, 2), (0.5, 3)])
def test_crush_graded_against_neighbours(fraction, grade):
    volume, seg = _spine(lambda a, r: np.full(a.shape, fraction * HEIGHT))
    m = grade_levels(volume, seg)["L2"]
    assert m.height_ratios["anterior_posterior"] == pytest.approx(1.0, abs=0.03)
    assert m.reference_posterior_mm == pytest.approx(HEIGHT, abs=0.6)
    assert m.height_ratios["posterior_reference"] == pytest.approx(fraction, abs=0.03)
    assert m.genant_grade == grade


def test_label_map_lacking_a_corner_on_two_planes_is_outvoted():
    """A posterior-superior corner missing from the label map on the planes -3 and 0 mm (a patch of an
    osteoporotic body left out by the segmentation) does not shorten the posterior height: the median
    over the five sagittal planes is that of the three intact ones. No false fracture."""
    volume, seg = _spine()
    lr, post, sup = volume.index_to_lps(np.indices(seg.bodies.shape).reshape(3, -1).T).T.reshape(3, *seg.bodies.shape)
    l2_top = sup[seg.bodies == VERTEBRA_IDS["L2"]].max()
    notch = (seg.bodies == VERTEBRA_IDS["L2"]) & (post > 10.0) & (sup > l2_top - 10.0) & (lr > -4.6) & (lr < 1.6)
    bodies = np.where(notch, 0, seg.bodies).astype(np.uint8)
    m = grade_levels(volume, SpineSegmentation(bodies=bodies, trabecular=np.zeros_like(bodies)))["L2"]
    assert m.height_posterior_mm == pytest.approx(HEIGHT, abs=0.6)
    assert m.genant_grade == 0


#: Tolerance (mm) of a height measured on the image. The label map's voxel centres lie a quarter sample
#: off each body's centre (the array's centre falls between two samples), so its bodies, and the
#: endplates drawn from them, are the nominal height. The steepest fall of a thin (1.5 mm) endplate
#: blurred by 1 mm lies up to about 0.55 mm outside its true edge (over fatty marrow), on both endplates:
#: heights up to 1.1 mm tall.
EDGE_MM = 1.2


def _with_image(volume, seg, core_hu, focus=False, mask_change=0):
    """The synthetic spine as a CT: endplates 1.5 mm thick at 450 HU, the trabecular core at ``core_hu``,
    discs at 90 HU, soft tissue at 40 HU, blurred (sigma 1 mm) like a scanner; the label map handed
    to the measurement shrunk (``mask_change`` < 0) or grown (> 0) by that many 0.5 mm samples along
    the height axis (array axis 1), as a segmentation a voxel off would be. ``focus``: a 6 mm bone
    island (900 HU) 4 mm below L2's upper endplate."""
    from scipy import ndimage as ndi
    body = seg.bodies > 0
    lr, post, sup = volume.index_to_lps(np.indices(body.shape).reshape(3, -1).T).T.reshape(3, *body.shape)
    hu = np.full(body.shape, 40.0, np.float32)
    hu[(np.hypot(lr, post) <= RADIUS) & (np.abs(sup) <= 2.5 * PITCH)] = 90.0  # discs (and bodies below)
    hu[body] = core_hu
    plates = body & ~ndi.binary_erosion(body, structure=np.ones((1, 7, 1), bool))
    hu[plates] = 450.0
    if focus:
        l2_top = sup[seg.bodies == VERTEBRA_IDS["L2"]].max()
        hu[np.sqrt(lr ** 2 + post ** 2 + (sup - (l2_top - 7.0)) ** 2) <= 3.0] = 900.0
    hu = ndi.gaussian_filter(hu, 2.0)  # 1 mm at 0.5 mm samples
    structure = np.ones((1, 2 * abs(mask_change) + 1, 1), bool)
    labels = seg.bodies
    if mask_change:
        grown = ndi.grey_dilation(labels, footprint=structure) if mask_change > 0 else labels
        labels = np.where(ndi.binary_erosion(labels > 0, structure=structure), labels, 0).astype(np.uint8) \
            if mask_change < 0 else np.where(labels > 0, labels, grown).astype(np.uint8)
    return Volume(hu=hu, affine=volume.affine), SpineSegmentation(bodies=labels, trabecular=np.zeros_like(labels))


@pytest.mark.parametrize("core_hu", [-40.0, 60.0, 300.0])  # fatty, osteoporotic, sclerotic
@pytest.mark.parametrize("mask_change", [-3, 3])  # a label map 1.5 mm short or long at each endplate
def test_heights_follow_the_endplates_on_the_image(core_hu, mask_change):
    """The endplates' edges on the image correct a label map that is 1.5 mm off, at any density."""
    volume, seg = _with_image(*_spine(_wedge(0.65)), core_hu, mask_change=mask_change)
    result = grade_levels(volume, seg)
    h = _wedge(0.65)
    l2 = result["L2"]
    assert l2.height_posterior_mm == pytest.approx(h(-0.8 * RADIUS, 0.0), abs=EDGE_MM)
    assert l2.height_anterior_mm == pytest.approx(h(0.8 * RADIUS, 0.0), abs=EDGE_MM)
    assert l2.height_ratios["anterior_posterior"] == pytest.approx(h(0.8 * RADIUS, 0.0) / h(-0.8 * RADIUS, 0.0),
                                                                   abs=0.03)
    assert l2.genant_grade == 2
    for name in ("T12", "L1", "L3", "L4"):
        assert result[name].height_middle_mm == pytest.approx(HEIGHT, abs=EDGE_MM)
        assert result[name].genant_grade == 0


@pytest.mark.parametrize("core_hu", [-40.0, 60.0])  # fatty, osteoporotic
def test_dark_body_label_map_short_of_its_endplates(core_hu):
    """A label map 6 mm short at each endplate (a dark body's outline missing a corner): beyond the
    3 mm the image may move a boundary, the endplate is followed outward to its ridge, before the
    next body's label map."""
    volume, seg = _with_image(*_spine(), core_hu, mask_change=-12)
    result = grade_levels(volume, seg)
    for name in ("L1", "L2", "L3"):  # a body on either side
        assert result[name].height_middle_mm == pytest.approx(HEIGHT, abs=EDGE_MM)
        assert result[name].height_anterior_mm == pytest.approx(HEIGHT, abs=EDGE_MM)
        assert result[name].genant_grade == 0
    # no body beyond the top of T12 and the bottom of L4: there the label map's boundary stays (6 mm short)
    assert result["T12"].height_middle_mm == pytest.approx(HEIGHT - 6.0, abs=EDGE_MM)


def test_bone_island_below_an_endplate_is_not_taken_for_it():
    volume, seg = _with_image(*_spine(), 60.0, focus=True, mask_change=-3)
    l2 = grade_levels(volume, seg)["L2"]
    assert l2.height_middle_mm == pytest.approx(HEIGHT, abs=EDGE_MM)
    assert l2.genant_grade == 0


def test_endplate_edge_at_the_steepest_fall_between_samples():
    # body (60 HU) | endplate ridge 400 HU | disc 100 HU, running outward; falls 100, 150, 50 from index 4
    profile = np.array([60.0, 60.0, 200.0, 400.0, 400.0, 300.0, 150.0, 100.0, 100.0, 100.0, 100.0, 100.0])
    edge = endplate_edge(profile, start=4)
    assert 5.0 < edge < 6.0  # between the samples of the steepest fall (300 -> 150)
    assert edge == pytest.approx(5.5 + 0.5 * (100.0 - 50.0) / (100.0 - 300.0 + 50.0))
    assert endplate_edge(np.full(12, 100.0), start=4) is None  # no endplate: the label map's boundary stays


def test_endplate_edge_at_the_centre_of_a_linear_fall():
    """3 mm slices sampled every 0.5 mm: the profile falls linearly over a whole slice interval; the edge
    is its centre, wherever the slices lie (the first sample of the run would move it by up to 3 mm)."""
    slices = np.array([60.0, 60.0, 400.0, 100.0, 100.0, 100.0])  # body, endplate, disc at 3 mm
    profile = np.interp(np.arange(0.0, 5.01, 1.0 / 6.0), np.arange(6.0), slices)  # 0.5 mm samples
    edge = endplate_edge(profile, start=12)  # the endplate's slice is sample 12
    assert edge == pytest.approx(15.0)  # midway between the endplate's slice (12) and the disc's (18)


def test_endplate_edge_climbs_into_a_dented_endplate():
    """A biconcave endplate sank 6 mm into the body and the label map reaches into the dent (disc-filled):
    the edge is the dented endplate's, not a fall inside the dent near the label map's boundary."""
    # 0.5 mm samples running outward: body 150 HU, endplate ridge 300 HU at 6-7, its blurred edge
    # falling to the disc (60 HU) by sample 15; the label map's boundary at sample 20
    profile = np.concatenate([np.full(6, 150.0), [300.0, 300.0, 260.0, 220.0, 180.0, 140.0, 110.0, 85.0, 70.0],
                              np.full(16, 60.0)])
    edge = endplate_edge(profile, start=20)
    assert edge == pytest.approx(9.0)  # the centre of the steepest fall (samples 7 to 11)
    island = profile.copy()
    island[6:8] = 900.0  # a bone island there instead: no climb, and its flank is no endplate: the boundary stays
    assert endplate_edge(island, start=20) is None


def test_endplate_edge_is_not_the_flank_of_a_dense_focus_inside_the_body():
    """L1 of the example CT (1 mm samples from the body centre up, plane through the centroid): a dense focus
    peaks 11 mm below the label map's top (+15 mm) and falls towards the endplate more steeply (34 HU/mm) than
    the endplate falls to the disc (29 HU/mm). The search, beginning 4 mm inside, began on that flank and put
    the edge 3 mm inside the boundary (middle height 24.5 mm, the reference body's 27.4 mm)."""
    hu = [135, 141, 253, 362, 458, 437, 395, 366, 335, 299, 263, 223, 189, 170, 156, 127, 98, 72, 86, 103]
    profile = np.interp(np.arange(0.0, 19.01, 0.5), np.arange(20.0), hu)  # 0.5 mm samples, running outward
    assert endplate_edge(profile, start=30) is None  # the label map's boundary (+15.25 mm) stays


def test_endplate_edge_climb_to_a_dense_focus_that_no_disc_follows_is_no_dent():
    """L1 of the bench's 20 % biconcave copy of the example CT (1 mm samples up the mid-sagittal plane, 3 mm in
    front of the centroid): the dense focus below the superior endplate peaks at 471 HU 8 mm inside the label
    map's top, and its flank falls without a step through the sunken endplate to the disc (95-104 HU). The
    climb from the search's inner end reached the focus and took its flank for a dented endplate (middle
    height 1.3 mm short); between the focus and the boundary the profile stays 53 HU or more above the disc
    (95 HU), where a dent holds disc: the boundary stays."""
    hu = [128, 132, 135, 141, 148, 260, 371, 471, 463, 414, 370, 317, 261, 214, 178, 148, 123, 104, 98, 95, 95]
    profile = np.interp(np.arange(0.0, 20.01, 0.5), np.arange(21.0), hu)  # 0.5 mm samples, running outward
    assert endplate_edge(profile, start=30) is None  # the label map's boundary (+15.25 mm) stays


def test_crush_reference_skips_a_deformed_neighbour():
    """Two adjacent crushes (55 % of the height): each is judged against the nearest undeformed levels,
    not against the other crushed body (which would hide half the loss: grade 2 instead of 3)."""
    volume, seg = _spine(lambda a, r: np.full(a.shape, 0.55 * HEIGHT), deformed=("L1", "L2"))
    result = grade_levels(volume, seg)
    for name in ("L1", "L2"):
        assert result[name].reference_posterior_mm == pytest.approx(HEIGHT, abs=0.6)
        assert result[name].genant_grade == 3
    for name in ("T12", "L3", "L4"):
        assert result[name].genant_grade == 0


def test_posterior_height_short_on_its_own_is_no_crush():
    """Only the posterior height low (a posterior corner missing from the label map, anterior and middle
    heights intact): not graded as a crush against the neighbours; a uniform crush still is."""
    reverse = lambda a, r: HEIGHT * (1.0 - 0.3 * (RADIUS - a) / (2 * RADIUS))  # noqa: E731 - 0.7 H posteriorly
    l2 = grade_levels(*_spine(reverse))["L2"]
    assert l2.height_ratios["posterior_reference"] < 0.8  # it would be a grade-2 crush by Hp alone
    assert l2.genant_grade == 0
    crushed = grade_levels(*_spine(lambda a, r: np.full(a.shape, 0.7 * HEIGHT)))["L2"]
    assert crushed.genant_grade == 2


def test_posterior_height_far_above_the_neighbours_is_implausible_not_a_fracture():
    """L1 25 % taller than its neighbours at its posterior margin and 15 % shorter at its anterior one (its
    endplate followed into the disc above): by its own ratios a grade-2 wedge, but no vertebra's shape. It
    gets no heights, ratios or grade, the flag once, and is no reference for L2's crush ratio. Taller without
    a short anterior height, it is graded."""
    volume, seg = _spine(lambda a, r: HEIGHT * (1.25 - 0.40 * (a + RADIUS) / (2 * RADIUS)),
                         deformed=("L1",))
    seg.trabecular[seg.bodies > 0] = seg.bodies[seg.bodies > 0]
    measurements = grade_levels(volume, seg)
    l1 = measurements["L1"]
    assert l1.heights_implausible and l1.genant_grade is None and l1.height_posterior_mm is None
    assert l1.reason == IMPLAUSIBLE_POSTERIOR_REASON
    assert measurements["L2"].reference_posterior_mm == pytest.approx(HEIGHT, abs=0.6)  # T12 and L3, not L1
    assert [measurements[name].genant_grade for name in ("T12", "L2", "L3", "L4")] == [0, 0, 0, 0]
    applied = apply_genant(measure_levels(volume, seg), measurements)
    assert applied["L1"].quality_flags == ["heights_implausible"]
    assert apply_genant(applied, measurements)["L1"].quality_flags == ["heights_implausible"]  # once
    assert (applied["L1"].height_posterior_mm, applied["L1"].genant_grade) == (None, None)
    assert QUALITY_FLAG_TEXT["heights_implausible"] in level_notes(applied["L1"])
    for factor in (1.15, 1.25):  # taller all over: graded 0 (the grade would not rest on the tall back)
        taller = grade_levels(*_spine(lambda a, r, f=factor: np.full(a.shape, f * HEIGHT), deformed=("L1",)))["L1"]
        assert not taller.heights_implausible and taller.genant_grade == 0


def test_middle_height_above_both_margins_is_implausible_not_a_fracture():
    """L1 with its anterior window 40 % short and its middle 20 % taller than its posterior margin (an endplate
    missed at the anterior margin of a dark body): by its own ratios a grade-2 wedge, but no vertebra's shape
    (a fracture lowers the middle, it never raises it above both margins). It gets no heights, ratios or grade
    and the flag. The same middle with both margins intact is graded 0; a middle between the margins (a wedge)
    is graded; so is a body whose middle, though taller than its margins, lies 30 % below the neighbours' (a
    crush, whichever margin is short)."""
    def bulging(anterior):
        return lambda a, r: HEIGHT * np.where(a > 0.5 * RADIUS, anterior, np.where(np.abs(a) < 0.4 * RADIUS, 1.2, 1.0))

    l1 = grade_levels(*_spine(bulging(0.6), deformed=("L1",)))["L1"]
    assert l1.heights_implausible and l1.reason == IMPLAUSIBLE_MIDDLE_REASON
    assert (l1.genant_grade, l1.height_anterior_mm, l1.height_middle_mm, l1.height_ratios) == (None, None, None, {})
    intact = grade_levels(*_spine(bulging(1.0), deformed=("L1",)))["L1"]
    assert not intact.heights_implausible and intact.genant_grade == 0
    assert intact.height_middle_mm == pytest.approx(1.2 * HEIGHT, abs=0.6)
    wedge = grade_levels(*_spine(_wedge(0.6), deformed=("L1",)))["L1"]
    assert not wedge.heights_implausible and wedge.genant_grade == 2
    crushed = grade_levels(*_spine(lambda a, r: HEIGHT * np.where(np.abs(a) < 0.4 * RADIUS, 0.7, 0.55),
                                   deformed=("L1",)))["L1"]
    assert not crushed.heights_implausible and crushed.genant_grade == 3


def test_measurement_windows_are_where_the_heights_are_taken():
    """On each plane the windows lie 5-15 %, 45-55 % and 85-95 % of the body's depth behind its anterior
    margin (the cylinder's depth on a plane beside the centroid is its chord); an absent body has none."""
    volume, seg = _spine()
    planes = measurement_windows(volume, seg.bodies, VERTEBRA_IDS["L2"])
    assert [offset for offset, _ in planes] == list(PLANE_OFFSETS_MM)
    for offset, windows in planes:
        half = np.sqrt(RADIUS ** 2 - offset ** 2)
        for name, (near, far) in WINDOWS.items():
            assert windows[name].size >= 2
            assert windows[name].max() <= half - near * 2 * half + 0.6
            assert windows[name].min() >= half - far * 2 * half - 0.6
    assert measurement_windows(volume, seg.bodies, VERTEBRA_IDS["L5"] + 1) == []


def test_reference_posterior_nearest_undeformed_level_per_side():
    heights = {19: 28.0, 20: 15.0, 21: 15.0, 22: 30.0, 23: 29.0}
    assert reference_posterior(21, heights, {20, 21}) == pytest.approx(29.0)  # T12 above L1, L3 below
    assert reference_posterior(22, heights, {20, 21}) == pytest.approx(29.0)  # L2 is skipped, L1 too: only L4
    assert reference_posterior(22, heights, set()) == pytest.approx(22.0)  # L2 and L4
    assert reference_posterior(20, {20: 28.0, 22: 28.0}, set()) is None  # L2 missing: no reference on that side


def test_grade_limits():
    assert [genant_grade(x) for x in (0.0, 0.199, 0.20, 0.249, 0.25, 0.40, 0.401, 0.9)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_near_grade_limit():
    losses = (0.10, 0.159, 0.17, 0.199, 0.23, 0.289, 0.30, 0.35, 0.37, 0.44, 0.5)
    assert [near_grade_limit(x) for x in losses] == [False, False, True, True, True, True, False, False, True, True,
                                                    False]


def test_a_loss_near_a_grade_limit_is_flagged_borderline_once():
    """SR, PDF and result.json say when the grade may be one higher or lower (a body note, not a ROI note)."""
    level = LevelResult(label_confidence=1.0, trabecular_hu_mean=120.0, trabecular_hu_median=118.0,
                        trabecular_hu_sd=30.0, trabecular_voxel_count=400, trabecular_roi_volume_mm3=10800.0,
                        quality_flags=["heterogeneous"])

    def measured(loss, grade):
        return GenantMeasurement(28.0 * (1 - loss), 28.0, 28.0, None, {"anterior_posterior": 1 - loss}, loss, grade,
                                 grade > 0)

    applied = apply_genant({"L1": level, "L2": level, "L3": level},
                           {"L1": measured(0.19, 0), "L2": measured(0.10, 0), "L3": measured(0.42, 3)})
    assert applied["L1"].quality_flags == ["heterogeneous", "genant_borderline"]
    assert applied["L2"].quality_flags == ["heterogeneous"]
    assert applied["L3"].quality_flags == ["heterogeneous", "genant_borderline"]
    again = apply_genant(applied, {"L1": measured(0.19, 0)})
    assert again["L1"].quality_flags == ["heterogeneous", "genant_borderline"]
    assert level_notes(applied["L1"], "body") == [QUALITY_FLAG_TEXT["genant_borderline"]]
    assert QUALITY_FLAG_TEXT["genant_borderline"] not in level_notes(applied["L1"], "roi")


def test_body_at_the_edge_not_measured_nor_reference():
    volume, seg = _spine()
    top = 30  # crop the 15 mm above T12's upper endplate minus 1 mm: T12 touches the edge
    bodies = np.ascontiguousarray(seg.bodies[:, top:])
    cropped = volume.crop((slice(None), slice(top, None), slice(None)))
    result = grade_levels(cropped, SpineSegmentation(bodies=bodies, trabecular=np.zeros_like(bodies)))
    t12 = result["T12"]
    assert t12.cut_by_field_of_view and "edge of the volume" in t12.reason
    assert (t12.height_anterior_mm, t12.height_middle_mm, t12.height_posterior_mm) == (None, None, None)
    assert (t12.height_ratios, t12.genant_grade, t12.fracture_suspected) == ({}, None, None)
    assert list(result) == list(NAMES)  # cranio-caudal, the cut level included
    assert result["L1"].genant_grade == 0 and not result["L1"].cut_by_field_of_view
    assert result["L1"].reference_posterior_mm == pytest.approx(HEIGHT, abs=0.6)  # from L2 only


def test_backend_cut_by_field_of_view_is_honoured_and_applied():
    """A body the backend reports cut (SpineSegmentation.cut_by_field_of_view) gets no heights, ratios or grade."""
    volume, seg = _spine(_wedge(0.45))
    seg.trabecular[seg.bodies > 0] = seg.bodies[seg.bodies > 0]
    seg.cut_by_field_of_view = {VERTEBRA_IDS["L2"]}
    measurements = grade_levels(volume, seg)
    assert measurements["L2"].cut_by_field_of_view and measurements["L2"].genant_grade is None
    assert measurements["L1"].height_ratios["posterior_reference"] == pytest.approx(1.0, abs=0.03)  # T12 only
    levels = measure_levels(volume, seg)
    levels["L2"] = levels["L2"].model_copy(update={"quality_flags": ["heterogeneous"]})
    applied = apply_genant(levels, measurements)
    l2 = applied["L2"]
    assert l2.cut_by_field_of_view and l2.quality_flags == ["cut_by_field_of_view", "heterogeneous"]
    assert (l2.height_anterior_mm, l2.height_middle_mm, l2.height_posterior_mm, l2.height_ratios) == (
        None, None, None, None)
    assert (l2.genant_grade, l2.fracture_suspected) == (None, None)
    assert apply_genant(applied, measurements)["L2"].quality_flags == l2.quality_flags  # the flag once
    assert not applied["L1"].cut_by_field_of_view and applied["L1"].quality_flags == []


def test_apply_genant_fills_level_results():
    volume, seg = _spine(_wedge(0.45))
    seg.trabecular[seg.bodies > 0] = seg.bodies[seg.bodies > 0]
    levels = apply_genant(measure_levels(volume, seg), grade_levels(volume, seg))
    assert levels["L2"].genant_grade == 3 and levels["L2"].fracture_suspected is True
    assert levels["L2"].height_ratios["anterior_posterior"] < 0.6
    assert levels["L1"].genant_grade == 0 and levels["L1"].height_posterior_mm == pytest.approx(HEIGHT, abs=0.6)


def test_thick_slices_are_not_measured():
    """On slices thicker than MAX_SLICE_MM (the spacing of axis 0, or the nominal Slice Thickness when larger)
    no level gets heights or a grade, and the level results say why."""
    volume, seg = _spine(_wedge(0.45))
    assert grade_levels(volume, seg, slice_thickness_mm=MAX_SLICE_MM)["L2"].genant_grade == 3
    nominal = grade_levels(volume, seg, slice_thickness_mm=4.0)
    affine = volume.affine.copy()
    affine[:3, 0] *= 8  # every 8th sample of axis 0: 4 mm apart
    spaced = grade_levels(Volume(hu=volume.hu[::8], affine=affine),
                          SpineSegmentation(bodies=seg.bodies[::8], trabecular=seg.trabecular[::8]))
    for measured in (nominal, spaced):
        assert tuple(measured) == NAMES
        for m in measured.values():
            assert m.slices_too_thick and m.reason == THICK_SLICE_REASON
            assert m.genant_grade is None and m.height_anterior_mm is None and not m.height_ratios
    seg.trabecular[seg.bodies > 0] = seg.bodies[seg.bodies > 0]
    levels = apply_genant(measure_levels(volume, seg), nominal)
    assert levels["L2"].genant_grade is None and levels["L2"].fracture_suspected is None
    assert levels["L2"].quality_flags[0] == "slices_too_thick"
    assert level_notes(levels["L2"], "body") == [QUALITY_FLAG_TEXT["slices_too_thick"]]


@pytest.mark.integration
def test_real_ct_heights_plausible():
    volume = Volume.from_sitk(sitk.ReadImage(str(require_data(ABDOMEN_NIFTI))))
    result = grade_levels(volume, segment_spine(volume))
    # T12 reaches the top of the field of view: not measured; L5 is measured only
    assert result["T12"].cut_by_field_of_view and result["T12"].height_posterior_mm is None
    assert result["T12"].genant_grade is None and result["L5"].genant_grade is None
    for name in ("L1", "L2", "L3", "L4"):
        m = result[name]
        assert all(20.0 <= h <= 40.0 for h in (m.height_anterior_mm, m.height_middle_mm, m.height_posterior_mm))
        assert 0.8 <= m.height_ratios["anterior_posterior"] <= 1.3
        # no deformity is visible on the mid-sagittal reformat of this scan (checked by eye)
        assert m.genant_grade == 0
