"""The web console, REST API and Prometheus metrics of ``osteonode serve`` (FastAPI, Jinja2, uvicorn).

Pages (HTML, Jinja2 templates in ``templates/``): dashboard ``/``, studies
``/studies`` (searchable, refreshed every 5 s by fetching ``/api/studies``),
study detail ``/studies/{uid}`` (timeline, stage times, failure reason, key
images inline), configuration ``/config`` (read-only), ``/login``. The pages
call the JSON API for actions, so each action exists once:

* ``GET /api/health``: 200 or 503 with one check each (no login needed,
  no patient data: for load balancers and monitoring);
* ``GET /api/dashboard``, ``/api/studies``, ``/api/studies/{uid}``, ``/api/config``;
* ``POST /api/studies/{uid}/reanalyse``, ``POST /api/studies/{uid}/resend/{destination}``,
  ``DELETE /api/studies/{uid}``, ``POST /api/destinations/{name}/echo``;
* OpenAPI at ``/api/docs`` (``/api/openapi.json``);
* ``GET /metrics`` (Prometheus; ``Authorization: Bearer <web.metrics_token>`` or a login).

Authentication: users with argon2 password hashes in ``[web]``, a signed
session cookie (Starlette ``SessionMiddleware``) and a per-session CSRF
token, required as the ``csrf`` form field of the login and as the
``X-CSRF-Token`` header of every API call that changes something. Without
users the console is read-only and shows no patient identifiers (patient
ID, accession number, study date), and :class:`~osteonode.config.WebSettings`
refuses a non-loopback bind. Every login attempt and every action is
recorded by :func:`_record_action`.
"""

from __future__ import annotations

import hmac
import io
import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import pydicom
import uvicorn
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pynetdicom.transport import ThreadedAssociationServer
from starlette.middleware.sessions import SessionMiddleware

from osteonode.audit import audit_event
from osteonode.config import Settings
from osteonode.dimse_status import SUCCESS
from osteonode.dispatch import echo
from osteonode.errors import DeliveryFailed, InputRejected, describe
from osteonode.ingest.completion import JOBS_DIR, WATCHER_HEARTBEAT
from osteonode.ingest.spool import check_uid
from osteonode.jobstore import JobStore
from osteonode.outbox import outbox_entry
from osteonode.web.metrics import ScpMetrics, StoreCollector, bind_scp_metrics

log = logging.getLogger(__name__)

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
TEMPLATES.env.filters["utc"] = lambda at: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))
#: Keys of a study row that identify the patient: shown only after login.
PATIENT_KEYS = ("patient_id", "accession", "study_date")
_hasher = PasswordHasher()

EnqueueJob = Callable[[dict], None]
QueueDelivery = Callable[[str, str, list[str] | None], None]


def hash_password(password: str) -> str:
    """An argon2id hash (PHC string) of ``password`` for ``[[web.users]]``."""
    return _hasher.hash(password)


def _record_action(store: JobStore, user: str, action: str, target: str, outcome: str, client: str = "") -> None:
    """Record one login attempt or console action (the one place; the audit trail is fed from here).

    Every action goes to the job store's ``actions`` table; logins, logouts
    and deletions also to the DICOM audit trail (:func:`osteonode.audit.audit_event`:
    User Authentication, a failed login with outcome minor failure; DICOM
    Study Deleted). A re-send is audited by the delivery itself (DICOM
    Instances Transferred).

    Parameters
    ----------
    user : str
        The logged-in user, or the name tried at a login.
    action : str
        ``login``, ``logout``, ``reanalyse``, ``resend``, ``delete``, ``echo``.
    target : str
        The Study Instance UID or destination name acted on ('' for logins).
    outcome : str
        ``success``, or why not.
    client : str
        The client's address.
    """
    store.record_action(user, action, target, outcome, client)
    if action in ("login", "logout"):
        ok = outcome == "success"
        audit_event("login" if action == "login" else "logout", outcome="success" if ok else "minor_failure",
                    user=user, remote_host=client or None, detail=None if ok else outcome)
    elif action == "delete" and outcome == "success":
        audit_event("study_deleted", user=user, remote_host=client or None, study_uids=(target,))
    level = logging.INFO if outcome == "success" else logging.WARNING
    log.log(level, "console: %s by %s from %s: %s", action, user, client, outcome)  # no target: it may be a UID


class Console:
    """What the routes share: settings, store, the queueing callables."""

    def __init__(self, settings: Settings, store: JobStore, enqueue_job: EnqueueJob,
                 queue_delivery: QueueDelivery) -> None:
        self.settings, self.store = settings, store
        self.enqueue_job, self.queue_delivery = enqueue_job, queue_delivery
        self.users = {u.name: u.password_hash for u in settings.web.users}
        self.registry = CollectorRegistry()
        self.scp_metrics = ScpMetrics(self.registry)
        self.registry.register(StoreCollector(store, settings))

    @property
    def auth(self) -> bool:
        """True when users are configured (logins required to see patient data and act)."""
        return bool(self.users)


def _user(request: Request) -> str | None:
    return request.session.get("user")


def _csrf(request: Request) -> str:
    token = request.session.get("csrf")
    if token is None:
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def _viewer(request: Request) -> str | None:
    """Pages and read APIs: a login when users exist; without users anyone on loopback (no patient data)."""
    user = _user(request)
    if request.app.state.console.auth and user is None:
        raise HTTPException(401, "login required")
    return user


def _actor(request: Request) -> str:
    """Changing APIs: a logged-in user and the session's CSRF token in ``X-CSRF-Token``."""
    user = _user(request)
    if user is None:
        auth = request.app.state.console.auth
        raise HTTPException(401 if auth else 403,
                            "login required" if auth else "read-only console: no users configured")
    if not hmac.compare_digest(request.headers.get("x-csrf-token", ""), request.session.get("csrf", "")):
        raise HTTPException(403, "missing or wrong CSRF token")
    return user


Viewer = Annotated[str | None, Depends(_viewer)]
Actor = Annotated[str, Depends(_actor)]


def create_app(settings: Settings, store: JobStore, *, enqueue_job: EnqueueJob,
               queue_delivery: QueueDelivery) -> FastAPI:
    """The console application (see the module docstring).

    Parameters
    ----------
    settings : Settings
    store : JobStore
    enqueue_job : callable
        Enqueues an analysis payload (re-analyse).
    queue_delivery : callable
        Queues ``osteonode.deliver`` (outbox entry, destination name, files or None).
    """
    console = Console(settings, store, enqueue_job, queue_delivery)
    app = FastAPI(title="osteonode", docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)
    app.state.console = console
    app.add_middleware(SessionMiddleware, secret_key=settings.web.session_secret or secrets.token_hex(32),
                       session_cookie="osteonode_session", same_site="strict", https_only=False, max_age=8 * 3600)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 401 and not request.url.path.startswith(("/api/", "/metrics")):
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    def page(request: Request, name: str, user: str | None, **context: Any) -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, name, {"user": user, "auth": console.auth,
                                                          "csrf": _csrf(request), **context})

    # -- login ---------------------------------------------------------------------------------------

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, next: str = "/", error: str = "") -> HTMLResponse:
        return page(request, "login.html", None, next=_local_path(next), error=error)

    @app.post("/login", include_in_schema=False)
    def login(request: Request, username: Annotated[str, Form()], password: Annotated[str, Form()],
              csrf: Annotated[str, Form()], next: Annotated[str, Form()] = "/") -> Response:
        if not hmac.compare_digest(csrf, request.session.get("csrf", "")):
            _record_action(store, username, "login", "", "refused: CSRF token", _client(request))
            raise HTTPException(403, "missing or wrong CSRF token")
        if not _password_ok(console.users.get(username), password):
            _record_action(store, username, "login", "", "failure", _client(request))
            return RedirectResponse("/login?error=1", status_code=303)
        request.session.clear()
        request.session.update(user=username, csrf=secrets.token_urlsafe(32))
        _record_action(store, username, "login", "", "success", _client(request))
        return RedirectResponse(_local_path(next), status_code=303)

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, user: Actor) -> dict:
        request.session.clear()
        _record_action(store, user, "logout", "", "success", _client(request))
        return {"ok": True}

    # -- pages ---------------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard_page(request: Request, user: Viewer) -> HTMLResponse:
        return page(request, "dashboard.html", user, dash=dashboard(user))

    @app.get("/studies", response_class=HTMLResponse, include_in_schema=False)
    def studies_page(request: Request, user: Viewer) -> HTMLResponse:
        return page(request, "studies.html", user)

    @app.get("/studies/{study_uid}", response_class=HTMLResponse, include_in_schema=False)
    def study_page(request: Request, study_uid: str, user: Viewer) -> HTMLResponse:
        return page(request, "study.html", user, study=study(study_uid, user),
                    destinations=[d.name for d in settings.destinations])

    @app.get("/config", response_class=HTMLResponse, include_in_schema=False)
    def config_page(request: Request, user: Viewer) -> HTMLResponse:
        return page(request, "config.html", user, config=config(user))

    @app.get("/studies/{study_uid}/images/{name}", include_in_schema=False)
    def key_image(study_uid: str, name: str, user: Viewer) -> Response:
        """A key image of the outbox entry (``key_1.dcm`` ...) as PNG; after login only (it names the patient)."""
        if user is None:
            raise HTTPException(403, "key images need a login")
        if not (name.startswith("key_") and name.endswith(".dcm")) or "/" in name:
            raise HTTPException(404, "no such key image")
        path = outbox_entry(settings.outbox_dir, _checked_uid(study_uid)) / name
        if not path.is_file():
            raise HTTPException(404, "no such key image")
        return Response(_png(path), media_type="image/png")

    # -- API: reading --------------------------------------------------------------------------------

    @app.get("/api/health")
    def health() -> JSONResponse:
        """One check each: spool writable, disk above the watermark, broker reachable, worker heartbeat
        fresh, completion watcher alive. 200 when all pass, else 503."""
        checks = health_checks(settings, store)
        ok = all(c["ok"] for c in checks.values())
        return JSONResponse({"status": "ok" if ok else "failing", "checks": checks}, status_code=200 if ok else 503)

    @app.get("/api/dashboard")
    def dashboard(user: Viewer) -> dict:
        """Counts of the last 24 h, queue depth, heartbeats, disk free and destinations."""
        now = time.time()
        disks = {}
        for name, folder in (("spool", settings.spool_dir), ("outbox", settings.outbox_dir)):
            usage = shutil.disk_usage(folder)
            disks[name] = {"free_bytes": usage.free, "free_percent": round(100 * usage.free / usage.total, 1)}
        return {"last_24h": store.counts_since(now - 86400), "queue_depth": store.jobs_by_state()["queued"],
                "heartbeats": {name: round(now - at, 1) for name, at in store.heartbeats().items()},
                "disks": disks, "destinations": [d.model_dump() for d in settings.destinations]}

    @app.get("/api/studies")
    def studies(user: Viewer, accession: str | None = None, patient_id: str | None = None,
                date: str | None = None, limit: int = 100) -> list[dict]:
        """Newest studies first; search by accession number, patient ID or Study Date (YYYYMMDD), after login."""
        if user is None and (accession or patient_id or date):
            raise HTTPException(403, "searching by patient identifiers needs a login")
        return [_redacted(row, user) for row in store.studies(accession=accession, patient_id=patient_id,
                                                              date=date, limit=min(limit, 1000))]

    @app.get("/api/studies/{study_uid}")
    def study(study_uid: str, user: Viewer) -> dict:
        """One study: series, jobs with stage times, deliveries, timeline and the key images available."""
        row = store.study(_checked_uid(study_uid))
        if row is None:
            raise HTTPException(404, "unknown study")
        entry = outbox_entry(settings.outbox_dir, study_uid)
        row["key_images"] = sorted(p.name for p in entry.glob("key_*.dcm")) if entry.is_dir() else []
        return _redacted(row, user)

    @app.get("/api/config")
    def config(user: Viewer) -> dict:
        """The effective configuration (AE title, allowed callers, destinations, ...), secrets masked."""
        return settings.redacted_dump()

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        token = settings.web.metrics_token
        bearer = request.headers.get("authorization", "")
        if not (token and hmac.compare_digest(bearer, f"Bearer {token}")):
            _viewer(request)
        return Response(generate_latest(console.registry), media_type=CONTENT_TYPE_LATEST)

    # -- API: actions --------------------------------------------------------------------------------

    @app.post("/api/studies/{study_uid}/reanalyse")
    def reanalyse(study_uid: str, request: Request, user: Actor) -> dict:
        """Queue the study's last job again (its series must still be in the spool)."""
        payload = store.latest_payload(_checked_uid(study_uid))
        if payload is None or not (settings.spool_dir / study_uid).is_dir():
            raise _refused(store, user, "reanalyse", study_uid, request, 409, "no job or no spool data to analyse")
        enqueued_at = time.time()
        try:
            enqueue_job(payload)
        except Exception:  # noqa: BLE001 - the broker is down: record and answer, never a traceback
            raise _refused(store, user, "reanalyse", study_uid, request, 503, "the queue cannot be reached") from None
        store.job_queued(study_uid, payload["fingerprint"], payload, enqueued_at)
        _record_action(store, user, "reanalyse", study_uid, "success", _client(request))
        return {"queued": True}

    @app.post("/api/studies/{study_uid}/resend/{destination}")
    def resend(study_uid: str, destination: str, request: Request, user: Actor) -> dict:
        """Queue a delivery of the study's outputs (all DICOM files of its outbox entry) to one destination."""
        entry = outbox_entry(settings.outbox_dir, _checked_uid(study_uid))
        if destination not in {d.name for d in settings.destinations}:
            raise _refused(store, user, "resend", study_uid, request, 404, "unknown destination")
        if not any(entry.glob("*.dcm")):
            raise _refused(store, user, "resend", study_uid, request, 409, "no outputs in the outbox")
        # recorded before it is queued: the delivery may finish before this line would run after it
        store.record_delivery(study_uid, entry, destination, "pending", 0, "re-send queued from the console",
                              next_at=time.time())
        try:
            queue_delivery(str(entry), destination, None)
        except Exception as exc:  # noqa: BLE001 - the broker is down: record and answer, never a traceback
            store.record_delivery(study_uid, entry, destination, "failed", 0, f"re-send not queued: {describe(exc)}")
            raise _refused(store, user, "resend", study_uid, request, 503, "the queue cannot be reached") from None
        _record_action(store, user, "resend", study_uid, "success", _client(request))
        return {"queued": True}

    @app.delete("/api/studies/{study_uid}")
    def delete(study_uid: str, request: Request, user: Actor) -> dict:
        """Delete the study's spool folder, outbox entry and marker (the job store keeps its history)."""
        _checked_uid(study_uid)
        if store.job_running(study_uid):
            raise _refused(store, user, "delete", study_uid, request, 409, "a job of the study is running")
        for folder in (settings.spool_dir / study_uid, outbox_entry(settings.outbox_dir, study_uid)):
            shutil.rmtree(folder, ignore_errors=True)
        (settings.spool_dir / JOBS_DIR / f"{study_uid}.json").unlink(missing_ok=True)
        store.mark_deleted(study_uid)
        _record_action(store, user, "delete", study_uid, "success", _client(request))
        return {"deleted": True}

    @app.post("/api/destinations/{name}/echo")
    def echo_destination(name: str, request: Request, user: Actor) -> dict:
        """C-ECHO one configured destination."""
        destination = next((d for d in settings.destinations if d.name == name), None)
        if destination is None:
            raise _refused(store, user, "echo", name, request, 404, "unknown destination")
        try:
            code = echo(destination, calling_ae_title=settings.ae_title, timeout_s=settings.dispatch.timeout_s,
                        tls=settings.tls)
            result = "Success" if code == SUCCESS else f"C-ECHO status 0x{code:04X}"
        except DeliveryFailed as exc:
            result = str(exc)
        _record_action(store, user, "echo", name, "success" if result == "Success" else result, _client(request))
        return {"destination": name, "result": result}

    return app


def _refused(store: JobStore, user: str, action: str, target: str, request: Request, status: int,
             why: str) -> HTTPException:
    """Record a refused action; the HTTP error to raise."""
    _record_action(store, user, action, target, f"refused: {why}", _client(request))
    return HTTPException(status, why)


def _local_path(path: str) -> str:
    """``path`` if it is a path on this site (no open redirect to ``//other.host``), else ``/``."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"


def _password_ok(stored_hash: str | None, password: str) -> bool:
    if stored_hash is None:
        _hasher.hash(password)  # the same work for unknown users: no timing hint of which names exist
        return False
    try:
        return _hasher.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _checked_uid(uid: str) -> str:
    try:
        return check_uid(uid, "Study Instance UID")
    except InputRejected:
        raise HTTPException(404, "not a Study Instance UID") from None


def _redacted(row: dict, user: str | None) -> dict:
    """``row`` without patient identifiers unless a user is logged in."""
    if user is None:
        row = {**row, **dict.fromkeys(PATIENT_KEYS, None)}
    return row


def _png(path: Path) -> bytes:
    """A Secondary Capture key image (8-bit, MONOCHROME2 or RGB) as PNG bytes."""
    from PIL import Image

    ds = pydicom.dcmread(path)
    buffer = io.BytesIO()
    Image.fromarray(ds.pixel_array).save(buffer, format="PNG")
    return buffer.getvalue()


def health_checks(settings: Settings, store: JobStore) -> dict[str, dict]:
    """The checks of ``/api/health``: each ``{"ok": bool, "detail": str}``."""
    now, max_age = time.time(), settings.web.heartbeat_max_age_s
    checks = {}
    try:
        with tempfile.NamedTemporaryFile(dir=settings.spool_dir, prefix=".health-"):
            pass
        checks["spool_writable"] = {"ok": True, "detail": "a file can be created"}
    except OSError as exc:
        checks["spool_writable"] = {"ok": False, "detail": describe(exc)}
    low = []
    for name, folder in (("spool", settings.spool_dir), ("outbox", settings.outbox_dir)):
        usage = shutil.disk_usage(folder)
        if 100 * usage.free / usage.total < settings.web.min_free_percent:
            low.append(f"{name} {100 * usage.free / usage.total:.1f} % free")
    checks["disk_space"] = {"ok": not low, "detail": "; ".join(low) or
                            f"spool and outbox above {settings.web.min_free_percent} % free"}
    checks["broker"] = _broker_check(settings)
    beats = store.heartbeats()
    watcher = beats.pop(WATCHER_HEARTBEAT, None)
    fresh = [name for name, at in beats.items() if now - at <= max_age]
    checks["worker_heartbeat"] = {"ok": bool(fresh), "detail": f"{len(fresh)} worker process(es) seen in the "
                                                               f"last {max_age:.0f} s"}
    checks["completion_watcher"] = {
        "ok": watcher is not None and now - watcher <= max_age,
        "detail": "never ran" if watcher is None else f"last poll {now - watcher:.0f} s ago"}
    return checks


def _broker_check(settings: Settings) -> dict:
    if settings.embedded_broker:
        ok = (settings.queue_dir / "messages").is_dir()
        return {"ok": ok, "detail": "embedded queue " + ("present" if ok else "folder missing")}
    import redis

    try:
        redis.Redis.from_url(str(settings.broker_url), socket_timeout=2, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        return {"ok": False, "detail": f"Redis not reachable ({type(exc).__name__})"}
    return {"ok": True, "detail": "Redis answers PING"}


class RunningConsole:
    """uvicorn serving the console in a daemon thread of ``serve``."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread) -> None:
        self.server, self.thread = server, thread

    def stop(self) -> None:
        """Ask uvicorn to exit and wait up to 5 s."""
        self.server.should_exit = True
        self.thread.join(timeout=5)


def start_console(settings: Settings, store: JobStore, scp: ThreadedAssociationServer, *,
                  enqueue_job: EnqueueJob, queue_delivery: QueueDelivery) -> RunningConsole:
    """Serve the console on ``web.bind``:``web.port`` in a thread; its SCP counters bound to ``scp``.

    No access log: request paths hold Study Instance UIDs.
    """
    app = create_app(settings, store, enqueue_job=enqueue_job, queue_delivery=queue_delivery)
    console: Console = app.state.console
    bind_scp_metrics(scp, console.scp_metrics)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.web.bind, port=settings.web.port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="web-console", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:  # uvicorn logged why (address in use); the DICOM node runs on without a console
        log.error("web console NOT started on %s:%d; the DICOM service runs without it",
                  settings.web.bind, settings.web.port)
        return RunningConsole(server, thread)
    log.info("web console on http://%s:%d/ (%s)", settings.web.bind, settings.web.port,
             "login required" if settings.web.users else "read-only, no patient identifiers: no users configured")
    return RunningConsole(server, thread)
