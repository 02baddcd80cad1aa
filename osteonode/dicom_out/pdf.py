"""A one-page PDF report as an Encapsulated PDF instance (PS3.3 A.45.1).

The page (A4 portrait, drawn with matplotlib, text embedded as fonts so it
can be searched and copied) holds the optional banner, the patient and study
identity of the source, the overall result with, next to it, the statistic
the rule used and the uncertainty note (when set), then its basis, a table per
level (label confidence, trabecular HU mean / median / SD, ROI volume, vBMD,
Genant grade, heights; ``n/a`` when not available, heights also for a body cut
by the edge of the scan; levels marked † when not used for the bone status,
* when they have notes), the quality notes of each level (flags in words,
excluded focal volume), the method and the caveats
(``dicom_templates/report.json`` plus those that the result calls for).

The DICOM instance carries the Patient and General Study modules of the
source (same study), the Encapsulated Document Series (Modality DOC, Series
Description "osteonode Report"), General and SC Equipment, and the
Encapsulated Document module with Document Title, Concept Name (LOINC
18748-4, CID 7000), the source CT instances in the Source Instance Sequence
and Burned In Annotation YES (the page shows the patient's identity).
"""

from __future__ import annotations

import datetime as dt
import logging
import textwrap
from collections.abc import Sequence

import pydicom
from matplotlib.figure import Figure
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, EncapsulatedPDFStorage, ExplicitVRLittleEndian

import dicom_templates
from osteonode import __version__
from osteonode.dicom_out import render, summary
from osteonode.dicom_out.common import (
    TYPE2_PATIENT_STUDY,
    coded,
    copy_optional_identity,
    equipment_attributes,
    series_number,
    settle_character_set,
    source_datasets,
)
from osteonode.result import AnalysisResult
from osteonode.uids import derived_uid
from osteonode.volume import Series

log = logging.getLogger(__name__)

PDF_SERIES_DESCRIPTION = "osteonode Report"
#: A4 portrait in inches.
PAGE_IN = (8.27, 11.69)
#: Label confidence below which a caveat names the level.
LOW_CONFIDENCE = 0.5
#: Characters per line of body text at :data:`BODY_PT`.
WRAP_CHARACTERS, BODY_PT = 115, 9.0


class _Page:
    """A top-down text cursor on an A4 figure (figure coordinates, 0 = bottom)."""

    margin = 0.06

    def __init__(self, fig: Figure, top: float) -> None:
        self.fig = fig
        self.y = top

    def _advance(self, points: float) -> None:
        self.y -= points / 72.0 / PAGE_IN[1]

    def line(self, text: str, size: float = BODY_PT, **kwargs) -> None:
        """Write ``text`` (which may hold newlines) and move below it."""
        render.add_text(self.fig, self.margin, self.y, text, fontsize=size, va="top", linespacing=1.3, **kwargs)
        self._advance(size * 1.3 * (text.count("\n") + 1) + size * 0.5)

    def heading(self, text: str) -> None:
        self._advance(4)
        self.line(text, size=12, weight="bold")

    def paragraph(self, text: str, bullet: bool = False) -> None:
        if bullet:
            self.line(textwrap.fill(text, WRAP_CHARACTERS - 2, initial_indent="• ", subsequent_indent="  "))
        else:
            self.line(textwrap.fill(text, WRAP_CHARACTERS))

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[str]], widths: Sequence[float]) -> None:
        row_in = BODY_PT * 2.0 / 72.0
        height = row_in * (len(rows) + 1) / PAGE_IN[1]
        ax = self.fig.add_axes((self.margin, self.y - height, 1.0 - 2 * self.margin, height))
        render.draw_table(ax, columns, rows, fontsize=BODY_PT - 0.5, row_height=1.0 / (len(rows) + 1),
                          widths=widths)
        self.y -= height
        self._advance(BODY_PT)


def caveats(result: AnalysisResult) -> list[str]:
    """The caveats of ``result``: the fixed ones of ``report.json``, then those the result calls for.

    Added when they apply: levels with a label confidence below
    :data:`LOW_CONFIDENCE`, contrast enhancement, an implausible vBMD calibration,
    and measurements that are not available yet.
    """
    texts = list(dicom_templates.load("report")["caveats"])
    names = summary.ordered_levels(result.levels)
    levels = [result.levels[name] for name in names]
    uncertain = [name for name, level in zip(names, levels, strict=True) if level.label_confidence < LOW_CONFIDENCE]
    if uncertain:
        texts.append(f"Uncertain level identification (confidence below {LOW_CONFIDENCE:.0%}): "
                     f"{', '.join(uncertain)}.")
    if result.contrast is not None and result.contrast.phase != "non_contrast":
        texts.append(f"Contrast phase {result.contrast.phase.replace('_', ' ')}: "
                     f"{result.contrast.handling or 'trabecular attenuation is raised by contrast enhancement'}.")
    if result.calibration is not None and not result.calibration.plausible:
        texts.append("The vBMD calibration is not plausible (see Method): do not use the vBMD values.")
    missing = [what for what, absent in (
        ("vBMD", all(level.vbmd_mg_cm3 is None for level in levels)),
        ("Genant grading", all(level.genant_grade is None for level in levels))) if absent]
    if levels and missing:
        texts.append(f"{' and '.join(missing)} not available for this series (shown as {summary.NA}).")
    return texts


def method(result: AnalysisResult) -> list[str]:
    """The method paragraphs of ``report.json`` filled in, plus calibration and contrast when known."""
    texts = [text.format(labelling_method=result.labelling_method or summary.NA)
             for text in dicom_templates.load("report")["method"]]
    if result.calibration is not None:
        note = f" ({result.calibration.note})" if result.calibration.note else ""
        texts.append(f"vBMD calibration: {result.calibration.method}{note}.")
    if result.contrast is not None:
        texts.append(f"Contrast phase: {result.contrast.phase.replace('_', ' ')}.")
    if result.series_selection is not None:
        texts.append(result.series_selection.text())
    return texts


def render_pdf(source: pydicom.Dataset, result: AnalysisResult, *, banner: str) -> bytes:
    """Draw the one-page report and return the PDF bytes.

    Parameters
    ----------
    source : pydicom.Dataset
        Header of a source instance (patient, study and series identity).
    result : AnalysisResult
        Evaluable or not-evaluable result of the series.
    banner : str
        Text of the band across the top; empty for none.

    Raises
    ------
    ValueError
        If a level name of the result is unknown.
    """
    fig = render.new_figure(*PAGE_IN, dpi=72)
    render.draw_banner(fig, banner, (0.0, 0.965, 1.0, 0.035), fontsize=13)
    page = _Page(fig, 0.95 if banner else 0.97)
    page.line(summary.title(), size=15, weight="bold")
    page.line("\n".join(summary.identity_lines(source)))
    page.heading(f"Result: {summary.status_line(result)}")
    for text in summary.status_details(result):
        page.line(textwrap.fill(text, 95), size=BODY_PT + 1, weight="bold")
    for text in summary.status_comments(result):
        page.paragraph(text)
    page.heading("Measurements per vertebral level")
    rows = [(row.level, row.confidence_percent, row.hu_mean, row.hu_median, row.hu_sd, row.roi_volume_cm3,
             row.vbmd_mg_cm3, row.genant, row.heights_mm) for row in summary.level_rows(result)]
    if rows:
        page.table(("Level", "Conf. %", "HU mean", "HU median", "HU SD", "ROI cm³", "vBMD mg/cm³", "Genant",
                    "Height A/M/P mm"), rows, widths=(0.8, 0.8, 0.9, 1.0, 0.8, 0.8, 1.2, 1.1, 1.4))
    else:
        page.paragraph("No vertebral level was measured.")
    legend = summary.marks_legend(result)
    if legend:
        page.paragraph(legend + ".")
    for text in summary.level_note_lines(result):
        page.paragraph(text)
    for name in summary.ordered_levels(result.levels):
        texture = summary.fracture_texture(name, result.levels[name])
        if texture is not None:
            page.paragraph(texture)
    page.heading("Method")
    for text in method(result):
        page.paragraph(text)
    page.heading("Caveats")
    for text in caveats(result):
        page.paragraph(text, bullet=True)
    footer = f"osteonode {__version__}. {banner}".strip()
    render.add_text(fig, _Page.margin, 0.02, footer, fontsize=7, color="#555555")
    return render.to_pdf(fig, dicom_templates.load("report")["document_title"])


def build_pdf_report(series: Series | Sequence[pydicom.Dataset], result: AnalysisResult, *,
                     banner: str) -> pydicom.Dataset:
    """Build the one-page PDF report of one CT series as an Encapsulated PDF instance.

    Parameters
    ----------
    series : Series or sequence of pydicom.Dataset
        The source CT or only its instances' headers (pixel data not needed);
        patient, study and the Source Instance Sequence come from them.
    result : AnalysisResult
        The result of this series, evaluable or not.
    banner : str
        Text of the band across the top of the page, e.g. "RESEARCH USE ONLY -
        NOT FOR DIAGNOSTIC USE"; an empty string draws no band.

    Returns
    -------
    pydicom.Dataset
        Encapsulated PDF Storage instance (PS3.3 A.45.1) with File Meta
        Information (Explicit VR Little Endian), Series Description
        "osteonode Report", Series Number from ``algorithm.json``, UIDs from
        :func:`osteonode.uids.derived_uid` (roles ``"pdf-series"``,
        ``"pdf-instance"``), patient and study from the first source instance.

    Raises
    ------
    ValueError
        If there is no source instance, the result belongs to another series,
        or a level name is unknown.
    """
    datasets = source_datasets(series)
    source = datasets[0]
    source_uid = str(source.get("SeriesInstanceUID", ""))
    if result.series_instance_uid != source_uid:
        raise ValueError("the result does not belong to the given series")
    template = dicom_templates.load("report")
    document = render_pdf(source, result, banner=banner)
    now = dt.datetime.now()

    ds = pydicom.Dataset()
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = derived_uid(source_uid, "pdf-instance")
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    # Patient (C.7.1.1) and General Study (C.7.2.1): from the source, Type 2 empty when absent.
    for keyword in TYPE2_PATIENT_STUDY:
        setattr(ds, keyword, source.get(keyword, ""))
    ds.StudyInstanceUID = source.StudyInstanceUID
    copy_optional_identity(source, ds)
    # Encapsulated Document Series (C.24.1).
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = derived_uid(source_uid, "pdf-series")
    ds.SeriesNumber = series_number("pdf")
    ds.SeriesDescription = PDF_SERIES_DESCRIPTION
    # General Equipment (C.7.5.1) and SC Equipment (C.8.6.1).
    equipment = equipment_attributes()
    ds.Manufacturer = equipment["manufacturer"]
    ds.ManufacturerModelName = equipment["manufacturer_model_name"]
    ds.SoftwareVersions = equipment["software_versions"]
    ds.DeviceSerialNumber = equipment["device_serial_number"]
    ds.ConversionType = "WSD"
    # Encapsulated Document (C.24.2).
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.AcquisitionDateTime = ""
    ds.BurnedInAnnotation = "YES"
    ds.SourceInstanceSequence = [reference for reference in map(_reference, datasets) if reference]
    ds.DocumentTitle = template["document_title"]
    ds.ConceptNameCodeSequence = [coded(template["document_concept"])]
    ds.VerificationFlag = "UNVERIFIED"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = document + b"\0" * (len(document) % 2)  # even length, PS3.3 C.24.2.1
    ds.EncapsulatedDocumentLength = len(document)

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    settle_character_set(ds, source)
    log.info("built PDF report: %d bytes, status %s", len(document), result.status)
    return ds


def _reference(source: pydicom.Dataset) -> pydicom.Dataset | None:
    """Source Instance Sequence item of one source instance (SOP Instance Reference macro, C.17.2).

    The UIDs are taken from the File Meta Information when the data set lacks
    them (de-identified files); ``None`` when neither has them.
    """
    meta = source.get("file_meta", pydicom.Dataset())
    sop_class = source.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
    sop_instance = source.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID")
    if not (sop_class and sop_instance):
        return None
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


__all__ = ["build_pdf_report", "render_pdf", "caveats", "method", "PDF_SERIES_DESCRIPTION"]
