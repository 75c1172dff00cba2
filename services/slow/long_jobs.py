"""Long jobs: a heavy request answered 202 Accepted at once, its work run as a job that outlives the
request, followed at /jobs/<id> (job_routes.py), its state in the job store (job_store.py).

    curl -si -H 'Prefer: respond-async' localhost:8080/slow/fib/30     # 202, Location: /jobs/<id>
    curl -s localhost:8080/jobs/<id>                                   # state, progress, result
    curl -sN localhost:8080/jobs/<id>/events                           # the same, live (SSE)
    curl -s -X DELETE localhost:8080/jobs/<id>                         # cancel it

Any task runs as a job when the request says `Prefer: respond-async` (with `wait=N`: answered
synchronously if it ends within N seconds); a task declared `long=True` always does. Without the
header nothing changes: a synchronous request is served exactly as before.

Where each transition happens (job_store.py has the states):
- created (queued), in the instance that took the request, committed before the 202: the client
  never hears of a job the store does not hold. Refusals come first and are answered at once,
  nothing committed: the client's or the host's active-job limit (429, 503; counted in the same
  transaction as the insert), and a full admission line (503, as a synchronous request gets).
- queued -> running, in that instance (the job's owner), when the job's run gets a running slot.
  A task that declares coalesce=True shares: a job identical to one in flight here (the same task
  and arguments, coalesce.py) follows that job's run instead of starting its own, and is running
  at once if the run is; one job leaving (cancelled) stops the run only if it was the last.
  A job waits in the same admission line as synchronous requests (admission.py): one set of
  workers, and one share per client for both, so asynchronous submission is no way around the
  per-client limits and fairness, and no capacity is set aside for either kind. Its deadline
  counts from its admission too: min(its task's timeout, slow.job_timeout), or for a long task
  its own timeout capped by jobs.max_run_time.
- progress, by the owner, from the worker's reports (progress.py: about 10 a second at most);
  one write in flight per job, later reports replacing a waiting one, so a slow store never
  queues work in the instance.
- succeeded / failed (with the contract's error code, and whether a retry may work), by the owner
  when the pool answers.
- cancel, by whichever instance gets the DELETE: a queued job is cancelled in the store at once;
  a running one is marked cancelling. The owner learns of it at once if the DELETE came to it,
  else from its Watcher within WATCH_INTERVAL, and stops the job: out of the line, or its worker
  killed whatever the departed-client kill budget says; it then ends cancelled.
- A drain's deadline (SIGTERM) stops the jobs still running: failed, `shutting_down`, retryable.
  Until then a draining instance lets them run, as it does requests.
- An owner killed (kill -9) or cut off ends nothing itself: every instance beats in the store
  BEATS times per jobs.lost_after_seconds under an owner name of its own process (a restarted
  instance is a new owner) and reaps the jobs of owners silent that long: failed `worker_lost`, retryable (or
  cancelled, if a cancel came first), or, for a task that declares retries and has some left,
  queued again and run by the instance that reaped it (the event says which attempt). Its workers died with it (they die with their parent). An
  owner that was only slow, and finds its job reaped, stops it.

The Watcher: one query per instance every WATCH_INTERVAL ("which jobs have new events since
position P"), whichever process wrote them: it wakes the event streams of those jobs, and tells
an owner that one of its jobs is being cancelled. Writes made here wake streams at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

from services.common import metrics
from services.slow import coalesce, jobs, registry
from services.slow.admission import Admission
from services.slow.job_store import (CANCELLED, CANCELLING, EXPIRED, FAILED, QUEUED, SUCCEEDED, SWEEP_BATCH,
                                     ActiveLimit, AsyncStore, Event, Job, NewJob, new_id)

log = logging.getLogger("fleet.jobs")

WATCH_INTERVAL = 0.1  # seconds between a Watcher's looks at the store: a change elsewhere is seen this late at most
SWEEP_INTERVAL = 30  # seconds between sweeps of expired records (each instance sweeps; sweeping is idempotent)
# Between two of a sweep's transactions (job_store.SWEEP_BATCH records each): room for this instance's
# other store calls, and for other instances' writers, whose SQLite busy handler sleeps and retries.
SWEEP_PAUSE = 0.02
# An owner silent for jobs.lost_after_seconds (10) is lost (killed, its host down): its jobs end
# (job_store.reap). It beats BEATS times as often, and looks for lost owners' jobs as often: a busy
# store or a loaded machine delays a beat, never five. With the default, a killed instance's jobs
# have ended within 12 s.
BEATS = 5


class JobsLimited(jobs.JobError):
    """The client already has jobs.max_active_per_client jobs queued or running."""

    status, code, outcome, retry, log_level = 429, "rate_limited", "limited", True, None


class JobsFull(jobs.JobError):
    """The host already has jobs.max_active jobs queued or running."""

    status, code, outcome, retry, log_level = 503, "overloaded", "shed", True, None


class IdempotencyKeyReused(jobs.JobError):
    """The client's Idempotency-Key names a job of another request (the draft's 422)."""

    status, code, outcome, log_level = 422, "idempotency_key_reused", "refused", None


class ShuttingDown(jobs.JobError):
    """The instance running the job stopped (its drain's deadline) before the job ended."""

    status, code, outcome, retry = 503, "shutting_down", "cancelled", True


@dataclass
class Work:
    """A run of a task on the pool, and the jobs that follow it (one, or identical ones: coalesce)."""
    followers: set[str] = field(default_factory=set)
    started: bool = False  # it holds a running slot: a job joining it now is running at once


@dataclass
class Outcome:
    """How a job's run ended in this instance: its synchronous answer's body, or the error."""
    body: bytes | None = None
    error: jobs.JobError | None = None


@dataclass
class _Read:
    epoch: int  # the Watcher's epoch when it started: it sees every change notified before
    result: asyncio.Future


class Watcher:
    """Wakes whoever waits for a job's next events, whichever process wrote them, and reads those
    events once for every stream of the job that asks at once (events): a change wakes all the
    job's streams here, and each asks for the events after the same one."""

    def __init__(self, store: AsyncStore, interval: float = WATCH_INTERVAL):
        self.store = store
        self.interval = interval
        self._waiters: dict[str, set[asyncio.Future]] = {}
        self.on_change: Callable[[dict[str, int]], None] = lambda changed: None
        self._task: asyncio.Task | None = None
        self.epoch = 0  # counts notifications: a read started at epoch E has seen every change notified before E
        self._reads: dict[tuple[str, int], _Read] = {}  # reads in flight, by (job, after)

    async def start(self) -> None:
        position = await self.store.last_position()
        self._task = asyncio.get_running_loop().create_task(self._watch(position))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self, position: int) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                position, changed = await self.store.changes(position)
            except Exception:  # a locked or broken store: streams keep their keep-alives, try again
                log.exception("could not read the job store's changes")
                continue
            if changed:
                self.notify(changed)

    def notify(self, changed: dict[str, int]) -> None:
        self.epoch += 1
        for job_id in changed:
            for waiter in self._waiters.pop(job_id, ()):
                if not waiter.done():
                    waiter.set_result(None)
        self.on_change(changed)

    def waiter(self, job_id: str) -> asyncio.Future:
        """A future resolved at the job's next change: taken before reading its events, so that
        nothing written in between is missed."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, set()).add(waiter)
        return waiter

    async def events(self, job_id: str, after: int, since: int) -> list[Event]:
        """The job's events after `after`, for a stream that took its waiter at epoch `since`: a
        read in flight for the same events is shared if it started then or later (it sees every
        change that woke the stream), else a new one starts."""
        key = (job_id, after)
        read = self._reads.get(key)
        if read is None or read.epoch < since:
            read = self._reads[key] = _Read(self.epoch, asyncio.ensure_future(self.store.events(job_id, after=after)))
            read.result.add_done_callback(lambda _, r=read: self._reads.get(key) is r and self._reads.pop(key))
        return await asyncio.shield(read.result)

    async def wait(self, job_id: str, waiter: asyncio.Future, timeout: float) -> bool:
        """True if the job changed within `timeout` seconds."""
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[job_id]


class LongJobs:
    """The jobs of one slow instance: submits them, runs those it owns, stops them on cancel."""

    def __init__(self, store: AsyncStore, pool: jobs.Pool, admission: Admission, fleet: Any, owner: str,
                 in_flight: Any = None, tasks: dict[str, registry.Task] | None = None):
        self.store = store
        self.tasks = tasks or {}  # the tasks this instance serves: a lost instance's job it adopts runs one
        self.pool = pool
        self.admission = admission
        self.fleet = fleet
        # This process of the instance: a restarted instance is a new owner, the old one's jobs are reaped.
        self.owner = f"{owner}.{secrets.token_hex(4)}"
        self.in_flight = in_flight  # the server's: a drain waits for running jobs as for requests
        self.watcher = Watcher(store)
        self.watcher.on_change = self._changed
        self.running: dict[str, asyncio.Task] = {}  # the jobs this instance runs, by id
        self._stopping: set[str] = set()  # jobs stopped by a drain, not by a cancel
        self._ending: set[str] = set()  # jobs whose end is being written
        self._progress: dict[str, tuple] = {}  # a job's latest report, waiting for its write
        self._writing: dict[str, asyncio.Task] = {}  # jobs with progress writes in flight
        # The attempt each job runs here as: its writes say so, and the store refuses them once the
        # job has moved on (taken for lost while this instance was only slow, and queued again).
        self._attempts: dict[str, int] = {}
        self._sweeper: asyncio.Task | None = None
        self._beater: asyncio.Task | None = None
        # Runs in flight here, by the key of their task and arguments (coalesce.py), and their jobs.
        self.flights = coalesce.Flights()
        self._works: dict[coalesce.Flight, Work] = {}

    async def start(self) -> None:
        await self.store.beat(self.owner)  # alive before its first job
        await self.watcher.start()
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self._sweep())
        self._beater = loop.create_task(self._beat())

    def stop_all(self) -> None:
        """At a drain's deadline: every job still running here fails, shutting_down (retryable)."""
        for job_id, run in list(self.running.items()):
            self._stopping.add(job_id)
            run.cancel()

    async def close(self) -> None:
        self.stop_all()
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=5)
        self.watcher.stop()
        for task in (self._sweeper, self._beater):
            if task is not None:
                task.cancel()
        await self.store.gone(self.owner)

    def timeout(self, task: registry.Task) -> float:
        if task.long:
            return min(task.timeout, self.fleet.jobs.max_run_time)
        return min(task.timeout or self.fleet.slow.job_timeout, self.fleet.slow.job_timeout)

    # submitting

    async def submit(self, task: registry.Task, kwargs: dict, client: str, request_id: str,
                     idempotency_key: str | None = None, secret: bytes = b"") -> Job:
        """Commit a job and start it; JobError (answered at once, nothing committed) if refused.

        With an `idempotency_key` the client used before for the same request (task and parsed
        arguments), that job instead, whatever its state: a retry never runs it twice. Used for
        another request: IdempotencyKeyReused. The request is remembered by its fingerprint, an
        HMAC keyed with the host's `secret` (the edge's token): arguments may be secrets."""
        fingerprint = None
        if idempotency_key is not None:
            spelled = coalesce.canonical(task.name, kwargs) or repr((task.name, kwargs)).encode()
            fingerprint = hmac.new(secret, spelled, hashlib.sha256).hexdigest()
            known = await self.store.find(client, idempotency_key)
            if known is not None:
                return self._known(known, fingerprint)
        refused = self.admission.refusal(client)
        if refused is not None:
            raise refused
        limits = self.fleet.jobs
        record = NewJob(id=new_id(), task=task.name, client=client, owner=self.owner,
                        args={k: kwargs[k] for k in task.echo}, idempotency_key=idempotency_key,
                        fingerprint=fingerprint, kwargs=_kept(task, kwargs), retries=task.retries)
        try:
            job, created = await self.store.create(record, max_per_client=limits.max_active_per_client,
                                                   max_active=limits.max_active)
        except ActiveLimit as exc:
            if exc.whose == "client":
                raise JobsLimited(f"this client already has {exc.count} jobs queued or running "
                                  f"(jobs.max_active_per_client)") from None
            raise JobsFull(f"{exc.count} jobs are queued or running here (jobs.max_active)") from None
        if not created:  # the same key, committed by a retry on another instance meanwhile
            return self._known(job, fingerprint)
        self._launch(job, task, kwargs, request_id)
        return job

    def _launch(self, job: Job, task: registry.Task, kwargs: dict, request_id: str) -> None:
        """Run the job here, in the background."""
        self._attempts[job.id] = job.attempt
        run = asyncio.get_running_loop().create_task(self._run(job, task, kwargs, job.client, request_id))
        self.running[job.id] = run
        run.add_done_callback(lambda _: self._ended(job.id))
        if self.in_flight is not None:
            self.in_flight.enter()

    @staticmethod
    def _known(job: Job, fingerprint: str | None) -> Job:
        if job.fingerprint != fingerprint:
            raise IdempotencyKeyReused("this Idempotency-Key was used for another request (another task or other "
                                       "arguments); use a new key for a new request")
        return job

    async def outcome(self, job_id: str, timeout: float) -> Outcome | None:
        """How the job ends, if it does within `timeout` seconds and runs here; else None."""
        run = self.running.get(job_id)
        if run is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(run), timeout)
        except (TimeoutError, asyncio.CancelledError):
            return None

    async def cancel(self, job_id: str) -> Job | None:
        """DELETE /jobs/<id>: the record as it is now (cancelled or cancelling), None if unknown."""
        job = await self.store.cancel(job_id)
        if job is not None and job.state in (CANCELLING, CANCELLED):
            self._stop_local(job_id)
        return job

    # running

    async def _run(self, job: Job, task: registry.Task, kwargs: dict, client: str, request_id: str) -> Outcome:
        """One job's life in this instance: it follows a run of its task (its own, or the run of an
        identical job in flight here, for a task that declares coalesce=True) and ends as it ends."""
        key = coalesce.job_key(task.name, kwargs) if task.coalesce and self.fleet.slow.coalesce else None
        work = Work()
        flight, shared = self.flights.join(key, lambda: asyncio.ensure_future(self._work(work, task, kwargs, client)),
                                           job.id)
        if shared:
            work = self._works[flight]
            metrics.SLOW_COALESCED.labels(task.name).inc()
            log.info("job %s %s shares the run of job %s", task.name, job.id, flight.started_by)
        else:
            self._works[flight] = work
            flight.job.add_done_callback(lambda _: self._works.pop(flight, None))
        work.followers.add(job.id)
        try:
            if work.started:  # it joins a run under way: running at once
                await self._start(job.id)
            # shielded: this job leaving (below) is not the run's end, unless it was the last to follow it
            result_json, elapsed_ms, queued_ms = await asyncio.shield(flight.job)
        except jobs.JobError as exc:
            await self._fail(job.id, task, exc, request_id)
            return Outcome(error=exc)
        except asyncio.CancelledError:
            if not flight.job.done():
                flight.leave()
            if job.id in self._stopping:
                exc = ShuttingDown("the instance running the job stopped before it ended; submit it again")
                await self._fail(job.id, task, exc, request_id)
                return Outcome(error=exc)
            await self._finish(job.id, CANCELLED, error={"error": "cancelled", "message": "the job was cancelled"})
            raise
        finally:
            work.followers.discard(job.id)
        log.info("job %s %s ok in %.1f ms (waited %.1f ms)", task.name, job.id, elapsed_ms, queued_ms,
                 extra={"fields": {"task": task.name, "elapsed_ms": round(elapsed_ms, 2)}})
        await self._finish(job.id, SUCCEEDED, result=result_json)
        return Outcome(body=answer_body(task, kwargs, result_json, elapsed_ms, queued_ms))

    async def _work(self, work: "Work", task: registry.Task, kwargs: dict, client: str) -> tuple[bytes, float, float]:
        """A run of `task` for the jobs that follow it: admitted in the line as its first job's
        client, on the pool; (result JSON, elapsed ms, queued ms), or a JobError."""
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        timeout = self.timeout(task)
        deadline = arrived + timeout
        async with self.admission.slot(client, task.name, deadline):
            started = loop.time()
            if deadline - started <= 0:
                raise jobs.QueueTimeout(f"it waited {started - arrived:.1f} s in line, its whole deadline")
            work.started = True
            if not any([await self._start(job_id) for job_id in list(work.followers)]):
                raise asyncio.CancelledError  # every job that waited for it was cancelled meanwhile

            def report(done: float, total: float | None, message: str) -> None:
                for job_id in work.followers:
                    self._report(job_id, done, total, message)

            try:
                result_json, elapsed_ms = await self.pool.run(task.name, kwargs, deadline - started, client,
                                                              kill_on_cancel=True, progress=report)
            except jobs.JobTimeout:
                raise jobs.JobTimeout(f"job {task.name} passed its {timeout:g} s deadline") from None
        return result_json, elapsed_ms, 1000 * (started - arrived)

    async def _start(self, job_id: str) -> bool:
        """queued -> running in the store; False if the job was cancelled meanwhile."""
        if await self.store.start(job_id, self.owner) is None:
            return False
        self.watcher.notify({job_id: 0})
        return True

    async def _fail(self, job_id: str, task: registry.Task, exc: jobs.JobError, request_id: str) -> None:
        if exc.log_level is not None:
            log.log(exc.log_level, "job %s: %s", job_id, exc.describe(task.name),
                    extra={"fields": {"task": task.name, **exc.log_fields()}})
        error = {"error": exc.code, "message": exc.answer(None, task.expose_errors, request_id),
                 "status": exc.status, "retryable": exc.retry, **exc.details()}
        await self._finish(job_id, FAILED, error=error)

    async def _finish(self, job_id: str, state: str, result: bytes | None = None, error: dict | None = None) -> None:
        # Shielded: a cancel arriving now (a drain's deadline) must not leave the record active.
        await asyncio.shield(self._end(job_id, state, result, error))

    async def _end(self, job_id: str, state: str, result: bytes | None, error: dict | None) -> None:
        self._ending.add(job_id)  # its own end, seen by the Watcher, is no reason to stop it
        writing = self._writing.get(job_id)
        if writing is not None:  # the last report is recorded before the end, never dropped by it
            await writing
        await self.store.finish(job_id, state, result=result, error=error, attempt=self._attempts.get(job_id))
        self.watcher.notify({job_id: 0})

    def _ended(self, job_id: str) -> None:
        self.running.pop(job_id, None)
        self._attempts.pop(job_id, None)
        self._stopping.discard(job_id)
        self._ending.discard(job_id)
        if self.in_flight is not None:
            self.in_flight.leave()

    def _report(self, job_id: str, done: float, total: float | None, message: str) -> None:
        """A progress report from the job's worker (in the loop): written one at a time per job,
        the latest replacing one still waiting."""
        self._progress[job_id] = (done, total, message)
        if job_id not in self._writing:
            self._writing[job_id] = asyncio.get_running_loop().create_task(self._write_progress(job_id))

    async def _write_progress(self, job_id: str) -> None:
        try:
            while (report := self._progress.pop(job_id, None)) is not None:
                if await self.store.progress(job_id, *report, attempt=self._attempts.get(job_id)) is not None:
                    self.watcher.notify({job_id: 0})
        except Exception:
            log.exception("could not record the progress of job %s", job_id)
        finally:
            self._writing.pop(job_id, None)

    # cancels made anywhere

    def _changed(self, changed: dict[str, int]) -> None:
        mine = [job_id for job_id in changed if job_id in self.running]
        if mine:
            asyncio.get_running_loop().create_task(self._check_cancels(mine))

    async def _check_cancels(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            job = await self.store.get(job_id)
            # Cancelled, or ended by another instance that took this one for lost (reaped), or queued
            # again by it as a new attempt (this run's writes are refused from then on: it stops,
            # so the job never runs twice at once).
            if (job is None or job.state in (CANCELLING, CANCELLED, EXPIRED) or job.terminal
                    or job.attempt != self._attempts.get(job_id, job.attempt)):
                self._stop_local(job_id)

    def _stop_local(self, job_id: str) -> None:
        run = self.running.get(job_id)
        if run is not None and not run.done() and job_id not in self._ending:
            run.cancel()

    async def _beat(self) -> None:
        lost_after = self.fleet.jobs.lost_after_seconds
        while True:
            await asyncio.sleep(lost_after / BEATS)
            try:
                await self.store.beat(self.owner)
                reaped = await self.store.reap(lost_after, adopter=self.owner)
            except Exception:
                log.exception("could not beat in the job store")
                continue
            try:
                for state, count in (await self.store.count_by_state()).items():
                    metrics.JOBS.labels(state).set(count)
            except Exception:
                log.exception("could not count the job store's records")
            for job in reaped:
                if job.state == QUEUED:  # its task declares retries: it runs here now
                    log.warning("job %s (%s): the instance running it went silent; attempt %d here", job.id, job.task,
                                job.attempt)
                    self._adopt(job)
                    continue
                log.warning("job %s (%s) ended %s: the instance running it went silent", job.id, job.task, job.state)
            if reaped:
                self.watcher.notify({job.id: job.seq for job in reaped})

    def _adopt(self, job: Job) -> None:
        """Run here a lost instance's job that was queued again (job_store.reap kept its arguments)."""
        task = self.tasks.get(job.task)
        if task is None:  # not served here (one host's instances share their settings: never, in practice)
            error = {"error": "worker_lost", "status": 502, "retryable": True,
                     "message": "the instance running this job was lost, and this one does not serve its task"}
            asyncio.get_running_loop().create_task(self._finish(job.id, FAILED, error=error))
            return
        self._launch(job, task, job.kwargs, job.id)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                swept = await self.sweep()
            except Exception:
                log.exception("could not sweep the job store")
                continue
            if any(swept.values()):
                log.info("job store swept: %d record(s) expired, %d tombstone(s) removed",
                         swept["expired"], swept["removed"])

    async def sweep(self) -> dict[str, int]:
        """Everything due swept, in short transactions with pauses between them (job_store.SWEEP_BATCH)."""
        total = {"expired": 0, "removed": 0}
        while True:
            swept = await self.store.sweep(limit=SWEEP_BATCH)
            for key in total:
                total[key] += swept[key]
            if max(swept.values()) < SWEEP_BATCH:
                return total
            await asyncio.sleep(SWEEP_PAUSE)


def _kept(task: registry.Task, kwargs: dict) -> dict | None:
    """The arguments kept in the store for a retry: only for a task that declares retries, and only
    if they are JSON as they are (else the job fails as lost, as any other)."""
    if not task.retries:
        return None
    try:
        return kwargs if json.loads(json.dumps(kwargs)) == kwargs else None
    except (TypeError, ValueError):
        return None


def answer_body(task: registry.Task, kwargs: dict, result_json: bytes, elapsed_ms: float, queued_ms: float) -> bytes:
    """A synchronous request's 200 body: the task, its echoed arguments, the result the worker
    encoded (framed here, never decoded), and the times."""
    head = json.dumps({"task": task.name, **{k: kwargs[k] for k in task.echo}})[:-1]
    tail = json.dumps({"elapsed_ms": round(elapsed_ms, 2), "queued_ms": round(queued_ms, 2)})[1:]
    return b"".join((head.encode(), b', "result": ', result_json, b", ", tail.encode()))
