"""`make soak`: a steady mixed load for minutes or hours while faults recur on a schedule; nothing
may fail, be lost, grow or be left behind.

    python -m drills.soak                          # 10 minutes, against the fleet of .run/ (or $FLEET_RUN_DIR)
    python -m drills.soak --minutes 240            # SOAK_MINUTES=240 make soak
    python -m drills.soak --minutes 30 --out bench/results   # the recorded run (soak.md and charts)

The load is make chaos's (drills/loadgen.py: fast GET and POST, heavy GET and POST on kept-alive
connections) and the faults are make chaos's too, plus the soak's own (all in drills/faults.py),
taken in turn every `--fault-every` seconds: the cheap ones all the time (a worker killed mid-job,
a job past its deadline, a task that raises, clients that hang up mid-job, an overload burst that
must be shed; on Dask a Dask worker killed), and every `--restart-every`th slot one that restarts
a process (kill -9 of a fast instance, of a slow instance, of nginx's master, a rolling reload; on
Dask a kill -9 of the scheduler), so that most processes live long enough for their growth to show.
Long jobs run all along (soak_jobs.py: one submitted every 5 s, each followed by an event stream,
every third cancelled), with faults of their own: a job process killed (cheap), the runner killed
and, on a fleet that runs its own Redis store, the store killed (restarts).

The verdict (exit status 0 only if every line holds):
- requests: no failed or lost request, counted as make chaos counts them (a request the fault
  itself reached is "hit" and must carry the contract's JSON error);
- long jobs: each accepted one ended as promised (succeeded, in one attempt unless a fault struck
  it; cancelled when cancelled; failed retryable only by a fault that reached it), and each stream
  got every event exactly once, in order, across its reconnects;
- faults: each did what it should (a 504, a 500, a shed burst...) and the fleet was whole again;
- workers: after every worker kill (mid-job, at a deadline, for a departed client), the pool's
  worker count back within 1 s;
- growth: each long-lived process's resident memory at its end at most 10 % above its value once
  warmed up (the first `--warmup` seconds of its life); its descriptors and threads back to the
  range of its warm-up within 15 s of every fault;
- leftovers: nothing piles up between the quiet start and the quiet end (soak_watch.py), and no
  log gains an error that asyncio itself reports (an exception nobody retrieved).

Faults need test tasks (raise_error, spin_past_deadline): `make soak` deploys the fleet with
tests.support.faulty_tasks added to slow.task_modules, as the integration tests do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from deploy import fleet, store
from drills import faults, job_faults, soak_jobs, soak_watch
from drills.faults import SETTLE, Fault
from drills.loadgen import SteadyLoad, Tally
from drills.soak_watch import Figures, Proc
from services.common.settings import Settings, SettingsError, load, resolve

RSS_GROWTH_LIMIT = 0.10
WORKER_BACK_WITHIN = 1.0  # seconds
RETURN_WITHIN = 15.0  # seconds for descriptors and threads to come back after a fault
FAULT_TASK_MODULE = "tests.support.faulty_tasks"  # raise_error, spin_past_deadline


# the schedule ---------------------------------------------------------------------------------------

SLOW = frozenset({"slow", "fault"})
CHEAP = (
    Fault("kill-slow-worker", faults.kill_slow_worker, SLOW, kills_workers=True),
    Fault("deadline-overrun", faults.deadline_overrun, SLOW, kills_workers=True),
    Fault("task-raises", faults.task_raises, SLOW),
    Fault("departed-clients", faults.departed_clients, SLOW, kills_workers=True),
    # the burst fills every place: steady heavy requests meanwhile may be shed too (503, JSON)
    Fault("overload-burst", faults.overload_burst, SLOW),
)
RESTARTS = (
    Fault("kill-fast", faults.kill_fast, frozenset({"fast POST", "fault"})),
    Fault("kill-nginx", faults.kill_nginx_master, frozenset({"fault"})),
    Fault("kill-slow", faults.kill_slow_instance, SLOW),
    Fault("reload", faults.rolling_reload, frozenset({"fault"})),
)
DASK_CHEAP = (Fault("kill-dask-worker", faults.kill_dask_worker, SLOW),)
DASK_RESTARTS = (Fault("kill-dask-scheduler", faults.kill_dask_scheduler, SLOW),)
# Long jobs' own (soak_jobs.py): they reach the soak's long jobs, no synchronous request. On a fleet
# that runs its own Redis store, its kill -9 too (make chaos's row: 503 store_unavailable meanwhile).
JOB_CHEAP = (Fault("kill-job-process", soak_jobs.kill_a_job_process, frozenset({soak_jobs.LONG_JOBS})),)
JOB_RESTARTS = (Fault("kill-runner", soak_jobs.kill_runner, frozenset({soak_jobs.LONG_JOBS})),)
STORE_RESTARTS = (Fault("kill-job-store", job_faults.kill_job_store, frozenset({"slow", soak_jobs.LONG_JOBS})),)


def schedule(settings: Settings, restart_every: int) -> list[Fault]:
    """One cycle of the fault slots: the cheap faults in turn, a restart every `restart_every` slots."""
    managed_dask = settings.slow.backend == "dask" and settings.dask.scheduler == "managed"
    managed_store = store.managed(settings)  # the fleet's own Redis store
    cheap = list(CHEAP + JOB_CHEAP + (DASK_CHEAP if managed_dask else ()))
    restarts = list(RESTARTS + JOB_RESTARTS + (DASK_RESTARTS if managed_dask else ())
                    + (STORE_RESTARTS if managed_store else ()))
    slots, c = [], 0
    for restart in restarts:
        for _ in range(max(restart_every - 1, 0)):
            slots.append(cheap[c % len(cheap)])
            c += 1
        slots.append(restart)
    while c < len(cheap):  # every cheap fault at least once a cycle
        slots.append(cheap[c])
        c += 1
    return slots


# sampling -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Band:
    """What a process held at most while it warmed up: the figures it must come back to."""
    files: int  # descriptors other than sockets: pipes, files, event fds
    sockets: int
    threads: int

    def excess(self, f: Figures, socket_allowance: int) -> str:
        """'' if `f` is within the band. Sockets may exceed it by `socket_allowance`: idle kept-alive
        connections that a burst opened stay in nginx's bounded upstream pools until they time out."""
        if f.fds - f.sockets > self.files or f.sockets > self.sockets + socket_allowance or f.threads > self.threads:
            return (f"{f.fds - f.sockets} files, {f.sockets} sockets, {f.threads} threads; warm-up at most "
                    f"{self.files}, {self.sockets} (+{socket_allowance} kept-alive) and {self.threads}")
        return ""


@dataclass
class Series:
    """One incarnation of a long-lived process: its samples (seconds since the start, figures)."""
    proc: Proc
    samples: list[tuple[float, Figures]] = field(default_factory=list)

    def warm(self, warmup: float) -> list[Figures]:
        first = self.samples[0][0]
        return [f for t, f in self.samples if t <= first + warmup]

    def baseline_rss(self, warmup: float) -> float | None:
        """Resident memory once warmed up: the median of the first three samples after warm-up."""
        first = self.samples[0][0]
        after = [f.rss_mb for t, f in self.samples if t >= first + warmup][:3]
        return statistics.median(after) if len(after) == 3 else None

    def end_rss(self) -> float:
        return statistics.median(f.rss_mb for _, f in self.samples[-3:])


class Watch:
    """Samples every long-lived process of the fleet every `every` seconds, in a thread."""

    def __init__(self, settings: Settings, every: float):
        self.settings, self.every = settings, every
        self.start = time.monotonic()
        self.series: dict[tuple[str, int], Series] = {}
        self.workers: list[tuple[float, int]] = []  # (seconds, live pool workers)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def now(self) -> float:
        return time.monotonic() - self.start

    def sample(self) -> dict[tuple[str, int], Figures]:
        table = soak_watch.process_table()
        try:
            processes = soak_watch.fleet_processes(self.settings, table)
        except OSError:  # supervisord busy restarting something: the next sample will do
            return {}
        now, found = self.now(), {}
        for p in processes:
            if p.long_lived and (f := soak_watch.figures(p.pid, table)):
                found[(p.label, p.pid)] = f
                with self._lock:
                    self.series.setdefault((p.label, p.pid), Series(p)).samples.append((now, f))
        with self._lock:
            self.workers.append((now, soak_watch.pool_workers(processes, table)))
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def bands(self, warmup: float) -> dict[tuple[str, int], Band]:
        """The most of each figure in each incarnation's warm-up, for those warmed up."""
        now = self.now()
        with self._lock:
            return {key: Band(max(f.fds - f.sockets for f in s.warm(warmup)), max(f.sockets for f in s.warm(warmup)),
                              max(f.threads for f in s.warm(warmup)))
                    for key, s in self.series.items() if s.samples and now - s.samples[0][0] > warmup}


def live_workers(settings: Settings) -> int:
    table = soak_watch.process_table()
    return soak_watch.pool_workers(soak_watch.fleet_processes(settings, table), table)


def wait_workers(settings: Settings, wanted: int, timeout: float = 30) -> float:
    """Seconds until the fleet has `wanted` live pool workers again."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if live_workers(settings) >= wanted:
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.02)
    return float("inf")


def wait_returned(watch: Watch, bands: dict[tuple[str, int], Band], socket_allowance: int) -> list[str]:
    """Poll until every warmed-up process still alive is back within its band; what is not, after
    RETURN_WITHIN seconds."""
    deadline = time.monotonic() + RETURN_WITHIN
    while True:
        over = []
        for key, f in watch.sample().items():
            if key in bands and (excess := bands[key].excess(f, socket_allowance)):
                over.append(f"{key[0]} (pid {key[1]}): {excess}")
        if not over or time.monotonic() > deadline:
            return over
        time.sleep(0.5)


# the run ------------------------------------------------------------------------------------------

@dataclass
class FaultRecord:
    name: str
    at: float  # seconds since the start
    note: str
    recovered_in: float
    workers_back_in: float | None = None
    not_returned: list[str] = field(default_factory=list)
    error: str = ""


@dataclass
class Report:
    backend: str
    minutes: float
    requests: Tally
    faults: list[FaultRecord]
    growth: list[dict]
    leftovers: dict
    leftover_problems: list[str]
    problems: list[str]
    long_jobs: soak_jobs.Figures = field(default_factory=soak_jobs.Figures)

    @property
    def passed(self) -> bool:
        return not self.problems


def run(settings: Settings, minutes: float, fault_every: float, restart_every: int, warmup: float,
        sample_every: float, say: Callable[[str], None] = print) -> tuple[Report, Watch]:
    faults.wait_whole(settings)
    if FAULT_TASK_MODULE not in [m.strip() for m in str(settings.slow.task_modules).split(",")]:
        raise fleet.FleetError(f"the fleet does not serve the soak's fault tasks: deploy it with {FAULT_TASK_MODULE} "
                               "in slow.task_modules (make soak does)")
    workers = live_workers(settings)
    nginx_workers = settings.edge.worker_processes
    slots = schedule(settings, restart_every)
    records: list[FaultRecord] = []
    windows: list[tuple[float, float, frozenset[str]]] = []  # monotonic (from, to, may_hit)
    alarms_before = soak_watch.log_alarms(settings)
    with Watch(settings, sample_every) as watch:
        start_leftovers = _quiet_leftovers(settings)
        end_at = time.monotonic() + minutes * 60
        with SteadyLoad("127.0.0.1", settings.edge.port) as steady, \
                soak_jobs.LongJobLoad(settings, steady) as long_jobs:
            next_fault = time.monotonic() + warmup
            say(f"soak: {minutes:g} min on the {settings.slow.backend} backend, {workers} pool workers; "
                f"faults every {fault_every:g} s after {warmup:g} s of warm-up")
            while True:
                wait = min(next_fault, end_at) - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if time.monotonic() >= end_at:
                    break
                fault = slots[len(records) % len(slots)]
                record = _produce(settings, steady, watch, fault, workers, warmup)
                records.append(record)
                windows.append((watch.start + record.at - SETTLE,
                                watch.start + record.at + record.recovered_in + SETTLE, fault.may_hit))
                say(f"  {record.at:7.1f} s  {fault.name:<20} {record.error or record.note}")
                next_fault = max(watch.start + record.at + fault_every, time.monotonic() + SETTLE)
        jobs = long_jobs.finish(windows)  # every long job ended, and its stream, before the quiet end
        end_leftovers = _quiet_leftovers(settings)
    requests = _tally(steady.outcomes, windows, steady.reloads)
    growth = _growth(watch, warmup)
    leftover_problems = soak_watch.leftover_problems(start_leftovers, end_leftovers, nginx_workers)
    alarms = soak_watch.log_alarms(settings) - alarms_before
    if alarms > 0:
        leftover_problems.append(f"{alarms} asyncio complaints in the logs ({' / '.join(soak_watch.ASYNCIO_ALARMS)})")
    problems = _problems(requests, records, growth, leftover_problems, slots)
    problems += [f"long jobs: {line}" for line in jobs.problems]
    if not jobs.accepted:
        problems.append("long jobs: none was accepted")
    report = Report(settings.slow.backend, minutes, requests, records, growth,
                    {"start": start_leftovers, "end": end_leftovers}, leftover_problems, problems, jobs)
    return report, watch


def with_fault_tasks(settings: Settings) -> Settings:
    """The same settings, with the soak's fault tasks among the served ones."""
    modules = [m.strip() for m in str(settings.slow.task_modules).split(",")]
    if FAULT_TASK_MODULE in modules:
        return settings
    values = {**settings.values, "slow.task_modules": ",".join([*modules, FAULT_TASK_MODULE])}
    return Settings(resolve(values, env={}, origin="make soak"), settings.run_dir)


def deploy(settings: Settings) -> Settings:
    """`make deploy-local` with these settings (fleet.toml and the FLEET_* overrides) plus the fault
    tasks: a running fleet gets the change live (its slow instances restart one at a time)."""
    wanted = with_fault_tasks(settings)
    fleet.up(wanted)
    return wanted


def _quiet_leftovers(settings: Settings) -> dict:
    """Leftovers with no request in flight: a moment for kept-alive connections to settle first."""
    time.sleep(2)
    table = soak_watch.process_table()
    return soak_watch.leftovers(settings, soak_watch.fleet_processes(settings, table), table)


def _produce(settings: Settings, steady: SteadyLoad, watch: Watch, fault: Fault, workers: int,
             warmup: float) -> FaultRecord:
    bands = watch.bands(warmup)
    at = watch.now()
    start = time.monotonic()
    record = FaultRecord(fault.name, round(at, 2), "", 0.0)
    try:
        record.note = fault.produce(settings, steady)
        if fault.kills_workers:
            record.workers_back_in = wait_workers(settings, workers)
        faults.wait_whole(settings)
    except (fleet.FleetError, OSError) as exc:
        record.error = f"error: {exc}"
        try:
            faults.wait_whole(settings)
        except fleet.FleetError as again:
            record.error += f"; {again}"
    record.recovered_in = time.monotonic() - start
    record.not_returned = wait_returned(watch, bands, soak_watch.UPSTREAM_KEEPALIVE * settings.edge.worker_processes)
    return record


def _tally(outcomes, windows, reloads) -> Tally:
    """make chaos's accounting over one long load: an outcome may be hit by the faults whose
    windows it started in."""
    groups: dict[frozenset[str], list] = {}
    for o in outcomes:
        reach = frozenset().union(*(hit for lo, hi, hit in windows if lo <= o.started <= hi))
        groups.setdefault(reach, []).append(o)
    total = Tally()
    for reach, group in groups.items():
        t = Tally.of(group, reach, reloads)
        for name in ("sent", "failed", "hit", "lost", "retried", "reload_races"):
            setattr(total, name, getattr(total, name) + getattr(t, name))
        total.examples += t.examples
    total.examples = Tally.worst_first(total.examples)
    return total


def _growth(watch: Watch, warmup: float) -> list[dict]:
    rows = []
    for (label, pid), s in sorted(watch.series.items()):
        base = s.baseline_rss(warmup)
        if base is None:
            continue  # it did not live past its warm-up
        end = s.end_rss()
        rows.append({"process": label, "pid": pid, "lived_s": round(s.samples[-1][0] - s.samples[0][0]),
                     "rss_warm_mb": base, "rss_end_mb": end, "growth": round(end / base - 1, 4),
                     "fds": [min(f.fds for _, f in s.samples), max(f.fds for _, f in s.samples)],
                     "threads": [min(f.threads for _, f in s.samples), max(f.threads for _, f in s.samples)]})
    return rows


def _problems(requests: Tally, records: list[FaultRecord], growth: list[dict], leftovers: list[str],
              slots: list[Fault]) -> list[str]:
    problems = []
    if requests.failed or requests.lost:
        problems.append(f"requests: {requests.failed} failed, {requests.lost} lost, e.g. {requests.examples[:3]}")
    for f in records:
        if f.error:
            problems.append(f"fault {f.name} at {f.at:.0f} s: {f.error}")
        if f.workers_back_in is not None and f.workers_back_in > WORKER_BACK_WITHIN:
            problems.append(f"fault {f.name} at {f.at:.0f} s: workers back after {f.workers_back_in:.2f} s")
        for line in f.not_returned:
            problems.append(f"fault {f.name} at {f.at:.0f} s: not back to its warm-up: {line}")
    for row in growth:
        if row["growth"] > RSS_GROWTH_LIMIT:
            problems.append(f"{row['process']} (pid {row['pid']}): RSS grew {row['growth']:.0%} "
                            f"({row['rss_warm_mb']} -> {row['rss_end_mb']} MB)")
    problems += [f"leftover {line}" for line in leftovers]
    missed = sorted({s.name for s in slots} - {f.name for f in records})
    if missed:
        problems.append(f"faults never produced (too short a soak): {', '.join(missed)}")
    return problems


# output -------------------------------------------------------------------------------------------

def table(report: Report) -> str:
    t, j = report.requests, report.long_jobs
    lines = [f"requests: {t.sent} sent, {t.failed} failed, {t.hit} hit by a fault (JSON errors), {t.lost} lost, "
             f"{t.reload_races} reload races, {t.retried} GETs resent",
             f"long jobs: {j.accepted} accepted of {j.submitted} submitted; {j.succeeded} succeeded "
             f"({j.retried} after a retry), {j.cancelled} cancelled, {j.failed_by_faults} failed retryable by a "
             f"fault; their streams reconnected {j.stream_reconnects} times"
             + ("" if j.problems else ", and each got every event once, in order"), "",
             f"{'fault':<20} {'times':>5} {'recovered in s (median / max)':>30} {'workers back in s (max)':>24}"]
    for name in dict.fromkeys(f.name for f in report.faults):
        mine = [f for f in report.faults if f.name == name]
        rec = [f.recovered_in for f in mine]
        back = [f.workers_back_in for f in mine if f.workers_back_in is not None]
        lines.append(f"{name:<20} {len(mine):>5} {statistics.median(rec):>19.2f} / {max(rec):>6.2f} "
                     f"{(f'{max(back):.2f}' if back else '-'):>24}")
    lines += ["", f"{'process (incarnation)':<32} {'lived s':>8} {'RSS warm MB':>12} {'RSS end MB':>11} "
              f"{'growth':>7} {'fds min-max':>12} {'threads min-max':>16}"]
    for row in report.growth:
        lines.append(f"{row['process'] + ' ' + str(row['pid']):<32} {row['lived_s']:>8} {row['rss_warm_mb']:>12.1f} "
                     f"{row['rss_end_mb']:>11.1f} {row['growth']:>7.1%} {'%d-%d' % tuple(row['fds']):>12} "
                     f"{'%d-%d' % tuple(row['threads']):>16}")
    start, end = report.leftovers["start"], report.leftovers["end"]
    lines += ["", "leftovers (quiet start -> quiet end): " + ", ".join(
        f"{k} {len(start[k]) if isinstance(start[k], list) else start[k]} -> {len(end[k]) if isinstance(end[k], list) else end[k]}"
        for k in start)]
    lines += ["", "PASS: nothing failed, was lost, grew or was left behind" if report.passed
              else "FAIL:\n" + "\n".join(f"  - {p}" for p in report.problems)]
    return "\n".join(lines)


def write(report: Report, watch: Watch, out: Path) -> list[Path]:
    from drills import soak_charts  # matplotlib: only when charts are wanted

    out.mkdir(parents=True, exist_ok=True)
    data = {"report": asdict(report) | {"passed": report.passed},
            "series": [{"process": s.proc.label, "pid": s.proc.pid, "samples": [[t, *asdict(f).values()] for t, f in s.samples]}
                       for s in watch.series.values()],
            "workers": watch.workers}
    (out / "soak.json").write_text(json.dumps(data, default=str))
    charts = soak_charts.draw(watch, report, out)
    (out / "soak.md").write_text(soak_charts.markdown(report, table(report), charts))
    return [out / "soak.md", out / "soak.json", *charts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drills.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10, help="how long the load runs (default 10)")
    parser.add_argument("--fault-every", type=float, default=20, help="seconds between faults (default 20)")
    parser.add_argument("--restart-every", type=int, default=5,
                        help="every Nth fault restarts a process (default 5)")
    parser.add_argument("--warmup", type=float, default=60,
                        help="seconds before the first fault, and of each process's own warm-up (default 60)")
    parser.add_argument("--sample-every", type=float, default=5, help="seconds between samples (default 5)")
    parser.add_argument("--deploy", action="store_true",
                        help="first deploy the fleet as make deploy-local would, with the fault tasks added")
    parser.add_argument("--out", type=Path, help="where soak.md, soak.json and the charts go (default: the run dir's soak/)")
    options = parser.parse_args(argv)
    try:
        settings = load()
        if options.deploy:
            settings = deploy(settings)
        elif (settings.run_dir / "settings.json").exists():  # the fleet as it was deployed
            settings = Settings.from_snapshot(settings.run_dir / "settings.json")
        if not fleet.supervisord_pid(settings):
            raise fleet.FleetError(f"no fleet running in {settings.run_dir}: run make soak (it deploys one)")
        report, watch = run(settings, options.minutes, options.fault_every, options.restart_every,
                            options.warmup, options.sample_every, say=lambda line: print(line, flush=True))
    except (SettingsError, fleet.FleetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print()
    print(table(report))
    written = write(report, watch, options.out or settings.run_dir / "soak")
    print("\nwritten: " + ", ".join(str(p) for p in written))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
