"""The isolation proof: heavy requests never delay fast ones.

THE CLAIM. While a flood of heavy requests saturates every slow worker and overflows the slow
path's waiting line, the fast routes answer as fast, and as often, as they do with no heavy load
at all. This locustfile measures that through any server offering `GET /fast` and
`GET /slow/fib/<n>` and gives a verdict:

    locust -f locustfile.py --headless --host http://127.0.0.1:8080     # exit 0 PASS, 3 FAIL, 4 INCONCLUSIVE
    make load-check                                                       # the same against the deployed fleet
    make load                                                             # web UI on :8089, "Isolation" tab
    make load-check LOCUST_WORKERS=2                                      # the same with 2 worker processes

THE RUN (a LoadTestShape): warm-up (fast users only, not judged), baseline (the same fast users
only), mixed (the same fast users plus the heavy users), recovery (fast users only, shown, not
judged). Fast users are open-loop: each sends every fast route --fast-rate times a second on a
fixed schedule, each request in a greenlet of its own, whatever became of the earlier ones, and
records how late each tick of its schedule fired (the probe's own lateness). A closed-loop user
(send, wait, send) absorbs a delay in its wait time and sends fewer requests instead, which
percentiles hide; here every held-up request shows its whole delay, and a request still unanswered
when the run ends counts with the time it had waited. Heavy users loop over
`/slow/fib/<n>` with a weighted mix (`--heavy-mix`; a `{random}` in a path is a new random token
in each request: `make load-check` floods the fleet with `/slow/digest/<rounds>?data={random}`,
distinct work that the fleet's compute-once cannot merge) and pause briefly after a shed answer. A heavy 503 (the slow
path shedding) and a heavy 429 (the edge's per-client limits shedding) are expected, reported
as "shed" and never failures; the heavy flood is paced (`--heavy-backoff`) to stay far below the
edge's default 50 requests/s per client, and on a loopback host each heavy user connects from its
own address (127.0.1.N; in Locust worker k, 127.0.k+1.N), as a flood from many clients does, so
the fleet's per-client limit on heavy requests in flight does not cap the flood: on the fleet the
shed answers are 503s from the slow instance, and 429s, if any, are only counted, never taken as
proof of saturation.

LONG JOBS (--long-job-users, --long-job-streams; none by default, `make load-check` runs 1 user and
300 streams). A long-job user submits a --long-job-mix job with `Prefer: respond-async` (the fleet's
`/slow/report/<seconds>`), follows its event stream (now and then it drops the stream and resumes
with Last-Event-ID: the ids must go on without a gap or a repeat), cancels it (DELETE /jobs/<id>)
a moment after the 202 for --long-job-cancel-percent of its jobs, and reads its final status
(succeeded, or cancelled if it cancelled; anything else fails); then the next. It behaves like a
real client: an address of its own (127.2.k.N, k the Locust worker + 1), and a refusal (429 or
503 with Retry-After: the fleet's line is full, or the client is past its share) is waited out as
long as Retry-After says, never a failure. Its watchers hold --long-job-streams event streams open
on the jobs in flight in its process (any of them, at random; the next one when one ends; resumed
with Last-Event-ID after a cut), from addresses of their own (127.3.k.N, --streams-per-client
streams each, under the fleet's jobs.max_streams_per_client), and back off on a 429 as told: a job
page open in hundreds of browsers. They are read in a process of their own at nice 10
(stream_watchers.py; one per long-job user, gone with it or with Locust), never in the Locust
process that times the fast users: 3,000 events a second parsed there made the probe measure
itself; their requests and streams open come back to Locust as its own. Their requests have names of their own (".../report/20 (async)", "/jobs/[id]/events",
"/jobs/[id]/events (Last-Event-ID)", "/jobs/[id]/events (watcher)", "/jobs/[id] (DELETE)",
"/jobs/[id]") and are never fast samples. They join the mixed phase LONG_JOB_HEAD_START (1.5) s
before the heavy flood: a flood fills the slow path's line and a client that waits as told seldom
gets a place in it, while jobs admitted first keep their places (and the streams something to
follow). One long-job user by default: its job holds one of the slow workers while it runs, two
could hold both and starve the flood the check needs.

ONE PROCESS OR MANY. The same file runs as one process or as Locust's master with workers
(`--processes N` on one host, or `--master` here and `--worker --master-host <master>` on other
hosts). The master runs the shape (so the phases) and judges; it runs no users. Each worker records
its own samples and ships them to the master: every few seconds with Locust's own stats report
(`report_to_master` / `worker_report`), and a last time, marked final, when it stops or when the
master, about to judge, asks for them (a custom message). The master judges only once every worker
has sent its last samples (waiting up to 10 s for connected ones); a worker whose last samples
never come makes the run INCONCLUSIVE. The phase windows are the master's clock and the samples
carry the workers' start times: hosts running workers need synchronized clocks (NTP; a skew of a
few ms is harmless). Heavy requests in flight and long jobs' event streams open are sampled by
every worker on the clock's half-second grid and added up slot by slot.

THE VERDICT, from the fast requests' own samples (recorded by start time into the phase windows),
with limits relative to the baseline measured in the same run. Each judged phase is cut into blocks
of --block-seconds (5); a block in which the fast users' ticks fired more than --max-lateness-ms
(10, p99) late is not judged (Locust lagged there: its timings are its own); each percentile is the
median over the judged blocks, and its slack is the baseline's own block-to-block spread (median
absolute deviation; at least --median-slack-ms / --slack-ms, 0.5 ms):
  FAIL          any fast request failed (any phase; a timeout counts); the slow path completed fewer
                than --min-heavy-jobs (20) heavy jobs (200s) in the mixed phase though heavy
                requests were sent (it did not run the load: 503 no_workers, 502, ... are errors,
                never sheds); more mixed fast answers than --stall-percent (0.25 %) of them, plus the
                baseline's own share of stalls up to as much again, took over --stall-ms (100) +
                Locust's lag; or the mixed phase's p50 > --median-ratio (1.5) x baseline p50 +
                slack, or its p95 or p99 > --ratio (2) x baseline + slack;
  INCONCLUSIVE  a worker's last samples never reached the master, Locust warned that its own CPU
                (any of its processes) was saturated, fewer than half of a judged phase's blocks
                could be judged (Locust lagged; unless the whole phase is over a limit by more than
                that lag), a judged phase has fewer than --min-samples (1,000) fast samples, the run
                stopped before the mixed phase ended, or nothing proves the heavy load saturated the
                slow path: no 503 "overloaded" from it and fewer than --slow-workers heavy requests
                in flight in 90% of the mixed phase's half-second samples (or no heavy request sent);
                or long jobs were asked for and did not run: no long job submitted (202) in the
                mixed phase, or fewer than 90 % of --long-job-streams open in half of its samples;
  PASS          otherwise.
The order decides between reasons: fast failures, then lost worker samples, then a slow path that
ran no jobs, then Locust's CPU, then baseline samples, then saturation (a mixed phase without it
proves nothing either way), then stalls, then Locust's lateness, then mixed samples (a p50 over its limit by more than Locust's lag is a FAIL
with 100 samples already), then latency, then the long jobs (less load than asked for does not
undo a FAIL, but a PASS would claim too much). Headless, the verdict is the exit code
(0 PASS, 3 FAIL, 4 INCONCLUSIVE; on a PASS Locust's own rule still applies: exit 1 if some heavy
or long-job request failed in an unexpected way, e.g. a 500 or 502, a gap in a stream's events) and the per-phase table is printed; with
--csv the table is also written to <prefix>_isolation.csv. The figures, the verdict and the table
are isolation_verdict.py's (no Locust in it: tests/unit/test_isolation_verdict.py judges made-up
runs), and isolation_ui.py shows them (exit code, console, CSV, web UI tab); this file runs the
phases and the users, and brings the samples to the one that judges.

HOW THE DEFAULT THRESHOLDS WERE CHOSEN. Measured on this project's 2-core machine with the fleet's
defaults (2 fast instances; 1 slow instance, 2 workers at nice 10, 8 waiting places) by
`make load-check` (this file's defaults plus `--fast-routes "GET /fast, POST /echo"`), fast p50,
p95 and p99 in ms, baseline -> mixed (every mixed phase shed 302-321 heavy requests with 503 and
kept 10 in flight; the probe's lateness p99 was 1.1-1.6 ms throughout):

    run                                       p50 b -> m    p95 b -> m    p99 b -> m    verdict
    the fleet, 5 runs                         1.1-1.4 ->    1.7-2.3 ->    1.9-2.6 ->    PASS x 5
                                              0.9-1.1       1.7-2.6       3.7-5.0
    the fleet, a CPU burner at nice 0 beside  1.4 -> 1.3    2.9 -> 2.3    4.1 -> 3.1    PASS
    negative control, 20 ms, 3 runs           1.2-1.4 ->    2.0-2.7 ->    2.4-3.1 ->    FAIL x 3 (p50, p95, p99)
                                              21.2-21.3     22.3-22.5     24.6-24.9
    negative control, 10 ms                   1.4 -> 11.3   2.5 -> 12.7   3.2 -> 14.6   FAIL (p50)
    negative control, 5 ms                    1.2 -> 6.1    1.9 -> 7.1    2.2 -> 9.3    FAIL (p50)
    bench/naive_server.py (GET /fast only)    0.6 -> 952    1.0 -> 1,921  1.3 -> 2,204  FAIL

The negative control is the real fleet with `observe.test_fast_delay_ms = N`: its fast routes wait
N ms while a heavy job runs (services/fast/negative_control.py). The check before this one (closed
loop at 4 iterations/s, p95 and p99 <= 2 x baseline + 50 ms, mixed rate >= 95% of the baseline's)
PASSed the 20 ms and the 40 ms controls alike.

Those limits had a fixed slack (p50 + 2 ms, p95 and p99 + 10 ms): on a 1-2 ms baseline they let
a 6 x p99 regression pass, and 0.9 % of the answers taking 3 s (under the 1 % a p99 looks past), and
any 503 counted as saturation, so a fleet whose slow path ran no job at all passed (issue 30).

NOW (issue 30; the same fleet on the same machine, shared with other engineers' test suites, so
noisy in bursts). Five default runs, whole-phase p99 baseline -> mixed 5.4 -> 6.4, 5.5 -> 8.4,
9.0 -> 23.8, 9.1 -> 21.5, 7.2 -> 29.7 ms: the worst blocks of 5 s, where Locust itself lagged
(its ticks 15-45 ms late), made the mixed p99 up to 2.6 x the baseline's. Judged per block, as the
median over the blocks where Locust kept its schedule, the same runs give 5.3 -> 5.7, 4.8 -> 6.3,
7.9 -> 9.3, 7.4 -> 5.0, 6.5 -> 7.0 ms (at most 1.3 x), with block-to-block spreads of 0.5-2.8 ms.
So: p50 <= 1.5 x baseline + slack, p95 and p99 <= 2 x baseline + slack, the slack being the
baseline's spread (at least 0.5 ms): a 3 x p99 regression (every 50th answer slowed to 3 x the
baseline's p99), replayed into each of those runs, FAILed every one; the fleet PASSed every one
Locust could judge. The tail beyond p99 is a count: more than 0.25 % of the mixed answers over
100 ms (+ Locust's lag) is a FAIL (1 % delayed 1 s gave 24-25 in each run, against 6 allowed; the
fleet had 0). --min-samples 1,000 keeps the p99 and the stall count meaningful (the 10 worst of
1,000; a 1 % stall rate leaves 2 or fewer of 1,000 with a probability of 0.3 %); the defaults give
2,400 fast samples per judged phase with two fast routes (10 users x 4/s x 2 routes x 30 s) and
1,200 with GET /fast alone. --min-heavy-jobs 20: a slow path that runs jobs completed
216-475 in a default mixed phase, and 39 in a 10 s one on this machine at its busiest (Locust's
ticks 80 ms late, the workers at nice 10 starved by other programs); one that cannot run them, 0. --max-lateness-ms 10 is several times Locust's lateness on a quiet
machine (1.1-1.6 ms); run the check on a quiet machine to judge the fleet itself.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import logging
import os
import random
import secrets
import socket
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import gevent
import gevent.event
import gevent.pool
import gevent.subprocess
from locust import HttpUser, LoadTestShape, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.runners import STATE_MISSING, MasterRunner, WorkerRunner
from requests.adapters import HTTPAdapter

try:
    import isolation_ui
    import isolation_verdict
except ModuleNotFoundError as exc:
    if exc.name not in ("isolation_ui", "isolation_verdict"):
        raise
    # A worker on another host that fetched this file alone from its master (`locust -f - --worker`):
    # workers only record and send samples, the master judges and shows the verdict (setup_node refuses
    # any other role).
    isolation_ui = isolation_verdict = None

log = logging.getLogger("isolation")

SPAWN_RATE = 100  # users started per second at a phase change: every phase starts at full strength
# Seconds the long-job users run in the mixed phase before the heavy flood joins them: more than the
# shape's tick (1 s), so that one tick at least starts them.
LONG_JOB_HEAD_START = 1.5
ECHO_BODY = b'{"probe": "isolation", "padding": "' + b"x" * 200 + b'"}'

# name, type, default, help. Every option is usable as --name on the command line, name = value in
# locust.conf and as a field of the web UI's start form.
OPTIONS = [
    ("warmup-seconds", float, 10.0, "Warm-up phase: fast users only, not judged"),
    ("baseline-seconds", float, 30.0, "Baseline phase: fast users only"),
    ("mixed-seconds", float, 30.0, "Mixed phase: the same fast users plus the heavy users"),
    ("recovery-seconds", float, 10.0, "Recovery phase: fast users only, shown, not judged"),
    ("fast-users", int, 10, "Fast users (each sends every fast route once per iteration)"),
    ("fast-rate", float, 4.0, "Iterations per second of each fast user (open loop: a fixed schedule)"),
    ("fast-routes", str, "GET /fast", "Fast routes, comma-separated 'METHOD /path' (POST sends a small JSON body)"),
    ("fast-timeout", float, 10.0, "Seconds before a fast request counts as failed"),
    ("heavy-users", int, 16, "Heavy users in the mixed phase (more than workers + waiting places)"),
    ("heavy-mix", str, "/slow/fib/30:3,/slow/fib/32:1,/slow/fib/25:1",
     "Heavy requests, comma-separated 'path:weight'; {random} in a path becomes a new random token each time"),
    ("heavy-backoff", float, 0.5, "Seconds a heavy user pauses after a shed answer (503 or 429)"),
    ("heavy-timeout", float, 120.0, "Seconds before a heavy request counts as failed"),
    ("slow-workers", int, os.cpu_count() or 2,
     "Slow workers to saturate: heavy requests in flight needed as proof when no 503 overloaded is seen"),
    ("min-heavy-jobs", int, 20,
     "FAIL unless the slow path completed this many heavy jobs (200) in the mixed phase: it must run the load"),
    ("median-ratio", float, 1.5, "PASS needs mixed p50 <= median-ratio x baseline p50 + slack"),
    ("median-slack-ms", float, 0.5, "Least slack on p50, ms (the slack is the baseline's block-to-block spread)"),
    ("ratio", float, 2.0, "PASS needs mixed p95 and p99 <= ratio x baseline + slack"),
    ("slack-ms", float, 0.5, "Least slack on p95 and p99, ms (the slack is the baseline's block-to-block spread)"),
    ("block-seconds", float, 5.0,
     "Judged phases are cut into blocks this long: percentiles are medians over blocks, slack their spread"),
    ("stall-ms", float, 100.0, "A fast answer slower than this (+ Locust's own lag) is a stall"),
    ("stall-percent", float, 0.25,
     "PASS needs at most this % of mixed fast answers to stall, plus the baseline's own share up to as much"),
    ("max-lateness-ms", float, 10.0,
     "A block in which the fast users' schedule fired later than this (p99) is not judged: Locust lagged"),
    ("min-samples", int, 1000, "Fast samples each judged phase needs (p99 and the stall count need about 1,000)"),
    ("hostile-users", int, 0,
     "Hostile fast clients in the mixed phase (0: none): each posts large bodies to /echo from an address of its own"),
    ("hostile-connections", int, 6, "Connections each hostile client posts on at once"),
    ("hostile-body-kb", int, 1024, "Body size of a hostile client's POST /echo, KiB"),
    ("hostile-backoff", float, 1.0, "Seconds a hostile connection pauses after a refusal (413, 429) or an error"),
    ("long-job-users", int, 0,
     "Long-job clients in the mixed phase (0: none; the server needs /jobs): each submits a job with Prefer: "
     "respond-async, follows its event stream, sometimes cancels it, reads its final status"),
    ("long-job-mix", str, "/slow/report/20:3,/slow/report/8:1",
     "Long jobs, comma-separated 'path:weight' (as --heavy-mix), each submitted with Prefer: respond-async"),
    ("long-job-cancel-percent", float, 25.0, "% of long jobs their client cancels (DELETE) a moment after the 202"),
    ("long-job-reconnect-percent", float, 50.0,
     "% of long jobs whose stream their client drops once and resumes with Last-Event-ID"),
    ("long-job-streams", int, 0,
     "Event streams held open in the mixed phase beside the long-job users' own (0: none): watchers of their jobs"),
    ("streams-per-client", int, 16,
     "Watcher streams per client address (the fleet refuses a client past jobs.max_streams_per_client, 32, with 429)"),
]
DEFAULTS = SimpleNamespace(**{name.replace("-", "_"): default for name, _, default, _ in OPTIONS})

# With workers: the key of the samples in Locust's stats report, the worker's last samples (a custom
# message, worker -> master) and the master's request for them (master -> worker).
REPORT_KEY = "isolation"
SAMPLES_MESSAGE = "isolation_samples"
FLUSH_MESSAGE = "isolation_flush"
LAST_SAMPLES_TIMEOUT = 10.0  # seconds the master waits for every worker's last samples before judging
INFLIGHT_PERIOD = 0.5  # seconds between samples of the heavy requests in flight


class Node:
    """This process's part: "local" (one process does everything), "master" (runs the shape and
    judges, runs no users) or "worker" (runs users and ships its samples to the master)."""

    role = "local"
    heavy_now = 0  # heavy requests this process has in flight
    streams_open = 0  # long jobs' event streams this process holds open (answered 200, not ended yet)


@events.init_command_line_parser.add_listener
def add_options(parser, **_kwargs):
    # parser.add_argument, not an argument group's: only Locust's own add_argument marks an option
    # for the web UI's form ("Custom parameters").
    for name, kind, default, help_text in OPTIONS:
        parser.add_argument(f"--{name}", type=kind, default=default, env_var=f"LOCUST_{name.upper().replace('-', '_')}",
                           help=f"{help_text} (default {default})")


def options(environment) -> SimpleNamespace:
    """The current values: parsed_options (CLI, locust.conf, env, web form) over the defaults."""
    parsed = getattr(environment, "parsed_options", None)
    return SimpleNamespace(**{k: getattr(parsed, k, v) for k, v in vars(DEFAULTS).items()})


def parse_routes(text: str) -> list[tuple[str, str]]:
    routes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        method, _, path = item.partition(" ") if " " in item else ("GET", "", item)
        if not path.strip().startswith("/") or method.upper() not in ("GET", "POST"):
            raise ValueError(f"fast-routes: expected 'GET /path' or 'POST /path', got {item!r}")
        routes.append((method.upper(), path.strip()))
    if not routes:
        raise ValueError("fast-routes: no route given")
    return routes


def parse_mix(text: str) -> tuple[list[str], list[float]]:
    paths, weights = [], []
    for item in filter(None, (part.strip() for part in text.split(","))):
        path, _, weight = item.partition(":")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            w = -1
        if not path.startswith("/") or w <= 0:
            raise ValueError(f"heavy-mix: expected '/path:weight' with a positive weight, got {item!r}")
        paths.append(path)
        weights.append(w)
    if not paths:
        raise ValueError("heavy-mix: no path given")
    return paths, weights


def check_options(o: SimpleNamespace) -> None:
    parse_routes(o.fast_routes)
    parse_mix(o.heavy_mix)
    for name in ("baseline_seconds", "mixed_seconds", "fast_rate", "fast_timeout", "heavy_timeout"):
        if not getattr(o, name) > 0:
            raise ValueError(f"{name.replace('_', '-')} must be > 0")
    for name in ("block_seconds", "stall_ms", "hostile_connections", "hostile_body_kb"):
        if not getattr(o, name) > 0:
            raise ValueError(f"{name.replace('_', '-')} must be > 0")
    if o.fast_users < 1 or o.heavy_users < 0 or o.warmup_seconds < 0 or o.recovery_seconds < 0:
        raise ValueError("fast-users must be >= 1; heavy-users, warmup-seconds and recovery-seconds >= 0")
    if min(o.min_heavy_jobs, o.stall_percent, o.hostile_users, o.hostile_backoff) < 0:
        raise ValueError("min-heavy-jobs, stall-percent, hostile-users and hostile-backoff must be >= 0")
    parse_mix(o.long_job_mix)
    if o.long_job_users < 0 or o.long_job_streams < 0 or o.streams_per_client < 1:
        raise ValueError("long-job-users and long-job-streams must be >= 0, streams-per-client >= 1")
    for name in ("long_job_cancel_percent", "long_job_reconnect_percent"):
        if not 0 <= getattr(o, name) <= 100:
            raise ValueError(f"{name.replace('_', '-')} must be 0-100")
    if o.long_job_streams and not o.long_job_users:
        raise ValueError("long-job-streams needs long-job-users: the streams follow their jobs")


# the samples ----------------------------------------------------------------------------------------

# The master's (or the one process's) samples of the current run, for isolation_verdict to judge;
# a worker's wait in its OUTBOX until they are sent to the master.
RECORDER = isolation_verdict.Recorder(DEFAULTS) if isolation_verdict else None


@dataclass
class Outbox:
    """A worker's samples that the master has not received yet."""

    fast: list[tuple[float, float, bool]] = field(default_factory=list)
    unanswered: list[float] = field(default_factory=list)
    late: list[tuple[float, float]] = field(default_factory=list)
    heavy: list[tuple[float, str]] = field(default_factory=list)
    hostile: list[tuple[float, str]] = field(default_factory=list)
    long: list[tuple[float, str]] = field(default_factory=list)  # the long-job users' requests: start_time, kind
    inflight: list[tuple[float, int]] = field(default_factory=list)  # (half-second slot, count)
    streams: list[tuple[float, int]] = field(default_factory=list)  # (half-second slot, event streams open)
    cpu: list[float] = field(default_factory=list)  # when Locust warned about this worker's CPU

    def __bool__(self) -> bool:
        return bool(self.fast or self.unanswered or self.late or self.heavy or self.hostile or self.long
                    or self.inflight or self.streams or self.cpu)

    def take(self, final: bool = False) -> dict:
        """Empties the outbox into a batch for the master; final: the last batch of this run."""
        batch = {"fast": self.fast, "unanswered": self.unanswered, "late": self.late, "heavy": self.heavy,
                 "hostile": self.hostile, "long": self.long, "inflight": self.inflight, "streams": self.streams,
                 "cpu": self.cpu, "final": final}
        (self.fast, self.unanswered, self.late, self.heavy, self.hostile, self.long, self.inflight, self.streams,
         self.cpu) = ([], [], [], [], [], [], [], [], [])
        return batch


OUTBOX = Outbox()


# users ----------------------------------------------------------------------------------------------

def _on_loopback(host: str | None) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(urlsplit(host or "").hostname or "")).is_loopback
    except (OSError, ValueError):
        return False


class FastUser(FastHttpUser):
    """Open loop: sends every fast route --fast-rate times a second on a fixed schedule, each
    request in a greenlet of its own, whatever happened to the earlier ones.

    A closed-loop user (send, wait for the answer, send the next) absorbs a delay in its wait time:
    at 4 iterations a second a fast route could take 200 ms longer without changing the rate. Here
    a held-up request holds up nothing else, so every percentile shows the delay, and the sending
    never slows down. The user records how late each tick of its schedule fired (the probe's own
    lateness: Locust's CPU, not the server, makes it late).
    """

    concurrency = 32  # connections per user: requests overlap only while the server is slow
    alive: "weakref.WeakSet[FastUser]" = weakref.WeakSet()  # this process's users (a worker's flush cuts them short)

    def __init__(self, environment):
        o = options(environment)
        self.network_timeout = self.connection_timeout = o.fast_timeout
        self.routes = parse_routes(o.fast_routes)
        self.period = 1.0 / o.fast_rate
        super().__init__(environment)
        self.sends = gevent.pool.Group()
        # Users start together at a phase change: spread their ticks over one period.
        self.next_tick = time.monotonic() + random.uniform(0, self.period)
        FastUser.alive.add(self)

    def wait_time(self) -> float:
        return max(0.0, self.next_tick - time.monotonic())

    def on_stop(self) -> None:
        self.cut_short()

    def cut_short(self) -> None:
        self.sends.kill(block=True, timeout=2)  # each one left records itself (send)

    @task
    def fast_routes(self) -> None:
        now = time.monotonic()
        late_ms = max(0.0, now - self.next_tick) * 1000
        # The next tick is one period after this one's planned time, not after now: a late tick
        # does not shift the schedule (ticks missed by more than a period are skipped).
        self.next_tick += self.period
        if self.next_tick < now:
            self.next_tick = now + self.period
        sink = OUTBOX if Node.role == "worker" else RECORDER
        sink.late.append((time.time(), late_ms))
        for method, path in self.routes:
            self.sends.spawn(self.send, method, path)

    def send(self, method: str, path: str) -> None:
        started, clock = time.time(), time.perf_counter()
        try:
            if method == "POST":
                self.client.request("POST", path, name=path, data=ECHO_BODY, context={"role": "fast"},
                                    headers={"Content-Type": "application/json"})
            else:
                self.client.request("GET", path, name=path, context={"role": "fast"})
        except gevent.GreenletExit:
            # The run ended before the answer came. Leaving the request out would leave out the
            # slowest ones (a stalled server's above all): it counts, with the time it had waited
            # so far, the least it would have taken.
            sink = OUTBOX if Node.role == "worker" else RECORDER
            sink.fast.append((started, (time.perf_counter() - clock) * 1000, True))
            sink.unanswered.append(started)
            raise


class SourceAddress(HTTPAdapter):
    """Connects from one given local address: on loopback, any 127.x.y.z is this machine."""

    def __init__(self, address: str):
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


class HeavyUser(HttpUser):
    """Floods the slow path with the --heavy-mix, back-to-back; pauses --heavy-backoff after a shed answer.

    A flood comes from many clients: against a host on loopback, each heavy user connects from an
    address of its own (127.0.1.1, 127.0.1.2, ...; Locust worker k uses 127.0.k+1.x, so the workers'
    users never share one), so a server's per-client limit on heavy requests (the fleet's
    slow.max_per_client) limits each user, not the whole flood as if it were one client.
    """

    numbered = 0  # heavy users created so far: each gets the next source address

    def __init__(self, environment):
        o = options(environment)
        self.timeout = o.heavy_timeout
        self.paths, self.weights = parse_mix(o.heavy_mix)
        self.backoff = o.heavy_backoff
        self.pause = 0.0
        super().__init__(environment)
        if _on_loopback(self.host):
            HeavyUser.numbered += 1
            worker = max(getattr(environment.runner, "worker_index", 0), 0)  # 0 in a single process
            self.source = f"127.0.{worker % 254 + 1}.{(HeavyUser.numbered - 1) % 250 + 1}"
            self.client.mount("http://", SourceAddress(self.source))

    def wait_time(self) -> float:
        return self.pause

    @task
    def heavy(self) -> None:
        path = random.choices(self.paths, self.weights)[0]
        # Distinct work: a server that computes identical requests in flight once (the fleet does)
        # would otherwise see a flood of a few requests.
        url = path.replace("{random}", secrets.token_hex(8))
        Node.heavy_now += 1
        try:
            with self.client.get(url, name=path, context={"role": "heavy"}, catch_response=True,
                                 timeout=self.timeout) as response:
                # Back to back while answers come; a pause after anything else, so a refused or
                # broken server is not hammered in a tight loop.
                self.pause = 0.0 if response.status_code == 200 else self.backoff
                kind = heavy_kind(response)
                response.request_meta["context"]["kind"] = kind
                if kind in ("shed503", "shed429"):
                    # Shedding is the slow path (503 overloaded) or the edge (429) doing its job: not
                    # a failure. Any other refusal (503 no_workers, 502, ...) is one.
                    response.request_meta["name"] = f"{path} (shed {response.status_code})"
                    response.success()
        finally:
            Node.heavy_now -= 1


def error_code(response) -> str:
    """The contract's JSON error code of an answer ("" when it has none)."""
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("error", "")) if isinstance(body, dict) else ""


def heavy_kind(response) -> str:
    """What a heavy answer says about the slow path (isolation_verdict's HEAVY_* kinds, or an error).

    Only a 503 "overloaded" from the slow path (not one from the edge) proves that every worker and
    waiting place was taken: a slow path that cannot run jobs also answers 503 at once ("no_workers"
    on Dask without workers), 502 (no slow instance up) or 504, and that proves nothing but a fault.
    """
    status = response.status_code
    if status == 200:
        return "ok"
    if status == 429:
        return "shed429"
    if not status:
        return "connection error"
    code = error_code(response)
    if status == 503 and code == "overloaded" and response.headers.get("X-Served-By") != "edge":
        return "shed503"
    return f"{status} {code}".strip()


class HostileUser(HttpUser):
    """A hostile fast client (--hostile-users; none by default): from an address of its own, it posts
    --hostile-body-kb bodies to POST /echo on --hostile-connections connections at once, each as soon
    as the last was answered, as the outside review's client did (1 MiB on 6 connections made /fast
    9.8 x slower at p50 for everyone). It joins the mixed phase, so the verdict judges whether the
    normal fast users keep their latency beside it (and the heavy flood).

    A fleet that protects its fast routes refuses it: 413 (body over the route's limit) or 429 (over
    the per-client rate or concurrency limits). Those refusals are the fleet doing its job, never a
    failure; the connection pauses --hostile-backoff after one. Its requests are not fast samples: the
    table counts them apart (sent, refused, errors).
    """

    numbered = 0  # hostile users created so far: each gets the next source address

    def __init__(self, environment):
        o = options(environment)
        self.connections = o.hostile_connections
        self.body = b"x" * (o.hostile_body_kb * 1024)
        self.backoff = o.hostile_backoff
        self.timeout = o.fast_timeout
        super().__init__(environment)
        if _on_loopback(self.host):
            # 127.1.k.N: never one of the heavy users' 127.0.k.N addresses, never the fast users' 127.0.0.1
            HostileUser.numbered += 1
            worker = max(getattr(environment.runner, "worker_index", 0), 0)
            self.client.mount("http://", SourceAddress(f"127.1.{worker % 254 + 1}.{(HostileUser.numbered - 1) % 250 + 1}"))
        self.senders = gevent.pool.Group()

    def on_start(self) -> None:
        for _ in range(self.connections):
            self.senders.spawn(self.post_forever)

    def on_stop(self) -> None:
        self.senders.kill(block=True, timeout=2)

    def wait_time(self) -> float:
        return 1.0

    @task
    def hold(self) -> None:
        """The connections post by themselves (on_start); the user itself only waits."""

    def post_forever(self) -> None:
        while True:
            with self.client.post("/echo", data=self.body, name="/echo (hostile)", context={"role": "hostile"},
                                  headers={"Content-Type": "application/octet-stream"}, catch_response=True,
                                  timeout=self.timeout) as response:
                status = response.status_code
                kind = "ok" if status == 200 else "refused" if status in (413, 429) else (
                    f"{status} {error_code(response)}".strip() if status else "connection error")
                response.request_meta["context"]["kind"] = kind
                if kind == "refused":
                    response.request_meta["name"] = f"/echo (hostile, refused {status})"
                    response.success()
            if kind != "ok":
                gevent.sleep(self.backoff)


# long jobs ------------------------------------------------------------------------------------------

ASYNC = {"Prefer": "respond-async"}
STREAM_TIMEOUT = 60.0  # seconds of silence after which a stream is dead (the fleet sends a keep-alive every 15 s)
ENDED = ("succeeded", "cancelled", "failed")


def client_address(network: int, worker: int, number: int) -> str:
    """The loopback address of a simulated client: 127.<network>.<Locust worker + 1>.<number + 1>, the
    network going on to the next one past 250 clients, so that no two clients (of any worker) share one."""
    return f"127.{network + number // 250}.{worker % 254 + 1}.{number % 250 + 1}"


def retry_after(response_headers) -> float | None:
    """Seconds a refusal's Retry-After asks for (None without one; an HTTP date counts as 1 s)."""
    value = response_headers.get("Retry-After")
    if value is None:
        return None
    return float(value) if value.strip().isdigit() else 1.0


class Board:
    """This process's long jobs in flight (submitted by its long-job users, not ended yet): the jobs
    their watchers follow."""

    jobs: set[str] = set()
    posted = gevent.event.Event()  # set while a job is on the board

    @classmethod
    def add(cls, job_id: str) -> None:
        cls.jobs.add(job_id)
        cls.posted.set()
        Watchers.tell_all(f"+{job_id}")

    @classmethod
    def discard(cls, job_id: str) -> None:
        cls.jobs.discard(job_id)
        if not cls.jobs:
            cls.posted.clear()
        Watchers.tell_all(f"-{job_id}")

    @classmethod
    def pick(cls, timeout: float) -> str | None:
        """One of the jobs in flight, at random; None if none came within `timeout` seconds."""
        if not cls.jobs:
            cls.posted.wait(timeout)
        return random.choice(tuple(cls.jobs)) if cls.jobs else None


@dataclass
class Followed:
    """How one request for a job's event stream went."""

    status: int | None = None  # None: no answer
    last: int = 0  # the id of the last event read
    end: dict | None = None  # the end event's status document, if it came
    retry: float | None = None  # the Retry-After of a refusal
    dropped: bool = False  # closed by the client itself, to reconnect


def follow(user: HttpUser, job_id: str, source: str | None, name: str, last: int = 0,
           drop_after: int | None = None) -> Followed:
    """Reads /jobs/<id>/events (after event `last`, with Last-Event-ID) as EventSource does, from the
    address `source`, until its end event, until `drop_after` events (then hangs up), or until it is
    cut. Locust reports the request when its headers arrive (name); a gap in the events' ids, a cut
    stream or an answer that is neither a stream nor a refusal with Retry-After, as a failure."""
    url = urlsplit(user.host)
    kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = kind(url.hostname, url.port, timeout=STREAM_TIMEOUT, source_address=(source, 0) if source else None)
    path = f"/jobs/{job_id}/events"
    headers = {"Accept": "text/event-stream", **({"Last-Event-ID": str(last)} if last else {})}
    got = Followed(last=last)
    started, clock = time.time(), time.perf_counter()

    def report(kind: str, exception: Exception | None = None, what: str = name) -> None:
        user.environment.events.request.fire(
            request_type="GET", name=what, response_time=(time.perf_counter() - clock) * 1000, response_length=0,
            exception=exception, context={"role": "long", "kind": kind}, start_time=started, url=path, response=None)

    try:
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            report("connection error", exc)
            return got
        got.status = response.status
        if response.status == 204:  # the end was seen already: EventSource stops here
            report("stream")
            return got
        if response.status in (429, 503) and retry_after(response.headers) is not None:
            got.retry = retry_after(response.headers)
            report("refused", what=f"{name} (refused {response.status})")
            return got
        if response.status != 200:
            report(f"{response.status}", RuntimeError(f"{response.status} {response.read(200)!r}"))
            return got
        report("stream")
        Node.streams_open += 1
        try:
            buffer, events = b"", 0
            while True:
                try:
                    data = response.read1(65536)  # what has come: an event or a few
                except (OSError, http.client.HTTPException) as exc:
                    report("cut", exc, f"{name} (cut)")
                    return got
                if not data:
                    report("cut", RuntimeError("the stream ended without its end event"), f"{name} (cut)")
                    return got
                *blocks, buffer = (buffer + data).split(b"\n\n")
                for block in blocks:
                    fields = dict(line.partition(b": ")[::2] for line in block.split(b"\n")
                                  if line and not line.startswith(b":"))
                    if b"id" not in fields:
                        continue  # retry:, or a comment
                    seq = int(fields[b"id"])
                    if seq != got.last + 1:
                        report("gap", RuntimeError(f"event {seq} after {got.last}: the stream skipped or repeated "
                                                   "events"), f"{name} (gap)")
                    got.last = seq
                    events += 1
                    if fields.get(b"event") == b"end":
                        got.end = json.loads(fields[b"data"])
                        return got
                    if drop_after is not None and events >= drop_after:
                        got.dropped = True
                        return got
        finally:
            Node.streams_open -= 1
    finally:
        conn.close()


class Watchers:
    """A long-job user's watcher streams, held in a process of their own (stream_watchers.py, niced):
    reading 3,000 events a second in this process would take the CPU of the fast users it times (the
    load generator would measure itself). The process learns the jobs in flight from Board, and its
    requests come back here as this process's own (Locust's stats, the verdict's long-job samples),
    its streams open with the samples of Node.streams_open. It ends when stopped, or when this
    process dies (the end of its stdin)."""

    running: "weakref.WeakSet[Watchers]" = weakref.WeakSet()

    def __init__(self, environment, host: str, sources: list[str | None]):
        self.environment, self.open = environment, 0
        self.proc = gevent.subprocess.Popen(
            [sys.executable, "-m", "stream_watchers", host, ",".join(s or "-" for s in sources)],
            cwd=Path(__file__).resolve().parent, stdin=gevent.subprocess.PIPE, stdout=gevent.subprocess.PIPE)
        Watchers.running.add(self)
        for job in Board.jobs:
            self.tell(f"+{job}")
        self.relay = gevent.spawn(self.relay_reports)

    @classmethod
    def open_streams(cls) -> int:
        return sum(w.open for w in cls.running)

    @classmethod
    def tell_all(cls, line: str) -> None:
        for watchers in list(cls.running):
            watchers.tell(line)

    def tell(self, line: str) -> None:
        try:
            self.proc.stdin.write(f"{line}\n".encode())
            self.proc.stdin.flush()
        except (OSError, ValueError):  # it is gone (stopped, or died: its stdout says so)
            pass

    def relay_reports(self) -> None:
        """Its reports, as they come: its requests fired as this process's, its streams open."""
        for line in self.proc.stdout:
            report = json.loads(line)
            self.open = report["open"]
            for name, started, response_time, kind, error in report["requests"]:
                self.environment.events.request.fire(
                    request_type="GET", name=name, response_time=response_time, response_length=0,
                    exception=RuntimeError(error) if error else None, context={"role": "long", "kind": kind},
                    start_time=started, url="/jobs/[id]/events", response=None)
        self.open = 0
        if self.proc.wait() not in (0, -15):
            log.error("isolation check: the watcher streams' process exited with %s", self.proc.returncode)

    def stop(self) -> None:
        Watchers.running.discard(self)
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # it ends at the end of its stdin
        try:
            self.proc.wait(timeout=5)
        except gevent.subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.relay.join(timeout=2)


class LongJobUser(HttpUser):
    """A client of long jobs (--long-job-users; none by default), from an address of its own
    (127.2.k.N, k the Locust worker + 1): it submits a --long-job-mix job with `Prefer:
    respond-async`, follows its event stream (dropping it once, now and then, and resuming with
    Last-Event-ID: the ids must go on without a gap), cancels it (DELETE) now and then a moment after
    the 202, and reads its final status; then the next. A refusal (429 or 503 with Retry-After) is
    the fleet shedding, never a failure: the client waits as long as it is told. Its requests have
    names of their own ("... (async)", "/jobs/[id]...") and are never fast samples.

    Watchers (--long-job-streams): each long-job user brings its share of the streams, held open on
    the jobs in flight in its process (any of them, at random; the next one when one ends), from
    watcher addresses (127.3.k.N, --streams-per-client streams each, under the edge's cap per
    client): a job page open in many browsers. They are read by a process of their own (Watchers),
    started with the user and stopped with it.
    """

    numbered = 0  # long-job users created so far in this process: each gets the next address
    watchers_made = 0  # watcher streams created so far in this process: --streams-per-client per address

    def __init__(self, environment):
        o = options(environment)
        self.paths, self.weights = parse_mix(o.long_job_mix)
        self.cancel_share = o.long_job_cancel_percent / 100
        self.reconnect_share = o.long_job_reconnect_percent / 100
        self.timeout = o.heavy_timeout
        super().__init__(environment)
        worker = max(getattr(environment.runner, "worker_index", 0), 0)
        loopback = _on_loopback(self.host)
        self.source = client_address(2, worker, LongJobUser.numbered) if loopback else None
        LongJobUser.numbered += 1
        if self.source:
            self.client.mount("http://", SourceAddress(self.source))
        self.watcher_sources = []
        for _ in range(-(-o.long_job_streams // max(o.long_job_users, 1))):  # its share, rounded up
            number = LongJobUser.watchers_made // o.streams_per_client
            self.watcher_sources.append(client_address(3, worker, number) if loopback else None)
            LongJobUser.watchers_made += 1
        self.watchers: Watchers | None = None
        self.job: str | None = None
        self.cancel_sent = False
        self.pause = 0.0

    def wait_time(self) -> float:
        return self.pause

    def on_start(self) -> None:
        if self.watcher_sources:
            self.watchers = Watchers(self.environment, self.host, self.watcher_sources)

    def on_stop(self) -> None:
        if self.watchers is not None:
            self.watchers.stop()
        job, self.job = self.job, None
        if job is not None:  # the run moves on: its job would hold a worker on for nothing
            self.client.delete(f"/jobs/{job}", name="/jobs/[id] (DELETE, user left)", context={"role": "long",
                                                                                              "kind": "cancel"})

    @task
    def long_job(self) -> None:
        self.pause = 0.0
        path = random.choices(self.paths, self.weights)[0]
        job = self.submit(path)
        if job is None:
            return
        self.job, self.cancel_sent = job, False
        Board.add(job)
        canceller = None
        if random.random() < self.cancel_share:
            canceller = gevent.spawn_later(random.uniform(0.5, 10.0), self.cancel, job)
        try:
            self.follow_to_end(job)
            if canceller is not None and self.cancel_sent:
                canceller.join()  # its answer first: the final status must show it
            self.final_status(job)
        finally:
            if canceller is not None and not self.cancel_sent:
                canceller.kill()  # the job ended first, or the user is stopping (on_stop cancels it)
            Board.discard(job)
        self.job = None  # only now: a user stopped before this cancels its job (on_stop)

    def submit(self, path: str) -> str | None:
        """The job's id, or None if it was refused (the user then pauses as long as it was told)."""
        with self.client.get(path, headers=ASYNC, name=f"{path} (async)", context={"role": "long"},
                             catch_response=True, timeout=self.timeout) as response:
            job = response.headers.get("Location", "").rpartition("/jobs/")[2] if response.status_code == 202 else ""
            wait = retry_after(response.headers)
            if job:
                kind = "submitted"
            elif response.status_code in (429, 503) and wait is not None:
                kind = "refused"
                response.request_meta["name"] = f"{path} (async, refused {response.status_code})"
                response.success()
                self.pause = wait + random.uniform(0, 0.5)  # as told, and not all at the same instant
            else:
                kind = f"{response.status_code} {error_code(response)}".strip()
                response.failure(f"not a job: {response.status_code} {response.text[:200]}")
                self.pause = 1.0
            response.request_meta["context"]["kind"] = kind
        return job or None

    def follow_to_end(self, job: str) -> None:
        """Its event stream until the end event, resumed with Last-Event-ID after a drop or a cut."""
        last, errors = 0, 0
        drop_after = random.randint(1, 20) if random.random() < self.reconnect_share else None
        while errors < 3:
            name = "/jobs/[id]/events (Last-Event-ID)" if last else "/jobs/[id]/events"
            got = follow(self, job, self.source, name, last=last, drop_after=drop_after)
            last = got.last
            if got.end is not None or got.status == 204:
                return
            if got.dropped:
                drop_after = None  # once a job
            elif got.retry is not None:
                gevent.sleep(got.retry)
            else:
                errors += 1
                gevent.sleep(1.0)

    def cancel(self, job: str) -> None:
        self.cancel_sent = True
        with self.client.delete(f"/jobs/{job}", name="/jobs/[id] (DELETE)", context={"role": "long"},
                                catch_response=True, timeout=self.timeout) as response:
            state = response.json().get("state") if response.status_code == 200 else None
            if state in ("cancelling", *ENDED):
                kind = "cancel"
            else:
                kind = f"{response.status_code} {error_code(response)}".strip()
                response.failure(f"a cancel answered {response.status_code} {response.text[:200]}")
            response.request_meta["context"]["kind"] = kind

    def final_status(self, job: str) -> None:
        """GET /jobs/<id> once it ended: succeeded, or cancelled if it was cancelled; anything else fails."""
        for _ in range(3):
            with self.client.get(f"/jobs/{job}", name="/jobs/[id]", context={"role": "long"}, catch_response=True,
                                 timeout=self.timeout) as response:
                doc = response.json() if response.status_code == 200 else {}
                state = doc.get("state")
                wait = retry_after(response.headers)
                if response.status_code == 429 and wait is not None:
                    kind = "refused"
                    response.request_meta["name"] = "/jobs/[id] (refused 429)"
                    response.success()
                elif state == "succeeded" or (state == "cancelled" and self.cancel_sent):
                    kind = state
                else:
                    kind = "failed" if state == "failed" else f"{response.status_code} {state or error_code(response)}"
                    response.failure(f"the job ended {state}: {doc.get('error') or response.text[:200]}")
                response.request_meta["context"]["kind"] = kind
            if kind != "refused":
                return
            gevent.sleep(wait)


# the shape ------------------------------------------------------------------------------------------

class IsolationShape(LoadTestShape):
    """warm-up, baseline: F fast users; mixed: F fast + H heavy; recovery: F fast; then stop."""

    def reset_time(self):
        global RECORDER
        if (RECORDER.started and RECORDER.ended_at is None
                and getattr(self.runner, "shape_greenlet", None) is gevent.getcurrent()):
            # A master resets the shape once more from its first tick (MasterRunner.start), after
            # start_shape() did: keep the clock and the phase that tick entered, as one process does.
            return
        super().reset_time()
        o = options(self.runner.environment)
        # The mixed phase's new users are H heavy and N hostile ones in those proportions (weights;
        # fixed_count is honoured only for the first class list a run dispatches).
        HeavyUser.weight, HostileUser.weight = max(o.heavy_users, 1), max(o.hostile_users, 1)
        LongJobUser.weight = max(o.long_job_users, 1)
        RECORDER = isolation_verdict.Recorder(o, started=True, distributed=Node.role == "master")
        try:
            check_options(o)
        except ValueError as exc:
            RECORDER.error = str(exc)
            log.error("isolation check: invalid options: %s", exc)

    def tick(self):
        rec = RECORDER
        if rec.error:
            rec.finish()
            return None
        o = rec.opts
        plan = [("warm-up", o.warmup_seconds, o.fast_users, [FastUser]),
                ("baseline", o.baseline_seconds, o.fast_users, [FastUser]),
                ("mixed", o.mixed_seconds, o.fast_users + o.heavy_users + o.hostile_users + o.long_job_users,
                 [HeavyUser] + ([HostileUser] if o.hostile_users else [])),
                ("recovery", o.recovery_seconds, o.fast_users, [FastUser])]
        elapsed = self.get_run_time()
        end = 0.0
        for name, seconds, users, classes in plan:
            end += seconds
            if elapsed < end:
                rec.enter(name)
                if name == "mixed" and o.long_job_users and elapsed < end - seconds + LONG_JOB_HEAD_START:
                    # The long jobs' head start: their first jobs take their places in the slow path's
                    # line before the flood fills it (a flood shuts newcomers out), so that the
                    # whole mixed phase has long jobs, and streams following them.
                    return o.fast_users + o.long_job_users, SPAWN_RATE, [LongJobUser]
                return users, SPAWN_RATE, classes
        rec.finish(ran_out=True)
        return None


# events ---------------------------------------------------------------------------------------------

@events.request.add_listener
def on_request(start_time, response_time, exception, context, response=None, **_kwargs):
    role = (context or {}).get("role")
    sink = OUTBOX if Node.role == "worker" else RECORDER
    if role == "fast":
        sink.fast.append((start_time, response_time, exception is None))
    elif role in ("heavy", "hostile", "long"):
        # Sorted by the user that sent it (heavy_kind, HostileUser.post_forever, LongJobUser)
        kind = context.get("kind") or "error"
        {"heavy": sink.heavy, "hostile": sink.hostile, "long": sink.long}[role].append((start_time, kind))


@events.cpu_warning.add_listener
def on_cpu_warning(**_kwargs):
    if Node.role == "worker":
        OUTBOX.cpu.append(time.time())  # the master decides whether the run was on at that time
    elif RECORDER.started and RECORDER.ended_at is None:
        RECORDER.cpu_warning = True


def send_last_samples(runner) -> None:
    """Worker: everything not sent yet, marked final, so the master knows it has all of this worker's."""
    try:
        runner.send_message(SAMPLES_MESSAGE, OUTBOX.take(final=True))
    except Exception as exc:  # a lost master: nothing to judge with them anyway
        log.warning("isolation check: could not send the last samples to the master: %s", exc)


def await_last_samples(runner, rec: isolation_verdict.Recorder, timeout: float = LAST_SAMPLES_TIMEOUT) -> None:
    """Master: wait until every worker's last samples are in (rec.lost names those that never came).

    A worker sends them by itself when it is told to stop, before it reports having stopped (the web
    UI's STOP, or the shape's end with a web UI): those are usually in already. A headless master
    stops without telling its workers (they only hear "quit" after the verdict), so it asks for them.
    Only connected workers are waited for: a missing one (no heartbeat) has lost its samples.
    """

    def connected() -> set[str]:
        return {c.id for c in runner.clients.all if c.state != STATE_MISSING}

    for worker in connected() - rec.final:
        runner.send_message(FLUSH_MESSAGE, None, client_id=worker)
    rec.workers |= connected()
    deadline = time.monotonic() + timeout
    while (rec.workers - rec.final) & connected() and time.monotonic() < deadline:
        gevent.sleep(0.05)
    rec.lost = sorted(rec.workers - rec.final)


@events.test_stop.add_listener
def on_test_stop(environment, **_kwargs):
    if Node.role == "worker":
        send_last_samples(environment.runner)
        return
    rec = RECORDER
    if not rec.started or rec.closed:
        return
    rec.finish()
    if Node.role == "master":
        await_last_samples(environment.runner, rec)
    elif getattr(environment.runner, "cpu_warning_emitted", False):
        # One process: Locust's own flag. A master's is never reset between runs, and its workers'
        # warnings come with their samples.
        rec.cpu_warning = True
    rec.closed = True
    isolation_ui.show_verdict(environment, rec)


@events.quit.add_listener
def on_quit(exit_code, **_kwargs):
    for watchers in list(Watchers.running):  # a run stopped without its users' on_stop: none outlives Locust
        watchers.stop()
    if Node.role != "worker":
        isolation_ui.print_on_quit(RECORDER, exit_code)


def sample_inflight(runner) -> None:
    """Heavy requests in flight and long jobs' event streams open, every half second on the clock's
    half-second grid, so that the master can add up the workers' samples slot by slot."""
    while True:
        gevent.sleep(INFLIGHT_PERIOD - time.time() % INFLIGHT_PERIOD)
        slot = round(time.time() / INFLIGHT_PERIOD) * INFLIGHT_PERIOD
        if Node.role == "worker":
            if runner.user_count:  # the worker does not know the phases: the master sorts the slots in
                OUTBOX.inflight.append((slot, Node.heavy_now))
                OUTBOX.streams.append((slot, Node.streams_open + Watchers.open_streams()))
        elif RECORDER.names and RECORDER.ended_at is None:
            RECORDER.inflight.setdefault("local", {})[slot] = Node.heavy_now
            RECORDER.streams.setdefault("local", {})[slot] = Node.streams_open + Watchers.open_streams()


def on_worker_report(client_id, data, **_kwargs):
    """Master: a worker's samples, sent along with Locust's stats report every few seconds."""
    batch = data.get(REPORT_KEY)
    if batch and RECORDER.started:
        RECORDER.merge(client_id, batch)


def on_samples_message(environment, msg, **_kwargs):
    """Master: a worker's last samples."""
    if RECORDER.started:
        RECORDER.merge(msg.node_id, msg.data)


def on_flush_message(environment, **_kwargs):
    """Worker: the master's run is over (its users run on until "quit"). The fast requests still in
    flight are recorded now, cut short as a stopped user's are (the slowest answers of a stalled
    server are among them), then everything goes to the master as the last batch."""
    for user in list(FastUser.alive):
        user.cut_short()
    send_last_samples(environment.runner)


def on_report_to_master(client_id, data, **_kwargs):
    """Worker: ride along with Locust's stats report (every 3 s)."""
    if OUTBOX:
        data[REPORT_KEY] = OUTBOX.take()


def setup_node(environment) -> None:
    """Decide this process's role from its runner, and wire the samples between workers and master."""
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        Node.role = "master"
        environment.events.worker_report.add_listener(on_worker_report)
        runner.register_message(SAMPLES_MESSAGE, on_samples_message)
    elif isinstance(runner, WorkerRunner):
        Node.role = "worker"
        environment.events.report_to_master.add_listener(on_report_to_master)
        runner.register_message(FLUSH_MESSAGE, on_flush_message)
    else:
        Node.role = "local"
    if Node.role != "worker" and isolation_verdict is None:
        raise SystemExit("locustfile.py: isolation_verdict.py and isolation_ui.py must be beside it "
                         "(only a worker runs without them)")
    if Node.role != "master":  # a master runs no users
        gevent.spawn(sample_inflight, runner)


@events.init.add_listener
def on_init(environment, **_kwargs):
    if environment.parsed_options is not None and environment.parsed_options.headless:
        try:
            check_options(options(environment))
        except ValueError as exc:
            raise SystemExit(f"locustfile.py: invalid option: {exc}") from None
    setup_node(environment)
    if environment.web_ui:
        isolation_ui.add_tab(environment.web_ui, lambda: RECORDER)  # RECORDER: a new one each run
