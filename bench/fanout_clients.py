"""Which outgoing HTTP client should the fan-out fast routes use? A measured comparison.

    python bench/fanout_clients.py --out bench/results/fanout_clients.md

A fan-out route makes ~20 concurrent GETs to backend replicas per incoming request, with
deadlines, hedged requests (a second copy to another replica when the first is slow; the loser
must be cancelled) and a connection pool. This script compares the clients that can run on the
asyncio loop a Tornado 6 app runs on (uvloop here, as in the fleet):

    tornado-simple  tornado.simple_httpclient.SimpleAsyncHTTPClient
    tornado-curl    tornado.curl_httpclient.CurlAsyncHTTPClient (pycurl)
    httpx           httpx.AsyncClient with explicit httpx.Limits / httpx.Timeout
    aiohttp         aiohttp.ClientSession with an explicit TCPConnector

It starts its own stand-in upstream: 2 replica processes, each a tiny Tornado app on 127.0.0.1
answering GET /item/<key> with ~100 bytes of JSON after a lognormal delay (median --latency-ms,
sigma --sigma; `?sleep_ms=N` overrides it), and GET /stats with what it saw (requests received,
answered, and abandoned: connection closed by the client before the answer). Each client runs
in a fresh subprocess of this script, so the CPU time it reports (getrusage) is its own.

Scenarios, per client:
  a) throughput/CPU: 50 concurrent requests, each a 20-way fan-out over the 2 replicas, 400
     fan-outs (8,000 sub-calls) after a warm-up; pools sized for the fan-out (1000). Repeated
     --rounds times with the client order rotated each round; the tables give medians. No new
     fan-out starts after 20 s, so a client that collapses under the load cannot stall the run.
  b) queue trap: the same load with each client's DEFAULT pool limits and a 300 ms timeout;
     failures split into queue/pool timeouts and real upstream timeouts, cross-checked by the
     sub-calls the upstream never saw.
  c) cancellation: a GET to an upstream that sleeps 2 s, its asyncio task cancelled after 50 ms,
     on a pool of 1: is the socket closed, is the pool slot free, does the upstream see it?
  d) DNS: calls via "localhost" (and via a second name of this machine that the system resolver
     answers from /etc/hosts, if there is one), a new connection per call: getaddrinfo calls
     counted in the client process (libcurl's own resolver is counted from its verbose log).

Extra packages (not in requirements.txt), best installed in a separate venv:

    /usr/bin/python3 -m venv /tmp/cmpvenv
    /tmp/cmpvenv/bin/pip install -r requirements.txt aiohttp==3.14.5 httpx==0.28.1 pycurl==7.49.0
    /tmp/cmpvenv/bin/python bench/fanout_clients.py --out bench/results/fanout_clients.md

A client whose package is missing is reported as unavailable and left out. Every process the
script starts is stopped by its PID when it ends, also on error or Ctrl-C; a replica also exits
by itself when its parent is gone. Takes about 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import ipaddress
import json
import math
import os
import platform
import random
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

CLIENTS = ("tornado-simple", "tornado-curl", "httpx", "aiohttp")

FANOUT_WIDTH = 20         # sub-calls per incoming request
CONCURRENCY = 50          # incoming requests in flight at once
FANOUTS = 400             # measured fan-outs per run: 8,000 sub-calls
LOAD_BUDGET = 20.0        # s; no new fan-out starts after this, so a client that collapses cannot stall the run
FANOUT_POOL = CONCURRENCY * FANOUT_WIDTH  # 1000: what the fan-out needs in flight at once
FANOUT_TIMEOUT = 2.0      # scenario (a) deadline per sub-call: generous, errors should be 0
TRAP_TIMEOUT = 0.3        # scenario (b) per-call timeout
LATE_SLACK = 0.05         # a success this much past the timeout means the timeout did not bound it
SAMPLE_EVERY = 0.02       # the open-socket sampler's period
SLOW_MS = 2000            # scenario (c): the upstream's delay for the call that gets cancelled
CANCEL_AFTER = 0.05       # scenario (c): cancel this long after starting it
DNS_CALLS = 1000          # scenario (d)
DNS_CONCURRENCY = 10
DNS_TTL = 2               # seconds; the DNS cache TTL set where the client has one (d only)
CHILD_TIMEOUT = 150       # bound on every client subprocess (a collapsing client takes ~2 budgets)

OK, QUEUE, CONNECT, UPSTREAM, OTHER = "ok", "queue/pool timeout", "connect timeout", "upstream timeout", "other error"


# --- small helpers, used by every process ----------------------------------------------------

def open_sockets() -> int:
    """Sockets this process has open now (psutil-free: its fds that are sockets)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd is gone by now
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def raise_fd_limit() -> None:
    """1000 concurrent sub-calls need more fds than a 1024 soft limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds() -> float:
    """User + system CPU of this process, all threads (libcurl's and the resolver's too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else float("nan")


def upstream_stats(base_url: str) -> dict:
    """A replica's counters. Blocking on purpose: called only between measured phases, and it
    must not go through the client under test (whose pool may be the thing that is stuck)."""
    with urllib.request.urlopen(f"{base_url}/stats", timeout=2) as reply:
        return json.load(reply)


def stats_delta(before: list[dict], after: list[dict], key: str) -> int:
    return sum(b[key] for b in after) - sum(a[key] for a in before)


# --- the stand-in upstream replica (--role upstream) ------------------------------------------

def run_upstream(latency_ms: float, sigma: float) -> None:
    """One replica: GET /item/<key> and GET /stats on 127.0.0.1, a free port printed on stdout."""
    import tornado.httpserver
    import tornado.netutil
    import tornado.web
    import uvloop

    raise_fd_limit()
    stats = {"connections": 0, "received": 0, "answered": 0, "abandoned": 0, "last_abandoned_after_ms": None}
    parent = os.getppid()
    padding = "x" * 60  # brings the JSON answer to ~100 bytes

    class Item(tornado.web.RequestHandler):
        async def get(self, key: str) -> None:
            stats["received"] += 1
            self.arrived, self.answered, self.gone = time.perf_counter(), False, False
            sleep_ms = self.get_query_argument("sleep_ms", None)
            delay = int(sleep_ms) / 1000 if sleep_ms is not None else random.lognormvariate(
                math.log(latency_ms / 1000), sigma)
            await asyncio.sleep(delay)
            if self.gone:
                return  # the client closed the connection: nobody to answer
            self.answered = True
            self.set_header("Content-Type", "application/json")
            self.write(json.dumps({"key": key, "replica": self.request.host, "pad": padding}))
            stats["answered"] += 1

        def on_connection_close(self) -> None:
            # Tornado calls this when the client closes the connection while get() still waits:
            # how the upstream learns that a cancelled (hedged-away) call is not wanted any more.
            if not getattr(self, "answered", True):
                self.gone = True
                stats["abandoned"] += 1
                stats["last_abandoned_after_ms"] = round((time.perf_counter() - self.arrived) * 1000, 1)

    class Stats(tornado.web.RequestHandler):
        def get(self) -> None:
            self.write(stats)

    class CountingServer(tornado.httpserver.HTTPServer):
        """Counts accepted connections: how many a client opens, whatever it says about its pool."""

        def handle_stream(self, stream, address) -> None:
            stats["connections"] += 1
            super().handle_stream(stream, address)

    async def serve() -> None:
        app = tornado.web.Application([(r"/item/([^/]+)", Item), (r"/stats", Stats)])
        # The default backlog (128) would drop SYNs when 1000 calls connect at once (tornado-simple
        # opens a connection per call): a stand-in artefact, not something we want to measure.
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", backlog=4096)
        CountingServer(app).add_sockets(sockets)
        print(sockets[0].getsockname()[1], flush=True)
        while os.getppid() == parent:  # the parent stops us by PID; this covers its own sudden death
            await asyncio.sleep(0.5)

    uvloop.run(serve())


class Replicas:
    """The replica processes, started and stopped by PID by this script itself."""

    def __init__(self, count: int, latency_ms: float, sigma: float):
        self.count, self.latency_ms, self.sigma = count, latency_ms, sigma
        self.procs: list[subprocess.Popen] = []
        self.urls: list[str] = []

    def __enter__(self) -> "Replicas":
        try:
            for _ in range(self.count):
                proc = subprocess.Popen(
                    [sys.executable, __file__, "--role", "upstream", "--latency-ms", str(self.latency_ms),
                     "--sigma", str(self.sigma)], stdout=subprocess.PIPE, text=True)
                self.procs.append(proc)
                self.urls.append(f"http://127.0.0.1:{self._port_of(proc)}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @staticmethod
    def _port_of(proc: subprocess.Popen, timeout: float = 15) -> int:
        """The port the replica printed once it listens; bounded, so a broken one fails fast."""
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            raise RuntimeError(f"replica pid {proc.pid} did not start (exit code {proc.poll()})")
        return int(line)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs = []


# --- the clients under test, behind one small interface (used in the client subprocess) -------

class Client:
    """get(url) raises on any failure; classify(exc) says which kind of failure it was.

    `pool` is one of: "fanout" (sized for 1000 calls in flight), "default" (the library's own
    limits), "one" (a single slot, to see whether a cancelled call frees it) and "fresh" (a new
    connection per call, for the DNS counts)."""

    name = ""
    config = ""  # the construction, for the report

    async def get(self, url: str) -> None:
        raise NotImplementedError

    def classify(self, exc: BaseException) -> str:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class TornadoSimple(Client):
    name = "tornado-simple"

    def __init__(self, pool: str, timeout: float):
        from tornado.simple_httpclient import SimpleAsyncHTTPClient

        # No keep-alive in this client: every call is a new connection whatever the pool, so
        # "fresh" needs nothing special. force_instance: not the per-IOLoop shared instance.
        max_clients = {"fanout": FANOUT_POOL, "default": None, "one": 1, "fresh": FANOUT_POOL}[pool]
        kwargs = {} if max_clients is None else {"max_clients": max_clients}
        self.client = SimpleAsyncHTTPClient(force_instance=True, **kwargs)
        self.timeout = timeout
        self.config = f"max_clients={self.client.max_clients}, request_timeout=connect_timeout={timeout:g}s"

    async def get(self, url: str) -> None:
        await self.client.fetch(url, request_timeout=self.timeout, connect_timeout=self.timeout)

    def classify(self, exc: BaseException) -> str:
        from tornado.simple_httpclient import HTTPTimeoutError

        if not isinstance(exc, HTTPTimeoutError):
            return OTHER
        message = str(exc)
        return QUEUE if "request queue" in message else CONNECT if "connect" in message.lower() else UPSTREAM

    async def close(self) -> None:
        self.client.close()


class TornadoCurl(Client):
    name = "tornado-curl"

    def __init__(self, pool: str, timeout: float):
        import pycurl
        from tornado.curl_httpclient import CurlAsyncHTTPClient

        max_clients = {"fanout": FANOUT_POOL, "default": None, "one": 1, "fresh": FANOUT_POOL}[pool]
        kwargs = {} if max_clients is None else {"max_clients": max_clients}
        self.client = CurlAsyncHTTPClient(force_instance=True, **kwargs)
        self.timeout = timeout
        self.fresh = pool == "fresh"
        self.resolver_log = Counter()  # libcurl's own resolver is invisible to Python: count its log
        self.pycurl = pycurl
        self.config = f"max_clients={len(self.client._curls)}, request_timeout=connect_timeout={timeout:g}s"
        if self.fresh:
            self.config += f", FORBID_REUSE+FRESH_CONNECT, DNS_CACHE_TIMEOUT={DNS_TTL}"

    def _prepare(self, curl) -> None:
        pycurl = self.pycurl
        curl.setopt(pycurl.FORBID_REUSE, 1)
        curl.setopt(pycurl.FRESH_CONNECT, 1)
        curl.setopt(pycurl.DNS_CACHE_TIMEOUT, DNS_TTL)
        curl.setopt(pycurl.VERBOSE, 1)
        curl.setopt(pycurl.DEBUGFUNCTION, self._on_curl_log)

    def _on_curl_log(self, kind: int, message: bytes) -> None:
        if kind == 0:  # informational text
            text = message.decode(errors="replace")
            if "was resolved" in text:  # logged for every connection, from the cache or not
                self.resolver_log["resolved"] += 1
            elif "found in DNS cache" in text:
                self.resolver_log["cached"] += 1

    def resolver_lookups(self) -> int:
        return self.resolver_log["resolved"] - self.resolver_log["cached"]

    async def get(self, url: str) -> None:
        await self.client.fetch(url, request_timeout=self.timeout, connect_timeout=self.timeout,
                                prepare_curl_callback=self._prepare if self.fresh else None)

    def classify(self, exc: BaseException) -> str:
        from tornado.curl_httpclient import CurlError

        if not isinstance(exc, CurlError) or exc.errno != self.pycurl.E_OPERATION_TIMEDOUT:
            return OTHER
        return CONNECT if str(exc).startswith("HTTP 599: Connection timed out") else UPSTREAM

    async def close(self) -> None:
        self.client.close()


class Httpx(Client):
    name = "httpx"

    def __init__(self, pool: str, timeout: float):
        import httpx

        self.httpx = httpx
        limits = {"fanout": httpx.Limits(max_connections=FANOUT_POOL, max_keepalive_connections=FANOUT_POOL,
                                         keepalive_expiry=30),
                  "default": httpx.Limits(max_connections=100, max_keepalive_connections=20),  # = its defaults
                  "one": httpx.Limits(max_connections=1, max_keepalive_connections=1),
                  "fresh": httpx.Limits(max_connections=FANOUT_POOL, max_keepalive_connections=0)}[pool]
        # httpx.Timeout(t) bounds each phase (pool wait, connect, write, each read) by t, not the
        # whole call: scenario (b) shows what that means.
        self.client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout))
        self.config = (f"Limits(max_connections={limits.max_connections}, max_keepalive_connections="
                       f"{limits.max_keepalive_connections}), Timeout({timeout:g})")

    async def get(self, url: str) -> None:
        (await self.client.get(url)).raise_for_status()

    def classify(self, exc: BaseException) -> str:
        httpx = self.httpx
        if isinstance(exc, httpx.PoolTimeout):
            return QUEUE
        if isinstance(exc, httpx.ConnectTimeout):
            return CONNECT
        return UPSTREAM if isinstance(exc, httpx.TimeoutException) else OTHER

    async def close(self) -> None:
        await self.client.aclose()


class Aiohttp(Client):
    name = "aiohttp"

    def __init__(self, pool: str, timeout: float):
        import aiohttp

        self.aiohttp = aiohttp
        connector_kwargs = {
            "fanout": {"limit": FANOUT_POOL, "limit_per_host": FANOUT_POOL // 2, "ttl_dns_cache": 10,
                       "keepalive_timeout": 30},
            "default": {},  # limit=100, limit_per_host=0 (no per-host limit), ttl_dns_cache=10
            "one": {"limit": 1},
            "fresh": {"limit": FANOUT_POOL, "force_close": True, "ttl_dns_cache": DNS_TTL}}[pool]
        # total= is a whole-call deadline, pool wait included, and on expiry aiohttp raises a bare
        # TimeoutError whichever phase it was in. In the queue-trap run a trace hook notes whether
        # the call was still waiting for a pool slot, so classify() can tell (not elsewhere: it
        # costs CPU that scenario (a) measures).
        traces = []
        if pool == "default":
            trace = aiohttp.TraceConfig()
            trace.on_connection_queued_start.append(self._note_queued(True))
            trace.on_connection_queued_end.append(self._note_queued(False))
            traces.append(trace)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(**connector_kwargs),
                                             timeout=aiohttp.ClientTimeout(total=timeout), trace_configs=traces)
        shown = ", ".join(f"{key}={value}" for key, value in connector_kwargs.items())
        shown = shown or "defaults: limit=100, limit_per_host=0"
        self.config = f"TCPConnector({shown}), ClientTimeout(total={timeout:g})"

    @staticmethod
    def _note_queued(queued: bool):
        async def note(session, context, params) -> None:
            context.trace_request_ctx["queued"] = queued
        return note

    async def get(self, url: str) -> None:
        where = {"queued": False}
        try:
            async with self.session.get(url, trace_request_ctx=where) as reply:
                reply.raise_for_status()
                await reply.read()
        except asyncio.TimeoutError as exc:
            exc.in_pool_queue = where["queued"]
            raise

    def classify(self, exc: BaseException) -> str:
        if getattr(exc, "in_pool_queue", False) or isinstance(exc, self.aiohttp.ConnectionTimeoutError):
            return QUEUE
        return UPSTREAM if isinstance(exc, (asyncio.TimeoutError, self.aiohttp.ServerTimeoutError)) else OTHER

    async def close(self) -> None:
        await self.session.close()


CLIENT_CLASSES = {cls.name: cls for cls in (TornadoSimple, TornadoCurl, Httpx, Aiohttp)}


class ResolverCounter:
    """Counts getaddrinfo calls in this process, those for a name (a DNS or /etc/hosts lookup)
    apart from those for a numeric address (no lookup, but still a trip to the resolver thread
    pool). It wraps both the loop's (uvloop resolves in libuv, so loop.getaddrinfo does not go
    through socket.getaddrinfo) and the socket module's."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.names = self.numeric = 0
        loop_getaddrinfo, socket_getaddrinfo = loop.getaddrinfo, socket.getaddrinfo

        async def counted_loop_getaddrinfo(host, *args, **kwargs):
            self._count(host)
            return await loop_getaddrinfo(host, *args, **kwargs)

        def counted_socket_getaddrinfo(host, *args, **kwargs):
            self._count(host)
            return socket_getaddrinfo(host, *args, **kwargs)

        loop.getaddrinfo = counted_loop_getaddrinfo
        socket.getaddrinfo = counted_socket_getaddrinfo

    def _count(self, host) -> None:
        try:
            ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host)
            self.numeric += 1
        except ValueError:
            self.names += 1


# --- scenarios (each runs in a fresh client subprocess: --role a|b|c|d) -------------------------

class SocketPeak:
    """Samples the open-socket count every SAMPLE_EVERY s; its own CPU is kept apart, so that
    it can be taken out of the client's CPU figure."""

    def __init__(self):
        self.peak = open_sockets()
        self.cpu = 0.0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            started = time.thread_time()
            self.peak = max(self.peak, open_sockets())
            self.cpu += time.thread_time() - started
            await asyncio.sleep(SAMPLE_EVERY)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def fanout_load(client: Client, replicas: list[str], fanouts: int, timeout: float) -> dict:
    """CONCURRENCY workers, each doing fan-outs of FANOUT_WIDTH sub-calls spread over the
    replicas and awaited together, until `fanouts` are done or LOAD_BUDGET has passed."""
    # URLs made up front so that the per-call harness cost is the same tiny one for every client.
    urls = [f"{replicas[i % len(replicas)]}/item/k{i}" for i in range(FANOUT_POOL)]
    outcomes: Counter = Counter()
    fanout_ms: list[float] = []
    late = 0
    left = fanouts
    give_up_at = time.perf_counter() + LOAD_BUDGET

    async def sub_call(url: str) -> None:
        nonlocal late
        started = time.perf_counter()
        try:
            await client.get(url)
        except Exception as exc:  # a failed sub-call is a result here, not a crash
            kind = client.classify(exc)
            outcomes[kind] += 1
            if kind == OTHER:  # keep what it was, for the report
                outcomes[f"{OTHER}: {type(exc).__name__}: {str(exc)[:80]}"] += 1
        else:
            outcomes[OK] += 1
            late += time.perf_counter() - started > timeout + LATE_SLACK

    async def worker(offset: int) -> None:
        nonlocal left
        while left > 0 and time.perf_counter() < give_up_at:
            left -= 1
            started = time.perf_counter()
            base = (offset * FANOUT_WIDTH) % len(urls)
            await asyncio.gather(*(sub_call(urls[base + i]) for i in range(FANOUT_WIDTH)))
            fanout_ms.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(worker(n) for n in range(CONCURRENCY)))
    return {"outcomes": dict(outcomes), "late": late, "fanout_ms": fanout_ms, "calls": len(fanout_ms) * FANOUT_WIDTH}


async def scenario_load(client: Client, replicas: list[str], timeout: float, resolver: ResolverCounter) -> dict:
    """(a) and (b): warm up, then the measured fan-outs, with CPU, latency, errors, sockets."""
    baseline = open_sockets()
    await fanout_load(client, replicas, CONCURRENCY, timeout)  # warm-up: opens the pool's connections
    await asyncio.sleep(0.3)  # let the warm-up's stragglers settle before counting
    before = [upstream_stats(url) for url in replicas]
    sampler = SocketPeak()
    numeric = resolver.numeric
    wall, cpu = time.perf_counter(), cpu_seconds()
    load = await fanout_load(client, replicas, FANOUTS, timeout)
    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
    numeric = resolver.numeric - numeric  # before the stats calls below, which resolve too
    await sampler.stop()
    await asyncio.sleep(0.3)  # calls already sent may still be on their way to the upstream
    after = [upstream_stats(url) for url in replicas]
    calls = load["calls"]
    return {"calls": calls, "cpu_us_per_call": (cpu - sampler.cpu) / calls * 1e6, "wall_s": wall,
            "p50_ms": percentile(load["fanout_ms"], 50), "p99_ms": percentile(load["fanout_ms"], 99),
            "outcomes": load["outcomes"], "late": load["late"], "peak_sockets": sampler.peak - baseline,
            "upstream_received": stats_delta(before, after, "received"),
            "connections_opened": stats_delta(before, after, "connections"), "numeric_getaddrinfo": numeric}


async def wait_for_sockets(at_most: int, limit: float) -> float | None:
    """Milliseconds until this process has at most `at_most` sockets open; None if not within `limit` s."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        if open_sockets() <= at_most:
            return (time.perf_counter() - started) * 1000
        await asyncio.sleep(0.001)
    return None


async def start_and_cancel(client: Client, url: str) -> float:
    """Start a GET, cancel its task after CANCEL_AFTER; ms the task took to end after cancel()."""
    task = asyncio.create_task(client.get(url))
    await asyncio.sleep(CANCEL_AFTER)
    cancelled_at = time.perf_counter()
    task.cancel()
    await asyncio.wait([task], timeout=5)
    return (time.perf_counter() - cancelled_at) * 1000


async def scenario_cancel(client: Client, replicas: list[str]) -> dict:
    """(c) Cancel a call the upstream answers after SLOW_MS, on a pool of one slot."""
    upstream = replicas[0]
    slow_url, fast_url = f"{upstream}/item/slow?sleep_ms={SLOW_MS}", f"{upstream}/item/fast?sleep_ms=0"
    baseline = open_sockets()
    before = upstream_stats(upstream)

    # 1. Is the socket closed, and does the upstream hear of it?
    started = time.perf_counter()
    cancel_ms = await start_and_cancel(client, slow_url)
    closed_ms = await wait_for_sockets(baseline, limit=SLOW_MS / 1000 + 0.5)
    await asyncio.sleep(max(0.0, started + SLOW_MS / 1000 + 0.3 - time.perf_counter()))  # past the 2 s answer
    after = upstream_stats(upstream)

    # 2. Is the pool slot free? The next call on a one-slot pool, right after the cancel.
    await start_and_cancel(client, slow_url)
    next_started = time.perf_counter()
    try:
        await asyncio.wait_for(client.get(fast_url), timeout=SLOW_MS / 1000 + 2)
        next_error = None
    except Exception as exc:
        next_error = f"{type(exc).__name__}: {str(exc)[:80]}"
    next_ms = (time.perf_counter() - next_started) * 1000
    return {"cancel_ms": cancel_ms, "socket_closed_ms": closed_ms,
            "upstream_abandoned": after["abandoned"] - before["abandoned"],
            "upstream_abandoned_after_ms": after["last_abandoned_after_ms"],
            "upstream_answered_anyway": after["answered"] - before["answered"],
            "next_call_ms": next_ms, "next_call_error": next_error}


async def scenario_dns(client: Client, port: int, host: str, resolver: ResolverCounter) -> dict:
    """(d) DNS_CALLS calls by name, a new connection each; then one more after the TTL."""
    url = f"http://{host}:{port}/item/dns?sleep_ms=0"
    outcomes: Counter = Counter()

    def lookups() -> int:  # of the name
        return resolver.names + (client.resolver_lookups() if isinstance(client, TornadoCurl) else 0)

    async def calls(count: int) -> None:
        for _ in range(count):
            try:
                await client.get(url)
                outcomes[OK] += 1
            except Exception as exc:
                outcomes[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(calls(DNS_CALLS // DNS_CONCURRENCY) for _ in range(DNS_CONCURRENCY)))
    wall = time.perf_counter() - started
    during = lookups()
    await asyncio.sleep(DNS_TTL + 0.5)  # past the TTL of a cache that has one
    await calls(1)
    result = {"host": host, "calls": DNS_CALLS + 1, "wall_s": wall, "lookups": during,
              "lookups_after_ttl": lookups() - during, "name_getaddrinfo": resolver.names,
              "numeric_getaddrinfo": resolver.numeric, "outcomes": dict(outcomes)}
    if isinstance(client, TornadoCurl):
        result["libcurl_lookups"] = client.resolver_lookups()
    return result


async def run_client(role: str, name: str, params: dict) -> dict:
    raise_fd_limit()
    resolver = ResolverCounter(asyncio.get_running_loop())
    pool, timeout = {"a": ("fanout", FANOUT_TIMEOUT), "b": ("default", TRAP_TIMEOUT), "c": ("one", SLOW_MS / 1000 + 3),
                     "d": ("fresh", 5.0)}[role]
    try:
        client = CLIENT_CLASSES[name](pool, timeout)
    except ImportError as exc:
        return {"unavailable": f"{type(exc).__name__}: {exc}"}
    try:
        if role in ("a", "b"):
            result = await scenario_load(client, params["replicas"], timeout, resolver)
        elif role == "c":
            result = await scenario_cancel(client, params["replicas"])
        else:
            result = await scenario_dns(client, params["port"], params["host"], resolver)
    finally:
        await client.close()
    result["config"] = client.config
    return result


def client_main(role: str, name: str, params: dict) -> None:
    import uvloop  # the loop the fleet's Tornado processes run on

    print(json.dumps(uvloop.run(run_client(role, name, params))), flush=True)


# --- the orchestrator: runs the scenarios, each client in its own subprocess --------------------

def run_child(role: str, name: str, params: dict) -> dict:
    """One client subprocess, bounded by CHILD_TIMEOUT (subprocess.run kills it by PID then)."""
    command = [sys.executable, __file__, "--role", role, "--client", name, "--params", json.dumps(params)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        result = {"error": f"no result within {CHILD_TIMEOUT} s (killed)"}
    else:
        if done.stderr.strip():
            print(f"  [{name} {role}] stderr: {done.stderr.strip()[-600:]}", file=sys.stderr)
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            result = json.loads(lines[-1])
        else:
            result = {"error": f"exit code {done.returncode}: {done.stderr.strip()[-300:]}"}
    if "error" in result:
        print(f"  [{name} {role}] {result['error']}", file=sys.stderr)
    return result


def rotated(items: tuple, by: int) -> tuple:
    return items[by % len(items):] + items[:by % len(items)]


def resolver_alias() -> str | None:
    """A second name for this machine that the system resolver maps to 127.0.0.1 (e.g. from
    /etc/hosts): libcurl answers "localhost" itself without a lookup, so it needs one."""
    name = socket.gethostname()
    with contextlib.suppress(OSError):
        if name != "localhost" and {a[4][0] for a in socket.getaddrinfo(name, 80, socket.AF_INET)} == {"127.0.0.1"}:
            return name
    return None


def run_all(replicas: Replicas, clients: tuple, rounds: int) -> dict:
    results: dict = {"a": {name: [] for name in clients}, "b": {}, "c": {}, "d": {}}
    available = list(clients)
    for round_no in range(rounds):
        for name in rotated(clients, round_no):
            if name not in available:
                continue
            print(f"(a) round {round_no + 1}: {name}", file=sys.stderr)
            result = run_child("a", name, {"replicas": replicas.urls})
            if "unavailable" in result:
                print(f"  {name} unavailable: {result['unavailable']}", file=sys.stderr)
                available.remove(name)
                results.setdefault("unavailable", {})[name] = result["unavailable"]
                continue
            results["a"][name].append(result)
    port = int(replicas.urls[0].rsplit(":", 1)[1])
    hosts = ["localhost"] + ([alias] if (alias := resolver_alias()) else [])
    for name in available:
        print(f"(b) queue trap: {name}", file=sys.stderr)
        results["b"][name] = run_child("b", name, {"replicas": replicas.urls})
        print(f"(c) cancellation: {name}", file=sys.stderr)
        results["c"][name] = run_child("c", name, {"replicas": replicas.urls})
        for host in hosts:
            print(f"(d) DNS via {host}: {name}", file=sys.stderr)
            results["d"].setdefault(name, []).append(run_child("d", name, {"port": port, "host": host}))
    results["a"] = {name: runs for name, runs in results["a"].items() if runs}
    return results


# --- the report ----------------------------------------------------------------------------------

def versions() -> str:
    found = []
    for package in ("tornado", "uvloop", "httpx", "httpcore", "anyio", "aiohttp", "pycurl"):
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{package} (not installed)")
    with contextlib.suppress(ImportError):
        import pycurl
        found.append(pycurl.version.split()[1])  # libcurl/x.y.z
    return ", ".join(found)


def median_cell(runs: list[dict], key: str, digits: int = 1) -> str:
    """Median over the rounds, with the range: the machine is noisy, the spread says how much."""
    values = [run[key] for run in runs if "error" not in run]
    if not values:
        return "n/a"
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})" if len(values) > 1 else f"{mid:.{digits}f}"


def errors_cell(outcomes: dict) -> str:
    failed = {kind: n for kind, n in outcomes.items() if kind != OK and ":" not in kind}
    return ", ".join(f"{n} {kind}" for kind, n in failed.items()) or "0"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def calls_cell(runs: list[dict]) -> str:
    """Sub-calls made per run: fewer than planned when a run hit LOAD_BUDGET; failed runs named."""
    planned = FANOUTS * FANOUT_WIDTH
    made = [f"{run['calls']:,}" for run in runs if "error" not in run]
    cell = f"{planned:,}" if all(m == f"{planned:,}" for m in made) else f"{', '.join(made)} (cut at {LOAD_BUDGET:g} s)"
    failed = sorted({run["error"] for run in runs if "error" in run})
    return cell + "".join(f"; {sum(run.get('error') == why for run in runs)} run(s) failed: {why}" for why in failed)


def section_a(results: dict) -> list[str]:
    rows = []
    for name, runs in results["a"].items():
        good = [run for run in runs if "error" not in run]
        if not good:
            rows.append([name, runs[0].get("error", "?")] + [""] * 9)
            continue
        errors = sorted({errors_cell(run["outcomes"]) for run in good})
        rates = [{"rate": run["calls"] / run["wall_s"]} for run in good]
        rows.append([name, good[0]["config"], calls_cell(runs), median_cell(good, "cpu_us_per_call", 0),
                     median_cell(good, "p50_ms", 0), median_cell(good, "p99_ms", 0), median_cell(rates, "rate", 0),
                     " / ".join(errors), median_cell(good, "peak_sockets", 0),
                     median_cell(good, "connections_opened", 0), median_cell(good, "numeric_getaddrinfo", 0)])
    rounds = max((len(runs) for runs in results["a"].values()), default=0)
    return ["## (a) Throughput and CPU: pools sized for the fan-out", "",
            f"{CONCURRENCY} concurrent requests × {FANOUT_WIDTH}-way fan-out, {FANOUTS} fan-outs = "
            f"{FANOUTS * FANOUT_WIDTH:,} sub-calls per run after a {CONCURRENCY}-fan-out warm-up, per-call timeout "
            f"{FANOUT_TIMEOUT:g} s. Median of {rounds} runs (min–max; of those that finished), client order rotated "
            "each round. "
            "CPU = the client process's user+sys (getrusage), the socket sampler's own CPU taken out, harness "
            "included (the same for all). Peak sockets = open sockets above the process's baseline (sampled every "
            "20 ms from /proc/self/fd). Connections opened = accepted by the replicas during the measured run. "
            "getaddrinfo(IP) = getaddrinfo calls for the numeric address 127.0.0.1 (no lookup, but a trip to the "
            "resolver thread pool each).", "",
            *table(["client", "pool / timeout", "sub-calls", "CPU µs / sub-call", "fan-out p50 ms", "fan-out p99 ms",
                    "sub-calls/s", "errors", "peak sockets", "connections opened", "getaddrinfo(IP)"], rows), ""]


def section_b(results: dict) -> list[str]:
    rows = []
    for name, run in results["b"].items():
        if "error" in run:
            rows.append([name, run["error"]] + [""] * 10)
            continue
        outcomes = run["outcomes"]
        other = {kind: n for kind, n in outcomes.items() if kind.startswith(f"{OTHER}:")}
        rows.append([name, run["config"], calls_cell([run]), outcomes.get(OK, 0), outcomes.get(QUEUE, 0),
                     outcomes.get(CONNECT, 0), outcomes.get(UPSTREAM, 0),
                     "; ".join(f"{n}× {k[len(OTHER) + 2:]}" for k, n in other.items()) or 0,
                     run["calls"] - run["upstream_received"], run["late"], run["connections_opened"],
                     f"{run['p50_ms']:.0f} / {run['p99_ms']:.0f}"])
    return ["## (b) Queue trap: each client's DEFAULT pool limits, 300 ms per-call timeout", "",
            f"Same load as (a) (up to {FANOUT_POOL} sub-calls in flight). Failure kinds as the client labels them; "
            "'never reached upstream' = sub-calls minus the requests the replicas received (a library-neutral "
            "count of calls that died waiting in the client); 'late ok' = successes that took more than "
            f"{(TRAP_TIMEOUT + LATE_SLACK) * 1000:.0f} ms, i.e. the 300 ms timeout did not bound them; connections "
            "opened = accepted by the replicas during the measured run.",
            "", *table(["client", "defaults used", "sub-calls", "ok", "queue/pool timeout", "connect timeout",
                        "upstream timeout", "other", "never reached upstream", "late ok", "connections opened",
                        "fan-out p50 / p99 ms"], rows), ""]


def yes_no_ms(ms: float | None, within: float, limit_note: str) -> str:
    if ms is None:
        return f"no (still open {limit_note})"
    return f"{'yes' if ms <= within else 'no'} ({ms:.1f} ms)"


def section_c(results: dict) -> list[str]:
    rows = []
    for name, run in results["c"].items():
        if "error" in run:
            rows.append([name, run["error"]] + [""] * 5)
            continue
        heard = (f"yes, {run['upstream_abandoned_after_ms']} ms after the request arrived"
                 if run["upstream_abandoned"] else "no")
        slot_free = run["next_call_ms"] < 100 and not run["next_call_error"]
        rows.append([name, run["config"], f"{run['cancel_ms']:.1f}",
                     yes_no_ms(run["socket_closed_ms"], 10, f"> {SLOW_MS + 500} ms"), heard,
                     "yes" if run["upstream_answered_anyway"] else "no",
                     f"{'yes' if slot_free else 'no'}: next call took {run['next_call_ms']:.0f} ms"
                     + (f" ({run['next_call_error']})" if run["next_call_error"] else "")])
    return ["## (c) Cancellation: the loser of a hedge", "",
            f"On a pool of ONE slot: a GET the upstream answers after {SLOW_MS} ms, its asyncio task cancelled after "
            f"{CANCEL_AFTER * 1000:.0f} ms. 'socket closed' = this process's open sockets back to the count before the "
            "call, polled every 1 ms; 'upstream saw the close' = the replica's on_connection_close fired before its "
            "answer; 'slot free' = a second GET (answered at once) started right after a second cancel.", "",
            *table(["client", "pool", "cancel() → task done ms", "socket closed ≤ 10 ms", "upstream saw the close",
                    "upstream answered the abandoned call anyway", "pool slot free at once"], rows), ""]


def section_d(results: dict) -> list[str]:
    rows = []
    for name, runs in results["d"].items():
        for run in runs:
            if "error" in run:
                rows.append([name, "", run["error"]] + [""] * 7)
                continue
            lookups = run["lookups"]
            cached = lookups < DNS_CALLS / 2
            bounded = ("yes" if run["lookups_after_ttl"] else "NO (no lookup after the TTL)") if cached else \
                "n/a: no cache"
            counted = str(run["name_getaddrinfo"])
            if "libcurl_lookups" in run:
                counted += f" (Python) + {run['libcurl_lookups']} (libcurl)"
            errors = sum(n for kind, n in run["outcomes"].items() if kind != OK)
            rows.append([name, run["host"], run["config"], counted, run["numeric_getaddrinfo"],
                         f"{lookups / DNS_CALLS * 1000:.0f}", f"{run['wall_s']:.1f}", "yes" if cached else "no",
                         bounded, errors])
    return ["## (d) DNS: a new connection per call, by name", "",
            f"{DNS_CALLS} calls ({DNS_CONCURRENCY} at a time), each on a new connection, then one more after "
            f"sleeping {DNS_TTL + 0.5:g} s (the cache TTL set where the client has one is {DNS_TTL} s). Counted in "
            "the client process: getaddrinfo calls for the name (loop.getaddrinfo and socket.getaddrinfo wrapped "
            "with counters) plus, for libcurl, its own resolver's lookups (from its verbose log: 'was resolved' "
            "minus 'found in DNS cache'); getaddrinfo(IP) = calls for a numeric address, not lookups.", "",
            *table(["client", "host", "config", "name lookups", "getaddrinfo(IP)", "lookups per 1,000 calls",
                    "run s", "cached?", "TTL-bounded?", "errors"], rows), ""]


def report(results: dict, args: argparse.Namespace, replicas: int, load: tuple[float, float]) -> str:
    lines = ["# Outgoing HTTP client for fan-out routes: measured comparison", "",
             f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
             f"- machine: nproc {os.cpu_count()}, {platform.machine()}, Linux {platform.release()}, "
             f"Python {platform.python_version()}",
             f"- versions: {versions()}; every process on uvloop",
             f"- upstream: {replicas} Tornado replica processes on 127.0.0.1, ~100-byte JSON after a lognormal delay "
             f"(median {args.latency_ms:g} ms, sigma {args.sigma:g}); the client and the replicas share the "
             f"{os.cpu_count()} cores",
             # Anything else running skews latency and throughput far more than CPU per call: say how busy it was.
             f"- 1-minute load average at start / end: {load[0]:.1f} / {load[1]:.1f}",
             f"- command: `python bench/fanout_clients.py --out {args.out}`" if args.out else "", ""]
    for name, why in results.get("unavailable", {}).items():
        lines += [f"- **{name} unavailable**: {why}", ""]
    for section in (section_a, section_b, section_c, section_d):
        lines += section(results)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the markdown report here too")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of scenario (a), client order rotated")
    parser.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated subset of " + ",".join(CLIENTS))
    parser.add_argument("--latency-ms", type=float, default=5.0, help="the replicas' median delay")
    parser.add_argument("--sigma", type=float, default=0.3, help="the lognormal spread of that delay")
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)  # upstream | a | b | c | d: internal
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "upstream":
        return run_upstream(args.latency_ms, args.sigma)
    if args.role != "main":
        return client_main(args.role, args.client, json.loads(args.params))

    # SIGTERM as an exception, so that the `with Replicas` below stops them on it too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    clients = tuple(name for name in args.clients.split(",") if name)
    started, load_at_start = time.monotonic(), os.getloadavg()[0]
    with Replicas(2, args.latency_ms, args.sigma) as replicas:
        results = run_all(replicas, clients, args.rounds)
    text = report(results, args, len(replicas.urls), (load_at_start, os.getloadavg()[0]))
    print(text)
    print(f"\n(took {time.monotonic() - started:.0f} s)", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
