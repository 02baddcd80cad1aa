"""Vertebral body heights and Genant semi-quantitative grading.

Genant HK, Wu CY, van Kuijk C, Nevitt MC. Vertebral fracture assessment using
a semiquantitative technique. J Bone Miner Res 1993;8:1137-1148. Grade by the
reduction of anterior, middle and/or posterior height: 0 normal (< 20 %),
1 mild (20-25 %), 2 moderate (25-40 %), 3 severe (> 40 %).

Measurement
-----------
Each body of the label map is measured in its own frame, in patient space
(LPS mm, so any orientation and slice order works):

* **height axis**: the spine axis at this level, the line through the
  centroids of the neighbouring bodies (cranial minus caudal; one neighbour:
  this centroid and that one; none: patient superior); it is not the body's
  own principal axis, which a wedge deformity would tilt;
* **lateral axis**: patient left, made perpendicular to it; **anterior axis**:
  perpendicular to both, pointing to patient anterior.

The label map is sampled (nearest neighbour, 0.5 mm) on three sagittal planes
through the centroid and 3 mm to either side (mid-sagittal). On each plane,
every anterior-posterior column gives a height (its superior-most minus
inferior-most sample inside the body, plus one step). Over the body depth
``D`` (posterior to anterior margin on that plane, the margins being the
outermost columns at least half the median column height tall):

* anterior height ``Ha``: median column height 5-15 % of ``D`` behind the anterior margin,
* middle height ``Hm``: 45-55 % of ``D``,
* posterior height ``Hp``: 5-15 % of ``D`` in front of the posterior margin,

each the median over the three planes (the 5 % keep the rounded corners and
the cortical rim out, as the six-point placement of morphometry does).

Grading
-------
Height loss is the largest of ``1 - Ha/Hp`` (wedge), ``1 - Hm/Hp``
(biconcave) and ``1 - Hp/Hp_ref`` (crush), where ``Hp_ref`` is the mean
posterior height of the neighbouring levels: the vertebra's own posterior
height cannot serve as the reference when the whole body is compressed. A
grade of 1 or more flags a possible fracture. Measured but not graded (and
not used as a reference): L5, which is wedge-shaped in health (Genant's
method grades T4-L4).

Bodies cut by the field of view
-------------------------------
A body within 3 mm of the edge of the volume, or listed in
``SpineSegmentation.cut_by_field_of_view`` by the segmentation backend, may
be cut by the edge of the scan: its heights would be those of the cut, not of
the vertebra. It gets no heights, no ratios and no grade, is not a reference
for its neighbours, and :func:`apply_genant` sets its ``cut_by_field_of_view``
and adds the quality flag ``"cut_by_field_of_view"``
(:data:`osteonode.result.QUALITY_FLAG_TEXT`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from osteonode.anatomy import REPORTED_LEVELS, VERTEBRA_IDS, VERTEBRA_NAMES
from osteonode.measure.tissues import body_centres_mm
from osteonode.result import LevelResult
from osteonode.segment import SpineSegmentation
from osteonode.volume import Volume

log = logging.getLogger(__name__)

#: Sampling step on the sagittal planes, mm.
STEP_MM = 0.5
#: Lateral offsets (mm) of the sagittal planes from the body centroid.
PLANE_OFFSETS_MM = (-3.0, 0.0, 3.0)
#: Fractions of the body depth, from the anterior margin, of the three height windows.
WINDOWS = {"anterior": (0.05, 0.15), "middle": (0.45, 0.55), "posterior": (0.85, 0.95)}
#: Columns shorter than this fraction of the median column height do not set the body's margins.
MARGIN_HEIGHT_FRACTION = 0.5
#: Levels graded (Genant et al. 1993 grade T4-L4; L5 is measured only).
GRADED_LEVELS = ("T12", "L1", "L2", "L3", "L4")
#: A body closer than this (mm) to the edge of the volume may be cut by the field of view.
EDGE_MARGIN_MM = 3.0
#: Reason of a level whose body is cut by the field of view.
CUT_REASON = "not measured: the body reaches the edge of the volume (cut by the field of view)"
#: Height-loss limits of grades 1, 2, 3 (Genant et al. 1993).
GRADE_LIMITS = (0.20, 0.25, 0.40)
GENANT_CITATION = "Genant HK et al., J Bone Miner Res 1993;8:1137-1148"


@dataclass(frozen=True)
class GenantMeasurement:
    """Heights, ratios and Genant grade of one vertebral body.

    Attributes
    ----------
    height_anterior_mm, height_middle_mm, height_posterior_mm : float or None
        Body heights along the spine axis, mm; None for a body cut by the field of view.
    reference_posterior_mm : float or None
        Mean posterior height of the neighbouring levels, mm.
    height_ratios : dict[str, float]
        ``anterior_posterior``, ``middle_posterior`` and, with a reference,
        ``posterior_reference``.
    height_loss : float
        Largest relative height reduction (0..1).
    genant_grade : int or None
        0-3, ``None`` when not graded (see ``reason``).
    fracture_suspected : bool or None
        Grade >= 1; ``None`` when not graded.
    reason : str or None
        Why the level was not graded.
    cut_by_field_of_view : bool
        The body is (possibly) cut by the edge of the scan: not measured.
    """

    height_anterior_mm: float | None
    height_middle_mm: float | None
    height_posterior_mm: float | None
    reference_posterior_mm: float | None
    height_ratios: dict[str, float]
    height_loss: float | None
    genant_grade: int | None
    fracture_suspected: bool | None
    reason: str | None = None
    cut_by_field_of_view: bool = False


def genant_grade(height_loss: float) -> int:
    """Genant grade (0-3) of a relative height loss (0..1): < 20 %, 20-25 %, 25-40 %, > 40 %."""
    if height_loss < GRADE_LIMITS[0]:
        return 0
    if height_loss < GRADE_LIMITS[1]:
        return 1
    return 2 if height_loss <= GRADE_LIMITS[2] else 3


def _frame(centres: dict[int, np.ndarray], vid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit height (superior), anterior and left axes (LPS) of body ``vid``."""
    above, below = centres.get(vid - 1), centres.get(vid + 1)
    here = centres[vid]
    axis = (above if above is not None else here) - (below if below is not None else here)
    if np.linalg.norm(axis) < 1e-6:
        axis = np.array([0.0, 0.0, 1.0])
    height = axis / np.linalg.norm(axis) * (1.0 if axis[2] >= 0 else -1.0)
    left = np.array([1.0, 0.0, 0.0]) - height * height[0]
    left /= np.linalg.norm(left)
    return height, np.cross(left, height), left  # left x superior = anterior (LPS: -y)


def _heights(volume: Volume, mask: np.ndarray, centre: np.ndarray,
             axes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, float] | None:
    """Anterior, middle and posterior heights (mm) on the mid-sagittal planes."""
    height_ax, anterior_ax, left_ax = axes
    grid = np.arange(-45.0, 45.0 + STEP_MM / 2, STEP_MM)
    a, h = np.meshgrid(grid, grid, indexing="ij")  # (anterior, height) samples
    inverse = np.linalg.inv(volume.affine[:3, :3])
    per_plane = []
    for offset in PLANE_OFFSETS_MM:
        pts = (centre + offset * left_ax)[None, :] + a.reshape(-1, 1) * anterior_ax + h.reshape(-1, 1) * height_ax
        index = (pts - volume.affine[:3, 3]) @ inverse.T
        inside = ndi.map_coordinates(mask, index.T, order=0, mode="constant", cval=0).reshape(a.shape) > 0
        cols = np.nonzero(inside.any(axis=1))[0]
        if cols.size < 2:
            continue
        top = np.where(inside[cols], h[cols], -np.inf).max(axis=1)
        bottom = np.where(inside[cols], h[cols], np.inf).min(axis=1)
        col_height = top - bottom + STEP_MM
        pos = grid[cols]
        # the margins are those of the body proper: columns at least MARGIN_HEIGHT_FRACTION of the
        # median column height (a thin protrusion -- osteophyte, pedicle base, a voxel of the
        # posterior wall at mid-height -- would otherwise move a margin and its 5-15 % window)
        proper = col_height >= MARGIN_HEIGHT_FRACTION * float(np.median(col_height))
        front, back = pos[proper].max(), pos[proper].min()
        depth = front - back
        windows = {name: (pos <= front - f0 * depth + 1e-9) & (pos >= front - f1 * depth - 1e-9)
                   for name, (f0, f1) in WINDOWS.items()}
        if all(sel.any() for sel in windows.values()):
            per_plane.append({name: float(np.median(col_height[sel])) for name, sel in windows.items()})
    if not per_plane:
        return None
    return {name: float(np.median([p[name] for p in per_plane])) for name in WINDOWS}


def grade_levels(volume: Volume, segmentation: SpineSegmentation) -> dict[str, GenantMeasurement]:
    """Measure body heights and grade every reported level (T12-L5) by Genant's method.

    Parameters
    ----------
    volume : Volume
        CT volume: only its grid (``affine`` to LPS mm, shape ``(z, y, x)``) is used.
    segmentation : SpineSegmentation
        ``bodies`` ``(z, y, x)`` label map, VerSe IDs, on the volume's grid;
        ``cut_by_field_of_view``: VerSe IDs of bodies cut by the edge of the scan.

    Returns
    -------
    dict[str, GenantMeasurement]
        Level name -> measurement, cranio-caudal order; levels whose body is
        missing or too small to sample are absent. A body within
        :data:`EDGE_MARGIN_MM` of the edge of the volume or in
        ``segmentation.cut_by_field_of_view`` has a measurement without heights
        (``cut_by_field_of_view=True``, reason :data:`CUT_REASON`).

    Raises
    ------
    ValueError
        If the label map is not on the volume's grid.
    """
    bodies = segmentation.bodies
    if bodies.shape != volume.hu.shape:
        raise ValueError(f"body label map shape {bodies.shape} != volume {volume.hu.shape}")
    centres = body_centres_mm(volume, bodies)
    raw: dict[int, tuple[dict[str, float], str | None]] = {}
    margin = [1 + int(np.ceil(EDGE_MARGIN_MM / sp)) for sp in volume.spacing]  # edge voxel + 3 mm
    cut: list[int] = []
    for name in REPORTED_LEVELS:
        vid = VERTEBRA_IDS[name]
        if vid not in centres:
            continue
        mask = bodies == vid
        if vid in segmentation.cut_by_field_of_view or any(
                mask.take(np.r_[0:m, n - m:n], axis=ax).any() for ax, (m, n) in enumerate(zip(margin, mask.shape))):
            cut.append(vid)
            continue
        heights = _heights(volume, mask.view(np.uint8), centres[vid], _frame(centres, vid))
        if heights is None:
            continue
        reason = None
        if name not in GRADED_LEVELS:
            reason = f"{name} not graded: wedge-shaped in health (Genant's method grades T4-L4)"
        raw[vid] = (heights, reason)
    out = {VERTEBRA_NAMES[vid]: GenantMeasurement(
        height_anterior_mm=None, height_middle_mm=None, height_posterior_mm=None, reference_posterior_mm=None,
        height_ratios={}, height_loss=None, genant_grade=None, fracture_suspected=None, reason=CUT_REASON,
        cut_by_field_of_view=True) for vid in cut}
    for vid, (heights, reason) in raw.items():
        neighbours = [raw[n][0]["posterior"] for n in (vid - 1, vid + 1) if n in raw and raw[n][1] is None]
        reference = float(np.mean(neighbours)) if neighbours else None
        ha, hm, hp = heights["anterior"], heights["middle"], heights["posterior"]
        ratios = {"anterior_posterior": round(ha / hp, 3), "middle_posterior": round(hm / hp, 3)}
        losses = [1.0 - ha / hp, 1.0 - hm / hp]
        if reference is not None:
            ratios["posterior_reference"] = round(hp / reference, 3)
            losses.append(1.0 - hp / reference)
        loss = max(0.0, max(losses))
        grade = None if reason else genant_grade(loss)
        out[VERTEBRA_NAMES[vid]] = GenantMeasurement(
            height_anterior_mm=round(ha, 1), height_middle_mm=round(hm, 1), height_posterior_mm=round(hp, 1),
            reference_posterior_mm=None if reference is None else round(reference, 1),
            height_ratios=ratios, height_loss=round(loss, 3), genant_grade=grade,
            fracture_suspected=None if grade is None else grade >= 1,
            reason=reason)
    log.info("Genant grades: %s; cut by the field of view: %s", {k: m.genant_grade for k, m in out.items()},
             [VERTEBRA_NAMES[vid] for vid in cut])
    return {name: out[name] for name in REPORTED_LEVELS if name in out}


def apply_genant(levels: dict[str, LevelResult], measurements: dict[str, GenantMeasurement]
                 ) -> dict[str, LevelResult]:
    """Copy heights, ratios, grade and fracture flag into the level results.

    Parameters
    ----------
    levels : dict[str, LevelResult]
        Per-level results (trabecular HU, vBMD).
    measurements : dict[str, GenantMeasurement]
        From :func:`grade_levels`.

    Returns
    -------
    dict[str, LevelResult]
        Copies of ``levels``; a level without a measurement is unchanged. A
        level whose body is cut by the field of view gets no heights, ratios,
        grade or fracture flag, ``cut_by_field_of_view=True`` and the quality
        flag ``"cut_by_field_of_view"`` (added once).
    """
    out = {}
    for name, level in levels.items():
        m = measurements.get(name)
        if m is None:
            out[name] = level
            continue
        update = {"height_anterior_mm": m.height_anterior_mm, "height_middle_mm": m.height_middle_mm,
                  "height_posterior_mm": m.height_posterior_mm, "height_ratios": m.height_ratios or None,
                  "genant_grade": m.genant_grade, "fracture_suspected": m.fracture_suspected}
        if m.cut_by_field_of_view:
            flags = list(level.quality_flags)
            update |= {"cut_by_field_of_view": True,
                       "quality_flags": flags if "cut_by_field_of_view" in flags else ["cut_by_field_of_view", *flags]}
        out[name] = level.model_copy(update=update)
    return out
