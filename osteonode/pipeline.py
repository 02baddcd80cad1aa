"""The analysis pipeline for one CT study or series: plain functions, no services.

:func:`analyze_study` analyses the best-ranked candidate series of a study
(:mod:`osteonode.series`) and falls back to the next one when it is not
evaluable; :func:`analyze_files` analyses one series:
select -> load -> segment -> measure (HU) -> calibrate (vBMD, contrast) -> Genant ->
classify -> encode. Used both by the Celery worker and by ``osteonode analyze``.

The outputs are written in batches, each staged in a temporary folder and put
in place at once (:func:`osteonode.atomic.staged`), then handed to an optional
``publish`` callback, so that the results the PACS needs first
do not wait for the rest (the worker sends each batch at once):

1. ``sr.dcm`` (and ``result.json``), built from the SEG's deterministic UIDs
   and segments (:func:`~osteonode.dicom_out.seg.seg_reference`) before the
   SEG is encoded; radiomics features are extracted before it only when a
   configured ``model`` classifies from them;
2. ``seg.dcm``;
3. follow-up: ``labels.nii.gz``, the key images, the PDF report and, with
   ``radiomics_export``, ``radiomics.csv``.

Outputs written to ``out_dir``:

* ``result.json`` - :class:`~osteonode.result.AnalysisResult` (format in README.md),
  written after each phase,
* ``labels.nii.gz`` - vertebral bodies (VerSe IDs) and proximal femurs (90/91) on the source CT grid,
* ``seg.dcm`` - DICOM Segmentation (when the series was evaluable),
* ``sr.dcm`` - Comprehensive 3D SR, TID 1500 (always, also when not evaluable),
* ``key_1.dcm``, ``key_2.dcm`` - Secondary Capture key images, mid-sagittal and
  axial through L1 (when evaluable and ``key_images`` is on),
* ``report.dcm`` - one-page Encapsulated PDF report (when ``pdf_report`` is on),
* ``radiomics.csv`` - pyradiomics features of ``radiomics_preset``, one row per
  level (when evaluable and ``radiomics_export`` is on).

pyradiomics is imported only when features are extracted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pydicom
import SimpleITK as sitk

from osteonode.anatomy import REQUIRED_LEVELS
from osteonode.atomic import staged
from osteonode.classify import classify_bone_status
from osteonode.config import AnalysisSettings, SelectionSettings
from osteonode.dicom_out import build_key_images, build_pdf_report, build_seg, build_sr, write
from osteonode.dicom_out.seg import seg_reference
from osteonode.errors import NotEvaluable
from osteonode.feature_table import FEATURE_TABLE_NAME, write_feature_table
from osteonode.ingest.spool import instance_files
from osteonode.lineage import superseded_report
from osteonode.measure.calibration import apply_calibration, calibrate
from osteonode.measure.contrast import detect_contrast
from osteonode.measure.genant import apply_genant, grade_levels
from osteonode.measure.hu import measure_levels, measure_proximal_femurs
from osteonode.measure.tissues import measure_reference_tissues
from osteonode.result import AnalysisResult, SeriesNotUsed, SeriesSelection, SeriesUsed
from osteonode.segment import SpineSegmentation
from osteonode.segment.backends import select_backend
from osteonode.series import CT_IMAGE_SOP_CLASSES, SeriesInfo, SeriesRanking, check_series, lower_rank_reason
from osteonode.volume import Series, series_from_datasets

log = logging.getLogger(__name__)

RESULT_JSON, LABELS_NIFTI, SEG_FILE, SR_FILE = "result.json", "labels.nii.gz", "seg.dcm", "sr.dcm"
KEY_IMAGE_FILES = ("key_1.dcm", "key_2.dcm")  # mid-sagittal, axial through L1
PDF_FILE = "report.dcm"
OUTPUT_FILES = (RESULT_JSON, LABELS_NIFTI, SEG_FILE, SR_FILE, *KEY_IMAGE_FILES, PDF_FILE, FEATURE_TABLE_NAME)
#: ``publish(result, paths)``: called with the DICOM files of each phase once they are written.
Publish = Callable[[AnalysisResult, list[Path]], None]


def analyze_study(ranking: SeriesRanking, out_dir: Path, settings: AnalysisSettings | None = None,
                  selection_rules: SelectionSettings | None = None, *,
                  files_of: Callable[[SeriesInfo], list[Path]] | None = None,
                  publish: Publish | None = None) -> AnalysisResult:
    """Analyse the best candidate series of a study, falling back to the next while not evaluable.

    Exactly one set of outputs is left in ``out_dir``: that of the first
    evaluable candidate, or, when none is, one not-evaluable SR (and PDF)
    that names why each series was not used. Either way
    ``result.series_selection`` names the series used and the others with
    their reasons. Nothing is written for a candidate that was not
    evaluable, so ``publish`` sees only the final outputs.

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
    publish : callable, optional
        ``publish(result, paths)``: called with the SR file as soon as it is
        written, then with the SEG file (when evaluable), then with the DICOM
        files of the follow-up (key images, PDF) if any. The worker sends each
        batch at once.

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
    settings = settings or AnalysisSettings()
    _prepare(out_dir, settings)
    failed: list[SeriesNotUsed] = []
    rejected = [_not_used(r.series, r.reason) for r in ranking.rejected]
    for i, candidate in enumerate(ranking.candidates):
        lower = [_not_used(c, lower_rank_reason(c, candidate, selection_rules or SelectionSettings()))
                 for c in ranking.candidates[i + 1:]]
        selection = SeriesSelection(used=SeriesUsed(series_number=candidate.series_number,
                                                     description=candidate.description, kernel=candidate.kernel,
                                                     slice_thickness_mm=candidate.slice_thickness_mm),
                                    not_used=[*failed, *lower, *rejected])
        analysis = _analyze_series(files_of(candidate), settings, None, selection, selection_rules)
        result = analysis.result
        if result.status == "ok":
            return _write_outputs(analysis, out_dir, settings, publish)
        del analysis  # the volume of a failed candidate is not kept while the next one loads
        log.info("candidate %d of %d not evaluable; %s", i + 1, len(ranking.candidates),
                 "trying the next" if i + 1 < len(ranking.candidates) else "no candidate left")
        failed.append(_not_used(candidate, result.reason or "not evaluable"))
    # the not-evaluable SR goes into the study as if made from its best series (a CT image series if any)
    ct_images = [r.series for r in ranking.rejected if r.series.sop_class_uid in CT_IMAGE_SOP_CLASSES]
    sources = [*ranking.candidates, *ct_images, *(r.series for r in ranking.rejected)]
    if not sources:
        raise ValueError("the study has no series")
    source = sources[0]
    analysis = _analyze_series(files_of(source), settings, None,
                               SeriesSelection(used=None, not_used=[*failed, *rejected]), selection_rules)
    return _write_outputs(analysis, out_dir, settings, publish)


def _not_used(info: SeriesInfo, reason: str) -> SeriesNotUsed:
    return SeriesNotUsed(series_number=info.series_number, description=info.description, reason=reason)


def analyze_files(files: Sequence[Path], out_dir: Path, settings: AnalysisSettings | None = None,
                  segmentation_file: Path | None = None, *, selection: SeriesSelection | None = None,
                  selection_rules: SelectionSettings | None = None, publish: Publish | None = None) -> AnalysisResult:
    """Analyse one CT series and write the outputs to ``out_dir``.

    The outputs are written in batches (see the module docstring): the SR, the
    SEG, then the key images, PDF report and radiomics feature table.

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
    publish : callable, optional
        ``publish(result, paths)``, called with each batch of DICOM files as
        soon as it is written: the SR, the SEG (when evaluable), the key
        images and PDF (if any), as for :func:`analyze_study`.

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
    settings = settings or AnalysisSettings()
    _prepare(out_dir, settings)
    analysis = _analyze_series(files, settings, segmentation_file, selection, selection_rules)
    return _write_outputs(analysis, out_dir, settings, publish)


def radiomics_needed(settings: AnalysisSettings) -> Literal["critical", "follow_up"] | None:
    """When radiomics features are extracted, if at all.

    Parameters
    ----------
    settings : AnalysisSettings
        ``radiomics_preset``, ``model`` and ``radiomics_export``.

    Returns
    -------
    {"critical", "follow_up", None}
        ``"critical"`` when a configured model classifies from the features
        (the SR needs them); ``"follow_up"`` when only ``radiomics.csv`` is
        exported; None when no preset is set or nothing needs the features.
    """
    if not settings.radiomics_preset:
        return None
    if settings.model is not None:
        return "critical"
    return "follow_up" if settings.radiomics_export else None


def _prepare(out_dir: Path, settings: AnalysisSettings) -> None:
    """Create ``out_dir``; start the radiomics workers if features will be extracted.

    Earlier outputs stay until the first batch of the new ones replaces them (:func:`_write_outputs`).
    """
    if radiomics_needed(settings):
        from osteonode.measure.radiomics import start_worker_pool
        start_worker_pool(settings.radiomics_processes)
    out_dir.mkdir(parents=True, exist_ok=True)


@dataclass
class _Analysis:
    """One analysed series between the computation and the writing of its outputs."""

    result: AnalysisResult
    headers: list[pydicom.Dataset]
    series: Series | None
    segmentation: SpineSegmentation | None
    feature_rows: list[dict]

    def evaluable(self) -> tuple[Series, SpineSegmentation] | None:
        """The series and segmentation when the result is evaluable (status ok), else None."""
        if self.result.status == "ok" and self.series is not None and self.segmentation is not None:
            return self.series, self.segmentation
        return None


def _analyze_series(files: Sequence[Path], settings: AnalysisSettings, segmentation_file: Path | None,
                    selection: SeriesSelection | None, selection_rules: SelectionSettings | None) -> _Analysis:
    """Everything up to the bone status (the SR's content), nothing written; see :func:`analyze_files`."""
    if not files:
        raise FileNotFoundError("no DICOM files to analyse")
    timings: dict[str, float] = {}
    # read once: the headers, then the volume
    headers: list[pydicom.Dataset] = [pydicom.dcmread(p) for p in sorted(files)]
    study_uid = str(headers[0].get("StudyInstanceUID", ""))
    series_uid = str(headers[0].get("SeriesInstanceUID", ""))
    series: Series | None = None
    segmentation: SpineSegmentation | None = None
    feature_rows: list[dict] = []
    try:
        with _timed(timings, "select"):
            if selection is not None and selection.used is None:
                raise NotEvaluable(selection.not_used[0].reason if len(selection.not_used) == 1 else
                                   f"none of the study's {len(selection.not_used)} series could be analysed "
                                   "(the reason for each is listed with the series)")
            check_series(headers, selection_rules)
        with _timed(timings, "load"):
            series = series_from_datasets(headers)
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
            calibration = calibrate(series.volume, segmentation, contrast, kvp=_header_value(headers, "KVP"),
                                    tissues=tissues)
            levels = apply_calibration(levels, calibration, contrast)
        with _timed(timings, "genant"):
            levels = apply_genant(levels, grade_levels(series.volume, segmentation,
                                                       _header_value(headers, "SliceThickness")))
            if any(level.fracture_suspected for level in levels.values()):
                from osteonode.measure.radiomics import add_fracture_texture
                levels = add_fracture_texture(levels, series.volume, segmentation, settings.radiomics_processes)
        if radiomics_needed(settings) == "critical":
            with _timed(timings, "radiomics"):
                feature_rows = _extract_features(series, segmentation, settings)
        with _timed(timings, "classify"):
            bone_status = classify_bone_status(levels, feature_rows, settings)
        result = AnalysisResult(status="ok", study_instance_uid=study_uid, series_instance_uid=series_uid,
                                labelling_method=segmentation.method, levels=levels,
                                proximal_femur=measure_proximal_femurs(series.volume, segmentation.femurs),
                                bone_status=bone_status, calibration=calibration, contrast=contrast,
                                series_selection=selection, timings_s=timings)
    except NotEvaluable as exc:
        result = AnalysisResult.not_evaluable(
            str(exc), study_uid, series_uid, timings_s=timings, series_selection=selection,
            labelling_method=segmentation.method if segmentation else "")
    for ds in headers:  # not kept once the volume is built, nor when the series was not evaluable
        if "PixelData" in ds:
            del ds.PixelData
    return _Analysis(result, headers, series, segmentation, feature_rows)


def _extract_features(series: Series, segmentation: SpineSegmentation, settings: AnalysisSettings) -> list[dict]:
    from osteonode.measure.radiomics import extract_features
    if settings.radiomics_preset is None:
        raise ValueError("radiomics features need a radiomics_preset")
    return extract_features(series.volume, segmentation, settings.radiomics_preset,
                            processes=settings.radiomics_processes)


def _write_outputs(analysis: _Analysis, out_dir: Path, settings: AnalysisSettings,
                   publish: Publish | None) -> AnalysisResult:
    """Write the SR, the SEG, then the follow-up outputs, publishing each batch as soon as it is in place.

    Each batch is written into a staging folder with the ``result.json`` of
    that moment and appears in ``out_dir`` at once (:func:`osteonode.atomic.staged`);
    the first replaces every output of an earlier analysis, so a reader sees
    the earlier set until the new SR is in place, never a mix or a partly
    written batch. The SR and PDF name the earlier SR of the study they
    supersede, if the record of the last SR sent (:mod:`osteonode.lineage`)
    is in ``out_dir``. The SR is built from
    :func:`~osteonode.dicom_out.seg.seg_reference` (the SEG's UIDs and
    segments) and goes first: encoding the SEG's frames takes several seconds.
    """
    result, evaluable = analysis.result, analysis.evaluable()
    result.supersedes = superseded_report(out_dir, analysis.headers)

    def write_sr(stage: Path) -> list[Path]:
        with _timed(result.timings_s, "encode_sr"):  # from the SEG's UIDs and segments, before the SEG is encoded
            reference = seg_reference(*evaluable) if evaluable else None
            return [write(build_sr(analysis.headers, result, reference), stage / SR_FILE)]

    batches: list[Callable[[Path], list[Path]]] = [write_sr]
    if evaluable:
        batches.append(lambda stage: _write_seg(*evaluable, result, stage))
    batches.append(lambda stage: _write_follow_up(analysis, stage, settings))
    for i, batch in enumerate(batches):
        with staged(out_dir, replaces=OUTPUT_FILES if i == 0 else ()) as stage:
            written = [out_dir / path.name for path in batch(stage)]
            result.write(stage / RESULT_JSON)
        if publish is not None and written:
            publish(result, written)
    log.info("analysis %s in %.1f s (stage times)%s", result.status, sum(result.timings_s.values()),
             f": {result.reason}" if result.reason else "")
    return result


def _write_seg(series: Series, segmentation: SpineSegmentation, result: AnalysisResult, out_dir: Path) -> list[Path]:
    """Encode and write the SEG of an evaluable analysis into ``out_dir``; its path."""
    with _timed(result.timings_s, "encode_seg"):
        return [write(build_seg(series, segmentation), out_dir / SEG_FILE)]


def _write_follow_up(analysis: _Analysis, out_dir: Path, settings: AnalysisSettings) -> list[Path]:
    """Write the label map, key images, PDF report and feature table as configured into ``out_dir``; the DICOM
    files' paths."""
    result, series, segmentation = analysis.result, analysis.series, analysis.segmentation
    timings = result.timings_s
    evaluable = analysis.evaluable()
    written: list[Path] = []
    if series is not None and segmentation is not None:
        with _timed(timings, "labels"):
            sitk.WriteImage(series.volume.to_sitk(segmentation.label_map()), str(out_dir / LABELS_NIFTI),
                            useCompression=True)
    if evaluable and settings.key_images:
        with _timed(timings, "key_images"):
            images = build_key_images(*evaluable, result, banner=settings.banner)
            written += [write(image, out_dir / name) for image, name in zip(images, KEY_IMAGE_FILES, strict=True)]
    if settings.pdf_report:
        with _timed(timings, "pdf"):
            written.append(write(build_pdf_report(series or analysis.headers, result, banner=settings.banner),
                                 out_dir / PDF_FILE))
    if evaluable and settings.radiomics_export and radiomics_needed(settings):
        rows = analysis.feature_rows  # extracted already when a model classified from them
        if not rows:
            with _timed(timings, "radiomics"):
                rows = _extract_features(*evaluable, settings)
        write_feature_table(rows, out_dir / FEATURE_TABLE_NAME)
        result.radiomics_file = FEATURE_TABLE_NAME if rows else None
    return written


def _header_value(headers: Sequence[pydicom.Dataset], keyword: str) -> float | None:
    """A numeric attribute of the series' first header (e.g. KVP (0018,0060), Slice Thickness (0018,0050));
    None when it is absent, empty or not one number."""
    try:
        return float(headers[0].get(keyword))
    except (TypeError, ValueError):
        return None


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - start, 3)
