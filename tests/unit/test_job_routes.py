"""Long jobs in process (services/slow/long_jobs.py, job_routes.py, job_runner.py): the slow app
with a job store in a temp dir, through real HTTP, and a job runner beside it on a connection of
its own to the store (as another process has). Through the edge on a real fleet:
tests/integration/test_jobs.py."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from tornado.tcpclient import TCPClient
from tornado.testing import gen_test

from services.common.server import Instance
from services.common.settings import load
from services.slow import registry
from services.slow.app import make_app, start_jobs
from services.slow.inline_pool import InlinePool
from services.slow.job_runner import JobRunner
from services.slow.job_store import SWEEP_BATCH, AsyncStore, NewJob, SqliteStore, StoreUnavailable, new_id
from services.slow.job_store_redis import RedisStore
from services.slow.pool import WorkerPool
from tests.support.app_case import ContractTestCase
from tests.support.fake_pools import HeldPool
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually

MODULES = "services.slow.tasks,tests.support.faulty_tasks"
ASYNC = {"Prefer": "respond-async"}


class Clock:
    now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class JobsCase(ContractTestCase):
    """The slow app with a job store of its own; `pool()` says which pool runs the jobs."""

    settings_env = {"FLEET_JOBS_KEEPALIVE_SECONDS": "1", "FLEET_JOBS_MAX_ACTIVE_PER_CLIENT": "3"}

    def pool(self):
        return InlinePool(MODULES)

    def get_app(self):
        self.dir = tempfile.TemporaryDirectory()
        self.clock = Clock()
        fleet = load(env=self.settings_env)
        self.sync_store = self.make_store(ttl=60, clock=self.clock, inline_result_bytes=fleet.jobs.inline_result_kb << 10)
        self.store = AsyncStore(self.sync_store)
        self.jobs_pool = self.pool()
        tasks = registry.load(MODULES)
        app = make_app(Instance("slow", 1, fleet), tasks, InlinePool(MODULES), store=self.store)
        self.long_jobs = app.settings["long_jobs"]
        self.runner_store = AsyncStore(self.make_store(ttl=60, clock=self.clock,
                                                       inline_result_bytes=fleet.jobs.inline_result_kb << 10))
        self.runner = JobRunner(self.runner_store, self.jobs_pool, fleet, "runner-a", dict(tasks))
        return app

    def make_store(self, **kwargs):
        """The store the app keeps its jobs in; called again, another connection to it (another instance's)."""
        return SqliteStore(Path(self.dir.name) / "store.sqlite", **kwargs)

    def setUp(self):
        super().setUp()
        self.io_loop.run_sync(self.long_jobs.start)
        self.io_loop.run_sync(self.runner.start)

    def tearDown(self):
        self.io_loop.run_sync(self.runner.close)
        self.io_loop.run_sync(self.long_jobs.close)
        super().tearDown()
        self.runner_store.close()
        self.store.close()
        self.dir.cleanup()

    async def get(self, path: str, **headers):
        return await self.http_client.fetch(self.get_url(path), headers=headers, raise_error=False)

    async def submit(self, path: str, **headers) -> str:
        response = await self.get(path, **ASYNC, **headers)
        assert response.code == 202, (response.code, response.body)
        return json.loads(response.body)["id"]

    async def state(self, job_id: str) -> str:
        return json.loads((await self.get(f"/jobs/{job_id}")).body)["state"]

    async def _is(self, job_id: str, state: str) -> bool:
        return await self.state(job_id) == state


class SubmitTest(JobsCase):
    @gen_test
    async def test_prefer_respond_async_answers_202_with_location_after_the_record_is_committed(self):
        response = await self.get("/slow/fib/10", **ASYNC)
        assert response.code == 202
        body = json.loads(response.body)
        assert response.headers["Location"] == f"/jobs/{body['id']}" == body["location"]
        assert response.headers["Preference-Applied"] == "respond-async"
        assert response.headers["Retry-After"] == "1"
        assert body["state"] in ("queued", "running") and body["task"] == "fib" and body["args"] == {"n": 10}
        # another connection to the file sees the record the 202 announced
        other = self.make_store()
        assert other.get(body["id"]) is not None
        other.close()
        await eventually(lambda: self._is(body["id"], "succeeded"), what="it succeeds")
        done = await self.get(f"/jobs/{body['id']}")
        assert json.loads(done.body)["result"] == 55 and "Retry-After" not in done.headers

    @gen_test
    async def test_without_prefer_a_heavy_request_is_answered_as_before(self):
        response = await self.get("/slow/fib/10")
        assert response.code == 200 and json.loads(response.body)["result"] == 55
        assert "Location" not in response.headers
        assert self.sync_store.count_active() == 0 and sum(self.sync_store.count_by_state().values()) == 0

    @gen_test
    async def test_prefer_wait_answers_the_synchronous_200_when_the_job_ends_in_time(self):
        response = await self.get("/slow/fib/10", Prefer="respond-async, wait=5")
        assert response.code == 200
        body = json.loads(response.body)
        assert body["result"] == 55 and body["task"] == "fib"
        job_id = response.headers["Content-Location"].rsplit("/", 1)[1]
        assert await self.state(job_id) == "succeeded"

    @gen_test
    async def test_a_job_that_raises_fails_with_the_contract_s_code(self):
        job_id = await self.submit("/slow/raise_error")
        await eventually(lambda: self._is(job_id, "failed"), what="it fails")
        error = json.loads((await self.get(f"/jobs/{job_id}")).body)["error"]
        assert error["error"] == "job_failed" and error["status"] == 500 and error["retryable"] is False

    @gen_test
    async def test_a_long_task_runs_as_a_job_even_without_prefer(self):
        response = await self.get("/slow/report/0.2")
        assert response.code == 202 and "Preference-Applied" not in response.headers
        job_id = json.loads(response.body)["id"]
        await eventually(lambda: self._is(job_id, "succeeded"), what="it succeeds")
        body = json.loads((await self.get(f"/jobs/{job_id}")).body)
        assert body["result"]["sections"] == 2
        assert body["progress"] == {"done": 2, "total": 2, "message": "section 2 of 2"}

    @gen_test
    async def test_bad_arguments_are_400_before_any_job_is_made(self):
        response = await self.get("/slow/fib/-1", **ASYNC)
        self.assert_json_error(response, 400, "bad_argument")
        assert sum(self.sync_store.count_by_state().values()) == 0

    @gen_test
    async def test_unknown_ids_are_404_and_expired_ones_410(self):
        for path in ("/jobs/" + "A" * 22, "/jobs/short", "/jobs/" + "A" * 22 + "/events"):
            self.assert_json_error(await self.get(path), 404, "not_found")
        job_id = await self.submit("/slow/fib/5")
        await eventually(lambda: self._is(job_id, "succeeded"), what="it succeeds")
        self.clock.now += 61
        self.sync_store.sweep()
        self.assert_json_error(await self.get(f"/jobs/{job_id}"), 410, "expired")
        self.assert_json_error(await self.get(f"/jobs/{job_id}/events"), 410, "expired")
        self.clock.now += 61
        self.sync_store.sweep()
        self.assert_json_error(await self.get(f"/jobs/{job_id}"), 404, "not_found")

    @gen_test
    async def test_a_sweep_with_more_than_a_batch_due_expires_them_all_in_short_transactions(self):
        for _ in range(2 * SWEEP_BATCH + 10):
            job, _ = self.sync_store.create(NewJob(id=new_id(), task="fib", client="10.0.0.9"))
            self.sync_store.start(job.id, "runner-b")
            self.sync_store.finish(job.id, "succeeded", result=b"1")
        self.clock.now += 61
        calls = []
        runner_store = self.runner_store.sync  # the runner sweeps, on its own connection
        sweep = runner_store.sweep
        runner_store.sweep = lambda **kwargs: calls.append(sweep(**kwargs)["expired"]) or {"expired": calls[-1],
                                                                                           "removed": 0}
        assert await self.runner.sweep() == {"expired": 2 * SWEEP_BATCH + 10, "removed": 0}
        assert calls == [SWEEP_BATCH, SWEEP_BATCH, 10]
        assert self.sync_store.count_by_state()["expired"] == 2 * SWEEP_BATCH + 10

    @gen_test
    async def test_a_client_past_its_active_jobs_gets_429_and_nothing_is_made(self):
        for _ in range(3):  # jobs.max_active_per_client = 3, queued already (of a task no runner here serves)
            self.sync_store.create(NewJob(id=new_id(), task="served_elsewhere", client="127.0.0.1"))
        response = await self.get("/slow/fib/5", **ASYNC)
        self.assert_json_error(response, 429, "rate_limited")
        assert response.headers["Retry-After"].isdigit()
        assert self.sync_store.count_active() == 3


class WorkerKilledTest(JobsCase):
    """Jobs on the real local pool (one worker process, capped at 200 MiB): a worker killed for its
    memory, its deadline or its own death fails the job with the code a synchronous request gets."""

    def pool(self):
        return WorkerPool(1, MODULES, nice=0, max_rss_mb=200, kill_on_cancel=True)

    def setUp(self):
        super().setUp()
        self.io_loop.run_sync(self.jobs_pool.start)

    def tearDown(self):
        self.io_loop.run_sync(self.jobs_pool.close)
        super().tearDown()

    @gen_test(timeout=60)
    async def test_a_job_whose_worker_is_killed_fails_with_the_synchronous_code(self):
        for path, code, status in (("/slow/allocate/600", "worker_out_of_memory", 502),
                                   ("/slow/spin_past_deadline", "job_timeout", 504),
                                   ("/slow/exit_worker", "worker_died", 502)):
            job_id = await self.submit(path)
            await eventually(lambda: self._is(job_id, "failed"), 20, what=f"{path} failing")
            error = json.loads((await self.get(f"/jobs/{job_id}")).body)["error"]
            assert (error["error"], error["status"]) == (code, status), (path, error)
            await eventually(lambda: self.jobs_pool.stats()["workers"] == 1, 20, what="the pool refilled")


class EventsTest(JobsCase):
    async def stream(self, job_id: str, last: str | None = None, until: str = "event: end") -> str:
        """The stream's text up to `until` (the request is then dropped)."""
        chunks: list[bytes] = []
        headers = {"Last-Event-ID": last} if last is not None else {}

        def on_chunk(chunk: bytes) -> None:
            chunks.append(chunk)

        fetch = self.http_client.fetch(self.get_url(f"/jobs/{job_id}/events"), headers=headers,
                                       streaming_callback=on_chunk, raise_error=False, request_timeout=10)
        await eventually(lambda: until in b"".join(chunks).decode() or fetch.done(), timeout=8, what=until)
        if fetch.done():
            response = fetch.result()
            assert response.code == 200, response.code
        return b"".join(chunks).decode()

    @gen_test
    async def test_a_finished_job_s_stream_replays_every_event_then_the_end_and_closes(self):
        job_id = await self.submit("/slow/report/0.3")
        await eventually(lambda: self._is(job_id, "succeeded"), what="it succeeds")
        text = await self.stream(job_id)
        assert text.startswith("retry: 1000\n\n")
        ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
        # queued, running, the reports (the inline pool runs the job in one go: the last one at least), end
        assert ids == list(range(1, ids[-1] + 1)) and len(ids) >= 4
        assert '"message": "section 3 of 3"' in text
        end = text.split("event: end\ndata: ")[1]
        assert json.loads(end)["result"]["sections"] == 3

    @gen_test
    async def test_a_reconnect_with_last_event_id_gets_exactly_the_events_it_missed_and_after_the_end_204(self):
        job_id = await self.submit("/slow/report/0.3")
        await eventually(lambda: self._is(job_id, "succeeded"), what="it succeeds")
        last = self.sync_store.get(job_id).seq
        text = await self.stream(job_id, last="2")
        assert [line for line in text.splitlines() if line.startswith("id: ")] == [f"id: {n}" for n in range(3, last + 1)]
        response = await self.get(f"/jobs/{job_id}/events", **{"Last-Event-ID": str(last)})
        assert response.code == 204 and response.body == b""
        self.assert_json_error(await self.get(f"/jobs/{job_id}/events", **{"Last-Event-ID": "x1"}), 400, "bad_request")


class HeldJobsTest(JobsCase):
    """Jobs on a pool that holds them (one slot): one running, the next queued behind it."""

    def pool(self):
        return HeldPool()

    def open_stream(self, job_id: str, chunks: list[bytes], **headers):
        """The job's event stream, its text arriving in `chunks`; the fetch, done when it ends."""
        return self.http_client.fetch(self.get_url(f"/jobs/{job_id}/events"), headers=headers,
                                      streaming_callback=chunks.append, raise_error=False, request_timeout=20)

    async def followed_running_job(self, chunks: list[bytes]):
        """A job running on the held pool, and its event stream once it has replayed the job's start."""
        job_id = await self.submit("/slow/fib/30")
        await self.jobs_pool.started.wait()
        fetch = self.open_stream(job_id, chunks)
        await eventually(lambda: b'"running"' in b"".join(chunks), what="the stream's replay")
        return job_id, fetch

    def count_reads(self) -> list[tuple]:
        """The store's event reads from now on."""
        reads: list[tuple] = []
        events = self.sync_store.events
        self.sync_store.events = lambda *args, **kwargs: reads.append(args) or events(*args, **kwargs)
        return reads

    @gen_test
    async def test_a_running_job_s_progress_reaches_its_open_stream_live_with_keep_alives_between(self):
        chunks: list[bytes] = []
        job_id, fetch = await self.followed_running_job(chunks)
        text = lambda: b"".join(chunks).decode()  # noqa: E731
        assert "event: state" in text()
        self.jobs_pool.progress(1, 4, "one")
        await eventually(lambda: '"message": "one"' in text(), what="the report, live")
        await eventually(lambda: ": keep-alive" in text(), timeout=3, what="a keep-alive comment (1 s)")
        self.jobs_pool.release.set()
        response = await fetch
        assert response.code == 200 and "event: end" in text()

    @gen_test
    async def test_a_change_wakes_every_stream_of_a_job_and_their_events_are_read_once(self):
        job_id = await self.submit("/slow/fib/30")
        await self.jobs_pool.started.wait()
        texts: list[list[bytes]] = [[] for _ in range(8)]  # the test's HTTP client holds 10 connections at most
        fetches = [self.open_stream(job_id, chunks) for chunks in texts]
        seen = lambda text: all(text in b"".join(chunks) for chunks in texts)  # noqa: E731
        await eventually(lambda: seen(b'"running"'), what="every stream's replay")
        reads = self.count_reads()
        # One reader follows the job for its eight streams here (job_feeds.py): one waiter at the
        # Watcher, where each stream waited with its own before (their waits were most of the loop's
        # time with 1,000 streams: bench/jobs.py).
        assert len(self.long_jobs.watcher._waiters[job_id]) == 1
        self.jobs_pool.progress(1, 4, "one")
        await eventually(lambda: seen(b'"message": "one"'), what="the report in every stream")
        assert len(reads) == 1  # one read for the eight
        tails = {b"".join(chunks).split(b"\n\n")[-2] for chunks in texts}  # each stream's last event
        assert len(tails) == 1 and tails.pop().startswith(b"id: 3\nevent: progress")  # the same bytes in all
        self.jobs_pool.release.set()
        for response in [await fetch for fetch in fetches]:
            assert response.code == 200

    @gen_test
    async def test_a_stream_that_reconnects_beside_live_ones_gets_what_it_missed_then_the_live_events_once(self):
        live, late = [], []
        job_id, first = await self.followed_running_job(live)
        text = lambda chunks: b"".join(chunks).decode()  # noqa: E731
        ids = lambda chunks: [int(x[4:]) for x in text(chunks).splitlines() if x.startswith("id: ")]  # noqa: E731
        for n, word in ((1, "one"), (2, "two")):
            self.jobs_pool.progress(n, 4, word)
            await eventually(lambda: f'"message": "{word}"' in text(live), what=f"report {word}, live")
        second = self.open_stream(job_id, late, **{"Last-Event-ID": "3"})
        await eventually(lambda: '"message": "two"' in text(late), what="the reconnect's replay")
        self.jobs_pool.progress(3, 4, "three")
        await eventually(lambda: all('"message": "three"' in text(c) for c in (live, late)), what="report three")
        self.jobs_pool.release.set()
        assert (await first).code == (await second).code == 200
        assert ids(live) == [1, 2, 3, 4, 5, 6] and ids(late) == [4, 5, 6]  # 6: the end
        assert text(live).endswith(text(late)[len("retry: 1000\n\n"):])

    @gen_test
    async def test_a_stream_ends_at_its_job_s_next_event_once_its_instance_drains(self):
        chunks: list[bytes] = []
        _, fetch = await self.followed_running_job(chunks)
        self._app.settings["draining"] = True
        self.jobs_pool.progress(1, 4, "one")
        response = await fetch  # it ends: the browser reconnects, with Last-Event-ID, to another instance
        assert response.code == 200 and b"".join(chunks).endswith(b'"message": "one"}\n\n')
        self._app.settings["draining"] = False
        self.jobs_pool.release.set()

    @gen_test
    async def test_a_stream_whose_client_left_costs_its_job_nothing_more(self):
        job_id = await self.submit("/slow/fib/30")
        await self.jobs_pool.started.wait()
        stream = await TCPClient().connect("127.0.0.1", self.get_http_port())
        await stream.write(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await stream.read_until(b'"running"')
        assert job_id in self.long_jobs.watcher._waiters  # its feed waits for the job's next change
        stream.close()
        await eventually(lambda: job_id not in self.long_jobs.watcher._waiters, what="the feed gone with its stream")
        reads = self.count_reads()
        self.jobs_pool.progress(1, 4, "one")
        await eventually(lambda: self._progress_is(job_id, "one"), what="the report recorded")
        assert reads == []  # nobody read the job's events for a stream that is gone
        self.jobs_pool.release.set()

    async def _progress_is(self, job_id: str, message: str) -> bool:
        body = json.loads((await self.get(f"/jobs/{job_id}")).body)
        return (body["progress"] or {}).get("message") == message

    @gen_test
    async def test_cancelling_a_queued_job_ends_it_at_once_and_it_never_runs(self):
        running = await self.submit("/slow/fib/30")
        await self.jobs_pool.started.wait()
        queued = await self.submit("/slow/fib/31")
        response = await self.http_client.fetch(self.get_url(f"/jobs/{queued}"), method="DELETE", raise_error=False)
        assert response.code == 200 and json.loads(response.body)["state"] == "cancelled"
        again = await self.http_client.fetch(self.get_url(f"/jobs/{queued}"), method="DELETE", raise_error=False)
        assert json.loads(again.body)["state"] == "cancelled"  # idempotent
        self.jobs_pool.release.set()
        await eventually(lambda: self._is(running, "succeeded"), what="the first job ends")
        assert self.jobs_pool.calls == 1

    @gen_test
    async def test_cancelling_a_running_job_stops_it_and_it_ends_cancelled(self):
        job_id = await self.submit("/slow/fib/30")
        await self.jobs_pool.started.wait()
        response = await self.http_client.fetch(self.get_url(f"/jobs/{job_id}"), method="DELETE", raise_error=False)
        assert response.code == 200 and json.loads(response.body)["state"] in ("cancelling", "cancelled")
        await eventually(lambda: self._is(job_id, "cancelled"), what="it ends cancelled")
        assert self.jobs_pool.cancelled == 1
        body = json.loads((await self.get(f"/jobs/{job_id}")).body)
        assert body["error"]["error"] == "cancelled" and "result" not in body

    @gen_test
    async def test_a_cancel_made_in_the_store_by_another_instance_reaches_the_owner(self):
        job_id = await self.submit("/slow/fib/30")
        await self.jobs_pool.started.wait()
        other = self.make_store()
        assert other.cancel(job_id).state == "cancelling"
        other.close()
        await eventually(lambda: self._is(job_id, "cancelled"), what="the owner stops it")
        assert self.jobs_pool.cancelled == 1


class IdempotencyTest(JobsCase):
    def pool(self):
        return HeldPool()

    @gen_test
    async def test_a_retry_with_the_same_idempotency_key_gets_the_same_job_and_another_request_422(self):
        first = await self.get("/slow/fib/30", **ASYNC, **{"Idempotency-Key": '"order-1"'})
        retry = await self.get("/slow/fib/30", **ASYNC, **{"Idempotency-Key": "order-1"})
        assert first.code == retry.code == 202
        assert retry.headers["Location"] == first.headers["Location"]
        assert self.jobs_pool.calls <= 1 and self.sync_store.count_active() == 1
        other = await self.get("/slow/fib/31", **ASYNC, **{"Idempotency-Key": "order-1"})
        self.assert_json_error(other, 422, "idempotency_key_reused")
        self.assert_json_error(await self.get("/slow/fib/30", **ASYNC, **{"Idempotency-Key": '"'}), 400, "bad_request")
        self.jobs_pool.release.set()
        job_id = json.loads(first.body)["id"]
        await eventually(lambda: self._is(job_id, "succeeded"), what="it ends")
        done = await self.get("/slow/fib/30", **ASYNC, **{"Idempotency-Key": "order-1"})
        assert done.code == 202 and json.loads(done.body)["state"] == "succeeded"  # 202 even once it has ended
        assert self.jobs_pool.calls == 1
        # the request is kept as an HMAC's hex digest, never as its arguments
        fingerprint = self.sync_store.get(job_id).fingerprint
        assert len(fingerprint) == 64 and set(fingerprint) <= set("0123456789abcdef")


class ComputeOnceTest(JobsCase):
    """Identical jobs in flight on an instance share one run, for tasks that declare coalesce=True."""

    def pool(self):
        return HeldPool()

    async def delete(self, job_id: str):
        return await self.http_client.fetch(self.get_url(f"/jobs/{job_id}"), method="DELETE", raise_error=False)

    @gen_test
    async def test_identical_jobs_share_one_run_and_one_leaving_cancels_nobody_else(self):
        first = await self.submit("/slow/fib/30")
        await self.jobs_pool.started.wait()
        second = await self.submit("/slow/fib/30")
        await eventually(lambda: self._is(second, "running"), what="the second job runs with the first one's run")
        assert self.jobs_pool.calls == 1
        self.jobs_pool.progress(1, 2, "half")
        await eventually(lambda: self._progress(second, "half"), what="the shared run's report reaches both")
        assert json.loads((await self.delete(first)).body)["state"] in ("cancelling", "cancelled")
        await eventually(lambda: self._is(first, "cancelled"), what="the first job cancelled")
        assert self.jobs_pool.cancelled == 0  # the run goes on for the second
        self.jobs_pool.release.set()
        await eventually(lambda: self._is(second, "succeeded"), what="the second job succeeds")
        assert json.loads((await self.get(f"/jobs/{second}")).body)["result"] == 75025

    async def _progress(self, job_id: str, message: str) -> bool:
        body = json.loads((await self.get(f"/jobs/{job_id}")).body)
        return (body["progress"] or {}).get("message") == message

    @gen_test
    async def test_the_last_job_of_a_shared_run_leaving_stops_the_run(self):
        jobs_ = [await self.submit("/slow/fib/30") for _ in range(2)]
        await self.jobs_pool.started.wait()
        for job_id in jobs_:
            await self.delete(job_id)
        for job_id in jobs_:
            await eventually(lambda: self._is(job_id, "cancelled"), what="both cancelled")
        await eventually(lambda: self.jobs_pool.cancelled == 1, what="the run stopped")

    @gen_test
    async def test_jobs_of_a_task_that_does_not_coalesce_each_run(self):
        await self.submit("/slow/sleep/1")
        await self.jobs_pool.started.wait()
        queued = await self.submit("/slow/sleep/1")
        assert await self.state(queued) == "queued" and self.jobs_pool.calls == 1  # it waits for its own run


class ResultTest(JobsCase):
    settings_env = {**JobsCase.settings_env, "FLEET_JOBS_INLINE_RESULT_KB": "1"}

    @gen_test
    async def test_a_small_result_is_inline_and_a_large_one_is_sent_by_the_edge_from_its_file(self):
        small = await self.submit("/slow/big_result/10")
        large = await self.submit("/slow/big_result/5000")
        for job_id in (small, large):
            await eventually(lambda: self._is(job_id, "succeeded"), what="it succeeds")
        doc = json.loads((await self.get(f"/jobs/{small}")).body)
        assert doc["result"] == "x" * 10 and doc["result_url"] == f"/jobs/{small}/result" and doc["result_bytes"] == 12
        inline = await self.get(f"/jobs/{small}/result")
        assert inline.code == 200 and inline.body == b'"' + b"x" * 10 + b'"'
        doc = json.loads((await self.get(f"/jobs/{large}")).body)
        assert "result" not in doc and doc["result_bytes"] == 5002
        redirect = await self.get(f"/jobs/{large}/result")
        assert redirect.headers["X-Accel-Redirect"] == f"/_job_results/{large}.json" and redirect.body == b""

    @gen_test
    async def test_a_job_without_a_result_answers_409(self):
        job_id = await self.submit("/slow/raise_error")
        await eventually(lambda: self._is(job_id, "failed"), what="it fails")
        response = await self.get(f"/jobs/{job_id}/result")
        self.assert_json_error(response, 409, "no_result")
        assert "Retry-After" not in response.headers



# The same tests on a RedisStore (jobs.store = "redis"), on a real redis-server ---------------------

class OnRedis:
    """A JobsCase on a RedisStore of its own (a key prefix of its own) on the class's redis-server."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.server_dir = tempfile.TemporaryDirectory()
        cls.server = RedisServer(Path(cls.server_dir.name)).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        cls.server_dir.cleanup()
        super().tearDownClass()

    def make_store(self, **kwargs):
        if not hasattr(self, "prefix"):
            self.prefix = new_id()
        return RedisStore(self.server.url, password=self.server.password, prefix=self.prefix, timeout=0.2, **kwargs)


class SubmitOnRedisTest(OnRedis, SubmitTest):
    pass


class EventsOnRedisTest(OnRedis, EventsTest):
    pass


class HeldJobsOnRedisTest(OnRedis, HeldJobsTest):
    pass


class IdempotencyOnRedisTest(OnRedis, IdempotencyTest):
    pass


class ComputeOnceOnRedisTest(OnRedis, ComputeOnceTest):
    pass


class ResultOnRedisTest(OnRedis, JobsCase):
    settings_env = ResultTest.settings_env

    @gen_test
    async def test_a_large_result_is_sent_from_the_store_which_other_hosts_share(self):
        large = await self.submit("/slow/big_result/5000")
        await eventually(lambda: self._is(large, "succeeded"), what="it succeeds")
        doc = json.loads((await self.get(f"/jobs/{large}")).body)
        assert "result" not in doc and doc["result_bytes"] == 5002
        response = await self.get(f"/jobs/{large}/result")
        assert response.code == 200 and "X-Accel-Redirect" not in response.headers
        assert response.body == b'"' + b"x" * 5000 + b'"'


class StoreDownTest(OnRedis, JobsCase):
    @gen_test
    async def test_a_store_that_does_not_answer_is_503_store_unavailable_and_its_jobs_are_there_when_it_is_back(self):
        job_id = await self.submit("/slow/fib/5")
        await eventually(lambda: self._is(job_id, "succeeded"), what="it succeeds")
        self.server.stop()
        try:
            for method, path, headers in (("GET", "/slow/fib/5", ASYNC), ("GET", f"/jobs/{job_id}", {}),
                                          ("DELETE", f"/jobs/{job_id}", {}), ("GET", f"/jobs/{job_id}/events", {}),
                                          ("GET", f"/jobs/{job_id}/result", {})):
                response = await self.http_client.fetch(self.get_url(path), method=method, headers=headers,
                                                        raise_error=False)
                self.assert_json_error(response, 503, "store_unavailable")
                assert response.headers["Retry-After"] == "1", path
            synchronous = await self.get("/slow/fib/10")  # no job, no store: served as ever
            assert synchronous.code == 200 and json.loads(synchronous.body)["result"] == 55
        finally:
            self.server.start()

        async def answers() -> bool:  # after the store's pause (a second after its last fault)
            return (await self.get(f"/jobs/{job_id}")).code == 200

        await eventually(answers, what="the store answers again")
        assert await self.state(job_id) == "succeeded"


class EndDuringOutageTest(OnRedis, JobsCase):
    """A job that ends while its store is away: its runner holds the outcome and writes it once the
    store is back, and no runner takes the job for lost meanwhile (every owner gets a lease to beat
    again after an outage)."""

    settings_env = {**JobsCase.settings_env, "FLEET_JOBS_LOST_AFTER_SECONDS": "2"}

    def pool(self):
        return HeldPool()

    @gen_test(timeout=30)
    async def test_a_job_that_ends_while_the_store_is_away_is_recorded_succeeded_once_it_is_back(self):
        job_id = await self.submit("/slow/fib/30")
        await self.jobs_pool.started.wait()
        self.server.stop()
        try:
            self.jobs_pool.release.set()  # it ends now, with nowhere to write its end
            await asyncio.sleep(3)  # more than a lease: its owner beats nowhere meanwhile
        finally:
            self.server.start()

        async def ended() -> bool:
            response = await self.get(f"/jobs/{job_id}")
            return response.code == 200 and json.loads(response.body)["state"] != "running"

        await eventually(ended, timeout=10, what="its end written")
        doc = json.loads((await self.get(f"/jobs/{job_id}")).body)
        assert (doc["state"], doc["result"]) == ("succeeded", 75025), doc


def test_an_instance_whose_store_does_not_answer_yet_waits_for_it_before_serving():
    """The fleet's own store starts first, but supervisord does not wait for it to listen."""
    class Jobs:
        calls = 0

        async def start(self):
            self.calls += 1
            if self.calls < 3:
                raise StoreUnavailable("not yet")

    jobs = Jobs()
    asyncio.run(start_jobs(jobs, retry_every=0))
    assert jobs.calls == 3
