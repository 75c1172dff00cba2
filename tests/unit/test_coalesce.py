"""Compute once: the job key, the flights, and the slow app sharing a job among identical requests."""

from __future__ import annotations

import asyncio
import json

from prometheus_client import REGISTRY
from tornado.testing import gen_test

from services.common import metrics_reader
from services.common.server import Instance
from services.common.settings import load
from services.slow import registry
from services.slow.app import make_app
from services.slow.coalesce import Flights, job_key
from tests.support.app_case import ContractTestCase
from tests.support.waiting import eventually


# the key -------------------------------------------------------------------------------------------

def test_values_that_python_calls_equal_make_different_keys():
    keys = {job_key("t", {"x": v}) for v in (1, 1.0, True, "1", [1], None)}
    assert len(keys) == 6


def test_keyword_order_does_not_matter_and_the_task_does():
    assert job_key("t", {"a": 1, "b": {"c": 2, "d": 3}}) == job_key("t", {"b": {"d": 3, "c": 2}, "a": 1})
    assert job_key("t", {"a": 1}) != job_key("u", {"a": 1})


def test_a_key_is_bounded_and_never_shows_an_argument():
    key = job_key("pbkdf2", {"password": "hunter2" * 10_000, "salt": "s", "rounds": 1000})
    assert key.startswith("pbkdf2:") and len(key) == len("pbkdf2:") + 32
    assert "hunter2" not in key


def undeclared(n: int) -> int:
    return n


def test_only_tasks_that_opt_in_share_jobs_and_pbkdf2_and_digest_do_not():
    # A task's answer may depend on more than its arguments (the time, a file, who asks): one that
    # says nothing runs every request as its own job.
    registry.task("undeclared_test_task", parse=lambda path, params, config: {"n": 1})(undeclared)
    try:
        assert registry._TASKS["undeclared_test_task"].coalesce is False
    finally:
        del registry._TASKS["undeclared_test_task"]
    shipped = registry.load("services.slow.tasks")
    assert {name for name, t in shipped.items() if t.coalesce} == {"fib", "primes"}


def test_an_argument_the_key_cannot_describe_is_not_shared():
    assert job_key("t", {"x": object()}) is None
    assert job_key("t", {"x": {1: "int keys"}}) is None


# the flights ---------------------------------------------------------------------------------------

def test_one_waiter_leaving_cancels_nobody_and_the_last_cancels_the_job():
    async def scenario():
        flights = Flights()
        started = []

        def start():
            started.append(1)
            return asyncio.ensure_future(asyncio.sleep(10))

        a, shared_a = flights.join("k", start)
        b, shared_b = flights.join("k", start)
        assert a is b and (shared_a, shared_b) == (False, True) and len(started) == 1 and a.waiters == 2
        a.leave()
        await asyncio.sleep(0)
        assert not a.job.cancelled()
        b.leave()
        await asyncio.gather(a.job, return_exceptions=True)
        await asyncio.sleep(0)  # the done callback
        assert a.job.cancelled() and flights.by_key == {} and flights.all == set()

    asyncio.run(scenario())


def test_a_job_whose_waiters_all_left_is_never_joined_even_while_it_finishes():
    async def scenario():
        flights = Flights()

        started, finishing = asyncio.Event(), asyncio.Event()

        async def finishes_anyway():  # as the pool does over its kill budget
            started.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                finishing.set()
                await asyncio.sleep(0.05)  # the rest of its work, past the cancel

        left, _ = flights.join("k", lambda: asyncio.ensure_future(finishes_anyway()))
        await started.wait()
        left.leave()
        await finishing.wait()  # cancelled, and finishing all the same
        assert not left.job.done()
        fresh, shared = flights.join("k", lambda: asyncio.ensure_future(asyncio.sleep(0)))
        assert fresh is not left and not shared and flights.by_key["k"] is fresh
        await asyncio.gather(left.job, fresh.job, return_exceptions=True)
        await asyncio.sleep(0)
        assert flights.by_key == {}

    asyncio.run(scenario())


def test_a_finished_job_is_never_joined_and_jobs_without_a_key_are_never_shared():
    async def scenario():
        flights = Flights()
        first, _ = flights.join("k", lambda: asyncio.ensure_future(asyncio.sleep(0)))
        await first.job
        second, shared = flights.join("k", lambda: asyncio.ensure_future(asyncio.sleep(0)))
        assert second is not first and not shared
        one, _ = flights.join(None, lambda: asyncio.ensure_future(asyncio.sleep(0)))
        two, shared = flights.join(None, lambda: asyncio.ensure_future(asyncio.sleep(0)))
        assert one is not two and not shared and {one, two} <= flights.all
        await asyncio.gather(one.job, two.job, second.job)

    asyncio.run(scenario())


# the slow app --------------------------------------------------------------------------------------

class CountingPool:
    """Jobs run until the test lets them go; counts them; the shared_raise task raises."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.calls, self.cancelled = 0, 0
        self.kill_on_cancel, self.size = False, 2

    async def run(self, task: str, kwargs: dict, timeout: float, client: str = ""):
        self.calls += 1
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if task == "shared_raise":
            from services.slow.jobs import JobFailed
            raise JobFailed("ValueError", "failed after 1 s", "Traceback ...")
        return json.dumps({"calls": self.calls}).encode(), 1.0

    def stats(self) -> dict:
        return {"workers": 2, "busy": 0}


class CoalescingTest(ContractTestCase):
    def get_app(self):
        self.pool = CountingPool()
        settings = load(env={"FLEET_SLOW_WORKERS": "2", "FLEET_SLOW_QUEUE_LIMIT": "2", "FLEET_SLOW_MAX_PER_CLIENT": "100"})
        tasks = registry.load("services.slow.tasks,tests.support.faulty_tasks")
        return make_app(Instance("slow", 1, settings), tasks, self.pool)

    def get_http_client(self):
        from tornado.simple_httpclient import SimpleAsyncHTTPClient

        return SimpleAsyncHTTPClient(force_instance=True, max_clients=100)  # the default sends 10 at a time

    def fetch_async(self, path: str, **kwargs):
        return self.http_client.fetch(self.get_url(path), raise_error=False, **kwargs)

    @staticmethod
    def joined(task: str) -> float:
        """Requests for `task` that joined a job another had started, so far in this process."""
        return REGISTRY.get_sample_value("fleet_slow_coalesced_total", {"task": task}) or 0.0

    def in_flight(self) -> int:
        """Requests the instance has accepted and not answered; a client that hung up leaves it."""
        return self._app.settings["in_flight"].count

    def coalesced(self, metrics: str, task: str) -> float:
        return metrics_reader.total(metrics, "fleet_slow_coalesced_total", task=task)

    @gen_test(timeout=10)
    async def test_fifty_identical_requests_run_one_job_and_get_the_same_answer(self):
        before = self.coalesced((await self.fetch_async("/metrics")).body.decode(), "shared_spin")
        joined = self.joined("shared_spin")
        requests = [self.fetch_async("/slow/shared_spin/1") for _ in range(50)]
        await eventually(lambda: self.joined("shared_spin") == joined + 49, what="every request joined the job")
        self.pool.release.set()
        answers = await asyncio.gather(*requests)
        assert [a.code for a in answers] == [200] * 50
        assert len({json.loads(a.body)["result"]["calls"] for a in answers}) == 1 and self.pool.calls == 1
        assert len({a.headers["X-Request-ID"] for a in answers}) == 50
        after = self.coalesced((await self.fetch_async("/metrics")).body.decode(), "shared_spin")
        assert after - before == 49  # sharing shows in the instance's metrics, not in the answers

    @gen_test(timeout=10)
    async def test_no_answer_tells_a_client_that_its_request_shared_another_s_job(self):
        joined = self.joined("shared_spin")
        first = self.fetch_async("/slow/shared_spin/1")
        await asyncio.wait_for(self.pool.started.wait(), 5)
        others = [self.fetch_async("/slow/shared_spin/1") for _ in range(3)]
        await eventually(lambda: self.joined("shared_spin") == joined + 3, what="the others joined the first job")
        self.pool.release.set()
        answers = await asyncio.gather(first, *others)
        assert [a.code for a in answers] == [200] * 4 and self.pool.calls == 1
        # The first request's answer and the joiners' carry the same headers: none says "shared".
        names = [sorted(name.lower() for name in a.headers) for a in answers]
        assert all(n == names[0] for n in names), names
        assert not any("shared" in name for name in names[0])

    @gen_test(timeout=10)
    async def test_a_request_that_joins_a_job_is_logged_with_the_id_of_the_request_that_started_it(self):
        joined = self.joined("shared_spin")
        with self.assertLogs("fleet.slow", "INFO") as logged:
            first = self.fetch_async("/slow/shared_spin/1")
            await asyncio.wait_for(self.pool.started.wait(), 5)
            second = self.fetch_async("/slow/shared_spin/1")
            await eventually(lambda: self.joined("shared_spin") == joined + 1, what="the second joined the first job")
            self.pool.release.set()
            answers = await asyncio.gather(first, second)
        started_by = answers[0].headers["X-Request-ID"]
        assert [line for line in logged.output if "shares the job" in line] == [
            f"INFO:fleet.slow:task shared_spin: shares the job of request {started_by} (2 request(s) wait for it)"]

    @gen_test(timeout=10)
    async def test_identical_pbkdf2_requests_in_flight_each_run_their_own_job(self):
        # A shared job would answer the second client sooner: a hint that someone is hashing that
        # exact password right now. pbkdf2 never coalesces.
        joined = self.joined("pbkdf2")
        body = json.dumps({"password": "hunter2", "salt": "s", "rounds": 1000})
        requests = [self.fetch_async("/slow/pbkdf2", method="POST", body=body) for _ in range(2)]
        await eventually(lambda: self.pool.calls + self.joined("pbkdf2") - joined == 2, what="both requests in")
        assert self.pool.calls == 2 and self.joined("pbkdf2") == joined
        self.pool.release.set()
        assert [a.code for a in await asyncio.gather(*requests)] == [200] * 2

    @gen_test(timeout=10)
    async def test_other_arguments_and_opted_out_tasks_run_their_own_jobs(self):
        requests = [self.fetch_async(path) for path in ("/slow/shared_spin/1", "/slow/shared_spin/1.5",
                                                        "/slow/spin/1", "/slow/spin/1")]
        await eventually(lambda: self.pool.calls == 2, what="2 running, 2 waiting")
        self.pool.release.set()
        assert [a.code for a in await asyncio.gather(*requests)] == [200] * 4
        assert self.pool.calls == 4

    @gen_test(timeout=10)
    async def test_every_waiter_gets_the_error_of_a_job_that_raises(self):
        joined = self.joined("shared_raise")
        requests = [self.fetch_async("/slow/shared_raise/1") for _ in range(5)]
        await eventually(lambda: self.joined("shared_raise") == joined + 4, what="every request joined the job")
        self.pool.release.set()
        answers = await asyncio.gather(*requests)
        assert self.pool.calls == 1
        for answer in answers:
            body = self.assert_json_error(answer, 500, "job_failed")
            assert body["message"] == "ValueError: failed after 1 s"

    async def hanging_up_client(self, path: str):
        """A client that sends its request and can hang up: the writer of a raw connection."""
        _, writer = await asyncio.open_connection("127.0.0.1", self.get_http_port())
        writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        await writer.drain()
        return writer

    @gen_test(timeout=10)
    async def test_the_first_client_leaving_leaves_the_job_to_the_others(self):
        joined = self.joined("shared_spin")
        leaver = await self.hanging_up_client("/slow/shared_spin/1")
        await asyncio.wait_for(self.pool.started.wait(), 5)
        stayers = [self.fetch_async("/slow/shared_spin/1") for _ in range(3)]
        await eventually(lambda: self.joined("shared_spin") == joined + 3, what="the others joined the first client's job")
        leaver.close()  # the first client hangs up
        await eventually(lambda: self.in_flight() == 3, what="the first client gone")
        assert self.pool.cancelled == 0
        self.pool.release.set()
        answers = await asyncio.gather(*stayers)
        assert [a.code for a in answers] == [200] * 3 and self.pool.calls == 1

    @gen_test(timeout=10)
    async def test_all_clients_leaving_cancels_the_job(self):
        joined = self.joined("shared_spin")
        clients = [await self.hanging_up_client("/slow/shared_spin/1") for _ in range(3)]
        await eventually(lambda: self.joined("shared_spin") == joined + 2, what="the three clients sharing one job")
        for client in clients[:2]:
            client.close()
        await eventually(lambda: self.in_flight() == 1, what="two of them gone")
        assert self.pool.cancelled == 0  # one is still there
        clients[2].close()
        await eventually(lambda: self.pool.cancelled == 1, what="the job cancelled")
        assert self.pool.calls == 1
