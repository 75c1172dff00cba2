"""Smoke test of `make bench`: a quick run of every configuration (the peers and the floor included)
writes the table and the charts; the long-jobs part (bench/jobs.py) runs each of its phases, small.

The figures of a quick run are indicative only (one short repetition on a shared machine), so
nothing here judges them: the full `make bench` reports them against the targets.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import jobs, phases, report
from bench.__main__ import Bench
from bench.report import TARGETS
from bench.subjects import BEHIND_NGINX, CONFIGS
from tests.support.fleet import REPO

# Every module of the bench once: each peer family (gunicorn-sync-2w and gunicorn-dirty differ from
# gunicorn-sync and gunicorn-dirty-nice only in their command lines), the floor, both fleets. The
# long jobs' part has a smoke test of its own, smaller than its --quick run (below).
# One peer behind nginx stands for the six (bench/subjects.py's PeerBehindNginx, one class).
SMOKE = [c for c in CONFIGS if c not in ("gunicorn-sync-2w", "gunicorn-dirty", "jobs")
         and (not c.endswith(BEHIND_NGINX) or c == "gunicorn-sync" + BEHIND_NGINX)]

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
    # Every target was measured but the parallel efficiencies (the quick profile has no one-worker runs);
    # an isolation ratio whose probe ran late is shown as not judged, fast req/s as not a target.
    verdicts = [row.split(" | ")[3] for row in targets.splitlines() if row.startswith("| ") and " | " in row][1:]
    assert len(verdicts) == len(TARGETS), targets
    assert verdicts.count("not measured") == 2 and "efficiency" in targets, targets
    assert verdicts.count("not a target") == 1, targets
    assert all(v in ("pass", "**FAIL**", "not measured", "not a target") or v.startswith("not judged: the probe sent late")
               for v in verdicts), verdicts
    for chart in ("latency.png", "throughput.png", "memory.png"):
        data = (tmp_path / chart).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, chart
    machine = (tmp_path / "machine.md").read_text()
    assert "nginx" in machine and "tornado" in machine
    assert elapsed < 150, f"the quick bench took {elapsed:.0f} s (it must stay a smoke test)\n{output[-2000:]}"


def test_the_cpu_per_request_page_compares_the_fleet_with_a_bare_tornado_hello(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "bench.request_cost", "--quick", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    page = (tmp_path / "request_cost.md").read_text()
    assert "fleet fast instance CPU per request ÷ the bare Tornado Hello's" in page
    data = json.loads((tmp_path / "request_cost.json").read_text())
    for name in ("floor", "fleet"):
        cost = data[name][0]["cost"]
        assert cost["answered"] == cost["sent"] > 0 and cost["us_per_request"]["instance"] > 0, cost
        assert cost["us_per_request"]["nginx worker"] > 0, cost
        # py-spy saw the request path (a thousand samples at most: Tornado's, not one handler's line).
        assert "RequestHandler._execute (tornado/web.py)" in data[name][0]["profile"], "py-spy saw no request"
    # As many bare Hellos as the fleet has fast instances: each serves the same share of the rate.
    assert data["fleet"][0]["cost"]["instances"] == data["floor"][0]["cost"]["instances"] == 2
    # What the fleet adds is named by its functions: its request hooks are in the fleet's profile only.
    assert "## What the fleet's instance adds" in page
    assert any(f.endswith("(services/common/web.py)") for f in data["fleet"][0]["profile"])
    assert not any(f.endswith("(services/common/web.py)") for f in data["floor"][0]["profile"])


# Every phase of bench/jobs.py at a tenth of its --quick size or less: about 25 s with the fleet's
# start (each job runs in a job process of its own, whose start costs about 0.3 s of CPU).
SMALL = dataclasses.replace(jobs.QUICK, name="smoke", submits=60, progress_seconds=2, progress_streams=2, streams=100,
                            stream_processes=1, baseline_seconds=1, streams_seconds=2, cancels_running=1,
                            cancels_queued=2, random_ids=200, finished_jobs=30)


def test_the_long_jobs_bench_runs_every_phase_on_a_fleet_of_its_own_and_reports_each_target(short_tmp_path: Path) -> None:
    tmp_path = short_tmp_path  # its fleet's run dir is <it>/rep1/jobs/run: supervisord's socket must fit
    bench = Bench(phases.QUICK, tmp_path, {}, jobs_profile=SMALL)
    try:
        record = bench.run_config("jobs", 0)
    finally:
        bench.stop_all()
    assert record["killed"] == 0
    m = record["jobs"]
    # What must hold whatever the machine's speed (the figures themselves are `make bench`'s to judge).
    # A submit may be refused (429, 503: the slow line full while others' work starves the niced workers),
    # never fail.
    submit = m["submit"]
    assert submit["sent"] == SMALL.submits and submit["ok"] > 0 and set(submit["non_200"]) <= {"429", "503"}, submit
    assert submit["errors"] == submit["timeouts"] == 0, submit
    assert m["progress"]["events"] > 0 and m["streams"]["open"] == 100 and m["streams"]["events"] > 0
    assert all(c["gone"] and c["state"] in ("cancelling", "cancelled") for c in m["cancel"]["running"])
    assert [c["state"] for c in m["cancel"]["queued"]] == ["cancelled", "cancelled"]
    assert m["ids"]["sent"] == m["ids"]["not_found"] == 200
    assert m["results"]["waves"][0]["jobs"] == SMALL.finished_jobs and not m["results"]["waves"][0]["refused"]
    agg = report.write(tmp_path, [record], ["jobs"], dataclasses.asdict(phases.QUICK),
                       {"command": "smoke", "date": report.now(), "repeat": 1, "duration_s": 1, "source": "smoke",
                        "fleet_env": {}, "loadavg_before": "", "loadavg_after": ""})
    results = json.loads((tmp_path / "results.json").read_text())["targets"]
    # One wave and no purge at this size: those three are not measured; every other target is.
    unmeasured = [t["figure"] for t in results if t["result"] == "not measured"]
    assert len(results) == len(jobs.TARGETS) and len(unmeasured) == 3, unmeasured
    assert "## Long jobs (issue 26)" in (tmp_path / "results.md").read_text()
    assert jobs.figures(record)["streams_open"] == 100 and agg["jobs"]["streams_open"].median == 100
