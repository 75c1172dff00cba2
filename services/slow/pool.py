"""The slow instance's worker pool: W processes, one pipe each, watched by the event loop.

One small interface, so that something else (a Dask cluster) can stand behind it later:

    async with WorkerPool(size=2, task_modules="services.slow.tasks", nice=10) as pool:
        result, elapsed_ms = await pool.run("fib", {"n": 25}, timeout=30)

`run` returns the task's result or raises one of JobFailed (the task raised: 500), JobTimeout
(past its deadline, the worker was killed and replaced: 504), WorkerDied (the worker exited
mid-job: 502). Cancelling `run` (the client went away) kills the worker running the job.

Why not concurrent.futures.ProcessPoolExecutor or pebble (../shared/notes.md has the measurements):
one dead worker breaks a whole ProcessPoolExecutor, its running jobs cannot be killed, and its call
queue prefetches jobs onto workers; pebble kills on timeout, but a job cancelled while queued inside
it kills some other worker later, and it has open races (#153, #163). Here each job is sent to one
idle worker over that worker's own pipe, so the pool knows which process runs which job: a timeout
or a cancel kills exactly that process, a crash fails exactly its job, and nothing is ever queued
where it cannot be withdrawn (the caller's admission control holds waiting jobs).

Workers are started with forkserver (never fork: a forked worker would inherit the server's
listening socket and keep the port after the server dies), are niced, and die with their parent.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from services.slow import cpu_priority

log = logging.getLogger("fleet.pool")

PR_SET_PDEATHSIG = 1


class JobError(Exception):
    """Base of the errors a job can end with."""


class JobFailed(JobError):
    """The task raised; type and message go to the client, the traceback to the log."""

    def __init__(self, type_name: str, message: str, traceback_text: str):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text


class JobTimeout(JobError):
    """The job ran past its deadline; its worker was killed and replaced."""


class WorkerDied(JobError):
    """The worker running the job exited (crash, OOM kill, kill -9); the pool replaces it."""

    def __init__(self, pid: int, exitcode: int | None):
        how = f"signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
        super().__init__(f"worker {pid} died ({how})")
        self.pid = pid
        self.exitcode = exitcode


# --- inside a worker process ---------------------------------------------------------------------

def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when its parent (the forkserver) exits.

    The forkserver exits as soon as the instance that owns it dies, even by SIGKILL, so no worker
    outlives its instance and keeps a CPU or a file busy.
    """
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _error_reply(exc: BaseException) -> tuple:
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not take the worker down
        message = "<unprintable message>"
    return ("error", type(exc).__name__, message[:2000], traceback.format_exc())


def worker_main(conn: Connection, task_modules: str, nice: int, sched_idle: bool = False,
                cgroup: str | None = None) -> None:
    """A worker's whole life: set up once, then run one job at a time from its pipe."""
    _die_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent stops us; no Python-level handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is for the server
    signal.set_wakeup_fd(-1)
    os.nice(nice)
    if sched_idle:
        # Below every normal process, not just behind it: a waking event loop or nginx worker
        # preempts this worker at once, on any kernel scheduler (nice alone only tilts shares).
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if cgroup is not None:
        cpu_priority.join(Path(cgroup))  # below every other group, not only this session's
    from services.slow import registry  # imported here: the forkserver preloads it

    try:
        tasks = registry.load(task_modules)
        state = {name: t.setup() for name, t in tasks.items() if t.setup is not None}
    except BaseException as exc:
        conn.send(("setup_failed",) + _error_reply(exc)[1:])
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            name, kwargs = conn.recv()
        except (EOFError, OSError):
            return  # the pool closed our pipe: shut down
        started = time.perf_counter()
        try:
            t = tasks[name]
            result = t.fn(state[name], **kwargs) if t.setup is not None else t.fn(**kwargs)
            reply: tuple = ("ok", result, 1000 * (time.perf_counter() - started))
        except BaseException as exc:  # converted here, so only plain strings cross the pipe
            reply = _error_reply(exc)
        try:
            conn.send(reply)
        except Exception as exc:  # the result (or something in it) does not pickle
            conn.send(_error_reply(exc))


# --- in the server's event loop ------------------------------------------------------------------

@dataclass(eq=False)
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    ready: asyncio.Future
    job: asyncio.Future | None = None
    retired: bool = False  # killed on purpose; its exit is expected
    serving: bool = False  # became ready and joined the pool; its exit calls for a replacement
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid


class WorkerPool:
    def __init__(self, size: int, task_modules: str, nice: int = 10, start_timeout: float = 60,
                 sched_idle: bool = False, idle_cgroup: str | None = None):
        self.size = size
        self.task_modules = task_modules
        self.nice = nice
        self.sched_idle = sched_idle
        # An idle cpu cgroup for the workers (cpu_priority.py), named per instance; None: none.
        self.cgroup = cpu_priority.create_idle_cgroup(idle_cgroup) if idle_cgroup else None
        self.start_timeout = start_timeout
        self._ctx = multiprocessing.get_context("forkserver")
        # Workers fork from a server that has already imported the task code: a replacement is
        # ready in milliseconds, with no import in its start-up.
        modules = ["services.slow.registry"] + [m.strip() for m in task_modules.split(",")]
        self._ctx.set_forkserver_preload(modules)
        self._workers: set[_Worker] = set()
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._closing = False
        self._replacing: set[asyncio.Task] = set()  # strong references, as asyncio asks
        self.counters = {"started": 0, "ok": 0, "error": 0, "timeout": 0, "crashed": 0, "cancelled": 0}

    # lifecycle

    async def __aenter__(self) -> "WorkerPool":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self) -> None:
        """Start every worker and wait until each has run its setups (call before binding a port)."""
        await asyncio.gather(*(self._spawn() for _ in range(self.size)))

    async def close(self, timeout: float = 5) -> None:
        """Stop every worker: close their pipes (they exit), kill whoever is still there after `timeout`."""
        self._closing = True
        workers = list(self._workers)
        for w in workers:
            self._detach(w)
            w.conn.close()
        deadline = time.monotonic() + timeout
        for w in workers:
            while w.process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if w.process.is_alive():
                w.process.kill()
            w.process.join(1)
        self._workers.clear()
        if self.cgroup is not None:
            cpu_priority.remove(self.cgroup)

    # the interface

    async def run(self, task: str, kwargs: dict, timeout: float) -> tuple[Any, float]:
        """Run one job on an idle worker; return (result, elapsed_ms) or raise a JobError."""
        worker = await self._idle_worker()
        worker.job = job = asyncio.get_running_loop().create_future()
        try:
            worker.conn.send((task, kwargs))
        except (OSError, ValueError):  # the pipe broke: the worker is gone or going
            self._retire(worker, "crashed")
            raise WorkerDied(worker.pid, None) from None
        try:
            async with asyncio.timeout(timeout):
                reply = await job
        except TimeoutError:
            self._retire(worker, "timeout")
            raise JobTimeout(f"job {task} passed its {timeout:g} s deadline") from None
        except asyncio.CancelledError:
            self._retire(worker, "cancelled")
            raise
        worker.job = None
        status = reply[0]
        if status == "died":
            self.counters["crashed"] += 1
            raise WorkerDied(worker.pid, reply[1])
        self._idle.put_nowait(worker)
        if status == "ok":
            self.counters["ok"] += 1
            return reply[1], reply[2]
        self.counters["error"] += 1
        raise JobFailed(*reply[1:])

    async def _idle_worker(self) -> _Worker:
        # Waits only while a replacement worker is starting: the caller's admission control never
        # lets more jobs in than there are workers.
        while True:
            worker = await self._idle.get()
            if worker in self._workers and not worker.retired:
                return worker  # else it died while idle (after sending its last reply): skip it

    def stats(self) -> dict:
        serving = [w for w in self._workers if w.serving and not w.retired]  # not the ones being killed
        return {
            "workers": len(serving),
            "busy": sum(1 for w in serving if w.job is not None),
            "pids": sorted(w.pid for w in serving),
            **self.counters,
        }

    # workers

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_main, daemon=True,
            args=(child_end, self.task_modules, self.nice, self.sched_idle, self.cgroup and str(self.cgroup)),
            name="fleet-worker",
        )
        # start() asks the forkserver for a process over a socket: blocking, so not on the loop.
        await loop.run_in_executor(None, process.start)
        child_end.close()
        if self._closing:  # close() ran while this replacement was starting
            process.kill()
            process.join(1)
            parent_end.close()
            return
        worker = _Worker(process, parent_end, loop.create_future())
        self._workers.add(worker)
        self.counters["started"] += 1
        loop.add_reader(parent_end.fileno(), self._on_message, worker)
        loop.add_reader(process.sentinel, self._on_exit, worker)
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), self.start_timeout)
        except asyncio.TimeoutError:
            self._retire(worker, "start timeout")
            raise RuntimeError(f"worker {process.pid} did not become ready in {self.start_timeout} s") from None
        worker.serving = True
        self._idle.put_nowait(worker)

    def _on_message(self, worker: _Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
            return  # the worker is exiting; _on_exit reports it
        except Exception as exc:
            # The reply arrived whole but does not unpickle here (bpo-31699): the pipe is still in
            # step, so fail this job alone and keep the worker.
            message = ("error", type(exc).__name__, f"the job's reply could not be read: {exc}",
                       traceback.format_exc())
        kind = message[0]
        if kind == "ready":
            worker.ready.set_result(message[1])
        elif kind == "setup_failed":
            log.error("worker %d: task setup failed: %s: %s\n%s", worker.pid, *message[1:])
            worker.ready.set_exception(RuntimeError(f"task setup failed: {message[1]}: {message[2]}"))
        elif worker.job is not None and not worker.job.done():
            worker.job.set_result(message)

    def _on_exit(self, worker: _Worker) -> None:
        self._detach(worker)
        worker.process.join(0)
        exitcode = worker.process.exitcode
        self._workers.discard(worker)
        worker.conn.close()
        if not worker.ready.done():
            worker.ready.set_exception(RuntimeError(f"worker {worker.pid} exited during start-up ({exitcode})"))
        if not worker.retired:
            log.warning("worker %d died (exit code %s)", worker.pid, exitcode)
            if worker.job is not None and not worker.job.done():
                worker.job.set_result(("died", exitcode))
        if worker.serving and not self._closing:
            replacing = asyncio.get_running_loop().create_task(self._replace(worker))
            self._replacing.add(replacing)
            replacing.add_done_callback(self._replacing.discard)

    async def _replace(self, dead: _Worker) -> None:
        while not self._closing:
            try:
                await self._spawn()
                return
            except Exception:
                log.exception("could not replace worker %d; trying again in 1 s", dead.pid)
                await asyncio.sleep(1)

    def _retire(self, worker: _Worker, why: str) -> None:
        """Kill a worker on purpose (its job timed out or was cancelled); _on_exit replaces it."""
        if worker.retired:
            return
        worker.retired = True
        if why in self.counters:
            self.counters[why] += 1
        log.info("killing worker %d: %s", worker.pid, why)
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _detach(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        for fd in (worker.conn, worker.process.sentinel):
            try:
                loop.remove_reader(fd if isinstance(fd, int) else fd.fileno())
            except (OSError, ValueError):
                pass


class InlinePool:
    """The same interface, run in the calling process: for handler tests that need no subprocesses.

    It does not enforce deadlines or survive crashes; tests of those use WorkerPool.
    """

    def __init__(self, task_modules: str):
        from services.slow import registry

        self.tasks = registry.load(task_modules)
        self.state: dict[str, Any] = {}
        self.size = 1
        self.counters = {"ok": 0, "error": 0}

    async def run(self, task: str, kwargs: dict, timeout: float) -> tuple[Any, float]:
        t = self.tasks[task]
        started = time.perf_counter()
        try:
            if t.setup is not None:
                if task not in self.state:
                    self.state[task] = t.setup()
                result = t.fn(self.state[task], **kwargs)
            else:
                result = t.fn(**kwargs)
        except Exception as exc:
            self.counters["error"] += 1
            raise JobFailed(*_error_reply(exc)[1:]) from None
        self.counters["ok"] += 1
        return result, 1000 * (time.perf_counter() - started)

    def stats(self) -> dict:
        return {"workers": 0, "busy": 0, **self.counters}
