"""The slow app: heavy routes, admitted in the event loop and computed in worker processes.

    python -m services.slow --settings .run/settings.json --instance 1
    curl -s localhost:8080/slow/fib/25   # through nginx -> {"task": "fib", "n": 25, "result": 75025, ...}

GET /slow/<task>/<argument>?<params> (or POST with a JSON object body and no query string, for tasks that take POST)
runs a task from the registry (registry.py; the shipped ones are in tasks.py). The event loop only
parses, admits and waits: it never computes. With `Prefer: respond-async` (and for a task declared
long) the request is answered 202 and the work runs as a job at /jobs/<id> (long_jobs.py,
job_routes.py), on a job runner's workers (job_runner.py), not on this instance's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.parse
from typing import Any, Mapping

from tornado import web

from services.common import metrics, server
from services.common.web import ApiError, BaseHandler, HealthHandler, MetricsHandler, NotFoundHandler
from services.common.settings import heavy_capacity
from services.slow import coalesce, jobs, registry
from services.slow.admission import Admission, client_key
from services.slow.backoff import RetryAfter
from services.slow.job_feeds import Feeds
from services.slow.job_routes import (ID, JobEventsHandler, JobHandler, JobResultHandler, StoreFaults,
                                      idempotency_key, preferences, send_status, sse, wait_seconds)
from services.slow.job_store import AsyncStore, StoreUnavailable, open_store
from services.slow.jobs import RETRY_AFTER_SECONDS
from services.slow.long_jobs import LongJobs, answer_body
from services.slow.pool import WorkerPool

log = logging.getLogger("fleet.slow")

# How long before a drain gives up the jobs admitted during it are answered: a worker's kill and
# the answer's write take milliseconds; this is room for a busy machine.
DRAIN_MARGIN_SECONDS = 2.0  # more than the Dask pool's GRACE (1 s past a deadline)


class TaskHandler(StoreFaults, BaseHandler):
    tasks: Mapping[str, registry.Task]
    admission: Admission
    retry_after: RetryAfter  # what a refused client is told to wait (backoff.py)
    pool: jobs.Pool  # WorkerPool, DaskPool or InlinePool: `async run(task, kwargs, timeout, client)`
    fleet: Any  # the fleet Settings
    flights: coalesce.Flights  # every job in progress on this instance, and who waits for it
    long_jobs: LongJobs | None  # the jobs of requests answered 202 (None: this app keeps none)

    _flight: coalesce.Flight | None = None
    _waiting: asyncio.Future | None = None
    _client_gone = False

    async def get(self, name: str, path: str | None) -> None:
        await self._serve(name, path or "")

    async def post(self, name: str, path: str | None) -> None:
        await self._serve(name, path or "")

    # HEAD is no task's method: _serve answers 405 with the methods the task takes (Allow). It would
    # run a heavy job only to throw its answer away. The edge refuses it first (nginx.conf.j2); this
    # is the answer to anyone else, where Tornado's own 405 would say no Allow.
    head = get

    def _params(self) -> dict[str, Any]:
        """A GET's query arguments, or the JSON object of a POST's body."""
        if self.request.method == "POST" and self.request.query:
            # A query string is written to access logs (nginx's, the instance's) and a POST's
            # parameters may be secrets (pbkdf2's password): refused, and never echoed back.
            raise ApiError(400, "bad_request", "a POST's parameters come from its JSON body only (the query "
                                               "string is logged): send them in the body, with no query string")
        params: dict[str, Any] = {k: self.get_query_argument(k) for k in self.request.query_arguments}
        if self.request.method == "POST" and self.request.body:
            try:
                body = json.loads(self.request.body)
            except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[...
                raise ApiError(400, "bad_request", "the body must be a JSON object") from None
            if not isinstance(body, dict):
                raise ApiError(400, "bad_request", "the body must be a JSON object")
            params.update(body)
        return params

    async def _serve(self, name: str, path: str) -> None:
        task = self.tasks.get(name)
        self.route_pattern = f"/slow/{name}" if task is not None else "/slow/{unknown}"
        if task is None:
            raise ApiError(404, "not_found", f"no task named {name!r}; known: {', '.join(sorted(self.tasks))}")
        if self.request.method not in task.methods:
            raise ApiError(405, "method_not_allowed", f"task {name} takes {' or '.join(task.methods)}",
                           headers={"Allow": ", ".join(task.methods)})
        params = self._params()
        try:
            kwargs = task.parse(path, params, self.fleet.task_config(name))
        except registry.BadArgument as exc:
            raise ApiError(400, "bad_argument", str(exc)) from None
        if task.cache_ttl is not None:
            canonical = f"/slow/{task.name}/{task.url(kwargs)}"
            if self.request.uri != canonical:
                # One spelling per call, so the edge keeps one cache entry per call (never cached).
                self.set_header("Location", canonical)
                self.write_json({"location": canonical}, status=301)
                return
        prefer = preferences(self.request.headers.get("Prefer", ""))
        if task.long or "respond-async" in prefer:
            if self.long_jobs is not None:
                await self._submit(task, kwargs, prefer)
                return
            if task.long:
                raise ApiError(503, "task_unavailable", f"task {name} runs only as a job, and this instance keeps "
                                                        "no jobs", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            # No job store here (an app built for a test): the preference is not applied (RFC 7240).
        # The same task with the same arguments already in flight here: wait for that job.
        key = coalesce.job_key(task.name, kwargs) if task.coalesce and self.fleet.slow.coalesce else None
        flight, shared = self.flights.join(key, lambda: asyncio.ensure_future(self._run(task, kwargs)),
                                           self.request_id)
        if shared:
            # Counted and logged for the operator, never told to the client: that another client
            # asked the same thing at this moment is that client's business.
            metrics.SLOW_COALESCED.labels(task.name).inc()
            log.info("task %s: shares the job of request %s (%d request(s) wait for it)", task.name,
                     flight.started_by, flight.waiters)
        # Saved so on_connection_close can leave: the last waiter to leave cancels the job (a
        # waiting job leaves the line, a running job's worker is killed); shield: one waiter's
        # cancellation is not the job's.
        self._flight, self._waiting = flight, asyncio.shield(flight.job)
        try:
            body = await self._waiting
        except asyncio.CancelledError:
            if flight.stopped:
                raise ApiError(503, "shutting_down", "this instance stopped before the job finished; retry",
                               headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
            if not self._client_gone:
                raise
            self.set_status(499, "Client Closed Request")  # for the access log; nobody reads it
            return
        except ApiError as exc:
            raise exc.copy() if shared else exc  # each waiter its own exception (and traceback)
        if task.cache_ttl is not None:
            self.set_header("X-Accel-Expires", str(task.cache_ttl))  # nginx caches this answer that long
        self.set_header("Content-Type", "application/json")
        self.finish(body)

    async def _run(self, task: registry.Task, kwargs: dict) -> bytes:
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        timeout = min(task.timeout or self.fleet.slow.job_timeout, self.fleet.slow.job_timeout)
        # The deadline counts from admission: a job that waited in line runs only what is left of
        # it, and one still waiting when it passes leaves the line unrun (503 queue_timeout). So no
        # job is answered later than its deadline after it reached this instance, and nginx's
        # proxy_read_timeout is sized on that (deploy/render.py).
        deadline = arrived + timeout
        # A job admitted while its instance drains (on a connection nginx had kept alive, up to
        # its upstream keepalive_timeout after the drain began) is answered a margin before the
        # drain gives up, at its own deadline if need be, never cut off there (503 shutting_down).
        # Jobs admitted before the drain need no such cap: slow.drain_timeout > slow.job_timeout.
        drain_deadline = self.settings.get("drain_deadline")
        if drain_deadline is not None:
            deadline = min(deadline, drain_deadline - DRAIN_MARGIN_SECONDS)
        backend = self.fleet.slow.backend

        def count(outcome: str) -> None:
            metrics.SLOW_JOBS.labels(task.name, outcome, backend).inc()

        try:
            # The client as nginx saw it (X-Real-IP), keyed as the edge keys it: its share of the line.
            client = client_key(self.request.remote_ip)
            async with self.admission.slot(client, task.name, deadline):
                started = loop.time()
                queued_ms = 1000 * (started - arrived)
                left = deadline - started
                if left <= 0:  # its slot came just as its deadline passed
                    raise jobs.QueueTimeout(f"it waited {queued_ms / 1000:.1f} s in line, its whole deadline")
                try:
                    result_json, elapsed_ms = await self.pool.run(task.name, kwargs, left, client)
                    self.retry_after.record(task.name, loop.time() - started)
                except jobs.JobTimeout as exc:
                    self.retry_after.record_cut_short(task.name, left)
                    if queued_ms >= 100:  # the pool saw only what was left of the deadline: say why
                        exc.args = (f"{exc} (what was left of its {timeout:g} s deadline after "
                                    f"{queued_ms / 1000:.1f} s in line)",)
                    raise
                finally:
                    metrics.SLOW_JOB_DURATION.labels(task.name, backend).observe(loop.time() - started)
        except jobs.JobError as exc:
            count(exc.outcome)
            raise self._answer(exc, task) from None
        except asyncio.CancelledError:
            count("cancelled")
            raise
        count("ok")
        log.info("job %s ok in %.1f ms (waited %.1f ms)", task.name, elapsed_ms, queued_ms,
                 extra={"fields": {"task": task.name, "elapsed_ms": round(elapsed_ms, 2)}})
        # The worker encoded the result; here it is only framed, whatever its size.
        return answer_body(task, kwargs, result_json, elapsed_ms, queued_ms)

    async def _submit(self, task: registry.Task, kwargs: dict, prefer: dict[str, str]) -> None:
        """Commit the job, then answer 202 with its status document and Location; with Prefer's
        wait=N, the synchronous answer instead if the job ends within N seconds (at most the job
        deadline, within which nginx waits)."""
        try:
            job = await self.long_jobs.submit(task, kwargs, client_key(self.request.remote_ip), self.request_id,
                                              idempotency_key(self.request.headers.get("Idempotency-Key")),
                                              secret=self.settings.get("edge_token") or b"")
        except jobs.JobError as exc:
            raise self._answer(exc, task) from None
        wait = wait_seconds(prefer)
        if wait is not None and wait > 0:
            outcome = await self.long_jobs.outcome(job.id, min(wait, self.fleet.slow.job_timeout))
            if outcome is not None:
                self.set_header("Content-Location", f"/jobs/{job.id}")  # the record stays there until its TTL
                if outcome.error is not None:
                    raise self._answer(outcome.error, task, logged=True)
                self.set_header("Content-Type", "application/json")
                self.finish(outcome.body)
                return
            job = await self.long_jobs.store.get(job.id) or job
        self.set_header("Location", f"/jobs/{job.id}")
        if "respond-async" in prefer:
            self.set_header("Preference-Applied", "respond-async")
        send_status(self, job, 202)

    def _answer(self, exc: jobs.JobError, task: registry.Task, logged: bool = False) -> ApiError:
        """The contract's JSON error for a job that ended without a result: each kind of ending
        carries its status, code and message (jobs.py). `logged`: the job's runner logged it."""
        if exc.log_level is not None and not logged:
            log.log(exc.log_level, "%s", exc.describe(task.name),
                    extra={"fields": {"task": task.name, **exc.log_fields()}})
        wait = exc.retry_after(self.retry_after, task.name, self.admission) if exc.retry else None
        return ApiError(exc.status, exc.code, exc.answer(wait, task.expose_errors, self.request_id),
                        headers={"Retry-After": str(wait)} if wait is not None else None, **exc.details())

    def on_connection_close(self) -> None:
        super().on_connection_close()
        if self._waiting is not None and not self._waiting.done():
            self._client_gone = True
            flight = self._flight
            last = flight.waiters == 1
            log.info("client went away; %s", "cancelling its job" if last else
                     f"its job goes on for {flight.waiters - 1} other request(s)", extra={"request_id": self.request_id})
            self._waiting.cancel()
            flight.leave()


class SlowHealthHandler(HealthHandler):
    """GET /healthz, plus the pool's and the line's figures (instance port only, on loopback).

    503 "degraded" while fewer than slow.min_workers workers serve (the pool cannot start them):
    the instance answers its jobs at once (503 no_workers), but it is not healthy.
    """

    def figures(self) -> dict:
        admission: Admission = self.admission
        return {"pool": self.pool.stats(), "running": admission.running, "waiting": admission.waiting,
                "shed": admission.shed, "limited": admission.limited}

    def unhealthy(self, figures: dict) -> str | None:
        pool = figures["pool"]
        workers, floor = pool["workers"], self.fleet.slow.min_workers
        if pool.get("problem"):
            return pool["problem"]
        if workers < floor:
            return f"{workers} worker(s) serving, below slow.min_workers = {floor}"
        return None


def make_admission(fleet: Any, slots: int) -> Admission:
    """The line in front of a slow instance's pool: `slots` running, slow.queue_limit waiting."""
    return Admission(slots=slots, queue_limit=fleet.slow.queue_limit, per_client=fleet.slow.max_per_client)


def make_app(instance: server.Instance, tasks: Mapping[str, registry.Task], pool: jobs.Pool,
             admission: Admission | None = None, store: AsyncStore | None = None) -> web.Application:
    """The slow app for `pool` and the `admission` its pool was made with (make_pool); a test's
    pool that needs no line gets one of its own size. With a job `store`, requests may be answered
    202 and run as jobs (app.settings["long_jobs"], started by the caller); without, they never are."""
    fleet = instance.settings
    admission = admission or make_admission(fleet, pool.size)
    flights = coalesce.Flights()
    settings = server.app_settings(instance)
    long_jobs = None if store is None else LongJobs(store, fleet, tasks=dict(tasks))
    # Each job's event streams here are written by one reader of its events (job_feeds.py).
    feeds = None if long_jobs is None else Feeds(long_jobs.watcher, store, fleet.jobs.keepalive_seconds, encode=sse)

    def stop_jobs() -> None:
        """At a drain's deadline: answer every unfinished job 503 (its worker is killed)."""
        pool.kill_on_cancel = True  # kill each one's worker now, whatever the kill budget says
        for flight in list(flights.all):
            flight.stopped = True
            flight.job.cancel()

    shared = {"tasks": tasks, "admission": admission, "pool": pool, "fleet": fleet, "flights": flights,
              "retry_after": RetryAfter(ceiling=fleet.slow.job_timeout), "long_jobs": long_jobs}
    settings["long_jobs"] = long_jobs
    settings["on_drain_deadline"] = stop_jobs
    metrics.declare_tasks(tasks, fleet.slow.backend, jobs.OUTCOMES)

    def refresh_gauges() -> None:
        stats = pool.stats()
        metrics.SLOW_WORKERS.set(stats["workers"])
        metrics.SLOW_WORKERS_BUSY.set(stats["busy"])
        metrics.SLOW_QUEUE_DEPTH.set(admission.waiting)
        metrics.SLOW_WORKERS_FLOOR.set(fleet.slow.min_workers)
        cluster = stats.get("cluster")
        if cluster is not None:  # on Dask
            metrics.DASK_CONNECTED.labels(cluster["scheduler"]).set(int(cluster["connected"]))
            metrics.DASK_WORKERS.labels(cluster["scheduler"]).set(cluster["workers"])

    metrics.on_refresh("slow", refresh_gauges)
    return web.Application(
        [
            (r"/slow/([a-z0-9_]+)(?:/(.*))?", TaskHandler, shared),
            (rf"/jobs/{ID}", JobHandler, {"long_jobs": long_jobs}),
            (rf"/jobs/{ID}/events", JobEventsHandler, {"long_jobs": long_jobs, "feeds": feeds}),
            (rf"/jobs/{ID}/result", JobResultHandler, {"long_jobs": long_jobs}),
            (r"/healthz", SlowHealthHandler,
             {"admission": admission, "pool": pool, "fleet": fleet, "route_pattern": "/healthz"}),
            (r"/metrics", MetricsHandler),
        ],
        default_handler_class=NotFoundHandler,
        **settings,
    )


def make_store(fleet: Any) -> Any:
    """The one place that picks the job store (jobs.store); both keep job_store.Store: the host's
    SQLite file in the run dir, shared by its slow instances, or a Redis server (the fleet's own,
    deploy/store.py, or jobs.redis_url), shared by the slow instances of every host that reaches it."""
    j = fleet.jobs
    if j.store == "redis":
        from services.slow.job_store_redis import RedisStore  # imports redis-py only where it is used

        password_file = fleet.job_store_password_file
        password = password_file.read_text().strip() if password_file is not None else None
        # Across hosts the fleet's own store speaks TLS: this host's certificate of the fleet's CA.
        tls = {what: str(path) for what, path in fleet.tls_files().items()} if fleet.job_store_tls else None
        return RedisStore(fleet.job_store_url, ttl=j.result_ttl, max_records=j.max_records, timeout=j.store_timeout,
                          inline_result_bytes=j.inline_result_kb << 10, password=password, tls=tls)
    return open_store(fleet.run_dir / "jobs", ttl=j.result_ttl, max_records=j.max_records,
                      inline_result_bytes=j.inline_result_kb << 10)


def store_label(fleet: Any) -> str:
    """What the job metrics call the store (their `store` label): one Redis server that every host
    reaches is one store, whichever host reports it; each host's SQLite file is its own. Never its
    password."""
    if fleet.jobs.store == "redis":
        url = urllib.parse.urlsplit(fleet.job_store_url)
        return f"{url.scheme}://{url.hostname}:{url.port or 6379}{url.path}"
    return f"sqlite:{fleet.inventory.here.name}"


def make_pool(instance: server.Instance, line: Admission) -> jobs.Pool:
    """The one place that picks the backend (slow.backend); both keep the jobs.Pool contract, and
    both are told of `line`, the admission in front of them."""
    fleet = instance.settings
    if fleet.slow.backend == "dask":
        from services.slow.dask_pool import DaskPool  # imports Dask only where it is used

        return DaskPool(fleet, instance.number, line=line)
    # One idle cgroup per instance of each fleet (run dirs differ): stopping one never empties another's.
    return WorkerPool.from_settings(fleet, fleet.slow.workers, owner=instance.name, line=line)


async def run(instance: server.Instance) -> None:
    tasks = registry.load(instance.settings.slow.task_modules)
    admission = make_admission(instance.settings, heavy_capacity(instance.settings.values))
    # The pool starts (local workers forked, niced, set up; or the cluster joined) before the port is
    # bound: the first request never waits for it, and no worker can ever hold the server's socket.
    fleet = instance.settings
    store = AsyncStore(make_store(fleet))
    async with make_pool(instance, admission) as pool:
        if fleet.slow.backend == "dask":  # long jobs run on the cluster's threads: its share is what they leave
            pool.reserved = lambda: store.count_running("")
        app = make_app(instance, tasks, pool, admission, store)
        await start_jobs(app.settings["long_jobs"])
        try:
            await server.serve(app, instance)
        finally:
            await app.settings["long_jobs"].close()
            store.close()


async def start_jobs(long_jobs: LongJobs, retry_every: float = 0.5) -> None:
    """Start the instance's jobs once its store answers: a server store starting beside it (the
    fleet's own starts first, but supervisord does not wait for it to listen) or down for a while.
    Until then the instance does not listen: nginx sends its requests to the others."""
    said = False
    while True:
        try:
            await long_jobs.start()
            return
        except StoreUnavailable as exc:
            if not said:
                log.warning("waiting for the job store before serving: %s", exc)
                said = True
            await asyncio.sleep(retry_every)


def main(argv: list[str] | None = None) -> None:
    instance = server.parse_args("slow", argv)
    # Below the fast instances, never below its own workers (they add slow.nice to this).
    os.nice(instance.settings.slow.instance_nice)
    server.run(instance, lambda: run(instance))


if __name__ == "__main__":
    main()
