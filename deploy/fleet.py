"""Run the fleet: the commands behind `make deploy-local`, `make stop`, `make status`, `make reload`.

    python -m deploy.fleet up        # render, start supervisord (or apply changes), wait for /healthz
    python -m deploy.fleet stop      # stop everything of this run dir and check no port is held
    python -m deploy.fleet status    # supervisor's states plus each instance's /healthz
    python -m deploy.fleet reload    # rolling restart, one instance at a time

Each command works on the run dir of the settings (.run/, or $FLEET_RUN_DIR), so several fleets
can run side by side on different ports.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import xmlrpc.client
from pathlib import Path

from deploy import apply, programs, render, rundir, store
from deploy.control import (HEALTH_TIMEOUT, FleetError, check_nginx, check_ports_free, diagnose, edge_url,  # noqa: F401
                            check_certs, client_context, get_json, health_urls, healthy, instance_url, nginx_test, process_info, process_infos, supervisor,
                            supervisord_pid, wait_healthy)
from deploy.control import check_installed
from deploy.procs import MEMBER_MARKER, processes_of
from services.common import metrics_reader, procfs
from services.common.inventory import host_port
from services.common.settings import Settings, SettingsError, load
from services.slow import cpu_priority


# commands --------------------------------------------------------------------------------------

def up(settings: Settings) -> None:
    if settings.inventory.runs("edge"):
        check_nginx()
    store.check(settings)
    check_certs(settings)
    if supervisord_pid(settings):
        apply_changes(settings)
    else:
        start(settings)
    wait_healthy(settings, degraded_ok=True)  # up, if a cluster it depends on is not (it says so)
    if not settings.inventory.single and not settings.inventory.runs("scheduler"):
        wait_workers_joined(settings)
    print_welcome(settings)


def wait_workers_joined(settings: Settings) -> None:
    """A workers host is up once the scheduler lists its workers; a scheduler that is not up yet
    (its host deploys later) is not this host's failure: they join when it comes."""
    ports = {c.name: c.port for c in programs.cluster_programs(settings)}
    for name in ports:
        try:
            apply.wait_dask_worker_joined(settings, name, ports)
        except FleetError as exc:
            print(f"warning: {exc}")
            return


def start(settings: Settings) -> None:
    check_ports_free(settings)
    cpu_priority.remove_recorded(settings.run_dir / cpu_priority.RECORD, patience=0)  # a last run's leftovers
    files = render.render(settings)
    render.write(settings, files)  # refuses a run dir or an edge.cache_dir that is not the fleet's
    clear_edge_cache(settings)
    if settings.inventory.runs("edge"):
        nginx_test(settings)
    for stale in ("supervisor.sock", "supervisord.pid"):
        (settings.run_dir / stale).unlink(missing_ok=True)
    conf = settings.run_dir / "supervisord.conf"
    # Every process of the fleet inherits this marker, workers included: `stop` finds leftovers by it.
    env = {**os.environ, MEMBER_MARKER: str(settings.run_dir)}
    subprocess.run([sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)], check=True, env=env)
    apply.write_manifest(settings.run_dir, apply.wanted_state(settings, files))
    deadline = time.monotonic() + 10
    while not supervisord_pid(settings):
        if time.monotonic() > deadline:
            raise FleetError(f"supervisord did not start; see {settings.run_dir}/logs/supervisord.log")
        time.sleep(0.1)
    print(f"started supervisord for {settings.run_dir}")


def apply_changes(settings: Settings, restart_instances: bool = False) -> list[apply.Reload]:
    """The fleet is up: re-render, and apply whatever changed without failing a request (apply.py).
    Returns the nginx reloads it made.

    restart_instances: restart every instance (one at a time) even if no setting changed, to pick
    up new code (make reload).
    """
    applied = apply.read_manifest(settings.run_dir)
    if applied is None:
        # Started by a version of deploy that kept no record of what runs: restart it once.
        print(f"no record of what runs in {settings.run_dir} ({apply.MANIFEST}): restarting the whole fleet once")
        stop(settings)
        start(settings)
        return []
    files = render.render(settings)
    reloads = apply.apply_changes(settings, files, applied, restart_instances)
    if reloads is None:
        print(f"fleet in {settings.run_dir} is up and matches deploy/fleet.toml: nothing to apply")
        return []
    return reloads


def rolling_restart(settings: Settings) -> list[apply.Reload]:
    """Restart every instance, one at a time, with no request failed or refused (make reload);
    the nginx reloads it made."""
    return apply_changes(settings, restart_instances=True)


def stop(settings: Settings) -> None:
    from deploy import observe  # it imports this module
    if observe.stop_running(settings.run_dir) is not None:  # `make observe`'s, before anything it scrapes
        print(f"stopped the Prometheus of {settings.run_dir} (make observe)")
    pid = supervisord_pid(settings)
    if pid is None:
        print(f"no fleet running in {settings.run_dir}")
    else:
        deadline = time.monotonic() + 30 + settings.fast.drain_timeout + settings.slow.drain_timeout
        rpc = supervisor(settings).supervisor
        stop_job_processes(settings, rpc)
        try:
            stop_programs_in_order(rpc, deadline)
        except (OSError, xmlrpc.client.Error) as exc:  # shutdown still stops what is left
            print(f"warning: stopping the programs tier by tier failed ({exc}); supervisord stops them")
        rpc.shutdown()
        while time.monotonic() < deadline and procfs.alive(pid):
            time.sleep(0.1)
        if procfs.alive(pid):
            os.kill(pid, signal.SIGKILL)
        print(f"stopped the fleet in {settings.run_dir}")
    leftovers = processes_of(settings.run_dir)
    for leftover in leftovers:  # only after a crash of supervisord itself: never leave one behind
        print(f"killing leftover process {leftover}: {procfs.cmdline(leftover)[:120]}")
        try:
            os.kill(leftover, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(procfs.alive(p) for p in leftovers):
        time.sleep(0.05)
    # The workers' idle cgroups: an instance removes its own as it stops, but not when it is killed.
    for group in cpu_priority.remove_recorded(settings.run_dir / cpu_priority.RECORD):
        pids = (Path(group) / "cgroup.procs").read_text().split() if Path(group).exists() else []
        held = ", ".join(f"{pid} ({procfs.cmdline(int(pid))[:60]})" for pid in pids) or "no process listed"
        print(f"warning: cgroup {group} could not be removed ({held}); the next stop or start tries again")
    clear_edge_cache(settings)
    try:
        check_ports_free(settings)
    except FleetError as exc:
        raise FleetError(f"after stop, {exc}") from None


NOT_RUNNING = 70  # supervisor's fault code (supervisor.xmlrpc.Faults): the program ended meanwhile
JOB_PROCESS_STOP_SECONDS = 10  # a job process's SIGTERM: its worker killed, its jobs' end written


def stop_job_processes(settings: Settings, rpc: xmlrpc.client.ServerProxy) -> None:
    """The runner first (it would start more), then its job processes, which supervisor does not
    run (they outlive the runner): each stops its jobs, failed `shutting_down` (retryable), while
    the store still runs. Whatever is left then goes with the leftovers."""
    for program in programs.programs(settings):
        if program.role == "runner":
            try:
                rpc.stopProcess(f"{program.name}:{program.name}", True)
            except xmlrpc.client.Fault as fault:
                if fault.faultCode != NOT_RUNNING:
                    raise
    job_processes = [pid for pid in processes_of(settings.run_dir) if "services.slow.job_process" in procfs.cmdline(pid)]
    for pid in job_processes:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + JOB_PROCESS_STOP_SECONDS
    while time.monotonic() < deadline and any(procfs.alive(pid) for pid in job_processes):
        time.sleep(0.05)
    if job_processes:
        print(f"stopped {len(job_processes)} job process(es): their jobs failed shutting_down (retryable)")


def stop_programs_in_order(rpc: xmlrpc.client.ServerProxy, deadline: float) -> None:
    """Stop every running program in supervisord's own shutdown order (highest priority first:
    nginx, the fast instances, the slow ones, the Dask workers, the scheduler), a whole tier at once,
    each program within its stopwaitsecs (supervisord sends SIGKILL after it).

    The same order as supervisord's shutdown, without its wait: it moves to the next tier only on
    a turn of its main loop, which sleeps up to 1 s when nothing else happens (supervisord.py, the
    poller's timeout), so a fleet with nothing to drain took 1 s per tier (2.7 s locally, measured).
    Asking for the states every 50 ms wakes that loop, which then reaps the stopped programs.
    """
    def in_states(*states: str) -> set[str]:
        return {f"{i['group']}:{i['name']}" for i in rpc.getAllProcessInfo() if i["statename"] in states}

    tiers: dict[int, set[str]] = {}
    for c in rpc.getAllConfigInfo():
        tiers.setdefault(c["group_prio"], set()).add(f"{c['group']}:{c['name']}")
    for priority in sorted(tiers, reverse=True):
        running = in_states("STARTING", "RUNNING", "BACKOFF") & tiers[priority]
        for name in sorted(running):
            try:
                rpc.stopProcess(name, False)  # wait=False: the whole tier drains at once
            except xmlrpc.client.Fault as fault:
                if fault.faultCode != NOT_RUNNING:
                    raise
        while running and time.monotonic() < deadline:
            time.sleep(0.05)
            running = in_states("STOPPING") & tiers[priority]


def clear_edge_cache(settings: Settings) -> None:
    """A fleet starts and stops with an empty edge cache, unless edge.cache_keep says otherwise.
    Only nginx's entries go, and only from a directory the fleet made and marked (render.py); a
    run dir another user could change is refused before anything is removed."""
    if settings.edge.cache_keep or not render.edge_cache_marked(settings):
        return
    rundir.check_not_writable_by_others(render.edge_cache_dir(settings), "edge.cache_dir")
    rundir.remove_tree(render.edge_cache_entries(settings))


def instance_figures(settings: Settings, port: int) -> dict[str, float]:
    """The figures `status` shows, read from an instance's /metrics."""
    with urllib.request.urlopen(instance_url(settings, port, "/metrics"), timeout=1,
                                context=client_context(settings)) as response:
        text = response.read().decode()
    values = {sample.name: sample.value for sample in metrics_reader.samples(text) if not sample.labels}
    lag_count = values.get("fleet_event_loop_lag_seconds_count", 0)
    values["lag_ms"] = 1000 * values.get("fleet_event_loop_lag_seconds_sum", 0) / lag_count if lag_count else 0
    return values


def status(settings: Settings) -> None:
    if not supervisord_pid(settings):
        print(f"no fleet running in {settings.run_dir}")
        return
    ports = {p.name: p.port for p in programs.programs(settings)}
    if not settings.inventory.single:
        host = settings.inventory.here
        print(f"host {host.name} ({host.address}): {', '.join(host.roles)}")
    print(f"{'process':<17} {'state':<9} {'pid':>7} {'uptime':>8} {'in flight':>9} {'busy/workers':>12} "
          f"{'queued':>6} {'loop lag':>9} {'blocked':>7}")
    for p in process_infos(settings):
        name = p["name"]
        running = p["statename"] == "RUNNING"
        line = (f"{name:<17} {p['statename']:<9} "
                f"{p['pid'] or '-':>7} {str(p['now'] - p['start']) + 's' if running else '-':>8}")
        if name in ports and running:
            try:
                v = instance_figures(settings, ports[name])
                slow = name.startswith("slow-")
                workers = f"{v['fleet_slow_workers_busy']:.0f}/{v['fleet_slow_workers']:.0f}" if slow else "-"
                queued = f"{v['fleet_slow_queue_depth']:.0f}" if slow else "-"
                line += (f" {v.get('fleet_http_requests_in_flight', 0):>9.0f} {workers:>12} {queued:>6} "
                         f"{v['lag_ms']:>7.1f}ms {v.get('fleet_event_loop_blocked_total', 0):>7.0f}")
            except (OSError, ValueError) as exc:
                line += f"  /metrics unreachable ({exc})"
        elif name.endswith("-spare") and not running:
            line += "  (runs only during make reload)"
        print(line)
    if settings.inventory.runs("edge"):
        answer = healthy(health_urls(settings)["edge"], degraded_ok=True)  # both paths (nginx.conf.j2)
        edge = "ok" if answer is True else f"degraded: {answer}" if answer else "not answering"
        print(f"edge {edge_url(settings)}: {edge}   (loop lag: mean probe delay; blocked: loops blocked past "
              f"{settings.observe.blocked_loop_ms} ms)")
    if settings.slow.backend == "dask" and settings.inventory.runs("slow"):
        print(cluster_line(settings))
    if settings.inventory.runs("slow"):
        print(compute_once_line(settings))
        print(jobs_line(settings))
    print(logs_line(settings))


def logs_line(settings: Settings) -> str:
    """What the run dir's logs hold now, and the most they can hold (observe.log_max_mb, log_backups)."""
    logs = settings.run_dir / "logs"
    used = sum(p.stat().st_size for p in logs.iterdir() if p.is_file()) if logs.exists() else 0
    return (f"logs: {used / 2**20:.1f} MiB in {logs}; at most about {render.log_bound_mb(settings):,} MiB "
            f"({render.log_count(settings)} logs x {settings.observe.log_max_mb} MiB x "
            f"{settings.observe.log_backups + 1} files)")


def compute_once_line(settings: Settings) -> str:
    """Requests that shared another's job (the slow instances' /metrics), and the edge cache's
    answers in the access log's latest lines."""
    shared = 0.0
    for _, port in settings.instances("slow"):
        try:
            with urllib.request.urlopen(instance_url(settings, port, "/metrics"), timeout=1,
                                        context=client_context(settings)) as r:
                shared += metrics_reader.total(r.read().decode(), "fleet_slow_coalesced_total")
        except (OSError, ValueError):
            pass
    line = f"compute once: {shared:.0f} request(s) shared a job in flight"
    log = settings.run_dir / "logs" / "nginx-access.log"
    if settings.inventory.runs("edge") and log.exists():
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - (2 << 20)))  # the latest 2 MiB: a glance, not an audit
            counts: dict[str, int] = {}
            for status in re.findall(rb'"cache":"([A-Z]+)"', f.read()):
                counts[status.decode()] = counts.get(status.decode(), 0) + 1
        if counts:
            line += "; edge cache, latest requests: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    return line


def jobs_line(settings: Settings) -> str:
    """This host's long jobs by state (its job store, as its runner last read it) and the event
    streams open on its slow instances."""
    def metrics_of(port: int) -> str | None:
        try:
            with urllib.request.urlopen(instance_url(settings, port, "/metrics"), timeout=1,
                                        context=client_context(settings)) as r:
                return r.read().decode()
        except (OSError, ValueError):
            return None

    by_state: dict[str, float] = {}
    for program in programs.programs(settings):
        text = metrics_of(program.port) if program.role == "runner" else None
        if text is not None:
            by_state = {s.labels["state"]: s.value for s in metrics_reader.samples(text) if s.name == "fleet_jobs"}
    streams = sum(metrics_reader.total(text, "fleet_jobs_streams_open")
                  for _, port in settings.instances("slow") if (text := metrics_of(port)) is not None)
    counts = ", ".join(f"{state} {value:.0f}" for state, value in by_state.items()) or "none read yet"
    return f"long jobs (this host's store): {counts}; event streams open: {streams:.0f}"


def cluster_line(settings: Settings) -> str:
    """The Dask cluster as the slow instances see it (and, when managed, as its scheduler counts)."""
    name, port = settings.instances("slow")[0]
    try:
        pool = get_json(instance_url(settings, port), timeout=2, context=client_context(settings))[1].get("pool", {})
    except OSError:
        pool = {}
    cluster = pool.get("cluster", {})
    waiting = 0
    for _, p in settings.instances("slow"):
        try:
            waiting += get_json(instance_url(settings, p), timeout=2, context=client_context(settings))[1].get("waiting", 0)
        except OSError:
            pass
    line = (f"dask cluster {cluster.get('scheduler', settings.dask.scheduler)}: "
            f"{'connected' if cluster.get('connected') else 'NOT CONNECTED (' + str(pool.get('problem')) + ')'}, "
            f"{cluster.get('workers', '?')} worker(s), {cluster.get('threads', '?')} thread(s)")
    if settings.dask.scheduler == "managed" and (settings.inventory.runs("scheduler") or settings.dask.expose_dashboards):
        # The scheduler's dashboard: this host's loopback, or its host's address when exposed.
        scheduler_host = settings.dashboard_address if settings.inventory.runs("scheduler") else \
            settings.role_hosts("scheduler")[0].address
        try:
            counts = get_json(f"http://{host_port(scheduler_host, settings.dask.dashboard_port)}/json/counts.json",
                              timeout=2)[1]
            line += f", {counts.get('processing', '?')} job(s) running"
        except OSError:
            line += ", scheduler not answering"
    return line + f", {waiting} waiting in the slow instances"


def print_welcome(settings: Settings) -> None:
    if not settings.inventory.single:
        print_host_welcome(settings)
        return
    url = edge_url(settings)
    fast = ", ".join(f"{n} :{p}" for n, p in settings.instances("fast"))
    slow = ", ".join(f"{n} :{p}" for n, p in settings.instances("slow"))
    if settings.slow.backend == "dask":
        d = settings.dask
        jobs = f"jobs on Dask, {settings.slow.queue_limit} may wait"
        cluster = (f"\n  dask: scheduler {settings.scheduler_address}, {d.workers} worker(s) x "
                   f"{d.threads_per_worker} thread(s); dashboard http://127.0.0.1:{d.dashboard_port}/status"
                   if d.scheduler == "managed" else f"\n  dask: the cluster at {d.scheduler}")
    else:
        jobs, cluster = f"{settings.slow.workers} workers each, {settings.slow.queue_limit} may wait", ""
    print(f"""
fleet is up: nginx {url}  (run dir {settings.run_dir})
  fast: {fast}
  slow: {slow}  ({jobs}){cluster}
try:
  curl -s {url}/fast
  curl -si {url}/slow/fib/25
stop it with: make stop""")


def print_host_welcome(settings: Settings) -> None:
    """What runs on this host of a fleet across hosts, and where the rest is."""
    host, edge = settings.inventory.here, settings.inventory.edge
    here = [p.name for p in programs.programs(settings) if not p.spare] + [c.name for c in programs.cluster_programs(settings)]
    if settings.inventory.runs("edge"):
        here.insert(0, "nginx")
    dashboard = ""
    if settings.inventory.runs("scheduler"):
        dashboard = f"\n  dask dashboard: http://{host_port(settings.dashboard_address, settings.dask.dashboard_port)}/status"
    print(f"""
host {host.name} ({host.address}) is up: {', '.join(here)}  (run dir {settings.run_dir})
  the fleet's edge: {edge_url(settings)} on {edge.name}; Dask scheduler {settings.scheduler_address}{dashboard}
stop this host's part with: make stop   (with the same FLEET_SETTINGS and FLEET_HOST)""")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.fleet", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "stop", "status", "reload", "render"])
    command = parser.parse_args(argv).command
    try:
        if command in ("up", "reload"):
            check_installed()  # systemd runs these: they start what `make install` installed, never install
        # stop and status work from the run dir's snapshot, which knows this machine's host.
        settings = load(any_host=command in ("stop", "status"))
        if command in ("stop", "status") and (settings.run_dir / "settings.json").exists():
            # What runs, as it was deployed (with whatever FLEET_* overrides it was given then).
            settings = Settings.from_snapshot(settings.run_dir / "settings.json")
        if command == "up":
            up(settings)
        elif command == "stop":
            stop(settings)
        elif command == "status":
            status(settings)
        elif command == "render":
            changed = render.write(settings)
            if settings.inventory.runs("edge"):
                nginx_test(settings)
            print(f"rendered into {settings.run_dir}: {', '.join(changed) or 'nothing changed'}")
        elif command == "reload":
            if not supervisord_pid(settings):
                raise FleetError(f"no fleet running in {settings.run_dir}: run make deploy-local")
            apply_changes(settings, restart_instances=True)
    except (SettingsError, FleetError, rundir.RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
