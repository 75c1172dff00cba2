"""What `make soak` watches: every long-lived process of the fleet, and what faults could leave behind.

A process is known by a label that survives its restarts ("fast-01", "slow-01 forkserver",
"nginx worker") and by its pid: one label, several incarnations. Per process, a sample holds its
resident memory, open file descriptors, threads and children, read from /proc. Short-lived
processes (the pool's workers and Dask's job processes, recycled by design) are counted, not
followed one by one.

Leftovers are what must not pile up however many faults pass: the fleet's cgroups, the files of
its run dir (outside logs and the edge cache) and of its temp directories, zombies, and sockets:
listening ones must be the same, none may be stuck in CLOSE_WAIT (a peer hung up and the fleet
never closed its end), and established ones may not outnumber the start by more than nginx's
upstream keep-alive pools.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from deploy import control, render
from services.common import procfs
from services.common.settings import Settings
from services.slow import cpu_priority

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
# Kinds of descendants that live as long as their parent program: the rest come and go.
LONG_LIVED_KINDS = ("nginx master", "nginx worker", "nginx cache manager", "forkserver", "resource tracker")
JOB_PROCESS_KIND = "job process"  # a long job's process (services/slow/job_process.py), a child of the runner
WORKER_KIND = "pool worker"  # a pool's worker: a child of a forkserver (local pool, or a Dask worker's)
# nginx keeps at most this many idle connections per worker to each upstream (nginx.conf.j2)
UPSTREAM_KEEPALIVE = 32 + 16


@dataclass(frozen=True)
class Proc:
    label: str
    pid: int
    long_lived: bool


@dataclass(frozen=True)
class Figures:
    rss_mb: float
    fds: int  # every open descriptor, sockets included
    sockets: int
    threads: int
    children: int


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid: (parent pid, state, command line) of every process of the machine."""
    table = {}
    for pid in procfs.pids():
        command = procfs.cmdline(pid)  # first: a process gone by then has no stat either
        stat = procfs.stat(pid)
        if stat is not None:
            table[pid] = (stat.ppid, stat.state, command)
    return table


def kind_of(command: str, parent_command: str) -> str:
    if command.startswith("nginx: master"):
        return "nginx master"
    if command.startswith("nginx: worker"):
        return "nginx worker"
    if command.startswith("nginx: cache manager"):
        return "nginx cache manager"
    if command.startswith("nginx: cache loader"):
        return "nginx cache loader"  # exits a minute after start
    if "forkserver" in command:  # a worker forked by the forkserver keeps its command line
        return WORKER_KIND if "forkserver" in parent_command else "forkserver"
    if "resource_tracker" in command:
        return "resource tracker"
    if "forkserver" in parent_command:
        return WORKER_KIND
    if "services.slow.job_process" in command:
        return JOB_PROCESS_KIND
    return "child"


def fleet_processes(settings: Settings, table: dict[int, tuple[int, str, str]]) -> list[Proc]:
    """supervisord, each program supervisor runs and each of their descendants, labelled."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, state, _) in table.items():
        if state != "Z":
            children.setdefault(ppid, []).append(pid)
    found = []
    supervisord = control.supervisord_pid(settings)
    if supervisord:
        found.append(Proc("supervisord", supervisord, True))
    for info in control.process_infos(settings):
        if not info["pid"] or info["pid"] not in table:
            continue
        program = info["name"]
        found.append(Proc(program, info["pid"], True))
        todo = [(info["pid"], False)]
        while todo:
            parent, in_job = todo.pop()
            for pid in children.get(parent, []):
                kind = kind_of(table[pid][2], table[parent][2])
                label = kind if kind.startswith("nginx") else f"{program} {kind}"
                # A job process and what it starts (its worker's forkserver) live as long as its job.
                job_part = in_job or kind == JOB_PROCESS_KIND
                found.append(Proc(label, pid, kind in LONG_LIVED_KINDS and not job_part))
                todo.append((pid, job_part))
    return found


def figures(pid: int, table: dict[int, tuple[int, str, str]]) -> Figures | None:
    status, fds = procfs.status(pid), procfs.fd_targets(pid)
    if status is None or fds is None:
        return None  # it exited meanwhile
    rss_kb = int(status.get("VmRSS", "0 kB").split()[0])  # a zombie shows none
    sockets = sum(1 for target in fds if target.startswith("socket:["))
    children = sum(1 for ppid, state, _ in table.values() if ppid == pid and state != "Z")
    return Figures(round(rss_kb / 1024, 2), len(fds), sockets, int(status["Threads"]), children)


def pool_workers(processes: list[Proc], table: dict[int, tuple[int, str, str]]) -> int:
    """Live pool workers of the whole fleet: local workers, or the job processes of Dask workers."""
    return sum(1 for p in processes if p.label.endswith(f" {WORKER_KIND}") and table.get(p.pid, (0, "Z"))[1] != "Z")


# leftovers ----------------------------------------------------------------------------------------

def _files_under(directory: Path, skip: tuple[Path, ...] = ()) -> int:
    count = 0
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if Path(root, d) not in skip]
        count += len(files)
    return count


TCP_STATES = {procfs.LISTEN: "listen", procfs.ESTABLISHED: "established", procfs.CLOSE_WAIT: "close_wait"}


def leftovers(settings: Settings, processes: list[Proc], table: dict[int, tuple[int, str, str]]) -> dict:
    pids = [p.pid for p in processes]
    record = settings.run_dir / cpu_priority.RECORD
    # a group is reused (and recorded again) when its instance restarts: count directories, once each
    groups = {line.strip() for line in (record.read_text().splitlines() if record.exists() else []) if line.strip()}
    tcp = procfs.tcp_sockets()
    sockets = [(TCP_STATES.get(tcp[i].state, "other"), tcp[i].port)
               for pid in pids for i in procfs.socket_inodes(pid) if i in tcp]
    temp_dirs = [render.nginx_temp_dir(settings)]
    owner = _run_as_uid(processes)
    shared_tmp = Path(tempfile.gettempdir())
    return {
        "cgroups": sum(1 for g in groups if Path(g).is_dir()),
        "run dir files": _files_under(settings.run_dir, skip=(settings.run_dir / "logs", render.edge_cache_dir(settings))),
        "temp files": sum(_files_under(d) for d in temp_dirs if d.exists())
        + (sum(1 for e in shared_tmp.iterdir() if _owned_by(e, owner)) if owner is not None else 0),
        "zombies": sorted(pid for pid, (ppid, state, _) in table.items() if state == "Z" and ppid in pids),
        "listening ports": sorted({port for state, port in sockets if state == "listen"}),
        "established sockets": sum(1 for state, _ in sockets if state == "established"),
        "close_wait sockets": sum(1 for state, _ in sockets if state == "close_wait"),
    }


def _run_as_uid(processes: list[Proc]) -> int | None:
    """The user the instances run as, when it is not ours (then its files in /tmp are the fleet's)."""
    for p in processes:
        if p.label.startswith(("fast-", "slow-")) and (uid := procfs.uid(p.pid)) is not None:
            return uid if uid != os.getuid() else None
    return None


def _owned_by(path: Path, uid: int) -> bool:
    try:
        return path.lstat().st_uid == uid
    except OSError:
        return False


def leftover_problems(start: dict, end: dict, nginx_workers: int) -> list[str]:
    """What the end of a soak holds that its start did not."""
    problems = []
    for key in ("cgroups", "run dir files", "temp files"):
        if end[key] > start[key]:
            problems.append(f"{key}: {start[key]} at the start, {end[key]} at the end")
    if end["zombies"]:
        problems.append(f"zombies: {end['zombies']}")
    if end["listening ports"] != start["listening ports"]:
        problems.append(f"listening ports {start['listening ports']} became {end['listening ports']}")
    if end["close_wait sockets"]:
        problems.append(f"{end['close_wait sockets']} sockets left in CLOSE_WAIT")
    # Both ends of a kept-alive upstream connection belong to the fleet: 2 sockets each.
    bound = start["established sockets"] + 2 * UPSTREAM_KEEPALIVE * nginx_workers
    if end["established sockets"] > bound:
        problems.append(f"{end['established sockets']} established sockets (start {start['established sockets']}, "
                        f"keep-alive pools allow up to {bound})")
    return problems


# asyncio's own complaints: an error nobody handled, which the fleet's code must never leave
ASYNCIO_ALARMS = ("was never retrieved", "Exception in callback", "Task was destroyed but it is pending")


def log_alarms(settings: Settings) -> int:
    """Lines of asyncio's complaints in every log of the fleet (rotated ones included)."""
    count = 0
    for path in (settings.run_dir / "logs").glob("*.log*"):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        count += sum(text.count(alarm) for alarm in ASYNCIO_ALARMS)
    return count

