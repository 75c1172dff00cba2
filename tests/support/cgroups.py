"""Which cpu cgroup a process is in, as the fleet's idle groups are checked (services/slow/
cpu_priority.py puts the workers in them)."""

from __future__ import annotations

from services.common import procfs


def cpu_cgroup_of(pid: int) -> str:
    """The path of `pid`'s cgroup in the (v1) hierarchy whose controllers include cpu."""
    return next(path for controllers, path in procfs.cgroups(pid).items() if "cpu" in controllers.split(","))
