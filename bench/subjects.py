"""The configurations under test. Each is started and stopped by the bench, and knows its processes.

    naive  one Tornado process computing the heavy task in its handler  (bench/naive_server.py)
    pool   one Tornado process with a ProcessPoolExecutor, no nginx      (bench/pool_server.py)
    fleet  this project through nginx, deploy/fleet.toml defaults, in a temp run dir on free ports
    fleet-dask  the same with slow.backend = "dask": a managed cluster of W Dask workers
    edge   nginx answering /fast itself, the ceiling of the edge path     (bench/edge.py)
    floor  nginx -> one Tornado "Hello!", spinning burners for a flood     (bench/floor.py)
    jobs   long jobs: the fleet with the bench's own tasks, its own phases (bench/jobs.py)
    peers  what users would run instead, from bench/peers/.venv           (bench/peers/)
           fastapi, gunicorn-sync, gunicorn-sync-2w, gunicorn-dirty, gunicorn-dirty-nice,
           tornado-dask
    <peer>+nginx  the same peer behind the same nginx edge as the floor's (bench/edge.py), every
           path passed: as users deploy them, and like with like beside the fleet's own edge

`pool`, `fleet` and `fleet-dask` also exist with one heavy worker (workers=1), for the parallel
efficiency.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import edge, procs
from services.common.settings import load

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_TIMEOUT = 60  # seconds a configuration may take to answer /healthz

PEER_BIN = REPO / "bench" / "peers" / ".venv" / "bin"
PEERS = ("fastapi", "gunicorn-sync", "gunicorn-sync-2w", "gunicorn-dirty", "gunicorn-dirty-nice", "tornado-dask")
BEHIND_NGINX = "+nginx"
PEERS_BEHIND_NGINX = tuple(peer + BEHIND_NGINX for peer in PEERS)
CONFIGS = ("naive", "pool", *PEERS, *PEERS_BEHIND_NGINX, "fleet", "fleet-dask", "floor", "edge", "jobs")
DESCRIPTIONS = {
    "naive": "one Tornado process, fib computed in the handler",
    "pool": "one Tornado process + ProcessPoolExecutor (W workers, not niced), no nginx",
    "fastapi": "gunicorn + uvicorn workers (one per core) + FastAPI, fib in a ProcessPoolExecutor per worker",
    "gunicorn-sync": "gunicorn sync workers (W+1), fib computed in the request",
    "gunicorn-sync-2w": "gunicorn sync workers (2W+1), fib computed in the request",
    "gunicorn-dirty": "gunicorn gthread (one worker per core, 8 threads) + W dirty arbiter workers for fib",
    "gunicorn-dirty-nice": "the same, dirty workers niced and in the idle cgroup as the fleet's (dirty_worker_init hook)",
    "tornado-dask": "source document 000: Tornado + Dask Client(asynchronous=True), local cluster, pure=False",
    **{peer + BEHIND_NGINX: "the same behind nginx (bench/edge.py: the floor's edge, every path passed)"
       for peer in PEERS},
    "floor": "nginx -> one Tornado Hello; flood = W burners spinning at the fleet's worker priority",
    "fleet": "this project: nginx + fast and slow instances + worker pool, fleet.toml defaults",
    "fleet-dask": "this project with slow.backend = dask: jobs on a managed Dask cluster of W workers",
    "edge": "nginx answering /fast itself (return 200): the edge path's ceiling",
    "jobs": "long jobs (issue 26): this project with the bench's own tasks and jobs.result_ttl = 60, bench/jobs.py",
}


def clean_env() -> dict[str, str]:
    """The environment without FLEET_* overrides: every configuration runs on defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}


class Subject:
    name: str
    workers: int | None = None  # processes that compute heavy jobs in parallel (None: no heavy route)
    port: int = 0

    def __init__(self, workdir: Path):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / f"{self.name}.log"
        self.popen: subprocess.Popen | None = None

    @property
    def has_slow(self) -> bool:
        return self.workers is not None

    def start(self) -> None:
        raise NotImplementedError

    def processes(self) -> list[int]:
        """Every process of this configuration alive now."""
        return procs.tree(self.popen.pid) if self.popen is not None else []

    def stop(self) -> int:
        """Stop every process; returns how many had to be SIGKILLed."""
        if self.popen is None:
            return 0
        killed = procs.stop(procs.identify(self.processes()), grace=10)
        procs.reap(self.popen)
        return len(killed)

    def _spawn(self, cmd: list[str]) -> None:
        self.popen = procs.spawn(cmd, self.log, env=clean_env(), cwd=REPO)
        procs.wait_http(f"http://{HOST}:{self.port}/healthz", START_TIMEOUT, self.popen, self.log)


def default_workers() -> int:
    return load(env={}).slow.workers


class Naive(Subject):
    name = "naive"
    workers = 1  # the event loop itself

    def start(self) -> None:
        self.port = procs.free_port_block(1)
        self._spawn([sys.executable, "-m", "bench.naive_server", "--port", str(self.port)])


class Pool(Subject):
    name = "pool"

    def __init__(self, workdir: Path, workers: int | None = None, nice: int = 0):
        self.workers = workers or default_workers()
        self.nice = nice
        super().__init__(workdir)

    def start(self) -> None:
        self.port = procs.free_port_block(1)
        self._spawn([sys.executable, "-m", "bench.pool_server", "--port", str(self.port),
                     "--workers", str(self.workers), "--nice", str(self.nice)])


class Edge(Subject):
    name = "edge"
    workers = None

    def start(self) -> None:
        self.port = procs.free_port_block(1)
        edge.render(self.workdir, self.port)
        self.popen = procs.spawn(edge.command(self.workdir), self.log, env=clean_env(), cwd=self.workdir)
        procs.wait_http(f"http://{HOST}:{self.port}/healthz", START_TIMEOUT, self.popen, self.log)

    def stop(self) -> int:
        if self.popen is None:
            return 0
        # QUIT: nginx's graceful stop.
        killed = procs.stop(procs.identify(self.processes()), first=signal.SIGQUIT, grace=10)
        procs.reap(self.popen)
        return len(killed)


class Fleet(Subject):
    """The project itself, started and stopped with the same commands a user runs."""

    name = "fleet"

    def __init__(self, workdir: Path, workers: int | None = None, overrides: dict[str, str] | None = None,
                 name: str = "fleet"):
        self.name = name
        self.run_dir = workdir / "run"
        planned = load(env=overrides or {})  # instance counts may be overridden (--fleet-env)
        fast, slow = planned.fast.instances, planned.slow.instances
        # edge on base; fast's spare on base+1, fast-01.. after it; slow's spare, then slow-01..
        upstreams = planned.upstream.instances
        # ... and the job runner's, and the upstream service's replicas
        base = procs.free_port_block(1 + (fast + 1) + (slow + 1) + 2 + upstreams)
        self.env = clean_env()
        # The flood repeats one request; coalesced, it would measure one job per distinct request
        # in flight, not the pool. Peers do not coalesce either (the hot-key scenario turns it on).
        self.env["FLEET_SLOW_COALESCE"] = "false"
        # The fast probe (up to thousands of GET /fast a second) and wrk's saturation run are each
        # one client address (wrk cannot bind others); the fast routes' per-client limits would
        # measure the edge's 429s, not the fleet's capacity. No peer has such limits; the limits'
        # own figures are make chaos's (hostile-fast-client) and the README's.
        self.env.update(FLEET_EDGE_FAST_RATE_PER_SECOND="100000", FLEET_EDGE_FAST_RATE_BURST="100000",
                        FLEET_EDGE_FAST_CONN_PER_CLIENT="65535")
        self.env.update(overrides or {})  # --fleet-env: a lever under test, never by default
        self.env.update(
            FLEET_RUN_DIR=str(self.run_dir),
            FLEET_EDGE_PORT=str(base),
            FLEET_FAST_BASE_PORT=str(base + 1),
            FLEET_SLOW_BASE_PORT=str(base + fast + 2),
            FLEET_RUNNER_BASE_PORT=str(base + fast + slow + 3),  # runner-01 on base + fast + slow + 4
            FLEET_UPSTREAM_BASE_PORT=str(base + fast + slow + 4),  # upstream-01 on base + fast + slow + 5
        )
        dask = self.env.get("FLEET_SLOW_BACKEND") == "dask"
        if dask:  # the cluster's scheduler, dashboard and a port pair per worker
            workers_planned = workers or load(env=self.env).dask.workers
            ports = procs.free_port_block(2 + 2 * workers_planned)
            self.env.update(FLEET_DASK_SCHEDULER_PORT=str(ports), FLEET_DASK_DASHBOARD_PORT=str(ports + 1),
                            FLEET_DASK_WORKER_BASE_PORT=str(ports + 1))
        if workers is not None:
            self.env["FLEET_DASK_WORKERS" if dask else "FLEET_SLOW_WORKERS"] = str(workers)
        self.settings = load(env=self.env)
        self.workers = (self.settings.dask.workers * self.settings.dask.threads_per_worker if dask
                        else self.settings.slow.workers)
        self.port = base
        self._supervisord: procs.Proc | None = None
        self._started = False
        super().__init__(workdir)

    def _fleet(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "deploy.fleet", command], cwd=REPO, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        with open(self.log, "a") as log:
            log.write(f"$ deploy.fleet {command} -> {result.returncode}\n{result.stdout}{result.stderr}\n")
        return result

    def start(self) -> None:
        self._started = True  # from here on, stop() has something to clean up, even if `up` fails
        result = self._fleet("up", timeout=120)
        self._remember_supervisord()
        if result.returncode != 0:
            raise RuntimeError(f"deploy.fleet up failed:\n{result.stdout}\n{result.stderr}")
        procs.wait_http(f"http://{HOST}:{self.port}/healthz", START_TIMEOUT)

    def _remember_supervisord(self) -> None:
        try:
            pid = int((self.run_dir / "supervisord.pid").read_text().strip())
        except (OSError, ValueError):
            return
        found = procs.identify([pid])
        self._supervisord = found[0] if found else None

    def processes(self) -> list[int]:
        from deploy.fleet import processes_of

        # processes_of finds processes by an environment marker; nginx overwrites its environment
        # area with its process title, so its processes are found as supervisord's descendants.
        pids = set(processes_of(self.run_dir))
        if self._supervisord is not None and procs.alive(self._supervisord):
            pids.update(procs.tree(self._supervisord[0]))
        return sorted(pids)

    def stop(self) -> int:
        if not self._started:
            return 0
        before = procs.identify(self.processes())
        try:
            self._fleet("stop", timeout=90)
        except subprocess.TimeoutExpired:
            pass
        # `stop` checks for leftovers itself; this is the bench's own guarantee, by pid.
        leftovers = [p for p in before if procs.alive(p)]
        if leftovers:
            procs.stop(leftovers, first=signal.SIGKILL, grace=0)
        return len(leftovers)


class Peer(Subject):
    """A peer from bench/peers/, run from its own environment (bench/bootstrap.sh builds it)."""

    def __init__(self, workdir: Path, name: str):
        self.name = name
        w = default_workers()
        cores = os.cpu_count() or 1
        # Processes computing heavy jobs in parallel: what the peer's own defaults give.
        self.workers = {"fastapi": cores * cores, "gunicorn-sync": w + 1, "gunicorn-sync-2w": 2 * w + 1,
                        "tornado-dask": cores}.get(name, w)
        super().__init__(workdir)

    def command(self) -> list[str]:
        w, cores = default_workers(), os.cpu_count() or 1
        gunicorn = [str(PEER_BIN / "gunicorn"), "--bind", f"{HOST}:{self.port}",
                    "--no-control-socket"]  # no control socket left in $HOME or the working directory
        dirty = ["--worker-class", "gthread", "--workers", str(cores), "--threads", "8",
                 "--dirty-app", "bench.peers.wsgi_app:FibApp", "--dirty-workers", str(w)]
        return {
            "fastapi": [*gunicorn, "--worker-class", "uvicorn_worker.UvicornWorker", "--workers", str(cores),
                        "bench.peers.asgi_pool:app"],
            "gunicorn-sync": [*gunicorn, "--workers", str(w + 1), "bench.peers.wsgi_app:app"],
            "gunicorn-sync-2w": [*gunicorn, "--workers", str(2 * w + 1), "bench.peers.wsgi_app:app"],
            "gunicorn-dirty": [*gunicorn, *dirty, "bench.peers.wsgi_app:dirty_app"],
            "gunicorn-dirty-nice": [*gunicorn, "--config", "python:bench.peers.dirty_nice", *dirty,
                                    "bench.peers.wsgi_app:dirty_app"],
            "tornado-dask": [str(PEER_BIN / "python"), "-m", "bench.peers.tornado_dask", "--port", str(self.port)],
        }[self.name]

    def start(self) -> None:
        if not (PEER_BIN / "python").exists():
            raise RuntimeError(f"{PEER_BIN.parent} is missing: run `make bench` (bench/bootstrap.sh builds it)")
        self.port = procs.free_port_block(1)
        slow = load(env={}).slow
        env = {**clean_env(), "PYTHONPATH": str(REPO), "PEER_NICE": str(slow.nice),
               "PEER_IDLE_CGROUP": f"bench-peer-{os.getpid()}" if slow.idle_cgroup else "",
               "PEER_CGROUP_RECORD": str(self.workdir)}
        self.popen = procs.spawn(self.command(), self.log, env=env, cwd=REPO)
        procs.wait_http(f"http://{HOST}:{self.port}/healthz", START_TIMEOUT, self.popen, self.log)

    def stop(self) -> int:
        """The server's own graceful stop (SIGTERM to its master); then a second for the rest of
        its processes, and SIGKILL for any left. fastapi's pool processes are: forked by a uvicorn
        worker, they inherit its SIGTERM handler (which only sets a flag) and its listening socket,
        and outlive gunicorn's stop holding the port (measured; counted in the results' notes)."""
        if self.popen is None:
            return 0
        family = procs.identify(self.processes())
        killed = procs.stop(family[:1], grace=10)
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline and any(procs.alive(p) for p in family[1:]):
            time.sleep(0.05)
        left = [p for p in family[1:] if procs.alive(p)]
        if left:
            killed += procs.stop(left, first=signal.SIGKILL, grace=0)
        procs.reap(self.popen)
        from services.slow import cpu_priority  # the niced dirty workers' group, once they are gone
        cpu_priority.remove_recorded(self.workdir / cpu_priority.RECORD)
        return len(killed)


class PeerBehindNginx(Subject):
    """A peer as users deploy it: nginx in front (bench/edge.py, the same edge as the floor's, with
    the fleet's worker count, keep-alive to the upstream and buffered access log), every path
    passed to the peer. Its processes are the peer's and nginx's: the CPU and memory figures
    count both, as the fleet's count its own nginx."""

    def __init__(self, workdir: Path, peer: str):
        self.name = peer + BEHIND_NGINX
        self.peer = Peer(workdir / "peer", peer)
        self.workers = self.peer.workers
        super().__init__(workdir)

    def start(self) -> None:
        self.peer.start()
        self.port = procs.free_port_block(1)
        edge.render(self.workdir, self.port, self.peer.port, every_path=True)
        self.popen = procs.spawn(edge.command(self.workdir), self.log, env=clean_env(), cwd=self.workdir)
        procs.wait_http(f"http://{HOST}:{self.port}/healthz", START_TIMEOUT, self.popen, self.log)

    def processes(self) -> list[int]:
        return [*self.peer.processes(), *super().processes()]

    def stop(self) -> int:
        killed = 0
        try:
            if self.popen is not None:  # QUIT: nginx's graceful stop
                killed += len(procs.stop(procs.identify(procs.tree(self.popen.pid)), first=signal.SIGQUIT, grace=10))
                procs.reap(self.popen)
        finally:
            killed += self.peer.stop()  # whatever happened to nginx
        return killed


class Floor(Subject):
    """nginx -> one Tornado "Hello!" (bench/floor.py); the flood phase runs W burners instead."""

    name = "floor"
    workers = None  # no heavy route: the burners stand in for the flood

    def __init__(self, workdir: Path, instances: int = 1):
        super().__init__(workdir)
        self.instances: list[subprocess.Popen] = []
        self.count = instances  # bench/request_cost.py compares as many as the fleet's fast instances
        self.burner_count = default_workers()
        self._burners = None  # bench.floor.Burners, once the flood phase made them

    def start(self) -> None:
        base = procs.free_port_block(1 + self.count)
        self.port, instance_port = base, base + 1
        for k in range(self.count):
            self.instances.append(procs.spawn(
                [sys.executable, "-m", "bench.naive_server", "--port", str(instance_port + k), "--loop", "uvloop",
                 "--role", "floor"], self.log, env=clean_env(), cwd=REPO))
            procs.wait_http(f"http://{HOST}:{instance_port + k}/healthz", START_TIMEOUT, self.instances[-1], self.log)
        edge.render(self.workdir, self.port, instance_port, instances=self.count)
        self.popen = procs.spawn(edge.command(self.workdir), self.log, env=clean_env(), cwd=self.workdir)
        procs.wait_http(f"http://{HOST}:{self.port}/fast", START_TIMEOUT, self.popen, self.log)

    def burners(self):
        from bench.floor import Burners
        slow = load(env={}).slow
        self._burners = Burners(self.burner_count, slow.nice, slow.idle_cgroup, self.workdir, self.log)
        return self._burners

    def processes(self) -> list[int]:
        burners = self._burners.pids() if self._burners is not None else []
        return [*(pid for instance in self.instances for pid in procs.tree(instance.pid)), *super().processes(),
                *burners]

    def stop(self) -> int:
        killed = 0
        if self.popen is not None:
            killed += len(procs.stop(procs.identify(procs.tree(self.popen.pid)), first=signal.SIGQUIT, grace=10))
            procs.reap(self.popen)
        for instance in self.instances:
            killed += len(procs.stop(procs.identify(procs.tree(instance.pid)), grace=10))
            procs.reap(instance)
        return killed


def make(name: str, workdir: Path, workers: int | None = None, overrides: dict[str, str] | None = None,
         instances: int = 1) -> Subject:
    """A configuration by name; `instances` is the floor's count of Tornado Hellos (1 but in
    bench/request_cost.py)."""
    if name == "naive":
        return Naive(workdir)
    if name == "pool":
        return Pool(workdir, workers)
    if name == "fleet":
        return Fleet(workdir, workers, overrides)
    if name == "fleet-dask":
        return Fleet(workdir, workers, {**(overrides or {}), "FLEET_SLOW_BACKEND": "dask"}, name="fleet-dask")
    if name == "edge":
        return Edge(workdir)
    if name == "floor":
        return Floor(workdir, instances)
    if name in PEERS:
        return Peer(workdir, name)
    if name in PEERS_BEHIND_NGINX:
        return PeerBehindNginx(workdir, name.removesuffix(BEHIND_NGINX))
    raise ValueError(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
