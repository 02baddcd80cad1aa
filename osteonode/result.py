"""The analysis result: one typed model, written as ``result.json`` and encoded in the SR.

The JSON format is documented in README.md ("Output: result.json"); scripts
depend on it, so change it only with a new ``schema_version``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from osteonode import __version__

BoneCategory = Literal["normal", "osteopenia", "osteoporosis", "indeterminate"]


class LevelResult(BaseModel):
    """Measurements of one vertebral level (trabecular ROI of the body)."""

    model_config = ConfigDict(extra="forbid")

    label_confidence: float = Field(ge=0.0, le=1.0)
    trabecular_hu_mean: float = Field(description="mean attenuation of the trabecular ROI, HU")
    trabecular_hu_median: float = Field(description="median attenuation of the trabecular ROI, HU")
    trabecular_hu_sd: float = Field(description="standard deviation in the trabecular ROI, HU")
    trabecular_voxel_count: int = Field(ge=0)
    trabecular_roi_volume_mm3: float = Field(ge=0.0)
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

    phase: Literal["non_contrast", "arterial", "portal_venous", "delayed", "unknown"]
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


class AnalysisResult(BaseModel):
    """Everything the node concludes about one CT series."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    osteonode_version: str = __version__
    status: Literal["ok", "not_evaluable"]
    reason: str | None = None
    study_instance_uid: str
    series_instance_uid: str
    labelling_method: str = ""
    levels: dict[str, LevelResult] = Field(default_factory=dict)
    bone_status: BoneStatus
    calibration: Calibration | None = None
    contrast: ContrastPhase | None = None
    proximal_femur: dict[Literal["right", "left"], ProximalFemurResult] = Field(default_factory=dict)
    radiomics_file: str | None = Field(default=None, description="feature table, one row per level")
    timings_s: dict[str, float] = Field(default_factory=dict)

    def write(self, path: Path) -> None:
        """Write the result as indented JSON to ``path``."""
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")

    @classmethod
    def not_evaluable(cls, reason: str, study_instance_uid: str, series_instance_uid: str,
                      **kwargs) -> "AnalysisResult":
        """A result that reports ``reason`` instead of a guess."""
        return cls(status="not_evaluable", reason=reason, study_instance_uid=study_instance_uid,
                   series_instance_uid=series_instance_uid,
                   bone_status=BoneStatus(category="indeterminate", basis=f"not evaluable: {reason}"),
                   **kwargs)
