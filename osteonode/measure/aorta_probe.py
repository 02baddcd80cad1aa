"""Aortic attenuation of a series before any analysis: the contrast phase for the series ranking.

The ranking of a study's series (:mod:`osteonode.series`) puts non-contrast
series first. When the Series Description names no phase, the phase comes
from the median HU of the aortic lumen (bands of
:func:`osteonode.measure.contrast.classify_phase`), measured here on a coarse
copy of a subset of the slices, without the spine segmentation:

1. of the middle ``PROBE_EXTENT_MM`` of the series, one slice every
   ``PROBE_SLICE_MM`` is read at about 2 mm pixels (:func:`read_probe_volume`),
   and the column of vertebral bodies is tracked on its 2 mm canonical copy
   (:func:`osteonode.segment.frame.canonical_view`,
   :func:`osteonode.segment.column.track_column`: the body with the
   bone-ringed spinal canal behind it, whatever the contrast);
2. on every other 2 mm slice where the column is found, homogeneous discs
   (``LUMEN_RADIUS_MM``, SD at most ``MAX_LUMEN_SD_HU``, no voxel in or on
   them above ``BONE_HU``: bone, calcium) in the window where the aorta lies
   (``WINDOW_ANTERIOR_MM``, ``WINDOW_LEFT_MM`` from the body centre: in front
   and slightly left in the abdomen, left of the body in the thorax) are tried
   densest first (:func:`_slice_lumen`). A disc denser than
   ``NON_CONTRAST_MAX_HU`` is an enhanced lumen when the region of its HU
   around it is round and ``LUMEN_DIAMETER_MM`` across, with no bone on its
   rim, and is not part of the vertebral body (whose trabecular bone is as
   homogeneous as blood: a region touching the bone connected to the body
   centre along a quarter of its rim or more is the body). When the first
   disc below ``NON_CONTRAST_MAX_HU`` is reached and every denser region
   tried was the body's bone, the slice shows no enhanced vessel ("plain");
   any other denser region (bowel with oral contrast, vessels merged with each
   other, a round lumen on the body denser than its trabecular core) leaves
   the slice undecided;
3. the aorta is a vertical tube: enhanced lumens that agree in position
   (``TUBE_TOLERANCE_MM``) and HU on at least ``MIN_TUBE_SLICES`` slices
   spanning ``MIN_TUBE_LENGTH_MM`` give the result, their median HU. Without
   such a tube, a series whose column slices are "plain" for at least
   ``PLAIN_FRACTION`` of them (and ``MIN_PLAIN_SLICES``) is not enhanced (the
   median of the plain slices' densest disc, an upper bound of blood, is
   reported). Otherwise (no column, no tube, too few plain slices) the probe
   returns None: the ranking then uses the description only, never a guess.

Validation (``bench/aorta_probe.py``, figures in ``bench/README.md``): the
non-contrast example CT and copies with its aortic lumen raised to delayed,
portal-venous and arterial HU, with noise, oral contrast or wall calcium
added; two real contrast CTs (a thoracic CTA crop, a T11-T12 JPEG 2000 series).

The analysis measures the aorta again beside its segmented spine
(:mod:`osteonode.measure.tissues`); this probe is only for the ranking.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut
from scipy import ndimage as ndi

from osteonode.errors import NotEvaluable
from osteonode.measure.contrast import NON_CONTRAST_MAX_HU as CONTRAST_NON_CONTRAST_MAX_HU
from osteonode.segment.column import track_column
from osteonode.segment.frame import COARSE_MM, canonical_view
from osteonode.volume import Volume, load_series

log = logging.getLogger(__name__)

#: Spacing (mm) of the slices read for the probe.
PROBE_SLICE_MM = 4.0
#: Cranio-caudal extent (mm) read for the probe: the middle of the series.
PROBE_EXTENT_MM = 240.0
_PLANE_TAGS = ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "NumberOfFrames"]
#: Radius (mm) of the disc whose mean is the lumen HU on one slice.
LUMEN_RADIUS_MM = 5.0
#: Bone or calcium (HU, 2 mm copy): a disc holding or touching it is not lumen.
BONE_HU = 600.0
#: Largest standard deviation (HU) inside a lumen disc on the 2 mm copy.
MAX_LUMEN_SD_HU = 30.0
#: Window of the aortic centre relative to the vertebral body centre (mm): anterior and left ranges.
WINDOW_ANTERIOR_MM = (-5.0, 65.0)
WINDOW_LEFT_MM = (-12.0, 50.0)
#: A lumen centre lies at least this far (mm) from the body centre.
MIN_BODY_DISTANCE_MM = 18.0
#: Below this aortic HU the series is not enhanced (:data:`osteonode.measure.contrast.NON_CONTRAST_MAX_HU`).
NON_CONTRAST_MAX_HU = CONTRAST_NON_CONTRAST_MAX_HU
#: Equivalent diameter (mm) of an aortic lumen.
LUMEN_DIAMETER_MM = (12.0, 36.0)
#: A lumen region reaching this close (mm) to the tracked body centre is the vertebral body.
BODY_CORE_MM = 10.0
#: A region whose rim lies on the vertebral body for this fraction or more is bone.
BODY_RIM_FRACTION = 0.25
#: A lumen-shaped region on the body within this many HU of the body's core HU is taken for the body's bone.
BONE_LIKE_HU = 60.0
#: Regions tried per slice, densest first.
MAX_TRIES = 6
#: Without an enhanced tube: at least this many column slices, and this fraction of them, must show no
#: enhanced vessel (the densest homogeneous non-bone disc of the window below ``NON_CONTRAST_MAX_HU``).
MIN_PLAIN_SLICES = 8
PLAIN_FRACTION = 0.75
#: Disc centres of one tube agree within this distance (mm, in-plane).
TUBE_TOLERANCE_MM = 8.0
MIN_TUBE_SLICES = 4
MIN_TUBE_LENGTH_MM = 24.0


@dataclass(frozen=True)
class AortaProbe:
    """The aortic lumen found by :func:`probe_aorta`.

    Attributes
    ----------
    hu : float
        Median over the tube's slices of the lumen disc mean, HU.
    slices : int
        Number of slices of the tube.
    length_mm : float
        Cranio-caudal extent of the tube, mm.
    enhanced : bool
        True when an enhanced lumen (a tube denser than ``NON_CONTRAST_MAX_HU``)
        was found; False when no slice showed one: ``hu`` is then the median
        of the densest homogeneous non-bone disc of the window per slice, an
        upper bound of the unenhanced aorta.
    """

    hu: float
    slices: int
    length_mm: float
    enhanced: bool


def probe_aorta_hu(files: Sequence[Path]) -> AortaProbe | None:
    """Measure the aortic attenuation of a CT series from a subset of its slices.

    Parameters
    ----------
    files : sequence of pathlib.Path
        The series' PS3.10 files (single-frame CT Image Storage, or Enhanced
        CT: then the whole multi-frame volume is loaded).

    Returns
    -------
    AortaProbe or None
        None when the series cannot be read as a stack of slices, or the
        vertebral column or the aorta is not found with confidence (module
        docstring).
    """
    try:
        volume = read_probe_volume(files)
    except NotEvaluable as exc:
        log.info("aorta probe: series not readable (%s)", exc)
        return None
    return probe_aorta(volume) if volume is not None else None


def read_probe_volume(files: Sequence[Path]) -> Volume | None:
    """A coarse volume of a subset of a single-frame series' slices, for the probe.

    Every header is read (no pixel data) to order the slices along their
    normal; of the central ``PROBE_EXTENT_MM``, one slice every
    ``PROBE_SLICE_MM`` is read, and its pixels block-averaged to about
    ``COARSE_MM`` (unlike :func:`osteonode.volume.load_series`, which reads
    every slice at full resolution). A multi-frame series is loaded whole.

    Parameters
    ----------
    files : sequence of pathlib.Path
        The series' PS3.10 files.

    Returns
    -------
    Volume or None
        ``(z, y, x)`` HU with its affine; None when fewer than 4 slices.

    Raises
    ------
    NotEvaluable
        A header lacks Image Plane attributes, or the pixel data cannot be
        decoded.
    """
    try:
        headers = [pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_PLANE_TAGS) for path in files]
        if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in headers):
            return load_series(files).volume
        orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient])
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
        pixel_mm = np.array([float(v) for v in headers[0].PixelSpacing])
    except (AttributeError, ValueError, TypeError) as exc:
        raise NotEvaluable(f"a slice lacks usable Image Plane attributes ({type(exc).__name__})") from exc
    row, col = orientation[:3], orientation[3:6]
    depth = positions @ np.cross(row, col)
    order = np.argsort(depth)
    if len(order) < 4:
        return None
    spacing = (depth[order[-1]] - depth[order[0]]) / (len(order) - 1)
    if spacing <= 0:
        return None
    keep = int(min(len(order), PROBE_EXTENT_MM / spacing + 1))
    first = (len(order) - keep) // 2
    step = max(1, int(round(PROBE_SLICE_MM / spacing)))
    chosen = order[first:first + keep:step]
    k = np.maximum(1, np.floor(COARSE_MM / pixel_mm).astype(int))  # in-plane block (rows, columns)
    slices = []
    try:
        for i in chosen:
            ds = pydicom.dcmread(files[i])
            hu = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
            n = (hu.shape[0] // k[0] * k[0], hu.shape[1] // k[1] * k[1])
            slices.append(hu[:n[0], :n[1]].reshape(n[0] // k[0], k[0], n[1] // k[1], k[1]).mean(axis=(1, 3)))
        stack = np.stack(slices)  # ValueError when the slices differ in size
    except (AttributeError, ValueError, RuntimeError, OSError) as exc:
        raise NotEvaluable(f"the pixel data cannot be read as one stack ({type(exc).__name__})") from exc
    affine = np.eye(4)
    affine[:3, 0] = (positions[chosen[-1]] - positions[chosen[0]]) / max(1, len(chosen) - 1)
    affine[:3, 1] = col * pixel_mm[0] * k[0]  # rows advance along the column direction cosine
    affine[:3, 2] = row * pixel_mm[1] * k[1]
    affine[:3, 3] = positions[chosen[0]] + (k[0] - 1) / 2 * col * pixel_mm[0] + (k[1] - 1) / 2 * row * pixel_mm[1]
    return Volume(hu=stack, affine=affine)


def probe_aorta(volume: Volume) -> AortaProbe | None:
    """Find the aortic lumen beside the vertebral column of ``volume`` and measure it.

    Parameters
    ----------
    volume : Volume
        ``hu`` ``(z, y, x)`` in HU; any orientation, any slice spacing.

    Returns
    -------
    AortaProbe or None
        See the module docstring.
    """
    if min(volume.shape) < 2:
        return None
    view = canonical_view(volume)
    coarse, grid_mm = view.coarse, COARSE_MM
    path, valid = track_column(coarse, view.patient, grid_mm)
    column = np.nonzero(valid)[0][::max(1, int(round(PROBE_SLICE_MM / grid_mm)))]
    vessels, plain = [], []  # (s mm, a mm, l mm, HU) of enhanced lumens; HU of slices without one
    for s in column:
        kind, found = _slice_lumen(coarse[s], path[s], grid_mm)
        if kind == "vessel":
            vessels.append((s * grid_mm, *found))
        elif kind == "plain":
            plain.append(found[2])
    tube = _tube(np.array(vessels).reshape(-1, 4))
    if tube is not None:
        result = AortaProbe(hu=round(float(np.median(tube[:, 3])), 1), slices=len(tube),
                            length_mm=float(tube[:, 0].max() - tube[:, 0].min()), enhanced=True)
    elif len(plain) >= MIN_PLAIN_SLICES and len(plain) >= PLAIN_FRACTION * len(column):
        result = AortaProbe(hu=round(float(np.median(plain)), 1), slices=len(plain),
                            length_mm=float(np.ptp(column) * grid_mm), enhanced=False)
    else:
        log.info("aorta probe: not confident (%d column slices: %d with an enhanced lumen, %d without)",
                 len(column), len(vessels), len(plain))
        return None
    log.info("aorta probe: %.0f HU (%s, %d slices over %.0f mm)", result.hu,
             "enhanced lumen" if result.enhanced else "no enhanced vessel beside the spine",
             result.slices, result.length_mm)
    return result


def _disc(radius_mm: float, grid_mm: float) -> np.ndarray:
    r = radius_mm / grid_mm
    n = int(np.ceil(r))
    yy, xx = np.mgrid[-n:n + 1, -n:n + 1]
    return (yy ** 2 + xx ** 2) <= r * r + 1e-6


def _slice_lumen(sl: np.ndarray, centre: np.ndarray, grid_mm: float) -> tuple[str, tuple[float, float, float]]:
    """What one coarse ``(a, l)`` slice shows in the aortic window.

    Homogeneous discs are tried densest first. Returns ``("vessel", (a mm,
    l mm, HU))`` for an enhanced lumen (a compact, round, homogeneous region
    denser than ``NON_CONTRAST_MAX_HU``, apart from the vertebral body);
    ``("plain", (a, l, HU))`` when every denser region tried before the first
    disc below that was the body's bone (no enhanced vessel); else
    ``("none", ...)`` (doubt: a dense region off the body that is no lumen,
    or a lumen against the body denser than its trabecular core). Works on a
    crop: the window and ``LUMEN_DIAMETER_MM`` around it.
    """
    margin = LUMEN_DIAMETER_MM[1]
    low = np.maximum(0, np.floor(centre + np.array([WINDOW_ANTERIOR_MM[0], WINDOW_LEFT_MM[0]]) / grid_mm
                                 - margin / grid_mm).astype(int))
    high = np.ceil(centre + np.array([WINDOW_ANTERIOR_MM[1], WINDOW_LEFT_MM[1]]) / grid_mm
                   + margin / grid_mm).astype(int) + 1
    sl = sl[low[0]:high[0], low[1]:high[1]]
    centre = centre - low
    disc = _disc(LUMEN_RADIUS_MM, grid_mm)
    weights = disc / disc.sum()
    mean = ndi.correlate(sl, weights, mode="nearest")
    sd = np.sqrt(np.maximum(ndi.correlate(sl * sl, weights, mode="nearest") - mean * mean, 0.0))
    touch = ndi.maximum_filter(sl, footprint=_disc(LUMEN_RADIUS_MM + grid_mm, grid_mm), mode="nearest")
    rows, cols = np.mgrid[0:sl.shape[0], 0:sl.shape[1]]
    da, dl = (rows - centre[0]) * grid_mm, (cols - centre[1]) * grid_mm
    window = ((da >= WINDOW_ANTERIOR_MM[0]) & (da <= WINDOW_ANTERIOR_MM[1]) & (dl >= WINDOW_LEFT_MM[0])
              & (dl <= WINDOW_LEFT_MM[1]) & (np.hypot(da, dl) >= MIN_BODY_DISTANCE_MM))
    score = np.where(window & (sd <= MAX_LUMEN_SD_HU) & (touch < BONE_HU) & (mean > -20.0), mean - sd, -np.inf)
    body_near = np.hypot(da, dl) <= BODY_CORE_MM
    core_hu = float(np.median(sl[body_near]))
    doubt = False  # a dense structure in the window that is neither a lumen apart from the body nor the body's bone
    for _ in range(MAX_TRIES):
        best = tuple(int(i) for i in np.unravel_index(int(np.argmax(score)), score.shape))
        if not np.isfinite(score[best]):
            break
        hit = (float((best[0] + low[0]) * grid_mm), float((best[1] + low[1]) * grid_mm), float(mean[best]))
        if mean[best] < NON_CONTRAST_MAX_HU:
            return ("none" if doubt else "plain"), hit
        region, lumen = _region(sl, best, float(mean[best]), grid_mm)
        on_body = bool((region & body_near).any()) or _on_body(sl, region, body_near)
        if lumen and not on_body:
            return "vessel", hit
        # off the body (bowel with oral contrast, vessels merged with each other), or a lumen against the body
        # denser than its trabecular bone (an aorta lying on the spine): the slice cannot say "not enhanced"
        doubt |= not on_body or (lumen and abs(float(mean[best]) - core_hu) > BONE_LIKE_HU)
        score[region] = -np.inf
    return "none", (0.0, 0.0, 0.0)


def _on_body(sl: np.ndarray, region: np.ndarray, body_near: np.ndarray) -> bool:
    """True when ``region`` is part of the vertebral body: a quarter or more of its rim is body.

    The body is the bone (> ``NON_CONTRAST_MAX_HU``) connected, without
    ``region``, to the tracked body centre. A bright endplate or the anterior
    part of a body is a compact homogeneous region too, but the rest of the
    body lies all along its posterior side; an aorta touches the body at most
    along a short arc.
    """
    labels, _ = ndi.label((sl > NON_CONTRAST_MAX_HU) & ~region)
    core = np.unique(labels[body_near & (labels > 0)])
    if core.size == 0:
        return False
    body = np.isin(labels, core)
    rim = ndi.binary_dilation(region, iterations=1) & ~region
    return float(body[rim].mean()) >= BODY_RIM_FRACTION


def _near(point: tuple[int, ...], shape: tuple[int, ...], radius: float) -> np.ndarray:
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    return np.hypot(rows - point[0], cols - point[1]) <= radius


def _region(sl: np.ndarray, seed: tuple[int, ...], hu: float, grid_mm: float) -> tuple[np.ndarray, bool]:
    """The region of about ``hu`` HU around ``seed``, and whether it is a lumen.

    The region is the pixels within ``max(40, 0.2 hu)`` HU of ``hu`` connected
    to the seed, opened with a 3 x 3 square (thin bridges to touching
    structures cut). A lumen is ``LUMEN_DIAMETER_MM`` across (equivalent
    diameter), fills at least half of the circle through its farthest pixel
    from its centroid, and at most a tenth of its rim (2 pixels wide) is bone
    or calcium (> ``BONE_HU``).
    """
    similar = ndi.binary_opening(np.abs(sl - hu) <= max(40.0, 0.2 * hu), structure=np.ones((3, 3), bool))
    labels, _ = ndi.label(similar)
    if not labels[seed]:
        return _near(seed, sl.shape, LUMEN_RADIUS_MM / grid_mm), False
    region = labels == labels[seed]
    points = np.argwhere(region)
    area_mm2 = len(points) * grid_mm * grid_mm
    diameter = 2.0 * np.sqrt(area_mm2 / np.pi)
    reach_mm = float(np.hypot(*(points - points.mean(axis=0)).T).max()) * grid_mm + grid_mm / 2.0
    rim = ndi.binary_dilation(region, iterations=2) & ~region
    lumen = (LUMEN_DIAMETER_MM[0] <= diameter <= LUMEN_DIAMETER_MM[1] and area_mm2 >= 0.5 * np.pi * reach_mm ** 2
             and float((sl[rim] > BONE_HU).mean()) <= 0.1)
    return region, lumen


def _tube(found: np.ndarray) -> np.ndarray | None:
    """The largest set of per-slice lumens ``(s, a, l, HU)`` (mm) that agree in position and HU, if long enough."""
    if len(found) < MIN_TUBE_SLICES:
        return None
    dist = np.hypot(found[:, 1, None] - found[None, :, 1], found[:, 2, None] - found[None, :, 2])
    hu = found[:, 3]
    near = (dist <= TUBE_TOLERANCE_MM) & (np.abs(hu[:, None] - hu[None, :]) <= np.maximum(30.0, 0.2 * hu[:, None]))
    tube = found[near[int(np.argmax(near.sum(axis=1)))]]
    if len(tube) < MIN_TUBE_SLICES or tube[:, 0].max() - tube[:, 0].min() < MIN_TUBE_LENGTH_MM:
        return None
    return tube
