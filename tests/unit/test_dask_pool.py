"""The Dask pool's own logic, without a cluster: its share of the cluster's threads, its answers
when the cluster cannot take a job. The cluster itself is tested for real in the integration tier."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest

from bench.procs import free_port_block, port_is_free
from services.common.settings import load
from services.slow.dask_pool import GRACE, DaskPool, version_mismatch
from services.slow.job_store import StoreUnavailable
from services.slow.jobs import BackendUnavailable, JobTimeout, NoWorkers
from tests.support.waiting import eventually, wait_for


class FakeClient:
    """What DaskPool reads of a client: the scheduler's identity, and its topic subscriptions."""
    status = "running"

    def __init__(self, nthreads: dict[str, int], scheduler_id: str = "scheduler-1"):
        self.threads = nthreads
        self.scheduler = self  # client.scheduler.identity(...): an rpc to the scheduler
        self.scheduler_id = scheduler_id
        self.subscriptions: list[str] = []

    async def identity(self, n_workers: int = -1) -> dict:
        return {"id": self.scheduler_id, "n_workers": len(self.threads), "total_threads": sum(self.threads.values())}

    def subscribe_topic(self, topic: str, handler) -> None:
        self.subscriptions.append(topic)


class Heard:
    """The admission in front of the pool (jobs.Line): what it is told of the cluster's capacity."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def resize(self, slots: int) -> None:
        self.sizes.append(slots)

    def others_waiting(self, client: str) -> bool:
        return False


def pool_for(number: int, instances: int = 3, line: Heard | None = None) -> DaskPool:
    settings = load(env={"FLEET_SLOW_BACKEND": "dask", "FLEET_SLOW_INSTANCES": str(instances),
                         "FLEET_DASK_WORKERS": "4"})
    return DaskPool(settings, number, line=line)


@pytest.mark.parametrize("threads, shares", [(7, [3, 2, 2]), (3, [1, 1, 1]), (1, [1, 1, 1]), (0, [1, 1, 1])])
def test_each_instance_gets_its_share_of_the_cluster_s_threads_and_hears_of_changes(threads, shares):
    async def main():
        got = []
        for number in (1, 2, 3):
            line = Heard()
            heard = line.sizes
            pool = pool_for(number, line=line)
            pool.client = FakeClient({f"w{i}": 1 for i in range(threads)})
            before = pool.size  # deploy's estimate, until the cluster says
            await pool._read_capacity()
            got.append(pool.size)
            assert heard == ([] if pool.size == before else [pool.size])  # told only when it changed
        assert got == shares

    asyncio.run(main())


def test_the_threads_long_jobs_hold_are_left_out_of_the_share_and_a_silent_store_keeps_the_last_reading():
    async def main():
        running = [0]

        async def long_jobs() -> int:
            if running[0] < 0:
                raise StoreUnavailable("down")
            return running[0]

        line = Heard()
        pool = pool_for(1, instances=2, line=line)
        pool.client = FakeClient({f"w{i}": 1 for i in range(6)})
        pool.reserved = long_jobs
        shares = []
        for held in (0, 2, 4, -1, 6, 0):  # -1: the store does not answer
            running[0] = held
            await pool._read_capacity()
            shares.append(pool.size)
        # 6 threads for 2 instances; then what 2, 4 long jobs leave; the store away: as before;
        # every thread held: still 1 (a job is queued by Dask, never refused); all free again.
        assert shares == [3, 2, 1, 1, 1, 3]
        assert pool.stats()["cluster"]["long_jobs"] == 0

    asyncio.run(main())


def test_without_a_scheduler_a_job_is_refused_at_once_with_backend_unavailable():
    async def main():
        pool = pool_for(1)
        with pytest.raises(BackendUnavailable, match="unreachable"):
            await pool.run("fib", {"n": 1}, timeout=5)
        assert pool.stats()["problem"].startswith("Dask scheduler")

    asyncio.run(main())


def test_a_cluster_without_workers_refuses_jobs_at_once_with_no_workers():
    async def main():
        pool = pool_for(1)
        pool.client = FakeClient({})
        await pool._read_capacity()
        with pytest.raises(NoWorkers):
            await pool.run("fib", {"n": 1}, timeout=5)

    asyncio.run(main())


def versions_of(python: str = "3.11.7.final.0", **packages: str) -> dict:
    base = {"dask": "2026.8.0", "distributed": "2026.8.0", "msgpack": "1.1.1", "cloudpickle": "3.1.1",
            "tornado": "6.5.2", "toolz": "1.0.0", "numpy": "2.3.0"}
    return {"host": {"python": python}, "packages": {**base, **packages}}


def test_a_cluster_on_this_instance_s_versions_matches():
    assert version_mismatch({"client": versions_of(), "scheduler": versions_of(),
                             "workers": {"tcp://10.0.0.2:8800": versions_of(python="3.11.9.final.0", numpy="1.26")}}) == ""


@pytest.mark.parametrize("where, versions, expected", [
    ("scheduler", versions_of(distributed="2025.1.0"), "distributed 2026.8.0 here, 2025.1.0 on the scheduler"),
    ("worker", versions_of(cloudpickle="2.2.1"), "cloudpickle 3.1.1 here, 2.2.1 on the worker tcp://10.0.0.2:8800"),
    ("worker", versions_of(python="3.12.1.final.0"), "python 3.11 here, 3.12 on the worker tcp://10.0.0.2:8800"),
])
def test_a_cluster_that_differs_in_what_pickles_or_speaks_the_protocol_is_named(where, versions, expected):
    found = {"client": versions_of(), "scheduler": versions_of(), "workers": {"tcp://10.0.0.2:8800": versions_of()}}
    if where == "scheduler":
        found["scheduler"] = versions
    else:
        found["workers"]["tcp://10.0.0.2:8800"] = versions
    assert version_mismatch(found) == expected


def test_the_instance_subscribes_to_its_results_topic_again_when_the_scheduler_is_a_new_one():
    """A restarted scheduler knows no subscription, and the client reconnects to it silently:
    without a new subscription every result would be gathered (slower, never lost)."""
    async def main():
        pool = pool_for(2)
        pool.client = client = FakeClient({"w": 1})
        await pool._read_capacity()
        await pool._read_capacity()
        assert client.subscriptions == [pool.reply_topic]  # once per scheduler
        client.scheduler_id = "scheduler-2"
        await pool._read_capacity()
        assert client.subscriptions == [pool.reply_topic] * 2
        assert pool.reply_topic != pool_for(1).reply_topic  # each instance hears only its own jobs

    asyncio.run(main())


def test_a_pushed_result_answers_the_job_and_a_stray_or_malformed_event_is_ignored():
    async def main():
        pool = pool_for(1)
        waiter = pool._pushed["fib-1"] = asyncio.get_running_loop().create_future()
        pool._on_pushed((0.0, ["fib-0", b"{}", 1.0]))  # a job this instance no longer waits for
        pool._on_pushed((0.0, "garbage"))
        assert not waiter.done()
        pool._on_pushed((0.0, ["fib-1", b'{"result": 1}', 0.25]))
        assert waiter.result() == (b'{"result": 1}', 0.25)

    asyncio.run(main())


# a cancel that does not come back ------------------------------------------------------------------

class UnansweredJob:
    """A Dask future whose job never ends and whose cancel never comes back (a scheduler cut off,
    and a cancel that waits for it, as distributed's did before 2023) or is refused (a client that
    has closed raises ClosedClientError)."""

    def __init__(self, key: str, refuse: bool):
        self.key, self.refuse = key, refuse
        self.cancels = 0

    def __await__(self):
        return asyncio.get_running_loop().create_future().__await__()  # never done

    async def cancel(self) -> None:
        self.cancels += 1
        if self.refuse:
            from distributed.client import ClosedClientError
            raise ClosedClientError("Client is closed. Can't send cancel-keys message.")
        await asyncio.get_running_loop().create_future()

    def release(self) -> None:
        pass


class CutOffClient(FakeClient):
    def __init__(self, refuse: bool):
        super().__init__({"w": 1})
        self.refuse = refuse
        self.jobs: list[UnansweredJob] = []

    def submit(self, *args, key: str, **kwargs) -> UnansweredJob:
        self.jobs.append(UnansweredJob(key, self.refuse))
        return self.jobs[-1]


CANCELS = pytest.mark.parametrize("refuse", [False, True], ids=["cancel-never-answers", "cancel-refused"])


async def cut_off_pool(refuse: bool) -> tuple[DaskPool, CutOffClient]:
    pool = pool_for(1)
    pool.client = client = CutOffClient(refuse)
    await pool._read_capacity()
    return pool, client


@CANCELS
def test_a_job_past_its_deadline_is_answered_504_at_the_deadline_whatever_its_cancel_does(refuse):
    async def main():
        pool, client = await cut_off_pool(refuse)
        started = time.monotonic()
        with pytest.raises(JobTimeout):
            await asyncio.wait_for(pool.run("fib", {"n": 1}, timeout=0.5), 5)
        assert time.monotonic() - started < 0.5 + GRACE + 0.3  # its deadline, plus the grace for its worker
        assert pool.stats()["busy"] == 0  # its place is free
        assert client.jobs[0].cancels == 1  # the cancel was sent all the same
        await pool.close()

    asyncio.run(main())


@CANCELS
def test_a_departed_client_s_job_frees_its_place_at_once_whatever_its_cancel_does(refuse):
    async def main():
        pool, client = await cut_off_pool(refuse)
        job = asyncio.ensure_future(pool.run("fib", {"n": 1}, timeout=30))
        await eventually(lambda: client.jobs, what="the job submitted")
        job.cancel()  # the client went away
        done, _ = await asyncio.wait({job}, timeout=0.5)
        assert done and job.cancelled()
        assert pool.stats()["busy"] == 0 and client.jobs[0].cancels == 1
        await pool.close()

    asyncio.run(main())


# a real scheduler, stopped ---------------------------------------------------------------------------

@pytest.fixture
def scheduler():
    """A real `dask scheduler` on a free loopback port, without workers; stopped by its PID afterwards."""
    port = free_port_block(1)
    process = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                "--port", str(port), "--dashboard-address", ":0"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: not port_is_free(port), timeout=30, what="the scheduler listening")
        yield process, f"tcp://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_a_job_on_a_stopped_scheduler_is_answered_504_and_frees_its_place_at_its_deadline(scheduler):
    process, address = scheduler

    async def main():
        settings = load(env={"FLEET_SLOW_BACKEND": "dask", "FLEET_DASK_SCHEDULER": address})
        pool = DaskPool(settings, 1)
        assert await pool._connect(), pool.problem
        pool.threads = 1  # as if a worker had joined: the job waits on the cluster, never runs
        process.send_signal(signal.SIGSTOP)  # the scheduler cut off: nothing it is sent is answered
        started = time.monotonic()
        with pytest.raises(JobTimeout):
            await asyncio.wait_for(pool.run("fib", {"n": 1}, timeout=1), 10)
        assert time.monotonic() - started < 1 + GRACE + 0.5
        assert pool.stats()["busy"] == 0
        process.send_signal(signal.SIGCONT)
        await pool.close()

    asyncio.run(main())
