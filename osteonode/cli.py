"""Command line: ``osteonode serve | worker | analyze | send | echo | demo | config check``."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from osteonode import __version__
from osteonode.audit import audit_event, configure_audit, os_user
from osteonode.config import CONFIG_ENV, ConfigError, Destination, Settings, ensure_dirs, load_settings
from osteonode.ingest.spool import UMASK
from osteonode.logs import configure_logging

if TYPE_CHECKING:
    from pydicom import Dataset

log = logging.getLogger(__name__)

app = typer.Typer(help="osteonode: opportunistic bone-health screening DICOM node.",
                  no_args_is_help=True, add_completion=False)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
web_app = typer.Typer(help="The web console of `serve`.", no_args_is_help=True)
app.add_typer(web_app, name="web")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", envvar="OSTEONODE_CONFIG",
                                                   help="TOML config file (default: embedded defaults).")]


def _print_version(value: bool) -> None:
    """Eager ``--version``: print and exit before any command is required."""
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _main(log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
          version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    # third-party loggers quiet and redacted (no UIDs or patient data), see osteonode.logs
    # (pyradiomics' logger: osteonode.measure.radiomics, as pyradiomics resets it when imported)
    configure_logging(log_level)
    # patient data on disk: files 0640, folders 0750 (spool, .jobs, outbox, queue)
    os.umask(UMASK)


def _settings(config: Path | None) -> Settings:
    if config is not None:
        # tasks running in this process and child worker processes read the same file
        os.environ[CONFIG_ENV] = str(config.resolve())
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    if config is None:
        ensure_dirs(settings)
    return settings


def _settings_no_dirs(config: Path | None) -> Settings:
    """Settings for a one-off command (``analyze``, ``send``): no folders created; a bad file is one line, exit 2."""
    try:
        return load_settings(config, require_dirs=False) if config else Settings()
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def _configure_audit(settings: Settings) -> None:
    """Set up the audit trail (``[audit]``); exit 2 with one line when its file or TLS set-up cannot be used."""
    import ssl

    try:
        configure_audit(settings)
    except (OSError, ssl.SSLError) as exc:
        typer.echo(f"audit: {exc}", err=True)
        raise typer.Exit(2) from None


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="TOML config file to validate.")]) -> None:
    """Validate FILE and print the effective configuration (exit 2 on errors).

    Beyond the keys, the radiomics preset and the trained model are loaded as
    a job loads them (the preset's pyradiomics parameter file validated
    against pyradiomics' schema; the model artifact's SHA-256 and format), so
    that a typo such as ``radiomics_preset = "seed00O"`` fails here, not in
    every job.
    """
    settings = _settings(file)
    problems = _analysis_problems(settings)
    if problems:
        for problem in problems:
            typer.echo(problem, err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(settings.redacted_dump(), indent=2))


def _analysis_problems(settings: Settings) -> list[str]:
    """What a job would reject in ``settings.analysis``: the radiomics preset and the model artifact."""
    problems = []
    if settings.analysis.radiomics_preset:
        from osteonode.measure.radiomics import RadiomicsParamsError, load_preset
        try:
            load_preset(settings.analysis.radiomics_preset)
        except RadiomicsParamsError as exc:
            problems.append(f"analysis.radiomics_preset: {exc}")
    if settings.analysis.model is not None:
        from osteonode.classify.artifact import ModelArtifactError, load_model
        try:
            load_model(settings.analysis.model.path, settings.analysis.model.sha256)
        except ModelArtifactError as exc:
            problems.append(f"analysis.model: {exc}")
    return problems


@web_app.command("hash-password")
def web_hash_password(password: Annotated[str, typer.Option(prompt=True, hide_input=True,
                                                            confirmation_prompt=True)]) -> None:
    """Print the argon2id hash of a console password, for ``password_hash`` in ``[[web.users]]``."""
    from osteonode.web import hash_password

    typer.echo(hash_password(password))


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Run the DICOM listener; with the embedded queue, also the worker, in a child process."""
    from kombu.exceptions import OperationalError

    from osteonode.atomic import remove_orphans
    from osteonode.ingest.completion import StudyJob, watch
    from osteonode.ingest.scp import start_scp
    from osteonode.jobstore import open_store
    from osteonode.retention import retention_loop
    from osteonode.sweeper import SWEEP_INTERVAL_S, run_sweeper
    from worker.app import configure
    from worker.tasks import analyze_study_task, deliver

    settings = _settings(config)
    remove_orphans(settings.spool_dir, settings.outbox_dir)  # nothing writes there before the SCP starts
    configure(settings)  # the producer side: requeue and enqueue below
    _configure_audit(settings)
    store = open_store(settings.jobstore_file)

    def requeue(payload: dict) -> None:
        analyze_study_task.apply_async(args=[payload])

    def enqueue(job: StudyJob) -> None:
        requeue(job.model_dump(mode="json"))

    def requeue_delivery(entry: str, destination: str, files: list[str] | None) -> None:
        deliver.apply_async((entry, destination, files))

    # before any thread starts in this process (SCP, watcher, sweeper, console): see _start_embedded_worker
    embedded_worker = _start_embedded_worker() if settings.embedded_broker else None
    server = start_scp(settings, record_arrival=store.record_arrival)
    audit_event("application_start")
    stop = threading.Event()
    threads = [
        threading.Thread(target=watch, name="study-completion", daemon=True,
                         args=(settings.spool_dir, settings.study_quiet_period_s, settings.selection,
                               enqueue, stop, store),
                         kwargs={"retry_on": (OSError, OperationalError),
                                 "incomplete_timeout_s": settings.incomplete_timeout_s}),
        threading.Thread(target=run_sweeper, name="sweeper", daemon=True,
                         args=(store, requeue, requeue_delivery, stop),
                         kwargs={"heartbeat_max_age_s": settings.web.heartbeat_max_age_s,
                                 "interval_s": min(SWEEP_INTERVAL_S, settings.web.heartbeat_max_age_s / 3)}),
        threading.Thread(target=retention_loop, name="retention", daemon=True, args=(settings, stop)),
    ]
    for thread in threads:
        thread.start()
    console = None
    if settings.web.enabled:
        from osteonode.web import start_console

        console = start_console(settings, store, server, enqueue_job=requeue, queue_delivery=requeue_delivery)
    worker_failed = False
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        if embedded_worker is not None:
            log.info("embedded queue in %s: running up to %d analyses at once in child processes",
                     settings.queue_dir, settings.analysis_processes)
            while not stop.wait(1):
                if embedded_worker.poll() is not None:
                    log.error("the embedded worker process exited (code %d): stopping the node",
                              embedded_worker.returncode)
                    worker_failed = True
                    break
        else:
            stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.shutdown()
        if console is not None:
            console.stop()
        if embedded_worker is not None and embedded_worker.poll() is None:
            embedded_worker.terminate()  # Celery's warm shutdown: running analyses finish first
            embedded_worker.wait()
        for thread in threads:
            thread.join(timeout=5)
        audit_event("application_stop")
        log.info("node stopped")
    if worker_failed:
        raise typer.Exit(1)


def _start_embedded_worker() -> subprocess.Popen:
    """Start ``osteonode worker`` for the embedded queue as a child process of ``serve``.

    The Celery prefork pool forks a new child per analysis (max tasks per
    child 1). Forked from ``serve`` itself, a child inherited every lock that
    one of ``serve``'s threads (SCP associations, series-completion watcher,
    sweeper, retention, web console) held at that instant, with no thread
    left to release it; now and then a child then hung for ever before its
    first log line (tests/integration/test_load.py, issue 12). The worker is
    therefore its own process, started from a new interpreter, so the pool
    forks from a process that runs only Celery's own threads. It reads the
    same configuration (``OSTEONODE_CONFIG``, inherited) and logs to the same
    stream, and is killed if ``serve`` dies (``PR_SET_PDEATHSIG``, Linux);
    ``serve`` stops it with SIGTERM, Celery's warm shutdown.
    """
    import ctypes

    def die_with_parent() -> None:  # runs in the child between fork and exec
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG

    return subprocess.Popen([sys.executable, "-m", "osteonode", "--log-level", logging.getLevelName(
        logging.getLogger().level), "worker"], preexec_fn=die_with_parent)  # noqa: PLW1509 (no threads yet)


@app.command()
def worker(config: ConfigOpt = None,
           concurrency: Annotated[int | None, typer.Option(
               min=1, help="Analyses at once (worker processes); default: analysis_concurrency.")] = None) -> None:
    """Run a Celery worker for the configured broker (Redis; ``serve`` starts one for the embedded queue)."""
    from worker.app import configure, run_worker

    settings = _settings(config)
    _configure_audit(settings)
    # the embedded queue (a folder) carries no broadcast messages: no worker-to-worker traffic
    options = ("--without-heartbeat", "--without-mingle", "--without-gossip") if settings.embedded_broker else ()
    run_worker(configure(settings), concurrency or settings.analysis_processes, *options)


@app.command()
def analyze(input_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False,
                                                      help="Folder holding one DICOM CT study or series.")],
            out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
            segmentation: Annotated[Path | None, typer.Option(
                exists=True, dir_okay=False,
                help="TotalSegmentator multilabel NIfTI (v1 or v2 class ids) to use instead of the built-in "
                     "segmentation.")] = None,
            config: ConfigOpt = None) -> None:
    """Run the whole pipeline on one study (or series) on disk, without any service.

    With several series (grouped by Series Instance UID), the series is chosen
    by the selection rules as for a study the node receives.
    """
    settings = _settings_no_dirs(config)
    headers, skipped = _dicom_headers(input_dir)
    if skipped:
        typer.echo(f"skipped {skipped} file(s) that are not DICOM", err=True)
    if not headers:
        typer.echo(f"no DICOM files in {input_dir}", err=True)
        raise typer.Exit(2)
    with tempfile.TemporaryDirectory(prefix="osteonode-analyze-") as scratch:
        headers, filled = _fill_empty_uids(headers, input_dir, Path(scratch))
        if filled:
            typer.echo(f"note: {filled} file(s) had empty UIDs; filled from the file meta or derived from the "
                       "folder (the outputs refer to these derived UIDs)", err=True)
        result = _analyze_files(headers, out, settings, segmentation)
    typer.echo(result.model_dump_json(indent=2))
    if result.status != "ok":
        raise typer.Exit(3)


def _dicom_headers(folder: Path) -> tuple[list[Dataset], int]:
    """The headers (``pydicom.Dataset`` without pixel data, ``filename`` set) of the DICOM files under ``folder``.

    Hidden files are ignored; also returns the number of other files skipped.
    Each file is read once here; the headers serve every later step.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers: list[Dataset] = []
    skipped = 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError):
            skipped += 1
    return headers, skipped


#: The UIDs ``analyze`` fills when a (de-identified) file leaves them empty.
_FILLED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _fill_empty_uids(headers: list[Dataset], folder: Path, scratch: Path) -> tuple[list[Dataset], int]:
    """The headers with, for each file whose UIDs are empty, that of a copy in ``scratch`` with the UIDs filled.

    Also returns the number of such files. SOP Class and Instance UIDs come
    from the File Meta Information (0002,0002)/(0002,0003) when present; Study
    and Series Instance UIDs (and an absent SOP Instance UID) are derived from
    the folder's path, the Series Number and the file name, so a re-run gives
    the same UIDs.
    """
    import pydicom
    from pydicom.uid import generate_uid

    out: list[Dataset] = []
    filled = 0
    root = str(folder.resolve())
    for i, header in enumerate(headers):
        if all(str(header.get(keyword, "")).strip() for keyword in _FILLED_UIDS):
            out.append(header)
            continue
        path = Path(header.filename)
        ds = pydicom.dcmread(path)
        meta = ds.file_meta
        if not str(ds.get("SOPClassUID", "")).strip():
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not str(ds.get("SOPInstanceUID", "")).strip():
            ds.SOPInstanceUID = str(meta.get("MediaStorageSOPInstanceUID", "")).strip() or \
                generate_uid(entropy_srcs=[root, str(path.relative_to(folder))])
        if not str(ds.get("StudyInstanceUID", "")).strip():
            ds.StudyInstanceUID = generate_uid(entropy_srcs=[root, "study"])
        if not str(ds.get("SeriesInstanceUID", "")).strip():
            ds.SeriesInstanceUID = generate_uid(entropy_srcs=[root, "series", str(ds.get("SeriesNumber", ""))])
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(scratch / f"{i:06d}.dcm", enforce_file_format=True)
        out.append(pydicom.dcmread(scratch / f"{i:06d}.dcm", stop_before_pixels=True))
        filled += 1
    return out, filled


def _analyze_files(headers: list[Dataset], out: Path, settings: Settings, segmentation: Path | None):
    """Analyse one series, or a study's best series when ``headers`` hold several (selection rules)."""
    from osteonode.pipeline import analyze_files, analyze_study
    from osteonode.series import SeriesInfo, describe_headers, rank_series

    by_series: dict[str, list[Dataset]] = {}
    for ds in headers:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    if len(by_series) <= 1:
        result = analyze_files([Path(ds.filename) for ds in headers], out, settings.analysis,
                               segmentation_file=segmentation, selection_rules=settings.selection)
    else:
        def files_of(info: SeriesInfo) -> list[Path]:
            return [Path(ds.filename) for ds in by_series[info.series_instance_uid]]

        ranking = rank_series([describe_headers(series, settings.selection) for series in by_series.values()],
                              settings.selection, files_of=files_of)
        result = analyze_study(ranking, out, settings.analysis, settings.selection, files_of=files_of)
    return result


def _destinations(settings: Settings, to: str | None, host: str | None, port: int | None, called_aet: str,
                  tls: bool) -> list[Destination]:
    """The destinations ``send`` and ``echo`` address: ``--host``/``--port``, ``--to NAME``, or every configured one."""
    if (host is None) != (port is None):
        typer.echo("--host and --port go together: give both, or --to NAME", err=True)
        raise typer.Exit(2)
    if tls and settings.tls is None:
        typer.echo("--tls needs the [tls] section (certificate, private_key) in the configuration", err=True)
        raise typer.Exit(2)
    if host is not None and port is not None:
        destinations = [Destination(name=f"{host}:{port}", ae_title=called_aet, host=host, port=port, tls=tls)]
    elif to is not None:
        destinations = [d for d in settings.destinations if d.name == to]
        if not destinations:
            typer.echo(f"no destination named {to!r} in the configuration", err=True)
            raise typer.Exit(2)
    else:
        destinations = list(settings.destinations)
    if not destinations:
        typer.echo("no destination: give --to NAME or --host and --port (or configure destinations)", err=True)
        raise typer.Exit(2)
    return destinations


ToOpt = Annotated[str | None, typer.Option(help="Name of a configured destination.")]
HostOpt = Annotated[str | None, typer.Option(help="Peer host (instead of --to).")]
PortOpt = Annotated[int | None, typer.Option(help="Peer port.")]
CalledAetOpt = Annotated[str, typer.Option(help="Peer AE title.")]
TlsOpt = Annotated[bool, typer.Option("--tls", help="With --host: DICOM TLS with the [tls] certificate "
                                                    "(configured destinations use their own tls key).")]


@app.command()
def send(paths: Annotated[list[Path], typer.Argument(exists=True, help="DICOM files or folders.")],
         to: ToOpt = None, host: HostOpt = None, port: PortOpt = None, called_aet: CalledAetOpt = "ANY-SCP",
         tls: TlsOpt = False, config: ConfigOpt = None) -> None:
    """C-STORE files (e.g. an outbox entry) to a configured destination or to HOST:PORT."""
    from osteonode.atomic import TMP_PREFIX
    from osteonode.dispatch import send_files
    from osteonode.errors import DeliveryFailed
    from osteonode.outbox import delivery_state, record_delivery

    settings = _settings_no_dirs(config)
    destinations = _destinations(settings, to, host, port, called_aet, tls)
    _configure_audit(settings)
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(
        f for f in p.rglob("*.dcm") if not any(part.startswith(TMP_PREFIX) for part in f.relative_to(p).parts)))]
    try:
        for destination in destinations:
            send_files(files, destination, calling_ae_title=settings.ae_title,
                       timeout_s=settings.dispatch.timeout_s, tls=settings.tls, exported_by=os_user())
            typer.echo(f"sent {len(files)} file(s) to {destination.name}")
            for entry in paths:  # an outbox entry re-sent by hand: record the delivery beside it
                if delivery_state(entry, destination.name) is not None:
                    record_delivery(entry, destination.name, "delivered", 1, "re-sent with `osteonode send`")
    except DeliveryFailed as exc:
        typer.echo(f"delivery failed: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def echo(to: ToOpt = None, host: HostOpt = None, port: PortOpt = None, called_aet: CalledAetOpt = "ANY-SCP",
         tls: TlsOpt = False, config: ConfigOpt = None) -> None:
    """C-ECHO a configured destination (all by default) or HOST:PORT; exit 1 if one does not answer success."""
    from osteonode.dimse_status import SUCCESS
    from osteonode.dispatch import echo as c_echo
    from osteonode.errors import DeliveryFailed

    settings = _settings_no_dirs(config)
    failed = False
    for destination in _destinations(settings, to, host, port, called_aet, tls):
        try:
            status = c_echo(destination, calling_ae_title=settings.ae_title, timeout_s=settings.dispatch.timeout_s,
                            tls=settings.tls)
        except DeliveryFailed as exc:
            typer.echo(f"echo failed: {exc}", err=True)
            failed = True
            continue
        typer.echo(f"{destination.name}: C-ECHO status 0x{status:04X}")
        failed |= status != SUCCESS
    if failed:
        raise typer.Exit(1)


@app.command()
def train(table: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                                 help="CSV: study_id plus t_score, who_category or ovcf.")],
          features_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False,
                                                       help="<study_id>/radiomics.csv as analyze wrote them.")],
          out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the model artifact.")],
          provenance: Annotated[str, typer.Option(help="Where the labels and images come from (model card).")],
          task: Annotated[str, typer.Option(help="osteoporosis_vs_normal, osteoporosis_vs_osteopenia, "
                                                 "osteopenia_vs_normal, low_bmd_vs_normal or ovcf.")]
          = "osteoporosis_vs_normal",
          pipeline: Annotated[str, typer.Option(help="lr_stability (seed 000) or mrmr_lasso (seeds 001/002).")]
          = "lr_stability",
          classifier: Annotated[str, typer.Option(help="rf, svm, knn or logistic.")] = "rf",
          unit: Annotated[Literal["study", "vertebra"], typer.Option(help="study or vertebra.")] = "study",
          validation: Annotated[str, typer.Option(help="cv (5-fold) or holdout.")] = "cv",
          seed: int = 0,
          synthetic: Annotated[bool, typer.Option(help="Mark the model as trained on synthetic data.")] = False,
          ) -> None:
    """Train a radiomics classifier (seed-study pipelines) and write the artifact, sha256 and model card."""
    from osteonode.classify.train import train as train_model

    report = train_model(table, features_dir, out, provenance=provenance, task=task, pipeline=pipeline,
                         classifier=classifier, unit=unit, validation=validation, seed=seed, synthetic=synthetic)
    typer.echo(f"model {report.model_id}\n  artifact {report.model_path}\n  sha256 {report.sha256}\n"
               f"  {report.validation}: {_metrics_line(report.metrics)}\n"
               f"  model card {report.model_card_md}\n  ROC {report.roc_png}")


@app.command()
def evaluate(model: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Model artifact (.joblib).")],
             table: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Labelled study table.")],
             features_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
             out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the report.")],
             sha256: Annotated[str | None, typer.Option(help="Expected SHA-256 (default: the .sha256 file).")]
             = None) -> None:
    """Evaluate a model on a labelled table: AUC with DeLong 95 % CI, sensitivity, specificity, ROC PNG."""
    from osteonode.classify.evaluate import evaluate as evaluate_model

    report = evaluate_model(model, table, features_dir, out, expected_sha256=sha256)
    typer.echo(f"model {report.model_id}: {_metrics_line(report.metrics)}\n"
               f"  report {report.report_json}\n  ROC {report.roc_png}")


#: What a folder made by an earlier `osteonode demo` holds; any other non-empty folder is not replaced.
DEMO_MARKERS = ("osteonode.toml", "node.log", "pacs")


def _metrics_line(metrics: dict) -> str:
    low, high = metrics["auc_ci95"]
    return (f"AUC {metrics['auc']:.3f} (95 % CI {low:.3f}-{high:.3f}, DeLong), sensitivity "
            f"{metrics['sensitivity']:.2f}, specificity {metrics['specificity']:.2f}, "
            f"confusion {metrics['confusion_matrix']}")


@app.command()
def demo(ct: Annotated[Path | None,
                       typer.Option(help="NIfTI CT or DICOM folder (default: the shared example CT).")] = None,
         workdir: Annotated[Path, typer.Option(help="Scratch folder: new, empty, or one a previous demo made "
                                                    "(it is replaced).")] = Path("osteonode-demo"),
         timeout_s: Annotated[float, typer.Option(help="Seconds to wait for the results.")] = 600.0) -> None:
    """Start a node on embedded defaults, send it a CT, and print what comes back to the PACS."""
    from osteonode.demo import DEFAULT_CT, run_demo

    if workdir.exists() and any(workdir.iterdir()) and not all(
            (workdir / name).exists() for name in DEMO_MARKERS):
        typer.echo(f"{workdir} is not empty and was not made by `osteonode demo`; it is replaced by the demo, "
                   "so give a new or empty folder with --workdir", err=True)
        raise typer.Exit(2)
    ct = ct or DEFAULT_CT
    if not ct.exists():
        typer.echo(f"CT not found: {ct} (pass --ct)", err=True)
        raise typer.Exit(2)
    result = run_demo(ct, workdir, timeout_s)
    raise typer.Exit(0 if result.status == "ok" else 3)
