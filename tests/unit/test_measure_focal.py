"""Focal-lesion exclusion and quality flags of the trabecular measurement (synthetic phantoms, exact values)."""

from __future__ import annotations

import numpy as np
import pytest

from osteonode.measure.hu import focal_lesions, measure_levels, quality_flags
from osteonode.segment import SpineSegmentation
from osteonode.volume import Volume

SPACING = (3.0, 1.0, 1.0)


def _phantom(core_hu: float, noise_hu: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 30 x 60 x 60 (z, y, x) block of trabecular bone at ``core_hu`` with a 12 x 30 x 30 ROI in its middle."""
    rng = np.random.default_rng(seed)
    hu = np.full((30, 60, 60), core_hu, np.float32) + rng.normal(0.0, noise_hu, (30, 60, 60)).astype(np.float32)
    roi = np.zeros(hu.shape, bool)
    roi[9:21, 15:45, 15:45] = True
    return hu, roi


def _island(hu: np.ndarray, diameter_mm: float, value: float = 900.0) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(hu.shape, SPACING)), indexing="ij")
    centre = (45.0, 30.0, 30.0)
    inside = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= (diameter_mm / 2) ** 2
    out = hu.copy()
    out[inside] = value
    return out


@pytest.mark.parametrize("core_hu", [-50.0, 40.0, 110.0, 400.0])
def test_uniform_roi_of_any_density_is_measured_whole(core_hu):
    """Osteoporotic, fatty, normal or sclerotic: nothing is a focus when the ROI is uniform (noise SD 30 HU)."""
    hu, roi = _phantom(core_hu, noise_hu=30.0)
    assert not focal_lesions(hu, roi, SPACING).any()


@pytest.mark.parametrize("diameter_mm", [6.0, 10.0, 15.0])
@pytest.mark.parametrize("core_hu", [40.0, 110.0])
def test_bone_island_is_excluded(core_hu, diameter_mm):
    """A 900 HU sphere inside the ROI is excluded with its rim: the ROI mean stays within 5 HU of the core."""
    hu, roi = _phantom(core_hu, noise_hu=20.0)
    edited = _island(hu, diameter_mm)
    foci = focal_lesions(edited, roi, SPACING)
    assert foci.any()
    assert abs(float(edited[roi & ~foci].mean()) - core_hu) <= 5.0


def test_lytic_focus_is_excluded():
    hu, roi = _phantom(250.0, noise_hu=20.0)
    edited = _island(hu, 10.0, value=20.0)
    foci = focal_lesions(edited, roi, SPACING)
    assert abs(float(edited[roi & ~foci].mean()) - 250.0) <= 5.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        focal_lesions(np.zeros((2, 2, 2)), np.zeros((2, 2, 3), bool), SPACING)


def test_quality_flags():
    assert quality_flags(100, 100, 30, False, 0.0, False) == []
    assert quality_flags(114, 102, 75, True, 0.1, True) == [
        "cut_by_field_of_view", "heterogeneous", "mean_median_discordant", "focal_lesion_excluded"]
    assert "excluded_over_limit" in quality_flags(100, 100, 30, True, 0.31, False)


def test_measure_levels_reports_excluded_volume_and_usability():
    """End to end on a label map: excluded volume, fraction and flags; > 30 % excluded: not usable."""
    hu, roi = _phantom(80.0, noise_hu=15.0)
    edited = _island(hu, 12.0)
    labels = np.where(roi, 20, 0).astype(np.uint8)  # L1
    affine = np.diag([*SPACING, 1.0])
    seg = SpineSegmentation(bodies=labels, trabecular=labels, confidence={20: 0.9})
    level = measure_levels(Volume(edited, affine), seg)["L1"]
    assert level.excluded_focal_volume_mm3 > 0 and "focal_lesion_excluded" in level.quality_flags
    assert abs(level.trabecular_hu_mean - 80.0) <= 5.0 and level.used_for_bone_status
    big = _island(hu, 30.0)
    level = measure_levels(Volume(big, affine), seg)["L1"]
    assert not level.used_for_bone_status and "excluded_over_limit" in level.quality_flags
