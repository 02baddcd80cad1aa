"""Built-in proximal femur segmentation with metal exclusion (no model weights, CPU only).

The proximal femur (head, neck and trochanteric region) is segmented on each
side, as in the volume of interest of Wu et al. (BMC Musculoskelet Disord
2025;26:378: "from the femoral head to the level of the lower trochanter, above
the horizontal line of the lower margin of the ischial tuberosity"). A side
with metal (hip arthroplasty, osteosynthesis) is excluded with a reason, as
that study excluded hip replacements.

Pipeline (canonical superior/anterior/left frame of :class:`CanonicalFrame`, on
the shared 2 mm copy of :class:`CanonicalView`, denoised like the spine's)
-----------------------------------------------------------------------------
1. **Hip candidates**: bone is the smoothed HU above ``BONE_HU`` with holes
   filled slice by slice. The femoral head in its acetabulum is the thickest
   bone of the body: maxima of its distance transform (inscribed ball of at
   least 28 mm diameter full of bone) 45-140 mm lateral to the patient's
   midline are the candidates, per side, thickest first.
2. **Hip joint centre**: the joint space is a thin dark sheet between two
   bright ones, on a sphere. Dark-sheet voxels (Hessian of the image at 2 mm:
   largest eigenvalue > 5 HU/mm^2 and above the other two in magnitude) vote
   along their normal for the centres 18-30 mm away on both sides (a Hough
   transform for spheres, normalised by the sphere area) within 40 mm of the
   candidate. The Hessian there is taken with the image around that box: its
   faces cut through bone, and the image mirrored at them had dark sheets that
   are no anatomy. The best three centres (10 mm apart at least) are tried in
   turn, and the first whose joint is seen (step 3) is the hip's.
3. **Joint radius**: on 1860 rays (6 degree grid) the joint space is a
   valley with bone before (>= 25 HU higher within 6 mm) and after it (>= 35
   HU higher within 7 mm: the acetabulum). The joint radius (17-32 mm: adult
   heads are 40-55 mm wide) is the first dip of the mean radial profile of the
   rays above the head's equator (the joint lies at one radius on all of them,
   the ilium's marrow valleys behind it do not), or without such a dip the
   median of the rays' deepest valleys. A hip needs the joint, a valley near
   that radius, on at least ``MIN_JOINT_SUPPORT`` of the rays. The centre is the
   Hough centre as found: a sphere refitted to the joint points, which lie on
   the acetabular cap only, trades its centre against its radius along the
   cap's axis; on resampled (tilted, scaled) images such refits drifted 5-8 mm
   towards the acetabulum, where the Hough centre, voted along each sheet's
   own normal, stayed within 3 mm of the transformed original.
4. **Femur**: bone above ``FEMUR_BONE_FRACTION`` (30 %) of the way from muscle
   (40 HU) to the median HU of the head core, bounded to [100, 180] HU. The
   cortex of the neck and of the intertrochanteric region is 1-2 mm thick, so
   on the 2 mm copy (and more so from 3 mm slices) partial volume leaves it
   only part of its contrast; at half-way (about 170 HU for a 300 HU head) it
   broke into gaps wider than the closing bridges and the marrow, fatty and of
   muscle-like HU, was left open. The floor of 100 HU is muscle plus five
   times the residual noise of the copy (about 12 HU): muscle stays out
   whatever the head density. The femur's side of the joint is the basin of
   a marker-controlled watershed of the image (:func:`_femur_side`): seeds in
   the head's core and along the neck (infero-lateral and slightly anterior:
   neck-shaft angle about 130 degrees, anteversion about 15 degrees) flood
   against seeds in the hip bone just beyond the joint radius, and the floods
   meet on the joint space wherever it lies, not at a radius from a centre
   that may be off by a few millimetres. The femur is the bone
   connected to the head core in that basin, closed with a ``CLOSING_MM`` ball
   (the thin cortex of the intertrochanteric region has gaps) and filled in
   axial, coronal and sagittal planes (dark marrow); where the field of view
   cuts it (an image border, or an oblique out-of-view region of a tilted or
   resampled series: outside the reconstructed patient), the cut face closes it;
   along an oblique cut the voxel next to the outside, darkened by partial
   volume with it, first takes the value of the voxel behind it. The
   watershed cuts the head where the joint space is least visible (the
   inferomedial head, by the fovea and the acetabular fossa): a sphere fitted
   to the head's surface on that femur gives its ball back
   (:func:`_head_ball`).
5. **Distal limit**: the lowest point of the ipsilateral hip bone (the bone on
   the hip bone's side of the watershed that reaches the joint) when it ends at least
   10 mm above the bottom of the field of view and 40 mm below the head centre
   (the ischial tuberosity), following the VOI of Wu et al.
6. **Metal**: components above ``METAL_HU`` (2500 HU: above cortical bone,
   which stays below about 2000 HU; metal saturates a 12-bit CT scale at 3071)
   totalling at least ``MIN_METAL_CM3`` within 80 mm of the hip centre, or of
   the mirror image of the other hip's centre when no hip is found on a side,
   exclude that side. Without any hip centre metal is not looked for: dense
   contrast in the great veins of a CT angiogram also exceeds 2500 HU.

Limitations: a side whose native head is replaced (arthroplasty) is found
through the other side only; both sides replaced -> "not in view". All
thresholds are tissue HU or adult anatomical sizes, none fitted numerically to
reference masks; the neck cone (60 degrees), the watershed's seeds (within 30
and beyond 80 degrees of the neck axis, 2 mm beyond the joint radius: the
right-femur Dice of the geometric copies of both benches moved by at most 0.011
for 20-40 degrees, 70-90 degrees and 0-4 mm, but at 6 mm the femur's flood took
the acetabular floor of the scale 1.1 copy, 0.848 -> 0.787), the closing (6 mm) and the
femur threshold fraction (30 %: 50 % and 40 % left the trochanteric marrow
open, 20 % and a fixed 100 HU did about as well as 30 %) were chosen while
watching the Dice on the one patient with a reference femur (the example CT),
so they are not independently validated (``bench/segmentation.py``). On that
CT most of the remaining error is at the femoral head. The joint sphere
found there (radius 18 mm, the joint seen on about half of the rays) meets the
reference's head at its top but is centred about 8 mm higher and 7 mm more
medial than the sphere through the reference head's axial sections (radius
about 22 mm); the image was not conclusive about which is right at 3 mm. Where
the reference's femur meets its hip bone it fits a sphere of radius 24 mm
centred about 14 mm infero-antero-lateral to our joint centre, where the dark
sheets of the image cast almost no Hough votes (the maxima at each radius from
18 to 30 mm lie within 6 mm of ours). The watershed of step 4 does not depend
on that centre for where it cuts the head, only for its seeds; a cut at a
sphere around it, ray by ray (sessions before 21), took valleys 14-18 mm in
front of the centre inside the head for the joint. Where the field of view
cuts the femur near the head centre (the head is then most of what is in view)
the Dice is lowest: 0.855 and 0.856 on the scale 1.1 and the -10 degree coronal
tilt of ``bench/robustness.py`` (0.849 and 0.838 before the head ball of step
4); the unmodified CT cut 10 mm below the head centre scores 0.841, and our
mask of the uncut CT cut alike 0.862 (``bench/femur_fov.py``), so most of the
loss is the cut, not the scaling. The joint centre is not what limits the
femur: moved to the centre of a sphere fitted to the reference head's upper
surface (8 mm lower, 6.5 mm lateral and 5 mm anterior), it lowered the
unedited CT's Dice from 0.898 to 0.890 (before the head ball; bench/README.md,
"Session 26").
A side whose head centre lies less than half a head radius above the bottom
of the field of view is reported not in view.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from osteonode.anatomy import FEMUR_LEFT, FEMUR_RIGHT
from osteonode.segment import FemurSegmentation, FemurSide, Side
from osteonode.segment.body import SOFT_TISSUE_HU
from osteonode.segment.frame import (
    COARSE_MM,
    IN_PLANE,
    CanonicalFrame,
    CanonicalView,
    canonical_view,
    ellipsoid,
    fill_holes,
    linear_along,
)
from osteonode.volume import Volume, bounding_box

log = logging.getLogger(__name__)

#: Bone vs soft tissue on the smoothed 2 mm copy (cancellous bone of the proximal femur is 150-400 HU).
BONE_HU = 120.0
#: Femur threshold: this fraction of the way from muscle (``SOFT_TISSUE_HU``) to the head core's median HU.
#: The 1-2 mm cortex of the neck and trochanters keeps only part of its contrast on the 2 mm copy.
FEMUR_BONE_FRACTION = 0.3
#: Metal (implants) vs bone, HU.
METAL_HU = 2500.0
#: Smallest metal volume (cm3) that excludes a side (vascular clips and calcifications are smaller).
MIN_METAL_CM3 = 0.5
#: Smallest proximal femur volume (cm3) reported as segmented.
MIN_FEMUR_CM3 = 20.0
#: Adult femoral head radius range (mm).
HEAD_RADIUS_MM = (17.0, 32.0)
#: Half-angle (degrees) of the cone around the femoral neck whose rays do not count for the joint radius.
NECK_CONE_DEG = 60.0
#: Seeds of the joint watershed (:func:`_femur_side`): the femur's lie within this angle (degrees) of the neck
#: axis (the neck itself) ...
NECK_SEED_DEG = 30.0
#: ... the hip bone's more than this angle (degrees) from it ...
PELVIS_SEED_DEG = 80.0
#: ... and more than this (mm, one voxel of the 2 mm copy) beyond the joint radius.
PELVIS_SEED_MARGIN_MM = 2.0
#: Radius (mm) of the closing that bridges gaps in the thin cortex of the femoral neck and trochanters.
CLOSING_MM = 6.0
#: The head sphere of :func:`_head_ball` is fitted again with its radius held this much (mm) above that of
#: the free fit ...
HEAD_REFIT_MM = 2.0
#: ... and the ball of the free fit's radius plus this (mm) about that centre is added to the femur.
HEAD_FILL_MM = 1.0
#: A fit whose surface points lie farther than this (mm, root mean square) from its sphere adds nothing.
HEAD_FIT_RMS_MM = 4.0
#: Fraction of the rays outside the neck cone that must see the joint space for a hip to be accepted.
MIN_JOINT_SUPPORT = 0.25
#: Each side and its label in the femur label map.
SIDE_LABELS: tuple[tuple[Side, int], ...] = (("right", FEMUR_RIGHT), ("left", FEMUR_LEFT))


@dataclass(frozen=True)
class _Head:
    centre: np.ndarray  # canonical mm (s, a, l)
    radius: float  # mm, radius of the joint space
    support: float  # fraction of rays outside the neck cone that see the joint space


#: Smoothing (coarse voxels: 2 mm) of the Hessian that finds the joint space's dark sheet.
HESSIAN_SIGMA = 1.0
#: Reach of scipy's Gaussian derivative filters: 4 standard deviations (its default ``truncate``).
GAUSS_TRUNCATE = 4.0

#: Ray grid (canonical s, a, l unit vectors) on 6 degree polar/azimuth steps.
_POLAR = np.radians(np.arange(0.0, 180.1, 6.0))
_AZIMUTH = np.radians(np.arange(0.0, 360.0, 6.0))
_RAYS = np.stack([np.cos(_POLAR)[:, None] * np.ones_like(_AZIMUTH)[None, :],
                  np.sin(_POLAR)[:, None] * np.cos(_AZIMUTH)[None, :],
                  np.sin(_POLAR)[:, None] * np.sin(_AZIMUTH)[None, :]], axis=-1)  # (polar, azimuth, 3)


#: The best this many centres of the joint sphere's Hough transform, at least ``JOINT_PEAK_SEPARATION_MM``
#: apart, are tried in turn (:func:`_joint_centres`): on a 6 degree coronally tilted copy of the example CT
#: the best was 32 mm above the right hip's joint, which the second found.
JOINT_PEAKS = 3
#: ... (mm).
JOINT_PEAK_SEPARATION_MM = 10.0


def _joint_centres(clipped: np.ndarray, start: np.ndarray, offset: np.ndarray, grid_mm: float) -> list[np.ndarray]:
    """Candidate centres (canonical mm) of the hip joint sphere near ``start`` on the coarse image ``clipped`` (HU).

    The joint space between the femoral head and the acetabulum is a thin dark
    sheet between two bright ones, on a sphere. Dark-sheet voxels are found from
    the Hessian of the image smoothed at 2 mm (largest eigenvalue > 5 HU/mm^2 and
    larger than the other two in magnitude); each votes, along its sheet normal
    and on both sides, for the centres 18-30 mm away (a Hough transform for
    spheres, votes normalised by the sphere area). The best ``JOINT_PEAKS``
    local maxima of the votes at least ``JOINT_PEAK_SEPARATION_MM`` apart are
    returned, best first (empty when the box is too small or holds fewer than
    50 dark-sheet voxels): the caller takes the first whose joint is seen
    (:func:`_hip_head`), as the best one can lie on another sheet (the
    acetabular roof or the sacroiliac joint) when the candidate ``start`` lies
    far from the joint.

    The voters lie within 40 mm of ``start``; the filters see the image up to
    their reach (``GAUSS_TRUNCATE * HESSIAN_SIGMA`` voxels) beyond that box, so
    that where its faces cut through bone the image is not mirrored (mirrored,
    bone whose HU falls towards a face becomes a valley there, i.e. a dark sheet
    that is no joint). Only at the border of the image itself, beyond which
    there is nothing, is it mirrored. On a 1.07 scaled, -7 degree coronally
    tilted copy of the example CT the mirrored faces made about 300 dark-sheet
    voxels (1 % of the vote weight) and moved the right hip's centre one coarse
    voxel (2 mm) up, enough to flatten the joint dip of :func:`_joint_radius`
    (head radius 27 instead of 20 mm).
    """
    half = int(round(40.0 / grid_mm))
    reach = int(np.ceil(GAUSS_TRUNCATE * HESSIAN_SIGMA))
    i0 = np.round((start - offset) / grid_mm).astype(int)
    lo = np.maximum(i0 - half, 0)
    hi = np.minimum(i0 + half + 1, np.array(clipped.shape))
    if np.any(hi - lo < 8):
        return []
    # the box with the filters' reach around it (where the image has it); ``inner`` is the box in it
    lo_r = np.maximum(lo - reach, 0)
    hi_r = np.minimum(hi + reach, np.array(clipped.shape))
    around = clipped[lo_r[0]:hi_r[0], lo_r[1]:hi_r[1], lo_r[2]:hi_r[2]]
    inner = tuple(slice(box_lo - around_lo, box_hi - around_lo) for box_lo, around_lo, box_hi in zip(lo, lo_r, hi))
    crop = around[inner]
    near = ndi.maximum_filter(around, size=5)[inner] > 200.0
    hess = np.empty((int(near.sum()), 3, 3), np.float32)
    for i in range(3):
        for j in range(i, 3):
            order = [0, 0, 0]
            order[i] += 1
            order[j] += 1
            hess[:, i, j] = hess[:, j, i] = ndi.gaussian_filter(around, HESSIAN_SIGMA, order=order,
                                                                truncate=GAUSS_TRUNCATE)[inner][near] / grid_mm ** 2
    vals, vecs = np.linalg.eigh(hess)
    other = np.maximum(np.abs(vals[:, 0]), np.abs(vals[:, 1]))
    sheet = (vals[:, 2] > 5.0) & (vals[:, 2] > other)
    if sheet.sum() < 50:
        return []
    weight = (vals[sheet, 2] - other[sheet]).astype(float)
    pos = np.argwhere(near)[sheet].astype(float)
    normal = vecs[sheet][:, :, 2]
    acc = np.zeros(crop.size)
    for r in np.arange(HEAD_RADIUS_MM[0] + 1.0, HEAD_RADIUS_MM[1] - 1.0, 2.0):
        for sign in (1.0, -1.0):
            q = np.round(pos + sign * normal * (r / grid_mm)).astype(int)
            ok = np.all((q >= 0) & (q < np.array(crop.shape)), axis=1)
            acc += np.bincount(np.ravel_multi_index(q[ok].T, crop.shape), weights=weight[ok],
                               minlength=crop.size) / (r * r)
    acc = ndi.gaussian_filter(acc.reshape(crop.shape), 1.0)
    window = 2 * int(round(JOINT_PEAK_SEPARATION_MM / grid_mm)) + 1
    peaks = np.argwhere((acc == ndi.maximum_filter(acc, size=window)) & (acc > 0))
    best = sorted(peaks.tolist(), key=lambda k: -acc[tuple(k)])[:JOINT_PEAKS]
    return [(np.asarray(k) + lo) * grid_mm + offset for k in best]


def _lateral(side: Side) -> float:
    """Sign of the canonical left axis that points from the midline to ``side``: +1 left, -1 right."""
    return 1.0 if side == "left" else -1.0


def _neck_axis(lateral: float) -> np.ndarray:
    """Unit vector of the femoral neck from the head centre (canonical s, a, l).

    Typical adult neck: neck-shaft angle about 130 degrees and anteversion about
    15 degrees, i.e. infero-lateral and slightly anterior; ``NECK_CONE_DEG``
    covers the spread between patients and leg positions.
    """
    axis = np.array([-0.6, 0.25, 0.76 * lateral])
    return axis / np.linalg.norm(axis)


#: Smallest depth (HU) of the joint space in the mean radial profile of the upper head: averaged over
#: hundreds of rays the residual noise (12 HU per voxel) is about 1 HU; on a -10 degree coronal tilt the
#: dip was 9-13 HU deep depending on a 1 mm shift of the centre.
JOINT_DIP_HU = 5.0


def _joint_radius(profiles: np.ndarray, radii: np.ndarray) -> float | None:
    """Joint radius (mm): the first dip of the mean of ``profiles`` ``(rays, radii)`` within ``HEAD_RADIUS_MM``.

    ``profiles`` are HU along the rays above the head's equator outside the neck
    cone, where the acetabulum covers the head, sampled at ``radii`` (mm, 1 mm
    steps). From the head centre the joint space lies at one radius on all of
    them, and the mean profile dips there by at least ``JOINT_DIP_HU`` below its
    maxima within 6 mm on either side; the marrow valleys of the ilium beyond it
    lie at different radii on different rays. On a single ray of a blurred
    (tilted, scaled, resampled) image the joint valley can be shallower than the
    marrow valley behind it, which made the median of the rays' deepest valleys
    jump to the marrow (24 instead of 20 mm on the -10 degree coronal tilt of
    ``bench/robustness.py``). ``None`` when the mean profile has no such dip.
    """
    if len(profiles) == 0:
        return None
    mean = profiles.mean(axis=0)
    before = ndi.maximum_filter1d(mean, 7, origin=3)  # max over [r - 6, r]
    after = ndi.maximum_filter1d(mean, 7, origin=-3)  # max over [r, r + 6]
    in_range = (radii >= HEAD_RADIUS_MM[0]) & (radii <= HEAD_RADIUS_MM[1])
    dip = in_range & (np.minimum(before, after) - mean >= JOINT_DIP_HU)
    dip[1:-1] &= (mean[1:-1] <= mean[:-2]) & (mean[1:-1] <= mean[2:])
    return float(radii[np.argmax(dip)]) if dip.any() else None


def _hip_head(smooth: np.ndarray, centre: np.ndarray, offset: np.ndarray, grid_mm: float, neck: np.ndarray
              ) -> _Head | None:
    """The femoral head at the joint centre ``centre``: its joint radius and how many rays see the joint.

    On each ray outside ``NECK_CONE_DEG`` of the neck (1 mm radial samples,
    8-40 mm, of the smoothed coarse image ``smooth``) the joint space is a valley
    12-40 mm out with bone before it (>= 25 HU higher within 6 mm) and after it
    (>= 35 HU higher within 7 mm: the acetabulum), before the ray reaches soft
    tissue (< 80 HU). The radius is that of :func:`_joint_radius`, or when it
    finds none the median of the rays' deepest valleys; the support is the
    fraction of the rays with a valley within 7 mm of it. ``None`` without
    valleys on 30 rays, or with a radius outside ``HEAD_RADIUS_MM``.
    """
    radii = np.arange(8.0, 41.0, 1.0)
    pts = centre + _RAYS[:, :, None, :] * radii[None, None, :, None]
    prof = ndi.map_coordinates(smooth, ((pts - offset) / grid_mm).reshape(-1, 3).T, order=1, mode="nearest")
    prof = prof.reshape(_RAYS.shape[:2] + (len(radii),))
    before = ndi.maximum_filter1d(prof, 7, axis=-1, origin=3)  # max over [r - 6, r]
    after = ndi.maximum_filter1d(prof, 8, axis=-1, origin=-4)  # max over [r, r + 7]
    is_min = (prof <= np.roll(prof, 1, axis=-1)) & (prof <= np.roll(prof, -1, axis=-1))
    depth = np.minimum(before - prof, after - prof)
    valley = is_min & (before - prof >= 25.0) & (after - prof >= 35.0) & (before >= 150.0)
    valley[..., :4] = False
    valley[..., -1] = False
    # soft tissue (< 80 HU) first: the ray leaves the head through its free surface
    soft = prof < 80.0
    i_soft = np.where(soft.any(axis=-1), np.argmax(soft, axis=-1), len(radii))
    valley &= np.arange(len(radii)) < i_soft[..., None]
    has = valley.any(axis=-1)
    outside = (_RAYS @ neck) < np.cos(np.radians(NECK_CONE_DEG))
    joint = has & outside
    if joint.sum() < 30:
        return None
    # the head radius: the first dip of the mean profile of the rays above the equator (see
    # _joint_radius), else the median of the deepest valley of each ray; a ray sees the joint
    # when it has a valley near that radius (a marrow valley of the ilium beyond it does not count)
    radius = _joint_radius(prof[outside & (_RAYS[..., 0] > 0.0)], radii)
    if radius is None:
        deepest = radii[np.argmax(np.where(valley, depth, -np.inf), axis=-1)]
        radius = float(np.median(deepest[joint]))
    if not HEAD_RADIUS_MM[0] <= radius <= HEAD_RADIUS_MM[1]:
        return None
    r_valley = radii[np.argmin(np.where(valley, np.abs(radii - radius), np.inf), axis=-1)]
    good = joint & (np.abs(r_valley - radius) <= 7.0)
    return _Head(centre=centre, radius=radius, support=float(good.sum()) / float(outside.sum()))


def _head_candidates(smooth: np.ndarray, offset: np.ndarray, grid_mm: float, midline_mm: float
                     ) -> dict[Side, list[np.ndarray]]:
    """Distance-transform maxima of the filled bone mask, per side, thickest first (canonical mm).

    ``smooth`` is the smoothed coarse image; the distance transform runs on
    every other coarse voxel (4 mm), which is enough to place a 28 mm ball.
    """
    step = 2.0 * grid_mm
    bone = fill_holes(smooth[::2, ::2, ::2] > BONE_HU, IN_PLANE)
    dist = np.zeros(bone.shape, np.float32)
    if bone.any():
        box = bounding_box(bone, 1)
        dist[box] = ndi.distance_transform_edt(bone[box], sampling=step)
    peaks = np.argwhere((dist == ndi.maximum_filter(dist, size=5)) & (dist >= 14.0))
    out: dict[Side, list[np.ndarray]] = {"right": [], "left": []}
    for p in sorted(peaks.tolist(), key=lambda q: -dist[tuple(q)]):
        mm = np.asarray(p, float) * step + offset
        lateral = mm[2] - midline_mm
        if 45.0 <= abs(lateral) <= 140.0:
            out["left" if lateral > 0 else "right"].append(mm)
    return out


def _metal_components(canonical_hu: np.ndarray, spacing: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Metal components ``(centroid canonical mm, volume cm3)`` of at least ``MIN_METAL_CM3``."""
    metal = canonical_hu > METAL_HU
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


def _solid(mask: np.ndarray, spacing: np.ndarray, out_of_view: np.ndarray,
           image_edges: tuple[tuple[bool, bool], ...]) -> np.ndarray:
    """Close ``mask`` with a ``CLOSING_MM`` ball, then fill its holes in axial, coronal and sagittal planes.

    The marrow of the femoral neck and trochanters can be darker than soft
    tissue; closing bridges the gaps of the thin cortex of the intertrochanteric
    region, after which the cortex encloses the marrow in at least one of the
    three planes. Where the field of view cuts the femur (``out_of_view``, same
    shape as ``mask``: outside the image or outside the reconstructed
    patient, in any orientation, e.g. an oblique edge of a tilted or resampled
    series), the cut face closes it: the out-of-view voxels within
    ``CLOSING_MM`` of the bone take part in the closing and filling and are
    removed afterwards; ``image_edges[axis]`` says whether the (low, high)
    border of ``mask`` along ``axis`` is the border of the image, beyond which
    everything is out of view. The field-of-view edge is never a bone surface.
    """
    if not mask.any():
        return mask
    rad = np.maximum(1, np.round(CLOSING_MM / spacing)).astype(int)
    ball = ellipsoid(rad, spacing)
    box = bounding_box(mask, rad + 1)
    pad = [(r, r) for r in rad]
    # the cortex is closed first; then a plate over the cut face closes the marrow for the
    # filling: beyond the image border, and over the out-of-view voxels within the closing
    # radius of the bone where it touches them (an oblique cut face inside the image)
    sub = ndi.binary_closing(np.pad(mask[box], pad, mode="edge"), structure=ball)
    edge = np.pad(out_of_view[box], pad)
    touch = edge & ndi.binary_dilation(sub, structure=np.ones((3, 3, 3), bool), iterations=2)
    if touch.any():
        sub |= edge & ndi.binary_dilation(sub, structure=ball) & ndi.binary_dilation(touch, structure=ball)
    for axis, (low, high) in enumerate(image_edges):
        index = [slice(None)] * 3
        if low and np.take(mask, 0, axis=axis).any():
            index[axis] = slice(0, pad[axis][0])
            sub[tuple(index)] = True
        if high and np.take(mask, -1, axis=axis).any():
            index[axis] = slice(sub.shape[axis] - pad[axis][1], None)
            sub[tuple(index)] = True
    for axis in range(3):
        plane = np.zeros((3, 3, 3), bool)
        plane[tuple(1 if a == axis else slice(None) for a in range(3))] = ndi.generate_binary_structure(2, 1)
        sub = fill_holes(sub, plane)
    out = mask.copy()
    inner = tuple(slice(r, -r) for r in rad)
    out[box] |= sub[inner] & ~out_of_view[box]
    return out


def metal_cm3_near(volume: Volume, mask: np.ndarray, margin_mm: float = 10.0) -> float:
    """Volume (cm3) of metal (> ``METAL_HU``) within ``margin_mm`` of ``mask``.

    Parameters
    ----------
    volume : Volume
        CT, ``(z, y, x)`` in HU.
    mask : numpy.ndarray
        ``(z, y, x)`` boolean mask on the same grid, e.g. a femur.
    margin_mm : float
        Distance from the mask (mm) within which metal counts.

    Raises
    ------
    ValueError
        If ``mask`` is not on the volume's grid.
    """
    volume.require_grid(mask, "mask")
    if not mask.any():
        return 0.0
    spacing = np.asarray(volume.spacing)
    box = bounding_box(mask, np.ceil(margin_mm / spacing).astype(int) + 1)
    near = ndi.distance_transform_edt(~mask[box], sampling=spacing) <= margin_mm
    return float(np.count_nonzero(near & (volume.hu[box] > METAL_HU))) * float(np.prod(spacing)) / 1000.0


def _edge_restored(image: np.ndarray, in_view: np.ndarray) -> np.ndarray:
    """``image`` with the partial-volume band along the field-of-view edge given the value behind it.

    Where the field of view cuts the patient obliquely (a tilted or resampled
    series: outside the reconstructed patient, see :func:`_solid`), the last
    voxels inside it average the tissue with the air-dark outside: a bone cut
    there fades through the bone threshold up to a voxel before the edge, whose
    position (``in_view``, -400 HU on the coarse copy) is half-way. Each voxel of
    ``in_view`` next to the out-of-view region (one voxel deep, 6-connected) takes
    the larger of its own value and the mean of its face neighbours behind the
    band (a voxel without one keeps its value); partial volume with the outside
    only darkens, so nothing is made darker. On
    the +10 degree sagittal tilt of ``bench/robustness.py`` (alone and with
    scale 0.9 and -50 HU) our right femur lacked 53 and 65 reference voxels
    (3 mm) within a voxel of that edge.

    Parameters
    ----------
    image : numpy.ndarray
        Coarse canonical ``(s, a, l)`` HU.
    in_view : numpy.ndarray
        Same shape, boolean: the reconstructed patient.

    Returns
    -------
    numpy.ndarray
        ``image`` itself when no voxel is at the edge, else a restored copy.
    """
    behind = ndi.binary_erosion(in_view, border_value=1)
    band = in_view & ~behind
    if not band.any():
        return image
    face = ndi.generate_binary_structure(3, 1).astype(np.float32)
    count = ndi.correlate(behind.astype(np.float32), face, mode="constant")
    total = ndi.correlate(np.where(behind, image, 0.0).astype(np.float32), face, mode="constant")
    band &= count > 0
    return np.where(band, np.maximum(image, total / np.maximum(count, 1.0)), image)


def _femur_side(image: np.ndarray, bone: np.ndarray, dist: np.ndarray, cos_neck: np.ndarray, radius: float
                ) -> np.ndarray:
    """The femur's side of the hip joint: the basin of a marker-controlled watershed.

    The femur is seeded with the ``bone`` within half the joint radius of the
    centre and with that of the neck (within ``NECK_SEED_DEG`` of its axis, 5-50
    mm beyond the joint); the hip bone with the ``bone`` more than
    ``PELVIS_SEED_MARGIN_MM`` beyond the joint radius and more than
    ``PELVIS_SEED_DEG`` from the neck axis (acetabulum, ilium, ischium and
    pubis). Both seeds flood the inverted image (SimpleITK's morphological
    watershed from markers, 26-connected), the brightest voxels first: the
    floods meet on the darkest surface between the two bones, the joint space,
    wherever it lies. The cut it replaces, ray by ray around the joint centre at
    the valley nearest the joint radius, took valleys inside the head of the
    example CT (3 mm slices) for the joint. Its right-femur Dice was 0.884 there
    (0.898 with the watershed; 0.905 with :func:`_head_ball` as well), and lower
    than with the watershed on 120 of the 122 copies of ``bench/robustness.py``
    and 155 of the 156 of ``bench/beyond.py``, equal on the others
    (bench/README.md, "Session 21").

    Parameters
    ----------
    image : numpy.ndarray
        Coarse canonical ``(s, a, l)`` HU around the hip.
    bone : numpy.ndarray
        Same shape, boolean: the bone.
    dist, cos_neck : numpy.ndarray
        Broadcastable to that shape: the distance (mm) from the joint centre and
        the cosine of the angle to the neck axis.
    radius : float
        Joint radius, mm.

    Returns
    -------
    numpy.ndarray
        Boolean, the shape of ``image``: the femur's basin.
    """
    dist, cos_neck = np.broadcast_arrays(dist, cos_neck)
    neck = (cos_neck >= np.cos(np.radians(NECK_SEED_DEG))) & (dist >= radius + 5.0) & (dist <= radius + 50.0)
    hip = (cos_neck <= np.cos(np.radians(PELVIS_SEED_DEG))) & (dist >= radius + PELVIS_SEED_MARGIN_MM)
    markers = np.zeros(image.shape, np.uint8)
    markers[bone & hip] = 2
    markers[bone & ((dist <= 0.5 * radius) | neck)] = 1
    landscape = sitk.GetImageFromArray(-np.clip(image, -100.0, 700.0).astype(np.float32))
    basins = sitk.MorphologicalWatershedFromMarkers(landscape, sitk.GetImageFromArray(markers),
                                                    markWatershedLine=False, fullyConnected=True)
    return sitk.GetArrayViewFromImage(basins) == 1


def _head_ball(femur: np.ndarray, coords: tuple[np.ndarray, ...], dist: np.ndarray, cos_neck: np.ndarray,
               radius: float) -> np.ndarray | None:
    """The femoral head as a ball, fitted to the head's surface on ``femur``; ``None`` without a good fit.

    The watershed of :func:`_femur_side` cuts the head where the joint space
    is least visible: on 3 mm slices of the example CT it left out the
    inferomedial head (the fovea and the periphery next to the acetabular
    fossa, 60-200 HU), 9-12 mm of it at the reference's widest, and the
    head is a sphere. The surface voxels of ``femur`` (outermost voxels, within
    10 mm beyond the joint radius of the joint centre and more than
    ``NECK_CONE_DEG`` from the neck axis: the head, not the neck) are fitted by
    a sphere (least squares, algebraic). As part of the head is missing, the
    free fit is too small and too close to the part that is there (on the
    example CT 17.8 mm, against 22 mm for a sphere through the reference head's
    upper surface, and 5 mm too high): the centre is fitted again (Gauss-Newton)
    with the radius held ``HEAD_REFIT_MM`` larger, which moves it away from
    the over-represented cap, and the ball of the free radius plus
    ``HEAD_FILL_MM`` (the mask's surface lies half a 2 mm voxel beyond its
    outermost voxels' centres) is returned.

    Parameters
    ----------
    femur : numpy.ndarray
        Coarse canonical ``(s, a, l)`` boolean femur of one side.
    coords : tuple of numpy.ndarray
        Its voxels' ``(s, a, l)`` positions (mm) from the joint centre, broadcastable to its shape.
    dist : numpy.ndarray
        Their distance (mm) from the joint centre, broadcastable alike.
    cos_neck : numpy.ndarray
        Cosine of each voxel's angle to the neck axis, seen from the joint centre.
    radius : float
        Joint radius (mm).

    Returns
    -------
    numpy.ndarray or None
        Boolean ball, the shape of ``femur``; ``None`` with fewer than 30
        surface points, a fit's root mean square distance above
        ``HEAD_FIT_RMS_MM``, or a centre farther than ``radius`` from the joint
        centre.

    Notes
    -----
    ``HEAD_REFIT_MM`` and ``HEAD_FILL_MM`` were chosen while watching the
    right-femur Dice of the scaled and tilted copies of the one CT with a
    reference femur (``bench/robustness.py``, ``bench/beyond.py``); refits 2-3 mm
    and fills 1-2 mm larger gave 0.855-0.863 on the scale 1.1 copy and
    0.856-0.861 on the -10 degree coronal tilt (bench/README.md, "Session 26").
    """
    coords = np.broadcast_arrays(*coords, femur)[:3]
    surface = femur & ~ndi.binary_erosion(femur)
    surface &= (dist <= radius + 10.0) & (cos_neck < np.cos(np.radians(NECK_CONE_DEG)))
    if surface.sum() < 30:
        return None
    points = np.stack([c[surface] for c in coords], axis=1)
    solution, *_ = np.linalg.lstsq(np.c_[2.0 * points, np.ones(len(points))], (points ** 2).sum(axis=1), rcond=None)
    centre = solution[:3]
    free_radius = float(np.sqrt(solution[3] + centre @ centre))
    held = free_radius + HEAD_REFIT_MM
    for _ in range(20):
        to_centre = centre - points
        length = np.linalg.norm(to_centre, axis=1)
        step, *_ = np.linalg.lstsq(to_centre / length[:, None], held - length, rcond=None)
        centre = centre + step
    rms = float(np.sqrt(np.mean((np.linalg.norm(points - centre, axis=1) - held) ** 2)))
    if rms > HEAD_FIT_RMS_MM or float(np.linalg.norm(centre)) > radius:
        return None
    fill = free_radius + HEAD_FILL_MM
    return sum((c - c0) ** 2 for c, c0 in zip(coords, centre)) <= fill * fill


def _segment_side(coarse: np.ndarray, in_view: np.ndarray, offset: np.ndarray, grid_mm: float, head: _Head, side: Side
                  ) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Segment one proximal femur on the coarse grid in a crop around ``head``.

    ``in_view`` (shape of ``coarse``) is the reconstructed patient: the rest is out
    of the field of view.

    Returns the mask and its crop (coarse canonical indices).
    """
    centre = head.centre
    lateral_lo, lateral_hi = (110.0, 60.0) if side == "right" else (60.0, 110.0)
    lo = (np.array([centre[0] - 130.0, centre[1] - 80.0, centre[2] - lateral_lo]) - offset) / grid_mm
    hi = (np.array([centre[0] + head.radius + 15.0, centre[1] + 70.0, centre[2] + lateral_hi]) - offset) / grid_mm
    sl = tuple(slice(max(0, int(np.floor(a))), min(n, int(np.ceil(b)) + 1)) for a, b, n in zip(lo, hi, coarse.shape))
    crop = _edge_restored(coarse[sl], in_view[sl])
    axes = [np.arange(s.start, s.stop) * grid_mm + o - centre_mm for s, o, centre_mm in zip(sl, offset, centre)]
    S, A, L = np.meshgrid(*axes, indexing="ij", sparse=True)
    dist = np.sqrt(S ** 2 + A ** 2 + L ** 2)
    core = dist <= 0.5 * head.radius
    head_hu = float(np.median(crop[np.broadcast_to(core, crop.shape)]))
    thr = float(np.clip(SOFT_TISSUE_HU + FEMUR_BONE_FRACTION * (head_hu - SOFT_TISSUE_HU), 100.0, 180.0))
    bone = fill_holes(crop > thr, IN_PLANE)
    neck = _neck_axis(_lateral(side))
    cos_neck = (S * neck[0] + A * neck[1] + L * neck[2]) / np.maximum(dist, 1e-6)
    femur_side = _femur_side(crop, bone, dist, cos_neck, head.radius)
    lab, _ = ndi.label(bone & femur_side)
    ids = np.unique(lab[core & (lab > 0)])
    femur = np.isin(lab, ids[ids > 0])
    # the hip bone: the bone beyond the joint that reaches it (within 6 mm of the joint radius)
    beyond = bone & ~femur_side
    lab_out, _ = ndi.label(beyond)
    out_ids = np.unique(lab_out[beyond & (dist <= head.radius + 6.0)])
    pelvis = np.isin(lab_out, out_ids[out_ids > 0])
    if pelvis.any():
        # the ischial tuberosity is in view when the hip bone ends at least 10 mm above
        # the bottom of the field of view and at least 40 mm below the head centre
        s_lowest = int(np.nonzero(pelvis.any(axis=(1, 2)))[0][0])
        z_lowest = (sl[0].start + s_lowest) * grid_mm + offset[0]
        if z_lowest >= offset[0] + 10.0 and z_lowest <= centre[0] - 40.0:
            femur[:s_lowest] = False
    edges = tuple((s.start == 0, s.stop == n) for s, n in zip(sl, coarse.shape))
    femur = _solid(femur, np.full(3, grid_mm), ~in_view[sl], edges) & femur_side
    ball = _head_ball(femur, (S, A, L), dist, cos_neck, head.radius)
    if ball is not None:
        femur |= ball & in_view[sl]
    log.debug("%s femur: head r=%.1f mm (joint seen on %.0f%% of rays), threshold %.0f HU, %d voxels",
              side, head.radius, 100 * head.support, thr, int(femur.sum()))
    return femur, sl


def _interpolated_to_native(mask: np.ndarray, sl: tuple[slice, ...], offset: np.ndarray, grid_mm: float,
                            spacing: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Copy of a coarse crop ``mask`` onto the canonical native grid by linear interpolation (>= 0.5).

    Arguments and result as :func:`osteonode.segment.frame.coarse_to_native`,
    whose nearest-neighbour copy puts every boundary on the 2 mm grid: a native
    voxel up to 1 mm outside the coarse boundary goes in or out by the phase of
    the two grids. Interpolating places the boundary between the coarse
    voxels, the same for any phase (right-femur Dice on the scaled and tilted
    copies of ``bench/robustness.py``: -0.001 to +0.012); separable, one axis
    at a time.
    """
    out = mask.astype(np.float32)
    native = []
    for ax in range(3):
        crop_index = (np.arange(shape[ax]) * spacing[ax] - offset[ax]) / grid_mm - sl[ax].start  # coarse crop index
        inside = np.nonzero((crop_index >= -0.5) & (crop_index <= mask.shape[ax] - 0.5))[0]
        native.append(slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0))
        out = linear_along(out, np.clip(crop_index[inside], 0.0, mask.shape[ax] - 1.0), ax)
    return out >= 0.5, tuple(native)


def _find_heads(coarse: np.ndarray, offset: np.ndarray, midline: float) -> dict[Side, _Head]:
    """The femoral head of each side whose joint is found (steps 1-3 of the module docstring).

    ``coarse``: the coarse canonical copy (HU), ``offset`` its canonical mm
    at index 0, ``midline`` the patient's left-right midline (canonical mm).
    Of each side's three thickest candidates and of each candidate's joint
    centres (:func:`_joint_centres`, best first), the first centre that lies
    at least 40 mm from the midline and whose joint is seen on at least
    ``MIN_JOINT_SUPPORT`` of the rays.
    """
    clipped = np.clip(coarse, -100.0, 700.0)
    smooth = ndi.gaussian_filter(clipped, 0.7)
    heads: dict[Side, _Head] = {}
    for side, cands in _head_candidates(smooth, offset, COARSE_MM, midline).items():
        lateral = _lateral(side)
        # lazily: a candidate's centres are only computed when the previous candidate's found no joint
        centres = (centre for cand in cands[:3] for centre in _joint_centres(clipped, cand, offset, COARSE_MM)
                   if (centre[2] - midline) * lateral >= 40.0)
        for centre in centres:
            head = _hip_head(smooth, centre, offset, COARSE_MM, _neck_axis(lateral))
            if head is not None and head.support >= MIN_JOINT_SUPPORT:
                heads[side] = head
                break
    return heads


def _metal_near_hip(metal: list[tuple[np.ndarray, float]], side: Side, heads: dict[Side, _Head],
                    midline: float) -> float:
    """Metal (cm3, :func:`_metal_components`) in ``side``'s hip region: on that side of the midline (more
    than 30 mm from it) and within 80 mm of its head centre, or of the mirror image of the other side's
    head centre when this side has no head; 0 without any head (module docstring, step 6)."""
    head, other = heads.get(side), heads.get("left" if side == "right" else "right")
    if head is not None:
        ref = head.centre
    elif other is not None:
        ref = other.centre * [1, 1, 0] + [0, 0, 2 * midline - other.centre[2]]
    else:
        return 0.0
    sign = _lateral(side)
    return float(sum(cm3 for centre, cm3 in metal
                     if (centre[2] - midline) * sign > 30.0 and np.linalg.norm(centre - ref) <= 80.0))


def segment_proximal_femurs(volume: Volume, view: CanonicalView | None = None) -> FemurSegmentation:
    """Segment the right and left proximal femur, excluding a side with metal.

    Parameters
    ----------
    volume : Volume
        CT volume; ``volume.hu`` is a ``(z, y, x)`` float32 array in HU and
        ``volume.affine`` maps ``(z, y, x, 1)`` to LPS mm. Any orientation and
        slice order, any slice thickness.
    view : CanonicalView, optional
        ``osteonode.segment.frame.canonical_view(volume)``, when the caller
        already has it (it is shared with the spine segmentation).

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
    view = view or canonical_view(volume)
    frame, canonical_hu, spacing = view.frame, view.canonical_hu, view.frame.spacing
    labels, labels_c = frame.zeros(volume.shape)
    grid_mm, coarse, offset = COARSE_MM, view.coarse, view.offset
    sides: dict[Side, FemurSide] = {}
    if min(coarse.shape) < 8:
        too_small = "the volume is too small to contain a hip"
        return FemurSegmentation(labels, {"right": FemurSide("not_in_view", too_small),
                                          "left": FemurSide("not_in_view", too_small)})
    cols = view.patient.sum(axis=(0, 1)).astype(float)
    midline = float((cols * np.arange(coarse.shape[2])).sum() / max(cols.sum(), 1.0)) * grid_mm + offset[2]
    heads = _find_heads(coarse, offset, midline)
    metal = _metal_components(canonical_hu, spacing)
    for side, fid in SIDE_LABELS:
        head = heads.get(side)
        metal_cm3 = _metal_near_hip(metal, side, heads, midline)
        if metal_cm3 >= MIN_METAL_CM3:
            sides[side] = FemurSide("excluded", f"metal in the {side} hip region ({metal_cm3:.1f} cm3 above "
                                    f"{METAL_HU:.0f} HU; probable arthroplasty or osteosynthesis)",
                                    *_head_geometry(head, frame, volume))
            continue
        if head is None:
            sides[side] = FemurSide("not_in_view", f"no {side} femoral head found in the field of view")
            continue
        coarse_mask, coarse_sl = _segment_side(coarse, view.patient, offset, grid_mm, head, side)
        mask, sl = _interpolated_to_native(coarse_mask, coarse_sl, offset, grid_mm, spacing, canonical_hu.shape)
        reason: str | None = None
        if head.centre[0] - 0.5 * head.radius < offset[0]:
            reason = "only the femoral head is in the field of view (neck and trochanters cut off)"
        elif mask.sum() * np.prod(spacing) < MIN_FEMUR_CM3 * 1000.0:
            reason = f"less than {MIN_FEMUR_CM3:.0f} cm3 of the proximal femur is in the field of view"
        if reason is not None:
            sides[side] = FemurSide("not_in_view", reason, *_head_geometry(head, frame, volume))
            continue
        target = labels_c[sl]
        target[mask & (target == 0)] = fid
        sides[side] = FemurSide("segmented", None, *_head_geometry(head, frame, volume))
    log.info("proximal femurs: %s", {s: f.status for s, f in sides.items()})
    return FemurSegmentation(labels=labels, sides=sides)


def _head_geometry(head: _Head | None, frame: CanonicalFrame, volume: Volume
                   ) -> tuple[tuple[float, float, float] | None, float | None]:
    if head is None:
        return None, None
    lps = frame.canonical_mm_to_lps(head.centre, volume)
    return (float(lps[0]), float(lps[1]), float(lps[2])), round(head.radius, 1)
