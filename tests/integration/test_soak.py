"""A short `make soak`: about a minute of steady load through a private fleet while every fault of
the schedule strikes at least once; the verdict must be PASS (drills/soak.py says what it checks).

The hours-long soak is `SOAK_MINUTES=... make soak`; its latest recorded run is bench/results/soak.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from drills.soak import CHEAP, JOB_CHEAP, JOB_RESTARTS, RESTARTS
from tests.support.fleet import REPO

# Its faults check timings (a departed client's job must have started, a worker must be back within
# 1 s): beside another worker's fleet, a job still waiting at its client's hang-up has no worker to kill.
pytestmark = [pytest.mark.integration, pytest.mark.alone]


def test_a_minute_of_load_with_every_fault_loses_nothing_grows_nothing_and_leaves_nothing(private_fleet, tmp_path: Path):
    fleet = private_fleet()  # the test fleets serve the fault tasks (tests.support.faulty_tasks)
    out = tmp_path / "soak"
    result = subprocess.run(
        [sys.executable, "-m", "drills.soak", "--minutes", "1", "--fault-every", "2", "--restart-every", "2",
         "--warmup", "6", "--sample-every", "1", "--out", str(out)],
        cwd=REPO, env=fleet.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "PASS: nothing failed, was lost, grew or was left behind" in result.stdout
    report = json.loads((out / "soak.json").read_text())["report"]
    produced = {f["name"] for f in report["faults"]}
    assert produced >= {f.name for f in CHEAP + RESTARTS + JOB_CHEAP + JOB_RESTARTS}, produced
    assert not any(f["error"] for f in report["faults"])
    requests = report["requests"]
    assert requests["sent"] > 3000 and requests["failed"] == 0 and requests["lost"] == 0
    assert requests["hit"] > 0  # the faults did reach requests, and those were answered with JSON errors
    assert report["growth"], "no process lived past its warm-up: nothing was measured"
    jobs = report["long_jobs"]  # each ended as promised (else the verdict said FAIL): here, that there were some
    assert jobs["accepted"] >= 5 and jobs["succeeded"] >= 2 and jobs["cancelled"] >= 1, jobs
    assert {p.name for p in out.glob("*.png")} == {"soak-rss.png", "soak-fds.png", "soak-threads.png",
                                                   "soak-children.png"}
