"""Long jobs through the edge (services/slow/long_jobs.py, job_routes.py, nginx's /jobs/ locations)
and their runner (services/runner, services/slow/job_process.py): 202 and the job's record, its
live event stream with a reconnect, its result, cancels, 404 and 410, the limits; jobs that
outlive the slow instance and the runner; leases; on a fleet of two slow instances that share the
host's job store (SQLite; the faults on Redis too, tests/integration/test_job_store_redis.py for
the rest)."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from services.common import metrics_reader, procfs
from services.slow.job_store import new_id
from tests.support import browser
from tests.support.contract import assert_contract_error
from tests.support.fleet import Fleet, Response
from tests.support.job_life import whole_life
from tests.support.redis_server import binary_or_skip
from tests.support.sse import EventStream
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

ASYNC = {"Prefer": "respond-async"}


@pytest.fixture
def jobs(jobs_fleet: Fleet):
    """Submits jobs (through the edge, or straight to one slow instance as the edge would), and
    cancels whatever is left of them after the test, so that the next one starts with free workers."""
    submitted: list[str] = []

    def submit(path: str, instance: int | None = None, headers: dict | None = None) -> Response:
        response = jobs_fleet.get(path, **_to(jobs_fleet, instance, {**ASYNC, **(headers or {})}))
        if response.status in (200, 202):
            submitted.append(response.headers.get("location", response.headers.get("content-location", "")))
        return response

    yield submit
    for location in submitted:
        jobs_fleet.request("DELETE", location)
    for location in submitted:
        wait_for(lambda: ended(jobs_fleet.get(location)), what=f"{location} ended")


def ended(response: Response) -> bool:
    """The job has ended, or its record has (410, 404)."""
    return response.status != 200 or response.json()["state"] in ("succeeded", "failed", "cancelled")


def _to(fleet: Fleet, instance: int | None, headers: dict) -> dict:
    """Request options for the edge (instance None) or slow-0<instance>'s own port."""
    if instance is None:
        return {"headers": headers}
    return {"headers": {**fleet.edge_headers(), **headers}, "port": fleet.slow_ports[instance - 1]}


def state(fleet: Fleet, location: str, instance: int | None = None) -> str:
    return fleet.get(location, **_to(fleet, instance, {})).json()["state"]


def job_process(location: str, attempt_of: int | None = None) -> int:
    """The pid of the job process that runs the job at `location` (services/slow/job_process.py);
    `attempt_of`: another one than that pid (the job's next attempt)."""
    job_id = location.rsplit("/", 1)[1]

    def found() -> int | None:
        return next((pid for pid in procfs.pids() if pid != attempt_of and f"--job={job_id}" in procfs.cmdline(pid).split()
                     and "services.slow.job_process" in procfs.cmdline(pid)), None)

    return wait_for(found, what=f"the job process of {job_id}")


def busy_worker(location: str, attempt_of: int | None = None) -> int:
    """The pid of the worker that runs the job at `location`: the child of its job process's
    forkserver (pool.py)."""
    process = job_process(location, attempt_of)

    def worker() -> int | None:
        workers = [pid for pid in procfs.descendants(process) if (stat := procfs.stat(pid)) and stat.ppid != process]
        return workers[0] if len(workers) == 1 else None

    wait_for(lambda: worker() is not None, what=f"the worker of job process {process}")
    return worker()


def test_a_job_s_whole_life_through_the_edge_with_a_reconnect_that_replays_exactly_what_it_missed(jobs_fleet, jobs):
    whole_life(jobs_fleet, jobs)


def test_without_prefer_a_heavy_request_is_synchronous_and_with_wait_it_is_too_when_it_ends_in_time(jobs_fleet, jobs):
    plain = jobs_fleet.get("/slow/fib/20")
    assert plain.status == 200 and plain.json()["result"] == 6765 and "location" not in plain.headers
    waited = jobs("/slow/fib/20", headers={"Prefer": "respond-async, wait=10"})
    assert waited.status == 200 and waited.json()["result"] == 6765
    assert state(jobs_fleet, waited.headers["content-location"]) == "succeeded"


def test_cancelling_a_running_job_kills_its_worker_and_the_job_ends_cancelled(jobs_fleet, jobs):
    location = jobs("/slow/report/60", instance=1).headers["location"]
    wait_for(lambda: state(jobs_fleet, location) == "running", what="the job runs")
    process, worker = job_process(location), busy_worker(location)
    cancelled = jobs_fleet.request("DELETE", location)
    assert cancelled.status == 200 and cancelled.json()["state"] in ("cancelling", "cancelled")
    wait_for(lambda: not procfs.alive(worker), timeout=5, what="its worker killed")
    wait_for(lambda: not procfs.alive(process), timeout=5, what="its job process gone")
    wait_for(lambda: state(jobs_fleet, location) == "cancelled", timeout=5, what="the job cancelled")
    again = jobs_fleet.request("DELETE", location)
    assert again.status == 200 and again.json()["state"] == "cancelled"  # idempotent; the record stays
    assert again.json()["error"]["error"] == "cancelled" and "result" not in again.json()


def test_a_queued_job_s_stream_keeps_alive_and_a_cancel_ends_it_at_once(jobs_fleet, jobs):
    running = [jobs("/slow/report/60", instance=1).headers["location"] for _ in range(2)]
    for location in running:
        wait_for(lambda: state(jobs_fleet, location) == "running", what="both workers of slow-01 busy")
    queued = jobs("/slow/report/60", instance=1).headers["location"]
    assert state(jobs_fleet, queued) == "queued"
    with EventStream(jobs_fleet.edge_port, f"{queued}/events") as stream:
        first = stream.next()
        assert (first.id, first.kind, first.json()) == (1, "state", {"state": "queued"})
        comment = stream.next()
        assert comment.kind == "comment" and comment.data == "keep-alive"  # nothing else to say while it waits
        cancelled = jobs_fleet.request("DELETE", queued)
        assert cancelled.status == 200 and cancelled.json()["state"] == "cancelled"
        end = next(stream.events())
        assert end.kind == "end" and end.json()["state"] == "cancelled"
    assert jobs_fleet.get(queued).json()["started"] is None  # it never ran


def test_any_slow_instance_answers_for_and_cancels_a_job_another_one_took(jobs_fleet, jobs):
    location = jobs("/slow/report/60", instance=1).headers["location"]
    wait_for(lambda: state(jobs_fleet, location, instance=2) == "running", what="slow-02 sees it run")
    worker = busy_worker(location)
    cancelled = jobs_fleet.request("DELETE", location, **_to(jobs_fleet, 2, {}))
    assert cancelled.status == 200 and cancelled.json()["state"] == "cancelling"
    wait_for(lambda: not procfs.alive(worker), timeout=5, what="its job process killed the worker slow-02 was asked to stop")
    wait_for(lambda: state(jobs_fleet, location, instance=2) == "cancelled", timeout=5, what="the job cancelled")


def test_identical_jobs_in_flight_share_one_run_whichever_instance_took_them(jobs_fleet, jobs):
    first, second = (jobs("/slow/shared_spin/1.5", instance=n).headers["location"] for n in (1, 2))
    for location in (first, second):
        wait_for(lambda: state(jobs_fleet, location) == "succeeded", what=f"{location} succeeded")
    one, two = (jobs_fleet.get(location).json()["result"] for location in (first, second))
    assert one == two  # the same process, the same token: one run
    other = jobs("/slow/shared_spin/1.4", instance=1).headers["location"]
    wait_for(lambda: state(jobs_fleet, other) == "succeeded", what="a job of other arguments succeeded")
    assert jobs_fleet.get(other).json()["result"]["token"] != one["token"]


def test_a_large_result_is_sent_by_the_edge_from_its_file(jobs_fleet, jobs):
    location = jobs("/slow/big_result/300000", headers={"Prefer": "respond-async, wait=10"}).headers["content-location"]
    doc = jobs_fleet.get(location).json()
    assert "result" not in doc and doc["result_bytes"] == 300002  # over jobs.inline_result_kb: a file
    result = jobs_fleet.get(doc["result_url"])
    assert result.status == 200 and result.body == b'"' + b"x" * 300000 + b'"'
    assert result.headers["x-served-by"] == "edge" and result.headers["content-type"] == "application/json"
    assert "x-accel-redirect" not in result.headers


def test_unknown_ids_are_404_and_expired_ones_410_through_the_edge(jobs_fleet, jobs):
    unknown = f"/jobs/{new_id()}"
    for method, path in (("GET", unknown), ("DELETE", unknown), ("GET", f"{unknown}/events"), ("GET", "/jobs/nope"),
                         ("GET", "/jobs")):
        assert_contract_error(jobs_fleet.request(method, path), 404, "not_found")
    location = jobs("/slow/fib/5", headers={"Prefer": "respond-async, wait=10"}).headers["content-location"]
    # Its TTL (jobs.result_ttl, a minute at least) passed: what the sweep leaves, written as it writes it.
    db = sqlite3.connect(jobs_fleet.run_dir / "jobs" / "store.sqlite")
    with db:
        db.execute("UPDATE jobs SET state = 'expired', result = NULL WHERE id = ?", (location.rsplit("/", 1)[1],))
    db.close()
    for method, path in (("GET", location), ("DELETE", location), ("GET", f"{location}/events")):
        assert_contract_error(jobs_fleet.request(method, path), 410, "expired")


def test_a_client_past_its_active_jobs_gets_429_and_no_job(jobs_fleet, jobs):
    for _ in range(3):  # jobs.max_active_per_client = 3
        assert jobs("/slow/report/60").status == 202
    refused = jobs("/slow/report/60")
    body = assert_contract_error(refused, 429, "rate_limited")
    assert "jobs.max_active_per_client" in body["message"] and refused.headers["retry-after"].isdigit()


def test_a_retried_submission_with_its_idempotency_key_finds_its_job_whichever_instance_takes_it(jobs_fleet, jobs):
    key = {"Idempotency-Key": f'"{new_id()}"'}
    first = jobs("/slow/report/60", instance=1, headers=key)
    retry = jobs("/slow/report/60", instance=2, headers=key)
    assert first.status == retry.status == 202 and retry.headers["location"] == first.headers["location"]
    through_the_edge = jobs("/slow/report/60", headers=key)
    assert through_the_edge.headers["location"] == first.headers["location"]
    assert_contract_error(jobs("/slow/report/59", headers=key), 422, "idempotency_key_reused")
    assert_contract_error(jobs("/slow/report/60", headers={"Idempotency-Key": "k" * 256}), 400, "bad_request")


def test_metrics_and_status_show_the_host_s_jobs_by_state_and_the_open_streams(jobs_fleet, jobs):
    location = jobs("/slow/report/60").headers["location"]
    wait_for(lambda: state(jobs_fleet, location) == "running", what="the job runs")
    with EventStream(jobs_fleet.edge_port, f"{location}/events") as stream:
        stream.next()

        def figures():  # the store's count is the runner's reading; the streams are the instances'
            texts = [jobs_fleet.get("/metrics", port=port).body.decode() for port in jobs_fleet.slow_ports]
            runner = jobs_fleet.get("/metrics", port=jobs_fleet.runner_port).body.decode()
            return (metrics_reader.total(runner, "fleet_jobs", state="running"),
                    sum(metrics_reader.total(t, "fleet_jobs_streams_open") for t in texts))

        wait_for(lambda: figures() == (1, 1), what="one job running and one stream open, in /metrics")
        assert metrics_reader.total(jobs_fleet.get("/metrics", port=jobs_fleet.slow_ports[0]).body.decode(),
                                    "fleet_jobs_store_seconds_count", operation="get") > 0
        status = jobs_fleet.command("status").stdout
        assert "long jobs (this host's store): queued 0, running 1," in status and "event streams open: 1" in status
    wait_for(lambda: figures()[1] == 0, what="the stream closed, in /metrics")


def test_a_client_past_its_open_streams_gets_429_at_the_edge(jobs_fleet, jobs):
    location = jobs("/slow/report/60").headers["location"]
    streams = [EventStream(jobs_fleet.edge_port, f"{location}/events") for _ in range(3)]  # jobs.max_streams_per_client
    try:
        assert [s.status for s in streams] == [200, 200, 200]
        refused = jobs_fleet.get(f"{location}/events")
        assert_contract_error(refused, 429, "rate_limited")
        assert refused.headers["x-served-by"] == "edge"
    finally:
        for stream in streams:
            stream.close()
    wait_for(lambda: _opens(jobs_fleet, f"{location}/events"), what="a stream again, once the others closed")


def _opens(fleet: Fleet, path: str) -> bool:
    with EventStream(fleet.edge_port, path) as stream:
        return stream.status == 200


def test_the_edge_lets_delete_through_to_a_job_only(jobs_fleet):
    for path in ("/fast", "/slow/fib/5", f"/jobs/{new_id()}/events"):
        refused = jobs_fleet.request("DELETE", path)
        assert_contract_error(refused, 405, "method_not_allowed")
        assert refused.headers["x-served-by"] == "edge"
    assert jobs_fleet.request("PUT", f"/jobs/{new_id()}").status == 405
    assert jobs_fleet.request("DELETE", f"/jobs/{new_id()}").headers["x-served-by"].startswith("slow-")


def test_head_and_post_on_a_job_are_405_from_the_edge_with_the_methods_it_takes(jobs_fleet):
    job = f"/jobs/{new_id()}"
    for method, path, allow in (("HEAD", job, "GET, DELETE"), ("POST", job, "GET, DELETE"),
                                ("HEAD", f"{job}/events", "GET"), ("POST", f"{job}/result", "GET"),
                                ("HEAD", f"{job}/page", "GET")):
        refused = jobs_fleet.request(method, path, body=b"" if method == "POST" else None)
        assert (refused.status, refused.headers.get("allow"), refused.headers["x-served-by"]) == (405, allow, "edge"), \
            (method, path)


# The lease tests take a job process for lost after 4 s (jobs.lost_after_seconds, 10 by default:
# `make chaos`'s kill-job-process and test_faults.py hold the default to its 15 s).
LOST_AFTER = {"FLEET_JOBS_LOST_AFTER_SECONDS": "4"}
ENDED_WITHIN = 4 * 1.2 + 2  # the silence, one more beat, and a margin for a loaded machine


# One store each (the Redis store here): the same faults on the default SQLite store are
# test_faults.py's, and both stores' leases and fencing are test_job_store.py's.
@pytest.mark.parametrize("store", ["redis"])
def test_a_job_outlives_a_kill_9_of_its_slow_instance_and_its_runner_and_runs_once_through_three_leases(
        private_fleet, store):
    if store == "redis":
        binary_or_skip()
    fleet = private_fleet(slow=2, FLEET_JOBS_STORE=store, **LOST_AFTER)
    location = fleet.get("/slow/report/14", **_to(fleet, 1, ASYNC)).headers["location"]  # 3.5 leases; retries=1
    wait_for(lambda: state(fleet, location) == "running", what="the job runs")
    process = job_process(location)
    for name in ("slow-01", "runner-01"):  # the instance that took it, and the runner that started it
        os.kill(fleet.pid(name), signal.SIGKILL)
    wait_for(lambda: state(fleet, location) == "succeeded", timeout=40, interval=0.2, what="the job succeeds")
    with EventStream(fleet.edge_port, f"{location}/events") as stream:
        events = list(stream.events())
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert [e.json() for e in events if e.kind == "state"] == [{"state": "queued"}, {"state": "running"}]  # one attempt
    assert events[-1].json()["result"]["sections"] == 140
    wait_for(lambda: not procfs.alive(process), timeout=5, what="its job process gone once its job ended")


@pytest.mark.parametrize("store", ["redis"])
def test_a_killed_job_process_s_job_ends_worker_lost_within_its_lease_and_a_cancel_made_before_holds(
        private_fleet, store):
    if store == "redis":
        binary_or_skip()
    fleet = private_fleet(slow=2, FLEET_JOBS_STORE=store, **LOST_AFTER)
    running = fleet.get("/slow/long_spin/60", **_to(fleet, 1, ASYNC)).headers["location"]
    cancelling = fleet.get("/slow/long_spin/59", **_to(fleet, 1, ASYNC)).headers["location"]
    wait_for(lambda: state(fleet, running) == state(fleet, cancelling) == "running", what="both jobs run")
    lost, stopped = job_process(running), job_process(cancelling)
    worker = busy_worker(running)
    # A cancel in the store that the second job's process will never act on: it is stopped first.
    os.kill(stopped, signal.SIGSTOP)
    try:
        assert fleet.request("DELETE", cancelling, **_to(fleet, 2, {})).json()["state"] == "cancelling"
    finally:
        os.kill(stopped, signal.SIGKILL)  # stopped or not
    os.kill(lost, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: state(fleet, running) != "running", timeout=15, interval=0.2, what="the lost job's end")
    assert time.monotonic() - killed <= ENDED_WITHIN
    ended = fleet.get(running).json()
    assert ended["state"] == "failed" and ended["error"]["error"] == "worker_lost" and ended["error"]["retryable"] is True
    assert fleet.get(cancelling).json()["state"] == "cancelled"
    wait_for(lambda: not procfs.alive(worker), timeout=5, what="its worker gone with it")


@pytest.mark.parametrize("store", ["sqlite"])
def test_a_killed_job_process_s_job_of_a_task_declaring_retries_runs_again_and_succeeds(private_fleet, store):
    if store == "redis":
        binary_or_skip()
    fleet = private_fleet(slow=2, FLEET_JOBS_STORE=store, **LOST_AFTER)
    location = fleet.get("/slow/report/4", **_to(fleet, 1, ASYNC)).headers["location"]  # report: retries=1
    wait_for(lambda: state(fleet, location) == "running", what="the job runs")
    busy_worker(location)
    os.kill(job_process(location), signal.SIGKILL)
    wait_for(lambda: state(fleet, location) == "succeeded", timeout=40, interval=0.2, what="its second attempt succeeds")
    with EventStream(fleet.edge_port, f"{location}/events") as stream:
        events = list(stream.events())
    requeued = [e.json() for e in events if e.kind == "state" and e.json().get("attempt")]
    assert requeued == [{"state": "queued", "attempt": 2, "after": "worker_lost"}]
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert events[-1].json()["result"]["sections"] == 40


@pytest.mark.parametrize("store", ["sqlite"])
def test_a_job_process_taken_for_lost_while_only_paused_stops_its_stale_run_and_its_late_writes_never_land(
        private_fleet, store):
    if store == "redis":
        binary_or_skip()
    fleet = private_fleet(slow=2, FLEET_JOBS_STORE=store, **LOST_AFTER)
    location = fleet.get("/slow/report/6", **_to(fleet, 1, ASYNC)).headers["location"]  # report: retries=1
    wait_for(lambda: state(fleet, location) == "running", what="the job runs")
    stale = busy_worker(location)
    paused = job_process(location)
    os.kill(paused, signal.SIGSTOP)  # silent past jobs.lost_after_seconds: the runner queues it again
    try:
        busy_worker(location, attempt_of=paused)  # attempt 2 computes in a job process of its own
    finally:
        os.kill(paused, signal.SIGCONT)
    # The paused process wakes up with attempt 1 still running: it sees the job moved on and stops that run.
    wait_for(lambda: not procfs.alive(stale), timeout=10, what="the stale run's worker killed")
    wait_for(lambda: state(fleet, location) == "succeeded", timeout=60, interval=0.2, what="attempt 2 succeeds")
    with EventStream(fleet.edge_port, f"{location}/events") as stream:
        events = list(stream.events())
    requeued = next(i for i, e in enumerate(events) if e.kind == "state" and e.json().get("attempt") == 2)
    # Attempt 1 was further along when it was paused; had its late reports landed, `done` would jump.
    done = [e.json()["done"] for e in events[requeued:] if e.kind == "progress"]
    assert done == sorted(done), done
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert events[-1].json()["result"]["sections"] == 60


def test_on_a_dask_cluster_a_job_s_whole_life_through_the_edge_retry_reconnect_result_cancel_404_410(dask_fleet):
    """The life of test_a_job_s_whole_life... and its neighbours, on the shared Dask fleet (one slow
    instance; the job store and the routes are the same whatever runs the job)."""
    fleet = dask_fleet
    key = {"Idempotency-Key": f'"{new_id()}"'}
    submitted = fleet.get("/slow/report/1", headers={**ASYNC, **key})
    assert submitted.status == 202, submitted.body
    location = submitted.headers["location"]
    assert fleet.get("/slow/report/1", headers={**ASYNC, **key}).headers["location"] == location
    assert_contract_error(fleet.get("/slow/report/2", headers={**ASYNC, **key}), 422, "idempotency_key_reused")

    with EventStream(fleet.edge_port, f"{location}/events") as stream:
        seen = list(_until_progress(stream))
    with EventStream(fleet.edge_port, f"{location}/events", last_event_id=str(seen[-1].id)) as stream:
        rest = list(stream.events())
    events = seen + rest
    assert [e.id for e in events] == list(range(1, len(events) + 1))  # the reconnect missed nothing, repeated nothing
    assert [e.json() for e in events[:2]] == [{"state": "queued"}, {"state": "running"}]
    assert [e.json() for e in events if e.kind == "progress"][-1] == {"done": 10, "total": 10,
                                                                       "message": "section 10 of 10"}
    assert rest[-1].kind == "end" and rest[-1].json()["result"]["sections"] == 10
    assert fleet.get(f"{location}/events", headers={"Last-Event-ID": str(rest[-1].id)}).status == 204
    assert fleet.get(location).json()["state"] == "succeeded"

    cancelled = fleet.get("/slow/report/60", headers=ASYNC).headers["location"]
    with EventStream(fleet.edge_port, f"{cancelled}/events") as stream:
        assert any(e.kind == "progress" for e in _until_progress(stream))  # it runs on a worker
        assert fleet.request("DELETE", cancelled).json()["state"] in ("cancelling", "cancelled")
        end = next(e for e in stream.events() if e.kind == "end")
    assert end.json()["state"] == "cancelled"
    # the job's process was killed: the cluster's threads are all free for the next one
    wait_for(lambda: fleet.slow_health()["pool"]["busy"] == 0, what="no job left on the cluster")

    assert_contract_error(fleet.get(f"/jobs/{new_id()}"), 404, "not_found")
    db = sqlite3.connect(fleet.run_dir / "jobs" / "store.sqlite")  # its TTL passed, as the sweep writes it
    with db:
        db.execute("UPDATE jobs SET state = 'expired', result = NULL WHERE id = ?", (location.rsplit("/", 1)[1],))
    db.close()
    assert_contract_error(fleet.get(location), 410, "expired")


def test_on_a_dask_cluster_a_job_outlives_its_instance_and_runner_and_a_killed_job_process_s_job_ends_worker_lost(
        private_dask_fleet):
    fleet = private_dask_fleet(slow=2, **LOST_AFTER)
    outlives = fleet.get("/slow/report/6", **_to(fleet, 1, ASYNC)).headers["location"]
    lost = fleet.get("/slow/long_spin/60", **_to(fleet, 1, ASYNC)).headers["location"]
    for location in (outlives, lost):
        with EventStream(fleet.edge_port, f"{location}/events") as stream:
            assert any(e.kind == "progress" for e in _until_progress(stream))  # it computes on the cluster
    for name in ("slow-01", "runner-01"):
        os.kill(fleet.pid(name), signal.SIGKILL)
    os.kill(job_process(lost), signal.SIGKILL)  # its Dask client goes with it
    killed = time.monotonic()
    wait_for(lambda: state(fleet, lost) != "running", timeout=15, interval=0.2, what="the lost job's end")
    assert time.monotonic() - killed <= ENDED_WITHIN
    ended = fleet.get(lost).json()
    assert ended["state"] == "failed" and ended["error"]["error"] == "worker_lost"
    wait_for(lambda: state(fleet, outlives) == "succeeded", timeout=20, interval=0.2, what="the other job succeeds")
    # The scheduler let go of the dead client's job, and its worker killed the job's process:
    # nothing computes on the cluster any more.
    wait_for(lambda: not any(procfs.state(pid) == "R" for pid in _job_processes(fleet)), timeout=15,
             what="no job process computing on the cluster")


def _job_processes(fleet: Fleet) -> list[int]:
    """The processes the fleet's Dask workers run jobs in (their children)."""
    return [child for p in fleet.processes() if p["name"].startswith("dask-worker") and p["pid"]
            for child in procfs.descendants(p["pid"])]


def _until_progress(stream: EventStream):
    for event in stream.events():
        yield event
        if event.kind == "progress":
            return


PAGE_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "job-page.png"


def test_the_job_page_shows_live_progress_in_chromium_the_result_at_the_end_and_cancels(jobs_fleet, jobs, tmp_path):
    """Debian's chromium, driven by Playwright: the page's progress bar moves while the job runs
    (its EventSource through the edge), then the result shows. UPDATE_SCREENSHOT=1 refreshes the
    README's picture."""
    browser.require()
    from playwright.sync_api import expect

    location = jobs("/slow/report/4").headers["location"]
    with browser.chromium() as chromium:
        page = chromium.new_page(viewport={"width": 900, "height": 260})
        answer = page.goto(f"http://127.0.0.1:{jobs_fleet.edge_port}{location}/page")
        assert answer.status == 200 and answer.headers["x-served-by"] == "edge"
        expect(page.locator("#state")).to_have_text("running", timeout=10_000)
        bar = page.locator("#bar")
        expect(bar).to_have_attribute("max", "40", timeout=10_000)
        first = float(bar.evaluate("b => b.value"))
        page.wait_for_function("first => document.getElementById('bar').value > first + 5", arg=first,
                               timeout=10_000)  # live: the bar moves while the job runs
        assert state(jobs_fleet, location) == "running"
        if os.environ.get("UPDATE_SCREENSHOT"):
            page.screenshot(path=str(PAGE_SCREENSHOT))
        expect(page.locator("#state")).to_have_text("succeeded", timeout=20_000)
        expect(page.locator("#outcome")).to_contain_text('"sections": 40')
        page.screenshot(path=str(tmp_path / "job-page.png"))

        long = jobs("/slow/report/60").headers["location"]
        page.goto(f"http://127.0.0.1:{jobs_fleet.edge_port}{long}/page")
        expect(page.locator("#state")).to_have_text("running", timeout=10_000)
        page.get_by_role("button", name="Cancel").click()
        expect(page.locator("#state")).to_have_text("cancelled", timeout=10_000)
        expect(page.locator("#outcome")).to_contain_text("cancelled: the job was cancelled while it ran")

        gone = page.goto(f"http://127.0.0.1:{jobs_fleet.edge_port}/jobs/{new_id()}/page")
        assert gone.status == 200  # the page itself; the job it names is not there:
        expect(page.locator("#state")).to_have_text("not_found", timeout=10_000)
