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

ONE PROCESS OR MANY. The same file runs as one process or as Locust's master with workers
(`--processes N` on one host, or `--master` here and `--worker --master-host <master>` on other
hosts). The master runs the shape (so the phases) and judges; it runs no users. Each worker records
its own samples and ships them to the master: every few seconds with Locust's own stats report
(`report_to_master` / `worker_report`), and a last time, marked final, when it stops or when the
master, about to judge, asks for them (a custom message). The master judges only once every worker
has sent its last samples (waiting up to 10 s for connected ones); a worker whose last samples
never come makes the run INCONCLUSIVE. The phase windows are the master's clock and the samples
carry the workers' start times: hosts running workers need synchronized clocks (NTP; a skew of a
few ms is harmless). Heavy requests in flight are sampled by every worker on the clock's
half-second grid and added up slot by slot.

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
  PASS          otherwise.
The order decides between reasons: fast failures, then lost worker samples, then a slow path that
ran no jobs, then Locust's CPU, then baseline samples, then saturation (a mixed phase without it
proves nothing either way), then stalls, then Locust's lateness, then mixed samples (a p50 over its limit by more than Locust's lag is a FAIL
with 100 samples already), then latency. Headless, the verdict is the exit code
(0 PASS, 3 FAIL, 4 INCONCLUSIVE; on a PASS Locust's own rule still applies: exit 1 if some heavy
request failed in an unexpected way, e.g. a 500 or 502) and the per-phase table is printed; with
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

import ipaddress
import logging
import os
import random
import secrets
import socket
import time
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace
from urllib.parse import urlsplit

import gevent
import gevent.pool
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
    inflight: list[tuple[float, int]] = field(default_factory=list)  # (half-second slot, count)
    cpu: list[float] = field(default_factory=list)  # when Locust warned about this worker's CPU

    def __bool__(self) -> bool:
        return bool(self.fast or self.unanswered or self.late or self.heavy or self.hostile or self.inflight
                    or self.cpu)

    def take(self, final: bool = False) -> dict:
        """Empties the outbox into a batch for the master; final: the last batch of this run."""
        batch = {"fast": self.fast, "unanswered": self.unanswered, "late": self.late, "heavy": self.heavy,
                 "hostile": self.hostile, "inflight": self.inflight, "cpu": self.cpu, "final": final}
        self.fast, self.unanswered, self.late, self.heavy, self.hostile, self.inflight, self.cpu = (
            [], [], [], [], [], [], [])
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
                ("mixed", o.mixed_seconds, o.fast_users + o.heavy_users + o.hostile_users,
                 [HeavyUser] + ([HostileUser] if o.hostile_users else [])),
                ("recovery", o.recovery_seconds, o.fast_users, [FastUser])]
        elapsed = self.get_run_time()
        end = 0.0
        for name, seconds, users, classes in plan:
            end += seconds
            if elapsed < end:
                rec.enter(name)
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
    elif role in ("heavy", "hostile"):
        # Sorted by the user that sent it (heavy_kind, HostileUser.post_forever)
        kind = context.get("kind") or "error"
        (sink.heavy if role == "heavy" else sink.hostile).append((start_time, kind))


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
    if Node.role != "worker":
        isolation_ui.print_on_quit(RECORDER, exit_code)


def sample_inflight(runner) -> None:
    """Heavy requests in flight, every half second on the clock's half-second grid, so that the
    master can add up the workers' samples slot by slot."""
    while True:
        gevent.sleep(INFLIGHT_PERIOD - time.time() % INFLIGHT_PERIOD)
        slot = round(time.time() / INFLIGHT_PERIOD) * INFLIGHT_PERIOD
        if Node.role == "worker":
            if runner.user_count:  # the worker does not know the phases: the master sorts the slots in
                OUTBOX.inflight.append((slot, Node.heavy_now))
        elif RECORDER.names and RECORDER.ended_at is None:
            RECORDER.inflight.setdefault("local", {})[slot] = Node.heavy_now


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
