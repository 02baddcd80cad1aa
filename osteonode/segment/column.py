"""Column tracking and intervertebral disc detection on the 2 mm canonical copy.

Tracking
--------
Each axial slice is scored for "vertebral body centre" and a dynamic programme
links the slices into one smooth centreline (at most 4 mm shift per 2 mm slice,
each shift penalised by 40 HU per (2 mm)^2, left-right shifts
``LATERAL_STIFFNESS`` times more). The score adds the body (mean HU in an
18 mm square, clipped to [-100, 250]; penalised without a fluid spinal canal
18-26 mm behind, rewarded for the neural arch 30-54 mm behind) and the spinal
canal ``CANAL_TO_BODY_MM`` behind the point: fluid or fat that bone surrounds
in most directions (:func:`shell_cover`), with the posterior wall or disc in
front and the laminae behind. The canal term does not depend on trabecular
density; without it an osteoporotic body's bright posterior wall and pedicles
pulled the line into the canal.

Discs
-----
Along the centreline, :func:`plane_profile` samples planes across the column
tilted by up to 20 degrees about the left-right axis: the 85th percentile of
the plane and the brightest HU on rays to the body's rim (the cortical shell
of a body of any density, the annulus at a disc). The lowest over the tilts
crosses a lordotic disc, or the disc above a wedge-compressed body, flat; the
highest crosses a tilted endplate flat; the tilt of the lowest is the disc's,
and the bodies are cut along it. A disc is a notch of at least
``MIN_NOTCH_HU`` in the lowest between bright flanks in the highest (the
endplates, 4-8 mm on either side) where the column is confirmed, and not
within 4 mm of the cranial end of the column in view (no endplate seen above
it); the discs are chosen as one chain (:func:`disc_chain`) whose spacing
along the centreline's arc is
that of vertebrae (24-50 mm) and changes slowly, which keeps the mid-height
dip of a low-density body out, except for the short segment of a fractured
vertebra between normal ones (a chain asked to hold a number of discs below
the lowest rib, when the level anchors count a vertebra too few, may take a
crushed vertebra's disc that it would otherwise leave out). Before the
chain, a candidate at the level of the pedicles (:func:`pedicle_profile`,
cortical bone beside the spinal canal) gives way to one within 16 mm beside
a neural foramen, where discs lie
(:func:`foramen_depth`): the mid-height dip of a dark body next to a weak disc
(a crushed neighbour at -60 to -100 HU put the fracture one level off). And
a neural foramen with no notch near it is a candidate itself
(:func:`_foramina`): where a body at -100 HU (trabecular bone near 10 HU)
meets a disc of 70-100 HU, the profile falls or rises through the disc
without a minimum (a crushed L2 or L3 in such a spine lost the disc above
the next body, and the levels went one off). A
bone island is filled in from around it before the profile is sampled
(:func:`without_focal_dense`): it is no endplate. End slices partly outside
the reconstructed field of view (:func:`partial_end_slices`) carry no
tracking evidence. The lowest rib, once found, checks the candidates
(:func:`below_lowest_rib`): its head lies on T12's body, so no disc lies at
it, and T12/L1 lies just below it; where T12 and L1 are both darker than
their disc, the profile runs through that disc without a minimum, and a
disc is placed there: at the neural foramen where the pedicle profile shows
one, else at the deepest notch. A chain that a chain differing by one
fractured (short) segment nearly ties, in either direction, marks its
discs there ambiguous (:func:`ambiguous_fracture_discs`): the levels are
then flagged uncertain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage as ndi

from osteonode.segment.frame import COARSE_MM, perpendicular_frame, shift_along

log = logging.getLogger(__name__)

#: Denser than any trabecular bone (HU; it stays below about 400): a bone island or blastic focus, to the
#: disc profile when compact (at most ``FOCAL_MAX_MM`` across, :func:`without_focal_dense`) and to the
#: core HU of a body (:func:`osteonode.segment.body.trabecular_core_hu`).
FOCAL_DENSE_HU = 600.0
FOCAL_MAX_MM = 20.0

#: Percentile of the HU beside the spinal canal that measures the pedicles (:func:`pedicle_profile`).
PEDICLE_PERCENTILE = 90.0

#: A disc candidate less than ``FORAMEN_FRACTION`` deep in a foramen (:func:`foramen_depth`) loses to one within
#: 16 mm that is ``FORAMEN_MARGIN`` deeper; the pedicles are in view where the profile reaches ``PEDICLE_BONE_HU``.
FORAMEN_FRACTION = 0.4
FORAMEN_MARGIN = 0.2
#: A foramen with no disc candidate within this distance (mm) along the column is a disc candidate itself
#: (:func:`_foramina`), with the weakest notch, ``MIN_NOTCH_HU``: half a vertebra's 30-40 mm spacing leaves
#: out the foramen beside a disc the profile found and the pedicle dip at a dark body's mid-height beside
#: its mid-body notch.
FORAMEN_ALONE_MM = 8.0
PEDICLE_BONE_HU = 300.0

#: Cost (HU per mm^2) of a change of the disc-to-disc spacing between consecutive segments.
SPACING_PENALTY_HU_PER_MM2 = 0.4

#: Bone of a cortical shell or endplate on the coarse copy (HU); what it encloses counts as body.
SHELL_HU = 150.0


#: Weight (HU) of the shell cover (0..1) in the canal-tracking score.
CANAL_RING_HU = 200.0


#: Distance (mm) from the spinal canal's centre to the centre of a lumbar vertebral body.
CANAL_TO_BODY_MM = 22.0


#: Percentile of the HU in a plane across the column that the disc profile follows.
PROFILE_PERCENTILE = 85.0


#: Tilts (degrees, about the left-right axis) of the planes of the disc profile; the lowest
#: upper quartile over them is kept, so that a wedge-shaped (lordotic) disc is crossed flat.
PROFILE_TILTS_DEG = (-20.0, -10.0, 0.0, 10.0, 20.0)


#: Left-right shifts of the column cost this many times more than anterior-posterior ones
#: (lordosis bends the column in the sagittal plane; the sacral foramina beside the midline
#: look like a canal).
LATERAL_STIFFNESS = 4.0


#: Notch depth (HU) of the disc profile for a candidate disc.
MIN_NOTCH_HU = 12.0
#: Half-thickness (mm) of a disc on a side where the profile does not rise by ``MIN_NOTCH_HU``
#: (:func:`choose_discs`): the walk to the half-way level then crossed a dark body, which it has no edge to
#: stop at. Lumbar discs are 6-12 mm thick; with bench/beyond.py's crush45_L1 in a spine 80 HU darker the
#: T12/L1 disc's lower boundary lay 9 mm inside the crushed L1 (the profile rose 2 HU), whose 6 mm
#: between its discs made a body of 0.2 cm3, and L1 was neither measured nor graded.
FLAT_DISC_HALF_MM = 3.0


#: Distance (mm) between consecutive disc centres: one vertebral body and one disc, T11 to S1.
SEGMENT_MM = (24.0, 50.0)


#: A fractured vertebra's segment (disc to disc) is this fraction of its neighbours' (:func:`is_short_segment`):
#: down to 0.35, a vertebra plana (a body crushed by about 80 %) and its disc. With 0.5, L4 of the example
#: CT crushed by 65 % (a segment of 18 mm between two of 36 and 38 mm) was no short segment: the chain
#: dropped L4, L5 and the sacrum, and the study was not evaluable.
FRACTURE_SPACING = (0.35, 0.85)


#: ... and at least this long (mm): half of the shortest body (T11, ~20 mm) plus a thin disc.
SHORT_SEGMENT_MM = 14.0


#: A short segment at the cranial end (one neighbour only) is at least this fraction of it.
OPEN_SHORT_MIN = 0.58


#: ... and its disc replaces a regular last disc of the chain when its notch is this much (HU) deeper.
TERMINAL_FRACTURE_MARGIN_HU = 30.0


#: Cost (HU of notch depth) of admitting a short (fractured) segment in the disc chain.
FRACTURE_COST_HU = 60.0


#: A chain with a short segment is ambiguous when the best chain without that segment scores within
#: this much (HU of notch depth) of it (:func:`ambiguous_fracture_discs`); the unconstrained chain,
#: extended at its cranial end, replaces the one the anchors ask for only when it scores this much
#: higher (:func:`disc_chain`).
FRACTURE_AMBIGUITY_HU = 30.0


#: The open segment beyond the last disc holds one vertebra at most when no longer than this
#: multiple of the last spacing (spacings change by less than 10 % from level to level) ...
OPEN_SEGMENT_MAX = 1.15


#: ... unless a short (fractured) segment's disc lies in it with at least this fraction of a segment
#: (its disc and part of the next body) in view above that disc.
OPEN_BEYOND_SHORT = 0.3


#: An end slice whose patient cross-section is smaller than this fraction of the slices just
#: inside it is partly outside the reconstructed field of view (:func:`partial_end_slices`).
PARTIAL_SLICE_FRACTION = 0.8


def partial_end_slices(area: np.ndarray, grid_mm: float = COARSE_MM) -> np.ndarray:
    """Slices at either end of the scan that are partly outside the reconstructed field of view.

    A body's cross-section changes by a few per cent per 2 mm; an end slice
    that holds much less of the patient than the slices 10-30 mm inside it
    (less than ``PARTIAL_SLICE_FRACTION`` of their median) is a partial slice
    (cut by the reconstruction's cylinder, or padded with air by a
    resampling): the spine there may lie outside it. The run of such slices
    from each end is returned.

    Parameters
    ----------
    area : numpy.ndarray
        ``(ns,)`` patient cross-section per coarse slice (voxels).
    grid_mm : float
        Coarse spacing, mm.

    Returns
    -------
    numpy.ndarray
        ``(ns,)`` bool, True for the partial slices at either end.
    """
    ns = len(area)
    out = np.zeros(ns, bool)
    near, far = int(round(10.0 / grid_mm)), int(round(30.0 / grid_mm))
    if ns <= far:
        return out
    for order in (np.arange(ns)[::-1], np.arange(ns)):
        reference = float(np.median(area[order[near:far]]))
        for z in order[:near]:
            if area[z] >= PARTIAL_SLICE_FRACTION * reference:
                break
            out[z] = True
    return out


def shell_cover(coarse: np.ndarray, grid_mm: float = COARSE_MM) -> np.ndarray:
    """Fraction of 8 in-plane directions in which a bony shell surrounds each point.

    For every voxel of the coarse ``(s, a, l)`` copy and each of the 8
    directions (anterior, posterior, left, right and the diagonals) within its
    axial slice, whether bone (> ``SHELL_HU``) lies 4-22 mm away. The centre of
    a vertebral body is surrounded by its cortex in every direction whatever
    the density of its trabecular bone (-50 HU in fatty marrow to +400 HU when
    sclerotic); the psoas, the aorta and the bowel have bone on one side at
    most. This makes column tracking depend on the cortical shell, which stays
    visible in osteoporosis, not on the trabecular density.

    Parameters
    ----------
    coarse : numpy.ndarray
        Coarse canonical ``(s, a, l)`` array in HU.
    grid_mm : float
        Its spacing in mm.

    Returns
    -------
    numpy.ndarray
        Same shape, float32 in [0, 1].
    """
    bone = coarse > SHELL_HU
    steps = range(int(round(4.0 / grid_mm)), int(round(22.0 / grid_mm)) + 1)
    cover = np.zeros(coarse.shape, np.float32)
    for da, dl in ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)):
        hit = np.zeros(coarse.shape, bool)
        for k in steps:
            n = k if da == 0 or dl == 0 else max(1, int(round(k / np.sqrt(2.0))))
            hit |= shift_along(shift_along(bone, -da * n, 1, False), -dl * n, 2, False)
        cover += hit
    return cover / 8.0


def track_column(coarse: np.ndarray, patient: np.ndarray, grid_mm: float = COARSE_MM) -> tuple[np.ndarray, np.ndarray]:
    """Centreline of the vertebral bodies on the coarse grid.

    Each axial slice is scored for "vertebral body centre" and a dynamic
    programme links the slices into one smooth line (at most 4 mm shift per
    2 mm slice, each shift penalised by ``40 HU per (2 mm)^2``). The score adds
    two kinds of evidence:

    * the body itself: mean HU in an 18 mm square (clipped to [-100, 250]),
      penalised when no fluid/fat spinal canal lies 18-26 mm behind it and
      rewarded for bone (the neural arch) 30-54 mm behind it;
    * the spinal canal ``CANAL_TO_BODY_MM`` behind the point, which does not
      depend on the trabecular density: a tube of fluid and fat (-100 to 60 HU)
      that bone surrounds in most directions (:func:`shell_cover`), with the
      posterior body wall or disc in front and the laminae behind. In an
      osteoporotic spine (trabecular bone at the HU of muscle) the body term
      alone would follow the bright posterior wall and pedicles into the canal;
      the canal term keeps the line in the body.

    Parameters
    ----------
    coarse : numpy.ndarray
        Coarse canonical ``(s, a, l)`` array, HU.
    patient : numpy.ndarray
        Boolean patient mask, same shape.
    grid_mm : float
        Coarse spacing, mm.

    Returns
    -------
    path : numpy.ndarray
        ``(ns, 2)`` float (a, l) coarse indices of the body centreline per slice.
    valid : numpy.ndarray
        ``(ns,)`` bool: the slice shows a body (denser than soft tissue, or with a
        bone-surrounded canal behind it) with a spinal canal behind it.
    """
    nz, ny, nx = coarse.shape
    area = patient.sum(axis=(1, 2))
    xs = np.arange(nx)
    # midline band: +-50 mm around the patient's left-right centre of mass
    col = patient.sum(axis=(0, 1)).astype(float)
    xmid = float((col * xs).sum() / max(col.sum(), 1.0))
    half = int(round(50.0 / grid_mm))
    x0, x1 = max(0, int(xmid) - half - 8), min(nx, int(xmid) + half + 9)
    sub = coarse[:, :, x0:x1]
    r_body = int(round(9.0 / grid_mm))
    body = ndi.uniform_filter(np.clip(sub, -100, 250), size=(1, 2 * r_body + 1, 2 * r_body + 1))
    small = ndi.uniform_filter(np.clip(sub, -100, 400), size=(1, 3, 3))
    canal = np.full(sub.shape, 400.0, np.float32)
    for mm in (18.0, 22.0, 26.0):
        canal = np.minimum(canal, shift_along(small, int(round(mm / grid_mm)), axis=1, fill=400.0))
    arch_src = ndi.maximum_filter(small, size=(1, 1, int(round(20.0 / grid_mm)) | 1))
    arch = np.zeros(sub.shape, np.float32)
    for mm in np.arange(30.0, 55.0, 4.0):
        arch = np.maximum(arch, shift_along(arch_src, int(round(mm / grid_mm)), axis=1, fill=0.0))
    canal_here, ring = _canal_score(sub, grid_mm)
    behind = int(round(CANAL_TO_BODY_MM / grid_mm))
    canal_evidence = shift_along(canal_here, behind, axis=1, fill=0.0)
    score = (body - 1.5 * np.maximum(0.0, canal - 60.0) + 0.5 * np.minimum(arch, 300.0)
             + np.maximum(canal_evidence, 0.0))
    # priors: inside the patient, within 40 mm of the slice's left-right centre
    sub_patient = patient[:, :, x0:x1]
    score[~sub_patient] = -1e4
    xs_sub = np.arange(x0, x1)
    outside = partial_end_slices(area, grid_mm)
    for z in range(nz):
        if area[z] < 50 or outside[z]:  # no evidence: the path runs straight through
            score[z] = -1e4
            continue
        xc = ndi.center_of_mass(patient[z])[1]
        score[z][:, np.abs(xs_sub - xc) > 40.0 / grid_mm] = -1e4
    path = _dynamic_path(score)
    at = (np.arange(nz), path[:, 0], path[:, 1])
    ring_behind = shift_along(ring, behind, axis=1, fill=0.0)
    # a slice is "on the column" when the body is denser than soft tissue or has a bone-surrounded
    # canal behind it, and the canal is visible (this rejects tracks through vessels or a cut-off spine)
    valid = (((body[at] > 60.0) | (ring_behind[at] >= 0.6)) & (canal[at] < 100.0) & (score[at] > -1e3)
             & ~outside)
    path = path.astype(float)
    path[:, 1] += x0
    return path, valid


def _canal_score(sub: np.ndarray, grid_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Spinal-canal evidence (HU-like score) at each point of a coarse ``(s, a, l)`` array, and the shell cover.

    High where the point is fluid or fat (-100 to 60 HU), bone surrounds it
    (:func:`shell_cover`), and bone or disc lies 6-14 mm in front (posterior
    body wall) and 8-30 mm behind (laminae). Independent of the trabecular
    density of the bodies.
    """
    small = ndi.uniform_filter(np.clip(sub, -300, 400), size=(1, 3, 3))
    ring = shell_cover(sub, grid_mm)
    front = np.full(sub.shape, -300.0, np.float32)
    for mm in (6.0, 10.0, 14.0):
        front = np.maximum(front, shift_along(small, -int(round(mm / grid_mm)), axis=1, fill=-300.0))
    behind = np.full(sub.shape, -300.0, np.float32)
    for mm in np.arange(8.0, 31.0, 4.0):
        behind = np.maximum(behind, shift_along(small, int(round(mm / grid_mm)), axis=1, fill=-300.0))
    score = (CANAL_RING_HU * (ring - 0.5) - 1.5 * np.maximum(0.0, np.abs(small - 0.0) - 100.0)
             + 0.3 * np.clip(front, 0.0, 250.0) + 0.3 * np.clip(behind, 0.0, 250.0) - 100.0)
    return score.astype(np.float32), ring


def _dynamic_path(score: np.ndarray, r: int = 2, lam: float = 40.0) -> np.ndarray:
    """Best smooth path through ``score`` ``(ns, na, nl)``: one (a, l) index per slice.

    Maximises the summed score minus ``lam * (da^2 + LATERAL_STIFFNESS * dl^2)`` per slice step, with
    steps of at most ``r`` voxels. Returns ``(ns, 2)`` int indices.
    """
    nz = score.shape[0]
    offs = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    _, sy, sx = score.shape
    value = score[0].copy()
    back = np.zeros(score.shape, np.int8)
    for z in range(1, nz):
        best = np.full((sy, sx), -1e9, np.float32)
        arg = np.zeros((sy, sx), np.int8)
        for i, (dy, dx) in enumerate(offs):
            step_cost = lam * (dy * dy + LATERAL_STIFFNESS * dx * dx)
            cand = shift_along(shift_along(value, dy, 0, -1e9), dx, 1, -1e9) - step_cost
            upd = cand > best
            best[upd] = cand[upd]
            arg[upd] = i
        value = score[z] + best
        back[z] = arg
    path = np.zeros((nz, 2), int)
    path[-1] = np.unravel_index(int(np.argmax(value)), value.shape)
    for z in range(nz - 1, 0, -1):
        dy, dx = offs[back[z][tuple(path[z])]]
        path[z - 1] = path[z] - [dy, dx]
    return path


@dataclass(frozen=True)
class ColumnProfile:
    """The disc profile along the column (:func:`plane_profile`); every array is per coarse slice.

    Attributes
    ----------
    hu : numpy.ndarray
        ``(ns,)`` HU: low at a disc only (the lowest plane percentile over the
        tilts, or the ring measure if higher).
    bright : numpy.ndarray
        ``(ns,)`` HU: the highest plane percentile over the tilts: an endplate
        crossed flat, even when it is tilted (lordosis, a wedge-compressed body).
    tilt_deg : numpy.ndarray
        ``(ns,)`` tilt (degrees, about the left-right axis; positive: the plane
        rises anteriorly) of the plane with the lowest percentile, refined
        between the sampled tilts by a parabola: at a disc, the disc's tilt.
    pts : numpy.ndarray
        ``(ns, 3)`` smoothed centre points (coarse indices).
    tangent : numpy.ndarray
        ``(ns, 3)`` unit tangents.
    pedicles : numpy.ndarray
        ``(ns,)`` HU of the bone beside the spinal canal (:func:`pedicle_profile`):
        high at the pedicles, low at the neural foramina, which lie at the discs.
    """

    hu: np.ndarray
    bright: np.ndarray
    tilt_deg: np.ndarray
    pts: np.ndarray
    tangent: np.ndarray
    pedicles: np.ndarray


def plane_profile(coarse: np.ndarray, path: np.ndarray, grid_mm: float = COARSE_MM) -> ColumnProfile:
    """Disc profile along the column: HU of the bone in planes across the smoothed centreline.

    Two measures per plane, each the lowest over planes tilted by
    ``PROFILE_TILTS_DEG`` (so that a wedge-shaped, lordotic disc is crossed
    flat), and their maximum is the profile:

    * the ``PROFILE_PERCENTILE`` (85th) percentile of the HU in a 22 x 32 mm
      plane: bright at the endplates and in a dense body, low at a disc;
    * the ring: along 13 rays in the plane (anterior and lateral, 6-26 mm from
      the centreline), the brightest HU met, median over the rays: the cortical
      shell of a body whatever its trabecular density, the annulus fibrosus
      (~100 HU) at a disc.

    An osteoporotic body's mid-plane is dark in the first measure (its
    trabecular interior falls below the HU of the disc) but bright in the
    second, so only discs are low in both.

    Parameters
    ----------
    coarse : numpy.ndarray
        Coarse canonical ``(s, a, l)`` array, HU.
    path : numpy.ndarray
        ``(ns, 2)`` centreline (a, l coarse indices per slice).
    grid_mm : float
        Coarse spacing, mm.

    Returns
    -------
    ColumnProfile
    """
    nz = coarse.shape[0]
    pts = np.column_stack([np.arange(nz, dtype=float), path])
    pts = ndi.gaussian_filter1d(pts, 2.5, axis=0, mode="nearest")  # 5 mm
    tangent = np.gradient(ndi.gaussian_filter1d(pts, 5.0, axis=0, mode="nearest"), axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    uu, ww = np.meshgrid(np.arange(-6, 6), np.arange(-8, 9), indexing="ij")  # coarse voxels (2 mm)
    angles = np.radians(np.arange(-120.0, 121.0, 20.0))  # 0 = anterior
    radii = np.arange(6.0, 27.0, 2.0) / grid_mm
    clipped = np.clip(without_focal_dense(coarse, grid_mm), -100, 500)
    frames = [perpendicular_frame(t) for t in tangent]
    planes, rings = [], []
    for tilt in np.tan(np.radians(PROFILE_TILTS_DEG)):
        samples = np.empty((nz, 3, uu.size))
        rays = np.empty((nz, 3, angles.size * radii.size))
        for i, (p, t, (u, w)) in enumerate(zip(pts, tangent, frames)):
            samples[i] = (p[:, None] + (u[:, None] + t[:, None] * tilt) * uu.ravel() + w[:, None] * ww.ravel())
            dirs = np.cos(angles)[:, None] * (u + t * tilt) + np.sin(angles)[:, None] * w
            rays[i] = (p[None, None, :] + dirs[:, None, :] * radii[None, :, None]).reshape(-1, 3).T
        vals = ndi.map_coordinates(clipped, samples.transpose(1, 0, 2).reshape(3, -1), order=1, mode="nearest")
        planes.append(np.percentile(vals.reshape(nz, -1), PROFILE_PERCENTILE, axis=1))
        hits = ndi.map_coordinates(clipped, rays.transpose(1, 0, 2).reshape(3, -1), order=1, mode="nearest")
        rings.append(np.median(hits.reshape(nz, angles.size, radii.size).max(axis=2), axis=1))
    # the ring's disc dip lies up to a slice off the plane's (it samples the disc's rim, out to
    # 26 mm, where a tilt error moves it most): widened by one slice before the maximum
    ring = ndi.minimum_filter1d(np.min(rings, axis=0), 3, mode="nearest")
    planes_by_tilt = np.array(planes)
    return ColumnProfile(hu=np.maximum(planes_by_tilt.min(axis=0), ring), bright=planes_by_tilt.max(axis=0),
                         tilt_deg=_lowest_tilt(planes_by_tilt), pts=pts, tangent=tangent,
                         pedicles=pedicle_profile(coarse, pts, frames, grid_mm))


def pedicle_profile(coarse: np.ndarray, pts: np.ndarray, frames: list[tuple[np.ndarray, np.ndarray]],
                    grid_mm: float = COARSE_MM) -> np.ndarray:
    """Bone beside the spinal canal per coarse slice: high at the pedicles, low at the neural foramina.

    In each plane across the centreline, the ``PEDICLE_PERCENTILE`` (90th)
    percentile of the HU in a box on either side of the canal (12-24 mm behind
    the body centre, 6-20 mm to the side), the lower of the two sides. The
    pedicles leave the upper half of each body; the neural foramen between
    two pedicles lies at the disc and just above it. Cortical bone: the
    pattern does not depend on the bodies' trabecular density.

    Parameters
    ----------
    coarse : numpy.ndarray
        Coarse canonical ``(s, a, l)`` array, HU.
    pts : numpy.ndarray
        ``(ns, 3)`` centreline points (coarse indices).
    frames : list of tuple of numpy.ndarray
        Per slice, the unit anterior and left directions across the centreline.
    grid_mm : float
        Coarse spacing, mm.

    Returns
    -------
    numpy.ndarray
        ``(ns,)`` HU.
    """
    behind, beside = np.meshgrid(np.arange(-24.0, -11.0, 2.0) / grid_mm, np.arange(6.0, 21.0, 2.0) / grid_mm,
                                 indexing="ij")
    sides = []
    for sign in (1.0, -1.0):
        samples = np.stack([p[:, None] + u[:, None] * behind.ravel() + w[:, None] * sign * beside.ravel()
                            for p, (u, w) in zip(pts, frames)], axis=1)  # (3, ns, n)
        vals = ndi.map_coordinates(coarse, samples.reshape(3, -1), order=1, mode="nearest").reshape(len(pts), -1)
        sides.append(np.percentile(vals, PEDICLE_PERCENTILE, axis=1))
    return np.minimum(*sides)


def without_focal_dense(coarse: np.ndarray, grid_mm: float = COARSE_MM) -> np.ndarray:
    """``coarse`` with compact foci denser than any trabecular bone filled in from around them.

    A bone island (or a blastic focus) inside a vertebral body is a blob above
    ``FOCAL_DENSE_HU`` at most ``FOCAL_MAX_MM`` across in every direction; its
    voxels, and one voxel around them, take the HU of the nearest voxel outside.
    Cortex, endplates and the posterior elements form larger components and are
    kept. Without this an island is a bright "endplate" of the disc profile,
    and the plane just above a 15 mm island in L3 of a -60 HU spine out-notched
    the L2/L3 disc.

    Parameters
    ----------
    coarse : numpy.ndarray
        Coarse canonical ``(s, a, l)`` array, HU.
    grid_mm : float
        Coarse spacing, mm.

    Returns
    -------
    numpy.ndarray
        A copy of ``coarse`` (HU), or ``coarse`` itself when it holds no such focus.
    """
    labels, _ = ndi.label(coarse > FOCAL_DENSE_HU, structure=np.ones((3, 3, 3), bool))
    out = coarse
    for i, box in enumerate(ndi.find_objects(labels)):
        if box is None or max(b.stop - b.start for b in box) * grid_mm > FOCAL_MAX_MM:
            continue
        grown = tuple(slice(max(0, b.start - 3), min(n, b.stop + 3)) for b, n in zip(box, coarse.shape))
        focus = ndi.binary_dilation(labels[grown] == i + 1)
        if out is coarse:
            out = coarse.copy()
        nearest = ndi.distance_transform_edt(focus, return_distances=False, return_indices=True)
        out[grown] = out[grown][tuple(nearest)]
    return out


def _lowest_tilt(planes: np.ndarray) -> np.ndarray:
    """Per slice, the tilt (degrees) at which ``planes`` ``(n_tilts, ns)`` is lowest (parabolic refinement)."""
    tilts = np.asarray(PROFILE_TILTS_DEG)
    k = np.clip(np.argmin(planes, axis=0), 1, len(tilts) - 2)
    cols = np.arange(planes.shape[1])
    left, mid, right = planes[k - 1, cols], planes[k, cols], planes[k + 1, cols]
    curvature = left - 2.0 * mid + right
    offset = np.where(curvature > 1e-6, 0.5 * (left - right) / np.maximum(curvature, 1e-6), 0.0)
    step = float(tilts[1] - tilts[0])
    return np.clip(tilts[k] + np.clip(offset, -1.0, 1.0) * step, tilts[0], tilts[-1])


@dataclass
class Disc:
    z: float  # coarse slice index of the disc centre on the centreline
    depth: float  # notch depth (HU)
    upper: float  # coarse index of the disc's upper boundary (cranial endplate of the disc)
    lower: float  # coarse index of the lower boundary
    tilt_deg: float = 0.0  # tilt of the disc's plane about the left-right axis (plane_profile)
    arc_mm: float = 0.0  # position along the centreline's arc (mm), which measures the disc spacing
    ambiguous: bool = False  # a chain that differs here by a fractured segment nearly ties (ambiguous_fracture_discs)
    by_rib: bool = False  # placed below the lowest rib, not at a minimum of the profile (below_lowest_rib)


@dataclass(frozen=True)
class DiscCandidates:
    """Notches of the disc profile (:func:`disc_candidates`), from which :func:`choose_discs` picks the discs.

    ``z``: coarse slices of the candidates, caudal first; per coarse slice of
    the column (``(ns,)`` arrays): ``arc_mm``, the arc length of the
    centreline (mm); ``notch``, the notch depth (HU); ``hu``, the smoothed disc
    profile (HU); ``tilt_deg``, the disc plane's tilt (:func:`plane_profile`).
    ``cranial_end_mm``: arc length of the last slice of the column in view
    (None when none is). ``pedicles``: per coarse slice, the pedicle profile
    (:func:`pedicle_profile`, HU; None when not computed). ``by_rib``:
    candidates among ``z`` placed below the lowest rib, not at a minimum of
    the profile (:func:`below_lowest_rib`).
    """

    z: list[int]
    arc_mm: np.ndarray
    notch: np.ndarray
    hu: np.ndarray
    tilt_deg: np.ndarray
    cranial_end_mm: float | None
    pedicles: np.ndarray | None = None
    by_rib: tuple[int, ...] = ()


#: A notch's flanks, the endplates of both neighbours, lie from this far (mm) to 8 mm on either side; a notch
#: closer than this to the cranial end of the column in view has no endplate seen above it.
FLANK_MM = 4.0


def disc_candidates(profile: ColumnProfile, valid: np.ndarray, grid_mm: float = COARSE_MM) -> DiscCandidates:
    """Candidate intervertebral discs along the column: the notches of the disc profile.

    A notch is a minimum of ``profile.hu`` below the endplates on either side
    (``profile.bright``, which crosses a tilted endplate flat), with bone on
    both sides and the column confirmed (body and canal) around it, and not at
    the pedicles when a candidate nearby lies at a neural foramen
    (:func:`_beside_foramina`); and a neural foramen (:func:`_foramina`)
    without a notch within ``FORAMEN_ALONE_MM``, as a notch of at least
    ``MIN_NOTCH_HU`` (a dark body's profile may run through its disc without
    a minimum). ``valid`` is per coarse slice
    (:func:`track_column`); the arc length of ``profile.pts`` measures the
    disc spacing (the lumbosacral junction is tilted by 30-45 degrees, so
    slice indices understate it there). A notch less than ``FLANK_MM``
    below the cranial end of the column in view is no candidate: the endplate
    above it is not seen (at the top of the scan, the middle of a dark T12
    made a 42 mm segment of a crushed L1 and its disc with T12, and of L1
    with T12 in a scaled, tilted dark spine).
    """
    nz = len(profile.hu)
    arc_mm = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(profile.pts, axis=0), axis=1))]) * grid_mm
    p = ndi.gaussian_filter1d(profile.hu, 0.6, mode="nearest")
    bright = np.maximum(p, ndi.gaussian_filter1d(profile.bright, 0.6, mode="nearest"))
    d = int(round(8.0 / grid_mm))
    left = np.full(nz, -1e3)
    right = np.full(nz, -1e3)
    # flanks: the brightest plane 4-8 mm on each side (the endplates of both neighbours)
    for k in range(int(round(FLANK_MM / grid_mm)), d + 1):
        left[k:] = np.maximum(left[k:], bright[:-k])
        right[:-k] = np.maximum(right[:-k], bright[k:])
    flank = np.minimum(left, right)
    notch = flank - p
    # flanks must be bone (endplates), not a dip in soft tissue
    notch[flank < 100.0] = 0.0
    # the column must be confirmed (body + canal) around the disc
    w = int(round(10.0 / grid_mm))
    support = ndi.uniform_filter1d(valid.astype(float), 2 * w + 1, mode="constant")
    notch[support < 0.5] = 0.0
    is_min = (p <= np.roll(p, 1)) & (p <= np.roll(p, -1))
    is_min[[0, -1]] = False
    cands = _beside_foramina([int(z) for z in np.nonzero(is_min & (notch > MIN_NOTCH_HU))[0]], profile.pedicles,
                             grid_mm)
    foramina = _foramina(profile.pedicles, support >= 0.5, grid_mm)
    lone = [z for z in foramina if all(abs(arc_mm[z] - arc_mm[o]) > FORAMEN_ALONE_MM for o in cands)]
    if lone:
        log.debug("discs known by their foramina only (coarse z): %s", lone)
        notch[lone] = np.maximum(notch[lone], MIN_NOTCH_HU)
        cands = sorted(cands + lone)
    in_view = np.flatnonzero(valid)
    cranial_end_mm = float(arc_mm[in_view[-1]]) if in_view.size else None
    if cranial_end_mm is not None:
        cands = [z for z in cands if arc_mm[z] + FLANK_MM <= cranial_end_mm]
    log.debug("disc candidates (coarse z, arc mm, notch HU): %s",
              [(z, round(float(arc_mm[z])), round(float(notch[z]))) for z in cands])
    return DiscCandidates(z=cands, arc_mm=arc_mm, notch=notch, hu=p, tilt_deg=profile.tilt_deg,
                          cranial_end_mm=cranial_end_mm, pedicles=profile.pedicles)


#: The lowest rib's head lies on its own vertebra's body, not at a disc (the 11th and 12th ribs have a single
#: costal facet, on the body of T11 and T12; Gray's Anatomy): no disc lies within this distance (mm, along
#: the column) of the rib's medial end (:func:`osteonode.segment.levels.rib_levels`) ...
RIB_HEAD_CLEAR_MM = 4.0
#: ... and that vertebra's lower disc lies this far (mm) below it: 11-13 mm on the example CT, 6-10 mm
#: where the top of the field of view cuts the rib (its medial end then moves down).
RIB_TO_DISC_MM = (4.0, 24.0)


def below_lowest_rib(candidates: DiscCandidates, rib_z: float) -> DiscCandidates:
    """The candidates checked against the lowest rib: its vertebra (T12) bears it, the disc below lies near.

    The rib's medial end lies on its own vertebra's body: a candidate within
    ``RIB_HEAD_CLEAR_MM`` of it is the middle of that body (a dark T12), not a
    disc, and is dropped. That vertebra's lower disc (T12/L1) lies
    ``RIB_TO_DISC_MM`` below; when no candidate lies there, one is placed
    there, however shallow its notch (bone brighter than the plane on both
    sides): with T12 and L1 both darker than their disc (trabecular bone
    80-120 HU below normal), the profile falls from L1's endplate through the
    disc into T12 without a minimum, and that disc was missing (L1 not found,
    or bounded by a mid-body dip; with L1 also wedged by 30 %, a notch of
    7 HU only, and the ribs took L1's mid-body dip for a crushed L1's disc).
    It is placed at the neural foramen, where the pedicle profile shows one
    there (:func:`_rib_foramen`) with a notch, else at the deepest notch: the
    deepest notch may lie inside a dark L1 (with L1-L4 110 or 120 HU below
    normal under a normal T12 and L2 wedged by 45 %, 4 mm above L1's mid-body
    dip, and L1 lost most of its body to T12: Dice 0.07 and 0.21, 0.83 and
    0.80 with the foramen).

    Parameters
    ----------
    candidates : DiscCandidates
        From :func:`disc_candidates`.
    rib_z : float
        Coarse slice of the lowest rib's medial end
        (:func:`osteonode.segment.levels.rib_levels`, iliac crests left out).

    Returns
    -------
    DiscCandidates
        A copy; ``by_rib`` names the candidate placed below the rib, if any.
    """
    arc = candidates.arc_mm
    rib_mm = float(np.interp(rib_z, np.arange(len(arc)), arc))
    kept = [z for z in candidates.z if abs(arc[z] - rib_mm) > RIB_HEAD_CLEAR_MM]
    window = np.flatnonzero((arc >= rib_mm - RIB_TO_DISC_MM[1]) & (arc <= rib_mm - RIB_TO_DISC_MM[0]))
    placed: tuple[int, ...] = ()
    if window.size and not set(kept) & set(window.tolist()):
        at = _rib_foramen(candidates.pedicles, window)
        if at is None or candidates.notch[at] <= 0.0:
            at = int(window[np.argmax(candidates.notch[window])])
        if candidates.notch[at] > 0.0:
            placed = (at,)
    return replace(candidates, z=sorted(kept + list(placed)), by_rib=placed)


def _rib_foramen(pedicles: np.ndarray | None, window: np.ndarray) -> int | None:
    """The neural foramen among ``window``'s coarse slices (below the lowest rib), if the pedicle profile
    (``pedicles``, HU per coarse slice) shows one: its lowest slice, at least ``FORAMEN_FRACTION`` below the
    profile's highest in the window (T12's or L1's pedicles). No ``PEDICLE_BONE_HU`` floor
    (:func:`foramen_depth`): the window's highest was 264 HU with L2 wedged in a dark spine."""
    if pedicles is None:
        return None
    ped = pedicles[window]
    peak = float(ped.max())
    if peak <= 0.0 or (peak - float(ped.min())) / peak < FORAMEN_FRACTION:
        return None
    return int(window[np.argmin(ped)])


def choose_discs(candidates: DiscCandidates, grid_mm: float = COARSE_MM,
                 below: tuple[float, int] | None = None) -> list[Disc]:
    """The intervertebral discs: the candidates chosen by :func:`disc_chain`, with their boundaries.

    ``below``: ``(coarse z, count)``, at least ``count`` discs asked for below
    that slice (:func:`disc_chain`). Each disc's boundaries lie half-way
    between the profile's minimum at the disc and its maxima within 10 mm on
    either side; on a side where the profile rises less than
    ``MIN_NOTCH_HU`` within those 10 mm (the body there as dark as the disc),
    at most ``FLAT_DISC_HALF_MM`` from the disc's centre. Returns the discs
    caudal first.
    """
    cands, arc_mm, p = candidates.z, candidates.arc_mm, candidates.hu
    nz = len(p)
    positions, depths = [float(arc_mm[z]) for z in cands], [float(candidates.notch[z]) for z in cands]
    limit = None if below is None else (float(np.interp(below[0], np.arange(nz), arc_mm)), below[1])
    chosen = [cands[i] for i in disc_chain(positions, depths, candidates.cranial_end_mm, limit)]
    doubtful = {cands[i] for i in ambiguous_fracture_discs(positions, depths)}
    # a flat side's boundary lies half a slice beyond the disc's last slice, FLAT_DISC_HALF_MM from its centre
    flat_half = int(round(FLAT_DISC_HALF_MM / grid_mm - 0.5))
    reach = int(10 / grid_mm)
    discs = []
    for z in sorted(chosen):
        lo, hi = max(0, z - reach), min(nz - 1, z + reach)
        zb = _disc_side(p, z, lo + int(np.argmax(p[lo:z + 1])), flat_half)
        za = _disc_side(p, z, z + int(np.argmax(p[z:hi + 1])), flat_half)
        discs.append(Disc(z=float(z), depth=float(candidates.notch[z]), upper=float(za) + 0.5,
                          lower=float(zb) - 0.5, tilt_deg=float(candidates.tilt_deg[z]), arc_mm=float(arc_mm[z]),
                          ambiguous=z in doubtful, by_rib=z in candidates.by_rib))
    return discs


def _disc_side(p: np.ndarray, z: int, peak: int, flat_half: int) -> int:
    """The disc's last slice on the side of ``peak`` (the profile's maximum within 10 mm of the disc centre
    ``z``): the walk from ``z`` while the profile stays below half-way to ``peak``; where it rises less than
    ``MIN_NOTCH_HU`` (a body as dark as its disc, no edge to stop the walk), at most ``flat_half`` slices
    from ``z``."""
    step = 1 if peak > z else -1
    level = 0.5 * (p[z] + p[peak])
    side = z
    while side != peak and p[side + step] < level:
        side += step
    if p[peak] - p[z] < MIN_NOTCH_HU:
        side = z + step * min(abs(side - z), flat_half)
    return side


def foramen_depth(pedicles: np.ndarray, z: int, grid_mm: float = COARSE_MM) -> float | None:
    """How deep slice ``z`` lies in a neural foramen: the fall of :func:`pedicle_profile` there.

    The lowest of the profile from one slice below ``z`` to two above (the
    foramen lies at the disc and just above it), as a fraction below the
    profile's highest within 16 mm. None when that highest is under
    ``PEDICLE_BONE_HU`` (no pedicles in view).
    """
    reach = int(round(16.0 / grid_mm))
    peak = float(pedicles[max(0, z - reach):z + reach + 1].max())
    if peak < PEDICLE_BONE_HU:
        return None
    return (peak - float(pedicles[max(0, z - 1):z + 3].min())) / peak


def _foramina(pedicles: np.ndarray, valid: np.ndarray, grid_mm: float = COARSE_MM) -> list[int]:
    """Coarse slices at the neural foramina: the lowest of :func:`pedicle_profile` within ``FORAMEN_ALONE_MM``
    on either side, at least ``FORAMEN_FRACTION`` deep (:func:`foramen_depth`), where ``valid`` (per slice).

    The pedicles and the foramina between them are cortical bone and its
    absence beside the canal: they mark the discs whatever the bodies'
    trabecular density.
    """
    reach = int(round(FORAMEN_ALONE_MM / grid_mm))
    lowest = ndi.minimum_filter1d(pedicles, 2 * reach + 1, mode="nearest") == pedicles  # one per foramen ...
    lowest[1:] &= pedicles[1:] < pedicles[:-1]  # ... the first slice of a flat one
    return [int(z) for z in np.flatnonzero(lowest & valid)
            if (depth := foramen_depth(pedicles, int(z), grid_mm)) is not None and depth >= FORAMEN_FRACTION]


def _beside_foramina(cands: list[int], pedicles: np.ndarray, grid_mm: float = COARSE_MM) -> list[int]:
    """Drop a disc candidate at the pedicles when a candidate within 16 mm lies at a foramen.

    A dark vertebral body dips at mid-height, where its pedicles are; its
    disc, with the neural foramen beside it, can be the shallower notch.
    """
    depth = {z: foramen_depth(pedicles, z, grid_mm) for z in cands}
    reach = 16.0 / grid_mm

    def at_pedicles(z: int) -> bool:
        here = depth[z]
        if here is None or here >= FORAMEN_FRACTION:
            return False
        return any(abs(o - z) <= reach and (other := depth[o]) is not None and other - here >= FORAMEN_MARGIN
                   for o in cands)

    return [z for z in cands if not at_pedicles(z)]


def disc_chain(positions_mm: list[float], depths_hu: list[float], cranial_end_mm: float | None = None,
               below: tuple[float, int] | None = None) -> list[int]:
    """Choose the intervertebral discs among candidate minima of the disc profile.

    A pure function of the candidates: the chosen discs form one chain, ordered
    along the spine, in which consecutive discs lie ``SEGMENT_MM`` apart (one
    vertebral body plus one disc: 24-50 mm from T11 to S1) and consecutive
    spacings change little (vertebral heights change slowly along the column).
    The chain maximises the summed notch depths minus
    ``SPACING_PENALTY_HU_PER_MM2`` times the squared change of spacing. This
    keeps a low-density vertebra's mid-body dip (about half a segment from
    the discs) out, where a greedy choice by depth would take it.

    A fractured vertebra breaks the slow change: its segment is short. The
    chain may hold such a *short segment* (:func:`is_short_segment`: a
    ``FRACTURE_SPACING`` fraction of the segments on both sides, never two in
    a row) for ``FRACTURE_COST_HU``; the spacings on either side of it are
    compared with each other. A mid-body dip cannot pass for one: it would
    split a segment into two short ones (about half each), one after the other.
    At the cranial end, where the field of view may end one vertebra above the
    last disc: when the column in view beyond the chain's last disc
    (``cranial_end_mm``) is longer than ``OPEN_SEGMENT_MAX`` times the last
    spacing -- more than one vertebra, so a disc there was missed -- a
    candidate beyond it is added, and a short segment's disc also when the
    column is shorter but goes on above it (a crushed top vertebra;
    :func:`_cranial_extension`). A weak last disc at the regular spacing gives
    way to a much deeper one that closes a short segment below it (a crushed
    top vertebra with everything above it come down; :func:`_crushed_top`).

    ``below`` asks for a number of discs below a position: the lowest
    rib-bearing vertebra (T12) lies so many vertebrae above the sacrum, and a
    chain whose anchors disagree by a vertebra too few holds a segment of two
    vertebrae, most often a crushed one and its neighbour (the short segment's
    disc lost to a mid-body dip, or, at the cranial end, lying under
    ``OPEN_SHORT_MIN`` of a segment). In the cranial extension a short
    segment may then be down to ``FRACTURE_SPACING[0]``, and the chain is the
    best one that holds that many, unless the unconstrained chain, so
    extended, holds them and scores more than ``FRACTURE_AMBIGUITY_HU`` higher,
    each disc the extension adds counted as a short segment's (its depth less
    ``FRACTURE_COST_HU``): with L1 crushed by 60 or 75 %, the best chain
    holding six discs took a mid-body dip of L2 (28 HU) where the
    unconstrained one ends at L1/L2 (112 HU) and the extension adds the
    crushed L1's disc above it (135 HU higher); with L2 crushed in a dark
    spine, the unconstrained chain ends at a mid-body dip of L1 and its
    extension at a weak disc above (13 HU higher only), and the constrained
    chain, with the crushed L2's disc, is right. The unconstrained chain is
    kept when no chain holds the discs asked for.

    Parameters
    ----------
    positions_mm : list of float
        Candidate positions along the column (mm), ascending (caudal first).
    depths_hu : list of float
        Their notch depths (HU), same length.
    cranial_end_mm : float, optional
        Position (mm, same axis) of the cranial end of the column in view.
    below : tuple of (float, int), optional
        ``(position_mm, count)``: the chain should hold at least ``count``
        discs below ``position_mm`` (same axis).

    Returns
    -------
    list of int
        Indices of the chosen candidates, ascending; empty if there are none.

    Raises
    ------
    ValueError
        If the lists differ in length or the positions are not ascending.
    """
    n = len(positions_mm)
    if len(depths_hu) != n:
        raise ValueError("positions_mm and depths_hu differ in length")
    if any(b < a for a, b in zip(positions_mm, positions_mm[1:])):
        raise ValueError("positions_mm must be ascending")
    if n == 0:
        return []
    pos, depth = positions_mm, depths_hu
    chain, score, _, after_short = _best_chain(pos, depth)
    free = _completed(pos, depth, chain, after_short, cranial_end_mm, below)
    if below is None:
        return free
    held, free_score = sum(pos[k] < below[0] for k in free) >= below[1], score + _added_value(depth, chain, free)
    chain, score, _, after_short = _best_chain(pos, depth, below=below)
    if not chain:  # no chain holds the discs asked for
        return free
    constrained = _completed(pos, depth, chain, after_short, cranial_end_mm, below)
    if held and free_score > score + _added_value(depth, chain, constrained) + FRACTURE_AMBIGUITY_HU:
        return free
    return constrained


def _added_value(depth: list[float], chain: list[int], completed: list[int]) -> float:
    """Notch depth that :func:`_completed` adds to ``chain``: each disc it adds counts as a short segment's
    (its depth less ``FRACTURE_COST_HU``), each it drops with its depth."""
    added, dropped = set(completed) - set(chain), set(chain) - set(completed)
    return sum(depth[k] - FRACTURE_COST_HU for k in added) - sum(depth[k] for k in dropped)


def _completed(pos: list[float], depth: list[float], chain: list[int], after_short: bool,
               cranial_end_mm: float | None, below: tuple[float, int] | None) -> list[int]:
    """A chain of :func:`_best_chain` completed at its cranial end (:func:`disc_chain`)."""
    normal_since_short = 1 if after_short else 2
    if not after_short and len(chain) >= 3:
        top = _crushed_top(pos, depth, chain)
        if top is not None:
            chain, normal_since_short = chain[:-1] + [top], 0
        elif is_short_segment(pos[chain[-1]] - pos[chain[-2]], pos[chain[-2]] - pos[chain[-3]]):
            # the chain's last segment, taken as a normal one at the end of the chain (nothing above it
            # to compare with), is a short one: a crushed vertebra, no measure of the next
            normal_since_short = 0
    if cranial_end_mm is not None and len(chain) >= 2:
        chain = chain + _cranial_extension(pos, depth, chain, cranial_end_mm, normal_since_short, below)
    return chain


def _crushed_top(pos: list[float], depth: list[float], chain: list[int]) -> int | None:
    """A candidate that bounds a crushed top vertebra in place of the chain's weak last disc, if any.

    The chain's last segment has nothing above it to confirm its spacing: a
    weak notch at the regular spacing (inside the vertebra above, when the top
    vertebra is crushed and everything above it has come down) wins against
    the crushed body's disc, which costs a fracture. That disc is taken
    instead when it is at least ``TERMINAL_FRACTURE_MARGIN_HU`` deeper and
    the segment it closes is a short one that no mid-body dip makes
    (``OPEN_SHORT_MIN`` to ``FRACTURE_SPACING[1]`` of the segment before, and
    at least ``SHORT_SEGMENT_MM``).
    """
    below, last = chain[-2], chain[-1]
    spacing = pos[below] - pos[chain[-3]]
    short = [k for k in range(below + 1, last)
             if OPEN_SHORT_MIN * spacing <= pos[k] - pos[below] <= FRACTURE_SPACING[1] * spacing
             and pos[k] - pos[below] >= SHORT_SEGMENT_MM and depth[k] >= depth[last] + TERMINAL_FRACTURE_MARGIN_HU]
    return max(short, key=lambda k: depth[k]) if short else None


def _best_chain(pos: list[float], depth: list[float], forbidden: frozenset[tuple[int, int]] = frozenset(),
                below: tuple[float, int] | None = None,
                fractured: bool = False) -> tuple[list[int], float, list[tuple[int, int]], bool]:
    """The chain of :func:`disc_chain` (before the cranial extension): indices, score, short segments.

    ``forbidden``: short segments ``(h, i)`` (candidate indices) the chain may
    not hold. ``below``: ``(position_mm, count)``, the chain must hold at least
    ``count`` discs below ``position_mm``. ``fractured``: the chain must hold a
    short segment. Returns the chosen indices
    (ascending; empty when no chain holds the discs asked for), the chain's
    score (summed notch depths less the spacing penalties and fracture costs),
    its short segments and whether one lies just before its last segment.
    """
    n = len(pos)
    lo, hi = SEGMENT_MM
    limit, count = below if below is not None else (-np.inf, 0)

    def under(*ks: int) -> int:  # discs below the limit among ks
        return sum(pos[k] < limit for k in ks)

    # state (i, j, after_short, counted, has_short): the chain's last two discs (a normal segment), whether
    # a short segment lies just before them, how many of its discs lie below the limit (at most count) and
    # whether it holds a short segment; back: the state before (a short segment lies between them when
    # that state does not end at i)
    State = tuple[int, int, bool, int, bool]
    value: dict[State, float] = {}
    back: dict[State, State | None] = {}
    for j in range(n):
        for i in range(j):
            gap = pos[j] - pos[i]
            if not lo <= gap <= hi:
                continue
            best: dict[tuple[bool, int, bool], tuple[float, State | None]] = {
                (False, min(count, under(i, j)), False): (depth[i] + depth[j], None)}
            for (f, h, after_short, counted, has_short), before_value in list(value.items()):
                before = pos[h] - pos[f]
                if h == i:  # normal segment after normal segment
                    score, state = before_value + depth[j] - SPACING_PENALTY_HU_PER_MM2 * (gap - before) ** 2, False
                    now = min(count, counted + under(j))
                elif (h < i and not after_short and (h, i) not in forbidden
                      and is_short_segment(pos[i] - pos[h], before, gap)):
                    # h -> i a short (fractured) segment, at least two normal segments after the last one
                    score = (before_value + depth[i] + depth[j] - FRACTURE_COST_HU
                             - SPACING_PENALTY_HU_PER_MM2 * (gap - before) ** 2)
                    state, now = True, min(count, counted + under(i, j))
                else:
                    continue
                slot = (state, now, has_short or state)
                if score > best.get(slot, (-np.inf, None))[0]:
                    best[slot] = (score, (f, h, after_short, counted, has_short))
            for (state, counted, has_short), (score, arg) in best.items():
                value[(i, j, state, counted, has_short)] = score
                back[(i, j, state, counted, has_short)] = arg
    complete = {key: v for key, v in value.items() if key[3] >= count and (key[4] or not fractured)}
    if fractured and not complete:
        return [], -np.inf, [], False
    single = int(np.argmax(depth))
    if not fractured and (not complete or depth[single] >= max(complete.values())):
        if under(single) >= count:
            return [single], float(depth[single]), [], False
        if not complete:
            return [], -np.inf, [], False
    last = max(complete, key=lambda k: complete[k])
    chain, shorts = [last[1]], []
    key: State | None = last
    while key is not None:
        chain.append(key[0])
        before_key = back[key]
        if before_key is not None and before_key[1] != key[0]:
            chain.append(before_key[1])
            shorts.append((before_key[1], key[0]))
        key = before_key
    chain.sort()
    return chain, value[last], shorts, last[2]


def ambiguous_fracture_discs(positions_mm: list[float], depths_hu: list[float]) -> set[int]:
    """Candidates of the disc chain where a chain that differs by a fractured (short) segment nearly ties.

    A pure function. For each short segment of :func:`disc_chain`'s chain,
    the best chain without it is found; when that one scores within
    ``FRACTURE_AMBIGUITY_HU`` of the chain's score, the fracture may as well
    lie elsewhere (a weak disc beside a dark, compressed body against a
    mid-body dip of its neighbour), and the two candidates bounding it are
    returned. Likewise, when the chain holds no short segment, the best
    chain that holds one: when it scores within ``FRACTURE_AMBIGUITY_HU``,
    the chain's candidates that it lacks are returned (in a spine 80 HU
    dark, L3 crushed by 45 %: a notch of 12 HU at the regular spacing beat
    the crushed body's disc of 62 HU by 29 HU, and L3 took in its disc and
    the bottom of L2). The levels can then be flagged uncertain rather than
    confidently mis-bounded.

    Parameters
    ----------
    positions_mm, depths_hu : list of float
        As for :func:`disc_chain`.

    Returns
    -------
    set of int
        Candidate indices; empty when every alternative is clearly worse.
    """
    if len(positions_mm) < 2:
        return set()
    chain, score, shorts, _ = _best_chain(positions_mm, depths_hu)
    out: set[int] = set()
    for pair in shorts:
        _, alternative, _, _ = _best_chain(positions_mm, depths_hu, frozenset([pair]))
        if score - alternative < FRACTURE_AMBIGUITY_HU:
            out.update(pair)
    if not shorts:
        fractured, alternative, _, _ = _best_chain(positions_mm, depths_hu, fractured=True)
        if fractured and score - alternative < FRACTURE_AMBIGUITY_HU:
            out.update(set(chain) - set(fractured))
    return out


def is_short_segment(gap_mm: float, *neighbours_mm: float) -> bool:
    """Whether a segment of ``gap_mm`` between discs can be a fractured vertebra's beside ``neighbours_mm``.

    At least ``SHORT_SEGMENT_MM`` long and within ``FRACTURE_SPACING`` of every
    neighbouring segment: a body compressed by 45 % (Genant grade 3) and its
    disc keep about 0.6 of a segment, a vertebra plana about 0.4 (0.35-0.85
    allows for the spread of the neighbours' spacings). A mid-body dip of a
    low-density body, about half a segment from the discs, passes this test
    too; :func:`disc_chain` keeps it out, as it would split one segment into
    two short ones, one after the other.
    """
    return gap_mm >= SHORT_SEGMENT_MM and all(
        FRACTURE_SPACING[0] * s <= gap_mm <= FRACTURE_SPACING[1] * s for s in neighbours_mm)


def _cranial_extension(pos: list[float], depth: list[float], chain: list[int], end_mm: float,
                       normal_since_short: int, below: tuple[float, int] | None = None) -> list[int]:
    """Candidates added beyond the chain's cranial end while the column in view there exceeds one vertebra.

    The deepest candidate a normal segment (``FRACTURE_SPACING[1]`` to
    ``OPEN_SEGMENT_MAX`` times the last spacing) beyond the last disc; if
    there is none, the deepest a short one (``OPEN_SHORT_MIN`` to
    ``FRACTURE_SPACING[1]``: with one neighbour only, a mid-body dip near 0.5
    is kept out by the stricter bound). When the column in view beyond the
    last disc is no longer than ``OPEN_SEGMENT_MAX`` times the last spacing
    (one normal vertebra at most), only a short one, and only with
    ``OPEN_BEYOND_SHORT`` of a segment still in view above it: a crushed top
    vertebra, its disc and part of the vertebra above. As in the chain, at
    least two normal segments lie between short ones (``normal_since_short``:
    normal segments since the chain's last short one, 2 or more when none is
    near; 0 when the chain ends with one). The spacing the windows scale is
    the median of the last three normal segments. While the chain holds fewer
    discs below ``below[0]`` than ``below[1]`` (:func:`disc_chain`), a short
    one there may be down to ``FRACTURE_SPACING[0]``, as in the chain.
    """
    limit, count = below if below is not None else (-np.inf, 0)
    added: list[int] = []
    while True:
        ends = chain + added
        top = ends[-1]
        # the median of the last three normal segments: a short one (a crushed vertebra) is no measure
        # of the next vertebra, and a disc placed a little low or high moves one spacing by 10 %
        gaps = np.diff([pos[k] for k in ends])
        normal = [gap for i, gap in enumerate(gaps) if i == 0 or not is_short_segment(gap, gaps[i - 1])]
        spacing = float(np.median(normal[-3:]))
        # a disc still missing below the limit: the vertebra is crushed, not split by a mid-body dip
        missing = sum(pos[k] < limit for k in ends) < count
        windows = [(FRACTURE_SPACING[1], OPEN_SEGMENT_MAX)]
        if normal_since_short >= 2:
            windows.append((FRACTURE_SPACING[0] if missing else OPEN_SHORT_MIN, FRACTURE_SPACING[1]))
        # no more than one normal vertebra in view beyond the last disc: only a fractured one's disc,
        # with at least OPEN_BEYOND_SHORT of a segment in view above it
        one_vertebra = end_mm - pos[top] <= OPEN_SEGMENT_MAX * spacing
        if one_vertebra:
            windows = windows[1:]
        for low, high in windows:
            beyond = [k for k in range(top + 1, len(pos)) if low * spacing <= pos[k] - pos[top] <= high * spacing
                      and pos[k] - pos[top] >= SHORT_SEGMENT_MM
                      and (not one_vertebra or end_mm - pos[k] >= OPEN_BEYOND_SHORT * spacing)
                      and (low >= OPEN_SHORT_MIN or pos[k] < limit)]
            if beyond:
                added.append(max(beyond, key=lambda k: depth[k]))
                normal_since_short = 0 if high == FRACTURE_SPACING[1] else normal_since_short + 1
                break
        else:
            return added
