"""Long jobs on the server store (jobs.store = "redis"): the fleet runs its own redis-server
(program job-store) and two slow instances share it; a job's whole life through the edge, then
the store's faults: stopped (refused connections) and frozen (a store that accepts and never
answers, as a partition looks), each answered 503 store_unavailable at once while the fast path
answers, and the jobs there again when it is back."""

from __future__ import annotations

import os
import signal

import pytest

from tests.support.contract import assert_contract_error
from tests.support.fleet import Fleet
from tests.support.job_life import whole_life
from tests.support.redis_server import binary_or_skip
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

ASYNC = {"Prefer": "respond-async"}
# "At once": a refused connection is answered in milliseconds, a silent store after the socket
# timeout (jobs.store_timeout, 0.5 s). nginx gives a status read 10 s (proxy_read_timeout) and a
# submit the job deadline: a hang would be seen as one of those.
AT_ONCE = 2.0


def assert_store_unavailable(fleet: Fleet, location: str) -> None:
    for method, path, headers in (("GET", "/slow/report/1", ASYNC), ("GET", location, {}),
                                  ("DELETE", location, {}), ("GET", f"{location}/events", {})):
        response = fleet.request(method, path, headers=headers)
        assert_contract_error(response, 503, "store_unavailable")
        assert response.headers["retry-after"] == "1" and response.elapsed < AT_ONCE, (path, response.elapsed)
    fast = fleet.get("/fast")
    assert fast.status == 200 and fast.elapsed < AT_ONCE
    sync = fleet.get("/slow/fib/20")  # no job, no store: served as ever
    assert sync.status == 200 and sync.json()["result"] == 6765


def wait_back(fleet: Fleet, location: str) -> None:
    """Every slow instance reads the job again (each asks its store again a second after its last
    fault at most, PAUSE_AFTER_FAULT), on its own port as the edge would ask it."""
    for port in fleet.slow_ports:
        wait_for(lambda: fleet.get(location, headers=fleet.edge_headers(), port=port).status == 200,
                 what=f"the instance on {port} reads the job again")


def test_on_the_redis_store_a_job_lives_through_the_edge_and_a_store_that_is_down_is_503_at_once(private_fleet):
    binary_or_skip()
    fleet = private_fleet(slow=2, FLEET_JOBS_STORE="redis", FLEET_JOBS_KEEPALIVE_SECONDS="1")
    wait_for(lambda: fleet.process("job-store")["statename"] == "RUNNING", what="supervisor runs job-store")
    location = whole_life(fleet, lambda path: fleet.get(path, headers=ASYNC))

    fleet.supervisorctl("stop", "job-store")  # refused connections
    assert fleet.process("job-store")["statename"] == "STOPPED"
    assert_store_unavailable(fleet, location)
    fleet.supervisorctl("start", "job-store")
    wait_back(fleet, location)
    assert fleet.get(location).json()["state"] == "succeeded"  # read back from its append-only log

    store = fleet.pid("job-store")
    os.kill(store, signal.SIGSTOP)  # it accepts connections and answers nothing: a partition's look
    try:
        assert_store_unavailable(fleet, location)
    finally:
        os.kill(store, signal.SIGCONT)
    wait_back(fleet, location)
    again = fleet.get("/slow/fib/10", headers=ASYNC)
    assert again.status == 202
    wait_for(lambda: fleet.get(again.headers["location"]).json()["state"] == "succeeded", what="a new job runs")
