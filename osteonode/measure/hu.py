"""Trabecular attenuation (HU) per vertebral level.

The ROI is the trabecular ROI of the segmentation backend (see
:mod:`osteonode.segment`), which keeps clear of cortex and endplates as in
Pickhardt et al., Ann Intern Med 2013;158:588-595.
"""

from __future__ import annotations

import numpy as np

from osteonode.anatomy import FEMUR_LEFT, FEMUR_RIGHT, REPORTED_LEVELS, VERTEBRA_IDS
from osteonode.result import LevelResult, ProximalFemurResult
from osteonode.segment import FemurSegmentation, SpineSegmentation
from osteonode.volume import Volume

#: Fewer ROI voxels than this and the level is not reported (too small to be a trabecular ROI).
MIN_ROI_VOXELS = 10


def measure_levels(volume: Volume, segmentation: SpineSegmentation) -> dict[str, LevelResult]:
    """Trabecular HU statistics for each reported level present in the segmentation.

    Parameters
    ----------
    volume : Volume
        CT volume, ``(z, y, x)`` in HU.
    segmentation : SpineSegmentation
        ``trabecular`` label map on the same ``(z, y, x)`` grid, VerSe IDs.

    Returns
    -------
    dict[str, LevelResult]
        Keyed by level name (``"T12"``, ``"L1"``, ...), in cranio-caudal order;
        mean, median and SD in HU, ROI volume in mm³.

    Raises
    ------
    ValueError
        If the label map is not on the volume's grid.
    """
    if segmentation.trabecular.shape != volume.hu.shape:
        raise ValueError(f"trabecular ROI shape {segmentation.trabecular.shape} != volume {volume.hu.shape}")
    voxel_mm3 = float(np.prod(volume.spacing))
    levels = {}
    for name in REPORTED_LEVELS:
        vid = VERTEBRA_IDS[name]
        values = volume.hu[segmentation.trabecular == vid]
        if values.size < MIN_ROI_VOXELS:
            continue
        levels[name] = LevelResult(
            label_confidence=round(float(segmentation.confidence.get(vid, 0.0)), 3),
            trabecular_hu_mean=round(float(values.mean()), 1),
            trabecular_hu_median=round(float(np.median(values)), 1),
            trabecular_hu_sd=round(float(values.std()), 1),
            trabecular_voxel_count=int(values.size),
            trabecular_roi_volume_mm3=round(values.size * voxel_mm3, 1),
        )
    return levels


def measure_proximal_femurs(volume: Volume, femurs: FemurSegmentation | None
                            ) -> dict[str, ProximalFemurResult]:
    """Status, volume (mm³) and mean HU of each side's proximal femur (90 right, 91 left).

    Parameters
    ----------
    volume : Volume
        CT volume, ``(z, y, x)`` in HU.
    femurs : FemurSegmentation or None
        Label map on the same grid and per-side status; None when the backend
        does not segment femurs (then nothing is reported).
    """
    if femurs is None:
        return {}
    voxel_mm3 = float(np.prod(volume.spacing))
    out = {}
    for side, label in (("right", FEMUR_RIGHT), ("left", FEMUR_LEFT)):
        outcome = femurs.sides.get(side)
        if outcome is None:
            continue
        values = volume.hu[femurs.labels == label] if outcome.status == "segmented" else np.empty(0)
        out[side] = ProximalFemurResult(
            status=outcome.status, reason=outcome.reason,
            volume_mm3=round(values.size * voxel_mm3, 1) if values.size else None,
            hu_mean=round(float(values.mean()), 1) if values.size else None)
    return out
