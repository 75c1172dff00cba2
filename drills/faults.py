"""The faults the drills produce for real on a running fleet, and what each may reach.

A fault is a function of (settings, the steady load running meanwhile): it breaks something (kill -9
of a process, a rolling reload, clients that hang up, a burst past the waiting line...), checks
that the fleet reacted as promised (FleetError if not: a worker outlived its instance, a burst was
not shed...) and returns a line saying what happened. `make chaos` (chaos.py) produces each once;
`make soak` (soak.py) produces them in turn for minutes or hours.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import string
import threading
import time
from dataclasses import dataclass
from typing import Callable

from deploy import apply, fleet, render
from drills.loadgen import Route, SteadyLoad
from services.common import metrics_reader, procfs
from services.common.settings import Settings, heavy_capacity, resolve

# Seconds of load before the fault and after recovery: longer than nginx's fail_timeout, so errors
# of a fault's aftermath are counted with that fault, never with the next one.
SETTLE = render.FAIL_TIMEOUT_SECONDS + 0.5


@dataclass(frozen=True)
class Fault:
    """A fault as chaos and soak list it. `may_hit` names the requests it can reach, as Tally counts
    them: "slow" (jobs on a killed worker or instance), "fast POST" (a POST in flight on a killed
    fast instance, which nginx must not resend), "fault" (the soak's own requests of the fault)."""
    name: str
    produce: Callable[[Settings, SteadyLoad], str]
    may_hit: frozenset[str]
    kills_workers: bool = False  # the soak checks the pool's worker count is back within a second


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
    while time.monotonic() < deadline and any(procfs.alive(p) for p in pids):
        time.sleep(0.02)
    return [p for p in pids if procfs.alive(p)]


def busy_worker(settings: Settings, port: int) -> int | None:
    """A process running a job now (state R): a local worker, or a Dask worker's job process."""
    if settings.slow.backend == "dask":
        candidates = [pid for p in fleet.process_infos(settings) if p["name"].startswith("dask-worker-")
                      for pid in procfs.descendants(p["pid"])]
    else:
        candidates = slow_health(settings, port)["pool"]["pids"]
    for pid in candidates:
        if procfs.state(pid) == "R":
            return pid
    return None


TARGET_JOB = Route("slow GET /slow/fib/30 (target)", "slow", "GET", "/slow/fib/30", rate=1)


# the faults: each returns a note of what it did; chaos and soak time the recovery -------------

def drain_fast(settings: Settings, load: SteadyLoad) -> str:
    name = settings.instances("fast")[0][0]
    os.kill(pid_of(settings, name), signal.SIGTERM)  # supervisor restarts it once it has drained
    return f"SIGTERM to {name}"


def kill_fast(settings: Settings, load: SteadyLoad) -> str:
    name = settings.instances("fast")[0][0]
    os.kill(pid_of(settings, name), signal.SIGKILL)
    return f"kill -9 {name}"


def kill_upstream(settings: Settings, load: SteadyLoad) -> str:
    """kill -9 of a replica of the upstream service the fan-out routes call: its calls in flight
    and its kept-alive connections go unanswered, and the fast instances send them to the other
    replica at once; supervisor starts it again."""
    name = settings.instances("upstream")[0][0]
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
            busy = p["name"].startswith("dask-worker-") and any(procfs.state(c) == "R"
                                                                 for c in procfs.descendants(p["pid"]))
            if busy:
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
    workers = procfs.children(master)
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
    load.reloads += fleet.rolling_restart(settings)
    after = {p["name"]: p["pid"] for p in fleet.process_infos(settings)}
    # nginx reloads only a changed config; the Dask scheduler and the job store hold no code of the fleet's.
    same = [n for n in before if n not in apply.NO_SNAPSHOT and not n.endswith("-spare") and before[n] == after[n]]
    if same:
        raise fleet.FleetError(f"not restarted: {same}")
    return "every instance restarted, one at a time"


def reload_with_a_full_line(settings: Settings, load: SteadyLoad) -> str:
    """Every slow instance's running slots and waiting places taken by jobs whose line holds more
    work than a drain allows, then a rolling reload: no admitted job is failed by it. Each is
    answered 200, or at its own deadline (which counts from admission: 504 job_timeout, 503
    queue_timeout), or pushed out for a steady client holding fewer places (503 overloaded); never
    503 shutting_down, a 502 or silence."""
    slots = heavy_capacity(settings.values)
    places = (slots + settings.slow.queue_limit) * settings.slow.instances
    waves = (slots + settings.slow.queue_limit) / slots
    # More work in each line than a drain lasts, each job well within its deadline.
    seconds = min(0.9 * settings.slow.job_timeout,
                  max(settings.slow.drain_timeout + 2, 1.25 * settings.slow.job_timeout) / waves)
    share = settings.slow.max_per_client
    answers: list[tuple[int, str]] = []
    bad: list[str] = []

    def one(address: str, i: int) -> None:
        try:
            with raw_client(settings, address, timeout=2 * settings.slow.job_timeout + 30) as sock:
                sock.sendall(f"GET /slow/sleep/{seconds + i / 1000:.3f} HTTP/1.1\r\nHost: line\r\n\r\n".encode())
                status, _, body = answer(sock)
        except OSError as exc:
            bad.append(f"no answer: {exc}")
            return
        code = "" if status == 200 else json.loads(body).get("error", "?") if contract_json(body) else "not JSON"
        answers.append((status, code))
        if (status, code) not in ((200, ""), (504, "job_timeout"), (503, "queue_timeout"), (503, "overloaded")):
            bad.append(f"{status} {code}")

    threads = [threading.Thread(target=one, args=(f"127.0.0.{40 + i // share}", i), daemon=True)
               for i in range(places)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 15
    full = False
    while time.monotonic() < deadline and not full:
        healths = [slow_health(settings, port) for _, port in settings.instances("slow")]
        full = all(h["running"] == slots and h["waiting"] == settings.slow.queue_limit for h in healths)
        time.sleep(0.05)
    if not full:
        raise fleet.FleetError(f"the slow lines never filled: {healths}")
    restarted = rolling_reload(settings, load)
    for thread in threads:
        thread.join(2 * settings.slow.job_timeout + 30)
    if bad or len(answers) < places:
        open_ = places - len(answers) - sum(b.startswith("no answer") for b in bad)
        raise fleet.FleetError(f"of {places} admitted jobs, {len(bad)} failed by the reload or unanswered, e.g. "
                               f"{bad[:3]}; {open_} still open")
    served = sum(status == 200 for status, _ in answers)
    expired = sum(code in ("job_timeout", "queue_timeout") for _, code in answers)
    pushed = sum(code == "overloaded" for _, code in answers)
    return (f"{places} places taken by {seconds:.1f} s jobs ({waves * seconds:.0f} s of work per line), then "
            f"reloaded: {served} served, {expired} at their own deadline, {pushed} made room for a steady "
            f"client; none failed by the reload. {restarted}")


def settings_change(settings: Settings, load: SteadyLoad) -> str:
    """A change supervisord.conf carries (one more fast instance, a longer drain), applied, then undone."""
    values = {**settings.values, "fast.instances": settings.fast.instances + 1,
              "fast.drain_timeout": settings.fast.drain_timeout + 1}
    changed = Settings(resolve(values, env={}, origin="chaos settings-change"), settings.run_dir)
    load.reloads += fleet.apply_changes(changed)
    fleet.wait_healthy(changed)
    load.reloads += fleet.apply_changes(settings)
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
    foreign = {port: [s for s in _series(port) - series[port] if s[1] not in ("GET", "POST", "HEAD")]
               for port in ports}
    if bad or any(foreign.values()):
        raise fleet.FleetError(f"bad answers {bad[:3]}; metric series of other methods {foreign}")
    return f"{count} requests with made-up methods: all 405 JSON from the edge; no new metric series"


def hostile_fast_client(settings: Settings, load: SteadyLoad, connections: int = 6, seconds: float = 5) -> str:
    """One client posts the largest body /echo takes on `connections` kept-alive connections, back
    to back, and one body past it: what it sends beyond its rate and its requests in flight is
    refused 429 (with Retry-After), the body past the limit 413, each the contract's JSON, and the
    steady load's fast requests (other addresses) are never refused."""
    source = "127.0.0.5"
    limit = settings.edge.echo_max_body_kb * 1024
    statuses: list[int] = []
    bad: list[str] = []
    end = time.monotonic() + seconds

    def post(conn: http.client.HTTPConnection, body: bytes) -> int:
        conn.request("POST", "/echo", body=body)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200 and not contract_json(data):
            bad.append(f"{response.status} without the contract's JSON")
        if response.status == 429 and not response.getheader("Retry-After"):
            bad.append("429 without Retry-After")
        if response.status not in (200, 413, 429):
            bad.append(f"{response.status} {data[:80]!r}")
        if response.getheader("Connection", "").lower() == "close":
            conn.close()  # http.client opens a new one for the next request
        return response.status

    def hog(body: bytes) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", settings.edge.port, timeout=10, source_address=(source, 0))
        try:
            while time.monotonic() < end:
                try:
                    statuses.append(post(conn, body))
                except (OSError, http.client.HTTPException) as exc:
                    bad.append(f"no answer: {type(exc).__name__}")
                    conn.close()
        finally:
            conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=hog, args=(b"x" * limit,), daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    over = http.client.HTTPConnection("127.0.0.1", settings.edge.port, timeout=10, source_address=(source, 0))
    try:
        too_large = post(over, b"x" * (limit + 1))
    finally:
        over.close()
    for thread in threads:
        thread.join()
    if bad:
        raise fleet.FleetError(f"the hostile client got {len(bad)} bad answers, e.g. {bad[0]}")
    if too_large != 413:
        raise fleet.FleetError(f"a body 1 byte past edge.echo_max_body_kb was answered {too_large}, not 413")
    if 429 not in statuses:
        raise fleet.FleetError("the hostile client was never limited")
    before = _fast_get_ms(load.between(started - SETTLE, started))
    during = _fast_get_ms(load.between(started, time.monotonic()))
    return (f"one client posting {limit // 1024} KiB to /echo on {connections} connections for {seconds:g} s: "
            f"{statuses.count(200)} served, {statuses.count(429)} refused 429, one {limit // 1024} KiB + 1 B body 413; "
            f"others' GET /fast p50/p99 {during[0]:.1f}/{during[1]:.1f} ms (before: {before[0]:.1f}/{before[1]:.1f})")


def _fast_get_ms(outcomes: list) -> tuple[float, float]:
    """p50 and p99, in ms, of the steady load's answered GET /fast in `outcomes` (0 if none)."""
    ms = sorted(o.seconds * 1000 for o in outcomes if o.ok and o.route.kind == "fast" and o.route.method == "GET")
    if not ms:
        return 0.0, 0.0
    return ms[len(ms) // 2], ms[min(len(ms) - 1, int(len(ms) * 0.99))]


def _series(port: int) -> set[tuple[str, str, str]]:
    """(route, method, status) of each of an instance's request-duration series."""
    from urllib.request import urlopen

    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return {(s.labels["route"], s.labels["method"], s.labels["status"])
                for s in metrics_reader.samples(response.read().decode())
                if s.name == "fleet_http_request_duration_seconds_count"}


# the soak's own faults, which need its test tasks (tests.support.faulty_tasks) ------------------

def _expect(load: SteadyLoad, path: str, status: int) -> str:
    outcome = load.send_one(Route(f"fault GET {path}", "fault", "GET", path, rate=1))
    if outcome.status != status or not outcome.json_error:
        raise fleet.FleetError(f"{path} was answered {outcome.status} {outcome.error}, expected {status} with JSON")
    return f"{path}: {status} {outcome.error}"


def deadline_overrun(settings: Settings, load: SteadyLoad) -> str:
    return _expect(load, "/slow/spin_past_deadline", 504)


def task_raises(settings: Settings, load: SteadyLoad) -> str:
    return _expect(load, "/slow/raise_error", 500)


def overload_burst(settings: Settings, load: SteadyLoad, clients: int = 4, each: int = 5) -> str:
    """`clients` addresses each open `each` distinct one-second jobs at once: past the line, shed."""
    statuses: list[int] = []
    bad: list[str] = []

    def client(address: str, first: int) -> None:
        for i in range(each):
            threading.Thread(target=one, args=(address, first + i), daemon=True).start()

    def one(address: str, i: int) -> None:
        try:
            with raw_client(settings, address, timeout=60) as sock:
                # distinct seconds: identical jobs would share one (compute once), and never overload
                sock.sendall(f"GET /slow/sleep/{1 + i / 1000:.3f} HTTP/1.1\r\nHost: burst\r\n\r\n".encode())
                status, headers, body = answer(sock)
        except OSError as exc:
            bad.append(f"no answer: {exc}")
            return
        statuses.append(status)
        if status != 200 and not (status in (429, 503) and contract_json(body) and "retry-after" in headers):
            bad.append(f"{status} {body[:80]!r}")

    before = threading.active_count()
    for c in range(clients):
        client(f"127.0.0.{10 + c}", c * each)
    deadline = time.monotonic() + 60
    while len(statuses) + len(bad) < clients * each and time.monotonic() < deadline:
        time.sleep(0.05)
    if bad or len(statuses) < clients * each:
        raise fleet.FleetError(f"burst: {len(bad)} bad answers, e.g. {bad[:1]}; {threading.active_count() - before} hanging")
    shed = sum(s in (429, 503) for s in statuses)
    if not shed:
        raise fleet.FleetError(f"a burst of {clients * each} one-second jobs was not shed: {statuses}")
    return f"{clients * each} jobs at once: {statuses.count(200)} served, {shed} shed with Retry-After"
