"""Seeing inside a running fleet: /metrics, the blocked-loop detector, request ids in the logs,
flame graphs and `status`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid

import pytest

from services.common import metrics_reader
from tests.support.contract import assert_contract_error
from tests.support.fleet import REPO, Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

COMMON = {
    "fleet_http_request_duration_seconds", "fleet_http_requests_in_flight", "fleet_event_loop_lag_seconds",
    "fleet_event_loop_blocked", "process_resident_memory_bytes", "process_cpu_seconds",
}
SLOW = {"fleet_slow_workers_busy", "fleet_slow_workers", "fleet_slow_queue_depth", "fleet_slow_jobs",
        "fleet_slow_job_duration_seconds"}


def scrape(fleet: Fleet, port: int) -> dict:
    return metrics_reader.families(fleet.get("/metrics", port=port).body.decode())


def sample(families: dict, name: str, suffix: str = "", **labels) -> float:
    family = families[name]
    return sum(s.value for s in family.samples
               if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()))


def test_every_instance_serves_every_metric_family_with_values_from_real_traffic(fleet: Fleet):
    for _ in range(5):
        fleet.get("/fast")
        fleet.get("/slow/fib/15")
    fleet.get("/slow/raise_error")
    for port in fleet.fast_ports + fleet.slow_ports:
        families = scrape(fleet, port)
        assert COMMON <= set(families), COMMON - set(families)
        assert sample(families, "process_resident_memory_bytes") > 10e6
        assert sample(families, "fleet_event_loop_lag_seconds", "_count") > 0
    fast = [scrape(fleet, p) for p in fleet.fast_ports]
    assert sum(sample(f, "fleet_http_request_duration_seconds", "_count", route="/fast", method="GET", status="200")
               for f in fast) >= 5
    slow = scrape(fleet, fleet.slow_ports[0])
    assert SLOW <= set(slow)
    assert sample(slow, "fleet_slow_workers") == 2
    assert sample(slow, "fleet_slow_jobs", "_total", task="fib", outcome="ok") >= 5
    assert sample(slow, "fleet_slow_jobs", "_total", task="raise_error", outcome="error") >= 1
    assert sample(slow, "fleet_slow_job_duration_seconds", "_count", task="fib") >= 5
    routes = {s.labels["route"] for s in slow["fleet_http_request_duration_seconds"].samples}
    assert "/slow/fib" in routes and not any(r.startswith("/slow/fib/") for r in routes)  # patterns, not paths


def test_metrics_are_refused_through_the_public_edge(fleet: Fleet):
    response = fleet.get("/metrics")
    assert_contract_error(response, 403, "forbidden")
    assert b"fleet_" not in response.body


def test_a_blocked_event_loop_is_reported_with_the_blocking_function_and_then_its_whole_length(fleet: Fleet):
    before = {p: sample(scrape(fleet, p), "fleet_event_loop_blocked", "_total") for p in fleet.fast_ports}
    response = fleet.get("/_test/block/400")
    request_id, instance = response.headers["x-request-id"], response.headers["x-served-by"]
    port = fleet.fast_ports[int(instance[-2:]) - 1]
    wait_for(lambda: sample(scrape(fleet, port), "fleet_event_loop_blocked", "_total") == before[port] + 1, timeout=3)
    lines = wait_for(lambda: [json.loads(line) for line in fleet.log(instance).splitlines()
                              if request_id in line and "blocked" in line and "in all" in line], timeout=3)
    lines = [json.loads(line) for line in fleet.log(instance).splitlines() if request_id in line and "blocked" in line]
    assert len(lines) == 2  # one warning while it lasts, one line when it is over
    warning, ended = lines
    assert warning["level"] == "warning" and warning["request_id"] == request_id
    assert warning["function"] == "block_the_loop" and warning["file"].endswith("services/fast/app.py")
    assert warning["blocked_ms"] >= 100
    # The whole 400 ms (less at most one 100 ms probe interval), not the 100 ms of the first warning.
    assert ended["episode"] == "ended" and 300 <= ended["blocked_ms"] <= 1000


EDGE_LOGS = ("nginx-access.log", "nginx-refused.log")  # answered requests; refused ones (4xx)


def access_line(fleet: Fleet, request_id: str) -> dict:
    """nginx's log line of one request, answered or refused (the logs are flushed every second)."""
    def find():
        for name in EDGE_LOGS:
            for line in (fleet.run_dir / "logs" / name).read_text().splitlines():
                if request_id in line:
                    return json.loads(line)
    return wait_for(find, timeout=5)


def test_one_request_id_is_found_in_nginx_s_json_log_and_in_the_instance_s_log(fleet: Fleet):
    response = fleet.get("/slow/fib/12")
    assert response.status == 200
    request_id = response.headers["x-request-id"]
    edge = access_line(fleet, request_id)
    assert edge["request_id"] == request_id and edge["client_request_id"] == ""
    assert edge["status"] == 200 and edge["uri"] == "/slow/fib/12" and edge["upstream_status"] == "200"
    assert {"time", "method", "bytes", "request_time", "upstream_addr", "upstream_response_time"} <= set(edge)
    instance = [json.loads(line) for line in fleet.log("slow-01").splitlines() if request_id in line]
    assert instance and instance[0]["instance"] == "slow-01" and "job fib ok" in instance[0]["message"]

    merged = subprocess.run([sys.executable, "-m", "deploy.logs", "--once"], cwd=REPO, env=fleet.env,
                            capture_output=True, text=True, timeout=30).stdout
    assert sum(request_id in line for line in merged.splitlines()) >= 2  # edge and instance, one stream


def test_a_client_s_own_request_id_is_only_logged_in_a_field_of_its_own(fleet: Fleet):
    mine = f"client-{uuid.uuid4().hex[:8]}"
    response = fleet.get("/slow/fib/12", headers={"X-Request-ID": mine})
    request_id = response.headers["x-request-id"]
    assert request_id != mine
    edge = access_line(fleet, request_id)
    assert edge["request_id"] == request_id and edge["client_request_id"] == mine
    assert mine not in fleet.log("slow-01")  # the instance knows the request by the edge's id only
    merged = subprocess.run([sys.executable, "-m", "deploy.logs", "--once"], cwd=REPO, env=fleet.env,
                            capture_output=True, text=True, timeout=30).stdout
    assert any(request_id in line and f"client_request_id={mine}" in line for line in merged.splitlines())
    # An id that is not a short safe token is not logged at all.
    unsafe = fleet.get("/fast", headers={"X-Request-ID": 'x" onload=1'}).headers["x-request-id"]
    assert access_line(fleet, unsafe)["client_request_id"] == ""


def test_a_post_s_query_string_is_refused_and_never_logged(fleet: Fleet):
    secret = f"hunter2-{uuid.uuid4().hex[:8]}"
    response = fleet.request("POST", f"/slow/pbkdf2?password={secret}", body=b'{"password": "pw", "rounds": 1000}')
    assert_contract_error(response, 400, "bad_request")
    assert secret not in response.body.decode()
    assert access_line(fleet, response.headers["x-request-id"])["uri"] == "/slow/pbkdf2"
    # One the edge answers itself, through an error page (an internal redirect): the client's path.
    response = fleet.request("POST", f"/slow?password={secret}", body=b"{}")
    assert_contract_error(response, 404, "not_found")
    assert access_line(fleet, response.headers["x-request-id"])["uri"] == "/slow"
    # A GET's query is its arguments, and is logged as sent.
    response = fleet.get(f"/slow/digest/1?data={secret}")
    assert response.status == 200
    assert access_line(fleet, response.headers["x-request-id"])["uri"] == f"/slow/digest/1?data={secret}"
    logs = fleet.run_dir / "logs"
    edge_logs = "".join((logs / name).read_text() for name in EDGE_LOGS)
    assert secret not in edge_logs.replace(f"/slow/digest/1?data={secret}", "")
    assert secret not in fleet.log("slow-01") + (logs / "nginx-error.log").read_text()


def test_a_job_s_traceback_is_logged_with_its_request_id(fleet: Fleet):
    request_id = fleet.get("/slow/raise_error").headers["x-request-id"]
    # supervisord copies the instance's output into its log after the answer went out: wait for it
    deadline = time.monotonic() + 10
    while not (lines := [json.loads(line) for line in fleet.log("slow-01").splitlines()
                         if request_id in line and "raised" in line]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lines, f"no traceback logged with request id {request_id}"
    line = lines[0]
    assert "Traceback" in line["traceback"] and "raise_error" in line["traceback"]


def test_profile_writes_a_flame_graph_of_an_instance_and_its_workers(fleet: Fleet):
    result = subprocess.run([sys.executable, "-m", "deploy.profile", "slow-01", "1"], cwd=REPO, env=fleet.env,
                            capture_output=True, text=True, timeout=60)
    if "ptrace" in result.stderr:
        pytest.skip(f"this machine does not permit ptrace: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    svg = result.stdout.strip().split("flame graph: ")[1]
    assert svg.startswith(str(fleet.run_dir)) and open(svg).read().lstrip().startswith("<?xml")


def test_status_shows_each_instance_s_load_from_its_metrics(fleet: Fleet):
    out = fleet.command("status").stdout
    header = out.splitlines()[0]
    for column in ("in flight", "busy/workers", "queued", "loop lag", "blocked"):
        assert column in header
    slow_line = next(line for line in out.splitlines() if line.startswith("slow-01 "))
    assert "RUNNING" in slow_line and "/2" in slow_line and "ms" in slow_line


def test_a_prometheus_targets_file_lists_every_instance(fleet: Fleet):
    groups = json.loads((fleet.run_dir / "prometheus" / "targets.json").read_text())
    targets = {t for g in groups for t in g["targets"]}
    assert targets == {f"127.0.0.1:{p}" for p in fleet.fast_ports + fleet.slow_ports + [fleet.runner_port]
                       + fleet.upstream_ports}
    runner = next(g for g in groups if g["targets"] == [f"127.0.0.1:{fleet.runner_port}"])
    assert runner["labels"]["role"] == "runner"  # the jobs by state are its reading (fleet_jobs)
    upstream = next(g for g in groups if g["targets"] == [f"127.0.0.1:{fleet.upstream_ports[0]}"])
    assert upstream["labels"]["role"] == "upstream"  # the replicas' calls served (fleet_upstream_served_total)


# bounded logs ---------------------------------------------------------------------------------------

def flood(fleet: Fleet, request: bytes, count: int, per_connection: int = 500) -> int:
    """Send `count` requests, pipelined `per_connection` at a time on kept-alive connections; return
    how many answers came back."""
    answers = 0
    for start in range(0, count, per_connection):
        n = min(per_connection, count - start)
        last = request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        with socket.create_connection(("127.0.0.1", fleet.edge_port), timeout=30) as sock:
            sock.sendall(request * (n - 1) + last)
            data = bytearray()
            while chunk := sock.recv(1 << 16):
                data += chunk
        answers += data.count(b"HTTP/1.1 ")
    return answers


def test_logs_stay_bounded_under_a_flood_and_a_traceback_outlives_it(private_fleet):
    fleet = private_fleet(FLEET_OBSERVE_LOG_MAX_MB="1", FLEET_OBSERVE_LOG_BACKUPS="2",
                          FLEET_OBSERVE_FAILED_REQUEST_LINES_PER_SECOND="5")
    logs = fleet.run_dir / "logs"
    request_id = fleet.get("/slow/raise_error").headers["x-request-id"]

    # A client's flood of bad input reaches the slow instance: it logs a few lines, counts the rest.
    started = time.monotonic()
    assert flood(fleet, b"GET /slow/fib/abc HTTP/1.1\r\nHost: x\r\n\r\n", 3000) == 3000
    seconds = time.monotonic() - started
    lines = [json.loads(line) for line in fleet.log("slow-01").splitlines() if '"fleet.access"' in line]
    assert len(lines) <= 50 + 5 * (seconds + 1)  # the burst, then 5 a second
    assert any(request_id in line and "Traceback" in line for line in fleet.log("slow-01").splitlines())
    time.sleep(1)  # a second for the limit's 5 lines a second to let one through again
    fleet.get("/slow/fib/abc")  # the next line let through says how many were left out before it

    def accounted() -> int:
        lines = [json.loads(line) for line in fleet.log("slow-01").splitlines() if '"fleet.access"' in line]
        return sum(1 + line.get("suppressed", 0) for line in lines if line["message"].startswith("GET /slow/fib/abc"))
    wait_for(lambda: accounted() == 3001, timeout=5)  # every failed request written or counted

    # Floods the edge answers itself (made-up methods, 405), 2.6 MB of refused-request log each:
    # rotated past 1 MiB, two files kept, the oldest dropped, and nginx writes on in a fresh file.
    refused = logs / "nginx-refused.log"
    for _ in range(4):
        assert flood(fleet, b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n", 10000) == 10000
        wait_for(lambda: refused.stat().st_size <= 1 << 20 and not any(logs.glob("nginx-refused.log.*.tmp")),
                 what="the flood's log rotated (copied and emptied, the copy in place)")
    assert sorted(p.name for p in logs.glob("nginx-refused.log*")) == [
        "nginx-refused.log", "nginx-refused.log.1", "nginx-refused.log.2"]
    # Each file holds at most what nginx wrote between two checks (0.5 s) past 1 MiB: one flood here.
    assert all(p.stat().st_size < (1 << 20) + (4 << 20) for p in logs.glob("nginx-refused.log*"))
    response = fleet.get("/nothing-here")
    assert response.status == 404
    marker = response.headers["x-request-id"]
    wait_for(lambda: marker in refused.read_text(), timeout=5)  # reopened by name


def logged(fleet: Fleet, log: str, request_id: str) -> bool:
    """`request_id` is in nginx's `log` or one of its rotated copies."""
    return any(request_id in p.read_text() for p in (fleet.run_dir / "logs").glob(f"{log}*"))


def test_a_flood_of_refused_requests_never_rotates_an_answered_request_out_of_the_access_log(private_fleet):
    fleet = private_fleet(FLEET_OBSERVE_LOG_MAX_MB="1", FLEET_OBSERVE_LOG_BACKUPS="1")
    logs = fleet.run_dir / "logs"
    answered = fleet.get("/fast").headers["x-request-id"]
    # Refusals stay countable, each with its status: 2,000 of them (about 0.5 MB, under the bound).
    assert flood(fleet, b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n", 2000) == 2000
    wait_for(lambda: count_logged(fleet, 405) == 2000, what="2000 refusals logged")
    # 30,000 more (405), about 8 MB of log lines: four times what one log keeps (1 MiB and a copy).
    assert sum(flood(fleet, b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n", 10000) for _ in range(3)) == 30000
    last = fleet.get("/nothing-here").headers["x-request-id"]  # a refusal after the flood
    wait_for(lambda: any(logged(fleet, log, last) for log in EDGE_LOGS)
             and all(p.stat().st_size <= 1 << 20 for p in logs.glob("nginx-*.log"))
             and not any(logs.glob("nginx-*.tmp")), timeout=20, what="the flood written and its log rotated")
    assert logged(fleet, "nginx-access.log", answered), "the flood rotated the answered request out"
    assert logged(fleet, "nginx-refused.log", last) and not logged(fleet, "nginx-access.log", last)


def count_logged(fleet: Fleet, status: int) -> int:
    """The requests answered with `status` in nginx's current access and refused-request logs."""
    logs = [fleet.run_dir / "logs" / name for name in EDGE_LOGS]
    return sum(json.loads(line)["status"] == status
               for log in logs if log.exists() for line in log.read_text().splitlines())
