"""Which earlier result of a study new outputs supersede: the per-study record of the last SR sent.

Output UIDs depend on the exact input instances (:mod:`osteonode.uids`), so a
study analysed again from other inputs (a better series arrived late, a
series completed after a fragment was reported) gives new objects that stand
beside the earlier ones in the PACS. The new SR says which report it replaces:
it names the earlier SR in its Predecessor Documents Sequence (0040,A360, PS3.3
C.17.2) and states it in a comment, and the PDF says so too
(:class:`osteonode.result.PriorReport`).

To know the earlier SR, the worker records the SR it hands to delivery in
the study's outbox entry, ``<outbox>/<StudyInstanceUID>/last-sent.json``
(:func:`record_sent`); the pipeline reads it before it builds the next SR
(:func:`superseded_report`). The same inputs analysed again (a re-delivered
job) give the same SR, with the same predecessor as before, so the objects
stay identical.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from osteonode import __version__
from osteonode.atomic import write_atomic
from osteonode.result import AnalysisResult, PriorReport
from osteonode.uids import input_key

log = logging.getLogger(__name__)

SENT_RECORD = "last-sent.json"


class SentReport(BaseModel):
    """What ``last-sent.json`` holds: the last SR sent for the study and what it was made from."""

    model_config = ConfigDict(extra="forbid")

    report: PriorReport
    input_key: str
    version: str
    status: str = Field(description='the status of the result the SR reported ("failed": processing failed)')
    source_series_instance_uid: str
    source_instance_count: int
    supersedes: PriorReport | None = None


def record_sent(entry: Path, sr_path: Path, result: AnalysisResult) -> None:
    """Record in ``entry`` that the SR ``sr_path`` of ``result`` was handed to delivery (atomic replace).

    What the SR was made from is read from the SR itself: its evidence
    (Current Requested Procedure Evidence Sequence) lists every instance of
    the analysed series.

    Parameters
    ----------
    entry : pathlib.Path
        The study's outbox folder.
    sr_path : pathlib.Path
        The SR file.
    result : AnalysisResult
        The result the SR encodes (series used, predecessor).

    Raises
    ------
    OSError
        If the SR cannot be read or the record cannot be written.
    """
    sr = pydicom.dcmread(sr_path, stop_before_pixels=True)
    source = _evidence(sr, result.series_instance_uid)
    selection = result.series_selection
    if selection is not None and selection.used is None:
        made_from = "no usable series (not evaluable)"
    else:
        name = selection.used.name() if selection is not None and selection.used is not None else "the series"
        made_from = f"{name} ({len(source)} instances)"
    date, time = str(sr.get("ContentDate", "")), str(sr.get("ContentTime", ""))
    record = SentReport(
        report=PriorReport(study_instance_uid=str(sr.StudyInstanceUID), series_instance_uid=str(sr.SeriesInstanceUID),
                           sop_class_uid=str(sr.SOPClassUID), sop_instance_uid=str(sr.SOPInstanceUID),
                           created=f"{date[:4]}-{date[4:6]}-{date[6:8]} {time[:2]}:{time[2:4]}", made_from=made_from),
        input_key=input_key(source) if source else "", version=__version__, status=result.status,
        source_series_instance_uid=result.series_instance_uid, source_instance_count=len(source),
        supersedes=result.supersedes)
    write_atomic(entry / SENT_RECORD, record.model_dump_json(indent=2).encode())


def _evidence(sr: pydicom.Dataset, series_uid: str) -> list[pydicom.Dataset]:
    """The instances of series ``series_uid`` an SR lists as evidence (Series and SOP Instance UIDs only)."""
    instances = []
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            if str(series.get("SeriesInstanceUID", "")) != series_uid:
                continue
            for item in series.get("ReferencedSOPSequence", []):
                ds = pydicom.Dataset()
                ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, item.ReferencedSOPInstanceUID
                instances.append(ds)
    return instances


def last_sent(entry: Path) -> SentReport | None:
    """The record of the last SR sent for the study of outbox ``entry``, or None (none, or unreadable: logged)."""
    path = entry / SENT_RECORD
    if not path.is_file():
        return None
    try:
        return SentReport.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError, UnicodeDecodeError) as exc:
        log.warning("record of the last SR sent cannot be read (%s); the new SR names no predecessor",
                    type(exc).__name__)
        return None


def superseded_report(entry: Path, source: Sequence[pydicom.Dataset]) -> PriorReport | None:
    """The earlier SR that a result made from ``source`` supersedes, with the reason, or None.

    Parameters
    ----------
    entry : pathlib.Path
        The study's outbox folder (:func:`record_sent` wrote its record).
    source : sequence of pydicom.Dataset
        Headers of the instances the new result is made from.

    Returns
    -------
    PriorReport or None
        None when nothing was sent before; the earlier SR's own predecessor
        when the inputs and version are the same (the new SR is then the same
        object as the earlier one), unless the earlier SR said "processing
        failed" (its UIDs differ from a real result's); else the earlier SR,
        its ``reason`` saying what changed.
    """
    last = last_sent(entry)
    if last is None:
        return None
    same_inputs = last.input_key == input_key(source) and last.version == __version__
    if same_inputs and last.status != "failed":
        return last.supersedes
    series_uid, count = str(source[0].get("SeriesInstanceUID", "")), len(source)
    if same_inputs:
        reason = "the earlier analysis of the same images failed"
    elif last.version != __version__:
        reason = f"made by osteonode {__version__} instead of {last.version}"
    elif series_uid != last.source_series_instance_uid:
        reason = "the study changed and another series was analysed"
    elif count != last.source_instance_count:
        reason = (f"the series changed ({count} instances instead of {last.source_instance_count}); "
                  "the earlier report was made from an incomplete series")
    else:
        reason = "the series' instances changed"
    return last.report.model_copy(update={"reason": reason})
