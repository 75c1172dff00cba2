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
import re
import time
import zlib
from pathlib import Path

from services.common import procfs

log = logging.getLogger("fleet.cpu")

IDLE = "fleet-idle"  # the idle groups' parent, under the fleet's own cgroup
LEAF = "fleet-main"  # cgroup v2: where the service's own processes move, so that its cgroup may delegate
RECORD = "cgroups"  # in the run dir: every group the fleet created, one path a line
MOUNTINFO = Path("/proc/self/mountinfo")
MEMBERSHIP = Path("/proc/self/cgroup")


def group_name(owner: str, run_dir: Path) -> str:
    """An idle group's name: its owner (slow-01, a Dask worker) and its fleet's run dir, so that two
    fleets on one machine never share or remove each other's."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", owner)  # a Dask worker started without --name is named by its address
    return f"{safe}-{zlib.crc32(str(run_dir).encode()):08x}"


def own_cpu_cgroup(mountinfo: Path = MOUNTINFO, membership: Path = MEMBERSHIP) -> tuple[Path, bool, bool] | None:
    """(directory of this process's cpu cgroup, cgroup v2?, is it its hierarchy's root?), or None
    when no cpu controller is mounted for us. v1 mounts the cpu controller on its own hierarchy;
    v2 has one tree, whose cgroup must offer "cpu" to be of use."""
    mounts = []  # (fstype, mount point, root of the hierarchy it shows, super options)
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, (fstype, _source, options) = left.split(), right.split()[:3]
        mounts.append((fstype, fields[4], fields[3], options.split(",")))
    paths = procfs.cgroups(file=membership)  # controllers ("cpu,cpuacct", or "" for v2) -> its path there
    for fstype, point, root, options in mounts:
        if fstype == "cgroup" and "cpu" in options:
            path = next((p for c, p in paths.items() if "cpu" in c.split(",")), None)
            if path is not None:
                return _inside(point, root, path), False, path == "/"
    for fstype, point, root, _ in mounts:
        if fstype == "cgroup2" and "" in paths:
            directory = _inside(point, root, paths[""])
            controllers = directory / "cgroup.controllers"
            if controllers.exists() and "cpu" in controllers.read_text().split():
                return directory, True, paths[""] == "/"
    return None


def _inside(point: str, root: str, path: str) -> Path:
    """The directory of hierarchy path `path` under a mount that shows the hierarchy from `root`."""
    relative = path[len(root):] if root != "/" and path.startswith(root) else path
    return Path(point) / relative.lstrip("/")


def create_idle_cgroup(name: str, record: Path | None = None, pid: int | None = None) -> Path | None:
    """Create (or reuse) `fleet-idle/<name>` with cpu.idle = 1 under this process's own cpu cgroup;
    None if not possible. `record`: a file each created group's path is appended to, for `make
    stop` to remove what a killed instance left. `pid`: under that process's cgroup (supervisord's,
    when root prepares the groups for instances that run as the fleet's user), else this one's.

    cgroup v1 (as here): under the process's cpu cgroup, wherever supervisord was started. cgroup
    v2: only inside a delegated cgroup (systemd's Delegate=yes, deploy/fleet.service): its
    processes first move to a leaf, `fleet-main` (v2 lets a cgroup hand a controller to children
    only while it holds no process), then cpu is enabled for its children. Never in the root
    cgroup of v2: the root's subtree_control is the machine's, not the fleet's.
    """
    try:
        found = own_cpu_cgroup(membership=Path(f"/proc/{pid}/cgroup")) if pid else own_cpu_cgroup()
    except (OSError, ValueError) as exc:
        log.info("cannot read this process's cgroups (%s); workers rely on nice/SCHED_IDLE", exc)
        return None
    if found is None:
        return None
    base, v2, at_root = found
    if base.parent.name == IDLE:
        # This process sits in an idle group already (a Dask worker, whose job processes get one
        # of the same name): the group is a sibling of its own, never a child of it.
        base = base.parent.parent
    elif base.name == LEAF:  # v2: moved to the leaf by an earlier delegation; the fleet's is above
        base = base.parent
    if v2 and at_root:
        log.info("running in cgroup v2's root cgroup: no idle group (run under the systemd unit "
                 "deploy/fleet.service, Delegate=yes, for one); workers rely on nice/SCHED_IDLE")
        return None
    group = base / IDLE / name
    if _is_idle(group):  # made already, by root at deploy for an unprivileged instance: join it
        return group
    try:
        if v2:
            _delegate_cpu(base)
            group.parent.mkdir(exist_ok=True)
            if "cpu" not in (group.parent / "cgroup.subtree_control").read_text().split():
                (group.parent / "cgroup.subtree_control").write_text("+cpu")
        group.mkdir(parents=True, exist_ok=True)
        for directory in (group.parent, group):  # v2: idle is a property of each level
            if (directory / "cpu.idle").exists():
                (directory / "cpu.idle").write_text("1")
        if (group / "cpu.idle").read_text().strip() != "1":
            return None
    except OSError as exc:
        log.info("no idle cpu cgroup under %s (%s); workers rely on nice/SCHED_IDLE", base, exc)
        return None
    if record is not None:
        with open(record, "a") as f:
            f.write(f"{group}\n")
    return group


def _is_idle(group: Path) -> bool:
    try:
        return (group / "cpu.idle").read_text().strip() == "1"
    except OSError:
        return False


def hand_over(group: Path, uid: int, gid: int) -> None:
    """Let processes of user `uid` move themselves into `group` (what systemd's Delegate=yes does
    for a unit's User=): the group and its process lists become theirs. On v2 a move also needs
    write access to the lists of the common ancestor of where a process is and where it goes."""
    files = [group, *(group / f for f in ("cgroup.procs", "tasks", "cgroup.threads") if (group / f).exists())]
    base = group.parent.parent
    if (base / "cgroup.subtree_control").exists():  # v2
        files.append(base / "cgroup.procs")
        files += [p / "cgroup.procs" for p in (base / LEAF, group.parent) if (p / "cgroup.procs").exists()]
    for path in files:
        os.chown(path, uid, gid)


def _delegate_cpu(base: Path, tries: int = 50) -> None:
    """Let v2 cgroup `base` hand the cpu controller to its children: its processes (supervisord,
    the instances) move to the leaf LEAF first, as many times as new ones appear."""
    control = base / "cgroup.subtree_control"
    if "cpu" in control.read_text().split():
        return
    leaf = base / LEAF
    leaf.mkdir(exist_ok=True)
    for _ in range(tries):
        for pid in (base / "cgroup.procs").read_text().split():
            try:
                (leaf / "cgroup.procs").write_text(pid)
            except ProcessLookupError:
                pass  # it exited meanwhile
        try:
            control.write_text("+cpu")
            return
        except OSError as exc:  # EBUSY: a process forked into base meanwhile
            error = exc
    raise error


def join(group: Path) -> None:
    """Move the calling process (a worker, at start-up) into `group`; stay put if that fails."""
    try:
        (group / "cgroup.procs").write_text(str(os.getpid()))
    except OSError as exc:
        log.warning("worker %d could not join %s (%s); it runs niced only", os.getpid(), group, exc)


def remove(group: Path) -> None:
    """Remove the group once its workers are gone (rmdir fails while it holds processes), and its
    fleet-idle parent when no other instance's group is left in it."""
    for directory in (group, group.parent):
        try:
            directory.rmdir()
        except OSError:
            return


def remove_recorded(record: Path, patience: float = 5.0) -> list[str]:
    """At `make stop`, once no process of the fleet is left, and before the next start: remove every
    group the fleet created (a killed instance never removed its own, and a Dask process sits in
    its own group until it exits). Returns the ones that could not be removed (still holding a
    process); they stay in the record, for the next stop or start."""
    try:
        groups = {Path(line) for line in record.read_text().splitlines() if line.strip()}
    except FileNotFoundError:
        return []
    groups = sorted(groups, key=lambda g: len(g.parts), reverse=True)  # a child before its parent
    deadline = time.monotonic() + patience
    # A process that exited holds its group until it is reaped: an orphan (a Dask worker's
    # forkserver) by init, which here reaps every two seconds or so.
    while True:
        for group in groups:
            remove(group)
        left = sorted(str(g) for g in groups if g.exists())
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not left:
        record.unlink(missing_ok=True)
    return left
