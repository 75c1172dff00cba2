"""A job process: runs the long job (or the identical jobs) a runner claimed for it, and nothing
else, then exits. Started by the runner (services/runner) in a session of its own, it outlives the
runner: a restart of the runner (`make reload`), or a kill -9 of it, stops no job.

    python -m services.slow.job_process --settings .run/settings.json --owner web1.runner/3f2a... --job <id>

It is a JobRunner (job_runner.py) with no room to claim: it runs its jobs on a pool of one worker
of its own (pool.py; on the Dask backend, on the cluster: dask_pool.py), where the job's deadline,
memory cap and worker death are answered as for any job, writes their progress and end under its owner name, with their attempt (a late write of a
run taken for lost is refused), beats that owner name (its jobs' lease), stops a job cancelled
anywhere, and lets identical jobs queued meanwhile join its run. Killed (kill -9, its host lost),
its worker dies with it and its jobs are reaped by a runner a lease later. SIGTERM (`make stop`)
stops its jobs: failed `shutting_down`, retryable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import Any

from services.common import logs
from services.common.settings import Settings
from services.slow import cpu_priority, registry
from services.slow.job_runner import JobRunner
from services.slow.job_store import AsyncStore
from services.slow.pool import WorkerPool

log = logging.getLogger("fleet.jobs")

JOB_PROCESSES = "job-processes"  # the owner name of the idle cgroup their workers share


async def run(settings_path: str, owner: str, job_ids: list[str]) -> None:
    from services.slow.app import make_store  # the one place that picks the store

    fleet = Settings.from_snapshot(settings_path)
    tasks = registry.load(fleet.slow.task_modules)
    store = AsyncStore(make_store(fleet))
    try:
        given = [job for job in [await store.get(job_id) for job_id in job_ids]
                 if job is not None and job.owner == owner]  # claimed for this process, and not reaped meanwhile
        if not given:
            return
        async with make_pool(fleet, owner) as pool:
            if getattr(pool, "cgroup", None) is not None:
                # With its worker, below every other group: its loop (progress, beats) is no fast path.
                cpu_priority.join(pool.cgroup)
            runner = JobRunner(store, pool, fleet, owner, tasks, capacity=0, owner=owner)
            await runner.start(runner=False)
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, runner.stop_all)
            try:
                await runner.run_given(given)
            finally:
                await runner.close()
    finally:
        store.close()


def make_pool(fleet: Settings, owner: str) -> Any:
    """Where its job runs: a worker of its own (local backend), or the Dask cluster, as a job of
    a synchronous request would."""
    if fleet.slow.backend == "dask":
        from services.slow.dask_pool import DaskPool  # imports Dask only where it is used

        pool = DaskPool(fleet)
        pool.reply_topic = f"fleet-results/{owner}"  # its own: job processes never read each other's results
        pool.kill_on_cancel = True
        return pool
    # Its worker's marker is its own (a pool kills what its own previous run left behind); the idle
    # cgroup is the host's job processes' one (deploy makes it: programs.idle_cgroup_owners).
    return WorkerPool.from_settings(fleet, 1, owner=owner.replace("/", "-"), kill_on_cancel=True,
                                    cgroup_owner=JOB_PROCESSES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.slow.job_process", description=__doc__.split("\n")[0])
    parser.add_argument("--settings", required=True, help="the settings snapshot deploy rendered")
    parser.add_argument("--owner", required=True, help="the owner name its runner claimed the jobs under")
    parser.add_argument("--job", action="append", required=True, help="a claimed job's id (one per identical job)")
    options = parser.parse_args(argv)
    logs.setup(f"job-{os.getpid()}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the runner, not its jobs
    asyncio.run(run(options.settings, options.owner, options.job))


if __name__ == "__main__":
    main()
