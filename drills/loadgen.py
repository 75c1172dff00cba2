"""A steady mixed load through the edge that records the outcome of every request.

Used by `make chaos` and by the fault tests: while a fault is produced, fast GETs, fast POSTs and
slow jobs keep arriving at fixed rates, each client on its own kept-alive connection, as
browsers and services call a fleet.

A client behaves like a well-made HTTP client with a kept-alive connection (Go's net/http
Transport, Apache HttpClient): before reusing an idle connection it checks that the server has
not closed it (stale check); a request that could not be written at all on a reused connection
is sent again once on a new one, whatever its method (the server never saw it); a GET whose reused
connection closed before any byte of the answer is sent again once (RFC 9110 9.2.2). A POST that
was written is never resent. Everything else counts as it came.

Each client connects from a loopback address of its own (127.0.2.1, .2, ...; the host must be
loopback), as distinct users do: the edge's per-client limits (the fast routes' rate, the slow
routes' share) count each apart, as they would count real users, never the whole load as one.

One case is marked, not hidden: a POST written on a reused connection that the server closed
before any byte of an answer (`idle_race`). nginx 1.22 closes its idle client keep-alive
connections when it reloads, and a request sent in that instant meets a closed socket (nginx
1.27.4's `keepalive_min_timeout` closes the gap). The Tally counts such an outcome apart when it
fell in a reload's window, and as lost anywhere else.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import select
import threading
import time
from dataclasses import dataclass, field


# The steady load's clients' addresses: 127.0.2.1, .2, ... (the faults' own clients use 127.0.0.x).
CLIENT_NETWORK = "127.0.2."


@dataclass(frozen=True)
class Route:
    name: str  # "fast GET", ...
    kind: str  # "fast" or "slow"
    method: str
    path: str
    rate: float  # requests per second, per client
    clients: int = 1
    body: bytes | None = None
    partial_is_error: bool = False  # a fan-out route: a 200 with "partial": true is not a success


DEFAULT_ROUTES = (
    Route("fast GET /fast", "fast", "GET", "/fast", rate=25, clients=4),
    Route("fast POST /echo", "fast", "POST", "/echo", rate=10, clients=2, body=b"x" * 512),
    # A fan-out route (five calls to the upstream service): a partial answer counts as an error.
    Route("fast GET /profile", "fast", "GET", "/profile/7", rate=5, clients=2, partial_is_error=True),
    Route("slow GET /slow/fib/18", "slow", "GET", "/slow/fib/18", rate=5, clients=2),
    Route("slow POST /slow/pbkdf2", "slow", "POST", "/slow/pbkdf2", rate=3, clients=1,
          body=b'{"password": "hunter2", "rounds": 2000}'),
)


@dataclass
class Outcome:
    route: Route
    started: float  # monotonic
    status: int | None  # None: no HTTP answer at all
    error: str = ""  # exception, or the JSON error code of a non-200 answer
    json_error: bool = False  # a non-200 answer with the contract's JSON body
    retried: bool = False
    idle_race: bool = False  # written on a reused connection the server closed before answering
    seconds: float = 0.0  # from the first send to the answer (the answered ones)

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error  # a partial fan-out answer has an error


@dataclass
class SteadyLoad:
    host: str
    port: int
    routes: tuple[Route, ...] = DEFAULT_ROUTES
    timeout: float = 60
    outcomes: list[Outcome] = field(default_factory=list)
    # (signalled, new workers seen) of the nginx reloads made while it ran, as the reload returned
    # them to the fault that made it: Tally counts a POST's idle race in one apart.
    reloads: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "SteadyLoad":
        clients = [route for route in self.routes for _ in range(route.clients)]
        loopback = _ipv4_loopback(self.host)
        for number, route in enumerate(clients, start=1):
            source = f"{CLIENT_NETWORK}{number}" if loopback else None
            thread = threading.Thread(target=self._client, args=(route, source), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def _client(self, route: Route, source: str | None) -> None:
        client = _KeptAliveClient(self.host, self.port, self.timeout, source)
        interval = 1 / route.rate
        next_send = time.monotonic()
        while not self._stop.is_set():
            delay = next_send - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            next_send = max(next_send + interval, time.monotonic() - interval)
            outcome = client.send(route)
            with self._lock:
                self.outcomes.append(outcome)
        client.close()

    def send_one(self, route: Route) -> Outcome:
        """One request on a new connection, recorded with the rest (a fault's target job)."""
        started = time.monotonic()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(route.method, route.path, body=route.body)
            response = conn.getresponse()
            outcome = _outcome(route, started, response.status, response.read(), retried=False)
        except (OSError, http.client.HTTPException) as exc:  # a truncated answer is lost too
            outcome = Outcome(route, started, None, type(exc).__name__)
        finally:
            conn.close()
        with self._lock:
            self.outcomes.append(outcome)
        return outcome

    def send_in_background(self, route: Route) -> None:
        thread = threading.Thread(target=self.send_one, args=(route,), daemon=True)
        thread.start()
        self._threads.append(thread)  # joined on exit, so its outcome is counted

    def between(self, start: float, end: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if start <= o.started < end]


class _KeptAliveClient:
    """One client's kept-alive connection (from the local address `source`, if given), and the
    resend rules of the module docstring."""

    def __init__(self, host: str, port: int, timeout: float, source: str | None = None):
        self.host, self.port, self.timeout = host, port, timeout
        self.source_address = (source, 0) if source else None
        self.conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def send(self, route: Route) -> Outcome:
        started = time.monotonic()
        for attempt in (1, 2):
            if self.conn is not None and _closed_by_peer(self.conn):
                self.close()  # stale check: the server closed it while it was idle
            reused = self.conn is not None
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout,
                                                       source_address=self.source_address)
            written = False
            try:
                self.conn.request(route.method, route.path, body=route.body,
                                  headers={"Content-Type": "application/json"} if route.body else {})
                written = True
                response = self.conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:  # RemoteDisconnected is both
                self.close()
                closed = isinstance(exc, (ConnectionResetError, BrokenPipeError))
                if reused and closed and attempt == 1 and (not written or route.method == "GET"):
                    continue  # never seen by the server, or an idempotent GET: send again, fresh
                unanswered = isinstance(exc, (ConnectionResetError, http.client.RemoteDisconnected))
                return Outcome(route, started, None, type(exc).__name__, retried=attempt == 2,
                               idle_race=reused and written and unanswered)
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            return _outcome(route, started, response.status, data, retried=attempt == 2)
        raise AssertionError("unreachable")


def _ipv4_loopback(host: str) -> bool:
    """Whether `host` is an IPv4 loopback address, which any 127.x.y.z can reach."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.version == 4 and address.is_loopback


def _closed_by_peer(conn: http.client.HTTPConnection) -> bool:
    """An idle kept-alive connection is readable only if the server closed it (EOF or reset)."""
    if conn.sock is None:
        return False
    readable, _, _ = select.select([conn.sock], [], [], 0)
    return bool(readable)


def _outcome(route: Route, started: float, status: int, data: bytes, retried: bool) -> Outcome:
    seconds = time.monotonic() - started
    if status == 200 and not (route.partial_is_error and b'"partial": true' in data):
        return Outcome(route, started, status, retried=retried, seconds=seconds)
    if status == 200:  # a fan-out route's answer without some of its parts: named, and never lost
        missing = json.loads(data).get("missing", {})
        return Outcome(route, started, status, "partial: " + ", ".join(f"{k} {v}" for k, v in missing.items()),
                       json_error=True, retried=retried, seconds=seconds)
    try:
        body = json.loads(data)
        return Outcome(route, started, status, body.get("error", "?"), json_error=True, retried=retried,
                       seconds=seconds)
    except ValueError:
        return Outcome(route, started, status, "non-JSON error body", retried=retried, seconds=seconds)


@dataclass
class Tally:
    """Outcomes of a load during a fault. `may_hit` names what the fault itself can reach:
    "slow" (jobs on a killed worker or instance) and/or "fast POST" (a POST in flight on a
    killed fast instance, which nginx must not resend)."""

    sent: int = 0
    failed: int = 0  # answered with an error although the fault could not have reached it
    hit: int = 0  # the fault reached it, and it was answered with the contract's JSON error
    lost: int = 0  # no answer at all, or an error without the contract's JSON
    retried: int = 0
    reload_races: int = 0  # POSTs sent on a kept-alive connection as an nginx reload closed it
    examples: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, outcomes: list[Outcome], may_hit: frozenset[str] = frozenset(),
           reloads: list[tuple[float, float]] = ()) -> "Tally":
        """`reloads`: (signalled, new workers seen) monotonic times of the nginx reloads during the
        load. Old workers close their idle connections right after the new ones start; a second
        of margin covers a busy machine."""
        t = cls(sent=len(outcomes))
        for o in outcomes:
            t.retried += o.retried
            if o.ok:
                continue
            reachable = o.route.kind in may_hit or f"{o.route.kind} {o.route.method}" in may_hit
            if o.idle_race and any(start <= o.started <= seen + 1.0 for start, seen in reloads):
                t.reload_races += 1
                kind = "reload race"
            elif not o.json_error:
                t.lost += 1
                kind = "LOST"
            elif reachable:
                t.hit += 1
                kind = "hit"
            else:
                t.failed += 1
                kind = "FAILED"
            t.examples.append(f"{kind}: {o.route.name}: {o.status} {o.error}")
        t.examples = cls.worst_first(t.examples)
        return t

    @staticmethod
    def worst_first(examples: list[str]) -> list[str]:
        """Five examples at most, those that make a verdict fail (FAILED, LOST) first."""
        return sorted(examples, key=lambda e: not e.startswith(("FAILED", "LOST")))[:5]
