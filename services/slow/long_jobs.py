"""Long jobs: a heavy request answered 202 Accepted at once, its work run as a job that outlives the
request and the instance that took it, followed at /jobs/<id> (job_routes.py), its state in the
job store (job_store.py), run by a job runner (job_runner.py, a program of its own).

    curl -si -H 'Prefer: respond-async' localhost:8080/slow/fib/30     # 202, Location: /jobs/<id>
    curl -s localhost:8080/jobs/<id>                                   # state, progress, result
    curl -sN localhost:8080/jobs/<id>/events                           # the same, live (SSE)
    curl -s -X DELETE localhost:8080/jobs/<id>                         # cancel it

Any task runs as a job when the request says `Prefer: respond-async` (with `wait=N`: answered
synchronously if it ends within N seconds); a task declared `long=True` always does. Without the
header nothing changes: a synchronous request is served exactly as before, by the instance's own
pool.

What a slow instance does for jobs (LongJobs), and what it leaves to the runners:
- create (queued), committed before the 202: the client never hears of a job the store does not
  hold. Refusals come first and are answered at once, nothing committed: the client's or the
  host's active-job limit (429, 503; counted in the same transaction as the insert). The record
  keeps the task's arguments until the job ends: a runner on any host reads them there.
- everything while it runs is a runner's: the claim (queued -> running, fairly between clients,
  on the runner's own workers: long jobs never take the places of synchronous requests, nor those
  of theirs), progress, the end, the lease. A restart or a kill -9 of this instance stops no job.
- cancel, by whichever instance gets the DELETE: a queued job is cancelled in the store at once;
  a running one is marked cancelling, and its runner stops it within WATCH_INTERVAL.
- `wait=N`: the instance waits for the record's end (its Watcher wakes it), then answers as a
  synchronous request would, from the record.

The Watcher: one query per process every WATCH_INTERVAL ("which jobs have new events since
position P"), whichever process wrote them: it wakes the event streams of those jobs here, and
tells a runner of submits and cancels.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

from services.slow import coalesce, jobs, registry
from services.slow.job_store import SUCCEEDED, ActiveLimit, AsyncStore, Event, Job, NewJob, StoreUnavailable, new_id

log = logging.getLogger("fleet.jobs")

WATCH_INTERVAL = 0.1  # seconds between a Watcher's looks at the store: a change elsewhere is seen this late at most


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
    """The runner running the job stopped (its drain's deadline) before the job ended."""

    status, code, outcome, retry = 503, "shutting_down", "cancelled", True


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
        self.down = False  # the store did not answer its last read

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
            except StoreUnavailable as exc:  # said once, not ten times a second, until it answers again
                if not self.down:
                    log.warning("the job store does not answer; streams wait for it: %s", exc)
                self.down = True
                continue
            except Exception:  # a locked or broken store: streams keep their keep-alives, try again
                log.exception("could not read the job store's changes")
                continue
            if self.down:
                log.warning("the job store answers again")
                self.down = False
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

    def forget(self, job_id: str, waiter: asyncio.Future) -> None:
        """A waiter taken and then not waited for."""
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[job_id]

    async def wait(self, job_id: str, waiter: asyncio.Future, timeout: float) -> bool:
        """True if the job changed within `timeout` seconds."""
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self.forget(job_id, waiter)


def job_timeout(fleet: Any, task: registry.Task) -> float:
    """The longest a job of `task` may run: a long task's own timeout capped by jobs.max_run_time,
    any other's capped by slow.job_timeout (as a synchronous request's)."""
    if task.long:
        return min(task.timeout, fleet.jobs.max_run_time)
    return min(task.timeout or fleet.slow.job_timeout, fleet.slow.job_timeout)


class EndedWith(jobs.JobError):
    """A job's error as its runner recorded it (status, code, message), for a `wait=N` answer."""

    log_level = None  # its runner logged it

    def __init__(self, error: dict):
        super().__init__(error)
        self.error = error
        self.status = int(error.get("status", 500))
        self.code = str(error.get("error", "job_failed"))
        self.retry = bool(error.get("retryable", False))

    def __str__(self) -> str:
        return str(self.error.get("message", self.code))

    def details(self) -> dict[str, Any]:
        return {k: v for k, v in self.error.items() if k not in ("error", "message", "status", "retryable")}


class LongJobs:
    """The jobs side of one slow instance: submits them, cancels them, waits for their end."""

    def __init__(self, store: AsyncStore, fleet: Any, tasks: dict[str, registry.Task] | None = None):
        self.store = store
        self.fleet = fleet
        self.tasks = tasks or {}
        self.watcher = Watcher(store)

    async def start(self) -> None:
        await self.watcher.start()

    async def close(self) -> None:
        self.watcher.stop()

    # submitting

    async def submit(self, task: registry.Task, kwargs: dict, client: str, request_id: str,
                     idempotency_key: str | None = None, secret: bytes = b"") -> Job:
        """Commit a job for a runner to claim; JobError (answered at once, nothing committed) if refused.

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
        arguments = _portable(kwargs)
        if arguments is None:
            raise jobs.JobFailed("TypeError", f"the arguments of task {task.name} are not JSON: it cannot run as a "
                                              "job", "")
        limits = self.fleet.jobs
        # Keyed with the host's secret, not this process's: the runners match keys across processes.
        key = coalesce.job_key(task.name, kwargs, secret) if task.coalesce and self.fleet.slow.coalesce else None
        record = NewJob(id=new_id(), task=task.name, client=client, args={k: kwargs[k] for k in task.echo},
                        idempotency_key=idempotency_key, fingerprint=fingerprint, kwargs=arguments,
                        retries=task.retries, key=key)
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
        log.info("job %s %s queued (request %s)", task.name, job.id, request_id)
        return job

    @staticmethod
    def _known(job: Job, fingerprint: str | None) -> Job:
        if job.fingerprint != fingerprint:
            raise IdempotencyKeyReused("this Idempotency-Key was used for another request (another task or other "
                                       "arguments); use a new key for a new request")
        return job

    async def outcome(self, job_id: str, timeout: float) -> Outcome | None:
        """How the job ends, if it does within `timeout` seconds; else None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            waiter = self.watcher.waiter(job_id)  # before the read: a change in between is not missed
            job = await self.store.get(job_id)
            if job is None:
                return None
            if job.terminal:
                self.watcher.forget(job_id, waiter)
                return await self._outcome(job)
            remaining = deadline - loop.time()
            if remaining <= 0 or not await self.watcher.wait(job_id, waiter, remaining):
                self.watcher.forget(job_id, waiter)
                return None

    async def _outcome(self, job: Job) -> Outcome:
        if job.state != SUCCEEDED:
            return Outcome(error=EndedWith(job.error or {"error": "cancelled", "message": "the job was cancelled"}))
        result = job.result if not job.result_file else await self.store.result(job.id)
        task = self.tasks.get(job.task)
        elapsed_ms = 1000 * ((job.finished or 0) - (job.started or job.created))
        queued_ms = 1000 * ((job.started or job.created) - job.created)
        if task is None or result is None:
            return Outcome(error=EndedWith({"error": "result_gone", "status": 410,
                                            "message": "the job's result is no longer kept"}))
        return Outcome(body=answer_body(task, job.args, result, elapsed_ms, queued_ms))

    async def cancel(self, job_id: str) -> Job | None:
        """DELETE /jobs/<id>: the record as it is now (cancelled or cancelling), None if unknown."""
        return await self.store.cancel(job_id)


def _portable(kwargs: dict) -> dict | None:
    """The arguments as the store keeps them for a runner: JSON as they are, or None."""
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
