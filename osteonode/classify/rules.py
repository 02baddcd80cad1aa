"""Threshold rules on trabecular attenuation.

Pickhardt PJ, Pooler BD, Lauder T, del Rio AM, Bruce RJ, Binkley N.
Opportunistic screening for osteoporosis using abdominal computed tomography
scans obtained for other indications. Ann Intern Med 2013;158(8):588-595.
L1 trabecular attenuation: <= 110 HU was >90 % specific for osteoporosis
(DXA), >= 160 HU >90 % sensitive for distinguishing from osteoporosis, i.e.
likely normal; values in between are indeterminate.
"""

from __future__ import annotations

from osteonode.result import BoneStatus, LevelResult

PICKHARDT_OSTEOPOROSIS_MAX_HU = 110.0
PICKHARDT_NORMAL_MIN_HU = 160.0
PICKHARDT_CITATION = "Pickhardt et al., Ann Intern Med 2013;158:588-595"


def classify_l1_hu(levels: dict[str, LevelResult]) -> BoneStatus:
    """Bone status from the mean trabecular HU of L1 (Pickhardt 2013 thresholds).

    Parameters
    ----------
    levels : dict[str, LevelResult]
        Per-level measurements; ``"L1"`` is used.

    Returns
    -------
    BoneStatus
        ``osteoporosis`` at <= 110 HU, ``normal`` at >= 160 HU, otherwise
        ``indeterminate``; ``indeterminate`` also when L1 was not measured.
    """
    l1 = levels.get("L1")
    if l1 is None:
        return BoneStatus(category="indeterminate", basis="L1 trabecular attenuation not measured")
    hu = l1.trabecular_hu_mean
    if hu <= PICKHARDT_OSTEOPOROSIS_MAX_HU:
        category, rule = "osteoporosis", f"<= {PICKHARDT_OSTEOPOROSIS_MAX_HU:g} HU: likely osteoporosis"
    elif hu >= PICKHARDT_NORMAL_MIN_HU:
        category, rule = "normal", f">= {PICKHARDT_NORMAL_MIN_HU:g} HU: likely normal"
    else:
        category, rule = "indeterminate", (f"between {PICKHARDT_OSTEOPOROSIS_MAX_HU:g} and "
                                           f"{PICKHARDT_NORMAL_MIN_HU:g} HU: indeterminate")
    return BoneStatus(category=category,
                      basis=f"L1 trabecular attenuation {hu:.0f} HU, {rule} ({PICKHARDT_CITATION})")
