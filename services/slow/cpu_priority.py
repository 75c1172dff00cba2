"""Keep heavy work below everything else on the CPU: nice, SCHED_IDLE, and an idle cpu cgroup.

nice only ranks processes within one scheduling group: Linux first shares the CPU between groups
(each login session is an autogroup, each cgroup a group), so a niced worker still gets its
group's fair share against a busy program in another session, and the fast path waits for it.
A cpu cgroup with `cpu.idle = 1` is the group-level SCHED_IDLE: its processes run only when no
other group wants the CPU, and a waking task of any other group preempts them at once. The slow
instance creates one for its workers (it needs root, or a delegated cgroup); where it cannot,
workers keep their niceness and, if asked, SCHED_IDLE.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("fleet.cpu")

# cgroup v1 mounts the cpu controller on its own; cgroup v2 has one unified tree.
CPU_CONTROLLER_MOUNTS = (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu,cpuacct"), Path("/sys/fs/cgroup"))


def create_idle_cgroup(name: str) -> Path | None:
    """Create (or reuse) the cpu cgroup `fleet-idle/<name>` with cpu.idle = 1; None if not possible."""
    for mount in CPU_CONTROLLER_MOUNTS:
        if not (mount / "cgroup.procs").exists():
            continue
        group = mount / "fleet-idle" / name
        try:
            if (mount / "cgroup.subtree_control").exists():  # cgroup v2: delegate cpu down to us
                (mount / "cgroup.subtree_control").write_text("+cpu")
                group.parent.mkdir(exist_ok=True)
                (group.parent / "cgroup.subtree_control").write_text("+cpu")
            group.mkdir(parents=True, exist_ok=True)
            for directory in (group.parent, group):  # v2: idle is a property of each level
                if (directory / "cpu.idle").exists():
                    (directory / "cpu.idle").write_text("1")
            if (group / "cpu.idle").read_text().strip() == "1":
                return group
        except OSError as exc:
            log.info("no idle cpu cgroup under %s (%s); workers rely on nice/SCHED_IDLE", mount, exc)
            continue
    return None


def join(group: Path) -> None:
    """Move the calling process (a worker, at start-up) into `group`; stay put if that fails."""
    try:
        (group / "cgroup.procs").write_text(str(os.getpid()))
    except OSError as exc:
        log.warning("worker %d could not join %s (%s); it runs niced only", os.getpid(), group, exc)


def remove(group: Path) -> None:
    """Remove the group once its workers are gone (rmdir fails while it holds processes)."""
    try:
        group.rmdir()
    except OSError:
        pass
