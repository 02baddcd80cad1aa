"""Which series of a study to analyse: candidate rules and ranking, from configuration.

A study usually holds several series (localizer, soft and bone kernels,
reformats, contrast phases); the node analyses one. :func:`describe_series`
reads what the rules need from one series' headers, :func:`series_problem`
says why a series cannot be a candidate, and :func:`rank_series` orders the
candidates of a study best first (:class:`osteonode.config.SelectionSettings`
documents the rules). The first two are pure functions of headers and
settings; :func:`rank_series` also reads pixel data when the contrast phase
must be measured.

The contrast phase of a candidate comes from its Series Description
(:func:`contrast_phase`). When the description names none and another
candidate has the same kernel class (so that the phase decides their order),
it comes from the aortic attenuation measured on a coarse subset of the
series' slices (:mod:`osteonode.measure.aorta_probe`, 1-2 s per series;
``phase_from_aorta``), classified by the bands of
:func:`osteonode.measure.contrast.classify_phase`. When the probe is not
confident it returns nothing and the phase stays ``unknown``: the
description alone ranks the series, never a guess.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydantic import BaseModel, ConfigDict
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage

import dicom_templates
from osteonode.config import KERNEL_CLASSES, ContrastPhaseName, KernelClass, NamedPhase, SelectionSettings
from osteonode.errors import NotEvaluable

log = logging.getLogger(__name__)

CT_IMAGE_SOP_CLASSES = (CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
#: Image Type (0008,0008) values that mark a reformat or projection rather than an acquired axial stack.
REFORMAT_IMAGE_TYPES = frozenset({"REFORMATTED", "MPR", "MIP", "MINIP", "CURVED", "PROJECTION IMAGE"})
#: Phases checked in this order against the Series Description.
_PHASE_CHECK_ORDER: tuple[NamedPhase, ...] = ("non_contrast", "arterial", "portal_venous", "delayed")


class SeriesInfo(BaseModel):
    """What the selection rules need to know about one series (no pixel data, no patient data)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    series_instance_uid: str
    series_dir: str
    instance_count: int
    series_number: int | None = None
    description: str = ""
    modality: str = ""
    sop_class_uid: str = ""
    image_type: tuple[str, ...] = ()
    kernel: str = ""
    kernel_class: KernelClass = "unknown"
    phase: ContrastPhaseName = "unknown"
    slice_thickness_mm: float | None = None
    slice_count: int = 0
    axial_deviation_deg: float | None = None
    gantry_tilt_deg: float = 0.0
    aorta_hu: float | None = None

    @property
    def phase_basis(self) -> str:
        """Where :attr:`phase` comes from: the Series Description, the aortic attenuation, or nowhere (``""``)."""
        if self.aorta_hu is not None:
            return f"aortic attenuation {self.aorta_hu:.0f} HU"
        return "series description" if self.phase != "unknown" else ""

    @property
    def derived(self) -> bool:
        """True for a derived, secondary or reformatted series (Image Type, PS3.3 C.7.6.1.1.2)."""
        values = self.image_type
        return ((len(values) > 0 and values[0] == "DERIVED") or (len(values) > 1 and values[1] == "SECONDARY")
                or bool(REFORMAT_IMAGE_TYPES.intersection(values)))


class RejectedSeries(BaseModel):
    """A series of the study that is not a candidate, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    series: SeriesInfo
    reason: str


class SeriesRanking(BaseModel):
    """The series of one study: candidates best first, and the rejected ones with reasons."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidates: list[SeriesInfo]
    rejected: list[RejectedSeries]


@lru_cache(maxsize=8)
def _kernel_rules(path: Path | None) -> tuple[tuple[re.Pattern[str], KernelClass], ...]:
    document = (json.loads(path.read_text(encoding="utf-8")) if path is not None
                else dicom_templates.load("kernels"))
    rules: list[tuple[re.Pattern[str], KernelClass]] = []
    for i, rule in enumerate(document.get("rules", [])):
        kernel_class = rule.get("class")
        if kernel_class not in KERNEL_CLASSES or kernel_class == "unknown":
            raise ValueError(f"kernel table rule {i}: class must be one of soft, bone, sharp, lung, "
                             f"got {kernel_class!r}")
        try:
            rules.append((re.compile(str(rule["pattern"]), re.IGNORECASE), kernel_class))
        except (KeyError, re.error) as exc:
            raise ValueError(f"kernel table rule {i}: bad or missing pattern ({exc})") from None
    if not rules:
        raise ValueError("the kernel table has no rules")
    return tuple(rules)


def load_kernel_table(path: Path | None = None) -> tuple[tuple[re.Pattern[str], KernelClass], ...]:
    """Load and check a kernel table: ``(compiled pattern, class)`` pairs, first match wins.

    Parameters
    ----------
    path : pathlib.Path, optional
        JSON file shaped like ``dicom_templates/kernels.json``; the shipped
        table when omitted.

    Raises
    ------
    ValueError
        If the file is unreadable or not JSON, a rule has no valid regular
        expression, or a class is not one of soft, bone, sharp, lung.
    """
    try:
        return _kernel_rules(path)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read kernel table {path}: {exc}") from None


def kernel_class(kernel: str, table_path: Path | None = None) -> KernelClass:
    """Class (soft, bone, sharp, lung or unknown) of a Convolution Kernel (0018,1210) value."""
    value = kernel.strip().upper()
    for pattern, name in load_kernel_table(table_path):
        if pattern.fullmatch(value):
            return name
    return "unknown"


def contrast_phase(description: str, rules: SelectionSettings) -> ContrastPhaseName:
    """Contrast phase named by a Series Description (0008,103E), or ``"unknown"``.

    When it is unknown, :func:`rank_series` may measure the phase instead
    (module docstring).
    """
    for phase in _PHASE_CHECK_ORDER:
        for word in rules.phase_keywords.get(phase, []):
            if re.search(rf"(?<![a-z0-9]){re.escape(word.lower())}(?![a-z0-9])", description.lower()):
                return phase
    return "unknown"


def _find(ds: pydicom.Dataset, keyword: str) -> Any:
    """``keyword`` at the top level, else in the first Shared/Per-frame Functional Groups items (PS3.3 C.7.6.16)."""
    if keyword in ds:
        return ds.get(keyword)
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in ds.get(groups, [])[:1]:
            for element in group:
                if element.VR == "SQ" and element.value and keyword in element.value[0]:
                    return element.value[0].get(keyword)
    return None


def _multi(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def axial_deviation_deg(orientation: Sequence[float]) -> float:
    """Angle between the slice normal and the feet-head (z) axis, degrees (0 axial, 90 coronal or sagittal).

    ``orientation`` is Image Orientation (Patient) (0020,0037): row and column
    direction cosines in LPS (PS3.3 C.7.6.2.1.1).
    """
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm == 0.0:
        raise ValueError("Image Orientation (Patient) has parallel row and column directions")
    return math.degrees(math.acos(min(1.0, abs(normal[2]) / norm)))


def describe_series(files: Sequence[Path], rules: SelectionSettings | None = None) -> SeriesInfo:
    """Read what the selection rules need from a series' files.

    Only the first file's header is read, unless the series is multi-frame
    (then every header, to count the frames).

    Parameters
    ----------
    files : sequence of pathlib.Path
        The series' PS3.10 files, all from one folder.
    rules : SelectionSettings, optional
        For the kernel table and the phase keywords (defaults when omitted).

    Raises
    ------
    FileNotFoundError
        If ``files`` is empty.
    pydicom.errors.InvalidDicomError
        If a file read is not DICOM.
    """
    if not files:
        raise FileNotFoundError("the series has no files")
    files = sorted(files)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        headers = [first, *(pydicom.dcmread(f, stop_before_pixels=True) for f in files[1:])]
        return describe_headers(headers, rules, series_dir=files[0].parent)
    return describe_headers([first], rules, series_dir=files[0].parent, instance_count=len(files))


def describe_headers(headers: Sequence[pydicom.Dataset], rules: SelectionSettings | None = None, *,
                     series_dir: Path | str = "", instance_count: int | None = None) -> SeriesInfo:
    """Describe a series from its headers (pixel data not needed).

    Parameters
    ----------
    headers : sequence of pydicom.Dataset
        Every instance of the series, or only the first one of a single-frame
        series when ``instance_count`` is given.
    rules : SelectionSettings, optional
        For the kernel table and the phase keywords (defaults when omitted).
    series_dir : pathlib.Path or str
        Folder of the series' files, recorded for the job.
    instance_count : int, optional
        Number of single-frame instances; by default the frames of ``headers`` are counted.
    """
    rules = rules or SelectionSettings()
    first = headers[0]
    if instance_count is None:
        instance_count = len(headers)
        slice_count = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in headers)
    else:
        slice_count = instance_count
    orientation = _multi(_find(first, "ImageOrientationPatient"))
    thickness = _find(first, "SliceThickness")
    kernels = _multi(_find(first, "ConvolutionKernel"))
    description = str(first.get("SeriesDescription", ""))
    number = first.get("SeriesNumber")
    return SeriesInfo(
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        series_dir=str(series_dir),
        instance_count=instance_count,
        series_number=int(number) if number not in (None, "") else None,
        description=description,
        modality=str(first.get("Modality", "")),
        sop_class_uid=str(first.get("SOPClassUID", "")),
        image_type=tuple(v.upper() for v in _multi(first.get("ImageType"))),
        kernel=kernels[0] if kernels else "",
        kernel_class=kernel_class(kernels[0], rules.kernel_table) if kernels else "unknown",
        phase=contrast_phase(description, rules),
        slice_thickness_mm=float(thickness) if thickness not in (None, "") else None,
        slice_count=slice_count,
        axial_deviation_deg=(axial_deviation_deg([float(v) for v in orientation])
                             if len(orientation) == 6 else None),
        gantry_tilt_deg=float(_find(first, "GantryDetectorTilt") or 0.0),
    )


def series_problem(info: SeriesInfo, rules: SelectionSettings) -> str | None:
    """Why ``info`` cannot be analysed on its own, or None when it is a candidate.

    The checks that need the rest of the study (a reformat is used only when
    there is no original axial series) are in :func:`rank_series`.
    """
    if info.modality != "CT":
        return f"the series is not CT (modality {info.modality or 'missing'})"
    if info.sop_class_uid and info.sop_class_uid not in CT_IMAGE_SOP_CLASSES:
        return f"the series is not a CT image ({pydicom.uid.UID(info.sop_class_uid).name})"
    if "LOCALIZER" in info.image_type:
        return "the series is a localizer (scout), not a cross-sectional CT"
    if info.slice_count < rules.min_slices:
        return f"the series has {info.slice_count} slice(s); at least {rules.min_slices} are needed"
    if info.axial_deviation_deg is None:
        return "the series has no Image Orientation (Patient): the slice plane is unknown"
    if info.axial_deviation_deg > rules.axial_tolerance_deg:
        plane = "coronal or sagittal" if info.axial_deviation_deg > 45 else "oblique"
        return (f"the series is not axial ({plane}: slices {info.axial_deviation_deg:.0f}° from axial, "
                f"tolerance {rules.axial_tolerance_deg:g}°)")
    if info.slice_thickness_mm is not None and info.slice_thickness_mm > rules.max_slice_thickness_mm:
        return f"slice thickness {info.slice_thickness_mm:g} mm exceeds {rules.max_slice_thickness_mm:g} mm"
    if abs(info.gantry_tilt_deg) > rules.max_gantry_tilt_deg:
        return f"gantry tilt {info.gantry_tilt_deg:g}° (limit {rules.max_gantry_tilt_deg:g}°)"
    return None


def _thickness_key(thickness_mm: float | None, rules: SelectionSettings) -> tuple[int, float]:
    low, high = rules.preferred_thickness_mm
    if thickness_mm is None:
        return (2, 0.0)
    if low <= thickness_mm <= high:
        return (0, thickness_mm)  # thinnest inside the preferred range first
    return (1, low - thickness_mm if thickness_mm < low else thickness_mm - high)  # nearest to the range


def rank_key(info: SeriesInfo, rules: SelectionSettings) -> tuple:
    """Sort key of a candidate: kernel class, contrast phase, thickness, more slices, then series number and UID."""
    return (rules.kernel_order.index(info.kernel_class), rules.phase_order.index(info.phase),
            _thickness_key(info.slice_thickness_mm, rules), -info.slice_count,
            info.series_number if info.series_number is not None else math.inf, info.series_instance_uid)


def rank_series(series: Sequence[SeriesInfo], rules: SelectionSettings,
                files_of: Callable[[SeriesInfo], Sequence[Path]] | None = None) -> SeriesRanking:
    """Split a study's series into ranked candidates and rejected series.

    Parameters
    ----------
    series : sequence of SeriesInfo
        Every series of the study (:func:`describe_series`).
    rules : SelectionSettings
        Candidate rules and ranking order.
    files_of : callable, optional
        The files of a series. When given (and ``rules.phase_from_aorta``),
        a candidate whose description names no phase, and whose kernel class
        another candidate shares, gets its phase from the aortic attenuation
        (:func:`measure_phase`); the candidates returned then carry
        ``aorta_hu``.

    Returns
    -------
    SeriesRanking
        ``candidates`` best first (:func:`rank_key`); ``rejected`` in series
        number order, each with the reason. A derived (secondary, reformatted)
        series is rejected when an original candidate exists.
    """
    rejected, passing = [], []
    for info in series:
        problem = series_problem(info, rules)
        if problem is None:
            passing.append(info)
        else:
            rejected.append(RejectedSeries(series=info, reason=problem))
    if any(not info.derived for info in passing):
        for info in [i for i in passing if i.derived]:
            rejected.append(RejectedSeries(series=info, reason="the series is derived (secondary or reformatted); "
                                                               "an original axial series exists"))
        passing = [info for info in passing if not info.derived]
    if files_of is not None and rules.phase_from_aorta:
        classes = Counter(info.kernel_class for info in passing)
        passing = [measure_phase(info, files_of(info)) if info.phase == "unknown" and classes[info.kernel_class] > 1
                   else info for info in passing]
    rejected.sort(key=lambda r: (r.series.series_number if r.series.series_number is not None else math.inf,
                                 r.series.series_instance_uid))
    return SeriesRanking(candidates=sorted(passing, key=lambda i: rank_key(i, rules)), rejected=rejected)


def measure_phase(info: SeriesInfo, files: Sequence[Path]) -> SeriesInfo:
    """``info`` with the contrast phase and ``aorta_hu`` measured on its pixel data, if the probe is confident.

    Parameters
    ----------
    info : SeriesInfo
        A candidate series.
    files : sequence of pathlib.Path
        Its files.

    Returns
    -------
    SeriesInfo
        A copy with ``aorta_hu`` and the phase of
        :func:`osteonode.measure.contrast.classify_phase`, or ``info`` itself
        when the aorta was not found with confidence or the series could not
        be read (the error class is logged; the ranking then uses the
        description only). The HU of the last 32 sets of files are kept
        (:func:`aortic_attenuation`), so a study ranked again with the same
        files (e.g. while the broker refuses its job) is not read again.
    """
    from osteonode.measure.contrast import classify_phase

    try:
        aorta_hu = aortic_attenuation(tuple(files))
    except Exception as exc:  # noqa: BLE001 - the probe only refines the ranking; any failure means "not measured"
        log.warning("series %s: aortic attenuation not measured (%s)", info.series_number, type(exc).__name__)
        return info
    if aorta_hu is None:
        return info
    return info.model_copy(update={"aorta_hu": aorta_hu, "phase": classify_phase(aorta_hu).phase})


@lru_cache(maxsize=32)
def aortic_attenuation(files: tuple[Path, ...]) -> float | None:
    """Aortic HU of the series made of ``files`` (:func:`osteonode.measure.aorta_probe.probe_aorta_hu`), cached."""
    from osteonode.measure.aorta_probe import probe_aorta_hu

    probe = probe_aorta_hu(files)
    return None if probe is None else probe.hu


def lower_rank_reason(info: SeriesInfo, used: SeriesInfo, rules: SelectionSettings) -> str:
    """Why candidate ``info`` ranked below the series ``used``: the first rule of :func:`rank_key` that differs.

    Returns
    -------
    str
        E.g. ``"ranked lower than the series used: contrast phase arterial
        (series description), the series used non-contrast (aortic
        attenuation 48 HU)"``.
    """
    def phase(series: SeriesInfo) -> str:
        name = "not known" if series.phase == "unknown" else series.phase.replace("_", " ").replace("non ", "non-")
        return f"{name} ({series.phase_basis})" if series.phase_basis else name

    lead = "ranked lower than the series used"
    if info.kernel_class != used.kernel_class:
        return f"{lead}: kernel class {info.kernel_class}, the series used {used.kernel_class}"
    if info.phase != used.phase:
        return f"{lead}: contrast phase {phase(info)}, the series used {phase(used)}"
    if _thickness_key(info.slice_thickness_mm, rules) != _thickness_key(used.slice_thickness_mm, rules):
        def thickness(value: float | None) -> str:
            return "unknown" if value is None else f"{value:g} mm"
        return (f"{lead}: slice thickness {thickness(info.slice_thickness_mm)}, "
                f"the series used {thickness(used.slice_thickness_mm)}")
    if info.slice_count != used.slice_count:
        return f"{lead}: {info.slice_count} slices, the series used {used.slice_count}"
    return lead


def check_series(headers: Sequence[pydicom.Dataset], rules: SelectionSettings | None = None) -> None:
    """Raise :class:`NotEvaluable` if a series on its own is not one we can analyse.

    Parameters
    ----------
    headers : sequence of pydicom.Dataset
        The series' instances (pixel data not needed).
    rules : SelectionSettings, optional
        Candidate rules (defaults when omitted).

    Raises
    ------
    NotEvaluable
        With the reason from :func:`series_problem`.
    """
    rules = rules or SelectionSettings()
    problem = series_problem(describe_headers(headers, rules), rules)
    if problem is not None:
        raise NotEvaluable(problem)
