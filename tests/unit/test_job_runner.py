"""A job process's life (job_runner.JobRunner.run_given): the jobs its runner claimed for it, then
the next queued ones it claims itself within its window, then it leaves; on a real SQLite store,
with an inline pool."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

from services.common.settings import load
from services.slow import registry
from services.slow.inline_pool import InlinePool
from services.slow.job_runner import JobRunner
from services.slow.job_store import QUEUED, SUCCEEDED, AsyncStore, NewJob, SqliteStore, new_id

OWNER = "host.jobs/0123abcd"


def life(tmp_path: Path, more_until: float, stop_first: bool = False) -> list[str]:
    """Three queued fib jobs; a job process given the first: the states the three end in."""
    store = AsyncStore(SqliteStore(tmp_path / "jobs.sqlite", ttl=60))
    tasks = registry.load("services.slow.tasks")
    ids = []
    for n in (5, 6, 7):
        job, _ = store.sync.create(NewJob(id=new_id(), task="fib", client="10.0.0.1", kwargs={"n": n}))
        ids.append(job.id)

    async def main() -> None:
        given = await store.claim(OWNER, ["fib"], 1)
        runner = JobRunner(store, InlinePool("services.slow.tasks"), load(env={}), OWNER, tasks, capacity=0,
                           owner=OWNER)
        await runner.start(runner=False)
        try:
            if stop_first:
                runner.stop_all()  # SIGTERM (make stop): what it was given fails shutting_down, nothing more is claimed
            await asyncio.wait_for(runner.run_given(given, more_until=more_until), 30)
        finally:
            await runner.close()

    try:
        asyncio.run(main())
        return [store.sync.get(job_id).state for job_id in ids]
    finally:
        store.close()


def test_within_its_window_a_job_process_claims_and_runs_the_queued_jobs_then_leaves(tmp_path):
    assert life(tmp_path, more_until=time.monotonic() + 30) == [SUCCEEDED] * 3


def test_past_its_window_a_job_process_runs_only_what_it_was_given(tmp_path):
    assert life(tmp_path, more_until=-math.inf) == [SUCCEEDED, QUEUED, QUEUED]


def test_a_stopped_job_process_claims_nothing_more(tmp_path):
    states = life(tmp_path, more_until=time.monotonic() + 30, stop_first=True)
    assert states[1:] == [QUEUED, QUEUED], states
