"""The canonical frame of a CT volume and the 2 mm detection copy shared by the built-in segmenters.

The ``(z, y, x)`` array is viewed (no copy) with its axes permuted and flipped
so that they point superior, anterior and left (canonical ``(s, a, l)``), using
the direction cosines of :attr:`osteonode.volume.Volume.affine`: any slice
order, row/column mirroring or acquisition plane is handled this way. The
detection copy is a 2 mm isotropic block mean with linear resampling; when the
image noise, estimated from neighbour differences in soft tissue, exceeds
12 HU it is smoothed with the Gaussian that brings it down to 12 HU, so that
low-dose and noisy images are detected like standard ones. Also here: the
small geometric helpers (balls, coarse-to-native copies) that
the spine and femur segmenters share.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from osteonode.volume import Volume

#: Canonical positions (mm) of the indices along the three axes ``(s, a, l)`` of a crop.
Coords = tuple[np.ndarray, np.ndarray, np.ndarray]

log = logging.getLogger(__name__)

#: 4-connected structuring element within one (z) slice: fills holes slice by slice.
IN_PLANE = np.zeros((3, 3, 3), bool)
IN_PLANE[1] = ndi.generate_binary_structure(2, 1)


#: Grid spacing (mm) of the coarse copy used for detection.
COARSE_MM = 2.0


#: Residual noise (HU SD) the native-grid segmentation smooths down to.
NOISE_TARGET_HU = 12.0


@dataclass(frozen=True)
class CanonicalFrame:
    """Permutation/flips from the native ``(z, y, x)`` array to (S, A, L) axes."""

    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    spacing: np.ndarray  # canonical (s, a, l) spacing in mm

    @classmethod
    def from_volume(cls, volume: Volume) -> CanonicalFrame:
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
        array: no strided copy back (its cost: ``bench/README.md``, "Figures
        behind design choices in the code").
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
        return volume.index_to_lps(native)


@dataclass(frozen=True)
class CanonicalView:
    """A volume in the canonical frame with its 2 mm copy, shared by the built-in segmenters.

    Attributes
    ----------
    frame : CanonicalFrame
        Native ``(z, y, x)`` -> canonical ``(s, a, l)`` mapping.
    canonical_hu : numpy.ndarray
        Canonical view (no copy) of the volume's HU.
    coarse : numpy.ndarray
        ``COARSE_MM`` isotropic copy of ``canonical_hu`` (HU), smoothed down to
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
    canonical_hu: np.ndarray
    coarse: np.ndarray
    offset: np.ndarray
    patient: np.ndarray
    noise_hu: float

    def smoothing_mm(self, thin_mm: float = 0.8) -> np.ndarray:
        """Gaussian sigma (mm, per canonical axis) for segmenting on the native grid.

        ``thin_mm`` on axes finer than 1.5 mm (thin slices and pixels), and at
        least what brings the noise down to ``NOISE_TARGET_HU``.
        """
        spacing = self.frame.spacing
        return np.maximum(np.where(spacing < 1.5, thin_mm, 0.0), denoising_sigma(self.noise_hu) * spacing)


def canonical_view(volume: Volume) -> CanonicalView:
    """Compute the :class:`CanonicalView` of ``volume`` (``(z, y, x)`` HU)."""
    frame = CanonicalFrame.from_volume(volume)
    canonical_hu = frame.to_canonical(volume.hu)
    coarse, offset = coarse_copy(canonical_hu, frame.spacing, COARSE_MM)
    sigma = denoising_sigma(noise_hu(coarse))
    if sigma > 0.0:  # noisy (e.g. low-dose) images: the detection steps see the same noise as usual
        coarse = ndi.gaussian_filter(coarse, sigma)
    return CanonicalView(frame, canonical_hu, coarse, offset, patient_mask(coarse), noise_hu(volume.hu))


def denoising_sigma(noise_hu: float) -> float:
    """Gaussian sigma (voxels) that brings white noise of ``noise_hu`` down to ``NOISE_TARGET_HU``.

    A 3-D Gaussian of sigma ``s`` voxels divides the noise SD by ``(2 sqrt(pi) s)^1.5``.
    """
    factor = noise_hu / NOISE_TARGET_HU
    return factor ** (2.0 / 3.0) / (2.0 * np.sqrt(np.pi)) if factor > 1.0 else 0.0


def noise_hu(hu: np.ndarray) -> float:
    """Noise SD (HU) from neighbour differences along the last axis in soft tissue (every 4th slice)."""
    sub = hu[::4]
    soft = (sub > -50.0) & (sub < 100.0)
    both = soft[:, :, 1:] & soft[:, :, :-1]
    diff = np.diff(sub, axis=2)[both]
    if diff.size < 100:
        return 0.0
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2.0))


def coarse_copy(canonical_hu: np.ndarray, spacing: np.ndarray, grid: float = COARSE_MM
                ) -> tuple[np.ndarray, np.ndarray]:
    """Block-average then linearly resample the canonical array to ``grid`` mm.

    Returns the coarse array and the offset (mm) such that coarse index ``j``
    lies at canonical position ``j * grid + offset`` mm.
    """
    k = [max(1, int(grid / s)) for s in spacing]
    n = [(canonical_hu.shape[i] // k[i]) * k[i] for i in range(3)]
    blocks = canonical_hu[:n[0], :n[1], :n[2]]
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


def linear_along(a: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """``a`` linearly interpolated at fractional indices ``x`` (in ``[0, n - 1]``) along ``axis``.

    One axis of a separable (trilinear) resampling; the result has ``len(x)``
    entries along ``axis``. Weights are float32, like the arrays resampled here.
    """
    n = a.shape[axis]
    low = np.minimum(np.floor(x).astype(np.intp), n - 1)
    weight = (x - low).astype(np.float32).reshape([-1 if j == axis else 1 for j in range(a.ndim)])
    return np.take(a, low, axis) * (1.0 - weight) + np.take(a, np.minimum(low + 1, n - 1), axis) * weight


def shift_along(a: np.ndarray, off: int, axis: int, fill: float) -> np.ndarray:
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


def patient_mask(coarse: np.ndarray) -> np.ndarray:
    return largest_component_filled(coarse > -400)


def largest_component_filled(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask`` (z, y, x), holes filled slice by slice."""
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = ndi.sum_labels(mask, lab, index=np.arange(1, n + 1))
    largest = lab == (1 + int(np.argmax(sizes)))
    return fill_holes(largest, IN_PLANE)


def fill_holes(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """``mask`` with its holes filled: :func:`scipy.ndimage.binary_fill_holes`, the same result faster.

    A hole is a connected component of the background (connectivity
    ``structure``, default face-connected) that does not reach beyond the
    array's edge through ``structure``; with :data:`IN_PLANE` that is slice by
    slice. The background is labelled once with one voxel of background padded
    around it, where scipy dilates the outside step by step: segmenting the
    512 x 512 x 300 grid, the fills took 0.42 s instead of 0.88 s (cProfile,
    ``bench/README.md``, "Session 27"). Same output:
    ``tests/unit/test_segment_frame.py``.

    Parameters
    ----------
    mask : numpy.ndarray
        Boolean array of any shape and axis order.
    structure : numpy.ndarray, optional
        Boolean connectivity of the background, ``(3,) * mask.ndim``.

    Returns
    -------
    numpy.ndarray
        Boolean, the shape of ``mask``.
    """
    connectivity = ndi.generate_binary_structure(mask.ndim, 1) if structure is None else structure
    labels, n = ndi.label(np.pad(~mask, 1, constant_values=True), connectivity)
    outside = np.zeros(n + 1, bool)
    for ax in range(mask.ndim):
        outside[np.take(labels, [0, -1], axis=ax)] = True
    inner = labels[(slice(1, -1),) * mask.ndim]
    return mask | ((inner > 0) & ~outside[inner])


def ellipsoid(rad: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(-r, r + 1) * s for r, s in zip(rad, spacing)], indexing="ij")
    r_mm = float(np.max(rad * spacing))
    inside = sum(gg ** 2 for gg in grids) <= r_mm ** 2 + 1e-6
    return inside


def coarse_to_native(mask: np.ndarray, sl: tuple[slice, ...], offset: np.ndarray, grid_mm: float,
                     spacing: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Nearest-neighbour copy of a coarse crop ``mask`` onto the canonical native grid.

    ``mask`` is the crop ``sl`` of a coarse ``(s, a, l)`` array with spacing ``grid_mm``
    mm and origin ``offset`` (canonical mm); ``spacing`` and ``shape`` are those
    of the canonical native array. Returns the native mask and its crop
    (canonical native indices).
    """
    index, native = [], []
    for ax in range(3):
        j = np.arange(shape[ax])
        k = np.round((j * spacing[ax] - offset[ax]) / grid_mm).astype(int)
        inside = np.nonzero((k >= sl[ax].start) & (k < sl[ax].stop))[0]
        native.append(slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0))
        index.append(k[inside] - sl[ax].start)
    return mask[np.ix_(*index)], tuple(native)


def perpendicular_frame(axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
