"""Encode an :class:`~osteonode.result.AnalysisResult` as a Comprehensive 3D SR.

The document is a TID 1500 "Measurement Report" (PS3.16 A, TID 1500) in a
Comprehensive 3D SR Storage instance (PS3.3 A.35.13):

* Row 1-4: title (126000, DCM, "Imaging Measurement Report"), language
  (TID 1204), observation context with osteonode as device observer
  (TID 1001/1004), procedure reported (25045-6, LN, "CT unspecified body region").
* Row 5: no Image Library (TID 1600, optional): highdicom builds it source
  image by source image, seconds for a 300-slice series (bench/README.md,
  "Figures behind design choices"); the source images are listed in the
  evidence (Current Requested Procedure Evidence Sequence).
* Row 6: Imaging Measurements, with

  - evaluable series: two TID 1411 "Volumetric ROI Measurements" groups per
    reported level, each referencing one SEG segment (121191, DCM,
    "Referenced Segment") and the source series (121232, DCM, "Source series
    for segmentation"), with the tracking identifier and UID of that SEG
    segment, finding category, finding site (the level's vertebra, CID 7151)
    and the algorithm (TID 4019):

    * the **vertebral body** group (segment of the body, finding type the
      vertebra), with the TID 300 measurements

      - the level label confidence as (111012, DCM, "Certainty of Finding") in
        ``%`` (the finding being the vertebral level of the group);
      - vertebral body heights as (121207, DCM, "Height", CID 7470) in ``mm``,
        each with its own finding site (the vertebra) and topographical
        modifier (106233006, SCT) Anterior / Central / Posterior (CID 2) for the
        anterior / middle / posterior height;
      - height ratios as (118586006, SCT, "Ratio") in UCUM ``1`` ("no units",
        CID 7181), each named by an Equivalent Meaning of Concept Name TEXT;

      and one qualitative evaluation (TID 1411 row 15): (125605004, SCT,
      "Fracture of bone") = (415684004, SCT, "Suspected") for Genant grade
      >= 1, (272519000, SCT, "Absent") for grade 0, (373068000, SCT,
      "Undetermined") for a measured but ungraded body, with the Genant grade
      as a HAS PROPERTIES TEXT (121106, DCM, "Comment"): SNOMED CT has no
      concept for a Genant grade. A body cut by the edge of the scan
      (``cut_by_field_of_view``) has no heights, no ratios and no fracture
      evaluation, whatever the level result holds;
    * the **trabecular ROI** group (segment of the level's trabecular ROI,
      finding type (3138006, SCT, "Bone")), with the TID 300 measurements

      - attenuation coefficient (112031, DCM) with derivation mean / median /
        standard deviation (CID 7464) in ``[hnsf'U]``;
      - when known, vBMD as (C0005938, UMLS, "Bone Density") in ``mg/cm3``
        (CID 301) with derivation (373098007, SCT, "Mean") and, as HAS CONCEPT
        MOD (TID 1210), a TEXT (121050, DCM, "Equivalent Meaning of Concept
        Name") saying volumetric, calcium hydroxyapatite, phantomless
        calibration (no standard code exists for that method);

    and, in either group, one CONTAINS TEXT (121106, DCM, "Comment") per
    quality note of that part (TID 1411 qualitative evaluations as text;
    :func:`osteonode.dicom_out.summary.level_notes`): the words of each
    quality flag (:data:`osteonode.dicom_out.summary.QUALITY_FLAG_TEXT`; "cut by the
    edge of the scan" and a Genant grade near a limit in the body group, the
    others in the ROI group), the
    excluded focal volume and "not used for the bone status";
  - not-evaluable series: one TID 1501 group referencing every source image
    (121112, DCM, "Source of Measurement") with the algorithm and the
    finding (373121007, SCT, "Not Evaluated") (CID 3703).

* Row 12: Qualitative Evaluations (C0034375, UMLS): the bone status as CODE
  (121071, DCM, "Finding") = Normal / Osteopenia / Osteoporosis / Indeterminate
  / Not Evaluated (SNOMED CT), with HAS PROPERTIES TEXT (121106, DCM,
  "Comment") children "Statistic: ..." (the statistic the rule used) and
  "Uncertainty: ..." (when the category would change within the measurement
  uncertainty), each when the result has it, and TEXT items: (121106, DCM, "Comment") with
  the basis of the category and, when not evaluable, the reason; (370129005,
  SCT, "Measurement Method") with the level identification method. Then, when
  the result has them:

  - (122505, DCM, "Calibration") = (111222, DCM, "Succeeded") for a plausible,
    (111224, DCM, "Failed") for an implausible phantomless calibration (CID
    6042), with HAS PROPERTIES TEXT (122422, DCM, "Calibration Method") and
    Comment (the calibration note);
  - (C0005938, UMLS, "Bone Density") = (373121007, SCT, "Not Evaluated") when
    an evaluable series has no vBMD, with the reason as a Comment;
  - (385420005, SCT, "Contrast media") = Absent / Present / Undetermined
    (CID 240) for the detected phase non-contrast / arterial, portal venous or
    delayed / unknown, with the phase, aortic attenuation and handling as a
    Comment: no standard code names a CT contrast phase ((109058, DCM,
    "Contrast Phase") is a phase of a cardiac catheterization).

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
from osteonode.dicom_out.common import (
    UTF8,
    coded,
    copy_optional_identity,
    equipment_attributes,
    series_number,
    settle_character_set,
    source_datasets,
    with_type2_defaults,
)
from osteonode.dicom_out.seg import roi_key, tracking_id
from osteonode.dicom_out.summary import (
    fracture_texture,
    genant,
    level_notes,
    ordered_levels,
    reported_heights,
    status_comments,
    status_details,
)
from osteonode.result import AnalysisResult, LevelResult, PriorReport
from osteonode.uids import derived_uid, input_key
from osteonode.volume import Series

log = logging.getLogger(__name__)

SR_SERIES_DESCRIPTION = "osteonode Bone Health SR"

#: How the Comment of the contrast evaluation names each :class:`~osteonode.result.ContrastPhase` phase.
CONTRAST_PHASE_NAMES = {"non_contrast": "non-contrast", "arterial": "arterial", "portal_venous": "portal venous",
                        "delayed": "delayed", "unknown": "unknown"}


def _algorithm() -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification of osteonode (version = ``osteonode.__version__``)."""
    algo = dicom_templates.load("algorithm")
    return hd.sr.AlgorithmIdentification(name=algo["name"], version=__version__,
                                         family=coded(algo["family"]),
                                         manufacturer=algo["manufacturer"])


def _observation_context(inputs: str) -> hd.sr.ObservationContext:
    """TID 1001 with osteonode as the device observer (TID 1004)."""
    algo = dicom_templates.load("algorithm")
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(inputs, "sr-device-observer"),
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


def _add_children(item: pydicom.Dataset, children: Sequence[hd.sr.ContentItem]) -> None:
    """Append ``children`` to the Content Sequence of ``item``, creating it when absent; nothing when empty."""
    if not children:
        return
    if "ContentSequence" not in item:
        item.ContentSequence = hd.sr.ContentSequence()
    item.ContentSequence.extend(children)


def _text(name: Mapping, value: str, relationship: hd.sr.RelationshipTypeValues) -> hd.sr.TextContentItem:
    """A TEXT content item with the concept name of the template entry ``name``."""
    return hd.sr.TextContentItem(name=coded(name), value=value, relationship_type=relationship)


def _named(measurement: hd.sr.Measurement, meaning: str, sr_codes: Mapping) -> hd.sr.Measurement:
    """``measurement`` with (121050, DCM, "Equivalent Meaning of Concept Name") = ``meaning`` (TID 1210)."""
    _add_children(measurement[0], [_text(sr_codes["equivalent_meaning"], meaning,
                                         hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD)])
    return measurement


def _roi_measurements(measures: LevelResult, sr_codes: Mapping) -> list[hd.sr.Measurement]:
    """TID 300 measurements of a level's trabecular ROI: HU mean, median, SD and vBMD (when known)."""
    hu = coded(sr_codes["unit_hounsfield"])
    attenuation = coded(sr_codes["attenuation_coefficient"])
    measurements = [
        hd.sr.Measurement(name=attenuation, value=float(value), unit=hu, derivation=coded(sr_codes[derivation]))
        for derivation, value in (("mean", measures.trabecular_hu_mean), ("median", measures.trabecular_hu_median),
                                  ("standard_deviation", measures.trabecular_hu_sd))
    ]
    if measures.vbmd_mg_cm3 is not None:
        # vBMD is calibrated from the mean trabecular attenuation, hence derivation Mean.
        measurements.append(_named(
            hd.sr.Measurement(name=coded(sr_codes["bone_density"]), value=float(measures.vbmd_mg_cm3),
                              unit=coded(sr_codes["unit_mg_per_cm3"]), derivation=coded(sr_codes["mean"])),
            sr_codes["vbmd_equivalent_meaning"], sr_codes))
    return measurements


def _body_measurements(measures: LevelResult, site: hd.sr.CodedConcept,
                       sr_codes: Mapping) -> list[hd.sr.Measurement]:
    """TID 300 measurements of a vertebral body: label certainty, heights and height ratios.

    Heights and ratios are left out for a body cut by the edge of the scan
    (``measures.cut_by_field_of_view``), whatever the level result holds.

    Raises
    ------
    ValueError
        If ``measures.height_ratios`` has a ratio without a name in ``sr_codes.json``.
    """
    measurements = [
        hd.sr.Measurement(name=coded(sr_codes["label_confidence"]),
                          value=round(100.0 * measures.label_confidence, 6), unit=coded(sr_codes["unit_percent"])),
    ]
    heights = dict(zip(("anterior", "middle", "posterior"), reported_heights(measures), strict=True))
    measurements += [
        hd.sr.Measurement(name=coded(sr_codes["height"]), value=float(height), unit=coded(sr_codes["unit_mm"]),
                          finding_sites=[hd.sr.FindingSite(
                              anatomic_location=site,
                              topographical_modifier=coded(sr_codes["height_positions"][position]))])
        for position, height in heights.items() if height is not None
    ]
    ratios = {} if measures.cut_by_field_of_view else (measures.height_ratios or {})
    meanings = sr_codes["height_ratio_meanings"]
    unknown = sorted(set(ratios) - set(meanings))
    if unknown:
        raise ValueError(f"height ratio(s) without an SR concept in sr_codes.json: {unknown}")
    measurements += [
        _named(hd.sr.Measurement(name=coded(sr_codes["ratio"]), value=float(ratios[key]),
                                 unit=coded(sr_codes["unit_no_units"])), meaning, sr_codes)
        for key, meaning in meanings.items() if key in ratios
    ]
    return measurements


def _fracture_evaluation(level: str, measures: LevelResult, sr_codes: Mapping
                         ) -> hd.sr.QualitativeEvaluation | None:
    """(125605004, SCT, "Fracture of bone") of one level with its Genant grade as a Comment.

    A second Comment holds seed 003's texture features when the level has them
    (:func:`osteonode.dicom_out.summary.fracture_texture`).

    Suspected for Genant grade >= 1, Absent for grade 0, Undetermined when the
    body was measured (a height is known) but not graded; ``None`` when there
    is neither a grade nor a height, or the body is cut by the edge of the scan.
    """
    if measures.cut_by_field_of_view:
        return None  # the heights of a cut body are not those of the vertebra
    if measures.fracture_suspected is not None:
        key = "suspected" if measures.fracture_suspected else "absent"
    elif any(h is not None for h in (measures.height_anterior_mm, measures.height_middle_mm,
                                     measures.height_posterior_mm)):
        key = "undetermined"
    else:
        return None
    evaluation = hd.sr.QualitativeEvaluation(name=coded(sr_codes["fracture"]),
                                             value=coded(sr_codes["fracture_values"][key]))
    grade = "not graded" if measures.genant_grade is None else genant(measures.genant_grade)
    comments = [f"Genant semi-quantitative grade: {grade} (Genant et al. 1993)"]
    texture = fracture_texture(level, measures)
    if texture is not None:
        comments.append(texture)
    _add_children(evaluation[0], [_text(sr_codes["comment"], text, hd.sr.RelationshipTypeValues.HAS_PROPERTIES)
                                  for text in comments])
    return evaluation


def _group(key: str, seg: pydicom.Dataset, segment: pydicom.Dataset, source_series_uid: str, sr_codes: Mapping,
           finding_type: hd.sr.CodedConcept, site: hd.sr.CodedConcept, algorithm: hd.sr.AlgorithmIdentification,
           measurements: Sequence[hd.sr.Measurement], evaluations: Sequence[hd.sr.QualitativeEvaluation],
           notes: Sequence[str]) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group on one SEG segment (``key``: a level or :func:`~osteonode.dicom_out.seg.roi_key`).

    ``notes`` become CONTAINS TEXT (121106, DCM, "Comment") items of the group
    (TID 1411 qualitative evaluations as text).
    """
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        # The SEG segment's Tracking UID/ID, so SEG segment and SR group are one tracked object.
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=str(segment.TrackingUID),
            identifier=str(segment.get("TrackingID") or tracking_id(key))),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=int(segment.SegmentNumber),
            source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
        ),
        finding_category=coded(sr_codes["finding_category"]),
        finding_type=finding_type,
        finding_sites=[hd.sr.FindingSite(anatomic_location=site)],
        algorithm_id=algorithm,
        measurements=list(measurements),
        qualitative_evaluations=list(evaluations) or None,
    )
    _add_children(group[0], [_text(sr_codes["comment"], note, hd.sr.RelationshipTypeValues.CONTAINS)
                             for note in notes])
    return group


def _level_groups(level: str, measures: LevelResult, seg: pydicom.Dataset, segments: Mapping[str, pydicom.Dataset],
                  source_series_uid: str, sr_codes: Mapping, segment_templates: Mapping,
                  algorithm: hd.sr.AlgorithmIdentification,
                  ) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """The two TID 1411 groups of one level: vertebral body, then trabecular ROI (see the module docstring).

    Raises
    ------
    ValueError
        If the SEG lacks the body or the trabecular ROI segment of ``level``.
    """
    labels = {"body": segment_templates["segments"][level]["label"],
              "roi": segment_templates["trabecular_roi"]["label"].format(level=level)}
    missing = [part for part, label in labels.items() if label not in segments]
    if missing:
        raise ValueError(f"the SEG has no {' and no '.join(missing)} segment for level {level}")
    site = coded(segment_templates["segments"][level]["type"])
    fracture = _fracture_evaluation(level, measures, sr_codes)
    body = _group(level, seg, segments[labels["body"]], source_series_uid, sr_codes, site, site, algorithm,
                  _body_measurements(measures, site, sr_codes), [] if fracture is None else [fracture],
                  level_notes(measures, "body"))
    roi = _group(roi_key(level), seg, segments[labels["roi"]], source_series_uid, sr_codes,
                 coded(segment_templates["trabecular_roi"]["type"]), site, algorithm,
                 _roi_measurements(measures, sr_codes), [], level_notes(measures, "roi"))
    return [body, roi]


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


def _not_evaluable_group(datasets: Sequence[pydicom.Dataset], inputs: str, sr_codes: Mapping,
                         algorithm: hd.sr.AlgorithmIdentification,
                         ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group that references every source image and states "not evaluable"."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(inputs, "tracking-series"),
            identifier="osteonode bone health analysis of the source series"),
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=coded(sr_codes["bone_status"]),
            value=coded(sr_codes["bone_status_values"]["not_evaluable"]))],
        source_images=_source_image_references(datasets) or None,
    )


def _explained(name: Mapping, value: Mapping, texts: Sequence[tuple[Mapping, str]]) -> hd.sr.CodeContentItem:
    """CONTAINS CODE ``name`` = ``value`` with HAS PROPERTIES TEXT children ``(concept name, text)``."""
    item = hd.sr.CodeContentItem(name=coded(name), value=coded(value),
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    _add_children(item, [_text(concept, text, hd.sr.RelationshipTypeValues.HAS_PROPERTIES)
                         for concept, text in texts])
    return item


def _calibration_and_contrast(result: AnalysisResult, sr_codes: Mapping) -> list[hd.sr.CodeContentItem]:
    """Row 13 CODE items on the vBMD calibration, a missing vBMD and the contrast phase (module docstring)."""
    items = []
    calibration = result.calibration
    if calibration is not None:
        texts = [(sr_codes["calibration_method"], calibration.method)]
        texts += [(sr_codes["comment"], calibration.note)] if calibration.note else []
        status = "plausible" if calibration.plausible else "implausible"
        items.append(_explained(sr_codes["calibration"], sr_codes["calibration_values"][status], texts))
    if result.status == "ok" and all(level.vbmd_mg_cm3 is None for level in result.levels.values()):
        if calibration is None:
            reason = "no phantomless calibration was performed"
        else:
            reason = calibration.note or "the phantomless calibration is not plausible"
        items.append(_explained(sr_codes["bone_density"], sr_codes["bone_status_values"]["not_evaluable"],
                                [(sr_codes["comment"], f"vBMD not evaluable: {reason}")]))
    contrast = result.contrast
    if contrast is not None:
        text = f"contrast phase: {CONTRAST_PHASE_NAMES[contrast.phase]}"
        if contrast.aorta_hu is not None:
            text += f" (aortic attenuation {contrast.aorta_hu:.0f} HU)"
        if contrast.handling:
            text += f"; {contrast.handling}"
        items.append(_explained(sr_codes["contrast_media"], sr_codes["contrast_values"][contrast.phase],
                                [(sr_codes["comment"], text)]))
    return items


def _qualitative_evaluations(result: AnalysisResult, sr_codes: Mapping) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 container: bone status (row 13 CODE), its texts (row 14 TEXT), calibration and contrast."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    status_key = "not_evaluable" if result.status == "not_evaluable" else result.bone_status.category
    # The statistic the rule used and the uncertainty note qualify the category itself: HAS PROPERTIES.
    items: list[hd.sr.ContentItem] = [
        _explained(sr_codes["bone_status"], sr_codes["bone_status_values"][status_key],
                   [(sr_codes["comment"], text) for text in status_details(result)]),
    ]
    items += [_text(sr_codes["comment"], comment, contains) for comment in status_comments(result)]
    if result.labelling_method:
        items.append(_text(sr_codes["labelling_method"], result.labelling_method, contains))
    if result.series_selection is not None:  # the series used and why the study's others were not
        items.append(_text(sr_codes["comment"], result.series_selection.text(), contains))
    if result.supersedes is not None:  # the Predecessor Documents Sequence names the SR; say so in words too
        items.append(_text(sr_codes["comment"], result.supersedes.text(), contains))
    items += _calibration_and_contrast(result, sr_codes)
    container = hd.sr.ContainerContentItem(name=coded(sr_codes["qualitative_evaluations"]),
                                           relationship_type=contains)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _predecessor(prior: PriorReport) -> pydicom.Dataset:
    """The identity of an earlier SR, as highdicom's ``previous_versions`` reads it (PS3.3 C.17.2)."""
    ds = pydicom.Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = prior.study_instance_uid, prior.series_instance_uid
    ds.SOPClassUID, ds.SOPInstanceUID = prior.sop_class_uid, prior.sop_instance_uid
    return ds


def build_sr(series: Series | Sequence[pydicom.Dataset], result: AnalysisResult,
             seg: pydicom.Dataset | None, *, processing_failed: bool = False) -> hd.sr.Comprehensive3DSR:
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
        ``result.levels`` becomes two TID 1411 groups (body, trabecular ROI);
        values are written as
        given: HU in ``[hnsf'U]`` (mean, median, SD of the trabecular ROI),
        vBMD in ``mg/cm3``, heights in ``mm``, height ratios in ``1``, each
        only when known, and the Genant grade with the fracture evaluation.
        ``result.calibration`` and ``result.contrast``, when set, become
        qualitative evaluations of the report; an evaluable result without
        any vBMD says vBMD "Not Evaluated" with the calibration note as the
        reason. For ``status == "not_evaluable"`` the report states "Not
        Evaluated" with ``result.reason`` as a comment.
    seg : pydicom.Dataset or None
        The SEG from :func:`osteonode.dicom_out.seg.build_seg` of this series, or its
        :func:`~osteonode.dicom_out.seg.seg_reference` (UIDs and segments, no frames);
        required when the result is evaluable and ignored otherwise. Segments
        are matched to levels by Segment Label (from ``segments.json``: the
        body's label and ``trabecular_roi.label``); each SR group reuses its
        segment's Tracking ID and Tracking UID.
    processing_failed : bool
        The "processing failed" SR of :mod:`osteonode.failure`: its UIDs use
        the roles ``"failed-sr-series"`` / ``"failed-sr-instance"``, so that a
        later result of the same input instances gets other UIDs and
        supersedes it instead of being ignored by the PACS as a duplicate.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        Comprehensive 3D SR Storage instance (PS3.3 A.35.13), Series
        Description "osteonode Bone Health SR", Completion Flag COMPLETE,
        Verification Flag UNVERIFIED, Series/SOP Instance UIDs derived from the
        source instances (:func:`osteonode.uids.input_key`; roles ``"sr-series"``,
        ``"sr-instance"``), with ``result.supersedes`` (an earlier SR of the
        study) in the Predecessor Documents Sequence (0040,A360, PS3.3 C.17.2)
        and stated in a comment,
        Specific Character Set of the source or UTF-8
        (:func:`~osteonode.dicom_out.common.settle_character_set`), standard
        coding schemes only.

    Raises
    ------
    ValueError
        If there is no source instance, the result belongs to another series,
        an evaluable result has no SEG or no level, a level has no body or no
        trabecular ROI segment in the SEG, a level name is unknown, or a height ratio has no concept
        name in ``sr_codes.json``.
    """
    datasets = source_datasets(series)
    source_uid = str(datasets[0].get("SeriesInstanceUID", ""))
    if result.series_instance_uid != source_uid:
        raise ValueError("the result does not belong to the given series")
    inputs = input_key(datasets)
    role = "failed-sr" if processing_failed else "sr"  # a later real result of the same inputs must not collide
    sr_codes = dicom_templates.load("sr_codes")
    segment_templates = dicom_templates.load("segments")
    algorithm = _algorithm()

    evaluable = result.status == "ok"
    if evaluable:
        if seg is None:
            raise ValueError("an evaluable result needs the SEG its measurements refer to")
        if not result.levels:
            raise ValueError("an evaluable result has no measured level")
        segments = _segments_by_label(seg)
        groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
                     | hd.sr.MeasurementsAndQualitativeEvaluations] = []
        for level in ordered_levels(result.levels):
            groups += _level_groups(level, result.levels[level], seg, segments, source_uid, sr_codes,
                                    segment_templates, algorithm)
        evidence: list[pydicom.Dataset] = [*with_type2_defaults(datasets), seg]
    else:
        groups = [_not_evaluable_group(datasets, inputs, sr_codes, algorithm)]
        evidence = with_type2_defaults(datasets)

    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(inputs),
        procedure_reported=coded(sr_codes["procedure_reported"]),
        imaging_measurements=groups,
        title=coded(sr_codes["title"]),
    )
    report[0].ContentSequence.append(_qualitative_evaluations(result, sr_codes))

    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=derived_uid(inputs, f"{role}-series"),
        series_number=series_number("sr"),
        sop_instance_uid=derived_uid(inputs, f"{role}-instance"),
        instance_number=1,
        **equipment_attributes(),
        is_complete=True,
        is_final=True,
        is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
        specific_character_set=UTF8,
        previous_versions=[_predecessor(result.supersedes)] if result.supersedes is not None else None,
    )
    copy_optional_identity(datasets[0], sr)
    settle_character_set(sr, datasets[0])
    log.info("built SR: status %s, %d measurement group(s)", result.status, len(groups))
    return sr


__all__ = ["build_sr", "SR_SERIES_DESCRIPTION", "CONTRAST_PHASE_NAMES"]
