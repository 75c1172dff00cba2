"""The real WorkerPool: forkserver processes, failures that stay with their job, kills, refills."""

from __future__ import annotations

import asyncio
import multiprocessing.forkserver
import os
import signal
import time
from pathlib import Path
from typing import Awaitable, Callable

import pytest

from services.slow.pool import JobFailed, JobTimeout, WorkerDied, WorkerPool

MODULES = "services.slow.tasks,tests.support.faulty_tasks"


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def forkserver_children() -> set[int]:
    """Live processes forked by this test process's forkserver: the pool workers."""
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    if server is None:
        return set()
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == server and fields[0] != "Z":
            children.add(int(entry.name))
    return children


async def eventually(check: Callable[[], bool], timeout: float = 5, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.02)


def with_pool(body: Callable[[WorkerPool], Awaitable[None]], size: int = 2, nice: int = 0,
              modules: str = MODULES, sched_idle: bool = False) -> None:
    """Run `body(pool)` in a fresh event loop; the pool is closed whatever happens."""
    async def main():
        pool = WorkerPool(size, modules, nice=nice, sched_idle=sched_idle)
        await pool.start()
        try:
            await body(pool)
        finally:
            await pool.close()

    asyncio.run(main())


async def refilled(pool: WorkerPool, gone: int, before: list[int]) -> list[int]:
    """Wait until the pool is back to full size without `gone`; return its pids."""
    await eventually(lambda: len(pool.stats()["pids"]) == pool.size and gone not in pool.stats()["pids"],
                     what=f"pool refilled to {pool.size} without worker {gone}")
    pids = pool.stats()["pids"]
    assert len(set(pids) - set(before)) == 1, f"exactly one new worker expected: {before} -> {pids}"
    return pids


def test_pool_starts_its_workers_and_returns_a_fib_result():
    async def body(pool):
        stats = pool.stats()
        assert stats["workers"] == len(stats["pids"]) == 2 and stats["busy"] == 0
        result, elapsed_ms = await pool.run("fib", {"n": 25}, timeout=10)
        assert result == 75025
        assert elapsed_ms > 0
        worker_pid, _ = await pool.run("pid", {}, timeout=10)
        assert worker_pid in stats["pids"] and worker_pid != os.getpid()
        assert pool.counters["ok"] == 2 and pool.stats()["busy"] == 0

    with_pool(body)


def test_jobs_on_both_workers_run_at_the_same_time():
    async def body(pool):
        jobs = asyncio.gather(*(pool.run("spin", {"seconds": 0.4}, timeout=10) for _ in range(2)))
        await eventually(lambda: pool.stats()["busy"] == 2, what="both workers busy at once")
        results = await jobs
        assert [r for r, _ in results] == [0.4, 0.4]
        assert pool.stats()["busy"] == 0

    with_pool(body)


@pytest.mark.parametrize("task, type_name, message", [
    ("raise_error", "ValueError", "this task always raises"),
    ("raise_unpicklable", "Unpicklable", "x/y"),
    ("return_unpicklable", None, "pickle"),
])
def test_a_failing_job_raises_job_failed_and_the_pool_keeps_working(task, type_name, message):
    async def body(pool):
        before = pool.stats()["pids"]
        with pytest.raises(JobFailed) as info:
            await pool.run(task, {}, timeout=10)
        if type_name is not None:
            assert info.value.type_name == type_name
        assert message in info.value.message.lower() or message in info.value.message
        assert "Traceback" in info.value.traceback_text
        assert pool.counters["error"] == 1
        # the same workers, all still serving
        assert (await pool.run("fib", {"n": 10}, timeout=10))[0] == 55
        assert pool.stats()["pids"] == before and pool.counters["started"] == 2

    with_pool(body)


@pytest.mark.parametrize("task, exitcode", [
    ("exit_worker", 3),
    ("segfault_worker", -signal.SIGSEGV),
])
def test_a_dying_worker_fails_only_its_own_job_and_is_replaced(task, exitcode):
    async def body(pool):
        before = pool.stats()["pids"]
        died, fib = await asyncio.gather(
            pool.run(task, {}, timeout=10), pool.run("fib", {"n": 27}, timeout=10), return_exceptions=True,
        )
        assert isinstance(died, WorkerDied), died
        assert died.exitcode == exitcode and died.pid in before
        assert fib[0] == 196418  # the job on the other worker was untouched
        assert pool.counters["crashed"] == 1
        after = await refilled(pool, died.pid, before)
        assert pool.counters["started"] == 3
        results = await asyncio.gather(*(pool.run("pid", {}, timeout=10) for _ in range(2)))
        assert sorted(pid for pid, _ in results) == after

    with_pool(body)


def test_a_job_past_its_deadline_raises_job_timeout_and_its_worker_is_killed_and_replaced():
    async def body(pool):
        before = pool.stats()["pids"]
        started = time.monotonic()
        with pytest.raises(JobTimeout, match="deadline"):
            await pool.run("spin", {"seconds": 30}, timeout=0.3)
        assert time.monotonic() - started < 10  # not the job's 30 s
        assert pool.counters["timeout"] == 1
        after = await refilled(pool, -1, before)
        (killed,) = set(before) - set(after)
        await eventually(lambda: not alive(killed), what=f"worker {killed} gone")
        with pytest.raises(ProcessLookupError):
            os.kill(killed, 0)
        assert (await pool.run("fib", {"n": 10}, timeout=10))[0] == 55

    with_pool(body)


def test_cancelling_a_running_job_kills_its_worker():
    async def body(pool):
        before = pool.stats()["pids"]
        job = asyncio.create_task(pool.run("spin", {"seconds": 30}, timeout=60))
        await eventually(lambda: pool.stats()["busy"] == 1, what="job running")
        await asyncio.sleep(0.1)  # the worker is spinning now
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert pool.counters["cancelled"] == 1
        after = await refilled(pool, -1, before)
        (busy_pid,) = set(before) - set(after)
        await eventually(lambda: not alive(busy_pid), what=f"worker {busy_pid} gone")
        assert (await pool.run("fib", {"n": 10}, timeout=10))[0] == 55

    with_pool(body)


def test_workers_run_with_the_requested_niceness():
    base = os.getpriority(os.PRIO_PROCESS, 0)

    async def body(pool):
        pids = pool.stats()["pids"]
        assert len(pids) == 2
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids] == [min(base + 5, 19)] * 2
        assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the server itself is not niced

    with_pool(body, nice=5)


def test_workers_can_run_under_sched_idle_below_every_normal_process():
    async def body(pool):
        pids = pool.stats()["pids"]
        assert [os.sched_getscheduler(pid) for pid in pids] == [os.SCHED_IDLE] * 2
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the server itself keeps its priority
        result, _ = await pool.run("fib", {"n": 15}, timeout=10)
        assert result == 610

    with_pool(body, sched_idle=True)


def test_after_close_no_worker_process_remains():
    before = forkserver_children()
    seen: list[int] = []

    async def main():
        pool = WorkerPool(2, MODULES, nice=0)
        await pool.start()
        seen.extend(pool.stats()["pids"])
        assert set(seen) <= forkserver_children()
        await pool.run("fib", {"n": 10}, timeout=10)
        await pool.close()
        assert pool.stats()["workers"] == 0
        assert not [pid for pid in seen if alive(pid)]
        await asyncio.sleep(0.3)  # nothing comes back while the loop keeps running
        assert forkserver_children() - before == set()

    asyncio.run(main())
    assert len(seen) == 2


def test_a_pool_whose_task_modules_fail_to_import_refuses_to_start():
    async def main():
        pool = WorkerPool(1, "services.slow.no_such_module", nice=0)
        before = forkserver_children()
        with pytest.raises(RuntimeError, match="task setup failed: ModuleNotFoundError"):
            await pool.start()
        await pool.close()
        await eventually(lambda: forkserver_children() <= before, what="the failed worker gone")

    asyncio.run(main())


def test_close_during_a_replacement_leaves_no_worker_behind():
    before = forkserver_children()

    async def main():
        pool = WorkerPool(2, MODULES, nice=0)
        await pool.start()
        with pytest.raises(WorkerDied):
            await pool.run("exit_worker", {}, timeout=10)
        await asyncio.sleep(0)  # the replacement starts, as it would while a server is serving
        await pool.close()
        await asyncio.sleep(0.5)
        assert forkserver_children() - before == set()

    asyncio.run(main())


def test_a_result_that_cannot_be_unpickled_fails_its_job_at_once():
    async def body(pool):
        with pytest.raises(JobFailed):
            await pool.run("return_unloadable", {}, timeout=1)

    with_pool(body, size=1, modules=MODULES + ",tests.unit.reply_tasks")
