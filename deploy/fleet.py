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
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xmlrpc.client
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

from deploy import render
from deploy.procs import MEMBER_MARKER, alive, cmdline, processes_of, worker_pids
from services.common.settings import Settings, SettingsError, load

HEALTH_TIMEOUT = 60  # seconds `up` waits for every instance to answer /healthz


class FleetError(RuntimeError):
    """Something the user must fix; printed without a traceback."""


# supervisord -----------------------------------------------------------------------------------

def supervisor(settings: Settings) -> xmlrpc.client.ServerProxy:
    sock = settings.run_dir / "supervisor.sock"
    transport = SupervisorTransport(None, None, f"unix://{sock}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def supervisord_pid(settings: Settings) -> int | None:
    """The pid of this run dir's supervisord if it is running, else None."""
    try:
        pid = int((settings.run_dir / "supervisord.pid").read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None  # no pid file, or a stale one whose pid is gone or belongs to someone else
    try:
        supervisor(settings).supervisor.getPID()
    except (OSError, xmlrpc.client.Fault):
        return None  # a pid that was reused by another process, or a supervisord not answering
    return pid


def process_infos(settings: Settings) -> list[dict]:
    return supervisor(settings).supervisor.getAllProcessInfo()


def process_info(settings: Settings, name: str) -> dict:
    """supervisor's view of one process by its name ("fast-01", "slow-spare", "nginx")."""
    group = name if name == "nginx" or name.endswith("-spare") else name.rsplit("-", 1)[0]
    return supervisor(settings).supervisor.getProcessInfo(f"{group}:{name}")


# preflight -------------------------------------------------------------------------------------

def check_ports_free(settings: Settings) -> None:
    wanted = [("edge", settings.edge.bind, settings.edge.port, "FLEET_EDGE_PORT")]
    for role in ("fast", "slow"):
        wanted += [(name, "127.0.0.1", port, f"FLEET_{role.upper()}_BASE_PORT")
                   for name, port in settings.instances(role) + [settings.spare(role)]]
    for name, host, port, knob in wanted:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nginx and Tornado do
            try:
                s.bind((host, port))
            except OSError:
                raise FleetError(
                    f"port {port} ({name}) on {host} is taken by another program; stop it, or "
                    f"choose other ports, e.g. {knob}={port + 1000} make deploy-local"
                ) from None


def check_nginx() -> None:
    if not Path(render.nginx_binary()).exists():
        raise FleetError("nginx is not installed: run `sudo apt-get install nginx-light` "
                         "(make deploy-local does it when run as root)")


def nginx_test(settings: Settings) -> None:
    run = settings.run_dir
    result = subprocess.run(
        [render.nginx_binary(), "-t", "-q", "-p", f"{run}/nginx/", "-c", "conf/nginx.conf",
         "-e", f"{run}/logs/nginx-error.log"],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise FleetError(f"nginx rejected the rendered config:\n{result.stderr.strip()}")


# health ----------------------------------------------------------------------------------------

def get_json(url: str, timeout: float = 2) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {}


def health_urls(settings: Settings) -> dict[str, str]:
    """/healthz of every instance and of the edge (spares included: they answer only when up)."""
    urls = {name: f"http://127.0.0.1:{port}/healthz"
            for role in ("fast", "slow") for name, port in settings.instances(role) + [settings.spare(role)]}
    urls["edge"] = f"{edge_url(settings)}/healthz"
    return urls


def edge_url(settings: Settings) -> str:
    host = settings.edge.bind
    host = "127.0.0.1" if host == "0.0.0.0" else f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.edge.port}"


def healthy(url: str, name: str | None = None) -> bool:
    """200 from /healthz, and from the instance asked for (not another fleet's on a reused port)."""
    try:
        status, body = get_json(url, timeout=1)
    except (OSError, ValueError):
        return False
    return status == 200 and (name is None or body.get("instance") == name)


def wait_healthy(settings: Settings, names: list[str] | None = None, timeout: float = HEALTH_TIMEOUT) -> None:
    """Wait until the named instances (default: all, and the edge) answer /healthz with 200."""
    urls = health_urls(settings)
    pending = {n: urls[n] for n in (names or [n for n in urls if not n.endswith("-spare")])}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = {n: u for n, u in pending.items() if not healthy(u, None if n == "edge" else n)}
        if not pending:
            return
        broken = [p for p in process_infos(settings) if p["statename"] in ("FATAL", "BACKOFF")]
        if broken and any(p["statename"] == "FATAL" for p in broken):
            break
        time.sleep(0.2)
    if pending:
        raise FleetError(f"not healthy after {timeout:.0f} s: {', '.join(pending)}\n" + diagnose(settings))


def diagnose(settings: Settings) -> str:
    lines = []
    for p in process_infos(settings):
        lines.append(f"  {p['group']}:{p['name']:<10} {p['statename']:<9} {p['description']}")
        if p["statename"] != "RUNNING":
            log = settings.run_dir / "logs" / f"{p['name']}.log"
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-5:]
                lines += [f"    | {line[:200]}" for line in tail]
    return "\n".join(lines)


# commands --------------------------------------------------------------------------------------

def up(settings: Settings) -> None:
    check_nginx()
    if supervisord_pid(settings):
        apply_changes(settings)
    else:
        start(settings)
    wait_healthy(settings)
    print_welcome(settings)


def start(settings: Settings) -> None:
    check_ports_free(settings)
    render.write(settings)
    nginx_test(settings)
    for stale in ("supervisor.sock", "supervisord.pid"):
        (settings.run_dir / stale).unlink(missing_ok=True)
    conf = settings.run_dir / "supervisord.conf"
    # Every process of the fleet inherits this marker, workers included: `stop` finds leftovers by it.
    env = {**os.environ, MEMBER_MARKER: str(settings.run_dir)}
    subprocess.run([sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)], check=True, env=env)
    deadline = time.monotonic() + 10
    while not supervisord_pid(settings):
        if time.monotonic() > deadline:
            raise FleetError(f"supervisord did not start; see {settings.run_dir}/logs/supervisord.log")
        time.sleep(0.1)
    print(f"started supervisord for {settings.run_dir}")


def apply_changes(settings: Settings, restart_instances: bool = False) -> None:
    """The fleet is up: re-render, and apply whatever changed without dropping requests.

    restart_instances: restart every instance (one at a time) even if no setting changed, to pick
    up new code (make reload).
    """
    files = render.render(settings)
    changed = [f for f, text in files.items()
               if not (settings.run_dir / f).exists() or (settings.run_dir / f).read_text() != text]
    if not changed and not restart_instances:
        print(f"fleet in {settings.run_dir} is up and matches deploy/fleet.toml: nothing to apply")
        return
    if "supervisord.conf" in changed:
        # Instance counts, ports or commands changed: supervisor can only apply that by restarting
        # whole groups, so say so and restart the fleet.
        print("instance counts, ports or stop settings changed: restarting the whole fleet")
        stop(settings)
        start(settings)
        return
    previous = {f: (settings.run_dir / f).read_text() for f in changed if (settings.run_dir / f).exists()}
    render.write(settings, files)
    try:
        if "nginx/conf/nginx.conf" in changed:
            reload_nginx(settings)
        if "settings.json" in changed or restart_instances:
            print("rolling restart of the instances, one at a time")
            rolling_restart(settings)
    except BaseException:
        # Not applied (nginx refused it, an instance did not come up, Ctrl-C): put the old files
        # back, so that the run dir describes what runs and the next deploy tries again.
        render.write(settings, {**files, **previous})
        raise


def reload_nginx(settings: Settings) -> None:
    """Reload nginx and prove it took: `nginx -t` passing is not enough (notes.md)."""
    nginx_test(settings)
    master = int((settings.run_dir / "nginx" / "nginx.pid").read_text())
    before = set(worker_pids(master))
    log = settings.run_dir / "logs" / "nginx-error.log"
    offset = log.stat().st_size if log.exists() else 0
    supervisor(settings).supervisor.signalProcess("nginx", "HUP")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        fresh = log.read_text(errors="replace")[offset:] if log.exists() else ""
        if "[emerg]" in fresh or "[alert]" in fresh:
            raise FleetError(f"nginx refused the new config; the old one is still serving:\n{fresh.strip()}")
        now = set(worker_pids(master))
        if now and not now & before:
            print("nginx reloaded: new workers " + ", ".join(map(str, sorted(now))))
            return
        time.sleep(0.1)
    raise FleetError("nginx did not replace its workers within 10 s after HUP; see " + str(log))


def rolling_restart(settings: Settings) -> None:
    """Restart every instance, one at a time, with no request failed or refused.

    Per role: start its spare (nginx's backup server), then for each instance: stop it (it drains),
    start it, wait for its /healthz, wait past nginx's fail_timeout so nginx uses it again; then
    stop the spare. With two or more instances the others carry the load; with one, the spare does.
    """
    rpc = supervisor(settings).supervisor
    for role in ("slow", "fast"):
        spare, _ = settings.spare(role)
        rpc.startProcess(spare, True)
        wait_healthy(settings, [spare])
        try:
            for name, _ in settings.instances(role):
                started = time.monotonic()
                rpc.stopProcess(f"{role}:{name}", True)  # returns once it has drained and exited
                rpc.startProcess(f"{role}:{name}", True)
                wait_healthy(settings, [name])
                # nginx may have marked it failed while it was down: wait until it is back in
                # rotation before taking the next one away.
                time.sleep(render.FAIL_TIMEOUT_SECONDS + 0.5)
                print(f"  restarted {name} in {time.monotonic() - started:.1f} s")
        finally:
            rpc.stopProcess(spare, True)


def stop(settings: Settings) -> None:
    pid = supervisord_pid(settings)
    if pid is None:
        print(f"no fleet running in {settings.run_dir}")
    else:
        supervisor(settings).supervisor.shutdown()
        # supervisor stops the programs one after another, each within its stopwaitsecs.
        deadline = time.monotonic() + 30 + settings.fast.drain_timeout + settings.slow.drain_timeout
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        print(f"stopped the fleet in {settings.run_dir}")
    leftovers = processes_of(settings.run_dir)
    for leftover in leftovers:  # only after a crash of supervisord itself: never leave one behind
        print(f"killing leftover process {leftover}: {cmdline(leftover)[:120]}")
        try:
            os.kill(leftover, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in leftovers):
        time.sleep(0.05)
    try:
        check_ports_free(settings)
    except FleetError as exc:
        raise FleetError(f"after stop, {exc}") from None


def instance_figures(port: int) -> dict[str, float]:
    """The figures `status` shows, read from an instance's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
    lag_count = values.get("fleet_event_loop_lag_seconds_count", 0)
    values["lag_ms"] = 1000 * values.get("fleet_event_loop_lag_seconds_sum", 0) / lag_count if lag_count else 0
    return values


def status(settings: Settings) -> None:
    if not supervisord_pid(settings):
        print(f"no fleet running in {settings.run_dir}")
        return
    ports = {name: port for role in ("fast", "slow") for name, port in settings.instances(role) + [settings.spare(role)]}
    print(f"{'process':<17} {'state':<9} {'pid':>7} {'uptime':>8} {'in flight':>9} {'busy/workers':>12} "
          f"{'queued':>6} {'loop lag':>9} {'blocked':>7}")
    for p in process_infos(settings):
        name = p["name"]
        running = p["statename"] == "RUNNING"
        line = (f"{p['group'] + ':' + name if p['group'] != name else name:<17} {p['statename']:<9} "
                f"{p['pid'] or '-':>7} {str(p['now'] - p['start']) + 's' if running else '-':>8}")
        if name in ports and running:
            try:
                v = instance_figures(ports[name])
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
    edge = "ok" if healthy(health_urls(settings)["edge"]) else "not answering"
    print(f"edge {edge_url(settings)}: {edge}   (loop lag: mean probe delay; blocked: loops blocked past "
          f"{settings.observe.blocked_loop_ms} ms)")


def print_welcome(settings: Settings) -> None:
    url = edge_url(settings)
    fast = ", ".join(f"{n} :{p}" for n, p in settings.instances("fast"))
    slow = ", ".join(f"{n} :{p}" for n, p in settings.instances("slow"))
    print(f"""
fleet is up: nginx {url}  (run dir {settings.run_dir})
  fast: {fast}
  slow: {slow}  ({settings.slow.workers} workers each, {settings.slow.queue_limit} may wait)
try:
  curl -s {url}/fast
  curl -si {url}/slow/fib/25
stop it with: make stop""")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.fleet", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "stop", "status", "reload", "render"])
    command = parser.parse_args(argv).command
    try:
        settings = load()
        if command == "up":
            up(settings)
        elif command == "stop":
            stop(settings)
        elif command == "status":
            status(settings)
        elif command == "render":
            changed = render.write(settings)
            nginx_test(settings)
            print(f"rendered into {settings.run_dir}: {', '.join(changed) or 'nothing changed'}")
        elif command == "reload":
            if not supervisord_pid(settings):
                raise FleetError(f"no fleet running in {settings.run_dir}: run make deploy-local")
            apply_changes(settings, restart_instances=True)
    except (SettingsError, FleetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
