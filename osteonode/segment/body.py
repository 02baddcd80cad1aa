"""Vertebral body segmentation on the native grid, in the vertebra's own frame.

Each body is segmented on the native grid, resampled (linear) to 1 mm where it
is finer (thin slices smoothed with a 0.8 mm Gaussian first, noisy images with
the Gaussian that brings the noise to 12 HU), in the frame of the spine axis:

* **disc planes**: the planes through the neighbouring discs come from the
  column profile; each is searched again on the body's own crop
  (:func:`_disc_plane`: the plane of highest notch between two endplates),
  as a wedge-compressed endplate tilts its disc by more than the profile
  sees;
* **core HU**: robust median within 10 mm of the body centre and at least
  4 mm inside its boundary planes (a crushed body's endplates and discs are
  no marrow), taken again without voxels 150 HU or more from the first
  median (a bone island at the centre does not set the threshold);
* **threshold outline**: half-way between soft tissue (40 HU) and the core,
  bounded to [70, 140] HU, on a copy clipped before smoothing at the core plus
  the threshold's height (blur-invariant half-maximum edge: Hangartner TN,
  J Musculoskelet Neuronal Interact 2007;7:9-16), between the planes through
  the two neighbouring disc boundaries; from 4 mm inside a boundary out to the
  disc centre, voxels above half-way between the disc and the core HU; beyond
  the boundary, bone at least 40 HU denser than the disc (concave, tilted
  endplates: Wang Y, Battie MC, Videman T, Eur Spine J 2012;21:2316-2323);
* **what the cortical shell encloses**: an osteoporotic or fatty interior
  (-50 to 90 HU) falls below any threshold that keeps soft tissue out, but the
  cortex and the endplates stay brighter than the core. The shell (unsmoothed
  HU above the core + 60 HU, 90-150 HU; noise specks dropped) is closed
  behind the posterior wall, gaps up to ``SHELL_GAP_MM`` are bridged, and its
  interior in axial, coronal or sagittal planes joins the body, between the
  planes through the disc boundaries; for a body darker than its threshold
  (whose marrow the outline leaves out), in the final pass up to an
  endplate's concavity depth past them (``ENDPLATE_CONCAVITY_MM``: the rim of
  a concave endplate stands beyond a plane through it);
* **posterior wall**: on the anterior-posterior profile through the centre,
  the spinal canal is the longest fluid/fat run (< 60 HU) 10-32 mm behind
  the centre, and the wall the first bin denser than the threshold in front
  of it, at least 8 mm behind the centre (in a body as dark as the canal,
  whose run goes on into the body, the most prominent bump of the run at
  least 8 mm behind the centre; the first dense bin of such a run can be the
  halo of a bone island in front of the centre: L2 at -60 HU with a 10 mm
  island had its wall 6 mm behind its centre, Dice 0.78). The final pass cuts
  1 mm in front of that wall's half-maximum edge on the canal side
  (:func:`_wall_edge`; at most 80 HU above the canal), which neither a
  darker nor a brighter marrow moves; the centring
  pass at the wall's first dense bin. 8 mm
  beside the midline the body may reach 3 mm further back (the posterior
  wall is concave). This cut removes the pedicles and the arch;
* inside a 32 mm radius envelope, opened (2 mm ball), largest component,
  slice-wise hole filling and closing. A first pass centred on the tracked
  centreline, in the frame of its tangent, gives the centre of the final pass:
  its centroid. The final pass's frame (envelope, profile, posterior-wall cut)
  is perpendicular to the line through the two neighbouring bodies' centroids
  (:func:`osteonode.segment.spine.body_axis`), the axis along which the
  heights are measured; the disc planes are still searched along the tangent.

Whole vertebrae: on the 2 mm copy, bone above 150 HU up to 100 mm behind and
30 mm beside the bodies is flooded from the bodies (marker watershed on
inverted HU: pedicles join their body, the darker facet joints part
neighbours).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage as ndi

from osteonode.segment.column import FOCAL_DENSE_HU, SHELL_HU
from osteonode.segment.frame import (
    COARSE_MM,
    IN_PLANE,
    CanonicalView,
    Coords,
    coarse_to_native,
    ellipsoid,
    fill_holes,
    largest_component_filled,
    linear_along,
    perpendicular_frame,
)
from osteonode.segment.levels import SACRUM
from osteonode.volume import bounding_box

log = logging.getLogger(__name__)

#: A plane: a point on it and its unit normal, canonical ``(s, a, l)`` mm.
Plane = tuple[np.ndarray, np.ndarray]

#: Radius (mm) of the sphere at the body centre whose robust median is the core HU ...
CORE_RADIUS_MM = 10.0
#: ... of its voxels at least this far (mm) inside the body's boundary planes: the sphere is 20 mm across,
#: and a crushed body 15 mm tall (45 % of L3) filled it with its endplates and discs (core 76 HU for a
#: marrow of about 15 HU at -100 HU: the body outline left the marrow out, Dice 0.49).
CORE_PLATE_MARGIN_MM = 4.0


#: Voxels further (HU) from the sphere's first median are left out of the core HU (focal lesions).
CORE_FOCUS_HU = 150.0
#: Bone denser than ``FOCAL_DENSE_HU`` (a bone island, a blastic focus) is left out of the core HU with
#: this partial-volume halo (mm): a 15 mm island took 40 % of the core sphere of an L1 at -90 HU, whose
#: core then read 391 HU and whose body shrank to the island.
FOCAL_HALO_MM = 3.0


#: The cortical shell of a body is at least this much (HU) denser than its trabecular core ...
SHELL_ABOVE_CORE_HU = 60.0


#: ... and than this (HU; soft tissue is 20-60 HU, and specks of its noise above this are dropped). On
#: 3 mm voxels the cortex of a fatty or osteoporotic body averages its marrow in: with every core at
#: -120 HU of ``bench/robustness.py`` the anterior cortex of L1 reads 100-125 HU where it shows, and at
#: 110 HU the shell stopped at a Schmorl node's rim inside the body (Dice 0.83, ROI 16 % small).
SHELL_MIN_HU = 90.0


#: A faint posterior wall (osteoporotic body darker than the canal limit) is a bump of the AP
#: profile within this distance (mm, 1 mm bins) in front of the canal's darkest point ...
FAINT_WALL_MM = 14
#: ... standing at least this much (HU) above it.
FAINT_WALL_HU = 15.0
#: The posterior wall lies at least this far (mm) behind the body centre (lumbar and lower thoracic
#: bodies are over 25 mm deep).
MIN_WALL_DEPTH_MM = 8.0
#: Endplates are looked for in this fraction of the body height next to each disc.
PLATE_ZONE = 0.35
#: Bright specks smaller than this (mm3) are noise, not cortical shell.
SPECK_MM3 = 30.0


#: Gaps (mm) in the cortical shell of a body that are bridged before its interior is filled.
SHELL_GAP_MM = 6.0


#: How far (mm) what the shell of a dark body encloses may reach past the boundary plane of its superior
#: and of its inferior endplate (:func:`segment_body`): the mean concavity depth of a lumbar endplate,
#: 0.7 mm for the superior endplate of a body and 1.5 mm for the inferior (the caudal and the cranial
#: endplate of a disc; Wang Y, Battie MC, Videman T, Eur Spine J 2012;21:2316-2323). A plane through a
#: concave endplate leaves its rim beyond, by up to that depth.
ENDPLATE_CONCAVITY_MM = {"superior": 0.7, "inferior": 1.5}


#: Angular sectors of :func:`_star_fill` (10 degrees each: 2.6 mm of a 15 mm radius, one voxel
#: of a 3 mm slice).
STAR_SECTORS = 36


#: The spinal canal (CSF and epidural fat, partial-volume averaged on 3 mm slices) is below this HU.
CANAL_MAX_HU = 60.0
#: A run of canal-like bins (1 mm) at least this long can be the canal (:func:`segment_body`).
CANAL_MIN_RUN_MM = 6


#: Soft-tissue reference HU (skeletal muscle).
SOFT_TISSUE_HU = 40.0


#: Half-width (mm) of the spinal canal in front of which the posterior body wall is found.
CANAL_HALF_WIDTH_MM = 8.0


#: How far (mm) the posterolateral body reaches behind the wall found in the midline (concave wall).
POSTERIOR_CONCAVITY_MM = 3.0


#: The body starts this far (mm) in front of the posterior wall's half-maximum edge (:func:`_wall_edge`).
WALL_EDGE_INSET_MM = 1.0


#: The posterior wall's edge level lies at most this far (HU) above the canal (:func:`_wall_edge`): about
#: half the rise to a normal posterior cortex on the 1 mm profile of 3 mm slices (150-190 HU over a 5-15 HU
#: canal on the example CT, whose edges this cap leaves where they were).
WALL_EDGE_RISE_HU = 80.0


#: Bone of the neural arch on the coarse grid (cortical laminae and processes are denser than this).
ARCH_BONE_HU = 150.0


#: Watershed marker of bone belonging to unlabelled neighbouring vertebrae.
FOREIGN = 255


#: Finest grid (mm) on which bodies are segmented; thinner slices and pixels are resampled to it.
WORK_MM = 1.0


#: Depth (mm) inside a disc boundary plane where disc tissue may lie (plane error, disc wedge, endplate concavity).
ENDPLATE_BAND_MM = 4.0


#: The plane of each disc is searched on the image (:func:`_disc_plane`) over the columns within this
#: distance (mm) of the body centre ...
DISC_FIT_RADIUS_MM = 14.0
#: ... tilted about the left-right axis by up to this much (degrees) from the spine axis (the 45 %
#: wedge of the bench tilts an endplate by about 20 degrees) ...
DISC_MAX_TILT_DEG = 30.0
#: ... in steps of this much (degrees; 5 degrees move the rim of a 14 mm circle by 1.2 mm) ...
DISC_TILT_STEP_DEG = 5.0
#: ... and moved along the axis by up to this much (mm) from the disc of the column profile.
DISC_SEARCH_MM = 3.0
#: The notch of a disc: the brightest HU this far (mm) below and above a voxel (the endplates) ...
DISC_FLANK_MM = (3.0, 8.0)
#: ... minus its own HU, capped at this much (HU; one bright focus does not outweigh the plane) ...
DISC_NOTCH_CAP_HU = 150.0
#: ... and nought below this HU: fat, or the fatty marrow of an osteoporotic core next to its faint
#: endplate, is not disc (a 30 % wedge of L2 with all cores at -100 HU, held out of the bench, took
#: in the disc above: Dice 0.81 without this floor, 0.88 with it and before the search).
DISC_MIN_HU = 30.0
#: The searched plane replaces the column profile's when its mean notch is higher by this much (HU;
#: :func:`searched_plane_replaces`) and it is tilted by at least this much (degrees) against it
#: (smaller differences are within the profile's error, and the bodies' outline and posterior wall
#: would move with them for nothing). A thin disc on 3 mm slices has a shallow notch: the example
#: CT's T12/L1 disc scores 49 HU flat and 60 HU at the 11 degrees a 45 % wedge of L1 tilts it (with
#: 20 HU here the flat plane cut L1's posterior-superior corner and the wedge was graded 2;
#: bench/README.md, session 19).
DISC_BETTER_HU = 10.0
DISC_MIN_RETILT_DEG = 10.0


def body_threshold(core_hu: float) -> float:
    """Body threshold (HU): half-way between soft tissue and the core HU, bounded to [70, 140]."""
    return float(np.clip(0.5 * (SOFT_TISSUE_HU + core_hu), 70.0, 140.0))


def trabecular_core_hu(smoothed: np.ndarray, coords_mm: tuple[np.ndarray, np.ndarray, np.ndarray],
                       centre: np.ndarray, between: tuple[Plane, Plane] | None = None) -> float:
    """Trabecular core HU: robust median of ``smoothed`` (canonical ``(s, a, l)`` crop) within 10 mm of ``centre`` (mm).

    With ``between`` (the body's upper and lower boundary planes, point and
    unit normal, canonical mm), only the voxels at least
    ``CORE_PLATE_MARGIN_MM`` inside both count, unless that leaves less than a
    fifth of the sphere (a body under about 10 mm tall).

    Voxels denser than any trabecular bone (``FOCAL_DENSE_HU``: a bone
    island, a blastic focus) and ``FOCAL_HALO_MM`` around them are left out;
    when that leaves less than a fifth of the sphere (an island as large as
    it), a sphere of 15 mm is used. The median is then taken again over the
    voxels within ``CORE_FOCUS_HU`` of the first median, so that a lesion
    below that density at the centre does not set the body threshold either.
    150 HU if the sphere is empty.
    """
    Z, Y, X = np.meshgrid(*(axis_mm - centre_mm for axis_mm, centre_mm in zip(coords_mm, centre)),
                          indexing="ij", sparse=True)
    r2 = Z ** 2 + Y ** 2 + X ** 2
    core = np.broadcast_to(r2 <= CORE_RADIUS_MM ** 2, smoothed.shape)
    if not core.any():
        return 150.0
    if between is not None:
        below_top, above_bottom = (_signed(plane, coords_mm) for plane in between)
        inside = core & (below_top <= -CORE_PLATE_MARGIN_MM) & (above_bottom >= CORE_PLATE_MARGIN_MM)
        if inside.sum() >= 0.2 * core.sum():
            core = inside
    spacing = np.array([float(axis_mm[1] - axis_mm[0]) if len(axis_mm) > 1 else 1.0 for axis_mm in coords_mm])
    reach = np.maximum(1, np.round(FOCAL_HALO_MM / spacing)).astype(int)
    wide = np.broadcast_to(r2 <= (1.5 * CORE_RADIUS_MM) ** 2, smoothed.shape)
    # the halo of the dense foci within the widest sphere used, from the image around it only (the
    # whole crop's cortex and posterior elements: 0.8 s of 4.3 s segmenting the 512 grid)
    box = bounding_box(wide, reach)
    focus = np.zeros(smoothed.shape, bool)
    focus[box] = ndi.binary_dilation(smoothed[box] > FOCAL_DENSE_HU, structure=ellipsoid(reach, spacing))
    clear = core & ~focus
    if clear.sum() < 0.2 * core.sum():  # an island as large as the sphere: the trabecular bone around it
        clear = wide & ~focus
    values = smoothed[clear] if clear.sum() >= 0.2 * core.sum() else smoothed[core]
    first = float(np.median(values))
    kept = values[np.abs(values - first) <= CORE_FOCUS_HU]
    return float(np.median(kept)) if kept.size else first


def segment_body(smoothed: np.ndarray, outline_hu: np.ndarray, raw: np.ndarray,
                 coords_mm: tuple[np.ndarray, np.ndarray, np.ndarray],
                 centre: np.ndarray, axis: np.ndarray, top: Plane, bottom: Plane, spacing: np.ndarray,
                 outer_top: Plane, outer_bottom: Plane, core_hu: float, fill_shell: bool = True,
                 frame_axis: np.ndarray | None = None, wall_edge: bool = False) -> np.ndarray:
    """Segment one vertebral body inside a canonical crop (every rule: the module docstring).

    Parameters
    ----------
    smoothed : numpy.ndarray
        ``(s, a, l)`` crop in HU, smoothed: tells bone clearly denser than the disc.
    outline_hu : numpy.ndarray
        The same crop (same shape, HU) clipped at the core HU plus the
        threshold's height above soft tissue before smoothing: the outline is
        thresholded on it (the centring pass passes ``smoothed`` again).
    raw : numpy.ndarray
        The same crop (same shape, HU) unsmoothed: the cortical shell is found
        on it (smoothing for noise would blur a one-voxel cortex below the
        shell threshold).
    coords_mm : tuple of numpy.ndarray
        Canonical position (mm) of each index along the three axes of ``outline_hu``.
    centre : numpy.ndarray
        ``(3,)`` body centre (canonical mm).
    axis : numpy.ndarray
        ``(3,)`` unit spine axis (pointing superior): the disc planes are
        searched (:func:`_disc_plane`) and the disc HU sampled along it.
    top, bottom : tuple of numpy.ndarray
        (point, unit normal) of the planes through the disc boundaries above and below.
    spacing : numpy.ndarray
        ``(3,)`` voxel spacing of ``outline_hu`` in mm.
    outer_top, outer_bottom : tuple of numpy.ndarray
        Planes through the disc centres above and below (equal to ``top`` /
        ``bottom`` where the field of view ends without a disc).
    core_hu : float
        Core HU (:func:`trabecular_core_hu`) at ``centre``.
    fill_shell : bool
        Add what the cortical shell encloses (False for the sacrum, whose
        canal and foramina bone encloses too).
    frame_axis : numpy.ndarray or None
        ``(3,)`` unit axis (pointing superior) of the vertebra's own frame:
        the envelope, the anterior-posterior profile and the posterior-wall
        cut lie perpendicular to it. ``None``: ``axis``.
    wall_edge : bool
        The final pass: cut ``WALL_EDGE_INSET_MM`` in front of the posterior
        wall's half-maximum edge (:func:`_wall_edge`) instead of at the wall's
        first dense bin (the centring pass), and let what the shell of a body
        darker than its threshold encloses reach ``ENDPLATE_CONCAVITY_MM`` past
        the planes ``top`` and ``bottom``.

    Returns
    -------
    numpy.ndarray
        Boolean ``(s, a, l)`` mask of the body, same shape as ``outline_hu``.
    """
    zc, yc, xc = coords_mm
    Z, Y, X = np.meshgrid(zc, yc, xc, indexing="ij", sparse=True)
    rel = (Z - centre[0], Y - centre[1], X - centre[2])

    if fill_shell:  # not the sacrum: its S1 body is not measured
        if _differs(top, outer_top):
            outer_top, top = _disc_plane(smoothed, coords_mm, centre, axis, outer_top, top)
        if _differs(bottom, outer_bottom):
            outer_bottom, bottom = _disc_plane(smoothed, coords_mm, centre, axis, outer_bottom, bottom)
    s_top, s_bottom = _signed(top, coords_mm), _signed(bottom, coords_mm)
    inner = (s_top <= 0) & (s_bottom >= 0)
    s_ot, s_ob = _signed(outer_top, coords_mm), _signed(outer_bottom, coords_mm)
    slab = (s_ot <= 0) & (s_ob >= 0)
    radial2 = rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2 - (rel[0] * axis[0] + rel[1] * axis[1] + rel[2] * axis[2]) ** 2
    disc_zone = (radial2 <= 100.0) & ((np.abs(s_ot) <= 1.6) | (np.abs(s_ob) <= 1.6))
    disc_zone = disc_zone & ~inner
    disc_hu = float(np.mean(outline_hu[disc_zone])) if disc_zone.any() else np.nan
    thr = body_threshold(core_hu)
    # vertebra frame: a = anterior-posterior and w = left-right, both perpendicular to the
    # spine axis (so that tilted vertebrae, e.g. L5, are cut along their own posterior wall)
    frame_axis = axis if frame_axis is None else frame_axis
    u, w = perpendicular_frame(frame_axis)
    along = rel[0] * frame_axis[0] + rel[1] * frame_axis[1] + rel[2] * frame_axis[2]
    a = rel[0] * u[0] + rel[1] * u[1] + rel[2] * u[2]
    lr = rel[0] * w[0] + rel[1] * w[1] + rel[2] * w[2]
    # posterior wall: AP profile through the centre (|along| < 4 mm, |lr| < 6 mm), 1 mm bins
    ap_band = inner & (np.abs(lr) < 6.0) & (np.abs(along) < 4.0)
    centres, (prof, shell_prof) = _ap_profiles(np.broadcast_to(a, outline_hu.shape)[ap_band],
                                               (outline_hu[ap_band], smoothed[ap_band]))
    wall = _posterior_wall(centres, prof, shell_prof, thr, wall_edge)
    # the posterior wall is concave: lateral to the canal the body reaches a little further back
    behind = np.where(np.abs(lr) >= CANAL_HALF_WIDTH_MM, POSTERIOR_CONCAVITY_MM, 0.0)
    envelope = ((lr / 32.0) ** 2 + (a / 32.0) ** 2 <= 1.0) & (a >= wall - behind)
    # outline on the clipped copy: the body threshold deep inside; half-way between disc and core
    # (where disc tissue may lie) from ENDPLATE_BAND_MM inside a disc boundary out to the disc
    # centre; beyond the boundary, also bone clearly denser than the disc (disc + 40 HU, unclipped)
    if np.isfinite(disc_hu):
        band = ~inner
        for s_inner, s_outer, sign in ((s_top, s_ot, -1.0), (s_bottom, s_ob, 1.0)):
            if np.any(s_inner != s_outer):  # a disc on this side
                band = band | (sign * s_inner < ENDPLATE_BAND_MM)
        outline = outline_hu > np.where(band, max(thr, 0.5 * (disc_hu + core_hu)), thr)
        full = envelope & slab & outline & (inner | (smoothed > max(thr, disc_hu + 40.0)))
    else:
        full = envelope & inner & (outline_hu > thr)
    # what the cortical shell encloses, whatever its density (osteoporotic or fatty marrow darker
    # than the threshold), in axial, coronal or sagittal planes; closed behind the posterior wall
    if fill_shell:
        # the cortical shell: clearly denser than the core (a thin, partial-volume cortex of an
        # osteoporotic body is 100-200 HU at 3 mm), clearly denser than soft tissue
        shell_thr = float(np.clip(core_hu + SHELL_ABOVE_CORE_HU, SHELL_MIN_HU, SHELL_HU))
        shell = _without_specks((raw > shell_thr) & np.broadcast_to(envelope, outline_hu.shape), SPECK_MM3, spacing)
        shell |= np.broadcast_to((a < wall - behind) & (np.abs(lr) < 32.0), outline_hu.shape)
        # between the inner boundaries (reaching 2 or 4 mm past them brought back the endplates of dark
        # L1 bodies, core_L1-70 Dice 0.86 -> 0.91, but graded undeformed dark L1 bodies 2 and lost L1 of
        # the -60 HU wedge, session 8); in the final pass of a dark body, up to the endplates'
        # concavity past them: the rim of a concave endplate, whose marrow no threshold outline keeps
        # (the centring pass stays within them: the centroid it gives places the final pass's
        # posterior-wall profile, and a dark L4 moved by it had its wall found 6 mm further forward)
        between = inner
        if wall_edge and core_hu < thr:
            between = slab & (s_top <= ENDPLATE_CONCAVITY_MM["superior"]) \
                & (s_bottom >= -ENDPLATE_CONCAVITY_MM["inferior"])
        region = np.broadcast_to(envelope & between, outline_hu.shape)
        enclosed = np.zeros(outline_hu.shape, bool)
        if region.any():  # fill within the envelope's box only (padded by the widest gap)
            box = bounding_box(region, np.ceil(SHELL_GAP_MM / spacing).astype(int) + 1)
            enclosed[box] = _enclosed(shell[box], SHELL_GAP_MM, spacing)
        full = full | (enclosed & region)
        if core_hu < thr:
            # a core below the outline threshold (osteoporotic, below about 100 HU, or fatty marrow):
            # the threshold outline leaves the core out and a cortex thinned by partial volume (or
            # blurred by resampling) leaves gaps wider than SHELL_GAP_MM; in the same region, as rays
            # would cross the disc's annulus further out
            full = full | (_star_fill(shell & region, coords_mm, centre) & region)
        height = np.broadcast_to(s_bottom / np.maximum(s_bottom - s_top, 1e-3), outline_hu.shape)
        plates = shell & full
        full = _within_endplates(full, plates & (height >= 1.0 - PLATE_ZONE), plates & (height <= PLATE_ZONE))
    log.debug("body at %s mm: core %.0f HU, threshold %.0f HU, disc %.0f HU, posterior wall %.0f mm",
              np.round(centre), core_hu, thr, disc_hu, wall)
    return _cleaned(full, np.broadcast_to(slab & envelope, outline_hu.shape), spacing)


def _cleaned(full: np.ndarray, keep: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """The body from its candidate voxels ``full`` (boolean ``(s, a, l)``): opened with a 2 mm ball,
    its largest component with holes filled, closed with the same ball within ``keep`` (same shape),
    and holes filled slice by slice; ``spacing`` (mm) of the grid. All false when nothing is left."""
    out = np.zeros(full.shape, bool)
    if not full.any():
        return out
    rad = np.maximum(1, np.round(2.0 / spacing)).astype(int)
    ball = ellipsoid(rad, spacing)
    # morphology on the bounding box only (padded by the structuring element)
    box = bounding_box(full, rad + 1)
    mask = ndi.binary_opening(full[box], structure=ball)
    if not mask.any():
        return out
    mask = largest_component_filled(mask)  # the largest component is the body
    mask = ndi.binary_closing(mask, structure=ball) & keep[box]
    out[box] = fill_holes(mask, IN_PLANE)
    return out


#: Bins (mm along the anterior axis from the body centre, 1 mm wide) of the anterior-posterior profile.
AP_BINS_MM = np.arange(-35.5, 0.0, 1.0)


def _ap_profiles(a_mm: np.ndarray, values: tuple[np.ndarray, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Anterior-posterior profiles: the mean of each of ``values`` (HU, one per voxel at ``a_mm``, mm
    along the anterior axis from the body centre) in 1 mm bins centred at -35 .. -1 mm (``AP_BINS_MM``).

    Bins between voxel rows stay empty on coarse grids and are interpolated
    (left NaN when fewer than two bins hold a voxel). Returns the bin centres (mm)
    and the profiles (HU).
    """
    idx = np.digitize(a_mm, AP_BINS_MM) - 1
    ok = (idx >= 0) & (idx < len(AP_BINS_MM) - 1)
    centres = AP_BINS_MM[:-1] + 0.5
    counts = np.bincount(idx[ok], minlength=len(AP_BINS_MM) - 1)
    good = counts > 0
    profiles = []
    for image in values:
        sums = np.bincount(idx[ok], weights=image[ok], minlength=len(AP_BINS_MM) - 1)
        prof = np.full(len(centres), np.nan)
        prof[good] = sums[good] / counts[good]
        if good.sum() >= 2:
            prof = np.interp(centres, centres[good], prof[good])
        profiles.append(prof)
    return centres, profiles


def _posterior_wall(centres: np.ndarray, prof: np.ndarray, shell_prof: np.ndarray, thr: float,
                    wall_edge: bool) -> float:
    """Position (mm along the anterior axis from the body centre, negative: behind it) of the body's
    posterior cut, from the anterior-posterior profiles of :func:`_ap_profiles`.

    ``prof``: the profile of the clipped copy the outline is thresholded on;
    ``shell_prof``: of the smoothed copy; ``thr``: the body threshold (HU).
    The spinal canal is the longest run of fluid/fat bins (CSF, epidural fat:
    < ``CANAL_MAX_HU``) 10-32 mm behind the centre; the posterior wall is the
    first bin in front of it denser than the threshold (the posterior cortex,
    however thin), within 6 mm and at least ``MIN_WALL_DEPTH_MM`` behind the
    centre, or a faint wall (:func:`_faint_wall`). ``wall_edge``: the cut lies
    ``WALL_EDGE_INSET_MM`` in front of the wall's half-maximum edge
    (:func:`_wall_edge`), else at the wall's first dense bin. Without a canal
    run, the cut is where the profile, coming back anteriorly from the first
    fluid/fat bin, rises above the threshold; -30 mm without either.
    """
    fluid = (shell_prof < CANAL_MAX_HU) & (centres >= -32.0) & (centres <= -10.0)
    runs, start = [], None
    for k in range(len(centres) + 1):
        if k < len(centres) and fluid[k]:
            start = k if start is None else start
        elif start is not None:
            runs.append((start, k - 1))
            start = None
    if runs:
        # the most posterior long run: in front of it, the interior of a body as dark as the canal makes
        # a second run, as long when a bone island draws the centre forwards (L1 at -90 HU lost)
        long = [r for r in runs if r[1] - r[0] + 1 >= CANAL_MIN_RUN_MM]
        back, front = long[0] if long else max(runs, key=lambda r: (r[1] - r[0], r[1]))
        last = int(np.searchsorted(centres, -MIN_WALL_DEPTH_MM, "right")) - 1
        k_wall = next((k for k in range(front + 1, min(front + 7, last + 1, len(centres)))
                      if shell_prof[k] > thr + 15.0), None)
        if k_wall is None:
            k_wall = _faint_wall(shell_prof, back, front, last)
        if k_wall is not None:
            if wall_edge:
                return _wall_edge(shell_prof, centres, back, front, k_wall, last) + WALL_EDGE_INSET_MM
            return float(centres[k_wall]) + 0.5  # the posterior cortex inside the envelope (1 mm bins)
    # no clear cortex: the canal is the first fluid/fat-density point walking posteriorly,
    # and the wall is where the profile, coming back anteriorly, rises above the threshold
    k_canal = next((k for k in range(len(centres) - 1, -1, -1) if centres[k] <= -4.0 and prof[k] < 50.0), None)
    if k_canal is None:
        return -30.0
    j = k_canal
    while j + 1 < len(centres) and prof[j] < thr:
        j += 1
    return float(centres[j]) - 0.5


def _signed(plane: Plane, coords_mm: Coords) -> np.ndarray:
    """Signed distance (mm, along the plane's unit normal) of each voxel of a canonical crop from ``plane``
    (point, normal); broadcastable to the crop's ``(s, a, l)`` shape."""
    Z, Y, X = np.meshgrid(*coords_mm, indexing="ij", sparse=True)
    p, n = plane
    return (Z - p[0]) * n[0] + (Y - p[1]) * n[1] + (X - p[2]) * n[2]


def _differs(a: Plane, b: Plane) -> bool:
    """Whether two planes (point, normal) differ (a disc boundary and its centre: there is a disc)."""
    return not (np.allclose(a[0], b[0]) and np.allclose(a[1], b[1]))


def _plane_s(plane: Plane, a_mm: np.ndarray, l_mm: np.ndarray) -> np.ndarray:
    """Canonical s (mm) of ``plane`` (point, unit normal) over canonical ``a_mm``, ``l_mm`` positions."""
    p, n = plane
    return p[0] - ((a_mm - p[1]) * n[1] + (l_mm - p[2]) * n[2]) / n[0]


def _disc_plane(smoothed: np.ndarray, coords_mm: Coords, centre: np.ndarray, axis: np.ndarray,
                outer: Plane, inner: Plane) -> tuple[Plane, Plane]:
    """The plane of a disc searched on the image next to one body, and the boundary plane moved with it.

    The column profile (:mod:`osteonode.segment.column`) gives each disc one
    tilt about the left-right axis, from planes through the centreline on a
    2 mm copy; next to a wedge-compressed body, or a body tilted by a
    neighbour's wedge, that tilt can be 10-35 degrees off, and the body then
    takes in the disc and the neighbour's endplate on one side and loses its
    own corner on the other. Here, on the body's own crop, each voxel's notch
    is the brightest HU ``DISC_FLANK_MM`` below and above it (the two
    endplates) minus its own HU (capped at ``DISC_NOTCH_CAP_HU``; nought
    below ``DISC_MIN_HU``, where a dark osteoporotic core meets its faint
    endplate), and each plane tilted about the left-right axis
    by up to ``DISC_MAX_TILT_DEG`` from the spine axis (with the profile's
    left-right slope) and moved by up to ``DISC_SEARCH_MM`` along it is scored
    by the mean notch over the columns within ``DISC_FIT_RADIUS_MM`` of the
    body centre. The best plane replaces the column profile's only when its
    score is clearly higher and its tilt clearly different
    (:func:`searched_plane_replaces`): a disc the profile crossed well stays
    as it was.

    Parameters
    ----------
    smoothed : numpy.ndarray
        Smoothed ``(s, a, l)`` crop, HU.
    coords_mm : tuple of numpy.ndarray
        Canonical position (mm) of each index along the three axes of ``smoothed``.
    centre : numpy.ndarray
        ``(3,)`` body centre (canonical mm).
    axis : numpy.ndarray
        ``(3,)`` unit spine axis.
    outer, inner : tuple of numpy.ndarray
        (point, unit normal) of the planes through the disc's centre and
        through its boundary on this body's side.

    Returns
    -------
    tuple
        The disc's centre plane and its boundary plane, parallel to it at the
        same distance along s at the body centre as before but at most
        ``DISC_FLANK_MM[0]`` (where the search takes the endplates to begin: a
        profile that crossed a wedge's disc obliquely put its boundary too far
        into the body); ``outer`` and ``inner`` unchanged when no plane scores
        better.
    """
    zc, yc, xc = coords_mm
    ysel = np.abs(yc - centre[1]) <= DISC_FIT_RADIUS_MM
    xsel = np.abs(xc - centre[2]) <= DISC_FIT_RADIUS_MM
    if len(zc) < 3 or not ysel.any() or not xsel.any():
        return outer, inner
    sub = smoothed[:, ysel][:, :, xsel]
    a_mm, l_mm = np.meshgrid(yc[ysel], xc[xsel], indexing="ij")
    columns = (a_mm - centre[1]) ** 2 + (l_mm - centre[2]) ** 2 <= DISC_FIT_RADIUS_MM ** 2
    ds = float(zc[1] - zc[0])
    near, far = max(1, int(round(DISC_FLANK_MM[0] / ds))), max(1, int(round(DISC_FLANK_MM[1] / ds)))
    below = np.full(sub.shape, -np.inf, np.float32)
    above = np.full(sub.shape, -np.inf, np.float32)
    for k in range(near, max(near, far) + 1):
        below[k:] = np.maximum(below[k:], sub[:-k])
        above[:-k] = np.maximum(above[:-k], sub[k:])
    notch = np.clip(np.minimum(below, above) - sub, 0.0, DISC_NOTCH_CAP_HU)
    notch[sub < DISC_MIN_HU] = 0.0  # fat or fatty marrow, not disc
    ca, cl = a_mm[columns], l_mm[columns]
    col_notch = notch[:, columns]  # (ns, n_columns)
    u, w = perpendicular_frame(axis)
    # planes tilted about the left-right axis (as the column profile's), its left-right slope kept
    tilts = np.radians(np.arange(-DISC_MAX_TILT_DEG, DISC_MAX_TILT_DEG + 1e-6, DISC_TILT_STEP_DEG))
    lateral = float(outer[1] @ w) / float(outer[1] @ axis)
    normals = axis + np.tan(tilts)[:, None] * u + lateral * w
    normals = np.vstack([outer[1], normals / np.linalg.norm(normals, axis=1, keepdims=True)])
    normals = normals[np.abs(normals[:, 0]) >= 0.3]
    shifts = np.arange(-DISC_SEARCH_MM, DISC_SEARCH_MM + 1e-6, min(ds, 1.5) / 2)
    points = outer[0] + shifts[:, None] * axis  # (n_shifts, 3)
    # s of each candidate plane (normal x point) over each column, then its mean notch (linear along s)
    s_at = (points[None, :, 0, None] - ((ca[None, None] - points[None, :, 1, None]) * normals[:, None, 1, None] +
                                        (cl[None, None] - points[None, :, 2, None]) * normals[:, None, 2, None])
            / normals[:, None, 0, None])  # (n_normals, n_shifts, n_columns)
    x = (s_at - zc[0]) / ds
    lo = np.clip(np.floor(x).astype(int), 0, len(zc) - 2)
    frac = np.clip(x - lo, 0.0, 1.0)
    j = np.arange(ca.size)
    values = col_notch[lo, j] * (1.0 - frac) + col_notch[lo + 1, j] * frac
    values[(x < 0) | (x > len(zc) - 1)] = 0.0
    score = values.mean(axis=2)
    given = float(score[0, np.argmin(np.abs(shifts))])
    k_normal, k_shift = np.unravel_index(np.argmax(score), score.shape)
    best = float(score[k_normal, k_shift])
    best_plane = (points[k_shift], normals[k_normal])
    log.debug("disc plane at %.0f (body %.0f): given notch %.0f HU, best %.0f HU, normal %s -> %s, moved %.1f mm",
              outer[0][0], centre[0], given, best,
              np.round(outer[1], 2), np.round(best_plane[1], 2), float(shifts[k_shift]))
    retilt = np.degrees(np.arccos(min(1.0, abs(float(best_plane[1] @ outer[1])))))
    if not searched_plane_replaces(given, best, retilt):
        return outer, inner
    centre_mm = np.array(centre, float)
    # the boundary at most DISC_FLANK_MM[0] from the centre (where the search took the endplates to
    # begin): the profile's boundary of a disc it crossed obliquely lies too far into the body
    offset = float(_plane_s(outer, centre_mm[1], centre_mm[2]) - _plane_s(inner, centre_mm[1], centre_mm[2]))
    offset = float(np.sign(offset)) * min(abs(offset), DISC_FLANK_MM[0])
    point = np.array([_plane_s(best_plane, centre_mm[1], centre_mm[2]), centre_mm[1], centre_mm[2]])
    return (point, best_plane[1]), (point - np.array([offset, 0.0, 0.0]), best_plane[1])


def searched_plane_replaces(given_hu: float, best_hu: float, retilt_deg: float) -> bool:
    """Whether the disc plane found by :func:`_disc_plane` replaces the column profile's.

    Parameters
    ----------
    given_hu, best_hu : float
        Mean notch (HU) of the column profile's plane and of the best searched plane.
    retilt_deg : float
        Angle between the two planes, degrees.

    Returns
    -------
    bool
        True when the tilt differs by at least ``DISC_MIN_RETILT_DEG`` and the
        notch is ``DISC_BETTER_HU`` deeper -- or, where the profile's plane
        scores under ``DISC_BETTER_HU`` (the faint disc of a dark spine, or a
        plane that misses it), at least twice as deep and ``DISC_BETTER_HU``
        deep. (The disc above a 45 % wedge of L2 with every core 110 HU
        darker: 5 HU on the profile's plane, 13 HU on the searched plane 23
        degrees from it; with the profile's plane L2 was graded 0.)
    """
    needed = max(DISC_BETTER_HU, given_hu + min(DISC_BETTER_HU, given_hu))
    return retilt_deg >= DISC_MIN_RETILT_DEG and best_hu >= needed


def _faint_wall(profile: np.ndarray, back: int, front: int, last: int) -> int:
    """Bin of a faint posterior wall on an anterior-posterior profile (1 mm bins, posterior first).

    With an osteoporotic or fatty core darker than ``CANAL_MAX_HU`` the fluid run
    of the spinal canal (bins ``back`` to ``front``) goes on into the body, and the
    thinned posterior cortex is only a bump of the profile, inside the run or
    up to ``FAINT_WALL_MM`` in front of it. The wall is the most prominent bump
    at least ``CANAL_MIN_RUN_MM`` in front of ``back`` (a canal behind it) and not
    in front of bin ``last`` (``MIN_WALL_DEPTH_MM`` behind the body centre): the
    bin standing highest both above the darkest bin behind it in the run and
    above the darkest bin within ``FAINT_WALL_MM`` in front of it, if that is
    at least ``FAINT_WALL_HU`` (noise in the canal makes smaller bumps). Without one, the
    bin in front of the run. (The wall used to be the highest bin within
    ``FAINT_WALL_MM`` in front of the run's darkest bin; a core darker than the
    canal's fat made that bin the body's own interior, and the bump in front of
    it the anterior cortex: with a spine axis 6 degrees off, L2 with its core
    at -100 HU of ``bench/robustness.py`` had its wall 2 mm behind its centre
    and lost 40 % of its voxels.)

    Parameters
    ----------
    profile : numpy.ndarray
        ``(n,)`` HU in 1 mm bins along the anterior-posterior line, posterior first.
    back, front : int
        First and last bin of the canal's fluid run.
    last : int
        Most anterior bin the wall may lie in.

    Returns
    -------
    int
        Bin of the posterior wall.
    """
    best, best_prominence = front + 1, FAINT_WALL_HU
    for k in range(back + CANAL_MIN_RUN_MM, min(front + FAINT_WALL_MM, last, len(profile) - 2) + 1):
        behind = float(profile[back:k].min())
        ahead = float(profile[k + 1:min(k + 1 + FAINT_WALL_MM, len(profile))].min())
        prominence = profile[k] - max(behind, ahead)
        if prominence >= best_prominence:
            best, best_prominence = k, prominence
    return best


def _wall_edge(profile: np.ndarray, centres: np.ndarray, back: int, front: int, k_wall: int, last: int) -> float:
    """Position (mm) of the posterior surface of the posterior wall on an anterior-posterior profile.

    The surface is the half-maximum edge between the canal (the median of its
    fluid run, bins ``back`` to ``front``) and the wall (the highest bin from
    ``k_wall``, its first dense bin or its faint bump, to 3 mm in front of it,
    not in front of bin ``last``): from ``k_wall``, the last bin walking
    posteriorly that is still at or above half-way (or, if ``k_wall`` is below
    it, the first walking anteriorly), interpolated linearly with the bin behind
    it (Hangartner TN, J Musculoskelet Neuronal Interact 2007;7:9-16). The canal
    side of the wall does not change with the density of the marrow in front of
    it, whereas the wall's first bin above a threshold does: with the cores of
    ``bench/robustness.py`` 90 HU darker, the thinned wall of L4 (82 HU where it
    was 168 HU) put that bin 3 mm further forwards, and the trabecular ROI lost
    13 % of its voxels.

    The level is at most ``WALL_EDGE_RISE_HU`` above the canal. Behind a thin
    cortex, marrow brighter than the cortex lies within 3 mm of it on 3 mm
    slices and becomes the "peak": with every core 200 HU denser, half-way
    rose from 78 to 163 HU on L1's profile, the edge moved 1.2 mm forwards
    over a cortex whose bins had not changed, and the trabecular ROI lost 10 %
    of its voxels. The cost is a wall that is itself much denser than normal
    (a sclerotic cortex): its edge is placed on the foot of its rise, about
    1 mm behind its canal side.

    Parameters
    ----------
    profile : numpy.ndarray
        ``(n,)`` HU in 1 mm bins, posterior first.
    centres : numpy.ndarray
        ``(n,)`` bin centres (mm from the body centre, anterior positive).
    back, front : int
        First and last bin of the canal's fluid run.
    k_wall : int
        Bin of the wall (first dense bin, or the faint wall's bump).
    last : int
        Most anterior bin the wall may lie in.

    Returns
    -------
    float
        mm from the body centre (anterior positive). Without a rise through
        the level (a wall no higher than the canal, or no canal bin below
        the level behind it): the posterior edge of bin ``k_wall``.
    """
    stop = max(k_wall, min(k_wall + 3, last, len(profile) - 1))
    peak = k_wall + int(np.argmax(profile[k_wall:stop + 1]))
    canal = float(np.median(profile[back:front + 1]))
    level = min(0.5 * (canal + float(profile[peak])), canal + WALL_EDGE_RISE_HU)
    k = k_wall
    if profile[k] >= level:  # walk posteriorly to the last bin at or above the level
        while k - 1 > back and profile[k - 1] >= level:
            k -= 1
    else:  # walk anteriorly to the first (the peak at the latest)
        while k < peak and profile[k] < level:
            k += 1
    if profile[k] < level or k - 1 < back or profile[k - 1] >= level:  # no rise through the level
        return float(centres[k_wall]) - 0.5
    return float(centres[k - 1] + (level - profile[k - 1]) / (profile[k] - profile[k - 1]))


def _star_fill(shell: np.ndarray, coords_mm: tuple[np.ndarray, np.ndarray, np.ndarray],
               centre: np.ndarray) -> np.ndarray:
    """What the cortical shell bounds, seen from the body centre, in each axial plane of a canonical crop.

    In each plane (``s`` index) the outermost shell voxel in each of
    ``STAR_SECTORS`` angular sectors around the centre's axial position sets
    the body's radius in that direction. A sector without shell on a plane (a
    gap in a cortex thinned by partial volume, often all round the waist of an
    osteoporotic body on a 3 mm slice) takes the radius interpolated along the
    axis from the nearest planes above and below that see it, then, where none
    do, from the neighbouring sectors. A vertebral body's cross-section is star-shaped from its
    centre, so this closes gaps of any width, where filling the holes of the
    shell (:func:`_enclosed`) closes only gaps up to ``SHELL_GAP_MM``.

    Parameters
    ----------
    shell : numpy.ndarray
        Boolean ``(s, a, l)`` shell voxels (already limited to the body's region).
    coords_mm : tuple of numpy.ndarray
        Canonical position (mm) of each index along the three axes.
    centre : numpy.ndarray
        ``(3,)`` body centre (canonical mm).

    Returns
    -------
    numpy.ndarray
        Boolean ``(s, a, l)``, the filled planes (planes with shell, seen or
        interpolated along the axis, in fewer than a third of the sectors are
        left empty; nothing is extrapolated past the outermost planes with shell).
    """
    a_mm, l_mm = np.meshgrid(coords_mm[1] - centre[1], coords_mm[2] - centre[2], indexing="ij")
    radius = np.hypot(a_mm, l_mm)
    sector = ((np.arctan2(l_mm, a_mm) + np.pi) / (2 * np.pi) * STAR_SECTORS).astype(int) % STAR_SECTORS
    mids = (np.arange(STAR_SECTORS) + 0.5) * 2 * np.pi / STAR_SECTORS
    reach = np.full((shell.shape[0], STAR_SECTORS), np.nan)
    for plane in np.nonzero(shell.any(axis=(1, 2)))[0]:
        row = np.full(STAR_SECTORS, -1.0)
        np.maximum.at(row, sector[shell[plane]], radius[shell[plane]])
        reach[plane] = np.where(row >= 0, row, np.nan)
    # a sector unseen on a plane takes the radius interpolated along the axis from the nearest planes
    # above and below that see it (a body is smooth along its axis; no extrapolation past them)
    for j in range(STAR_SECTORS):
        seen_at = np.flatnonzero(np.isfinite(reach[:, j]))
        if seen_at.size >= 2:
            between = np.arange(seen_at[0], seen_at[-1] + 1)
            reach[between, j] = np.interp(between, seen_at, reach[seen_at, j])
    out = np.zeros(shell.shape, bool)
    for k in range(shell.shape[0]):
        seen = np.isfinite(reach[k])
        if seen.sum() < STAR_SECTORS // 3:
            continue
        row = np.interp(mids, mids[seen], reach[k, seen], period=2 * np.pi)
        out[k] = radius <= row[sector]
    return out


def _within_endplates(body: np.ndarray, upper: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """``body`` (canonical ``(s, a, l)``) cut, column by column along s, to between its endplates.

    In each column the body keeps the voxels from the lowest ``lower`` voxel
    to the highest ``upper`` voxel (bone of the endplates, which stays denser
    than the core in osteoporosis, looked for in the upper and lower
    ``PLATE_ZONE`` of the body height, so that a dense focus at mid-height is
    not taken for one). Disc tissue beyond a tilted endplate -- in front of a
    wedge-compressed anterior body, as dense as osteoporotic bone -- lies
    outside them. A column without an endplate voxel on a side is not cut on
    that side.
    """
    s_index = np.arange(body.shape[0])[:, None, None]
    top = np.where(upper.any(axis=0), np.where(upper, s_index, -1).max(axis=0), body.shape[0])
    bottom = np.where(lower.any(axis=0), np.where(lower, s_index, body.shape[0]).min(axis=0), -1)
    return body & (s_index >= bottom) & (s_index <= top)


def _without_specks(mask: np.ndarray, min_mm3: float, spacing: np.ndarray) -> np.ndarray:
    """``mask`` without its connected components (26-connected) smaller than ``min_mm3``.

    Noise specks brighter than the shell threshold would otherwise be bridged
    to the shell across soft tissue (``spacing``: ``(3,)`` voxel size, mm).
    """
    labels, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:] * float(np.prod(spacing))
    return np.isin(labels, 1 + np.nonzero(sizes >= min_mm3)[0])


def _enclosed(shell: np.ndarray, gap_mm: float, spacing: np.ndarray) -> np.ndarray:
    """What a shell encloses in axial, coronal or sagittal planes of a canonical ``(s, a, l)`` mask.

    In each orientation the shell is dilated in-plane by half of ``gap_mm``,
    its holes are filled plane by plane, and the filled mask is eroded back by
    the same disk; the union over the three orientations is returned (boolean,
    same shape: the shell and its interior). A vertebral body is enclosed by
    its cortex in axial planes and by its cortex and endplates in coronal and
    sagittal planes; a gap in one orientation (a thin cortex partly below the
    shell threshold on one slice) is closed in another.

    Parameters
    ----------
    shell : numpy.ndarray
        Boolean ``(s, a, l)`` mask.
    gap_mm : float
        Widest gap bridged, mm.
    spacing : numpy.ndarray
        ``(3,)`` voxel spacing, mm.
    """
    out = np.zeros(shell.shape, bool)
    for normal in range(3):
        axes = [ax for ax in range(3) if ax != normal]
        r = [max(1, int(round(0.5 * gap_mm / spacing[ax]))) for ax in axes]
        grids = np.meshgrid(*[np.arange(-k, k + 1) * spacing[ax] for k, ax in zip(r, axes)], indexing="ij")
        disk = np.expand_dims(grids[0] ** 2 + grids[1] ** 2 <= (0.5 * gap_mm) ** 2 + 1e-6, normal)
        plane = np.zeros((3, 3, 3), bool)
        plane[tuple(1 if ax == normal else slice(None) for ax in range(3))] = \
            ndi.generate_binary_structure(2, 1)
        grown = ndi.binary_dilation(shell, structure=disk)
        filled = fill_holes(grown, plane)
        out |= ndi.binary_erosion(filled, structure=disk, border_value=1)
    return out


def working_grid(crop: np.ndarray, coords: Coords, spacing: np.ndarray, work: np.ndarray
                  ) -> tuple[np.ndarray, Coords, tuple[np.ndarray, ...]]:
    """Resample a canonical crop (linear) to the coarser ``work`` spacing where ``spacing`` is finer.

    Returns the working crop, its canonical coordinates (mm) per axis, and the
    index arrays (for ``np.ix_``-style indexing) that take a working-grid mask
    back to the crop grid by nearest neighbour.
    """
    if np.allclose(spacing, work):
        return crop, coords, np.ix_(*(np.arange(n) for n in crop.shape))
    step = work / spacing
    shape = tuple(int(np.floor((n - 1) / st)) + 1 for n, st in zip(crop.shape, step))
    out = crop
    for ax, (st, n) in enumerate(zip(step, shape)):  # trilinear = linear along each axis in turn
        if np.isclose(st, 1.0):
            continue
        out = linear_along(out, np.arange(n) * st, ax)
    s_mm, a_mm, l_mm = (axis_mm[0] + np.arange(n) * w for axis_mm, n, w in zip(coords, shape, work, strict=True))
    work_coords = (s_mm, a_mm, l_mm)
    back = tuple(np.clip(np.round((axis_mm - axis_mm[0]) / w).astype(int), 0, n - 1)
                 for axis_mm, w, n in zip(coords, work, shape))
    return out, work_coords, np.ix_(*back)


def add_posterior_elements(view: CanonicalView, whole: np.ndarray, foreign_above: float | None,
                            foreign_below: float | None) -> None:
    """Grow the labelled bodies in ``whole`` (canonical ``(s, a, l)`` uint8, in place) to whole vertebrae.

    On the coarse grid, bone (> ``ARCH_BONE_HU``) within 100 mm behind and 30 mm
    to either side of the bodies is flooded from the bodies (marker watershed on
    inverted HU, so that pedicles join their body and the dark facet joints and
    discs part neighbours). Bone above ``foreign_above`` / below
    ``foreign_below`` (canonical mm along s) belongs to unlabelled vertebrae and
    floods from there. The sacrum keeps its body only; each labelled body keeps
    its exact native voxels.
    """
    coarse, offset, spacing, grid_mm = view.coarse, view.offset, view.frame.spacing, COARSE_MM
    index = [np.clip(np.round((np.arange(n) * grid_mm + o) / p).astype(int), 0, m - 1)
             for n, o, p, m in zip(coarse.shape, offset, spacing, whole.shape)]
    coarse_bodies = whole[np.ix_(*index)]
    if not np.isin(coarse_bodies, [SACRUM, 0], invert=True).any():
        return
    box = bounding_box(coarse_bodies > 0, 0)
    grow = [(25.0, 25.0), (100.0, 5.0), (30.0, 30.0)]  # mm below/above, behind/in front, right/left
    sl = tuple(slice(max(0, b.start - int(np.ceil(lo / grid_mm))), min(n, b.stop + int(np.ceil(hi / grid_mm))))
               for b, (lo, hi), n in zip(box, grow, coarse.shape))
    crop = coarse[sl]
    markers = coarse_bodies[sl].astype(np.int16)
    bone = crop > ARCH_BONE_HU
    s_mm = (np.arange(sl[0].start, sl[0].stop) * grid_mm + offset[0])[:, None, None]
    free = bone & (markers == 0)
    if foreign_above is not None:
        markers[free & (s_mm > foreign_above)] = FOREIGN
    if foreign_below is not None:
        markers[free & (s_mm < foreign_below)] = FOREIGN
    cost = np.where(bone, np.clip(1000.0 - crop, 0.0, 2000.0), 65535.0).astype(np.uint16)
    flooded = ndi.watershed_ift(cost, markers) * bone
    flooded[(flooded == FOREIGN) | (flooded == SACRUM)] = 0
    labels, native = coarse_to_native(flooded, sl, offset, grid_mm, spacing, whole.shape)
    target = whole[native]
    put = (labels > 0) & (target == 0)
    target[put] = labels[put]
