"""The job runner: runs long jobs (long_jobs.py submits them) on a pool of its own, in a process of
its own under supervisor (runner.py), so a job outlives the slow instance that accepted it: a
restart of every slow instance (`make reload`), or a kill -9 of the one the client talked to,
stops no job.

    runner = JobRunner(store, pool, fleet, "runner-a", tasks)
    await runner.start()        # beats, watches the store, claims queued jobs while it has room
    ...
    await runner.drain(timeout) # claims nothing more, lets its jobs end (at the deadline: stops them)

Where each transition happens (job_store.py has the states):
- queued -> running: `claim`, by a runner with a free worker, fairly between clients (the client
  with the fewest jobs running first, then the oldest job). A task that declares coalesce=True
  shares: a job identical to one running here (the same task and arguments, coalesce.py) follows
  that run instead of starting its own; one job leaving (cancelled) stops the run only if it was
  the last. A job's deadline counts from its claim: min(its task's timeout, slow.job_timeout), or
  for a long task its own timeout capped by jobs.max_run_time.
- progress, from the worker's reports (progress.py: about 10 a second at most); one write in
  flight per job, later reports replacing a waiting one, so a slow store never queues work here.
- succeeded / failed (with the contract's error code, and whether a retry may work) when the pool
  answers; cancelled when the record says cancelling (a DELETE through any instance): the runner
  sees it within WATCH_INTERVAL and kills the job's worker.
- Its lease: the runner beats BEATS times per jobs.lost_after_seconds under an owner name of its
  own process (a restarted runner is a new owner) and reaps the jobs of owners silent that long:
  failed `worker_lost`, retryable (or cancelled, if a cancel came first), or, for a task that
  declares retries and has some left, queued again for any runner (the event says which attempt).
  A run taken for lost while its runner was only slow stops once it sees its job moved on, and the
  store refuses its late writes (the attempt fences them off): a job never runs twice at once.
- A drain (a handover at `make reload`, or a stop) claims nothing more and lets the jobs run to
  their end or the drain's deadline, which stops them: failed `shutting_down`, retryable.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.common import metrics
from services.slow import coalesce, jobs, registry
from services.slow.job_store import (CANCELLED, CANCELLING, EXPIRED, FAILED, QUEUED, SUCCEEDED, SWEEP_BATCH, AsyncStore,
                                     Job, StoreUnavailable)
from services.slow.long_jobs import ShuttingDown, Watcher, job_timeout

log = logging.getLogger("fleet.runner")

SWEEP_INTERVAL = 30  # seconds between sweeps of expired records (each runner sweeps; sweeping is idempotent)
# Between two of a sweep's transactions (job_store.SWEEP_BATCH records each): room for this runner's
# other store calls, and for other processes' writers, whose SQLite busy handler sleeps and retries.
SWEEP_PAUSE = 0.02
# A runner silent for jobs.lost_after_seconds (10) is lost (killed, its host down): its jobs end
# (job_store.reap). It beats BEATS times as often, and looks for lost runners' jobs as often: a busy
# store or a loaded machine delays a beat, never five. With the default, a killed runner's jobs
# have ended within 12 s.
BEATS = 5
# A runner looks for queued jobs at every change the store reports (a submit anywhere) and when a
# run ends here; and this often in any case (a change it could not read, a job another runner let go).
CLAIM_EVERY = 1.0
# Seconds between a job process's tries to write a job's end while the store does not answer.
END_RETRY = 0.5
# Queued jobs identical to a run in flight that join it at once (more join at the next look).
JOIN_LIMIT = 100


@dataclass
class Work:
    """A run of a task on the pool, and the jobs that follow it (one, or identical ones: coalesce)."""
    followers: set[str] = field(default_factory=set)


class Spawner(Protocol):
    """Starts job processes: runner.py's, one per claimed job (or set of identical jobs)."""
    prefix: str  # the owner names of this host's job processes start with it

    def owner(self) -> str: ...  # a new job process's owner name
    async def __call__(self, claimed: list[Job], owner: str) -> None: ...


class JobRunner:
    """Claims queued jobs while it has room, runs them (here, or each in a job process of its
    own), records how they go."""

    def __init__(self, store: AsyncStore, pool: jobs.Pool | None, fleet: Any, name: str,
                 tasks: dict[str, registry.Task], capacity: int | None = None, spawn: "Spawner | None" = None,
                 owner: str | None = None):
        self.store = store
        self.pool = pool
        self.fleet = fleet
        self.tasks = tasks
        # Runs at once: one per worker of its pool, or (spawn) job processes at once on this host.
        self.capacity = capacity if capacity is not None else pool.size
        # Long jobs running at once across every host (the store counts them), or None: no such cap.
        # On the fleet's own Dask cluster, half its threads: the synchronous jobs share them
        # (settings.long_job_cluster_cap).
        self.cluster_cap: int | None = None
        # With `spawn`, each claimed job runs in a job process of its own (job_process.py), which
        # outlives this runner; without, here, on `pool`.
        self.spawn = spawn
        # This process of the runner: a restarted runner is a new owner, the old one's jobs are
        # reaped. A job process is given its owner name by the runner that claimed its job.
        self.owner = owner or f"{name}.{secrets.token_hex(4)}"
        self.watcher = Watcher(store)
        self.watcher.on_change = self._changed
        self.running: dict[str, asyncio.Task] = {}  # the jobs this runner runs, by id
        self.draining = False
        self.reaps = True  # a runner reaps lost owners' jobs; a job process does not
        self.tallies: metrics.JobTallies | None = None  # the runner program exports the store's tallies
        self.store_label = ""  # what its metrics call the store (services/slow/app.py's store_label)
        self._answered_since: float | None = -math.inf  # since when the store has answered every beat (None: not now)
        self._stopping: set[str] = set()  # jobs stopped by a drain's deadline, not by a cancel
        self._ending: set[str] = set()  # jobs whose end is being written
        self._progress: dict[str, tuple] = {}  # a job's latest report, waiting for its write
        self._writing: dict[str, asyncio.Task] = {}  # jobs with progress writes in flight
        # The attempt each job runs here as: its writes say so, and the store refuses them once the
        # job has moved on (taken for lost while this runner was only slow, and queued again).
        self._attempts: dict[str, int] = {}
        self._claim_wanted = asyncio.Event()
        self._background: list[asyncio.Task] = []
        # Runs in flight here, by the key of their task and arguments (coalesce.py), and their jobs.
        self.flights = coalesce.Flights()
        self._works: dict[coalesce.Flight, Work] = {}
        self._unstarted: set[str] = set()  # jobs launched whose run has not taken its place yet (free)

    async def start(self, runner: bool = True) -> None:
        """Beat, and claim (joins only, with no capacity); a `runner` also reaps lost owners' jobs
        and sweeps the store (a job process does neither)."""
        self.reaps = runner
        await self.store.beat(self.owner)  # alive before its first claim
        await self.watcher.start()
        loop = asyncio.get_running_loop()
        self._background = [loop.create_task(self._beat()), loop.create_task(self._claim_loop())]
        if runner:
            self._background.append(loop.create_task(self._sweep()))

    async def run_given(self, given: list[Job]) -> None:
        """A job process's life: run the jobs its runner claimed for it (one run: identical jobs,
        and any identical one queued meanwhile, join it), then leave."""
        for job in given:
            self._launch(job)
        # A cancel made between the claim and this process's Watcher start is in no change it will see.
        await self._check_cancels([job.id for job in given])
        while self.running:
            await asyncio.wait(list(self.running.values()))

    async def drain(self, timeout: float) -> None:
        """Claim nothing more; let the running jobs end within `timeout` seconds, then stop them."""
        self.draining = True
        if self.running:
            log.info("draining: %d job(s) running, deadline %.0f s", len(self.running), timeout)
            await asyncio.wait(list(self.running.values()), timeout=timeout)
        if self.running:
            log.warning("drain deadline passed with %d job(s) running: they fail shutting_down", len(self.running))
            self.stop_all()
            await asyncio.wait(list(self.running.values()), timeout=5)

    def stop_all(self) -> None:
        """Every job still running here fails, shutting_down (retryable)."""
        if self.pool is not None:
            self.pool.kill_on_cancel = True
        for job_id, run in list(self.running.items()):
            self._stopping.add(job_id)
            run.cancel()

    async def close(self) -> None:
        self.draining = True
        self.stop_all()
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=5)
        self.watcher.stop()
        for task in self._background:
            task.cancel()
        try:
            await self.store.gone(self.owner)
        except StoreUnavailable:
            pass  # its silence says the same, a lease later

    def timeout(self, task: registry.Task) -> float:
        return job_timeout(self.fleet, task)

    @property
    def free(self) -> int:
        """Runs this runner can start here now (with `spawn`: see claim)."""
        return 0 if self.draining else self.capacity - len(self._works) - len(self._unstarted)

    # claiming

    async def _claim_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._claim_wanted.wait(), CLAIM_EVERY)
            except TimeoutError:
                pass
            self._claim_wanted.clear()
            try:
                await self.claim()
            except StoreUnavailable:
                continue  # the Watcher says so once; claimed again when the store answers
            except Exception:
                log.exception("could not claim jobs")

    async def claim(self) -> None:
        """Claim queued jobs one at a time while there is room; then those identical to a run in
        flight here, which join it and take no room."""
        names = list(self.tasks)
        if self.spawn is not None:
            await self._claim_for_processes(names)
            return
        while self.free > 0:
            claimed = await self.store.claim(self.owner, names, 1)
            if not claimed:
                break
            for job in claimed:
                self._launch(job)
        await self._join_identical()

    async def _claim_for_processes(self, names: list[str]) -> None:
        """Each job claimed for a job process of its own, under that process's owner name; the
        job processes of this host's runners (this one's, a restarted one's) count against the
        capacity, wherever they came from."""
        if self.draining:
            return
        running = await self.store.count_running(self.spawn.prefix)
        # On a cluster shared by several hosts' runners, their long jobs together stay within its cap.
        room = math.inf if self.cluster_cap is None else self.cluster_cap - await self.store.count_running("")
        while running < self.capacity and room > 0:
            owner = self.spawn.owner()
            claimed = await self.store.claim(owner, names, 1)
            if not claimed:
                return
            await self.spawn(claimed, owner)
            running += 1
            room -= 1

    async def _join_identical(self) -> None:
        """Queued jobs identical to a run in flight here (every claim leaves them to it) join it."""
        if self.draining:
            return
        for key in list(self.flights.by_key):
            for job in await self.store.join(self.owner, key, JOIN_LIMIT):
                self._launch(job)

    def _launch(self, job: Job) -> None:
        """Run the claimed job here, in the background."""
        self._attempts[job.id] = job.attempt
        # Counted until its run takes its place in _works (its task's first step): a claim made
        # meanwhile must not see the place free (a held 1-place runner ran a second job so).
        self._unstarted.add(job.id)
        run = asyncio.get_running_loop().create_task(self._run(job))
        self.running[job.id] = run
        run.add_done_callback(lambda _: self._ended(job.id))

    # running

    async def _run(self, job: Job) -> None:
        """One job's life here: it follows a run of its task (its own, or the run of an identical
        job in flight here, for a task that declares coalesce=True) and ends as it ends."""
        self._unstarted.discard(job.id)
        task = self.tasks.get(job.task)
        if task is None or job.kwargs is None:  # claimed only for tasks served here, with their arguments
            await self._finish(job.id, FAILED, error={"error": "task_unavailable", "status": 503, "retryable": False,
                                                     "message": f"task {job.task} is not served by this fleet"})
            return
        kwargs = job.kwargs
        key = job.key  # set at submission for a task that coalesces (slow.coalesce): identical jobs share a run
        work = Work()
        flight, shared = self.flights.join(key, lambda: asyncio.ensure_future(self._work(work, task, kwargs, job.client)),
                                           job.id)
        if shared:
            work = self._works[flight]
            metrics.SLOW_COALESCED.labels(task.name).inc()
            log.info("job %s %s shares the run of job %s", task.name, job.id, flight.started_by)
        else:
            self._works[flight] = work
            flight.job.add_done_callback(lambda _: self._ran(flight))
        work.followers.add(job.id)
        try:
            # shielded: this job leaving (below) is not the run's end, unless it was the last to follow it
            result_json, elapsed_ms = await asyncio.shield(flight.job)
        except jobs.JobError as exc:
            await self._fail(job.id, task, exc)
            return
        except asyncio.CancelledError:
            if not flight.job.done():
                flight.leave()
            if job.id in self._stopping:
                exc = ShuttingDown("the runner running the job stopped before it ended; submit it again")
                await self._fail(job.id, task, exc)
                return
            await self._finish(job.id, CANCELLED, error={"error": "cancelled", "message": "the job was cancelled"})
            raise
        finally:
            work.followers.discard(job.id)
        log.info("job %s %s ok in %.1f ms", task.name, job.id, elapsed_ms,
                 extra={"fields": {"task": task.name, "elapsed_ms": round(elapsed_ms, 2)}})
        await self._finish(job.id, SUCCEEDED, result=result_json)

    def _ran(self, flight: coalesce.Flight) -> None:
        """A run ended: its worker is free for another claim."""
        self._works.pop(flight, None)
        self._claim_wanted.set()

    async def _work(self, work: Work, task: registry.Task, kwargs: dict, client: str) -> tuple[bytes, float]:
        """A run of `task` for the jobs that follow it, on the pool: (result JSON, elapsed ms), or a JobError."""
        timeout = self.timeout(task)

        def report(done: float, total: float | None, message: str) -> None:
            for job_id in work.followers:
                self._report(job_id, done, total, message)

        try:
            return await self.pool.run(task.name, kwargs, timeout, client, kill_on_cancel=True, progress=report)
        except jobs.JobTimeout:
            raise jobs.JobTimeout(f"job {task.name} passed its {timeout:g} s deadline") from None

    async def _fail(self, job_id: str, task: registry.Task, exc: jobs.JobError) -> None:
        if exc.log_level is not None:
            log.log(exc.log_level, "job %s: %s", job_id, exc.describe(task.name),
                    extra={"fields": {"task": task.name, **exc.log_fields()}})
        error = {"error": exc.code, "message": exc.answer(None, task.expose_errors, job_id),
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
        said = False
        while True:  # the job's outcome is held here until the store takes it: nothing acknowledged is lost
            try:
                await self.store.finish(job_id, state, result=result, error=error, attempt=self._attempts.get(job_id))
                break
            except StoreUnavailable as exc:
                if not said:
                    log.warning("job %s ended %s while the job store does not answer (%s): its end is written "
                                "once it does", job_id, state, exc)
                    said = True
                await asyncio.sleep(END_RETRY)
        if said:
            log.warning("job %s: its end is written", job_id)

    def _ended(self, job_id: str) -> None:
        self.running.pop(job_id, None)
        self._unstarted.discard(job_id)  # cancelled before its first step
        self._attempts.pop(job_id, None)
        self._stopping.discard(job_id)
        self._ending.discard(job_id)

    def _report(self, job_id: str, done: float, total: float | None, message: str) -> None:
        """A progress report from the job's worker (in the loop): written one at a time per job,
        the latest replacing one still waiting."""
        self._progress[job_id] = (done, total, message)
        if job_id not in self._writing:
            self._writing[job_id] = asyncio.get_running_loop().create_task(self._write_progress(job_id))

    async def _write_progress(self, job_id: str) -> None:
        try:
            while (report := self._progress.pop(job_id, None)) is not None:
                await self.store.progress(job_id, *report, attempt=self._attempts.get(job_id))
        except StoreUnavailable:
            pass  # the next report carries the news; the Watcher says the store is away
        except Exception:
            log.exception("could not record the progress of job %s", job_id)
        finally:
            self._writing.pop(job_id, None)

    # changes made anywhere: submits (claim), cancels (stop)

    def _changed(self, changed: dict[str, int]) -> None:
        self._claim_wanted.set()
        mine = [job_id for job_id in changed if job_id in self.running]
        if mine:
            asyncio.get_running_loop().create_task(self._check_cancels(mine))

    async def _check_cancels(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            job = await self.store.get(job_id)
            # Cancelled, or ended by another runner that took this one for lost (reaped), or queued
            # again by it as a new attempt (this run's writes are refused from then on: it stops,
            # so the job never runs twice at once).
            if (job is None or job.state in (CANCELLING, CANCELLED, EXPIRED) or job.terminal
                    or job.attempt != self._attempts.get(job_id, job.attempt)):
                self._stop_local(job_id)

    def _stop_local(self, job_id: str) -> None:
        run = self.running.get(job_id)
        if run is not None and not run.done() and job_id not in self._ending:
            run.cancel()

    # the lease, and other runners' lost jobs

    async def lost(self, owner: str) -> None:
        """A job process that exited without ending its jobs (killed, or it could not start): they
        end now (worker_lost, or queued again for a task declaring retries), not a lease later."""
        try:
            await self.store.gone(owner)
            await self._reap()
        except StoreUnavailable:
            pass  # the lease does it once the store answers

    async def _reap(self) -> None:
        lost_after = self.fleet.jobs.lost_after_seconds
        since = self._answered_since
        if since is None or asyncio.get_running_loop().time() - since < lost_after:
            # After an outage nobody could beat: every owner gets a whole lease to beat again (and a
            # job process to write the end it held) before any is taken for lost.
            return
        for job in await self.store.reap(lost_after):
            if job.state == QUEUED:  # its task declares retries: any runner claims it again
                log.warning("job %s (%s): the process running it was lost; queued again, attempt %d",
                            job.id, job.task, job.attempt)
                self._claim_wanted.set()
                continue
            log.warning("job %s (%s) ended %s: the process running it was lost", job.id, job.task, job.state)

    async def _beat(self) -> None:
        lost_after = self.fleet.jobs.lost_after_seconds
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(lost_after / BEATS)
            try:
                await self.store.beat(self.owner)
                if self._answered_since is None:
                    self._answered_since = loop.time()
                if self.reaps:
                    await self._reap()
            except StoreUnavailable:
                self._answered_since = None
                continue
            except Exception:
                log.exception("could not beat in the job store")
                continue
            try:
                for state, count in (await self.store.count_by_state()).items():
                    metrics.JOBS.labels(self.store_label, state).set(count)
                if self.tallies is not None:
                    self.tallies.update(self.store_label, await self.store.tallies())
            except Exception:
                log.exception("could not count the job store's records")

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
