"""The analysis result: one typed model, written as ``result.json`` and encoded in the SR.

The JSON format is documented in README.md ("Output: result.json"); scripts
depend on it, so change it only with a new ``schema_version``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from osteonode import __version__
from osteonode.atomic import write_atomic
from osteonode.config import ContrastPhaseName

BoneCategory = Literal["normal", "osteopenia", "osteoporosis", "indeterminate"]

QualityFlag = Literal["cut_by_field_of_view", "heights_implausible", "slices_too_thick", "genant_borderline",
                      "heterogeneous", "mean_median_discordant", "focal_lesion_excluded", "excluded_over_limit"]

class LevelResult(BaseModel):
    """Measurements of one vertebral level (trabecular ROI of the body)."""

    model_config = ConfigDict(extra="forbid")

    label_confidence: float = Field(ge=0.0, le=1.0)
    trabecular_hu_mean: float = Field(description="mean attenuation of the trabecular ROI, HU")
    trabecular_hu_median: float = Field(description="median attenuation of the trabecular ROI, HU")
    trabecular_hu_sd: float = Field(description="standard deviation in the trabecular ROI, HU")
    trabecular_voxel_count: int = Field(ge=0)
    trabecular_roi_volume_mm3: float = Field(ge=0.0)
    excluded_focal_volume_mm3: float = Field(
        default=0.0, ge=0.0, description="volume of focal sclerotic or lytic foci excluded from the ROI, mm³")
    excluded_fraction: float = Field(
        default=0.0, ge=0.0, le=1.0, description="excluded foci as a fraction of the geometric ROI")
    cut_by_field_of_view: bool = Field(
        default=False, description="the body is cut by the edge of the scan: heights are not reported")
    quality_flags: list[QualityFlag] = Field(
        default_factory=list,
        description="why the measurement may be unreliable (codes; words: dicom_out.summary.QUALITY_FLAG_TEXT)")
    used_for_bone_status: bool = Field(
        default=True, description="False when the level is not usable for the bone status (see quality_flags)")
    # filled by later stages when available (issue 4): calibrated density and Genant grading
    vbmd_mg_cm3: float | None = Field(default=None, description="volumetric BMD, mg/cm³ calcium hydroxyapatite")
    height_anterior_mm: float | None = None
    height_middle_mm: float | None = None
    height_posterior_mm: float | None = None
    height_ratios: dict[str, float] | None = Field(
        default=None, description="e.g. anterior_posterior, middle_posterior, posterior_reference (0..1)")
    genant_grade: int | None = Field(default=None, ge=0, le=3, description="Genant 1993 semi-quantitative grade")
    fracture_suspected: bool | None = None
    fracture_texture: dict[str, float] | None = Field(
        default=None, description="the 8 CT texture features of seed 003 (Goller et al. 2023, benign vs "
                                  "malignant fractures), for a level with a suspected fracture")


class Calibration(BaseModel):
    """Phantomless (internal) HU -> vBMD calibration and its quality."""

    model_config = ConfigDict(extra="forbid")

    method: str
    slope_mg_cm3_per_hu: float | None = None
    intercept_mg_cm3: float | None = None
    reference_hu: dict[str, float] = Field(default_factory=dict, description="tissue -> mean HU")
    residual_rms_mg_cm3: float | None = None
    plausible: bool
    note: str = ""


class ContrastPhase(BaseModel):
    """Contrast enhancement detected from the images."""

    model_config = ConfigDict(extra="forbid")

    phase: ContrastPhaseName
    aorta_hu: float | None = None
    handling: str = Field(default="", description="correction applied, or why results are marked affected")


class ProximalFemurResult(BaseModel):
    """One side's proximal femur (label 90 = right, 91 = left in labels.nii.gz)."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["segmented", "excluded", "not_in_view"]
    reason: str | None = None
    volume_mm3: float | None = None
    hu_mean: float | None = None


class BoneStatus(BaseModel):
    """Overall bone status and the rule or model that gave it."""

    model_config = ConfigDict(extra="forbid")

    category: BoneCategory
    basis: str
    statistic: str | None = Field(
        default=None, description="the statistic the rule or model used, e.g. 'mean trabecular HU of L1'")
    uncertainty_note: str | None = Field(
        default=None, description="set when the category would change within the measurement uncertainty")


class SeriesUsed(BaseModel):
    """The series of the study that the results were made from."""

    model_config = ConfigDict(extra="forbid")

    series_number: int | None = None
    description: str = ""
    kernel: str = ""
    slice_thickness_mm: float | None = None

    def name(self) -> str:
        """E.g. ``series 2 "Abdomen 3.0 B30f"``."""
        return _series_name(self.series_number, self.description)


class SeriesNotUsed(BaseModel):
    """Another series of the study, and why it was not used."""

    model_config = ConfigDict(extra="forbid")

    series_number: int | None = None
    description: str = ""
    reason: str


class SeriesSelection(BaseModel):
    """Which series of the study was analysed, and why the others were not (``osteonode.series``)."""

    model_config = ConfigDict(extra="forbid")

    used: SeriesUsed | None = Field(default=None, description="None: no series of the study could be analysed")
    not_used: list[SeriesNotUsed] = Field(default_factory=list)

    def text(self) -> str:
        """One sentence for the SR and the PDF, e.g. ``Series used: 2 "Abdomen" (kernel B30f, 3 mm). ...``."""
        if self.used is None:
            parts = ["No series of the study was used."]
        else:
            used = self.used
            details = [f"kernel {used.kernel}" if used.kernel else "kernel not recorded"]
            if used.slice_thickness_mm is not None:
                details.append(f"{used.slice_thickness_mm:g} mm")
            parts = [f"Series used: {used.name()} ({', '.join(details)})."]
        if self.not_used:
            parts.append("Not used: " + "; ".join(f"{_series_name(s.series_number, s.description)}: {s.reason}"
                                                  for s in self.not_used) + ".")
        return " ".join(parts)


def _series_name(number: int | None, description: str) -> str:
    name = f"series {number}" if number is not None else "series (no number)"
    return f'{name} "{description}"' if description else name


class PriorReport(BaseModel):
    """An earlier osteonode SR of the study, made from other input instances, that a new result supersedes.

    The SR refers to it in the Predecessor Documents Sequence (0040,A360), PS3.3 C.17.2.
    """

    model_config = ConfigDict(extra="forbid")

    study_instance_uid: str
    series_instance_uid: str = Field(description="Series Instance UID of the earlier SR")
    sop_class_uid: str
    sop_instance_uid: str
    created: str = Field(description="when the earlier SR was made, YYYY-MM-DD HH:MM (its Content Date/Time)")
    made_from: str = Field(description='the series it was made from, e.g. series 2 "Abdomen" (112 instances)')
    reason: str = Field(default="", description="why it is superseded, e.g. another series was analysed")

    def text(self) -> str:
        """The sentence the SR and the PDF carry: which report this one supersedes and why."""
        return (f"This report supersedes the earlier osteonode report of this study made {self.created} "
                f"from {self.made_from}" + (f": {self.reason}" if self.reason else "")
                + ". Use this report, not the earlier one.")


class AnalysisResult(BaseModel):
    """Everything the node concludes about one CT series."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 5
    osteonode_version: str = __version__
    status: Literal["ok", "not_evaluable", "failed"]
    reason: str | None = None
    error_class: str | None = Field(
        default=None, description='status "failed": class name of the unexpected error (reason: its message)')
    study_instance_uid: str
    series_instance_uid: str
    labelling_method: str = ""
    levels: dict[str, LevelResult] = Field(default_factory=dict)
    bone_status: BoneStatus
    calibration: Calibration | None = None
    contrast: ContrastPhase | None = None
    proximal_femur: dict[Literal["right", "left"], ProximalFemurResult] = Field(default_factory=dict)
    radiomics_file: str | None = Field(default=None, description="feature table, one row per level")
    series_selection: SeriesSelection | None = Field(
        default=None, description="the series used and why the study's other series were not (study jobs)")
    supersedes: PriorReport | None = Field(
        default=None, description="the earlier osteonode SR of the study that this result replaces, if any")
    timings_s: dict[str, float] = Field(default_factory=dict)

    def write(self, path: Path) -> None:
        """Write the result as indented JSON to ``path``, atomically (:func:`osteonode.atomic.write_atomic`)."""
        write_atomic(path, (self.model_dump_json(indent=2) + "\n").encode())

    @classmethod
    def not_evaluable(cls, reason: str, study_instance_uid: str, series_instance_uid: str,
                      **kwargs) -> AnalysisResult:
        """A result that reports ``reason`` instead of a guess."""
        return cls(status="not_evaluable", reason=reason, study_instance_uid=study_instance_uid,
                   series_instance_uid=series_instance_uid,
                   bone_status=BoneStatus(category="indeterminate", basis=f"not evaluable: {reason}"),
                   **kwargs)

    @classmethod
    def failed(cls, error_class: str, reason: str, study_instance_uid: str, series_instance_uid: str,
               **kwargs) -> AnalysisResult:
        """A result that records an unexpected processing failure (``error_class``: the exception's class)."""
        return cls(status="failed", reason=reason, error_class=error_class, study_instance_uid=study_instance_uid,
                   series_instance_uid=series_instance_uid,
                   bone_status=BoneStatus(category="indeterminate", basis=f"processing failed: {reason}"),
                   **kwargs)
