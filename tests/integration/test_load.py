"""The isolation proof, checked both ways: it PASSes on the fleet and FAILs on its negative
controls (a check that cannot fail proves nothing): a server that computes in its event loop; a
fleet whose fast routes are only 20 ms slower while heavy jobs run (`observe.test_fast_delay_ms`);
one that stalls 1 % of them for 1 s, one whose p99 alone regresses (`observe.test_fast_delay_every`);
and one whose slow path runs no job at all. A hostile fast client beside the fast users is counted
apart from them.
The same with Locust's master and two worker processes (`make load-check LOCUST_WORKERS=2`; the
naive server is judged that way only: one process FAILs it with the same verdict code, and the
20 ms control covers one process), and its web UI tab shows the verdict in a real browser. The
mixed phase as the Makefile runs it, with a long-job user and 300 event streams on its jobs beside
the flood: the check holds, their requests are in Locust's report under names of their own.

Locust always runs as a subprocess: it monkey-patches the process with gevent, which must never
happen inside pytest. Phases are shorter than the defaults (about 25 s a run instead of 80 s) but
keep enough fast samples per phase for p99 and the stall count (800 with the fleet's two fast routes,
--min-samples 800 instead of 1,000); the negative controls, whose faults are counted rather than
left to chance, run 5 s phases.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from bench.procs import free_port_block
from tests.support import browser
from tests.support.fleet import REPO
from tests.support.waiting import wait_for

# The tests whose verdict must PASS, or must FAIL only for the fault they plant, judge latency: they
# run alone (pytest.ini). A naive server fails whatever the machine does; the others check wiring.
pytestmark = pytest.mark.integration

LOCUSTFILE = REPO / "locustfile.py"
SCREENSHOT = REPO / "docs" / "isolation-tab.png"
EXIT_PASS, EXIT_FAIL, EXIT_INCONCLUSIVE = 0, 3, 4

SHORT_PHASES = ["--warmup-seconds", "2", "--baseline-seconds", "10", "--mixed-seconds", "10",
                "--recovery-seconds", "2", "--min-samples", "800"]
# The negative controls fail by far or by a count that does not depend on luck (every Nth fast
# request of an instance is delayed): one 5 s block a judged phase is enough (400 fast samples:
# 1 % stalled is 4 against the 1 allowed; 2 % delayed 30 ms are the p99 and not the p95).
CONTROL_PHASES = ["--warmup-seconds", "1", "--baseline-seconds", "5", "--mixed-seconds", "5",
                  "--recovery-seconds", "0", "--min-samples", "400"]
# The checks that must PASS beside long jobs and their streams (the one beside everything at once,
# the one in Locust worker processes): three 5 s blocks a judged phase, so that its percentiles are
# medians of three (of two, one block that a burst of the streams' relays met at the wrong moment
# moved them by half).
STEADY_PHASES = [*SHORT_PHASES[:2], "--baseline-seconds", "15", "--mixed-seconds", "15", *SHORT_PHASES[6:]]
# As the Makefile runs it against the fleet: its fast routes, and distinct heavy work.
# The naive server fails by far (its fast p50 goes from a few ms to hundreds): short phases prove
# it, with twice the fast users so that each judged phase still has 500 samples of its one fast
# route (80 req/s): enough for the p50 it fails on (--min-samples 500, not the 1,000 of a stall count).
# Not shorter: with 4 s phases the heavy users' ramp is too large a share of the mixed phase for
# the saturation rule (heavy in flight in 88 % of its samples: INCONCLUSIVE, not FAIL).
NAIVE_PHASES = ["--warmup-seconds", "2", "--baseline-seconds", "7", "--mixed-seconds", "7",
                "--recovery-seconds", "1", "--fast-users", "20", "--min-samples", "500"]
# make load-check's: the fan-out route GET /profile/42 among the fast routes (the Makefile's FAST_ROUTES).
# Three routes at 3 a second per user: 90 requests a second, under the edge's per-client 100.
FLEET_ROUTES = ["--fast-routes", "GET /fast, POST /echo, GET /profile/42", "--fast-rate", "3", "--heavy-mix",
                "/slow/digest/300000?data={random}:3,/slow/digest/1000000?data={random}:1,/slow/fib/25:1"]
# The product's defaults where the integration tier's TEST_SETTINGS shrink them, so the check runs
# against the fleet as deployed: 8 waiting places, 30 s deadline, the edge's per-client rate limit.
DEPLOYED_DEFAULTS = {
    "FLEET_SLOW_QUEUE_LIMIT": "8",
    "FLEET_SLOW_JOB_TIMEOUT": "30",
    "FLEET_SLOW_DRAIN_TIMEOUT": "35",
    "FLEET_EDGE_SLOW_RATE_PER_SECOND": "50",
    "FLEET_EDGE_SLOW_RATE_BURST": "100",
    "FLEET_EDGE_FAST_RATE_PER_SECOND": "100",  # the fast routes' per-client limits as deployed too
    "FLEET_EDGE_FAST_RATE_BURST": "200",
    "FLEET_EDGE_FAST_CONN_PER_CLIENT": "32",
}


def free_port() -> int:
    """A free port for a server of a test (Locust's master, a web UI, a naive server), below the
    kernel's ephemeral range: one picked in it was taken by some outgoing connection before Locust's
    master bound it (a CI run's master died so, and its workers waited for it for minutes)."""
    return free_port_block(1)


def master_port() -> list[str]:
    port = str(free_port())
    return ["--master-bind-port", port, "--master-port", port]


def locust_env() -> dict[str, str]:
    # No LOCUST_* settings from the caller's shell may change the run.
    return {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}


def run_check(host: str, *options: str, timeout: float = 150) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "--host", host, *options]
    result = subprocess.run(cmd, cwd=REPO, env=locust_env(), capture_output=True, text=True, timeout=timeout)
    print(result.stdout[-6000:])
    print(result.stderr[-3000:], file=sys.stderr)
    return result


def stop(proc: subprocess.Popen) -> None:
    """Stop one process we started, by its pid: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_http(url: str, timeout: float = 20) -> None:
    wait_for(lambda: answers_200(url), timeout, interval=0.2, what=f"{url} answering")


@pytest.fixture
def naive_server():
    """bench/naive_server.py (the benchmark's "before") on a free port: fib computed in its one event loop."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.naive_server", "--port", str(port)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/fast")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def phase_row(stdout: str, phase: str) -> list[str]:
    match = re.search(rf"^{phase}\s+done\s+(.*)$", stdout, re.MULTILINE)
    assert match, f"no finished {phase} row in:\n{stdout}"
    return match.group(1).split()


def fast_requests_in_table(stdout: str) -> int:
    """The fast requests the Isolation table counted, all phases together."""
    return sum(int(phase_row(stdout, phase)[1].replace(",", "")) for phase in ("warm-up", "baseline", "mixed",
                                                                                 "recovery"))


def locust_count(output: str, method: str, name: str) -> int:
    """The request count of one row of Locust's own summary (the master's, merged from its workers)."""
    match = re.search(rf"^{method}\s+{re.escape(name)}\s+(\d+)\s", output, re.MULTILINE)
    assert match, f"no {method} {name} row in Locust's summary:\n{output[-3000:]}"
    return int(match.group(1))


def assert_every_worker_sample_arrived(result: subprocess.CompletedProcess, workers: int,
                                       routes: list[tuple[str, str]]) -> None:
    """Samples recorded in the workers reached the master: its table counts (nearly) every fast
    request that Locust's own merged stats count; a lost worker's batch would be missing."""
    output = result.stdout + result.stderr
    assert re.search(rf"Sending spawn jobs of \d+ users at [\d.]+ spawn rate to {workers} ready workers", output)
    assert f"ok  samples from {workers} Locust worker(s), all in" in result.stdout, result.stdout[-3000:]
    # The table also counts the requests still unanswered when the run ended (with the time they had
    # waited), which Locust's stats never see; a stalled server leaves hundreds.
    unanswered = re.search(r"^note: ([\d,]+) fast requests were still unanswered", result.stdout, re.MULTILINE)
    answered = fast_requests_in_table(result.stdout) - (int(unanswered[1].replace(",", "")) if unanswered else 0)
    merged = sum(locust_count(output, method, path) for method, path in routes)
    # The only answered fast requests outside the phase windows are those started after the last
    # phase ended, while the workers wait for their "quit" (measured: a quarter of a second's worth).
    # One worker's lost stats-report batch would be 1.5 s worth (3 s, half of the users).
    per_second = float(phase_row(result.stdout, "baseline")[2].replace(",", ""))
    assert merged - per_second <= answered <= merged, (answered, merged, per_second)


def only_locust_lagged(stdout: str) -> bool:
    """The check refused to judge only because Locust fell behind its own schedule (a busy CI
    machine: the baseline's probes alone were seen 21.6 ms late at p99 on an idle fleet), while
    every latency rule and every other rule held."""
    broken = re.findall(r"^\s+BROKEN\s+(.*)$", stdout, re.MULTILINE)
    return ("VERDICT: INCONCLUSIVE: Locust fell behind" in stdout
            and all(rule.startswith("the fast users kept their schedule") for rule in broken)
            and all(re.search(rf"^\s+ok\s+mixed {q} ", stdout, re.MULTILINE) for q in ("p50", "p95", "p99")))


def judged_check(host: str, *options: str) -> subprocess.CompletedProcess:
    """run_check, once more if Locust fell behind its own schedule in too many blocks to judge (a busy
    machine; the check rightly refuses to judge those runs): a negative control must be judged."""
    result = run_check(host, *options)
    if "VERDICT: INCONCLUSIVE: Locust fell behind" in result.stdout:
        result = run_check(host, *options)
    return result


@pytest.mark.alone
def test_the_isolation_check_passes_on_the_fleet_whose_slow_path_it_saturated_beside_a_hostile_client_long_jobs_and_300_streams(
        private_fleet, tmp_path):
    """The deployed defaults and `make load-check`'s mixed phase: beside the flood, a long-job user
    (submits with Prefer: respond-async, follows, resumes, cancels, reads the end) and 300 event
    streams held open on its jobs from 19 addresses (16 each, under jobs.max_streams_per_client),
    and --hostile-users 1: one client of its own address posting 1 MiB bodies to /echo on 6
    connections. The edge refuses those (413 over the 64 KiB edge.echo_max_body_kb): the refusals
    are the fleet protecting the others, not failures. The long jobs' requests are in Locust's
    report, none failed (no gap in any stream's events), none is a fast sample; the verdict judges
    the normal fast users only."""
    fleet = private_fleet(**DEPLOYED_DEFAULTS)
    host = f"http://127.0.0.1:{fleet.edge_port}"
    prefix = tmp_path / "check"
    options = (*STEADY_PHASES, *FLEET_ROUTES, "--hostile-users", "1", "--long-job-users", "1",
               "--long-job-streams", "300", "--csv", str(prefix), "--html", f"{prefix}.html")
    result = run_check(host, *options)
    if only_locust_lagged(result.stdout):
        # Untrustworthy timings are measured again once, not judged; a second lagging run is
        # accepted only as only_locust_lagged allows (every latency rule held).
        result = run_check(host, *options)
    passed = "VERDICT: PASS" in result.stdout
    assert passed or only_locust_lagged(result.stdout), result.stdout[-3000:]
    assert result.returncode == (EXIT_PASS if passed else EXIT_INCONCLUSIVE)
    # The table has every judged figure, and the heavy flood really overflowed the slow path.
    for phase in ("baseline", "mixed"):
        assert len(phase_row(result.stdout, phase)) >= 11
    assert re.search(r"saturated the slow path: [1-9][\d,]* shed with 503", result.stdout)
    assert re.search(r"ok\s+a hostile fast client ran beside them \(not judged\): [\d,]+ requests, [1-9][\d,]* refused "
                     r"\(413/429\), 0 errors", result.stdout), result.stdout[-3000:]
    # Its requests are not fast samples, nor the long jobs': 10 users x 3/s x 3 routes x 15 s in the mixed phase.
    assert int(phase_row(result.stdout, "mixed")[1].replace(",", "")) <= 1400
    assert_long_jobs_ran(result.stdout, streams=300)
    assert_in_the_report(prefix, [LONG_JOB_REQUESTS[i] for i in (0, 1, 3)])  # a resume is left to chance here
    assert locust_count(result.stdout + result.stderr, "GET", "/jobs/[id]/events (watcher)") >= 300


@pytest.mark.alone
def test_a_fleet_whose_fast_routes_are_20_ms_slower_under_heavy_load_fails(private_fleet):
    """The second negative control: the real fleet, except that its fast instances wait 20 ms
    before answering while a heavy job runs. The check must FAIL it on its latency, from figures
    measured relative to the same run's baseline (the delay is absent there)."""
    fleet = private_fleet(**DEPLOYED_DEFAULTS, FLEET_OBSERVE_TEST_FAST_DELAY_MS="20")
    result = run_check(f"http://127.0.0.1:{fleet.edge_port}", *CONTROL_PHASES, *FLEET_ROUTES)
    assert "VERDICT: FAIL: the heavy load slowed the fast routes" in result.stdout, result.stdout[-3000:]
    assert result.returncode == EXIT_FAIL
    baseline, mixed = (phase_row(result.stdout, phase) for phase in ("baseline", "mixed"))
    p50 = 4  # columns after the state: seconds, requests, rate, failures, p50
    assert float(baseline[p50].replace(",", "")) < 20 <= float(mixed[p50].replace(",", "")), (baseline, mixed)
    assert re.search(r"BROKEN\s+mixed p50", result.stdout)
    # Everything else held: the fleet was saturated, nothing failed. (Whether Locust kept its schedule
    # is not asserted: a p50 beyond the limit plus Locust's own lag is a FAIL either way.)
    assert re.search(r"saturated the slow path: [1-9][\d,]* shed with 503", result.stdout)
    assert re.search(r"ok\s+fast failures: 0 of", result.stdout)


@pytest.mark.alone
def test_a_fleet_that_stalls_1_percent_of_its_fast_requests_for_1_s_under_heavy_load_fails(private_fleet):
    """The third negative control: while a heavy job runs, every 100th fast request of each fast
    instance waits 1 s. p50, p95 and p99 cannot see 1 %; the count of stalled answers must."""
    fleet = private_fleet(**DEPLOYED_DEFAULTS, FLEET_OBSERVE_TEST_FAST_DELAY_MS="1000",
                          FLEET_OBSERVE_TEST_FAST_DELAY_EVERY="100")
    result = judged_check(f"http://127.0.0.1:{fleet.edge_port}", *CONTROL_PHASES, *FLEET_ROUTES)
    assert "VERDICT: FAIL: the heavy load stalled the fast routes" in result.stdout, result.stdout[-3000:]
    assert result.returncode == EXIT_FAIL
    assert re.search(r"BROKEN\s+mixed stalls", result.stdout)
    assert re.search(r"saturated the slow path: [1-9][\d,]* shed with 503", result.stdout)


@pytest.mark.alone
def test_a_fleet_whose_fast_p99_alone_regresses_under_heavy_load_fails(private_fleet):
    """The fourth negative control: while a heavy job runs, every 50th fast request of each fast
    instance waits 60 ms, several times the baseline's p99 on this machine (2-8 ms, 17 ms on a noisy
    CI run, where 30 ms hid under the limit) and under the stall bound (100 ms): only the p99 moves,
    and its limit (twice the baseline's plus the baseline's own spread) must see it."""
    fleet = private_fleet(**DEPLOYED_DEFAULTS, FLEET_OBSERVE_TEST_FAST_DELAY_MS="60",
                          FLEET_OBSERVE_TEST_FAST_DELAY_EVERY="50")
    result = judged_check(f"http://127.0.0.1:{fleet.edge_port}", *CONTROL_PHASES, *FLEET_ROUTES)
    assert "VERDICT: FAIL: the heavy load slowed the fast routes: mixed p99" in result.stdout, result.stdout[-3000:]
    assert result.returncode == EXIT_FAIL
    assert re.search(r"ok\s+mixed p50", result.stdout) and re.search(r"ok\s+mixed stalls", result.stdout)


@pytest.mark.alone
def test_a_fleet_whose_slow_path_runs_no_job_fails_though_every_heavy_request_is_answered(private_fleet):
    """The fifth negative control, the review's case: a slow path that cannot run jobs answers every
    heavy request at once and slows nothing down. That is a broken fleet, not a saturated one. Here
    its only slow instance is stopped (502); the review's fleet was on Dask with every worker
    stopped (503 no_workers, which the check took for saturation and PASSed; judged as an error
    since, tests/unit/test_isolation_verdict.py). Stopping Dask workers takes 20 s or more each."""
    fleet = private_fleet(**DEPLOYED_DEFAULTS)
    fleet.supervisorctl("stop", "slow-01")
    wait_for(lambda: fleet.get("/slow/fib/1").status == 502, 20, what="the slow path answering 502")
    result = run_check(f"http://127.0.0.1:{fleet.edge_port}", "--warmup-seconds", "1", "--baseline-seconds", "4",
                       "--mixed-seconds", "4", "--recovery-seconds", "0", *FLEET_ROUTES)
    assert ("VERDICT: FAIL: the slow path did not run the heavy load: 0 heavy jobs completed in the mixed phase "
            "(need 20); 502 bad_gateway x ") in result.stdout, result.stdout[-3000:]
    assert result.returncode == EXIT_FAIL


def test_make_load_check_with_locust_workers_refuses_at_once_when_the_master_port_is_taken():
    """A Locust master that cannot bind its port dies, and the workers it forked retry connecting for
    5 minutes (a CI run hung so): the Makefile checks the port first and names the variable."""
    with socket.create_server(("127.0.0.1", free_port())) as taken:
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        result = subprocess.run(["make", "--no-print-directory", "load-check", "LOCUST_WORKERS=2",
                                 f"LOCUST_MASTER_PORT={port}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert f"port {port} (the Locust master port) is taken" in result.stderr
    assert "LOCUST_MASTER_PORT=" in result.stderr and "isolation check against" not in result.stdout


@pytest.mark.alone
def test_make_load_check_with_locust_workers_passes_on_the_fleet(private_fleet):
    """`make load-check LOCUST_WORKERS=2`: a master and two worker processes; the workers' samples
    are judged on the master, with the same verdict as one process. The long-job user the Makefile
    adds runs in one of the workers, with 32 streams here (300 in one Locust worker beside the
    others on 2 cores lag its schedule 30 ms: INCONCLUSIVE): its samples reach the master too, and
    its requests are in Locust's report (HTML, CSV) under names of their own."""
    fleet = private_fleet(**DEPLOYED_DEFAULTS)
    env = {k: v for k, v in fleet.env.items()
           if not k.startswith("LOCUST_") and k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    # Three blocks a judged phase (STEADY_PHASES): a block in which a worker ran late is left out,
    # and with two the other one alone was the "median" (a CI run FAILed so, p99 3.8 against 3.7 ms).
    options = STEADY_PHASES + ["--long-job-reconnect-percent", "100"]  # each stream resumed once
    result = subprocess.run(["make", "--no-print-directory", "load-check", "LOCUST_WORKERS=2", f"LOCUST_MASTER_PORT={free_port()}",
                             "LONG_JOBS=--long-job-users 1 --long-job-streams 32", f"LOAD_OPTS={' '.join(options)}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    print(result.stdout[-6000:])
    print(result.stderr[-3000:], file=sys.stderr)
    passed = "VERDICT: PASS" in result.stdout
    if not passed:
        # The heaviest run of the suite (master, two workers, the fleet, the flood on 2 cores): on a
        # busy CI machine Locust itself can fall behind its schedule, and the check then rightly
        # refuses to judge (seen once). Every latency rule must still have held.
        assert only_locust_lagged(result.stdout), result.stdout[-3000:]
    if passed:
        assert result.returncode == EXIT_PASS
    else:  # make exits 2 when its recipe fails; the check's own exit status is in make's message
        assert result.returncode != 0 and f"load-check] Error {EXIT_INCONCLUSIVE}" in result.stderr, result.stderr[-500:]
    assert "with 2 Locust worker processes" in result.stdout
    assert_every_worker_sample_arrived(result, workers=2, routes=[("GET", "/fast"), ("POST", "/echo"), ("GET", "/profile/42")])
    assert re.search(r"saturated the slow path: [1-9][\d,]* shed with 503", result.stdout)
    # 10 fast users x 4 iterations/s x 2 routes x 15 s, whichever worker runs them
    assert int(phase_row(result.stdout, "baseline")[1].replace(",", "")) >= 1150
    assert (fleet.run_dir / "load-check_isolation.csv").read_text().count("PASS") == (1 if passed else 0)
    assert_long_jobs_ran(result.stdout, streams=32)
    assert_in_the_report(fleet.run_dir / "load-check", LONG_JOB_REQUESTS)


# Each kind of the long-job user's requests (a Locust stats row of its own): the submission, its own
# stream, the stream resumed with Last-Event-ID, the watchers' streams.
LONG_JOB_REQUESTS = [r"/slow/report/\d+ \(async\)", r"/jobs/\[id\]/events", r"/jobs/\[id\]/events \(Last-Event-ID\)",
                     r"/jobs/\[id\]/events \(watcher\)"]


def assert_long_jobs_ran(stdout: str, streams: int) -> None:
    """The check's long-job rule held: a job submitted, none of their requests an error, and the
    streams asked for open in half of the mixed phase's samples at least."""
    rule = re.search(rf"^\s+ok\s+long jobs ran beside them .*: ([\d,]+) submitted .*, ([\d,]+) errors; event streams "
                     rf"open: median (\d+) \(need \d+ of {streams} asked\)", stdout, re.MULTILINE)
    assert rule, stdout[-3000:]
    assert int(rule[1]) >= 1 and rule[2] == "0" and int(rule[3]) >= 0.9 * streams


def assert_in_the_report(prefix: Path, names: list[str]) -> None:
    """Each name (a regex) is a row of Locust's stats CSV with requests and no failure, and is in its HTML report."""
    stats = prefix.with_name(prefix.name + "_stats.csv").read_text()
    report = prefix.with_name(prefix.name + ".html").read_text()
    for name in names:
        row = re.search(rf"^GET,{name},(\d+),(\d+),", stats, re.MULTILINE)
        assert row and int(row[1]) >= 1 and row[2] == "0", (name, stats)
        assert re.search(name, report), name


def test_naive_server_fails_with_locust_workers(naive_server):
    """The negative control: a server computing in its event loop FAILs, judged from the samples
    two Locust worker processes sent to the master."""
    result = run_check(naive_server, *NAIVE_PHASES, "--processes", "2", *master_port())
    assert "VERDICT: FAIL" in result.stdout, result.stdout[-3000:]
    assert result.returncode == EXIT_FAIL
    assert_every_worker_sample_arrived(result, workers=2, routes=[("GET", "/fast")])


def test_no_heavy_load_is_inconclusive(naive_server):
    """Without proof that the slow path was saturated, a quiet mixed phase proves nothing."""
    result = run_check(naive_server, "--warmup-seconds", "0", "--baseline-seconds", "3", "--mixed-seconds", "3",
                       "--recovery-seconds", "0", "--heavy-users", "0", "--min-samples", "50")
    assert "VERDICT: INCONCLUSIVE" in result.stdout, result.stdout[-3000:]
    assert "saturated" in result.stdout
    assert result.returncode == EXIT_INCONCLUSIVE


def test_web_ui_shows_the_verdict(private_fleet, tmp_path):
    """Debian's chromium, driven by Playwright: start the shaped run from the form, watch the Isolation tab."""
    browser.require()
    from playwright.sync_api import expect

    fleet = private_fleet(**DEPLOYED_DEFAULTS)
    port = free_port()
    # Any verdict will do for the test; the README's screenshot shows a whole one (1,000+ samples).
    PHASE = "13" if os.environ.get("UPDATE_SCREENSHOT") else "3"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--web-host", "127.0.0.1",
           "--web-port", str(port), "--host", f"http://127.0.0.1:{fleet.edge_port}", *FLEET_ROUTES,
           "--warmup-seconds", "2", "--baseline-seconds", PHASE, "--mixed-seconds", PHASE, "--recovery-seconds", "2"]
    log = (tmp_path / "locust.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=locust_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/")
        with browser.chromium() as chromium:
            page = chromium.new_page(viewport={"width": 1600, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            # The start form shows the check's options ("Custom parameters"), prefilled from the
            # command line, and what is typed there is what the run uses.
            page.get_by_role("button", name="Custom parameters").click()
            expect(page.locator("input[name='mixedSeconds']")).to_have_value(PHASE)
            page.locator("input[name='warmupSeconds']").fill("1")
            page.get_by_role("button", name=re.compile("^start$", re.I)).click()
            page.get_by_role("tab", name="Isolation").click()
            table = page.locator("table")
            # Live: the phase rows fill in while the run goes.
            expect(table).to_contain_text("running", timeout=20_000)
            verdict = table.locator("tr", has_text="VERDICT")
            expect(verdict).to_contain_text(re.compile(r"VERDICT\s*(PASS|FAIL|INCONCLUSIVE)"), timeout=60_000)
            text = table.inner_text()
            for phase in ("warm-up", "baseline", "mixed", "recovery"):
                assert re.search(rf"{phase}\s+done", text), text
            assert re.search(r"warm-up\s+done\s+1\.\d", text), "the form's warm-up of 1 s was not used:\n" + text
            page.screenshot(path=str(tmp_path / "isolation-tab.png"), full_page=True)
            if os.environ.get("UPDATE_SCREENSHOT"):
                SCREENSHOT.parent.mkdir(exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)
    finally:
        stop(proc)
        log.close()


def watcher_processes(host: str) -> list[int]:
    """The pids of the watcher-stream processes (stream_watchers.py) reading from `host`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or gone
            continue
        if b"stream_watchers" in args and host.encode() in args:
            pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize("ending", ["the run stopped", "Locust killed"])
def test_the_watcher_streams_are_read_in_a_niced_process_of_their_own_that_never_outlives_locust(ending):
    """The watchers' thousands of events a second are parsed in a process of their own, below the
    fast users' priority (nice 10), not in the Locust process that times the fast users; it goes
    when its long-job user stops, and when Locust dies without stopping it (SIGKILL). Nothing needs
    to answer here (the host's port is closed): the process is Locust's doing alone."""
    host = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary", "--host", host,
           "--warmup-seconds", "0", "--baseline-seconds", "1", "--mixed-seconds", "3" if ending == "the run stopped"
           else "60", "--recovery-seconds", "0", "--long-job-users", "1", "--long-job-streams", "40"]
    locust = subprocess.Popen(cmd, cwd=REPO, env=locust_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        [pid] = wait_for(lambda: watcher_processes(host), 30, what="the watchers' process started")
        # It nices itself first thing, once Python is up.
        wait_for(lambda: os.getpriority(os.PRIO_PROCESS, pid) >= 10, 10, what="the watchers' process at nice 10")
        assert locust.pid != pid
        if ending == "Locust killed":
            locust.kill()
        locust.wait(timeout=60)
        wait_for(lambda: not watcher_processes(host), 10, what=f"the watchers' process gone once {ending}")
    finally:
        stop(locust)
