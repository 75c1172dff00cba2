"""What the fleet's Dask scheduler and workers load at start: the job entry point and its pool.

    dask worker tcp://127.0.0.1:8786 --preload services.slow.dask_worker ...   # supervisord does this
    client.submit(run_job, "fib", {"n": 25}, 30.0, key, pure=False, key=key)   # services/slow/dask_pool.py

A Dask worker cannot stop a task it runs (dask/distributed #4694: a cancelled task runs on), and a
task that kills its process takes the whole worker down. So no job runs in a Dask worker itself:
each runs in a child process of it, in the very pool the local backend uses (pool.py): one child
per worker thread, each task's setup once per child, the deadline and a cancel kill the child's
process group, a crash fails only its job, results are encoded (and capped) in the child. The task
(a coroutine, on the worker's event loop) only hands the job to that pool and waits; the slow instance
submits one stable entry point, `run_job`, with the task's name as a string, never the function.

Job errors (jobs.JobError) pickle whole, so the slow instance receives exactly what the local pool
would have raised. The worker kills a job's child when the scheduler cancels the job (the client
went away) through a WorkerPlugin that watches the task leave the executing state.

Loaded into the scheduler, the module tightens message batching (BATCH_INTERVAL) and forgets
finished spans, which Dask would keep forever (forget_finished_spans).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from distributed import Scheduler, Worker, get_worker
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
from tornado.ioloop import PeriodicCallback

from services.common import temp_dir
from services.common.settings import Settings
from services.slow import cpu_priority

log = logging.getLogger("fleet.dask")

SETTINGS_ENV = "FLEET_SNAPSHOT"  # path of the fleet's settings snapshot (settings.json), set by supervisord
# Dask batches messages on each stream: 10 ms client to scheduler, 5 ms scheduler to worker, 2 ms
# back, hard-coded. Measured here, those windows were most of a trivial job's 10.5 ms round trip
# (7.3 ms with the client's at 1 ms, 4.7 ms with every stream at 1 ms). 1 ms still batches.
BATCH_INTERVAL = 0.001

# A result this small also travels with the job's completion, as an event on the slow instance's
# topic (`reply_to`): the instance answers without gathering it from the worker, two round trips
# (who has it, then get it) fewer. Measured here on a trivial job: 7.6 ms -> 5.2 ms p50. Larger
# results are gathered as Dask does. The scheduler keeps a topic's last 1,000 events
# (distributed.admin.low-level-log-length), so this bounds what it holds: 4 MiB per topic.
PUSH_LIMIT = 4096

_running: dict[str, asyncio.Task] = {}  # task key -> the pool job running it (in this worker)


async def run_job(task: str, kwargs: dict, timeout: float, key: str, reply_to: str = "",
                  progress: bool = False) -> tuple[bytes, float]:
    """The one entry point the slow instances submit: run `task` in this worker's pool.

    A coroutine, so the worker runs it on its event loop (its nthreads still bound how many run at
    once): no executor thread between the scheduler's message and the child's pipe, two thread
    hand-offs and their wake-ups fewer per job. `key` is the job's Dask key, for
    KillCancelledJobs. Returns (result JSON, elapsed ms) or raises a JobError. With `progress`,
    the task's progress reports (already coalesced in its process, progress.py) go to the
    instance's topic as they come: ["progress", key, done, total, message].
    """
    worker = get_worker()

    def report(done: float, total: float | None, message: str) -> None:
        worker.log_event(reply_to, ["progress", key, done, total, message])

    job = asyncio.ensure_future(worker.fleet_pool.run(task, kwargs, timeout,
                                                      progress=report if progress and reply_to else None))
    _running[key] = job
    try:
        result_json, elapsed_ms = await job
    finally:
        _running.pop(key, None)
    if reply_to and len(result_json) <= PUSH_LIMIT:
        # Sent on the worker's stream to the scheduler before the task's completion, so the
        # scheduler forwards it to the instance before it reports the task finished.
        worker.log_event(reply_to, [key, result_json, elapsed_ms])
    return result_json, elapsed_ms


class KillCancelledJobs(WorkerPlugin):
    """When the scheduler takes a running job away (cancelled, released), kill its child."""

    name = "fleet-kill-cancelled-jobs"

    def transition(self, key: str, start: str, finish: str, **kwargs: Any) -> None:
        if start == "executing" and finish not in ("memory", "error", "executing"):
            job = _running.get(key)
            if job is not None and not job.done():
                log.info("job %s left the worker (%s): killing its process", key, finish)
                job.cancel()


class FastBatches(SchedulerPlugin):
    """Sets the scheduler's streams to workers and clients to BATCH_INTERVAL as they connect."""

    name = "fleet-fast-batches"

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def add_worker(self, scheduler: Scheduler | None = None, worker: str | None = None, **kwargs: Any) -> None:
        comm = self.scheduler.stream_comms.get(worker)
        if comm is not None:
            comm.interval = BATCH_INTERVAL

    def add_client(self, scheduler: Scheduler | None = None, client: str | None = None, **kwargs: Any) -> None:
        comm = self.scheduler.client_comms.get(client)
        if comm is not None:
            comm.interval = BATCH_INTERVAL


SPANS_KEPT = 100  # finished spans the dashboard still shows
SPANS_PRUNE_EVERY_MS = 30_000


def forget_finished_spans(scheduler: Scheduler, keep: int = SPANS_KEPT) -> int:
    """Drop the scheduler's oldest spans whose task groups it has all forgotten; keep the newest
    `keep`. Returns how many went.

    Written here because Dask keeps every span forever (dask/distributed#7977, open): a span
    starts each time work arrives at an idle cluster, which for a fleet's stream of separate jobs
    is most jobs. `make soak` measured the managed scheduler's memory grow 22 % in 9 minutes (a
    span and its task groups, about 5 KB, kept per job). A span whose groups the scheduler still
    holds stays: a task joining such a group is filed under the group's span (spans.py).
    """
    ext = scheduler.extensions.get("spans")
    if ext is None:
        return 0
    live_groups = scheduler.task_groups
    gone: set[str] = set()
    for root in ext.root_spans[:-keep] if keep else ext.root_spans:
        family = list(root.traverse_spans())
        if all(live_groups.get(tg.name) is not tg for span in family for tg in span.groups):
            gone.update(span.id for span in family)
    if not gone:
        return 0
    take_metrics_only_for_known_spans(ext)
    ext.root_spans = [span for span in ext.root_spans if span.id not in gone]
    for span_id in gone:
        del ext.spans[span_id]
    for index in (ext.spans_search_by_name, ext.spans_search_by_tag):
        for key in list(index):
            index[key] = [span for span in index[key] if span.id not in gone]
            if not index[key]:
                del index[key]
    return len(gone)


def take_metrics_only_for_known_spans(ext: Any) -> None:
    """Make the spans extension drop a worker's metrics for spans already forgotten.

    A worker reports what each span's tasks cost at its next heartbeat, up to a few seconds after
    they ended, and the scheduler's extension looks each span up without a default: a span
    forgotten in between raised KeyError in the heartbeat, and the worker closed itself
    ("worker-heartbeat-error"), its running jobs lost with it (seen in the unit tier).
    Installed once on the extension instance; the metrics of a forgotten span have nowhere to go.
    """
    if "heartbeat" in vars(ext):  # already installed
        return
    record = ext.heartbeat

    def heartbeat(ws: Any, data: dict) -> None:
        record(ws, {key: value for key, value in data.items() if key[1] in ext.spans})

    ext.heartbeat = heartbeat


def below_the_fast_path(settings: Settings, name: str) -> str | None:
    """Nice this process and put it in an idle cpu cgroup of its own, as local workers are: the
    cluster's own work (dispatching jobs, moving results) never takes a CPU from an event loop.
    Returns the cgroup's name (for the job processes to share), or None."""
    slow = settings.slow
    os.nice(slow.nice)
    if not slow.idle_cgroup:
        return None
    name = cpu_priority.group_name(name, settings.run_dir)
    group = cpu_priority.create_idle_cgroup(name, settings.run_dir / cpu_priority.RECORD)
    if group is not None:
        cpu_priority.join(group)
    return name


async def dask_setup(server: Scheduler | Worker) -> None:
    """The preload's hook: called with the scheduler or the worker it is loaded into."""
    temp_dir.take_own()  # before the worker's pool starts its forkserver
    if isinstance(server, Scheduler):
        server.add_plugin(FastBatches(server))
        # the scheduler stops its periodic callbacks when it closes
        prune = PeriodicCallback(lambda: forget_finished_spans(server), SPANS_PRUNE_EVERY_MS)
        server.periodic_callbacks["fleet-forget-finished-spans"] = prune
        prune.start()
        # The scheduler of an existing cluster may run without the fleet's settings: it then only
        # batches faster, and its host's operator decides its priority.
        if SETTINGS_ENV in os.environ:
            below_the_fast_path(Settings.from_snapshot(os.environ[SETTINGS_ENV]), "dask-scheduler")
        return
    try:
        await _set_up_worker(server)
    except BaseException:
        # distributed logs a failed preload and lets the worker join anyway: it would then fail
        # every job sent to it. Exit instead: supervisor shows it failing and starts it again.
        log.critical("the fleet's set-up of %s failed; exiting", server.name, exc_info=True)
        os._exit(3)


async def _set_up_worker(server: Worker) -> None:
    settings = Settings.from_snapshot(os.environ[SETTINGS_ENV])
    from services.slow.pool import WorkerPool  # the worker's side only

    server.batched_stream.interval = BATCH_INTERVAL
    below_the_fast_path(settings, server.name)
    # The job processes nice themselves by slow.nice more (19 at most), in the worker's own cgroup
    # (named after it, as below_the_fast_path's): its dispatching keeps ahead of the jobs it
    # dispatches. kill_on_cancel: the slow instance decided (and budgeted) before it cancelled.
    pool = WorkerPool.from_settings(settings, server.state.nthreads, owner=server.name, kill_on_cancel=True)
    await pool.start()
    server.fleet_pool = pool
    await server.plugin_add(KillCancelledJobs())
    log.info("fleet pool of %d child process(es) ready in %s", pool.size, server.name)


async def dask_teardown(server: Scheduler | Worker) -> None:
    pool = getattr(server, "fleet_pool", None)
    if pool is not None:
        await pool.close()
