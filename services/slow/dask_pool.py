"""The slow pool on a Dask distributed cluster: the same contract as the local pool (jobs.py).

    async with DaskPool(settings, instance_number=1, line=admission) as pool:
        result_json, elapsed_ms = await pool.run("fib", {"n": 25}, timeout=30)

Jobs are submitted to the cluster as one stable entry point (dask_worker.run_job) with the task's
name as a string and pure=False (Dask would otherwise merge identical jobs into one), and run in a
child process of a Dask worker (dask_worker.py). Admission stays in the slow instance, since Dask
queues without bound: `size` is this instance's share of the cluster's worker threads, re-read
every CAPACITY_EVERY seconds, and the admission `line` in front of it is told when it changes.
Long jobs (job_runner.py) run on the same threads: the share is taken from the threads they leave
(`reserved`, the long jobs running, read from the job store), so a synchronous job never waits in
Dask's own queue behind a long one; runner.workers caps the long ones below the cluster's size.

A small result comes back with the job's completion, as an event on this instance's topic
(dask_worker.run_job says why); a larger one is gathered from its worker, as Dask does. A long
job's progress reports come on the same topic, as they are made.

Outcomes are the local pool's: the worker raises the same jobs.JobErrors, and here

    a Dask worker that died with the job (KilledWorker; allowed-failures 0)  -> WorkerDied (502)
    the scheduler unreachable, or lost with the job (FutureCancelledError)   -> BackendUnavailable (503)
    no worker thread in the cluster                                           -> NoWorkers (503)
    the worker never answered past the deadline plus a grace                  -> JobTimeout (504)

A departed client's job is cancelled (the worker kills its child), within the same kill budget as
the local pool; past it, the job runs to its end and keeps its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, Awaitable, Callable

from distributed import Client, Security
from distributed.client import FutureCancelledError
from distributed.scheduler import KilledWorker

from services.common.settings import Settings, heavy_capacity
from services.slow.dask_worker import BATCH_INTERVAL, run_job
from services.slow.jobs import (RECLAIM_AFTER, BackendUnavailable, JobError, JobTimeout, KillBudget, Line,
                                NoWorkers, WorkerDied)

log = logging.getLogger("fleet.dask")

CAPACITY_EVERY = 1.0  # seconds between readings of the cluster's threads (and reconnection tries)
CONNECT_TIMEOUT = 2.0  # seconds a connection attempt to the scheduler may take
# Seconds past a job's deadline before the instance stops waiting for its worker, answers 504
# itself and has the job cancelled. The worker enforces the deadline (it kills the job's child) and
# answers within milliseconds; this bounds the wait when it cannot: a worker whose host is cut off.
GRACE = 1.0
# Seconds a cancel may take, in the background, before it is given up: the scheduler then drops the
# job anyway when the instance releases it, or when it loses the instance's client.
CANCEL_TIMEOUT = 10.0


# What must match between this instance and every process of an external cluster: what pickles a
# job and its result, and what speaks the protocol. Python to its minor version (cloudpickle's
# code objects differ between minor versions). Dask itself only warns about a mismatch
# (`get_versions(check=True)` raises for nothing in distributed 2026.8), so the check is ours.
MUST_MATCH = ("dask", "distributed", "msgpack", "cloudpickle", "tornado", "toolz")


def version_mismatch(versions: dict) -> str:
    """'' when the scheduler and every worker run this instance's versions, else what differs:
    `versions` is what Client.get_versions() returns."""
    def key_versions(info: dict | None) -> dict:
        info = info or {}
        python = str((info.get("host") or {}).get("python", "?")).split(".")[:2]
        packages = info.get("packages") or {}
        return {"python": ".".join(python), **{name: packages.get(name) for name in MUST_MATCH}}

    ours = key_versions(versions.get("client"))
    theirs = {"scheduler": key_versions(versions.get("scheduler"))}
    theirs.update({f"worker {address}": key_versions(info) for address, info in (versions.get("workers") or {}).items()})
    differences = [f"{name} {ours[name]} here, {found[name]} on the {where}"
                   for where, found in theirs.items() for name in ours if found[name] != ours[name]]
    return "; ".join(differences)


def security(settings: Settings) -> Security | None:
    """TLS with this host's certificate of the fleet's CA, when the fleet's Dask traffic needs it
    (settings.dask_tls); Dask then refuses any peer without a certificate of that CA."""
    if not settings.dask_tls:
        return None
    c = settings.tls_files()
    return Security(tls_ca_file=str(c["ca"]), tls_client_cert=str(c["cert"]), tls_client_key=str(c["key"]),
                    require_encryption=True)


class DaskPool:
    def __init__(self, settings: Settings, instance_number: int = 1, line: Line | None = None):
        dask = settings.dask
        self.managed = dask.scheduler == "managed"
        self.address = settings.scheduler_address
        self.security = security(settings)
        # The cluster's threads are shared among every slow instance of every host with the role.
        slow_hosts = [h.name for h in settings.role_hosts("slow")]
        self.instances = settings.slow.instances * len(slow_hosts)
        # This host's own managed workers are waited for at start; other hosts' may come later.
        runs_workers = self.managed and settings.inventory.runs("workers")
        self.expected_threads = dask.workers * dask.threads_per_worker if runs_workers else 0
        here = slow_hosts.index(settings.inventory.here.name) if settings.inventory.here.name in slow_hosts else 0
        # The spare takes slow-01's share.
        self.index = here * settings.slow.instances + max(0, instance_number - 1) % settings.slow.instances
        # Where this instance's workers send its jobs' small results (dask_worker.run_job).
        self.reply_topic = f"fleet-results/{settings.inventory.here.name}/{instance_number}"
        self._pushed: dict[str, asyncio.Future] = {}  # job key -> its result, once pushed
        self._reports: dict[str, Any] = {}  # job key -> where its progress reports go (pool.run's progress)
        self._subscribed_to: str | None = None  # id of the scheduler that knows our subscription
        # Jobs this instance may run at once: its share of the cluster's threads, at least 1 (a job
        # admitted to a cluster without workers is answered 503 at once, never left waiting in line).
        self.size = heavy_capacity(settings.values)  # until the cluster says
        self.threads = 0  # the whole cluster's
        self.workers = 0
        self.line = line  # the admission in front of this pool: told the share, asked who waits
        # Threads that long jobs hold (an awaitable count, the job store's), left out of the share.
        self.reserved: Callable[[], Awaitable[int]] | None = None
        self.long_jobs = 0  # as last read: a store that does not answer keeps the last reading
        self.kill_on_cancel = False
        self.client: Client | None = None
        self.problem = "not connected yet"
        self._kill_budget = KillBudget(rate=0.4, burst=4)  # as a 2-worker local pool (pool.py)
        self._watcher: asyncio.Task | None = None
        self._in_flight = 0
        self._cancels: set[asyncio.Task] = set()  # cancels on their way to the scheduler (_cancel)
        self.counters = {"ok": 0, "error": 0, "timeout": 0, "crashed": 0, "cancelled": 0,
                         "finished_after_cancel": 0, "reclaimed": 0, "unavailable": 0, "no_workers": 0,
                         "reconnects": 0, "pushed": 0}

    # lifecycle

    async def __aenter__(self) -> "DaskPool":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self, wait: float = 30) -> None:
        """Connect and read the cluster's capacity; an unreachable scheduler leaves the instance up,
        degraded, retrying in the background (jobs get 503 until it answers)."""
        deadline = time.monotonic() + (wait if self.managed else CONNECT_TIMEOUT)
        while not await self._connect() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if self.client is not None:
            await self._read_capacity()
            # A managed cluster's workers start beside this instance: wait for them (as a local
            # pool's workers are started before the port is bound).
            while self.managed and self.threads < self.expected_threads and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                await self._read_capacity()
        else:
            log.warning("Dask scheduler at %s unreachable (%s): serving 503 until it answers", self.address,
                        self.problem)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._cancels:  # sent before the client closes, as far as they go in a moment
            await asyncio.wait(self._cancels, timeout=1)
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close(timeout=2)

    # the interface

    async def run(self, task: str, kwargs: dict, timeout: float, client: str = "",
                  progress: Any = None, kill_on_cancel: bool = False) -> tuple[bytes, float]:
        who = client
        client = self.client
        if client is None or client.status != "running":
            self.counters["unavailable"] += 1
            raise BackendUnavailable(f"the Dask scheduler at {self.address} is unreachable ({self.problem}); "
                                     "retry later")
        if self.threads == 0:
            self.counters["no_workers"] += 1
            raise NoWorkers("the Dask cluster has no worker; retry later")
        key = f"{task}-{uuid.uuid4().hex}"
        pushed = self._pushed[key] = asyncio.get_running_loop().create_future()
        if progress is not None:  # the worker sends the job's reports on this instance's topic too
            self._reports[key] = progress
        future = client.submit(run_job, task, kwargs, timeout, key, self.reply_topic, progress is not None,
                               pure=False, key=key)
        self._in_flight += 1
        try:
            result = await self._wait(future, pushed, task, timeout, who, kill_on_cancel)
        except JobError:
            self.counters["error"] += 1
            raise
        finally:
            self._in_flight -= 1
            del self._pushed[key]
            self._reports.pop(key, None)
            pushed.cancel()
            # Released even before the scheduler hears the job finished (a pushed result arrives
            # first): the scheduler then frees the finished task on the worker, as it does when
            # a client lets go of a task that has just finished.
            future.release()
        self.counters["ok"] += 1
        return result

    async def _wait(self, future: Any, pushed: asyncio.Future, task: str, timeout: float,
                    client: str, kill_on_cancel: bool = False) -> tuple[bytes, float]:
        submitted = time.monotonic()
        # One task awaits the job's outcome; callers only ever wait on it through shield(), so a
        # departed client cannot cancel the job by accident. Its outcome is always retrieved: a
        # job cancelled for a departed client ends it with FutureCancelledError, which asyncio
        # would otherwise log, with a traceback, as "Task exception was never retrieved".
        outcome = asyncio.ensure_future(self._outcome(future, pushed))
        outcome.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            try:
                return await asyncio.wait_for(asyncio.shield(outcome), timeout + GRACE)
            except asyncio.CancelledError:  # the client went away
                if not (self.kill_on_cancel or kill_on_cancel or self._kill_budget.take()):
                    # Left to finish, keeping its slot; yields to another client's waiting job once
                    # it has run RECLAIM_AFTER (pool.py says why).
                    self.counters["finished_after_cancel"] += 1
                    end = time.monotonic() + timeout + GRACE
                    while not outcome.done() and time.monotonic() < end:
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(asyncio.shield(outcome), 0.25)
                        if (not outcome.done() and time.monotonic() - submitted >= RECLAIM_AFTER
                                and self.line is not None and self.line.others_waiting(client)):
                            self.counters["reclaimed"] += 1
                            break
                    if outcome.done():
                        raise
                self.counters["cancelled"] += 1
                self._cancel(future)  # the worker kills the job's child process
                raise
        except asyncio.TimeoutError:
            self.counters["timeout"] += 1
            self._cancel(future)
            raise JobTimeout(f"job {task} passed its {timeout:g} s deadline (its Dask worker did not answer)") from None
        except KilledWorker:
            self.counters["crashed"] += 1
            raise WorkerDied(0, None, "the Dask worker running this job died") from None
        except (FutureCancelledError, OSError) as exc:
            self.counters["unavailable"] += 1
            raise BackendUnavailable(f"lost the Dask scheduler during the job ({type(exc).__name__}); retry") from None

    def _cancel(self, future: Any) -> None:
        """Have the scheduler cancel the job, in the background: the job's answer, and the place it
        holds, never wait for a scheduler that may be cut off (a partition, a stopped process).
        A cancel is a message to the scheduler; nothing in the answer's path may depend on how
        long it takes, nor on its failing (a client that has closed refuses to send it)."""
        async def cancel() -> None:
            try:
                await asyncio.wait_for(future.cancel(), CANCEL_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - the job is answered already: only say so
                log.info("could not cancel job %s on the Dask cluster (%s: %s)", future.key, type(exc).__name__, exc)

        task = asyncio.ensure_future(cancel())
        self._cancels.add(task)  # referenced until done: asyncio keeps only a weak one
        task.add_done_callback(self._cancels.discard)

    async def _outcome(self, future: Any, pushed: asyncio.Future) -> tuple[bytes, float]:
        """The job's result, whichever comes first: pushed with its completion, or gathered from
        its worker (a larger result; a restarted scheduler that has not heard our subscription
        yet). A failure always comes through the Dask future, with the scheduler's report."""
        gathered = asyncio.ensure_future(future)
        gathered.add_done_callback(lambda done: done.cancelled() or done.exception())
        await asyncio.wait((pushed, gathered), return_when=asyncio.FIRST_COMPLETED)
        if pushed.done() and not pushed.cancelled():
            gathered.cancel()  # still waiting for the scheduler's report: nothing to gather
            self.counters["pushed"] += 1
            return pushed.result()
        return await gathered

    def _on_pushed(self, event: tuple[float, Any]) -> None:
        """A topic event from a worker: [job key, result JSON, elapsed ms], or a progress report
        ["progress", job key, done, total, message] (dask_worker.run_job)."""
        try:
            _, message = event
            if message[0] == "progress":
                _, key, done, total, text = message
                report = self._reports.get(key)
                if report is not None:
                    report(float(done), None if total is None else float(total), str(text))
                return
            key, result_json, elapsed_ms = message
            waiter = self._pushed.get(key)
            if waiter is not None and not waiter.done():
                waiter.set_result((bytes(result_json), float(elapsed_ms)))
        except (TypeError, ValueError, IndexError, KeyError):
            log.warning("ignored a malformed event on %s", self.reply_topic)

    def stats(self) -> dict:
        # Its share of the cluster's threads, as it is: 0 with no worker in the cluster (`size`, the
        # jobs admission lets run at once, stays at least 1, so those jobs are answered at once).
        return {"backend": "dask", "workers": min(self.size, self.threads), "busy": self._in_flight,
                "cluster": {"scheduler": self.address, "connected": self.connected, "workers": self.workers,
                            "threads": self.threads, "long_jobs": self.long_jobs},
                "problem": None if self.connected else f"Dask scheduler {self.address} unreachable: {self.problem}",
                **self.counters}

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.status == "running"

    # the cluster

    async def _connect(self) -> bool:
        try:
            client = await asyncio.wait_for(
                Client(self.address, asynchronous=True, timeout=CONNECT_TIMEOUT, set_as_default=False,
                       security=self.security),
                CONNECT_TIMEOUT + 1)
        except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
            self.problem = f"{type(exc).__name__}: {exc}"[:200]
            return False
        client.scheduler_comm.interval = BATCH_INTERVAL  # dask_worker.py says why
        self._subscribed_to = None
        if not self.managed:
            try:
                mismatch = version_mismatch(await asyncio.wait_for(client.get_versions(), CONNECT_TIMEOUT))
                problem = f"versions differ from this fleet's: {mismatch}" if mismatch else ""
            except Exception as exc:  # noqa: BLE001 - a cluster that cannot say is not one to trust
                problem = f"could not read the cluster's versions ({type(exc).__name__}: {exc})"[:300]
            if problem:
                with contextlib.suppress(Exception):
                    await client.close(timeout=1)
                if problem != self.problem:  # tried again every second: say it once
                    log.error("Dask cluster at %s: %s", self.address, problem)
                self.problem = problem
                return False
        self.client = client
        return True

    async def _watch(self) -> None:
        """Follow the cluster: its capacity as workers come and go, and the scheduler's loss."""
        while True:
            await asyncio.sleep(CAPACITY_EVERY)
            try:
                if self.client is not None and self.client.status in ("closed", "closing", "failed"):
                    # The client gave up reconnecting (its timeout passed): start afresh.
                    with contextlib.suppress(Exception):
                        await self.client.close(timeout=1)
                    self.client = None
                if self.client is None:
                    if await self._connect():
                        self.counters["reconnects"] += 1
                        log.info("connected to the Dask scheduler at %s", self.address)
                if self.connected:
                    await self._read_capacity()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any one reading
                self.problem = f"{type(exc).__name__}: {exc}"[:200]

    async def _read_capacity(self) -> None:
        identity = await asyncio.wait_for(self.client.scheduler.identity(n_workers=0), CONNECT_TIMEOUT)
        if identity["id"] != self._subscribed_to:
            # A new client, or a restarted scheduler (it knows no subscription; the client
            # reconnects to it by itself and never says so): subscribe to our results' topic.
            self.client.subscribe_topic(self.reply_topic, self._on_pushed)
            self._subscribed_to = identity["id"]
        self.workers, self.threads = identity["n_workers"], identity["total_threads"]
        if self.reserved is not None:
            with contextlib.suppress(Exception):  # StoreUnavailable, or a slow answer
                self.long_jobs = await asyncio.wait_for(self.reserved(), CONNECT_TIMEOUT)
        free = max(0, self.threads - self.long_jobs)
        share = free // self.instances + (1 if self.index < free % self.instances else 0)
        share = max(share, 1)  # more instances than threads: Dask queues the excess
        if share != self.size:
            log.info("cluster: %d worker(s), %d thread(s), %d held by long jobs; this instance's share: %d",
                     self.workers, self.threads, self.long_jobs, share)
            self.size = share
            if self.line is not None:
                self.line.resize(share)
