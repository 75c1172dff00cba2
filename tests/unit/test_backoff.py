"""Retry-After from the line and the task's recent job times (services/slow/backoff.py)."""

from __future__ import annotations

import asyncio

from tornado.testing import gen_test

from services.common.server import Instance
from services.common.settings import load
from services.slow import registry
from services.slow.app import make_app
from services.slow.backoff import RetryAfter
from tests.support.app_case import ContractTestCase
from tests.support.fake_pools import HeldPool
from tests.support.waiting import eventually


def test_the_wait_grows_with_the_line_and_the_task_s_job_time():
    advice = RetryAfter(ceiling=30)
    advice.record("fib", 2.0)
    assert [advice.overloaded("fib", waiting, slots=2) for waiting in (0, 3, 7)] == [1, 4, 8]
    advice.record("big", 6.0)
    assert advice.overloaded("big", 3, slots=2) == 12 > advice.overloaded("fib", 3, slots=2)
    assert advice.client_limited("big") == 6


def test_the_wait_is_whole_seconds_at_least_one_and_never_past_a_job_s_deadline():
    advice = RetryAfter(ceiling=7.5)
    advice.record("tiny", 0.001)
    assert advice.overloaded("tiny", 0, slots=4) == 1 and advice.client_limited("tiny") == 1
    advice.record("huge", 100)
    assert advice.overloaded("huge", 50, slots=1) == 8 and advice.client_limited("huge") == 8


def test_recent_jobs_count_most_and_an_unknown_task_is_guessed_at_one_second():
    advice = RetryAfter(ceiling=60)
    assert advice.client_limited("never_ran") == 1
    advice.record("t", 10.0)
    for _ in range(30):
        advice.record("t", 1.0)
    assert advice.client_limited("t") == 2  # 1.0 plus what is left of the 10 s job: about 1.01 s


class RetryAfterGrowsWithTheLineTest(ContractTestCase):
    """One worker held busy; the line holds 4: a refused job is told (4 + 1) x 1 s."""

    def get_app(self):
        self.pool = HeldPool()
        settings = load(env={"FLEET_SLOW_WORKERS": "1", "FLEET_SLOW_QUEUE_LIMIT": "4",
                             "FLEET_SLOW_MAX_PER_CLIENT": "100"})
        return make_app(Instance("slow", 1, settings), registry.load("services.slow.tasks"), self.pool)

    @gen_test(timeout=10)
    async def test_a_full_line_of_four_asks_for_five_seconds(self):
        held = [self.http_client.fetch(self.get_url(f"/slow/fib/{n}"), raise_error=False) for n in range(20, 25)]
        async def line_full() -> bool:
            return (await self.health())["waiting"] == 4

        await eventually(line_full, what="one job running and four waiting")
        refused = await self.http_client.fetch(self.get_url("/slow/fib/30"), raise_error=False)
        body = self.assert_json_error(refused, 503, "overloaded")
        assert refused.headers["Retry-After"] == "5" and "retry in 5 s" in body["message"]
        self.pool.release.set()
        assert [r.code for r in await asyncio.gather(*held)] == [200] * 5
