"""Talking to a running fleet: its supervisord, its instances' /healthz, its nginx config check.

Shared by the commands (fleet.py), the change applier (apply.py) and the drills (drills/).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xmlrpc.client
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

from deploy import programs, render, store
from services.common import server
from services.common.inventory import host_port
from services.common.settings import REPO_ROOT, Settings

HEALTH_TIMEOUT = 60  # seconds a command waits for instances to answer /healthz


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
    """supervisor's view of one process by its name ("fast-01", "slow-spare", "nginx"): each is
    a group of its own."""
    return supervisor(settings).supervisor.getProcessInfo(f"{name}:{name}")


# preflight -------------------------------------------------------------------------------------

def check_ports_free(settings: Settings, ignore: set[int] = frozenset()) -> None:
    """Every port the settings use is free (but those in `ignore`, which this fleet holds)."""
    warn_of_ephemeral_ports(settings)
    for name, host, port, knob in ports_of(settings):
        if port in ignore:
            continue
        if not can_bind(host, port):
            raise FleetError(f"port {port} ({name}) on {host} is taken by another program; stop it, or "
                             f"choose other ports, e.g. {knob}={port + 1000} make deploy-local")


def can_bind(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now ("" is every address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nginx, Tornado and ZeroMQ do
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_taken(host: str, port: int, what: str, knob: str) -> str | None:
    """For a command's preflight: an error naming the port and the variable that moves it, or None."""
    if can_bind(host, port):
        return None
    return f"error: port {port} ({what}) is taken by another program; choose another, e.g. {knob}={port + 10}"


def ephemeral_ports(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> range:
    """The ports the kernel hands out as the local end of outgoing connections."""
    try:
        low, high = map(int, path.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def warn_of_ephemeral_ports(settings: Settings) -> None:
    """A listening port in the ephemeral range can be taken, between a program's stop and its
    restart, by an outgoing connection of any process; the restart then fails with "Address
    already in use". Not an error: it works most of the time, which is what makes it a trap."""
    ephemeral = ephemeral_ports()
    risky = [f"{port} ({name})" for name, _, port, _ in ports_of(settings) if port in ephemeral]
    if risky:
        print(f"warning: {', '.join(risky[:4])}{' ...' if len(risky) > 4 else ''} in the kernel's ephemeral "
              f"port range {ephemeral.start}-{ephemeral.stop - 1} (net.ipv4.ip_local_port_range): an outgoing "
              f"connection can hold one when its program restarts; choose ports below {ephemeral.start}")


def ports_of(settings: Settings) -> list[tuple[str, str, int, str]]:
    """(what, address, port, the setting that moves it) for every port a fleet of these settings uses."""
    here = settings.address
    wanted = [("edge", settings.edge.bind, settings.edge.port, "FLEET_EDGE_PORT")] if settings.inventory.runs("edge") else []
    wanted += [(p.name, here, p.port, f"FLEET_{p.role.upper()}_BASE_PORT") for p in programs.programs(settings)]
    if store.managed(settings):
        wanted.append((store.PROGRAM, here, settings.jobs.redis_port, "FLEET_JOBS_REDIS_PORT"))
    for c in programs.cluster_programs(settings):
        knob = "FLEET_DASK_SCHEDULER_PORT" if c.name == "dask-scheduler" else "FLEET_DASK_WORKER_BASE_PORT"
        wanted += [(c.name, here, c.port, knob),
                   (f"{c.name} dashboard", here, c.dashboard,
                    "FLEET_DASK_DASHBOARD_PORT" if c.name == "dask-scheduler" else knob)]
    return wanted


def check_certs(settings: Settings) -> None:
    """A fleet across hosts, or on a tls:// scheduler, needs this host's files of the fleet's CA
    (make certs), and across hosts the edge's token too (and the job store's password, where the
    fleet's own store is used). On one host deploy makes its own."""
    if settings.own_certs or not (settings.dask_tls or settings.edge_tls):
        return
    wanted = settings.certs()
    if settings.inventory.single:
        wanted.pop("edge_token")  # a tls:// scheduler on one host: the token is the run dir's own
    if settings.inventory.single or not store.used_here(settings):
        wanted.pop("job_store_password")  # one host's store has the run dir's own; no store, none
    missing = [str(path) for path in wanted.values() if not path.is_file()]
    if missing:
        raise FleetError(
            f"this host ({settings.inventory.here.name}) lacks {', '.join(missing)}, which TLS between the "
            f"fleet's hosts needs: run `make certs` (with the same FLEET_SETTINGS) on one host and copy "
            f"{settings.certs_dir}/ to every host (dask.certs_dir, FLEET_DASK_CERTS_DIR)")


def check_installed(venv: Path | None = None) -> None:
    """Refuse to start from a .venv built from another requirements.txt than this checkout's (code
    updated, `make install` not run yet): the fleet would run new code on old packages, and
    installing is `make install`'s job, never a start's (systemd starts with this). deploy/bootstrap.sh
    records the sha256 of the requirements.txt it installed from in .venv/.requirements.sha256."""
    if venv is None:
        if sys.prefix == sys.base_prefix:
            return  # not run from a virtual environment: no .venv of make install's to check
        venv = Path(sys.prefix)
    requirements = REPO_ROOT / "requirements.txt"
    wanted = hashlib.sha256(requirements.read_bytes()).hexdigest()
    try:
        installed = (venv / ".requirements.sha256").read_text().strip()
    except FileNotFoundError:
        installed = None
    if not installed:
        raise FleetError(f"{venv} has no record of the requirements.txt it was built from "
                         f"(.requirements.sha256): run `make install`, then start again")
    if installed != wanted:
        raise FleetError(f"{venv} was built from another requirements.txt than {requirements}: "
                         f"run `make install`, then start again")


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

def get_json(url: str, timeout: float = 2, context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    """(status, JSON body); {} for a body that is not JSON (a Dask process's /health says "ok").
    context: for an instance's https URL across hosts (client_context)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            try:
                return response.status, json.loads(response.read())
            except ValueError:
                return response.status, {}
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {}


def instance_url(settings: Settings, port: int, path: str = "/healthz", address: str | None = None) -> str:
    """An instance's own URL: https across hosts, where the instances speak TLS (settings.edge_tls)."""
    return f"{'https' if settings.edge_tls else 'http'}://{host_port(address or settings.address, port)}{path}"


def client_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS for talking to this fleet's instances across hosts (services/common/server.py)."""
    return server.client_tls_context(settings)


def health_url(port: int, address: str = "127.0.0.1") -> str:
    return f"http://{host_port(address, port)}/healthz"


def health_urls(settings: Settings) -> dict[str, str]:
    """/healthz of this host's instances and of the edge, if here (spares included: they answer
    only when up); /health of its Dask processes (on their dashboard's address)."""
    urls = {p.name: instance_url(settings, p.port) for p in programs.programs(settings)}
    urls.update({c.name: f"http://{host_port(settings.dashboard_address, c.dashboard)}/health"
                 for c in programs.cluster_programs(settings)})
    if store.managed(settings):
        urls[store.PROGRAM] = settings.job_store_url  # no HTTP: answered by PING (healthy)
    if settings.inventory.runs("edge"):
        urls["edge"] = f"{edge_url(settings)}/healthz"
    return urls


def edge_url(settings: Settings) -> str:
    host = settings.edge.bind
    host = "127.0.0.1" if host == "0.0.0.0" else f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.edge.port}"


def healthy(url: str, name: str | None = None, degraded_ok: bool = False,
            context: ssl.SSLContext | None = None) -> bool | str:
    """200 from /healthz, and from the instance asked for (not another fleet's on a reused port).

    degraded_ok: an instance that answers 503 "degraded" (its pool cannot work: no worker can
    start, its Dask scheduler is unreachable) counts as started too; the reason is returned."""
    try:
        status, body = get_json(url, timeout=1, context=context)
    except (OSError, ValueError):
        return False
    if name is not None and body.get("instance") != name:
        return False
    if status == 503 and degraded_ok and body.get("status") == "degraded":
        return body.get("message") or "degraded"
    return status == 200


def wait_healthy(settings: Settings, names: list[str] | None = None, timeout: float = HEALTH_TIMEOUT,
                 urls: dict[str, str] | None = None, degraded_ok: bool = False) -> None:
    """Wait until the named instances (default: all, and the edge) answer /healthz with 200.

    urls: where to find them, when not where the settings put them (an instance still running
    with its previous port). degraded_ok: an instance that says it is degraded counts as started,
    with a warning that says why."""
    known = {**health_urls(settings), **(urls or {})}
    pending = {n: known[n] for n in (names or [n for n in known if not n.endswith("-spare")])}
    context = client_context(settings)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        # Instances name themselves in their /healthz; the edge and Dask's processes only answer;
        # the job store answers PING.
        answers = {n: store.answers(settings) if n == store.PROGRAM else
                   healthy(u, None if n == "edge" or n.startswith("dask-") else n, degraded_ok,
                           context if u.startswith("https:") else None)
                   for n, u in pending.items()}
        for name, answer in answers.items():
            if isinstance(answer, str):
                print(f"warning: {name} is up but degraded: {answer}")
        pending = {n: pending[n] for n, answer in answers.items() if not answer}
        if not pending:
            return
        if any(p["statename"] == "FATAL" for p in process_infos(settings)):
            break
        time.sleep(0.1)
    if pending:
        raise FleetError(f"not healthy after {timeout:.0f} s: {', '.join(pending)}\n" + diagnose(settings))


def diagnose(settings: Settings) -> str:
    lines = []
    for p in process_infos(settings):
        lines.append(f"  {p['name']:<12} {p['statename']:<9} {p['description']}")
        if p["statename"] != "RUNNING":
            log = settings.run_dir / "logs" / f"{p['name']}.log"
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-5:]
                lines += [f"    | {line[:200]}" for line in tail]
    return "\n".join(lines)
