"""`make bench`: naive, pool, fleet (local pool and Dask) and the edge ceiling, side by side, with the
issues' targets; and long jobs against theirs (`jobs`, bench/jobs.py).

    .venv/bin/python -m bench [--quick] [--configs naive,pool,fleet,fleet-dask,edge,jobs] [--repeat N] [--out DIR]

Every configuration is started and stopped by the bench itself (by pid), on free loopback ports,
once per repetition; repetitions are interleaved (naive, pool, fleet, edge, naive, ...) so that
slow drifts of the machine spread over all of them. Results: DIR/results.md (tables, targets with
pass/fail), results.json (raw), machine.md, latency.png, throughput.png, memory.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import charts, cpu, jobs, machine, phases, report, subjects, wrk
from bench.subjects import CONFIGS, REPO, Subject

DEFAULT_OUT = REPO / "bench" / "results"
QUICK_OUT = REPO / "bench" / "results-quick"  # git-ignored: a smoke run never overwrites the results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 repetition, short phases (figures are indicative only)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated configurations to run (default: {','.join(CONFIGS)})")
    parser.add_argument("--repeat", type=int, help="repetitions per configuration (default: 3, --quick: 1)")
    parser.add_argument("--out", type=Path,
                        help=f"where to write the results (default: {DEFAULT_OUT.relative_to(REPO)}/, "
                             f"--quick: {QUICK_OUT.relative_to(REPO)}/)")
    parser.add_argument("--fleet-env", action="append", default=[], metavar="FLEET_KEY=VALUE",
                        help="run the fleet with this settings override (repeatable), to see what a lever "
                             "buys; the results then say so, and are not the defaults' figures")
    options = parser.parse_args(argv)
    overrides = {}
    for item in options.fleet_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("FLEET_"):
            parser.error(f"--fleet-env {item!r}: expected FLEET_<SECTION>_<KEY>=VALUE")
        overrides[key] = value
    options.fleet_env = overrides
    if overrides and options.out is None:
        parser.error("--fleet-env needs --out DIR: bench/results/ holds the figures of the defaults")
    names = [n.strip() for n in options.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        parser.error(f"--configs: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CONFIGS)}")
    options.configs = [n for n in CONFIGS if n in names]  # a fixed order, whatever was typed
    if options.repeat is not None and not 1 <= options.repeat <= 50:
        parser.error("--repeat must be 1-50")
    return options


def preflight(configs: list[str]) -> None:
    wrk.binary()  # raises with the install command
    if {"fleet", "edge", "jobs"} & set(configs):
        from bench.edge import nginx_binary
        if not Path(nginx_binary()).exists():
            raise RuntimeError("nginx is not installed: run `make bench` (its bootstrap installs it when root)")
    with socket.socket() as s:  # the flood's clients connect from 127.0.0.2, ...
        try:
            s.bind(("127.0.0.2", 0))
        except OSError as exc:
            raise RuntimeError(f"cannot bind 127.0.0.2 for the flood's clients: {exc}") from None


def scheduled(name: str, rep: int, asked_repeat: int | None, jobs_profile: jobs.Profile) -> bool:
    """Whether configuration `name` runs in repetition `rep` (from 0): every one in each, but the
    long jobs only in their first jobs.Profile.repetitions (it says why), unless --repeat says."""
    return name != "jobs" or rep < (asked_repeat or jobs_profile.repetitions)


class Bench:
    def __init__(self, profile: phases.Profile, workdir: Path, fleet_env: dict[str, str],
                 jobs_profile: jobs.Profile = jobs.FULL):
        self.profile = profile
        self.jobs_profile = jobs_profile
        self.workdir = workdir
        self.fleet_env = fleet_env
        self.live: list[Subject] = []  # started and not yet stopped: the cleanup's list

    def say(self, text: str) -> None:
        print(text, flush=True)

    def start(self, subject: Subject) -> None:
        self.live.append(subject)
        subject.start()

    def stop(self, subject: Subject) -> int:
        killed = subject.stop()
        if subject in self.live:
            self.live.remove(subject)
        return killed

    def stop_all(self) -> None:
        """Stop whatever is still running (after Ctrl-C or an error), with Ctrl-C held off meanwhile."""
        if not self.live:
            return
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        previous_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for subject in list(self.live):
                self.say(f"stopping {subject.name} ...")
                try:
                    self.stop(subject)
                except Exception as exc:  # keep stopping the others
                    self.say(f"  could not stop {subject.name}: {exc!r}")
        finally:
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, previous_term)

    def run_config(self, name: str, rep: int) -> dict:
        """Start one configuration, measure it, stop it; the same for its one-worker variant."""
        p = self.profile
        record: dict = {"config": name, "rep": rep, "loadavg": os.getloadavg()}
        started = time.monotonic()
        if p.quiet_wait:
            record["quiet_before"], record["quiet_waited_s"] = cpu.wait_quiet(p.quiet_wait, report.NOISY_CORES,
                                                                              say=self.say)
        if name == "jobs":
            subject = jobs.make_fleet(self.workdir / f"rep{rep + 1}" / name, self.fleet_env)
        else:
            subject = subjects.make(name, self.workdir / f"rep{rep + 1}" / name, overrides=self.fleet_env)
        try:
            self.start(subject)
            if name == "jobs":
                record["jobs"] = jobs.measure(subject, self.jobs_profile, say=lambda phase: self.say(f"    {phase}"))
            else:
                record["m"] = phases.measure(subject, p, say=lambda phase: self.say(f"    {phase}"))
        finally:
            record["killed"] = self.stop(subject)
        if p.one_worker_runs and name in ("pool", "fleet", "fleet-dask") and subject.workers and subject.workers > 1:
            self.say("    heavy throughput with one worker")
            one = subjects.make(name, self.workdir / f"rep{rep + 1}" / f"{name}-w1", workers=1,
                                overrides=self.fleet_env)
            try:
                self.start(one)
                record["w1"] = phases.heavy_only(one, p)
            finally:
                record["killed"] += self.stop(one)
        record["seconds"] = time.monotonic() - started
        return record


def one_line(record: dict) -> str:
    if record["config"] == "jobs":
        return jobs.one_line(record)
    f = report.figures(record)
    parts = [f"idle p99 {report.num(f['idle_p99'])} ms"]
    if f["flood_p99"] is not None:
        parts.append(f"flood p99 {report.num(f['flood_p99'])} ms (isolation {report.num(f['isolation'], 'ratio')})")
    parts.append(f"wrk {report.num(f['wrk_rps'], 'int')} req/s")
    if f["heavy_jobs_s"] is not None:
        parts.append(f"heavy {report.num(f['heavy_jobs_s'])} jobs/s")
    if f["efficiency"] is not None:
        parts.append(f"efficiency {report.num(f['efficiency'], 'ratio')}")
    if f["rtt_ratio"] is not None:
        parts.append(f"fib/1 ÷ fast {report.num(f['rtt_ratio'], 'ratio')}")
    parts.append(f"RSS {report.num(f['rss_idle'])} MB")
    return ", ".join(parts) + f"  [{record['seconds']:.0f} s]"


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    profile = phases.QUICK if options.quick else phases.FULL
    if options.repeat:
        profile = dataclasses.replace(profile, repeat=options.repeat)
    out = (options.out or (QUICK_OUT if options.quick else DEFAULT_OUT)).resolve()
    try:
        preflight(options.configs)
    except (RuntimeError, wrk.WrkMissing) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    run = {"command": command.strip(), "date": report.now(), "repeat": profile.repeat,
           "configs": options.configs, "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
           "source": machine.source(), "fleet_env": options.fleet_env}
    workdir = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    bench = Bench(profile, workdir, options.fleet_env, jobs.QUICK if options.quick else jobs.FULL)
    records: list[dict] = []
    failed = False
    began = time.monotonic()
    print(f"bench ({profile.name}): {', '.join(options.configs)}, {profile.repeat} repetition(s); "
          f"logs in {workdir}", flush=True)
    try:
        for rep in range(profile.repeat):
            for name in options.configs:
                if not scheduled(name, rep, options.repeat, bench.jobs_profile):
                    continue
                bench.say(f"[{rep + 1}/{profile.repeat}] {name}")
                try:
                    record = bench.run_config(name, rep)
                except Exception as exc:
                    failed = True
                    traceback.print_exc()
                    records.append({"config": name, "rep": rep, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                records.append(record)
                bench.say(f"  {name}: {one_line(record)}")
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything the bench started", file=sys.stderr, flush=True)
        bench.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
        return 130
    finally:
        bench.stop_all()
    run["duration_s"] = time.monotonic() - began
    run["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    agg = report.write(out, records, options.configs, dataclasses.asdict(profile), run)
    charted = [n for n in options.configs if n != "jobs"]
    if charted:
        charts.write(out, agg, charted, profile.rate)
    print(f"\ntargets (medians of {profile.repeat} repetition(s)):\n{report.summary(agg, options.configs)}")
    print(f"\nresults: {out / 'results.md'} (charts and machine.md beside it); took {run['duration_s']:.0f} s")
    if failed:
        print(f"some runs failed; their logs are kept in {workdir}", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
