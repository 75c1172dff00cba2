"""Prometheus metrics of an instance, served at /metrics on its own (loopback) port.

    curl -s 127.0.0.1:8101/metrics | grep fleet_

nginx refuses /metrics on the public edge; Prometheus scrapes each instance directly, with the
targets file that deploy renders into the run dir (prometheus/targets.json). Families:

    fleet_http_request_duration_seconds{route,method,status}  histogram (route = the pattern,
                                                               method = GET, POST, HEAD or other)
    fleet_http_requests_in_flight                              gauge
    fleet_slow_workers, fleet_slow_workers_busy, fleet_slow_queue_depth   gauges (slow only)
    fleet_slow_jobs_total{task,outcome,backend}                counter
    fleet_slow_job_duration_seconds{task,backend}              histogram
    fleet_slow_coalesced_total{task}                           counter (requests that shared a job)
    fleet_jobs{store,state}                                    gauge: the long jobs by state in the job store
                                                               (read every 2 s; the runner only)
    fleet_jobs_streams_open                                    gauge: event streams open here
    fleet_jobs_store_seconds{operation}                        histogram: a job store call, thread hop included
    fleet_fanout_call_seconds{upstream,outcome}                histogram: a fast route's call to an upstream,
                                                               hedge included (services/fanout)
    fleet_fanout_hedges_total{upstream,event}                  counter: hedges sent, won, cancelled (the loser),
                                                               denied (over the budget, or the upstream failing)
    fleet_fanout_breaker_state{upstream}                       gauge: 0 closed, 1 half-open, 2 open
    fleet_fanout_breaker_opened_total{upstream}                counter: times it opened
    fleet_fanout_partial_total{route}                          counter: answers sent without an optional part
    fleet_fanout_pool_wait_seconds                             histogram: a call's wait for a pooled connection
    fleet_fanout_attempts_in_flight                            gauge: requests to replicas not yet ended
    fleet_fanout_batch_keys{upstream}                          histogram: distinct keys per multi-get
    fleet_upstream_served_total{service,kind,outcome}          counter (the upstream service's replicas)
    fleet_event_loop_lag_seconds                               histogram (watchdog.py)
    fleet_event_loop_blocked_total                             counter (watchdog.py)
    fleet_jobs_started_total{store}, fleet_jobs_ended_total{store,state,error}   counters: the job
                                                               store's own tallies (every runner of a
                                                               store shows the same; they outlive
                                                               restarts; the runner only)
    fleet_slow_workers_floor                                   gauge: slow.min_workers (slow only)
    fleet_dask_scheduler_connected{scheduler}, fleet_dask_workers{scheduler}  gauges: the Dask cluster
                                                               as this slow instance's client sees it
                                                               (slow.backend = "dask" only)
    fleet_log_bytes{log}, fleet_log_bound_bytes                gauges: each of this host's logs with its
                                                               rotated copies, and what one may hold
    fleet_logs_disk_free_bytes                                 gauge: room left where the logs are
    fleet_fast_p99_objective_seconds                           gauge: observe.fast_p99_objective_ms (fast only)
    process_*, python_*                                        prometheus-client's own collectors

The alert and recording rules that read these are in deploy/prometheus/rules.yml. A threshold that
a setting decides is exported as a series (the worker floor, the logs' bound, the fast p99
objective), so the rules hold for any fleet's settings.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

# From well under a millisecond (a fast route) to a minute (a long job).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUEST_DURATION = Histogram(
    "fleet_http_request_duration_seconds", "Time to answer a request, by route pattern",
    ["route", "method", "status"], buckets=BUCKETS,
)
IN_FLIGHT = Gauge("fleet_http_requests_in_flight", "Requests accepted and not yet answered")
SLOW_WORKERS = Gauge("fleet_slow_workers", "Worker processes serving in the slow pool")
SLOW_WORKERS_BUSY = Gauge("fleet_slow_workers_busy", "Worker processes running a job")
SLOW_QUEUE_DEPTH = Gauge("fleet_slow_queue_depth", "Jobs waiting for a worker")
SLOW_JOBS = Counter("fleet_slow_jobs_total", "Jobs by task, outcome and backend (local or dask)",
                    ["task", "outcome", "backend"])
SLOW_COALESCED = Counter("fleet_slow_coalesced_total",
                         "Requests answered by a job that an identical request had started (coalesce.py)", ["task"])
SLOW_JOB_DURATION = Histogram("fleet_slow_job_duration_seconds", "Time a job ran in its worker",
                              ["task", "backend"], buckets=BUCKETS)
JOBS = Gauge("fleet_jobs", "Long jobs by state, as the job store holds them (store: which one)", ["store", "state"])
JOBS_STREAMS = Gauge("fleet_jobs_streams_open", "Job event streams (SSE) open on this instance")
JOBS_STORE = Histogram("fleet_jobs_store_seconds", "Time of a job store call from the event loop, by operation",
                       ["operation"], buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                               0.1, 0.25, 1, 5))
LOOP_LAG = Histogram(
    "fleet_event_loop_lag_seconds", "How late the event loop ran a probe scheduled every 100 ms",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LOOP_BLOCKED = Counter("fleet_event_loop_blocked_total", "Times the event loop was blocked past the threshold")

FANOUT_CALLS = Histogram("fleet_fanout_call_seconds", "A fast route's call to an upstream, hedge included, by outcome",
                         ["upstream", "outcome"], buckets=BUCKETS)
FANOUT_HEDGES = Counter("fleet_fanout_hedges_total", "Hedged calls: sent, won, cancelled (the loser), denied",
                        ["upstream", "event"])
FANOUT_BREAKER = Gauge("fleet_fanout_breaker_state", "An upstream's circuit breaker: 0 closed, 1 half-open, 2 open",
                       ["upstream"])
FANOUT_BREAKER_OPENED = Counter("fleet_fanout_breaker_opened_total", "Times an upstream's circuit breaker opened",
                                ["upstream"])
FANOUT_PARTIAL = Counter("fleet_fanout_partial_total", "Answers sent without an optional part, by route", ["route"])
FANOUT_POOL_WAIT = Histogram("fleet_fanout_pool_wait_seconds", "A call's wait for a pooled connection to an upstream",
                             buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
FANOUT_IN_FLIGHT = Gauge("fleet_fanout_attempts_in_flight",
                         "Requests to upstream replicas sent and not yet ended (answered, failed or cancelled)")
FANOUT_BATCH_KEYS = Histogram("fleet_fanout_batch_keys", "Distinct keys per multi-get a fast route sent", ["upstream"],
                              buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))

# What the alert rules compare with (deploy/prometheus/rules.yml).
SLOW_WORKERS_FLOOR = Gauge("fleet_slow_workers_floor",
                           "slow.min_workers: with fewer workers serving, the instance's /healthz says degraded")
# Labelled by the scheduler's address so that an instance on the local pool shows no series at all.
DASK_CONNECTED = Gauge("fleet_dask_scheduler_connected", "1 while this instance's client is connected to the Dask "
                       "scheduler", ["scheduler"])
DASK_WORKERS = Gauge("fleet_dask_workers", "Workers in the Dask cluster, as this instance's client sees them",
                     ["scheduler"])
FAST_P99_OBJECTIVE = Gauge("fleet_fast_p99_objective_seconds",
                           "observe.fast_p99_objective_ms: the fast routes' p99 the alert rules hold this fleet to")
LOG_BYTES = Gauge("fleet_log_bytes", "One of this host's logs, its rotated copies included", ["log"])
LOG_BOUND = Gauge("fleet_log_bound_bytes", "The most one log may hold with its rotated copies: "
                  "observe.log_max_mb x (observe.log_backups + 1)")
LOGS_DISK_FREE = Gauge("fleet_logs_disk_free_bytes", "Bytes free to this fleet's user on the filesystem of its logs")

# Labels come from fixed sets only: a label a client could choose (its method, its path) would let
# one client grow every instance's memory and /metrics without bound.
METHODS = frozenset(("GET", "POST", "HEAD", "DELETE"))

_durations: dict[tuple[str, str, int], object] = {}  # label lookups cached: the fast path pays once
_refreshers: dict[str, Callable[[], None]] = {}


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    key = (route, method if method in METHODS else "other", status)
    child = _durations.get(key)
    if child is None:
        child = _durations[key] = REQUEST_DURATION.labels(key[0], key[1], str(status))
    child.observe(seconds)


def on_refresh(name: str, fn: Callable[[], None]) -> None:
    """Call `fn` on the event loop before each scrape: it sets gauges from the loop's own state
    (which the thread that renders /metrics must not read while the loop changes it)."""
    _refreshers[name] = fn


def refresh() -> None:
    for fn in _refreshers.values():
        fn()


def declare_tasks(task_names, backend: str, outcomes) -> None:
    """Create every task's series at zero, so a rate() works from the first scrape (`outcomes`:
    services/slow/jobs.py's, every way a job can end)."""
    for name in task_names:
        for outcome in outcomes:
            SLOW_JOBS.labels(name, outcome, backend)
        SLOW_JOB_DURATION.labels(name, backend)
        SLOW_COALESCED.labels(name)


# A rotated copy (supervisor's and deploy/log_rotation.py's: fast-01.log.2, nginx-access.log.1.tmp)
# belongs to its log.
_ROTATED = re.compile(r"^(.+?)(?:\.(\d+))?(?:\.tmp)?$")


def watch_logs(log_dir: Path, max_mb: int, backups: int) -> None:
    """Export the host's logs' sizes (every instance does: any one of a host's instances answers for
    it, the rules take the largest) and the room left on their filesystem, read at each scrape:
    a few dozen stat calls."""
    LOG_BOUND.set((max_mb << 20) * (backups + 1))

    def refresh() -> None:
        sizes: dict[str, int] = {}
        try:
            with os.scandir(log_dir) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=False):
                        log, copy = _ROTATED.match(entry.name).groups()
                        if copy is not None and int(copy) > backups:
                            continue  # left by a larger observe.log_backups: no rotation touches it again
                        sizes[log] = sizes.get(log, 0) + entry.stat(follow_symlinks=False).st_size
            disk = os.statvfs(log_dir)
        except OSError:  # the run dir being replaced: the next scrape
            return
        for log, size in sizes.items():
            LOG_BYTES.labels(log).set(size)
        LOGS_DISK_FREE.set(disk.f_bavail * disk.f_frsize)

    on_refresh("logs", refresh)


class JobTallies(Collector):
    """The job store's own counts of jobs started and ended (by state and error code), as counters,
    labelled with the store they count (`store`: one Redis server that every host shares is one
    store, each host's SQLite file its own).

    Kept by the store, in the same transaction as each start and end, not by a process: a job
    process ends its own job, and another host's runner may reap it; the counts outlive every
    restart. The runner reads them at each beat (job_runner.py): until its first reading nothing is
    shown (a 0 then would look like a counter reset), and from then on every way a job can end is
    shown, at 0 until it happens, so that the rules' increase() sees the first one."""

    def __init__(self) -> None:
        self.store: str | None = None  # until the first reading
        self.started = 0
        self.ended: dict[tuple[str, str], int] = {}
        self.endings: tuple[tuple[str, str], ...] = ()  # (state, error code) shown at 0 until they happen

    def update(self, store: str, tallies: dict[str, int]) -> None:
        """From the store's tallies: "started", and "ended/<state>/<error code>"."""
        ended = dict.fromkeys(self.endings, 0)
        started = 0
        for name, count in tallies.items():
            kind, _, rest = name.partition("/")
            if kind == "started":
                started = count
            elif kind == "ended":
                state, _, error = rest.partition("/")
                ended[(state, error)] = count
        self.store, self.started, self.ended = store, started, ended

    def collect(self) -> Iterator[CounterMetricFamily]:
        if self.store is None:
            return
        started = CounterMetricFamily("fleet_jobs_started", "Long jobs claimed by a runner (each attempt), in the job store",
                                      labels=["store"])
        started.add_metric([self.store], self.started)
        yield started
        ended = CounterMetricFamily("fleet_jobs_ended", "Long jobs ended, by state and error code, in the job store",
                                    labels=["store", "state", "error"])
        for (state, error), count in sorted(self.ended.items()):
            ended.add_metric([self.store, state, error], count)
        yield ended


JOB_TALLIES = JobTallies()
_tallies_exported = False


def export_job_tallies(endings: tuple[tuple[str, str], ...]) -> JobTallies:
    """Register the job tallies (the runner does; a process without a store shows none), with
    every (state, error code) a job can end with."""
    global _tallies_exported
    JOB_TALLIES.endings = endings
    if not _tallies_exported:
        REGISTRY.register(JOB_TALLIES)
        _tallies_exported = True
    return JOB_TALLIES
