"""Radiomics features per vertebral level with pyradiomics, from validated parameter files.

Feature settings live in data, not in code (the pyradiomics way): each *preset*
is a pyradiomics parameter file (``dicom_templates/radiomics/<name>.yaml``,
validated with pyradiomics' own pykwalify schema when loaded) plus an entry in
``dicom_templates/radiomics/presets.json`` for what pyradiomics settings cannot
express: which ROI (vertebral bodies or trabecular ROIs), which levels, a crop
margin, and an optional intensity rescaling. Shipped presets:

``seed000``
    Xue Z et al., BMC Musculoskelet Disord 2022;23:336. Original + LoG
    (sigma 1.0, 1.5, 2.0, 2.5 mm) + wavelet images, all feature classes: 1,210
    features per vertebra with pyradiomics 3.1 (1,197 in the paper; the
    parameter file says which GLCM feature differs). ROI: the
    whole vertebral bodies of L1-L4, as the paper's ROIs. Intensities are
    rescaled before extraction: the 0.1 and 99.9 percentiles of the whole image
    become 0 and 255, values outside are clipped -- pyradiomics' own
    ``normalize`` setting is a z-score, so this step is done here
    (:func:`image_percentiles`, :func:`_rescale`).
``seed003``
    Goller SS et al. 2023: exactly eight texture features (global variance and
    skewness, GLCM joint energy and joint entropy, GLRLM SRE, LRE, RLN, RP) of
    each vertebral body T12-L5, after 1 mm isotropic cubic B-spline resampling.
``seed004``
    BMC Musculoskelet Disord 2025;26:378: bin width 25 HU, 1 mm isotropic
    B-spline resampling, original + LoG + wavelet images. The paper's ROI is the
    proximal femur, which the spine segmentation does not provide; the settings
    are applied to the L1-L4 bodies.

Memory: pyradiomics filters (LoG, wavelet) and resamples the whole image it is
given, which took 12 GB on an uncropped CT. Every level is therefore cropped to
its ROI's bounding box plus the preset's ``crop_margin_mm`` before anything is
handed to pyradiomics. 12 mm without resampling (seed000): the support of the
largest LoG kernel (4 sigma = 10 mm) plus 2 mm, more than the 6-tap coif1
wavelet needs. On the real CT the features differ from those of a 45 mm
margin by at most 2e-3 (relative; the median of the LoG 2.5 mm image, a value
near zero, by 0.004 on the 0-255 scale) at 3 mm and 6e-4 at 0.8 x 0.8 x 1.25 mm;
a 15 mm margin kept them within 3e-4 but cost 9 % more time. 30 mm with B-spline
resampling (seed003, seed004): the B-spline prefilter is recursive over the
whole input and its boundary effect decays by 0.27 per source voxel, so it
needs some 10 voxels of a 3 mm CT; with 15 mm some wavelet features moved by
up to 1 % (relative), with 30 mm by at most 2e-3.

Time: pyradiomics' C code holds the GIL, so the levels are extracted in
parallel worker *processes* (``processes``, the ``radiomics_processes``
setting): billiard, Celery's fork of :mod:`multiprocessing`, because the Celery
worker runs analyses in daemonic processes that the standard library forbids to
have children. Measured times: ``bench/features.py`` (figures in README.md, Benchmarks).

Arrays are ``(z, y, x)`` numpy; SimpleITK images are ``(x, y, z)``
(:meth:`osteonode.volume.Volume.to_sitk` converts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Literal

import billiard
import numpy as np
import pykwalify.errors
import ruamel.yaml.error
import SimpleITK as sitk
from billiard.einfo import ExceptionWithTraceback
from radiomics import imageoperations
from radiomics.featureextractor import RadiomicsFeatureExtractor
from scipy import ndimage

from osteonode.anatomy import VERTEBRA_IDS
from osteonode.feature_table import META_COLUMNS
from osteonode.measure.hu import MIN_ROI_VOXELS
from osteonode.result import LevelResult
from osteonode.segment import SpineSegmentation
from osteonode.volume import Volume, grow_box

log = logging.getLogger(__name__)

PRESETS_FILE = "presets.json"
#: Columns of a feature table that are not features, in this order.
_ROI_KINDS = ("bodies", "trabecular")
_PRESET_KEYS = {"params_file", "source", "roi", "roi_note", "levels", "intensity_rescale", "crop_margin_mm"}
_RESCALE_KEYS = {"lower_percentile", "upper_percentile", "output_min", "output_max"}
#: z-slab size (voxels) for the chunked image histogram: bounds the extra memory of the percentiles.
_HISTOGRAM_CHUNK_VOXELS = 1 << 22


# pyradiomics sets its logger to INFO when imported, whatever the application configured, and
# logs every filter and feature class there (some 80 records per vertebra): keep its warnings
# only, unless DEBUG logging is on.
if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
    logging.getLogger("radiomics").setLevel(logging.WARNING)

_PYRADIOMICS_BIN_EDGES = imageoperations.getBinEdges


def _bin_edges(parameterValues, **kwargs):  # noqa: N803 (pyradiomics' signature)
    """pyradiomics' ``getBinEdges`` given only the minimum and maximum of the ROI's values.

    With a bin width, pyradiomics computes the edges from ``min(values)`` and
    ``max(values)`` using Python's built-in ``min``/``max``, which walk a numpy
    array element by element, a sizeable part of ``seed000``'s time per vertebra
    on a thin-slice CT (6 binnings x 13 images; bench/README.md). Handing it the two-element
    array ``[min, max]`` (numpy's reductions) gives the same edges with the same
    code; with ``binCount`` (a histogram of all values) the values go through
    unchanged. Installed in ``radiomics.imageoperations`` by
    :func:`install_fast_bin_edges`; ``tests/unit/test_radiomics.py`` checks that the features are equal.
    """
    if kwargs.get("binCount") is None:
        values = np.asarray(parameterValues)
        parameterValues = np.array([values.min(), values.max()])
    return _PYRADIOMICS_BIN_EDGES(parameterValues, **kwargs)


def install_fast_bin_edges() -> None:
    """Put :func:`_bin_edges` in place of pyradiomics' ``getBinEdges``, once per process.

    Called explicitly where an extractor is built (:func:`_extractor`, in this
    process and in each radiomics worker process), not at import: importing
    this module changes nothing in pyradiomics. Idempotent; a caller that puts
    pyradiomics' own function back afterwards (the equality test, the
    reference run of ``bench/features.py``) keeps it.
    """
    global _FAST_BIN_EDGES_INSTALLED
    if not _FAST_BIN_EDGES_INSTALLED:
        imageoperations.getBinEdges = _bin_edges
        _FAST_BIN_EDGES_INSTALLED = True


_FAST_BIN_EDGES_INSTALLED = False


class RadiomicsParamsError(ValueError):
    """A radiomics preset or its pyradiomics parameter file is missing or invalid."""


@dataclass(frozen=True)
class IntensityRescale:
    """Linear map of image percentiles onto an output range, values outside clipped.

    Attributes
    ----------
    lower_percentile, upper_percentile : float
        Percentiles (0-100) of the whole image that map to ``output_min`` and
        ``output_max``.
    output_min, output_max : float
        Output range (seed000: 0 and 255).
    """

    lower_percentile: float
    upper_percentile: float
    output_min: float
    output_max: float


@dataclass(frozen=True)
class Preset:
    """A validated radiomics preset.

    Attributes
    ----------
    name : str
        Preset name, e.g. ``"seed000"``.
    params_file : pathlib.Path
        The pyradiomics parameter file (validated).
    sha256 : str
        Hex SHA-256 of the parameter file's bytes and of the preset entry: the
        fingerprint that feature tables and trained models carry, so that a model
        is only ever applied to features extracted the same way.
    roi : {"bodies", "trabecular"}
        Which label map of :class:`~osteonode.segment.SpineSegmentation` is the ROI.
    levels : tuple of str
        Levels to extract, cranio-caudal (e.g. ``("L1", "L2", "L3", "L4")``).
    intensity_rescale : IntensityRescale or None
        Rescaling applied before pyradiomics, or None.
    crop_margin_mm : float
        Margin around each ROI's bounding box kept for filtering and resampling, mm.
    source : str
        The publication the preset reproduces.
    """

    name: str
    params_file: Path
    sha256: str
    roi: Literal["bodies", "trabecular"]
    levels: tuple[str, ...]
    intensity_rescale: IntensityRescale | None
    crop_margin_mm: float
    source: str


def load_preset(name: str = "seed000", params_dir: Path | None = None) -> tuple[Preset, RadiomicsFeatureExtractor]:
    """Load and validate a preset and build its pyradiomics extractor.

    Parameters
    ----------
    name : str
        Preset name, a key of ``presets.json``.
    params_dir : pathlib.Path, optional
        Folder holding ``presets.json`` and the parameter files; default: the
        presets shipped in ``dicom_templates/radiomics``.

    Returns
    -------
    preset : Preset
        The validated preset.
    extractor : radiomics.featureextractor.RadiomicsFeatureExtractor
        Extractor configured from the parameter file.

    Raises
    ------
    RadiomicsParamsError
        Unknown preset, malformed ``presets.json`` entry, missing parameter file,
        or a parameter file that pyradiomics' schema rejects (the message names
        the file and quotes the schema error).
    """
    folder = Path(params_dir) if params_dir is not None else Path(str(resources.files("dicom_templates") / "radiomics"))
    presets_path = folder / PRESETS_FILE
    try:
        presets = json.loads(presets_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RadiomicsParamsError(f"no {PRESETS_FILE} in {folder}") from exc
    except json.JSONDecodeError as exc:
        raise RadiomicsParamsError(f"{presets_path}: not valid JSON: {exc}") from exc
    available = sorted(k for k in presets if not k.startswith("_"))
    if name.startswith("_") or name not in presets:
        raise RadiomicsParamsError(f"unknown radiomics preset {name!r}; available: {', '.join(available)}")
    entry = presets[name]
    _check_entry(name, entry)
    params_file = folder / entry["params_file"]
    if not params_file.is_file():
        raise RadiomicsParamsError(f"preset {name!r}: parameter file {params_file} does not exist")
    extractor = _extractor(params_file)
    digest = hashlib.sha256(params_file.read_bytes())
    digest.update(json.dumps(entry, sort_keys=True).encode("utf-8"))
    rescale = entry["intensity_rescale"]
    preset = Preset(name=name, params_file=params_file, sha256=digest.hexdigest(), roi=entry["roi"],
                    levels=tuple(entry["levels"]),
                    intensity_rescale=IntensityRescale(**rescale) if rescale is not None else None,
                    crop_margin_mm=float(entry["crop_margin_mm"]), source=entry["source"])
    return preset, extractor


def _check_entry(name: str, entry: object) -> None:
    """Validate one ``presets.json`` entry; raise :class:`RadiomicsParamsError` naming the fault."""
    where = f"{PRESETS_FILE}, preset {name!r}"
    if not isinstance(entry, dict):
        raise RadiomicsParamsError(f"{where}: must be an object")
    if set(entry) != _PRESET_KEYS:
        raise RadiomicsParamsError(f"{where}: keys must be {sorted(_PRESET_KEYS)}, got {sorted(entry)}")
    for key in ("params_file", "source"):
        if not isinstance(entry[key], str) or not entry[key]:
            raise RadiomicsParamsError(f"{where}: {key} must be a non-empty string")
    if entry["roi"] not in _ROI_KINDS:
        raise RadiomicsParamsError(f"{where}: roi must be one of {_ROI_KINDS}, got {entry['roi']!r}")
    levels = entry["levels"]
    if not isinstance(levels, list) or not levels or any(lv not in VERTEBRA_IDS for lv in levels):
        raise RadiomicsParamsError(f"{where}: levels must be a non-empty list of {sorted(VERTEBRA_IDS)}")
    margin = entry["crop_margin_mm"]
    if not isinstance(margin, (int, float)) or margin <= 0:
        raise RadiomicsParamsError(f"{where}: crop_margin_mm must be a positive number of mm")
    rescale = entry["intensity_rescale"]
    if rescale is not None:
        if not isinstance(rescale, dict) or set(rescale) != _RESCALE_KEYS:
            raise RadiomicsParamsError(f"{where}: intensity_rescale must be null or have keys {sorted(_RESCALE_KEYS)}")
        if not (0.0 <= rescale["lower_percentile"] < rescale["upper_percentile"] <= 100.0):
            raise RadiomicsParamsError(f"{where}: need 0 <= lower_percentile < upper_percentile <= 100")
        if not rescale["output_min"] < rescale["output_max"]:
            raise RadiomicsParamsError(f"{where}: need output_min < output_max")


def _extractor(params_file: Path) -> RadiomicsFeatureExtractor:
    """Build the extractor; pyradiomics validates the file against its pykwalify schema."""
    install_fast_bin_edges()
    try:
        return RadiomicsFeatureExtractor(str(params_file))
    except (pykwalify.errors.PyKwalifyException, ruamel.yaml.error.YAMLError) as exc:
        raise RadiomicsParamsError(f"{params_file}: not a valid pyradiomics parameter file: {exc}") from exc
    except (ValueError, TypeError) as exc:
        # pyradiomics' schema extension functions (feature class, image type, wavelet,
        # interpolator names) raise these directly through pykwalify.
        raise RadiomicsParamsError(f"{params_file}: rejected by pyradiomics' schema: {exc}") from exc


def extract_features(volume: Volume, segmentation: SpineSegmentation, params: str = "seed000", *,
                     params_dir: Path | None = None, processes: int = 1,
                     levels: Collection[str] | None = None) -> list[dict[str, float | int | str]]:
    """Radiomics features of each level of a preset, one row per level.

    Each level is cropped to its ROI's bounding box plus the preset's margin
    before pyradiomics sees it, so memory and time scale with the vertebra, not
    with the CT. With ``processes`` > 1 the levels are extracted in parallel
    worker processes (pyradiomics' C code holds the GIL, so threads would not
    help); the rows are the same as with one process.

    Parameters
    ----------
    volume : Volume
        CT volume, ``hu`` ``(z, y, x)`` float32 in HU.
    segmentation : SpineSegmentation
        ``bodies`` and ``trabecular`` ``(z, y, x)`` uint8 VerSe label maps on the
        volume's grid.
    params : str
        Preset name (``"seed000"``, ``"seed003"``, ``"seed004"``).
    params_dir : pathlib.Path, optional
        Folder with ``presets.json`` and parameter files instead of the shipped ones.
    processes : int
        Worker processes for the levels; 1: extract in this process. The
        workers are forked from a ``forkserver`` that has imported this module
        (:func:`_process_context`), started on first use and kept for later
        calls (:func:`_worker_pool`); each receives the cropped image and mask
        of one level at a time, as soon as it is cropped.
    levels : collection of str, optional
        Only these of the preset's levels (e.g. ``{"L1"}``); default all. A
        level's features do not depend on which other levels are extracted.

    Returns
    -------
    list of dict
        One row per preset level present in the ROI label map (at least 10
        voxels), cranio-caudal: the :data:`META_COLUMNS` (level name, VerSe ID,
        preset name and fingerprint, ROI kind, ROI voxel count on the CT grid)
        then the features as floats, keyed by pyradiomics' names
        (``"<image type>_<class>_<feature>"``, e.g.
        ``"log-sigma-1-0-mm-3D_glcm_JointEnergy"``).

    Raises
    ------
    RadiomicsParamsError
        If the preset is unknown or invalid.
    ValueError
        If the label maps are not on the volume's grid, ``processes`` < 1, or
        pyradiomics rejects an ROI (e.g. fewer than 3 dimensions after
        resampling).
    RuntimeError
        If a worker process died (e.g. killed for memory).
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    preset, extractor = load_preset(params, params_dir)
    crops = _level_crops(volume, segmentation, preset, levels)
    if processes == 1:
        extracted = [(crop.level, crop.voxel_count, _extract(extractor, crop.image, crop.mask)) for crop in crops]
    else:
        extracted = _extract_in_workers(preset, params_dir, crops, processes)
    rows = []
    for level, voxel_count, values in extracted:
        row: dict[str, float | int | str] = {
            "level": level, "vertebra_id": VERTEBRA_IDS[level], "preset": preset.name,
            "preset_sha256": preset.sha256, "roi": preset.roi, "roi_voxel_count": voxel_count}
        row.update(values)
        rows.append(row)
        log.debug("radiomics %s: %s, %d features", preset.name, level, len(values))
    return rows


def _extract_in_workers(preset: Preset, params_dir: Path | None, crops: Iterator[_LevelCrop], processes: int
                        ) -> list[tuple[str, int, dict[str, float]]]:
    """Each level's features in this process's worker pool, sent to it as soon as the level is cropped.

    Returns ``(level, ROI voxel count, features)`` in the order of ``crops``.
    """
    pool = _worker_pool(processes)
    try:
        pending = [(crop.level, crop.voxel_count,
                    pool.apply_async(_extract_in_worker, (preset.name, params_dir, crop.image, crop.mask)))
                   for crop in crops]
        return [(level, voxel_count, job.get()) for level, voxel_count, job in pending]
    except ExceptionWithTraceback as exc:  # billiard's wrapper of WorkerLostError; the pool replaces the worker
        raise RuntimeError(f"radiomics {preset.name}: a worker process died: {exc.exc}") from exc.exc


def start_worker_pool(processes: int) -> None:
    """Start this process's pool of ``processes`` radiomics workers in the background; 1: nothing to start.

    The first start imports pyradiomics in the forkserver (bench/README.md):
    started when an analysis begins, it is done by the time the levels are segmented.
    """
    if processes > 1:
        threading.Thread(target=_worker_pool, args=(processes,), name="radiomics-pool-start", daemon=True).start()


_pools: dict[int, billiard.pool.Pool] = {}
_pools_lock = threading.Lock()


def _worker_pool(processes: int) -> billiard.pool.Pool:
    """This process's pool of ``processes`` radiomics workers: started on first use, then kept.

    Kept because starting and stopping a billiard pool costs its polling
    threads' interval (up to 1 s) each time, a large part of a thin-slice CT's
    extraction (bench/README.md).
    Idle workers hold little of their own memory: they are forked from the
    forkserver, which has pyradiomics imported, and numpy returns the large
    arrays of a finished level to the system. billiard replaces a worker that
    dies and terminates the pool when this process exits.
    """
    with _pools_lock:
        if processes not in _pools:
            _pools[processes] = _process_context().Pool(processes, initializer=_init_worker)
        return _pools[processes]


@dataclass(frozen=True)
class _LevelCrop:
    """One level's input to pyradiomics: the cropped (and rescaled) image and its ``(z, y, x)`` uint8 mask."""

    level: str
    voxel_count: int
    image: Volume
    mask: np.ndarray


def _level_crops(volume: Volume, segmentation: SpineSegmentation, preset: Preset,
                 levels: Collection[str] | None = None) -> Iterator[_LevelCrop]:
    """Crop every preset level present (at least :data:`MIN_ROI_VOXELS`; of ``levels`` if given) to its ROI box
    plus the margin, in turn.

    Raises ValueError (when first iterated) if the label map is not on the volume's grid.
    """
    labels = segmentation.bodies if preset.roi == "bodies" else segmentation.trabecular
    volume.require_grid(labels, f"{preset.roi} label map")
    rescale = preset.intensity_rescale
    bounds = (None if rescale is None
              else image_percentiles(volume.hu, (rescale.lower_percentile, rescale.upper_percentile)))
    boxes = ndimage.find_objects(labels)  # one pass: bounding box of every label value
    for level in (lv for lv in preset.levels if levels is None or lv in levels):
        vid = VERTEBRA_IDS[level]
        box = boxes[vid - 1] if vid <= len(boxes) else None
        if box is None:
            log.info("radiomics %s: %s not in the %s label map", preset.name, level, preset.roi)
            continue
        crop = grow_box(box, volume.shape, volume.margin_voxels(preset.crop_margin_mm))
        mask = (labels[crop] == vid).astype(np.uint8)
        voxel_count = int(mask.sum())
        if voxel_count < MIN_ROI_VOXELS:
            log.info("radiomics %s: %s ROI has %d voxels, skipped", preset.name, level, voxel_count)
            continue
        image = volume.crop(crop)
        if rescale is not None and bounds is not None:
            image = replace(image, hu=_rescale(image.hu, bounds, rescale))
        yield _LevelCrop(level, voxel_count, image, mask)


def _extract(extractor: RadiomicsFeatureExtractor, image: Volume, mask: np.ndarray) -> dict[str, float]:
    """pyradiomics' features of label 1 of ``mask`` in ``image``, as floats."""
    features = extractor.execute(image.to_sitk(), image.to_sitk(mask), label=1)
    return {key: float(value) for key, value in features.items()}


def _extract_in_worker(params: str, params_dir: Path | None, image: Volume, mask: np.ndarray) -> dict[str, float]:
    """:func:`_extract` in a worker process, with the preset loaded there."""
    return _extract(load_preset(params, params_dir)[1], image, mask)


def _init_worker() -> None:
    """Worker initializer: one ITK thread each, as the workers already share the cores (LoG filters)."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _process_context() -> billiard.context.BaseContext:
    """billiard's ``forkserver`` context, whose server has imported this module and the main one.

    The server starts once per process; the workers it forks find
    pyradiomics and the program's main module imported.

    billiard is Celery's fork of :mod:`multiprocessing`: unlike it, it lets the
    daemonic processes of Celery's prefork pool (where ``worker.tasks.analyze_study_task``
    runs) start children, and it raises ``WorkerLostError`` instead of hanging
    when a worker is killed (after some 10 s). Not ``fork``: the caller may
    hold threads (SimpleITK's pool, Celery's) whose locks a forked child would
    inherit; not ``spawn``: every worker would import pyradiomics again.
    """
    context = billiard.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])
    return context


def image_percentiles(hu: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """Percentiles of a whole CT volume at 1 HU resolution, in bounded memory.

    A histogram of ``floor(hu)`` is accumulated slab by slab (no copy of the
    volume), and the percentiles are interpolated linearly between order
    statistics as :func:`numpy.percentile` does by default; for integer HU
    (every CT stored with rescale slope 1) the result equals
    ``numpy.percentile(hu, percentiles)`` exactly.

    Parameters
    ----------
    hu : numpy.ndarray
        ``(z, y, x)`` volume in HU.
    percentiles : tuple of float
        Two percentiles in ``[0, 100]``.

    Returns
    -------
    tuple of float
        The two percentiles, HU.

    Raises
    ------
    ValueError
        If ``hu`` is empty or holds non-finite values.
    """
    if hu.size == 0:
        raise ValueError("empty volume")
    low, high = float(np.min(hu)), float(np.max(hu))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("the volume holds non-finite values")
    offset = math.floor(low)
    counts = np.zeros(math.floor(high) - offset + 1, dtype=np.int64)
    step = max(1, _HISTOGRAM_CHUNK_VOXELS // max(1, hu[0].size))
    for start in range(0, hu.shape[0], step):
        slab = np.floor(hu[start:start + step]).astype(np.int64).ravel() - offset
        counts += np.bincount(slab, minlength=counts.size)
    cumulative = np.cumsum(counts)

    def order_statistic(k: int) -> int:  # k-th smallest value (0-based), HU
        return offset + int(np.searchsorted(cumulative, k, side="right"))

    values = []
    for q in percentiles:
        rank = q / 100.0 * (hu.size - 1)
        below = math.floor(rank)
        lower = order_statistic(below)
        upper = order_statistic(min(below + 1, hu.size - 1))
        values.append(lower + (rank - below) * (upper - lower))
    return values[0], values[1]


def _rescale(hu: np.ndarray, bounds: tuple[float, float], rescale: IntensityRescale) -> np.ndarray:
    """Map ``bounds`` linearly onto the output range and clip (seed000's 0-255 normalisation)."""
    low, high = bounds
    if high <= low:
        raise ValueError(f"degenerate image intensity range for rescaling: {low} .. {high} HU")
    scale = (rescale.output_max - rescale.output_min) / (high - low)
    out = (hu - np.float32(low)) * np.float32(scale) + np.float32(rescale.output_min)
    return np.clip(out, rescale.output_min, rescale.output_max, out=out)


def add_fracture_texture(levels: dict[str, LevelResult], volume: Volume, segmentation: SpineSegmentation,
                         processes: int = 1) -> dict[str, LevelResult]:
    """Attach seed 003's 8 texture features to every level with a suspected fracture.

    Goller SS et al. (2023) compared global variance and skewness, GLCM energy
    and entropy and GLRLM SRE, LRE, RLN and RP between benign and malignant
    vertebral fractures; the node reports them for the fractured levels so a
    reader can weigh them (no malignancy classification is made).

    Parameters
    ----------
    levels : dict[str, LevelResult]
        Per-level results with ``fracture_suspected`` set (Genant grading).
    volume : Volume
        CT volume, ``(z, y, x)`` in HU.
    segmentation : SpineSegmentation
        Bodies on the same grid.
    processes : int
        Worker processes, as for :func:`extract_features`; at most one per fractured level.

    Returns
    -------
    dict[str, LevelResult]
        Copies with ``fracture_texture`` filled for fractured levels; unchanged
        when no level is fractured (no extraction is run).
    """
    fractured = {name for name, level in levels.items() if level.fracture_suspected}
    if not fractured:
        return levels
    # only the fractured levels are extracted; one level is extracted in this process (no pool to wait for)
    rows = {str(row["level"]): row for row in extract_features(volume, segmentation, "seed003", levels=fractured,
                                                               processes=min(processes, len(fractured)))}
    return {name: level.model_copy(update={"fracture_texture": {
                key: float(value) for key, value in rows[name].items() if key not in META_COLUMNS}})
            if name in fractured and name in rows else level
            for name, level in levels.items()}
