"""The one configuration model of osteonode.

Sources, highest priority first: ``OSTEONODE_*`` environment variables
(nested keys with ``__``, e.g. ``OSTEONODE_DISPATCH__MAX_RETRIES``), then
the TOML file named by ``--config`` or ``OSTEONODE_CONFIG``, then the
embedded defaults. ``deploy/osteonode.example.toml`` documents every key.
The model is immutable: pass it down, never keep a global copy.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal, cast, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "OSTEONODE_CONFIG"
DEFAULT_DATA_DIR = Path("osteonode-data")
#: Memory set aside per concurrent analysis when sizing the default ``analysis_concurrency`` (an analysis of a
#: 458 x 379 x 269 series peaks at about 1.7 GiB; radiomics worker processes come on top).
GIB_PER_ANALYSIS = 4


#: Longest AE title (PS3.5 6.2, VR AE: 16 bytes maximum).
AE_TITLE_MAX_CHARS = 16


def check_ae_title(value: str) -> str:
    """Validate an AE title (PS3.5 6.2, VR AE) and return it without leading and trailing spaces.

    An AE title is 1 to 16 characters of the Default Character Repertoire
    (ISO-IR 6, printable ASCII) without backslash (the value delimiter) nor
    control characters; leading and trailing spaces are not significant, and
    a value of only spaces is empty.

    Raises
    ------
    ValueError
        Naming the rule the value breaks.
    """
    if len(value) > AE_TITLE_MAX_CHARS:
        raise ValueError(f"invalid AE title {value!r}: must not exceed {AE_TITLE_MAX_CHARS} characters")
    if any(c == "\\" or not (" " <= c <= "~") for c in value):
        raise ValueError(f"invalid AE title {value!r}: must not contain control characters or backslashes "
                         "(printable ASCII only)")
    if not value.strip():
        raise ValueError("invalid AE title: must not be empty or only spaces")
    return value.strip()


AETitle = Annotated[str, AfterValidator(check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Strict):
    """DICOM TLS of the node (``[tls]``): the Non-downgrading BCP 195 profile of PS3.15 B.9, TLS 1.2 or higher.

    The certificate and key identify the node both as SCP (the listener, when
    ``scp``) and as SCU (destinations with ``tls = true``, which then get it
    as client certificate). Validation loads the files as a connection
    would, so ``config check`` reports a missing file or a key that does not
    match the certificate.
    """

    certificate: Path = Field(description="PEM certificate of the node (may be followed by its chain)")
    private_key: Path = Field(description="PEM private key of the certificate, unencrypted (keep it 0600)")
    ca_bundle: Path | None = Field(
        default=None, description="PEM CA certificates trusted to sign the peers' certificates; absent: the "
                                  "system's trust store")
    require_peer_certificate: bool = Field(
        default=True, description="the listener requires a client certificate signed by a trusted CA, and the "
                                  "SCUs verify the destination's certificate; false: no peer authentication")
    check_hostname: bool = Field(
        default=True, description="SCUs also require the destination's certificate to name its configured host")
    scp: bool = Field(default=True, description="the listener accepts TLS connections only; false: plain TCP")

    @model_validator(mode="after")
    def _check_files(self) -> TLSSettings:
        import ssl

        from osteonode.network import client_context, server_context

        try:
            server_context(self)
            client_context(self)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the TLS certificate, key or CA bundle: {exc}") from None
        return self


class AuditSettings(_Strict):
    """The audit trail (``[audit]``): DICOM PS3.15 A.5 audit messages, see :mod:`osteonode.audit`.

    Each message goes to ``file`` (one XML message per line, appended) and,
    when ``syslog_host`` is set, to a syslog collector (RFC 5424) over UDP
    (RFC 5426), TCP (RFC 6587 octet counting) or TLS (RFC 5425).
    """

    file: Path | None = Field(default=None, description="append-only file of audit messages, one XML message "
                                                        "per line; absent: no file")
    syslog_host: str | None = Field(default=None, description="syslog collector; absent: no syslog")
    syslog_port: Port | None = Field(default=None, description="default 514 (udp, tcp) or 6514 (tls)")
    syslog_transport: Literal["udp", "tcp", "tls"] = "udp"
    syslog_ca_bundle: Path | None = Field(
        default=None, description="tls: PEM CAs trusted for the collector's certificate; absent: [tls] ca_bundle, "
                                  "else the system's store")
    source_id: str | None = Field(default=None, description="AuditSourceID; absent: <ae_title>@<host name>")
    enterprise_site_id: str | None = Field(default=None, description="AuditEnterpriseSiteID (e.g. the hospital)")

    @property
    def enabled(self) -> bool:
        """True when audit messages go anywhere."""
        return self.file is not None or self.syslog_host is not None


class Destination(_Strict):
    """A DICOM node that receives the results (C-STORE SCP)."""

    name: str = Field(min_length=1, description="label used in logs")
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    tls: bool = Field(default=False, description="associate over DICOM TLS with the [tls] certificate")


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


#: Kernel classes, in the default ranking order (best first).
KernelClass = Literal["soft", "unknown", "bone", "sharp", "lung"]
#: Contrast phases, in the default ranking order (best first).
ContrastPhaseName = Literal["non_contrast", "unknown", "portal_venous", "delayed", "arterial"]
#: The phases a Series Description can name.
NamedPhase = Literal["non_contrast", "portal_venous", "delayed", "arterial"]
KERNEL_CLASSES: tuple[KernelClass, ...] = get_args(KernelClass)
CONTRAST_PHASES: tuple[ContrastPhaseName, ...] = get_args(ContrastPhaseName)


def _is_permutation(values: Sequence[str], allowed: Sequence[str], key: str) -> None:
    if sorted(values) != sorted(allowed):
        raise ValueError(f"{key} must list each of {', '.join(allowed)} exactly once, got {list(values)}")


def _default_phase_keywords() -> dict[NamedPhase, list[str]]:
    return {
        "non_contrast": ["non-contrast", "non contrast", "noncontrast", "without contrast", "w/o",
                         "unenhanced", "plain", "native", "nativ", "nc"],
        "arterial": ["arterial", "art", "cta", "angio"],
        "portal_venous": ["portal", "venous", "pv", "pvp"],
        "delayed": ["delayed", "late", "excretory", "urographic"],
    }


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
    ``phase_keywords``) or, when it names none, from the aortic attenuation
    (``phase_from_aorta``), then slice thickness (thinnest inside
    ``preferred_thickness_mm`` first), then the number of slices.
    """

    axial_tolerance_deg: float = Field(
        default=10.0, ge=0.0, le=45.0,
        description="largest angle between the slice normal and the patient's feet-head axis, degrees "
                    "(PS3.3 C.7.6.2 Image Orientation (Patient))")
    max_slice_thickness_mm: float = Field(
        default=5.0, gt=0.0, description="Slice Thickness (0018,0050) limit, mm (over 3.5 mm no vertebral heights "
                                         "and no Genant grades: osteonode.measure.genant.MAX_SLICE_MM)")
    max_gantry_tilt_deg: float = Field(default=0.5, ge=0.0, description="Gantry/Detector Tilt (0018,1120) limit")
    min_slices: int = Field(default=8, ge=1, description="fewer slices cannot hold the lumbar vertebrae")
    preferred_thickness_mm: tuple[float, float] = Field(
        default=(1.0, 3.0), description="thinnest slices inside this range rank first, mm")
    kernel_order: list[KernelClass] = Field(
        default_factory=lambda: list(KERNEL_CLASSES),
        description="kernel classes, best first (soft tissue before bone, sharp and lung kernels)")
    phase_order: list[ContrastPhaseName] = Field(
        default_factory=lambda: list(CONTRAST_PHASES),
        description="contrast phases, best first (unknown: the description names none)")
    phase_keywords: dict[NamedPhase, list[str]] = Field(
        default_factory=_default_phase_keywords,
        description="words (case-insensitive, whole words) of the Series Description that name a phase; "
                    "checked in the order non_contrast, arterial, portal_venous, delayed")
    kernel_table: Path | None = Field(
        default=None, description="JSON kernel table replacing the shipped dicom_templates/kernels.json")
    phase_from_aorta: bool = Field(
        default=True,
        description="when a candidate's description names no contrast phase and another candidate has the same "
                    "kernel class, measure the aortic attenuation on a coarse subset of its slices (1-2 s per "
                    "series) and rank by the phase it gives")

    @model_validator(mode="after")
    def _check(self) -> SelectionSettings:
        _is_permutation(self.kernel_order, KERNEL_CLASSES, "kernel_order")
        _is_permutation(self.phase_order, CONTRAST_PHASES, "phase_order")
        low, high = self.preferred_thickness_mm
        if not 0 < low <= high:
            raise ValueError(f"preferred_thickness_mm must be [low, high] with 0 < low <= high, got {[low, high]}")
        if any(not word.strip() for words in self.phase_keywords.values() for word in words):
            raise ValueError("phase_keywords must not contain empty words")
        from osteonode.series import load_kernel_table  # validates the table (patterns, classes)

        load_kernel_table(self.kernel_table)
        return self


class WebUser(_Strict):
    """A console user; ``password_hash`` from ``osteonode web hash-password`` (argon2id, PHC string)."""

    name: str = Field(min_length=1)
    password_hash: str = Field(pattern=r"^\$argon2(id|i|d)\$", description="argon2 PHC string")


class WebSettings(_Strict):
    """The web console, REST API and Prometheus metrics served by ``osteonode serve`` (docs/admin.md §6)."""

    enabled: bool = True
    bind: str = Field(default="127.0.0.1", description="address of the console; other than loopback only "
                                                        "with users configured")
    port: Port = 8080
    users: list[WebUser] = Field(default_factory=list, description="no users: read-only console without "
                                                                   "patient identifiers, loopback only")
    session_secret: str | None = Field(default=None, min_length=32, description="signs session cookies; "
                                       "absent: a random one per start (sessions end at restart)")
    metrics_token: str | None = Field(default=None, min_length=16, description="bearer token for /metrics; "
                                      "absent: /metrics needs a login like the rest")
    min_free_percent: float = Field(default=10.0, ge=0, le=100,
                                    description="health: disk of spool and outbox below this is unhealthy")
    heartbeat_max_age_s: float = Field(default=90.0, gt=0,
                                       description="health and sweeper: a worker silent for longer is dead (workers "
                                                   "beat every 10 s, or a third of this if shorter)")

    @model_validator(mode="after")
    def _check_bind(self) -> WebSettings:
        import ipaddress

        try:
            loopback = self.bind == "localhost" or ipaddress.ip_address(self.bind).is_loopback
        except ValueError:
            loopback = False
        if self.enabled and not loopback and not self.users:
            raise ValueError(f"web.bind = {self.bind!r} is not a loopback address: configure web.users "
                             "(the console refuses to serve other hosts without authentication)")
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
    incomplete_timeout_s: float = Field(
        default=600.0, gt=0, description="a series whose association ended abnormally (abort, reset, crash) is "
                                         "complete only when re-sent, or this long after its last instance")
    accept_all_storage: bool = Field(
        default=True, description="accept every Storage SOP class at association and discard what is not CT")
    broker_url: str | None = Field(default=None, description="redis://...; absent: embedded queue")
    retention_days: float | None = Field(
        default=None, gt=0, description="remove the spool and outbox data of studies delivered to every destination "
                                        "more than this many days ago; absent: keep everything")
    retention_interval_s: float = Field(default=3600.0, gt=0, description="serve: seconds between retention passes")
    min_free_percent: float = Field(
        default=5.0, ge=0, lt=100, description="SCP: answer C-STORE with 0xA700 while the spool's file system has "
                                               "less free space than this share; 0: no limit")
    min_free_bytes: int = Field(default=0, ge=0,
                                description="SCP: the same as an absolute number of bytes; 0: no limit")
    jobstore_path: Path | None = Field(
        default=None, description="SQLite job store (osteonode.jobstore); absent: jobs.sqlite3 beside spool_dir")
    analysis_concurrency: int | None = Field(
        default=None, ge=1, description="analyses run at once by `serve` (embedded queue) and, without "
                                         "--concurrency, by `worker`; absent: one per core, at most one per "
                                         f"{GIB_PER_ANALYSIS} GiB of available memory")
    destinations: list[Destination] = Field(default_factory=list)
    tls: TLSSettings | None = Field(default=None, description="DICOM TLS; absent: plain TCP everywhere")
    audit: AuditSettings = AuditSettings()
    dispatch: DispatchSettings = DispatchSettings()
    analysis: AnalysisSettings = AnalysisSettings()
    selection: SelectionSettings = SelectionSettings()
    web: WebSettings = WebSettings()

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
        if self.incomplete_timeout_s < self.study_quiet_period_s:
            raise ValueError(f"incomplete_timeout_s ({self.incomplete_timeout_s:g}) must not be shorter than "
                             f"study_quiet_period_s ({self.study_quiet_period_s:g})")
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError("destination names must be unique")
        if self.tls is None and any(d.tls for d in self.destinations):
            raise ValueError("a destination with tls = true needs the [tls] section (certificate, private_key)")
        return self

    @property
    def analysis_processes(self) -> int:
        """``analysis_concurrency``, or when absent :func:`default_analysis_concurrency`."""
        return self.analysis_concurrency or default_analysis_concurrency()

    @property
    def embedded_broker(self) -> bool:
        """True when no broker URL is set: the on-disk queue in ``queue_dir`` is used."""
        return self.broker_url is None

    @property
    def jobstore_file(self) -> Path:
        """The job store's SQLite file: ``jobstore_path``, or ``jobs.sqlite3`` in the spool's parent folder."""
        return self.jobstore_path or self.spool_dir.parent / "jobs.sqlite3"

    def redacted_dump(self) -> dict:
        """The effective configuration as JSON data with secrets masked (broker password, console session
        secret and metrics token; users by name only), for ``config check`` and the console."""
        effective = self.model_dump(mode="json")
        if effective["broker_url"]:
            effective["broker_url"] = re.sub(r"//([^:/@]*):[^@]*@", r"//\1:****@", effective["broker_url"])
        web = effective["web"]
        web["users"] = [user["name"] for user in web["users"]]
        for key in ("session_secret", "metrics_token"):
            web[key] = "****" if web[key] else None
        return effective

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


def default_analysis_concurrency() -> int:
    """Analyses to run at once: the usable cores, at most one per ``GIB_PER_ANALYSIS`` GiB available, at least 1."""
    return max(1, min(usable_cores(), available_memory_bytes() // (GIB_PER_ANALYSIS * 1024**3)))


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system has one), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_memory_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo (Linux), else the physical memory; bytes."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            return 1024 * next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


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
        cls = cast("type[Settings]", type("Settings", (Settings,),
                                          {"model_config": {**Settings.model_config, "toml_file": config_file}}))
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
