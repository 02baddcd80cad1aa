"""Built-in vertebral body segmentation and level labelling (no model weights, CPU only).

Pipeline
--------
1. **Canonical frame.** The ``(z, y, x)`` array is viewed (no copy) with its axes
   permuted and flipped so that they point superior, anterior and left, using the
   direction cosines of :attr:`Volume.affine`. Any slice order, row/column mirroring
   or acquisition plane is handled this way.
2. **Column tracking** on a 2 mm isotropic copy (block mean + linear resampling;
   when the image noise, estimated from neighbour differences in soft tissue,
   exceeds 12 HU, the copy is smoothed with the Gaussian that brings it down to
   12 HU, so that low-dose and noisy images are detected like standard ones).
   Each axial slice is scored for "vertebral body centre": mean HU in an 18 mm
   square (HU clipped to [-100, 250]), penalised when there is no low-density
   spinal canal 18-26 mm posterior to it and rewarded when there is bone
   (the neural arch) 30-54 mm posterior to it. This rejects the aorta, the psoas
   and the posterior elements. A dynamic programme links the slices into one
   smooth centreline (at most 4 mm lateral/AP shift per 2 mm slice, each shift
   penalised by 40 HU per (2 mm)^2).
3. **Disc detection.** Along the centreline, the mean HU is sampled in planes
   perpendicular to the (smoothed) centreline. An intervertebral disc is a narrow
   minimum flanked within 6 mm by the dense endplates of both neighbouring
   vertebrae; its "notch" depth is ``min(P(s-6 mm), P(s+6 mm)) - P(s)`` (> 20 HU,
   flanks > 100 HU, and the column confirmed -- body denser than 60 HU with a canal
   below 100 HU behind it -- within 10 mm). Discs are picked greedily by notch depth
   with a 22 mm non-maximum suppression (shorter than any T10-S1 vertebra + disc,
   longer than half of one), which keeps the mid-body venous dip out.
4. **Level anchors.**

   * *Sacrum (caudal anchor)*: the field of view continues at least 40 mm below the
     lowest disc (so a further disc would have been seen), and in at least 60 % of
     the slices 8-30 mm below it thick bone (> 120 HU, surviving an opening with an
     8 mm disc, which removes ribs and transverse processes) lies on both sides,
     24-110 mm lateral: the iliac bones at the sacro-iliac joints. The lowest
     mobile vertebra above it is L5.
   * *Lowest rib-bearing vertebra = T12 (cranial anchor)*: bone components lateral
     to the column (> 150 HU, after removing a 44 mm wide central column) that start at the
     column, reach at least 60 mm lateral (lumbar transverse processes end within
     ~50 mm) and run at least 16 mm cranio-caudally
     are ribs, unless the bottom of the field of view cuts them (a cut iliac crest
     looks alike); the vertebra at the z of their medial end bears the rib. The lowest
     rib-bearing vertebra counts as T12 only if at least one complete rib-free
     vertebra is seen below it (otherwise the field of view may have cut off
     lower ribs' vertebrae).
   * Levels are then counted disc by disc from each anchor. Both anchors agreeing
     (five lumbar vertebrae between them) gives confidence 0.9; one anchor 0.7
     (sacrum) or 0.6 (T12); disagreeing anchors (transitional anatomy or a missed
     hypoplastic 12th rib) 0.4, using the sacral count, as the counting method of
     most radiology reports. No anchor: nothing is labelled and
     :attr:`SpineSegmentation.not_evaluable_reason` says why.
5. **Vertebral body** on the native grid, resampled (linear) to 1 mm where it is
   finer (thin slices smoothed with a 0.8 mm Gaussian first, noisy images with the
   Gaussian that brings the noise to 12 HU), in the vertebra's own frame (spine
   axis, and anterior-posterior / left-right directions perpendicular to it):

   * the threshold is half-way between soft tissue (40 HU) and the core HU (median
     of a 10 mm sphere at the body centre, taken again without voxels
     150 HU or more from it: focal lesions), bounded to [70, 140] HU, so that
     osteoporotic bodies are not lost;
   * **blur-invariant outline**: the outline is thresholded on a copy of the crop
     whose HU are clipped, before the smoothing, at the core HU plus the
     threshold's height above soft tissue (in the unbounded range: the threshold
     mirrored about the core). A step from soft tissue to the core level keeps
     its half-way crossing where it is under any Gaussian blur (the half-maximum
     rule for object edges in CT: Hangartner TN, J Musculoskelet Neuronal
     Interact 2007;7:9-16). Unclipped, the thin dense cortex and endplates
     (300-1000 HU) spread above the threshold as the Gaussian widens with the
     noise (3 mm CT: 1.0 mm clean, 1.7 mm at SD 35 HU), and the body grew by
     about a voxel (L5 +6 % and its trabecular mean +12 HU with no noise added,
     only the wider Gaussian). The core's own noise, up to the same margin above
     the core, is left unclipped, so that the outline is not biased by noise;
   * between the planes through the two neighbouring disc boundaries, voxels above
     the threshold; from 4 mm inside a boundary plane on a side with a disc out to
     the disc centre, voxels above half-way between the disc HU and the core HU
     (the half-maximum of the disc-to-bone step): disc tissue (70-110 HU, as dense
     as osteopenic trabecular bone) can lie that far inside the plane, which is
     found on 2 mm slices (+-1 mm) and lies perpendicular to the smoothed
     centreline, while each endplate of a lordotic, wedge-shaped disc is tilted by
     half the disc angle (about 2 mm over half an endplate) and endplates are
     concave (mean central depth 1.5 mm for the endplate above a disc: Wang Y,
     Battie MC, Videman T, Eur Spine J 2012;21:2316-2323). The disc HU is the mean
     of the clipped copy within 1.6 mm of the disc centre planes and 10 mm of the
     axis: noise leaves a mean unbiased, but moves the median of a zone mixing disc
     and endplate (around L5: 82 -> 94 HU at SD 35 HU);
   * from a disc boundary to the disc centre, in addition, only voxels at least
     40 HU denser than the disc on the unclipped crop (tilted endplates, e.g. at
     L5/S1, without disc tissue);
   * anterior to the posterior body wall: on the anterior-posterior profile through
     the centre, the spinal canal is the first point below 50 HU (fluid/fat) and the
     wall is where the profile, coming back from there, rises above the threshold.
     More than 8 mm from the midline the body may reach 3 mm further back (the
     posterior wall of a lumbar body is concave around the canal). This cut
     removes the pedicles and the neural arch;
   * inside a 32 mm radius envelope, then opened (2 mm ball), largest component,
     slice-wise hole filling and closing. A first pass with these rules on the
     unclipped crop, centred on the tracked centreline, gives the centre of the
     final pass: its centroid.

   A vertebra that is cut by the field of view (no disc on one side) keeps its
   label with half the confidence -- its body and ROI are incomplete -- unless
   the field of view holds at least 90 % of the body height of its complete
   neighbour (the field of view ends at its endplate).
6. **Trabecular ROI**: the body voxels that are at least 5 mm (3-D Euclidean
   distance in mm; 4 or 3 mm only if a small body leaves less than 0.2 cm3) from
   the body surface -- which keeps the ROI clear of the cortical shell -- restricted
   to a mid-vertebral slab, the middle 40 % of the body height (10-12 mm of a
   lumbar body, like the 8-10 mm mid-vertebral slab of QCT), and excluding the
   posterior fifth of the body depth (basivertebral venous plexus), measured along
   the vertebra's own anterior-posterior direction (for an L5 tilted by 30-45
   degrees the depth along the scanner's axis was ~48 mm and the cut ran
   obliquely, leaving dense pedicle bases in the ROI). The slab, not
   the 5 mm margin, keeps the ROI off the endplates: they are concave, and their
   centre reaches 2-4 mm further into the body than the filled body mask says
   (at 3 mm slices a 60 % slab took in endplate bone: L1 mean 130 vs median
   112 HU). This follows the trabecular L1 ROI of Pickhardt PJ et al., Ann Intern
   Med 2013;158:588-595 (ROI in trabecular bone, avoiding the cortex and the
   posterior venous plexus) and the mid-vertebral trabecular ROI of the
   ACR-SPR-SSR Practice Parameter for the Performance of Musculoskeletal
   Quantitative Computed Tomography (QCT), 2018.
7. **Whole vertebra**: on the 2 mm copy, bone above 150 HU up to 100 mm behind
   and 30 mm beside the bodies is flooded from the bodies (marker watershed on
   inverted HU: pedicles join their body, the darker facet joints part
   neighbours); bone more than 8 mm above the disc over the top labelled
   vertebra, or 15 mm below the disc under the lowest, floods from an
   "unlabelled vertebra" marker instead (the articular processes reach that far).

All thresholds are anatomical (HU of tissue classes, sizes of vertebrae in mm)
or physical (half-maximum edges, noise) and none is fitted numerically to
reference masks. Honest caveat: the tracking smoothness (40 HU), the posterior
concavity (3 mm) and the endplate band (4 mm) were chosen while watching the
Dice on the one patient with reference masks (the example CT), the band and the
clipping level also while watching how stable its trabecular HU stay under
added noise (bands of 4-5 mm did equally well, 2-3 mm left L4/L5 disc tissue
in the noisy L5; clipping higher, at the core plus twice the threshold's height,
left L5 less stable), so they are not independently validated (see
``bench/segmentation.py``).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from osteonode.anatomy import REQUIRED_LEVELS, VERTEBRA_IDS, VERTEBRA_NAMES
from osteonode.segment import SpineSegmentation
from osteonode.volume import Volume

log = logging.getLogger(__name__)

#: 4-connected structuring element within one (z) slice: fills holes slice by slice.
IN_PLANE = np.zeros((3, 3, 3), bool)
IN_PLANE[1] = ndi.generate_binary_structure(2, 1)

#: Radius (mm) of the sphere at the body centre whose robust median is the core HU.
CORE_RADIUS_MM = 10.0
#: Voxels further (HU) from the sphere's first median are left out of the core HU (focal lesions).
CORE_FOCUS_HU = 150.0
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
#: The cortical shell of a body is at least this much (HU) denser than its trabecular core ...
SHELL_ABOVE_CORE_HU = 60.0
#: ... and than this (HU; soft tissue is 20-60 HU).
SHELL_MIN_HU = 110.0
#: Bright specks smaller than this (mm3) are noise, not cortical shell.
SPECK_MM3 = 30.0
#: Gaps (mm) in the cortical shell of a body that are bridged before its interior is filled.
SHELL_GAP_MM = 6.0
#: Notch depth (HU) of the disc profile for a candidate disc.
MIN_NOTCH_HU = 12.0
#: Distance (mm) between consecutive disc centres: one vertebral body and one disc, T11 to S1.
SEGMENT_MM = (24.0, 50.0)
#: Cost (HU per mm^2) of a change of the disc-to-disc spacing between consecutive segments.
SPACING_PENALTY_HU_PER_MM2 = 0.4
#: A rib reaches at least this far (mm) from the midline; lumbar transverse processes end within
#: ~50 mm (L3, the longest, measured 48-50 mm on the example CT), a 12th rib beyond 70 mm.
RIB_REACH_MM = 60.0
#: The spinal canal (CSF and epidural fat, partial-volume averaged on 3 mm slices) is below this HU.
CANAL_MAX_HU = 60.0
#: Grid spacing (mm) of the coarse copy used for detection.
COARSE_MM = 2.0
#: Soft-tissue reference HU (skeletal muscle).
SOFT_TISSUE_HU = 40.0
#: Half-width (mm) of the spinal canal in front of which the posterior body wall is found.
CANAL_HALF_WIDTH_MM = 8.0
#: How far (mm) the posterolateral body reaches behind the wall found in the midline (concave wall).
POSTERIOR_CONCAVITY_MM = 3.0
#: Bone of the neural arch on the coarse grid (cortical laminae and processes are denser than this).
ARCH_BONE_HU = 150.0
#: Watershed marker of bone belonging to unlabelled neighbouring vertebrae.
FOREIGN = 255
#: Residual noise (HU SD) the native-grid segmentation smooths down to.
NOISE_TARGET_HU = 12.0
#: Finest grid (mm) on which bodies are segmented; thinner slices and pixels are resampled to it.
WORK_MM = 1.0
#: Depth (mm) inside a disc boundary plane where disc tissue may lie (plane error, disc wedge, endplate concavity).
ENDPLATE_BAND_MM = 4.0
#: Distance (mm) of the trabecular ROI from the body surface.
TRABECULAR_MARGIN_MM = 5.0
#: Posterior fraction of the body depth left out of the trabecular ROI (basivertebral veins,
#: pedicle bases).
ROI_POSTERIOR_FRACTION = 0.25
#: Fraction of the body height, centred at mid-height, that the trabecular ROI may occupy.
ROI_HEIGHT_FRACTION = 0.4

SACRUM = VERTEBRA_IDS["sacrum"]
T12 = VERTEBRA_IDS["T12"]
L5 = VERTEBRA_IDS["L5"]

# --------------------------------------------------------------------------- frame


@dataclass(frozen=True)
class CanonicalFrame:
    """Permutation/flips from the native ``(z, y, x)`` array to (S, A, L) axes."""

    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    spacing: np.ndarray  # canonical (s, a, l) spacing in mm

    @classmethod
    def from_volume(cls, volume: Volume) -> "CanonicalFrame":
        # LPS unit vectors of superior, anterior, left
        targets = (np.array([0.0, 0.0, 1.0]), np.array([0.0, -1.0, 0.0]), np.array([1.0, 0.0, 0.0]))
        dirs = [volume.index_direction(a) for a in range(3)]
        cos = np.array([[float(d @ t) for d in dirs] for t in targets])
        perm = max(itertools.permutations(range(3)),
                   key=lambda p: sum(abs(cos[i, p[i]]) for i in range(3)))
        worst = min(abs(cos[i, perm[i]]) for i in range(3))
        if worst < 0.85:
            log.warning("volume is oblique to the patient axes (|cos| = %.2f); "
                        "using the nearest axis-aligned frame", worst)
        flips = tuple(bool(cos[i, perm[i]] < 0) for i in range(3))
        spacing = np.asarray(volume.spacing, dtype=float)[list(perm)]
        return cls(perm=tuple(perm), flips=flips, spacing=spacing)  # type: ignore[arg-type]

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        view = array.transpose(self.perm)
        return view[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]

    def zeros(self, shape: tuple[int, int, int], dtype=np.uint8) -> tuple[np.ndarray, np.ndarray]:
        """A native ``(z, y, x)`` array of zeros of ``shape`` and its canonical ``(s, a, l)`` view.

        Label maps are written through the view and returned as the native
        array: no strided copy back (0.2 s per 512 x 512 x 300 map).
        """
        native = np.zeros(shape, dtype)
        return native, self.to_canonical(native)

    def to_native(self, array: np.ndarray) -> np.ndarray:
        unflipped = array[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]
        return np.ascontiguousarray(unflipped.transpose(np.argsort(self.perm)))

    def canonical_mm_to_lps(self, point_mm: np.ndarray, volume: Volume) -> np.ndarray:
        """LPS position (mm) of a canonical ``(s, a, l)`` position given in mm from canonical index 0."""
        index = np.asarray(point_mm, dtype=float) / self.spacing
        native = np.empty(3)
        for i, (axis, flip) in enumerate(zip(self.perm, self.flips)):
            native[axis] = volume.shape[axis] - 1 - index[i] if flip else index[i]
        return volume.affine[:3, :3] @ native + volume.affine[:3, 3]


@dataclass(frozen=True)
class CanonicalView:
    """A volume in the canonical frame with its 2 mm copy, shared by the built-in segmenters.

    Attributes
    ----------
    frame : CanonicalFrame
        Native ``(z, y, x)`` -> canonical ``(s, a, l)`` mapping.
    hc : numpy.ndarray
        Canonical view (no copy) of the volume's HU.
    coarse : numpy.ndarray
        ``COARSE_MM`` isotropic copy of ``hc`` (HU), smoothed down to
        ``NOISE_TARGET_HU`` of noise when the image is noisier.
    offset : numpy.ndarray
        Canonical mm of coarse index 0 (coarse index ``j`` lies at ``j * COARSE_MM + offset``).
    patient : numpy.ndarray
        Boolean patient mask on the coarse grid.
    noise_hu : float
        Image noise (HU, standard deviation) on the native grid: robust (MAD)
        spread of neighbour differences in soft tissue, divided by sqrt(2).
    """

    frame: CanonicalFrame
    hc: np.ndarray
    coarse: np.ndarray
    offset: np.ndarray
    patient: np.ndarray
    noise_hu: float

    def smoothing_mm(self, thin_mm: float = 0.8) -> np.ndarray:
        """Gaussian sigma (mm, per canonical axis) for segmenting on the native grid.

        ``thin_mm`` on axes finer than 1.5 mm (thin slices and pixels), and at
        least what brings the noise down to ``NOISE_TARGET_HU``.
        """
        sp = self.frame.spacing
        return np.maximum(np.where(sp < 1.5, thin_mm, 0.0), _denoising_sigma(self.noise_hu) * sp)


def canonical_view(volume: Volume) -> CanonicalView:
    """Compute the :class:`CanonicalView` of ``volume`` (``(z, y, x)`` HU).

    Raises
    ------
    ValueError
        If ``volume.hu`` is not 3-D.
    """
    if volume.hu.ndim != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {volume.hu.shape}")
    frame = CanonicalFrame.from_volume(volume)
    hc = frame.to_canonical(volume.hu)
    coarse, offset = coarse_copy(hc, frame.spacing, COARSE_MM)
    sigma = _denoising_sigma(_noise_hu(coarse))
    if sigma > 0.0:  # noisy (e.g. low-dose) images: the detection steps see the same noise as usual
        coarse = ndi.gaussian_filter(coarse, sigma)
    return CanonicalView(frame, hc, coarse, offset, patient_mask(coarse), _noise_hu(volume.hu))


def _denoising_sigma(noise_hu: float) -> float:
    """Gaussian sigma (voxels) that brings white noise of ``noise_hu`` down to ``NOISE_TARGET_HU``.

    A 3-D Gaussian of sigma ``s`` voxels divides the noise SD by ``(2 sqrt(pi) s)^1.5``.
    """
    factor = noise_hu / NOISE_TARGET_HU
    return factor ** (2.0 / 3.0) / (2.0 * np.sqrt(np.pi)) if factor > 1.0 else 0.0


def _noise_hu(hu: np.ndarray) -> float:
    """Noise SD (HU) from neighbour differences along the last axis in soft tissue (every 4th slice)."""
    sub = hu[::4]
    soft = (sub > -50.0) & (sub < 100.0)
    both = soft[:, :, 1:] & soft[:, :, :-1]
    diff = np.diff(sub, axis=2)[both]
    if diff.size < 100:
        return 0.0
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2.0))


def coarse_copy(hc: np.ndarray, spacing: np.ndarray, grid: float = COARSE_MM) -> tuple[np.ndarray, np.ndarray]:
    """Block-average then linearly resample the canonical array to ``grid`` mm.

    Returns the coarse array and the offset (mm) such that coarse index ``j``
    lies at canonical position ``j * grid + offset`` mm.
    """
    k = [max(1, int(grid / s)) for s in spacing]
    n = [(hc.shape[i] // k[i]) * k[i] for i in range(3)]
    blocks = hc[:n[0], :n[1], :n[2]]
    # block mean, one axis at a time with strided sums (cheap on non-contiguous views)
    for ax, ki in enumerate(k):
        if ki > 1:
            parts = [blocks[(slice(None),) * ax + (slice(i, None, ki),)] for i in range(ki)]
            acc = np.array(parts[0], dtype=np.float32)
            for part in parts[1:]:
                acc += part
            acc /= ki
            blocks = acc
    blocks = np.ascontiguousarray(blocks, dtype=np.float32)
    block_spacing = np.array(k) * spacing
    shape = tuple(int(np.floor((blocks.shape[i] - 1) * block_spacing[i] / grid)) + 1 for i in range(3))
    coarse = ndi.affine_transform(blocks, grid / block_spacing, output_shape=shape, order=1,
                                  prefilter=False, mode="nearest")
    offset = (np.array(k) - 1) * spacing / 2.0
    return coarse.astype(np.float32, copy=False), offset


# ----------------------------------------------------------------------- tracking


def _shift(a: np.ndarray, off: int, axis: int, fill: float) -> np.ndarray:
    """``out[i] = a[i - off]`` along ``axis`` (i.e. look ``off`` voxels towards lower index)."""
    out = np.full_like(a, fill)
    src = [slice(None)] * a.ndim
    dst = [slice(None)] * a.ndim
    if off > 0:
        src[axis] = slice(0, a.shape[axis] - off)
        dst[axis] = slice(off, None)
    elif off < 0:
        src[axis] = slice(-off, None)
        dst[axis] = slice(0, a.shape[axis] + off)
    out[tuple(dst)] = a[tuple(src)]
    return out


def patient_mask(c: np.ndarray) -> np.ndarray:
    return largest_component_filled(c > -400)


def largest_component_filled(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask`` (z, y, x), holes filled slice by slice."""
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = ndi.sum_labels(mask, lab, index=np.arange(1, n + 1))
    largest = lab == (1 + int(np.argmax(sizes)))
    return ndi.binary_fill_holes(largest, structure=IN_PLANE)


def shell_cover(c: np.ndarray, g: float = COARSE_MM) -> np.ndarray:
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
    c : numpy.ndarray
        Coarse canonical ``(s, a, l)`` array in HU.
    g : float
        Its spacing in mm.

    Returns
    -------
    numpy.ndarray
        Same shape, float32 in [0, 1].
    """
    bone = c > SHELL_HU
    steps = range(int(round(4.0 / g)), int(round(22.0 / g)) + 1)
    cover = np.zeros(c.shape, np.float32)
    for da, dl in ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)):
        hit = np.zeros(c.shape, bool)
        for k in steps:
            n = k if da == 0 or dl == 0 else max(1, int(round(k / np.sqrt(2.0))))
            hit |= _shift(_shift(bone, -da * n, 1, False), -dl * n, 2, False)
        cover += hit
    return cover / 8.0


def _track_column(c: np.ndarray, patient: np.ndarray, g: float = COARSE_MM) -> tuple[np.ndarray, np.ndarray]:
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
    c : numpy.ndarray
        Coarse canonical ``(s, a, l)`` array, HU.
    patient : numpy.ndarray
        Boolean patient mask, same shape.
    g : float
        Coarse spacing, mm.

    Returns
    -------
    path : numpy.ndarray
        ``(ns, 2)`` float (a, l) coarse indices of the body centreline per slice.
    valid : numpy.ndarray
        ``(ns,)`` bool: the slice shows a body (denser than soft tissue, or with a
        bone-surrounded canal behind it) with a spinal canal behind it.
    """
    nz, ny, nx = c.shape
    area = patient.sum(axis=(1, 2))
    xs = np.arange(nx)
    # midline band: +-50 mm around the patient's left-right centre of mass
    col = patient.sum(axis=(0, 1)).astype(float)
    xmid = float((col * xs).sum() / max(col.sum(), 1.0))
    half = int(round(50.0 / g))
    x0, x1 = max(0, int(xmid) - half - 8), min(nx, int(xmid) + half + 9)
    sub = c[:, :, x0:x1]
    r_body = int(round(9.0 / g))
    body = ndi.uniform_filter(np.clip(sub, -100, 250), size=(1, 2 * r_body + 1, 2 * r_body + 1))
    small = ndi.uniform_filter(np.clip(sub, -100, 400), size=(1, 3, 3))
    canal = np.full(sub.shape, 400.0, np.float32)
    for mm in (18.0, 22.0, 26.0):
        canal = np.minimum(canal, _shift(small, int(round(mm / g)), axis=1, fill=400.0))
    arch_src = ndi.maximum_filter(small, size=(1, 1, int(round(20.0 / g)) | 1))
    arch = np.zeros(sub.shape, np.float32)
    for mm in np.arange(30.0, 55.0, 4.0):
        arch = np.maximum(arch, _shift(arch_src, int(round(mm / g)), axis=1, fill=0.0))
    canal_here, ring = _canal_score(sub, g)
    behind = int(round(CANAL_TO_BODY_MM / g))
    canal_evidence = _shift(canal_here, behind, axis=1, fill=0.0)
    score = (body - 1.5 * np.maximum(0.0, canal - 60.0) + 0.5 * np.minimum(arch, 300.0)
             + np.maximum(canal_evidence, 0.0))
    # priors: inside the patient, within 40 mm of the slice's left-right centre
    sub_patient = patient[:, :, x0:x1]
    score[~sub_patient] = -1e4
    xs_sub = np.arange(x0, x1)
    for z in range(nz):
        if area[z] < 50:
            score[z] = -1e4
            continue
        xc = ndi.center_of_mass(patient[z])[1]
        score[z][:, np.abs(xs_sub - xc) > 40.0 / g] = -1e4
    path = _dynamic_path(score)
    at = (np.arange(nz), path[:, 0], path[:, 1])
    ring_behind = _shift(ring, behind, axis=1, fill=0.0)
    # a slice is "on the column" when the body is denser than soft tissue or has a bone-surrounded
    # canal behind it, and the canal is visible (this rejects tracks through vessels or a cut-off spine)
    valid = (((body[at] > 60.0) | (ring_behind[at] >= 0.6)) & (canal[at] < 100.0) & (score[at] > -1e3))
    path = path.astype(float)
    path[:, 1] += x0
    return path, valid


def _canal_score(sub: np.ndarray, g: float) -> tuple[np.ndarray, np.ndarray]:
    """Spinal-canal evidence (HU-like score) at each point of a coarse ``(s, a, l)`` array, and the shell cover.

    High where the point is fluid or fat (-100 to 60 HU), bone surrounds it
    (:func:`shell_cover`), and bone or disc lies 6-14 mm in front (posterior
    body wall) and 8-30 mm behind (laminae). Independent of the trabecular
    density of the bodies.
    """
    small = ndi.uniform_filter(np.clip(sub, -300, 400), size=(1, 3, 3))
    ring = shell_cover(sub, g)
    front = np.full(sub.shape, -300.0, np.float32)
    for mm in (6.0, 10.0, 14.0):
        front = np.maximum(front, _shift(small, -int(round(mm / g)), axis=1, fill=-300.0))
    behind = np.full(sub.shape, -300.0, np.float32)
    for mm in np.arange(8.0, 31.0, 4.0):
        behind = np.maximum(behind, _shift(small, int(round(mm / g)), axis=1, fill=-300.0))
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
            cand = _shift(_shift(value, dy, 0, -1e9), dx, 1, -1e9) - lam * (dy * dy + LATERAL_STIFFNESS * dx * dx)
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


# -------------------------------------------------------------------------- discs


def _perpendicular_frame(axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anterior-posterior and left-right unit vectors perpendicular to a spine ``axis``.

    Parameters
    ----------
    axis : numpy.ndarray
        ``(3,)`` unit vector (canonical ``(s, a, l)`` components) of the spine axis.

    Returns
    -------
    tuple of numpy.ndarray
        ``u``: the canonical anterior direction with its component along
        ``axis`` removed (pointing anterior); ``w = axis x u`` (pointing left).
    """
    u = np.array([0.0, 1.0, 0.0]) - axis * axis[1]
    u /= np.linalg.norm(u)
    return u, np.cross(axis, u)


def _plane_profile(c: np.ndarray, path: np.ndarray, g: float = COARSE_MM
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    c : numpy.ndarray
        Coarse canonical ``(s, a, l)`` array, HU.
    path : numpy.ndarray
        ``(ns, 2)`` centreline (a, l coarse indices per slice).
    g : float
        Coarse spacing, mm.

    Returns
    -------
    profile : numpy.ndarray
        ``(ns,)`` HU.
    pts : numpy.ndarray
        ``(ns, 3)`` smoothed centre points (coarse indices).
    tangent : numpy.ndarray
        ``(ns, 3)`` unit tangents.
    """
    nz = c.shape[0]
    pts = np.column_stack([np.arange(nz, dtype=float), path])
    pts = ndi.gaussian_filter1d(pts, 2.5, axis=0, mode="nearest")  # 5 mm
    tangent = np.gradient(ndi.gaussian_filter1d(pts, 5.0, axis=0, mode="nearest"), axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    uu, ww = np.meshgrid(np.arange(-6, 6), np.arange(-8, 9), indexing="ij")  # coarse voxels (2 mm)
    angles = np.radians(np.arange(-120.0, 121.0, 20.0))  # 0 = anterior
    radii = np.arange(6.0, 27.0, 2.0) / g
    clipped = np.clip(c, -100, 500)
    frames = [_perpendicular_frame(t) for t in tangent]
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
    return np.maximum(np.min(planes, axis=0), ring), pts, tangent


@dataclass
class _Disc:
    z: float  # coarse slice index of the disc centre on the centreline
    depth: float  # notch depth (HU)
    upper: float  # coarse index of the disc's upper boundary (cranial endplate of the disc)
    lower: float  # coarse index of the lower boundary


def _find_discs(profile: np.ndarray, valid: np.ndarray, pts: np.ndarray, g: float = COARSE_MM) -> list[_Disc]:
    """Intervertebral discs along the column: notches of the disc profile chosen by :func:`disc_chain`.

    ``profile`` and ``valid`` are per coarse slice; ``pts`` ``(ns, 3)`` are the
    smoothed centreline points (coarse indices), whose arc length measures the
    disc spacing (the lumbosacral junction is tilted by 30-45 degrees, so slice
    indices understate it there).
    """
    nz = len(profile)
    arc_mm = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))]) * g
    p = ndi.gaussian_filter1d(profile, 0.6, mode="nearest")
    d = int(round(8.0 / g))
    left = np.full(nz, -1e3)
    right = np.full(nz, -1e3)
    # flanks: the brightest plane 4-8 mm on each side (the endplates of both neighbours)
    for k in range(int(round(4.0 / g)), d + 1):
        left[k:] = np.maximum(left[k:], p[:-k])
        right[:-k] = np.maximum(right[:-k], p[k:])
    flank = np.minimum(left, right)
    notch = flank - p
    # flanks must be bone (endplates), not a dip in soft tissue
    notch[flank < 100.0] = 0.0
    # the column must be confirmed (body + canal) around the disc
    w = int(round(10.0 / g))
    support = ndi.uniform_filter1d(valid.astype(float), 2 * w + 1, mode="constant")
    notch[support < 0.5] = 0.0
    is_min = (p <= np.roll(p, 1)) & (p <= np.roll(p, -1))
    is_min[[0, -1]] = False
    cands = [int(z) for z in np.nonzero(is_min & (notch > MIN_NOTCH_HU))[0]]
    log.debug("disc candidates (coarse z, arc mm, notch HU): %s",
              [(z, round(float(arc_mm[z])), round(float(notch[z]))) for z in cands])
    chosen = disc_chain([float(arc_mm[z]) for z in cands], [float(notch[z]) for z in cands])
    chosen = [cands[i] for i in chosen]
    discs = []
    for z in sorted(chosen):
        # boundaries: half-way between the disc minimum and the flanking maxima within 10 mm
        lo = max(0, z - int(10 / g))
        hi = min(nz - 1, z + int(10 / g))
        below_max = lo + int(np.argmax(p[lo:z + 1]))
        above_max = z + int(np.argmax(p[z:hi + 1]))
        lvl_b = 0.5 * (p[z] + p[below_max])
        lvl_a = 0.5 * (p[z] + p[above_max])
        zb = z
        while zb > below_max and p[zb - 1] < lvl_b:
            zb -= 1
        za = z
        while za < above_max and p[za + 1] < lvl_a:
            za += 1
        discs.append(_Disc(z=float(z), depth=float(notch[z]), upper=float(za) + 0.5, lower=float(zb) - 0.5))
    return discs


def disc_chain(positions_mm: list[float], depths_hu: list[float]) -> list[int]:
    """Choose the intervertebral discs among candidate minima of the disc profile.

    A pure function of the candidates: the chosen discs form one chain, ordered
    along the spine, in which consecutive discs lie ``SEGMENT_MM`` apart (one
    vertebral body plus one disc: 24-50 mm from T11 to S1) and consecutive
    spacings change little (vertebral heights change slowly along the column).
    The chain maximises the summed notch depths minus
    ``SPACING_PENALTY_HU_PER_MM2`` times the squared change of spacing. This
    keeps a low-density vertebra's mid-body dip (about half a segment from
    the discs) out, where a greedy choice by depth would take it.

    Parameters
    ----------
    positions_mm : list of float
        Candidate positions along the column (mm), ascending.
    depths_hu : list of float
        Their notch depths (HU), same length.

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
    lo, hi = SEGMENT_MM
    pair: dict[tuple[int, int], float] = {}
    back: dict[tuple[int, int], tuple[int, int] | None] = {}
    for j in range(n):
        for i in range(j):
            gap = positions_mm[j] - positions_mm[i]
            if not lo <= gap <= hi:
                continue
            best, arg = depths_hu[i] + depths_hu[j], None
            for h in range(i):
                if (h, i) in pair:
                    change = gap - (positions_mm[i] - positions_mm[h])
                    score = pair[(h, i)] + depths_hu[j] - SPACING_PENALTY_HU_PER_MM2 * change * change
                    if score > best:
                        best, arg = score, (h, i)
            pair[(i, j)], back[(i, j)] = best, arg
    single = int(np.argmax(depths_hu))
    if not pair or depths_hu[single] >= max(pair.values()):
        return [single]
    key: tuple[int, int] | None = max(pair, key=pair.get)
    chain = [key[1]]
    while key is not None:
        chain.append(key[0])
        key = back[key]
    return sorted(chain)


def _neighbour_height(segments: list, i: int, g: float) -> float:
    """Body height (mm, between disc boundaries) of the complete segment next to segment ``i``; inf if none."""
    for j in (i + 1, i - 1):
        if 0 <= j < len(segments) and segments[j][0] is not None and segments[j][1] is not None:
            return (segments[j][1].lower - segments[j][0].upper) * g
    return np.inf


# ------------------------------------------------------------------------ anchors


def _has_sacrum(c: np.ndarray, path: np.ndarray, disc: _Disc, g: float = COARSE_MM) -> bool:
    """Whether the bone below ``disc`` is the sacrum (see module docstring)."""
    z = int(disc.z)
    z_lo = z - int(round(40.0 / g))
    if z_lo < 0:
        return False
    # both iliac bones flank the bone below the disc: thick bone (an 8 mm disc survives an
    # opening; ribs and transverse processes do not) lateral to the body on each side
    zs = np.arange(z - int(round(30.0 / g)), z - int(round(8.0 / g)))
    bone = ndi.uniform_filter(c[zs], size=(1, 3, 3)) > 120.0
    bone = ndi.binary_fill_holes(bone, structure=IN_PLANE)
    r = int(round(4.0 / g))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    thick = ndi.binary_opening(bone, structure=(yy ** 2 + xx ** 2 <= r * r)[None])
    both = 0
    for i, zz in enumerate(zs):
        y, x = int(path[zz, 0]), int(path[zz, 1])
        ya, yb = max(0, y - int(45 / g)), min(c.shape[1], y + int(15 / g))
        lw = thick[i, ya:yb, max(0, x - int(110 / g)):max(0, x - int(24 / g))]
        rw = thick[i, ya:yb, x + int(24 / g):x + int(110 / g)]
        if lw.size and rw.size and min(lw.mean(), rw.mean()) >= 0.06:
            both += 1
    frac = both / max(len(zs), 1)
    log.debug("sacrum test below disc at coarse z=%d: iliac bones beside %.0f%% of slices", z, 100 * frac)
    return frac >= 0.6


def _rib_levels(c: np.ndarray, path: np.ndarray, g: float = COARSE_MM) -> list[float]:
    """Coarse z of the medial ends of rib-like bone components."""
    bone = ndi.uniform_filter(c, size=(1, 2, 2)) > 150.0
    nz, ny, nx = c.shape
    xs = np.arange(nx)
    dist_x = np.abs(xs[None, :] - path[:, 1:2]) * g  # (nz, nx)
    bone &= (dist_x >= 22.0)[:, None, :]
    lab, n = ndi.label(bone, structure=np.ones((3, 3, 3), bool))
    ends = []
    for i, sl in enumerate(ndi.find_objects(lab)):
        if sl is None:
            continue
        m = lab[sl] == i + 1
        vol_cm3 = m.sum() * g ** 3 / 1000.0
        if vol_cm3 < 0.3 or vol_cm3 > 40.0:
            continue
        zz, yy, xx = np.nonzero(m)
        zz = zz + sl[0].start
        yy = yy + sl[1].start
        xx = xx + sl[2].start
        dx = np.abs(xx - path[zz, 1]) * g
        dy = (yy - path[zz, 0]) * g
        if dx.min() > 26.0 or dx.max() < RIB_REACH_MM or (zz.max() - zz.min() + 1) * g < 16.0:
            continue
        if zz.min() == 0:  # cut by the bottom of the field of view (e.g. an iliac crest): cannot be told
            continue
        medial = dx < dx.min() + 8.0
        if not (-60.0 < dy[medial].mean() < 15.0):
            continue
        ends.append(float(zz[medial].mean()))
    return ends


# ------------------------------------------------------------------------- bodies


def _body_threshold(core_hu: float) -> float:
    """Body threshold (HU): half-way between soft tissue and the core HU, bounded to [70, 140]."""
    return float(np.clip(0.5 * (SOFT_TISSUE_HU + core_hu), 70.0, 140.0))


def _core_hu(hs: np.ndarray, coords_mm: tuple[np.ndarray, np.ndarray, np.ndarray], centre: np.ndarray) -> float:
    """Trabecular core HU: robust median of ``hs`` (canonical ``(s, a, l)`` crop) within 10 mm of ``centre`` (mm).

    The median of the sphere is taken again over the voxels within
    ``CORE_FOCUS_HU`` of the first median, so that a focal lesion at the centre
    (a bone island of up to 15 mm, ~40 % of the sphere) does not set the body
    threshold. 150 HU if the sphere is empty.
    """
    Z, Y, X = np.meshgrid(*(c - c0 for c, c0 in zip(coords_mm, centre)), indexing="ij", sparse=True)
    core = np.broadcast_to(Z ** 2 + Y ** 2 + X ** 2 <= CORE_RADIUS_MM ** 2, hs.shape)
    if not core.any():
        return 150.0
    values = hs[core]
    first = float(np.median(values))
    kept = values[np.abs(values - first) <= CORE_FOCUS_HU]
    return float(np.median(kept)) if kept.size else first


def _segment_body(hs: np.ndarray, hb: np.ndarray, raw: np.ndarray, coords_mm: tuple[np.ndarray, np.ndarray, np.ndarray],
                  centre: np.ndarray, axis: np.ndarray, top: tuple[np.ndarray, np.ndarray],
                  bottom: tuple[np.ndarray, np.ndarray], spacing: np.ndarray,
                  outer_top: tuple[np.ndarray, np.ndarray], outer_bottom: tuple[np.ndarray, np.ndarray],
                  core_hu: float, fill_shell: bool = True) -> np.ndarray:
    """Segment one vertebral body inside a canonical crop (module docstring, step 5).

    Parameters
    ----------
    hs : numpy.ndarray
        ``(s, a, l)`` crop in HU, smoothed: tells bone clearly denser than the disc.
    hb : numpy.ndarray
        The same crop (same shape, HU) clipped at the core HU plus the
        threshold's height above soft tissue before smoothing: the outline is
        thresholded on it (the centring pass passes ``hs`` again).
    raw : numpy.ndarray
        The same crop (same shape, HU) unsmoothed: the cortical shell is found
        on it (smoothing for noise would blur a one-voxel cortex below the
        shell threshold).
    coords_mm : tuple of numpy.ndarray
        Canonical position (mm) of each index along the three axes of ``hb``.
    centre : numpy.ndarray
        ``(3,)`` body centre (canonical mm).
    axis : numpy.ndarray
        ``(3,)`` unit spine axis (pointing superior).
    top, bottom : tuple of numpy.ndarray
        (point, unit normal) of the planes through the disc boundaries above and below.
    spacing : numpy.ndarray
        ``(3,)`` voxel spacing of ``hb`` in mm.
    outer_top, outer_bottom : tuple of numpy.ndarray
        Planes through the disc centres above and below (equal to ``top`` /
        ``bottom`` where the field of view ends without a disc).
    core_hu : float
        Core HU (:func:`_core_hu`) at ``centre``.
    fill_shell : bool
        Add what the cortical shell encloses (False for the sacrum, whose
        canal and foramina bone encloses too).

    Returns
    -------
    numpy.ndarray
        Boolean ``(s, a, l)`` mask of the body, same shape as ``hb``.
    """
    zc, yc, xc = coords_mm
    Z, Y, X = np.meshgrid(zc, yc, xc, indexing="ij", sparse=True)
    rel = (Z - centre[0], Y - centre[1], X - centre[2])

    def signed(plane):
        p, n = plane
        return (Z - p[0]) * n[0] + (Y - p[1]) * n[1] + (X - p[2]) * n[2]

    s_top, s_bottom = signed(top), signed(bottom)
    inner = (s_top <= 0) & (s_bottom >= 0)
    s_ot, s_ob = signed(outer_top), signed(outer_bottom)
    slab = (s_ot <= 0) & (s_ob >= 0)
    radial2 = rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2 - (rel[0] * axis[0] + rel[1] * axis[1] + rel[2] * axis[2]) ** 2
    disc_zone = (radial2 <= 100.0) & ((np.abs(s_ot) <= 1.6) | (np.abs(s_ob) <= 1.6))
    disc_zone = disc_zone & ~inner
    disc_hu = float(np.mean(hb[disc_zone])) if disc_zone.any() else np.nan
    thr = _body_threshold(core_hu)
    # vertebra frame: a = anterior-posterior and w = left-right, both perpendicular to the
    # spine axis (so that tilted vertebrae, e.g. L5, are cut along their own posterior wall)
    u, w = _perpendicular_frame(axis)
    along = rel[0] * axis[0] + rel[1] * axis[1] + rel[2] * axis[2]
    a = rel[0] * u[0] + rel[1] * u[1] + rel[2] * u[2]
    lr = rel[0] * w[0] + rel[1] * w[1] + rel[2] * w[2]
    # posterior wall: AP profile through the centre (|along| < 4 mm, |lr| < 6 mm), 1 mm bins
    ap_band = inner & (np.abs(lr) < 6.0) & (np.abs(along) < 4.0)
    a_band = np.broadcast_to(a, hb.shape)[ap_band]
    bins = np.arange(-35.5, 0.0, 1.0)
    idx = np.digitize(a_band, bins) - 1
    ok = (idx >= 0) & (idx < len(bins) - 1)
    centres = bins[:-1] + 0.5
    counts = np.bincount(idx[ok], minlength=len(bins) - 1)
    good = counts > 0

    def ap_profile(image: np.ndarray) -> np.ndarray:  # bin k centred at -35 + k mm
        sums = np.bincount(idx[ok], weights=image[ap_band][ok], minlength=len(bins) - 1)
        prof = np.full(len(centres), np.nan)
        prof[good] = sums[good] / counts[good]
        if good.sum() >= 2:  # bins between voxel rows stay empty on coarse grids: interpolate
            prof = np.interp(centres, centres[good], prof[good])
        return prof

    prof, shell_prof = ap_profile(hb), ap_profile(hs)
    # the cortical shell: clearly denser than the core (a thin, partial-volume cortex of an
    # osteoporotic body is 100-200 HU at 3 mm), clearly denser than soft tissue
    shell_thr = float(np.clip(core_hu + SHELL_ABOVE_CORE_HU, SHELL_MIN_HU, SHELL_HU))
    order = [k for k in range(len(centres) - 1, -1, -1) if centres[k] <= -4.0]

    # the spinal canal: the longest run of fluid/fat bins (CSF, epidural fat: < CANAL_MAX_HU)
    # 10-32 mm behind the centre; the posterior wall is the first bin in front of it that is
    # denser than the body threshold (the posterior cortex, however thin), within 6 mm
    fluid = (shell_prof < CANAL_MAX_HU) & (centres >= -32.0) & (centres <= -10.0)
    runs, start = [], None
    for k in range(len(centres) + 1):
        if k < len(centres) and fluid[k]:
            start = k if start is None else start
        elif start is not None:
            runs.append((start, k - 1))
            start = None
    k_wall = None
    if runs:
        _, front = max(runs, key=lambda r: (r[1] - r[0], r[1]))
        k_wall = next((k for k in range(front + 1, min(front + 7, len(centres)))
                      if shell_prof[k] > thr + 15.0), front + 1)
    wall = -30.0
    if k_wall is not None:
        wall = float(centres[k_wall]) + 0.5  # the posterior cortex inside the envelope (1 mm bins)
    else:
        # no clear cortex: the canal is the first fluid/fat-density point walking posteriorly,
        # and the wall is where the profile, coming back anteriorly, rises above the threshold
        k_canal = next((k for k in order if prof[k] < 50.0), None)
        if k_canal is not None:
            j = k_canal
            while j + 1 < len(centres) and prof[j] < thr:
                j += 1
            wall = float(centres[j]) - 0.5
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
        outline = hb > np.where(band, max(thr, 0.5 * (disc_hu + core_hu)), thr)
        full = envelope & slab & outline & (inner | (hs > max(thr, disc_hu + 40.0)))
    else:
        full = envelope & inner & (hb > thr)
    # what the cortical shell encloses, whatever its density (osteoporotic or fatty marrow darker
    # than the threshold), in axial, coronal or sagittal planes; closed behind the posterior wall
    if fill_shell:
        shell = _without_specks((raw > shell_thr) & np.broadcast_to(envelope, hb.shape), SPECK_MM3, spacing)
        shell |= np.broadcast_to((a < wall - behind) & (np.abs(lr) < 32.0), hb.shape)
        full = full | (_enclosed(shell, SHELL_GAP_MM, spacing) & envelope & inner)
    log.debug("body at %s mm: core %.0f HU, threshold %.0f HU, disc %.0f HU, posterior wall %.0f mm",
              np.round(centre), core_hu, thr, disc_hu, wall)
    out = np.zeros(hb.shape, bool)
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
    keep = np.broadcast_to(slab & envelope, hb.shape)[box]
    mask = ndi.binary_closing(mask, structure=ball) & keep
    out[box] = ndi.binary_fill_holes(mask, structure=IN_PLANE)
    return out


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
        filled = ndi.binary_fill_holes(grown, structure=plane)
        out |= ndi.binary_erosion(filled, structure=disk, border_value=1)
    return out


def _working_grid(crop: np.ndarray, coords: tuple[np.ndarray, ...], spacing: np.ndarray, work: np.ndarray
                  ) -> tuple[np.ndarray, tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
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
        x = np.arange(n) * st
        i0 = np.minimum(np.floor(x).astype(int), out.shape[ax] - 1)
        frac = (x - i0).astype(np.float32).reshape([-1 if j == ax else 1 for j in range(out.ndim)])
        out = np.take(out, i0, ax) * (1.0 - frac) + np.take(out, np.minimum(i0 + 1, out.shape[ax] - 1), ax) * frac
    work_coords = tuple(c[0] + np.arange(n) * w for c, n, w in zip(coords, shape, work))
    back = tuple(np.clip(np.round((c - c[0]) / w).astype(int), 0, n - 1)
                 for c, w, n in zip(coords, work, shape))
    return out, work_coords, np.ix_(*back)


def coarse_to_native(mask: np.ndarray, sl: tuple[slice, slice, slice], offset: np.ndarray, g: float,
                     spacing: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Nearest-neighbour copy of a coarse crop ``mask`` onto the canonical native grid.

    ``mask`` is the crop ``sl`` of a coarse ``(s, a, l)`` array with spacing ``g``
    mm and origin ``offset`` (canonical mm); ``spacing`` and ``shape`` are those
    of the canonical native array. Returns the native mask and its crop
    (canonical native indices).
    """
    index, native = [], []
    for ax in range(3):
        j = np.arange(shape[ax])
        k = np.round((j * spacing[ax] - offset[ax]) / g).astype(int)
        inside = np.nonzero((k >= sl[ax].start) & (k < sl[ax].stop))[0]
        native.append(slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0))
        index.append(k[inside] - sl[ax].start)
    return mask[np.ix_(*index)], tuple(native)


def _add_posterior_elements(view: CanonicalView, whole: np.ndarray, foreign_above: float | None,
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
    c, offset, sp, g = view.coarse, view.offset, view.frame.spacing, COARSE_MM
    index = [np.clip(np.round((np.arange(n) * g + o) / p).astype(int), 0, m - 1)
             for n, o, p, m in zip(c.shape, offset, sp, whole.shape)]
    coarse_bodies = whole[np.ix_(*index)]
    if not np.isin(coarse_bodies, [SACRUM, 0], invert=True).any():
        return
    box = bounding_box(coarse_bodies > 0, 0)
    grow = [(25.0, 25.0), (100.0, 5.0), (30.0, 30.0)]  # mm below/above, behind/in front, right/left
    sl = tuple(slice(max(0, b.start - int(np.ceil(lo / g))), min(n, b.stop + int(np.ceil(hi / g))))
               for b, (lo, hi), n in zip(box, grow, c.shape))
    crop = c[sl]
    markers = coarse_bodies[sl].astype(np.int16)
    bone = crop > ARCH_BONE_HU
    s_mm = (np.arange(sl[0].start, sl[0].stop) * g + offset[0])[:, None, None]
    free = bone & (markers == 0)
    if foreign_above is not None:
        markers[free & (s_mm > foreign_above)] = FOREIGN
    if foreign_below is not None:
        markers[free & (s_mm < foreign_below)] = FOREIGN
    cost = np.where(bone, np.clip(1000.0 - crop, 0.0, 2000.0), 65535.0).astype(np.uint16)
    flooded = ndi.watershed_ift(cost, markers) * bone
    flooded[(flooded == FOREIGN) | (flooded == SACRUM)] = 0
    labels, native = coarse_to_native(flooded, sl, offset, g, sp, whole.shape)
    target = whole[native]
    put = (labels > 0) & (target == 0)
    target[put] = labels[put]


def bounding_box(mask: np.ndarray, pad) -> tuple[slice, slice, slice]:
    """Bounding box of ``mask`` grown by ``pad`` voxels per axis, clipped to the array."""
    pad = np.broadcast_to(np.asarray(pad, dtype=int), (mask.ndim,))
    box = []
    for ax in range(mask.ndim):
        other = tuple(j for j in range(mask.ndim) if j != ax)
        idx = np.nonzero(mask.any(axis=other))[0]
        box.append(slice(max(0, int(idx[0]) - int(pad[ax])), min(mask.shape[ax], int(idx[-1]) + 1 + int(pad[ax]))))
    return tuple(box)


def ellipsoid(rad: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(-r, r + 1) * s for r, s in zip(rad, spacing)], indexing="ij")
    r_mm = float(np.max(rad * spacing))
    inside = sum(gg ** 2 for gg in grids) <= r_mm ** 2 + 1e-6
    return inside


def trabecular_roi(body: np.ndarray, coords_mm: tuple[np.ndarray, np.ndarray, np.ndarray],
                   spacing: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """Trabecular ROI of one vertebral body (the rule of the module docstring, step 6).

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

    Returns
    -------
    numpy.ndarray
        Boolean mask of the ROI: body voxels at least 5 mm (4 or 3 mm if the ROI
        would be under 0.2 cm3) from the body surface, in the middle 40 % of the
        body height along ``axis``, excluding the posterior fifth of the body depth
        along the anterior direction perpendicular to ``axis``. Source: Pickhardt
        PJ et al., Ann Intern Med 2013;158:588-595, and the ACR-SPR-SSR Practice
        Parameter for QCT (2018).
    """
    if not body.any():
        return body
    box = bounding_box(body, 1)
    dist = np.zeros(body.shape)
    dist[box] = ndi.distance_transform_edt(np.pad(body[box], 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    Z, Y, X = np.meshgrid(*coords_mm, indexing="ij", sparse=True)
    u, _ = _perpendicular_frame(axis)

    def fraction(direction):  # position along direction: 0 at the body's first voxel, 1 at its last
        position = Z * direction[0] + Y * direction[1] + X * direction[2]
        inside = np.broadcast_to(position, body.shape)[body]
        return (position - inside.min()) / max(float(inside.max() - inside.min()), 1e-3)

    slab = np.abs(fraction(axis) - 0.5) <= 0.5 * ROI_HEIGHT_FRACTION
    mid = body & slab
    if not mid.any():
        return mid
    # elliptical cylinder inscribed in the mid-slab body cross-section, behind the anterior cortex
    # margin and in front of the posterior fifth (basivertebral veins)
    w = np.cross(axis, u)
    ap = np.broadcast_to(Z * u[0] + Y * u[1] + X * u[2], body.shape)
    lr = np.broadcast_to(Z * w[0] + Y * w[1] + X * w[2], body.shape)
    a_lo, a_hi = np.percentile(ap[mid], [1, 99])
    w_lo, w_hi = np.percentile(lr[mid], [1, 99])
    depth = a_hi - a_lo
    ap_lo = a_lo + ROI_POSTERIOR_FRACTION * depth
    ellipse = (((ap - 0.5 * (ap_lo + a_hi)) / max(0.5 * (a_hi - ap_lo), 1e-3)) ** 2
               + ((lr - 0.5 * (w_lo + w_hi)) / max(0.5 * (w_hi - w_lo), 1e-3)) ** 2) <= 1.0
    for margin in (TRABECULAR_MARGIN_MM, 4.0, 3.0):
        out = mid & ellipse & (dist >= margin)
        if out.sum() * np.prod(spacing) >= 200.0:  # at least 0.2 cm3
            return out
    return mid & (dist >= 3.0)


# -------------------------------------------------------------------------- main


def segment_spine(volume: Volume, view: CanonicalView | None = None) -> SpineSegmentation:
    """Segment and label the vertebral bodies T12-L5 and the sacrum of a CT volume.

    Anatomy-based, no model weights: the column is tracked on a 2 mm copy, the
    intervertebral discs are found along it, the levels are named from the
    sacrum (caudal anchor: the lowest mobile vertebra above it is L5) and the
    lowest rib-bearing vertebra (cranial anchor: T12) by counting discs, and the
    bodies and trabecular ROIs are segmented on the native grid. See the module
    docstring for every rule and its source.

    Parameters
    ----------
    volume : Volume
        CT volume; ``volume.hu`` is a ``(z, y, x)`` float32 array in HU and
        ``volume.affine`` maps ``(z, y, x, 1)`` to LPS mm. Any orientation and
        slice order, any slice thickness (tested 1-3 mm), with or without
        intravenous contrast.
    view : CanonicalView, optional
        ``canonical_view(volume)``, when the caller already has it (it is shared
        with :func:`osteonode.segment.femur.segment_proximal_femurs`).

    Returns
    -------
    SpineSegmentation
        ``bodies`` and ``trabecular``: ``(z, y, x)`` uint8 label maps on the
        input grid with VerSe IDs (19 = T12 ... 24 = L5, 26 = sacrum);
        ``confidence`` per labelled ID in [0, 1]; ``method`` in words;
        ``not_evaluable_reason`` set when the levels cannot be identified or
        L1-L4 are not all (completely) in the field of view; ``whole``: the
        whole vertebrae (body and posterior elements, the sacrum by its S1
        body only), same IDs and grid.

    Raises
    ------
    ValueError
        If ``volume.hu`` is not 3-D.

    Notes
    -----
    Level identification by anchors and disc counting follows radiological
    practice (counting from the lumbosacral junction and checking against the
    lowest rib-bearing vertebra); trabecular ROI rule: Pickhardt PJ et al.,
    Ann Intern Med 2013;158:588-595, and the ACR-SPR-SSR Practice Parameter for
    Quantitative CT (2018).
    """
    view = view or canonical_view(volume)
    frame, hc, sp = view.frame, view.hc, view.frame.spacing
    bodies, bodies_c = frame.zeros(volume.shape)
    trabecular, trab_c = frame.zeros(volume.shape)

    def result(confidence, method, reason, whole=bodies):
        return SpineSegmentation(bodies=bodies, trabecular=trabecular, confidence=confidence, method=method,
                                 not_evaluable_reason=reason, whole=whole)

    g, c, offset = COARSE_MM, view.coarse, view.offset
    if min(c.shape) < 8:
        return result({}, "", "the volume is too small to contain a vertebra")
    path, valid = _track_column(c, view.patient, g)
    profile, pts, tangent = _plane_profile(c, path)
    discs = _find_discs(profile, valid, pts, g)
    log.info("column tracked over %d coarse slices; %d disc(s) found", c.shape[0], len(discs))
    no_anchor = ("neither the sacrum nor the lowest rib-bearing vertebra (T12) is in the field of view; "
                 "lumbar levels cannot be identified")
    if not discs:
        return result({}, "", "no intervertebral disc found; " + no_anchor)

    # segments between discs: segment i lies above disc i (discs sorted caudal -> cranial)
    nz = c.shape[0]
    segments = []  # (lower_disc or None, upper_disc or None)
    segments.append((None, discs[0]))
    for a, b in zip(discs[:-1], discs[1:]):
        segments.append((a, b))
    segments.append((discs[-1], None))
    # drop open-ended segments too short to hold a body (< 8 mm in the FOV)
    if discs[0].lower * g < 8.0:
        segments.pop(0)
    if (nz - 1 - discs[-1].upper) * g < 8.0:
        segments.pop()

    # --- caudal anchor
    sacrum_seg = None
    if segments[0][0] is None and _has_sacrum(c, path, discs[0], g):
        sacrum_seg = 0
    # --- cranial anchor
    rib_z = _rib_levels(c, path, g)
    if sacrum_seg is not None:
        top_of_sacrum = discs[0].z
        rib_z = [z for z in rib_z if z > top_of_sacrum + 10.0 / g]

    def seg_of(z):
        for i, (lo, hi) in enumerate(segments):
            zl = lo.z if lo is not None else -np.inf
            zh = hi.z if hi is not None else np.inf
            if zl <= z < zh:
                return i
        return None

    rib_segs = sorted({s for s in (seg_of(z) for z in rib_z) if s is not None})
    t12_seg = None
    if rib_segs:
        lowest = rib_segs[0]
        below_complete = [i for i in range(lowest) if segments[i][0] is not None and i != sacrum_seg]
        if below_complete:
            t12_seg = lowest
    log.info("anchors: sacrum segment %s, lowest rib-bearing segment %s (rib ends at coarse z %s)",
             sacrum_seg, t12_seg, [round(z) for z in rib_z])

    # --- labelling
    named = name_levels(len(segments), sacrum_seg, t12_seg)
    if named is None:
        return result({}, "", no_anchor)
    labels, conf, method = named
    confidence: dict[int, float] = {}

    # --- native segmentation of each labelled body
    zmm = np.arange(hc.shape[0]) * sp[0]
    ymm = np.arange(hc.shape[1]) * sp[1]
    xmm = np.arange(hc.shape[2]) * sp[2]
    pts_mm = pts * g + offset  # coarse index -> canonical mm
    sigma = view.smoothing_mm() / sp
    log.info("image noise %.0f HU: smoothing sigma %s mm", view.noise_hu, np.round(sigma * sp, 2))
    work_sp = np.maximum(sp, WORK_MM)

    def smooth(crop: np.ndarray) -> np.ndarray:
        return ndi.gaussian_filter(crop, sigma) if sigma.any() else crop

    def plane_at(zc_idx: float):
        i = int(np.clip(round(zc_idx), 0, nz - 1))
        return pts_mm[i] + (zc_idx - i) * g * tangent[i], tangent[i] * 1.0

    complete: set[int] = set()
    for i, vid in sorted(labels.items()):
        lo, hi = segments[i]
        z_bot = lo.upper if lo is not None else 0.0
        z_top = hi.lower if hi is not None else nz - 1.0
        if vid == SACRUM:
            z_top = hi.lower
            z_bot = max(0.0, z_top - 30.0 / g)  # S1 body
        if (lo is not None and hi is not None) or vid == SACRUM:
            complete.add(vid)  # the S1 body (30 mm below L5/S1) is in view by the sacrum test
        elif (z_top - z_bot) * g >= 0.9 * _neighbour_height(segments, i, g):
            complete.add(vid)  # one disc cut off, but the body is as tall as its neighbour's: in view
        z_mid = 0.5 * (z_bot + z_top)
        im = int(np.clip(round(z_mid), 0, nz - 1))
        centre = pts_mm[im]
        top = plane_at(z_top)
        bottom = plane_at(z_bot)
        outer_top = plane_at(hi.z) if hi is not None else top
        outer_bottom = plane_at(lo.z) if (lo is not None and vid != SACRUM) else bottom
        # crop (canonical native indices)
        zr = (min(outer_bottom[0][0], outer_top[0][0]) - 25.0, max(outer_bottom[0][0], outer_top[0][0]) + 25.0)
        ylo, yhi = centre[1] - 50.0, centre[1] + 40.0
        xlo, xhi = centre[2] - 40.0, centre[2] + 40.0
        sl = tuple(slice(max(0, int(np.floor(a / s))), min(n, int(np.ceil(b / s)) + 1))
                   for (a, b), s, n in zip((zr, (ylo, yhi), (xlo, xhi)), sp, hc.shape))
        crop = np.asarray(hc[sl], dtype=np.float32)
        if crop.size == 0:
            continue
        native_coords = (zmm[sl[0]], ymm[sl[1]], xmm[sl[2]])
        hs, coords, back = _working_grid(smooth(crop), native_coords, sp, work_sp)
        raw = _working_grid(crop, native_coords, sp, work_sp)[0]
        # centring pass on the smoothed copy: the final pass is centred on this body's centroid
        # (the tracked centre leans towards the canal because the tracking score rewards it)
        body = _segment_body(hs, hs, raw, coords, centre, tangent[im], top, bottom, work_sp, outer_top,
                             outer_bottom, _core_hu(hs, coords, centre), fill_shell=vid != SACRUM)
        if body.any():
            cen = np.array([float(np.average(cc, weights=body.sum(axis=tuple(j for j in range(3) if j != ax))))
                            for ax, cc in enumerate(coords)])
            shift = cen - centre
            shift -= tangent[im] * float(shift @ tangent[im])
            if np.linalg.norm(shift) > 1.0:
                centre = centre + shift
        core_hu = _core_hu(hs, coords, centre)
        # clipped before smoothing, so that the dense cortex cannot spread above the threshold
        clip = core_hu + _body_threshold(core_hu) - SOFT_TISSUE_HU
        hb = _working_grid(smooth(np.minimum(crop, clip)), native_coords, sp, work_sp)[0]
        body = _segment_body(hs, hb, raw, coords, centre, tangent[im], top, bottom, work_sp, outer_top,
                             outer_bottom, core_hu, fill_shell=vid != SACRUM)
        roi = trabecular_roi(body, coords, work_sp, tangent[im]) if vid != SACRUM else np.zeros_like(body)
        body, roi = body[back], roi[back]
        body &= bodies_c[sl] == 0
        if body.sum() * np.prod(sp) < 2000.0:  # < 2 cm3: not a body
            log.info("segment %d (%s): body too small, skipped", i, VERTEBRA_NAMES[vid])
            continue
        bodies_c[sl][body] = vid
        trab_c[sl][roi & body] = vid
        confidence[vid] = conf if vid in complete else conf * 0.5

    # whole vertebrae: bone beyond the discs next to the outermost labelled vertebrae is a neighbour's
    done = [i for i, vid in labels.items() if vid in confidence and vid != SACRUM]
    above = below = None
    if done and segments[max(done)][1] is not None:
        above = segments[max(done)][1].z * g + offset[0] + 8.0  # superior articular processes rise ~ 8 mm
    if done and segments[min(done)][0] is not None and labels.get(min(done) - 1) != SACRUM:
        below = segments[min(done)][0].z * g + offset[0] - 15.0  # inferior ones reach ~ 15 mm below the disc
    whole = bodies.copy()
    _add_posterior_elements(view, frame.to_canonical(whole), above, below)
    log.info("spine levels: %s (%s)", [VERTEBRA_NAMES[v] for v in sorted(confidence)], method)
    out = result(confidence, method, missing_levels_reason(complete, confidence), whole)
    out.cut_by_field_of_view = {vid for vid in confidence if vid not in complete}
    return out


def name_levels(n_segments: int, sacrum_segment: int | None, t12_segment: int | None
                ) -> tuple[dict[int, int], float, str] | None:
    """Name the segments between discs from the anchors, by counting (a pure function).

    Parameters
    ----------
    n_segments : int
        Number of vertebral segments between the detected discs, caudal (0)
        to cranial.
    sacrum_segment : int or None
        Index of the segment that is the sacrum (caudal anchor), if found.
    t12_segment : int or None
        Index of the lowest rib-bearing segment (cranial anchor), if found.

    Returns
    -------
    tuple or None
        ``(labels, confidence, method)``: segment index -> VerSe ID (T12-L5 and
        the sacrum only), the label confidence (0.9 both anchors agree -- five
        lumbar vertebrae between them; 0.4 they disagree, counted from the
        sacrum; 0.7 sacrum only; 0.6 T12 only) and the method in words for the
        SR. None when there is no anchor.
    """
    if sacrum_segment is not None:
        labels = {i: SACRUM if i == sacrum_segment else L5 - (i - sacrum_segment - 1) for i in range(n_segments)}
        if t12_segment is None:
            conf, method = 0.7, ("sacrum as caudal anchor (lowest mobile vertebra above it = L5), disc counting; "
                                 "lowest rib-bearing vertebra not confirmed")
        elif t12_segment - sacrum_segment == 6:  # L5..L1 = five segments between
            conf, method = 0.9, ("sacrum (caudal anchor) and lowest rib-bearing vertebra T12 (cranial anchor), "
                                 "disc counting; anchors agree")
        else:
            conf, method = 0.4, ("sacrum (caudal anchor) and lowest rib-bearing vertebra (cranial anchor) DISAGREE "
                                 f"({t12_segment - sacrum_segment - 1} mobile vertebrae between them; transitional "
                                 "anatomy or a missed rib); levels counted from the sacrum")
    elif t12_segment is not None:
        labels = {i: T12 + (t12_segment - i) for i in range(n_segments)}
        conf, method = 0.6, ("lowest rib-bearing vertebra as T12 (cranial anchor), disc counting; "
                             "sacrum not in the field of view or not confirmed")
    else:
        return None
    labels = {i: v for i, v in labels.items() if v in VERTEBRA_NAMES and (v <= L5 or v == SACRUM)}
    return labels, conf, method


def missing_levels_reason(complete: set[int], confidence: dict[int, float]) -> str | None:
    """The "not evaluable" reason when any of L1-L4 is not labelled or not complete, else None.

    Parameters
    ----------
    complete : set of int
        VerSe IDs of the vertebrae seen whole (not cut by the field of view).
    confidence : dict
        VerSe ID -> label confidence of every labelled vertebra.
    """
    missing = [name for name in REQUIRED_LEVELS if VERTEBRA_IDS[name] not in complete
               or VERTEBRA_IDS[name] not in confidence]
    if not missing:
        return None
    seen = [VERTEBRA_NAMES[v] for v in sorted(confidence)]
    return (f"L1-L4 are not all in the field of view (missing or cut off: {', '.join(missing)}; "
            f"levels seen: {', '.join(seen) or 'none'})")
