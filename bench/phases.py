"""The measurement phases run against one started configuration, and the profiles that size them.

For a configuration with a heavy route, in this order:
  1. warm-up        a few requests of every kind (connections, worker start-up, code paths)
  2. memory idle    RSS and PSS summed over every process of the configuration
  3. fast idle      open loop: GET /fast at `rate` req/s, `fast_samples` requests
  4. round trip     open loop: /fast and /slow/fib/1 interleaved at a low rate (p50 of each)
  5. fast flood     the same open loop while `heavy_clients` clients loop /slow/fib/<heavy_n>
                    (started `ramp` s earlier so every worker is busy)
  5b. perf sched    the fleets only: the flood and the probe once more under `perf sched record`,
                    whom the fast path waited behind (bench/sched.py)
  6. heavy          the heavy clients alone for `heavy_seconds`: completed jobs per second;
                    memory sampled throughout
  7. saturation     wrk -t1 -c32 on /fast (closed loop); memory sampled throughout
The edge ceiling has no heavy route: phases 1-3 and 7 only. The floor has none either; its phase 5
is the same open loop while W burners spin at the fleet's worker priority (bench/floor.py).

The load behaves as remote clients would (bench/load.py): the probe's open loop runs in a process
of its own, each flood client in another, from its own address, at the lowest priority, backing
off when refused. A latency cell whose probe ran late past load.LATE_BOUND_MS at p99 is kept but
not judged (`judged` false): the report shows its figures and why, and scores nothing from it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

from bench import memory, sched, wrk
from bench.cpu import ForeignCpu, Split
from bench.httpclient import HttpConnection
from bench.load import HeavyFlood, Samples, kept_schedule, probe
from bench.stats import percentile
from bench.subjects import HOST, Subject


@dataclass(frozen=True)
class Profile:
    name: str
    repeat: int
    rate: float  # fast requests per second, open loop
    fast_samples: int  # per latency cell (idle, flood)
    rtt_rate: float  # requests per second in the round-trip phase, both paths together
    rtt_samples: int  # in the round-trip phase, both paths together
    heavy_clients: int
    heavy_n: int  # the flood's job: /slow/fib/<heavy_n>
    ramp: float  # seconds the heavy clients run before anything is measured
    heavy_seconds: float
    wrk_seconds: int
    wrk_warmup: int  # a wrk run whose figures are dropped (0: none)
    drain_timeout: float  # seconds to wait for the last answers of an open-loop run
    quiet_wait: float  # seconds to wait, before each configuration, for other programs to calm down
    memory_interval: float = 0.5
    one_worker_runs: bool = True  # the heavy run with one worker (parallel efficiency)
    sched_seconds: float = 8.0  # the fleets' flood under perf sched (bench/sched.py); 0: none


FULL = Profile("full", repeat=3, rate=200, fast_samples=2000, rtt_rate=80, rtt_samples=400,
               heavy_clients=4, heavy_n=27, ramp=1.0, heavy_seconds=6, wrk_seconds=5, wrk_warmup=1,
               drain_timeout=20, quiet_wait=30)
QUICK = Profile("quick", repeat=1, rate=200, fast_samples=120, rtt_rate=80, rtt_samples=40,
                heavy_clients=4, heavy_n=27, ramp=0.3, heavy_seconds=0.7, wrk_seconds=1, wrk_warmup=0,
                drain_timeout=5, quiet_wait=0, one_worker_runs=False, sched_seconds=1)


def summarize(s: Samples, ok_status: int = 200) -> dict:
    """Percentiles over the successful answers plus, as lower bounds, those that never came."""
    values = s.latency_ms + s.censored_ms
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "sent": s.sent,
        "ok": s.ok,
        "non_200": {str(k): v for k, v in s.statuses.items() if k != ok_status},
        "errors": s.errors,
        "timeouts": s.timeouts,
        "rate": s.achieved_rate(),
        "service_p50": percentile(s.service_ms, 50),
        "service_p99": percentile(s.service_ms, 99),
        "lateness_p50": percentile(s.lateness_ms, 50),
        "lateness_p99": percentile(s.lateness_ms, 99),
        "judged": kept_schedule(percentile(s.lateness_ms, 99)),
    }


class Sampler:
    """Calls `sample()` every `interval` s in a thread, between start and stop; `samples` holds what it returned."""

    def __init__(self, sample: Callable[[], object], interval: float):
        self.sample, self.interval = sample, interval
        self.samples: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(self.sample())


def memory_sampler(processes: Callable[[], list[int]], interval: float) -> Sampler:
    """memory.usage of the processes alive at each sample."""
    return Sampler(lambda: memory.usage(processes()), interval)


async def warm_up(subject: Subject, heavy_n: int) -> None:
    conn = await HttpConnection.open(HOST, subject.port)
    try:
        for path in ["/fast"] * 20 + (["/slow/fib/1"] * 4 if subject.has_slow else []):
            if conn.closed:  # a server without keep-alive (gunicorn's sync workers)
                conn = await HttpConnection.open(HOST, subject.port)
            await conn.get(path)
        if subject.has_slow:
            # one heavy job per worker, at once, so that every worker has run one
            await asyncio.gather(*(_one(subject.port, f"/slow/fib/{heavy_n}") for _ in range(subject.workers)))
    finally:
        conn.close()


async def _one(port: int, path: str) -> int:
    conn = await HttpConnection.open(HOST, port)
    try:
        return (await conn.get(path))[0]
    finally:
        conn.close()


async def fast_flood(subject: Subject, p: Profile) -> tuple[Samples, dict]:
    async with HeavyFlood(HOST, subject.port, f"/slow/fib/{p.heavy_n}", p.heavy_clients) as flood:
        await asyncio.sleep(p.ramp)
        started = time.monotonic()
        fast = (await probe(HOST, subject.port, ["/fast"], p.rate, p.fast_samples, p.drain_timeout))["/fast"]
        ended = time.monotonic()
    done = flood.completed(started, ended)  # the flood's processes report their answers when they stop
    return fast, {"jobs_s": done.get(200, 0) / (ended - started),
                  "non_200": {str(k): v for k, v in done.items() if k != 200}, "errors": flood.errors,
                  "refused": flood.refused}


async def heavy(subject: Subject, p: Profile) -> dict:
    """Completed jobs per second; the CPU each job cost the configuration's processes meanwhile (by
    process role), and the cores they kept busy: what dispatching a job costs beside computing it,
    and whether the cores were full or waited. No probe runs here, so the clients run at the
    bench's own priority (not FLOOD_NICE): starved clients would leave a peer's workers waiting
    for the next request and charge it with the load generator's delay."""
    async with HeavyFlood(HOST, subject.port, f"/slow/fib/{p.heavy_n}", p.heavy_clients, nice=0) as flood:
        await asyncio.sleep(p.ramp)
        with Split(subject.processes) as split:
            started = time.monotonic()
            await asyncio.sleep(p.heavy_seconds)
            ended = time.monotonic()
    done = flood.completed(started, ended)
    jobs = done.get(200, 0)
    ours = {name: cores for name, cores in split.cores.items() if name not in Split.OURS}
    cpu_ms = {name: cores * (ended - started) * 1000 / jobs for name, cores in ours.items()} if jobs else {}
    return {"jobs_s": jobs / (ended - started), "jobs": jobs,
            "non_200": {str(k): v for k, v in done.items() if k != 200}, "errors": flood.errors,
            "refused": flood.refused, "workers": subject.workers, "cpu_ms_per_job": cpu_ms, "busy_cores": sum(ours.values()),
            "cores": len(os.sched_getaffinity(0))}


def measure(subject: Subject, p: Profile, say: Callable[[str], None] = lambda _: None) -> dict:
    """Every phase against a started configuration; the figures of this one repetition."""
    m: dict = {"workers": subject.workers, "foreign_cores": {}}
    asyncio.run(warm_up(subject, p.heavy_n))
    pids = subject.processes()
    m["memory_idle"] = memory.usage(pids)
    m["processes"] = len(pids)
    m["process_list"] = memory.describe(pids)
    say("fast idle")
    with ForeignCpu(subject.processes) as foreign:
        idle = asyncio.run(probe(HOST, subject.port, ["/fast"], p.rate, p.fast_samples, p.drain_timeout))
    m["idle"] = summarize(idle["/fast"])
    m["foreign_cores"]["idle"] = foreign.cores
    load_samples: list[dict] = []
    if hasattr(subject, "burners"):  # the floor: spinning burners at worker priority stand in for the flood
        say("fast under burners")
        with subject.burners(), ForeignCpu(subject.processes) as foreign:
            time.sleep(p.ramp)
            burned = asyncio.run(probe(HOST, subject.port, ["/fast"], p.rate, p.fast_samples, p.drain_timeout))
        m["flood"] = summarize(burned["/fast"])
        m["foreign_cores"]["flood"] = foreign.cores
    if subject.has_slow:
        say("round trip")
        with ForeignCpu(subject.processes) as foreign:
            rtt = asyncio.run(probe(HOST, subject.port, ["/fast", "/slow/fib/1"], p.rtt_rate, p.rtt_samples,
                                    p.drain_timeout))
        m["rtt"] = {"fast": summarize(rtt["/fast"]), "fib1": summarize(rtt["/slow/fib/1"])}
        m["foreign_cores"]["rtt"] = foreign.cores
        say("fast under flood")
        # No memory sampling here: reading every process's smaps every half second is a burst of
        # the bench's CPU at the probe's priority, and it made the probe late (1.6-2.2 ms at p99
        # under the fleet's flood, 0.3 beside the floor's burners, which had no sampler). The
        # heavy run below has the same flood and no probe: memory under load is sampled there.
        with ForeignCpu(subject.processes) as foreign:
            fast, jobs = asyncio.run(fast_flood(subject, p))
        m["flood"] = summarize(fast)
        m["flood_heavy"] = jobs
        m["foreign_cores"]["flood"] = foreign.cores
        if p.sched_seconds and subject.name.startswith("fleet"):
            say("whom the fast path waits behind (perf sched)")
            m["sched"] = whom_it_waits_behind(subject, p)
        say("heavy throughput")
        with ForeignCpu(subject.processes) as foreign, memory_sampler(subject.processes, p.memory_interval) as sampler:
            m["heavy"] = asyncio.run(heavy(subject, p))
        load_samples += sampler.samples
        m["foreign_cores"]["heavy"] = foreign.cores
    say("wrk")
    url = f"http://{HOST}:{subject.port}/fast"
    if p.wrk_warmup:
        wrk.run(url, p.wrk_warmup)
    with ForeignCpu(subject.processes) as foreign, memory_sampler(subject.processes, p.memory_interval) as sampler, \
            Split(subject.processes) as split:
        m["wrk"] = wrk.run(url, p.wrk_seconds)
    load_samples += sampler.samples
    m["wrk_cpu_split"] = split.cores
    m["foreign_cores"]["wrk"] = foreign.cores
    m["memory_load"] = memory.peak(load_samples)
    return m


def whom_it_waits_behind(subject: Subject, p: Profile) -> dict:
    """The fleets' flood once more, under perf sched (bench/sched.py): the fast path's waits of more
    than 1 ms for a CPU, in ms a second, by the process that held it. Its own p99 is not a figure:
    perf perturbs what it watches."""
    if not sched.available():
        return {"error": "perf is not installed (bench/bootstrap.sh installs linux-perf as root)"}
    try:
        _, waits = sched.flood_waits(subject, p, subject.workdir / "sched.data", p.sched_seconds)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        return {"error": str(exc)[:300]}
    return {"seconds": p.sched_seconds, "waits_ms_s": sum(waits.values()) / p.sched_seconds,
            "behind": {holder: ms / p.sched_seconds for holder, ms in sorted(waits.items(), key=lambda kv: -kv[1])}}


def heavy_only(subject: Subject, p: Profile) -> dict:
    """Heavy throughput alone (the one-worker run of the parallel efficiency)."""
    asyncio.run(warm_up(subject, p.heavy_n))
    with ForeignCpu(subject.processes) as foreign:
        result = asyncio.run(heavy(subject, p))
    result["foreign_cores"] = foreign.cores
    return result


def profile_dict(p: Profile) -> dict:
    return asdict(p)
