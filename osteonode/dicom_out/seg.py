"""Encode the vertebral-body label map as a binary DICOM Segmentation (SEG).

The SEG is a Segmentation Storage instance (PS3.3 A.51) with one segment per
level (and proximal femur) present in :meth:`SpineSegmentation.label_map`
(segment numbers 1..N), then one segment per level's trabecular ROI present
in ``SpineSegmentation.trabecular`` (N+1 ...; the ROIs lie inside the bodies,
so segments overlap). Segments are described by ``dicom_templates/segments.json``
(Segment Description macro, PS3.3 C.8.20.4; codes from PS3.16 CID 7150
"Segmentation Property Categories", CID 7151 "Segmentation Property Types" and,
for the ROIs, category Tissue / type Bone of CID 7166 with the vertebra as
Anatomic Region); their Recommended Display CIELab Values come from
:mod:`osteonode.dicom_out.palette`.

The frames are placed on the source grid through :class:`highdicom.Volume`:
the label map is wrapped with the affine of the loaded series, so highdicom
derives Plane Position / Orientation (PS3.3 C.7.6.16.2.3/4) and the per-frame
source image references from geometry rather than from array order. This is
correct for any patient orientation and any slice order of the source. Only
the slab of slices (along the first array axis) that holds a label is encoded:
highdicom omits empty frames anyway, and the stacked segment array stays small.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import SegmentationStorage

import dicom_templates
from osteonode import __version__
from osteonode.anatomy import FEMUR_LEFT, FEMUR_RIGHT, VERTEBRA_NAMES
from osteonode.dicom_out import palette
from osteonode.dicom_out.common import (
    UTF8,
    coded,
    copy_optional_identity,
    equipment_attributes,
    series_number,
    settle_character_set,
    with_type2_defaults,
)
from osteonode.segment import SpineSegmentation
from osteonode.uids import derived_uid, input_key
from osteonode.volume import Series

log = logging.getLogger(__name__)

SEG_SERIES_DESCRIPTION = "osteonode SEG"

#: Label-map ID -> key in ``segments.json``.
LABEL_KEYS: dict[int, str] = {**VERTEBRA_NAMES, FEMUR_RIGHT: "femur_right", FEMUR_LEFT: "femur_left"}
#: Suffix of the key of a level's trabecular ROI segment (e.g. ``"L1 trabecular ROI"``) in :func:`segment_map`.
ROI_SUFFIX = " trabecular ROI"


def roi_key(level: str) -> str:
    """Key of the trabecular ROI segment of ``level`` (``"L1"`` -> ``"L1 trabecular ROI"``)."""
    return f"{level}{ROI_SUFFIX}"


def algorithm_identification() -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence of osteonode (PS3.3 C.8.20.2, CID 7162 family).

    The version is ``osteonode.__version__``; name, family and source come from
    ``dicom_templates/algorithm.json``.
    """
    algo = dicom_templates.load("algorithm")
    return hd.AlgorithmIdentificationSequence(
        name=algo["name"], family=coded(algo["family"]), version=__version__, source=algo["source"])


def tracking_uid(inputs: str, key: str) -> str:
    """Tracking Unique Identifier shared by the SEG segment and the SR group of ``key``.

    Parameters
    ----------
    inputs : str
        :func:`osteonode.uids.input_key` of the source CT instances.
    key : str
        Level name, e.g. ``"L1"``, or :func:`roi_key` of a level.
    """
    return str(derived_uid(inputs, f"tracking-{key}"))


def tracking_id(key: str) -> str:
    """Human-readable Tracking ID of the structure ``key``.

    ``"L1"`` -> ``"L1 vertebral body"``; ``roi_key("L1")`` -> ``"Trabecular bone ROI of the L1 vertebral body"``.
    """
    return str(_description_entry(key, dicom_templates.load("segments"))["description"])


def _description_entry(key: str, template: Mapping[str, Any]) -> dict[str, Any]:
    """Segment description of ``key`` (a structure of ``segments.json`` or a :func:`roi_key`) in one form.

    Returns
    -------
    dict
        ``label``, ``description``, ``category``, ``type`` (template entries),
        ``modifier`` (or None), ``region`` (Anatomic Region code entry, or None)
        and ``rgb`` (palette colour, 0..255).
    """
    if key.endswith(ROI_SUFFIX):
        level = key[:-len(ROI_SUFFIX)]
        roi = template["trabecular_roi"]
        return {"label": roi["label"].format(level=level), "description": roi["description"].format(level=level),
                "category": roi["category"], "type": roi["type"], "modifier": None,
                "region": template["segments"][level]["type"], "rgb": palette.roi_rgb(level)}
    entry = template["segments"][key]
    return {"label": entry["label"], "description": entry["description"], "category": template["category"],
            "type": entry["type"], "modifier": entry.get("modifier"), "region": None,
            "rgb": palette.level_rgb(key)}


def _segment_description(number: int, key: str, template: Mapping[str, Any],
                         algorithm: hd.AlgorithmIdentificationSequence,
                         inputs: str) -> hd.seg.SegmentDescription:
    entry = _description_entry(key, template)
    region = entry["region"]
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=entry["label"],
        segmented_property_category=coded(entry["category"]),
        segmented_property_type=coded(entry["type"]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=tracking_uid(inputs, key),
        tracking_id=entry["description"],
        # Anatomic Region Sequence (0008,2218): the vertebra an ROI lies in.
        anatomic_regions=None if region is None else [coded(region)],
        display_color=palette.cielab(entry["rgb"]),
    )
    # Segment Description (0062,0006) is Type 3 in the Segment Description macro.
    description.SegmentDescription = entry["description"]
    if entry["modifier"] is not None:
        # Segmented Property Type Modifier Code Sequence (0062,0011), e.g. laterality (CID 244).
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            coded(entry["modifier"])]
    return description


def _present(labels: np.ndarray) -> list[int]:
    """Non-zero values of a uint8 label map, increasing (those of its few labelled voxels)."""
    flat = np.asarray(labels, dtype=np.uint8).reshape(-1)
    return [int(v) for v in np.unique(flat[flat != 0])]


def segment_numbers(segmentation: SpineSegmentation) -> dict[int, int]:
    """Map each label ID present in ``segmentation.label_map()`` to its SEG segment number.

    Segment numbers are ``1..N`` in increasing label-ID order (T11 first, then
    T12, L1 ..., sacrum, femurs), so a level's number depends only on which
    levels are present. The trabecular ROI segments follow (:func:`segment_map`).

    Raises
    ------
    ValueError
        If a label ID has no entry in ``segments.json``.
    """
    return _label_numbers(segmentation.label_map())


def _label_numbers(labels: np.ndarray) -> dict[int, int]:
    """:func:`segment_numbers` of the label map ``labels``."""
    present = _present(labels)
    unknown = [v for v in present if v not in LABEL_KEYS]
    if unknown:
        raise ValueError(f"label IDs without a SEG segment template: {unknown}")
    return {label: number for number, label in enumerate(present, start=1)}


def _segment_labels(labels: np.ndarray, trabecular: np.ndarray) -> dict[str, tuple[int, bool, int]]:
    """Every SEG segment: key -> (segment number, of the trabecular map?, label ID), as :func:`segment_map`."""
    segments = {LABEL_KEYS[label]: (number, False, label) for label, number in _label_numbers(labels).items()}
    rois = _present(trabecular)
    unknown = [v for v in rois if v not in VERTEBRA_NAMES]
    if unknown:
        raise ValueError(f"trabecular ROI label IDs without a vertebral level: {unknown}")
    for number, label in enumerate(rois, start=len(segments) + 1):
        segments[roi_key(VERTEBRA_NAMES[label])] = (number, True, label)
    return segments


def segment_map(segmentation: SpineSegmentation) -> dict[str, tuple[int, np.ndarray]]:
    """Every SEG segment: key -> (segment number, ``(z, y, x)`` bool mask).

    Keys are ``segments.json`` structure names (bodies and femurs, numbered
    1..N as :func:`segment_numbers`) then :func:`roi_key` of each vertebral
    level with a non-empty trabecular ROI, numbered N+1 ... in level order.

    Raises
    ------
    ValueError
        If a label ID of the bodies, femurs or trabecular ROIs has no entry in ``segments.json``.
    """
    maps = (segmentation.label_map(), np.asarray(segmentation.trabecular, dtype=np.uint8))
    return {key: (number, maps[roi] == label)
            for key, (number, roi, label) in _segment_labels(*maps).items()}


def _descriptions(segments: Mapping[str, tuple[int, bool, int]], inputs: str) -> list[hd.seg.SegmentDescription]:
    """The Segment Sequence items of :func:`_segment_labels`' segments, in order."""
    template = dicom_templates.load("segments")
    algorithm = algorithm_identification()
    return [_segment_description(number, key, template, algorithm, inputs)
            for key, (number, _, _) in segments.items()]


def seg_reference(series: Series, segmentation: SpineSegmentation) -> pydicom.Dataset:
    """What an SR needs of the SEG :func:`build_seg` makes of the same input, without encoding it.

    The SR (:func:`osteonode.dicom_out.sr.build_sr`) refers to the SEG's
    instance and segments; with this stand-in it can be built, and sent,
    before the SEG's frames are encoded (seconds for a thin-slice CT: bench/README.md).

    Parameters
    ----------
    series, segmentation
        As for :func:`build_seg`.

    Returns
    -------
    pydicom.Dataset
        SOP Class UID (Segmentation Storage), SOP Instance, Series and Study
        Instance UIDs, and the Segment Sequence (labels, numbers, tracking UIDs
        and IDs), each equal to those of :func:`build_seg`'s SEG.

    Raises
    ------
    ValueError
        If a label ID has no template entry.
    """
    inputs = input_key(series.datasets)
    segments = _segment_labels(segmentation.label_map(), np.asarray(segmentation.trabecular, dtype=np.uint8))
    reference = pydicom.Dataset()
    reference.SOPClassUID = SegmentationStorage
    reference.SOPInstanceUID = derived_uid(inputs, "seg-instance")
    reference.SeriesInstanceUID = derived_uid(inputs, "seg-series")
    reference.StudyInstanceUID = series.study_instance_uid
    reference.SegmentSequence = _descriptions(segments, inputs)
    return reference


def _stack_segments(maps: tuple[np.ndarray, np.ndarray],
                    segments: Mapping[str, tuple[int, bool, int]]) -> tuple[int, int, np.ndarray]:
    """The masks of ``segments`` (:func:`_segment_labels`) stacked, over the slab of slices holding a label.

    Parameters
    ----------
    maps : tuple of numpy.ndarray
        The ``(z, y, x)`` uint8 label map and trabecular ROI map (VerSe IDs).
    segments : mapping
        Key -> (segment number, of the trabecular map?, label ID).

    Returns
    -------
    first, last : int
        The slab: slices ``first:last`` (first array axis) of the maps.
    by_segment : numpy.ndarray
        ``(segment, last - first, y, x)`` bool, segments in the order of
        ``segments``: segment-major, so each mask lies in one block and each
        SEG frame (segment, slice) is contiguous. Only the labelled voxels
        are written; the rest stays the untouched (lazily zeroed) memory of
        ``np.zeros``, most of the array (bench/README.md).
    """
    shape = maps[0].shape
    voxels = []  # per map: flat indices of its labelled voxels, and their segments' indices
    for roi, label_map in enumerate(maps):
        index_of = np.full(256, -1, dtype=np.intp)  # label ID -> index in ``segments``
        for i, (_, of_roi, label) in enumerate(segments.values()):
            if of_roi == bool(roi):
                index_of[label] = i
        flat = np.flatnonzero(label_map)
        voxels.append((flat, index_of[label_map.reshape(-1)[flat]]))
    occupied = np.concatenate([flat for flat, _ in voxels]) // (shape[1] * shape[2])
    first, last = int(occupied.min()), int(occupied.max()) + 1
    by_segment = np.zeros((len(segments), last - first, *shape[1:]), dtype=bool)
    for flat, index in voxels:
        z, y, x = np.unravel_index(flat, shape)
        by_segment[index, z - first, y, x] = True
    return first, last, by_segment


class _Segmentation(hd.seg.Segmentation):
    """highdicom's Segmentation, with its pixel array check done in one pass.

    highdicom (0.28) finds whether the segments of a stacked binary array
    overlap by summing them per voxel in uint64
    (``Segmentation._check_and_cast_pixel_array``, a private method): numpy
    then makes one buffered pass per segment over a uint64 array of the
    slab, 1-3 s for the thin-slice series of bench/README.md. This override
    does the same checks (binary values; overlap = some voxel in two
    segments) with the sum in uint8, exact for fewer than 256 segments, and
    leaves any other input to highdicom. It is used only with the highdicom
    versions it was checked against (:data:`_FAST_CHECK_HIGHDICOM`).
    """

    @classmethod
    def _check_and_cast_pixel_array(cls, pixel_array, segment_numbers, segmentation_type, dtype):
        plain = pixel_array.array if isinstance(pixel_array, hd.Volume) else pixel_array
        if (segmentation_type != hd.seg.SegmentationTypeValues.BINARY or plain.dtype != np.uint8
                or plain.ndim != 4 or not 1 < plain.shape[-1] == len(segment_numbers) < 256):
            return super()._check_and_cast_pixel_array(pixel_array, segment_numbers, segmentation_type, dtype)
        if plain.max() > 1:
            raise ValueError("When passing a 4D stack of segments with an integer pixel type, the pixel array "
                             "must be binary.")
        overlap = np.add.reduce(plain, axis=-1, dtype=np.uint8).max() > 1
        return pixel_array, hd.seg.SegmentsOverlapValues.YES if overlap else hd.seg.SegmentsOverlapValues.NO


#: highdicom versions whose private ``Segmentation._check_and_cast_pixel_array`` :class:`_Segmentation` overrides.
_FAST_CHECK_HIGHDICOM = ("0.28.",)
_SegmentationClass = _Segmentation if hd.__version__.startswith(_FAST_CHECK_HIGHDICOM) else hd.seg.Segmentation


def build_seg(series: Series, segmentation: SpineSegmentation) -> hd.seg.Segmentation:
    """Build a binary SEG of the vertebral bodies, proximal femurs and trabecular ROIs on the source grid.

    Parameters
    ----------
    series : Series
        The loaded source CT. ``series.volume.geometry`` gives the grid;
        ``series.datasets`` (headers only) give patient, study and frame of
        reference and become the Referenced Series / Source Image sequences.
    segmentation : SpineSegmentation
        ``label_map()`` (bodies with VerSe IDs, femurs 90/91) and ``trabecular``
        (VerSe IDs): ``(z, y, x)`` uint8 label maps on the grid of
        ``series.volume`` (same shape and axis order as ``series.volume.hu``).

    Returns
    -------
    highdicom.seg.Segmentation
        Segmentation Storage instance (PS3.3 A.51): Segmentation Type BINARY,
        one segment per body / femur label present (label in ``segments.json``)
        and one per level's trabecular ROI (:func:`segment_map`), Recommended
        Display CIELab Value from :mod:`osteonode.dicom_out.palette`, Segment
        Algorithm Type AUTOMATIC with the Algorithm Identification macro,
        Series Description "osteonode SEG", Series/SOP Instance UIDs and the
        Dimension Organization UID (0020,9164) of the Multi-frame Dimension
        module (PS3.3 C.7.6.17) derived from the source instances
        (:func:`osteonode.uids.derived_uid`, roles ``"seg-series"`` /
        ``"seg-instance"`` / ``"seg-dimension-organization"``), so that a
        rebuild differs only in its dates and times; patient and study modules
        copied from the source (same Study Instance UID, see
        :mod:`osteonode.dicom_out.common`), Specific Character Set of the
        source or UTF-8 (:func:`~osteonode.dicom_out.common.settle_character_set`).
        Empty frames are omitted.

    Raises
    ------
    ValueError
        If a label map does not match the volume shape, the label map contains
        no label, or a label has no template entry.
    """
    labels, trabecular = segmentation.label_map(), np.asarray(segmentation.trabecular, dtype=np.uint8)
    for name, label_map in (("label map", labels), ("trabecular ROI map", trabecular)):
        series.volume.require_grid(label_map, name)
    segments = _segment_labels(labels, trabecular)
    if not any(not roi for _, roi, _ in segments.values()):
        raise ValueError("the segmentation contains no labelled structure")

    inputs = input_key(series.datasets)

    first, last, by_segment = _stack_segments((labels, trabecular), segments)
    stacked = np.moveaxis(by_segment.view(np.uint8), 0, -1)  # (z, y, x, segment), as highdicom takes it
    numbers = [number for number, _, _ in segments.values()]
    descriptions = _descriptions(segments, inputs)
    seg = _SegmentationClass(
        source_images=with_type2_defaults(series.datasets),
        pixel_array=series.volume.geometry[first:last].with_array(stacked, channels={"SegmentNumber": numbers}),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(inputs, "seg-series"),
        series_number=series_number("seg"),
        sop_instance_uid=derived_uid(inputs, "seg-instance"),
        instance_number=1,
        **equipment_attributes(),
        content_label="OSTEONODE",
        content_description="Vertebral bodies, trabecular ROIs, proximal femurs (osteonode)",
        series_description=SEG_SERIES_DESCRIPTION,
        specific_character_set=UTF8,
    )
    # highdicom draws the Dimension Organization UID at random; derive it like every other UID.
    dimension_organization_uid = derived_uid(inputs, "seg-dimension-organization")
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimension_organization_uid
    copy_optional_identity(series.datasets[0], seg)
    settle_character_set(seg, series.datasets[0])
    log.info("built SEG: %d segment(s) (%s), %d frame(s)", len(descriptions), ", ".join(segments),
             int(seg.NumberOfFrames))
    return seg


__all__ = ["build_seg", "seg_reference", "algorithm_identification", "segment_numbers", "segment_map", "roi_key",
           "tracking_uid", "tracking_id", "LABEL_KEYS", "ROI_SUFFIX", "SEG_SERIES_DESCRIPTION"]
