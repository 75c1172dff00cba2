"""`make chaos`: break the running fleet in every way we promise to survive, under a steady load.

    python -m drills.chaos            # against the fleet of .run/ (or $FLEET_RUN_DIR)
    python -m drills.chaos --only kill-fast,reload

Each scenario starts a steady mixed load through the edge (drills/loadgen.py), produces one fault
for real, waits until the fleet is whole again, and counts every request's outcome. The promise:
no fast request fails, and the only slow requests that fail are those the fault itself hit, each
answered with the contract's JSON error. Exit code 1 if a scenario breaks it.

Columns: sent (requests during the scenario), failed (errors the fault could not explain: must be
0), hit by the fault (requests in flight on the killed process, answered with JSON errors), lost
(no answer, or an answer without the contract's JSON: must be 0), reload races (POSTs a client
sent on a kept-alive connection in the instant an nginx reload closed it: nginx 1.22 closes idle
client connections when it reloads; counted apart, never hidden, and only within a reload's
window; elsewhere such an outcome is lost), recovered in (from the fault until every process
runs, every instance answers /healthz and every pool is full).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import string
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from deploy import apply, fleet, render
from drills.loadgen import Route, SteadyLoad, Tally
from deploy.procs import children_of
from services.common.settings import Settings, SettingsError, heavy_capacity, load, resolve

# Seconds of load before the fault and after recovery: longer than nginx's fail_timeout, so errors
# of a scenario's aftermath are counted in that scenario, never in the next one.
SETTLE = render.FAIL_TIMEOUT_SECONDS + 0.5


@dataclass
class Result:
    scenario: str
    tally: Tally
    recovered_in: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.tally.failed == 0 and self.tally.lost == 0


def pid_of(settings: Settings, name: str) -> int:
    return fleet.process_info(settings, name)["pid"]


def slow_health(settings: Settings, port: int) -> dict:
    return fleet.get_json(f"http://127.0.0.1:{port}/healthz", timeout=2)[1]


def wait_whole(settings: Settings, timeout: float = 60) -> None:
    """Every process RUNNING, every instance healthy, every slow pool at full strength."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            infos = fleet.process_infos(settings)
            running = all(p["statename"] == "RUNNING" for p in infos if not p["name"].endswith("-spare"))
            fleet.wait_healthy(settings, timeout=0.5)
            pools = [slow_health(settings, port)["pool"] for _, port in settings.instances("slow")]
            whole = all(p["workers"] == heavy_capacity(settings.values) for p in pools)
            if settings.slow.backend == "dask":  # and the whole cluster back, every worker joined
                whole = whole and all(p["cluster"]["threads"] == settings.dask.workers * settings.dask.threads_per_worker
                                      for p in pools)
            if running and whole:
                return
        except (OSError, fleet.FleetError, KeyError, ValueError):
            pass
        time.sleep(0.05)
    raise fleet.FleetError(f"the fleet was not whole again within {timeout:.0f} s")


def survivors(pids: list[int], within: float) -> list[int]:
    """Wait up to `within` seconds for `pids` to exit; return those still running."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(fleet.alive(p) for p in pids):
        time.sleep(0.02)
    return [p for p in pids if fleet.alive(p)]


def busy_worker(settings: Settings, port: int) -> int | None:
    """A process running a job now (state R): a local worker, or a Dask worker's job process."""
    if settings.slow.backend == "dask":
        candidates = [pid for p in fleet.process_infos(settings) if p["name"].startswith("dask-worker-")
                      for pid in descendants(p["pid"])]
    else:
        candidates = slow_health(settings, port)["pool"]["pids"]
    for pid in candidates:
        if state(pid) == "R":
            return pid
    return None


def state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "-"


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        children = children_of(todo.pop())
        found += children
        todo += children
    return found


TARGET_JOB = Route("slow GET /slow/fib/30 (target)", "slow", "GET", "/slow/fib/30", rate=1)


# scenarios: each produces its fault and returns a note; run() times the recovery ----------------

def drain_fast(settings: Settings, load: SteadyLoad) -> str:
    name = settings.instances("fast")[0][0]
    os.kill(pid_of(settings, name), signal.SIGTERM)  # supervisor restarts it once it has drained
    return f"SIGTERM to {name}"


def kill_fast(settings: Settings, load: SteadyLoad) -> str:
    name = settings.instances("fast")[0][0]
    os.kill(pid_of(settings, name), signal.SIGKILL)
    return f"kill -9 {name}"


def kill_slow_worker(settings: Settings, load: SteadyLoad) -> str:
    port = settings.instances("slow")[0][1]
    for _ in range(50):
        load.send_in_background(TARGET_JOB)  # ~0.2 s: caught running; the fault decides its outcome
        time.sleep(0.05)
        pid = busy_worker(settings, port)
        if pid:
            os.kill(pid, signal.SIGKILL)
            return f"kill -9 worker {pid} during a job"
    raise fleet.FleetError("no busy worker to kill")


def kill_slow_instance(settings: Settings, load: SteadyLoad) -> str:
    name, port = settings.instances("slow")[0]
    load.send_in_background(TARGET_JOB)  # ~0.2 s: caught running; the fault decides its outcome
    time.sleep(0.1)
    workers = slow_health(settings, port)["pool"].get("pids", [])  # a Dask cluster is not the instance's
    os.kill(pid_of(settings, name), signal.SIGKILL)
    left = survivors(workers, within=5)
    if left:
        raise fleet.FleetError(f"workers {left} outlived their instance {name}")
    return f"kill -9 {name}" + (f"; its {len(workers)} workers died with it" if workers else "")


def kill_dask_worker(settings: Settings, load: SteadyLoad) -> str:
    """kill -9 of a whole Dask worker process while it runs a job: that job 502, nothing else."""
    for _ in range(50):
        load.send_in_background(TARGET_JOB)
        time.sleep(0.05)
        for p in fleet.process_infos(settings):
            if p["name"].startswith("dask-worker-") and any(state(c) == "R" for c in descendants(p["pid"])):
                os.kill(p["pid"], signal.SIGKILL)
                return f"kill -9 {p['name']} (pid {p['pid']}) during a job; supervisor starts it again"
    raise fleet.FleetError("no busy Dask worker to kill")


def kill_dask_scheduler(settings: Settings, load: SteadyLoad) -> str:
    """kill -9 of the scheduler: jobs in flight and jobs sent before it is back get 503 at once."""
    load.send_in_background(TARGET_JOB)
    time.sleep(0.1)
    os.kill(pid_of(settings, "dask-scheduler"), signal.SIGKILL)
    return "kill -9 dask-scheduler; workers and the instances' clients rejoin it when supervisor restarts it"


def kill_nginx_master(settings: Settings, load: SteadyLoad) -> str:
    master = int((settings.run_dir / "nginx" / "nginx.pid").read_text())
    workers = fleet.worker_pids(master)
    os.kill(master, signal.SIGKILL)
    stale = survivors(workers, within=15)  # they finish their requests first
    if stale:
        raise fleet.FleetError(f"stale nginx workers {stale} still running")
    return f"kill -9 nginx master {master}; old workers gone"


def departed_clients(settings: Settings, load: SteadyLoad) -> str:
    port = settings.instances("slow")[0][1]
    before = slow_health(settings, port)["pool"]["cancelled"]
    for n in (33, 34, 35):  # distinct jobs: an identical one would join the last one's (compute once)
        with socket.create_connection(("127.0.0.1", settings.edge.port)) as s:
            s.sendall(f"GET /slow/fib/{n} HTTP/1.1\r\nHost: chaos\r\n\r\n".encode())
            time.sleep(0.2)  # the job is running now; hang up
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and slow_health(settings, port)["pool"]["cancelled"] < before + 3:
        time.sleep(0.05)
    killed = slow_health(settings, port)["pool"]["cancelled"] - before
    if killed < 3:
        raise fleet.FleetError(f"only {killed} of 3 abandoned jobs had their worker killed")
    return "3 clients hung up mid-job; " + ("3 jobs' processes killed" if settings.slow.backend == "dask"
                                             else "3 workers killed and replaced")


def rolling_reload(settings: Settings, load: SteadyLoad) -> str:
    before = {p["name"]: p["pid"] for p in fleet.process_infos(settings)}
    fleet.rolling_restart(settings)
    after = {p["name"]: p["pid"] for p in fleet.process_infos(settings)}
    # nginx reloads only a changed config; the Dask scheduler holds no code of the fleet's.
    same = [n for n in before if n not in ("nginx", "dask-scheduler") and not n.endswith("-spare")
            and before[n] == after[n]]
    if same:
        raise fleet.FleetError(f"not restarted: {same}")
    return "every instance restarted, one at a time"


def settings_change(settings: Settings, load: SteadyLoad) -> str:
    """A change supervisord.conf carries (one more fast instance, a longer drain), applied, then undone."""
    values = {**settings.values, "fast.instances": settings.fast.instances + 1,
              "fast.drain_timeout": settings.fast.drain_timeout + 1}
    changed = Settings(resolve(values, env={}, origin="chaos settings-change"), settings.run_dir)
    fleet.apply_changes(changed)
    fleet.wait_healthy(changed)
    fleet.apply_changes(settings)
    return (f"fast.instances {settings.fast.instances}->{changed.fast.instances}->{settings.fast.instances}, "
            f"fast.drain_timeout +1 and back, each applied live")


def raw_client(settings: Settings, source: str, timeout: float = 10) -> socket.socket:
    """A connection to the edge from one local address: a client of its own."""
    return socket.create_connection(("127.0.0.1", settings.edge.port), timeout=timeout, source_address=(source, 0))


def answer(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Read one HTTP answer (the edge always sends Content-Length): status, headers, body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before an answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body[:length]


def contract_json(body: bytes) -> bool:
    try:
        return {"error", "message", "request_id"} <= set(json.loads(body))
    except ValueError:
        return False


def abort_storm(settings: Settings, load: SteadyLoad, rate: float = 50, seconds: float = 5) -> str:
    """One client starts heavy jobs and hangs up on each 20 ms later, `rate` times a second."""
    port = settings.instances("slow")[0][1]
    before = slow_health(settings, port)["pool"]
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            samples.append(slow_health(settings, port)["pool"]["workers"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    sent, open_ones = 0, []  # (hang-up time, socket)
    next_send = start = time.monotonic()
    while next_send < start + seconds or open_ones:
        now = time.monotonic()
        for due in [o for o in open_ones if o[0] <= now]:
            due[1].close()  # hang up before the answer: nginx closes its side, the instance sees it
            open_ones.remove(due)
        if next_send < start + seconds and now >= next_send:
            sock = raw_client(settings, "127.0.0.2")
            sock.sendall(b"GET /slow/fib/30 HTTP/1.1\r\nHost: storm\r\n\r\n")
            open_ones.append((now + 0.02, sock))
            sent += 1
            next_send += 1 / rate
        time.sleep(0.002)
    stop.set()
    sampler.join()
    after = slow_health(settings, port)["pool"]
    kills = after["cancelled"] - before["cancelled"]
    w = settings.slow.workers
    full = sum(n == w for n in samples)
    # The budget: at most 2W at once, then W every 5 s, one at a time, so never fewer than W - 1.
    if not samples or min(samples) < w - 1 or kills > 2 * w + w * seconds / 5 + 1:
        raise fleet.FleetError(f"the storm cost too much: {kills} workers killed, workers sampled "
                               f"{sorted(set(samples))} (at {w} in {full} of {len(samples)} samples)")
    return (f"{sent} jobs abandoned by one client in {seconds:g} s: {kills} workers killed, never fewer "
            f"than {min(samples)} of {w} (all {w} in {full} of {len(samples)} samples)")


def monopolist(settings: Settings, load: SteadyLoad, clients: int = 20, seconds: float = 6) -> str:
    """One client keeps `clients` heavy requests open at once: it gets its share, the rest 429."""
    statuses: list[int] = []
    bad: list[str] = []
    end = time.monotonic() + seconds

    def hog() -> None:
        while time.monotonic() < end:
            try:
                with raw_client(settings, "127.0.0.3", timeout=30) as sock:
                    sock.sendall(b"GET /slow/sleep/1 HTTP/1.1\r\nHost: hog\r\n\r\n")
                    status, _, body = answer(sock)
            except OSError as exc:
                bad.append(f"no answer: {exc}")
                continue
            statuses.append(status)
            if status != 200 and not contract_json(body):
                bad.append(f"{status} without the contract's JSON")
            if status == 429:
                time.sleep(0.2)  # as told by Retry-After, roughly

    threads = [threading.Thread(target=hog, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if bad:
        raise fleet.FleetError(f"the monopolising client got {len(bad)} bad answers, e.g. {bad[0]}")
    served, limited = statuses.count(200), statuses.count(429)
    if not limited:
        raise fleet.FleetError("the monopolising client was never limited")
    return f"one client with {clients} concurrent heavy requests: {served} served, {limited} refused 429"


def unknown_methods(settings: Settings, load: SteadyLoad, count: int = 2000) -> str:
    """A flood of made-up methods: every one answered 405 JSON by the edge; no instance sees one."""
    ports = [port for _, port in settings.instances("fast")]
    series = {port: _series(port) for port in ports}
    bad: list[str] = []

    def flood(share: int) -> None:
        with raw_client(settings, "127.0.0.4") as sock:
            for i in range(share):
                method = "".join(random.choices(string.ascii_uppercase, k=8))
                sock.sendall(f"{method} /fast HTTP/1.1\r\nHost: flood\r\n\r\n".encode())
                status, headers, body = answer(sock)
                if status != 405 or headers.get("x-served-by") != "edge" or not contract_json(body):
                    bad.append(f"{method}: {status} from {headers.get('x-served-by')}")

    threads = [threading.Thread(target=flood, args=(count // 4,), daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    foreign = {port: [line for line in _series(port) - series[port] if "method=" in line and not
                      any(f'method="{m}"' in line for m in ("GET", "POST", "HEAD"))] for port in ports}
    if bad or any(foreign.values()):
        raise fleet.FleetError(f"bad answers {bad[:3]}; metric series of other methods {foreign}")
    return f"{count} requests with made-up methods: all 405 JSON from the edge; no new metric series"


def _series(port: int) -> set[str]:
    from urllib.request import urlopen

    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return {line.split(" ")[0] for line in response.read().decode().splitlines()
                if line.startswith("fleet_http_request_duration_seconds_count")}


# name: (fault, what it may reach). A killed process takes the requests it was serving with it:
# its jobs, and a POST in flight on a fast instance (nginx resends GETs, never a POST).
SCENARIOS: dict[str, tuple[Callable[[Settings, SteadyLoad], str], frozenset[str]]] = {
    "drain-fast": (drain_fast, frozenset()),
    "kill-fast": (kill_fast, frozenset({"fast POST"})),
    "kill-slow-worker": (kill_slow_worker, frozenset({"slow"})),
    "kill-slow": (kill_slow_instance, frozenset({"slow"})),
    "kill-nginx": (kill_nginx_master, frozenset()),
    "departed-clients": (departed_clients, frozenset()),
    "reload": (rolling_reload, frozenset()),
    "settings-change": (settings_change, frozenset()),
    "abort-storm": (abort_storm, frozenset()),
    "monopolist": (monopolist, frozenset()),
    "unknown-methods": (unknown_methods, frozenset()),
}
# Faults of the managed Dask cluster (slow.backend = "dask"): a job on the killed process, or in
# flight while the scheduler is away, is hit (502 / 503 backend_unavailable, JSON).
DASK_SCENARIOS: dict[str, tuple[Callable[[Settings, SteadyLoad], str], frozenset[str]]] = {
    "kill-dask-worker": (kill_dask_worker, frozenset({"slow"})),
    "kill-dask-scheduler": (kill_dask_scheduler, frozenset({"slow"})),
}
# Local-pool faults that a Dask fleet has no counterpart of (its workers are the cluster's).
LOCAL_ONLY = ("abort-storm",)


def scenarios_for(settings: Settings) -> dict:
    if settings.slow.backend == "dask":
        managed = settings.dask.scheduler == "managed"
        return {**{n: v for n, v in SCENARIOS.items() if n not in LOCAL_ONLY}, **(DASK_SCENARIOS if managed else {})}
    return SCENARIOS


def run(settings: Settings, name: str) -> Result:
    wait_whole(settings)
    with SteadyLoad("127.0.0.1", settings.edge.port) as load:
        time.sleep(SETTLE)
        fault = time.monotonic()
        fault_fn, may_hit = scenarios_for(settings)[name]
        reloads_before = len(apply.RELOADS)
        note = fault_fn(settings, load)
        wait_whole(settings)
        recovered = time.monotonic() - fault
        time.sleep(SETTLE)
    return Result(name, Tally.of(load.outcomes, may_hit, apply.RELOADS[reloads_before:]), recovered, note)


def print_table(results: list[Result]) -> None:
    header = (f"{'scenario':<18} {'sent':>6} {'failed':>7} {'hit by the fault (JSON)':>24} {'lost':>5} "
              f"{'reload races':>13} {'recovered in (s)':>17}  what happened")
    print(header)
    print("-" * len(header))
    for r in results:
        t = r.tally
        print(f"{r.scenario:<18} {t.sent:>6} {t.failed:>7} {t.hit:>24} {t.lost:>5} {t.reload_races:>13} "
              f"{r.recovered_in:>17.2f}  {r.note}")
        for example in t.examples if not r.passed or t.reload_races else []:
            print(f"{'':<18} {example}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drills.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated scenarios, of: "
                        f"{', '.join(SCENARIOS)}; on a Dask fleet also {', '.join(DASK_SCENARIOS)}")
    options = parser.parse_args(argv)
    try:
        settings = load()
        if (settings.run_dir / "settings.json").exists():  # the fleet as it was deployed
            settings = Settings.from_snapshot(settings.run_dir / "settings.json")
        if not fleet.supervisord_pid(settings):
            raise fleet.FleetError(f"no fleet running in {settings.run_dir}: run make deploy-local first")
        known = scenarios_for(settings)
        names = options.only.split(",") if options.only else list(known)
        unknown = [n for n in names if n not in known]
        if unknown:
            parser.error(f"unknown scenario {unknown[0]} for this fleet; known: {', '.join(known)}")
        results = []
        for name in names:
            print(f"running {name} ...", flush=True)
            results.append(run(settings, name))
    except (SettingsError, fleet.FleetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print()
    print_table(results)
    failed = [r.scenario for r in results if not r.passed]
    print("\n" + (f"FAILED: {', '.join(failed)}" if failed else
                  "every scenario: no request failed or was lost; only requests the fault itself hit got (JSON) errors"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
