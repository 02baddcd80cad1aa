"""Encode the vertebral-body label map as a binary DICOM Segmentation (SEG).

The SEG is a Segmentation Storage instance (PS3.3 A.51) with one segment per
level (and proximal femur) present in :meth:`SpineSegmentation.label_map`. Segments are described by
``dicom_templates/segments.json`` (Segment Description macro, PS3.3 C.8.20.4;
codes from PS3.16 CID 7150 "Segmentation Property Categories" and CID 7151
"Segmentation Property Types").

The frames are placed on the source grid through :class:`highdicom.Volume`:
the label map is wrapped with the affine of the loaded series, so highdicom
derives Plane Position / Orientation (PS3.3 C.7.6.16.2.3/4) and the per-frame
source image references from geometry rather than from array order. This is
correct for any patient orientation and any slice order of the source.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import highdicom as hd
import numpy as np

import dicom_templates
from osteonode import __version__
from osteonode.anatomy import FEMUR_LEFT, FEMUR_RIGHT, VERTEBRA_NAMES
from osteonode.dicom_out.common import (UTF8, coded, copy_optional_identity, equipment_attributes,
                                        series_number, settle_character_set, with_type2_defaults)
from osteonode.segment import SpineSegmentation
from osteonode.uids import derived_uid
from osteonode.volume import Series

log = logging.getLogger(__name__)

SEG_SERIES_DESCRIPTION = "osteonode SEG"

#: Label-map ID -> key in ``segments.json``.
LABEL_KEYS: dict[int, str] = {**VERTEBRA_NAMES, FEMUR_RIGHT: "femur_right", FEMUR_LEFT: "femur_left"}


def algorithm_identification() -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence of osteonode (PS3.3 C.8.20.2, CID 7162 family).

    The version is ``osteonode.__version__``; name, family and source come from
    ``dicom_templates/algorithm.json``.
    """
    algo = dicom_templates.load("algorithm")
    return hd.AlgorithmIdentificationSequence(
        name=algo["name"], family=coded(algo["family"]), version=__version__, source=algo["source"])


def tracking_uid(source_series_uid: str, key: str) -> str:
    """Tracking Unique Identifier shared by the SEG segment and the SR group of ``key``.

    Parameters
    ----------
    source_series_uid : str
        Series Instance UID of the source CT.
    key : str
        Level name, e.g. ``"L1"``.
    """
    return str(derived_uid(source_series_uid, f"tracking-{key}"))


def tracking_id(key: str) -> str:
    """Human-readable Tracking ID of the structure ``key`` (e.g. ``"L1 vertebral body"``)."""
    entry = dicom_templates.load("segments")["segments"][key]
    return str(entry["description"])


def _segment_description(number: int, key: str, entry: Mapping[str, Any], category: Mapping[str, str],
                         algorithm: hd.AlgorithmIdentificationSequence,
                         source_series_uid: str) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=entry["label"],
        segmented_property_category=coded(category),
        segmented_property_type=coded(entry["type"]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=tracking_uid(source_series_uid, key),
        tracking_id=entry["description"],
        display_color=hd.color.CIELabColor.from_rgb(*entry["color_rgb"]),
    )
    # Segment Description (0062,0006) is Type 3 in the Segment Description macro.
    description.SegmentDescription = entry["description"]
    if "modifier" in entry:
        # Segmented Property Type Modifier Code Sequence (0062,0011), e.g. laterality (CID 244).
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            coded(entry["modifier"])]
    return description


def segment_numbers(segmentation: SpineSegmentation) -> dict[int, int]:
    """Map each label ID present in ``segmentation.label_map()`` to its SEG segment number.

    Segment numbers are ``1..N`` in increasing label-ID order (T11 first, then
    T12, L1 ..., sacrum, femurs), so a level's number depends only on which
    levels are present.

    Raises
    ------
    ValueError
        If a label ID has no entry in ``segments.json``.
    """
    counts = np.bincount(segmentation.label_map().ravel(), minlength=256)
    present = [int(v) for v in np.flatnonzero(counts) if v != 0]
    unknown = [v for v in present if v not in LABEL_KEYS]
    if unknown:
        raise ValueError(f"label IDs without a SEG segment template: {unknown}")
    return {label: number for number, label in enumerate(present, start=1)}


def build_seg(series: Series, segmentation: SpineSegmentation) -> hd.seg.Segmentation:
    """Build a binary SEG of the vertebral bodies and proximal femurs on the grid of the source series.

    Parameters
    ----------
    series : Series
        The loaded source CT. ``series.hd_volume`` gives the geometry;
        ``series.datasets`` (headers only) give patient, study and frame of
        reference and become the Referenced Series / Source Image sequences.
    segmentation : SpineSegmentation
        ``label_map()`` is a ``(z, y, x)`` uint8 label map with VerSe IDs (and 90/91) on the grid
        of ``series.volume`` (same shape and axis order as ``series.volume.hu``).

    Returns
    -------
    highdicom.seg.Segmentation
        Segmentation Storage instance (PS3.3 A.51): Segmentation Type BINARY,
        one segment per label present (label in ``segments.json``), Segment
        Algorithm Type AUTOMATIC with the Algorithm Identification macro,
        Series Description "osteonode SEG", Series/SOP Instance UIDs and the
        Dimension Organization UID (0020,9164) of the Multi-frame Dimension
        module (PS3.3 C.7.6.17) derived from the source Series Instance UID
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
        If the label map does not match the volume shape, contains no label, or
        contains a label without a template entry.
    """
    bodies = segmentation.label_map()
    if bodies.shape != series.volume.shape:
        raise ValueError(f"label map shape {bodies.shape} != volume shape {series.volume.shape}")
    numbers = segment_numbers(segmentation)
    if not numbers:
        raise ValueError("the segmentation contains no labelled structure")

    template = dicom_templates.load("segments")
    algorithm = algorithm_identification()
    source_uid = series.series_instance_uid

    # Label-map style array: pixel value = segment number (1..N), 0 = background.
    lut = np.zeros(256, dtype=np.uint8)
    for label, number in numbers.items():
        lut[label] = number
    labelmap = lut[bodies.astype(np.uint8, copy=False)]
    descriptions = [
        _segment_description(number, LABEL_KEYS[label], template["segments"][LABEL_KEYS[label]],
                             template["category"], algorithm, source_uid)
        for label, number in numbers.items()
    ]
    seg = hd.seg.Segmentation(
        source_images=with_type2_defaults(series.datasets),
        pixel_array=series.hd_volume.with_array(labelmap),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(source_uid, "seg-series"),
        series_number=series_number("seg"),
        sop_instance_uid=derived_uid(source_uid, "seg-instance"),
        instance_number=1,
        **equipment_attributes(),
        content_label="OSTEONODE",
        content_description="Vertebral bodies and proximal femurs (osteonode)",
        series_description=SEG_SERIES_DESCRIPTION,
        specific_character_set=UTF8,
    )
    # highdicom draws the Dimension Organization UID at random; derive it like every other UID.
    dimension_organization_uid = derived_uid(source_uid, "seg-dimension-organization")
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimension_organization_uid
    copy_optional_identity(series.datasets[0], seg)
    settle_character_set(seg, series.datasets[0])
    log.info("built SEG: %d segment(s) (%s), %d frame(s)", len(descriptions),
             ", ".join(LABEL_KEYS[label] for label in numbers), int(seg.NumberOfFrames))
    return seg


__all__ = ["build_seg", "algorithm_identification", "segment_numbers", "tracking_uid", "tracking_id",
           "LABEL_KEYS", "SEG_SERIES_DESCRIPTION"]
