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
    fleet_jobs{state}                                          gauge: the host's long jobs by state (its
                                                               job store, read every 2 s; slow only)
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
    process_*, python_*                                        prometheus-client's own collectors
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import Counter, Gauge, Histogram

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
JOBS = Gauge("fleet_jobs", "The host's long jobs by state, as its job store holds them", ["state"])
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
