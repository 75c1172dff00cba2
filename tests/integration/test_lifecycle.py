"""Starting, re-applying, stopping: the commands behind make deploy-local / stop, on private fleets;
what a change applies (and what it leaves alone when refused), what a killed instance leaves, how an
instance drains on SIGTERM, and the cgroups a fleet makes and removes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.procs import free_port_block, port_is_free
from deploy.fleet import processes_of
from services.common import procfs
from services.slow import cpu_priority
from tests.support.cgroups import cpu_cgroup_of
from tests.support.contract import assert_contract_error
from tests.support.fleet import REPO, make_fleet
from tests.support.running_jobs import last_spinner, spinner_pid
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def test_two_fleets_run_side_by_side_and_stop_leaves_nothing(private_fleet):
    first = private_fleet(FLEET_SLOW_WORKERS="1")
    second = private_fleet(FLEET_FAST_INSTANCES="1")
    assert first.get("/fast").body == second.get("/fast").body == b"Hello!"
    assert first.slow_health()["pool"]["workers"] == 1
    assert {first.get("/fast").headers["x-served-by"] for _ in range(4)} == {"fast-01", "fast-02"}
    assert {second.get("/fast").headers["x-served-by"] for _ in range(4)} == {"fast-01"}
    members = processes_of(first.run_dir)
    assert len(members) >= 1 + 1 + 2 + 1 + 1 + 1  # supervisord, nginx (+worker), 2 fast, slow, its workers

    first.command("stop")
    assert processes_of(first.run_dir) == []
    assert all(port_is_free(p) for p in first.ports)
    assert second.get("/fast").status == 200  # the other fleet was not touched


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
                    time.sleep(0.01)  # refused: nothing listens yet (paces the next try)

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        fleet.command("up")
        time.sleep(1)  # the first second of the fleet just up, hammered: what the test watches
    finally:
        stop.set()
        thread.join()
        fleet.command("stop", check=False)
    assert answers and set(answers) == {200}, sorted(set(answers))


def test_deploying_again_while_up_changes_nothing_and_says_so(private_fleet):
    fleet = private_fleet()
    pids = {p for p in processes_of(fleet.run_dir)}
    result = fleet.command("up")
    assert "nothing to apply" in result.stdout
    assert {p for p in processes_of(fleet.run_dir)} == pids


def test_deploying_with_changed_settings_applies_them_one_instance_at_a_time(private_fleet):
    fleet = private_fleet()
    fleet.env["FLEET_SLOW_WORKERS"] = "1"
    result = fleet.command("up")
    assert "rolling restart" in result.stdout
    assert fleet.slow_health()["pool"]["workers"] == 1
    assert fleet.get("/slow/fib/10").json()["result"] == 55


def test_an_nginx_change_with_a_long_job_in_flight_is_applied_and_recorded(private_fleet):
    fleet = private_fleet(FLEET_SLOW_JOB_TIMEOUT="20", FLEET_SLOW_DRAIN_TIMEOUT="25",
                          FLEET_TASKS_SLEEP_MAX_SECONDS="15")
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(fleet.get, "/slow/sleep/12")  # longer than the old check's 10 s
        wait_for(lambda: fleet.slow_health()["running"] == 1, what="the long job running")
        fleet.env["FLEET_EDGE_ECHO_MAX_BODY_KB"] = "32"  # the default: 64
        result = fleet.command("up", timeout=60)
        assert "nginx reloaded" in result.stdout
        assert_contract_error(fleet.request("POST", "/echo", body=b"x" * 50_000), 413, "payload_too_large")
        assert fleet.command("up").stdout.count("nothing to apply") == 1  # the record says what runs
        assert job.result().status == 200  # the old worker finished its job
    del fleet.env["FLEET_EDGE_ECHO_MAX_BODY_KB"]
    assert "nginx reloaded" in fleet.command("up").stdout
    assert fleet.request("POST", "/echo", body=b"x" * 50_000).status == 200


def test_a_config_nginx_refuses_at_reload_leaves_the_old_one_serving_and_in_the_run_dir(private_fleet):
    from deploy import apply
    from deploy.control import FleetError
    from services.common.settings import load

    fleet = private_fleet()
    conf = fleet.run_dir / "nginx" / "conf" / "nginx.conf"
    before = conf.read_text()
    # `nginx -t` accepts this, a running nginx does not: a shared zone cannot change its key.
    conf.write_text(before.replace("limit_req_zone $fleet_client", "limit_req_zone $remote_addr"))
    with pytest.raises(FleetError, match="refused"):
        apply.reload_nginx(load(env=fleet.env), before)
    assert conf.read_text() == before and fleet.get("/fast").status == 200
    assert "nothing to apply" in fleet.command("up").stdout


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
    # The new master writes its pid file a moment after the old one, retiring, removed its own.
    pid_file = fleet.run_dir / "nginx" / "nginx.pid"

    def written_pid() -> str:
        try:
            return pid_file.read_text().strip()
        except FileNotFoundError:
            return ""

    master = wait_for(written_pid, timeout=10, what="the new nginx master's pid file")
    os.kill(int(master), signal.SIGKILL)
    wait_for(fleet.answers, timeout=10)  # a new master starts on the new socket


def test_deploy_refuses_a_port_taken_by_another_program(tmp_path):
    fleet = make_fleet(tmp_path / "taken")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", fleet.fast_ports[1]))
        squatter.listen()
        result = fleet.command("up", check=False)
    assert result.returncode != 0
    assert f"port {fleet.fast_ports[1]} (fast-02)" in result.stderr
    assert "FLEET_FAST_BASE_PORT" in result.stderr
    assert processes_of(fleet.run_dir) == []


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


def test_invalid_settings_fail_fast_naming_the_key(tmp_path):
    fleet = make_fleet(tmp_path / "invalid", FLEET_SLOW_NICE="42")
    result = fleet.command("up", check=False)
    assert result.returncode == 1
    assert "FLEET_SLOW_NICE" in result.stderr and "0-19" in result.stderr


def test_kill_9_of_a_slow_instance_takes_its_workers_along_and_supervisor_brings_it_back(private_fleet):
    fleet = private_fleet()
    health = fleet.slow_health()
    workers = health["pool"]["pids"]
    instance = fleet.pid("slow-01")
    os.kill(instance, signal.SIGKILL)

    wait_for(lambda: not any(procfs.alive(pid) for pid in workers), timeout=5)
    back = wait_for(fleet.slow_health_or_none, timeout=20)
    assert back["status"] == "ok" and not set(back["pool"]["pids"]) & set(workers)
    wait_for(lambda: fleet.process("slow-01")["statename"] == "RUNNING")
    assert fleet.get("/slow/fib/12").json()["result"] == 144


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


# draining ------------------------------------------------------------------------------------------

def accepting(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_draining_instance_answers_kept_alive_requests_with_connection_close(private_fleet):
    import http.client

    fleet = private_fleet()
    conn = http.client.HTTPConnection("127.0.0.1", fleet.fast_ports[0], timeout=10)
    conn.request("GET", "/fast", headers=fleet.edge_headers())  # as nginx would, on a kept-alive connection
    first = conn.getresponse()
    first.read()
    assert first.getheader("Connection") != "close"
    pid = fleet.pid("fast-01")
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not accepting(fleet.fast_ports[0]), what="the draining instance no longer accepting")
    conn.request("GET", "/fast", headers=fleet.edge_headers())
    second = conn.getresponse()
    assert second.status == 200 and second.read() == b"Hello!"
    assert second.getheader("Connection") == "close"
    conn.close()


def test_a_slow_instance_finishes_its_running_job_before_it_exits(private_fleet):
    fleet = private_fleet()
    pid, before = fleet.pid("slow-01"), last_spinner(fleet.run_dir)
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(fleet.get, "/slow/spin_and_tell/1.5")
        spinner_pid(fleet.run_dir, before)  # the job runs
        os.kill(pid, signal.SIGTERM)
        response = job.result()
    assert response.status == 200 and response.json()["result"] == 1.5
    wait_for(lambda: "drained in" in fleet.log("slow-01"), timeout=10)  # once nginx let go of it


# the workers' idle cgroups ------------------------------------------------------------------------

def test_the_workers_idle_cgroups_live_under_the_fleet_s_own_and_none_outlives_it(tmp_path):
    """A fleet started inside a cgroup of its own (as systemd gives a service) puts its workers'
    idle groups under it, and leaves none behind: after a stop, and after a kill -9 of supervisord
    followed by a stop."""
    found = cpu_priority.own_cpu_cgroup()
    if found is None or found[1] or not os.access(found[0], os.W_OK):
        pytest.skip("needs a writable cgroup v1 cpu hierarchy (root); v2 needs systemd's Delegate=yes")
    service = found[0] / f"fleet-test-{uuid.uuid4().hex[:8]}"
    service.mkdir()  # the service's own cgroup
    fleet = make_fleet(tmp_path / "fleet")

    def up() -> None:
        subprocess.run([sys.executable, "-m", "deploy.fleet", "up"], cwd=REPO, env=fleet.env, check=True,
                       capture_output=True, timeout=120,
                       preexec_fn=lambda: (service / "cgroup.procs").write_text(str(os.getpid())))

    def groups_under_service() -> list[str]:
        return sorted(str(p.relative_to(service)) for p in service.rglob("*") if p.is_dir())

    try:
        for stop_after_kill in (False, True):
            up()
            own = "/" + str(service.relative_to(found[0]))
            supervisord = int((fleet.run_dir / "supervisord.pid").read_text())
            assert cpu_cgroup_of(supervisord) == own and cpu_cgroup_of(fleet.pid("slow-01")) == own
            for worker in fleet.slow_health()["pool"]["pids"]:
                group = cpu_cgroup_of(worker)
                assert group.startswith(f"{own}/{cpu_priority.IDLE}/slow-01-"), group
                assert (found[0] / group.lstrip("/") / "cpu.idle").read_text().strip() == "1"
            if stop_after_kill:
                os.kill(supervisord, signal.SIGKILL)
            fleet.command("stop")
            assert groups_under_service() == [], "a cgroup of the fleet outlived it"
            assert not (fleet.run_dir / cpu_priority.RECORD).exists()
    finally:
        fleet.command("stop", check=False)
        for pid in (service / "cgroup.procs").read_text().split():  # nothing should be there; never leak
            os.kill(int(pid), signal.SIGKILL)
        wait_for(lambda: not (service / "cgroup.procs").read_text().split(), timeout=5)
        for directory in sorted((p for p in service.rglob("*") if p.is_dir()), reverse=True):
            directory.rmdir()
        service.rmdir()
