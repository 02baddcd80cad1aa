"""Edited copies of the example CT with known truth, for ``bench/robustness.py`` and its CI subset.

Every edit is made **from the image itself**: the reference masks
(TotalSegmentator output) are only carried along, moved with the geometric
edits, to score the result. Where an edit needs to know where a vertebral
body is, it uses :class:`Anatomy`: the bodies found by the built-in
segmentation (:func:`osteonode.segment.backends.builtin`) on the
*unmodified* CT. For the example CT those bodies are stored
(``EXAMPLE_BODIES``, segmented by the code of commit 9bbab0c;
``python -m bench.variants --store-example-bodies`` writes them again), so
that every commit is measured on the same edited images: segmented afresh
by each commit, the edits followed that commit's body outlines, and a change
that moved the posterior wall of the unedited bodies by under 1 mm changed
the images enough that four of the 108 ``bench/beyond.py`` variants were
mislabelled, by the code before the change as by the code after it.
So are the Genant heights of those bodies (:class:`BodyHeights`, measured by
:func:`osteonode.measure.genant.grade_levels` at commit 3d35ab6), from which
a deformity is sized: measured afresh, a change to the height measurement
would change the deformed images it is scored on.

Each body's **trabecular core** is the body minus a thin cortical shell,
with partial-volume weights: a voxel of size ``s`` (the finest spacing)
whose centre lies ``e`` mm from the nearest voxel outside the body spans
depths ``e - s .. e`` below the body surface; its core weight is the
fraction of that span deeper than ``SHELL_MM`` (the cortex):
``clip((e - SHELL_MM) / s, 0, 1)``. A density edit thus blends over one
voxel (about 1 mm on thin slices) instead of making a step edge, leaves the outer
``SHELL_MM`` of cortex alone, and edits the outermost voxel layer of a
coarse grid by its trabecular fraction (5/6 of the offset on the 3 mm
example, the next layer fully).
Why not a 2-3 mm erosion: on the 3 mm example that leaves the whole outer
voxel layer unedited, and where a correct body outline lies one voxel beyond
ours (posteriorly, mostly) 15-30 % of a correct 5 mm-margin ROI would be
unedited: with the reference bodies standing in for the segmentation (body
eroded by one voxel as ROI), an all-level -60 HU edit then reads -44 to -52 HU;
with these weights -55 to -59 HU (L4 reads -55: 7 % of that ROI lies outside
our L4 body altogether).

Arrays are numpy ``(z, y, x)`` (:class:`osteonode.volume.Volume`); SimpleITK
images are ``(x, y, z)``. HU throughout; lengths and positions in mm, in
DICOM patient space (LPS). Geometric edits resample the image (linear,
``-1024`` HU outside the original field of view) and the reference masks
(each voxel the label at most of its 27 sub-points: :func:`_pull_labels`) on their own grids
with the same displacement, so that a variant stays on the grid of the input.

Edits (each a function ``Variant -> Variant``; :func:`baseline` starts a chain):

* :func:`offset_cores`: add a HU offset to the trabecular cores of some levels
  (low density: negative; sclerosis: positive);
* :func:`add_island`: a sphere of ``ISLAND_HU`` (a bone island, enostosis),
  partial-volume blended, in the anterior half of a core at mid-height;
* :func:`deform`: a wedge, biconcave or crush deformity of one level by a
  cranio-caudal displacement field along the local spine axis that shortens its interior,
  sized so that the stored heights, shortened as Genant's windows on the unmodified body
  receive the field, have the height loss asked;
* :func:`transform`: isotropic scaling about the spine centre and rotation
  about the left-right and/or anterior-posterior axis;
* :func:`add_noise`: white Gaussian noise with a fixed seed.

Density edits and islands use the cores of the unmodified CT, so they come
before any geometric edit in a chain (checked); noise comes last.

The truth (:attr:`Variant.truth`) says what the measurement should report:
``offset`` (level -> HU that the core offset adds to the trabecular mean),
``noise_sigma`` (HU), ``island`` (level, diameter), ``deformity`` (level,
kind, height loss) and ``expected_grade`` (level -> Genant grade of the
applied height loss; levels not listed should grade 0).

Figures from running the bench belong in ``bench/README.md``, not here.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from bench.segmentation import References, example_image, grade_label_map
from osteonode.anatomy import VERTEBRA_IDS
from osteonode.measure.genant import (
    GenantMeasurement,
    body_frame,
    genant_grade,
    height_loss,
    measurement_windows,
)
from osteonode.measure.tissues import body_centres_mm
from osteonode.segment.backends import builtin
from osteonode.volume import Volume

#: Levels that get a trabecular core (T12-L5).
CORE_LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5")
#: Thickness of the cortical shell that density edits leave alone (mm): the lumbar vertebral shell is a
#: few tenths of a millimetre thick (Silva MJ et al., Bone 1994;15:409-414).
SHELL_MM = 0.5
#: Attenuation of a bone island (HU).
ISLAND_HU = 900.0
#: Sub-samples per voxel and axis for the partial-volume fraction of an island.
ISLAND_SUPERSAMPLING = 5
#: A deformity moves this much of each end of a body (its endplate and the blur of the endplate's edge on
#: thick slices), and as much of the disc beyond, rigidly (mm).
ENDPLATE_MM = 3.0
#: Grid (mm, anterior and left) on which a deformity follows the endplates of each column of the body.
COLUMN_MM = 1.0
#: The least height (mm) of a deformed body's compressed interior.
MIN_INTERIOR_MM = 2.0
#: Deformity kinds, see :func:`deform`.
DEFORMITIES = ("wedge", "biconcave", "crush")
OUTSIDE_HU = -1024.0
#: The bodies (``bodies``, ``(z, y, x)`` VerSe IDs) of the example CT found by the built-in segmentation,
#: with the ``affine`` of its grid (module docstring).
EXAMPLE_BODIES = Path(__file__).resolve().parent / "data" / "example_bodies.npz"


@dataclass(frozen=True)
class BodyHeights:
    """Genant heights (mm) of an unmodified body, from which :func:`deform` sizes a deformity.

    Attributes
    ----------
    anterior_mm, middle_mm, posterior_mm : float
        ``Ha``, ``Hm``, ``Hp`` of :mod:`osteonode.measure.genant`, mm.
    reference_posterior_mm : float or None
        Mean posterior height of the neighbours (``Hp_ref``), mm; ``None`` without one.
    """

    anterior_mm: float
    middle_mm: float
    posterior_mm: float
    reference_posterior_mm: float | None

    def loss(self) -> float:
        """Genant's height loss of these heights (:func:`osteonode.measure.genant.height_loss`), 0..1."""
        return height_loss(self.anterior_mm, self.middle_mm, self.posterior_mm, self.reference_posterior_mm)

    @classmethod
    def measured(cls, measurements: dict[str, GenantMeasurement]) -> dict[str, BodyHeights]:
        """The heights of every measured level of :func:`osteonode.measure.genant.grade_levels`'s result
        (a level cut by the field of view has none and is left out)."""
        return {name: cls(m.height_anterior_mm, m.height_middle_mm, m.height_posterior_mm,
                          m.reference_posterior_mm)
                for name, m in measurements.items()
                if m.height_anterior_mm is not None and m.height_middle_mm is not None
                and m.height_posterior_mm is not None}


@dataclass(frozen=True)
class Anatomy:
    """Where the vertebral bodies of the unmodified CT are, from the image alone.

    Attributes
    ----------
    bodies : numpy.ndarray
        ``(z, y, x)`` uint8 label map of the bodies found by the built-in
        segmentation on the unmodified CT (VerSe IDs, 19 = T12 ... 24 = L5).
    cores : dict[str, numpy.ndarray]
        Level name -> ``(z, y, x)`` float32 core weight in ``[0, 1]`` (see the
        module docstring).
    heights : dict[str, BodyHeights]
        Level name -> Genant heights of these bodies (mm); stored with the
        example CT's bodies (module docstring).
    """

    bodies: np.ndarray
    cores: dict[str, np.ndarray]
    heights: dict[str, BodyHeights]

    @classmethod
    def of_example(cls, volume: Volume) -> Anatomy:
        """The example CT's anatomy from its stored bodies and heights (``EXAMPLE_BODIES``, module docstring).

        Raises
        ------
        ValueError
            If ``volume`` is not on the grid of the stored bodies.
        """
        stored = _stored_example(volume)
        heights = {str(name): BodyHeights(ha, hm, hp, None if math.isnan(ref) else ref)
                   for name, (ha, hm, hp, ref) in zip(stored["height_levels"].tolist(),
                                                       stored["heights_mm"].tolist())}
        return cls.from_bodies(volume, stored["bodies"], heights)

    @classmethod
    def from_bodies(cls, volume: Volume, bodies: np.ndarray, heights: dict[str, BodyHeights]) -> Anatomy:
        """Cores of the bodies in ``bodies`` (``(z, y, x)`` VerSe IDs on ``volume``'s grid), with their
        ``heights``.

        Raises
        ------
        ValueError
            If ``bodies`` holds none of T12-L5.
        """
        step = min(volume.spacing)
        cores = {}
        for name in CORE_LEVELS:
            body = bodies == VERTEBRA_IDS[name]
            if not body.any():
                continue
            depth = ndi.distance_transform_edt(np.pad(body, 1), sampling=volume.spacing)[1:-1, 1:-1, 1:-1]
            cores[name] = np.where(body, np.clip((depth - SHELL_MM) / step, 0.0, 1.0), 0.0).astype(np.float32)
        if not cores:
            raise ValueError("the bodies hold no vertebral body T12-L5")
        return cls(bodies=bodies, cores=cores, heights=heights)


def _stored_example(volume: Volume) -> dict[str, np.ndarray]:
    """The arrays of ``EXAMPLE_BODIES``; ``ValueError`` if ``volume`` is not on the grid of its bodies."""
    with np.load(EXAMPLE_BODIES) as stored:
        arrays = dict(stored)
    if arrays["bodies"].shape != volume.shape or not np.allclose(arrays["affine"], volume.affine):
        raise ValueError(f"{EXAMPLE_BODIES.name} holds bodies on another grid than this volume's")
    return arrays


@dataclass(frozen=True)
class Variant:
    """An edited CT with its truth and the reference masks moved with it.

    Attributes
    ----------
    name : str
        Short name, e.g. ``core_L2-60``, ``wedge30_L1``.
    volume : Volume
        ``(z, y, x)`` HU on the grid of the input CT.
    refs : References
        Reference masks (scoring only), moved with every geometric edit.
    truth : dict
        See the module docstring.
    warped : bool
        A geometric edit has been applied (the cores no longer line up).
    """

    name: str
    volume: Volume
    refs: References
    truth: dict = field(default_factory=dict)
    warped: bool = False


def baseline(volume: Volume, refs: References, name: str = "base") -> Variant:
    """Start a chain of edits from the unmodified CT.

    Parameters
    ----------
    volume : Volume
        The CT, ``(z, y, x)`` HU.
    refs : References
        Its reference masks (on their own grid, LPS geometry in ``refs.image``).
    name : str
        Row name.

    Returns
    -------
    Variant
        Truth: no offset (0 HU on every level), no noise, no island, no deformity.
    """
    return Variant(name, volume, refs, {"offset": {}, "noise_sigma": 0.0, "island": None, "deformity": None,
                                        "expected_grade": {}})


def _truth(variant: Variant, **update) -> dict:
    return {**variant.truth, **update}


def _check_unwarped(variant: Variant, edit: str) -> None:
    if variant.warped:
        raise ValueError(f"{edit} uses the cores of the unmodified CT: apply it before any geometric edit")


def offset_cores(variant: Variant, anatomy: Anatomy, offsets: dict[str, float]) -> Variant:
    """Add ``offsets`` (level -> HU) to the trabecular cores (partial-volume weights at their edge).

    Parameters
    ----------
    variant : Variant
        Not yet warped.
    anatomy : Anatomy
        Of the unmodified CT.
    offsets : dict[str, float]
        Level name (``"L2"``) -> HU added where the core weight is 1
        (``weight * offset`` at the edge of the core).

    Returns
    -------
    Variant
        Truth ``offset`` updated (offsets add up over repeated edits).
    """
    _check_unwarped(variant, "offset_cores")
    hu = variant.volume.hu.copy()
    for name, offset in offsets.items():
        hu += np.float32(offset) * anatomy.cores[name]
    total = dict(variant.truth["offset"])
    for name, offset in offsets.items():
        total[name] = total.get(name, 0.0) + offset
    return replace(variant, volume=Volume(hu=hu, affine=variant.volume.affine),
                   truth=_truth(variant, offset=total))


def _points_mm(volume: Volume) -> np.ndarray:
    """LPS coordinates (mm) of every voxel centre of ``volume``'s ``(z, y, x)`` grid, shape ``(z, y, x, 3)``."""
    return volume.index_to_lps(np.moveaxis(np.indices(volume.shape, dtype=np.float64), 0, -1))


def _centre_mm(volume: Volume, mask: np.ndarray) -> np.ndarray:
    """Centroid (LPS mm) of a ``(z, y, x)`` mask."""
    return volume.index_to_lps(ndi.center_of_mass(mask))


def _island_centre(volume: Volume, core: np.ndarray, radius_mm: float) -> np.ndarray:
    """Centre (LPS mm) of an island of ``radius_mm`` in the anterior half of ``core`` at mid-height.

    Candidates are the full-weight core voxels anterior of the core centroid
    within half a voxel of its height (patient superior); the island goes
    a quarter of the core depth in front of the centroid, moved back towards
    it as far as needed to keep ``radius_mm`` inside the core (the deepest
    candidate when no position does).
    """
    full = core >= 1.0
    centre = _centre_mm(volume, full)
    points = _points_mm(volume)
    rel = points - centre
    anterior = -rel[..., 1]  # LPS y points posterior
    inside = ndi.distance_transform_edt(np.pad(full, 1), sampling=volume.spacing)[1:-1, 1:-1, 1:-1]
    mid = full & (np.abs(rel[..., 2]) <= 0.5 * volume.spacing[0] + 1e-6) & (anterior >= 0)
    depth = anterior[full].max() - anterior[full].min()
    fits = mid & (inside >= radius_mm)
    if fits.any():
        cost = np.abs(anterior - depth / 4) + np.abs(rel[..., 0])  # quarter depth, on the mid-sagittal plane
        pick = np.unravel_index(np.argmin(np.where(fits, cost, np.inf)), full.shape)
    else:
        pick = np.unravel_index(np.argmax(np.where(mid, inside, -1.0)), full.shape)
    return points[pick]


def _subsamples(start: int, stop: int, sub: np.ndarray, axis: int) -> np.ndarray:
    """Sub-sample indices ``start..stop-1 (+) sub`` shaped to broadcast as ``(nz, k, ny, k, nx, k)``."""
    shape = [1] * 6
    shape[2 * axis], shape[2 * axis + 1] = stop - start, sub.size
    return (np.arange(start, stop)[:, None] + sub[None, :]).reshape(shape)


def add_island(variant: Variant, anatomy: Anatomy, level: str, diameter_mm: float,
               hu: float = ISLAND_HU) -> Variant:
    """Put a bone island (enostosis) into the trabecular core of ``level``.

    Each voxel becomes ``(1 - f) * HU + f * hu`` where ``f`` is the fraction
    of the voxel inside the sphere (``ISLAND_SUPERSAMPLING``³ sub-samples),
    so the island has a partial-volume edge as a scanner would give it. The
    centre is chosen by :func:`_island_centre` (anterior half, mid-height).

    Parameters
    ----------
    variant : Variant
        Not yet warped.
    anatomy : Anatomy
        Of the unmodified CT.
    level : str
        ``"L1"`` ... ``"L4"`` (any level with a core).
    diameter_mm : float
        Sphere diameter, mm.
    hu : float
        Attenuation of the island, HU.

    Returns
    -------
    Variant
        Truth ``island = {"level", "diameter_mm"}``; the level's reported
        trabecular HU should move by at most 5 HU beyond its offset.
    """
    _check_unwarped(variant, "add_island")
    vol = variant.volume
    radius = diameter_mm / 2.0
    centre = _island_centre(vol, anatomy.cores[level], radius)
    k = ISLAND_SUPERSAMPLING
    sub = (np.arange(k) + 0.5) / k - 0.5  # sub-sample offsets in voxels
    centre_index = vol.lps_to_index(centre)
    reach = [int(math.ceil(radius / sp)) + 1 for sp in vol.spacing]
    lo = [max(0, int(round(c)) - r) for c, r in zip(centre_index, reach)]
    hi = [min(n, int(round(c)) + r + 1) for c, r, n in zip(centre_index, reach, vol.shape)]
    iz, iy, ix = (_subsamples(a, b, sub, axis) for axis, (a, b) in enumerate(zip(lo, hi)))
    d = vol.affine[:3, :3]
    dist2 = sum((d[a, 0] * iz + d[a, 1] * iy + d[a, 2] * ix + vol.affine[a, 3] - centre[a]) ** 2 for a in range(3))
    frac = (dist2 <= radius ** 2).mean(axis=(1, 3, 5)).astype(np.float32)
    out = vol.hu.copy()
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    out[box] = (1.0 - frac) * out[box] + frac * np.float32(hu)
    return replace(variant, volume=Volume(hu=out, affine=vol.affine),
                   truth=_truth(variant, island={"level": level, "diameter_mm": diameter_mm}))


def _spine_frame(volume: Volume, anatomy: Anatomy, level: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                          np.ndarray]:
    """Centre, height (superior), anterior and left unit axes (LPS) of ``level``'s body.

    The height axis is the spine axis through the centroids of the
    neighbouring bodies: the frame in which :mod:`osteonode.measure.genant`
    measures heights (:func:`osteonode.measure.genant.body_frame`), so that
    a deformity and its :func:`_window_fractions` share it.
    """
    vid = VERTEBRA_IDS[level]
    centres = body_centres_mm(volume, anatomy.bodies)
    return (centres[vid], *body_frame(centres, vid))


def _beyond(coords: np.ndarray, shape: tuple[int, ...], margin: float) -> np.ndarray:
    """Whether each point of ``coords`` (``(3, z, y, x)`` fractional indices) lies more than ``margin`` (in
    voxels) beyond the outermost voxel centres of a grid of ``shape``."""
    return ((coords < -margin) | (coords > np.array(shape)[:, None, None, None] - 1 + margin)).any(axis=0)


#: Sub-points per axis of a reference voxel in :func:`_pull_labels`.
REFERENCE_SUBSAMPLES = 3


def _pull_labels(arrays: list[np.ndarray], grid: Volume, source_mm) -> list[np.ndarray]:
    """Label maps on ``grid`` (``(z, y, x)``) moved through the backward map ``source_mm``: each output voxel
    takes the label (background included) found at most of its ``REFERENCE_SUBSAMPLES ** 3`` sub-points.

    The reference masks are on a 3 mm grid. Sampled at the voxel centre alone (nearest neighbour), a body
    compressed by half gains or loses a whole slice with the phase of the slices: the crushed L3 of
    ``crush45_L3`` kept 698 reference voxels where the warped voxels cover 746.5 (fractions at 5 x 5 x 5
    sub-points); with 3 x 3 x 3 sub-points, 719. Sub-points outside the input voxels do not vote; a voxel
    whose centre comes from beyond the outermost voxel centres is background, as the image's linear
    resampling makes it air there.
    """
    tables = []
    for array in arrays:
        grid.require_grid(array)
        values = np.unique(array)
        lookup = np.zeros(int(values.max()) + 1, np.intp)
        lookup[values] = np.arange(values.size)
        tables.append((values, lookup, np.zeros((values.size, array.size), np.uint8)))
    centres = _points_mm(grid)
    air = _beyond(np.moveaxis(grid.lps_to_index(source_mm(centres, grid.spacing)), -1, 0), grid.shape, 0.0)
    offsets = (np.arange(REFERENCE_SUBSAMPLES) + 0.5) / REFERENCE_SUBSAMPLES - 0.5
    for sub in np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), axis=-1).reshape(-1, 3):
        step = grid.index_to_lps(sub) - grid.index_to_lps(np.zeros(3))  # the sub-point's offset, LPS mm
        coords = np.moveaxis(grid.lps_to_index(source_mm(centres + step, grid.spacing)), -1, 0)
        voting = np.flatnonzero(~_beyond(coords, grid.shape, 0.5))
        for array, (_, lookup, counts) in zip(arrays, tables):
            found = ndi.map_coordinates(array, coords, order=0, mode="nearest", prefilter=False)
            counts[lookup[found.ravel()[voting]], voting] += 1
    return [np.where(air, 0, values[np.argmax(counts, axis=0)].reshape(grid.shape)).astype(array.dtype)
            for array, (values, _, counts) in zip(arrays, tables)]


def _resample(variant: Variant, source_mm, crop: bool = False) -> Variant:
    """Resample image (linear) and reference masks (:func:`_pull_labels`) through a backward map.

    ``source_mm(points, spacing)`` takes the ``(z, y, x, 3)`` LPS voxel centres
    of an output grid (and that grid's ``(sz, sy, sx)`` spacing) and returns
    the LPS points whose content lands there. With ``crop``, leading and
    trailing slices (axis 0) whose voxels come mostly from outside the input
    grid are dropped from the image.
    """
    vol = variant.volume
    coords = np.moveaxis(vol.lps_to_index(source_mm(_points_mm(vol), vol.spacing)), -1, 0)
    moved_vol = Volume(hu=ndi.map_coordinates(vol.hu, coords, order=1, mode="constant", cval=OUTSIDE_HU,
                                              prefilter=False).astype(np.float32), affine=vol.affine)
    if crop:
        keep = np.nonzero(_beyond(coords, vol.shape, 0.5).mean(axis=(1, 2)) <= 0.5)[0]
        moved_vol = moved_vol.crop((slice(int(keep[0]), int(keep[-1]) + 1), slice(None), slice(None)))
    refs = variant.refs
    ref_vol = Volume.from_sitk(refs.image)  # only its grid is used
    masks = _pull_labels([refs.vertebrae, refs.body, refs.femur_right.astype(np.uint8)], ref_vol, source_mm)
    moved = References(refs.image, masks[0], masks[1], masks[2] > 0)
    return replace(variant, volume=moved_vol, refs=moved, warped=True)


def _shortening(anatomy: Anatomy, level: str, loss: float, limit: float, fractions: dict[str, float]) -> float:
    """Shortening ``D`` (mm) of ``level`` that brings its Genant height loss to ``loss``.

    The smallest ``D`` at which :func:`osteonode.measure.genant.height_loss`
    of the unmodified body's heights, each shortened by the fraction of ``D``
    that its window receives (``fractions``, :func:`_window_fractions`:
    ``Ha - fa D``, ``Hm - fm D``, ``Hp - fp D``; the neighbours' reference
    posterior height unchanged), reaches ``loss`` (bisection: the loss grows
    with ``D``). So a wedge of 30 % leaves ``Ha = 0.7 Hp`` where Genant
    measures them, even if ``Ha`` was larger than ``Hp`` before, or less
    where the middle height, which a wedge lowers by about half as much,
    reaches the loss first; a crush ``Hp - D = (1 - loss) Hp_ref``. Clipped to
    ``0..limit``: 0 for a body already at the loss, ``limit`` when it is not
    reached.
    """
    def after(shortening: float) -> float:
        return _shortened(anatomy.heights[level], fractions, shortening).loss()

    if after(0.0) >= loss:
        return 0.0
    if after(limit) < loss:
        return limit
    low, high = 0.0, limit
    for _ in range(60):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if after(mid) < loss else (low, mid)
    return high


def _shortened(heights: BodyHeights, fractions: dict[str, float], shortening: float) -> BodyHeights:
    """``heights`` with each of Genant's windows shortened by its fraction (``fractions``) of
    ``shortening`` (mm); the neighbours' reference posterior height unchanged."""
    return BodyHeights(heights.anterior_mm - fractions["anterior"] * shortening,
                       heights.middle_mm - fractions["middle"] * shortening,
                       heights.posterior_mm - fractions["posterior"] * shortening, heights.reference_posterior_mm)


def _window_fractions(volume: Volume, anatomy: Anatomy, level: str,
                      local: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> dict[str, float]:
    """Fraction of the shortening that Genant's anterior, middle and posterior windows receive.

    ``local(a, l)`` is the deformity's local shortening per mm of ``D`` at
    anterior and left positions (mm, the body's frame). Evaluated at the
    columns where :func:`osteonode.measure.genant.measurement_windows` measures
    the unmodified body, as that measurement takes them: the median over the
    planes of the median over each window's columns. The wedge's ramp runs
    between the body's extreme voxels, which lie beyond the planes' margins,
    so its anterior window receives less than the whole shortening and its
    posterior window some of it.
    """
    planes = measurement_windows(volume, anatomy.bodies, VERTEBRA_IDS[level])
    if not planes:
        raise ValueError(f"{level}: Genant's windows are not found on the unmodified body")
    return {name: float(np.median([np.median(local(windows[name], np.full(windows[name].shape, offset)))
                                   for offset, windows in planes]))
            for name in ("anterior", "middle", "posterior")}


def _column_extents(h: np.ndarray, a: np.ndarray, lateral: np.ndarray, half_step: float, voxel_mm: float):
    """Bottom and top (mm along ``h``) of every cranio-caudal column of a body, on a ``COLUMN_MM`` grid.

    ``h``, ``a``, ``lateral`` are the body's voxel centres in its frame (mm);
    each extent reaches half a voxel (``half_step``) beyond the outermost
    centres, and is the largest over ``voxel_mm`` (the coarsest voxel
    spacing) around the cell. Columns without a voxel take the nearest
    column's extent, and both maps are smoothed with a Gaussian of
    ``COLUMN_MM`` (the label map steps by a whole slice from column to
    column). Returns ``(bottom, top, column)``: two 2-D maps indexed
    ``(a, lateral)`` and a function ``(a, lateral) -> index`` of the map's
    cell for arrays of points (clipped to the map).
    """
    a0, l0 = a.min(), lateral.min()
    ia = np.floor((a - a0) / COLUMN_MM).astype(int)
    il = np.floor((lateral - l0) / COLUMN_MM).astype(int)
    shape = (int(ia.max()) + 1, int(il.max()) + 1)
    top, bottom = np.full(shape, -np.inf), np.full(shape, np.inf)
    np.maximum.at(top, (ia, il), h)
    np.minimum.at(bottom, (ia, il), h)
    # a cell narrower than a voxel holds the voxels of some slices only: take the extent over one voxel
    reach = int(np.ceil(voxel_mm / COLUMN_MM)) + 1
    top, bottom = ndi.maximum_filter(top, reach, mode="nearest"), ndi.minimum_filter(bottom, reach, mode="nearest")
    nearest = ndi.distance_transform_edt(~np.isfinite(top), return_distances=False, return_indices=True)
    top = ndi.gaussian_filter(top[tuple(nearest)] + half_step, 1.0, mode="nearest")
    bottom = ndi.gaussian_filter(bottom[tuple(nearest)] - half_step, 1.0, mode="nearest")

    def column(pa: np.ndarray, pl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.clip(np.floor((pa - a0) / COLUMN_MM).astype(int), 0, shape[0] - 1),
                np.clip(np.floor((pl - l0) / COLUMN_MM).astype(int), 0, shape[1] - 1))

    return bottom, top, column


def _piecewise(h: np.ndarray, knots_out: list[np.ndarray], knots_src: list[np.ndarray]) -> np.ndarray:
    """Piecewise-linear map of every point's ``h`` through its own increasing knots (output -> source);
    identity outside the first and last knot."""
    src = h.copy()
    for o0, o1, s0, s1 in zip(knots_out[:-1], knots_out[1:], knots_src[:-1], knots_src[1:]):
        seg = (h > o0) & (h <= o1)
        src = np.where(seg, s0 + (h - o0) * (s1 - s0) / np.maximum(o1 - o0, 1e-9), src)
    return src


def deform(variant: Variant, anatomy: Anatomy, level: str, kind: str, loss: float) -> Variant:
    """Deform the body of ``level`` so that its Genant height loss becomes ``loss`` (0..1).

    Coordinates are those of the body in the unmodified CT: ``h`` along the
    spine axis (superior, through the neighbouring centroids), ``a``
    anterior, ``l`` left, from the body centroid; ``hb..ht`` is the body's
    extent along ``h`` (``H = ht - hb``), ``D`` its anterior-posterior depth.
    Every point moves only along the spine axis, and the body is shortened
    where a fracture shortens it, in its trabecular interior: the
    ``ENDPLATE_MM`` inside each end of the extent (the endplate and the
    partial-volume blur of its edge on thick slices) and the same outside it
    move rigidly, so that an endplate edge keeps its sharpness and moves by
    exactly the shortening asked. (Compressing or stretching a 3 mm image
    across an endplate would widen or narrow the blur of its edge and move
    the measured edge by up to 2 mm, a third of a Genant grade; so would a
    smoothed displacement field.) With the shortening ``S``
    (:func:`_shortening`, mm, from the heights of the unmodified body and the
    fraction of ``S`` that each of Genant's windows receives,
    :func:`_window_fractions`, so that e.g. a wedge of 30 % leaves ``Ha = 0.7
    Hp`` where Genant measures them, even if ``Ha`` was larger than ``Hp``
    before):

    * ``wedge``: the local shortening is ``S`` at and in front of 10 % of ``D``
      behind the anterior margin, 0 at and behind 10 % of ``D`` in front of
      the posterior margin, linear in between; the interior
      ``hb + E..ht - E`` is compressed to ``hb + E..ht - E - s(a)`` and all
      that lies above moves down by ``s(a)``;
    * ``crush``: the same with ``S`` everywhere;
    * ``biconcave``: both endplates sink towards mid-height by ``s(r) / 2``,
      ``s(r) = S`` at the centre of the body's axial footprint, falling
      (cosine) to 0 at 65 % of the way to its margin (the anterior and
      posterior height windows are untouched); the interior is compressed and
      the disc spaces over ``S / 2 + E + 4`` mm beyond each endplate are
      stretched into the dent; nothing else moves.

    Slices at either end of the array (axis 0) that would be filled mostly
    from outside the original field of view are cropped (they would show a
    vertebra cut by air inside the scan); the reference masks keep their grid.

    Parameters
    ----------
    variant : Variant
        Not yet warped (density edits and islands come first).
    anatomy : Anatomy
        Of the unmodified CT (bodies and their heights).
    level : str
        The level to deform, e.g. ``"L1"``; it needs a body in ``anatomy``.
    kind : str
        ``"wedge"``, ``"biconcave"`` or ``"crush"``.
    loss : float
        Genant height loss to reach, 0..1 (0.3 = 30 %).

    Returns
    -------
    Variant
        Image resampled (linear), possibly with fewer slices; reference masks
        resampled on their grid (:func:`_pull_labels`). Truth ``deformity = {"level",
        "kind", "loss", "shortening_mm", "sized_for"}`` (``sized_for``: the
        :class:`BodyHeights` the deformity was sized to leave, those of the
        unmodified body shortened as its windows receive the field) and ``expected_grade`` of that level
        ``= genant_grade(loss)`` (Genant 1993: < 20 % 0, 20-25 % 1, 25-40 %
        2, > 40 % 3).

    Raises
    ------
    ValueError
        If ``kind`` is not one of ``DEFORMITIES``, ``loss`` not in (0, 1), or
        Genant's windows are not found on the unmodified body.
    """
    if kind not in DEFORMITIES or not 0.0 < loss < 1.0:
        raise ValueError(f"bad deformity {kind!r} {loss}")
    _check_unwarped(variant, "deform")
    vol = variant.volume
    centre, up, ant, left = _spine_frame(vol, anatomy, level)
    rel = _points_mm(vol)[anatomy.bodies == VERTEBRA_IDS[level]] - centre
    half_step = 0.5 * float(np.abs(vol.affine[:3, :3].T @ up).max())
    a_post, a_ant = (rel @ ant).min(), (rel @ ant).max()
    l_half = 0.5 * ((rel @ left).max() - (rel @ left).min())
    depth, rigid = a_ant - a_post, ENDPLATE_MM
    bottom, top, column = _column_extents(rel @ up, rel @ ant, rel @ left, half_step, max(vol.spacing))

    def local(a: np.ndarray, lateral: np.ndarray) -> np.ndarray:
        """Local shortening per mm of the shortening (the whole height loss, both endplates)."""
        if kind == "crush":
            return np.ones_like(a)
        if kind == "wedge":
            return np.clip((a - (a_post + 0.1 * depth)) / (0.8 * depth), 0.0, 1.0)
        r = np.hypot((a - 0.5 * (a_post + a_ant)) / (depth / 2), lateral / l_half)
        return 0.5 * (1.0 + np.cos(np.pi * np.clip((r - 0.15) / 0.5, 0.0, 1.0)))

    # the interior of a typical column keeps at least MIN_INTERIOR_MM
    fractions = _window_fractions(vol, anatomy, level, local)
    shortening = _shortening(anatomy, level, loss,
                             limit=float(np.median(top - bottom)) - 2 * rigid - MIN_INTERIOR_MM, fractions=fractions)

    def source(points: np.ndarray, spacing) -> np.ndarray:
        p = points - centre
        h, a = p @ up, p @ ant
        where = column(a, p @ left)
        hb, ht = bottom[where], top[where]
        s = shortening * local(a, p @ left)
        if kind == "biconcave":
            dent = s / 2
            band = shortening / 2 + rigid + 4.0
            out = [hb - band, hb + dent - rigid, hb + dent + rigid, ht - dent - rigid, ht - dent + rigid, ht + band]
            src = [hb - band, hb - rigid, hb + rigid, ht - rigid, ht + rigid, ht + band]
        else:
            # below hb + E unmoved; above ht - E - s down by s; the interior between compressed
            far = float(np.abs(h).max() + np.abs(top).max() + 1.0)
            out = [hb + rigid, ht - rigid - s, np.full_like(h, far)]
            src = [hb + rigid, ht - rigid, far + s]
        new_h = _piecewise(h, [np.broadcast_to(k, h.shape) for k in out], [np.broadcast_to(k, h.shape) for k in src])
        return points + (new_h - h)[..., None] * up

    moved = _resample(variant, source, crop=True)
    grades = {**variant.truth["expected_grade"], level: genant_grade(loss)}
    return replace(moved, truth=_truth(variant, deformity={"level": level, "kind": kind, "loss": loss,
                                                           "shortening_mm": round(shortening, 2),
                                                           "sized_for": _shortened(anatomy.heights[level], fractions,
                                                                                   shortening)},
                                       expected_grade=grades))


def spine_centre(volume: Volume, anatomy: Anatomy) -> np.ndarray:
    """Centroid (LPS mm) of the L1-L4 bodies of ``anatomy`` (all its bodies when L1-L4 are missing)."""
    ids = [VERTEBRA_IDS[n] for n in ("L1", "L2", "L3", "L4")]
    mask = np.isin(anatomy.bodies, ids)
    return _centre_mm(volume, mask if mask.any() else anatomy.bodies > 0)


def transform(variant: Variant, anatomy: Anatomy, scale: float = 1.0, tilt_lr_deg: float = 0.0,
              tilt_ap_deg: float = 0.0) -> Variant:
    """Scale the anatomy and rotate it about the spine centre (L1-L4 centroid of the unmodified CT).

    The rotation about the left-right axis is applied first, then the one
    about the anterior-posterior axis, then the scaling (all about the same
    centre). The image is resampled linearly on its own grid (``-1024`` HU
    where the content comes from outside the field of view), the reference
    masks on theirs (:func:`_pull_labels`).

    Parameters
    ----------
    variant : Variant
        Any variant (density edits must come before).
    anatomy : Anatomy
        Of the unmodified CT (for the centre).
    scale : float
        Isotropic scale of the patient; > 1 enlarges.
    tilt_lr_deg : float
        Rotation about the left-right axis, degrees (sagittal tilt; positive
        turns the superior end towards anterior).
    tilt_ap_deg : float
        Rotation about the anterior-posterior axis, degrees (coronal tilt;
        positive turns the superior end towards patient left).

    Returns
    -------
    Variant
        Truth unchanged (no density change; grades stay 0).
    """
    centre = spine_centre(variant.volume, anatomy)
    # forward map p -> centre + scale * R (p - centre); superior (z) towards anterior (-y) about x, towards left (+x)
    tx, ty = math.radians(tilt_lr_deg), math.radians(tilt_ap_deg)
    rot_x = np.array([[1, 0, 0], [0, math.cos(tx), -math.sin(tx)], [0, math.sin(tx), math.cos(tx)]])
    rot_y = np.array([[math.cos(ty), 0, math.sin(ty)], [0, 1, 0], [-math.sin(ty), 0, math.cos(ty)]])
    inverse = np.linalg.inv(scale * rot_y @ rot_x)

    def source(points: np.ndarray, spacing) -> np.ndarray:
        return (points - centre) @ inverse.T + centre

    return _resample(variant, source)


def add_noise(variant: Variant, sigma: float, seed: int = 0) -> Variant:
    """Add white Gaussian noise (numpy ``default_rng(seed)``, so the same seed gives the same noise).

    Parameters
    ----------
    variant : Variant
        Any variant; noise is the last edit of a chain (acquisition).
    sigma : float
        Standard deviation, HU.
    seed : int
        Random seed.

    Returns
    -------
    Variant
        Truth ``noise_sigma``: the root sum of squares of all noise added.
    """
    rng = np.random.default_rng(seed)
    hu = variant.volume.hu + rng.normal(0.0, sigma, variant.volume.shape).astype(np.float32)
    return replace(variant, volume=Volume(hu=hu, affine=variant.volume.affine),
                   truth=_truth(variant, noise_sigma=float(np.hypot(variant.truth["noise_sigma"], sigma))))


def store_example(volume: Volume, bodies: np.ndarray) -> None:
    """Write ``bodies`` (``(z, y, x)`` VerSe IDs on ``volume``'s grid) and their heights, measured by this
    code, to ``EXAMPLE_BODIES``."""
    heights = BodyHeights.measured(grade_label_map(volume, bodies))
    EXAMPLE_BODIES.parent.mkdir(exist_ok=True)
    np.savez_compressed(EXAMPLE_BODIES, bodies=bodies, affine=volume.affine,
                        height_levels=np.array(list(heights)),
                        heights_mm=np.array([[h.anterior_mm, h.middle_mm, h.posterior_mm,
                                              math.nan if h.reference_posterior_mm is None
                                              else h.reference_posterior_mm] for h in heights.values()]))


def main(argv: list[str] | None = None) -> int:
    """``--store-example-bodies``: segment the example CT and write ``EXAMPLE_BODIES``;
    ``--store-example-heights``: measure the stored bodies again and write their heights."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    store = parser.add_mutually_exclusive_group(required=True)
    store.add_argument("--store-example-bodies", action="store_true",
                       help=f"segment the example CT with this code and write the bodies and their heights to "
                            f"{EXAMPLE_BODIES}")
    store.add_argument("--store-example-heights", action="store_true",
                       help=f"measure the heights of the bodies stored in {EXAMPLE_BODIES} with this code and "
                            "write them there")
    args = parser.parse_args(argv)
    volume = Volume.from_sitk(example_image())
    if args.store_example_bodies:
        bodies = builtin(volume).bodies
    else:
        bodies = _stored_example(volume)["bodies"]
    store_example(volume, bodies)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
