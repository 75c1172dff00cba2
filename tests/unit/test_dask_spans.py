"""The fleet's scheduler forgets finished spans, which Dask keeps forever (dask/distributed#7977):
a real in-process Dask scheduler and worker, the fleet's pruning (services/slow/dask_worker.py)."""

from __future__ import annotations

import asyncio

from distributed import Client, Scheduler, Worker
from distributed.core import Status

from services.slow.dask_worker import forget_finished_spans
from tests.support.waiting import eventually


def add_one(x: int) -> int:
    return x + 1


def test_a_span_per_burst_of_work_is_kept_only_until_its_groups_are_forgotten():
    async def main():
        async with Scheduler(host="127.0.0.1", dashboard_address="127.0.0.1:0", port=0) as scheduler, \
                Worker(scheduler.address, nthreads=1, host="127.0.0.1", dashboard=False), \
                Client(scheduler.address, asynchronous=True) as client:
            spans = scheduler.extensions["spans"].spans

            async def one_job(i: int) -> None:
                future = client.submit(add_one, i, pure=False)
                assert await future == i + 1
                key = future.key
                future.release()
                # the scheduler forgets the task; with nothing left running, the next job starts
                # a new span
                await eventually(lambda: key not in scheduler.tasks, what=f"the scheduler forgot {key}")

            for i in range(30):
                await one_job(i)
            assert len(spans) == 30  # what Dask alone keeps: one span per job, forever

            held = client.submit(add_one, 100, pure=False)  # a result still held: its span stays
            await held
            assert len(spans) == 31
            assert forget_finished_spans(scheduler, keep=5) == 31 - 5  # the oldest, all forgotten
            assert len(spans) == 5 and len(scheduler.extensions["spans"].root_spans) == 5
            assert forget_finished_spans(scheduler, keep=0) == 4  # all but the held one's
            (left,) = spans.values()
            assert any(tg is scheduler.task_groups.get(tg.name) for tg in left.groups)

            for i in range(3):  # later jobs still find or make their spans
                await one_job(i)
            assert await client.submit(add_one, 1, pure=False) == 2

    # Bounded: an in-process cluster that fails to close must fail this test, not hang the tier (once seen).
    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_worker_reporting_on_a_span_already_forgotten_keeps_running_and_takes_the_next_job():
    async def main():
        async with Scheduler(host="127.0.0.1", dashboard_address="127.0.0.1:0", port=0) as scheduler, \
                Worker(scheduler.address, nthreads=1, host="127.0.0.1", dashboard=False) as worker, \
                Client(scheduler.address, asynchronous=True) as client:
            future = client.submit(add_one, 1, pure=False)
            assert await future == 2
            key = future.key
            future.release()
            await eventually(lambda: key not in scheduler.tasks, what=f"the scheduler forgot {key}")
            # forgotten before the worker's next heartbeat, which still carries the job's costs
            assert forget_finished_spans(scheduler, keep=0) == 1
            await worker.heartbeat()  # raised KeyError from the scheduler, and the worker closed
            assert worker.status == Status.running
            assert await client.submit(add_one, 2, pure=False) == 3

    asyncio.run(asyncio.wait_for(main(), 60))
