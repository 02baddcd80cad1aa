"""Pickhardt 2013 L1 HU and ACR 2018 vBMD thresholds, at and around the cut-offs."""

from __future__ import annotations

import pytest

from osteonode.classify.rules import classify_acr_vbmd, classify_l1_hu
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


# ---------------------------------------------------------------- ACR 2018 QCT vBMD thresholds

def _vbmd(values: dict[str, float | None], fractured: tuple[str, ...] = ()) -> dict[str, LevelResult]:
    return {name: LevelResult(label_confidence=1, trabecular_hu_mean=100, trabecular_hu_median=100,
                              trabecular_hu_sd=10, trabecular_voxel_count=100, trabecular_roi_volume_mm3=100,
                              vbmd_mg_cm3=v, fracture_suspected=name in fractured)
            for name, v in values.items()}


@pytest.mark.parametrize("l1, l2, category", [
    (60, 70, "osteoporosis"), (79, 80.9, "osteoporosis"), (80, 80, "osteopenia"), (100, 110, "osteopenia"),
    (120, 120, "osteopenia"), (120, 121, "normal"), (150, 170, "normal"),
])
def test_acr_thresholds_on_mean_of_l1_l2(l1, l2, category):
    status = classify_acr_vbmd(_vbmd({"L1": l1, "L2": l2, "L3": 300.0}))
    assert status.category == category
    assert "L1 and L2" in status.basis and "ACR" in status.basis and f"{(l1 + l2) / 2:.0f} mg/cm3" in status.basis


def test_acr_skips_fractured_and_missing_levels():
    status = classify_acr_vbmd(_vbmd({"L1": 50.0, "L2": None, "L3": 130.0, "L4": 140.0}, fractured=("L1",)))
    assert status.category == "normal" and "L3 and L4" in status.basis
    assert classify_acr_vbmd(_vbmd({"L3": 70.0})).category == "osteoporosis"


def test_acr_without_vbmd_is_indeterminate():
    assert classify_acr_vbmd(_vbmd({"L1": None, "L2": None})).category == "indeterminate"
    assert classify_acr_vbmd({}).category == "indeterminate"


# ---------------------------------------------------------------- usable levels, statistic, uncertainty

def _level(hu: float, median: float | None = None, **kwargs) -> LevelResult:
    return LevelResult(label_confidence=1, trabecular_hu_mean=hu, trabecular_hu_median=hu if median is None else median,
                       trabecular_hu_sd=10, trabecular_voxel_count=100, trabecular_roi_volume_mm3=100, **kwargs)


def test_statistic_is_named():
    status = classify_l1_hu(_l1(90))
    assert status.statistic == "mean trabecular attenuation (HU) of L1, focal lesions excluded"
    assert status.uncertainty_note is None


@pytest.mark.parametrize("hu, median, other", [(113, 113, "osteoporosis"), (108, 108, "indeterminate"),
                                               (157, 157, "normal"), (120, 105, "osteoporosis")])
def test_uncertainty_note_near_a_cut_off(hu, median, other):
    """Within 5 HU, or within the mean-median gap when larger, of a cut-off: the note names the other category."""
    status = classify_l1_hu({"L1": _level(hu, median)})
    assert status.uncertainty_note is not None and f"could be {other}" in status.uncertainty_note


def test_unusable_l1_falls_back_to_l2():
    """L1 with too much excluded as focal lesion (or fractured) is not used; L2 stands in and the basis says so."""
    levels = {"L1": _level(60, used_for_bone_status=False, quality_flags=["excluded_over_limit"]),
              "L2": _level(180)}
    status = classify_l1_hu(levels)
    assert status.category == "normal" and "L2 used instead" in status.basis
    levels["L1"] = _level(60, fracture_suspected=True)
    assert classify_l1_hu(levels).category == "normal"
    levels["L2"] = _level(180, used_for_bone_status=False)
    assert classify_l1_hu(levels).category == "indeterminate"


def test_acr_skips_unusable_levels_and_notes_uncertainty():
    levels = _vbmd({"L1": 50, "L2": 118, "L3": 121})
    levels["L1"] = levels["L1"].model_copy(update={"used_for_bone_status": False})
    status = classify_acr_vbmd(levels)
    assert "L2 and L3" in status.basis and status.category == "osteopenia"
    assert status.uncertainty_note is not None and "120" in status.uncertainty_note
