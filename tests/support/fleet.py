"""A private fleet for the integration tier: its settings, its ports, the commands a user runs and
requests to its edge or one of its instances.

Each fleet lives in a temp run dir on free ports, started and stopped with the same commands a
user runs (`python -m deploy.fleet up` / `stop`), so a deployed fleet on the default ports is
never touched. tests/integration/conftest.py makes the fixtures of it.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import free_port_block

REPO = Path(__file__).resolve().parents[2]

# Small numbers make the faults quick to produce: 2 workers, 2 waiting places, a 3 s deadline.
TEST_SETTINGS = {
    "FLEET_SLOW_WORKERS": "2",
    "FLEET_SLOW_QUEUE_LIMIT": "2",
    "FLEET_SLOW_JOB_TIMEOUT": "3",
    "FLEET_SLOW_DRAIN_TIMEOUT": "5",
    "FLEET_SLOW_TASK_MODULES": "services.slow.tasks,tests.support.faulty_tasks",
    "FLEET_EDGE_SLOW_RATE_PER_SECOND": "100000",  # the rate limit has its own test
    "FLEET_EDGE_SLOW_RATE_BURST": "100000",
    "FLEET_SLOW_MAX_PER_CLIENT": "100",  # every test client is 127.0.0.1; the per-client limit has its own tests
    "FLEET_EDGE_FAST_RATE_PER_SECOND": "100000",  # so are the fast routes' (test_fleet.py)
    "FLEET_EDGE_FAST_RATE_BURST": "100000",
    "FLEET_EDGE_FAST_CONN_PER_CLIENT": "10000",
    "FLEET_EDGE_CLIENT_TIMEOUT": "2",  # slow senders are cut off quickly
    "FLEET_OBSERVE_TEST_ROUTES": "true",  # /_test/block/<ms> for the blocked-loop detector
    "FLEET_SLOW_WORKER_MAX_RSS_MB": "256",  # /slow/allocate/<mb> passes it at will
}


# A managed Dask cluster for the tests: two workers of one thread, as the local pool's two workers.
DASK_SETTINGS = {"FLEET_DASK_WORKERS": "2", "FLEET_DASK_THREADS_PER_WORKER": "1"}


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float

    @classmethod
    def read(cls, conn: http.client.HTTPConnection, started: float) -> "Response":
        """The answer to the request just sent on `conn` (headers' names in lower case), read whole."""
        response = conn.getresponse()
        body = response.read()
        return cls(response.status, {k.lower(): v for k, v in response.getheaders()}, body,
                   time.monotonic() - started)

    def json(self) -> dict:
        return json.loads(self.body)


UPSTREAM_ROOM = 4  # upstream replicas a test fleet may have


@dataclass
class Fleet:
    run_dir: Path
    env: dict[str, str]
    edge_port: int
    fast_ports: list[int]
    slow_ports: list[int]
    runner_port: int = 0  # runner-01's /healthz and /metrics
    upstream_ports: list[int] = field(default_factory=list)  # the upstream service's replicas

    @property
    def ports(self) -> list[int]:
        return [self.edge_port, *self.fast_ports, *self.slow_ports]

    def command(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "deploy.fleet", *args], cwd=REPO, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"deploy.fleet {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                port: int | None = None, timeout: float = 30, source: str | None = None) -> Response:
        """One request on a connection of its own; from the client address `source` if given (any
        127.x is this machine)."""
        conn = http.client.HTTPConnection("127.0.0.1", port or self.edge_port, timeout=timeout,
                                          source_address=(source, 0) if source else None)
        started = time.monotonic()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            return Response.read(conn, started)
        finally:
            conn.close()

    def get(self, path: str, **kwargs) -> Response:
        return self.request("GET", path, **kwargs)

    def slow_health(self, number: int = 1) -> dict:
        return self.get("/healthz", port=self.slow_ports[number - 1]).json()

    def slow_health_or_none(self, number: int = 1) -> dict | None:
        """slow_health, or None while nothing listens on the instance's port (it is restarting)."""
        try:
            return self.get("/healthz", port=self.slow_ports[number - 1], timeout=5).json()
        except OSError:
            return None

    def slow_healthy(self, number: int = 1) -> bool:
        """The instance answers /healthz "ok" (not restarting, draining or degraded)."""
        health = self.slow_health_or_none(number)
        return health is not None and health["status"] == "ok"

    def answers(self, path: str = "/fast") -> bool:
        """True once the edge answers `path` with 200; False while nothing listens or it fails."""
        try:
            return self.get(path, timeout=10).status == 200
        except OSError:
            return False

    def process(self, name: str) -> dict:
        """supervisor's view of one process: {"pid": ..., "statename": "RUNNING", ...}."""
        from deploy.fleet import process_info
        from services.common.settings import load

        return process_info(load(env=self.env), name)

    def pid(self, name: str) -> int:
        return self.process(name)["pid"]

    def processes(self) -> list[dict]:
        """supervisor's view of every process of the fleet."""
        from deploy.fleet import process_infos
        from services.common.settings import load

        return process_infos(load(env=self.env))

    def supervisorctl(self, *args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c",
                                 str(self.run_dir / "supervisord.conf"), *args],
                                capture_output=True, text=True, timeout=60)
        return result.stdout

    def edge_headers(self) -> dict[str, str]:
        """What nginx adds to every request it passes on, for a test that speaks to an instance
        as the edge would (only root and the fleet's user can read it)."""
        return {"X-Fleet-Edge": (self.run_dir / "private" / "edge-token").read_text().strip()}

    def log(self, name: str) -> str:
        return (self.run_dir / "logs" / f"{name}.log").read_text(errors="replace")


def make_fleet(run_dir: Path, fast: int = 2, slow: int = 1, **overrides: str) -> Fleet:
    # edge; fast-spare, fast-01..; slow-spare, slow-01..; room for two more of each role (changes);
    # then a managed Dask cluster's (and the fleet's own job store, on the last port): one block, so
    # that the two can never overlap (two random blocks picked one after the other once did, in a
    # run of the whole suite)
    size = 1 + (fast + 3) + (slow + 3) + 2  # ... and the job runner's (runner.base_port + 1)
    size += 1 + UPSTREAM_ROOM  # ... and the upstream service's replicas (upstream.base_port + 1 ..)
    dask_workers = int(overrides.get("FLEET_DASK_WORKERS", DASK_SETTINGS["FLEET_DASK_WORKERS"]))
    dask_size = 2 + 2 * dask_workers + 4  # scheduler, dashboard, a pair per worker, room
    base = free_port_block(size + dask_size)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(TEST_SETTINGS)
    env.update(
        FLEET_RUN_DIR=str(run_dir),
        FLEET_EDGE_PORT=str(base),
        FLEET_FAST_INSTANCES=str(fast),
        FLEET_FAST_BASE_PORT=str(base + 1),  # fast-spare on base+1, fast-01 on base+2
        FLEET_SLOW_INSTANCES=str(slow),
        FLEET_SLOW_BASE_PORT=str(base + fast + 4),
        FLEET_RUNNER_BASE_PORT=str(base + fast + slow + 7),  # runner-01 on base + fast + slow + 8
        FLEET_UPSTREAM_BASE_PORT=str(base + fast + slow + 8),  # upstream-01 on base + fast + slow + 9
    )
    if overrides.get("FLEET_SLOW_BACKEND") == "dask" and "FLEET_DASK_SCHEDULER" not in overrides:
        dask = base + size
        env.update(DASK_SETTINGS, FLEET_DASK_SCHEDULER_PORT=str(dask), FLEET_DASK_DASHBOARD_PORT=str(dask + 1),
                   FLEET_DASK_WORKER_BASE_PORT=str(dask + 1))  # dask-worker-01 on dask+2, its dashboard dask+3
    if overrides.get("FLEET_JOBS_STORE") == "redis" and not overrides.get("FLEET_JOBS_REDIS_URL"):
        env["FLEET_JOBS_REDIS_PORT"] = str(base + size + dask_size - 1)  # the fleet's own store: the block's last
    env.update(overrides)
    return Fleet(
        run_dir=run_dir,
        env=env,
        edge_port=base,
        fast_ports=[base + 1 + i for i in range(1, fast + 1)],
        slow_ports=[base + fast + 4 + i for i in range(1, slow + 1)],
        runner_port=base + fast + slow + 8,
        upstream_ports=[base + fast + slow + 8 + i
                        for i in range(1, int(env.get("FLEET_UPSTREAM_INSTANCES", "2")) + 1)],
    )
