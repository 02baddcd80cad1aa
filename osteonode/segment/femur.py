"""Built-in proximal femur segmentation with metal exclusion (no model weights, CPU only).

The proximal femur (head, neck and trochanteric region) is segmented on each
side, as in the volume of interest of Wu et al. (BMC Musculoskelet Disord
2025;26:378: "from the femoral head to the level of the lower trochanter, above
the horizontal line of the lower margin of the ischial tuberosity"). A side
with metal (hip arthroplasty, osteosynthesis) is excluded with a reason, as
that study excluded hip replacements.

Pipeline (canonical superior/anterior/left frame of :class:`CanonicalFrame`)
-----------------------------------------------------------------------------
1. **Hip joint candidates** on a 2 mm copy: bone is the smoothed HU above
   ``BONE_HU`` with holes filled slice by slice. The femoral head sitting in its
   acetabulum is the thickest bone of the body: its distance-transform maxima
   (inscribed-sphere radius >= 14 mm, i.e. a ball of 28 mm diameter full of
   bone, which no vertebral body or iliac wing holds) 45-140 mm lateral to the
   patient's midline are the candidates, per side.
2. **Femoral head sphere.** From the candidate, rays in 256 directions are cast
   on the smoothed image; on each, the head surface is the first strong radial
   edge (HU falling into soft tissue or joint space, or rising into the
   subchondral bone of the acetabulum). A sphere is fitted to these points by
   trimmed least squares, twice (the second time from the first centre). A head
   is accepted when its radius is 17-32 mm (adult femoral head diameters
   are 40-55 mm) and at least 40 % of the rays agree with it.
3. **Femur.** On the native grid (thin slices smoothed with a 0.8 mm
   Gaussian): bone above a threshold half-way between muscle (40 HU) and the
   median HU of the head, bounded to [100, 180] HU, holes filled slice by slice.
   The hip joint is cut with a spherical shell (head radius to +9 mm) except in
   a 55 degree cone around the femoral neck (which leaves the head
   infero-laterally; the cone axis is refined to the bone centroid in it); the
   femur is the bone connected to the head inside this cut.
4. **Distal limit**: the lowest point of the ipsilateral hip bone (ischial
   tuberosity) when it is in view, following the VOI of Wu et al.
5. **Metal**: components above ``METAL_HU`` (2500 HU: above cortical bone,
   which stays below about 2000 HU, and below the 3071 HU at which metal
   saturates a 12-bit CT scale) of at least 0.5 cm3 within 80 mm of the head
   centre (or, when no head is found on a side, in the mirror position of the
   other head or anywhere lateral to the pelvis) exclude that side.

All thresholds are tissue HU or adult anatomical sizes; none is fitted to the
reference masks of any patient.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from osteonode.anatomy import FEMUR_LEFT, FEMUR_RIGHT
from osteonode.segment.spine import (COARSE_MM, IN_PLANE, SOFT_TISSUE_HU, CanonicalFrame, bounding_box,
                                     coarse_copy, ellipsoid, patient_mask)
from osteonode.volume import Volume

log = logging.getLogger(__name__)

#: Bone vs soft tissue on the smoothed 2 mm copy (cancellous bone of the proximal femur is 150-400 HU).
BONE_HU = 120.0
#: Metal (implants) vs bone, HU.
METAL_HU = 2500.0
#: Smallest metal volume (cm3) that excludes a side (vascular clips and calcifications are smaller).
MIN_METAL_CM3 = 0.5
#: Adult femoral head radius range (mm).
HEAD_RADIUS_MM = (17.0, 32.0)
#: Half-angle (degrees) of the cone around the femoral neck that the joint cut spares.
NECK_CONE_DEG = 55.0
#: Thickness (mm) of the spherical shell that cuts the hip joint outside the neck cone.
JOINT_SHELL_MM = 9.0

Side = Literal["right", "left"]
Status = Literal["segmented", "excluded", "not_in_view"]


@dataclass(frozen=True)
class FemurSide:
    """Outcome for one side.

    Attributes
    ----------
    status : {"segmented", "excluded", "not_in_view"}
        As :class:`osteonode.result.ProximalFemurResult.status`.
    reason : str or None
        Why the side is excluded or not in view (for the SR); None when segmented.
    head_centre_mm : tuple of float or None
        Femoral head centre in LPS mm, when a head was found.
    head_radius_mm : float or None
        Fitted femoral head radius in mm.
    """

    status: Status
    reason: str | None = None
    head_centre_mm: tuple[float, float, float] | None = None
    head_radius_mm: float | None = None


@dataclass
class FemurSegmentation:
    """Proximal femurs on the grid of the input volume.

    Attributes
    ----------
    labels : numpy.ndarray
        ``(z, y, x)`` uint8 label map: 90 = right proximal femur, 91 = left, 0 = background.
    sides : dict
        ``"right"`` and ``"left"`` -> :class:`FemurSide`.
    """

    labels: np.ndarray
    sides: dict[Side, FemurSide] = field(default_factory=dict)


@dataclass(frozen=True)
class _Head:
    centre: np.ndarray  # canonical mm (s, a, l)
    radius: float  # mm
    support: float  # fraction of rays on the sphere


def _fibonacci_directions(n: int) -> np.ndarray:
    """``(n, 3)`` unit vectors spread evenly over the sphere."""
    i = np.arange(n) + 0.5
    polar = np.arccos(1.0 - 2.0 * i / n)
    azimuth = np.pi * (1.0 + 5.0 ** 0.5) * i
    return np.column_stack([np.cos(polar), np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth)])


_RAYS = _fibonacci_directions(256)


def _fit_sphere(points: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Trimmed least-squares sphere through ``points`` ``(n, 3)`` mm; returns centre, radius, inlier mask."""
    inlier = np.ones(len(points), bool)
    centre, radius = points.mean(axis=0), 0.0
    for _ in range(6):
        p = points[inlier]
        if len(p) < 10:
            break
        a = np.column_stack([2.0 * p, np.ones(len(p))])
        sol = np.linalg.lstsq(a, (p ** 2).sum(axis=1), rcond=None)[0]
        centre = sol[:3]
        radius = float(np.sqrt(max(sol[3] + centre @ centre, 0.0)))
        residual = np.abs(np.linalg.norm(points - centre, axis=1) - radius)
        inlier = residual <= max(2.5, float(np.percentile(residual[inlier], 70)))
    residual = np.abs(np.linalg.norm(points - centre, axis=1) - radius)
    return centre, radius, residual <= 3.0


def _surface_points(sm: np.ndarray, centre: np.ndarray, offset: np.ndarray, g: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Head-surface point on each ray from ``centre`` (canonical mm), and whether it is a joint point.

    On each ray (radial samples every mm from 8 to 40 mm of the smoothed image),
    the surface is the first of: the HU falling below 80 (soft tissue: the free
    surface of the head or neck), or a valley (local minimum) that bone follows
    within 8 mm, at least 40 HU higher (the joint space, with the subchondral
    bone of the acetabulum beyond it). Rays without either give NaN.
    """
    radii = np.arange(8.0, 41.0, 1.0)
    pts = centre[None, None, :] + _RAYS[:, None, :] * radii[None, :, None]  # (ray, r, 3) mm
    idx = ((pts - offset) / g).reshape(-1, 3).T
    prof = ndi.map_coordinates(sm, idx, order=1, mode="nearest").reshape(len(_RAYS), len(radii))
    ahead = ndi.maximum_filter1d(prof, 9, axis=1, origin=-4)  # max over [r, r + 8 mm]
    before = ndi.maximum_filter1d(prof, 9, axis=1, origin=4)  # max over [r - 8 mm, r]
    is_min = (prof <= np.roll(prof, 1, axis=1)) & (prof <= np.roll(prof, -1, axis=1))
    valley = is_min & (ahead - prof >= 40.0) & (before - prof >= 30.0) & (before >= 150.0)
    soft = prof < 80.0
    found = valley | soft
    found[:, [0, -1]] = False
    first = np.argmax(found, axis=1)
    ok = found[np.arange(len(_RAYS)), first]
    r = np.where(ok, radii[first], np.nan)
    joint = ok & valley[np.arange(len(_RAYS)), first]
    return centre[None, :] + _RAYS * r[:, None], joint


def _head_sphere(sm: np.ndarray, start: np.ndarray, offset: np.ndarray, g: float) -> _Head | None:
    """Fit the femoral head sphere from ``start`` (canonical mm) on the smoothed coarse image ``sm``."""
    centre = start
    head = None
    for _ in range(3):
        points, joint = _surface_points(sm, centre, offset, g)
        good = np.isfinite(points[:, 0])
        if good.sum() < 60 or joint.sum() < 20:
            return None
        fitted, radius, inlier = _fit_sphere(points[good])
        support = float(inlier.sum()) / len(_RAYS)
        if np.linalg.norm(fitted - start) > 30.0 or not HEAD_RADIUS_MM[0] <= radius <= HEAD_RADIUS_MM[1]:
            return None
        centre = fitted
        head = _Head(centre=fitted, radius=radius, support=support)
    log.debug("head candidate at %s mm: r = %.1f mm, support %.2f", np.round(start), head.radius, head.support)
    return head if head is not None and head.support >= 0.4 else None


def _head_candidates(c: np.ndarray, offset: np.ndarray, g: float, midline_mm: float
                     ) -> dict[Side, list[np.ndarray]]:
    """Distance-transform maxima of the filled bone mask, per side, thickest first (canonical mm)."""
    bone = ndi.gaussian_filter(np.clip(c, -200.0, 600.0), 0.7) > BONE_HU
    bone = ndi.binary_fill_holes(bone, structure=IN_PLANE)
    dist = np.zeros(c.shape, np.float32)
    if bone.any():
        box = bounding_box(bone, 1)
        dist[box] = ndi.distance_transform_edt(bone[box], sampling=g)
    peaks = np.argwhere((dist == ndi.maximum_filter(dist, size=7)) & (dist >= 14.0))
    out: dict[Side, list[np.ndarray]] = {"right": [], "left": []}
    for p in sorted(peaks.tolist(), key=lambda q: -dist[tuple(q)]):
        mm = np.asarray(p, float) * g + offset
        lateral = mm[2] - midline_mm
        if 45.0 <= abs(lateral) <= 140.0:
            out["left" if lateral > 0 else "right"].append(mm)
    return out


def _metal_components(hc: np.ndarray, spacing: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Metal components ``(centroid canonical mm, volume cm3)`` of at least ``MIN_METAL_CM3``."""
    metal = hc > METAL_HU
    if not metal.any():
        return []
    box = bounding_box(metal, 0)
    lab, n = ndi.label(metal[box], structure=np.ones((3, 3, 3), bool))
    counts = np.bincount(lab.ravel(), minlength=n + 1)
    voxel_cm3 = float(np.prod(spacing)) / 1000.0
    out = []
    for i in range(1, n + 1):
        if counts[i] * voxel_cm3 >= 0.05:  # fragments of one implant (streaks split it) are summed per side later
            cen = np.array(ndi.center_of_mass(lab == i)) + [s.start for s in box]
            out.append((cen * spacing, counts[i] * voxel_cm3))
    return out


def _solid(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Close ``mask`` with a 3 mm ball, then fill its holes in axial, coronal and sagittal planes.

    The marrow of the femoral neck and trochanters can be darker than soft tissue;
    the cortex encloses it in at least one of the three planes.
    """
    if not mask.any():
        return mask
    rad = np.maximum(1, np.round(3.0 / spacing)).astype(int)
    box = bounding_box(mask, rad + 1)
    padded = np.pad(mask[box], [(r, r) for r in rad], mode="edge")  # the field of view edge is not a surface
    sub = ndi.binary_closing(padded, structure=ellipsoid(rad, spacing))[rad[0]:-rad[0], rad[1]:-rad[1], rad[2]:-rad[2]]
    for axis in range(3):
        plane = np.zeros((3, 3, 3), bool)
        plane[tuple(1 if a == axis else slice(None) for a in range(3))] = ndi.generate_binary_structure(2, 1)
        sub = ndi.binary_fill_holes(sub, structure=plane)
    out = mask.copy()
    out[box] |= sub
    return out


def _segment_side(hc: np.ndarray, spacing: np.ndarray, head: _Head, side: Side
                  ) -> tuple[np.ndarray, tuple[slice, slice, slice], str | None]:
    """Segment one proximal femur in a native canonical crop around ``head``.

    Returns the mask, its crop in canonical indices and a reason when the femur
    is not (sufficiently) in view.
    """
    lateral = -1.0 if side == "right" else 1.0  # canonical l points to the patient's left
    c = head.centre
    lo = np.array([c[0] - 130.0, c[1] - 80.0, c[2] - 110.0 if side == "right" else c[2] - 60.0])
    hi = np.array([c[0] + head.radius + 15.0, c[1] + 70.0, c[2] + 60.0 if side == "right" else c[2] + 110.0])
    sl = tuple(slice(max(0, int(np.floor(a / s))), min(n, int(np.ceil(b / s)) + 1))
               for a, b, s, n in zip(lo, hi, spacing, hc.shape))
    crop = np.asarray(hc[sl], dtype=np.float32)
    sigma = np.where(spacing < 1.5, 0.8 / spacing, 0.0)
    if sigma.any():
        crop = ndi.gaussian_filter(crop, sigma)
    axes = [np.arange(s.start, s.stop) * sp - cc for s, sp, cc in zip(sl, spacing, c)]
    S, A, L = np.meshgrid(*axes, indexing="ij", sparse=True)
    dist = np.sqrt(S ** 2 + A ** 2 + L ** 2)
    ball = dist <= head.radius
    core = dist <= 0.6 * head.radius
    head_hu = float(np.median(crop[np.broadcast_to(core, crop.shape)]))
    thr = float(np.clip(0.5 * (SOFT_TISSUE_HU + head_hu), 100.0, 180.0))
    bone = ndi.binary_fill_holes(crop > thr, structure=IN_PLANE)
    # femoral neck: leaves the head infero-laterally (neck-shaft angle ~ 130 deg, anteversion ~ 15 deg)
    axis = np.array([-0.6, 0.25, 0.76 * lateral])
    axis /= np.linalg.norm(axis)
    shell = (dist > head.radius) & (dist <= head.radius + JOINT_SHELL_MM)
    cos_axis = (S * axis[0] + A * axis[1] + L * axis[2]) / np.maximum(dist, 1e-3)
    near = bone & shell & (cos_axis >= np.cos(np.radians(70.0)))
    if near.any():  # refine the neck axis: centroid direction of the bone leaving the head near it
        idx = np.nonzero(near)
        v = np.array([float(np.mean(np.broadcast_to(X, crop.shape)[idx])) for X in (S, A, L)])
        if np.linalg.norm(v) > 0:
            axis = v / np.linalg.norm(v)
            cos_axis = (S * axis[0] + A * axis[1] + L * axis[2]) / np.maximum(dist, 1e-3)
    cut = shell & (cos_axis < np.cos(np.radians(NECK_CONE_DEG)))
    lab, _ = ndi.label(bone & ~cut)
    ids = np.unique(lab[ball & (lab > 0)])
    femur = np.isin(lab, ids) | (bone & ball)
    # pelvis: bone outside the head that the cut separated from it (acetabulum and below)
    pelvis = (lab > 0) & ~np.isin(lab, ids) & np.broadcast_to(dist <= head.radius + JOINT_SHELL_MM + 4.0, crop.shape)
    pelvis_ids = np.unique(lab[pelvis])
    pelvis = np.isin(lab, pelvis_ids[pelvis_ids > 0])
    if pelvis.any():
        s_idx = np.nonzero(pelvis.any(axis=(1, 2)))[0]
        s_lowest = int(s_idx[0])
        if sl[0].start + s_lowest > 0 and s_lowest > 0:  # ischial tuberosity in view: the VOI ends there
            femur[:s_lowest] = False
    femur = _solid(femur, spacing) & ~pelvis
    reason = None
    neck_in_view = (c[0] - 0.5 * head.radius) / spacing[0] >= 0
    if not neck_in_view:
        reason = "only the femoral head is in the field of view (neck and trochanters cut off)"
    log.debug("%s femur: head r=%.1f mm, threshold %.0f HU, %d voxels", side, head.radius, thr, int(femur.sum()))
    return femur, sl, reason


def segment_proximal_femurs(volume: Volume) -> FemurSegmentation:
    """Segment the right and left proximal femur, excluding a side with metal.

    Parameters
    ----------
    volume : Volume
        CT volume; ``volume.hu`` is a ``(z, y, x)`` float32 array in HU and
        ``volume.affine`` maps ``(z, y, x, 1)`` to LPS mm. Any orientation and
        slice order, any slice thickness.

    Returns
    -------
    FemurSegmentation
        ``labels``: ``(z, y, x)`` uint8 on the input grid, 90 = right proximal
        femur (head, neck, trochanteric region), 91 = left; ``sides``: status
        ``"segmented"``, ``"excluded"`` (metal, with the reason) or
        ``"not_in_view"`` (with the reason) per side.

    Raises
    ------
    ValueError
        If ``volume.hu`` is not 3-D.

    Notes
    -----
    Volume of interest as in Wu et al., BMC Musculoskelet Disord 2025;26:378
    (femoral head to below the trochanters, above the lower margin of the
    ischial tuberosity; hip replacements excluded). See the module docstring
    for every rule.
    """
    if volume.hu.ndim != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {volume.hu.shape}")
    frame = CanonicalFrame.from_volume(volume)
    hc = frame.to_canonical(volume.hu)
    sp = frame.spacing
    labels_c = np.zeros(hc.shape, np.uint8)
    g = COARSE_MM
    c, offset = coarse_copy(hc, sp, g)
    sides: dict[Side, FemurSide] = {}
    if min(c.shape) < 8:
        reason = "the volume is too small to contain a hip"
        return FemurSegmentation(frame.to_native(labels_c), {"right": FemurSide("not_in_view", reason),
                                                             "left": FemurSide("not_in_view", reason)})
    patient = patient_mask(c)
    cols = patient.sum(axis=(0, 1)).astype(float)
    midline = float((cols * np.arange(c.shape[2])).sum() / max(cols.sum(), 1.0)) * g + offset[2]
    sm = ndi.gaussian_filter(np.clip(c, -200.0, 1000.0), 0.7)
    heads: dict[Side, _Head] = {}
    for side, cands in _head_candidates(c, offset, g, midline).items():
        for cand in cands[:4]:
            head = _head_sphere(sm, cand, offset, g)
            if head is not None and (head.centre[2] - midline) * (1 if side == "left" else -1) > 40.0:
                heads[side] = head
                break
    metal = _metal_components(hc, sp)
    for side, fid in (("right", FEMUR_RIGHT), ("left", FEMUR_LEFT)):
        sign = 1.0 if side == "left" else -1.0
        head = heads.get(side)
        other = heads.get("left" if side == "right" else "right")
        if head is not None:
            ref = head.centre
        elif other is not None:
            ref = other.centre * [1, 1, 0] + [0, 0, 2 * midline - other.centre[2]]
        else:
            ref = None
        near = [v for cen, v in metal if (cen[2] - midline) * sign > 30.0
                and (ref is None or np.linalg.norm(cen - ref) <= 80.0)]
        metal_cm3 = float(sum(near))
        if metal_cm3 >= MIN_METAL_CM3:
            sides[side] = FemurSide("excluded", f"metal in the {side} hip region ({metal_cm3:.1f} cm3 above "
                                    f"{METAL_HU:.0f} HU; probable arthroplasty or osteosynthesis)",
                                    *_head_geometry(head, frame, volume))
            continue
        if head is None:
            sides[side] = FemurSide("not_in_view", f"no {side} femoral head found in the field of view")
            continue
        mask, sl, reason = _segment_side(hc, sp, head, side)
        if reason is None and mask.sum() * np.prod(sp) < 20000.0:
            reason = "less than 20 cm3 of the proximal femur is in the field of view"
        if reason is not None:
            sides[side] = FemurSide("not_in_view", reason, *_head_geometry(head, frame, volume))
            continue
        view = labels_c[sl]
        view[mask & (view == 0)] = fid
        sides[side] = FemurSide("segmented", None, *_head_geometry(head, frame, volume))
    log.info("proximal femurs: %s", {s: f.status for s, f in sides.items()})
    return FemurSegmentation(labels=frame.to_native(labels_c), sides=sides)


def _head_geometry(head: _Head | None, frame: CanonicalFrame, volume: Volume
                   ) -> tuple[tuple[float, float, float] | None, float | None]:
    if head is None:
        return None, None
    lps = frame.canonical_mm_to_lps(head.centre, volume)
    return (float(lps[0]), float(lps[1]), float(lps[2])), round(head.radius, 1)
