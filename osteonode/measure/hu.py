"""Trabecular attenuation (HU) per vertebral level, with focal lesions excluded.

The ROI is the trabecular ROI of the segmentation backend (see
:mod:`osteonode.segment`), which keeps clear of cortex and endplates as in
Pickhardt et al., Ann Intern Med 2013;158:588-595.

Focal lesions
-------------
An ROI is placed in trabecular bone "avoiding focal lesions" (Pickhardt 2013;
the ACR-SPR-SSR QCT practice parameter, 2018): a bone island (enostosis,
~700-1200 HU), a sclerotic or a lytic metastasis inside the ROI would move the
mean by tens of HU. Inside the ROI, voxels further than ``FOCUS_LIMIT_HU`` from
the ROI's median (or 5 robust standard deviations, whichever is larger) are
outliers; connected groups of them of at least ``FOCUS_MIN_MM3`` are foci, and
each focus is excluded together with a rim of ``FOCUS_RIM_MM`` (the
partial-volume edge of a lesion on 1-3 mm CT). The limit is far above the
spread of trabecular bone and image noise (SD 20-60 HU), and it is relative to
the ROI's own median, so a uniformly low (osteoporotic, fatty) or high
(sclerotic) ROI is measured whole. The mean, median and SD are then taken over
the remaining voxels. When more than ``MAX_EXCLUDED_FRACTION`` of the ROI is
excluded, the level is not used for the bone status.

Quality flags (``LevelResult.quality_flags``) tell the reader when a level's
measurement may be unreliable: a heterogeneous ROI (SD above
``HETEROGENEOUS_SD_HU``), mean and median further apart than
``DISCORDANT_HU``, an excluded focus, too much excluded.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from osteonode.anatomy import FEMUR_LEFT, FEMUR_RIGHT, REPORTED_LEVELS, VERTEBRA_IDS
from osteonode.result import LevelResult, ProximalFemurResult
from osteonode.segment import FemurSegmentation, Side, SpineSegmentation
from osteonode.volume import Volume, bounding_box

#: Fewer ROI voxels than this and the level is not reported (too small to be a trabecular ROI).
MIN_ROI_VOXELS = 10
#: A voxel this far (HU) from the ROI median, at least, is an outlier (focal lesion candidate).
FOCUS_LIMIT_HU = 150.0
#: ... or this many robust standard deviations (1.4826 x MAD), when that is larger.
FOCUS_LIMIT_SD = 5.0
#: Smallest focus excluded, mm³ (isolated noise voxels are not lesions).
FOCUS_MIN_MM3 = 20.0
#: Partial-volume rim excluded around a focus, mm.
FOCUS_RIM_MM = 2.0
#: More of the ROI excluded than this fraction and the level is not used for the bone status.
MAX_EXCLUDED_FRACTION = 0.3
#: SD (HU) of the measured voxels above which the ROI is flagged heterogeneous.
HETEROGENEOUS_SD_HU = 60.0
#: Mean and median further apart than this (HU) are flagged.
DISCORDANT_HU = 10.0


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
        mean, median and SD in HU over the ROI without focal lesions
        (:func:`focal_lesions`), ROI volume in mm³ (measured voxels), the
        excluded volume and fraction, and the quality flags.

    Raises
    ------
    ValueError
        If the label map is not on the volume's grid.
    """
    volume.require_grid(segmentation.trabecular, "trabecular ROI")
    voxel_mm3 = float(np.prod(volume.spacing))
    levels = {}
    for name in REPORTED_LEVELS:
        vid = VERTEBRA_IDS[name]
        roi = segmentation.trabecular == vid
        if np.count_nonzero(roi) < MIN_ROI_VOXELS:
            continue
        box = bounding_box(roi, 1)
        roi_box, hu_box = roi[box], volume.hu[box]
        foci = focal_lesions(hu_box, roi_box, volume.spacing)
        values = hu_box[roi_box & ~foci]
        excluded = int(np.count_nonzero(foci))
        fraction = excluded / max(int(np.count_nonzero(roi_box)), 1)
        if values.size < MIN_ROI_VOXELS:
            values = hu_box[roi_box]  # (almost) all excluded: report the whole ROI, unusable
            fraction = 1.0
        mean, median, sd = float(values.mean()), float(np.median(values)), float(values.std())
        cut = vid in segmentation.cut_by_field_of_view
        flags = quality_flags(mean, median, sd, excluded > 0, fraction, cut)
        levels[name] = LevelResult(
            label_confidence=round(float(segmentation.confidence.get(vid, 0.0)), 3),
            trabecular_hu_mean=round(mean, 1),
            trabecular_hu_median=round(median, 1),
            trabecular_hu_sd=round(sd, 1),
            trabecular_voxel_count=int(values.size),
            trabecular_roi_volume_mm3=round(values.size * voxel_mm3, 1),
            excluded_focal_volume_mm3=round(excluded * voxel_mm3, 1),
            excluded_fraction=round(min(fraction, 1.0), 3),
            cut_by_field_of_view=cut,
            quality_flags=flags,
            used_for_bone_status="excluded_over_limit" not in flags,
        )
    return levels


def measure_proximal_femurs(volume: Volume, femurs: FemurSegmentation | None
                            ) -> dict[Side, ProximalFemurResult]:
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
    sides: tuple[tuple[Side, int], ...] = (("right", FEMUR_RIGHT), ("left", FEMUR_LEFT))
    for side, label in sides:
        outcome = femurs.sides.get(side)
        if outcome is None:
            continue
        values = volume.hu[femurs.labels == label] if outcome.status == "segmented" else np.empty(0)
        out[side] = ProximalFemurResult(
            status=outcome.status, reason=outcome.reason,
            volume_mm3=round(values.size * voxel_mm3, 1) if values.size else None,
            hu_mean=round(float(values.mean()), 1) if values.size else None)
    return out


def focal_lesions(hu: np.ndarray, roi: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxels of focal sclerotic or lytic lesions inside a trabecular ROI (module docstring).

    Parameters
    ----------
    hu : numpy.ndarray
        ``(z, y, x)`` HU (a crop around the ROI is enough).
    roi : numpy.ndarray
        Boolean ``(z, y, x)`` ROI, same shape.
    spacing : tuple of float
        ``(sz, sy, sx)`` voxel spacing, mm.

    Returns
    -------
    numpy.ndarray
        Boolean ``(z, y, x)`` mask of the excluded voxels (foci with their
        partial-volume rim), inside ``roi``.

    Raises
    ------
    ValueError
        If ``hu`` and ``roi`` differ in shape.
    """
    if hu.shape != roi.shape:
        raise ValueError(f"HU shape {hu.shape} != ROI shape {roi.shape}")
    values = hu[roi]
    if values.size == 0:
        return np.zeros(roi.shape, bool)
    median = float(np.median(values))
    robust_sd = 1.4826 * float(np.median(np.abs(values - median)))
    limit = max(FOCUS_LIMIT_HU, FOCUS_LIMIT_SD * robust_sd)
    outlier = roi & (np.abs(hu - median) > limit)
    if not outlier.any():
        return outlier
    labels, n = ndi.label(outlier, structure=np.ones((3, 3, 3), bool))
    voxel_mm3 = float(np.prod(spacing))
    sizes = ndi.sum_labels(outlier, labels, index=np.arange(1, n + 1)) * voxel_mm3
    foci = np.isin(labels, 1 + np.nonzero(sizes >= FOCUS_MIN_MM3)[0])
    if not foci.any():
        return foci
    rim = np.maximum(1, np.round(FOCUS_RIM_MM / np.asarray(spacing))).astype(int)
    grids = np.meshgrid(*[np.arange(-r, r + 1) * s for r, s in zip(rim, spacing)], indexing="ij")
    ball = sum(g ** 2 for g in grids) <= max(FOCUS_RIM_MM, float(min(spacing))) ** 2 + 1e-6
    return ndi.binary_dilation(foci, structure=ball) & roi


def quality_flags(mean: float, median: float, sd: float, focus_excluded: bool, excluded_fraction: float,
                  cut_by_field_of_view: bool) -> list:
    """Quality flags of one level's trabecular measurement (codes of ``osteonode.result.QualityFlag``).

    Parameters
    ----------
    mean, median, sd : float
        Statistics of the measured voxels, HU.
    focus_excluded : bool
        Whether a focal lesion was excluded from the ROI.
    excluded_fraction : float
        Excluded fraction of the ROI, 0..1.
    cut_by_field_of_view : bool
        Whether the body is cut by the edge of the scan.
    """
    flags = []
    if cut_by_field_of_view:
        flags.append("cut_by_field_of_view")
    if sd > HETEROGENEOUS_SD_HU:
        flags.append("heterogeneous")
    if abs(mean - median) > DISCORDANT_HU:
        flags.append("mean_median_discordant")
    if focus_excluded:
        flags.append("focal_lesion_excluded")
    if excluded_fraction > MAX_EXCLUDED_FRACTION:
        flags.append("excluded_over_limit")
    return flags

