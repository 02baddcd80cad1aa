"""Label IDs shared by every stage.

Vertebra IDs follow the VerSe challenge convention (Sekuboyina et al.,
Med Image Anal 2021): 19 = T12, 20 = L1, ..., 24 = L5, 25 = L6, 26 = sacrum.
Proximal femur: 90 = right, 91 = left (osteonode convention).
"""

from __future__ import annotations

VERTEBRA_NAMES: dict[int, str] = {
    18: "T11", 19: "T12", 20: "L1", 21: "L2", 22: "L3", 23: "L4", 24: "L5", 25: "L6", 26: "sacrum",
}
VERTEBRA_IDS: dict[str, int] = {name: vid for vid, name in VERTEBRA_NAMES.items()}
FEMUR_RIGHT = 90
FEMUR_LEFT = 91
#: Levels whose trabecular HU are measured and reported.
REPORTED_LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5")
#: Levels that must be identified for a study to be evaluable.
REQUIRED_LEVELS = ("L1", "L2", "L3", "L4")
