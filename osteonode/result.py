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
