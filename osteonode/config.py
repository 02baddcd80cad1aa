"""The one configuration model of osteonode.

Sources, highest priority first: ``OSTEONODE_*`` environment variables
(nested keys with ``__``, e.g. ``OSTEONODE_DISPATCH__MAX_RETRIES``), then
the TOML file named by ``--config`` or ``OSTEONODE_CONFIG``, then the
embedded defaults. ``deploy/osteonode.example.toml`` documents every key.
The model is immutable: pass it down, never keep a global copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pynetdicom._validators import validate_ae

CONFIG_ENV = "OSTEONODE_CONFIG"
DEFAULT_DATA_DIR = Path("osteonode-data")


def _check_ae_title(value: str) -> str:
    """Validate an AE title with pynetdicom's rules (PS3.5 6.2, VR AE)."""
    ok, why = validate_ae(value)
    if not ok:
        raise ValueError(f"invalid AE title {value!r}: {why}")
    if not value.strip():
        raise ValueError("invalid AE title: must not be empty or only spaces")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Destination(_Strict):
    """A DICOM node that receives the results (C-STORE SCP)."""

    name: str = Field(min_length=1, description="label used in logs")
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port


class DispatchSettings(_Strict):
    """How results are sent to the destinations."""

    max_retries: int = Field(default=8, ge=0, description="retries per destination before giving up")
    retry_backoff_s: float = Field(default=5.0, gt=0, description="first retry delay; doubles each retry")
    retry_backoff_max_s: float = Field(default=600.0, gt=0)
    timeout_s: float = Field(default=30.0, gt=0, description="association and DIMSE timeout")


class ModelSettings(_Strict):
    """A trained radiomics model artifact, used only if its SHA-256 matches."""

    path: Path
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="hex SHA-256 from the model card")


class AnalysisSettings(_Strict):
    """What the pipeline does with a series."""

    @model_validator(mode="after")
    def _check_segmentation_dir(self) -> AnalysisSettings:
        if self.segmentation == "totalsegmentator" and self.segmentation_dir is None:
            raise ValueError("segmentation = 'totalsegmentator' needs segmentation_dir")
        return self

    segmentation: Literal["builtin", "totalsegmentator"] = Field(
        default="builtin", description="builtin: no model weights; totalsegmentator: import label maps")
    segmentation_dir: Path | None = Field(
        default=None, description="with totalsegmentator: folder of <SeriesInstanceUID>.nii.gz label maps")
    totalsegmentator_version: Literal["auto", "v1", "v2"] = "auto"
    bone_status_rule: Literal["pickhardt_l1_hu", "acr_vbmd"] = Field(
        default="pickhardt_l1_hu",
        description="pickhardt_l1_hu: L1 HU <=110 / >=160 (Pickhardt 2013); acr_vbmd: ACR QCT vBMD cut-offs "
                    "on phantomless calibration (research use)")
    radiomics_preset: str | None = Field(
        default="seed000", description="pyradiomics preset of the features a model classifies from and of "
                                       "radiomics.csv (seed000, seed003, seed004); none: no radiomics")
    radiomics_export: bool = Field(
        default=False, description="write radiomics.csv (after the SEG and SR are sent); false: features are "
                                   "extracted only when a model needs them")
    radiomics_processes: int = Field(
        default=2, ge=1, description="processes that extract the levels' radiomics features in parallel "
                                     "(pyradiomics holds the GIL); 1: in the worker process")
    model: ModelSettings | None = Field(default=None, description="trained model; absent: rule only")
    banner: str = Field(default="RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE",
                        description="text banner on key images and the PDF report; empty: none")
    key_images: bool = Field(default=True, description="send Secondary Capture key images")
    pdf_report: bool = Field(default=True, description="send a one-page Encapsulated PDF report")
    skip_not_evaluable: bool = Field(
        default=False, description="true: a series that cannot be analysed gets no SR at all")
    failed_sr: bool = Field(
        default=True, description='send an SR saying "processing failed: <reason>" when an analysis fails '
                                  "unexpectedly (result.json records the failure either way)")


KernelClass = Literal["soft", "unknown", "bone", "sharp", "lung"]
ContrastPhaseName = Literal["non_contrast", "unknown", "portal_venous", "delayed", "arterial"]
KERNEL_CLASSES: tuple[str, ...] = KernelClass.__args__
CONTRAST_PHASES: tuple[str, ...] = ContrastPhaseName.__args__


def _is_permutation(values: list[str], allowed: tuple[str, ...], key: str) -> list[str]:
    if sorted(values) != sorted(allowed):
        raise ValueError(f"{key} must list each of {', '.join(allowed)} exactly once, got {values}")
    return values


class SelectionSettings(_Strict):
    """Which series of a study is analysed: candidate rules and ranking (``osteonode.series``).

    A candidate is a CT image series (CT, Enhanced CT or Legacy Converted
    Enhanced CT Image Storage) that is not a localizer, has at least
    ``min_slices`` slices, is axial within ``axial_tolerance_deg``, has
    slices no thicker than ``max_slice_thickness_mm`` and no gantry tilt above
    ``max_gantry_tilt_deg``; a derived (secondary, reformatted) series is one
    only when the study has no original axial candidate. Candidates are ranked
    by kernel class (``kernel_order``, classes from the kernel table), then
    contrast phase from the Series Description (``phase_order``,
    ``phase_keywords``), then slice thickness (thinnest inside
    ``preferred_thickness_mm`` first), then the number of slices.
    """

    axial_tolerance_deg: float = Field(
        default=10.0, ge=0.0, le=45.0,
        description="largest angle between the slice normal and the patient's feet-head axis, degrees "
                    "(PS3.3 C.7.6.2 Image Orientation (Patient))")
    max_slice_thickness_mm: float = Field(default=5.0, gt=0.0, description="Slice Thickness (0018,0050) limit, mm")
    max_gantry_tilt_deg: float = Field(default=0.5, ge=0.0, description="Gantry/Detector Tilt (0018,1120) limit")
    min_slices: int = Field(default=8, ge=1, description="fewer slices cannot hold the lumbar vertebrae")
    preferred_thickness_mm: tuple[float, float] = Field(
        default=(1.0, 3.0), description="thinnest slices inside this range rank first, mm")
    kernel_order: list[KernelClass] = Field(
        default_factory=lambda: ["soft", "unknown", "bone", "sharp", "lung"],
        description="kernel classes, best first (soft tissue before bone, sharp and lung kernels)")
    phase_order: list[ContrastPhaseName] = Field(
        default_factory=lambda: ["non_contrast", "unknown", "portal_venous", "delayed", "arterial"],
        description="contrast phases, best first (unknown: the description names none)")
    phase_keywords: dict[Literal["non_contrast", "portal_venous", "delayed", "arterial"], list[str]] = Field(
        default_factory=lambda: {
            "non_contrast": ["non-contrast", "non contrast", "noncontrast", "without contrast", "w/o",
                             "unenhanced", "plain", "native", "nativ", "nc"],
            "arterial": ["arterial", "art", "cta", "angio"],
            "portal_venous": ["portal", "venous", "pv", "pvp"],
            "delayed": ["delayed", "late", "excretory", "urographic"],
        },
        description="words (case-insensitive, whole words) of the Series Description that name a phase; "
                    "checked in the order non_contrast, arterial, portal_venous, delayed")
    kernel_table: Path | None = Field(
        default=None, description="JSON kernel table replacing the shipped dicom_templates/kernels.json")

    @model_validator(mode="after")
    def _check(self) -> SelectionSettings:
        _is_permutation(list(self.kernel_order), KERNEL_CLASSES, "kernel_order")
        _is_permutation(list(self.phase_order), CONTRAST_PHASES, "phase_order")
        low, high = self.preferred_thickness_mm
        if not 0 < low <= high:
            raise ValueError(f"preferred_thickness_mm must be [low, high] with 0 < low <= high, got {[low, high]}")
        if any(not word.strip() for words in self.phase_keywords.values() for word in words):
            raise ValueError("phase_keywords must not contain empty words")
        from osteonode.series import load_kernel_table  # validates the table (patterns, classes)

        load_kernel_table(self.kernel_table)
        return self


class Settings(BaseSettings):
    """Effective configuration of one node (ingest, queue, worker, dispatch)."""

    model_config = SettingsConfigDict(env_prefix="OSTEONODE_", env_nested_delimiter="__",
                                      extra="forbid", frozen=True)

    ae_title: AETitle = "OSTEONODE"
    bind_address: str = "0.0.0.0"
    port: Port = 11112
    allowed_calling_ae_titles: list[AETitle] = Field(
        default_factory=list, description="empty list: any calling AE title may associate")
    network_timeout_s: float = Field(
        default=20.0, gt=0, description="SCP: close a connection silent for this long (stalled or half-sent PDU)")
    acse_timeout_s: float = Field(default=10.0, gt=0, description="SCP: time allowed for association negotiation")
    dimse_timeout_s: float = Field(default=30.0, gt=0, description="SCP: time allowed for a DIMSE message")
    max_associations: int = Field(default=10, ge=1, description="SCP: simultaneous associations accepted")
    max_rows_columns: int = Field(
        default=4096, ge=64, description="SCP: largest Rows or Columns accepted (checked before any decode)")
    max_decoded_bytes: int = Field(
        default=2 * 1024**3, ge=1,
        description="SCP: largest decoded pixel data of one instance, bytes "
                    "(Rows x Columns x frames x samples x bits/8, checked before any decode)")
    spool_dir: Path = DEFAULT_DATA_DIR / "spool"
    outbox_dir: Path = DEFAULT_DATA_DIR / "outbox"
    queue_dir: Path = Field(default=DEFAULT_DATA_DIR / "queue",
                            description="on-disk queue of the embedded broker")
    study_quiet_period_s: float = Field(
        default=30.0, gt=0, description="seconds without a new instance of a study after which it is complete")
    accept_all_storage: bool = Field(
        default=True, description="accept every Storage SOP class at association and discard what is not CT")
    broker_url: str | None = Field(default=None, description="redis://...; absent: embedded queue")
    destinations: list[Destination] = Field(default_factory=list)
    dispatch: DispatchSettings = DispatchSettings()
    analysis: AnalysisSettings = AnalysisSettings()
    selection: SelectionSettings = SelectionSettings()

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: object) -> object:
        if isinstance(data, dict) and "quiet_period_s" in data:
            raise ValueError("quiet_period_s was replaced by study_quiet_period_s (the node now waits for "
                             "whole studies; see docs/admin.md)")
        return data

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.broker_url is not None and not self.broker_url.startswith(("redis://", "rediss://")):
            raise ValueError(f"broker_url must be redis://… or absent (embedded queue), got {self.broker_url!r}")
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError("destination names must be unique")
        return self

    @property
    def embedded_broker(self) -> bool:
        """True when no broker URL is set: the on-disk queue in ``queue_dir`` is used."""
        return self.broker_url is None

    def directories(self) -> dict[str, Path]:
        """The directories the node writes to, by key."""
        dirs = {"spool_dir": self.spool_dir, "outbox_dir": self.outbox_dir}
        if self.embedded_broker:
            dirs["queue_dir"] = self.queue_dir
        return dirs

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


class ConfigError(ValueError):
    """The configuration is invalid; ``str()`` lists every problem, one per line."""


def load_settings(path: Path | None = None, *, require_dirs: bool | None = None) -> Settings:
    """Load and validate the configuration.

    Parameters
    ----------
    path : pathlib.Path, optional
        TOML file; defaults to ``$OSTEONODE_CONFIG``; with neither, the
        embedded defaults (plus environment) are used.
    require_dirs : bool, optional
        Whether the configured directories must already exist. Defaults to
        True when a config file is used (an admin's typo must not silently
        create a new spool) and False for embedded defaults, whose
        directories :func:`ensure_dirs` creates.

    Returns
    -------
    Settings

    Raises
    ------
    ConfigError
        Unreadable file, invalid TOML, unknown key, bad AE title, port out of
        range, missing directory; the message lists each error with its key.
    """
    config_file = path or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file not found: {config_file}")
    cls = Settings
    if config_file is not None:
        cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": config_file}})
    try:
        settings = cls()
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid configuration"
                          + (f" in {config_file}" if config_file else "") + ":\n  "
                          + "\n  ".join(lines)) from None
    except (OSError, ValueError) as exc:  # unreadable file, TOML syntax error
        raise ConfigError(f"cannot read configuration {config_file}: {exc}") from None
    if require_dirs is None:
        require_dirs = bool(config_file)
    if require_dirs:
        missing = [f"{key}: directory does not exist: {p}" for key, p in settings.directories().items()
                   if not p.is_dir()]
        if missing:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(missing))
    return settings


def ensure_dirs(settings: Settings) -> None:
    """Create the node's directories (used for the embedded defaults)."""
    for p in settings.directories().values():
        p.mkdir(parents=True, exist_ok=True)
