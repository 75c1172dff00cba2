"""What runs on a host of the fleet: its instance programs (and spares), its processes of the
managed Dask cluster, and the addresses nginx balances over, computed from the settings alone.

render.py renders them into supervisord.conf, nginx.conf and the Prometheus targets; the deployer
(apply.py, control.py, fleet.py) and privilege.py (which of them make an idle cgroup) read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.common.inventory import host_port
from services.common.settings import Settings


SPARED = ("slow", "fast")  # roles with a spare instance, nginx's backup server during restarts


@dataclass(frozen=True)
class Program:
    """One instance (or spare) as supervisor runs it: its own [program:<name>] and group."""
    name: str  # "fast-01", "slow-spare"
    role: str
    argument: str  # --instance: the number, or "spare"
    port: int
    stopwaitsecs: int

    @property
    def spare(self) -> bool:
        return self.argument == "spare"


@dataclass(frozen=True)
class ClusterProgram:
    """A process of the managed Dask cluster: the scheduler, or one worker."""
    name: str  # "dask-scheduler", "dask-worker-01"
    port: int  # its Dask port
    dashboard: int  # its HTTP port: dashboard, /health, Prometheus /metrics
    scheduler_port: int
    threads: int
    worker_name: str  # the name it has in the cluster: "dask-worker-01", "heavy1-dask-worker-01"


def cluster_programs(settings: Settings) -> list[ClusterProgram]:
    """This host's processes of the managed Dask cluster (the scheduler role, the workers role);
    none unless slow.backend = "dask" and the cluster is managed."""
    d = settings.dask
    if settings.slow.backend != "dask" or d.scheduler != "managed":
        return []
    found = []
    if settings.inventory.runs("scheduler"):
        found.append(ClusterProgram("dask-scheduler", d.scheduler_port, d.dashboard_port, d.scheduler_port, 0,
                                    "dask-scheduler"))
    if settings.inventory.runs("workers"):
        # Worker names are unique in the cluster: the host's name in front when there are hosts.
        prefix = "" if settings.inventory.single else f"{settings.inventory.here.name}-"
        for i in range(1, d.workers + 1):
            port = d.worker_base_port + 2 * i - 1
            name = f"dask-worker-{i:02d}"
            found.append(ClusterProgram(name, port, port + 1, d.scheduler_port, d.threads_per_worker, prefix + name))
    return found


def programs(settings: Settings) -> list[Program]:
    """This host's instance programs (the fast and slow roles, the job runner beside the slow one,
    the upstream service's replicas beside the fast one), the runner first, then slow, upstream
    and fast, each spared role's spare last. The runner has no spare: its
    restart stops no job (its job processes run on) and delays new ones by its restart alone."""
    found = []
    if settings.inventory.runs("slow"):
        found.append(Program("runner-01", "runner", "1", settings.runner.base_port + 1,
                             math.ceil(settings.runner.drain_timeout + 5)))
    for role, margin in (("slow", 10), ("upstream", 5), ("fast", 5)):
        # The upstream service's replicas run beside the fast instances that call them.
        if not settings.inventory.runs("fast" if role == "upstream" else role):
            continue
        stopwaitsecs = math.ceil(getattr(settings, role).drain_timeout + margin)
        for number, (name, port) in enumerate(settings.instances(role), start=1):
            found.append(Program(name, role, str(number), port, stopwaitsecs))
        if role in SPARED:  # the upstream has none: its callers send a refused call to another replica
            name, port = settings.spare(role)
            found.append(Program(name, role, "spare", port, stopwaitsecs))
    return found


def upstream(settings: Settings, role: str, spares: bool = False) -> list[tuple[str, str]]:
    """[(label, address:port)] of a role's instances (or spares) on every host that has the role:
    what nginx balances over."""
    hosts = settings.role_hosts(role)
    found = []
    for host in hosts:
        members = [settings.spare(role)] if spares else settings.instances(role)
        found += [(name if settings.inventory.single else f"{name} on {host.name}", host_port(host.address, port))
                  for name, port in members]
    return found


def idle_cgroup_owners(settings: Settings) -> list[str]:
    """The processes of this host that make an idle cgroup: each slow instance (the spare too) for
    its workers, the job processes for theirs (one group), each Dask process for itself and its jobs."""
    names = [p.name for p in programs(settings) if p.role == "slow"]
    if settings.inventory.runs("slow"):
        names.append("job-processes")  # the job processes' workers (services/slow/job_process.py)
    names += [c.worker_name for c in cluster_programs(settings)]
    return names
