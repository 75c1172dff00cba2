"""The slow path's contract through the edge, on both backends: the instance's own worker processes
(slow.backend = "local") and a managed Dask cluster ("dask"). Every test here runs twice.

Backend-specific faults are in test_local_pool.py and test_faults.py (local) and test_dask.py (Dask).
"""

from __future__ import annotations

import hashlib
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.common.procfs import alive
from tests.support.contract import assert_contract_error
from tests.support.fleet import Fleet
from tests.support.running_jobs import beside_a_running_job, last_spinner, spinner_pid
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def test_slow_route_is_computed_by_a_slow_instance(slow_fleet: Fleet):
    response = slow_fleet.get("/slow/fib/25")
    assert response.status == 200
    assert response.headers["x-served-by"] == "slow-01"
    body = response.json()
    assert body["task"] == "fib" and body["n"] == 25 and body["result"] == 75025
    assert body["elapsed_ms"] > 0


def test_pbkdf2_task_hashes_a_posted_password(slow_fleet: Fleet):
    response = slow_fleet.request("POST", "/slow/pbkdf2", body=b'{"password": "pw", "salt": "s", "rounds": 2000}')
    assert response.status == 200
    assert response.json()["result"] == hashlib.pbkdf2_hmac("sha256", b"pw", b"s", 2000).hex()
    assert "pw" not in response.body.decode()


def test_sleep_task_reuses_its_worker_s_client_across_jobs(slow_fleet: Fleet):
    results = [slow_fleet.get("/slow/sleep/0").json()["result"] for _ in range(6)]
    by_worker: dict[int, list[dict]] = {}
    for r in results:
        by_worker.setdefault(r["worker_pid"], []).append(r)
    reused = [jobs for jobs in by_worker.values() if len(jobs) > 1]
    assert reused, "six jobs on two workers: some worker must have run two"
    for jobs in reused:
        assert len({j["client_id"] for j in jobs}) == 1  # set up once per worker
        assert [j["calls"] for j in jobs] == sorted(j["calls"] for j in jobs)


@pytest.mark.parametrize("path", ["/slow/fib/-1", "/slow/fib/abc", "/slow/fib/999", "/slow/fib/", "/slow/sleep/nan"])
def test_bad_task_arguments_get_400_json(slow_fleet: Fleet, path: str):
    assert_contract_error(slow_fleet.get(path), 400, "bad_argument")


def test_an_unknown_task_is_404_and_a_wrong_method_405(slow_fleet: Fleet):
    assert_contract_error(slow_fleet.get("/slow/nope/1"), 404, "not_found")
    assert_contract_error(slow_fleet.get("/slow/pbkdf2"), 405, "method_not_allowed")


def test_a_job_that_raises_gets_500_with_its_type_and_the_traceback_only_in_the_log(slow_fleet: Fleet):
    response = slow_fleet.get("/slow/raise_error")
    body = assert_contract_error(response, 500, "job_failed")
    request_id = body["request_id"]  # the edge's id for this request, in the body and X-Request-ID
    assert body["type"] == "ValueError" and "always raises" in body["message"]
    assert "Traceback" not in response.body.decode()
    log = wait_for(lambda: request_id in slow_fleet.log("slow-01") and slow_fleet.log("slow-01"))
    line = next(line for line in log.splitlines() if request_id in line and "Traceback" in line)
    assert "raise_error" in line


def test_an_exception_message_reaches_the_log_and_not_the_client_unless_the_task_exposes_it(slow_fleet: Fleet):
    response = slow_fleet.get("/slow/hidden_raise")
    body = assert_contract_error(response, 500, "job_failed")
    request_id = body["request_id"]
    assert body["type"] == "PermissionError" and request_id in body["message"]
    assert "alice" not in response.body.decode() and "/srv/secret" not in response.body.decode()
    log = wait_for(lambda: request_id in slow_fleet.log("slow-01") and slow_fleet.log("slow-01"))
    assert any(request_id in line and "alice" in line for line in log.splitlines())


def test_a_job_past_its_deadline_gets_504_stops_using_the_cpu_and_the_next_job_is_served(slow_fleet: Fleet):
    before = last_spinner(slow_fleet.run_dir)
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(slow_fleet.get, "/slow/spin_and_tell/20")
        runaway = spinner_pid(slow_fleet.run_dir, before)
        response = job.result()
    assert_contract_error(response, 504, "job_timeout")
    assert 2.9 <= response.elapsed <= 5, response.elapsed  # slow.job_timeout is 3 s here
    wait_for(lambda: not alive(runaway), timeout=3)  # killed, not left spinning
    assert slow_fleet.get("/slow/fib/20").json()["result"] == 6765


def test_a_departed_client_s_running_job_is_stopped(slow_fleet: Fleet):
    before = last_spinner(slow_fleet.run_dir)
    with socket.create_connection(("127.0.0.1", slow_fleet.edge_port)) as s:
        s.sendall(b"GET /slow/spin_and_tell/2.5 HTTP/1.1\r\nHost: t\r\n\r\n")
        runaway = spinner_pid(slow_fleet.run_dir, before)
    wait_for(lambda: not alive(runaway), timeout=2)  # well before its 2.5 s were up
    assert slow_fleet.get("/slow/fib/10").json()["result"] == 55
    # the cancelled job's outcome was consumed, not logged as an asyncio error with a traceback
    assert "never retrieved" not in slow_fleet.log("slow-01")


def test_a_job_whose_process_exits_fails_alone_with_502_and_the_next_jobs_are_served(slow_fleet: Fleet):
    assert_contract_error(beside_a_running_job(slow_fleet, "/slow/exit_worker"), 502, "worker_died")
    assert all(slow_fleet.get("/slow/fib/10").json()["result"] == 55 for _ in range(3))


def test_a_job_past_the_workers_memory_cap_gets_502_and_only_its_worker_is_replaced(slow_fleet: Fleet):
    before, workers = slow_fleet.pid("slow-01"), slow_fleet.slow_health()["pool"]["workers"]
    hog = beside_a_running_job(slow_fleet, "/slow/allocate/700")  # the test fleets cap workers at 256 MiB
    body = assert_contract_error(hog, 502, "worker_out_of_memory")
    assert "256 MiB" in body["message"] and "slow.worker_max_rss_mb" in body["message"]
    assert slow_fleet.get("/slow/allocate/20").json()["result"] == 20  # under the cap: served
    assert slow_fleet.pid("slow-01") == before  # the instance lived through it
    wait_for(lambda: slow_fleet.slow_health()["pool"]["workers"] == workers, timeout=10)  # whole again


def test_a_task_whose_setup_fails_answers_503_and_every_other_task_runs(slow_fleet: Fleet):
    response = slow_fleet.get("/slow/needs_setup")
    body = assert_contract_error(response, 503, "task_unavailable")
    assert "the model file is missing" in body["message"] and response.headers["retry-after"] == "1"
    assert slow_fleet.get("/slow/fib/10").json()["result"] == 55


def test_more_jobs_than_workers_and_queue_get_immediate_503_while_fast_keeps_answering(slow_fleet: Fleet):
    # 2 workers (or cluster threads) + 2 waiting places: of 7 concurrent jobs, 3 must be refused at once.
    # 1 s jobs: the waiting ones finish within the deadline (3 s), which counts their wait in line.
    with ThreadPoolExecutor(7) as pool:
        jobs = [pool.submit(slow_fleet.get, "/slow/spin/1") for _ in range(7)]
        wait_for(lambda: (h := slow_fleet.slow_health())["running"] == 2 and h["waiting"] == 2,
                 what="the slow path full: 2 jobs running, 2 waiting")
        fast = [slow_fleet.get("/fast") for _ in range(20)]
        results = [j.result() for j in jobs]
    refused = [r for r in results if r.status == 503]
    assert len(refused) == 3, [r.status for r in results]
    for r in refused:
        assert_contract_error(r, 503, "overloaded")
        # An estimate from the line and spin's recent job times (backoff.py): whole seconds, at
        # least 1, at most the job deadline (3 s here).
        assert 1 <= int(r.headers["retry-after"]) <= 3
        assert r.elapsed < 0.5
    assert sum(r.status == 200 for r in results) == 4
    assert all(r.status == 200 for r in fast)
    assert max(r.elapsed for r in fast) < 0.5  # generous: the benchmark measures it properly
