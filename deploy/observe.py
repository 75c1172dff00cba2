"""`make observe`: a Prometheus of the fleet's own, in the foreground, until Ctrl-C.

    python -m deploy.observe        # the fleet must be up (make observe starts it if it is down)

Debian's `prometheus` (deploy/bootstrap.sh --observe installs it as root). Its config, written
here into the run dir (prometheus/prometheus.yml, from deploy/prometheus/prometheus.yml.j2), has it
scrape the targets file deploy keeps there and evaluate the rules deploy copies beside it
(deploy/prometheus/rules.yml). It listens on loopback only (observe.prometheus_port), keeps its
samples in the run dir's prometheus/data, at most observe.prometheus_retention_hours and _mb, and
runs as the fleet's user (process.user). The fleet is the one deployed (the run dir's snapshot);
the observe.prometheus_* settings are read now, so FLEET_OBSERVE_PROMETHEUS_PORT=9091 make observe
moves it without a deploy. Its own log lines (warnings and errors only) go to this terminal, as Locust's do
with `make load`. `make stop` stops it too (SIGTERM: it writes its head block first).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from deploy import privilege, render, rundir
from deploy.control import FleetError, port_taken, ports_of
from deploy.fleet import edge_url, supervisord_pid
from services.common.inventory import host_port
from services.common.settings import Settings, SettingsError, load

PID_FILE = "prometheus/prometheus.pid"
READY_TIMEOUT = 60  # seconds: a first start replays nothing; a restart replays its write-ahead log
# Debian builds Prometheus with its classic web UI only (the React one needs npm): its pages are
# under /classic/.
PAGES = {"targets": "/classic/targets", "alerts": "/classic/alerts", "rules": "/classic/rules"}
# The graphs the README shows: the fast routes' p99 (recorded by the rules) against its objective,
# and the heavy requests by how they ended (shed ones too): the fast path holds while the slow
# one is saturated.
GRAPHS = (
    'fleet_host:fast_request_duration_seconds:p99_5m or label_replace(max(fleet_fast_p99_objective_seconds'
    '{role="fast"}), "objective", "observe.fast_p99_objective_ms", "", "")',
    "sum by (outcome) (fleet_host:slow_jobs:rate5m) > 0",
)
FAST_P99_GRAPH = "/classic/graph?" + urllib.parse.urlencode(
    {f"g{i}.{key}": value for i, expr in enumerate(GRAPHS)
     for key, value in (("expr", expr), ("tab", "0"), ("range_input", "15m"))}, quote_via=urllib.parse.quote)


def binary() -> str | None:
    """Debian's prometheus, or one on the PATH."""
    return shutil.which("prometheus") or (str(Path("/usr/bin/prometheus")) if Path("/usr/bin/prometheus").exists() else None)


def url(observe: Any) -> str:
    return f"http://127.0.0.1:{observe.prometheus_port}"


def config(settings: Settings, observe: Any) -> str:
    """prometheus.yml for this host's part of the fleet (`observe`: the observe.* settings)."""
    tls = {k: str(v) for k, v in settings.tls_files().items()} if settings.edge_tls else None
    return render.templates().get_template("prometheus/prometheus.yml.j2").render(
        header=render.HEADER, run_dir=settings.run_dir, tls=tls, listen=f"127.0.0.1:{observe.prometheus_port}")


def command(settings: Settings, observe: Any, prometheus: str) -> list[str]:
    run_dir = settings.run_dir
    return [
        prometheus,
        f"--config.file={run_dir}/prometheus/prometheus.yml",
        f"--storage.tsdb.path={run_dir}/prometheus/data",
        # Whichever bound comes first: a fleet's own Prometheus never fills the disk.
        f"--storage.tsdb.retention.time={observe.prometheus_retention_hours}h",
        f"--storage.tsdb.retention.size={observe.prometheus_retention_mb}MB",
        f"--web.listen-address=127.0.0.1:{observe.prometheus_port}",  # loopback only: it has no login
        "--log.level=warn",
    ]


def urls(settings: Settings, observe: Any) -> str:
    """What to open: Prometheus's pages, and the Dask dashboard where this host has one."""
    base = url(observe)
    pages = ", ".join(f"{name}: {base}{path}" for name, path in PAGES.items())
    lines = [f"Prometheus: {base}   ({pages})",
             f"  the fast p99 graph: {base}{FAST_P99_GRAPH}"]
    if settings.slow.backend == "dask" and settings.dask.scheduler == "managed" and settings.inventory.runs("scheduler"):
        lines.append(f"Dask dashboard: http://{host_port(settings.dashboard_address, settings.dask.dashboard_port)}/status")
    lines.append(f"the fleet's edge: {edge_url(settings)}   (make load in another terminal puts load on it)")
    return "\n".join(lines)


def wait_ready(observe: Any, process: subprocess.Popen, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FleetError(f"prometheus exited with status {process.returncode} before it was ready (its lines above)")
        try:
            with urllib.request.urlopen(f"{url(observe)}/-/ready", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise FleetError(f"prometheus was not ready at {url(observe)} within {timeout:g} s")


def start(settings: Settings, observe: Any) -> subprocess.Popen:
    """Prometheus, started as the fleet's user on the run dir's config; its pid in the run dir."""
    prometheus = binary()
    if prometheus is None:
        raise FleetError("prometheus is not installed: `make observe` installs it as root "
                         "(or: sudo apt-get install --no-install-recommends prometheus)")
    run_dir = settings.run_dir
    for rendered in ("prometheus/rules.yml", "prometheus/targets.json"):
        if not (run_dir / rendered).exists():
            raise FleetError(f"{run_dir / rendered} is missing: deploy the fleet again (make deploy-local)")
    if (pid := running(run_dir)) is not None:
        raise FleetError(f"make observe's Prometheus already runs for {run_dir} (pid {pid}); make stop stops it too")
    port = observe.prometheus_port
    fleet_port = [what for what, _, p, _ in ports_of(settings) if p == port]
    if fleet_port:  # a spare's port is free while the spare is down, and wanted the moment it is not
        raise FleetError(f"observe.prometheus_port {port} is {fleet_port[0]}'s; choose another, "
                         f"e.g. FLEET_OBSERVE_PROMETHEUS_PORT={port + 1}")
    taken = port_taken("127.0.0.1", port, "Prometheus's", "FLEET_OBSERVE_PROMETHEUS_PORT")
    if taken:
        raise FleetError(taken.removeprefix("error: "))
    rundir.write_file(run_dir / "prometheus" / "prometheus.yml", config(settings, observe).encode())
    user = privilege.run_as(settings)
    data = run_dir / "prometheus" / "data"
    if user is None:
        rundir.own_dir(data, 0o700)
        as_user = {}
    else:
        rundir.handed_over_dir(data, user.uid, user.gid, 0o700)  # its samples are the fleet user's alone
        as_user = {"user": user.uid, "group": user.gid, "extra_groups": []}
    # Its own session: a Ctrl-C in this terminal reaches this launcher, which stops it in order.
    process = subprocess.Popen(command(settings, observe, prometheus), cwd=data, start_new_session=True, **as_user)
    rundir.write_file(run_dir / PID_FILE, f"{process.pid}\n".encode())
    return process


def end(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stop Prometheus as it likes (SIGTERM: it writes its head block); killed past `timeout`, or at
    a second Ctrl-C."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        process.kill()
        process.wait()


def running(run_dir: Path) -> int | None:
    """The pid of the run dir's Prometheus (make observe's), if one runs: its pid file names a live
    prometheus started on this run dir's config (a pid reused since is another process's)."""
    try:
        pid = int((run_dir / PID_FILE).read_text())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    ours = f"--config.file={run_dir}/prometheus/prometheus.yml".encode()
    return pid if argv and argv[0].endswith(b"prometheus") and ours in argv else None


def stop_running(run_dir: Path, timeout: float = 30) -> int | None:
    """Stop the run dir's Prometheus, if one runs (make stop): SIGTERM, then SIGKILL past `timeout`.
    Returns its pid, or None: none ran, or it is another user's to stop (said on stderr)."""
    pid = running(run_dir)
    if pid is None:
        return None
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it ended meanwhile
    except PermissionError:
        print(f"warning: make observe's Prometheus (pid {pid}) is not yours to stop", file=sys.stderr)
        return None
    return pid


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.observe", description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    # Ctrl-C, and a SIGTERM from whoever started this, stop Prometheus in order (below). Set here:
    # a process started in the background by a non-interactive shell inherits SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    process = None
    try:
        settings = load()
        observe = settings.observe  # read now, with any FLEET_OBSERVE_* override
        if (settings.run_dir / "settings.json").exists():
            settings = Settings.from_snapshot(settings.run_dir / "settings.json")  # what runs, as deployed
        if supervisord_pid(settings) is None:
            raise FleetError(f"no fleet runs in {settings.run_dir}: make deploy-local first")
        process = start(settings, observe)
        wait_ready(observe, process)
        print(urls(settings, observe))
        print("Ctrl-C stops Prometheus (its samples stay in the run dir's prometheus/data)", flush=True)
        return process.wait()
    except (FleetError, SettingsError, rundir.RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        if process is not None:
            end(process)
            (settings.run_dir / PID_FILE).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
