"""The analysis pipeline for one CT study or series: plain functions, no services.

:func:`analyze_study` analyses the best-ranked candidate series of a study
(:mod:`osteonode.series`) and falls back to the next one when it is not
evaluable; :func:`analyze_files` analyses one series:
select -> load -> segment -> measure (HU) -> calibrate (vBMD, contrast) -> Genant ->
radiomics -> classify -> encode. Used both by the
Celery worker and by ``osteonode analyze``. Outputs written to ``out_dir``:

* ``result.json`` - :class:`~osteonode.result.AnalysisResult` (format in README.md),
* ``labels.nii.gz`` - vertebral bodies (VerSe IDs) and proximal femurs (90/91) on the source CT grid,
* ``seg.dcm`` - DICOM Segmentation (when the series was evaluable),
* ``sr.dcm`` - Comprehensive 3D SR, TID 1500 (always, also when not evaluable),
* ``key_1.dcm``, ``key_2.dcm`` - Secondary Capture key images, mid-sagittal and
  axial through L1 (when evaluable and ``key_images`` is on),
* ``report.dcm`` - one-page Encapsulated PDF report (when ``pdf_report`` is on),
* ``radiomics.csv`` - pyradiomics features, one row per level (when evaluable and
  ``radiomics_preset`` is set).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pydicom
import SimpleITK as sitk

from osteonode.anatomy import REQUIRED_LEVELS
from osteonode.classify import classify_bone_status
from osteonode.config import AnalysisSettings, SelectionSettings
from osteonode.dicom_out import build_key_images, build_pdf_report, build_seg, build_sr, write
from osteonode.errors import NotEvaluable
from osteonode.ingest.spool import instance_files
from osteonode.measure.calibration import apply_calibration, calibrate
from osteonode.measure.contrast import detect_contrast
from osteonode.measure.genant import apply_genant, grade_levels
from osteonode.measure.hu import measure_levels, measure_proximal_femurs
from osteonode.measure.radiomics import (
    FEATURE_TABLE_NAME,
    add_fracture_texture,
    extract_features,
    start_worker_pool,
    write_feature_table,
)
from osteonode.measure.tissues import measure_reference_tissues
from osteonode.result import AnalysisResult, SeriesNotUsed, SeriesSelection, SeriesUsed
from osteonode.segment import SpineSegmentation
from osteonode.segment.backends import select_backend
from osteonode.series import CT_IMAGE_SOP_CLASSES, SeriesInfo, SeriesRanking, check_series
from osteonode.volume import Series, load_series

log = logging.getLogger(__name__)

RESULT_JSON, LABELS_NIFTI, SEG_FILE, SR_FILE = "result.json", "labels.nii.gz", "seg.dcm", "sr.dcm"
KEY_IMAGE_FILES = ("key_1.dcm", "key_2.dcm")  # mid-sagittal, axial through L1
PDF_FILE = "report.dcm"
OUTPUT_FILES = (RESULT_JSON, LABELS_NIFTI, SEG_FILE, SR_FILE, *KEY_IMAGE_FILES, PDF_FILE, FEATURE_TABLE_NAME)


def analyze_study(ranking: SeriesRanking, out_dir: Path, settings: AnalysisSettings | None = None,
                  selection_rules: SelectionSettings | None = None, *,
                  files_of: Callable[[SeriesInfo], list[Path]] | None = None) -> AnalysisResult:
    """Analyse the best candidate series of a study, falling back to the next while not evaluable.

    Exactly one set of outputs is left in ``out_dir``: that of the first
    evaluable candidate, or, when none is, one not-evaluable SR (and PDF)
    that names why each series was not used. Either way
    ``result.series_selection`` names the series used and the others with
    their reasons.

    Parameters
    ----------
    ranking : SeriesRanking
        The study's series (:func:`osteonode.series.rank_series`), candidates best first.
    out_dir : pathlib.Path
        Output folder of the study; existing outputs are replaced.
    settings : AnalysisSettings, optional
        Analysis options (defaults when omitted).
    selection_rules : SelectionSettings, optional
        Candidate rules for the single-series check (defaults when omitted).
    files_of : callable, optional
        The files of a series; by default the instance files of its spool
        folder (``series_dir``).

    Returns
    -------
    AnalysisResult
        Of the series used, or not evaluable when no series could be used.

    Raises
    ------
    ValueError
        If ``ranking`` holds no series at all.
    FileNotFoundError
        If a series folder holds no files.
    """
    files_of = files_of or (lambda info: instance_files(Path(info.series_dir)))
    failed: list[SeriesNotUsed] = []
    rejected = [_not_used(r.series, r.reason) for r in ranking.rejected]
    for i, candidate in enumerate(ranking.candidates):
        lower = [_not_used(c, "ranked lower than the series used") for c in ranking.candidates[i + 1:]]
        selection = SeriesSelection(used=SeriesUsed(series_number=candidate.series_number,
                                                     description=candidate.description, kernel=candidate.kernel,
                                                     slice_thickness_mm=candidate.slice_thickness_mm),
                                    not_used=[*failed, *lower, *rejected])
        result = analyze_files(files_of(candidate), out_dir, settings,
                               selection=selection, selection_rules=selection_rules)
        if result.status == "ok":
            return result
        log.info("candidate %d of %d not evaluable; %s", i + 1, len(ranking.candidates),
                 "trying the next" if i + 1 < len(ranking.candidates) else "no candidate left")
        failed.append(_not_used(candidate, result.reason or "not evaluable"))
    # the not-evaluable SR goes into the study as if made from its best series (a CT image series if any)
    ct_images = [r.series for r in ranking.rejected if r.series.sop_class_uid in CT_IMAGE_SOP_CLASSES]
    sources = [*ranking.candidates, *ct_images, *(r.series for r in ranking.rejected)]
    if not sources:
        raise ValueError("the study has no series")
    source = sources[0]
    return analyze_files(files_of(source), out_dir, settings,
                         selection=SeriesSelection(used=None, not_used=[*failed, *rejected]),
                         selection_rules=selection_rules)


def _not_used(info: SeriesInfo, reason: str) -> SeriesNotUsed:
    return SeriesNotUsed(series_number=info.series_number, description=info.description, reason=reason)


def analyze_files(files: Sequence[Path], out_dir: Path, settings: AnalysisSettings | None = None,
                  segmentation_file: Path | None = None, *, selection: SeriesSelection | None = None,
                  selection_rules: SelectionSettings | None = None) -> AnalysisResult:
    """Analyse one CT series and write the outputs to ``out_dir``.

    Parameters
    ----------
    files : sequence of pathlib.Path
        The series' PS3.10 files.
    out_dir : pathlib.Path
        Output folder; created if missing; existing outputs are replaced.
    settings : AnalysisSettings, optional
        Analysis options (defaults when omitted).
    segmentation_file : pathlib.Path, optional
        A TotalSegmentator label map to use instead of the configured backend
        (:func:`osteonode.segment.backends.select_backend`).
    selection : SeriesSelection, optional
        How this series was chosen from its study, recorded in the result (SR
        and PDF). With ``selection.used`` None the study has no usable series:
        the result is not evaluable, with the reason of its only series, or
        saying that none of its series could be analysed (each one's reason
        is in ``selection.not_used``).
    selection_rules : SelectionSettings, optional
        Candidate rules of the single-series check (defaults when omitted).

    Returns
    -------
    AnalysisResult
        ``status == "not_evaluable"`` with a reason when the series cannot be
        analysed; the SR then says so.

    Raises
    ------
    FileNotFoundError
        If ``files`` is empty.
    pydicom.errors.InvalidDicomError
        If a file is not DICOM at all (the spool never holds such files).
    """
    if not files:
        raise FileNotFoundError("no DICOM files to analyse")
    settings = settings or AnalysisSettings()
    if settings.radiomics_preset:
        start_worker_pool(settings.radiomics_processes)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    timings: dict[str, float] = {}
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(files)]
    study_uid = str(headers[0].get("StudyInstanceUID", ""))
    series_uid = str(headers[0].get("SeriesInstanceUID", ""))
    series: Series | None = None
    segmentation: SpineSegmentation | None = None
    try:
        with _timed(timings, "select"):
            if selection is not None and selection.used is None:
                raise NotEvaluable(selection.not_used[0].reason if len(selection.not_used) == 1 else
                                   f"none of the study's {len(selection.not_used)} series could be analysed "
                                   "(the reason for each is listed with the series)")
            check_series(headers, selection_rules)
        with _timed(timings, "load"):
            series = load_series(files)
        backend, backend_note = select_backend(settings, series_uid, segmentation_file)
        with _timed(timings, "segment"):
            segmentation = backend(series.volume)
        if backend_note:
            segmentation.method = f"{segmentation.method} [{backend_note}]"
        with _timed(timings, "measure"):
            levels = measure_levels(series.volume, segmentation)
        missing = [name for name in REQUIRED_LEVELS if name not in levels]
        if segmentation.not_evaluable_reason:
            raise NotEvaluable(segmentation.not_evaluable_reason)
        if missing:
            raise NotEvaluable(f"{', '.join(missing)} could not be identified and measured "
                               f"(levels measured: {', '.join(levels) or 'none'})")
        with _timed(timings, "calibrate"):
            tissues = measure_reference_tissues(series.volume, segmentation)
            contrast = detect_contrast(series.volume, segmentation, tissues)
            calibration = calibrate(series.volume, segmentation, contrast, kvp=_kvp(headers), tissues=tissues)
            levels = apply_calibration(levels, calibration, contrast)
        with _timed(timings, "genant"):
            levels = apply_genant(levels, grade_levels(series.volume, segmentation))
            levels = add_fracture_texture(levels, series.volume, segmentation, settings.radiomics_processes)
        feature_rows = []
        if settings.radiomics_preset:
            with _timed(timings, "radiomics"):
                feature_rows = extract_features(series.volume, segmentation, settings.radiomics_preset,
                                                processes=settings.radiomics_processes)
                write_feature_table(feature_rows, out_dir / FEATURE_TABLE_NAME)
        with _timed(timings, "classify"):
            bone_status = classify_bone_status(levels, feature_rows, settings)
        result = AnalysisResult(status="ok", study_instance_uid=study_uid, series_instance_uid=series_uid,
                                labelling_method=segmentation.method, levels=levels,
                                proximal_femur=measure_proximal_femurs(series.volume, segmentation.femurs),
                                bone_status=bone_status, calibration=calibration, contrast=contrast,
                                radiomics_file=FEATURE_TABLE_NAME if feature_rows else None,
                                series_selection=selection, timings_s=timings)
    except NotEvaluable as exc:
        result = AnalysisResult.not_evaluable(
            str(exc), study_uid, series_uid, timings_s=timings, series_selection=selection,
            labelling_method=segmentation.method if segmentation else "")
    with _timed(timings, "encode"):
        _write_outputs(out_dir, headers, series, segmentation, result, settings)
    result.timings_s.update(timings)
    result.write(out_dir / RESULT_JSON)
    log.info("analysis %s in %.1f s%s", result.status, sum(timings.values()),
             f": {result.reason}" if result.reason else "")
    return result


def _write_outputs(out_dir: Path, headers: Sequence[pydicom.Dataset], series: Series | None,
                   segmentation: SpineSegmentation | None, result: AnalysisResult,
                   settings: AnalysisSettings) -> None:
    seg = None
    if series is not None and segmentation is not None:
        sitk.WriteImage(series.volume.to_sitk(segmentation.label_map()), str(out_dir / LABELS_NIFTI),
                        useCompression=True)
    if result.status == "ok" and series is not None and segmentation is not None:
        seg = build_seg(series, segmentation)
        write(seg, out_dir / SEG_FILE)
        if settings.key_images:
            images = build_key_images(series, segmentation, result, banner=settings.banner)
            for image, name in zip(images, KEY_IMAGE_FILES, strict=True):
                write(image, out_dir / name)
    write(build_sr(headers, result, seg), out_dir / SR_FILE)
    if settings.pdf_report:
        write(build_pdf_report(series or headers, result, banner=settings.banner), out_dir / PDF_FILE)


def _kvp(headers: Sequence[pydicom.Dataset]) -> float | None:
    """Peak kilovoltage (0018,0060) of the series, if recorded."""
    value = headers[0].get("KVP")
    return float(value) if value not in (None, "") else None


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - start, 3)
