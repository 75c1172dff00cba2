"""CPU used on this machine by processes that are not part of the measurement.

The machine is shared: another program burning a core during a phase moves every figure (and
niced workers lose the most). Each phase therefore records how many cores the rest of the
machine used meanwhile: the machine's busy time (/proc/stat) minus the CPU time of the
configuration's processes, of the bench itself and of the children it waited for (wrk).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from services.common import procfs

TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """Seconds of CPU the whole machine spent busy since boot (all cores, idle and iowait excluded)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / TICKS


def process_cpu(pids: list[int]) -> float:
    """Seconds of CPU used so far by these processes (user + system)."""
    stats = [procfs.stat(pid) for pid in pids]
    return sum(s.utime + s.stime for s in stats if s is not None) / TICKS


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class ForeignCpu:
    """with ForeignCpu(processes) as f: ...; then f.cores = cores used by everything else."""

    def __init__(self, processes: Callable[[], list[int]]):
        self.processes = processes
        self.cores: float | None = None

    def __enter__(self) -> "ForeignCpu":
        self._pids = self.processes()
        self._start = (time.monotonic(), machine_busy(), process_cpu(self._pids), own_cpu())
        return self

    def __exit__(self, *exc: object) -> None:
        pids = sorted(set(self._pids) | set(self.processes()))
        # processes that appeared during the phase count from zero: their start-up is ours too
        wall = time.monotonic() - self._start[0]
        busy = machine_busy() - self._start[1]
        ours = process_cpu(pids) - self._start[2] + own_cpu() - self._start[3]
        self.cores = max(0.0, busy - ours) / wall if wall > 0 else None


def wait_quiet(max_wait: float, threshold: float, window: float = 2.0,
               say: Callable[[str], None] = lambda _: None) -> tuple[float | None, float]:
    """Before a measurement (nothing of ours running): wait, up to `max_wait` s, until the rest of
    the machine uses less than `threshold` cores over `window` s. Returns (cores, seconds waited)."""
    began = time.monotonic()
    told = False
    while True:
        with ForeignCpu(lambda: []) as foreign:
            time.sleep(window)
        waited = time.monotonic() - began
        if foreign.cores is None or foreign.cores < threshold or waited >= max_wait:
            return foreign.cores, waited
        if not told:
            say(f"    waiting up to {max_wait:.0f} s for other programs to calm down "
                f"(they use {foreign.cores:.2f} cores)")
            told = True


def short_name(pid: int) -> str:
    """A readable role for a process of a configuration: fast-01, nginx worker, forkserver, ..."""
    argv, stat = procfs.argv(pid), procfs.stat(pid)
    parent = procfs.argv(stat.ppid) if stat else None
    if argv is None or parent is None:
        return str(pid)
    line = " ".join(argv)
    for module, role in (("services.fast", "fast"), ("services.slow", "slow"), ("services.runner", "runner"),
                         ("services.upstream", "upstream")):
        if module in argv and "--instance" in argv:
            return f"{role}-{int(argv[argv.index('--instance') + 1]):02d}"
    if line.startswith("nginx: "):
        return "nginx " + line[len("nginx: "):].split(" process")[0]
    for needle, name in (("forkserver", "forkserver"), ("resource_tracker", "resource tracker"),
                         ("supervisord", "supervisord"), ("nginx_launch", "nginx launcher"),
                         ("bench.pool_server", "pool server"), ("bench.naive_server", "naive server"),
                         ("dask_scheduler", "dask scheduler"), ("dask_worker", "dask worker"),
                         ("bench.peers.tornado_dask", "tornado-dask server"), ("gunicorn", "gunicorn"),
                         ("multiprocessing.spawn", "spawned process")):
        if needle in line:
            return name + (" worker" if parent == argv else "")  # a forked child keeps its parent's argv
    return line[:40]


class Split:
    """Cores used by each process of a configuration, and by the bench with its children (wrk)."""

    OURS = ("load generator (bench)", "wrk")  # the entries that are not the configuration's

    def __init__(self, processes: Callable[[], list[int]]):
        self.processes = processes
        self.cores: dict[str, float] = {}

    def __enter__(self) -> "Split":
        self._pids = self.processes()
        self._names = {pid: short_name(pid) for pid in self._pids}
        self._start = time.monotonic(), {pid: process_cpu([pid]) for pid in self._pids}, os.times()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._start[0]
        t0, t1 = self._start[2], os.times()
        cores: dict[str, float] = {}
        for pid in self._pids:
            name = self._names[pid]
            cores[name] = cores.get(name, 0.0) + (process_cpu([pid]) - self._start[1][pid]) / wall
        cores[self.OURS[0]] = (t1.user + t1.system - t0.user - t0.system) / wall
        cores[self.OURS[1]] = (t1.children_user + t1.children_system - t0.children_user - t0.children_system) / wall
        self.cores = {k: round(v, 3) for k, v in sorted(cores.items(), key=lambda kv: -kv[1])}
