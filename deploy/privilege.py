"""Who the fleet's processes run as (process.user): least privilege when root deploys.

Root keeps only what needs it:
- supervisord: it starts and stops everything, and sets up the workers' idle cgroups;
- the nginx launcher and nginx's master: they bind the edge's port, which may be below 1024, and
  open the logs.
Everything that handles a request or runs a job runs as the fleet's user: nginx's workers
(nginx's `user`), the fast and slow instances and their workers, the Dask scheduler and workers
(supervisor's `user=`).

"auto" is the system user `fleet` (deploy/bootstrap.sh makes it when run as root), or `nobody`.
That user must be able to read the code, the virtual environment and the run dir. A repository
under /root, or in a `mktemp -d` directory, is closed to it, so a probe run as that user decides
first. Then "auto" falls back to root and says why; a user named in the settings is an error.
Deployed by an ordinary user, every process runs as that user, as before.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from deploy import programs, rundir
from services.common import procfs
from services.common.settings import Settings, SettingsError
from services.slow import cpu_priority

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_USER = "fleet"
# As the fleet's user: can it import the code from the repository, and reach the run dir (or the
# nearest directory of it that exists yet)?
PROBE = """
import os, sys
import tornado, services.common.settings
path = sys.argv[1]
while not os.path.exists(path):
    path = os.path.dirname(path)
sys.exit(0 if os.access(path, os.R_OK | os.X_OK) else 3)
"""


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    group: str


def run_as(settings: Settings) -> User | None:
    """The user the fleet's processes run as, or None: as the deploying user (not root, or
    process.user = "root", or "auto" and no unprivileged user can reach the code)."""
    return _run_as(settings.process.user, str(settings.run_dir), os.geteuid())


@functools.lru_cache(maxsize=None)
def _run_as(wanted: str, run_dir: str, euid: int) -> User | None:
    if euid != 0:
        current = pwd.getpwuid(euid).pw_name
        if wanted not in ("auto", current):
            raise SettingsError(f"process.user = {wanted!r}: only root can run the fleet as another user "
                                f"(this deploy runs as {current}); set it to \"auto\"")
        return None
    if wanted == "root":
        return None
    name = wanted if wanted != "auto" else DEFAULT_USER if user_exists(DEFAULT_USER) else "nobody"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SettingsError(f"process.user = {wanted!r}: no user {name!r} on this machine") from None
    user = User(name, entry.pw_uid, entry.pw_gid, grp.getgrgid(entry.pw_gid).gr_name)
    problem = _cannot_reach(user, run_dir)
    if problem is None:
        return user
    if wanted != "auto":
        raise SettingsError(f"process.user = {wanted!r}: {problem}")
    print(f"warning: the fleet runs as root: {problem}. Put the repository and the run dir where "
          f"{name} can read them (e.g. /opt/fleet), or set process.user = \"root\" to say so",
          file=sys.stderr)
    return None


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _cannot_reach(user: User, run_dir: str) -> str | None:
    """Why `user` cannot run the fleet's code from here, or None if it can."""
    try:
        result = subprocess.run([sys.executable, "-c", PROBE, run_dir], cwd=REPO_ROOT, user=user.uid,
                                group=user.gid, extra_groups=[], capture_output=True, timeout=30,
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/",
                                     "PYTHONDONTWRITEBYTECODE": "1"})
    except (OSError, subprocess.SubprocessError) as exc:
        interpreter = os.path.realpath(sys.executable)
        return (f"user {user.name} cannot run the .venv's interpreter {interpreter} ({exc.__class__.__name__}); "
                f"make the .venv from a system Python (rm -rf .venv; PYTHON=/usr/bin/python3.11 make deploy-local)")
    if result.returncode == 3:
        return f"user {user.name} cannot reach the run dir {run_dir}"
    if result.returncode != 0:
        return f"user {user.name} cannot read the code in {REPO_ROOT} or its .venv"
    return None


def prepare(settings: Settings, user: User) -> None:
    """As root, before the programs start: what the fleet's user writes in the run dir is its own
    (Dask workers' local directories, the job store, a home for tools that want one), and the workers' idle
    cgroups exist, made by root under supervisord's cgroup and handed to the user to join."""
    run_dir = settings.run_dir
    for directory in (run_dir / "dask", run_dir / "jobs", run_dir / "home"):
        # Made by root and handed over by descriptor; never walked into, since the user may have
        # put links in it (an lchown of a path whose parent they swapped for a link follows it).
        rundir.handed_over_dir(directory, user.uid, user.gid)
    if not settings.slow.idle_cgroup:
        return
    for name in programs.idle_cgroup_owners(settings):
        group = cpu_priority.create_idle_cgroup(cpu_priority.group_name(name, run_dir),
                                                run_dir / cpu_priority.RECORD, pid=_supervisord_pid(run_dir))
        if group is not None:
            cpu_priority.hand_over(group, user.uid, user.gid)


def _supervisord_pid(run_dir: Path) -> int | None:
    """The running supervisord's pid: groups go under its cgroup, whatever shell deploys."""
    try:
        pid = int((run_dir / "supervisord.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if procfs.stat(pid) is not None else None
