"""The fan-out core (services/fanout): deadlines, estimates, the hedge budget, the breaker, and calls,
hedges, batches and scopes against two replicas of the real upstream app served in process."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest
from tornado.httpserver import HTTPServer

from services.common import metrics
from services.common.server import Instance
from services.common.settings import load
from services.fanout import breaker as breaker_module
from services.fanout.breaker import Breaker
from services.fanout.budget import HedgeBudget
from services.fanout.client import CallFailed, Pool, Replica, Upstream
from services.fanout.deadline import BadDeadline, Deadline
from services.fanout.estimate import LatencyEstimate
from services.fanout.loader import Loader
from services.fanout.scope import Context, FanOut, RequiredFailed
from services.upstream import app as upstream_app


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# deadlines ------------------------------------------------------------------------------------------

def test_a_callers_deadline_shortens_the_routes_never_lengthens_it():
    clock = Clock()
    assert Deadline.start(300, None, clock).budget_ms == 300
    assert Deadline.start(300, "120", clock).budget_ms == 120
    assert Deadline.start(300, "5000", clock).budget_ms == 300
    assert Deadline.start(300, "9" * 40, clock).budget_ms == 300  # no int() of a huge string
    d = Deadline.start(300, "100", clock)
    clock.now += 0.03
    assert d.remaining_ms(clock) == 70
    clock.now += 1
    assert d.remaining(clock) == 0


@pytest.mark.parametrize("bad", ["abc", "-5", "1.5", "", " ", "１２"])
def test_a_deadline_that_is_not_whole_milliseconds_is_refused(bad):
    with pytest.raises(BadDeadline):
        Deadline.start(300, bad)


# the estimate and the budget ------------------------------------------------------------------------

def test_the_estimate_has_no_percentile_until_it_has_enough_samples():
    estimate = LatencyEstimate(window=1000, refresh=1, min_samples=50)
    for i in range(49):
        estimate.add(0.001)
    assert estimate.percentile(95) is None
    for i in range(51):
        estimate.add(0.001 * (i + 1))
    assert estimate.percentile(50) <= 0.002
    assert 0.040 <= estimate.percentile(95) <= 0.051


def test_the_estimate_follows_a_changed_upstream_within_its_window():
    estimate = LatencyEstimate(window=200, refresh=10, min_samples=50)
    for _ in range(200):
        estimate.add(0.002)
    for _ in range(200):
        estimate.add(0.050)
    assert estimate.percentile(50) == pytest.approx(0.050)


def test_hedges_are_a_share_of_calls_plus_a_floor_and_cannot_be_saved_up():
    clock = Clock()
    budget = HedgeBudget(0.05, 2, clock)
    granted = 0
    for second in range(100):  # 1,000 calls a second, each asking for a hedge
        for _ in range(1000):
            budget.on_call()
            granted += budget.try_spend()
        clock.now += 1
    calls = 100 * 1000
    assert 0.05 * calls <= granted <= 0.05 * calls + 2 * 100 + 10
    quiet = HedgeBudget(0.05, 2, clock)
    clock.now += 3600  # an hour without calls earns the floor's cap, not an hour's worth
    assert sum(quiet.try_spend() for _ in range(1000)) <= 2 * 10 + 2


def test_a_budget_of_nothing_denies_every_hedge():
    budget = HedgeBudget(0, 0, Clock())
    budget.tokens = 0
    budget.on_call()
    assert not budget.try_spend()


# the breaker ----------------------------------------------------------------------------------------

def test_the_breaker_opens_at_its_failure_rate_then_lets_one_trial_through():
    clock = Clock()
    b = Breaker(0.5, 10, 5, 2, clock)
    for _ in range(5):
        b.succeeded()
    for _ in range(4):
        b.failed()
    assert b.state == breaker_module.CLOSED  # 9 calls: too few to judge
    b.failed()
    assert b.state == breaker_module.OPEN and not b.allows()
    clock.now += 2
    assert b.allows() and b.state == breaker_module.HALF_OPEN
    assert not b.allows()  # one trial at a time
    b.failed()
    assert b.state == breaker_module.OPEN
    clock.now += 2
    assert b.allows()
    b.succeeded()
    assert b.state == breaker_module.CLOSED and b.allows()


def test_losers_and_cut_short_calls_do_not_open_the_breaker():
    b = Breaker(0.5, 10, 5, 2, Clock())
    for _ in range(100):
        b.neutral()
    for _ in range(10):
        b.succeeded()
    assert b.state == breaker_module.CLOSED and b.healthy


def test_failures_age_out_of_the_window():
    clock = Clock()
    b = Breaker(0.5, 10, 5, 2, clock)
    for _ in range(9):
        b.failed()
    clock.now += 6
    for _ in range(10):
        b.succeeded()
    b.failed()
    assert b.state == breaker_module.CLOSED


def test_hedging_stops_while_an_upstream_is_failing():
    b = Breaker(0.5, 10, 5, 2, Clock())
    for _ in range(8):
        b.succeeded()
    for _ in range(3):
        b.failed()
    assert not b.healthy  # 27 % failed: above half the breaker's threshold
    assert b.state == breaker_module.CLOSED


# calls against two real replicas --------------------------------------------------------------------

SETTINGS = load(env={"FLEET_OBSERVE_TEST_ROUTES": "true", "FLEET_UPSTREAM_LATENCY_SPREAD": "0",
                     "FLEET_UPSTREAM_LATENCY_MS": "2"})


@contextlib.asynccontextmanager
async def replicas(count: int = 2):
    """`count` replicas of the upstream app on ports of their own: (Replica, its app's Replica state)."""
    servers, found = [], []
    for number in range(1, count + 1):
        app = upstream_app.make_app(Instance("upstream", number, SETTINGS))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        server = HTTPServer(app)
        server.add_sockets([sock])
        servers.append(server)
        found.append((Replica(f"upstream-{number:02d}", f"http://127.0.0.1:{sock.getsockname()[1]}"),
                      _replica_state(app)))
    try:
        yield found
    finally:
        for server in servers:
            server.stop()
            await server.close_all_connections()


def _replica_state(app) -> upstream_app.Replica:
    for rule in app.wildcard_router.rules:
        kwargs = getattr(rule, "target_kwargs", {}) or {}
        if "replica" in kwargs:
            return kwargs["replica"]
    raise LookupError("no replica state in the app")


def make_upstream(name: str, reps: list[Replica], pool: Pool, **fanout) -> Upstream:
    """An upstream with the [fanout] settings, `fanout` overriding some (fanout.<key>)."""
    settings = load(env={f"FLEET_FANOUT_{key.upper()}": str(value) for key, value in fanout.items()})
    return Upstream(name, reps, pool, settings.fanout)


def warm(upstream: Upstream, seconds: float = 0.003, count: int = 100) -> None:
    for _ in range(count):
        upstream.estimate.add(seconds)


def slow(state: upstream_app.Replica, service: str, ms: float) -> None:
    state.behaviours[service] = state.behaviours[service].changed({"latency_ms": ms})


async def settle(states, seconds: float = 1.0) -> None:
    """Wait until the replicas have seen every hang-up (their in-flight count back at 0)."""
    end = time.monotonic() + seconds
    while any(s.stats["in_flight"] for s in states) and time.monotonic() < end:
        await asyncio.sleep(0.01)


def run(coro):
    return asyncio.run(coro)


def test_a_straggling_replica_is_hedged_and_the_loser_cancelled():
    async def main():
        async with replicas() as found:
            (r1, s1), (r2, s2) = found
            pool = Pool(100, 10)
            users = make_upstream("users", [r1, r2], pool)
            warm(users)
            slow(s1, "users", 2000)
            ctx = Context(Deadline.start(300, None), "test")
            started = time.monotonic()
            answer = await users.get("/users/7", ctx)
            took = time.monotonic() - started
            await settle([s1, s2])
            await pool.close()
            return answer, took, ctx.calls[0], s1.stats, s2.stats
    answer, took, call, s1, s2 = run(main())
    assert answer["value"]["id"] == "7"
    assert took < 0.1  # p95 (3 ms) + the other replica's 2 ms, not the straggler's 2 s
    assert call.hedged and call.hedge_won and call.replica == "upstream-02"
    assert s1["abandoned"] == 1 and s1["in_flight"] == 0  # the loser was cancelled: its replica saw the hang-up


def test_a_refused_connection_goes_to_the_next_replica_without_spending_a_hedge():
    async def main():
        async with replicas(1) as found:
            (r1, s1), = found
            dead = socket.socket()
            dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
            gone = Replica("upstream-02", f"http://127.0.0.1:{dead.getsockname()[1]}")
            pool = Pool(100, 10)
            users = make_upstream("users", [gone, r1], pool)
            users.budget.tokens = 0
            ctx = Context(Deadline.start(300, None), "test")
            answer = await users.get("/users/1", ctx)
            await pool.close()
            dead.close()
            return answer, ctx.calls[0]
    answer, call = run(main())
    assert answer["key"] == "1" and call.replica == "upstream-01" and not call.hedged


def test_at_the_deadline_every_attempt_is_cancelled_and_nothing_is_left_in_flight():
    async def main():
        async with replicas() as found:
            (r1, s1), (r2, s2) = found
            pool = Pool(100, 10)
            recs = make_upstream("recs", [r1, r2], pool)
            warm(recs)
            for s in (s1, s2):
                slow(s, "recs", 2000)
            ctx = Context(Deadline.start(100, None), "test")
            started = time.monotonic()
            with pytest.raises(CallFailed) as failed:
                await recs.get("/recs/1", ctx)
            took = time.monotonic() - started
            in_flight = metrics.FANOUT_IN_FLIGHT._value.get()
            await settle([s1, s2])
            await pool.close()
            return failed.value, took, in_flight, s1.stats, s2.stats, recs.breaker.state
    failure, took, in_flight, s1, s2, state = run(main())
    assert failure.outcome == "timeout"
    assert 0.095 <= took <= 0.130
    assert in_flight == 0
    # Each replica saw the call end at the deadline: its caller hung up, or it answered 504 itself
    # (it was told the time left, X-Request-Deadline-Ms); none is still waiting.
    assert sum(s["abandoned"] + s["deadline_504"] for s in (s1, s2)) == 2
    assert s1["in_flight"] == s2["in_flight"] == 0


def test_over_its_budget_a_call_waits_for_its_straggler_instead_of_hedging():
    async def main():
        async with replicas() as found:
            (r1, s1), (r2, s2) = found
            pool = Pool(100, 10)
            posts = make_upstream("posts", [r1, r2], pool, hedge_budget=0.0, hedge_floor_per_second=0.0)
            posts.budget.tokens = 0
            warm(posts)
            slow(s1, "posts", 150)
            ctx = Context(Deadline.start(1000, None), "test")
            await posts.get("/posts/1", ctx)
            await pool.close()
            return ctx.calls[0], s2.stats
    call, s2 = run(main())
    assert not call.hedged and call.replica == "upstream-01" and call.ms >= 140
    assert s2["calls"]["posts"] == 0


def test_an_upstream_that_keeps_failing_is_cut_off_by_its_breaker():
    async def main():
        async with replicas() as found:
            (r1, s1), (r2, s2) = found
            for s in (s1, s2):
                s.behaviours["items"] = s.behaviours["items"].changed({"error_rate": 1})
            pool = Pool(100, 10)
            items = make_upstream("items", [r1, r2], pool, breaker_min_calls=5)
            outcomes = []
            for _ in range(8):
                ctx = Context(Deadline.start(300, None), "test")
                with pytest.raises(CallFailed) as failed:
                    await items.get("/items/1", ctx)
                outcomes.append(failed.value.outcome)
            await pool.close()
            return outcomes, s1.stats["calls"]["items"] + s2.stats["calls"]["items"]
    outcomes, served = run(main())
    assert outcomes == ["error"] * 5 + ["refused"] * 3
    assert served == 5  # the refused calls never reached a replica


def test_lookups_of_one_turn_become_multigets_each_key_once():
    async def main():
        async with replicas() as found:
            (r1, s1), (r2, s2) = found
            pool = Pool(100, 10)
            items = make_upstream("items", [r1, r2], pool)
            ctx = Context(Deadline.start(1000, None), "test")
            loader = Loader(items, ctx, batch_size=100)
            keys = [f"k{i}" for i in range(150)] + [f"k{i}" for i in range(50)]  # 200 asked, 150 distinct
            values = await asyncio.gather(*(loader.load(k) for k in keys))
            again = await loader.load("k3")  # asked again later: no new call
            await ctx.close()
            await pool.close()
            return values, again, loader.batches, s1.stats, s2.stats
    values, again, batches, s1, s2 = run(main())
    assert len(values) == 200 and values[3] == values[153] == again
    assert batches == 2
    assert s1["multigets"]["items"] + s2["multigets"]["items"] == 2
    seen: dict[str, int] = {}
    for s in (s1, s2):
        for key, times in s["keys"]["items"].items():
            seen[key] = seen.get(key, 0) + times
    assert len(seen) == 150 and set(seen.values()) == {1}


def test_a_failed_required_part_ends_the_request_and_cancels_its_siblings():
    async def main():
        ctx = Context(Deadline.start(1000, None), "test")
        cancelled = asyncio.Event()

        async def fails():
            await asyncio.sleep(0.01)
            raise CallFailed("users", "error", "answered 500")

        async def waits():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        fan = FanOut(ctx)
        fan.required("user", fails())
        fan.optional("posts", waits())
        with pytest.raises(RequiredFailed) as failed:
            await fan.gather()
        await ctx.close()
        return failed.value.api_error(), cancelled.is_set(), ctx.tasks
    error, cancelled, left = run(main())
    assert error.status_code == 502 and error.error == "bad_gateway"
    assert cancelled and not left


def test_optional_parts_late_at_the_deadline_make_a_partial_answer_on_time():
    async def main():
        ctx = Context(Deadline.start(80, None), "test")

        async def quick():
            return "ok"

        fan = FanOut(ctx)
        fan.required("user", quick())
        fan.optional("recs", asyncio.sleep(10))
        started = time.monotonic()
        parts = await fan.gather()
        took = time.monotonic() - started
        await ctx.close()
        return parts, took, ctx.tasks
    parts, took, left = run(main())
    assert parts.values == {"user": "ok"} and parts.missing == {"recs": "timeout"} and parts.partial
    assert 0.075 <= took <= 0.1
    assert not left


def test_a_required_part_late_at_the_deadline_is_a_504():
    async def main():
        ctx = Context(Deadline.start(30, None), "test")
        fan = FanOut(ctx)
        fan.required("user", asyncio.sleep(10))
        with pytest.raises(RequiredFailed) as failed:
            await fan.gather()
        await ctx.close()
        return failed.value.api_error()
    error = run(main())
    assert error.status_code == 504 and error.error == "deadline_exceeded"
