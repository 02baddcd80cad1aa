"""The job store: one SQLite database recording what the node received, analysed and delivered.

``serve`` writes instance arrivals, study completion and enqueueing; the
worker processes write each job's start, stage times, outcome and delivery
attempts. The store records, it does not queue: Celery and its broker still
carry the jobs. One file (``Settings.jobstore_path``, by default
``jobs.sqlite3`` beside the spool) in WAL mode (readers never block the one
writer; writers wait up to ``BUSY_TIMEOUT_S`` for each other), so ``serve``
and several worker processes on one host may write at once. Each thread of
each process uses its own connection. A process never forks while one of its
threads is inside SQLite (:data:`_SQLITE_IN_USE`): a child forked then
inherits SQLite's in-process lock records of the file and finds the database
locked for as long as it lives (the embedded worker forks a child per
analysis while ``serve``'s threads record arrivals).

Tables (times are POSIX seconds, UTC):

* ``studies``: one row per Study Instance UID: first and last arrival, number
  of instances, ``open`` (1 while instances may still arrive; the index the
  series-completion watcher polls instead of scanning the spool), patient ID,
  accession number and study date (read at completion; shown after login only);
* ``series``: instances and last arrival per Series Instance UID;
* ``jobs``: one row per enqueued analysis (study and candidate fingerprint):
  state ``queued``/``analysing``/``ok``/``not_evaluable``/``failed``, the
  payload (for the sweeper's requeue), runs, owning worker, series used,
  bone-status category and reason;
* ``stages``: seconds per pipeline stage of a job;
* ``deliveries``: the current state of each study x destination
  (``pending``/``delivered``/``failed``), attempts, next attempt time;
* ``events``: the timeline of a study, one row per event;
* ``heartbeats``: the last sign of life of each worker process and of the
  completion watcher;
* ``actions``: console logins and actions (who, what, outcome).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Seconds a writer waits for another process's write transaction before giving up.
BUSY_TIMEOUT_S = 30.0
#: Held by a thread while it uses SQLite, and across ``fork()``: SQLite's own lock state must not be copied
#: into a child mid-transaction ("do not carry an open database across a fork", sqlite.org/howtocorrupt.html).
_SQLITE_IN_USE = threading.RLock()


def _fresh_lock_in_child() -> None:
    global _SQLITE_IN_USE
    _SQLITE_IN_USE = threading.RLock()


os.register_at_fork(before=lambda: _SQLITE_IN_USE.acquire(), after_in_parent=lambda: _SQLITE_IN_USE.release(),
                    after_in_child=_fresh_lock_in_child)
#: Job states, in order. ``ok``, ``not_evaluable`` and ``failed`` are final.
JOB_STATES = ("queued", "analysing", "ok", "not_evaluable", "failed")
FINAL_JOB_STATES = ("ok", "not_evaluable", "failed")
DELIVERY_STATES = ("pending", "delivered", "failed")
#: SQL for the state of a job just queued: ``queued``, unless a worker started it after the message was sent
#: (the parameter: the time just before the enqueue): then it keeps the worker's state, ``analysing`` or, when
#: the worker also finished before this record was written, its final state (a 10-sender load test once
#: left a delivered study's job ``queued`` for good).
_UNLESS_STARTED = "CASE WHEN jobs.state <> 'queued' AND jobs.started >= ? THEN jobs.state ELSE 'queued' END"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    first_arrival REAL NOT NULL,
    last_arrival REAL NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    open INTEGER NOT NULL DEFAULT 1,
    patient_id TEXT, accession TEXT, study_date TEXT,
    deleted REAL
);
CREATE INDEX IF NOT EXISTS studies_open ON studies (last_arrival) WHERE open = 1;
CREATE INDEX IF NOT EXISTS studies_last ON studies (last_arrival);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    last_arrival REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_study ON series (study_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL, finished REAL,
    runs INTEGER NOT NULL DEFAULT 0,
    requeues INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    series_uid TEXT, category TEXT, reason TEXT,
    UNIQUE (study_uid, fingerprint)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, updated);
CREATE TABLE IF NOT EXISTS stages (
    job_id INTEGER NOT NULL, stage TEXT NOT NULL, seconds REAL NOT NULL,
    PRIMARY KEY (job_id, stage)
);
CREATE TABLE IF NOT EXISTS deliveries (
    study_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    entry TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '',
    files TEXT,
    next_at REAL,
    requeues INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    PRIMARY KEY (study_uid, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries (state, next_at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    study_uid TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_study ON events (study_uid, at);
CREATE TABLE IF NOT EXISTS heartbeats (
    name TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    user TEXT NOT NULL,
    client TEXT NOT NULL DEFAULT '',
    action TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL
);
"""


def worker_name() -> str:
    """``host:pid`` of this process: the owner recorded on the jobs it runs and its heartbeat row."""
    return f"{socket.gethostname()}:{os.getpid()}"


class JobStore:
    """The node's job store (see the module docstring); safe to share between threads.

    Parameters
    ----------
    path : pathlib.Path
        The SQLite file; created with its schema when missing.

    Attributes
    ----------
    created : bool
        True when this instance created the database file (the caller then
        rebuilds the open-study index from the spool).

    Raises
    ------
    sqlite3.Error
        If the file cannot be opened or is not a database.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with _SQLITE_IN_USE:
            self._connection().executescript(_SCHEMA)  # idempotent (IF NOT EXISTS); commits by itself

    # -- connections -------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():  # never share across fork
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: takes the write lock at once, no upgrade deadlock)."""
        with _SQLITE_IN_USE:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _rows(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        with _SQLITE_IN_USE:
            return [dict(row) for row in self._connection().execute(sql, params)]

    @staticmethod
    def _event(db: sqlite3.Connection, study_uid: str, kind: str, detail: str = "", at: float | None = None) -> None:
        db.execute("INSERT INTO events (at, study_uid, kind, detail) VALUES (?, ?, ?, ?)",
                   (time.time() if at is None else at, study_uid, kind, detail))

    # -- serve: arrivals and completion --------------------------------------------------------------

    def record_arrival(self, study_uid: str, series_uid: str, at: float | None = None) -> None:
        """One instance of ``series_uid`` is on disk: (re)open its study and count it."""
        at = time.time() if at is None else at
        with self._write() as db:
            new_study = db.execute(
                "INSERT INTO studies (study_uid, first_arrival, last_arrival, instances) VALUES (?, ?, ?, 1) "
                "ON CONFLICT (study_uid) DO UPDATE SET last_arrival = excluded.last_arrival, "
                "instances = instances + 1, deleted = NULL, open = 1 RETURNING instances",
                (study_uid, at, at)).fetchone()[0] == 1
            new_series = db.execute(
                "INSERT INTO series (series_uid, study_uid, instances, last_arrival) VALUES (?, ?, 1, ?) "
                "ON CONFLICT (series_uid) DO UPDATE SET last_arrival = excluded.last_arrival, "
                "instances = instances + 1 RETURNING instances", (series_uid, study_uid, at)).fetchone()[0] == 1
            if new_study:
                self._event(db, study_uid, "received", "first instance", at)
            if new_series:
                self._event(db, study_uid, "series", "first instance of a series", at)

    def rebuild_open_index(self, spool: Path) -> int:
        """Open a row for every study folder of ``spool`` (arrival times from folder mtimes); return the count.

        Called once when the database is new (first start, or the file was
        lost): the watcher then checks each study once and closes those whose
        ``.jobs`` marker says they were handled.
        """
        count = 0
        with self._write() as db:
            for study in (p for p in spool.iterdir() if p.is_dir() and not p.name.startswith(".")):
                series = [s for s in study.iterdir() if s.is_dir()]
                last = max([study.stat().st_mtime, *(s.stat().st_mtime for s in series)])
                db.execute("INSERT OR IGNORE INTO studies (study_uid, first_arrival, last_arrival, instances) "
                           "VALUES (?, ?, ?, ?)",
                           (study.name, last, last, sum(len(list(s.glob("*.dcm"))) for s in series)))
                count += 1
        return count

    def quiet_open_studies(self, arrived_before: float) -> list[str]:
        """Open studies whose last instance arrived before ``arrived_before`` (indexed; cost independent of
        the number of finished studies)."""
        return [r["study_uid"] for r in self._rows(
            "SELECT study_uid FROM studies WHERE open = 1 AND last_arrival <= ? ORDER BY last_arrival",
            (arrived_before,))]

    def close_study(self, study_uid: str, arrived_before: float, identifiers: dict[str, str] | None = None) -> None:
        """Mark a study complete unless an instance arrived after ``arrived_before`` (it stays open then)."""
        ids = identifiers or {}
        with self._write() as db:
            closed = db.execute(
                "UPDATE studies SET open = 0, patient_id = coalesce(?, patient_id), "
                "accession = coalesce(?, accession), study_date = coalesce(?, study_date) "
                "WHERE study_uid = ? AND open = 1 AND last_arrival <= ?",
                (ids.get("patient_id"), ids.get("accession"), ids.get("study_date"), study_uid,
                 arrived_before)).rowcount
            if closed:
                self._event(db, study_uid, "complete", "quiet period elapsed")

    def job_queued(self, study_uid: str, fingerprint: str, payload: dict, enqueued_at: float) -> int:
        """Record an enqueued job (a re-enqueued identical job is the same row, queued again); return its id.

        ``enqueued_at`` is the time just before the message went to the broker: a worker that
        started the job since then (it may be quicker than this record) keeps its ``analysing``, or
        the final state it has already recorded.
        """
        now = time.time()
        with self._write() as db:
            job_id = db.execute(
                "INSERT INTO jobs (study_uid, fingerprint, payload, state, created, updated) "
                "VALUES (?, ?, ?, 'queued', ?, ?) ON CONFLICT (study_uid, fingerprint) DO UPDATE SET "
                f"state = {_UNLESS_STARTED}, updated = excluded.updated, payload = excluded.payload RETURNING id",
                (study_uid, fingerprint, json.dumps(payload), now, now, enqueued_at)).fetchone()[0]
            self._event(db, study_uid, "queued", f"job {job_id}", enqueued_at)
        return job_id

    # -- workers: jobs, stages, deliveries -----------------------------------------------------------

    def job_started(self, study_uid: str, fingerprint: str, payload: dict, worker: str | None = None) -> int:
        """A worker starts the job (created if ``serve`` could not record it); return its id."""
        now = time.time()
        with self._write() as db:
            job_id = db.execute(
                "INSERT INTO jobs (study_uid, fingerprint, payload, state, created, updated, started, runs, "
                "worker) VALUES (?, ?, ?, 'analysing', ?, ?, ?, 1, ?) ON CONFLICT (study_uid, fingerprint) DO "
                "UPDATE SET state = 'analysing', updated = excluded.updated, started = excluded.started, "
                "finished = NULL, runs = runs + 1, worker = excluded.worker RETURNING id",
                (study_uid, fingerprint, json.dumps(payload), now, now, now, worker or worker_name())).fetchone()[0]
            db.execute("INSERT OR IGNORE INTO studies (study_uid, first_arrival, last_arrival, open) "
                       "VALUES (?, ?, ?, 0)", (study_uid, now, now))  # serve could not record it
            self._event(db, study_uid, "analysing", f"job {job_id} on {worker or worker_name()}", now)
        return job_id

    def job_finished(self, job_id: int, state: str, *, category: str | None = None, reason: str | None = None,
                     series_uid: str | None = None, timings_s: dict[str, float] | None = None) -> None:
        """Record the outcome of a job (``ok``, ``not_evaluable`` or ``failed``) and its stage times."""
        if state not in FINAL_JOB_STATES:
            raise ValueError(f"not a final job state: {state!r}")
        now = time.time()
        with self._write() as db:
            row = db.execute(
                "UPDATE jobs SET state = ?, updated = ?, finished = ?, category = ?, reason = ?, "
                "series_uid = coalesce(?, series_uid) WHERE id = ? RETURNING study_uid",
                (state, now, now, category, reason, series_uid, job_id)).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id}")
            db.executemany("INSERT OR REPLACE INTO stages (job_id, stage, seconds) VALUES (?, ?, ?)",
                           [(job_id, stage, s) for stage, s in (timings_s or {}).items()])
            self._event(db, row["study_uid"], state, reason or category or "", now)

    def record_delivery(self, study_uid: str, entry: Path, destination: str, state: str, attempts: int,
                        detail: str = "", *, files: list[str] | None = None, next_at: float | None = None) -> None:
        """The current delivery state of a study's outputs to ``destination`` (one row; one event per change)."""
        if state not in DELIVERY_STATES:
            raise ValueError(f"not a delivery state: {state!r}")
        now = time.time()
        failed_attempt = int(state == "failed" or (state == "pending" and attempts > 0 and bool(detail)))
        with self._write() as db:
            db.execute(
                "INSERT INTO deliveries (study_uid, destination, entry, state, attempts, failures, detail, files, "
                "next_at, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (study_uid, destination) DO "
                "UPDATE SET entry = excluded.entry, state = excluded.state, attempts = excluded.attempts, "
                "failures = failures + excluded.failures, detail = excluded.detail, "
                "files = coalesce(excluded.files, files), next_at = excluded.next_at, updated = excluded.updated",
                (study_uid, destination, str(entry), state, attempts, failed_attempt, detail,
                 json.dumps(files) if files is not None else None, next_at, now))
            self._event(db, study_uid, f"delivery {state}",
                        f"{destination}, attempt {attempts}" + (f": {detail}" if detail else ""), now)

    def beat(self, name: str | None = None) -> None:
        """Heartbeat of this process (worker) or of a named thread (``completion-watcher``)."""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO heartbeats (name, host, pid, at) VALUES (?, ?, ?, ?)",
                       (name or worker_name(), socket.gethostname(), os.getpid(), time.time()))

    def record_action(self, user: str, action: str, target: str, outcome: str, client: str = "") -> None:
        """One console login or action (the audit trail is fed from here)."""
        with self._write() as db:
            db.execute("INSERT INTO actions (at, user, client, action, target, outcome) VALUES (?, ?, ?, ?, ?, ?)",
                       (time.time(), user, client, action, target, outcome))
            if target and action != "login":
                self._event(db, target, f"action {action}", f"by {user}: {outcome}")

    # -- sweeper -------------------------------------------------------------------------------------

    def stale_jobs(self, heartbeat_before: float, started_before: float) -> list[dict[str, Any]]:
        """Jobs ``analysing`` whose worker's heartbeat is older than ``heartbeat_before`` (or missing), or that
        started before ``started_before`` (over the hard time limit)."""
        return self._rows(
            "SELECT j.* FROM jobs j LEFT JOIN heartbeats h ON h.name = j.worker WHERE j.state = 'analysing' "
            "AND (h.at IS NULL OR h.at < ? OR j.started < ?)", (heartbeat_before, started_before))

    def stranded_deliveries(self, due_before: float) -> list[dict[str, Any]]:
        """Deliveries ``pending`` whose next attempt was due before ``due_before`` and that nobody updated since."""
        return self._rows(
            "SELECT * FROM deliveries WHERE state = 'pending' AND coalesce(next_at, updated) < ? AND updated < ?",
            (due_before, due_before))

    def job_running(self, study_uid: str) -> bool:
        """True while a job of the study is queued or analysing (its deliveries are then not stranded)."""
        return bool(self._rows("SELECT 1 FROM jobs WHERE study_uid = ? AND state IN ('queued', 'analysing') "
                               "LIMIT 1", (study_uid,)))

    def job_requeued(self, job_id: int, detail: str, enqueued_at: float) -> None:
        """The sweeper queued a stale job again (at ``enqueued_at``, see :meth:`job_queued`)."""
        with self._write() as db:
            row = db.execute(f"UPDATE jobs SET state = {_UNLESS_STARTED}, updated = ?, requeues = requeues + 1 "
                             "WHERE id = ? RETURNING study_uid", (enqueued_at, time.time(), job_id)).fetchone()
            self._event(db, row["study_uid"], "requeued", detail, enqueued_at)

    def delivery_requeued(self, study_uid: str, destination: str, next_at: float) -> None:
        """The sweeper queued a stranded delivery again."""
        with self._write() as db:
            db.execute("UPDATE deliveries SET requeues = requeues + 1, next_at = ?, updated = ? "
                       "WHERE study_uid = ? AND destination = ?", (next_at, time.time(), study_uid, destination))
            self._event(db, study_uid, "delivery requeued", destination)

    # -- reading -------------------------------------------------------------------------------------

    def heartbeats(self) -> dict[str, float]:
        """Last heartbeat time by name."""
        return {r["name"]: r["at"] for r in self._rows("SELECT name, at FROM heartbeats")}

    def counts_since(self, since: float) -> dict[str, int]:
        """Studies received, and jobs by state, updated since ``since``; deliveries by state."""
        counts = {"received": self._rows("SELECT count(*) AS n FROM studies WHERE first_arrival >= ?",
                                         (since,))[0]["n"],
                  "receiving": self._rows("SELECT count(*) AS n FROM studies WHERE open = 1")[0]["n"]}
        for r in self._rows("SELECT state, count(*) AS n FROM jobs WHERE updated >= ? GROUP BY state", (since,)):
            counts[r["state"]] = r["n"]
        for r in self._rows("SELECT state, count(*) AS n FROM deliveries WHERE updated >= ? GROUP BY state",
                            (since,)):
            counts[f"delivery_{r['state']}"] = r["n"]
        return counts

    def jobs_by_state(self) -> dict[str, int]:
        """Number of jobs in each state (all time)."""
        counts = dict.fromkeys(JOB_STATES, 0)
        counts.update({r["state"]: r["n"] for r in self._rows("SELECT state, count(*) AS n FROM jobs GROUP BY state")})
        return counts

    def stage_seconds(self) -> list[tuple[str, float]]:
        """Every recorded (stage, seconds) of finished jobs."""
        return [(r["stage"], r["seconds"]) for r in self._rows("SELECT stage, seconds FROM stages")]

    def completed_counts(self) -> dict[str, int]:
        """Instances received (all studies), studies complete (closed at least once) and their series."""
        row = self._rows("SELECT count(*) AS studies, coalesce(sum(n), 0) AS series FROM (SELECT (SELECT count(*) "
                         "FROM series WHERE series.study_uid = studies.study_uid) AS n FROM studies WHERE EXISTS "
                         "(SELECT 1 FROM events WHERE events.study_uid = studies.study_uid AND kind = 'complete'))")
        instances = self._rows("SELECT coalesce(sum(instances), 0) AS n FROM studies")[0]["n"]
        return {"studies": row[0]["studies"], "series": row[0]["series"], "instances": instances}

    def stage_histograms(self, bounds: tuple[float, ...]) -> dict[str, tuple[list[tuple[float, int]], float]]:
        """Per stage: cumulative counts at each bound (plus +Inf) and the sum of seconds (Prometheus histogram)."""
        columns = ", ".join(f"sum(seconds <= {float(b)!r}) AS b{i}" for i, b in enumerate(bounds))
        out = {}
        for row in self._rows(f"SELECT stage, count(*) AS n, sum(seconds) AS total, {columns} FROM stages "
                              "GROUP BY stage"):
            buckets = [(b, row[f"b{i}"]) for i, b in enumerate(bounds)] + [(float("inf"), row["n"])]
            out[row["stage"]] = (buckets, row["total"])
        return out

    def delivery_totals(self) -> list[dict[str, Any]]:
        """Attempts and failed attempts per destination (all studies)."""
        return self._rows("SELECT destination, sum(attempts) AS attempts, sum(failures) AS failures "
                          "FROM deliveries GROUP BY destination")

    def studies(self, *, accession: str | None = None, patient_id: str | None = None,
                date: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest studies first with their latest job and delivery states; filters match exactly
        (``date``: YYYYMMDD Study Date)."""
        where, params = ["deleted IS NULL"], []
        for column, value in (("accession", accession), ("patient_id", patient_id), ("study_date", date)):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        rows = self._rows(f"SELECT * FROM studies WHERE {' AND '.join(where)} ORDER BY last_arrival DESC LIMIT ?",
                          (*params, limit))
        for row in rows:
            self._add_latest(row)
        return rows

    def _add_latest(self, row: dict[str, Any]) -> None:
        jobs = self._rows("SELECT id, state, category, reason, series_uid, updated FROM jobs WHERE study_uid = ? "
                          "ORDER BY updated DESC LIMIT 1", (row["study_uid"],))
        row["job"] = jobs[0] if jobs else None
        row["deliveries"] = {r["destination"]: r["state"] for r in self._rows(
            "SELECT destination, state FROM deliveries WHERE study_uid = ?", (row["study_uid"],))}
        row["status"] = ("receiving" if row["open"] else jobs[0]["state"] if jobs else "complete")

    def study(self, study_uid: str) -> dict[str, Any] | None:
        """One study: its row, series, jobs with stage times, deliveries and timeline; None if unknown."""
        rows = self._rows("SELECT * FROM studies WHERE study_uid = ?", (study_uid,))
        if not rows:
            return None
        study = rows[0]
        self._add_latest(study)
        study["series"] = self._rows("SELECT * FROM series WHERE study_uid = ? ORDER BY last_arrival", (study_uid,))
        study["jobs"] = self._rows("SELECT id, fingerprint, state, created, started, finished, runs, requeues, worker, "
                                   "series_uid, category, reason FROM jobs WHERE study_uid = ? ORDER BY created",
                                   (study_uid,))
        for job in study["jobs"]:
            job["stages"] = {r["stage"]: r["seconds"] for r in self._rows(
                "SELECT stage, seconds FROM stages WHERE job_id = ?", (job["id"],))}
        study["delivery_rows"] = self._rows("SELECT destination, entry, state, attempts, detail, updated FROM "
                                            "deliveries WHERE study_uid = ?", (study_uid,))
        study["events"] = self._rows("SELECT at, kind, detail FROM events WHERE study_uid = ? ORDER BY at, id",
                                     (study_uid,))
        return study

    def latest_payload(self, study_uid: str) -> dict | None:
        """The payload of the study's newest job (for re-analysis), or None."""
        rows = self._rows("SELECT payload FROM jobs WHERE study_uid = ? ORDER BY created DESC LIMIT 1", (study_uid,))
        return json.loads(rows[0]["payload"]) if rows else None

    def mark_deleted(self, study_uid: str) -> None:
        """The study's spool and outbox data were deleted (the record stays, without the open flag)."""
        with self._write() as db:
            db.execute("UPDATE studies SET deleted = ?, open = 0 WHERE study_uid = ?", (time.time(), study_uid))
            self._event(db, study_uid, "deleted", "spool and outbox data removed")

    def actions(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest console logins and actions."""
        return self._rows("SELECT * FROM actions ORDER BY id DESC LIMIT ?", (limit,))


#: Seconds between two heartbeats of a worker process.
HEARTBEAT_INTERVAL_S = 10.0
_heartbeat_pids: set[int] = set()
_stores: dict[tuple[Path, int], JobStore] = {}


def open_store(path: Path) -> JobStore:
    """The process's :class:`JobStore` for ``path`` (one per file and process)."""
    key = (Path(path).resolve(), os.getpid())
    if key not in _stores:
        _stores[key] = JobStore(path)
    return _stores[key]


def start_heartbeat(store: JobStore, interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
    """Write this process's heartbeat now and every ``interval_s`` from a daemon thread (once per process)."""
    if os.getpid() in _heartbeat_pids:
        return
    _heartbeat_pids.add(os.getpid())

    def beat_forever() -> None:
        while True:
            try:
                store.beat()
            except sqlite3.Error as exc:  # a full disk must not kill the worker; the health check will say so
                log.error("worker heartbeat not written (%s)", type(exc).__name__)
            time.sleep(interval_s)

    threading.Thread(target=beat_forever, name="heartbeat", daemon=True).start()
