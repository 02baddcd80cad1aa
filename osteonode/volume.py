"""DICOM CT series -> 3-D volume in HU with its geometry.

Arrays are ``(z, y, x)`` numpy arrays: ``z`` is the slice index along the
slice normal, ``y`` the DICOM row index, ``x`` the DICOM column index.
Physical space is DICOM patient space (LPS, mm). SimpleITK images are
``(x, y, z)``; :meth:`Volume.to_sitk` does the conversion.

This module is the one place for grid geometry: index <-> LPS mapping, the
check that an array lies on a volume's grid, bounding boxes and crops. The
affine and its mappings are those of :class:`highdicom.VolumeGeometry`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray
from pydicom.uid import CTImageStorage

from osteonode.errors import NotEvaluable

log = logging.getLogger(__name__)

#: A box of a ``(z, y, x)`` array: one slice per axis, each with integer start and stop.
Box = tuple[slice, slice, slice]


@dataclass(frozen=True, eq=False)
class Volume:
    """A CT volume in Hounsfield units with its patient-space geometry.

    Construction validates the grid with :class:`highdicom.VolumeGeometry`
    (4 x 4 affine, last row ``0 0 0 1``, orthogonal columns); every mapping
    between array indices and LPS positions goes through it.

    Attributes
    ----------
    hu : numpy.ndarray
        ``(z, y, x)`` array in HU (float32 when loaded from DICOM).
    affine : numpy.ndarray
        ``(4, 4)`` float64 matrix mapping homogeneous voxel indices ``(z, y, x, 1)``
        to LPS coordinates in mm (the convention of :class:`highdicom.Volume`);
        a validated copy of the matrix passed in.
    frame_of_reference_uid : str or None
        Frame of Reference UID of the source series, if known.
    geometry : highdicom.VolumeGeometry
        The grid as highdicom holds it (used to place SEG frames on the source grid).

    Raises
    ------
    ValueError
        If ``hu`` is not 3-D or ``affine`` is not a valid volume affine.
    """

    hu: NDArray[Any]
    affine: NDArray[np.float64]
    frame_of_reference_uid: str | None = None
    geometry: hd.VolumeGeometry = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if np.ndim(self.hu) != 3:
            raise ValueError(f"a volume is a 3-D (z, y, x) array, got shape {np.shape(self.hu)}")
        try:
            geometry = hd.VolumeGeometry(np.asarray(self.affine, dtype=np.float64), self.hu.shape,
                                         coordinate_system="PATIENT",
                                         frame_of_reference_uid=self.frame_of_reference_uid)
        except ValueError as exc:
            raise ValueError(f"invalid volume affine: {exc}") from exc
        object.__setattr__(self, "affine", geometry.affine)
        object.__setattr__(self, "geometry", geometry)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        return self.geometry.spatial_shape

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing ``(sz, sy, sx)`` in mm."""
        return self.geometry.spacing

    def index_direction(self, axis: int) -> NDArray[np.float64]:
        """Unit LPS vector along array axis ``axis`` (0 = z, 1 = y, 2 = x)."""
        direction: NDArray[np.float64] = self.geometry.direction[:, axis]
        return direction

    def index_to_lps(self, index: ArrayLike) -> NDArray[np.float64]:
        """LPS positions (mm) of ``(z, y, x)`` array indices.

        Parameters
        ----------
        index : array_like
            ``(..., 3)`` indices ``(z, y, x)``; fractional indices are allowed.

        Returns
        -------
        numpy.ndarray
            ``(..., 3)`` positions, columns L, P, S (mm).
        """
        index = np.asarray(index, dtype=np.float64)
        lps: NDArray[np.float64] = self.geometry.map_indices_to_reference(index.reshape(-1, 3))
        return lps.reshape(index.shape)

    def lps_to_index(self, lps: ArrayLike) -> NDArray[np.float64]:
        """Fractional ``(z, y, x)`` array indices of LPS positions (mm); the inverse of :meth:`index_to_lps`.

        Parameters
        ----------
        lps : array_like
            ``(..., 3)`` positions, columns L, P, S (mm).

        Returns
        -------
        numpy.ndarray
            ``(..., 3)`` float indices ``(z, y, x)``, not rounded nor clipped to the array.
        """
        lps = np.asarray(lps, dtype=np.float64)
        index: NDArray[np.float64] = self.geometry.map_reference_to_indices(lps.reshape(-1, 3))
        return index.reshape(lps.shape)

    def margin_voxels(self, margin_mm: float) -> NDArray[np.int_]:
        """Whole voxels per axis ``(z, y, x)`` that cover ``margin_mm`` (mm), rounded up."""
        return np.ceil(margin_mm / np.asarray(self.spacing)).astype(int)

    def require_grid(self, array: ArrayLike, name: str = "array") -> None:
        """Check that ``array`` lies on this volume's ``(z, y, x)`` grid.

        Raises
        ------
        ValueError
            If the shape of ``array`` is not the volume's shape; the message names ``name``.
        """
        if np.shape(array) != self.shape:
            raise ValueError(f"{name} shape {np.shape(array)} != volume shape {self.shape} (z, y, x)")

    def crop(self, box: Box) -> Volume:
        """The sub-volume ``box`` (a contiguous copy) at the same patient position; negative steps flip axes.

        Raises
        ------
        ValueError, IndexError
            If ``box`` reaches outside the array or is empty (from :class:`highdicom.VolumeGeometry`).
        """
        index: Any = box  # highdicom annotates a tuple index as a 1-tuple
        return Volume(hu=np.ascontiguousarray(self.hu[box]), affine=self.geometry[index].affine,
                      frame_of_reference_uid=self.frame_of_reference_uid)

    def to_sitk(self, array: NDArray[Any] | None = None) -> sitk.Image:
        """Return ``array`` (default: the HU array) as a SimpleITK image on this grid.

        Not :meth:`highdicom.Volume.to_simpleitk`: that maps array axis 0 to
        SimpleITK's x, while pyradiomics' results and the NIfTI layout here
        rely on SimpleITK's x being the DICOM column (array axis 2).

        Parameters
        ----------
        array : numpy.ndarray, optional
            ``(z, y, x)`` array of this volume's shape, e.g. a label map.

        Returns
        -------
        SimpleITK.Image
            Image indexed ``(x, y, z)`` with LPS origin, spacing ``(sx, sy, sz)``
            and direction; NIfTI writing converts it to RAS correctly.

        Raises
        ------
        ValueError
            If ``array`` does not have this volume's shape.
        """
        array = self.hu if array is None else array
        self.require_grid(array)
        image = sitk.GetImageFromArray(array)
        sz, sy, sx = self.spacing
        image.SetSpacing((sx, sy, sz))
        image.SetOrigin(tuple(float(v) for v in self.affine[:3, 3]))
        image.SetDirection(tuple(float(v) for v in self.geometry.direction[:, ::-1].ravel()))
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        """Build a volume from a SimpleITK image ``(x, y, z)`` whose values are HU; ``hu`` is ``(z, y, x)`` float32."""
        hu = sitk.GetArrayFromImage(image).astype(np.float32)
        direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        affine = np.eye(4)
        affine[:3, :3] = direction[:, ::-1] * np.array(image.GetSpacing(), dtype=np.float64)[::-1]
        affine[:3, 3] = image.GetOrigin()
        return cls(hu=hu, affine=affine)


def bounding_box(mask: NDArray[Any], pad: ArrayLike = 0) -> Box:
    """Bounding box of the nonzero voxels of a ``(z, y, x)`` ``mask``, grown by ``pad`` voxels per axis.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(z, y, x)`` array with at least one nonzero voxel.
    pad : int or sequence of int
        Voxels added on each side, one value or one per axis ``(z, y, x)``.

    Raises
    ------
    ValueError
        If ``mask`` has no nonzero voxel.
    """
    box = []
    for ax in range(3):
        other = tuple(j for j in range(3) if j != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        if not idx.size:
            raise ValueError("bounding box of an empty mask")
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return grow_box((box[0], box[1], box[2]), mask.shape, pad)


def grow_box(box: Sequence[slice], shape: Sequence[int], pad: ArrayLike) -> Box:
    """``box`` of a ``(z, y, x)`` array of ``shape`` grown by ``pad`` voxels on each side, clipped to the array.

    ``pad`` is one value or one per axis ``(z, y, x)``; see
    :meth:`Volume.margin_voxels` for a margin in mm.
    """
    pads = np.broadcast_to(np.asarray(pad, dtype=int), (3,))
    grown = [slice(max(0, int(s.start) - int(p)), min(int(n), int(s.stop) + int(p)))
             for s, n, p in zip(box, shape, pads, strict=True)]
    return grown[0], grown[1], grown[2]


@dataclass(frozen=True)
class Series:
    """One loaded CT series: the volume and the source datasets' headers.

    Attributes
    ----------
    volume : Volume
        The HU volume; its ``geometry`` places SEG frames exactly on the source grid.
    datasets : list of pydicom.Dataset
        The source instances without pixel data, in file order.
    """

    volume: Volume
    datasets: list[pydicom.Dataset]

    @property
    def study_instance_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)


def load_series(paths: Iterable[Path]) -> Series:
    """Load a CT series of single-frame or Enhanced CT instances into HU.

    Handles any patient orientation and any slice order, and every transfer
    syntax that pydicom's installed decoders support (JPEG 2000, JPEG-LS,
    RLE, JPEG lossless, uncompressed).

    Parameters
    ----------
    paths : iterable of pathlib.Path
        Files of one series (PS3.10 format).

    Returns
    -------
    Series
        Volume ``(z, y, x)`` in HU (modality LUT / rescale applied) plus headers.

    Raises
    ------
    NotEvaluable
        No files, mixed series, no patient geometry, irregular slice spacing,
        gantry tilt, or pixel data that cannot be decoded. The message is the
        reason reported in the SR.
    """
    return series_from_datasets([pydicom.dcmread(p) for p in sorted(paths)])


def series_from_datasets(datasets: list[pydicom.Dataset]) -> Series:
    """:func:`load_series` of the instances already read (with their pixel data), in file order.

    Their Pixel Data is removed once the volume is built (``Series.datasets``
    are these data sets, headers only).

    Raises
    ------
    NotEvaluable
        As :func:`load_series`.
    """
    if not datasets:
        raise NotEvaluable("the series holds no instances")
    if len({str(ds.get("SeriesInstanceUID", "")) for ds in datasets}) != 1:
        raise NotEvaluable("the instances belong to more than one series")
    for ds in datasets:  # de-identified files may keep the SOP Class UID only in the file meta
        if not ds.get("SOPClassUID") and "MediaStorageSOPClassUID" in ds.get("file_meta", {}):
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    if len(datasets) > 1:
        _check_stack_geometry(datasets)
    try:
        if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1)) > 1:
            hd_volume = hd.Image.from_dataset(datasets[0]).get_volume(dtype=np.float32)
        else:
            hd_volume = _slice_stack_volume(datasets)
    except (ValueError, RuntimeError, AttributeError, KeyError) as exc:
        # highdicom raises ValueError for irregular spacing, tilt and missing geometry;
        # pydicom raises RuntimeError/ValueError when no decoder handles the pixel data.
        raise NotEvaluable(f"the series cannot be assembled into a volume: {exc}") from exc
    hu = np.asarray(hd_volume.array, dtype=np.float32)
    if hu.ndim != 3:
        raise NotEvaluable(f"the series is not a single-channel volume (array shape {hu.shape})")
    for ds in datasets:
        if "PixelData" in ds:
            del ds.PixelData
    volume = Volume(hu=hu, affine=hd_volume.affine, frame_of_reference_uid=hd_volume.frame_of_reference_uid)
    log.info("loaded series: %d instance(s), volume %s, spacing %s mm",
             len(datasets), hu.shape, tuple(round(s, 3) for s in volume.spacing))
    return Series(volume=volume, datasets=datasets)


#: Attributes that make highdicom's pixel transform more than the rescale of :func:`_slice_stack_volume`.
_OTHER_PIXEL_TRANSFORMS = ("ModalityLUTSequence", "RealWorldValueMappingSequence", "PixelValueTransformationSequence",
                           "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "NumberOfFrames",
                           "ICCProfile", "OpticalPathSequence", "FloatPixelData", "DoubleFloatPixelData")


def _slice_stack_volume(datasets: list[pydicom.Dataset]) -> hd.Volume:
    """``highdicom.get_volume_from_series(datasets, dtype=np.float32)``, without its per-instance IOD checks.

    For a stack of single-frame CT Image Storage slices, MONOCHROME2, whose
    only pixel transform is Rescale Slope / Intercept, the volume is built
    here from the same public highdicom parts (``get_volume_positions`` for
    the order and spacing, ``Volume.from_attributes``) and with highdicom's
    arithmetic (stored value x slope + intercept, both float32), so
    it equals highdicom's to the bit; highdicom's own function looks up each
    instance's IOD definition, over a second for the thin-slice series of
    bench/README.md. Any other series goes to highdicom's function.

    Parameters
    ----------
    datasets : list of pydicom.Dataset
        The instances of one series, with pixel data, in any order.

    Returns
    -------
    highdicom.Volume
        ``(z, y, x)`` float32 in the modality's units (HU), slices ordered
        along the slice normal.

    Raises
    ------
    ValueError
        Mixed frames of reference, orientations or pixel spacings, or slices
        that are not regularly spaced along their normal (the messages of
        highdicom's function).
    """
    first = datasets[0]
    if any(ds.get("SOPClassUID") != CTImageStorage or ds.get("PhotometricInterpretation") != "MONOCHROME2"
           or ds.get("PresentationLUTShape", "IDENTITY") != "IDENTITY"
           or any(keyword in ds for keyword in _OTHER_PIXEL_TRANSFORMS) for ds in datasets):
        return hd.get_volume_from_series(datasets, dtype=np.float32)
    if hd.spatial.get_image_coordinate_system(first) != hd.CoordinateSystemNames.PATIENT:
        raise ValueError("Dataset should exist in the patient coordinate_system.")
    for keyword, what in (("FrameOfReferenceUID", "share a frame of reference"),
                          ("ImageOrientationPatient", "have the same orientation"),
                          ("PixelSpacing", "have the same spacing")):
        if any(ds.get(keyword) != first.get(keyword) for ds in datasets):
            raise ValueError(f"Images do not {what}.")
    indices: list[int] | None
    if len(datasets) == 1:
        spacing, indices = first.get("SpacingBetweenSlices", 1.0), [0]
    else:
        spacing, indices = hd.spatial.get_volume_positions(
            image_positions=[ds.ImagePositionPatient for ds in datasets],
            image_orientation=first.ImageOrientationPatient)
    if spacing is None or indices is None:
        raise ValueError("Series is not a regularly-spaced volume.")
    ordered = sorted(zip(indices, datasets, strict=True), key=lambda pair: pair[0])
    hu = np.empty((len(datasets), int(first.Rows), int(first.Columns)), dtype=np.float32)
    for i, (_, ds) in enumerate(ordered):
        stored = ds.pixel_array
        # as highdicom: an empty or absent value counts as 1 (slope) or 0 (intercept); both are float32
        # scalars, so that the products and sums have numpy's types of highdicom's (float32 for 16-bit pixels)
        slope = np.float64(ds.get("RescaleSlope") or 1.0).astype(np.float32)
        intercept = np.float64(ds.get("RescaleIntercept") or 0.0).astype(np.float32)
        if slope != 1.0:
            stored = stored * slope
        if intercept != 0.0:
            stored = stored + intercept
        hu[i] = stored
    return hd.Volume.from_attributes(
        array=hu, frame_of_reference_uid=first.FrameOfReferenceUID,
        image_position=ordered[0][1].ImagePositionPatient, image_orientation=first.ImageOrientationPatient,
        pixel_spacing=first.PixelSpacing, spacing_between_slices=spacing,
        coordinate_system=hd.CoordinateSystemNames.PATIENT)


#: Largest angle between the slice-stacking direction and the slice normal we accept.
MAX_STACK_SHEAR_DEG = 0.5


def _check_stack_geometry(datasets: list[pydicom.Dataset]) -> None:
    """Reject gantry-tilted (sheared) stacks and mixed orientations with a clear reason.

    The slices must be stacked along their normal (PS3.3 C.7.6.2.1.1): a
    tilted gantry yields slices whose positions move along a direction that
    is not perpendicular to their plane, which a (z, y, x) grid cannot hold
    without resampling.

    Raises
    ------
    NotEvaluable
        Missing or malformed Image Plane attributes, mixed orientations, or shear beyond
        ``MAX_STACK_SHEAR_DEG`` degrees.
    """
    try:
        orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    except AttributeError as exc:
        raise NotEvaluable(f"the series lacks Image Plane attributes ({exc})") from exc
    except (ValueError, TypeError) as exc:
        # a malformed DS value, e.g. ImagePositionPatient "-100.0\\1x0\\5.0"; the value itself is not
        # repeated in the reason (it goes into the SR and the log)
        raise NotEvaluable("a slice of the series has a malformed Image Orientation or Image Position "
                           f"(Patient) value ({type(exc).__name__})") from exc
    if orientations.shape[1:] != (6,) or positions.shape[1:] != (3,):
        raise NotEvaluable("a slice of the series has an Image Orientation or Image Position (Patient) "
                           "with the wrong number of values")
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        raise NotEvaluable("the slices of the series do not share one orientation")
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    order = np.argsort(positions @ normal)
    stack = positions[order[-1]] - positions[order[0]]
    length = np.linalg.norm(stack)
    if length == 0:
        raise NotEvaluable("all slices of the series lie at the same position")
    angle = float(np.degrees(np.arccos(min(1.0, abs(float(stack @ normal)) / float(length)))))
    if angle > MAX_STACK_SHEAR_DEG:
        raise NotEvaluable(f"gantry tilt or sheared slice stack ({angle:.1f} degrees from the slice normal) "
                           "is not supported")
