"""Real services on free loopback ports for the integration tests.

Plain helpers and classes (no pytest fixtures here; see ``conftest.py``):

* :func:`free_port` -- a currently unused TCP port on 127.0.0.1.
* :func:`require_tool` -- fail (never skip) the test when a CI-installed tool is missing.
* :func:`wait_for` -- poll a predicate until it is truthy or a timeout expires.
* :class:`RedisServer` -- ``/usr/bin/redis-server`` with no persistence.
* :class:`OrthancServer` -- ``/usr/sbin/Orthanc`` with a throw-away config,
  storage and index, plus a small REST client (stdlib ``urllib`` only).
* :class:`StoreSCP` -- dcmtk ``/usr/bin/storescp`` as a receiving DICOM peer.
* :func:`dciodvfy` -- run dicom3tools ``/usr/bin/dciodvfy`` and split its
  findings into errors and warnings.

Every service is a context manager and has ``start()`` / ``stop()``.
``stop()`` is idempotent and always ends the process
(``terminate()``, ``wait(timeout)``, then ``kill()``); ``stop(background=True)``
sends SIGTERM at once and does the wait/kill in a thread that
:func:`reap_stopping` joins (the fixtures use it: Orthanc takes ~3.5 s to shut
down gracefully). On Linux the child also gets SIGTERM if the test process
itself dies (``PR_SET_PDEATHSIG``), so a killed pytest leaves no orphans.

Readiness means "this very process listens on its port(s)" (checked through
``/proc``), plus ``PING``/``GET /system`` for Redis/Orthanc, so a foreign
process that grabbed the same free port is never mistaken for the service.
A start-up that fails with "address already in use" is retried on new ports.

When a service fails to start, or a REST call to Orthanc fails, the raised
:class:`ServiceError` carries the tail of that service's log file.

dcmtk tools are always run by their full ``/usr/bin`` path (pynetdicom installs
console scripts with the same names) and with ``TCP_NODELAY=1`` in the
environment (without it dcmtk stalls ~50 ms per object on loopback).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest

REDIS_SERVER = "/usr/bin/redis-server"
ORTHANC = "/usr/sbin/Orthanc"
STORESCP = "/usr/bin/storescp"
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
DCIODVFY = "/usr/bin/dciodvfy"

LOOPBACK = "127.0.0.1"

T = TypeVar("T")


class ServiceError(RuntimeError):
    """A service failed to start, died, or answered a request with an error."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that is free on ``host`` right now.

    Binds port 0 and reads back the port the kernel picked. There is an
    unavoidable window between closing this socket and the service binding
    the port; the service classes retry with new ports when a start-up fails
    with "address already in use" (see :meth:`ManagedProcess.start`).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def require_tool(path: str | os.PathLike[str]) -> str:
    """Return ``str(path)`` if it is an executable file, else FAIL the current test.

    The integration tests rely on tools that CI installs from Debian packages
    (redis-server, orthanc, dcmtk, dicom3tools). A missing tool means a missing
    install step, so the test fails loudly (``pytest.fail``) instead of being
    skipped, which would hide the problem.
    """
    p = str(path)
    if not (os.path.isfile(p) and os.access(p, os.X_OK)):
        pytest.fail(
            f"required tool {p!r} is not installed or not executable; the integration "
            "tests need the Debian packages redis-server, orthanc, dcmtk and dicom3tools "
            "(apt-get install redis-server orthanc dcmtk dicom3tools chromium)",
            pytrace=False,
        )
    return p


def wait_for(
    predicate: Callable[[], T],
    timeout_s: float = 10.0,
    *,
    interval_s: float = 0.05,
    what: str | None = None,
) -> T:
    """Call ``predicate()`` until it returns something truthy; return that value.

    Exceptions raised by the predicate count as "not yet" (the last one is
    chained to the timeout error, which helps when a poll keeps failing).

    Raises
    ------
    TimeoutError
        If ``timeout_s`` elapses first. The message names ``what`` (or the
        predicate) and the last exception seen, if any.
    """
    deadline = time.monotonic() + timeout_s
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - polling: any failure means "not yet"
            last_exc = exc
        if time.monotonic() >= deadline:
            label = what or getattr(predicate, "__name__", repr(predicate))
            msg = f"timed out after {timeout_s:g} s waiting for {label}"
            if last_exc is not None:
                msg += f" (last error: {last_exc!r})"
            raise TimeoutError(msg) from last_exc
        time.sleep(interval_s)


def tail(path: Path, n_lines: int = 40) -> str:
    """Return the last ``n_lines`` of a text file ('' when it does not exist)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return ""
    lines = data.decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-n_lines:])


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes in LISTEN state on ``port`` (any address), from ``/proc/net/tcp{,6}``.

    None when ``/proc/net/tcp`` does not exist (not Linux).
    """
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        return None
    want_port = f"{port:04X}"
    inodes: set[str] = set()
    for table in tables:
        try:
            rows = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and local.rsplit(":", 1)[1] == want_port:  # 0A = LISTEN
                inodes.add(inode)
    return inodes


def process_listens_on(pid: int, port: int) -> bool:
    """True if process ``pid`` itself holds a listening socket on ``port`` (Linux).

    Stronger than :func:`port_is_listening`: a different process that happens
    to listen on the same port (lost free-port race) does not count. Falls
    back to :func:`port_is_listening` where ``/proc`` is unavailable.
    """
    inodes = _listening_inodes(port)
    if inodes is None:
        return port_is_listening(port)
    if not inodes:
        return False
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        links = [os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)]
    except OSError:
        return False
    return any(link == f"socket:[{inode}]" for link in links for inode in inodes)


def port_is_listening(port: int, host: str = LOOPBACK) -> bool:
    """True if something listens on ``port``.

    On Linux this reads ``/proc/net/tcp{,6}`` so it never opens a connection
    (a bare TCP connect makes DICOM peers log a failed association). Elsewhere
    it falls back to a TCP connect to ``host:port``.
    """
    inodes = _listening_inodes(port)
    if inodes is not None:
        return bool(inodes)
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def dcmtk_env() -> dict[str, str]:
    """Environment for dcmtk tools: the current one plus ``TCP_NODELAY=1``."""
    return {**os.environ, "TCP_NODELAY": "1"}


def _set_parent_death_signal() -> None:  # pragma: no cover - runs in the child
    """preexec_fn: have the kernel SIGTERM this child when its parent dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    """Terminate ``proc`` and reap it: SIGTERM, wait ``timeout_s``, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


_stopping: list[threading.Thread] = []
_stopping_lock = threading.Lock()


def stop_process_in_background(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    """SIGTERM ``proc`` now; wait for it (then SIGKILL after ``timeout_s``) in a thread.

    Orthanc needs ~3.5 s to shut down gracefully (its HTTP and DICOM servers
    poll for the stop flag), which would otherwise be paid by every test.
    :func:`reap_stopping` joins these threads; the conftest calls it at the
    end of the session, and it is also registered with :mod:`atexit`.
    """
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    thread = threading.Thread(
        target=stop_process, args=(proc, timeout_s), name=f"stop-{proc.pid}", daemon=True
    )
    thread.start()
    with _stopping_lock:
        _stopping[:] = [t for t in _stopping if t.is_alive()]
        _stopping.append(thread)


def reap_stopping(timeout_s: float = 30.0) -> None:
    """Wait for every process handed to :func:`stop_process_in_background` to exit."""
    with _stopping_lock:
        threads, _stopping[:] = list(_stopping), []
    for thread in threads:
        thread.join(timeout_s)


atexit.register(reap_stopping)


# --------------------------------------------------------------------------- base class


class ManagedProcess:
    """A long-running child process that logs to a file and serves on free ports.

    Subclasses implement :meth:`_pick_ports`, :meth:`_command` and
    :meth:`_is_ready`, and may override :meth:`_prepare` (write config files).

    Parameters
    ----------
    workdir : pathlib.Path
        A private directory for this service (data, config, log).
    startup_timeout_s : float
        How long :meth:`start` waits for readiness.
    """

    name = "service"
    #: How many times start() launches with fresh ports when the attempt fails and
    #: its log says "already in use" (another process took the free port first).
    start_attempts = 3

    def __init__(self, workdir: Path, *, startup_timeout_s: float = 30.0) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._log_offset = 0

    # -- to implement -------------------------------------------------------------
    def _pick_ports(self) -> None:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Write config files etc. before each launch attempt (optional)."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        return None

    def _is_ready(self) -> bool:
        raise NotImplementedError

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> ManagedProcess:
        """Launch the process and block until it is ready.

        Raises
        ------
        ServiceError
            If the process exits or is not ready within ``startup_timeout_s``;
            the message includes the tail of the log.
        """
        last_error: ServiceError | None = None
        for _attempt in range(self.start_attempts):
            self._pick_ports()
            self._prepare()
            self._launch()
            try:
                self._wait_ready()
                return self
            except ServiceError as exc:
                last_error = exc
                self.stop()
                if "already in use" not in self._attempt_log().lower():
                    break  # not a lost port race: a retry will not help
        assert last_error is not None
        raise last_error

    def _attempt_log(self) -> str:
        """The log written since the latest launch."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _launch(self) -> None:
        cmd = self._command()
        require_tool(cmd[0])
        self._log_file = open(self.log_path, "ab")
        self._log_offset = self._log_file.tell()
        self._log_file.write(f"\n=== {time.strftime('%H:%M:%S')} $ {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self._env(),
            preexec_fn=_set_parent_death_signal if sys.platform.startswith("linux") else None,
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            self.check_alive()
            try:
                if self._is_ready():
                    return
            except Exception:  # noqa: BLE001 - not ready yet
                pass
            if time.monotonic() >= deadline:
                raise self.error(f"{self.name} not ready after {self.startup_timeout_s:g} s")
            time.sleep(0.05)

    def check_alive(self) -> None:
        """Raise :class:`ServiceError` (with the log tail) if the process has exited."""
        if self.proc is None:
            raise ServiceError(f"{self.name} was never started")
        rc = self.proc.poll()
        if rc is not None:
            raise self.error(f"{self.name} exited with status {rc}")

    def error(self, message: str) -> ServiceError:
        """Build a :class:`ServiceError` whose message ends with the log tail."""
        return ServiceError(
            f"{message}\n--- last lines of {self.log_path} ---\n{tail(self.log_path)}"
        )

    def stop(self, timeout_s: float = 10.0, *, background: bool = False) -> None:
        """Terminate the process (SIGTERM, wait ``timeout_s``, SIGKILL) and close the log.

        Idempotent. With ``background`` only the SIGTERM happens now and the
        wait/kill runs in a thread (see :func:`stop_process_in_background`);
        the fixtures use that so Orthanc's slow graceful shutdown does not
        delay each test.
        """
        try:
            if background:
                stop_process_in_background(self.proc, timeout_s)
            else:
                stop_process(self.proc, timeout_s)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def log_tail(self, n_lines: int = 40) -> str:
        """The last ``n_lines`` of this service's log."""
        return tail(self.log_path, n_lines)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


# --------------------------------------------------------------------------- redis


class RedisServer(ManagedProcess):
    """``redis-server`` on a free loopback port, without RDB or AOF persistence.

    Attributes
    ----------
    host : str
        ``"127.0.0.1"``.
    port : int
        The TCP port.
    url : str
        ``redis://127.0.0.1:<port>/0`` (for Celery broker/backend settings).
    """

    name = "redis"

    def __init__(self, workdir: Path, *, startup_timeout_s: float = 15.0) -> None:
        super().__init__(workdir, startup_timeout_s=startup_timeout_s)
        self.host = LOOPBACK
        self.port = 0

    @property
    def url(self) -> str:
        """Redis URL of database 0."""
        return f"redis://{self.host}:{self.port}/0"

    def _pick_ports(self) -> None:
        self.port = free_port()

    def _command(self) -> list[str]:
        return [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
        ]  # fmt: skip

    def _is_ready(self) -> bool:
        return self.ping()

    def command(self, *args: str | bytes | int, timeout_s: float = 5.0) -> Any:
        """Send one command over a fresh connection with RESP and return the reply.

        A minimal client so tests can inspect Redis without extra packages:
        simple strings and bulk strings come back as ``bytes`` (``None`` for a
        nil), integers as ``int``, arrays as ``list``; an error reply raises
        :class:`ServiceError`.

        Examples
        --------
        >>> redis.command("SET", "k", "v"); redis.command("GET", "k")
        b'OK'
        b'v'
        """
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        payload = b"*%d\r\n" % len(parts) + b"".join(
            b"$%d\r\n%s\r\n" % (len(p), p) for p in parts
        )
        with socket.create_connection((self.host, self.port), timeout=timeout_s) as s:
            s.sendall(payload)
            return _read_resp(s.makefile("rb"))

    def ping(self) -> bool:
        """True if the server answers ``PING`` with ``PONG``."""
        try:
            return self.command("PING", timeout_s=1.0) == b"PONG"
        except (OSError, ServiceError):
            return False


def _read_resp(f) -> Any:
    """Parse one RESP2 reply from the binary file object ``f``."""
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ServiceError(f"truncated redis reply: {line!r}")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body
    if kind == b"-":
        raise ServiceError(f"redis error: {body.decode(errors='replace')}")
    if kind == b":":
        return int(body)
    if kind == b"$":
        n = int(body)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2]
    if kind == b"*":
        n = int(body)
        return None if n < 0 else [_read_resp(f) for _ in range(n)]
    raise ServiceError(f"unexpected redis reply: {line!r}")


# --------------------------------------------------------------------------- orthanc


class OrthancServer(ManagedProcess):
    """Orthanc with a private config, storage and index on free loopback ports.

    The config disables authentication and plugins (Debian would otherwise
    auto-load ``/usr/share/orthanc/plugins``), accepts C-ECHO/C-STORE from any
    AE title, does not check the called AE title, and uses a short
    ``StableAge`` so ``IsStable`` flips quickly.

    Attributes
    ----------
    http_url : str
        ``http://127.0.0.1:<http_port>`` (no trailing slash).
    http_port, dicom_port : int
        REST and DICOM ports.
    aet : str
        Orthanc's AE title, ``"ORTHANC"``.
    host : str
        ``"127.0.0.1"``.
    config_path : pathlib.Path
        The JSON configuration written for this instance.

    Parameters
    ----------
    workdir : pathlib.Path
        Private directory (config, storage, index, log).
    aet : str
        AE title of Orthanc.
    stable_age_s : int
        ``StableAge`` in seconds.
    verbose : bool
        Start Orthanc with ``--verbose`` (more detail in the log).
    extra_config : dict, optional
        Extra/override configuration keys merged into the JSON config.
    """

    name = "orthanc"

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        stable_age_s: int = 1,
        verbose: bool = False,
        extra_config: dict[str, Any] | None = None,
        startup_timeout_s: float = 30.0,
        request_timeout_s: float = 60.0,
    ) -> None:
        super().__init__(workdir, startup_timeout_s=startup_timeout_s)
        self.host = LOOPBACK
        self.aet = aet
        self.stable_age_s = stable_age_s
        self.verbose = verbose
        self.extra_config = dict(extra_config or {})
        self.request_timeout_s = request_timeout_s
        self.http_port = 0
        self.dicom_port = 0
        self.config_path = self.workdir / "orthanc.json"

    @property
    def http_url(self) -> str:
        """Base URL of the REST API (no trailing slash)."""
        return f"http://{self.host}:{self.http_port}"

    # -- process ------------------------------------------------------------------
    def _pick_ports(self) -> None:
        self.http_port = free_port()
        self.dicom_port = free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()

    def config(self) -> dict[str, Any]:
        """The configuration dictionary written to :attr:`config_path`."""
        storage = self.workdir / "storage"
        index = self.workdir / "index"
        storage.mkdir(exist_ok=True)
        index.mkdir(exist_ok=True)
        cfg: dict[str, Any] = {
            "Name": f"osteonode-test-{self.aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(index),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpDescribeErrors": True,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {},
            "DicomModalitiesInDatabase": False,
            "OrthancPeers": {},
            "StableAge": self.stable_age_s,
            "SaveJobs": False,
            "OverwriteInstances": True,
            "StorageCompression": False,
            "HttpTimeout": 60,
            "DicomScuTimeout": 30,
            "DicomScpTimeout": 30,
            "ExecuteLuaEnabled": False,
        }
        cfg.update(self.extra_config)
        return cfg

    def _prepare(self) -> None:
        self.config_path.write_text(json.dumps(self.config(), indent=2))

    def _command(self) -> list[str]:
        cmd = [ORTHANC]
        if self.verbose:
            cmd.append("--verbose")
        cmd.append(str(self.config_path))
        return cmd

    def _is_ready(self) -> bool:
        pid = self.proc.pid
        if not (process_listens_on(pid, self.http_port) and process_listens_on(pid, self.dicom_port)):
            return False
        return bool(self._request("GET", "/system", timeout_s=2.0, log_errors=False))

    # -- REST ---------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict | list | None = None,
        *,
        content_type: str | None = None,
        raw: bool = False,
        timeout_s: float | None = None,
        log_errors: bool = True,
    ) -> Any:
        """Send a REST request; return parsed JSON (or bytes when ``raw``)."""
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            content_type = content_type or "application/json"
        elif isinstance(body, str):
            data = body.encode()
            content_type = content_type or "text/plain"
        else:
            data = body
        req = urllib.request.Request(self.http_url + path, data=data, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.request_timeout_s) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            msg = f"Orthanc {method} {path} -> HTTP {exc.code}: {detail}"
            raise (self.error(msg) if log_errors else ServiceError(msg)) from None
        except OSError as exc:
            msg = f"Orthanc {method} {path} failed: {exc!r}"
            raise (self.error(msg) if log_errors else ServiceError(msg)) from None
        if raw:
            return payload
        if not payload.strip():
            return None
        try:
            return json.loads(payload)
        except ValueError:
            return payload

    def get(self, path: str, **kw: Any) -> Any:
        """``GET path`` (e.g. ``"/system"``); returns parsed JSON."""
        return self._request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        """``POST path`` with a JSON (dict/list), text (str) or raw (bytes) body."""
        return self._request("POST", path, body, **kw)

    def put(self, path: str, body: Any = None, **kw: Any) -> Any:
        """``PUT path`` with a JSON (dict/list), text (str) or raw (bytes) body."""
        return self._request("PUT", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        """``DELETE path``."""
        return self._request("DELETE", path, **kw)

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Register a DICOM peer as ``/modalities/{name}`` (PUT; replaces any existing one)."""
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": int(port)})

    def echo_modality(self, name: str) -> bool:
        """C-ECHO the registered modality ``name``; True on success."""
        try:
            self.post(f"/modalities/{name}/echo", {}, log_errors=False)
            return True
        except ServiceError:
            return False

    def upload(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """POST one DICOM file to ``/instances``.

        Returns Orthanc's answer, e.g. ``{"ID": ..., "ParentStudy": ...,
        "ParentSeries": ..., "Status": "Success" | "AlreadyStored"}``.
        """
        return self.post("/instances", Path(path).read_bytes(), content_type="application/dicom")

    def store_to_modality(self, name: str, resource_ids: str | Iterable[str]) -> dict[str, Any]:
        """C-STORE Orthanc resources (patient/study/series/instance IDs) to modality ``name``.

        Synchronous: returns once the job has finished, with Orthanc's job
        result (``{"Description", "FailedInstancesCount", "InstancesCount",
        "LocalAet", "ParentResources", "RemoteAet"}``).

        Raises
        ------
        ServiceError
            On an HTTP error or when any instance failed to be sent.
        """
        ids = [resource_ids] if isinstance(resource_ids, str) else list(resource_ids)
        result = self.post(
            f"/modalities/{name}/store", {"Resources": ids, "Synchronous": True}
        )
        failed = int((result or {}).get("FailedInstancesCount", 0) or 0)
        if failed:
            raise self.error(f"C-STORE to {name}: {failed} instance(s) failed: {result}")
        return result

    def studies(self) -> list[dict[str, Any]]:
        """All studies, expanded (each has ``ID``, ``MainDicomTags``, ``Series``, ``IsStable``...)."""
        return self.get("/studies?expand")

    def study(self, study_id: str) -> dict[str, Any]:
        """One study resource by Orthanc ID."""
        return self.get(f"/studies/{study_id}")

    def series_of_study(self, study_id: str) -> list[dict[str, Any]]:
        """The series of a study, expanded (``ID``, ``MainDicomTags`` incl. ``Modality``, ``Instances``...)."""
        return self.get(f"/studies/{study_id}/series")

    def instances_of_series(self, series_id: str) -> list[dict[str, Any]]:
        """The instances of a series, expanded (``ID``, ``MainDicomTags`` incl. ``SOPInstanceUID``...)."""
        return self.get(f"/series/{series_id}/instances")

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``/instances/{id}/simplified-tags``: keyword -> value (sequences as lists of dicts)."""
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def find_study(self, study_instance_uid: str) -> str | None:
        """Orthanc ID of the study with this Study Instance UID, or None (POST /tools/lookup)."""
        for hit in self.post("/tools/lookup", study_instance_uid) or []:
            if hit.get("Type") == "Study":
                return hit["ID"]
        return None

    def wait_for_study(
        self, study_instance_uid: str, timeout_s: float = 30.0, *, min_instances: int = 1
    ) -> str:
        """Wait until the study exists with at least ``min_instances`` instances; return its ID."""

        def ready() -> str | None:
            sid = self.find_study(study_instance_uid)
            if sid and len(self.get(f"/studies/{sid}/instances")) >= min_instances:
                return sid
            return None

        try:
            return wait_for(ready, timeout_s, interval_s=0.2, what=f"study {study_instance_uid}")
        except TimeoutError as exc:
            raise self.error(str(exc)) from None

    def download_instance(self, instance_id: str, dest: str | os.PathLike[str]) -> Path:
        """Save the DICOM file of an instance to ``dest`` (a file, or a directory
        in which ``<instance_id>.dcm`` is created); return the written path."""
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / f"{instance_id}.dcm"
        dest.write_bytes(self.get(f"/instances/{instance_id}/file", raw=True))
        return dest

    def clear(self) -> None:
        """Delete every patient (and so every study/series/instance) from Orthanc."""
        for pid in self.get("/patients"):
            self.delete(f"/patients/{pid}")

    @staticmethod
    def wait_for(predicate: Callable[[], T], timeout_s: float = 30.0, **kw: Any) -> T:
        """Same as the module-level :func:`wait_for` (convenience for tests)."""
        return wait_for(predicate, timeout_s, **kw)


# --------------------------------------------------------------------------- storescp


class StoreSCP(ManagedProcess):
    """dcmtk ``storescp`` as a receiving DICOM peer (accepts all transfer syntaxes).

    Runs ``/usr/bin/storescp --aetitle STORESCP -od DIR +xa PORT`` with
    ``TCP_NODELAY=1``. Received objects are written under :attr:`dir` with
    dcmtk's default names (``<modality prefix>.<SOP Instance UID>``, e.g.
    ``CT.1.2.3...``). storescp writes the file before it sends the C-STORE
    response, so after a synchronous send the file is complete.

    Attributes
    ----------
    aet : str
        ``"STORESCP"``.
    host : str
        ``"127.0.0.1"`` (the address peers should use).
    port : int
        The DICOM port.
    dir : pathlib.Path
        Where received files land.
    """

    name = "storescp"

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "STORESCP",
        extra_args: Iterable[str] = (),
        startup_timeout_s: float = 15.0,
    ) -> None:
        super().__init__(workdir, startup_timeout_s=startup_timeout_s)
        self.aet = aet
        self.host = LOOPBACK
        self.port = 0
        self.dir = self.workdir / "received"
        self.dir.mkdir(exist_ok=True)
        self.extra_args = list(extra_args)

    def _pick_ports(self) -> None:
        self.port = free_port()

    def _env(self) -> dict[str, str]:
        return dcmtk_env()

    def _command(self) -> list[str]:
        return [
            STORESCP, "--verbose", "--aetitle", self.aet, "-od", str(self.dir), "+xa",
            *self.extra_args, str(self.port),
        ]  # fmt: skip

    def _is_ready(self) -> bool:
        return process_listens_on(self.proc.pid, self.port)

    def files(self) -> list[Path]:
        """Received files, sorted by name (hidden/temporary files excluded)."""
        return sorted(p for p in self.dir.iterdir() if p.is_file() and not p.name.startswith("."))

    def wait_for_files(self, count: int, timeout_s: float = 30.0) -> list[Path]:
        """Wait until at least ``count`` files have arrived; return :meth:`files`."""
        try:
            wait_for(lambda: len(self.files()) >= count, timeout_s, what=f"{count} file(s)")
        except TimeoutError as exc:
            raise self.error(f"{exc}; have {len(self.files())}") from None
        return self.files()


# --------------------------------------------------------------------------- one-shot tools


def run_tool(
    args: list[str], *, timeout_s: float = 60.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a one-shot tool (full path in ``args[0]``) with the dcmtk environment.

    Output is captured as text. With ``check`` a non-zero status raises
    :class:`ServiceError` including the command's stdout and stderr. A missing
    tool fails the test (:func:`require_tool`).
    """
    require_tool(args[0])
    proc = subprocess.run(
        args,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout_s,
        env=dcmtk_env(),
    )
    if check and proc.returncode != 0:
        raise ServiceError(
            f"{' '.join(args)} exited with {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc


def echoscu(host: str, port: int, called_aet: str, *, calling_aet: str = "ECHOSCU") -> None:
    """C-ECHO with dcmtk ``echoscu``; raises :class:`ServiceError` on failure."""
    run_tool([ECHOSCU, "-aet", calling_aet, "-aec", called_aet, host, str(port)])


def storescu(
    host: str,
    port: int,
    called_aet: str,
    paths: Iterable[str | os.PathLike[str]],
    *,
    calling_aet: str = "STORESCU",
    extra_args: Iterable[str] = (),
    timeout_s: float = 120.0,
) -> None:
    """C-STORE files with dcmtk ``storescu``; raises :class:`ServiceError` on failure.

    ``storescu`` proposes the files' own transfer syntaxes; pass e.g.
    ``extra_args=["+sd", "+r"]`` to send whole directories.
    """
    run_tool(
        [STORESCU, "-aet", calling_aet, "-aec", called_aet, *extra_args, host, str(port),
         *(str(p) for p in paths)],
        timeout_s=timeout_s,
    )  # fmt: skip


def dciodvfy(path: str | os.PathLike[str], *, timeout_s: float = 60.0) -> tuple[list[str], list[str]]:
    """Validate a DICOM file with dicom3tools ``dciodvfy``.

    Returns
    -------
    (errors, warnings) : tuple of list of str
        The output lines starting with ``"Error"`` and ``"Warning"``
        respectively (stdout and stderr both searched), stripped.
        ``dciodvfy``'s exit status is not used: it is not a reliable verdict.
    """
    proc = run_tool([DCIODVFY, str(path)], timeout_s=timeout_s, check=False)
    lines = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).splitlines()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    return errors, warnings
