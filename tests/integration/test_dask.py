"""The slow pool on a Dask cluster (slow.backend = "dask"): the contract, and the cluster's faults.

The managed cluster is real processes under the fleet's supervisord: a `dask scheduler` and two
`dask worker`s, each running its jobs in child processes. The slow-path contract tests shared by
both backends are in test_contract.py; these are Dask's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.procs import free_port_block, port_is_free
from services.common import procfs
from tests.support.contract import assert_contract_error
from tests.support.fleet import REPO, Fleet, make_fleet
from tests.support.probe import Probe
from tests.support.running_jobs import job_running_under, last_spinner, spinner_pid
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def answer(fleet: Fleet, path: str, timeout: float) -> int | str:
    """200, or what else came: its status, error code and who answered (for a failure's message)."""
    response = fleet.get(path, timeout=timeout)
    if response.status == 200:
        return 200
    try:
        code = response.json().get("error")
    except ValueError:
        code = response.body[:60]
    return f"{response.status} {code} from {response.headers.get('x-served-by')}"


class FastProbe(Probe):
    """GET /fast (or `path`) every 20 ms through the edge while a fault happens: none may fail."""

    def __init__(self, fleet: Fleet, path: str = "/fast", every: float = 0.02, timeout: float = 10):
        super().__init__(lambda: answer(fleet, path, timeout), every)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        assert self.statuses and set(self.statuses) == {200}, sorted(set(map(str, self.statuses)))


def worker_running_a_job(fleet: Fleet) -> dict | None:
    """supervisor's view of the Dask worker whose job process burns CPU; None while none does."""
    return next((p for p in fleet.processes() if p["name"].startswith("dask-worker-") and job_running_under(p["pid"])),
                None)


# the managed cluster ---------------------------------------------------------------------------------

def test_a_managed_cluster_runs_under_supervisor_on_loopback_with_its_dashboard(dask_fleet: Fleet):
    names = {p["name"]: p["statename"] for p in dask_fleet.processes()}
    assert names["dask-scheduler"] == names["dask-worker-01"] == names["dask-worker-02"] == "RUNNING"
    dashboard = dask_fleet.env["FLEET_DASK_DASHBOARD_PORT"]
    assert dask_fleet.get("/status", port=int(dashboard)).status == 200
    targets = json.loads((dask_fleet.run_dir / "prometheus" / "targets.json").read_text())
    assert {"targets": [f"127.0.0.1:{dashboard}"], "labels": {"role": "dask", "fleet_instance": "dask-scheduler"}} in targets
    health = dask_fleet.slow_health()
    assert health["pool"]["backend"] == "dask" and health["pool"]["cluster"]["threads"] == 2
    status = dask_fleet.command("status").stdout
    assert "dask cluster tls://127.0.0.1:" in status and "2 worker(s), 2 thread(s)" in status  # TLS on one host too


def test_a_small_result_comes_back_with_the_job_s_completion_and_a_large_one_is_gathered(dask_fleet: Fleet):
    """Up to dask_worker.PUSH_LIMIT a result travels as an event on the instance's topic (no
    gather from the worker); past it Dask gathers it. Both whole, both counted."""
    def pushed() -> int:
        return dask_fleet.slow_health()["pool"]["pushed"]

    before = pushed()
    assert dask_fleet.get("/slow/fib/20").json()["result"] == 6765
    assert pushed() == before + 1
    large = dask_fleet.get("/slow/big_result/100000")
    assert large.status == 200 and large.json()["result"] == "x" * 100000
    assert pushed() == before + 1


def test_dask_job_processes_run_under_sched_idle_and_the_dask_workers_do_not(dask_fleet: Fleet):
    """slow.sched_idle = "auto" means true on Dask: a job process there wakes once per job, and
    each wake-up must yield to any waiting event loop. Its Dask worker dispatches at normal policy."""
    assert dask_fleet.get("/slow/fib/10").status == 200  # the pools are up
    for name in ("dask-worker-01", "dask-worker-02"):
        worker = dask_fleet.pid(name)
        # the worker's pool: its forkserver, whose children are the job processes
        children = procfs.children_map()
        jobs = [job for forkserver in children.get(worker, []) for job in children.get(forkserver, [])]
        assert jobs, f"no job process under {name}"
        assert {os.sched_getscheduler(pid) for pid in jobs} == {os.SCHED_IDLE}
        assert os.sched_getscheduler(worker) == os.SCHED_OTHER


# cluster faults ----------------------------------------------------------------------------------------

def test_kill_9_of_a_dask_worker_fails_only_its_job_and_the_next_jobs_are_served(private_dask_fleet):
    fleet = private_dask_fleet()
    with FastProbe(fleet), ThreadPoolExecutor(1) as pool:
        job = pool.submit(fleet.get, "/slow/spin/5")
        busy = wait_for(lambda: worker_running_a_job(fleet), what="the job running on a Dask worker")
        os.kill(busy["pid"], signal.SIGKILL)
        assert_contract_error(job.result(), 502, "worker_died")
        assert all(fleet.answers("/slow/fib/10") for _ in range(4))
    wait_for(lambda: fleet.process(busy["name"])["statename"] == "RUNNING" and fleet.process(busy["name"])["pid"] != busy["pid"],
             timeout=20)


def test_a_cluster_without_workers_is_unhealthy_at_the_slow_instance_and_the_edge(private_dask_fleet):
    fleet = private_dask_fleet()
    for worker in ("dask-worker-01", "dask-worker-02"):
        fleet.supervisorctl("stop", f"{worker}:{worker}")
    # The instance re-reads the cluster's threads each second (dask_pool.CAPACITY_EVERY).
    health = wait_for(lambda: (lambda r: r if r.status == 503 else None)(fleet.get("/healthz", port=fleet.slow_ports[0])),
                      timeout=30, what="the slow instance degraded")
    assert health.json()["status"] == "degraded" and health.json()["pool"]["workers"] == 0
    assert fleet.get("/healthz").status == 503  # the edge's: both paths
    assert_contract_error(fleet.get("/slow/fib/3"), 503, "no_workers")  # what its health said
    for worker in ("dask-worker-01", "dask-worker-02"):
        fleet.supervisorctl("start", f"{worker}:{worker}")
    wait_for(lambda: fleet.get("/healthz").status == 200, timeout=60, what="the cluster's workers back")


def test_kill_9_of_the_scheduler_answers_in_flight_jobs_503_at_once_and_the_cluster_comes_back(private_dask_fleet):
    fleet = private_dask_fleet()
    with FastProbe(fleet), ThreadPoolExecutor(1) as pool:
        job = pool.submit(fleet.get, "/slow/spin/10")
        wait_for(lambda: worker_running_a_job(fleet), what="the job running on a Dask worker")
        killed = time.monotonic()
        os.kill(fleet.pid("dask-scheduler"), signal.SIGKILL)
        response = job.result()
        assert time.monotonic() - killed < 2  # at once, not at the job's deadline
        assert_contract_error(response, 503, "backend_unavailable")
        assert response.headers["retry-after"]
        wait_for(lambda: fleet.answers("/slow/fib/10"), timeout=60, interval=0.5)  # back by itself, workers included
    wait_for(lambda: fleet.slow_health()["pool"]["cluster"]["workers"] == 2, timeout=60, interval=0.5)
    # The new scheduler knows no subscription: the instance subscribes again, and small results
    # come back with their jobs' completion once more (not only gathered).
    pushed = fleet.slow_health()["pool"]["pushed"]
    wait_for(lambda: fleet.answers("/slow/fib/10") and fleet.slow_health()["pool"]["pushed"] > pushed, timeout=10, interval=0.5)


def test_a_scheduler_away_longer_than_the_client_s_timeout_is_rejoined_without_a_restart(private_dask_fleet):
    fleet = private_dask_fleet()
    instance = fleet.pid("slow-01")
    fleet.supervisorctl("stop", "dask-scheduler")
    started = time.monotonic()
    wait_for(lambda: fleet.slow_health()["status"] == "degraded", timeout=10)
    response = fleet.get("/slow/fib/10")
    assert_contract_error(response, 503, "backend_unavailable")
    assert response.elapsed < 1
    time.sleep(max(0.0, 8 - (time.monotonic() - started)))  # past the client's own reconnect timeout
    fleet.supervisorctl("start", "dask-scheduler")
    wait_for(lambda: fleet.answers("/slow/fib/10"), timeout=60, interval=0.5)
    assert fleet.pid("slow-01") == instance  # rejoined, not restarted


def test_an_unreachable_external_scheduler_leaves_the_instances_up_degraded_and_answering_503(tmp_path):
    closed = free_port_block(1)
    fleet = make_fleet(tmp_path / "external", FLEET_SLOW_BACKEND="dask",
                       FLEET_DASK_SCHEDULER=f"tcp://127.0.0.1:{closed}")
    try:
        result = fleet.command("up")
        assert "warning: slow-01 is up but degraded: Dask scheduler" in result.stdout
        assert not any(p["name"].startswith("dask-") for p in fleet.processes())  # no cluster of its own
        health = fleet.get("/healthz", port=fleet.slow_ports[0])
        assert_contract_error(health, 503, "degraded")
        response = fleet.get("/slow/fib/10")
        assert_contract_error(response, 503, "backend_unavailable")
        assert response.elapsed < 1 and fleet.get("/fast").status == 200
    finally:
        fleet.command("stop", check=False)


# A preload for a scheduler that claims another distributed: what a cluster on other versions says.
OTHER_VERSIONS = """
import distributed.node, distributed.versions
def claimed(packages=None):
    found = distributed.versions.get_versions(packages)
    return {**found, "packages": {**found["packages"], "distributed": "2024.1.0"}}
distributed.node.get_versions = claimed
"""


class ExternalCluster:
    """A Dask cluster the fleet does not run, started as the README says, stopped by pid."""

    def __init__(self, tmp_path, env: dict):
        self.tmp_path, self.env, self.procs = tmp_path, env, []
        self.port = free_port_block(4)
        self.address = f"tcp://127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str], env: dict | None = None) -> None:
        log = open(self.tmp_path / f"{name}.log", "w")
        self.procs.append(subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=log, stderr=log,
                                           env={**self.env, **(env or {})}, start_new_session=True))

    def scheduler(self, *preloads: str) -> None:
        self._start("scheduler", ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                  "--dashboard-address", f"127.0.0.1:{self.port + 1}",
                                  *[a for p in preloads for a in ("--preload", p)]],
                    {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"})
        wait_for(lambda: not port_is_free(self.port), 30)

    def worker(self, settings: Path) -> None:
        self._start("worker", ["distributed.cli.dask_worker", self.address, "--no-nanny", "--nthreads", "1",
                               "--memory-limit", "0", "--host", "127.0.0.1", "--dashboard-address",
                               f"127.0.0.1:{self.port + 2}", "--preload", "services.slow.dask_worker"],
                    {"FLEET_SNAPSHOT": str(settings)})

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_an_existing_cluster_runs_the_jobs_and_one_on_other_versions_is_refused_naming_them(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    cluster = ExternalCluster(tmp_path, env)
    fleet = make_fleet(tmp_path / "fleet", FLEET_SLOW_BACKEND="dask", FLEET_DASK_SCHEDULER=cluster.address)
    try:
        cluster.scheduler("services.slow.dask_worker")  # as the README says, without the fleet's settings
        fleet.command("up")
        assert not any(p["name"].startswith("dask-") for p in fleet.processes())  # no cluster of its own
        cluster.worker(fleet.run_dir / "settings.json")  # the README's worker command
        wait_for(lambda: fleet.answers("/slow/fib/10"), 30)
        assert fleet.get("/slow/fib/20").json()["result"] == 6765
        fleet.command("stop")
        cluster.stop()

        preload = tmp_path / "other_versions.py"
        preload.write_text(OTHER_VERSIONS)
        cluster.scheduler(str(preload))
        result = fleet.command("up")
        assert "warning: slow-01 is up but degraded" in result.stdout
        problem = fleet.slow_health()["pool"]["problem"]
        assert "versions differ from this fleet's: distributed" in problem and "2024.1.0 on the scheduler" in problem
        assert_contract_error(fleet.get("/slow/fib/10"), 503, "backend_unavailable")
    finally:
        fleet.command("stop", check=False)
        cluster.stop()


def test_a_running_fleet_switches_backend_both_ways_failing_no_request(private_dask_fleet):
    # A 10 s deadline (the tests' 3 s would not cover a job's wait while a cluster starts: it
    # counts from admission, the wait in line included).
    fleet = private_dask_fleet(FLEET_SLOW_JOB_TIMEOUT="10", FLEET_SLOW_DRAIN_TIMEOUT="11")
    for backend in ("local", "dask"):
        fleet.env["FLEET_SLOW_BACKEND"] = backend
        # A new cluster starts before the spares, which read the new settings and would wait for it.
        with FastProbe(fleet), FastProbe(fleet, "/slow/fib/10", every=0.1, timeout=20):
            result = fleet.command("up", timeout=180)
        assert fleet.slow_health()["pool"]["backend"] == backend, result.stdout
        running = {p["name"] for p in fleet.processes()}
        assert ("dask-scheduler" in running) == (backend == "dask"), running


# a reload ------------------------------------------------------------------------------------------------

def test_a_reload_restarts_the_dask_workers_one_at_a_time_failing_no_accepted_job(private_dask_fleet):
    # A 10 s deadline: while one of the two workers restarts, a job may wait longer in line than
    # the tests' 3 s, which count from admission; the heavy probe waits past it (its answer, 200
    # or the deadline's error, comes within it and nginx's margin).
    fleet = private_dask_fleet(FLEET_SLOW_JOB_TIMEOUT="10", FLEET_SLOW_DRAIN_TIMEOUT="11")
    before = {p["name"]: p["pid"] for p in fleet.processes()}
    # Heavy requests all along too: a worker taken away before the one restarted before it has
    # rejoined the scheduler would leave the cluster with none (503 no_workers).
    with FastProbe(fleet), FastProbe(fleet, "/slow/fib/10", every=0.05, timeout=20), ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(fleet.get, "/slow/spin/1.5") for _ in range(2)]
        wait_for(lambda: fleet.slow_health()["pool"]["busy"] >= 2
                 and all(job_running_under(fleet.pid(name)) for name in ("dask-worker-01", "dask-worker-02")),
                 what="both jobs running, one on each Dask worker")
        result = fleet.command("reload", timeout=180)
        jobs += [pool.submit(fleet.get, "/slow/fib/15") for _ in range(3)]  # with the probe's: 4 places
        answers = [j.result() for j in jobs]
    assert [a.status for a in answers] == [200] * 5, [a.body for a in answers]
    after = {p["name"]: p["pid"] for p in fleet.processes()}
    for name in ("dask-worker-01", "dask-worker-02", "slow-01"):
        assert after[name] != before[name], name
    assert after["dask-scheduler"] == before["dask-scheduler"]  # a reload leaves the scheduler be
    assert "restarted dask-worker-01" in result.stdout


# a stop --------------------------------------------------------------------------------------------------

def test_a_stop_answers_the_job_in_flight_and_stops_the_parts_in_order(private_dask_fleet):
    """`make stop` stops the parts a tier at a time: the job runner first (and its job processes,
    which it would otherwise start again), then in supervisord's shutdown order: nginx, the fast
    instances, the upstream service they call, the slow instances (which drain: their jobs still need the cluster), the Dask
    workers, the scheduler. A job accepted before the stop is answered."""
    fleet = private_dask_fleet()
    with ThreadPoolExecutor(1) as pool:
        before = last_spinner(fleet.run_dir)
        job = pool.submit(fleet.get, "/slow/spin_and_tell/1.5")
        spinner_pid(fleet.run_dir, before)  # the job runs on the cluster
        fleet.command("stop")
        assert job.result().status == 200, job.result().body
    log = (fleet.run_dir / "logs" / "supervisord.log").read_text()
    stopped = re.findall(r"INFO stopped: (\S+) \(", log)
    tier = {"runner": 0, "nginx": 1, "fast": 2, "upstream": 2.5, "slow": 3, "dask-worker": 4, "dask-scheduler": 5}
    tiers = [tier[next(prefix for prefix in sorted(tier, key=len, reverse=True) if name.startswith(prefix))]
             for name in stopped]
    assert tiers == sorted(tiers) and set(tiers) == set(tier.values()), stopped
