"""Least privilege: deployed by root, only supervisord, the nginx launcher and nginx's master keep
root; nginx's workers, the instances, their workers and the Dask processes run as the fleet's user.

The fleet's user must be able to read the code, the interpreter and the run dir. This machine's
repository (a mktemp -d clone, or under /root) and its .venv's interpreter (pyenv, under /root)
may be closed to it, so the test deploys from a copy it can read: the tracked files, the .venv
hard-linked, with Debian's python3.11 as its interpreter.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from deploy import privilege
from deploy.procs import processes_of
from services.common import procfs
from services.slow import cpu_priority
from tests.support.cgroups import cpu_cgroup_of
from tests.support.fleet import REPO, Fleet, make_fleet

pytestmark = pytest.mark.integration

SYSTEM_PYTHON = Path("/usr/bin/python3.11")


@pytest.fixture(scope="module")
def readable_copy():
    """A copy of the repository any user can read, whose .venv runs on the system's python3.11."""
    if os.geteuid() != 0 or not SYSTEM_PYTHON.exists():
        pytest.skip("needs root and Debian's python3.11")
    base = Path(tempfile.mkdtemp(prefix="fleet-privilege-", dir="/tmp"))
    base.chmod(0o755)
    try:  # removed whatever happens, a copy that failed half-way too
        repo = base / "repo"
        tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        for name in tracked.splitlines():
            if (REPO / name).is_file():
                (repo / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, repo / name)
        # The .venv itself, resolved: were it a symlink, the copy would be one too, and the edits below
        # would land in the original.
        subprocess.run(["cp", "-al", str((REPO / ".venv").resolve()), str(repo / ".venv")], check=True)
        venv = repo / ".venv"
        assert not venv.is_symlink() and not (venv / "pyvenv.cfg").is_symlink()
        (venv / "bin" / "python3").unlink()  # a hard-linked copy: replace files, never write into them
        (venv / "bin" / "python3").symlink_to(SYSTEM_PYTHON)
        (venv / "pyvenv.cfg").unlink()
        (venv / "pyvenv.cfg").write_text(f"home = {SYSTEM_PYTHON.parent}\ninclude-system-site-packages = false\n"
                                         f"version = 3.11\nexecutable = {SYSTEM_PYTHON}\n")
        for directory in [repo, *(p for p in repo.rglob("*") if p.is_dir() and ".venv" not in p.parts)]:
            directory.chmod(0o755)
        yield repo
    finally:
        shutil.rmtree(base, ignore_errors=True)


def deploy(repo: Path, fleet: Fleet, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(repo / ".venv" / "bin" / "python"), "-m", "deploy.fleet", *args], cwd=repo,
                          env=fleet.env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module", params=["local", "dask"])
def least_privileged(readable_copy, request):
    """A fleet deployed by root from the readable copy, on each backend: (fleet, its user)."""
    backend = request.param
    user = pwd.getpwnam(privilege.DEFAULT_USER if privilege.user_exists(privilege.DEFAULT_USER) else "nobody")
    run_dir = readable_copy.parent / f"run-{backend}"
    fleet = make_fleet(run_dir, **({"FLEET_SLOW_BACKEND": "dask"} if backend == "dask" else {}))
    try:
        up = deploy(readable_copy, fleet, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "runs as root" not in up.stderr  # the copy is readable: no fallback
        yield fleet, user
    finally:
        stop = deploy(readable_copy, fleet, "stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert processes_of(run_dir) == []
    assert not (run_dir / cpu_priority.RECORD).exists(), stop.stdout  # no cgroup left either


def backend_of(fleet: Fleet) -> str:
    return "dask" if fleet.env.get("FLEET_SLOW_BACKEND") == "dask" else "local"


def test_deployed_by_root_only_supervisord_and_nginx_s_master_keep_root(least_privileged):
    fleet, user = least_privileged
    run_dir, backend = fleet.run_dir, backend_of(fleet)
    assert fleet.get("/fast").status == 200
    assert fleet.get("/slow/fib/20").json()["result"] == 6765
    supervisord = int((run_dir / "supervisord.pid").read_text())
    nginx_master = int((run_dir / "nginx" / "nginx.pid").read_text())
    kept_root = {supervisord, nginx_master, fleet.pid("nginx")}  # the launcher is nginx's program
    members = processes_of(run_dir)
    assert kept_root <= set(members)
    wrong = {pid: procfs.cmdline(pid)[:100] for pid in members
             if procfs.uid(pid) != (0 if pid in kept_root else user.pw_uid)}
    assert not wrong, f"not as expected (root only for {sorted(kept_root)}): {wrong}"
    # Every kind of process is there, as the fleet's user: nginx's workers, the instances, the
    # job processes (a local pool's workers, or a Dask worker's children) and Dask itself.
    as_user = [procfs.cmdline(pid) for pid in members if procfs.uid(pid) == user.pw_uid]
    for kind in ["nginx: worker process", "services.fast", "services.slow"] + (
            ["dask_scheduler", "dask_worker"] if backend == "dask" else []):
        assert any(kind in name for name in as_user), f"no {kind} among {as_user}"
    job_processes = fleet.slow_health()["pool"].get("pids") or []
    assert all(procfs.uid(pid) == user.pw_uid for pid in job_processes)
    found = cpu_priority.own_cpu_cgroup()
    if found is not None and not found[1] and backend == "local":  # v1, as here: workers joined root's group
        for pid in job_processes:
            assert f"/{cpu_priority.IDLE}/slow-01-" in cpu_cgroup_of(pid)


# another local user (issue 29) ---------------------------------------------------------------------

STRANGER = "nobody"  # neither root nor the fleet's user

DIRECT_CALLS = """
import http.client, json, sys
answers = []
for port in map(int, sys.argv[1:]):
    for method, path, body in (("GET", "/slow/fib/20", None), ("GET", "/fast", None), ("POST", "/echo", b"x"),
                               ("GET", "/healthz", None)):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        # Claims to be nginx passing on a client: another client's address, another request's id.
        conn.request(method, path, body=body, headers={"X-Real-IP": "10.1.2.3", "X-Request-ID": "not-mine"})
        response = conn.getresponse()
        data = response.read()
        answers.append([port, path, response.status, json.loads(data).get("error") if data.startswith(b"{") else None,
                        response.getheader("X-Request-ID")])
print(json.dumps(answers))
"""


def as_stranger(*command: str) -> subprocess.CompletedProcess:
    stranger = pwd.getpwnam(STRANGER)
    return subprocess.run(list(command), user=stranger.pw_uid, group=stranger.pw_gid, extra_groups=[], cwd="/",
                          env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"}, capture_output=True, text=True, timeout=60)


def test_another_local_user_calling_an_instance_directly_gets_only_its_health(least_privileged):
    fleet, _ = least_privileged
    result = as_stranger(str(SYSTEM_PYTHON), "-c", DIRECT_CALLS, *map(str, fleet.fast_ports + fleet.slow_ports))
    assert result.returncode == 0, result.stderr
    for port, path, status, error, request_id in json.loads(result.stdout):
        if path == "/healthz":
            assert status == 200, (port, path, status)
        else:  # never a job run, never a client address or request id believed
            assert (status, error) == (403, "forbidden"), (port, path, status, error)
        assert request_id != "not-mine"


DASK_CLIENT = """
import asyncio, sys
from distributed import Client
async def main():
    try:
        async with Client(sys.argv[1], asynchronous=True, timeout=5) as client:
            print("RAN AS", await client.run_on_scheduler(lambda: __import__("os").getuid()))
    except Exception as exc:
        print("REFUSED", type(exc).__name__, str(exc)[:200])
asyncio.run(main())
"""


def test_another_local_user_cannot_run_code_on_the_managed_dask_cluster(least_privileged, readable_copy):
    fleet, _ = least_privileged
    if backend_of(fleet) != "dask":
        pytest.skip("a Dask fleet's test")
    port = fleet.env["FLEET_DASK_SCHEDULER_PORT"]
    python = str(readable_copy / ".venv" / "bin" / "python")
    for scheme in ("tcp", "tls"):  # plain, or TLS without the fleet's certificate (its key is not theirs)
        result = as_stranger(python, "-c", DASK_CLIENT, f"{scheme}://127.0.0.1:{port}")
        assert "REFUSED" in result.stdout and "RAN AS" not in result.stdout, result.stdout + result.stderr
    key = fleet.run_dir / "private" / "key.pem"
    assert as_stranger("cat", str(key)).returncode != 0


def test_a_named_user_that_cannot_read_the_code_is_an_error_and_auto_falls_back_to_root(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    fleet = make_fleet(tmp_path / "run", FLEET_PROCESS_USER="nobody")  # pytest's temp dir is 0700
    result = subprocess.run([sys.executable, "-m", "deploy.fleet", "render"], cwd=REPO, env=fleet.env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "process.user = 'nobody': user nobody cannot" in result.stderr
    fleet.env["FLEET_PROCESS_USER"] = "auto"
    result = subprocess.run([sys.executable, "-m", "deploy.fleet", "render"], cwd=REPO, env=fleet.env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "warning: the fleet runs as root" in result.stderr
    assert "user=" not in (tmp_path / "run" / "supervisord.conf").read_text()
    # nginx's workers run as the instances do, root here, with their temp files in the run dir.
    assert "user root root;" in (tmp_path / "run" / "nginx" / "conf" / "nginx.conf").read_text()
    assert "no fleet running" in fleet.command("stop").stdout

