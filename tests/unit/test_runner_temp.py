"""The job processes' temporary directories (services/runner/app.py): each job process gets one of
its own (TMPDIR), and those of job processes that are gone are removed, whoever their parent was."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

from services.common import procfs
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
