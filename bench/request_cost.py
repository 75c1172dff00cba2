"""Where a fast request's CPU goes: nginx and a fast instance per request, beside a bare Tornado
Hello on the same event loop, and a profile of what the fleet's instance does beyond it.

    .venv/bin/python -m bench.request_cost [--quick] [--repeat N] [--rate R] [--out DIR]

Two subjects, each behind its own nginx with the fleet's edge settings (bench/edge.py), started
once per repetition, interleaved: the floor (nginx -> bench/naive_server.py, Tornado's defaults on
uvloop, `Hello!`, as many instances as the fleet's fast ones, so that each serves the same share
of the rate) and the fleet (deploy/fleet.toml's defaults, its fast instances on uvloop).

1. Cost: GET /fast open loop at `rate` req/s (the probe in a process of its own, bench/load.py);
   each of the subject's processes' CPU time over the run (/proc, user + system), less what it
   spends idle (its timers, measured just before), ÷ the requests answered = CPU µs per request,
   by role: nginx's worker, the instance(s).
2. Profile: then, under the same load, py-spy samples one instance (`--nonblocking`: the instance
   is never paused) for `profile_seconds`; each function's share of the samples, times the
   instance's µs per request from step 1, is what that function costs a request. The fleet's
   figures minus the floor's, function by function, are what the fleet adds to a request.

The target (issue 31): the fleet's fast instance CPU per request ≤ 1.1 × the bare Hello's.
Results: DIR/request_cost.md and request_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench import subjects
from bench.cpu import process_cpu, short_name
from bench.levers import Started
from bench.load import probe
from bench.report import cell, num, table
from bench.stats import Spread, percentile, ratio
from services.common.settings import load

HOST = subjects.HOST
SUBJECTS = ("floor", "fleet")
TARGET = 1.1  # fleet instance µs per request ÷ the bare Hello's
ENTRY_SHARE = 0.5  # a function on more than this share of an instance's samples is an entry frame


@dataclass(frozen=True)
class Profile:
    repeat: int
    rate: float  # req/s, open loop
    seconds: float  # of the cost run
    profile_seconds: float  # of py-spy's run (0: no profile)
    warmup: int
    idle_seconds: float  # measuring what the processes spend with no request


FULL = Profile(repeat=3, rate=1000, seconds=8, profile_seconds=8, warmup=2000, idle_seconds=3)
QUICK = Profile(repeat=1, rate=1000, seconds=1, profile_seconds=2, warmup=200, idle_seconds=0.5)


def instance_role(name: str) -> bool:
    return name.startswith("fast-") or name == "naive server"


def roles(pids: list[int]) -> dict[int, str]:
    """The processes whose CPU a request costs: nginx workers and the instances serving /fast."""
    named = {pid: short_name(pid) for pid in pids}
    return {pid: ("instance" if instance_role(n) else n) for pid, n in named.items()
            if instance_role(n) or n == "nginx worker"}


def cost(subject: subjects.Subject, p: Profile) -> dict:
    """CPU µs per request of nginx's workers and of the instance(s), at `rate` req/s."""
    asyncio.run(probe(HOST, subject.port, ["/fast"], p.rate * 2, p.warmup, 10))  # connections, code paths
    who = roles(subject.processes())
    # What the processes spend with no request at all (timers: the watchdog, metrics, health):
    # measured first, and taken out of the run's CPU, so that it is not charged to the requests.
    before = {pid: process_cpu([pid]) for pid in who}
    time.sleep(p.idle_seconds)
    idle: Counter = Counter()
    for pid, role in who.items():
        idle[role] += (process_cpu([pid]) - before[pid]) / p.idle_seconds
    before = {pid: process_cpu([pid]) for pid in who}
    started = time.monotonic()
    count = int(p.rate * p.seconds)
    samples = asyncio.run(probe(HOST, subject.port, ["/fast"], p.rate, count, 10))["/fast"]
    elapsed = time.monotonic() - started
    spent: Counter = Counter()
    for pid, role in who.items():
        spent[role] += process_cpu([pid]) - before[pid]
    answered = samples.ok
    return {"answered": answered, "sent": samples.sent, "lateness_p99": percentile(samples.lateness_ms, 99),
            "us_per_request": {role: 1e6 * max(0.0, seconds - idle[role] * elapsed) / answered
                               for role, seconds in spent.items()} if answered else {},
            "idle_cores": dict(idle), "instances": sum(1 for role in who.values() if role == "instance")}


def profile(subject: subjects.Subject, p: Profile, out: Path) -> dict[str, float]:
    """py-spy on one instance under the load: each function's share of the samples (inclusive:
    the samples in which it is on the stack), keyed "function (file)"."""
    pid = next(pid for pid, role in roles(subject.processes()).items() if role == "instance")
    py_spy = Path(sys.executable).with_name("py-spy")
    raw = out / "py-spy.txt"
    record = subprocess.Popen([str(py_spy), "record", "--pid", str(pid), "--nonblocking", "--rate", "500",
                               "--duration", str(max(1, round(p.profile_seconds))), "--format", "raw",
                               "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # py-spy attached
    asyncio.run(probe(HOST, subject.port, ["/fast"], p.rate, int(p.rate * (p.profile_seconds + 1)), 10))
    _, err = record.communicate(timeout=60)
    if record.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed ({record.returncode}): {err.decode()[-500:]}")
    return shares(raw.read_text())


def shares(collapsed: str) -> dict[str, float]:
    """Inclusive share of each function in py-spy's raw (collapsed) output: `frame;frame;... count`,
    each frame `function (file:line)`; a function counts once per stack, however deep it recurses."""
    total, seen = 0, Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        for function in {_function(frame) for frame in stack.split(";")}:
            seen[function] += n
    return {f: c / total for f, c in seen.items()} if total else {}


# The bare Hello's handler is the floor's counterpart of the fleet's: one row for both.
SAME_FUNCTION = {"HelloHandler.get (bench/naive_server.py)": "HelloHandler.get (services/fast/app.py)"}


def _function(frame: str) -> str:
    """`get (services/fast/app.py:24)` -> `get (services/fast/app.py)`: one entry per function."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/", str(subjects.REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    function = f"{name} ({path})"
    return SAME_FUNCTION.get(function, function)


def measure(subject: subjects.Subject, p: Profile, workdir: Path) -> dict:
    result = {"cost": cost(subject, p)}
    if p.profile_seconds:
        result["profile"] = profile(subject, p, workdir)
    return result


# the report ---------------------------------------------------------------------------------------

def instance_us(run: dict) -> float | None:
    """µs of instance CPU per request, all instances together."""
    return run["cost"]["us_per_request"].get("instance")


def function_us(runs: list[dict]) -> dict[str, float]:
    """Per function: its share of the instance's samples × the instance's µs per request, median
    over the repetitions (a function missing from a repetition's samples counts 0 there)."""
    names = {f for r in runs for f in r.get("profile", {})}
    out = {}
    for f in names:
        s = Spread.of([r.get("profile", {}).get(f, 0.0) * (instance_us(r) or 0.0) for r in runs])
        out[f] = s.median if s else 0.0
    return out


def ratios(results: dict[str, list[dict]]) -> Spread | None:
    """The fleet's instance µs per request ÷ the floor's, within each repetition."""
    pairs = zip(results.get("fleet", []), results.get("floor", []))
    return Spread.of(ratio(instance_us(a), instance_us(b)) for a, b in pairs)


def markdown(results: dict[str, list[dict]], p: Profile, command: str, date: str) -> str:
    r = ratios(results)
    verdict = "not measured" if r is None else ("pass" if r.median <= TARGET else "**FAIL**")
    out = ["# Where a fast request's CPU goes", "",
           f"Generated by `{command}` on {date}. GET /fast open loop at {p.rate:g} req/s for {p.seconds:g} s through "
           "each subject's nginx (the probe in a process of its own), medians over the repetitions (min–max), "
           "subjects interleaved. CPU per request: each process's CPU time (user + system) over the run, less "
           "what it spends with no request (its timers, measured just before, in the last column), ÷ the "
           "requests answered. The floor's instances are bare Tornado `Hello!`s on uvloop (bench/naive_server.py, "
           "Tornado's defaults), as many as the fleet's fast instances, so that each serves the same share of "
           "the rate; the fleet's are its fast instances on uvloop, with deploy/fleet.toml's defaults. The "
           "instances' figure is their CPU together ÷ the requests.",
           "", "## Target (issue 31)", "",
           table(["figure", "target", "measured", "result"],
                 [["fleet fast instance CPU per request ÷ the bare Tornado Hello's", f"<= {TARGET:g}",
                   cell(r, "ratio"), verdict]]), "",
           "## CPU per request (µs)", ""]
    rows = []
    for name, runs in results.items():
        def fig(role: str, runs=runs) -> Spread | None:
            return Spread.of(run["cost"]["us_per_request"].get(role) for run in runs)
        idle = Spread.of(1000 * run["cost"].get("idle_cores", {}).get("instance", 0.0) for run in runs)
        rows.append([f"**{name}**", cell(fig("nginx worker"), "int"), cell(fig("instance"), "int"),
                     str(runs[0]["cost"]["instances"]) if runs else "–",
                     cell(Spread.of(run["cost"]["lateness_p99"] for run in runs), "ms"), cell(idle, "ms")])
    out += [table(["subject", "nginx worker µs/request", "instance(s) µs/request", "instances",
                   "probe late p99 (ms)", "instance(s) idle, ms of CPU a second"], rows), ""]
    fleet, floor = results.get("fleet") or [], results.get("floor") or []
    if fleet and floor and any("profile" in run for run in fleet):
        a, b = function_us(fleet), function_us(floor)
        # The frames under which everything runs (the module, its main, the loop's runner) are on
        # most stacks of both and say nothing of a request: left out.
        entry = {f for r in fleet + floor for f, share in r.get("profile", {}).items() if share > ENTRY_SHARE}
        top = sorted((f for f in a if f not in entry), key=lambda f: -(a[f] - b.get(f, 0.0)))[:20]
        out += ["## What the fleet's instance adds, function by function", "",
                "py-spy (`--nonblocking`, 500 samples/s) on one instance of each subject under the same load; each "
                "function's share of the samples in which it is on the stack × that instance's µs per request. "
                "The twenty functions whose cost the fleet's instance adds most over the bare Hello's (a "
                "function only the fleet runs has 0 on the floor). Inclusive: a function's figure holds its "
                "callees', so rows nest and do not add up. py-spy samples a thread whenever it is not blocked in "
                "a wait, so a row is wall time, including time the thread was ready but another process had the "
                "CPU: the fleet's send path (`write_to_fd`) shows more than the floor's where the CPU figures above "
                "do not, and less with `fast.sched_slice_us = 0` (49.5 against 71 µs in a run of 2 repetitions): the "
                "nginx worker a send wakes runs the fast path's short slice and may take the CPU from the instance "
                "before the send has returned. Rows for a thread that waits (`Event.wait`, the loop watchdog's) "
                "are such time too.", "",
                table(["function (file)", "fleet µs/request", "floor µs/request", "added"],
                      [[f"`{f}`", num(a[f]), num(b.get(f, 0.0)), num(a[f] - b.get(f, 0.0))] for f in top]), ""]
    return "\n".join(out)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.request_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 1 s runs")
    parser.add_argument("--repeat", type=int)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--out", type=Path, default=subjects.REPO / "bench" / "results")
    parser.add_argument("--fleet-env", action="append", default=[], metavar="FLEET_KEY=VALUE",
                        help="run the fleet with this settings override (repeatable): what a lever costs")
    o = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in o.fleet_env)
    # The bare Hellos, as many as the fleet's fast instances: each then serves the same share of the
    # rate (an instance's CPU per request grows as its own rate falls: fewer requests share a wake-up).
    fast_instances = load(env=overrides).fast.instances
    p = QUICK if o.quick else FULL
    if o.repeat or o.rate:
        from dataclasses import replace
        p = replace(p, repeat=o.repeat or p.repeat, rate=o.rate or p.rate)
    signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix="fleet-request-cost-"))
    results: dict[str, list[dict]] = {name: [] for name in SUBJECTS}
    command = "python -m bench.request_cost " + " ".join(argv if argv is not None else sys.argv[1:])
    for rep in range(p.repeat):
        for name in SUBJECTS:
            where = work / f"rep{rep + 1}" / name
            with Started(subjects.make(name, where, overrides=overrides, instances=fast_instances)) as subject:
                r = measure(subject, p, where)
            results[name].append(r)
            print(f"[{rep + 1}/{p.repeat}] {name}: " + ", ".join(
                f"{role} {us:.0f} µs" for role, us in r["cost"]["us_per_request"].items()), flush=True)
    o.out.mkdir(parents=True, exist_ok=True)
    (o.out / "request_cost.json").write_text(json.dumps(results, indent=1))
    (o.out / "request_cost.md").write_text(markdown(results, p, command.strip(), time.strftime("%Y-%m-%d %H:%M UTC")))
    r = ratios(results)
    print(f"fleet instance CPU per request ÷ bare Hello: {cell(r, 'ratio')} (target <= {TARGET:g}); "
          f"results: {o.out / 'request_cost.md'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
