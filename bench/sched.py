"""Whom the fast path waits behind under the heavy flood: `perf sched` while the probe runs.

`perf sched record -a` over `seconds` of the flood with the probe sending; then every wait longer
than `longer_than_ms` of a process that serves /fast (the fast instances, nginx's worker) between
its wake-up and its run, charged to the process that held that CPU just before. What the fleet's
fast p99 under the flood has beyond the floor's shows here: which processes kept a woken event
loop waiting, and for how many milliseconds a second. Used by make bench for the fleets
(bench/phases.py) and by `python -m bench.levers sched`.

Needs perf (Debian's linux-perf, which bench/bootstrap.sh installs) and root or
kernel.perf_event_paranoid <= 0; without them, `available()` is false and the bench says so.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

from bench.cpu import short_name
from bench.load import HeavyFlood, probe
from bench.subjects import HOST
# The processes a /fast answer waits for: their waits are the fast path's tail under the flood.
# (The probe is a real-time task, bench/load.py: it does not wait.)
FAST_PATH = ("nginx worker", "fast-")


def available() -> bool:
    return shutil.which("perf") is not None


def flood_waits(subject, p, trace: Path, seconds: float = 8.0,
                longer_than_ms: float = 1.0) -> tuple[float, dict[str, float]]:
    """The flood with the probe under `perf sched record`: the probe's p99 (perturbed by perf: not
    a figure to judge) and ms of the fast path's long waits by holder, in all."""
    roles = {pid: short_name(pid) for pid in subject.processes()}  # before the flood's own
    flood_p99 = asyncio.run(_flood_under_perf(subject, p, trace, seconds))
    timehist = subprocess.run(["perf", "sched", "timehist", "-i", str(trace)],
                              capture_output=True, text=True, check=True).stdout
    trace.unlink()
    return flood_p99, waits_by_holder(timehist, roles, longer_than_ms)


async def _flood_under_perf(subject, p, trace: Path, seconds: float) -> float:
    from bench.phases import summarize

    async with HeavyFlood(HOST, subject.port, f"/slow/fib/{p.heavy_n}", p.heavy_clients):
        await asyncio.sleep(p.ramp)
        perf = subprocess.Popen(["perf", "sched", "record", "-a", "-o", str(trace), "--", "sleep", str(seconds)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples = int(p.rate * (seconds + 1))
        fast = (await probe(HOST, subject.port, ["/fast"], p.rate, samples, p.drain_timeout))["/fast"]
        if perf.wait() != 0:
            raise RuntimeError("perf sched record failed (root, or kernel.perf_event_paranoid <= 0, is needed)")
    return summarize(fast)["p99"]


def waits_by_holder(timehist: str, roles: dict[int, str], longer_than_ms: float = 1.0) -> dict[str, float]:
    """ms that the fast path's processes waited for a CPU, in waits longer than `longer_than_ms`,
    by the role of the process that ran on that CPU just before them (the one they waited behind).

    `perf sched timehist` prints one line per switch-out: time, [cpu], task[tid/pid], wait time,
    scheduling delay (woken, not yet running), run time."""
    last_on: dict[int, str] = {}  # cpu -> the role that last ran there
    by_holder: dict[str, float] = {}
    for line in timehist.splitlines():
        idle = re.match(r"\s*[\d.]+\s+\[(\d+)\]\s+<idle>", line)
        if idle:  # the CPU slept: a task woken there waited for the (virtual) CPU to wake
            last_on[int(idle[1])] = "idle CPU"
            continue
        match = re.match(r"\s*[\d.]+\s+\[(\d+)\]\s+(.*?)\[(\d+)(?:/(\d+))?\]\s+[\d.]+\s+([\d.]+)\s+[\d.]+\s*$", line)
        if not match:
            continue
        cpu, comm, pid, delay = int(match[1]), match[2], int(match[4] or match[3]), float(match[5])
        role = roles.get(pid) or comm.strip()
        if delay > longer_than_ms and role.startswith(FAST_PATH):
            holder = last_on.get(cpu, "?")
            by_holder[holder] = by_holder.get(holder, 0.0) + delay
        last_on[cpu] = role
    return by_holder
