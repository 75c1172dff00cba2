"""The defects an outside review found, each produced for real on a fleet, and what must happen instead.

Each test names the review's item it covers (issue 14); the unit tier covers the pool's races.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from deploy.procs import processes_of
from services.common import procfs
from bench.procs import free_port_block, port_is_free
from tests.support.contract import assert_contract_error
from tests.support.fleet import Fleet, make_fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


# 1. labels a client could choose --------------------------------------------------------------------

def test_unknown_methods_are_answered_405_json_by_the_edge_and_never_reach_an_instance(fleet: Fleet):
    for method, path in (("FOOBAR", "/fast"), ("DELETE", "/slow/fib/1"), ("PUT", "/echo")):
        response = fleet.request(method, path)
        assert_contract_error(response, 405, "method_not_allowed")
        assert response.headers["x-served-by"] == "edge" and response.headers["allow"] == "GET, HEAD, POST"


# 9. HEAD, /slow ---------------------------------------------------------------------------------------

def test_head_on_fast_and_healthz_is_200_through_the_edge(fleet: Fleet):
    for path in ("/fast", "/healthz"):
        response = fleet.request("HEAD", path)
        assert response.status == 200 and response.body == b"", path


def test_slow_without_its_slash_is_a_json_404_not_an_html_redirect(fleet: Fleet):
    response = fleet.get("/slow")
    assert_contract_error(response, 404, "not_found")
    assert "location" not in response.headers


# 2. a reload judged by what nginx runs -----------------------------------------------------------------

def test_an_nginx_change_with_a_long_job_in_flight_is_applied_and_recorded(private_fleet):
    fleet = private_fleet(FLEET_SLOW_JOB_TIMEOUT="20", FLEET_SLOW_DRAIN_TIMEOUT="25",
                          FLEET_TASKS_SLEEP_MAX_SECONDS="15")
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(fleet.get, "/slow/sleep/12")  # longer than the old check's 10 s
        time.sleep(0.5)
        fleet.env["FLEET_EDGE_MAX_BODY_KB"] = "64"
        result = fleet.command("up", timeout=60)
        assert "nginx reloaded" in result.stdout
        assert_contract_error(fleet.request("POST", "/echo", body=b"x" * 100_000), 413, "payload_too_large")
        assert fleet.command("up").stdout.count("nothing to apply") == 1  # the record says what runs
        assert job.result().status == 200  # the old worker finished its job
    del fleet.env["FLEET_EDGE_MAX_BODY_KB"]
    assert "nginx reloaded" in fleet.command("up").stdout
    assert fleet.request("POST", "/echo", body=b"x" * 100_000).status == 200


def test_a_config_nginx_refuses_at_reload_leaves_the_old_one_serving_and_in_the_run_dir(private_fleet):
    from deploy import apply
    from deploy.control import FleetError
    from services.common.settings import load

    fleet = private_fleet()
    conf = fleet.run_dir / "nginx" / "conf" / "nginx.conf"
    before = conf.read_text()
    # `nginx -t` accepts this, a running nginx does not: a shared zone cannot change its key.
    conf.write_text(before.replace("limit_req_zone $binary_remote_addr", "limit_req_zone $remote_addr"))
    with pytest.raises(FleetError, match="refused"):
        apply.reload_nginx(load(env=fleet.env), before)
    assert conf.read_text() == before and fleet.get("/fast").status == 200
    assert "nothing to apply" in fleet.command("up").stdout


def test_a_deploy_refused_before_it_starts_changes_nothing(private_fleet):
    fleet = private_fleet()
    conf = fleet.run_dir / "nginx" / "conf" / "nginx.conf"
    before = conf.read_text()
    squatter = socket.socket()
    new_port = free_port_block(1)
    squatter.bind(("127.0.0.1", new_port))
    squatter.listen()
    try:
        fleet.env["FLEET_EDGE_PORT"] = str(new_port)
        result = fleet.command("up", check=False)
    finally:
        squatter.close()
        fleet.env["FLEET_EDGE_PORT"] = str(fleet.edge_port)
    assert result.returncode == 1 and f"port {new_port} (edge)" in result.stderr
    assert conf.read_text() == before and fleet.get("/fast").status == 200


# 7. a moved edge --------------------------------------------------------------------------------------

def test_a_changed_edge_port_is_applied_completely(private_fleet):
    fleet = private_fleet()
    old, new = fleet.edge_port, free_port_block(1)
    fleet.env["FLEET_EDGE_PORT"] = str(new)
    fleet.command("up")
    fleet.edge_port = new
    assert fleet.get("/fast").status == 200
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", old)) != 0  # refused: nothing listens there any more
    assert not port_is_free(new) and port_is_free(old)
    launcher = fleet.pid("nginx")
    held = procfs.fd_targets(launcher)
    assert sum(link.startswith("socket:") for link in held) >= 1  # it holds the new socket for restarts
    os.kill(int((fleet.run_dir / "nginx" / "nginx.pid").read_text()), signal.SIGKILL)
    wait_for(fleet.answers, timeout=10)  # a new master starts on the new socket


# 8. a cold start ------------------------------------------------------------------------------------

def test_a_cold_start_never_answers_no_live_upstreams(tmp_path):
    fleet = make_fleet(tmp_path / "cold")
    answers: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            for path in ("/fast", "/slow/fib/1"):
                try:
                    answers.append(fleet.get(path, timeout=10).status)
                except OSError:
                    time.sleep(0.01)  # refused: nothing listens yet

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        fleet.command("up")
        time.sleep(1)
    finally:
        stop.set()
        thread.join()
        fleet.command("stop", check=False)
    assert answers and set(answers) == {200}, sorted(set(answers))


# 3. a pool that cannot start workers, a task that cannot set up ------------------------------------------

def test_a_pool_that_cannot_start_workers_is_degraded_and_answers_503_at_once(private_fleet):
    fleet = private_fleet()
    flag = fleet.run_dir / "break-worker-start"  # tests/support/faulty_tasks.py: new workers die in setup
    flag.write_text("broken")
    for _ in range(2):
        assert_contract_error(fleet.get("/slow/exit_worker"), 502, "worker_died")
    wait_for(lambda: fleet.slow_health()["pool"]["workers"] == 0, timeout=5)
    started = time.monotonic()
    response = fleet.get("/slow/fib/10")
    assert_contract_error(response, 503, "no_workers")
    assert response.headers["retry-after"] == "1" and time.monotonic() - started < 1
    health = fleet.get("/healthz", port=fleet.slow_ports[0])
    assert_contract_error(health, 503, "degraded")
    assert health.json()["status"] == "degraded"
    flag.unlink()
    wait_for(lambda: fleet.slow_healthy(), timeout=40)
    assert fleet.get("/slow/fib/10").json()["result"] == 55


def test_a_task_whose_setup_fails_is_listed_while_the_instance_stays_healthy(fleet: Fleet):
    health = fleet.slow_health()  # its 503 task_unavailable, on both backends: test_contract.py
    assert health["status"] == "ok" and health["pool"]["unavailable_tasks"] == ["needs_setup"]


# 4. one client ------------------------------------------------------------------------------------------

def test_one_client_gets_its_share_of_the_slow_path_and_everyone_else_still_gets_in(private_fleet):
    fleet = private_fleet(FLEET_SLOW_MAX_PER_CLIENT="2")  # 2 workers, 2 waiting places
    with ThreadPoolExecutor(5) as pool:
        hog = [pool.submit(fleet.get, "/slow/sleep/2", source="127.0.0.2") for _ in range(4)]
        time.sleep(0.5)
        other = fleet.get("/slow/fib/10")  # from 127.0.0.1: admitted, not 503
        statuses = sorted(f.result().status for f in hog)
    assert other.status == 200
    assert statuses == [200, 200, 429, 429]
    refused = next(f.result() for f in hog if f.result().status == 429)
    assert_contract_error(refused, 429, "rate_limited")
    assert refused.headers["retry-after"] == "1"


# 5. what a job starts ------------------------------------------------------------------------------------

def test_a_restarted_instance_kills_what_its_killed_workers_started(private_fleet):
    fleet = private_fleet(FLEET_SLOW_JOB_TIMEOUT="20", FLEET_SLOW_DRAIN_TIMEOUT="25")
    marker = fleet.run_dir / "break-spawned-child"  # where spawn_child writes its child's pid
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(fleet.get, "/slow/spawn_child")
        child = int(wait_for(lambda: marker.exists() and marker.read_text()))
        assert procfs.alive(child)
        os.kill(fleet.pid("slow-01"), signal.SIGKILL)  # its workers die with it; the child would not
        assert job.result().status == 502
    wait_for(lambda: fleet.slow_healthy(), timeout=30)
    wait_for(lambda: not procfs.alive(child), timeout=5)
    assert child not in processes_of(fleet.run_dir)


# 6. a huge result ----------------------------------------------------------------------------------------

def test_a_result_over_the_limit_is_a_500_json_and_the_instance_stays_healthy(private_fleet):
    fleet = private_fleet(FLEET_SLOW_MAX_RESULT_MB="1")
    body = assert_contract_error(fleet.get("/slow/big_result/2000000"), 500, "result_too_large")
    assert "slow.max_result_mb" in body["message"]
    ok = fleet.get("/slow/big_result/1000000")
    assert ok.status == 200 and len(ok.json()["result"]) == 1_000_000
    assert fleet.slow_health()["status"] == "ok" and fleet.slow_health()["pool"]["crashed"] == 0
