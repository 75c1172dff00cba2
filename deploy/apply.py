"""Apply changed settings (or new code) to a running fleet without failing a request.

    python -m deploy.fleet up       # after editing deploy/fleet.toml, or with FLEET_* overrides
    python -m deploy.fleet reload   # the same, restarting every instance even if nothing changed

What runs is recorded in the run dir's applied.json, one entry per thing that can change on its
own: nginx's config, and each supervisor program (an instance's program block plus the settings
snapshot it reads at start). An entry is updated only once its change is proven applied, so a
deploy that fails half-way (nginx refused the config, an instance did not come up, Ctrl-C)
leaves a record of what really runs, and the next deploy continues from there. Files on disk are
always the wanted ones, but for an nginx config nginx refused: that one is put back, since it is
what nginx serves, and will load again when it restarts.

The order keeps every request answered:
 1. supervisor reads the new program definitions (running processes are not touched);
 2. per role, if an instance must stop: its spare (nginx's backup server) starts first;
 3. new instances start, and changed ones are replaced one at a time: stop (it drains), start
    with the new definition, wait for /healthz, wait past nginx's fail_timeout;
 4. nginx reloads, now that every upstream in its new config answers; judged by what nginx runs:
    new worker processes and no [emerg] in its log, not by its old workers (which may finish long
    jobs for up to worker_shutdown_timeout);
 5. removed instances stop (they drain; nginx no longer sends them anything new);
 6. the spares stop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, NamedTuple

from deploy import private, programs, render, store
from deploy.control import (HEALTH_TIMEOUT, FleetError, check_ports_free, instance_url, nginx_test, ports_of, supervisor,
                            wait_healthy)
from services.common import procfs
from services.common.inventory import host_port
from services.common.settings import Settings

MANIFEST = "applied.json"
PROGRAM_FILES = {"job-store": "job-store.conf"}  # programs that read a rendered file of their own
NO_SNAPSHOT = ("nginx", "dask-scheduler", "job-store")  # programs that neither read settings.json nor restart for new code
NGINX_CONF = "nginx/conf/nginx.conf"
# The fleet's own job store first ("job-store": the slow instances open it as they start), the
# managed Dask cluster next (they connect to it), the job runner (its restart stops no job), then
# slow (its instances take longest to start), the upstream service (the fast instances call it),
# then fast. Only slow and fast have spares.
ROLES = ("job", "dask", "runner", "slow", "upstream", "fast")
SPARED = programs.SPARED


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def program_blocks(supervisord_conf: str) -> dict[str, str]:
    """{program name: its [program:...] block} of a rendered supervisord.conf."""
    blocks = re.split(r"(?m)^(?=\[program:)", supervisord_conf)
    return {re.match(r"\[program:([^\]]+)\]", b).group(1): b for b in blocks if b.startswith("[program:")}


def wanted_state(settings: Settings, files: dict[str, str]) -> dict:
    """The manifest of a fleet running exactly these rendered files."""
    snapshot = files["settings.json"]
    return {
        "nginx.conf": sha(files[NGINX_CONF]) if settings.inventory.runs("edge") else None,  # nginx runs on the edge
        # Instances and Dask workers read the snapshot when they start: a changed setting changes
        # each of them. nginx and the Dask scheduler do not read it.
        # The job store reads a config of its own instead: a change in it restarts the store.
        "programs": {name: sha(block + ("" if name in NO_SNAPSHOT else snapshot) + files.get(PROGRAM_FILES.get(name), ""))
                     for name, block in program_blocks(files["supervisord.conf"]).items()},
        "ports": {p.name: p.port for p in [*programs.programs(settings), *programs.cluster_programs(settings)]}
        | ({store.PROGRAM: settings.jobs.redis_port} if store.managed(settings) else {}),
    }


def read_manifest(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_manifest(run_dir: Path, manifest: dict) -> None:
    tmp = run_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(run_dir / MANIFEST)


def role_of(name: str) -> str:
    return name.split("-", 1)[0]


@dataclass
class Plan:
    start: list[str] = field(default_factory=list)  # instances to start or replace, in this order
    remove: list[str] = field(default_factory=list)  # instances to stop for good
    spares: list[str] = field(default_factory=list)  # spare programs whose definition changed
    cover: set[str] = field(default_factory=set)  # roles whose spare runs while their instances change
    nginx_conf: bool = False
    nginx_program: bool = False

    @property
    def empty(self) -> bool:
        return not (self.start or self.remove or self.spares or self.nginx_conf or self.nginx_program)

    def describe(self, applied: dict) -> str:
        steps = []
        replaced = [n for n in self.start if n in applied["programs"]]
        added = [n for n in self.start if n not in applied["programs"]]
        if replaced:
            steps.append("rolling restart of " + ", ".join(replaced) + " (one at a time, spares covering)")
        if added:
            steps.append("start " + ", ".join(added))
        if self.nginx_conf:
            steps.append("reload nginx")
        if self.remove:
            steps.append("stop " + ", ".join(self.remove))
        if self.spares:
            steps.append("update " + ", ".join(self.spares))
        if self.nginx_program:
            steps.append("restart nginx's program")
        return "; ".join(steps)

    @property
    def supervisor_changes(self) -> bool:
        return bool(self.start or self.remove or self.spares or self.nginx_program)


def make_plan(applied: dict, wanted: dict, restart_instances: bool) -> Plan:
    plan = Plan(nginx_conf=applied["nginx.conf"] != wanted["nginx.conf"])
    old, new = applied["programs"], wanted["programs"]
    plan.nginx_program = old.get("nginx") != new.get("nginx")
    for name in new:
        if name == "nginx":
            continue
        if name.endswith("-spare"):
            if old.get(name) != new[name]:
                plan.spares.append(name)
        elif name not in old:
            plan.start.append(name)
        elif old[name] != new[name] or (restart_instances and name not in NO_SNAPSHOT):
            plan.start.append(name)
            plan.cover.add(role_of(name))
    plan.remove = [n for n in old if n not in new and n != "nginx"]
    plan.cover |= {role_of(n) for n in plan.remove}
    plan.cover &= set(SPARED)
    plan.start.sort(key=lambda n: (ROLES.index(role_of(n)), n))
    return plan


class Applier:
    """Carries out one plan on a running fleet, recording each step in applied.json as it lands."""

    def __init__(self, settings: Settings, applied: dict, wanted: dict, previous_nginx_conf: str | None):
        self.settings = settings
        self.applied = applied
        self.wanted = wanted
        self.previous_nginx_conf = previous_nginx_conf
        self.rpc = supervisor(settings).supervisor
        self.running_spares: list[str] = []

    def record(self, name: str) -> None:
        """Program `name` now runs its wanted definition (or, if not wanted, is gone)."""
        if name in self.wanted["programs"]:
            self.applied["programs"][name] = self.wanted["programs"][name]
            self.applied["ports"][name] = self.wanted["ports"].get(name)
        else:
            self.applied["programs"].pop(name, None)
            self.applied["ports"].pop(name, None)
        write_manifest(self.settings.run_dir, self.applied)

    def record_nginx_conf(self) -> None:
        self.applied["nginx.conf"] = self.wanted["nginx.conf"]
        write_manifest(self.settings.run_dir, self.applied)

    def run(self, plan: Plan) -> list[Reload]:
        """Carry out `plan`; the nginx reloads it made."""
        reloads = []
        if plan.supervisor_changes:
            self.rpc.reloadConfig()  # supervisor learns the new definitions; nothing restarts yet
        try:
            # A cluster or a job store the fleet did not run yet (slow.backend changed to "dask",
            # jobs.store to "redis") comes first: the spares already read the new settings
            # snapshot, and would wait for it.
            if plan.nginx_conf:
                reloads += self.send_edge_secret_first()
            new_cluster = [n for n in plan.start if role_of(n) in ("job", "dask") and n not in self.applied["programs"]]
            self.start_instances(new_cluster)
            for role in SPARED:
                if role in plan.cover:
                    self.start_spare(role)
            self.start_instances([n for n in plan.start if n not in new_cluster])
            if plan.nginx_conf:
                reloads.append(reload_nginx(self.settings, self.previous_nginx_conf))
                self.record_nginx_conf()
            for name in plan.remove:
                self.rpc.stopProcess(f"{name}:{name}", True)  # it drains; nginx sends it nothing new
                self.rpc.removeProcessGroup(name)
                self.record(name)
                print(f"  stopped {name}")
        finally:
            for spare in self.running_spares:
                if self.rpc.getProcessInfo(f"{spare}:{spare}")["statename"] in ("RUNNING", "STARTING", "BACKOFF"):
                    self.rpc.stopProcess(f"{spare}:{spare}", True)  # else a failed start would hide the error
        for spare in plan.spares:
            self.replace_group(spare, start=False)
            self.record(spare)
        if plan.nginx_program:
            print("nginx's supervisor program changed: restarting nginx (its listening socket closes briefly)")
            self.replace_group("nginx", start=True)
            self.record("nginx")
        return reloads

    def send_edge_secret_first(self) -> list[Reload]:
        """Updating a fleet whose nginx does not send the edge's secret yet (deployed by a version
        before it): instances of this version refuse what that nginx passes them (403), so nginx
        must send it before one of them starts. Instances of before ignore the header, so the
        running config plus the include is loaded first; the new config follows as usual."""
        previous, include = self.previous_nginx_conf, private.edge_header_conf(self.settings)
        anchor = "        proxy_set_header X-Forwarded-Proto $scheme;\n"
        if previous is None or include in previous or anchor not in previous:
            return []
        conf = self.settings.run_dir / NGINX_CONF
        wanted = conf.read_text()
        bridge = previous.replace(anchor, f"{anchor}        include {include};  # the edge's secret, first\n")
        conf.write_text(bridge)
        print("applying: nginx sends the edge's secret before instances that require it start")
        reload = reload_nginx(self.settings, previous)  # refused: the previous config goes back, as always
        conf.write_text(wanted)
        self.previous_nginx_conf = bridge  # what nginx serves now, should the new config be refused
        return [reload]

    def start_spare(self, role: str) -> None:
        name = f"{role}-spare"
        if self.rpc.getProcessInfo(f"{name}:{name}")["statename"] != "RUNNING":  # a deploy cut short left it up
            self.rpc.startProcess(f"{name}:{name}", True)
        self.running_spares.append(name)
        # It runs its previous definition, on its previous port, until the plan's last step.
        wait_healthy(self.settings, [name], urls={name: instance_url(self.settings, self.applied["ports"][name])})

    def start_instances(self, names: list[str]) -> None:
        """Start or replace each instance, one at a time, each only once its new port is free."""
        pending = list(names)
        while pending:
            held = self.ports_held()
            ready = [n for n in pending if self.wanted["ports"][n] not in held - {self.applied["ports"].get(n)}]
            if not ready:
                raise FleetError(
                    f"cannot start {', '.join(pending)} without an outage: their new ports are still held by "
                    "other instances of this fleet. Move the base ports further (past the old range), or "
                    "make stop first")
            name = ready[0]
            pending.remove(name)
            started = time.monotonic()
            replacing = name in self.applied["programs"]
            if replacing and name.startswith("dask-worker-"):
                self.drain_dask_worker(name)
            self.replace_group(name, start=True)
            wait_healthy(self.settings, [name])
            if name.startswith("dask-worker-"):
                # Its /health answers before its job pool has started and before it has joined the
                # scheduler: taking the next worker away now could leave the cluster with none.
                self.wait_dask_worker_joined(name)
            if replacing and role_of(name) == "fast":
                # nginx may have marked it failed while it was down (fast servers have max_fails=1;
                # slow ones 0): wait until it is back in rotation before taking the next one away.
                time.sleep(render.FAIL_TIMEOUT_SECONDS + 0.5)
            self.record(name)
            print(f"  {'restarted' if replacing else 'started'} {name} in {time.monotonic() - started:.1f} s")

    def drain_dask_worker(self, name: str) -> None:
        """Have the scheduler send a Dask worker no new job, and wait until it has finished those it
        runs (at most a job's deadline): stopping it then fails no job that was accepted."""
        timeout = self.settings.slow.job_timeout + 5

        async def drain(client, address: str) -> None:
            await client.retire_workers(workers=[address], close_workers=False, remove=False)
            deadline = time.monotonic() + timeout
            while (await client.processing(workers=[address])).get(address) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)

        try:
            self.on_scheduler(name, self.applied["ports"], drain)
        except Exception as exc:  # noqa: BLE001 - a scheduler that is down has nothing to drain
            print(f"  could not drain {name} first ({type(exc).__name__}: {exc}); stopping it anyway")

    def wait_dask_worker_joined(self, name: str) -> None:
        wait_dask_worker_joined(self.settings, name, self.wanted["ports"])

    def on_scheduler(self, name: str, ports: dict, work: Callable[[Any, str], Awaitable[Any]]) -> Any:
        return on_scheduler(self.settings, name, ports, work)

    def ports_held(self) -> set[int]:
        """Ports of this fleet's instances that are running now (their applied definition)."""
        running = {n for n in self.applied["programs"] if n != "nginx" and not n.endswith("-spare")}
        return {self.applied["ports"][n] for n in running | set(self.running_spares) if n in self.applied["ports"]}

    def replace_group(self, name: str, start: bool) -> None:
        """Stop the program (it drains), drop supervisor's old definition, add the new one."""
        group = f"{name}:{name}"
        try:
            info = self.rpc.getProcessInfo(group)
        except Exception:  # noqa: BLE001 - xmlrpc Fault BAD_NAME: a new program
            info = None
        if info is not None:
            if info["statename"] in ("RUNNING", "STARTING", "BACKOFF"):
                self.rpc.stopProcess(group, True)
            self.rpc.removeProcessGroup(name)
        self.rpc.addProcessGroup(name)  # autostart programs start at once
        if start:
            deadline = time.monotonic() + 10
            while self.rpc.getProcessInfo(group)["statename"] not in ("STARTING", "RUNNING"):
                if time.monotonic() > deadline:
                    raise FleetError(f"supervisor did not start {name}")
                time.sleep(0.05)


def apply_changes(settings: Settings, files: dict[str, str], applied: dict,
                  restart_instances: bool) -> list[Reload] | None:
    """Bring the running fleet to `files`; the nginx reloads that took, or None if there was nothing
    to apply."""
    wanted = wanted_state(settings, files)
    plan = make_plan(applied, wanted, restart_instances)
    if plan.empty:
        return None
    # New ports (a moved edge, more instances) must be free; the ones this fleet holds are not.
    check_ports_free(settings, ignore=_held_ports(settings))
    conf = settings.run_dir / NGINX_CONF
    previous_nginx_conf = conf.read_text() if conf.exists() else None
    render.write(settings, files)
    if plan.nginx_conf:
        try:
            nginx_test(settings)  # refused here, the config never reaches the running nginx
        except FleetError:
            if previous_nginx_conf is not None:
                conf.write_text(previous_nginx_conf)
            raise
    print("applying: " + plan.describe(applied))
    return Applier(settings, applied, wanted, previous_nginx_conf).run(plan)


def _held_ports(settings: Settings) -> set[int]:
    """Every port the running fleet may hold: those of the settings it last ran with."""
    try:
        running = Settings.from_snapshot(settings.run_dir / "settings.json")
    except (OSError, ValueError):
        return set()
    return {port for _, _, port, _ in ports_of(running)}


class Reload(NamedTuple):
    """One nginx reload, in monotonic seconds: from its signal until its new workers were seen. The
    drills count a request reset in that window (nginx 1.22 closes idle keep-alive connections as
    it reloads) apart from a lost one."""
    signalled: float
    seen: float


def reload_nginx(settings: Settings, previous_conf: str | None) -> Reload:
    """Reload nginx and prove it took, by what nginx runs: new worker processes, no [emerg].

    Old workers may finish long requests for up to worker_shutdown_timeout: they do not make the
    reload fail. If nginx refuses the config, the previous one goes back into the run dir (it is
    what nginx serves); if nginx does not answer, the file stays and applied.json does not record
    it, so the next deploy tries again.
    """
    run = settings.run_dir
    master = _master_pid(run)
    before = set(procfs.children(master)) if master else set()
    log = run / "logs" / "nginx-error.log"
    offset = log.stat().st_size if log.exists() else 0
    signalled = time.monotonic()
    supervisor(settings).supervisor.signalProcess("nginx:nginx", "HUP")
    deadline = signalled + 10
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        fresh = text[offset:] if len(text) >= offset else text  # rotated meanwhile: all of the new file
        if "[emerg]" in fresh:
            if previous_conf is not None:
                (run / NGINX_CONF).write_text(previous_conf)
            raise FleetError(f"nginx refused the new config; it still serves the previous one, which is "
                             f"back in {run / NGINX_CONF}:\n{fresh.strip()}")
        master = _master_pid(run)
        new = set(procfs.children(master)) - before if master else set()
        if new:
            seen = time.monotonic()
            print("nginx reloaded: new workers " + ", ".join(map(str, sorted(new))))
            return Reload(signalled, seen)
        time.sleep(0.05)
    raise FleetError(f"nginx did not start new workers within 10 s of the reload; see {log}. "
                     "Run make deploy-local again to retry")


def _master_pid(run_dir: Path) -> int | None:
    try:
        return int((run_dir / "nginx" / "nginx.pid").read_text())
    except (OSError, ValueError):
        return None


# the Dask scheduler ------------------------------------------------------------------------------

def wait_dask_worker_joined(settings: Settings, name: str, ports: dict) -> None:
    """Wait until the scheduler lists this host's worker `name` as running. Its /health answers
    before its preload has started its job pool and before it registers (last): taking the next
    worker away before then could leave the cluster with none."""
    async def joined(client, address: str) -> bool:
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while time.monotonic() < deadline:
            info = (await client.scheduler.identity(n_workers=-1))["workers"].get(address)
            if info is not None and info.get("status") == "running":
                return True
            await asyncio.sleep(0.1)
        return False

    try:
        ok, why = on_scheduler(settings, name, ports, joined), f"not listed after {HEALTH_TIMEOUT:g} s"
    except Exception as exc:  # noqa: BLE001 - said in the error below
        ok, why = False, f"{type(exc).__name__}: {exc}"
    if not ok:
        raise FleetError(f"{name} did not join the Dask scheduler at {settings.scheduler_address} ({why}); "
                         "see its log")


def on_scheduler(settings: Settings, name: str, ports: dict, work: Callable[[Any, str], Awaitable[Any]]) -> Any:
    """Run `work(client, worker address)` with a client of the managed scheduler; this host's
    ports from `ports` (the scheduler's own, when it is on this host)."""
    from distributed import Client

    from services.slow.dask_pool import security

    protocol, _, _ = settings.scheduler_address.partition("://")
    scheduler = (f"{protocol}://{host_port(settings.address, ports['dask-scheduler'])}" if "dask-scheduler" in ports
                 else settings.scheduler_address)

    async def run() -> Any:
        async with Client(scheduler, asynchronous=True, timeout=5, set_as_default=False,
                          security=security(settings)) as client:
            return await work(client, f"{protocol}://{host_port(settings.address, ports[name])}")

    return asyncio.run(run())
