"""Temporary directories the fleet's processes keep in the run dir, never in the shared /tmp: each
instance's own, emptied as it starts (services/common/temp_dir.py), and each job process's
(services/runner/app.py), removed once it is gone, whoever its parent was."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from services.common import procfs, temp_dir
from services.common.settings import load
from services.runner.app import JobProcesses


def test_the_temporary_directories_of_gone_job_processes_are_removed_and_live_ones_kept(tmp_path):
    settings = load(env={"FLEET_RUN_DIR": str(tmp_path)})
    processes = JobProcesses(SimpleNamespace(settings=settings))
    live_owner, gone_owner = processes.owner(), processes.owner()
    starting = processes.owner()  # made just now, for a job process that is only starting
    processes.temp_dir(starting).mkdir(parents=True)
    for owner in (live_owner, gone_owner):
        (processes.temp_dir(owner) / "pymp-x").mkdir(parents=True)
        (processes.temp_dir(owner) / "pymp-x" / "listener").write_text("")
        os.utime(processes.temp_dir(owner), (time.time() - 60, time.time() - 60))
    # A process whose command line is a job process's with that owner (as the runner starts them).
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "services.slow.job_process",
                             "--owner", live_owner])
    try:
        # Popen returns once the exec has begun; the new command line shows a moment later.
        deadline = time.monotonic() + 10
        while live_owner not in procfs.cmdline(live.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert processes.sweep_temp_dirs() == 1
        assert processes.temp_dir(live_owner).is_dir() and not processes.temp_dir(gone_owner).exists()
    finally:
        live.kill()
        live.wait()
    assert processes.sweep_temp_dirs() == 1
    assert [p.name for p in processes.temp_root.iterdir()] == [processes.temp_dir(starting).name]


SHOW_TEMP_DIR = ("from services.common import temp_dir; import multiprocessing.util, os; "
                 "print(temp_dir.take_own()); print(os.environ.get('TMPDIR')); print(multiprocessing.util.get_temp_dir())")


def _take_own(path: str, tmpdir: str) -> list[str]:
    env = {**os.environ, temp_dir.ENV: path, "TMPDIR": tmpdir}
    return subprocess.run([sys.executable, "-c", SHOW_TEMP_DIR], env=env, capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[2]).stdout.split()


def test_an_instance_starts_with_an_empty_temporary_directory_of_its_own_its_forkserver_s_included(short_tmp_path):
    tmp_path = short_tmp_path
    own = tmp_path / "home" / "tmp" / "slow-01"
    left = own / "pymp-killed"  # what a killed predecessor's forkserver left
    left.mkdir(parents=True)
    (left / "listener-x").write_text("")
    taken, tmpdir, forkserver_dir = _take_own(str(own), str(tmp_path))
    assert taken == tmpdir == str(own)
    assert Path(forkserver_dir).parent == own  # multiprocessing's pymp-* directory, in the instance's own
    assert not left.exists()


def test_a_temporary_directory_too_deep_for_a_unix_socket_leaves_tmpdir_as_it_was(tmp_path):
    deep = str(tmp_path / ("d" * temp_dir.MAX_CHARS) / "slow-01")
    taken, tmpdir, forkserver_dir = _take_own(deep, str(tmp_path))
    assert (taken, tmpdir) == ("None", str(tmp_path))
    assert Path(forkserver_dir).parent == tmp_path and not Path(deep).exists()
