"""Pickhardt 2013 L1 HU thresholds, at and around the cut-offs."""

from __future__ import annotations

import pytest

from osteonode.classify.rules import classify_l1_hu
from osteonode.result import LevelResult


def _l1(hu: float) -> dict[str, LevelResult]:
    return {"L1": LevelResult(label_confidence=1, trabecular_hu_mean=hu, trabecular_hu_median=hu,
                              trabecular_hu_sd=10, trabecular_voxel_count=100, trabecular_roi_volume_mm3=100)}


@pytest.mark.parametrize("hu, category", [
    (60, "osteoporosis"), (110, "osteoporosis"), (110.1, "indeterminate"), (135, "indeterminate"),
    (159.9, "indeterminate"), (160, "normal"), (250, "normal"),
])
def test_thresholds(hu, category):
    status = classify_l1_hu(_l1(hu))
    assert status.category == category
    assert "Pickhardt" in status.basis and f"{hu:.0f} HU" in status.basis


def test_missing_l1_is_indeterminate():
    assert classify_l1_hu({}).category == "indeterminate"
