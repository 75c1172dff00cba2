"""The results: figures per repetition, their medians with min-max, the target table, the files.

    results.md    the tables (targets with pass/fail first), the method, the charts
    results.json  every repetition's raw measurements, the aggregates, the profile
    machine.md    cores, CPU model, kernel, versions of Python, nginx, tornado, wrk

What the machine is and which code ran are asked of the system by bench/machine.py; this module
only renders, so `python -m bench.report DIR` writes the same text again from DIR/results.json.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.load import LATE_BOUND_MS, kept_schedule
from bench.machine import machine
from bench.stats import Spread, ratio
from bench.subjects import DESCRIPTIONS, PEERS, PEERS_BEHIND_NGINX


# figures of one repetition ------------------------------------------------------------------------

# cpu.short_name's role for the job processes, a pool's or a Dask worker's: forked by a forkserver.
JOB_PROCESSES = "forkserver worker"


def figures(record: dict) -> dict[str, float | None]:
    """The figures the tables show, from one configuration's raw measurements in one repetition."""
    m = record.get("m") or {}
    f: dict[str, float | None] = {}
    for phase in ("idle", "flood"):
        cell = m.get(phase) or {}
        for key in ("p50", "p95", "p99", "rate", "lateness_p99"):
            f[f"{phase}_{key}"] = cell.get(key)
    # A ratio is judged only if the probe kept its schedule in both cells (load.LATE_BOUND_MS);
    # otherwise it is kept apart, shown with the lateness, and no target or comparison uses it.
    both = kept_schedule(f["idle_lateness_p99"]) and kept_schedule(f["flood_lateness_p99"])
    value = ratio(f["flood_p99"], f["idle_p99"])
    f["isolation"] = value if both else None
    f["isolation_not_judged"] = None if both else value
    f["flood_p99_judged"] = f["flood_p99"] if kept_schedule(f["flood_lateness_p99"]) else None
    f["probe_late_p99_worst"] = max((v for v in (f["idle_lateness_p99"], f["flood_lateness_p99"])
                                     if v is not None and not math.isnan(v)), default=None)
    rtt = m.get("rtt") or {}
    # The round trip proper: from each request's actual send to its answer, both paths in one run.
    f["rtt_fast_p50"] = (rtt.get("fast") or {}).get("service_p50")
    f["rtt_fib1_p50"] = (rtt.get("fib1") or {}).get("service_p50")
    f["rtt_ratio"] = ratio(f["rtt_fib1_p50"], f["rtt_fast_p50"])
    f["wrk_rps"] = (m.get("wrk") or {}).get("rps")
    f["heavy_jobs_s"] = (m.get("heavy") or {}).get("jobs_s")
    f["heavy_workers"] = m.get("workers") if f["heavy_jobs_s"] is not None else None
    f["flood_jobs_s"] = (m.get("flood_heavy") or {}).get("jobs_s")
    w1 = record.get("w1") or {}
    f["heavy_w1_jobs_s"] = w1.get("jobs_s")
    workers = m.get("workers")
    f["efficiency"] = ratio(f["heavy_jobs_s"], workers * f["heavy_w1_jobs_s"]) if workers and f["heavy_w1_jobs_s"] else None
    # What each job cost the configuration's processes with W workers: its own process, and the rest
    # (dispatching it: the slow instance, and on Dask the scheduler and the Dask worker). With one
    # worker that rest runs on a spare core while the worker waits; with W workers on W cores, what
    # of it runs while the other jobs compute is taken from them.
    heavy = m.get("heavy") or {}
    heavy_cpu = heavy.get("cpu_ms_per_job") or {}
    f["heavy_cpu_ms"] = sum(heavy_cpu.values()) if heavy_cpu else None
    f["heavy_job_cpu_ms"] = heavy_cpu.get(JOB_PROCESSES)
    f["heavy_dispatch_cpu_ms"] = (f["heavy_cpu_ms"] - f["heavy_job_cpu_ms"]
                                  if f["heavy_cpu_ms"] is not None and f["heavy_job_cpu_ms"] is not None else None)
    f["heavy_busy_cores"] = heavy.get("busy_cores")
    # With one worker, the time per job its worker did not spend computing: its dispatch round trip.
    w1_job_cpu = (w1.get("cpu_ms_per_job") or {}).get(JOB_PROCESSES)
    f["w1_wait_ms"] = (1000 / f["heavy_w1_jobs_s"] - w1_job_cpu
                       if f["heavy_w1_jobs_s"] and w1_job_cpu is not None else None)
    for when in ("idle", "load"):
        mem = m.get(f"memory_{when}") or {}
        f[f"rss_{when}"] = mem.get("rss_mb")
        f[f"pss_{when}"] = mem.get("pss_mb")
    f["processes"] = m.get("processes")
    waits = m.get("sched") or {}  # the fleets' fast path under perf sched (bench/sched.py)
    f["sched_waits_ms_s"] = waits.get("waits_ms_s")
    f["sched_behind_jobs_ms_s"] = (waits.get("behind") or {}).get(JOB_PROCESSES, 0.0) if "behind" in waits else None
    foreign = m.get("foreign_cores") or {}
    for phase in ("idle", "flood", "heavy", "wrk"):
        f[f"foreign_{phase}"] = foreign.get(phase)
    f["foreign_heavy_w1"] = w1.get("foreign_cores")
    return f


def cross_figures(records: list[dict]) -> dict[str, list[float]]:
    """Figures comparing two configurations, each from one repetition (same conditions)."""
    by_rep: dict[int, dict[str, dict]] = {}
    for r in records:
        by_rep.setdefault(r["rep"], {})[r["config"]] = figures(r)
    out: dict[str, list[float]] = {"fleet_over_pool_wrk": [], "dask_over_local_isolation": [],
                                   "fleet_over_floor_isolation": [], "fleet_flood_p99_over_lowest_other": [],
                                   "fleet_wrk_over_best_peer": [], "fleet_heavy_over_best_peer": []}
    for rep in sorted(by_rep):
        fleet = by_rep[rep].get("fleet") or {}
        value = ratio(fleet.get("isolation"), (by_rep[rep].get("floor") or {}).get("isolation"))
        if value is not None:
            out["fleet_over_floor_isolation"].append(value)
        # The others: every configuration with a heavy route but the fleet on its default pool.
        others = {n: f for n, f in by_rep[rep].items() if n not in ("fleet", "floor", "edge")}
        peers = {n: f for n, f in others.items() if n in PEERS_AND_BASELINES}
        for key, name, pick, among in (("flood_p99_judged", "fleet_flood_p99_over_lowest_other", min, others),
                                       ("wrk_rps", "fleet_wrk_over_best_peer", max, peers),
                                       ("heavy_jobs_s", "fleet_heavy_over_best_peer", max, peers)):
            values = [f[key] for f in among.values() if f.get(key) is not None]
            value = ratio(fleet.get(key), pick(values)) if values else None
            if value is not None:
                out[name].append(value)
        value = ratio((by_rep[rep].get("fleet") or {}).get("wrk_rps"), (by_rep[rep].get("pool") or {}).get("wrk_rps"))
        if value is not None:
            out["fleet_over_pool_wrk"].append(value)
        value = ratio((by_rep[rep].get("fleet-dask") or {}).get("isolation"),
                      (by_rep[rep].get("fleet") or {}).get("isolation"))
        if value is not None:
            out["dask_over_local_isolation"].append(value)
    return out


# What a user would run instead of the fleet, as it is and behind nginx.
PEERS_AND_BASELINES = ("naive", "pool", *PEERS, *PEERS_BEHIND_NGINX)


def aggregate(records: list[dict], configs: list[str]) -> dict:
    from bench import jobs  # it imports this module

    per_config: dict[str, dict[str, Spread | None]] = {}
    for name in configs:
        if name == "jobs":
            continue
        figs = [figures(r) for r in records if r["config"] == name and r.get("m")]
        keys = figs[0].keys() if figs else []
        per_config[name] = {k: Spread.of(f[k] for f in figs) for k in keys}
    cross = {k: Spread.of(v) for k, v in cross_figures(records).items()}
    return {"configs": per_config, "cross": cross, "jobs": jobs.aggregate(records) if "jobs" in configs else {}}


# targets ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    figure: str
    op: str  # "<=", "<" or ">="
    bound: float
    unit: str
    get: Callable[[dict], Spread | None]
    anchor: str
    # Judged on the worst repetition, not the median: a promise about every case ("each cancel",
    # "every id") that one repetition broke is broken.
    worst: bool = False
    # The configurations whose isolation the figure rests on: when it is missing because their
    # probe ran late, the verdict says "not judged" with the lateness, not "not measured".
    probed: tuple[str, ...] = ()
    scored: bool = True  # False: shown with its figures, not a target (issue 31's fast req/s row)

    def verdict(self, s: Spread | None, agg: dict | None = None) -> str:
        if not self.scored:
            return "not a target"
        if s is None:
            return self._not_judged(agg) or "not measured"
        if self.op == ">=":
            ok = (s.low if self.worst else s.median) >= self.bound
        else:
            value = s.high if self.worst else s.median
            ok = value < self.bound if self.op == "<" else value <= self.bound
        return "pass" if ok else "**FAIL**"

    def _not_judged(self, agg: dict | None) -> str | None:
        """Why a figure resting on isolation ratios is missing when every configuration it needs
        ran: in no repetition did the probe keep its schedule in all of their cells."""
        configs = (agg or {}).get("configs", {})
        if not self.probed or any(n not in configs for n in self.probed):
            return None
        late = {n: configs[n].get("probe_late_p99_worst") for n in self.probed
                if configs[n].get("isolation_not_judged") is not None}
        if not late:
            return None
        return (f"not judged: the probe sent late past {LATE_BOUND_MS:g} ms at p99 (up to "
                + ", ".join(f"{num(v.high if v else None)} ms in {n}'s" for n, v in late.items()) + " cells)")


def _fleet(key: str, config: str = "fleet") -> Callable[[dict], Spread | None]:
    return lambda agg: (agg["configs"].get(config) or {}).get(key)


def _dask_isolation_over_local(agg: dict) -> Spread | None:
    return agg["cross"].get("dask_over_local_isolation")


def _cross(key: str) -> Callable[[dict], Spread | None]:
    return lambda agg: agg["cross"].get(key)


TARGETS = [
    Target("isolation ratio, fleet (fast p99 under flood ÷ idle)", "<=", 1.2, "", _fleet("isolation"),
           "naive ≈ 1,000; pool ≈ 3.3", probed=("fleet",)),
    Target("fleet fast throughput via nginx ÷ pool process direct (wrk)", ">=", 1.5, "",
           lambda agg: agg["cross"].get("fleet_over_pool_wrk"), "≈ 1.3 with a first prototype"),
    Target("slow pool parallel efficiency, fleet (W workers vs 1)", ">=", 0.9, "", _fleet("efficiency"), ""),
    Target("trivial heavy round trip ÷ /fast p50, fleet (/slow/fib/1 vs /fast)", "<=", 1.5, "",
           _fleet("rtt_ratio"), "a Dask round trip ≈ 14 ms"),
    Target("whole fleet RSS at idle (defaults)", "<=", 250, " MB", _fleet("rss_idle"), ""),
    Target("Dask: trivial heavy round trip through the edge, p50 (/slow/fib/1)", "<=", 8, " ms",
           _fleet("rtt_fib1_p50", "fleet-dask"), "Dask's own ≈ 11 ms here; 14 ms in the source document"),
    Target("Dask: parallel efficiency (W Dask workers vs 1)", ">=", 0.9, "", _fleet("efficiency", "fleet-dask"), ""),
    Target("Dask: isolation ratio ÷ the local pool's, same repetition", "<=", 1.0, "", _dask_isolation_over_local,
           "no worse than the local pool", probed=("fleet", "fleet-dask")),
    Target("peers: fleet isolation ratio ÷ the floor's, same repetition", "<=", 1.2, "", _cross("fleet_over_floor_isolation"),
           "issues 12, 31: the floor is nginx + one Tornado Hello beside spinning burners", probed=("fleet", "floor")),
    Target("peers: fleet fast p99 under flood ÷ the lowest other subject's", "<=", 1.0, "",
           _cross("fleet_flood_p99_over_lowest_other"), "issue 12: lowest of all subjects"),
    Target("peers: fleet fast req/s (wrk) ÷ the best peer's", ">=", 1.0, "", _cross("fleet_wrk_over_best_peer"),
           "issue 31: not a target (a Tornado instance's CPU per request against uvicorn's; the fleet's against "
           "bare Tornado: [request_cost.md](request_cost.md))", scored=False),
    Target("peers: fleet heavy jobs/s ÷ the best peer's", ">=", 0.9, "", _cross("fleet_heavy_over_best_peer"),
           "issue 12"),
]


# formatting ---------------------------------------------------------------------------------------

def num(x: float | None, kind: str = "ms") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if kind == "ratio":
        return f"{x:.2f}"
    if kind == "int":
        return f"{x:,.0f}"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def cell(s: Spread | None, kind: str = "ms") -> str:
    if s is None:
        return "–"
    if s.n == 1:
        return num(s.median, kind)
    return f"{num(s.median, kind)} ({num(s.low, kind)}–{num(s.high, kind)})"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


NOISY_CORES = 0.25  # other programs using more than this during a phase make its figures suspect


def problems(records: list[dict]) -> list[str]:
    """Every failed request or failed run, so that no figure silently rests on errors."""
    notes = []
    for r in records:
        where = f"{r['config']} repetition {r['rep'] + 1}"
        if r.get("error"):
            notes.append(f"{where}: **run failed**: {r['error'].splitlines()[0][:300]}")
        if r.get("killed"):
            notes.append(f"{where}: {r['killed']} process(es) had to be SIGKILLed at the end")
        m = r.get("m") or {}
        cells = [("fast idle", m.get("idle")), ("fast under flood", m.get("flood"))]
        rtt = m.get("rtt") or {}
        cells += [("round trip /fast", rtt.get("fast")), ("round trip /slow/fib/1", rtt.get("fib1"))]
        for label, c in cells:
            if c and (c["non_200"] or c["errors"] or c["timeouts"]):
                notes.append(f"{where}, {label}: {c['ok']}/{c['sent']} answered 200; other statuses "
                             f"{c['non_200'] or 'none'}, connection errors {c['errors']}, "
                             f"unanswered {c['timeouts']} (counted as lower bounds in the percentiles)")
        for label, h in (("heavy clients during the flood", m.get("flood_heavy")), ("heavy throughput", m.get("heavy")),
                         ("heavy throughput with 1 worker", r.get("w1"))):
            if h and (h["non_200"] or h["errors"]):
                notes.append(f"{where}, {label}: statuses other than 200 {h['non_200'] or 'none'}, "
                             f"connection errors {h['errors']}")
        busy = {k: v for k, v in (m.get("foreign_cores") or {}).items() if v is not None and v > NOISY_CORES}
        w1_foreign = (r.get("w1") or {}).get("foreign_cores")
        if w1_foreign is not None and w1_foreign > NOISY_CORES:
            busy["heavy with 1 worker"] = w1_foreign
        if busy:
            notes.append(f"{where}: other programs used CPU during " + ", ".join(
                f"{phase} ({cores:.2f} cores)" for phase, cores in busy.items()) + ": figures of those phases are suspect")
        if (m.get("sched") or {}).get("error"):
            notes.append(f"{where}: whom the fast path waits behind was not measured: {m['sched']['error']}")
        w = m.get("wrk")
        if w and (w["non_2xx"] or w["socket_errors"]):
            notes.append(f"{where}, wrk: {w['non_2xx']} non-2xx answers, {w['socket_errors']} socket errors")
    return notes


def _median(agg: dict, config: str, key: str) -> float | None:
    s = (agg["configs"].get(config) or {}).get(key)
    return s.median if s is not None else None


def _best(agg: dict, key: str, among: tuple[str, ...], pick=max) -> tuple[str, float] | None:
    values = [(n, v) for n in among if (v := _median(agg, n, key)) is not None]
    return pick(values, key=lambda nv: nv[1]) if values else None


# First match wins: a pool's processes name the slow instance's modules in their command lines.
MEMORY_ROLES = (("forkserver", "worker pool (forkserver, workers, tracker)"),
                ("resource_tracker", "worker pool (forkserver, workers, tracker)"),
                ("services.fast", "fast instances"), ("services.slow", "slow instance"),
                ("services.runner", "job runner"), ("services.upstream", "upstream replicas (the stand-in backend)"),
                ("nginx_launch", "nginx launcher"), ("nginx", "nginx"), ("supervisord", "supervisord"))


def memory_by_role(process_list: list[str]) -> dict[str, float]:
    """RSS (MB) summed by role, from a record's process list ('pid rss MB command')."""
    out: dict[str, float] = {}
    for line in process_list:
        _, rss, _, command = line.split(" ", 3)
        role = next((name for needle, name in MEMORY_ROLES if needle in command), command[:30])
        out[role] = out.get(role, 0.0) + float(rss)
    return out


def memory_finding(records: list[dict]) -> list[str]:
    """Where the fleet's idle RSS goes, by role, from the first repetition that has it."""
    lists = [r["m"]["process_list"] for r in records if r["config"] == "fleet" and (r.get("m") or {}).get("process_list")]
    if not lists:
        return []
    roles = memory_by_role(lists[0])
    return ["- **Memory at idle, by role** (the fleet's RSS, first repetition): " + ", ".join(
        f"{name} {mb:.0f} MB" for name, mb in sorted(roles.items(), key=lambda kv: -kv[1]))
        + f"; {sum(roles.values()):.0f} MB in all. RSS counts the pages a forked family shares once per process."]


def peer_findings(agg: dict) -> list[str]:
    """The issue-12 figures next to what explains them, from this run's own measurements: the floor
    (the machine), the edge ceiling (nginx alone), and where each best peer's figure comes from."""
    fleet = lambda key: _median(agg, "fleet", key)  # noqa: E731
    floor = lambda key: _median(agg, "floor", key)  # noqa: E731
    if fleet("flood_p99") is None:
        return []
    lines = []
    if floor("isolation") is not None:
        lines.append(
            f"- **Isolation.** The floor (nginx and one Tornado Hello, beside W processes that only spin at the "
            f"fleet's worker priority) goes from p99 {num(floor('idle_p99'))} to {num(floor('flood_p99'))} ms "
            f"(ratio {num(floor('isolation'), 'ratio')}): that much is the machine, with no pool, no admission and "
            f"no job traffic. The fleet goes from {num(fleet('idle_p99'))} to {num(fleet('flood_p99'))} ms "
            f"(ratio {num(fleet('isolation'), 'ratio')}); the difference is what the fleet's path has and the "
            "floor's does not: jobs dispatched and results coming back through the slow instance, on the "
            "same busy cores."
            + (" A floor ratio below 1 is this machine's idle cost: a vCPU that idles wakes slowly, one kept "
               "busy by the burners does not." if (floor("isolation") or 1) < 1 else "")
            + (f" The probe kept its schedule in both: it sent late by {num(fleet('flood_lateness_p99'))} ms at p99 "
               f"under the fleet's flood, {num(floor('flood_lateness_p99'))} ms beside the floor's burners."
               if fleet("flood_lateness_p99") is not None else "")
            + (f" Whom the fleet's fast path waited behind meanwhile (the same flood under `perf sched`, waits "
               f"of more than 1 ms for a CPU by its instances and nginx's worker): {num(fleet('sched_waits_ms_s'))} "
               f"ms a second, {num(fleet('sched_behind_jobs_ms_s'))} of them behind job processes, niced and in "
               "an idle cpu cgroup, that kept a CPU a woken event loop wanted." if fleet("sched_waits_ms_s") is not None
               else ""))
    others = tuple(n for n in agg["configs"] if n not in ("fleet", "floor", "edge"))
    lowest = _best(agg, "flood_p99", others, min)
    if lowest is not None:
        lines.append(
            f"- **Fast p99 under the flood.** Lowest of the others: {lowest[0]}, {num(lowest[1])} ms; the fleet "
            f"{num(fleet('flood_p99'))} ms; the floor's {num(floor('flood_p99'))} ms is the least a path through "
            "nginx to a Tornado instance gets on these 2 cores while they are busy.")
    peers = tuple(n for n in PEERS_AND_BASELINES if n in agg["configs"])
    best_wrk = _best(agg, "wrk_rps", peers)
    if best_wrk is not None:
        lines.append(
            f"- **Fast throughput.** Best peer: {best_wrk[0]}, {num(best_wrk[1], 'int')} req/s; the fleet "
            f"{num(fleet('wrk_rps'), 'int')}; the floor (nginx + one instance) {num(floor('wrk_rps'), 'int')}; "
            f"nginx alone (edge ceiling) {num(_median(agg, 'edge', 'wrk_rps'), 'int')}. wrk shares the 2 cores: "
            "every request through nginx costs a second process's CPU on the same cores (the CPU split below), "
            "which servers answering the client directly do not pay.")
    best_heavy = _best(agg, "heavy_jobs_s", peers)
    if best_heavy is not None:
        lines.append(
            f"- **Heavy jobs/s.** Best peer: {best_heavy[0]}, {num(best_heavy[1])} jobs/s "
            f"(W={num(_median(agg, best_heavy[0], 'heavy_workers'), 'int')}); the fleet "
            f"{num(fleet('heavy_jobs_s'))} with W={num(fleet('heavy_workers'), 'int')} niced workers, which yield "
            "the CPU to every event loop.")
    dask = lambda key: _median(agg, "fleet-dask", key)  # noqa: E731
    if dask("efficiency") is not None and fleet("heavy_w1_jobs_s") is not None:
        workers = num(dask("heavy_workers"), "int")
        where = ""
        if dask("heavy_dispatch_cpu_ms") is not None and fleet("heavy_dispatch_cpu_ms") is not None:
            where = (
                f" Each job's own process took {num(dask('heavy_job_cpu_ms'))} ms of CPU; dispatching it took "
                f"{num(dask('heavy_dispatch_cpu_ms'))} ms more on Dask (scheduler, Dask worker, slow instance, nginx), "
                f"{num(fleet('heavy_dispatch_cpu_ms'))} ms on the local pool. With {workers} workers on {workers} cores "
                "there is no spare core: what dispatching runs while the other jobs compute is taken from them, and "
                f"the round trips' waits still leave cores idle (busy {num(dask('heavy_busy_cores'), 'ratio')} of "
                f"{workers}; the local pool {num(fleet('heavy_busy_cores'), 'ratio')}).")
        lines.append(
            f"- **Dask parallel efficiency** {num(dask('efficiency'), 'ratio')}. One Dask worker alone ran "
            f"{num(dask('heavy_w1_jobs_s'))} jobs/s where the local pool's one worker ran "
            f"{num(fleet('heavy_w1_jobs_s'))}: after each job it waits for the next one's round trip through the "
            f"scheduler ({num(dask('w1_wait_ms'))} ms a job; a trivial job's round trip through the edge: "
            f"{num(dask('rtt_fib1_p50'))} ms), its dispatching running on the spare core meanwhile." + where)
    return lines


def markdown(records: list[dict], agg: dict, configs: list[str], profile: dict, run: dict) -> str:
    from bench import jobs  # it renders its own section with this module's helpers

    main = [n for n in configs if n != "jobs"]  # the configurations measured by bench/phases.py
    out = [
        "# Benchmark: the fleet against the alternatives" if main else "# Benchmark: long jobs",
        "",
        f"Generated by `{run['command']}` on {run['date']} ({run['duration_s'] / 60:.1f} min, "
        f"profile `{profile['name']}`, {run['repeat']} repetition(s), configurations run interleaved within each "
        f"repetition). Each figure is the median over the repetitions with (min–max). Code: "
        f"{run.get('source', '?')}. Machine: [machine.md](machine.md).",
        "",
        *([f"**Not the defaults**: the fleet ran with {', '.join(f'`{k}={v}`' for k, v in run['fleet_env'].items())} "
           "(`--fleet-env`).", ""] if run.get("fleet_env") else []),
    ]
    if main:
        out += _main_sections(records, agg, main, profile, run)
    out += jobs.markdown(records, agg)
    notes = problems(records) + jobs.problems(records)
    out += ["## Failed requests and runs", ""]
    out += [f"- {n}" for n in notes] if notes else ["None: every request of every phase was answered 200."]
    out.append("")
    return "\n".join(out)


def _main_sections(records: list[dict], agg: dict, configs: list[str], profile: dict, run: dict) -> list[str]:
    C = agg["configs"]
    p = profile
    out = [
        "## Targets (issue 5; the Dask rows: issue 9; the peers' rows: issues 12 and 31)",
        "",
    ]
    rows = []
    for t in TARGETS:
        s = t.get(agg)
        rows.append([t.figure, f"{t.op} {t.bound:g}{t.unit}", cell(s, "ratio" if not t.unit else "ms") + t.unit,
                     t.verdict(s, agg), t.anchor or ""])
    out += [table(["figure", "target", "measured", "result", "anchors in the issue"], rows), ""]
    findings = peer_findings(agg) + memory_finding(records)
    if findings:
        out += ["### Against the peers and the floor: what the same run measured", "", *findings, ""]

    def row(name: str, keys: list[tuple[str, str]]) -> list[str]:
        return [f"**{name}**"] + [cell((C.get(name) or {}).get(k), kind) for k, kind in keys]

    out += [
        f"## Fast latency (ms), open loop at {p['rate']:g} req/s",
        "",
        f"GET /fast sent on a fixed schedule, latency counted from each request's **scheduled** send time "
        f"(no coordinated omission), {p['fast_samples']:,} requests per cell. Flood: {p['heavy_clients']} "
        f"clients looping `/slow/fib/{p['heavy_n']}` back to back, started {p['ramp']:g} s before the "
        f"measurement. Achieved rate: answers per second actually received. The floor's flood is "
        "W burners spinning at the fleet's worker priority (no heavy route). Probe late: how late the "
        "probe itself sent (p99 of each send's delay past its schedule); a repetition whose probe ran late "
        f"past {LATE_BOUND_MS:g} ms in either cell gives no isolation ratio (its ratio is in the next column, "
        "not judged): it measured the load generator as much as the subject.",
        "",
    ]
    lat_keys = [("idle_p50", "ms"), ("idle_p95", "ms"), ("idle_p99", "ms"), ("flood_p50", "ms"), ("flood_p95", "ms"),
                ("flood_p99", "ms"), ("isolation", "ratio"), ("isolation_not_judged", "ratio"),
                ("idle_rate", "ms"), ("flood_rate", "ms"),
                ("idle_lateness_p99", "ms"), ("flood_lateness_p99", "ms")]
    out += [table(["configuration", "idle p50", "idle p95", "idle p99", "flood p50", "flood p95", "flood p99",
                   "isolation (p99 flood ÷ idle)", "isolation, not judged (its probe late)",
                   "achieved req/s idle", "achieved req/s flood",
                   "probe late p99 idle", "probe late p99 flood"],
                  [row(n, lat_keys) for n in configs]), ""]
    out += [
        "## Throughput",
        "",
        f"Fast: `wrk -t1 -c32 -d{p['wrk_seconds']}s` on /fast (closed loop, saturation; wrk shares the 2 cores). "
        f"Heavy: {p['heavy_clients']} clients looping `/slow/fib/{p['heavy_n']}` for {p['heavy_seconds']:g} s, "
        "completed jobs per second, with the configuration's W workers and again with one worker; "
        "parallel efficiency = jobs/s(W) ÷ (W × jobs/s(1)). CPU per job, during the W-worker run: the job "
        "processes' CPU time ÷ the jobs completed, and every other process of the configuration's (dispatching "
        "the jobs: instances, nginx, a Dask scheduler and workers; the flood's clients excluded); cores busy: "
        "the configuration's CPU time ÷ the run's length.",
        "",
    ]
    thr_keys = [("wrk_rps", "int"), ("heavy_jobs_s", "ms"), ("heavy_w1_jobs_s", "ms"), ("efficiency", "ratio"),
                ("heavy_job_cpu_ms", "ms"), ("heavy_dispatch_cpu_ms", "ms"), ("heavy_busy_cores", "ratio"),
                ("flood_jobs_s", "ms")]
    thr_rows = []
    for n in configs:
        r = row(n, thr_keys)
        w = (C.get(n) or {}).get("heavy_jobs_s")
        workers = next((rec["m"].get("workers") for rec in records if rec["config"] == n and rec.get("m")), None)
        r[0] += f" (W={workers})" if workers and w else ""
        thr_rows.append(r)
    out += [table(["configuration", "fast req/s (wrk)", "heavy jobs/s (W workers)", "heavy jobs/s (1 worker)",
                   "parallel efficiency", "CPU per job: the job's process, ms", "CPU per job: dispatching it, ms",
                   "cores busy (W workers)", "heavy jobs/s during the latency flood"], thr_rows), ""]
    cross = agg["cross"].get("fleet_over_pool_wrk")
    if cross:
        out += [f"Fleet via nginx ÷ pool process direct, fast req/s: **{cell(cross, 'ratio')}** "
                "(ratio taken within each repetition).", ""]
    out += ["Where the 2 cores go during the wrk run (cores per process, median over the repetitions; "
            "the load generator is idle then):", ""]
    for n in configs:
        splits = [rec["m"].get("wrk_cpu_split") or {} for rec in records if rec["config"] == n and rec.get("m")]
        names = {name for split in splits for name in split}
        medians = {name: statistics.median(split.get(name, 0.0) for split in splits) for name in names}
        shown = [f"{name} {v:.2f}" for name, v in sorted(medians.items(), key=lambda kv: -kv[1]) if v >= 0.01]
        out.append(f"- **{n}**: " + (", ".join(shown) + f"; total {sum(medians.values()):.2f}" if shown else "–"))
    out.append("")
    out += [
        "## Round trip of a trivial heavy job",
        "",
        f"`/fast` and `/slow/fib/1` interleaved in one open-loop run ({p['rtt_rate']:g} req/s in all, "
        f"{p['rtt_samples'] // 2} of each), p50 of the time from each request's send to its answer (ms).",
        "",
        table(["configuration", "/fast p50", "/slow/fib/1 p50", "ratio"],
              [row(n, [("rtt_fast_p50", "ms"), ("rtt_fib1_p50", "ms"), ("rtt_ratio", "ratio")])
               for n in configs if (C.get(n) or {}).get("rtt_ratio")]),
        "",
        "## Memory (MB), every process of the configuration",
        "",
        "RSS counts shared pages once per process (forked families are over-counted); PSS shares them out, "
        "so its sum is what the configuration really occupies. Idle: after the warm-up; under load: the "
        f"largest of the samples taken every {p['memory_interval']:g} s during the heavy run and the wrk run (never while the probe measures). "
        "The fleet's processes: supervisord, nginx master and worker, the fast and slow instances, the slow "
        "instance's resource tracker, forkserver and workers.",
        "",
        table(["configuration", "processes", "RSS idle", "RSS under load", "PSS idle", "PSS under load"],
              [row(n, [("processes", "int"), ("rss_idle", "ms"), ("rss_load", "ms"), ("pss_idle", "ms"),
                       ("pss_load", "ms")]) for n in configs]),
        "",
        "## Other load on the machine",
        "",
        "Cores used by programs outside the bench during each phase (the machine's busy time minus the CPU "
        "time of the configuration's processes, the load generator and wrk). Above "
        f"{NOISY_CORES:g} the phase competed with something else and its figures are suspect; niced workers "
        "(the fleet's) lose the most to such competition.",
        "",
        table(["configuration", "fast idle", "fast under flood", "heavy (W workers)", "heavy (1 worker)", "wrk"],
              [row(n, [("foreign_idle", "ratio"), ("foreign_flood", "ratio"), ("foreign_heavy", "ratio"),
                       ("foreign_heavy_w1", "ratio"), ("foreign_wrk", "ratio")]) for n in configs]),
        "",
        "## Charts",
        "",
        "![fast latency, idle vs flood](latency.png)",
        "",
        "![throughput](throughput.png)",
        "",
        "![memory](memory.png)",
        "",
        *(["What each lever (niceness, SCHED_IDLE, worker and instance counts, uvloop, keep-alive, access "
            "log, unix sockets) buys, one at a time: [levers.md](levers.md) (`python -m bench.levers`).", ""]
          if run.get("levers") else []),
        "## Configurations",
        "",
    ]
    out += [f"- **{n}**: {DESCRIPTIONS[n]}" for n in configs]
    out += [
        "",
        "## Method notes",
        "",
        "- Everything runs on this machine over loopback, started and stopped by the bench; the fleet with "
        "deploy/fleet.toml's defaults (FLEET_* overrides in the environment are ignored) in a temp run dir "
        "on free ports, through `python -m deploy.fleet up` / `stop`.",
        "- The load behaves as remote clients would (bench/load.py). The flood's clients each run in a process "
        "of their own, from their own address (127.0.0.2, .3, ...: a flood is many users, and nginx's "
        "per-client limits would otherwise answer one address with 429s), at nice 19 while the probe "
        "measures (a remote client costs the server's cores nothing), and back off when refused (429, 503, "
        "a failed connection: 50 ms doubling to 1 s). The probe (an asyncio client on uvloop; a sender "
        "thread keeps the schedule) runs in a process of its own, as a real-time task (SCHED_FIFO 1), so "
        "that it never waits for the subject's CPU to send or to read.",
        f"- The probe's own delay before each send (its lateness) is part of every latency counted from the "
        f"scheduled time; each cell records its p99. A cell whose probe sent late past {LATE_BOUND_MS:g} ms at "
        "p99 is **not judged**: its figures are shown, and no target or comparison uses them (an isolation "
        "ratio needs both of its cells judged). results.json has every cell, with its service time from "
        "the actual send.",
        "- The machine is shared (other work may run at the same time): the repetitions' range shows the noise.",
        "",
    ]
    return out


# machine.md ---------------------------------------------------------------------------------------

def machine_markdown(info: dict, run: dict) -> str:
    rows = [
        ["cores", str(info["cores"])],
        ["CPU model", f"{info['cpu_model']} ({info['cpu_mhz']} MHz)"],
        ["memory", f"{info['memory_gib']} GiB"],
        ["OS", info["os"]],
        ["kernel", info["kernel"]],
        ["Python", info["python"]],
        ["nginx", info["nginx"]],
        ["tornado", info["tornado"]],
        ["supervisor", info["supervisor"]],
        ["wrk", info["wrk"]],
        ["matplotlib", info["matplotlib"]],
        ["load average before / after the run", f"{run['loadavg_before']} / {run['loadavg_after']}"],
        ["code measured", run.get("source", "?")],
    ]
    return "\n".join([
        "# The machine of the latest bench run",
        "",
        f"`{run['command']}`, {run['date']}; results in [results.md](results.md).",
        "",
        table(["", ""], rows),
        "",
    ])


# files --------------------------------------------------------------------------------------------

def _spread_dict(s: Spread | None) -> dict | None:
    return s.as_dict() if s is not None else None


def write(out: Path, records: list[dict], configs: list[str], profile: dict, run: dict) -> dict:
    agg = aggregate(records, configs)
    lateness = [((r.get("m") or {}).get(c) or {}).get("lateness_p50") for r in records for c in ("idle", "flood")]
    lateness = [x for x in lateness if x is not None]
    run["lateness_p50"] = sorted(lateness)[len(lateness) // 2] if lateness else float("nan")
    info = machine()
    run["levers"] = (out / "levers.md").exists()
    (out / "results.md").write_text(markdown(records, agg, configs, profile, run))
    (out / "machine.md").write_text(machine_markdown(info, run))
    data = {
        "run": run,
        "machine": info,
        "profile": profile,
        "targets": [{"figure": t.figure, "target": f"{t.op} {t.bound:g}", "measured": _spread_dict(t.get(agg)),
                     "result": t.verdict(t.get(agg), agg).strip("*").lower()} for t in judged(configs)],
        "aggregates": {
            "configs": {n: {k: _spread_dict(v) for k, v in figs.items()} for n, figs in agg["configs"].items()},
            "cross": {k: _spread_dict(v) for k, v in agg["cross"].items()},
            "jobs": {k: _spread_dict(v) for k, v in agg["jobs"].items()},
        },
        "records": records,
    }
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    return agg


def judged(configs: list[str]) -> list[Target]:
    """The targets of the configurations run: the main ones with any of bench/phases.py's, the long
    jobs' with `jobs`."""
    from bench import jobs

    return (TARGETS if any(n != "jobs" for n in configs) else []) + (jobs.TARGETS if "jobs" in configs else [])


def summary(agg: dict, configs: list[str]) -> str:
    """The target table for the terminal."""
    lines = []
    for t in judged(configs):
        s = t.get(agg)
        lines.append(f"  {t.figure:<72} {t.op} {t.bound:<6g} {cell(s, 'ratio' if not t.unit else 'ms') + t.unit:<24} {t.verdict(s, agg).strip('*')}")
    return "\n".join(lines)


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def render_again(out: Path) -> None:
    """results.md, machine.md and the charts again from results.json (after a change to the report)."""
    from bench import charts

    data = json.loads((out / "results.json").read_text())
    records, run, profile = data["records"], data["run"], data["profile"]
    configs = run["configs"]
    agg = aggregate(records, configs)
    (out / "results.md").write_text(markdown(records, agg, configs, profile, run))
    (out / "machine.md").write_text(machine_markdown(data["machine"], run))
    charted = [n for n in configs if n != "jobs"]
    if charted:
        charts.write(out, agg, charted, profile["rate"])


if __name__ == "__main__":
    import sys

    # python -m bench.report DIR: render DIR/results.md again from DIR/results.json
    render_again(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results")
