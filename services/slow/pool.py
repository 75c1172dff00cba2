"""The local backend: W worker processes, one pipe each, watched by the slow instance's event loop.

This is the parent side; a worker's own life, and the messages it sends, are worker.py. The contract
(the errors `run` raises, the Pool protocol, the kill budget) is jobs.py:

    async with WorkerPool.from_settings(settings, size=2, owner="slow-01", line=admission) as pool:
        result_json, elapsed_ms = await pool.run("fib", {"n": 25}, timeout=30)   # b"75025", 8.1

`run` returns the task's result already encoded as JSON (by the worker: a large result never costs
the event loop an encode, and a result that is not JSON fails in the worker, as the job's error), or
raises a jobs.JobError. A worker that dies fails only its job; the pool refills itself.

The deadline covers the wait for a free worker and the run. Cancelling `run` (the client went
away) kills the job's worker, within a budget (2 x size at once, then one kill per worker every
5 s) and one at a time (never while a worker is being replaced, so the pool never has fewer than
size - 1). Past the budget (an abort storm) the job runs to its end instead, and `run` returns
only then, so that the caller's slot, and the client's share of them, stay taken while the worker
is: aborting costs a client nothing it could not spend by waiting. Such a job is still killed once
it has run RECLAIM_AFTER seconds while another client's job waits (the admission `line` says).

Workers cannot eat the machine: with max_rss_mb, a worker whose resident memory passes the cap
during a job is killed (checked every MEMORY_CHECK_INTERVAL, as uWSGI's evil-reload-on-rss does;
a fast allocation can overshoot it by what it touches in that time), and one left above it after
a job is replaced (as uWSGI's reload-on-rss and Celery's max_memory_per_child). With max_jobs a
worker is replaced after that many jobs (plus up to 10 % jitter, as gunicorn's max_requests_jitter,
so workers started together do not all restart together); its replacement starts at once, with no
wait like ProcessPoolExecutor's max_tasks_per_child. Each worker sets its oom_score_adj to
worker.OOM_SCORE_ADJ, so that the kernel's OOM killer picks a worker (and what its job started)
before an instance, nginx or supervisord.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import random
import select
import signal
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

from services.common import procfs
from services.common.settings import Settings
from services.slow import cpu_priority
from services.slow.jobs import (RECLAIM_AFTER, JobError, JobFailed, JobTimeout, KillBudget, Line, NoWorkers,
                                QueueTimeout, ResultTooLarge, TaskUnavailable, WorkerDied, WorkerOutOfMemory)
from services.slow.worker import WORKER_MARKER, Frames, worker_main

log = logging.getLogger("fleet.pool")

# Replacement workers that fail to start are retried after 0.5, 1, 2, ... s, at most this apart:
# a failing pool costs little, and one that can work again is whole within this time.
MAX_SPAWN_BACKOFF = 10
# A task whose setup failed is tried again (on one worker) after 1, 2, 4, ... s, at most this apart.
MAX_SETUP_BACKOFF = 60
# How often busy workers' resident memory is read against max_rss_mb (one /proc read per busy worker).
MEMORY_CHECK_INTERVAL = 0.05


# the pipe to a worker, written without blocking the event loop (read through worker.Frames)

class Sending:
    """One message on its way to a worker, framed as Connection.send frames it, on a descriptor set
    non-blocking: written as far as the pipe takes it now, the rest each time the loop says there is
    room again (add_writer). A worker slow to read its job (stopped, starved of CPU) never holds the
    loop: a blocking write, or a select() for room, stopped every request of the instance while a
    job's arguments were larger than the pipe's buffer. The caller bounds the wait (the job's
    deadline) and calls stop() whatever happens.

    `done` is the outcome: None once the whole message is in the pipe, OSError if the pipe broke or
    the send was stopped before its end (the worker then holds half a message: it takes no other)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, message: Any):
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._data = memoryview(struct.pack("!i", len(payload)) + payload)
        self._loop, self._fd, self._watching = loop, fd, False
        self.done: asyncio.Future = loop.create_future()
        self._write()
        if not self.done.done():
            loop.add_writer(fd, self._write)
            self._watching = True

    def _write(self) -> None:
        try:
            while self._data:
                self._data = self._data[os.write(self._fd, self._data):]
        except BlockingIOError:
            return  # the pipe is full: the rest when the loop says there is room
        except OSError as exc:
            self.stop(exc)
            return
        self.stop()

    def stop(self, error: OSError | None = None) -> None:
        """Stop watching the descriptor (before it is closed); an unfinished send fails with `error`."""
        if self._watching:
            self._watching = False
            try:
                self._loop.remove_writer(self._fd)
            except (OSError, ValueError):
                pass
        if not self.done.done():
            if error is None and self._data:
                error = OSError("the send to the worker stopped half-way")
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)
                self.done.exception()  # retrieved: a caller that has gone (cancelled) never reads it


@dataclass(eq=False)
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    ready: asyncio.Future
    frames: Frames = field(default_factory=Frames)
    job: asyncio.Future | None = None
    sending: Sending | None = None  # its job's arguments, while they are on their way
    retired: bool = False  # killed on purpose; its exit is expected
    serving: bool = False  # became ready and joined the pool; its exit calls for a replacement
    exited: bool = False  # reaped: its pid may belong to someone else now, never signal it again
    broken: dict[str, tuple] = field(default_factory=dict)  # tasks whose setup failed here
    started: float = field(default_factory=time.monotonic)
    job_started: float = 0.0
    on_progress: Callable[[float, float | None, str], None] | None = None  # its job's progress reports go here
    jobs: int = 0  # jobs it has run to their end
    job_limit: int = 0  # replaced after this many jobs; 0: never
    pid: int = field(init=False)  # kept: the process object is closed once it is reaped

    def __post_init__(self) -> None:
        self.pid = self.process.pid

    def has_exited(self) -> bool:
        """The process has exited (its sentinel is readable), whether or not the loop saw it yet."""
        return self.exited or bool(select.select([self.process.sentinel], [], [], 0)[0])


@dataclass
class _Setup:
    """A task whose setup failed: when one worker may try it again."""
    retry_at: float
    backoff: float


class WorkerPool:
    def __init__(self, size: int, task_modules: str, nice: int = 10, start_timeout: float = 60,
                 sched_idle: bool = False, idle_cgroup: str | None = None,
                 max_result_bytes: int = 16 << 20, marker: str = "", max_rss_mb: int = 0, max_jobs: int = 0,
                 cgroup_record: Path | None = None, line: Line | None = None, kill_on_cancel: bool = False):
        self.size = size
        self.max_rss_bytes = max_rss_mb << 20  # 0: no cap
        self.max_jobs = max_jobs  # 0: a worker runs jobs for as long as it lives
        self.task_modules = task_modules
        self.nice = nice
        self.sched_idle = sched_idle
        self.max_result_bytes = max_result_bytes
        # Names this pool's workers and their children (worker.WORKER_MARKER); "" for none.
        self.marker = marker
        # An idle cpu cgroup for the workers (cpu_priority.py), named per instance; None: none.
        # cgroup_record: the run dir's list of created groups, which `make stop` removes.
        self.cgroup = cpu_priority.create_idle_cgroup(idle_cgroup, cgroup_record) if idle_cgroup else None
        self.keep_cgroup = False  # True: shared with other pools; make stop removes it
        # The admission in front of this pool: whether another client's job waits (a job left to
        # finish for a departed client yields to it). None: no line (a Dask worker's pool).
        self.line = line
        self.start_timeout = start_timeout
        self._ctx = multiprocessing.get_context("forkserver")
        # Workers fork from a server that has already imported the task code: a replacement is
        # ready in milliseconds, with no import in its start-up.
        modules = ["services.slow.registry"] + [m.strip() for m in task_modules.split(",")]
        self._ctx.set_forkserver_preload(modules)
        self._workers: set[_Worker] = set()
        self._idle: deque[_Worker] = deque()
        self._waiters: list[asyncio.Future] = []  # run() calls waiting for an idle worker
        self._closing = False
        # True: a cancelled job's worker is killed whatever the budget (at a drain's deadline; in a
        # Dask worker, where the slow instance has decided already).
        self.kill_on_cancel = kill_on_cancel
        self._spawn_failures = 0  # consecutive failed starts of a replacement worker
        self._refiller: asyncio.Task | None = None  # starts workers until the pool is whole again
        self._memory_watch: asyncio.Task | None = None  # kills workers past max_rss_mb mid-job
        self._setups: dict[str, _Setup] = {}  # tasks whose setup failed, and when to try again
        # Workers killed for departed clients: 2W at once, then one worker every 5 s on average.
        self._kill_budget = KillBudget(rate=size / 5, burst=2 * size)
        self.counters = {"started": 0, "ok": 0, "error": 0, "timeout": 0, "crashed": 0, "cancelled": 0,
                         "finished_after_cancel": 0, "reclaimed": 0, "start_failed": 0, "unavailable": 0,
                         "no_workers": 0, "expired": 0, "out_of_memory": 0, "recycled": 0}

    @classmethod
    def from_settings(cls, settings: Settings, size: int, owner: str, line: Line | None = None,
                      kill_on_cancel: bool = False, cgroup_owner: str | None = None) -> "WorkerPool":
        """The pool of `owner` (a slow instance, or a Dask worker for its job processes) as the
        fleet's settings say: its idle cgroup and its workers' marker are named after its owner
        and the run dir, so one fleet's pools never touch another's. With `cgroup_owner`, the idle
        cgroup is that one's, shared with other pools (the job processes'), and left in place at close."""
        slow, run_dir = settings.slow, settings.run_dir
        group = cpu_priority.group_name(cgroup_owner or owner, run_dir) if slow.idle_cgroup else None
        pool = cls(size, slow.task_modules, slow.nice, sched_idle=slow.sched_idle, idle_cgroup=group,
                   max_result_bytes=slow.max_result_mb << 20, marker=f"{run_dir}:{owner}",
                   max_rss_mb=slow.worker_max_rss_mb, max_jobs=slow.worker_max_jobs,
                   cgroup_record=run_dir / cpu_priority.RECORD, line=line, kill_on_cancel=kill_on_cancel)
        pool.keep_cgroup = cgroup_owner is not None
        return pool

    # lifecycle

    async def __aenter__(self) -> "WorkerPool":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self) -> None:
        """Start every worker and wait until each has run its setups (call before binding a port)."""
        if self.marker:
            _kill_leftovers(self.marker)
        await asyncio.gather(*(self._spawn() for _ in range(self.size)))
        if self.max_rss_bytes:
            self._memory_watch = asyncio.get_running_loop().create_task(self._watch_memory())

    async def close(self, timeout: float = 5) -> None:
        """Stop every worker: close their pipes (they exit), kill whoever is still there after
        `timeout`, and whatever their jobs started."""
        self._closing = True
        if self._memory_watch is not None:
            self._memory_watch.cancel()
        workers = list(self._workers)
        for w in workers:
            self._detach(w)
            w.conn.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(w.has_exited() for w in workers):
            await asyncio.sleep(0.01)
        for w in workers:
            self._kill_group(w)  # stragglers, and children that outlived their worker
            w.process.join(1)
            w.exited = True
            if w.job is not None and not w.job.done():  # a job still running fails now, not at its deadline
                w.job.set_result(("died", w.process.exitcode))
            _release(w.process)
        self._workers.clear()
        self._wake_waiters()
        if self.cgroup is not None and not self.keep_cgroup:
            cpu_priority.remove(self.cgroup)

    # the interface

    async def run(self, task: str, kwargs: dict, timeout: float, client: str = "",
                  progress: Callable[[float, float | None, str], None] | None = None,
                  kill_on_cancel: bool = False) -> tuple[bytes, float]:
        """Run one job on an idle worker; return (result as JSON bytes, elapsed_ms) or raise a JobError.

        client: whose job it is (its address), for reclaim(). progress: called in the loop with
        each (done, total, message) the task reports. kill_on_cancel: a cancel kills the worker
        whatever the kill budget (a long job's explicit cancel, not a departed client)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            worker = await self._idle_worker(task, deadline)
            if not await self._send(worker, task, kwargs, deadline, timeout):
                continue  # it died while idle: the job goes to a live worker
            worker.on_progress = progress
            try:
                reply = await self._reply(worker, task, deadline, timeout, client, kill_on_cancel)
            finally:
                worker.on_progress = None
            worker.job = None
            if reply[0] != "unavailable":
                break
            self._setup_failed(worker, task, reply[1:])  # nothing ran; another worker may have it
            self._put_idle(worker)
        status = reply[0]
        if status not in ("died", "out_of_memory"):  # the worker lives on: it takes the next job
            if task in worker.broken:  # its setup worked this time
                del worker.broken[task]
                self._setups.pop(task, None)
            self._job_done(worker)
        if status == "ok":
            self.counters["ok"] += 1
            return reply[1], reply[2]
        raise self._job_error(task, worker, reply)

    def _job_error(self, task: str, worker: _Worker, reply: tuple) -> JobError:
        """What a job that ended without a result raises, from its worker's reply."""
        status = reply[0]
        if status == "died":
            self.counters["crashed"] += 1
            return WorkerDied(worker.pid, reply[1])
        if status == "out_of_memory":  # counted, and the worker killed, by _watch_memory
            return WorkerOutOfMemory(f"job {task} took its worker past the memory cap of "
                                     f"{self.max_rss_bytes >> 20} MiB (slow.worker_max_rss_mb: "
                                     f"{reply[1] >> 20} MiB resident); the worker was killed and replaced")
        self.counters["error"] += 1
        if status == "too_large":
            return ResultTooLarge(f"the result of {task} is {reply[1] / 2**20:.1f} MiB of JSON, over the "
                                  f"limit of {self.max_result_bytes / 2**20:g} MiB (slow.max_result_mb)")
        return JobFailed(*reply[1:4])

    def stats(self) -> dict:
        serving = [w for w in self._workers if w.serving and not w.retired]  # not the ones being killed
        return {
            "backend": "local",
            "workers": len(serving),
            "busy": sum(1 for w in serving if w.job is not None),
            "pids": sorted(w.pid for w in serving),
            # Tasks whose setup failed in every serving worker (tried again after their back-off).
            "unavailable_tasks": sorted(t for t in self._setups if serving and all(t in w.broken for w in serving)),
            "problem": f"cannot start workers ({self._spawn_failures} tries failed)" if self._spawn_failures else None,
            **self.counters,
        }

    # one job

    async def _idle_worker(self, task: str, deadline: float) -> _Worker:
        """An idle worker that can run `task`: waits only while workers are busy or starting."""
        loop = asyncio.get_running_loop()
        while True:
            serving = [w for w in self._workers if w.serving and not w.retired]
            if not serving and (self._spawn_failures or self._closing):
                self.counters["no_workers"] += 1
                raise NoWorkers("this instance has no worker and cannot start one; retry later")
            if self._task_down(task, serving):
                self.counters["unavailable"] += 1
                raise TaskUnavailable(self._setup_message(task, serving))
            worker = self._take_idle(task)
            if worker is not None:
                return worker
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:  # its deadline, which counts from admission, passed before it ran
                self.counters["expired"] += 1
                raise QueueTimeout("no worker became free before the job's deadline (one was being replaced); "
                                   "it never ran") from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _take_idle(self, task: str) -> _Worker | None:
        due = task not in self._setups or time.monotonic() >= self._setups[task].retry_at
        for worker in list(self._idle):
            if worker.retired or worker not in self._workers:
                self._idle.remove(worker)  # died while idle
            elif task not in worker.broken or due:
                self._idle.remove(worker)
                if task in worker.broken:  # this one tries the setup again; the others wait
                    self._setups[task].retry_at = time.monotonic() + self._setups[task].backoff
                return worker
        return None

    async def _send(self, worker: _Worker, task: str, kwargs: dict, deadline: float, timeout: float) -> bool:
        """Send the job to `worker` as its pipe takes it; False (and the worker is written off) if it
        has exited or its pipe broke. The send counts against the job's deadline: a worker that does
        not take its job in time is killed (JobTimeout), as one that does not finish it."""
        if worker.has_exited():
            return False  # its exit is on its way to _on_exit, which replaces it
        loop = asyncio.get_running_loop()
        worker.job = loop.create_future()  # busy from now: a reply or its exit settles it
        worker.job_started = time.monotonic()
        try:
            worker.sending = Sending(loop, worker.conn.fileno(), (task, kwargs))
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(worker.sending.done)
            return True
        except TimeoutError:  # before OSError, of which it is a subclass
            self._retire(worker, "timeout")
            raise JobTimeout(f"job {task} passed its {timeout:g} s deadline (its worker did not take it)") from None
        except (OSError, ValueError):  # the pipe broke: the worker is gone or going
            worker.job = None
            self._retire(worker, "crashed")
            return False
        except asyncio.CancelledError:
            # The client left while its job was on its way: the worker holds half a message and
            # can take no other job, so it is killed whatever the budget (it still spends from it).
            # Only a worker that does not read (stopped, starved) is ever caught here.
            self._kill_budget.take()
            self._retire(worker, "cancelled")
            raise
        finally:
            if worker.sending is not None:
                worker.sending.stop()
                worker.sending = None

    async def _reply(self, worker: _Worker, task: str, deadline: float, timeout: float, client: str,
                     kill_on_cancel: bool = False) -> tuple:
        job = worker.job
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(job)  # shielded: a cancel decides below what happens to it
        except TimeoutError:
            self._retire(worker, "timeout")
            raise JobTimeout(f"job {task} passed its {timeout:g} s deadline") from None
        except asyncio.CancelledError:
            if self.kill_on_cancel or kill_on_cancel or (self._whole and self._kill_budget.take()):
                self._retire(worker, "cancelled")
                raise
            # The cancellation is swallowed here: say so to the task, or the asyncio.timeout_at
            # below reads its own expiry as a cancellation from outside (Python before 3.11.3, such
            # as Debian 12's 3.11.2, compares uncancel() with 0) and the job is killed after 0.25 s.
            asyncio.current_task().uncancel()
        # An abort storm: over the kill budget, the job runs to its end, and this caller keeps its
        # admission slot until then; but a second cancel (as at a drain's deadline) kills it after
        # all, and so does another client's job waiting while it has run RECLAIM_AFTER seconds.
        self.counters["finished_after_cancel"] += 1
        try:
            while True:
                try:
                    async with asyncio.timeout_at(min(deadline, asyncio.get_running_loop().time() + 0.25)):
                        reply = await asyncio.shield(job)
                    break
                except TimeoutError:
                    if asyncio.get_running_loop().time() >= deadline:
                        raise
                if (time.monotonic() - worker.job_started >= RECLAIM_AFTER and self._whole
                        and self.line is not None and self.line.others_waiting(client)):
                    self.counters["reclaimed"] += 1
                    self._retire(worker, "its client left and another client's job waits")
                    raise asyncio.CancelledError
        except TimeoutError:
            self._retire(worker, "timeout")
        except asyncio.CancelledError:
            self._retire(worker, "cancelled")
            raise
        else:
            worker.job = None
            if reply[0] == "unavailable":
                self._setup_failed(worker, task, reply[1:])
                self._put_idle(worker)
            elif reply[0] not in ("died", "out_of_memory"):
                self._job_done(worker)
        raise asyncio.CancelledError

    # workers

    def _job_done(self, worker: _Worker) -> None:
        """A job ended in the worker (a result or the task's error): it takes the next one, unless it
        has run its share of jobs or kept more memory than the cap; then a fresh one replaces it."""
        worker.jobs += 1
        if worker.job_limit and worker.jobs >= worker.job_limit:
            self._retire(worker, "recycled", f"it has run {worker.jobs} jobs (slow.worker_max_jobs)")
        elif self.max_rss_bytes and (rss := procfs.resident_bytes(worker.pid)) > self.max_rss_bytes:
            self._retire(worker, "recycled", f"it kept {rss >> 20} MiB resident after a job, over "
                                             f"{self.max_rss_bytes >> 20} MiB (slow.worker_max_rss_mb)")
        else:
            self._put_idle(worker)

    async def _watch_memory(self) -> None:
        """Kill a worker whose resident memory passes the cap mid-job: its job gets WorkerOutOfMemory."""
        while not self._closing:
            await asyncio.sleep(MEMORY_CHECK_INTERVAL)
            for worker in list(self._workers):
                if worker.job is None or worker.job.done() or worker.retired or worker.exited:
                    continue
                rss = procfs.resident_bytes(worker.pid)
                if rss > self.max_rss_bytes:
                    worker.job.set_result(("out_of_memory", rss))
                    self._retire(worker, "out_of_memory", f"{rss >> 20} MiB resident during a job, over "
                                                          f"{self.max_rss_bytes >> 20} MiB (slow.worker_max_rss_mb)")

    def _put_idle(self, worker: _Worker) -> None:
        self._idle.append(worker)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_main, daemon=True,
            args=(child_end, self.task_modules, self.nice, self.sched_idle, self.cgroup and str(self.cgroup),
                  self.max_result_bytes, self.marker),
            name="fleet-worker",
        )
        # start() asks the forkserver for a process over a socket: blocking, so not on the loop.
        await loop.run_in_executor(None, process.start)
        child_end.close()
        os.set_blocking(parent_end.fileno(), False)  # the loop reads and writes it as it has room (Sending)
        if self._closing:  # close() ran while this replacement was starting
            process.kill()
            process.join(1)
            _release(process)
            parent_end.close()
            return
        jitter = random.randint(0, self.max_jobs // 10) if self.max_jobs else 0
        worker = _Worker(process, parent_end, loop.create_future(), job_limit=self.max_jobs + jitter)
        self._workers.add(worker)
        self.counters["started"] += 1
        loop.add_reader(parent_end.fileno(), self._on_readable, worker)
        loop.add_reader(process.sentinel, self._on_exit, worker)
        try:
            broken = await asyncio.wait_for(asyncio.shield(worker.ready), self.start_timeout)
        except asyncio.TimeoutError:
            self._retire(worker, "start timeout")
            raise RuntimeError(f"worker {process.pid} did not become ready in {self.start_timeout} s") from None
        for task, failure in broken.items():
            self._setup_failed(worker, task, failure)
        worker.serving = True
        self._put_idle(worker)

    def _setup_failed(self, worker: _Worker, task: str, failure: tuple) -> None:
        worker.broken[task] = failure
        previous = self._setups.get(task)
        backoff = min(MAX_SETUP_BACKOFF, 2 * previous.backoff) if previous else 1.0
        self._setups[task] = _Setup(retry_at=time.monotonic() + backoff, backoff=backoff)
        log.error("worker %d: setup of task %s failed: %s: %s; task %s answers 503 until a retry in %.0f s "
                  "works\n%s", worker.pid, task, failure[0], failure[1], task, backoff, failure[2])

    def _task_down(self, task: str, serving: list[_Worker]) -> bool:
        """Every serving worker failed this task's setup, and no retry is due yet."""
        setup = self._setups.get(task)
        return (setup is not None and time.monotonic() < setup.retry_at and bool(serving)
                and all(task in w.broken for w in serving))

    def _setup_message(self, task: str, serving: list[_Worker]) -> str:
        type_name, message = next(w.broken[task] for w in serving)[:2]
        wait = max(0.0, self._setups[task].retry_at - time.monotonic())
        return f"task {task} is unavailable: its setup failed ({type_name}: {message}); next try in {wait:.0f} s"

    def _on_readable(self, worker: _Worker) -> None:
        if not worker.frames.read(worker.conn.fileno()):  # the worker is exiting; _on_exit reports it
            self._remove_reader(worker.conn.fileno())
            return
        self._deliver(worker)

    def _deliver(self, worker: _Worker) -> None:
        for message in worker.frames.messages():
            kind = message[0]
            if worker.ready.done() and kind in ("ready", "start_failed"):
                continue  # too late: its start already timed out
            if kind == "progress":
                if worker.on_progress is not None:
                    worker.on_progress(*message[1:4])
            elif kind == "ready":
                worker.ready.set_result(message[2])
            elif kind == "start_failed":
                log.error("worker %d could not load the task modules: %s: %s\n%s", worker.pid, *message[1:])
                worker.ready.set_exception(RuntimeError(
                    f"worker could not load the task modules: {message[1]}: {message[2]}"))
            elif worker.job is not None and not worker.job.done():
                worker.job.set_result(message)

    def _on_exit(self, worker: _Worker) -> None:
        worker.frames.drain(worker.conn.fileno())  # a reply it sent just before it exited counts
        self._deliver(worker)
        self._detach(worker)
        self._kill_group(worker)  # whatever its job started dies with it
        worker.process.join(0)
        worker.exited = True
        exitcode = worker.process.exitcode
        _release(worker.process)
        self._workers.discard(worker)
        worker.conn.close()
        if not worker.ready.done():
            worker.ready.set_exception(RuntimeError(f"worker {worker.pid} exited during start-up ({exitcode})"))
        if not worker.retired:
            log.warning("worker %d died (exit code %s)", worker.pid, exitcode)
            if worker.job is not None and not worker.job.done():
                worker.job.set_result(("died", exitcode))
        if worker.serving and not self._closing and not self._refilling:
            self._refiller = asyncio.get_running_loop().create_task(self._refill())
        self._wake_waiters()  # a waiting job re-checks: the pool may have no worker left

    @property
    def _whole(self) -> bool:
        """No worker is being killed or replaced: the pool may afford one more kill."""
        return sum(1 for w in self._workers if not w.retired) >= self.size and not self._refilling

    @property
    def _refilling(self) -> bool:
        return self._refiller is not None and not self._refiller.done()

    async def _refill(self) -> None:
        """Start workers, one after another, until the pool has `size` again; back off on failure.

        One loop for the whole pool: once a start works, the next missing worker starts at once."""
        while not self._closing and sum(1 for w in self._workers if not w.retired) < self.size:
            try:
                await self._spawn()
                self._spawn_failures = 0
            except Exception as exc:
                self._spawn_failures += 1
                self.counters["start_failed"] += 1
                delay = min(MAX_SPAWN_BACKOFF, 0.5 * 2 ** (self._spawn_failures - 1))
                log.error("could not start a worker (%s); next try in %.1f s", exc, delay)
                self._wake_waiters()  # with no worker left, waiting jobs are answered now
                await asyncio.sleep(delay)

    def _retire(self, worker: _Worker, why: str, detail: str = "") -> None:
        """Kill a worker on purpose (its job timed out or was cancelled, ...); _on_exit replaces it."""
        if worker.retired:
            return
        worker.retired = True
        if why in self.counters:
            self.counters[why] += 1
        (log.warning if why == "out_of_memory" else log.info)(
            "killing worker %d: %s", worker.pid, f"{why}: {detail}" if detail else why)
        self._kill_group(worker)

    def _kill_group(self, worker: _Worker) -> None:
        """SIGKILL the worker and every process of its group (what its job started), unless reaped."""
        if worker.exited:
            return
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:  # it died before it made its own group
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        except PermissionError:
            pass

    def _detach(self, worker: _Worker) -> None:
        if worker.sending is not None:  # before its pipe is closed: never watch a closed descriptor
            worker.sending.stop(OSError(f"worker {worker.pid} is gone"))
        self._remove_reader(worker.conn.fileno() if not worker.conn.closed else -1)
        self._remove_reader(worker.process.sentinel)

    @staticmethod
    def _remove_reader(fd: int) -> None:
        if fd < 0:
            return
        try:
            asyncio.get_running_loop().remove_reader(fd)
        except (OSError, ValueError):
            pass


def _release(process: multiprocessing.process.BaseProcess) -> None:
    """Close a reaped worker's two descriptors (its sentinel and a pipe end the forkserver start
    keeps) now: left to the garbage collector, they stayed open while anything still referred to
    the worker, and `make soak` saw the slow instance hold 2 more after every killed worker."""
    try:
        process.close()
    except ValueError:  # not reaped yet (a worker that would not die): its descriptors stay open
        pass


def _kill_leftovers(marker: str) -> None:
    """SIGKILL processes a previous run of this pool left behind (children of a killed worker)."""
    wanted = f"{WORKER_MARKER}={marker}"
    for pid in procfs.pids():
        if pid != os.getpid() and wanted in procfs.environ(pid):
            log.warning("killing process %s left behind by a previous worker", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
