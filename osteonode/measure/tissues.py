"""Reference tissues found automatically beside the lumbar spine: air, fat, muscle, blood.

Internal (phantomless) calibration and contrast detection need the CT numbers
of tissues whose attenuation is known: air outside the body, subcutaneous
adipose tissue, paraspinal (erector spinae) muscle and aortic blood. All of
them are measured on the axial slices through the centres of the segmented
vertebral bodies (T12-L5), relative to each body's centre in patient space
(DICOM LPS, mm), so that any slice order, row/column mirroring and in-plane
orientation is handled by the affine alone.

Tissue windows are the conventional CT body-composition ranges (adipose
-190..-30 HU, skeletal muscle -29..+150 HU; Mitsiopoulos N et al., J Appl
Physiol 1998;85:115-122), applied to a 3x3 box mean so that noise tails are
not cut unevenly; each reference value is the median of the raw HU so selected,
robust to the partial-volume voxels at tissue borders. Blood is the median over
levels of the aortic lumen's mean HU, measured on slices whose noise is
independent of the ones the lumen was found on (:func:`_aorta`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from osteonode.anatomy import VERTEBRA_IDS, VERTEBRA_NAMES
from osteonode.segment import SpineSegmentation
from osteonode.volume import Volume

log = logging.getLogger(__name__)

#: Half-height (mm) of the slab of axial slices the aortic lumen is found and measured on.
SLAB_MM = 12.0
#: Levels whose axial mid-slices are searched (bodies of the lower thoracolumbar spine).
SEARCH_LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5")
#: Levels at which the abdominal aorta lies in front of the spine (it bifurcates at about L4).
AORTA_LEVELS = ("T12", "L1", "L2", "L3")
ADIPOSE_HU = (-190.0, -30.0)
MUSCLE_HU = (-29.0, 150.0)
#: Fewer voxels than this and a tissue is not reported.
MIN_TISSUE_VOXELS = 20


@dataclass(frozen=True)
class ReferenceTissues:
    """Median CT numbers of the reference tissues of one volume.

    Attributes
    ----------
    hu : dict[str, float]
        Tissue (``"air"``, ``"adipose"``, ``"muscle"``, ``"blood"``) -> median HU;
        a tissue that could not be found is absent.
    voxel_count : dict[str, int]
        Tissue -> number of voxels (for blood: of the sampled aortic lumen discs).
    aorta_points_mm : numpy.ndarray
        ``(n, 3)`` LPS positions (mm) of the aortic lumen centre found on each
        searched slice.
    """

    hu: dict[str, float]
    voxel_count: dict[str, int] = field(default_factory=dict)
    aorta_points_mm: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))


def body_centres_mm(volume: Volume, labels: np.ndarray) -> dict[int, np.ndarray]:
    """Centroid (LPS, mm) of every labelled vertebral body in a ``(z, y, x)`` label map."""
    flat = np.flatnonzero(labels)  # one pass over the volume; the sums below touch labelled voxels only
    index = np.unravel_index(flat, labels.shape)
    values = labels.reshape(-1)[flat].astype(np.intp)
    counts = np.bincount(values, minlength=256)
    sums = [np.bincount(values, weights=axis, minlength=256) for axis in index]
    ids = [vid for vid in VERTEBRA_NAMES if counts[vid]]
    return {vid: volume.index_to_lps([axis_sum[vid] / counts[vid] for axis_sum in sums]) for vid in ids}


def _axial_axis(volume: Volume) -> int:
    """The array axis closest to the patient's superior-inferior direction."""
    return int(np.argmax([abs(volume.index_direction(a)[2]) for a in range(3)]))


@dataclass(frozen=True)
class _Slice:
    """One axial slice: HU, the body mask, LPS coordinates of every pixel relative to a centre."""

    hu: np.ndarray  # (rows, cols)
    bodies: np.ndarray  # (rows, cols) vertebral body labels
    patient: np.ndarray  # (rows, cols) bool, holes filled
    rel_mm: np.ndarray  # (rows, cols, 3) LPS offset from the body centre
    pixel_mm: tuple[float, float]
    slab: np.ndarray  # (n, rows, cols) HU of the slices within SLAB_MM of this one (those in the volume)
    slab_offsets: np.ndarray  # (n,) their index offsets from this slice (0 = this slice)


def _slice_at(volume: Volume, labels: np.ndarray, centre: np.ndarray) -> _Slice:
    axis = _axial_axis(volume)
    k = int(np.clip(round(float(volume.lps_to_index(centre)[axis])), 0, volume.shape[axis] - 1))
    take: list[int | slice] = [slice(None)] * 3
    take[axis] = k
    hu = volume.hu[tuple(take)]
    in_plane = [a for a in range(3) if a != axis]
    pixels = np.stack(np.meshgrid(*[np.arange(n) for n in hu.shape], indexing="ij"), axis=-1)  # (rows, cols, 2)
    rel = volume.index_to_lps(np.insert(pixels, axis, k, axis=-1)) - centre  # (rows, cols, 3)
    lab, n = ndi.label(hu > -500.0)
    patient = np.zeros(hu.shape, bool)
    if n:
        patient = ndi.binary_fill_holes(lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:])))
    spacing = volume.spacing
    bodies = labels[tuple(take)]
    reach = max(1, int(round(SLAB_MM / volume.spacing[axis])))
    offsets = np.arange(max(-reach, -k), min(reach, volume.shape[axis] - 1 - k) + 1)
    take[axis] = slice(k + int(offsets[0]), k + int(offsets[-1]) + 1)
    slab = np.moveaxis(volume.hu[tuple(take)], axis, 0)
    return _Slice(hu=hu, bodies=bodies, patient=patient, rel_mm=rel,
                  pixel_mm=(spacing[in_plane[0]], spacing[in_plane[1]]), slab=slab, slab_offsets=offsets)


def _box_size(size_mm: float, pixel_mm: tuple[float, float]) -> list[int]:
    """Odd side lengths (pixels) of a square of about ``size_mm`` mm."""
    return [max(1, int(round(size_mm / p))) | 1 for p in pixel_mm]


def _box(values: np.ndarray, size_mm: float, pixel_mm: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and SD in a ``size_mm`` square around every pixel."""
    size = _box_size(size_mm, pixel_mm)
    mean = ndi.uniform_filter(values.astype(np.float64), size=size, mode="nearest")
    sq = ndi.uniform_filter(values.astype(np.float64) ** 2, size=size, mode="nearest")
    return mean, np.sqrt(np.maximum(sq - mean ** 2, 0.0))


def _aorta(sl: _Slice) -> tuple[float, np.ndarray, int] | None:
    """Aortic lumen on one slice: (mean HU in a 9 mm square, offset from the body centre, pixels).

    The abdominal aorta lies anterior and slightly left of the vertebral body,
    the inferior vena cava anterior and to the right: the search region is
    15-55 mm anterior to the body centre, from 5 mm right to 35 mm left of
    it. The lumen is the most homogeneous, dense region there (highest box
    mean minus twice the box SD), outside the dilated body:
    unenhanced blood (30-50 HU) is denser than fat and more homogeneous than
    bowel; enhanced blood is the densest soft tissue.

    The aorta runs cranio-caudally, so the slices within ``SLAB_MM`` above and
    below show the same lumen: the square is chosen on the mean of every other
    one of them (offsets 0, +-2, ...) and its HU are the mean of the same square
    on the slices in between (offsets +-1, +-3, ...), whose noise is independent
    of the choice. Measured where it was chosen, the maximum picks positive
    noise (SD 35 HU noise on the 3 mm example CT: 47-61 HU instead of 45.8).
    """
    anterior, left = -sl.rel_mm[..., 1], sl.rel_mm[..., 0]
    region = (anterior >= 15.0) & (anterior <= 55.0) & (left >= -5.0) & (left <= 35.0) & sl.patient
    bone = ndi.binary_dilation(sl.bodies > 0, iterations=max(1, int(round(4.0 / min(sl.pixel_mm)))))
    region &= ~bone
    if not region.any():
        return None
    clipped = np.clip(sl.slab, -200.0, 800.0)
    chooser, measured = clipped[sl.slab_offsets % 2 == 0], clipped[sl.slab_offsets % 2 == 1]
    mean, sd = _box(chooser.mean(axis=0), 9.0, sl.pixel_mm)
    score = np.where(region & (mean > -20.0), np.minimum(mean, 600.0) - 2.0 * sd, -np.inf)
    best = np.unravel_index(int(np.argmax(score)), score.shape)
    if not np.isfinite(score[best]):
        return None
    half = [n // 2 for n in _box_size(9.0, sl.pixel_mm)]
    square = (slice(None), *(slice(max(0, b - h), b + h + 1) for b, h in zip(best, half)))
    values = (measured if len(measured) else chooser)[square]
    return float(values.mean()), sl.rel_mm[best], int(values.size)


def measure_reference_tissues(volume: Volume, segmentation: SpineSegmentation) -> ReferenceTissues:
    """Find and measure air, subcutaneous fat, paraspinal muscle and aortic blood.

    Parameters
    ----------
    volume : Volume
        CT volume, ``hu`` ``(z, y, x)`` in HU, ``affine`` to LPS mm.
    segmentation : SpineSegmentation
        ``bodies`` ``(z, y, x)`` label map (VerSe IDs) on the volume's grid.

    Returns
    -------
    ReferenceTissues
        Median HU per tissue over the axial slices through the centres of the
        bodies T12-L5 present (blood: T12-L3 only):

        * air: outside the body (more than 10 mm from the skin), below -500 HU
          (reconstruction padding below -1500 HU excluded);
        * adipose: subcutaneous fat, 3-25 mm deep under the skin, -190..-30 HU;
        * muscle: erector spinae, 30-90 mm posterior and 12-55 mm lateral to
          the body centre, -29..+150 HU, one pixel in from the window border;
        * blood: aortic lumen, 15-55 mm anterior and 5 mm right to 35 mm left
          of the body centre: the most homogeneous dense 9 mm square there.

    Raises
    ------
    ValueError
        If the body label map is not on the volume's grid.
    """
    volume.require_grid(segmentation.bodies, "body label map")
    centres = body_centres_mm(volume, segmentation.bodies)
    samples: dict[str, list[np.ndarray]] = {"air": [], "adipose": [], "muscle": []}
    blood, aorta_points = [], []
    for name in SEARCH_LEVELS:
        centre = centres.get(VERTEBRA_IDS[name])
        if centre is None:
            continue
        sl = _slice_at(volume, segmentation.bodies, centre)
        if not sl.patient.any():
            continue
        depth = ndi.distance_transform_edt(sl.patient, sampling=sl.pixel_mm)
        outside = ndi.distance_transform_edt(~sl.patient, sampling=sl.pixel_mm)
        samples["air"].append(sl.hu[(outside > 10.0) & (sl.hu < -500.0) & (sl.hu > -1500.0)])
        # tissue windows select on a 3x3 box mean, the median is taken of the raw HU: a window
        # applied to noisy HU cuts the noise tails unevenly (muscle at 24 HU with SD 35 HU
        # noise lost its low tail at -29 HU and read 5 HU high)
        selector = ndi.uniform_filter(sl.hu.astype(np.float32), size=3, mode="nearest")
        fat = (depth >= 3.0) & (depth <= 25.0) & (selector >= ADIPOSE_HU[0]) & (selector <= ADIPOSE_HU[1])
        samples["adipose"].append(sl.hu[fat])
        posterior, lateral = sl.rel_mm[..., 1], np.abs(sl.rel_mm[..., 0])
        muscle = ((posterior >= 30.0) & (posterior <= 90.0) & (lateral >= 12.0) & (lateral <= 55.0)
                  & sl.patient & (selector >= MUSCLE_HU[0]) & (selector <= MUSCLE_HU[1]))
        samples["muscle"].append(sl.hu[ndi.binary_erosion(muscle)])
        if name in AORTA_LEVELS:
            found = _aorta(sl)
            if found is not None:
                blood.append(found)
                aorta_points.append(centre + found[1])
    hu, count = {}, {}
    for tissue, parts in samples.items():
        values = np.concatenate(parts) if parts else np.zeros(0)
        if values.size >= MIN_TISSUE_VOXELS:
            hu[tissue] = round(float(np.median(values)), 1)
            count[tissue] = int(values.size)
    if blood:
        hu["blood"] = round(float(np.median([b[0] for b in blood])), 1)
        count["blood"] = int(sum(b[2] for b in blood))
    log.info("reference tissues (median HU): %s", hu)
    return ReferenceTissues(hu=hu, voxel_count=count,
                            aorta_points_mm=np.array(aorta_points).reshape(-1, 3))
