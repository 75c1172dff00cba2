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


def test_a_full_line_s_wait_is_the_work_in_line_over_the_slots_whatever_task_was_refused():
    advice = RetryAfter(ceiling=30)
    advice.record("sleep", 4.0)
    advice.record("fib", 0.01)
    assert advice.overloaded({"sleep": 4}, slots=1) == 16  # the line: 16 s of work, not "1 s"
    assert advice.overloaded({"sleep": 2, "fib": 100}, slots=2) == 5  # (8 + 1) / 2, rounded up
    assert advice.overloaded({"never_ran": 3}, slots=1) == 3  # 1 s a job until one has run
    advice.record("big", 6.0)
    assert advice.client_limited("big") == 6


def test_the_wait_is_whole_seconds_at_least_one_and_never_past_a_job_s_deadline():
    advice = RetryAfter(ceiling=7.5)
    advice.record("tiny", 0.001)
    assert advice.overloaded({"tiny": 1}, slots=4) == 1 and advice.overloaded({}, slots=4) == 1
    assert advice.client_limited("tiny") == 1
    advice.record("huge", 100)
    assert advice.overloaded({"huge": 50}, slots=1) == 8 and advice.client_limited("huge") == 8


def test_a_job_cut_short_at_its_deadline_never_lowers_its_task_s_estimate():
    advice = RetryAfter(ceiling=60)
    advice.record("t", 4.0)
    advice.record_cut_short("t", 0.5)  # it waited in line and had only 0.5 s left to run
    assert advice.expected("t") == 4.0
    advice.record_cut_short("t", 9.0)  # it ran its whole 9 s deadline: it takes at least that
    assert advice.expected("t") > 4.0


def test_recent_jobs_count_most_and_an_unknown_task_is_guessed_at_one_second():
    advice = RetryAfter(ceiling=60)
    assert advice.client_limited("never_ran") == 1
    advice.record("t", 10.0)
    for _ in range(30):
        advice.record("t", 1.0)
    assert advice.client_limited("t") == 2  # 1.0 plus what is left of the 10 s job: about 1.01 s


def handler_kwargs(app) -> dict:
    """What the app gives each request handler of its /slow/ route: its admission, pool, RetryAfter."""
    return app.wildcard_router.rules[0].target_kwargs


class RetryAfterCountsTheWorkInLineTest(ContractTestCase):
    """One worker held busy; the line holds 4: a refused job is told how long that line takes."""

    def get_app(self):
        self.pool = HeldPool()
        settings = load(env={"FLEET_SLOW_WORKERS": "1", "FLEET_SLOW_QUEUE_LIMIT": "4",
                             "FLEET_SLOW_MAX_PER_CLIENT": "100"})
        return make_app(Instance("slow", 1, settings), registry.load("services.slow.tasks"), self.pool)

    async def fill_the_line(self, path: str) -> list:
        """One job running, four of `path` (formatted with 0-3) waiting; their answers to come."""
        held = [self.http_client.fetch(self.get_url("/slow/fib/20"), raise_error=False)]
        await asyncio.wait_for(self.pool.started.wait(), 5)
        held += [self.http_client.fetch(self.get_url(path.format(i)), raise_error=False) for i in range(4)]

        async def line_full() -> bool:
            return (await self.health())["waiting"] == 4

        await eventually(line_full, what="one job running and four waiting")
        return held

    @gen_test(timeout=10)
    async def test_a_full_line_of_four_one_second_jobs_asks_for_four_seconds(self):
        held = await self.fill_the_line("/slow/fib/{}")
        refused = await self.http_client.fetch(self.get_url("/slow/fib/30"), raise_error=False)
        body = self.assert_json_error(refused, 503, "overloaded")
        assert refused.headers["Retry-After"] == "4" and "retry in 4 s" in body["message"]
        self.pool.release.set()
        assert [r.code for r in await asyncio.gather(*held)] == [200] * 5

    @gen_test(timeout=10)
    async def test_a_short_job_refused_by_a_line_of_long_jobs_is_told_the_line_s_time_not_its_own(self):
        # The case: sleep jobs have taken 4 s here, four wait; fib has never run (1 s).
        handler_kwargs(self._app)["retry_after"].record("sleep", 4.0)
        held = await self.fill_the_line("/slow/sleep/{}")
        refused = await self.http_client.fetch(self.get_url("/slow/fib/30"), raise_error=False)
        self.assert_json_error(refused, 503, "overloaded")
        assert refused.headers["Retry-After"] == "16"  # 4 x 4 s of work for one worker, not 1 s
        self.pool.release.set()
        assert [r.code for r in await asyncio.gather(*held)] == [200] * 5
