"""Finding a fleet's processes in /proc: standard library only, so the nginx launcher stays small.

Every Python process of a fleet carries MEMBER_MARKER=<run dir> in its environment (set when
supervisord starts, inherited by instances, forkservers and workers); nginx rewrites its own
environment with its process titles, so nginx processes are recognised by the run dir's log files
they hold open.
"""

from __future__ import annotations

import os
from pathlib import Path

MEMBER_MARKER = "FLEET_MEMBER_OF"


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def children_of(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# nginx's workers are the children of its master.
worker_pids = children_of


def processes_of(run_dir: Path) -> list[int]:
    """Pids of every process of this run dir's fleet: supervisord, nginx, instances, workers."""
    marker = b"\0" + f"{MEMBER_MARKER}={run_dir}".encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in b"\0" + (entry / "environ").read_bytes() or (
                    (entry / "cmdline").read_bytes().startswith(b"nginx:") and holds_file_in(entry, run_dir)
                ):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def holds_file_in(proc: Path, directory: Path) -> bool:
    prefix = f"{directory}/"
    for fd in (proc / "fd").iterdir():
        try:
            if os.readlink(fd).startswith(prefix):
                return True
        except OSError:
            continue
    return False
