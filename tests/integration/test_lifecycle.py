"""Starting, re-applying, stopping: the commands behind make deploy-local / stop, on private fleets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid

import pytest

from deploy.fleet import processes_of
from services.common import procfs
from services.slow import cpu_priority
from bench.procs import port_is_free
from tests.support.cgroups import cpu_cgroup_of
from tests.support.fleet import REPO, make_fleet
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
