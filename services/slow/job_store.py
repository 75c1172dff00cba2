"""Where long jobs live: one record per job and its numbered events, in a real store, never only in
a process's memory (long_jobs.py runs them, job_routes.py answers for them).

    store = SqliteStore(run_dir / "jobs" / "store.sqlite")
    job, created = store.create(NewJob(id=new_id(), task="report", client="10.0.0.7", ...))
    [job] = store.claim("runner-a.1f2e", ["report"])     # queued -> running            (event 2)
    store.progress(job.id, 3, 10, "step 3")             # running, 3 of 10             (event 3)
    store.finish(job.id, "succeeded", result=b"42")     # -> succeeded, expires later  (event 4, "end")
    store.events(job.id, after=2)                       # [event 3, event 4]: what a stream missed

The record is the single source of truth: it is committed before the client hears of the job (the
202), every change of state or progress is one transaction that also appends the job's next event
(its sequence number is the SSE `id:`), and a process only executes what the record says. Any slow
instance of the host answers for any of its jobs: they share the file.

States, and who moves a job between them (a terminal state is final; nothing leaves it):

    queued ──start──► running ──finish──► succeeded | failed
       │                 │
       │              cancel ──► cancelling ──finish──► cancelled   (the owner kills the worker)
       └──cancel──► cancelled                                       (at once: it never ran)
    running ──reap──► failed (worker_lost, retryable)               (its runner went silent: killed)
    running ──reap──► queued (attempt + 1, no owner)                (the same, for a task declaring retries)
    cancelling ──reap──► cancelled                                  (a cancel made before a crash holds)

A queued job has no owner: any job runner (job_runner.py) claims it (`claim`, fairly: the client
with the fewest jobs running first, then the oldest job) and owns it while it runs. Every runner
beats (`beat`) every few seconds under an owner name of its own process: that is its jobs' lease.
Any of them reaps (`reap`): the running jobs of an owner silent for longer than a few beats end as
above, so no record says "running" with nothing running it (Celery's PENDING-forever, celery#4450),
and a job runs twice only if its runner was silent for the whole lease (then the attempt number
fences off the silent run's writes).

`cancel` is best effort and leaves the record (AIP-151); it is idempotent. Finished records expire
`ttl` seconds after they end: the sweep then drops their result and events and keeps a tombstone
(state "expired", answered 410) for as long again, then nothing (404). The store is bounded: past
`max_records` the oldest finished records expire early, and the oldest tombstones go.

SQLite, embedded (nothing to install): WAL, so readers never wait for the writer; every write is
one `BEGIN IMMEDIATE` transaction, so writers from several processes (the host's slow instances)
queue on the file lock, bounded by `busy_timeout`; `synchronous=NORMAL`, with which a committed
transaction survives a process crash (kill -9), though not a power loss. The calls block: the event
loop makes them through AsyncStore, on one thread of its own. The interface is the Store protocol,
so a server store (Redis, across hosts) can follow.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from services.common import metrics

QUEUED, RUNNING, CANCELLING = "queued", "running", "cancelling"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
EXPIRED = "expired"  # a tombstone: the record ended and its TTL passed (410)
ACTIVE = (QUEUED, RUNNING, CANCELLING)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)

# How long a writer waits for another process's transaction before giving up (sqlite3.OperationalError):
# each of ours lasts well under a millisecond, so this is only ever reached by a stuck process.
BUSY_TIMEOUT_SECONDS = 5.0
# Records one sweep call expires (and tombstones it removes) at most, in one transaction. Freeing a
# record's result writes its pages again (Debian's SQLite zeroes freed pages: SECURE_DELETE), into the
# WAL: one transaction for 10,000 results of 100 kB held the file's write lock and the instance's store
# thread for over 5 s and left a 1 GB WAL behind (bench/jobs.py). 100 of them take tens of milliseconds.
SWEEP_BATCH = 100
# The WAL file is cut back to this after a checkpoint: without it, it keeps the size of the largest
# transaction it ever held, beside the database.
WAL_SIZE_LIMIT = 32 << 20

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    client TEXT NOT NULL,              -- whose active-job share it counts against (admission.client_key)
    owner TEXT NOT NULL,               -- the runner process that runs it ('' while queued)
    state TEXT NOT NULL,
    seq INTEGER NOT NULL,              -- the sequence number of its last event
    args TEXT NOT NULL,                -- JSON: the arguments echoed in its answer (task.echo), never secrets
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    expires REAL,                      -- when a finished record expires; a tombstone's, when it goes
    done REAL, total REAL, message TEXT,
    result BLOB,                       -- the task's result, JSON (succeeded), unless it is kept as a file
    result_bytes INTEGER,              -- its size
    result_file INTEGER NOT NULL DEFAULT 0,  -- 1: kept as results/<id>.json beside the store, the edge serves it
    error TEXT,                        -- JSON: {"error": code, "message": ..., ...} (failed, cancelled)
    idempotency_key TEXT,
    fingerprint TEXT,                  -- of the submitting request: the same key with another request is refused
    kwargs TEXT,                       -- JSON: the task's arguments, for its runner; NULL once it ended
    retries INTEGER NOT NULL DEFAULT 0,  -- times it may be queued again after its runner is lost
    attempt INTEGER NOT NULL DEFAULT 1,
    key TEXT                           -- coalesce.job_key of a task that coalesces: identical jobs share a run
);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs (client) WHERE state IN ('queued', 'running', 'cancelling');
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (created) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires) WHERE expires IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (client, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS owners (
    owner TEXT PRIMARY KEY,            -- a job runner's process (its name and a token per start)
    beat REAL NOT NULL                 -- when it last said it was alive
);
CREATE TABLE IF NOT EXISTS events (
    position INTEGER PRIMARY KEY AUTOINCREMENT,  -- across jobs, never reused: what a watcher has seen
    job TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,                -- "state", "progress" or "end"
    data TEXT NOT NULL,                -- JSON
    UNIQUE (job, seq)
);
CREATE TABLE IF NOT EXISTS tallies (
    name TEXT PRIMARY KEY,             -- "started", "ended/<state>/<error code>": the metrics' counters
    count INTEGER NOT NULL             -- since the store was made, whoever started or ended the jobs
);
"""


class ActiveLimit(Exception):
    """A job was not created: its client ("client") or the host ("all") has `count` active jobs,
    its limit."""

    def __init__(self, whose: str, count: int):
        super().__init__(whose, count)
        self.whose, self.count = whose, count


class StoreUnavailable(Exception):
    """The store did not answer in time, or cannot take a write now (a server store down, cut off
    or full): the routes answer 503 store_unavailable at once, never hang (job_store_redis.py)."""


def new_id() -> str:
    """A job id: 128 random bits, URL-safe (22 characters)."""
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class NewJob:
    id: str
    task: str
    client: str
    args: dict = field(default_factory=dict)
    idempotency_key: str | None = None
    fingerprint: str | None = None
    kwargs: dict | None = None  # the task's arguments, for the runner that claims it; dropped at its end
    retries: int = 0
    key: str | None = None  # its task and arguments (coalesce.job_key), for a task that declares coalesce=True


@dataclass(frozen=True)
class Job:
    id: str
    task: str
    client: str
    owner: str
    state: str
    seq: int
    args: dict
    created: float
    started: float | None
    finished: float | None
    expires: float | None
    done: float | None
    total: float | None
    message: str | None
    result: bytes | None
    result_bytes: int | None
    result_file: int
    error: dict | None
    idempotency_key: str | None
    fingerprint: str | None
    kwargs: dict | None
    retries: int
    attempt: int
    key: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class Event:
    seq: int
    kind: str
    data: dict


class Store(Protocol):
    """What the slow app needs of a job store (SqliteStore; a server store later). Every method is
    one transaction; a transition that the record's state does not allow changes nothing and
    returns None (or the record as it is, for cancel)."""

    def create(self, job: NewJob, max_per_client: int | None = None,
               max_active: int | None = None) -> tuple[Job, bool]: ...
    def get(self, job_id: str) -> Job | None: ...
    def find(self, client: str, idempotency_key: str) -> Job | None: ...
    def claim(self, owner: str, tasks: list[str], limit: int = 1) -> list[Job]: ...
    def join(self, owner: str, key: str, limit: int) -> list[Job]: ...
    def count_running(self, owner_prefix: str) -> int: ...
    def start(self, job_id: str, owner: str) -> Job | None: ...
    def progress(self, job_id: str, done: float, total: float | None, message: str,
                 attempt: int | None = None) -> int | None: ...
    def finish(self, job_id: str, state: str, result: bytes | None = None, error: dict | None = None,
               attempt: int | None = None) -> Job | None: ...
    def cancel(self, job_id: str) -> Job | None: ...
    def events(self, job_id: str, after: int = 0) -> list[Event]: ...
    def changes(self, after: int) -> tuple[int, dict[str, int]]: ...
    def last_position(self) -> int: ...
    def result(self, job_id: str) -> bytes | None: ...
    def count_active(self, client: str | None = None) -> int: ...
    def count_by_state(self) -> dict[str, int]: ...  # every record, by state (tombstones as "expired")
    def tallies(self) -> dict[str, int]: ...  # jobs started, and ended by state and error, ever
    def sweep(self, limit: int = SWEEP_BATCH) -> dict[str, int]: ...
    def beat(self, owner: str) -> None: ...
    def gone(self, owner: str) -> None: ...
    def reap(self, lost_after: float) -> list[Job]: ...


class SqliteStore:
    """The embedded store: one SQLite file per host in the run dir, shared by its slow instances."""

    def __init__(self, path: Path | str, ttl: float = 3600, max_records: int = 100_000,
                 busy_timeout: float = BUSY_TIMEOUT_SECONDS, clock=time.time, inline_result_bytes: int = 1 << 62):
        self.path = Path(path)
        # Results larger than this are kept as files beside the store, which the edge sends itself
        # (sendfile): a status document or a stream's end stays small, and the store too.
        self.inline_result_bytes = inline_result_bytes
        self.results = self.path.parent / "results"
        self.results.mkdir(exist_ok=True)
        self.ttl = ttl  # seconds a finished record is kept, and a tombstone after it
        self.max_records = max_records
        self.clock = clock
        # isolation_level=None: no implicit transactions; each write says BEGIN IMMEDIATE itself, so
        # it takes the file's write lock at its start (waiting up to busy_timeout), never half-way.
        self.db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # survives a process crash; FULL for power loss
        self.db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        # Idempotent statements: instances starting together all succeed, one after the other.
        self.db.executescript(SCHEMA)
        self._add_columns()

    def _add_columns(self) -> None:
        """Columns a store made by an earlier version lacks (CREATE TABLE IF NOT EXISTS keeps its old
        table): added, empty."""
        with self._write():
            have = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
            for name, declaration in (("result_bytes", "INTEGER"), ("result_file", "INTEGER NOT NULL DEFAULT 0"),
                                      ("kwargs", "TEXT"), ("retries", "INTEGER NOT NULL DEFAULT 0"),
                                      ("attempt", "INTEGER NOT NULL DEFAULT 1"), ("key", "TEXT")):
                if name not in have:
                    self.db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
            # after its column: a claim looks for running jobs of a key, a join for queued ones
            self.db.execute("CREATE INDEX IF NOT EXISTS jobs_keys ON jobs (key) WHERE key IS NOT NULL AND"
                            " state IN ('queued', 'running', 'cancelling')")

    def result_path(self, job_id: str) -> Path:
        return self.results / f"{job_id}.json"

    def close(self) -> None:
        self.db.close()

    def result(self, job_id: str) -> bytes | None:
        """The succeeded job's result, inline or from its file; None if it has none (any more)."""
        row = self.db.execute("SELECT result, result_file FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or not row["result_file"]:
            return None if row is None else row["result"]
        try:
            return self.result_path(job_id).read_bytes()
        except FileNotFoundError:
            return None

    # transactions

    def _write(self) -> "_Transaction":
        return _Transaction(self.db)

    def _append(self, job_id: str, seq: int, kind: str, data: dict) -> None:
        self.db.execute("INSERT INTO events (job, seq, kind, data) VALUES (?, ?, ?, ?)",
                        (job_id, seq, kind, json.dumps(data)))

    def _change(self, row: sqlite3.Row, kind: str, data: dict, **columns: Any) -> int:
        """One change of a job (inside a transaction): its `columns`, and its next event, numbered."""
        seq = row["seq"] + 1
        assignments = ", ".join(f"{name} = ?" for name in columns)  # names from this module only
        self.db.execute(f"UPDATE jobs SET seq = ?, {assignments} WHERE id = ?", (seq, *columns.values(), row["id"]))
        self._append(row["id"], seq, kind, data)
        return seq

    def _tally(self, name: str) -> None:
        self.db.execute("INSERT INTO tallies (name, count) VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET"
                        " count = count + 1", (name,))

    def _run_on(self, row: sqlite3.Row, owner: str, now: float) -> None:
        """A queued job, now running on `owner` (inside a transaction)."""
        self._change(row, "state", {"state": RUNNING}, state=RUNNING, owner=owner, started=now)
        self._tally("started")

    def _end(self, row: sqlite3.Row, state: str, error: dict | None, result: bytes | None = None,
             result_bytes: int | None = None, result_file: int = 0) -> None:
        """A job's last change: its terminal state, its result or error, when it expires; the end event."""
        now = self.clock()
        self._tally(f"ended/{state}/{'' if error is None else error.get('error', '')}")
        self._change(row, "end", {"state": state}, state=state, finished=now, expires=now + self.ttl, result=result,
                     result_bytes=result_bytes, result_file=result_file, kwargs=None,
                     error=None if error is None else json.dumps(error))

    def _row(self, job_id: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()

    # the interface

    def create(self, job: NewJob, max_per_client: int | None = None, max_active: int | None = None) -> tuple[Job, bool]:
        """Commit a queued job (event 1); with an idempotency key the client already used, the
        existing record instead, and False. ActiveLimit if the client already has max_per_client
        active jobs, or the host max_active: counted in the same transaction, so instances
        submitting at once cannot pass a limit together."""
        now = self.clock()
        with self._write():
            if job.idempotency_key is not None and (known := self.find(job.client, job.idempotency_key)):
                return known, False
            if max_per_client is not None and (held := self.count_active(job.client)) >= max_per_client:
                raise ActiveLimit("client", held)
            if max_active is not None and (active := self.count_active()) >= max_active:
                raise ActiveLimit("all", active)
            self.db.execute(
                "INSERT INTO jobs (id, task, client, owner, state, seq, args, created, idempotency_key, fingerprint,"
                " kwargs, retries, key) VALUES (?, ?, ?, '', ?, 1, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.task, job.client, QUEUED, json.dumps(job.args), now, job.idempotency_key,
                 job.fingerprint, None if job.kwargs is None else json.dumps(job.kwargs), job.retries, job.key))
            self._append(job.id, 1, "state", {"state": QUEUED})
            return _job(self._row(job.id)), True

    def get(self, job_id: str) -> Job | None:
        row = self._row(job_id)
        return None if row is None else _job(row)

    def find(self, client: str, idempotency_key: str) -> Job | None:
        """The client's job submitted with this Idempotency-Key, if its record is still there."""
        row = self.db.execute("SELECT * FROM jobs WHERE client = ? AND idempotency_key = ?",
                              (client, idempotency_key)).fetchone()
        return None if row is None else _job(row)

    def claim(self, owner: str, tasks: list[str], limit: int = 1) -> list[Job]:
        """Up to `limit` queued jobs of these tasks, now running on `owner` (a job runner): the
        client with the fewest jobs running goes first, then the oldest job, so one client's long
        queue never starves another's job (as the admission line's shares do for requests). A job
        identical to one running (the same key) is left for that run to take (join)."""
        if not tasks or limit <= 0:
            return []
        marks = ", ".join("?" * len(tasks))
        now = self.clock()
        with self._write():
            rows = self.db.execute(
                f"SELECT q.* FROM jobs q WHERE q.state = 'queued' AND q.task IN ({marks}) AND (q.key IS NULL OR"
                " q.key NOT IN (SELECT key FROM jobs WHERE state IN ('running', 'cancelling') AND key IS NOT NULL))"
                " ORDER BY"
                " (SELECT COUNT(*) FROM jobs r WHERE r.client = q.client AND r.state IN ('running', 'cancelling')),"
                " q.created, q.rowid LIMIT ?", (*tasks, limit)).fetchall()
            for row in rows:
                self._run_on(row, owner, now)
            if rows:  # its lease starts now: a job process beats only once it is up
                self.db.execute("INSERT INTO owners (owner, beat) VALUES (?, ?) ON CONFLICT (owner) DO UPDATE SET"
                                " beat = excluded.beat", (owner, now))
            return [_job(self._row(row["id"])) for row in rows]

    def join(self, owner: str, key: str, limit: int) -> list[Job]:
        """The queued jobs identical to a run of `owner` (the same key), now running on it: they
        share its run and its outcome (compute-once for jobs)."""
        now = self.clock()
        with self._write():
            rows = self.db.execute("SELECT * FROM jobs WHERE state = 'queued' AND key = ? ORDER BY created, rowid"
                                   " LIMIT ?", (key, limit)).fetchall()
            for row in rows:
                self._run_on(row, owner, now)
            return [_job(self._row(row["id"])) for row in rows]

    def count_running(self, owner_prefix: str) -> int:
        """Jobs running (or being cancelled) under owners whose names start with `owner_prefix`:
        one host's job processes, whichever runner started them."""
        return self.db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('running', 'cancelling') AND"
                               " substr(owner, 1, ?) = ?", (len(owner_prefix), owner_prefix)).fetchone()[0]

    def start(self, job_id: str, owner: str) -> Job | None:
        """This queued job, now running on `owner`; None if it is no longer queued (claimed or
        cancelled meanwhile)."""
        with self._write():
            row = self._row(job_id)
            if row is None or row["state"] != QUEUED:
                return None
            self._run_on(row, owner, self.clock())
            return _job(self._row(job_id))

    def progress(self, job_id: str, done: float, total: float | None, message: str,
                 attempt: int | None = None) -> int | None:
        """Record a running job's progress; its event's sequence number, or None if it is not running
        (or, with `attempt`, if that is not the job's attempt: a dead run's late report is fenced off)."""
        with self._write():
            row = self._row(job_id)
            if row is None or row["state"] != RUNNING or (attempt is not None and row["attempt"] != attempt):
                return None
            return self._change(row, "progress", {"done": done, "total": total, "message": message},
                                done=done, total=total, message=message)

    def finish(self, job_id: str, state: str, result: bytes | None = None, error: dict | None = None,
               attempt: int | None = None) -> Job | None:
        """An active job ends: succeeded (with its result), failed or cancelled (with the error).
        A job being cancelled ends cancelled whatever it would have been (the client asked first);
        None if it had ended already, or, with `attempt`, if the job has moved on to another attempt
        (reaped and queued again while this run, taken for lost, was only slow: its end is not the
        job's)."""
        if state not in TERMINAL:
            raise ValueError(f"not a terminal state: {state}")
        size = None if result is None else len(result)
        in_file = size is not None and size > self.inline_result_bytes
        if in_file:  # written before the record says so; a file whose record never does is swept
            _write_file(self.result_path(job_id), result)
        with self._write():
            row = self._row(job_id)
            fenced = row is not None and attempt is not None and row["attempt"] != attempt
            if row is None or row["state"] not in ACTIVE or row["state"] == CANCELLING or fenced:
                if in_file:
                    self.result_path(job_id).unlink(missing_ok=True)
            if row is None or row["state"] not in ACTIVE or fenced:
                return None
            if row["state"] == CANCELLING:
                state, result, size, in_file = CANCELLED, None, None, False
                error = {"error": "cancelled", "message": "the job was cancelled while it ran; its worker was stopped"}
            self._end(row, state, error, None if in_file else result, size, int(in_file))
            return _job(self._row(job_id))

    def cancel(self, job_id: str) -> Job | None:
        """Ask for a job's end: a queued one is cancelled at once, a running one is marked
        cancelling (its owner stops it and finishes it cancelled); anything else is left as it is.
        The record as it now is, or None if there is none."""
        with self._write():
            row = self._row(job_id)
            if row is None:
                return None
            if row["state"] == QUEUED:
                self._end(row, CANCELLED, {"error": "cancelled", "message": "the job was cancelled before it ran"})
            elif row["state"] == RUNNING:
                self._change(row, "state", {"state": CANCELLING}, state=CANCELLING)
            return _job(self._row(job_id))

    def events(self, job_id: str, after: int = 0) -> list[Event]:
        """The job's events numbered above `after`, in order (what a stream reconnecting with
        Last-Event-ID missed)."""
        rows = self.db.execute("SELECT seq, kind, data FROM events WHERE job = ? AND seq > ? ORDER BY seq",
                               (job_id, after)).fetchall()
        return [Event(r["seq"], r["kind"], json.loads(r["data"])) for r in rows]

    def changes(self, after: int) -> tuple[int, dict[str, int]]:
        """Events appended since position `after`, by any process: (the last position, {job: its
        last seq}). One cheap query tells a watcher which streams to wake."""
        rows = self.db.execute("SELECT job, MAX(seq) AS seq, MAX(position) AS position FROM events"
                               " WHERE position > ? GROUP BY job", (after,)).fetchall()
        last = max((r["position"] for r in rows), default=after)
        return last, {r["job"]: r["seq"] for r in rows}

    def last_position(self) -> int:
        row = self.db.execute("SELECT MAX(position) FROM events").fetchone()
        return row[0] or 0

    def count_by_state(self) -> dict[str, int]:
        """Every record of the store, by state (tombstones as "expired")."""
        counts = dict.fromkeys((*ACTIVE, *TERMINAL, EXPIRED), 0)
        counts.update(self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return counts

    def tallies(self) -> dict[str, int]:
        """Jobs started and ended since the store was made: {"started": n, "ended/<state>/<error>": n}."""
        return dict(self.db.execute("SELECT name, count FROM tallies").fetchall())

    def count_active(self, client: str | None = None) -> int:
        """Jobs queued, running or being cancelled: the client's, or everyone's."""
        active = "state IN ('queued', 'running', 'cancelling')"
        if client is None:
            return self.db.execute(f"SELECT COUNT(*) FROM jobs WHERE {active}").fetchone()[0]
        return self.db.execute(f"SELECT COUNT(*) FROM jobs WHERE client = ? AND {active}", (client,)).fetchone()[0]

    def active_owned_by(self, owner: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT id FROM jobs WHERE owner = ? AND state IN ('queued', 'running', 'cancelling')", (owner,))]

    def beat(self, owner: str) -> None:
        """`owner` is alive (a job runner says so every few seconds: its jobs' lease; reap() trusts it
        for a while)."""
        with self._write():
            self.db.execute("INSERT INTO owners (owner, beat) VALUES (?, ?) ON CONFLICT (owner) DO UPDATE SET beat ="
                            " excluded.beat", (owner, self.clock()))

    def gone(self, owner: str) -> None:
        """`owner` stopped on purpose, its jobs ended first."""
        with self._write():
            self.db.execute("DELETE FROM owners WHERE owner = ?", (owner,))

    def reap(self, lost_after: float) -> list[Job]:
        """End the running jobs of owners (runners) silent for `lost_after` seconds (killed, or
        their host lost): a job being cancelled ends cancelled (the cancel holds), any other fails
        `worker_lost`, retryable (it may have run part way; nothing of it is left running); but a
        job with retries left is queued again, attempt + 1, for any runner to claim. The jobs
        changed, in their new state."""
        now = self.clock()
        ended = []
        with self._write():
            rows = self.db.execute(
                "SELECT * FROM jobs WHERE state IN ('running', 'cancelling') AND owner NOT IN"
                " (SELECT owner FROM owners WHERE beat > ?)", (now - lost_after,)).fetchall()
            for row in rows:
                if row["state"] != CANCELLING and row["kwargs"] is not None and row["attempt"] <= row["retries"]:
                    attempt = row["attempt"] + 1
                    self._change(row, "state", {"state": QUEUED, "attempt": attempt, "after": "worker_lost"},
                                 state=QUEUED, owner="", attempt=attempt, started=None)
                    ended.append(_job(self._row(row["id"])))
                    continue
                if row["state"] == CANCELLING:
                    state, error = CANCELLED, {"error": "cancelled", "message": "the job was cancelled; the runner "
                                                                                  "running it was lost meanwhile"}
                else:
                    state, error = FAILED, {"error": "worker_lost", "status": 502, "retryable": True,
                                            "message": "the runner running this job was lost (killed, or its "
                                                       "host went down); nothing of it runs any more: submit it again"}
                self._end(row, state, error)
                ended.append(_job(self._row(row["id"])))
            # owners silent ten times as long are forgotten: their jobs have just been ended
            self.db.execute("DELETE FROM owners WHERE beat <= ?", (now - 10 * lost_after,))
        return ended

    def sweep(self, limit: int = SWEEP_BATCH) -> dict[str, int]:
        """Expire finished records past their TTL (result and events dropped, a tombstone kept),
        remove tombstones past theirs, and hold the store to max_records; result files go with
        their records (and files that no record names, after a minute: a finish that never committed).
        At most `limit` records expired and `limit` removed, in one short transaction: while a count
        reaches `limit` there may be more, for another call (LongJobs.sweep makes them)."""
        now = self.clock()
        kept = {row[0] for row in self.db.execute("SELECT id FROM jobs WHERE result_file = 1")}
        for path in self.results.glob("*.json"):
            if path.stem not in kept and path.stat().st_mtime < time.time() - 60:
                path.unlink(missing_ok=True)
        with self._write():
            expired = self._expire("expires <= ?", (now,), now, limit)
            over = min(self.db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] - self.max_records, limit - expired)
            if over > 0:  # the oldest finished records go first; active ones are bounded by jobs.max_active
                expired += self._expire("id IN (SELECT id FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled')"
                                        " ORDER BY finished LIMIT ?)", (over,), now, over)
            removed = self.db.execute("DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state = 'expired'"
                                      " AND expires <= ? LIMIT ?)", (now, limit)).rowcount
            over = min(self.db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] - self.max_records, limit - removed)
            if over > 0:
                removed += self.db.execute("DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state = 'expired'"
                                           " ORDER BY expires LIMIT ?)", (over,)).rowcount
        return {"expired": expired, "removed": removed}

    def _expire(self, where: str, params: tuple, now: float, limit: int) -> int:
        ids = [r[0] for r in self.db.execute(
            f"SELECT id FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') AND {where} LIMIT ?",
            (*params, limit))]
        for job_id in ids:
            self.db.execute("UPDATE jobs SET state = 'expired', result = NULL, result_file = 0, error = NULL,"
                            " expires = ? WHERE id = ?", (now + self.ttl, job_id))
            self.db.execute("DELETE FROM events WHERE job = ?", (job_id,))
            self.result_path(job_id).unlink(missing_ok=True)
        return len(ids)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, tb) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def _job(row: sqlite3.Row) -> Job:
    values = dict(row)
    values["args"] = json.loads(values["args"])
    values["kwargs"] = None if values["kwargs"] is None else json.loads(values["kwargs"])
    values["error"] = None if values["error"] is None else json.loads(values["error"])
    return Job(**values)


class AsyncStore:
    """A store's calls from the event loop, made on one thread of their own: SQLite blocks (a
    write may wait for another instance's), the loop never does. One thread, one connection: the
    calls of one instance run in the order they were made.

        job = await stores.get(job_id)
    """

    def __init__(self, store: Any):
        self.sync = store
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="job-store")

    def __getattr__(self, name: str):
        method = getattr(self.sync, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            try:
                return await loop.run_in_executor(self._thread, functools.partial(method, *args, **kwargs))
            finally:
                metrics.JOBS_STORE.labels(name).observe(time.perf_counter() - started)

        return call

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.sync.close()


def open_store(directory: Path, ttl: float, max_records: int, inline_result_bytes: int) -> SqliteStore:
    """The host's store in the run dir (jobs.store = "sqlite"): one file its slow instances share."""
    directory.mkdir(exist_ok=True)
    return SqliteStore(directory / "store.sqlite", ttl=ttl, max_records=max_records,
                       inline_result_bytes=inline_result_bytes)


def _write_file(path: Path, data: bytes) -> None:
    """`path` holds `data` whole or not at all (a reader, nginx, never sees half of it)."""
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    partial.write_bytes(data)
    os.replace(partial, path)
