"""The fleet's contract through the edge: routing, every error status produced for real, isolation."""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.cpu import process_cpu
from services.common import cpu_slice, procfs
from tests.support.contract import assert_contract_error
from tests.support.fleet import Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

NGINX_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")  # nginx's $request_id


def busy_worker_pid(fleet: Fleet) -> int:
    """The pid of the worker burning CPU in slow-01: the one whose CPU time grew most, by at least
    0.1 s, over 0.3 s. (State R alone once picked a worker that had just been replaced and was
    still starting up, while the job ran on the other.)"""
    def burning():
        pids = fleet.slow_health()["pool"]["pids"]
        before = {pid: process_cpu([pid]) for pid in pids}
        time.sleep(0.3)
        grown = {pid: process_cpu([pid]) - before[pid] for pid in pids}  # a process gone meanwhile: negative
        pid = max(grown, key=grown.get, default=None)
        return pid if pid is not None and grown[pid] >= 0.1 else None
    return wait_for(burning, timeout=5, interval=0.01)


# routing -----------------------------------------------------------------------------------------

def test_fast_route_is_served_by_every_fast_instance_in_turn(fleet: Fleet):
    responses = [fleet.get("/fast") for _ in range(10)]
    assert all(r.status == 200 and r.body == b"Hello!" for r in responses)
    assert {r.headers["x-served-by"] for r in responses} == {"fast-01", "fast-02"}
    assert all(r.headers["x-request-id"] for r in responses)


def test_echo_is_answered_by_a_fast_instance(fleet: Fleet):
    response = fleet.request("POST", "/echo", body=b"hello")
    assert response.status == 200 and response.headers["x-served-by"].startswith("fast-")
    assert response.json() == {"bytes": 5, "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}


def test_healthz_answers_through_the_edge_and_on_each_instance_port(fleet: Fleet):
    assert fleet.get("/healthz").json()["status"] == "ok"
    for port, role in [(p, "fast") for p in fleet.fast_ports] + [(p, "slow") for p in fleet.slow_ports]:
        body = fleet.get("/healthz", port=port).json()
        assert body["status"] == "ok" and body["role"] == role


def test_the_edge_gives_every_request_its_own_id_whatever_id_the_client_sends(fleet: Fleet):
    # A client-chosen id could pose as another request's in the logs and error bodies: the id is
    # nginx's own on every path (fast and slow instances, the edge cache, the edge's error pages).
    ids = set()
    for sent in ("trace-42.a", 'x" onload=1', None):
        headers = {"X-Request-ID": sent} if sent else {}
        for path in ("/fast", "/slow/fib/5", "/slow/primes/100", "/slow/primes/100", "/nope", "/slow"):
            response = fleet.get(path, headers=headers)
            assert NGINX_REQUEST_ID.match(response.headers["x-request-id"]), (path, response.headers)
            ids.add(response.headers["x-request-id"])
        refused = assert_contract_error(fleet.request("PUT", "/fast", headers=headers), 405)
        assert NGINX_REQUEST_ID.match(refused["request_id"])
        ids.add(refused["request_id"])
    assert len(ids) == 3 * 7  # never one request's id on another


# errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/slow/nope/1", "/nope", "/slow/"])
def test_unknown_routes_and_tasks_get_404_json(fleet: Fleet, path: str):
    assert_contract_error(fleet.get(path), 404, "not_found")


def test_wrong_method_gets_405_json(fleet: Fleet):
    assert_contract_error(fleet.request("PUT", "/fast"), 405)
    assert_contract_error(fleet.get("/slow/pbkdf2"), 405)


def test_a_worker_that_exits_fails_only_its_own_job_and_the_pool_refills(fleet: Fleet):
    before = set(fleet.slow_health()["pool"]["pids"])
    with ThreadPoolExecutor(2) as pool:
        neighbour = pool.submit(fleet.get, "/slow/spin/1")
        time.sleep(0.2)
        crashed = fleet.get("/slow/exit_worker")
        assert_contract_error(crashed, 502, "worker_died")
        assert neighbour.result().status == 200
    pids = wait_for(lambda: (p := fleet.slow_health()["pool"]["pids"]) and len(p) == 2 and p)
    assert set(pids) != before
    assert fleet.get("/slow/fib/10").json()["result"] == 55


def test_kill_9_of_a_worker_during_a_job_gives_502_for_that_job_only(fleet: Fleet):
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(fleet.get, "/slow/spin/2.5")
        victim = busy_worker_pid(fleet)
        os.kill(victim, signal.SIGKILL)
        assert_contract_error(job.result(), 502, "worker_died")
    assert fleet.get("/slow/fib/10").status == 200
    assert victim not in fleet.slow_health()["pool"]["pids"]


def test_a_departed_client_s_running_job_has_its_worker_killed_and_replaced(fleet: Fleet):
    before = fleet.slow_health()["pool"]
    with pytest.raises(TimeoutError):
        fleet.get("/slow/spin/2.5", timeout=0.5)
    after = wait_for(lambda: (h := fleet.slow_health()["pool"])["cancelled"] > before["cancelled"]
                     and len(h["pids"]) == 2 and h)
    assert after["cancelled"] == before["cancelled"] + 1
    assert set(after["pids"]) != set(before["pids"])


def test_oversized_requests_get_the_edge_s_json_errors(fleet: Fleet):
    body = assert_contract_error(fleet.request("POST", "/echo", body=b"x" * (1024 * 1024 + 1)), 413, "payload_too_large")
    assert body["message"]
    assert fleet.get("/fast?" + "a" * 9000).status == 414
    assert_contract_error(fleet.get("/" + "a" * 9000), 414, "uri_too_long")
    assert_contract_error(fleet.get("/fast", headers={"X-Big": "a" * 9000}), 431, "headers_too_large")
    r = fleet.get("/fast", headers={"X-Big": "a" * 9000})
    assert r.headers["x-served-by"] == "edge"


def test_the_fast_path_asks_for_a_short_time_slice_and_the_heavy_path_keeps_the_kernel_s(fleet: Fleet):
    """fast.sched_slice_us (100 us): the fast instances and every nginx process run with it, so a
    woken event loop preempts heavy work at once; the slow instance and its workers keep the default."""
    if not cpu_slice.kernel_has_custom_slices():
        pytest.skip("custom time slices need Linux 6.12+")
    children = procfs.children_map()
    launcher = fleet.pid("nginx")
    nginx = [pid for master in children.get(launcher, []) for pid in [master] + children.get(master, [])]
    assert len(nginx) >= 2, "no nginx master and worker under the launcher"
    fast = [fleet.pid(f"fast-{n:02d}") for n in (1, 2)]
    for pid in fast + nginx:
        assert cpu_slice.slice_ns(pid) == 100_000, f"pid {pid}"
    heavy = [fleet.pid("slow-01")] + fleet.slow_health()["pool"]["pids"]
    for pid in heavy:
        assert cpu_slice.slice_ns(pid) > 100_000, f"pid {pid}"


def test_workers_run_below_every_other_process_group_when_the_machine_allows_it(fleet: Fleet):
    """slow.idle_cgroup (on by default): workers sit in a cpu cgroup with cpu.idle = 1."""
    pids = fleet.slow_health()["pool"]["pids"]
    groups = [procfs.cgroups(pid) for pid in pids]
    if not any("fleet-idle" in path for group in groups for path in group.values()):
        pytest.skip("no writable cpu cgroup here (not root, or no delegation): workers rely on nice")
    for group in groups:
        path = next(path for path in group.values() if "fleet-idle" in path)
        mount = next(m for m in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup")
                     if os.path.exists(m + path))
        assert open(f"{mount}{path}/cpu.idle").read().strip() == "1"
    server_group = " ".join(procfs.cgroups(fleet.pid("slow-01")).values())  # its path in every hierarchy
    assert "fleet-idle" not in server_group  # the event loop keeps its normal priority
