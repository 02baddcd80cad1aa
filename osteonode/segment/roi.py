"""The trabecular ROI of a vertebral body, placed by geometry.

Following the QCT and opportunistic-CT convention, the ROI is an elliptical
cylinder in the anterior trabecular body at mid-vertebral height, sized from
the body's own dimensions, not from HU, so that it stays the same whatever the
density. In the vertebra's own frame (spine axis; anterior-posterior and
left-right directions perpendicular to it):

* **height**: a slab of ``ROI_SLAB_MM`` (12 mm; QCT uses an 8-10 mm
  mid-vertebral slab, a little more here for precision on 3 mm slices) centred
  midway between the centres of the discs above and below (the discs are found
  the same way whatever the density, whereas the body mask's endplates gain or
  lose a slice with it; without both discs: midway along the body mask's
  extent). The slab is a whole number of slices thick in every voxel column
  (``round(ROI_SLAB_MM / slice spacing)``) and half-open, so a mid-point that
  moves by a millimetre, or a slightly different axis, cannot add or drop a
  slice: with the thickness set from the disc spacing (36 % of it) instead,
  3 mm slices made the ROI of the same vertebra 4 or 5 slices thick from one
  density to the next, and its voxel count jumped by 20-25 %;
* **cross-section**: the body's cross-section in that slab (holes filled: the
  trabecular bone of a dark body is not its surface) is summarised by its
  equivalent ellipse (centroid, and semi-axes ``2 x SD`` along each direction
  from the second moments: exact for an elliptical section), which moves
  smoothly with the outline instead of in whole voxels. The ROI ellipse spans
  from the end of the posterior quarter of that depth (basivertebral veins,
  pedicle bases) to ``TRABECULAR_MARGIN_MM`` (5 mm) inside the anterior end of
  the equivalent ellipse, and to 5 mm inside its lateral ends (4 or 3 mm for a
  body whose ROI would be under 0.2 cm3). Every ROI voxel also lies at least
  ``MIN_SURFACE_MM`` (5 mm) from the body's surface (a box-like section reaches
  beyond its equivalent ellipse at the corners only).

Sources: Pickhardt PJ et al., Ann Intern Med 2013;158:588-595 (trabecular L1
ROI avoiding the cortex and the posterior venous plexus); ACR-SPR-SSR Practice
Parameter for the Performance of Musculoskeletal Quantitative Computed
Tomography (QCT), 2018 (mid-vertebral trabecular ROI).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from osteonode.segment.frame import IN_PLANE, fill_holes, perpendicular_frame
from osteonode.volume import bounding_box

#: Distance (mm) of the trabecular ROI from the anterior and lateral body surface.
TRABECULAR_MARGIN_MM = 5.0


#: Every ROI voxel lies at least this far (mm) from the (hole-filled) body surface (3 mm let a noisy,
#: tilted L5 take in its cortex: +7 to +15 HU at 35 HU noise). On 3 mm voxels a
#: voxel 4 mm from the surface still averages in some cortex: 4 mm left the trabecular HU of a
#: scaled (x0.9), tilted (10 degrees), osteoporotic (-50 HU) spine 5.1 HU too high and of tilted copies
#: up to 8.4 HU; 5 mm brings them within 5 HU (bench/robustness.py), for a ROI about 5 % smaller.
MIN_SURFACE_MM = 5.0


#: Posterior fraction of the body depth left out of the trabecular ROI (basivertebral veins,
#: pedicle bases).
ROI_POSTERIOR_FRACTION = 0.25


#: Thickness (mm) of the trabecular ROI's slab at mid-vertebral height (module docstring: why 12, not QCT's 8-10 mm).
ROI_SLAB_MM = 12.0


def _slab(along: np.ndarray, middle: float, slice_mm: float, step: float) -> np.ndarray:
    """Voxels in the slab of ``ROI_SLAB_MM`` about ``middle`` (mm along the spine axis).

    The slab is a whole number ``n`` of ``step`` (the distance along the axis
    between neighbouring slices of one voxel column) and half-open, so every
    column has exactly ``n`` voxels in it wherever ``middle`` falls between
    slices: a disc centre that moves by a millimetre cannot add or drop a slice.
    """
    half = 0.5 * max(1, round(ROI_SLAB_MM / slice_mm)) * step
    offset = along - middle
    return (offset >= -half) & (offset < half)


def trabecular_roi(body: np.ndarray, coords_mm: tuple[np.ndarray, np.ndarray, np.ndarray],
                   spacing: np.ndarray, axis: np.ndarray,
                   disc_centres_mm: tuple[float, float] | None = None) -> np.ndarray:
    """Trabecular ROI of one vertebral body (the rule of the module docstring).

    Parameters
    ----------
    body : numpy.ndarray
        ``(s, a, l)`` boolean mask of the body in the canonical frame
        (superior, anterior, left), e.g. a crop.
    coords_mm : tuple of numpy.ndarray
        Canonical position (mm) of each index along the three axes of ``body``.
    spacing : numpy.ndarray
        ``(3,)`` canonical voxel spacing in mm.
    axis : numpy.ndarray
        ``(3,)`` unit vector of the spine axis at the body (pointing superior).
    disc_centres_mm : tuple of float, optional
        Positions along ``axis`` (mm, ``coords . axis``) of the centres of the
        discs below and above the body.

    Returns
    -------
    numpy.ndarray
        Boolean mask of the ROI, same shape as ``body``: the elliptical cylinder
        of the module docstring, inside the body. Source: Pickhardt PJ et al.,
        Ann Intern Med 2013;158:588-595, and the ACR-SPR-SSR Practice Parameter
        for QCT (2018).
    """
    if not body.any():
        return body
    Z, Y, X = np.meshgrid(*coords_mm, indexing="ij", sparse=True)
    along = np.broadcast_to(Z * axis[0] + Y * axis[1] + X * axis[2], body.shape)
    if disc_centres_mm is not None:
        below, above = disc_centres_mm
    else:
        inside = along[body]
        below, above = float(inside.min()), float(inside.max())
    slab = _slab(along, 0.5 * (below + above), float(spacing[0]), float(spacing[0] * abs(axis[0])))
    filled = fill_holes(body, IN_PLANE)  # trabecular holes of a dark body
    section = filled & slab
    if not section.any():
        return section
    box = bounding_box(filled, 1)
    clear = np.zeros(body.shape, bool)
    clear[box] = ndi.distance_transform_edt(np.pad(filled[box], 1), sampling=spacing)[1:-1, 1:-1, 1:-1] \
        >= MIN_SURFACE_MM
    mid = section & clear & body
    u, w = perpendicular_frame(axis)
    ap = np.broadcast_to(Z * u[0] + Y * u[1] + X * u[2], body.shape)
    lr = np.broadcast_to(Z * w[0] + Y * w[1] + X * w[2], body.shape)
    # the equivalent ellipse of the section: semi-axes 2 SD (exact for an elliptical section)
    centre_ap, centre_lr = float(ap[section].mean()), float(lr[section].mean())
    half_depth, half_width = 2.0 * float(ap[section].std()), 2.0 * float(lr[section].std())
    posterior = centre_ap - half_depth + ROI_POSTERIOR_FRACTION * 2.0 * half_depth
    out = np.zeros_like(mid)
    for margin in (TRABECULAR_MARGIN_MM, 4.0, 3.0):
        anterior = centre_ap + half_depth - margin
        semi_ap, semi_lr = 0.5 * (anterior - posterior), half_width - margin
        if semi_ap <= 0 or semi_lr <= 0:
            continue
        ellipse = ((ap - 0.5 * (anterior + posterior)) / semi_ap) ** 2 + ((lr - centre_lr) / semi_lr) ** 2 <= 1.0
        out = mid & ellipse
        if out.sum() * np.prod(spacing) >= 200.0:  # at least 0.2 cm3
            return out
    return out
