"""The fleet's one reader of /proc: what the kernel says of its processes and of TCP sockets.

A process's state, parent, CPU time and start (stat), children and descendants, command line,
environment, memory and threads (status, smaps_rollup), cgroups, time slice (sched), open
descriptors; the machine's TCP sockets (net/tcp, net/tcp6). Standard library only, so the nginx
launcher and the instances import it at no cost. The processes read are not ours: any of them may
exit between two reads, so every reader answers for a process that is gone (None, "", [] or
False) instead of raising. (What describes the machine, read once by one module, stays there:
cpuinfo and meminfo in bench/machine.py, /proc/stat's totals in bench/cpu.py, a sysctl in
deploy/control.py.)

    >>> procfs.stat(os.getpid()).state
    'R'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

PROC = Path("/proc")


class Stat(NamedTuple):
    """The fields of /proc/<pid>/stat the fleet reads (proc(5) numbers them 3, 4, 14, 15 and 22)."""
    state: str  # R running, S sleeping, D waiting on the disk, Z zombie (exited, not yet reaped)...
    ppid: int
    utime: int  # CPU time in user mode, in clock ticks (os.sysconf("SC_CLK_TCK") a second)
    stime: int  # CPU time in the kernel, in clock ticks
    starttime: int  # clock ticks after boot: with the pid, it tells a process from a later one


def pids() -> list[int]:
    """Every process of the machine now."""
    return [int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()]


def stat(pid: int | str) -> Stat | None:
    """None once the process is gone. Its command name, in parentheses, may itself hold spaces and
    parentheses: the fields are counted after the last ")"."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return Stat(fields[0], int(fields[1]), int(fields[11]), int(fields[12]), int(fields[19]))


def state(pid: int) -> str | None:
    found = stat(pid)
    return found.state if found else None


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return state(pid) not in (None, "Z")


def children_map() -> dict[int, list[int]]:
    """{parent pid: its children's pids} of every process now, zombies included."""
    children: dict[int, list[int]] = {}
    for pid in pids():
        found = stat(pid)
        if found is not None:
            children.setdefault(found.ppid, []).append(pid)
    return children


def children(pid: int) -> list[int]:
    return children_map().get(pid, [])


def descendants(pid: int) -> list[int]:
    """Its children, their children and so on, read from one look at /proc."""
    tree = children_map()
    found, todo = [], [pid]
    while todo:
        below = tree.get(todo.pop(), [])
        found += below
        todo += below
    return found


def cmdline(pid: int | str) -> str:
    """Its command line, arguments joined by spaces; "" once it is gone (and for a kernel thread).
    nginx writes titles into its own ("nginx: worker process"); a forkserver's children keep the
    forkserver's."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def argv(pid: int | str) -> list[str] | None:
    """Its command line as the list of its arguments; None once it is gone."""
    try:
        data = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return data.removesuffix(b"\0").decode(errors="replace").split("\0")


def environ(pid: int | str) -> list[str]:
    """Its environment as it started, "NAME=value" each; [] once it is gone or when it is not ours
    to read."""
    try:
        data = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return []
    return [entry for entry in os.fsdecode(data).split("\0") if entry]


def status(pid: int | str) -> dict[str, str] | None:
    """/proc/<pid>/status as {field: value} ("VmRSS": "1234 kB", "Threads": "3", "Uid": "0 0 0 0");
    None once it is gone."""
    return _fields(PROC / str(pid) / "status")


def kilobytes(pid: int | str, key: str, file: str = "status") -> int | None:
    """A memory figure in kB: VmRSS (resident) of its status, Pss (its share of the pages it
    shares) of its smaps_rollup; None once it is gone or where the kernel shows none (a kernel
    thread)."""
    fields = _fields(PROC / str(pid) / file)
    try:
        return int(fields[key].split()[0])
    except (TypeError, KeyError, ValueError, IndexError):
        return None


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(pid: int | str) -> int:
    """Its resident memory (RSS), from statm: one short line, cheap enough to read for every busy
    worker 20 times a second (services/slow/pool.py); 0 once it is gone."""
    try:
        with open(PROC / str(pid) / "statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def sched(pid: int | str) -> dict[str, str] | None:
    """/proc/<pid>/sched as {field: value} ("se.slice": "3000000"); None where there is none."""
    try:
        text = (PROC / str(pid) / "sched").read_text()
    except OSError:
        return None
    return {name.strip(): value.strip() for name, sep, value in (line.partition(":") for line in text.splitlines())
            if sep}


def cgroups(pid: int | str = "self", file: Path | None = None) -> dict[str, str]:
    """{controllers ("cpu,cpuacct" on cgroup v1, "" on v2): path} of the cgroups it is in, from
    /proc/<pid>/cgroup, or from `file` in that format (a test's); {} once it is gone."""
    try:
        text = (file or PROC / str(pid) / "cgroup").read_text()
    except OSError:
        return {}
    return {controllers: path for _, controllers, path in (line.split(":", 2) for line in text.splitlines())}


def fd_targets(pid: int | str) -> list[str] | None:
    """What its open descriptors point to ("/run/x.log", "socket:[1234]", "pipe:[5678]"); None once
    it is gone. A descriptor closed while it is read is left out."""
    fds = PROC / str(pid) / "fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return None
    targets = []
    for name in names:
        try:
            targets.append(os.readlink(fds / name))
        except OSError:
            continue
    return targets


def uid(pid: int | str) -> int | None:
    """The user it runs as (its effective uid); None once it is gone."""
    fields = status(pid)
    return int(fields["Uid"].split()[1]) if fields else None


def socket_inodes(pid: int | str) -> list[str]:
    """The inodes of its open sockets, as tcp_sockets() keys them; [] once it is gone."""
    return [target[len("socket:["):-1] for target in fd_targets(pid) or [] if target.startswith("socket:[")]


class TcpSocket(NamedTuple):
    state: str  # the kernel's code, hex: "0A" listening, "01" established, "08" close-wait
    address: str  # the local address as /proc shows it, hex: "0100007F" is 127.0.0.1
    port: int  # the local port


LISTEN, ESTABLISHED, CLOSE_WAIT = "0A", "01", "08"


def tcp_sockets() -> dict[str, TcpSocket]:
    """{inode: socket} of every TCP socket of the machine, IPv4 and IPv6."""
    sockets = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue  # no IPv6
        for line in lines:
            fields = line.split()
            address, port = fields[1].rsplit(":", 1)
            sockets[fields[9]] = TcpSocket(fields[3], address, int(port, 16))
    return sockets


def _fields(path: Path) -> dict[str, str] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    return {name: value.strip() for name, sep, value in (line.partition(":") for line in text.splitlines()) if sep}
