"""Import a TotalSegmentator multilabel label map as the segmentation backend.

``osteonode analyze --segmentation FILE`` (and the matching config option) uses
an external label map instead of the built-in segmentation: the multilabel
NIfTI that ``TotalSegmentator --ml`` writes for the ``total`` task
(Wasserthal J et al., Radiology: AI 2023;5(5):e230024). The map is resampled
onto the CT grid by physical coordinates (nearest neighbour), so it may have
any grid, orientation or axis flips of its own.

Class IDs used (``totalsegmentator/map_to_binary.py``, ``class_map``)
---------------------------------------------------------------------
=====================  ========================  ========================
structure              v1 (``total_v1``, 104)    v2 (``total``, 117)
=====================  ========================  ========================
vertebrae T11 ... L5   24, 23 (T12), 22 ... 18   33, 32 (T12), 31 ... 27
vertebra S1            (in sacrum)               26
sacrum                 92                        25
femur left / right     88 / 89                   75 / 76
hip left / right       90 / 91                   77 / 78
kidney left / right    3 / 2                     3 / 2
adrenal left / right   12 / 11                   9 / 8
iliac artery l / r     51 / 52                   65 / 66
gluteus maximus l / r  94 / 95                   80 / 81
autochthon l / r       100 / 101                 86 / 87
iliopsoas l / r        102 / 103                 88 / 89
rib 12 left / right    69 / 81                   103 / 115
=====================  ========================  ========================

Telling v1 from v2 (``version="auto"``): a label above 104 exists only in v2.
Otherwise each table is checked against the CT: the labels it calls bone
(vertebrae, sacrum, femurs, hips) must have a median above 100 HU, the labels
it calls T1-T9 (v1: 34 ... 26, v2: 43 ... 35) must be smaller than 55 cm3 (a
lumbar vertebra is 50-100 cm3), and each left/right pair above must lie on its
side of the patient. The table with fewer contradictions wins; a tie raises
``ValueError`` (set the version).

Derived structures, with the rules of the built-in backend
----------------------------------------------------------
* whole vertebrae: the vertebra labels, as VerSe IDs (T11 = 18 ... L5 = 24,
  sacrum and S1 = 26);
* vertebral bodies: the part of each vertebra anterior to its spinal canal.
  The canal is the hole the vertebra encloses in each axial slice (its
  anterior edge, interpolated between slices where the ring is open, is the
  posterior wall of the body); where no slice encloses it, the first point
  below 50 HU walking posteriorly from the front of the vertebra in the midline;
* trabecular ROIs: :func:`osteonode.segment.roi.trabecular_roi`, the same rule
  as the built-in backend, with the spine axis from the body's shape;
* proximal femurs: femur_right -> 90, femur_left -> 91 (the whole femur in
  view); a side with metal (> 2500 HU) within 10 mm of its femur is excluded.

Level names are TotalSegmentator's: its labels are trusted (confidence 0.9)
when the vertebrae are in cranio-caudal order, and 0.5 otherwise. A vertebra
touching the top or bottom of the field of view is incomplete (half
confidence), and L1-L4 must all be complete for the study to be evaluable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from osteonode.anatomy import FEMUR_LEFT, FEMUR_RIGHT, VERTEBRA_IDS, VERTEBRA_NAMES
from osteonode.segment import FemurSegmentation, FemurSide, Side, SpineSegmentation
from osteonode.segment.femur import METAL_HU, MIN_FEMUR_CM3, MIN_METAL_CM3, metal_cm3_near
from osteonode.segment.frame import CanonicalFrame, fill_holes, largest_component_filled
from osteonode.segment.levels import missing_levels_reason
from osteonode.segment.roi import trabecular_roi
from osteonode.volume import Volume, bounding_box

log = logging.getLogger(__name__)

Version = Literal["auto", "v1", "v2"]

#: VerSe ID -> TotalSegmentator class ID(s), per version.
VERTEBRAE: dict[str, dict[int, tuple[int, ...]]] = {
    "v1": {18: (24,), 19: (23,), 20: (22,), 21: (21,), 22: (20,), 23: (19,), 24: (18,), 26: (92,)},
    "v2": {18: (33,), 19: (32,), 20: (31,), 21: (30,), 22: (29,), 23: (28,), 24: (27,), 26: (25, 26)},
}
#: Side -> TotalSegmentator femur class ID, per version.
FEMURS: dict[str, dict[Side, int]] = {"v1": {"left": 88, "right": 89}, "v2": {"left": 75, "right": 76}}
#: Hip bone class IDs (left, right), per version.
HIPS: dict[str, tuple[int, int]] = {"v1": (90, 91), "v2": (77, 78)}
#: (left, right) class ID pairs used to tell the versions apart, per version.
PAIRS: dict[str, tuple[tuple[int, int], ...]] = {
    "v1": ((3, 2), (12, 11), (51, 52), (88, 89), (90, 91), (94, 95), (100, 101), (102, 103), (69, 81)),
    "v2": ((3, 2), (9, 8), (65, 66), (75, 76), (77, 78), (80, 81), (86, 87), (88, 89), (103, 115)),
}
#: Class IDs of T1-T9, per version (only to tell the versions apart).
UPPER_THORACIC: dict[str, range] = {"v1": range(26, 35), "v2": range(35, 44)}
#: A whole T1-T9 vertebra larger than this (cm3) contradicts the table (adult lumbar vertebrae are 50-100 cm3).
UPPER_THORACIC_MAX_CM3 = 55.0
#: Highest class ID of TotalSegmentator v1.
V1_MAX_ID = 104
#: Median HU above which a structure counts as bone when telling the versions apart.
BONE_MEDIAN_HU = 100.0
#: Confidence of levels named by the imported map.
IMPORTED_CONFIDENCE = 0.9


def load_totalsegmentator(path: Path, volume: Volume, version: Version = "auto") -> SpineSegmentation:
    """Read a TotalSegmentator multilabel NIfTI as a :class:`SpineSegmentation` on the CT grid.

    Parameters
    ----------
    path : pathlib.Path
        Multilabel NIfTI (``TotalSegmentator --ml``, task ``total``), any grid
        and orientation covering the CT.
    volume : Volume
        The CT; ``volume.hu`` is ``(z, y, x)`` in HU and ``volume.affine`` maps
        ``(z, y, x, 1)`` to LPS mm. The result is on this grid.
    version : {"auto", "v1", "v2"}
        TotalSegmentator class table; ``"auto"`` tells them apart (module docstring).

    Returns
    -------
    SpineSegmentation
        ``whole``, ``bodies`` and ``trabecular`` ``(z, y, x)`` uint8 label maps
        with VerSe IDs; ``femurs`` with labels 90 (right) / 91 (left) and a
        status per side; ``confidence``, ``method`` and ``not_evaluable_reason``
        as for the built-in backend.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a 3-D integer label map, ``version`` is unknown, or
        ``"auto"`` cannot tell v1 from v2.
    """
    if version not in ("auto", "v1", "v2"):
        raise ValueError(f"unknown TotalSegmentator version {version!r} (auto, v1 or v2)")
    if not path.is_file():
        raise FileNotFoundError(f"segmentation file not found: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:  # SimpleITK reports unreadable files as RuntimeError
        raise ValueError(f"cannot read {path.name} as an image: {exc}") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path.name} is not a 3-D single-channel label map")
    if "float" in image.GetPixelIDTypeAsString():
        values = sitk.GetArrayViewFromImage(image)
        if not np.array_equal(values, np.round(values)):
            raise ValueError(f"{path.name} holds non-integer values: not a label map")
    resampled = sitk.Resample(sitk.Cast(image, sitk.sitkUInt16), volume.to_sitk(), sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    labels = sitk.GetArrayFromImage(resampled)
    chosen, why = (version, "version given") if version != "auto" else _detect_version(labels, volume)
    log.info("TotalSegmentator label map read as %s (%s)", chosen, why)

    whole = np.zeros(volume.shape, np.uint8)
    for vid, ids in VERTEBRAE[chosen].items():
        whole[np.isin(labels, ids)] = vid
    frame = CanonicalFrame.from_volume(volume)
    bodies_c, trab_c, complete = _bodies_and_rois(frame.to_canonical(whole), frame.to_canonical(volume.hu),
                                                  frame.spacing)
    confidence_value, order_note = _order_confidence(bodies_c, frame.spacing)
    confidence = {int(vid): confidence_value if vid in complete else confidence_value / 2.0
                  for vid in np.unique(bodies_c) if vid}
    method = (f"imported TotalSegmentator {chosen} label map ({why}); levels as named by TotalSegmentator"
              f"{order_note}")
    return SpineSegmentation(bodies=frame.to_native(bodies_c), trabecular=frame.to_native(trab_c),
                             confidence=confidence, method=method,
                             not_evaluable_reason=missing_levels_reason(complete, confidence), whole=whole,
                             femurs=_femurs(labels, volume, chosen))


def _detect_version(labels: np.ndarray, volume: Volume) -> tuple[str, str]:
    """``("v1" | "v2", why)`` for a label map on the CT grid (rules in the module docstring)."""
    present = {int(v) for v in np.nonzero(np.bincount(labels.ravel(), minlength=V1_MAX_ID + 2))[0] if v}
    if max(present, default=0) > V1_MAX_ID:
        return "v2", f"class IDs above {V1_MAX_ID}"
    centroids = _centroids_lps(labels, present, volume)
    voxel_cm3 = float(np.prod(volume.spacing)) / 1000.0
    contradictions = {}
    for ver in ("v1", "v2"):
        bone = [i for ids in VERTEBRAE[ver].values() for i in ids] + list(FEMURS[ver].values()) + list(HIPS[ver])
        bad = sum(1 for i in bone if i in present and float(np.median(volume.hu[labels == i])) < BONE_MEDIAN_HU)
        bad += sum(1 for i in UPPER_THORACIC[ver] if i in present
                   and np.count_nonzero(labels == i) * voxel_cm3 > UPPER_THORACIC_MAX_CM3)
        # LPS x grows towards the patient's left
        bad += sum(1 for left, right in PAIRS[ver] if left in centroids and right in centroids
                   and centroids[left][0] <= centroids[right][0])
        contradictions[ver] = bad
    if contradictions["v1"] == contradictions["v2"]:
        raise ValueError("cannot tell TotalSegmentator v1 from v2 for this label map "
                         f"({contradictions['v1']} contradictions each); set the version explicitly")
    chosen = min(contradictions, key=lambda ver: contradictions[ver])
    return chosen, (f"anatomy agrees with the {chosen} class table: {contradictions[chosen]} vs "
                    f"{max(contradictions.values())} contradictions")


def _centroids_lps(labels: np.ndarray, present: set[int], volume: Volume) -> dict[int, np.ndarray]:
    """Label ID -> centroid in LPS mm."""
    ids = sorted(present)
    if not ids:
        return {}
    index = ndi.center_of_mass(np.ones(labels.shape), labels, ids)
    return {i: volume.index_to_lps(centre_index) for i, centre_index in zip(ids, index)}


def _bodies_and_rois(whole: np.ndarray, canonical_hu: np.ndarray, spacing: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """Bodies and trabecular ROIs from whole vertebrae, all canonical ``(s, a, l)``.

    Returns the body and ROI label maps and the IDs of the vertebrae that do not
    touch the top or bottom of the field of view.
    """
    bodies = np.zeros(whole.shape, np.uint8)
    trab = np.zeros(whole.shape, np.uint8)
    complete: set[int] = set()
    for vid in (int(v) for v in np.unique(whole) if v):
        mask = whole == vid
        sl = bounding_box(mask, 2)
        vert = mask[sl]
        coords = tuple(np.arange(s.start, s.stop) * step_mm for s, step_mm in zip(sl, spacing))
        body = _body_of(vert, np.asarray(canonical_hu[sl], dtype=np.float32), coords)
        if not body.any():
            log.info("%s: no body found anterior to the spinal canal", VERTEBRA_NAMES[vid])
            continue
        bodies[sl][body] = vid
        zs = np.nonzero(mask.any(axis=(1, 2)))[0]
        if zs[0] > 0 and zs[-1] < whole.shape[0] - 1:
            complete.add(vid)
        if vid != VERTEBRA_IDS["sacrum"]:
            trab[sl][trabecular_roi(body, coords, spacing, _height_axis(body, coords))] = vid
    return bodies, trab, complete


def _body_of(vert: np.ndarray, hu: np.ndarray, coords: tuple[np.ndarray, ...]) -> np.ndarray:
    """The part of one vertebra (canonical crop) anterior to its spinal canal (module docstring)."""
    a_mm = coords[1]
    l_mid = float(np.average(coords[2], weights=vert.sum(axis=(0, 1))))
    near_mid = np.abs(coords[2] - l_mid) <= 10.0
    canal_front = np.full(vert.shape[0], np.nan)
    for k in range(vert.shape[0]):
        if not vert[k].any():
            continue
        hole = fill_holes(vert[k]) & ~vert[k]
        hole[:, ~near_mid] = False
        if hole.any():
            canal_front[k] = a_mm[np.nonzero(hole.any(axis=1))[0].max()]
    known = np.isfinite(canal_front)
    if known.any():
        canal_front = np.interp(np.arange(vert.shape[0]), np.nonzero(known)[0], canal_front[known])
    else:  # open rings: the first fluid/fat-density point behind the front of the vertebra, in the midline
        band = hu[:, :, np.abs(coords[2] - l_mid) <= 6.0].mean(axis=(0, 2))
        rows = np.nonzero(vert.any(axis=(0, 2)))[0][::-1]  # anterior -> posterior
        canal = next((r for r in rows if band[r] < 50.0), None)
        if canal is None:
            return np.zeros_like(vert)
        canal_front = np.full(vert.shape[0], a_mm[canal])
    body = vert & (a_mm[None, :, None] > canal_front[:, None, None])
    return largest_component_filled(body)


def _height_axis(body: np.ndarray, coords: tuple[np.ndarray, ...]) -> np.ndarray:
    """Unit vector of the body's height (its thinnest principal axis), pointing superior."""
    pts = np.column_stack([axis_mm[i] for axis_mm, i in zip(coords, np.nonzero(body))])
    _, vecs = np.linalg.eigh(np.cov(pts.T))
    axis = vecs[:, 0]
    return axis if axis[0] >= 0 else -axis


def _order_confidence(bodies: np.ndarray, spacing: np.ndarray) -> tuple[float, str]:
    """Confidence of the imported names, and a note when the bodies are out of cranio-caudal order."""
    ids = [int(v) for v in np.unique(bodies) if v]
    if not ids:
        return IMPORTED_CONFIDENCE, ""
    heights = [centroid[0] * spacing[0] for centroid in ndi.center_of_mass(np.ones(bodies.shape), bodies, ids)]
    if all(h1 > h2 for h1, h2 in zip(heights, heights[1:])):  # VerSe IDs grow caudally
        return IMPORTED_CONFIDENCE, ""
    return 0.5, "; CAUTION: the named vertebrae are not in cranio-caudal order"


def _femurs(labels: np.ndarray, volume: Volume, version: str) -> FemurSegmentation:
    """Proximal femur labels 90/91 and per-side status from the imported femur classes."""
    out = np.zeros(volume.shape, np.uint8)
    sides: dict[Side, FemurSide] = {}
    voxel_cm3 = float(np.prod(volume.spacing)) / 1000.0
    pairs: tuple[tuple[Side, int], ...] = (("right", FEMUR_RIGHT), ("left", FEMUR_LEFT))
    for side, fid in pairs:
        mask: np.ndarray = labels == FEMURS[version][side]
        if mask.sum() * voxel_cm3 < MIN_FEMUR_CM3:
            sides[side] = FemurSide("not_in_view", f"less than {MIN_FEMUR_CM3:.0f} cm3 of the {side} femur "
                                    "is labelled in the imported segmentation")
            continue
        metal = metal_cm3_near(volume, mask)
        if metal >= MIN_METAL_CM3:
            sides[side] = FemurSide("excluded", f"metal in the {side} hip region ({metal:.1f} cm3 above "
                                    f"{METAL_HU:.0f} HU; probable arthroplasty or osteosynthesis)")
            continue
        out[mask] = fid
        sides[side] = FemurSide("segmented")
    return FemurSegmentation(labels=out, sides=sides)
