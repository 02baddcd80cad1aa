"""Recording an unexpected processing failure, so that every job ends in a visible state.

A job whose analysis raised something that is not an input we reject or a
series that is not evaluable (:mod:`osteonode.errors`) still leaves its
outbox entry in a defined state: ``result.json`` with ``status: "failed"``,
the error class and a reason, and (``analysis.failed_sr``, the default) an
SR that says "processing failed: <reason>", built like the not-evaluable SR
from the headers of the study's best series. Both replace every output of the
entry at once (:func:`osteonode.atomic.staged`): nothing of the failed run or
of an earlier one stays beside them, so a partial result is never delivered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from osteonode.atomic import staged
from osteonode.config import AnalysisSettings
from osteonode.dicom_out import build_sr, write
from osteonode.errors import describe
from osteonode.ingest.spool import instance_files
from osteonode.pipeline import OUTPUT_FILES, RESULT_JSON, SR_FILE
from osteonode.result import AnalysisResult
from osteonode.series import SeriesInfo, SeriesRanking

log = logging.getLogger(__name__)

def record_failure(exc: BaseException, study_uid: str, ranking: SeriesRanking, out_dir: Path,
                   settings: AnalysisSettings, *,
                   files_of: Callable[[SeriesInfo], list[Path]] | None = None) -> AnalysisResult:
    """Leave ``out_dir`` holding the record of a failed analysis (and its SR when configured).

    Parameters
    ----------
    exc : BaseException
        The unexpected error of the analysis.
    study_uid : str
        Study Instance UID of the job.
    ranking : SeriesRanking
        The job's ranked series; the SR is made from the headers of the first
        series that still has readable files (candidates first).
    out_dir : pathlib.Path
        The study's outbox entry; created if missing.
    settings : AnalysisSettings
        ``failed_sr`` decides whether an SR is written.
    files_of : callable, optional
        The files of a series; by default the instance files of its spool folder.

    Returns
    -------
    AnalysisResult
        ``status == "failed"``, ``error_class`` and ``reason`` set; also written to ``out_dir/result.json``.

    Raises
    ------
    OSError
        If ``result.json`` cannot be written (the caller logs the failure either way).
    """
    files_of = files_of or (lambda info: instance_files(Path(info.series_dir)))
    reason = describe(exc)
    series = [*ranking.candidates, *(r.series for r in ranking.rejected)]
    result = AnalysisResult.failed(type(exc).__name__, reason, study_uid,
                                   series[0].series_instance_uid if series else "")
    with staged(out_dir, replaces=OUTPUT_FILES) as stage:
        if settings.failed_sr:
            _write_failed_sr(series, files_of, result, stage)
        result.write(stage / RESULT_JSON)
    return result


def _write_failed_sr(series: list[SeriesInfo], files_of: Callable[[SeriesInfo], list[Path]],
                     result: AnalysisResult, out_dir: Path) -> None:
    """Write the "processing failed" SR (the not-evaluable SR with that reason) from the first readable series."""
    for info in series:
        try:
            headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files_of(info)]
        except (InvalidDicomError, OSError, ValueError) as exc:
            log.warning("failed-job SR: a series cannot be read (%s)", type(exc).__name__)
            continue
        if not headers:
            continue
        report = AnalysisResult.not_evaluable(f"processing failed: {result.reason}", result.study_instance_uid,
                                              info.series_instance_uid)
        try:
            write(build_sr(headers, report, None, processing_failed=True), out_dir / SR_FILE)
        except (ValueError, TypeError, AttributeError, KeyError, OSError) as exc:
            # the SR is a courtesy; result.json still records the failure
            (out_dir / SR_FILE).unlink(missing_ok=True)
            log.error("failed-job SR could not be built (%s); result.json records the failure",
                      type(exc).__name__)
        return
    log.error("failed-job SR not written: no series of the study has readable files")
