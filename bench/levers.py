"""What each lever buys: quick A/B runs of the fleet with one thing changed, products files untouched.

    .venv/bin/python -m bench.levers [throughput] [nginx] [isolation] [rtt] [--rounds N] [--out FILE]

- throughput  wrk -t1 -c32 on /fast: the pool process direct, and fleets with settings levers
              (fast.event_loop asyncio vs uvloop, edge.worker_processes, fast.instances)
- nginx       wrk through copies of the fleet's own rendered nginx.conf, each with one change
              (access log off or unbuffered, no upstream keep-alive, unix sockets to the
              instances), in front of the same Tornado fast app run by a small wrapper
- isolation   fast p99 idle vs under the heavy flood for slow.nice 0/10/19 and slow.workers 1, and
              the Dask backend with its priority levers
- rtt         /slow/fib/1 vs /fast round trip for slow.event_loop asyncio vs uvloop
- sched       whom the fast path waits behind under the heavy flood, local pool against Dask:
              `perf sched record` while the probe runs, and each wait of more than 1 ms of the
              processes that serve or send /fast charged to the process that held that CPU

Variants are interleaved over `--rounds` rounds (medians reported), on free loopback ports, each
fleet started and stopped by pid like the bench's; the CPU other programs used is reported with
each figure, as in the bench. The product's files are never changed: settings levers go through
FLEET_* overrides, config levers through modified copies of a rendered nginx.conf in a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from bench import edge, phases, procs, sched, subjects, wrk
from bench.cpu import ForeignCpu
from bench.load import probe
from bench.report import JOB_PROCESSES

HOST = subjects.HOST

# A fast instance of the product's own app (services.fast.app.make_app) on a TCP port or a unix
# socket: what `listen` in nginx's upstream would point at if the fleet used unix sockets.
WRAPPER = textwrap.dedent("""
    import asyncio, sys
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_unix_socket
    from services.common import server
    from services.fast.app import make_app
    settings, number, where = sys.argv[1], sys.argv[2], sys.argv[3]
    instance = server.parse_args("fast", ["--settings", settings, "--instance", number])
    async def main():
        http = HTTPServer(make_app(instance), xheaders=True, idle_connection_timeout=75)
        if where.startswith("/"):
            http.add_socket(bind_unix_socket(where, mode=0o666))
        else:
            http.listen(int(where), address="127.0.0.1")
        await asyncio.Event().wait()
    server.run(instance, main)
""")


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def wrk_rps(port: int, processes, seconds: int = 5) -> tuple[float, float | None]:
    """(requests/s, cores other programs used meanwhile); `processes` lists the ones under test."""
    wrk.run(f"http://{HOST}:{port}/fast", 1)  # warm-up
    with ForeignCpu(processes) as foreign:
        rps = wrk.run(f"http://{HOST}:{port}/fast", seconds)["rps"]
    return rps, foreign.cores


class Started:
    """Start a subject (or a list of popens) and always stop it."""

    def __init__(self, subject: subjects.Subject):
        self.subject = subject

    def __enter__(self) -> subjects.Subject:
        try:
            self.subject.start()
        except BaseException:
            self.subject.stop()
            raise
        return self.subject

    def __exit__(self, *exc: object) -> None:
        self.subject.stop()


KERNEL_SLICE = {"FLEET_FAST_SCHED_SLICE_US": "0"}  # the fast path without its short time slice


def throughput(rounds: int, work: Path) -> dict:
    variants = {
        "pool process direct (asyncio)": ("pool", {}),
        "fleet defaults": ("fleet", {}),
        "fleet, fast.event_loop=asyncio": ("fleet", {"FLEET_FAST_EVENT_LOOP": "asyncio"}),
        "fleet, fast.sched_slice_us=0": ("fleet", KERNEL_SLICE),
        "fleet, edge.worker_processes=2": ("fleet", {"FLEET_EDGE_WORKER_PROCESSES": "2"}),
        "fleet, fast.instances=1": ("fleet", {"FLEET_FAST_INSTANCES": "1"}),
        "fleet, fast.instances=3": ("fleet", {"FLEET_FAST_INSTANCES": "3"}),
    }
    results: dict[str, list] = {name: [] for name in variants}
    for r in range(rounds):
        for name, (config, env) in variants.items():
            subject = subjects.make(config, work / f"thr{r}-{len(results[name])}-{config}", overrides=env)
            with Started(subject):
                results[name].append(wrk_rps(subject.port, subject.processes))
            print(f"  throughput round {r + 1}: {name}: {results[name][-1][0]:,.0f} req/s "
                  f"(others {results[name][-1][1]:.2f} cores)", flush=True)
    return {name: {"rps": median([x[0] for x in xs]), "foreign_cores": median([x[1] for x in xs]),
                   "runs": xs} for name, xs in results.items()}


def nginx_variants(rounds: int, work: Path) -> dict:
    """The fleet's own nginx.conf, copied with one change at a time, in front of wrapper instances."""
    fleet = subjects.make("fleet", work / "nginx-fleet")
    out: dict[str, list] = {}
    with Started(fleet):
        rendered = (fleet.run_dir / "nginx" / "conf" / "nginx.conf").read_text()
        snapshot = str(fleet.run_dir / "settings.json")
        base = procs.free_port_block(3)
        # nginx's workers run as nobody when the master is root: they must reach the sockets
        socket_dir = work / "sockets"
        socket_dir.mkdir()
        socket_dir.chmod(0o755)
        work.chmod(0o711)
        sockets = [str(socket_dir / f"fast-{i}.sock") for i in (1, 2)]
        wrappers = []
        try:
            for i, where in enumerate([str(base + 1), str(base + 2), *sockets]):
                log = work / f"wrapper-{i}.log"
                popen = procs.spawn([sys.executable, "-c", WRAPPER, snapshot, str(i % 2 + 1), where], log,
                                    env=subjects.clean_env(), cwd=subjects.REPO)
                wrappers.append(popen)
            for port in (base + 1, base + 2):
                procs.wait_http(f"http://{HOST}:{port}/healthz", 30)
            time.sleep(0.5)  # the unix-socket wrappers start alongside
            def under_test(nginx=None) -> list[int]:
                pids = [pid for w in wrappers for pid in procs.tree(w.pid)] + fleet.processes()
                return pids + (procs.tree(nginx.pid) if nginx is not None else [])

            tcp = [f"127.0.0.1:{base + 1}", f"127.0.0.1:{base + 2}"]
            unix = [f"unix:{s}" for s in sockets]
            variants = {
                "copy of the fleet's nginx.conf (TCP, keep-alive, buffered JSON log)": dict(servers=tcp),
                "access_log off": dict(servers=tcp, access="off"),
                "access_log unbuffered": dict(servers=tcp, access="unbuffered"),
                "no upstream keep-alive": dict(servers=tcp, keepalive=False),
                "unix sockets to the instances": dict(servers=unix),
            }
            out = {name: [] for name in variants}
            for r in range(rounds):
                for name, change in variants.items():
                    directory = work / f"nginx-{r}-{list(variants).index(name)}"
                    port = procs.free_port_block(1)
                    conf = variant_conf(rendered, fleet, directory, port, **change)
                    (directory / "nginx.conf").write_text(conf)
                    popen = procs.spawn(edge.command(directory), directory / "nginx.log", env=subjects.clean_env(),
                                        cwd=directory)
                    try:
                        procs.wait_http(f"http://{HOST}:{port}/fast", 20, popen, directory / "nginx.log")
                        out[name].append(wrk_rps(port, lambda: under_test(popen)))
                    finally:
                        procs.stop(procs.identify(procs.tree(popen.pid)), grace=5)
                        procs.reap(popen)
                    print(f"  nginx round {r + 1}: {name}: {out[name][-1][0]:,.0f} req/s "
                          f"(others {out[name][-1][1]:.2f} cores)", flush=True)
            # the instances direct, for the cost of the edge itself
            out["one wrapper instance direct (no nginx)"] = [wrk_rps(base + 1, lambda: under_test())
                                                             for _ in range(rounds)]
        finally:
            for popen in wrappers:
                procs.stop(procs.identify(procs.tree(popen.pid)), grace=5)
                procs.reap(popen)
    return {name: {"rps": median([x[0] for x in xs]), "foreign_cores": median([x[1] for x in xs]), "runs": xs}
            for name, xs in out.items()}


def variant_conf(text: str, fleet: subjects.Fleet, directory: Path, port: int, servers: list[str],
                 access: str = "buffered", keepalive: bool = True) -> str:
    run = str(fleet.run_dir)
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / "temp" / sub).mkdir(parents=True, exist_ok=True)
    text = text.replace(f"{run}/nginx/temp", f"{directory}/temp")
    text = re.sub(r"^pid .*$", f"pid {directory}/nginx.pid;", text, flags=re.M)
    text = re.sub(r"^error_log .*$", "error_log stderr warn;", text, flags=re.M)
    text = re.sub(r"listen 127\.0\.0\.1:\d+ default_server;", f"listen 127.0.0.1:{port} default_server;", text)
    # The fleet's access logs (answered, refused) become the variant's one, in its own directory.
    access_line, *others = re.findall(r"^\s*access_log .*$", text, flags=re.M)
    for line in others:
        text = text.replace(line + "\n", "")
    if access == "off":
        new = "    access_log off;"
    elif access == "unbuffered":
        new = f"    access_log {directory}/access.log fleet_json;"
    else:
        new = f"    access_log {directory}/access.log fleet_json buffer=64k flush=1s;"
    text = text.replace(access_line, new)
    fast_block = re.search(r"upstream fast \{.*?\n    \}", text, flags=re.S).group(0)
    lines = [f"        server {s} max_fails=1 fail_timeout=2s;" for s in servers]
    if keepalive:
        lines += ["        keepalive 32;", "        keepalive_timeout 4s;", "        keepalive_requests 100000;"]
    text = text.replace(fast_block, "upstream fast {\n" + "\n".join(lines) + "\n    }")
    return text


def isolation(rounds: int, work: Path, samples: int = 2000) -> dict:
    variants = {  # name: (configuration, settings overrides)
        "fleet defaults (slow.nice=10)": ("fleet", {}),
        "slow.nice=0": ("fleet", {"FLEET_SLOW_NICE": "0"}),
        "slow.nice=19": ("fleet", {"FLEET_SLOW_NICE": "19"}),
        "slow.sched_idle=true": ("fleet", {"FLEET_SLOW_SCHED_IDLE": "true"}),
        "slow.workers=1 (one core left to the fast path)": ("fleet", {"FLEET_SLOW_WORKERS": "1"}),
        # The Dask backend's gap to the local pool (README, Benchmark), and what did not close it.
        "fleet-dask defaults (slow.sched_idle=auto: true)": ("fleet-dask", {}),
        "fleet-dask, slow.instance_nice=19": ("fleet-dask", {"FLEET_SLOW_INSTANCE_NICE": "19"}),
        "fleet-dask, slow.sched_idle=false": ("fleet-dask", {"FLEET_SLOW_SCHED_IDLE": "false"}),
        "fleet-dask, slow.idle_cgroup=false": ("fleet-dask", {"FLEET_SLOW_IDLE_CGROUP": "false"}),
    }
    p = phases.FULL
    out: dict[str, list] = {name: [] for name in variants}
    for r in range(rounds):
        for name, (config, env) in variants.items():
            subject = subjects.make(config, work / f"iso{r}-{list(variants).index(name)}", overrides=env)
            with Started(subject):
                asyncio.run(phases.warm_up(subject, p.heavy_n))
                with ForeignCpu(subject.processes) as f_idle:
                    idle = asyncio.run(probe(HOST, subject.port, ["/fast"], p.rate, samples, p.drain_timeout))["/fast"]
                with ForeignCpu(subject.processes) as f_flood:
                    flood, jobs = asyncio.run(phases.fast_flood(subject, p))
            i, f = phases.summarize(idle), phases.summarize(flood)
            out[name].append({"idle_p99": i["p99"], "flood_p99": f["p99"], "idle_p50": i["p50"], "flood_p50": f["p50"],
                              "isolation": f["p99"] / i["p99"], "flood_jobs_s": jobs["jobs_s"],
                              "foreign_idle": f_idle.cores, "foreign_flood": f_flood.cores})
            x = out[name][-1]
            print(f"  isolation round {r + 1}: {name}: p99 {x['idle_p99']:.2f} -> {x['flood_p99']:.2f} ms "
                  f"(ratio {x['isolation']:.2f}), {x['flood_jobs_s']:.0f} jobs/s, others "
                  f"{x['foreign_idle']:.2f}/{x['foreign_flood']:.2f} cores", flush=True)
    return {name: {k: median([x[k] for x in xs]) for k in xs[0]} | {"runs": xs} for name, xs in out.items()}


def rtt(rounds: int, work: Path) -> dict:
    variants = {"fleet defaults (slow.event_loop=uvloop)": {},
                "slow.event_loop=asyncio": {"FLEET_SLOW_EVENT_LOOP": "asyncio"}}
    out: dict[str, list] = {name: [] for name in variants}
    for r in range(rounds):
        for name, env in variants.items():
            subject = subjects.make("fleet", work / f"rtt{r}-{list(variants).index(name)}", overrides=env)
            with Started(subject):
                asyncio.run(phases.warm_up(subject, 27))
                with ForeignCpu(subject.processes) as foreign:
                    res = asyncio.run(probe(HOST, subject.port, ["/fast", "/slow/fib/1"], 80, 400, 20))
            fast, fib = phases.summarize(res["/fast"]), phases.summarize(res["/slow/fib/1"])
            out[name].append({"fast_p50": fast["service_p50"], "fib1_p50": fib["service_p50"],
                              "ratio": fib["service_p50"] / fast["service_p50"], "foreign": foreign.cores})
            x = out[name][-1]
            print(f"  rtt round {r + 1}: {name}: {x['fib1_p50']:.2f} / {x['fast_p50']:.2f} ms = {x['ratio']:.2f}",
                  flush=True)
    return {name: {k: median([x[k] for x in xs]) for k in xs[0]} | {"runs": xs} for name, xs in out.items()}


def sched_waits(rounds: int, work: Path, seconds: float = 8.0, longer_than_ms: float = 1.0) -> dict:
    variants = {"fleet defaults": ("fleet", {}),
                "fleet, fast.sched_slice_us=0": ("fleet", KERNEL_SLICE),
                "fleet-dask defaults": ("fleet-dask", {}),
                "fleet-dask, fast.sched_slice_us=0": ("fleet-dask", KERNEL_SLICE)}
    p = phases.FULL
    out: dict[str, list] = {name: [] for name in variants}
    for r in range(rounds):
        for i, (name, (config, env)) in enumerate(variants.items()):
            subject = subjects.make(config, work / f"sched{r}-{i}", overrides=env)
            trace = work / f"sched{r}-{i}.data"
            with Started(subject):
                asyncio.run(phases.warm_up(subject, p.heavy_n))
                flood_p99, waits = sched.flood_waits(subject, p, trace, seconds, longer_than_ms)
            total = sum(waits.values())
            x = {"flood_p99": flood_p99, "waits_ms_s": total / seconds,
                 "behind_jobs_ms_s": waits.get(JOB_PROCESSES, 0.0) / seconds,
                 "behind": {holder: round(ms / seconds, 2) for holder, ms in sorted(waits.items(), key=lambda kv: -kv[1])[:6]}}
            out[name].append(x)
            print(f"  sched round {r + 1}: {name}: flood p99 {flood_p99:.2f} ms; the fast path waited "
                  f"{x['waits_ms_s']:.1f} ms/s in waits > {longer_than_ms:g} ms, behind {x['behind']}", flush=True)
    return {name: {k: median([x[k] for x in xs]) for k in ("flood_p99", "waits_ms_s", "behind_jobs_ms_s")}
            | {"runs": xs} for name, xs in out.items()}


COLUMNS = {
    "throughput": [("rps", "fast req/s (wrk -t1 -c32)", "{:,.0f}"), ("foreign_cores", "others' cores", "{:.2f}")],
    "nginx": [("rps", "fast req/s (wrk -t1 -c32)", "{:,.0f}"), ("foreign_cores", "others' cores", "{:.2f}")],
    "isolation": [("idle_p99", "idle p99 ms", "{:.2f}"), ("flood_p99", "flood p99 ms", "{:.2f}"),
                  ("isolation", "isolation ratio", "{:.2f}"), ("flood_jobs_s", "heavy jobs/s in the flood", "{:.0f}"),
                  ("foreign_idle", "others' cores idle", "{:.2f}"), ("foreign_flood", "others' cores flood", "{:.2f}")],
    "rtt": [("fast_p50", "/fast p50 ms", "{:.2f}"), ("fib1_p50", "/slow/fib/1 p50 ms", "{:.2f}"),
            ("ratio", "ratio", "{:.2f}"), ("foreign", "others' cores", "{:.2f}")],
    "sched": [("flood_p99", "flood p99 ms", "{:.2f}"),
              ("waits_ms_s", "fast path's waits > 1 ms, ms per s", "{:.1f}"),
              ("behind_jobs_ms_s", "of it behind job processes", "{:.1f}")],
}


def markdown(results: dict, rounds: int) -> str:
    from bench.machine import machine, source
    from bench.report import now, table

    info = machine()
    out = ["# What each lever buys (bench/levers.py)", "",
           f"`python -m bench.levers` on {now()}, {source()}; {info['cores']} cores, {info['cpu_model']}. "
           f"Medians of {rounds} interleaved round(s); \"others' cores\": CPU used meanwhile by programs "
           "outside the experiment (above 0.25 the figure is suspect). Indicative A/B figures, one lever at a "
           "time; bench/results/results.md has the defaults' full figures.", ""]
    for name, figures in results.items():
        cols = COLUMNS[name]
        rows = [[variant] + [fmt.format(f[k]) if isinstance(f.get(k), (int, float)) else "–" for k, _, fmt in cols]
                for variant, f in figures.items()]
        out += [f"## {name}", "", table(["variant"] + [label for _, label, _ in cols], rows), ""]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.levers", description=__doc__.split("\n")[0])
    parser.add_argument("which", nargs="*", help="throughput, nginx, isolation, rtt, sched (default: all but sched)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--md", type=Path, help="write the figures as a markdown page here")
    options = parser.parse_args()
    options.which = options.which or ["throughput", "nginx", "isolation", "rtt"]
    unknown = set(options.which) - {"throughput", "nginx", "isolation", "rtt", "sched"}
    if unknown:
        parser.error(f"unknown experiment(s): {', '.join(sorted(unknown))}")
    work = Path(tempfile.mkdtemp(prefix="fleet-levers-"))
    results = {}
    experiments = {"throughput": throughput, "nginx": nginx_variants, "isolation": isolation, "rtt": rtt,
                   "sched": sched_waits}
    try:
        for name in options.which:
            print(f"{name}:", flush=True)
            results[name] = experiments[name](options.rounds, work)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        print(f"failed; logs kept in {work}", file=sys.stderr)
        raise
    subprocess.run(["rm", "-rf", str(work)])
    text = json.dumps(results, indent=1, default=str)
    if options.out:
        options.out.write_text(text + "\n")
    if options.md:
        options.md.write_text(markdown(results, options.rounds))
    for name, figures in results.items():
        print(f"\n{name}:")
        for variant, f in figures.items():
            print(f"  {variant:<70} " + ", ".join(f"{k} {v:.2f}" for k, v in f.items() if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
