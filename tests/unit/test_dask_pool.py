"""The Dask pool's own logic, without a cluster: its share of the cluster's threads, its answers
when the cluster cannot take a job. The cluster itself is tested for real in the integration tier."""

from __future__ import annotations

import asyncio

import pytest

from services.common.settings import load
from services.slow.dask_pool import DaskPool, version_mismatch
from services.slow.pool import BackendUnavailable, NoWorkers


class FakeClient:
    status = "running"

    def __init__(self, nthreads: dict[str, int]):
        self.threads = nthreads

    async def nthreads(self) -> dict[str, int]:
        return self.threads


def pool_for(number: int, instances: int = 3) -> DaskPool:
    settings = load(env={"FLEET_SLOW_BACKEND": "dask", "FLEET_SLOW_INSTANCES": str(instances),
                         "FLEET_DASK_WORKERS": "4"})
    return DaskPool(settings, number)


@pytest.mark.parametrize("threads, shares", [(7, [3, 2, 2]), (3, [1, 1, 1]), (1, [1, 1, 1]), (0, [1, 1, 1])])
def test_each_instance_gets_its_share_of_the_cluster_s_threads_and_hears_of_changes(threads, shares):
    async def main():
        got = []
        for number in (1, 2, 3):
            pool = pool_for(number)
            heard = []
            pool.on_capacity = heard.append
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
