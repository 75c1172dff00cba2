"""Fast routes that call backends: the shipped examples of services/fanout at work.

    curl -s localhost:8080/profile/42       # a user (required) with posts, recs and friends (optional)
    curl -s 'localhost:8080/search?q=tail'  # fanout.search_shards shards asked at once, any may be missing
    curl -s 'localhost:8080/lookup?keys=a,b,a'  # lookups merged into multi-gets, each key once
    curl -s -H 'X-Request-Deadline-Ms: 50' localhost:8080/profile/42   # less time than the route's own

Each answers by its deadline (fanout.<route>_deadline_ms, or the caller's if shorter): complete, or
`"partial": true` with what is `missing` and why, or, when a required part failed, the contract's
JSON error (504 deadline_exceeded, 503 upstream_unavailable, 502 bad_gateway). A request with a
call that did not succeed (so a partial answer or an error) logs one line with each of its calls
(upstream, replica, ms, outcome, hedge won or lost); nginx's access log has every request, and the
instance's /metrics every call and hedge.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from typing import Any

from services.common import logs, metrics
from services.common.web import ApiError, BaseHandler
from services.fanout.client import CallFailed, Upstreams
from services.fanout.deadline import HEADER, BadDeadline, Deadline
from services.fanout.loader import Loader
from services.fanout.scope import Context, FanOut, RequiredFailed
from services.upstream import KEY

log = logging.getLogger(logs.FANOUT_LOGGER)

MAX_LOOKUP_KEYS = 1000
MAX_QUERY_CHARS = 200


class FanOutHandler(BaseHandler):
    """A route whose answer is made of calls to upstreams, within a deadline."""

    upstreams: Upstreams
    budget_ms = 300  # fanout.<route>_deadline_ms (make_app)
    batch_size = 100  # fanout.batch_size
    ctx: Context | None = None

    async def get(self, *args: str) -> None:
        try:
            deadline = Deadline.start(self.budget_ms, self.request.headers.get(HEADER))
        except BadDeadline as error:
            raise ApiError(400, "bad_request", str(error)) from None
        self.check_arguments(*args)
        self.ctx = Context(deadline, self.request_id)
        try:
            if deadline.remaining() <= 0:
                raise ApiError(504, "deadline_exceeded", f"no time left ({HEADER}: 0)")
            body = await self.answer(self.ctx, *args)
        except RequiredFailed as failed:
            raise failed.api_error() from None
        finally:
            await self.ctx.close()
        if body.get("partial"):
            metrics.FANOUT_PARTIAL.labels(self.route_pattern).inc()
        self.write_json(body)

    def check_arguments(self, *args: str) -> None:
        """Refuse bad input (400) before any call is made."""

    async def answer(self, ctx: Context, *args: str) -> dict[str, Any]:
        raise NotImplementedError

    def on_connection_close(self) -> None:
        if self.ctx is not None:
            self.ctx.cancel()  # the client left: its calls stop now, not at the deadline
        super().on_connection_close()

    def on_finish(self) -> None:
        super().on_finish()
        if self.ctx is not None and (self.get_status() != 200 or any(c.outcome != "ok" for c in self.ctx.calls)):
            log.info("%s %s %d: %d call(s)", self.request.method, self.request.uri, self.get_status(),
                     len(self.ctx.calls), extra={"fields": {
                         "status": self.get_status(), "duration_ms": round(1000 * self.request.request_time(), 2),
                         "deadline_ms": self.ctx.deadline.budget_ms,
                         "calls": [c.as_log() for c in self.ctx.calls]}})


def no_answer(missing: dict[str, str], what: str) -> ApiError:
    """The error when not one optional part came in: the most common reason says which."""
    reason = Counter(missing.values()).most_common(1)[0][0] if missing else "timeout"
    if reason in ("timeout", "skipped", "cancelled"):
        return ApiError(504, "deadline_exceeded", f"no {what} answered before the deadline")
    if reason == "refused":
        return ApiError(503, "upstream_unavailable", f"no {what} could be called (their circuit breaker is open)",
                        headers={"Retry-After": "1"})
    return ApiError(502, "bad_gateway", f"no {what} answered ({reason})")


class ProfileHandler(FanOutHandler):
    """GET /profile/<id>: the user (required), their posts, recommendations and friends with their
    names (optional; the names in one multi-get of the users service)."""

    async def answer(self, ctx: Context, user_id: str) -> dict[str, Any]:
        up = self.upstreams
        names = Loader(up["users"], ctx, self.batch_size)
        fan = FanOut(ctx)
        fan.required("user", up["users"].get(f"/users/{user_id}", ctx))
        fan.optional("posts", up["posts"].get(f"/posts/{user_id}", ctx))
        fan.optional("recs", up["recs"].get(f"/recs/{user_id}", ctx))
        fan.optional("friends", self.friends(ctx, names, user_id))
        parts = await fan.gather()
        body: dict[str, Any] = {"user": parts.values["user"]["value"]}
        for name in ("posts", "recs"):
            if name in parts.values:
                body[name] = parts.values[name]["value"]
        if "friends" in parts.values:
            body["friends"] = parts.values["friends"]
        return {**body, "partial": parts.partial, "missing": parts.missing}

    async def friends(self, ctx: Context, names: Loader, user_id: str) -> list[dict[str, str]]:
        ids = (await self.upstreams["friends"].get(f"/friends/{user_id}", ctx))["value"]
        users = await asyncio.gather(*(names.load(i) for i in ids))
        return [{"id": i, "name": u["name"]} for i, u in zip(ids, users)]


class SearchHandler(FanOutHandler):
    """GET /search?q=<text>: every shard asked at once (fanout.search_shards wide); the hits of those
    that answered in time, with the others named as missing."""

    shards = 20  # fanout.search_shards

    def check_arguments(self) -> None:
        q = self.get_query_argument("q", "")
        if not 1 <= len(q) <= MAX_QUERY_CHARS:
            raise ApiError(400, "bad_request", f"GET /search?q=<text>: 1-{MAX_QUERY_CHARS} characters")

    async def answer(self, ctx: Context) -> dict[str, Any]:
        q = self.get_query_argument("q")
        key = hashlib.blake2b(q.encode(), digest_size=8).hexdigest()
        search = self.upstreams["search"]
        fan = FanOut(ctx)
        for shard in range(self.shards):
            fan.optional(f"shard-{shard:02d}", search.get(f"/search/{shard}:{key}", ctx))
        parts = await fan.gather()
        if not parts.values:
            raise no_answer(parts.missing, "shard")
        return {"q": q, "shards": self.shards, "answered": len(parts.values),
                "hits": [parts.values[name]["value"] for name in sorted(parts.values)],
                "partial": parts.partial, "missing": parts.missing}


class LookupHandler(FanOutHandler):
    """GET /lookup?keys=a,b,c: each key looked up on its own, the lookups merged into multi-gets of
    fanout.batch_size distinct keys; the values that came in by the deadline."""

    def check_arguments(self) -> None:
        keys = self.get_query_argument("keys", "").split(",")
        if not 1 <= len(keys) <= MAX_LOOKUP_KEYS or not all(KEY.match(k) for k in keys):
            raise ApiError(400, "bad_request", f"GET /lookup?keys=a,b,c: 1-{MAX_LOOKUP_KEYS} keys, each 1-64 "
                                               "letters, digits or _.:-")

    async def answer(self, ctx: Context) -> dict[str, Any]:
        keys = self.get_query_argument("keys").split(",")
        items = Loader(self.upstreams["items"], ctx, self.batch_size)
        wanted = {key: items.load(key) for key in keys}  # one loop turn: one batch per batch_size keys
        await asyncio.wait(set(wanted.values()), timeout=ctx.deadline.remaining())
        values, missing = {}, {}
        for key, future in wanted.items():
            if not future.done() or future.cancelled():
                missing[key] = "timeout"
            elif isinstance(future.exception(), CallFailed):
                missing[key] = future.exception().outcome
            elif future.exception() is not None:
                missing[key] = "not_found"
            else:
                values[key] = future.result()
        if not values:
            raise no_answer(missing, "lookup")
        return {"values": values, "keys": len(wanted), "batches": items.batches,
                "partial": bool(missing), "missing": missing}


def routes(settings, upstreams: Upstreams) -> list[tuple]:
    f = settings.fanout
    shared = {"upstreams": upstreams, "batch_size": f.batch_size}
    return [
        (r"/profile/([A-Za-z0-9_-]{1,64})", ProfileHandler,
         {"route_pattern": "/profile/{id}", "budget_ms": f.profile_deadline_ms, **shared}),
        (r"/search", SearchHandler,
         {"route_pattern": "/search", "budget_ms": f.search_deadline_ms, "shards": f.search_shards, **shared}),
        (r"/lookup", LookupHandler, {"route_pattern": "/lookup", "budget_ms": f.lookup_deadline_ms, **shared}),
    ]
