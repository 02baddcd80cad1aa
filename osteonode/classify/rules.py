"""Threshold rules on trabecular attenuation.

Pickhardt PJ, Pooler BD, Lauder T, del Rio AM, Bruce RJ, Binkley N.
Opportunistic screening for osteoporosis using abdominal computed tomography
scans obtained for other indications. Ann Intern Med 2013;158(8):588-595.
L1 trabecular attenuation: <= 110 HU was >90 % specific for osteoporosis
(DXA), >= 160 HU >90 % sensitive for distinguishing from osteoporosis, i.e.
likely normal; values in between are indeterminate.

ACR-SPR-SSR Practice Parameter for the Performance of Musculoskeletal
Quantitative Computed Tomography (QCT), 2018: spine trabecular vBMD
> 120 mg/cm³ normal, 80-120 mg/cm³ low bone density, < 80 mg/cm³ osteoporosis.
"""

from __future__ import annotations

from osteonode.result import BoneCategory, BoneStatus, LevelResult

PICKHARDT_OSTEOPOROSIS_MAX_HU = 110.0
PICKHARDT_NORMAL_MIN_HU = 160.0
PICKHARDT_CITATION = "Pickhardt et al., Ann Intern Med 2013;158:588-595"


#: Smallest uncertainty (HU) of a level's trabecular mean: the +-5 HU that the robustness
#: targets allow under noise and re-segmentation (bench/robustness.py).
MIN_UNCERTAINTY_HU = 5.0
#: Levels used for the Pickhardt rule, in order of preference: L1 as in the paper, L2 when L1
#: is not usable (fracture or focal lesions over the limit).
PICKHARDT_LEVELS = ("L1", "L2")


def classify_l1_hu(levels: dict[str, LevelResult]) -> BoneStatus:
    """Bone status from the mean trabecular HU of L1 (Pickhardt 2013 thresholds).

    Parameters
    ----------
    levels : dict[str, LevelResult]
        Per-level measurements; ``"L1"`` is used, or ``"L2"`` when L1 is not
        usable (``used_for_bone_status`` False, or a suspected fracture).

    Returns
    -------
    BoneStatus
        ``osteoporosis`` at <= 110 HU, ``normal`` at >= 160 HU, otherwise
        ``indeterminate``; ``indeterminate`` also when neither level is usable.
        ``statistic`` names the statistic used (the mean over the ROI without
        focal lesions); ``uncertainty_note`` is set when a cut-off lies within
        the level's uncertainty (``MIN_UNCERTAINTY_HU``, or the gap between
        mean and median when larger) of the mean.
    """
    name = next((n for n in PICKHARDT_LEVELS if n in levels and levels[n].used_for_bone_status
                 and not levels[n].fracture_suspected), None)
    if name is None:
        return BoneStatus(category="indeterminate",
                          basis="L1 (or L2) trabecular attenuation not measured or not usable "
                                "(fracture or focal lesions over the limit)")
    level = levels[name]
    hu = level.trabecular_hu_mean
    category: BoneCategory
    if hu <= PICKHARDT_OSTEOPOROSIS_MAX_HU:
        category, rule = "osteoporosis", f"<= {PICKHARDT_OSTEOPOROSIS_MAX_HU:g} HU: likely osteoporosis"
    elif hu >= PICKHARDT_NORMAL_MIN_HU:
        category, rule = "normal", f">= {PICKHARDT_NORMAL_MIN_HU:g} HU: likely normal"
    else:
        category, rule = "indeterminate", (f"between {PICKHARDT_OSTEOPOROSIS_MAX_HU:g} and "
                                           f"{PICKHARDT_NORMAL_MIN_HU:g} HU: indeterminate")
    substitute = "" if name == "L1" else " (L1 not usable: L2 used instead)"
    uncertainty = max(MIN_UNCERTAINTY_HU, abs(hu - level.trabecular_hu_median))
    note = None
    for cut, beyond in ((PICKHARDT_OSTEOPOROSIS_MAX_HU, ("osteoporosis", "indeterminate")),
                        (PICKHARDT_NORMAL_MIN_HU, ("indeterminate", "normal"))):
        if abs(hu - cut) <= uncertainty:
            other = beyond[1] if hu <= cut else beyond[0]
            note = (f"{name} {hu:.0f} HU lies within +-{uncertainty:.0f} HU (measurement uncertainty) of the "
                    f"{cut:g} HU cut-off: the category could be {other}")
    return BoneStatus(category=category,
                      basis=f"{name} trabecular attenuation {hu:.0f} HU{substitute}, {rule} ({PICKHARDT_CITATION})",
                      statistic=f"mean trabecular attenuation (HU) of {name}, focal lesions excluded",
                      uncertainty_note=note)


# ACR-SPR-SSR Practice Parameter for the Performance of Musculoskeletal Quantitative
# Computed Tomography (QCT), 2018: spine trabecular vBMD (mean of two vertebrae,
# usually L1-L2) > 120 mg/cm3 normal, 80-120 mg/cm3 low bone density (osteopenia),
# < 80 mg/cm3 osteoporosis.
ACR_NORMAL_MIN_MG_CM3 = 120.0
ACR_OSTEOPOROSIS_MAX_MG_CM3 = 80.0
ACR_CITATION = "ACR-SPR-SSR Practice Parameter for QCT, 2018"
#: Smallest uncertainty (mg/cm3) of a vBMD mean: MIN_UNCERTAINTY_HU times the ~0.8 mg/cm3 per HU
#: slope of the internal calibration.
MIN_UNCERTAINTY_MG_CM3 = 4.0
#: Levels averaged, in order of preference (the two first available are used).
ACR_LEVELS = ("L1", "L2", "L3", "L4")


def classify_acr_vbmd(levels: dict[str, LevelResult]) -> BoneStatus:
    """Bone status from the mean trabecular vBMD of two lumbar vertebrae (ACR 2018 QCT thresholds).

    Parameters
    ----------
    levels : dict[str, LevelResult]
        Per-level results with ``vbmd_mg_cm3`` (mg/cm³ calcium hydroxyapatite).

    Returns
    -------
    BoneStatus
        The first two of L1-L4 that have a vBMD, no suspected fracture and are
        usable (``used_for_bone_status``) are
        averaged (L1-L2 when both qualify; one level when only one does):
        ``normal`` > 120 mg/cm³, ``osteopenia`` 80-120 mg/cm³,
        ``osteoporosis`` < 80 mg/cm³; ``indeterminate`` when no level has a
        vBMD (e.g. the calibration was implausible).
    """
    used = [name for name in ACR_LEVELS if name in levels and levels[name].vbmd_mg_cm3 is not None
            and not levels[name].fracture_suspected and levels[name].used_for_bone_status][:2]
    if not used:
        return BoneStatus(category="indeterminate",
                          basis=f"no calibrated vBMD of L1-L4 without suspected fracture ({ACR_CITATION})")
    vbmd = sum(levels[name].vbmd_mg_cm3 or 0.0 for name in used) / len(used)  # used: vBMD not None
    category: BoneCategory
    if vbmd > ACR_NORMAL_MIN_MG_CM3:
        category, rule = "normal", f"> {ACR_NORMAL_MIN_MG_CM3:g} mg/cm3: normal"
    elif vbmd < ACR_OSTEOPOROSIS_MAX_MG_CM3:
        category, rule = "osteoporosis", f"< {ACR_OSTEOPOROSIS_MAX_MG_CM3:g} mg/cm3: osteoporosis"
    else:
        category, rule = "osteopenia", (f"{ACR_OSTEOPOROSIS_MAX_MG_CM3:g}-{ACR_NORMAL_MIN_MG_CM3:g} mg/cm3: "
                                        "low bone density (osteopenia)")
    note = None
    for cut in (ACR_OSTEOPOROSIS_MAX_MG_CM3, ACR_NORMAL_MIN_MG_CM3):
        if abs(vbmd - cut) <= MIN_UNCERTAINTY_MG_CM3:
            note = (f"vBMD {vbmd:.0f} mg/cm3 lies within +-{MIN_UNCERTAINTY_MG_CM3:g} mg/cm3 (measurement "
                    f"uncertainty) of the {cut:g} mg/cm3 cut-off: the category could change")
    return BoneStatus(category=category,
                      basis=f"mean trabecular vBMD of {' and '.join(used)} {vbmd:.0f} mg/cm3, {rule} ({ACR_CITATION}; "
                            "phantomless internal calibration)",
                      statistic=f"mean of the trabecular vBMD (mg/cm3) of {' and '.join(used)}, focal lesions excluded",
                      uncertainty_note=note)
