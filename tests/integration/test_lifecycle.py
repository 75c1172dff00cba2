"""Starting, re-applying, stopping: the commands behind make deploy-local / stop, on private fleets."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from deploy.fleet import processes_of
from tests.integration.conftest import port_is_free
from tests.integration.test_fleet import wait_for

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


def test_deploy_refuses_a_port_taken_by_another_program(private_fleet, tmp_path):
    from tests.integration.conftest import make_fleet

    fleet = make_fleet(tmp_path / "taken")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", fleet.fast_ports[1]))
        squatter.listen()
        result = fleet.command("up", check=False)
    assert result.returncode != 0
    assert f"port {fleet.fast_ports[1]} (fast-02)" in result.stderr
    assert "FLEET_FAST_BASE_PORT" in result.stderr
    assert processes_of(fleet.run_dir) == []


def test_invalid_settings_fail_fast_naming_the_key(private_fleet, tmp_path):
    from tests.integration.conftest import make_fleet

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

    def gone(pid: int) -> bool:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        return state == "Z"

    wait_for(lambda: all(gone(pid) for pid in workers), timeout=5)
    back = wait_for(lambda: _health_or_none(fleet), timeout=20)
    assert back["status"] == "ok" and not set(back["pool"]["pids"]) & set(workers)
    wait_for(lambda: fleet.process("slow-01")["statename"] == "RUNNING")
    assert fleet.get("/slow/fib/12").json()["result"] == 144


def _health_or_none(fleet):
    try:
        return fleet.slow_health()
    except OSError:
        time.sleep(0.1)
        return None
