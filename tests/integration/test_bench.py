"""Smoke test of `make bench`: a quick run of every configuration (the peers and the floor included)
writes the table and the charts.

The figures of a quick run are indicative only (one short repetition on a shared machine), so
nothing here judges them: the full `make bench` reports them against the targets.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.report import TARGETS
from bench.subjects import CONFIGS
from tests.support.fleet import REPO

# Every module of the bench once: each peer family (gunicorn-sync-2w and gunicorn-dirty differ from
# gunicorn-sync and gunicorn-dirty-nice only in their command lines), the floor, both fleets.
SMOKE = [c for c in CONFIGS if c not in ("gunicorn-sync-2w", "gunicorn-dirty")]

pytestmark = pytest.mark.integration


def test_quick_bench_writes_the_table_and_the_charts(tmp_path: Path) -> None:
    # wrk and the peers' environment, as `make bench` installs them (deploy/bootstrap.sh, run by
    # `make test`, does not).
    subprocess.run(["bash", str(REPO / "bench" / "bootstrap.sh")], check=True, timeout=600)
    started = time.monotonic()
    bench = subprocess.Popen([sys.executable, "-m", "bench", "--quick", "--configs", ",".join(SMOKE), "--out",
                              str(tmp_path)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = bench.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        bench.send_signal(signal.SIGTERM)  # the bench stops everything it started, then exits
        output, _ = bench.communicate(timeout=60)
        pytest.fail(f"python -m bench --quick ran past 200 s:\n{output[-4000:]}")
    elapsed = time.monotonic() - started
    assert bench.returncode == 0, output[-4000:]

    table = (tmp_path / "results.md").read_text()
    assert "## Targets" in table
    for name in SMOKE:
        assert f"| **{name}**" in table, f"no row for {name}:\n{table}"
    targets = table.split("## Targets", 1)[1].split("\n## ", 1)[0]
    # Every target was measured but the parallel efficiencies (the quick profile has no one-worker runs).
    assert targets.count("pass") + targets.count("FAIL") == len(TARGETS) - 2, targets
    assert targets.count("not measured") == 2 and "efficiency" in targets, targets
    for chart in ("latency.png", "throughput.png", "memory.png"):
        data = (tmp_path / chart).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, chart
    machine = (tmp_path / "machine.md").read_text()
    assert "nginx" in machine and "tornado" in machine
    assert elapsed < 150, f"the quick bench took {elapsed:.0f} s (it must stay a smoke test)\n{output[-2000:]}"
