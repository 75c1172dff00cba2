"""Finding a fleet's processes, whatever became of its supervisord: by the marker they carry.

Every Python process of a fleet carries MEMBER_MARKER=<run dir> in its environment (set when
supervisord starts, inherited by instances, forkservers and workers); nginx rewrites its own
environment with its process titles, so nginx processes are recognised by the run dir's log files
they hold open. /proc is read through services/common/procfs.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from services.common import procfs

MEMBER_MARKER = "FLEET_MEMBER_OF"


def processes_of(run_dir: Path) -> list[int]:
    """Pids of every process of this run dir's fleet: supervisord, nginx, instances, workers."""
    marker = f"{MEMBER_MARKER}={run_dir}"
    found = []
    for pid in procfs.pids():
        if pid == os.getpid():
            continue
        if marker in procfs.environ(pid) or (
                procfs.cmdline(pid).startswith("nginx:") and holds_file_in(pid, run_dir)):
            found.append(pid)
    return found


def holds_file_in(pid: int, directory: Path) -> bool:
    prefix = f"{directory}/"
    return any(target.startswith(prefix) for target in procfs.fd_targets(pid) or [])
