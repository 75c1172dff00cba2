"""The upstream service: a stand-in for the backends a fast route calls, with the faults they have.

    python -m services.upstream --settings .run/settings.json --instance 1
    curl -s 127.0.0.1:8401/users/42                 # {"service": "users", "key": "42", "value": ...}
    curl -s '127.0.0.1:8401/users?keys=1,2,3'        # a multi-get: {"values": {"1": ..., ...}}

Each replica serves a few named services (SERVICES) with made-up, deterministic values, so a
caller can check what it got. A call takes a time drawn from a log-normal around
upstream.latency_ms; a share of calls are stragglers (upstream.straggler_ms) or fail (500). A
caller's `X-Request-Deadline-Ms` is honoured: a call that cannot be answered in time is answered
504 at its deadline instead of holding the replica, and a caller that hangs up stops the call's
wait at once (counted as abandoned: that is how a test sees hedge losers and deadlines cancelled).

With observe.test_routes, `PUT /_control` changes this replica's behaviour live (a JSON object of
the [upstream] keys, optionally for one service) and `GET /_stats` shows what it served: a test or
the bench makes one replica a straggler, or one service slow, and counts calls, keys and hang-ups.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, replace
from typing import Any

from prometheus_client import Counter, Histogram
from tornado import web

from services.common import cpu_slice, server
from services.common.web import ApiError, BaseHandler, HealthHandler, MetricsHandler, NotFoundHandler
from services.upstream import KEY, SERVICES

FRIENDS_PER_USER = 10

CALLS = Counter("fleet_upstream_served_total", "Calls this replica answered, by service, kind and outcome",
                ["service", "kind", "outcome"])
KEYS = Histogram("fleet_upstream_multiget_keys", "Keys asked for in one multi-get", ["service"],
                 buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))


@dataclass(frozen=True)
class Behaviour:
    """How a service of this replica answers (the [upstream] settings, or PUT /_control)."""
    latency_ms: float
    latency_spread: float
    straggler_rate: float
    straggler_ms: float
    error_rate: float

    LIMITS = {"latency_ms": (0, 10_000), "latency_spread": (0, 3), "straggler_rate": (0, 1),
              "straggler_ms": (0, 60_000), "error_rate": (0, 1)}

    def draw(self, rng: random.Random) -> tuple[float, bool]:
        """(seconds this call takes, whether it fails)."""
        if self.straggler_rate and rng.random() < self.straggler_rate:
            ms = self.straggler_ms
        elif self.latency_spread:
            ms = self.latency_ms * math.exp(rng.gauss(0, self.latency_spread))
        else:
            ms = self.latency_ms
        return ms / 1000, bool(self.error_rate) and rng.random() < self.error_rate

    def changed(self, fields: dict[str, Any]) -> "Behaviour":
        for name, value in fields.items():
            low, high = self.LIMITS[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ApiError(400, "bad_request", f"{name} must be a number {low:g}-{high:g}")
        return replace(self, **fields)


def value(service: str, key: str) -> Any:
    """The made-up value a service holds for a key: the same on every replica, every time."""
    digest = hashlib.blake2b(f"{service}:{key}".encode(), digest_size=2 * FRIENDS_PER_USER).hexdigest()
    if service == "friends":  # user ids 0-65535, four hex digits each
        return [str(int(digest[i:i + 4], 16)) for i in range(0, 4 * FRIENDS_PER_USER, 4)]
    digest = digest[:16]
    if service == "users":
        return {"id": key, "name": f"user-{digest[:6]}"}
    return digest


class Replica:
    """This replica's behaviour per service, and what it served (GET /_stats)."""

    def __init__(self, default: Behaviour, max_keys: int) -> None:
        self.default = default
        self.max_keys = max_keys
        self.behaviours = {s: default for s in SERVICES}
        self.rng = random.Random()
        self.stats: dict[str, Any] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = {"calls": {s: 0 for s in SERVICES}, "multigets": {s: 0 for s in SERVICES},
                      "keys": {s: {} for s in SERVICES}, "abandoned": 0, "deadline_504": 0, "errors": 0,
                      "in_flight": 0}

    def count(self, service: str, keys: list[str], multi: bool) -> None:
        self.stats["calls"][service] += 1
        if multi:
            self.stats["multigets"][service] += 1
            KEYS.labels(service).observe(len(keys))
        seen = self.stats["keys"][service]
        if len(seen) < 100_000:  # a test reads which keys were asked for how often; bounded
            for key in keys:
                seen[key] = seen.get(key, 0) + 1


class ServiceHandler(BaseHandler):
    """GET /<service>/<key>, and the multi-get GET /<service>?keys=a,b,c."""

    open_to_all = True  # its callers are this host's fast instances (the trusted peers), not the edge
    replica: Replica
    waiting: asyncio.Future | None = None

    async def get(self, service: str, key: str | None = None) -> None:
        replica = self.replica
        multi = key is None
        keys = self.keys_asked(service) if multi else [key]
        if not KEY.match(keys[0]):
            raise ApiError(400, "bad_request", "a key is 1-64 letters, digits or _.:-")
        replica.count(service, keys, multi)
        seconds, fails = replica.behaviours[service].draw(replica.rng)
        deadline = self.deadline_seconds()
        late = deadline is not None and seconds > deadline
        replica.stats["in_flight"] += 1
        # A future of its own (asyncio.sleep's, without a task around it), so that a caller's
        # hang-up (on_connection_close) can end the wait at once.
        loop = asyncio.get_running_loop()
        self.waiting = loop.create_future()
        timer = loop.call_later(deadline if late else seconds, _wake, self.waiting)
        try:
            await self.waiting
        except asyncio.CancelledError:
            replica.stats["abandoned"] += 1
            CALLS.labels(service, "multi" if multi else "single", "abandoned").inc()
            return
        finally:
            timer.cancel()
            replica.stats["in_flight"] -= 1
        kind = "multi" if multi else "single"
        if late:
            replica.stats["deadline_504"] += 1
            CALLS.labels(service, kind, "deadline").inc()
            raise ApiError(504, "deadline_exceeded", "the caller's deadline passed before the answer was ready")
        if fails:
            replica.stats["errors"] += 1
            CALLS.labels(service, kind, "error").inc()
            raise ApiError(500, "upstream_error", f"{service} failed this call (upstream.error_rate)")
        CALLS.labels(service, kind, "ok").inc()
        if multi:
            self.write_json({"service": service, "values": {k: value(service, k) for k in keys}})
        else:
            self.write_json({"service": service, "key": key, "value": value(service, key)})

    def keys_asked(self, service: str) -> list[str]:
        text = self.get_query_argument("keys", "")
        keys = [k for k in text.split(",") if k]
        if not keys or not all(KEY.match(k) for k in keys):
            raise ApiError(400, "bad_request", f"GET /{service}?keys=a,b,c: 1-64 letters, digits or _.:- each")
        if len(keys) > self.replica.max_keys:
            raise ApiError(400, "bad_request", f"at most {self.replica.max_keys} keys per multi-get (upstream.max_keys)")
        return keys

    def deadline_seconds(self) -> float | None:
        text = self.request.headers.get("X-Request-Deadline-Ms", "")
        return int(text) / 1000 if text.isdigit() and len(text) < 9 else None

    def on_connection_close(self) -> None:
        if self.waiting is not None and not self.waiting.done():
            self.waiting.cancel()
        super().on_connection_close()


def _wake(waiting: asyncio.Future) -> None:
    if not waiting.done():
        waiting.set_result(None)


class ControlHandler(BaseHandler):
    """GET /_control: the behaviour per service; PUT /_control {"service": "users", "latency_ms": 50}
    changes it (no "service": every service; {"reset": true}: back to the settings)."""

    open_to_all = True
    replica: Replica

    def get(self) -> None:
        self.write_json({s: asdict(b) for s, b in self.replica.behaviours.items()})

    def put(self) -> None:
        try:
            fields = json.loads(self.request.body or b"{}")
        except ValueError:
            raise ApiError(400, "bad_request", "the body must be a JSON object") from None
        if not isinstance(fields, dict):
            raise ApiError(400, "bad_request", "the body must be a JSON object")
        replica = self.replica
        if fields.pop("reset", False):
            replica.behaviours = {s: replica.default for s in SERVICES}
        service = fields.pop("service", None)
        if service is not None and service not in SERVICES:
            raise ApiError(400, "bad_request", f"service must be one of {', '.join(SERVICES)}")
        unknown = set(fields) - set(Behaviour.LIMITS)
        if unknown:
            raise ApiError(400, "bad_request", f"unknown field(s) {', '.join(sorted(unknown))}; "
                                               f"known: {', '.join(Behaviour.LIMITS)}")
        for name in [service] if service else SERVICES:
            replica.behaviours[name] = replica.behaviours[name].changed(fields)
        self.get()


class StatsHandler(BaseHandler):
    """GET /_stats: calls, multi-gets and keys per service, hang-ups; DELETE /_stats: zero them."""

    open_to_all = True
    replica: Replica

    def get(self) -> None:
        self.write_json(self.replica.stats)

    def delete(self) -> None:
        self.replica.reset_stats()
        self.write_json(self.replica.stats)


def make_app(instance: server.Instance) -> web.Application:
    u = instance.settings.upstream
    replica = Replica(Behaviour(u.latency_ms, u.latency_spread, u.straggler_rate, u.straggler_ms, u.error_rate),
                      u.max_keys)
    for service in SERVICES:  # every series at zero, so a rate() works from the first scrape
        for kind in ("single", "multi"):
            for outcome in ("ok", "error", "deadline", "abandoned"):
                CALLS.labels(service, kind, outcome)
    names = "|".join(SERVICES)
    routes = [
        (rf"/({names})/([^/]+)", ServiceHandler, {"route_pattern": "/{service}/{key}", "replica": replica}),
        (rf"/({names})", ServiceHandler, {"route_pattern": "/{service}", "replica": replica}),
        (r"/healthz", HealthHandler, {"route_pattern": "/healthz"}),
        (r"/metrics", MetricsHandler),
    ]
    if instance.settings.observe.test_routes:
        routes += [(r"/_control", ControlHandler, {"route_pattern": "/_control", "replica": replica}),
                   (r"/_stats", StatsHandler, {"route_pattern": "/_stats", "replica": replica})]
    return web.Application(routes, default_handler_class=NotFoundHandler, **server.app_settings(instance))


def main(argv: list[str] | None = None) -> None:
    instance = server.parse_args("upstream", argv)
    # A part of the fast path now (the fan-out routes wait on it): the fast instances' short CPU
    # slice, so that a call's answer is not held behind a heavy job's slice (services/common/cpu_slice.py).
    cpu_slice.request(instance.settings.fast.sched_slice_us)
    server.run(instance, lambda: server.serve(make_app(instance), instance))


if __name__ == "__main__":
    main()
