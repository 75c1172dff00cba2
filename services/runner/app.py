"""The job runner program: claims this host's share of the queued long jobs and starts each in a job
process of its own (services/slow/job_process.py), which outlives the runner; reaps the jobs of
runners and job processes gone silent; sweeps the store. Its port answers /healthz and /metrics.

    python -m services.runner --settings .run/settings.json

A restart (`make reload`) or a kill -9 of the runner, or of the slow instance that took a job,
stops no running job: the job processes run on, and a runner that starts again counts them
against runner.workers (by their owner names in the store) before it claims more.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from tornado import web

from services.common import logs, metrics, procfs, server, temp_dir
from services.common.settings import Settings
from services.common.web import HealthHandler, MetricsHandler, NotFoundHandler
from services.slow import cpu_priority, jobs, registry
from services.slow.app import make_store, store_label
from services.slow.job_process import JOB_PROCESSES
from services.slow.job_runner import JobRunner
from services.slow.job_store import AsyncStore, Job, StoreUnavailable

log = logging.getLogger("fleet.runner")


class JobProcesses:
    """Starts a job process per claimed job, in a session of its own (out of the runner's process
    group: supervisor's stop or kill of the runner does not reach it). Its log lines go to the
    runner's own output (logs/runner-01.log, which supervisor rotates and which the fleet's user may
    write): those of a job process whose runner was restarted are lost (Python ignores SIGPIPE; the
    job goes on), its job's fate is in the store."""

    def __init__(self, instance: server.Instance):
        self.settings = instance.settings
        # This host's job processes, whichever of its runners started them: they share the capacity.
        self.prefix = f"{self.settings.inventory.here.name}.jobs/"
        self.children: set[asyncio.subprocess.Process] = set()
        self.lost: Callable[[str], Awaitable[None]] = _nothing  # the runner's: its jobs reaped at once
        # Each job process's temporary files (its worker pool's forkserver socket, what its task
        # writes) go to a directory of its own here (TMPDIR), removed once it is gone: one killed -9
        # leaves them behind, and the soak found one pymp-* directory in /tmp per killed process.
        # (Not for a run dir so deep that the forkserver's socket path, TMPDIR + 32 characters,
        # would pass the 107 bytes a Unix socket's path may have: the system's then.)
        self.temp_root = self.settings.run_dir / "home" / "jt"

    def owner(self) -> str:
        return f"{self.prefix}{secrets.token_hex(8)}"

    def temp_dir(self, owner: str) -> Path:
        return self.temp_root / owner.rsplit("/", 1)[1]

    def sweep_temp_dirs(self) -> int:
        """Remove the temporary directories of job processes that are gone (killed while no runner
        was their parent, or before a runner's restart); returns how many went."""
        # Only directories older than a sweep: one made for a job process that is only starting
        # (its command line not yet there) stays.
        settled = time.time() - TEMP_SWEEP_EVERY
        try:
            names = [entry.name for entry in os.scandir(self.temp_root) if entry.stat().st_mtime < settled]
        except FileNotFoundError:
            return 0
        if not names:
            return 0
        alive = {word.rsplit("/", 1)[1] for pid in procfs.pids() if "services.slow.job_process" in (cmd := procfs.cmdline(pid))
                 for word in cmd.split() if word.startswith(self.prefix)}
        gone = [name for name in names if name not in alive]
        for name in gone:
            shutil.rmtree(self.temp_root / name, ignore_errors=True)
        return len(gone)

    async def __call__(self, claimed: list[Job], owner: str) -> None:
        # At the workers' niceness (slow.nice) from its first instruction, not the runner's: its own start
        # (an interpreter, the task modules, a forkserver) is CPU the fast path must not wait behind.
        lower = max(0, self.settings.slow.nice - os.getpriority(os.PRIO_PROCESS, 0))
        args = ["nice", "-n", str(lower), sys.executable, "-m", "services.slow.job_process",
                "--settings", str(self.settings.run_dir / "settings.json"), "--owner", owner]
        args += [f"--job={job.id}" for job in claimed]  # one word each: an id may start with "-"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        temp = self.temp_dir(owner)
        if len(str(temp)) <= temp_dir.MAX_CHARS:
            temp.mkdir(parents=True, exist_ok=True)
            env["TMPDIR"] = str(temp)
        process = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
            cwd=str(Path(__file__).resolve().parents[2]), env=env)
        log.info("job %s (%s) started in job process %d", ", ".join(j.id for j in claimed), claimed[0].task,
                 process.pid)
        self.children.add(process)
        asyncio.get_running_loop().create_task(self._wait(process, owner))

    async def _wait(self, process: asyncio.subprocess.Process, owner: str) -> None:
        """Reap it when it exits (while this runner lives; else its new parent, init, does). One
        that failed (it could not start, it was killed) may have left its jobs running in the store:
        they are taken for lost now, not a lease later."""
        try:
            code = await process.wait()
            if code != 0:
                log.warning("job process %d exited with status %d", process.pid, code)
                await self.lost(owner)
        finally:
            self.children.discard(process)
            shutil.rmtree(self.temp_dir(owner), ignore_errors=True)


async def _nothing(owner: str) -> None:
    return None


class RunnerHealthHandler(HealthHandler):
    """GET /healthz: 503 "degraded" while the store does not answer."""

    runner: JobRunner
    processes: JobProcesses

    def figures(self) -> dict:
        return {"job_processes": len(self.processes.children), "capacity": self.runner.capacity,
                "store": "unavailable" if self.runner.watcher.down else "ok"}

    def unhealthy(self, figures: dict) -> str | None:
        return "the job store does not answer" if figures["store"] != "ok" else None


def make_app(instance: server.Instance, runner: JobRunner, processes: JobProcesses) -> web.Application:
    settings = server.app_settings(instance)
    return web.Application(
        [(r"/healthz", RunnerHealthHandler, {"runner": runner, "processes": processes, "route_pattern": "/healthz"}),
         (r"/metrics", MetricsHandler)],
        default_handler_class=NotFoundHandler, **settings)


async def run(instance: server.Instance) -> None:
    fleet = instance.settings
    tasks = registry.load(fleet.slow.task_modules)
    if fleet.slow.idle_cgroup:
        # The job processes' shared idle cgroup, made now rather than by the first of them: it is
        # there from the fleet's start, as the slow instances' are (root's deploy made it already).
        cpu_priority.create_idle_cgroup(cpu_priority.group_name(JOB_PROCESSES, fleet.run_dir),
                                        fleet.run_dir / cpu_priority.RECORD)
    store = AsyncStore(make_store(fleet))
    processes = JobProcesses(instance)
    runner = JobRunner(store, None, fleet, f"{fleet.inventory.here.name}.{instance.name}", tasks,
                       capacity=fleet.runner.workers, spawn=processes)
    runner.cluster_cap = fleet.long_job_cluster_cap
    runner.store_label = store_label(fleet)
    runner.tallies = metrics.export_job_tallies(jobs.endings())  # the store's counts of jobs started and ended
    processes.lost = runner.lost
    sweeping = asyncio.get_running_loop().create_task(_sweep_temp_dirs(processes))
    await start_runner(runner)
    try:
        await server.serve(make_app(instance, runner, processes), instance)
    finally:
        sweeping.cancel()
        await runner.close()
        store.close()


TEMP_SWEEP_EVERY = 5.0  # seconds between looks for the temporary directories of job processes gone


async def _sweep_temp_dirs(processes: JobProcesses) -> None:
    while True:
        try:
            processes.sweep_temp_dirs()
        except OSError as exc:  # never the runner's end: say so, look again
            log.warning("could not sweep the job processes' temporary directories: %s", exc)
        await asyncio.sleep(TEMP_SWEEP_EVERY)


async def start_runner(runner: Any, retry_every: float = 0.5) -> None:
    """Start once the store answers (the fleet's own starts first, but supervisord does not wait
    for it to listen); until then nothing listens on the runner's port."""
    said = False
    while True:
        try:
            await runner.start()
            return
        except StoreUnavailable as exc:
            if not said:
                log.warning("waiting for the job store: %s", exc)
                said = True
            await asyncio.sleep(retry_every)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.runner", description=__doc__.split("\n")[0])
    parser.add_argument("--settings", required=True, help="the settings snapshot deploy rendered")
    parser.add_argument("--instance", default="1", choices=["1"], help="one runner per host")
    options = parser.parse_args(argv)
    settings = Settings.from_snapshot(options.settings)
    instance = server.Instance("runner", 1, settings)
    logs.setup(instance.name, failed_request_lines_per_second=settings.observe.failed_request_lines_per_second)
    os.nice(instance.settings.slow.instance_nice)  # below the fast instances, as a slow instance
    server.run(instance, lambda: run(instance))
