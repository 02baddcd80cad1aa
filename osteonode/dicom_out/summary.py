"""Human-readable text of a result, shared by the key images, the PDF report and the SR's comments.

Missing values (e.g. ``vbmd_mg_cm3`` or ``genant_grade`` before the stages
that fill them exist) are printed as :data:`NA`, never as 0 or blank.
Nothing here is logged: the identity lines hold patient data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pydicom
from pydicom.valuerep import PersonName

import dicom_templates
from osteonode import __version__
from osteonode.anatomy import VERTEBRA_IDS
from osteonode.measure.genant import (
    BORDERLINE_LOSS,
    GRADE_LIMITS,
    MAX_MIDDLE_EXCESS,
    MAX_POSTERIOR_EXCESS,
    MAX_SLICE_MM,
)
from osteonode.measure.hu import DISCORDANT_HU, HETEROGENEOUS_SD_HU, MAX_EXCLUDED_FRACTION
from osteonode.result import AnalysisResult, LevelResult, QualityFlag

#: Printed for a value that is not available.
NA = "n/a"

#: Words for each quality flag, as the SR, the PDF and the key images say them; the figures are those
#: of the measurement that sets the flag (:mod:`osteonode.measure.genant`, :mod:`osteonode.measure.hu`).
QUALITY_FLAG_TEXT: dict[QualityFlag, str] = {
    "cut_by_field_of_view": "cut by the edge of the scan: heights not reported",
    "heights_implausible": (f"heights implausible (posterior height over {100 * MAX_POSTERIOR_EXCESS:g} % above the "
                            f"neighbouring levels', or middle height over {100 * MAX_MIDDLE_EXCESS:g} % above both "
                            "the anterior and the posterior height: an endplate edge not found on the vertebra): "
                            "heights not reported, not graded"),
    "slices_too_thick": (f"slices thicker than {MAX_SLICE_MM:g} mm: heights not measured, not graded (an endplate's "
                         "edge moves by up to a slice with the slice position)"),
    "genant_borderline": (f"height loss within {100 * BORDERLINE_LOSS:g} points of a Genant grade limit "
                          f"({', '.join(f'{100 * limit:g}' for limit in GRADE_LIMITS)} %): "
                          "the grade may be one higher or lower"),
    "heterogeneous": f"heterogeneous trabecular ROI (standard deviation above {HETEROGENEOUS_SD_HU:g} HU)",
    "mean_median_discordant": f"mean and median of the trabecular ROI more than {DISCORDANT_HU:g} HU apart",
    "focal_lesion_excluded": "focal sclerotic or lytic focus excluded from the ROI",
    "excluded_over_limit": (f"over {100 * MAX_EXCLUDED_FRACTION:g} % of the ROI excluded as focal lesion: "
                            "level not used for the bone status"),
}

#: Genant et al. 1993 semi-quantitative grades.
GENANT_GRADES = {0: "normal", 1: "mild", 2: "moderate", 3: "severe"}
#: Quality flags about the vertebral body as a whole (its heights); the others concern the trabecular ROI.
BODY_FLAGS = frozenset({"cut_by_field_of_view", "heights_implausible", "slices_too_thick", "genant_borderline"})
#: Said of a level whose ``used_for_bone_status`` is False (unless a flag's words already say it).
NOT_USED = "not used for the bone status"
#: Marks after a level name in the tables: not used for the bone status / other notes (listed below the table).
MARK_NOT_USED, MARK_NOTES = "†", "*"


@dataclass(frozen=True)
class LevelRow:
    """One vertebral level as printed: every field is a string, :data:`NA` when unknown."""

    level: str
    confidence_percent: str
    hu_mean: str
    hu_median: str
    hu_sd: str
    roi_volume_cm3: str
    vbmd_mg_cm3: str
    genant: str
    heights_mm: str


def number(value: float | None, digits: int = 0) -> str:
    """``value`` with ``digits`` decimals, or :data:`NA` when it is ``None``."""
    return NA if value is None else f"{value:.{digits}f}"


def genant(grade: int | None) -> str:
    """Genant grade as ``"2 (moderate)"``, or :data:`NA`."""
    return NA if grade is None else f"{grade} ({GENANT_GRADES[grade]})"


def ordered_levels(levels: Mapping[str, LevelResult]) -> list[str]:
    """Level names in cranio-caudal order (VerSe ID order).

    Raises
    ------
    ValueError
        If a name is not a vertebral level of :data:`osteonode.anatomy.VERTEBRA_IDS`.
    """
    unknown = [name for name in levels if name not in VERTEBRA_IDS]
    if unknown:
        raise ValueError(f"unknown vertebral level name(s) in the result: {unknown}")
    return sorted(levels, key=VERTEBRA_IDS.__getitem__)


#: Seed 003's texture features (pyradiomics names, original image) as printed, in the paper's order.
FRACTURE_TEXTURE_LABELS = {
    "original_firstorder_Variance": "variance",
    "original_firstorder_Skewness": "skewness",
    "original_glcm_JointEnergy": "GLCM joint energy",
    "original_glcm_JointEntropy": "GLCM joint entropy",
    "original_glrlm_ShortRunEmphasis": "GLRLM short-run emphasis",
    "original_glrlm_LongRunEmphasis": "GLRLM long-run emphasis",
    "original_glrlm_RunLengthNonUniformity": "GLRLM run-length non-uniformity",
    "original_glrlm_RunPercentage": "GLRLM run percentage",
}


def fracture_texture(name: str, level: LevelResult) -> str | None:
    """Seed 003's texture features of a level with a suspected fracture, as one sentence; None without them.

    Goller SS et al. (2023) compared these features between benign and
    malignant vertebral fractures; they are printed for the reader to weigh,
    no classification is made. Values with 4 significant digits; the names of
    :data:`FRACTURE_TEXTURE_LABELS`, features without a label by their
    pyradiomics name.
    """
    texture = level.fracture_texture
    if not texture:
        return None
    named = [(label, texture[key]) for key, label in FRACTURE_TEXTURE_LABELS.items() if key in texture]
    named += [(key, value) for key, value in texture.items() if key not in FRACTURE_TEXTURE_LABELS]
    return (f"Texture of {name} (suspected fracture; features of Goller et al. 2023, "
            f"not a benign/malignant classification): {', '.join(f'{k} {v:.4g}' for k, v in named)}.")


def quality_flags(level: LevelResult) -> list[QualityFlag]:
    """The level's quality flag codes, with ``cut_by_field_of_view`` when that field is set, without duplicates."""
    flags: list[QualityFlag] = list(dict.fromkeys(level.quality_flags))
    if level.cut_by_field_of_view and "cut_by_field_of_view" not in flags:
        flags.insert(0, "cut_by_field_of_view")
    return flags


def level_notes(level: LevelResult, part: str | None = None) -> list[str]:
    """Why a level's measurement may be unreliable, in words (SR comments, PDF and key-image notes).

    Parameters
    ----------
    level : LevelResult
        One level of the result.
    part : {None, "body", "roi"}
        ``"body"``: only the notes on the vertebral body (:data:`BODY_FLAGS`,
        e.g. cut by the edge of the scan, heights not reported); ``"roi"``: only
        the notes on the trabecular ROI (the other flags, the excluded focal
        volume, :data:`NOT_USED`); None: both, body first.

    Returns
    -------
    list of str
        The words of each flag (:data:`QUALITY_FLAG_TEXT`), then,
        for the ROI, the excluded focal volume in cm3 (ASCII: SR text) with its fraction of the
        ROI when it is above 0, and :data:`NOT_USED` when the level is not used
        for the bone status and no flag's words already say so.
    """
    flags = quality_flags(level)
    notes = [QUALITY_FLAG_TEXT[flag] for flag in flags if flag in BODY_FLAGS] if part != "roi" else []
    if part != "body":
        notes += [QUALITY_FLAG_TEXT[flag] for flag in flags if flag not in BODY_FLAGS]
        if level.excluded_focal_volume_mm3 > 0:
            notes.append(f"{level.excluded_focal_volume_mm3 / 1000.0:.1f} cm3 of focal foci excluded from the ROI "
                         f"({100.0 * level.excluded_fraction:.0f} % of the ROI)")
        if not level.used_for_bone_status and not any(NOT_USED in note for note in notes):
            notes.append(NOT_USED)
    return notes


def level_note_lines(result: AnalysisResult) -> list[str]:
    """The :func:`level_notes` of the levels, one line per distinct set of notes.

    Levels with the same notes share a line (``"L1†, L2†: heterogeneous ...; not used for the
    bone status."``), so that the page stays short when many levels are flagged alike. Lines
    follow the cranio-caudal order of their first level; levels are named as in
    :func:`level_rows` (with their mark).
    """
    groups: dict[tuple[str, ...], list[str]] = {}
    for name in ordered_levels(result.levels):
        notes = tuple(level_notes(result.levels[name]))
        if notes:
            groups.setdefault(notes, []).append(marked_name(name, result.levels[name]))
    return [f"{', '.join(names)}: {'; '.join(notes)}." for notes, names in groups.items()]


def marked_name(name: str, level: LevelResult) -> str:
    """``name`` with :data:`MARK_NOT_USED` when the level is not used for the bone status, else with
    :data:`MARK_NOTES` when it has notes (:func:`level_notes`), else unchanged."""
    if not level.used_for_bone_status:
        return name + MARK_NOT_USED
    return name + MARK_NOTES if level_notes(level) else name


def marks_legend(result: AnalysisResult) -> str:
    """Explanation of the marks that the level table of ``result`` uses; empty when it uses none."""
    marks = {marked_name(name, level)[len(name):] for name, level in result.levels.items()}
    texts = {MARK_NOT_USED: f"{MARK_NOT_USED} {NOT_USED}", MARK_NOTES: f"{MARK_NOTES} see the notes on the level"}
    return "; ".join(texts[mark] for mark in (MARK_NOT_USED, MARK_NOTES) if mark in marks)


def reported_heights(level: LevelResult) -> tuple[float | None, float | None, float | None]:
    """Anterior, middle and posterior height (mm) as reported: all None for a body cut by the edge of the scan."""
    if level.cut_by_field_of_view:
        return None, None, None
    return level.height_anterior_mm, level.height_middle_mm, level.height_posterior_mm


def level_rows(result: AnalysisResult) -> list[LevelRow]:
    """The printed rows of ``result.levels``, cranio-caudal.

    The level name carries its mark (:func:`marked_name`). HU and vBMD without
    decimals, ROI volume in cm³ with one decimal, heights
    anterior/middle/posterior in mm (:data:`NA` unless all three are known and
    the body is not cut by the edge of the scan; the Genant grade of a cut body
    is :data:`NA` too).

    Raises
    ------
    ValueError
        If a level name is unknown (see :func:`ordered_levels`).
    """
    rows = []
    for name in ordered_levels(result.levels):
        level = result.levels[name]
        heights = reported_heights(level)
        rows.append(LevelRow(
            level=marked_name(name, level),
            confidence_percent=number(100.0 * level.label_confidence),
            hu_mean=number(level.trabecular_hu_mean),
            hu_median=number(level.trabecular_hu_median),
            hu_sd=number(level.trabecular_hu_sd),
            roi_volume_cm3=number(level.trabecular_roi_volume_mm3 / 1000.0, 1),
            vbmd_mg_cm3=number(level.vbmd_mg_cm3),
            genant=NA if level.cut_by_field_of_view else genant(level.genant_grade),
            heights_mm=NA if None in heights else "/".join(number(h) for h in heights),
        ))
    return rows


def status_line(result: AnalysisResult) -> str:
    """The overall result in one line, e.g. ``"Osteopenia"`` or ``"Not evaluable"``."""
    if result.status == "not_evaluable":
        return "Not evaluable"
    return result.bone_status.category.capitalize()


def status_details(result: AnalysisResult) -> list[str]:
    """What to read next to the bone status category: the statistic the rule used and the uncertainty note.

    Returns
    -------
    list of str
        ``"Statistic: <bone_status.statistic>"`` and ``"Uncertainty: <bone_status.uncertainty_note>"``,
        each only when set.
    """
    status = result.bone_status
    texts = [f"Statistic: {status.statistic}"] if status.statistic else []
    if status.uncertainty_note:
        texts.append(f"Uncertainty: {status.uncertainty_note}")
    return texts


def status_comments(result: AnalysisResult) -> list[str]:
    """The free-text comments on the bone status: its basis and, when not evaluable, the reason.

    The reason is left out when the basis already contains it (as in
    :meth:`AnalysisResult.not_evaluable`); a not-evaluable result without any
    text gets "reason not stated".
    """
    texts = [result.bone_status.basis] if result.bone_status.basis else []
    if result.status == "not_evaluable":
        reason = result.reason or "reason not stated"
        if not any(reason in text for text in texts):
            texts.insert(0, reason)
    return texts


def display_name(value: object) -> str:
    """A Patient's Name (PN) for display: ``"Family, Given Middle"``.

    The alphabetic component group is used; the ideographic one only when
    there is no alphabetic group. An empty name is :data:`NA`.
    """
    name = value if isinstance(value, PersonName) else PersonName(str(value or ""))
    given = " ".join(part for part in (name.name_prefix, name.given_name, name.middle_name) if part)
    alphabetic = ", ".join(part for part in (name.family_name, given) if part)
    text = alphabetic or str(name.ideographic or "").replace("^", " ").strip()
    return text or NA


def display_date(value: object) -> str:
    """A DA value ``YYYYMMDD`` as ``YYYY-MM-DD``; other text unchanged; empty as :data:`NA`."""
    text = str(value or "").strip()
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text or NA


def identity_lines(source: pydicom.Dataset) -> list[str]:
    """Patient and study identity of the source instance, two lines for a header.

    Parameters
    ----------
    source : pydicom.Dataset
        A source instance's header (Patient and General Study modules, PS3.3
        C.7.1.1 and C.7.2.1; General Series C.7.3.1).

    Returns
    -------
    list of str
        ``["Patient: <name>   ID: <id>   Born: <date>   Sex: <sex>",
        "Study: <date> <study description>   Accession: <number>   Series <n>: <description>"]``
        with :data:`NA` for absent values (an absent study description is left out).
    """
    def text(keyword: str) -> str:
        return str(source.get(keyword, "") or "").strip() or NA

    description = str(source.get("StudyDescription", "") or "").strip()
    patient = (f"Patient: {display_name(source.get('PatientName'))}   ID: {text('PatientID')}   "
               f"Born: {display_date(source.get('PatientBirthDate'))}   Sex: {text('PatientSex')}")
    study = (f"Study: {' '.join(filter(None, (display_date(source.get('StudyDate')), description)))}   "
             f"Accession: {text('AccessionNumber')}   "
             f"Series {text('SeriesNumber')}: {text('SeriesDescription')}")
    return [patient, study]


def title() -> str:
    """The report title of ``dicom_templates/report.json`` with the osteonode version."""
    return str(dicom_templates.load("report")["title"]).format(version=__version__)


__all__ = ["NA", "GENANT_GRADES", "BODY_FLAGS", "NOT_USED", "MARK_NOT_USED", "MARK_NOTES", "LevelRow", "number",
           "genant", "ordered_levels", "quality_flags", "level_notes", "level_note_lines", "marked_name",
           "marks_legend", "reported_heights", "level_rows", "status_line", "status_details", "status_comments",
           "display_name", "display_date", "identity_lines", "title"]
