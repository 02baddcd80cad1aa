"""Choosing the segmentation backend.

* built-in (default, no weights): :func:`builtin` = spine (:mod:`.spine`) plus
  proximal femurs (:mod:`.femur`), sharing one canonical 2 mm view;
* imported: a TotalSegmentator multilabel NIfTI (:mod:`.imported`), e.g. from a
  site that runs TotalSegmentator on a GPU: ``osteonode analyze --segmentation
  FILE``, or ``[analysis] segmentation = "totalsegmentator"`` with
  ``segmentation_dir`` holding ``<SeriesInstanceUID>.nii.gz`` per series.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from osteonode.config import AnalysisSettings
from osteonode.segment import Backend, SpineSegmentation
from osteonode.segment.femur import segment_proximal_femurs
from osteonode.segment.frame import canonical_view
from osteonode.segment.imported import Version, load_totalsegmentator
from osteonode.segment.spine import segment_spine
from osteonode.volume import Volume

log = logging.getLogger(__name__)


def builtin(volume: Volume) -> SpineSegmentation:
    """Built-in spine and proximal-femur segmentation of ``volume`` ((z, y, x) HU).

    The femurs are segmented in a thread of their own while the spine is (its bodies on
    :data:`osteonode.segment.SEGMENTATION_THREADS`); the result does not depend on the threads.
    """
    view = canonical_view(volume)
    with ThreadPoolExecutor(1) as pool:
        femurs = pool.submit(segment_proximal_femurs, volume, view)
        segmentation = segment_spine(volume, view)
        segmentation.femurs = femurs.result()
    return segmentation


def imported(path: Path, version: Version = "auto") -> Backend:
    """Backend that reads a TotalSegmentator label map (v1/v2 class ids, or "auto")."""
    return partial(load_totalsegmentator, path, version=version)


def select_backend(settings: AnalysisSettings, series_instance_uid: str,
                   segmentation_file: Path | None = None) -> tuple[Backend, str]:
    """The backend for one series, and a note on the choice for the labelling method.

    An explicit ``segmentation_file`` wins; then ``segmentation = "totalsegmentator"``
    with ``<segmentation_dir>/<SeriesInstanceUID>.nii.gz``; a configured label
    map that is missing falls back to the built-in backend, and the note says so.
    """
    if segmentation_file is not None:
        return imported(segmentation_file, settings.totalsegmentator_version), "imported TotalSegmentator label map"
    if settings.segmentation == "totalsegmentator" and settings.segmentation_dir is not None:
        candidate = settings.segmentation_dir / f"{series_instance_uid}.nii.gz"
        if candidate.is_file():
            return imported(candidate, settings.totalsegmentator_version), "imported TotalSegmentator label map"
        log.warning("no TotalSegmentator label map for this series in segmentation_dir; built-in backend used")
        return builtin, "built-in backend (no TotalSegmentator label map was found for this series)"
    return builtin, ""
