"""Unit tests of the vertebral body's disc-plane search (osteonode.segment.body._disc_plane)."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from osteonode.segment.body import _disc_plane, trabecular_core_hu

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
