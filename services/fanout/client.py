"""Calls from a fast instance to the upstreams: one pool of connections, and per upstream its
replicas, a latency estimate, a hedge budget and a circuit breaker.

    upstreams = Upstreams.from_settings(settings)          # once per instance
    value = await upstreams["users"].get("/users/42", ctx)  # inside a request (scope.Context)

The HTTP client is aiohttp's (bench/results/fanout_clients.md has the comparison that chose it):
a call is an asyncio task that can be cancelled (the connection is closed, so the upstream sees
the hang-up and stops), its pool is bounded and sized from the fan-out width
(fanout.max_connections), and its DNS cache has a TTL (fanout.dns_cache_seconds). Tornado's own
clients count a queue wait against the request's timeout and cannot cancel a fetch (tornado#1400,
#157): a losing hedge would hold its connection until the straggler answered.

A call (Upstream.get), within its request's deadline:
  1. refused at once if the upstream's breaker is open, not started if too little time is left;
  2. sent to the next replica (round robin); a replica that refuses the connection or drops it
     unanswered passes the call on to the next at once (every call is a GET, safe to send again:
     how a replica's restart or kill goes unnoticed);
  3. still unanswered past the upstream's p95 (fanout.hedge_percentile), sent to another replica
     too, if the hedge budget allows and the upstream is healthy (else asked again one p95 later);
     the first answer wins and the other is cancelled;
  4. at the deadline, every attempt is cancelled and the call fails "timeout".
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from services.common import metrics, server
from services.common.inventory import host_port
from services.common.settings import Settings
from services.fanout.breaker import OPEN, Breaker
from services.fanout.budget import HedgeBudget
from services.fanout.deadline import HEADER
from services.fanout.estimate import LatencyEstimate

OUTCOMES = ("ok", "error", "timeout", "refused", "skipped", "unavailable", "cancelled")
HEDGE_EVENTS = ("sent", "won", "cancelled", "denied")
MIN_CALL_SECONDS = 0.001  # before an upstream has an estimate: a call with less time left is not started
FAIR_TIME_FLOOR = 0.05  # a call given less than this (or its upstream's p99) and cut off is not its upstream's failure
MIN_HEDGE_RETRY = 0.005  # a call denied a hedge asks again this long later at the soonest
DEADLINE_SLACK = 0.002  # a call cancelled this close to its request's deadline was cancelled by it
BODY_LIMIT = 1 << 20  # an upstream's answer larger than this is an error, never held whole


class CallFailed(Exception):
    """A call to an upstream that gave no answer: `outcome` is one of OUTCOMES."""

    def __init__(self, upstream: str, outcome: str, message: str) -> None:
        super().__init__(f"{upstream}: {message}")
        self.upstream, self.outcome, self.message = upstream, outcome, message


class Unreachable(Exception):
    """A replica refused the connection, or dropped it without an answer (killed, restarting, a
    kept-alive connection it had closed): the call, a GET, goes to another replica."""


class Answered(Exception):
    """A replica answered, with an error."""

    def __init__(self, status: int) -> None:
        super().__init__(f"answered {status}")
        self.status = status


@dataclass
class SubCall:
    """One call, as the request's log line shows it."""
    upstream: str
    path: str
    started: float
    ms: float = 0.0
    outcome: str = ""
    replica: str = ""  # the one that answered (or the last tried)
    hedged: bool = False
    hedge_won: bool = False

    def as_log(self) -> dict[str, Any]:
        line = {"upstream": self.upstream, "path": self.path, "ms": round(self.ms, 2), "outcome": self.outcome,
                "replica": self.replica}
        if self.hedged:
            line["hedged"] = "won" if self.hedge_won else "lost"
        return line


@dataclass
class Replica:
    name: str  # "upstream-01"
    url: str  # "http://127.0.0.1:8401"


class Pool:
    """The instance's one aiohttp session: a bounded pool of kept-alive connections to every replica."""

    def __init__(self, max_connections: int, dns_cache_seconds: float,
                 tls: Callable[[], ssl.SSLContext | None] = lambda: None) -> None:
        self.max_connections = max_connections
        self.dns_cache_seconds = dns_cache_seconds
        self.tls = tls  # read on first use: an app built without its host's certificates still builds
        self.session: aiohttp.ClientSession | None = None

    def get_session(self) -> aiohttp.ClientSession:
        """Made on first use: aiohttp binds it to the running event loop."""
        if self.session is None:
            trace = aiohttp.TraceConfig()
            trace.on_connection_queued_start.append(self._queued)
            trace.on_connection_queued_end.append(self._dequeued)
            ssl_context = self.tls()
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,  # every upstream together; a call beyond it waits (measured)
                limit_per_host=0,
                use_dns_cache=self.dns_cache_seconds > 0,
                ttl_dns_cache=self.dns_cache_seconds or None,
                ssl=ssl_context if ssl_context is not None else False,
                keepalive_timeout=30,
            )
            self.session = aiohttp.ClientSession(
                connector=connector, trace_configs=[trace], auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None),  # the request's deadline ends a call: a cancellation
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self.session

    @staticmethod
    async def _queued(session, context, params) -> None:
        context.queued_at = time.monotonic()

    @staticmethod
    async def _dequeued(session, context, params) -> None:
        metrics.FANOUT_POOL_WAIT.observe(time.monotonic() - context.queued_at)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


@dataclass
class Upstream:
    """One upstream service and what this instance knows of it."""
    name: str
    replicas: list[Replica]
    pool: Pool
    settings: Any  # the [fanout] section
    estimate: LatencyEstimate = field(default_factory=LatencyEstimate)
    budget: HedgeBudget = None  # type: ignore[assignment]
    breaker: Breaker = None  # type: ignore[assignment]
    next_replica: int = 0

    def __post_init__(self) -> None:
        f = self.settings
        self.budget = self.budget or HedgeBudget(f.hedge_budget, f.hedge_floor_per_second)
        gauge, opened = metrics.FANOUT_BREAKER.labels(self.name), metrics.FANOUT_BREAKER_OPENED.labels(self.name)

        def on_change(state: int) -> None:
            gauge.set(state)
            if state == OPEN:
                opened.inc()

        self.breaker = self.breaker or Breaker(f.breaker_failure_rate, f.breaker_min_calls, f.breaker_window_seconds,
                                               f.breaker_open_seconds, on_change=on_change)
        gauge.set(self.breaker.state)
        self.calls = {o: metrics.FANOUT_CALLS.labels(self.name, o) for o in OUTCOMES}
        self.hedges = {e: metrics.FANOUT_HEDGES.labels(self.name, e) for e in HEDGE_EVENTS}

    def hedge_delay(self) -> float | None:
        """Seconds after which a call still unanswered is hedged; None: no hedging now."""
        if not self.settings.hedging or len(self.replicas) < 2:
            return None
        return self.estimate.percentile(self.settings.hedge_percentile)

    def minimum_time(self) -> float:
        """Less time than this left: the call would not finish, so it is not started."""
        return self.estimate.percentile(50) or MIN_CALL_SECONDS

    def fair_time(self) -> float:
        """A call cut off after at least this long without an answer counts against the upstream."""
        return max(FAIR_TIME_FLOOR, 2 * (self.estimate.percentile(99) or 0))

    def timed_out(self, given: float) -> bool:
        """A call that had `given` seconds ended without an answer: the upstream's failure if that
        was at least its fair time (the breaker counts it), else nothing said about it."""
        if given >= self.fair_time():
            self.breaker.failed()
            return True
        self.breaker.neutral()
        return False

    def order(self) -> list[Replica]:
        start = self.next_replica
        self.next_replica = (start + 1) % len(self.replicas)
        return self.replicas[start:] + self.replicas[:start]

    async def get(self, path: str, ctx) -> Any:
        """The JSON an upstream answers for GET `path`, within the request's deadline (ctx.deadline).
        Raises CallFailed; every attempt it started has ended when it returns or raises."""
        # time.monotonic(), the deadline's clock: uvloop's loop.time() is in whole milliseconds,
        # read once per turn of the loop.
        record = SubCall(self.name, path, time.monotonic())
        ctx.calls.append(record)
        try:
            value = await self._get(path, ctx, record)
            record.outcome = "ok"
            return value
        except CallFailed as failed:
            record.outcome = failed.outcome
            raise
        except asyncio.CancelledError:
            # The request ended the call. At its deadline, after the upstream had its fair time, it
            # is the upstream's timeout; earlier (the client left, a required sibling failed), or
            # with less time than that, it says nothing about the upstream.
            if time.monotonic() < ctx.deadline.at - DEADLINE_SLACK:
                self.breaker.neutral()
                record.outcome = "cancelled"
            else:
                record.outcome = "timeout" if self.timed_out(ctx.deadline.at - record.started) else "cancelled"
            raise
        finally:
            record.ms = 1000 * (time.monotonic() - record.started)
            self.calls[record.outcome or "cancelled"].observe(record.ms / 1000)

    async def _get(self, path: str, ctx, record: SubCall) -> Any:
        if not self.breaker.allows():
            raise CallFailed(self.name, "refused", "its circuit breaker is open (it was failing); not called")
        started = time.monotonic()
        given = ctx.deadline.at - started
        if given < self.minimum_time():
            self.breaker.neutral()
            raise CallFailed(self.name, "skipped", f"not called: {1000 * max(0.0, given):.0f} ms left, too little")
        self.budget.on_call()
        order = self.order()
        attempts: dict[asyncio.Task, Replica] = {}
        hedge_at = first_delay = self.hedge_delay()
        denied = False
        tried = 0
        answered_with: Answered | None = None

        def send(replica: Replica) -> None:
            nonlocal tried
            tried += 1
            record.replica = replica.name
            attempts[asyncio.ensure_future(self._send(replica, path, ctx))] = replica

        send(order[0])
        try:
            while attempts:
                now = time.monotonic()
                if now >= ctx.deadline.at:
                    break
                wait = ctx.deadline.at - now
                can_hedge = hedge_at is not None and not record.hedged and tried < len(order)
                if can_hedge:
                    wait = min(wait, max(0.0, started + hedge_at - now))
                done, _ = await asyncio.wait(attempts, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if can_hedge and time.monotonic() >= started + hedge_at:
                        if ctx.deadline.at - time.monotonic() < self.minimum_time() or not self.breaker.healthy:
                            hedge_at = None  # it could not answer in time any more; or the upstream is failing
                            self.hedges["denied"].inc()
                        elif self.budget.try_spend():
                            record.hedged = True
                            self.hedges["sent"].inc()
                            send(order[tried])
                        else:
                            # Denied: asked again one delay later. The budget refills with every
                            # call, and a straggler is still out then, where a call of the usual
                            # tail has answered: the hedges the budget has go to the stragglers.
                            if not denied:
                                self.hedges["denied"].inc()
                            denied = True
                            hedge_at += max(first_delay, MIN_HEDGE_RETRY)
                    continue
                for task in done:
                    replica = attempts.pop(task)
                    error = task.exception()
                    if error is None:
                        value, seconds = task.result()
                        self.estimate.add(seconds)
                        self.breaker.succeeded()
                        record.replica = replica.name
                        if record.hedged and replica is not order[0]:
                            record.hedge_won = True
                            self.hedges["won"].inc()
                        return value
                    if isinstance(error, Unreachable) and tried < len(order) and not attempts:
                        send(order[tried])  # no answer: the next replica, at once, no hedge spent
                    elif isinstance(error, Answered):
                        answered_with = error
                    elif not isinstance(error, Unreachable):
                        raise error  # a bug: the route's 500, with its traceback in the log
            # No answer: every attempt failed, or the deadline came (an upstream that was told the
            # time left, X-Request-Deadline-Ms, answers 504 at it: a timeout too, not an error).
            if answered_with is not None and not attempts and answered_with.status != 504:
                self.breaker.failed()
                raise CallFailed(self.name, "error", f"answered {answered_with.status}")
            if not attempts and answered_with is None:
                self.breaker.failed()
                raise CallFailed(self.name, "unavailable", f"no replica answered ({tried} unreachable)")
            self.timed_out(given)
            raise CallFailed(self.name, "timeout", f"no answer within the {1000 * given:.0f} ms left")
        finally:
            for task in attempts:  # the losers, and every attempt at the deadline
                task.cancel()
                if record.hedged:
                    self.hedges["cancelled"].inc()
            if attempts:
                await asyncio.gather(*attempts, return_exceptions=True)

    async def _send(self, replica: Replica, path: str, ctx) -> tuple[Any, float]:
        """One attempt: (the answer's JSON, its seconds); raises Unreachable or Answered."""
        session = self.pool.get_session()
        started = time.monotonic()
        headers = {**ctx.deadline.header(), "X-Request-ID": ctx.request_id}
        metrics.FANOUT_IN_FLIGHT.inc()
        try:
            async with session.get(replica.url + path, headers=headers, allow_redirects=False) as response:
                body = await response.content.read(BODY_LIMIT + 1)
                status = response.status
        except (aiohttp.ClientError, OSError) as error:
            raise Unreachable(str(error)) from None
        finally:
            metrics.FANOUT_IN_FLIGHT.dec()
        if status != 200 or len(body) > BODY_LIMIT:
            raise Answered(status)
        try:
            return json.loads(body), time.monotonic() - started
        except ValueError:
            raise Answered(status) from None


class Upstreams(dict):
    """{service name: Upstream} of one fast instance, all over the one Pool."""

    def __init__(self, upstreams: dict[str, Upstream], pool: Pool) -> None:
        super().__init__(upstreams)
        self.pool = pool

    @classmethod
    def from_settings(cls, settings: Settings, services: tuple[str, ...]) -> "Upstreams":
        f = settings.fanout
        scheme = "https" if settings.edge_tls else "http"  # across hosts every instance speaks TLS
        replicas = [Replica(name, f"{scheme}://{host_port(settings.address, port)}")
                    for name, port in settings.instances("upstream")]
        pool = Pool(f.max_connections, f.dns_cache_seconds, lambda: server.client_tls_context(settings))
        return cls({name: Upstream(name, replicas, pool, f) for name in services}, pool)
