"""The Dask pool's own logic, without a cluster: its share of the cluster's threads, its answers
when the cluster cannot take a job. The cluster itself is tested for real in the integration tier."""

from __future__ import annotations

import asyncio

import pytest

from services.common.settings import load
from services.slow.dask_pool import DaskPool, version_mismatch
from services.slow.jobs import BackendUnavailable, NoWorkers


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
