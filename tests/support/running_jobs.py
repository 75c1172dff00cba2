"""Knowing that a heavy job runs, instead of sleeping until it probably does.

/slow/spin_and_tell/<seconds> (tests/support/faulty_tasks.py) writes "<pid> <token>" to
`break-spinner` in the run dir of the fleet whose process runs it (on either backend, on any host):

    before = last_spinner(fleet.run_dir)
    job = pool.submit(fleet.get, "/slow/spin_and_tell/2")
    pid = spinner_pid(fleet.run_dir, before)      # the job runs now, in process `pid`

A Dask worker runs each job in a child process: `job_running_under` sees one burning CPU.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from services.common import procfs
from tests.support.fleet import Fleet, Response
from tests.support.waiting import wait_for


def last_spinner(run_dir: Path) -> str | None:
    """What the latest spin_and_tell job of this run dir wrote; None if none ran yet."""
    try:
        return (run_dir / "break-spinner").read_text()
    except FileNotFoundError:
        return None


def spinner_pid(run_dir: Path, before: str | None, timeout: float = 10) -> int:
    """The pid of the process running the spin_and_tell job sent after `before` was read, once it runs."""
    written = wait_for(lambda: (text := last_spinner(run_dir)) != before and text, timeout,
                       what=f"a spin_and_tell job running for {run_dir}")
    return int(written.split()[0])


def beside_a_running_job(fleet: Fleet, path: str) -> Response:
    """The answer to `path`, sent while another job runs (a spin of 1 s, sent first and waited for
    until its process runs), once that job has been answered 200: whatever `path` does, its
    neighbour is untouched."""
    before = last_spinner(fleet.run_dir)
    with ThreadPoolExecutor(1) as pool:
        neighbour = pool.submit(fleet.get, "/slow/spin_and_tell/1")
        spinner_pid(fleet.run_dir, before)
        answer = fleet.get(path)
        assert neighbour.result().status == 200, neighbour.result().body
    return answer


def job_running_under(pid: int) -> bool:
    """A process below `pid` (a Dask worker's job process) burns CPU (state R)."""
    return any(procfs.state(child) == "R" for child in procfs.descendants(pid))
