"""pytest fixtures that run real services on free loopback ports.

Fixtures (all function-scoped: every test gets fresh, empty services; each
starts in well under a second):

``redis_server`` -> :class:`services.RedisServer`
    ``.url`` (``redis://127.0.0.1:<port>/0``), ``.host``, ``.port``,
    ``.ping()``, ``.command(*args)``.
``orthanc`` -> :class:`services.OrthancServer`
    ``.http_url``, ``.dicom_port``, ``.aet``, ``.host`` and the REST helpers
    (``add_modality``, ``upload``, ``store_to_modality``, ``studies``,
    ``series_of_study``, ``instances_of_series``, ``find_study``,
    ``download_instance``, ``wait_for`` ...).
``storescp`` -> :class:`services.StoreSCP`
    ``.port``, ``.aet``, ``.host``, ``.dir``, ``.files()``, ``.wait_for_files(n)``.

Plain helpers (``free_port``, ``require_tool``, ``wait_for``, ``dciodvfy``,
``echoscu``, ``storescu``) live in ``services.py``; import them with
``from services import dciodvfy`` (pytest puts this directory on
``sys.path`` because it has no ``__init__.py``).

A missing tool FAILS the test (never skips): CI installs the Debian packages,
so a skip would only hide a broken install step.

When a test fails, the tail of each service's log it used is attached to the
report as an extra section ("orthanc log", "storescp log", ...). Every
process gets SIGTERM on teardown, pass or fail; the wait (and SIGKILL after
10 s) happens in a background thread so Orthanc's ~3.5 s graceful shutdown
does not slow each test, and the session end waits for all of them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from services import ManagedProcess, OrthancServer, RedisServer, StoreSCP, reap_stopping

_SERVICES_KEY = pytest.StashKey[list[ManagedProcess]]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """On a failed setup/call, attach the log tail of every service the test used."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for service in item.stash.get(_SERVICES_KEY, []):
            report.sections.append((f"{service.name} log ({service.log_path})", service.log_tail(80)))


def _run(request: pytest.FixtureRequest, service: ManagedProcess) -> Iterator[ManagedProcess]:
    """Start ``service``, register it for failure reports, yield it, always stop it."""
    request.node.stash.setdefault(_SERVICES_KEY, []).append(service)
    try:
        service.start()
        yield service
    finally:
        service.stop(background=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Wait for every service stopped during the session to have exited (or been killed)."""
    reap_stopping()


@pytest.fixture
def redis_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private ``redis-server`` on 127.0.0.1 (no persistence); yields :class:`RedisServer`."""
    yield from _run(request, RedisServer(tmp_path_factory.mktemp("redis")))


@pytest.fixture
def orthanc(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A private, empty Orthanc (AET ``ORTHANC``, no auth, no plugins); yields :class:`OrthancServer`."""
    yield from _run(request, OrthancServer(tmp_path_factory.mktemp("orthanc")))


@pytest.fixture
def storescp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    """A dcmtk ``storescp`` (AET ``STORESCP``, all transfer syntaxes); yields :class:`StoreSCP`.

    Extra storescp arguments by indirect parametrization, e.g. ``["+uf"]`` (unique file names: an object
    received twice is two files): ``@pytest.mark.parametrize("storescp", [["+uf"]], indirect=True)``.
    """
    yield from _run(request, StoreSCP(tmp_path_factory.mktemp("storescp"), extra_args=getattr(request, "param", ())))


@pytest.fixture
def start_node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``start_node(config, command, port=None)`` runs ``osteonode COMMAND --config CONFIG``.

    ``command`` is ``"serve"`` (ready when it listens on ``port``) or
    ``"worker"`` (ready when Celery logs "ready."). Every process is stopped on
    teardown; its log tail is attached to a failed test's report.
    """
    from node import NodeProcess

    started: list[NodeProcess] = []

    def start(config, command: str, port: int | None = None) -> NodeProcess:
        process = NodeProcess(tmp_path_factory.mktemp(command), config, command, port)
        request.node.stash.setdefault(_SERVICES_KEY, []).append(process)
        started.append(process)
        process.start()
        return process

    yield start
    for process in started:
        process.stop(timeout_s=30)
