"""Encode an :class:`~osteonode.result.AnalysisResult` as a Comprehensive 3D SR.

The document is a TID 1500 "Measurement Report" (PS3.16 A, TID 1500) in a
Comprehensive 3D SR Storage instance (PS3.3 A.35.13):

* Row 1-4: title (126000, DCM, "Imaging Measurement Report"), language
  (TID 1204), observation context with osteonode as device observer
  (TID 1001/1004), procedure reported (25045-6, LN, "CT unspecified body region").
* Row 5: no Image Library (TID 1600, optional): highdicom builds it at about
  25 ms per source image, 8 s for a 300-slice series; the source images are
  listed in the evidence (Current Requested Procedure Evidence Sequence).
* Row 6: Imaging Measurements, with

  - evaluable series: one TID 1411 "Volumetric ROI Measurements" group per
    reported level, referencing the SEG segment of that level
    (121191, DCM, "Referenced Segment") and the source series
    (121232, DCM, "Source series for segmentation"), with the tracking
    identifier and UID of that SEG segment, finding
    category/type/site (CID 7151 vertebra codes), the algorithm (TID 4019) and
    TID 300 measurements: attenuation coefficient (112031, DCM) with derivation
    mean / median / standard deviation (CID 7464) in ``[hnsf'U]``, plus the
    level label confidence as (111012, DCM, "Certainty of Finding") in ``%``
    (the finding being the vertebral level of the group);
  - not-evaluable series: one TID 1501 group referencing every source image
    (121112, DCM, "Source of Measurement") with the algorithm and the
    finding (373121007, SCT, "Not Evaluated") (CID 3703).

* Row 12: Qualitative Evaluations (C0034375, UMLS): the bone status as CODE
  (121071, DCM, "Finding") = Normal / Osteopenia / Osteoporosis / Indeterminate
  / Not Evaluated (SNOMED CT), and TEXT items: (121106, DCM, "Comment") with
  the basis of the category and, when not evaluable, the reason; (370129005,
  SCT, "Measurement Method") with the level identification method.

Only standard coding schemes are used (``dicom_templates/sr_codes.json``), so
no private scheme needs a Coding Scheme Identification Sequence (PS3.3
C.12.1.1.2) and dciodvfy knows every designator. The document is encoded in
UTF-8 (see :mod:`osteonode.dicom_out.common`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

import dicom_templates
from osteonode import __version__
from osteonode.dicom_out.common import (UTF8, coded, copy_optional_identity, equipment_attributes,
                                        series_number, settle_character_set, source_datasets,
                                        with_type2_defaults)
from osteonode.dicom_out.seg import tracking_id, tracking_uid
from osteonode.dicom_out.summary import ordered_levels, status_comments
from osteonode.result import AnalysisResult, LevelResult
from osteonode.uids import derived_uid
from osteonode.volume import Series

log = logging.getLogger(__name__)

SR_SERIES_DESCRIPTION = "osteonode Bone Health SR"


def _algorithm() -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification of osteonode (version = ``osteonode.__version__``)."""
    algo = dicom_templates.load("algorithm")
    return hd.sr.AlgorithmIdentification(name=algo["name"], version=__version__,
                                         family=coded(algo["family"]),
                                         manufacturer=algo["manufacturer"])


def _observation_context(source_series_uid: str) -> hd.sr.ObservationContext:
    """TID 1001 with osteonode as the device observer (TID 1004)."""
    algo = dicom_templates.load("algorithm")
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(source_series_uid, "sr-device-observer"),
        name=algo["name"],
        manufacturer_name=algo["manufacturer"],
        model_name=algo["manufacturer_model_name"],
        serial_number=algo["device_serial_number"],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                      observer_identifying_attributes=device))


def _segments_by_label(seg: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    """Segment Sequence items of ``seg`` keyed by Segment Label (0062,0005)."""
    return {str(item.SegmentLabel): item for item in seg.SegmentSequence}


def _level_group(level: str, measures: LevelResult, seg: pydicom.Dataset, segment: pydicom.Dataset,
                 source_series_uid: str, sr_codes: Mapping, segment_template: Mapping,
                 algorithm: hd.sr.AlgorithmIdentification,
                 ) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group of one vertebral level."""
    hu = coded(sr_codes["unit_hounsfield"])
    attenuation = coded(sr_codes["attenuation_coefficient"])
    site_code = coded(segment_template["type"])
    measurements = [
        hd.sr.Measurement(name=attenuation, value=float(measures.trabecular_hu_mean), unit=hu,
                          derivation=coded(sr_codes["mean"])),
        hd.sr.Measurement(name=attenuation, value=float(measures.trabecular_hu_median), unit=hu,
                          derivation=coded(sr_codes["median"])),
        hd.sr.Measurement(name=attenuation, value=float(measures.trabecular_hu_sd), unit=hu,
                          derivation=coded(sr_codes["standard_deviation"])),
        hd.sr.Measurement(name=coded(sr_codes["label_confidence"]),
                          value=round(100.0 * measures.label_confidence, 6), unit=coded(sr_codes["unit_percent"])),
    ]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        # The SEG segment's Tracking UID/ID, so SEG segment and SR group are one tracked object.
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=str(segment.get("TrackingUID") or tracking_uid(source_series_uid, level)),
            identifier=str(segment.get("TrackingID") or tracking_id(level))),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=int(segment.SegmentNumber),
            source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
        ),
        finding_category=coded(sr_codes["finding_category"]),
        finding_type=site_code,
        finding_sites=[hd.sr.FindingSite(anatomic_location=site_code)],
        algorithm_id=algorithm,
        measurements=measurements,
    )


def _source_image_references(datasets: Sequence[pydicom.Dataset]) -> list[hd.sr.SourceImageForMeasurementGroup]:
    """(121112, DCM, "Source of Measurement") references of the image instances among ``datasets``.

    Instances that highdicom does not accept as source images (no image pixel
    description, or a non-image modality) are left out; they stay in the evidence.
    """
    references = []
    for ds in datasets:
        try:
            references.append(hd.sr.SourceImageForMeasurementGroup.from_source_image(ds))
        except (ValueError, AttributeError) as exc:
            log.debug("instance not referenced as a source image: %s", exc)
    return references


def _not_evaluable_group(datasets: Sequence[pydicom.Dataset], source_series_uid: str, sr_codes: Mapping,
                         algorithm: hd.sr.AlgorithmIdentification,
                         ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group that references every source image and states "not evaluable"."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(source_series_uid, "tracking-series"),
            identifier="osteonode bone health analysis of the source series"),
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=coded(sr_codes["bone_status"]),
            value=coded(sr_codes["bone_status_values"]["not_evaluable"]))],
        source_images=_source_image_references(datasets) or None,
    )


def _qualitative_evaluations(result: AnalysisResult, sr_codes: Mapping) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 container: bone status (row 13 CODE) and its texts (row 14 TEXT)."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    status_key = "not_evaluable" if result.status == "not_evaluable" else result.bone_status.category
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(name=coded(sr_codes["bone_status"]),
                              value=coded(sr_codes["bone_status_values"][status_key]),
                              relationship_type=contains),
    ]
    items += [hd.sr.TextContentItem(name=coded(sr_codes["comment"]), value=comment, relationship_type=contains)
              for comment in status_comments(result)]
    if result.labelling_method:
        items.append(hd.sr.TextContentItem(name=coded(sr_codes["labelling_method"]),
                                           value=result.labelling_method, relationship_type=contains))
    container = hd.sr.ContainerContentItem(name=coded(sr_codes["qualitative_evaluations"]),
                                           relationship_type=contains)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def build_sr(series: Series | Sequence[pydicom.Dataset], result: AnalysisResult,
             seg: hd.seg.Segmentation | None) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 bone-health report of one CT series.

    Parameters
    ----------
    series : Series or sequence of pydicom.Dataset
        The source CT, or only its instances' headers (pixel data not needed),
        e.g. when the series could not be loaded as a volume. The instances
        become the evidence; patient and study modules are copied from the first one
        (same Study Instance UID; absent Type 2 attributes are written empty).
    result : AnalysisResult
        The analysis result. For ``status == "ok"`` every level in
        ``result.levels`` becomes a TID 1411 group; HU values are written in
        ``[hnsf'U]`` as given (mean, median, SD of the trabecular ROI).
        For ``status == "not_evaluable"`` the report states "Not Evaluated"
        with ``result.reason`` as a comment.
    seg : highdicom.seg.Segmentation or None
        The SEG from :func:`osteonode.dicom_out.seg.build_seg` of this series;
        required when the result is evaluable and ignored otherwise. Segments
        are matched to levels by Segment Label (from ``segments.json``); each
        SR group reuses its segment's Tracking ID and Tracking UID.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        Comprehensive 3D SR Storage instance (PS3.3 A.35.13), Series
        Description "osteonode Bone Health SR", Completion Flag COMPLETE,
        Verification Flag UNVERIFIED, Series/SOP Instance UIDs derived from the
        source Series Instance UID (roles ``"sr-series"``, ``"sr-instance"``),
        Specific Character Set of the source or UTF-8
        (:func:`~osteonode.dicom_out.common.settle_character_set`), standard
        coding schemes only.

    Raises
    ------
    ValueError
        If there is no source instance, the result belongs to another series,
        an evaluable result has no SEG or no level, a level has no segment in
        the SEG, or a level name is unknown.
    """
    datasets = source_datasets(series)
    source_uid = str(datasets[0].get("SeriesInstanceUID", ""))
    if result.series_instance_uid != source_uid:
        raise ValueError("the result does not belong to the given series")
    sr_codes = dicom_templates.load("sr_codes")
    segment_templates = dicom_templates.load("segments")["segments"]
    algorithm = _algorithm()

    evaluable = result.status == "ok"
    if evaluable:
        if seg is None:
            raise ValueError("an evaluable result needs the SEG its measurements refer to")
        if not result.levels:
            raise ValueError("an evaluable result has no measured level")
        segments = _segments_by_label(seg)
        groups = []
        for level in ordered_levels(result.levels):
            segment = segments.get(segment_templates[level]["label"])
            if segment is None:
                raise ValueError(f"the SEG has no segment for level {level}")
            groups.append(_level_group(level, result.levels[level], seg, segment, source_uid,
                                       sr_codes, segment_templates[level], algorithm))
        evidence: list[pydicom.Dataset] = [*with_type2_defaults(datasets), seg]
    else:
        groups = [_not_evaluable_group(datasets, source_uid, sr_codes, algorithm)]
        evidence = with_type2_defaults(datasets)

    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(source_uid),
        procedure_reported=coded(sr_codes["procedure_reported"]),
        imaging_measurements=groups,
        title=coded(sr_codes["title"]),
    )
    report[0].ContentSequence.append(_qualitative_evaluations(result, sr_codes))

    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=derived_uid(source_uid, "sr-series"),
        series_number=series_number("sr"),
        sop_instance_uid=derived_uid(source_uid, "sr-instance"),
        instance_number=1,
        **equipment_attributes(),
        is_complete=True,
        is_final=True,
        is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
        specific_character_set=UTF8,
    )
    copy_optional_identity(datasets[0], sr)
    settle_character_set(sr, datasets[0])
    log.info("built SR: status %s, %d measurement group(s)", result.status, len(groups))
    return sr


__all__ = ["build_sr", "SR_SERIES_DESCRIPTION"]
