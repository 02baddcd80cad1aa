"""DICOM CT series -> 3-D volume in HU with its geometry.

Arrays are ``(z, y, x)`` numpy arrays: ``z`` is the slice index along the
slice normal, ``y`` the DICOM row index, ``x`` the DICOM column index.
Physical space is DICOM patient space (LPS, mm). SimpleITK images are
``(x, y, z)``; :meth:`Volume.to_sitk` does the conversion.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import CTImageStorage

from osteonode.errors import NotEvaluable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Volume:
    """A CT volume in Hounsfield units with its patient-space geometry.

    Attributes
    ----------
    hu : numpy.ndarray
        ``(z, y, x)`` float32 array in HU.
    affine : numpy.ndarray
        ``(4, 4)`` matrix mapping homogeneous voxel indices ``(z, y, x, 1)`` to
        LPS coordinates in mm (the convention of :class:`highdicom.Volume`).
    """

    hu: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing ``(sz, sy, sx)`` in mm."""
        sz, sy, sx = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(sz), float(sy), float(sx)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def index_direction(self, axis: int) -> np.ndarray:
        """Unit LPS vector along array axis ``axis`` (0 = z, 1 = y, 2 = x)."""
        v = self.affine[:3, axis]
        return v / np.linalg.norm(v)

    def to_sitk(self, array: np.ndarray | None = None) -> sitk.Image:
        """Return ``array`` (default: the HU array) as a SimpleITK image on this grid.

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
        if array.shape != self.hu.shape:
            raise ValueError(f"array shape {array.shape} != volume shape {self.hu.shape}")
        image = sitk.GetImageFromArray(array)
        sz, sy, sx = self.spacing
        image.SetSpacing((sx, sy, sz))
        image.SetOrigin(tuple(float(v) for v in self.affine[:3, 3]))
        cols = [self.index_direction(a) for a in (2, 1, 0)]  # x, y, z unit vectors
        image.SetDirection(tuple(float(v) for v in np.stack(cols, axis=1).ravel()))
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        """Build a volume from a SimpleITK image whose values are HU."""
        hu = sitk.GetArrayFromImage(image).astype(np.float32)
        direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
        sx, sy, sz = image.GetSpacing()
        affine = np.eye(4)
        affine[:3, 0] = direction[:, 2] * sz
        affine[:3, 1] = direction[:, 1] * sy
        affine[:3, 2] = direction[:, 0] * sx
        affine[:3, 3] = image.GetOrigin()
        return cls(hu=hu, affine=affine)


@dataclass(frozen=True)
class Series:
    """One loaded CT series: the volume and the source datasets' headers.

    Attributes
    ----------
    volume : Volume
        The HU volume.
    hd_volume : highdicom.Volume
        The same volume as highdicom holds it, used to place SEG frames exactly
        on the source grid.
    datasets : list of pydicom.Dataset
        The source instances without pixel data, in file order.
    """

    volume: Volume
    hd_volume: hd.Volume
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
    log.info("loaded series: %d instance(s), volume %s, spacing %s mm",
             len(datasets), hu.shape, tuple(round(s, 3) for s in Volume(hu, hd_volume.affine).spacing))
    return Series(volume=Volume(hu=hu, affine=np.asarray(hd_volume.affine, dtype=float)),
                  hd_volume=hd_volume, datasets=datasets)


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
    angle = np.degrees(np.arccos(min(1.0, abs(float(stack @ normal)) / length)))
    if angle > MAX_STACK_SHEAR_DEG:
        raise NotEvaluable(f"gantry tilt or sheared slice stack ({angle:.1f} degrees from the slice normal) "
                           "is not supported")
