"""Unit tests of the vertebral body helpers (osteonode.segment.body: disc plane, core HU, faint posterior wall)."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from osteonode.segment.body import (
    AP_BINS_MM,
    CANAL_MAX_HU,
    _ap_profiles,
    _disc_plane,
    _faint_wall,
    _posterior_wall,
    _wall_edge,
    body_threshold,
    searched_plane_replaces,
    trabecular_core_hu,
)

AXIS = np.array([1.0, 0.0, 0.0])
CENTRE = np.array([15.0, 25.0, 25.0])  # body centre (canonical s, a, l mm); its upper disc at s = 30 mm


def _two_bodies(tilt_deg: float, core_hu: float) -> tuple[np.ndarray, tuple]:
    """A 1 mm (s, a, l) crop: a disc (80 HU, 6 mm) tilted anteriorly by ``tilt_deg`` between 2 mm endplates."""
    coords = tuple(np.arange(n, dtype=float) for n in (60, 50, 50))
    s, a, _ = np.meshgrid(*coords, indexing="ij")
    depth = np.abs(s - (30.0 + np.tan(np.radians(tilt_deg)) * (a - 25.0)))
    hu = np.where(depth <= 3.0, 80.0, np.where(depth <= 5.0, 400.0, core_hu)).astype(np.float32)
    return hu, coords


def _planes():
    outer = (np.array([30.0, 25.0, 25.0]), AXIS.copy())  # the column profile's: flat
    inner = (np.array([25.0, 25.0, 25.0]), AXIS.copy())  # the profile's boundary, 5 mm below
    return outer, inner


@pytest.mark.parametrize("core_hu", [150.0, -20.0])  # normal and osteoporotic (fatty) marrow
def test_disc_plane_follows_the_tilt_of_a_wedge_compressed_endplate(core_hu):
    hu, coords = _two_bodies(20.0, core_hu)
    outer, inner = _planes()
    (point, normal), (inner_point, inner_normal) = _disc_plane(hu, coords, CENTRE, AXIS, outer, inner)
    expected = np.array([1.0, -np.tan(np.radians(20.0)), 0.0])
    expected /= np.linalg.norm(expected)
    assert np.degrees(np.arccos(min(1.0, float(normal @ expected)))) <= 3.0
    assert abs(point[0] - 30.0) <= 1.5 and np.allclose(point[1:], CENTRE[1:])
    # the boundary plane is parallel, at most 3 mm (where the endplates begin) below the centre along s
    assert np.allclose(inner_normal, normal) and np.isclose(point[0] - inner_point[0], 3.0)


@pytest.mark.parametrize("core_hu", [150.0, -20.0])
def test_disc_plane_keeps_a_plane_that_crosses_the_disc_well(core_hu):
    hu, coords = _two_bodies(0.0, core_hu)
    outer, inner = _planes()
    kept_outer, kept_inner = _disc_plane(hu, coords, CENTRE, AXIS, outer, inner)
    assert kept_outer is outer and kept_inner is inner


def test_disc_plane_keeps_the_profile_s_plane_without_a_clearly_better_one():
    # a 10 degree tilt: the flat plane still crosses the 6 mm disc on most columns (mean notch 143 HU
    # against 150 HU tilted), within DISC_BETTER_HU: the column profile's plane stays
    hu, coords = _two_bodies(10.0, 150.0)
    outer, inner = _planes()
    kept_outer, kept_inner = _disc_plane(hu, coords, CENTRE, AXIS, outer, inner)
    assert kept_outer is outer and kept_inner is inner


def test_disc_plane_follows_the_tilt_of_a_thin_blurred_disc_with_a_shallow_notch():
    # a 5 mm disc (90 HU) between 2 mm endplates (250 HU) and marrow of 110 HU, blurred along s as on
    # 3 mm slices, tilted 15 degrees: its notch is shallow (19 HU flat, 36 HU tilted, 17 HU better), as
    # the T12/L1 disc of the example CT is (49 HU flat, 60 HU at the 11 degrees a 45 % wedge of L1 gave
    # it; with the flat plane L1 lost its posterior-superior corner and was graded 2)
    coords = tuple(np.arange(n, dtype=float) for n in (60, 50, 50))
    s, a, _ = np.meshgrid(*coords, indexing="ij")
    depth = np.abs(s - (30.0 + np.tan(np.radians(15.0)) * (a - 25.0)))
    sharp = np.where(depth <= 2.5, 90.0, np.where(depth <= 4.5, 250.0, 110.0)).astype(np.float32)
    outer, inner = _planes()
    (_, normal), _ = _disc_plane(ndi.gaussian_filter(sharp, (2.0, 0.5, 0.5)), coords, CENTRE, AXIS, outer, inner)
    expected = np.array([1.0, -np.tan(np.radians(15.0)), 0.0])
    assert np.degrees(np.arccos(min(1.0, float(normal @ expected) / np.linalg.norm(expected)))) <= 3.0


@pytest.mark.parametrize(("given", "best", "retilt", "replaces"), [
    (49.0, 60.0, 11.0, True),  # T12/L1 above a 45 % wedge of L1 (the example CT, 3 mm slices)
    (143.0, 150.0, 10.0, False),  # a bright disc the flat plane still crosses (the synthetic test above)
    (5.0, 13.0, 23.0, True),  # L1/L2 above a 45 % wedge of L2, every core 110 HU darker: a faint disc
    (5.0, 9.0, 23.0, False),  # ... under DISC_BETTER_HU deep: no disc found either
    (8.0, 14.0, 23.0, False),  # ... not twice as deep
    (49.0, 60.0, 9.0, False),  # hardly tilted
])
def test_searched_disc_plane_replaces_the_profile_s_when_clearly_better(given, best, retilt, replaces):
    assert searched_plane_replaces(given, best, retilt) is replaces


def test_core_hu_of_a_crushed_dark_body_stays_inside_its_endplates():
    # a body crushed to 15 mm between its boundary planes (s = -7.5 and 7.5 mm): marrow 15 HU (every core
    # at -100 HU) 4 mm thick, compacted endplates blurred over 5 mm (300 HU), discs of 90 HU beyond; the
    # 10 mm core sphere is mostly endplate and disc, the voxels 4 mm inside the planes mostly marrow
    coords = tuple(np.arange(-30.0, 30.1, 1.0) for _ in range(3))
    s = np.meshgrid(*coords, indexing="ij", sparse=True)[0]
    hs = np.broadcast_to(np.where(np.abs(s) <= 2.0, 15.0, np.where(np.abs(s) <= 7.5, 300.0, 90.0)),
                         tuple(len(c) for c in coords)).astype(np.float32)
    up = np.array([1.0, 0.0, 0.0])
    planes = ((np.array([7.5, 0.0, 0.0]), up), (np.array([-7.5, 0.0, 0.0]), up))
    assert trabecular_core_hu(hs, coords, np.zeros(3)) == pytest.approx(300.0)  # the sphere alone: endplate
    assert trabecular_core_hu(hs, coords, np.zeros(3), planes) == pytest.approx(15.0)
    # a body too thin for the margins (under about 10 mm): the sphere as before
    thin = ((np.array([3.0, 0.0, 0.0]), up), (np.array([-3.0, 0.0, 0.0]), up))
    assert trabecular_core_hu(hs, coords, np.zeros(3), thin) == trabecular_core_hu(hs, coords, np.zeros(3))


@pytest.mark.parametrize("island_mm", [0.0, 12.0, 15.0])
def test_core_hu_of_a_dark_body_ignores_a_bone_island(island_mm):
    # an osteoporotic core of 20 HU on a 1.5 mm grid, with a 900 HU island about the centre, blurred
    # like the smoothed copy: a 15 mm island fills half the 10 mm core sphere with its halo (the core read
    # 391 HU on an L1 at -90 HU and its body shrank to the island)
    coords = tuple(np.arange(-30.0, 30.1, 1.5) for _ in range(3))
    s, a, lr = np.meshgrid(*coords, indexing="ij")
    hs = np.where(np.sqrt(s ** 2 + (a - 1.5) ** 2 + lr ** 2) <= island_mm / 2, 900.0, 20.0)
    hs = ndi.gaussian_filter(hs, 1.0 / 1.5).astype(np.float32)  # sigma 1 mm, as the smoothed copy of a noisy CT
    assert trabecular_core_hu(hs, coords, np.zeros(3)) == pytest.approx(20.0, abs=5.0)


def _ap_profile(wall_hu: float, interior_hu: float) -> np.ndarray:
    """1 mm bins, posterior first: arch bone (bins 0-4), canal (5-16, about 20 HU with noise),
    the posterior wall (17-19), the body's interior (20-30), its anterior cortex (31-33)."""
    rng = np.random.default_rng(0)
    prof = np.concatenate([np.full(5, 300.0), 20.0 + rng.uniform(-10.0, 10.0, 12), np.full(3, wall_hu),
                           interior_hu + rng.uniform(-5.0, 5.0, 11), np.full(3, 150.0)])
    return prof.astype(np.float32)


@pytest.mark.parametrize("interior_hu", [-30.0, 10.0])  # fatty marrow darker than the canal, and as dark
def test_faint_wall_inside_a_run_that_goes_on_into_a_dark_body(interior_hu):
    # the wall (55 HU) is below the canal limit: the fluid run spans canal, wall and interior
    prof = _ap_profile(55.0, interior_hu)
    assert (prof[5:31] < CANAL_MAX_HU).all()
    assert _faint_wall(prof, 5, 30, last=len(prof) - 1) in (17, 18, 19)


def test_faint_wall_in_front_of_the_canal_run():
    prof = _ap_profile(80.0, 40.0)  # the wall above the canal limit ends the run at bin 16
    assert _faint_wall(prof, 5, 16, last=len(prof) - 1) in (17, 18, 19)


def test_faint_wall_not_in_front_of_the_last_bin_and_not_found_without_a_bump():
    prof = _ap_profile(55.0, -30.0)
    # the anterior cortex (bins 31-33) is out of reach when the wall may lie no further than bin 25
    assert _faint_wall(prof, 5, 30, last=25) in (17, 18, 19)
    flat = np.full(34, 20.0, np.float32)
    assert _faint_wall(flat, 5, 30, last=33) == 31  # no bump: the bin in front of the run


def _blurred_wall(wall_hu: float, interior_hu: float) -> np.ndarray:
    """1 mm bins, posterior first: canal (bins 0-16, 12 HU), the posterior wall from 16.5 mm (3 mm,
    ``wall_hu``), the interior (``interior_hu``), blurred as by 3 mm voxels (Gaussian, 1.3 mm)."""
    fine = np.arange(0.0, 34.0, 0.1)
    step = np.where(fine < 16.5, 12.0, np.where(fine < 19.5, wall_hu, interior_hu))
    fine_blurred = ndi.gaussian_filter1d(step, 13.0, mode="nearest")
    return np.interp(np.arange(34.0), fine, fine_blurred)


@pytest.mark.parametrize(("wall_hu", "interior_hu", "tolerance_mm"),
                         [(200.0, 120.0, 0.75), (110.0, 30.0, 0.75), (60.0, -30.0, 0.75), (170.0, 370.0, 0.75),
                          (420.0, 320.0, 1.25)])
def test_wall_edge_is_the_canal_side_of_the_wall_whatever_the_marrow(wall_hu, interior_hu, tolerance_mm):
    # a normal body, the same with marrow and wall 90 HU darker, a fatty one, a normal wall before sclerotic
    # marrow: the first bin 15 HU above the body threshold (95, 85, none, 155 HU) lies at 17, 18, -, 18 mm,
    # the wall's canal side (16.5 mm; the blur of a 3 mm wall lowers its peak, and half-way with it) within
    # 0.75 mm of it. A 3 mm wall of 420 HU is cut on the foot of its rise (WALL_EDGE_RISE_HU), 1.2 mm behind.
    prof = _blurred_wall(wall_hu, interior_hu)
    k_first = int(np.argmax(prof > 30.0))  # any bin on the rise
    edge = _wall_edge(prof, np.arange(34.0), 2, 15, k_first, last=30)
    assert abs(edge - 16.5) <= tolerance_mm


def test_wall_edge_does_not_follow_marrow_brighter_than_the_cortex_behind_it():
    # L1's profile (1 mm bins from 29 mm behind its centre) on the example CT, and with every core of
    # bench/robustness.py 200 HU denser (core_T12-L5+200), where the body centre lies 1 mm further back:
    # the cortex bins (73, 117 and 76, 122 HU) are the same, the bins behind them are not. Half-way to the
    # highest bin within 3 mm put the second edge 1.2 mm further forwards, and L1's ROI lost 10 % of its voxels.
    normal = np.array([34, 22, 4, 6, 8, 4, 3, 16, 5, 19, 15, 28, 73, 117, 64, 150, 124, 92, 98, 129, 108], float)
    dense = np.array([47, 23, 4, 5, 7, 8, 14, -8, 16, 5, 18, 15, 31, 76, 122, 228, 316, 290, 286, 309, 312], float)
    edge_normal = _wall_edge(normal, np.arange(len(normal), dtype=float), 0, 11, 13, last=21)
    edge_dense = _wall_edge(dense, np.arange(len(dense), dtype=float), 0, 12, 15, last=21) - 1.0
    assert abs(edge_dense - edge_normal) <= 0.25


def test_wall_edge_ignores_a_dip_between_the_first_dense_bin_and_the_peak():
    # bins sampled off a 3 mm grid: 118 HU, then 65 HU, then the wall's peak of 151 HU
    prof = np.array([10.0] * 12 + [29.0, 73.0, 118.0, 65.0, 151.0, 125.0, 92.0, 99.0])
    edge = _wall_edge(prof, np.arange(len(prof), dtype=float), 0, 12, 14, last=19)
    assert 13.0 < edge < 14.0  # between the 73 and the 118 HU bins, not behind the 151 HU peak


def test_wall_edge_without_a_rise_through_half_way_is_the_first_wall_bin():
    prof = np.array([40.0] * 12 + [45.0, 41.0, 44.0, 42.0])  # a "wall" no higher than the canal
    assert _wall_edge(prof, np.arange(len(prof), dtype=float), 0, 11, 12, last=15) == 11.5


def test_ap_profiles_average_each_image_per_1_mm_bin_and_fill_empty_bins():
    # voxels every 3 mm (a 3 mm grid): the bins between them are interpolated
    a_mm = np.repeat(np.arange(-34.0, 0.0, 3.0), 2)
    first, second = a_mm * 2.0, np.full(a_mm.shape, 7.0)
    centres, (prof_first, prof_second) = _ap_profiles(a_mm, (first, second))
    assert np.array_equal(centres, AP_BINS_MM[:-1] + 0.5)
    assert np.allclose(prof_first, 2.0 * np.clip(centres, -34.0, -1.0))
    assert np.allclose(prof_second, 7.0)


def _canal_and_body(interior_hu: float) -> np.ndarray:
    """An anterior-posterior profile on the bins of ``_ap_profiles`` (-35 .. -1 mm): the arch (300 HU)
    behind -30 mm, the canal (20 HU) from -30 to -18 mm, the posterior cortex (300 HU) at -17 and -16 mm,
    the body's interior (``interior_hu``) in front of it."""
    centres = AP_BINS_MM[:-1] + 0.5
    return np.where(centres < -30.0, 300.0, np.where(centres <= -18.0, 20.0,
                    np.where(centres <= -16.0, 300.0, interior_hu)))


@pytest.mark.parametrize("wall_edge", [False, True])
def test_posterior_wall_does_not_move_with_the_marrow(wall_edge):
    # normal marrow, and fatty marrow darker than the canal (its interior makes a second fluid run in
    # front of the wall): the cut is where the cortex is, either way
    centres = AP_BINS_MM[:-1] + 0.5
    walls = [_posterior_wall(centres, prof, prof, body_threshold(interior), wall_edge)
             for interior, prof in ((150.0, _canal_and_body(150.0)), (-20.0, _canal_and_body(-20.0)))]
    assert abs(walls[0] - walls[1]) <= 0.25
    if wall_edge:
        assert -18.0 <= walls[0] <= -15.0
    else:
        assert walls[0] == -16.5  # the first cortex bin (-17 mm), to its front


def test_posterior_wall_without_a_canal_or_a_fluid_bin_is_30_mm_behind_the_centre():
    centres = AP_BINS_MM[:-1] + 0.5
    flat = np.full(centres.shape, 150.0)
    assert _posterior_wall(centres, flat, flat, body_threshold(150.0), wall_edge=True) == -30.0
