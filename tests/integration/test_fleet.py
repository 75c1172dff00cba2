"""The fleet's contract through the edge: routing, request ids, the errors the edge and the
instances answer (produced for real), a client's share of the slow path, the edge's per-client
limits on both paths (rate, requests in flight, body sizes), what the fleet exposes (where it
listens, what its answers reveal), and each kind of process's CPU priority. The local pool's own
faults are in test_local_pool.py."""

from __future__ import annotations

import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.common import cpu_slice, metrics_reader, procfs
from tests.support.contract import assert_contract_error
from tests.support.fleet import Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

NGINX_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")  # nginx's $request_id


# routing -----------------------------------------------------------------------------------------

def test_fast_route_is_served_by_every_fast_instance_in_turn(fleet: Fleet):
    responses = [fleet.get("/fast") for _ in range(10)]
    assert all(r.status == 200 and r.body == b"Hello!" for r in responses)
    assert {r.headers["x-served-by"] for r in responses} == {"fast-01", "fast-02"}
    assert all(r.headers["x-request-id"] for r in responses)


def test_echo_is_answered_by_a_fast_instance(fleet: Fleet):
    response = fleet.request("POST", "/echo", body=b"hello")
    assert response.status == 200 and response.headers["x-served-by"].startswith("fast-")
    assert response.json() == {"bytes": 5, "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}


def test_healthz_answers_through_the_edge_and_on_each_instance_port(fleet: Fleet):
    assert fleet.get("/healthz").json()["status"] == "ok"
    for port, role in [(p, "fast") for p in fleet.fast_ports] + [(p, "slow") for p in fleet.slow_ports]:
        body = fleet.get("/healthz", port=port).json()
        assert body["status"] == "ok" and body["role"] == role


def test_the_edge_s_healthz_says_503_while_the_slow_path_cannot_serve_and_slow_healthz_says_why(private_fleet):
    fleet = private_fleet()
    assert fleet.get("/healthz").status == 200 and fleet.get("/slow/healthz").json()["role"] == "slow"
    fleet.supervisorctl("stop", "slow-01:slow-01")
    down = fleet.get("/healthz")
    assert down.status == 503 and down.json()["status"] == "degraded" and "slow path" in down.json()["message"]
    assert "retry-after" in down.headers and down.headers["x-served-by"] == "edge"
    assert_contract_error(fleet.get("/slow/healthz"), 502, "bad_gateway")
    assert fleet.get("/fast").status == 200  # the fast path serves on; only the fleet's health says
    fleet.supervisorctl("start", "slow-01:slow-01")
    wait_for(lambda: fleet.get("/healthz").status == 200, timeout=30, what="the fleet healthy again")


def test_head_on_fast_and_healthz_is_200_through_the_edge(fleet: Fleet):
    for path in ("/fast", "/healthz"):
        response = fleet.request("HEAD", path)
        assert response.status == 200 and response.body == b"", path


def test_the_edge_gives_every_request_its_own_id_whatever_id_the_client_sends(fleet: Fleet):
    # A client-chosen id could pose as another request's in the logs and error bodies: the id is
    # nginx's own on every path (fast and slow instances, the edge cache, the edge's error pages).
    ids = set()
    for sent in ("trace-42.a", 'x" onload=1', None):
        headers = {"X-Request-ID": sent} if sent else {}
        for path in ("/fast", "/slow/fib/5", "/slow/primes/100", "/slow/primes/100", "/nope", "/slow"):
            response = fleet.get(path, headers=headers)
            assert NGINX_REQUEST_ID.match(response.headers["x-request-id"]), (path, response.headers)
            ids.add(response.headers["x-request-id"])
        refused = assert_contract_error(fleet.request("PUT", "/fast", headers=headers), 405)
        assert NGINX_REQUEST_ID.match(refused["request_id"])
        ids.add(refused["request_id"])
    assert len(ids) == 3 * 7  # never one request's id on another


# errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/slow/nope/1", "/nope", "/slow/"])
def test_unknown_routes_and_tasks_get_404_json(fleet: Fleet, path: str):
    assert_contract_error(fleet.get(path), 404, "not_found")


def test_slow_without_its_slash_is_a_json_404_not_an_html_redirect(fleet: Fleet):
    response = fleet.get("/slow")
    assert_contract_error(response, 404, "not_found")
    assert "location" not in response.headers


def test_wrong_method_gets_405_json(fleet: Fleet):
    assert_contract_error(fleet.request("PUT", "/fast"), 405)
    assert_contract_error(fleet.get("/slow/pbkdf2"), 405)


def test_unknown_methods_are_answered_405_json_by_the_edge_and_never_reach_an_instance(fleet: Fleet):
    for method, path, allow in (("FOOBAR", "/fast", "GET, HEAD, POST"), ("DELETE", "/slow/fib/1", "GET, POST"),
                                ("PUT", "/echo", "GET, HEAD, POST")):
        response = fleet.request(method, path)
        assert_contract_error(response, 405, "method_not_allowed")
        assert response.headers["x-served-by"] == "edge" and response.headers["allow"] == allow


def test_head_on_a_heavy_route_is_answered_405_by_the_edge_with_allow_and_runs_no_job(fleet: Fleet):
    def jobs() -> float:
        return metrics_reader.total(fleet.get("/metrics", port=fleet.slow_ports[0]).body.decode(), "fleet_slow_jobs_total")

    before = jobs()
    for path in ("/slow/fib/5", "/slow/pbkdf2", "/slow/primes/100", "/slow/nope/1"):
        response = fleet.request("HEAD", path)
        assert (response.status, response.body) == (405, b""), path
        assert response.headers.get("allow") == "GET, POST" and response.headers["x-served-by"] == "edge", path
    assert jobs() == before  # not even the cached route's


def test_oversized_requests_get_the_edge_s_json_errors(fleet: Fleet):
    body = assert_contract_error(fleet.request("POST", "/echo", body=b"x" * (1024 * 1024 + 1)), 413, "payload_too_large")
    assert body["message"]
    assert fleet.get("/fast?" + "a" * 9000).status == 414
    assert_contract_error(fleet.get("/" + "a" * 9000), 414, "uri_too_long")
    assert_contract_error(fleet.get("/fast", headers={"X-Big": "a" * 9000}), 431, "headers_too_large")
    r = fleet.get("/fast", headers={"X-Big": "a" * 9000})
    assert r.headers["x-served-by"] == "edge"


# a client's share ----------------------------------------------------------------------------------

def test_one_client_gets_its_share_of_the_slow_path_and_everyone_else_still_gets_in(private_fleet):
    fleet = private_fleet(FLEET_SLOW_MAX_PER_CLIENT="2")  # 2 workers, 2 waiting places
    with ThreadPoolExecutor(5) as pool:
        hog = [pool.submit(fleet.get, "/slow/sleep/2", source="127.0.0.2") for _ in range(4)]
        wait_for(lambda: fleet.slow_health()["running"] == 2 and sum(f.done() for f in hog) == 2,
                 what="the client's share running and the rest of its jobs answered (refused)")
        other = fleet.get("/slow/fib/10")  # from 127.0.0.1: admitted, not 503
        statuses = sorted(f.result().status for f in hog)
    assert other.status == 200
    assert statuses == [200, 200, 429, 429]
    refused = next(f.result() for f in hog if f.result().status == 429)
    assert_contract_error(refused, 429, "rate_limited")
    assert refused.headers["retry-after"] == "1"


def test_a_client_over_the_slow_rate_limit_gets_429_json_with_retry_after(private_fleet):
    fleet = private_fleet(FLEET_EDGE_SLOW_RATE_PER_SECOND="2", FLEET_EDGE_SLOW_RATE_BURST="0")
    statuses = [fleet.get("/slow/fib/1") for _ in range(6)]
    limited = [r for r in statuses if r.status == 429]
    assert limited, [r.status for r in statuses]
    body = assert_contract_error(limited[0], 429, "rate_limited")
    assert limited[0].headers["retry-after"] == "1" and body["message"]
    assert fleet.get("/fast").status == 200  # the limit is on /slow/ only


def test_two_clients_filling_the_line_make_room_for_a_third_that_holds_no_place(private_fleet):
    # 2 running + 8 waiting places; two clients within their share (5 each) take them all. A third
    # client is still admitted: the newest waiting job of the client holding the most makes room.
    fleet = private_fleet(FLEET_SLOW_QUEUE_LIMIT="8", FLEET_SLOW_MAX_PER_CLIENT="5",
                          FLEET_SLOW_JOB_TIMEOUT="10", FLEET_SLOW_DRAIN_TIMEOUT="11")
    with ThreadPoolExecutor(13) as pool:
        # They give up after 5 s (their line holds 15 s of work): the test needs only what they hold.
        hogs = [pool.submit(fleet.get, "/slow/sleep/3", source=source, timeout=5)
                for source in ("127.0.0.2", "127.0.0.3") for _ in range(5)]
        wait_for(lambda: (lambda h: (h["running"], h["waiting"]) == (2, 8))(fleet.slow_health()),
                 what="the two clients holding every running slot and waiting place")
        # distinct jobs: identical ones would share one (compute once)
        third = [pool.submit(fleet.get, f"/slow/fib/{n}", source="127.0.0.4") for n in (10, 11, 12)]
        answers = [f.result() for f in third]
        pushed_out = [f.result() for f in hogs if f.done() and f.exception() is None and f.result().status != 200]
    assert [r.status for r in answers] == [200, 200, 200], [r.body for r in answers]
    assert len(pushed_out) == 3  # one job of each of the third client's: 5-4-4 against 5-5, then 4-4
    assert_contract_error(pushed_out[0], 503, "overloaded")
    assert int(pushed_out[0].headers["retry-after"]) >= 1


def test_behind_a_trusted_proxy_each_client_it_names_has_its_share_and_an_ipv6_64_is_one_client(private_fleet):
    fleet = private_fleet(FLEET_EDGE_REAL_IP="127.0.0.1", FLEET_SLOW_MAX_PER_CLIENT="1")

    def via_proxy(path: str, client: str, source: str = "127.0.0.1"):
        return fleet.get(path, headers={"X-Forwarded-For": f"198.51.100.9, {client}"}, source=source)

    with ThreadPoolExecutor(1) as pool:
        holding = pool.submit(via_proxy, "/slow/sleep/2", "2001:db8::1")  # its client's one place
        wait_for(lambda: fleet.slow_health()["running"] == 1, what="the first client's job running")
        same_64 = via_proxy("/slow/fib/10", "2001:db8::2")
        other_64 = via_proxy("/slow/fib/10", "2001:db8:0:1::1")
        ipv4 = via_proxy("/slow/fib/10", "192.0.2.7")
        # Not a trusted proxy: its header names nobody, the client is the connection's own address.
        untrusted = via_proxy("/slow/fib/10", "2001:db8::3", source="127.0.0.2")
        assert holding.result().status == 200
    assert_contract_error(same_64, 429, "rate_limited")
    assert (other_64.status, ipv4.status, untrusted.status) == (200, 200, 200)
    wait_for(lambda: '"remote_addr":"2001:db8:0:1::1"' in fleet.log("nginx-access"),
             what="the access log naming the client the proxy named")
    assert '"remote_addr":"2001:db8::3"' not in fleet.log("nginx-access")


# a job's deadline -----------------------------------------------------------------------------------

def test_a_heavy_answer_never_comes_later_than_the_job_deadline_however_long_the_line(private_fleet):
    # One worker, 2 s deadlines, five 1.5 s jobs at once: served in turn, the last would answer
    # after 7.5 s. The deadline counts from admission, its wait in line included.
    fleet = private_fleet(FLEET_SLOW_WORKERS="1", FLEET_SLOW_QUEUE_LIMIT="4", FLEET_SLOW_JOB_TIMEOUT="2",
                          FLEET_SLOW_DRAIN_TIMEOUT="3")
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda i: fleet.get("/slow/sleep/1.5", source=f"127.0.0.{10 + i}"), range(5)))
    assert max(r.elapsed for r in answers) < 2 + 1, [(r.status, round(r.elapsed, 2)) for r in answers]
    codes = sorted((r.status, r.json().get("error", "")) for r in answers)
    assert codes[0] == (200, "") and (503, "queue_timeout") in codes, codes
    assert set(codes[1:]) <= {(200, ""), (504, "job_timeout"), (503, "queue_timeout")}, codes
    expired = next(r for r in answers if r.status == 503)
    assert_contract_error(expired, 503, "queue_timeout")
    assert int(expired.headers["retry-after"]) >= 1
# the fast routes' body limits ---------------------------------------------------------------------
# the fast routes' per-client limits ------------------------------------------------------------------

def test_a_client_over_its_fast_rate_gets_429_json_while_another_address_and_its_probe_are_served(private_fleet):
    fleet = private_fleet(FLEET_EDGE_FAST_RATE_PER_SECOND="2", FLEET_EDGE_FAST_RATE_BURST="0")
    answers = [fleet.get("/fast", source="127.0.0.5") for _ in range(6)]
    answers.append(fleet.request("POST", "/echo", body=b"{}", source="127.0.0.5"))  # the same allowance
    limited = [r for r in answers if r.status == 429]
    assert len(limited) >= 4, [r.status for r in answers]
    body = assert_contract_error(limited[0], 429, "rate_limited")
    assert limited[0].headers["retry-after"] == "1" and limited[0].headers["x-served-by"] == "edge" and body["message"]
    assert answers[-1].status == 429
    assert fleet.get("/fast", source="127.0.0.6").status == 200  # another address: an allowance of its own
    assert fleet.get("/healthz", source="127.0.0.5").status == 200  # a probe's bucket is its own


def held_upload(fleet: Fleet, source: str) -> socket.socket:
    """A POST /echo from `source` whose headers are in and whose body has not come: once nginx asks
    for the body (100 Continue), it holds one of the client's places."""
    sock = socket.create_connection(("127.0.0.1", fleet.edge_port), timeout=10, source_address=(source, 0))
    sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue"), "nginx never asked for the body"
    return sock


def test_a_client_over_its_fast_requests_in_flight_gets_429_json_while_another_address_is_served(private_fleet):
    fleet = private_fleet(FLEET_EDGE_FAST_CONN_PER_CLIENT="2")
    held = [held_upload(fleet, "127.0.0.5") for _ in range(2)]
    try:
        refused = fleet.get("/fast", source="127.0.0.5")
        other = fleet.get("/fast", source="127.0.0.6")
        for sock in held:  # the uploads end: their answers come, their places are free again
            sock.sendall(b"{}")
            assert sock.recv(1000).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in held:
            sock.close()
    assert_contract_error(refused, 429, "rate_limited")
    assert refused.headers["retry-after"] == "1"
    assert other.status == 200
    assert fleet.get("/fast", source="127.0.0.5").status == 200


def test_echo_over_its_body_limit_gets_413_json_at_the_edge_and_at_an_instance(fleet: Fleet):
    limit = 64 * 1024  # edge.echo_max_body_kb's default
    assert fleet.request("POST", "/echo", body=b"x" * limit).json()["bytes"] == limit
    at_edge = fleet.request("POST", "/echo", body=b"x" * (limit + 1))
    assert_contract_error(at_edge, 413, "payload_too_large")
    assert at_edge.headers["x-served-by"] == "edge"
    at_instance = fleet.request("POST", "/echo", body=b"x" * (limit + 1), port=fleet.fast_ports[0],
                                headers=fleet.edge_headers())
    assert "edge.echo_max_body_kb" in assert_contract_error(at_instance, 413, "payload_too_large")["message"]
    assert at_instance.headers["x-served-by"] == "fast-01"


def test_the_fast_get_routes_take_no_body_past_1_kib(fleet: Fleet):
    assert fleet.request("GET", "/fast", body=b"x" * 1024).status == 200
    refused = fleet.request("GET", "/fast", body=b"x" * 1025)
    assert_contract_error(refused, 413, "payload_too_large")
    assert refused.headers["x-served-by"] == "edge"
    assert_contract_error(fleet.request("GET", "/healthz", body=b"x" * 1025), 413, "payload_too_large")


# exposure ------------------------------------------------------------------------------------------

def test_only_the_edge_listens_beyond_loopback_and_supervisor_is_private(fleet: Fleet):
    from deploy.fleet import processes_of

    members = set(processes_of(fleet.run_dir))
    inodes = {inode for pid in members for inode in procfs.socket_inodes(pid)}
    listening = [(s.address, s.port) for inode, s in procfs.tcp_sockets().items()
                 if s.state == procfs.LISTEN and inode in inodes]
    ports = {port for _, port in listening}
    assert set(fleet.fast_ports + fleet.slow_ports + [fleet.edge_port]) <= ports
    for address, port in listening:
        assert address in ("0100007F", "00000000000000000000000001000000"), (address, port)  # 127.0.0.1 / ::1
    sock = fleet.run_dir / "supervisor.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o700"
    assert "inet_http_server" not in (fleet.run_dir / "supervisord.conf").read_text()


def test_no_response_reveals_versions_or_tracebacks(fleet: Fleet):
    for response in (fleet.get("/fast"), fleet.get("/nope"), fleet.get("/slow/raise_error"), fleet.get("/" + "a" * 9000)):
        assert response.headers.get("server", "nginx") == "nginx"
        assert b"Traceback" not in response.body and b"Tornado" not in response.body


# CPU priority -------------------------------------------------------------------------------------

def test_the_fast_path_asks_for_a_short_time_slice_and_the_heavy_path_keeps_the_kernel_s(fleet: Fleet):
    """fast.sched_slice_us (100 us): the fast instances and every nginx process run with it, so a
    woken event loop preempts heavy work at once; the slow instance and its workers keep the default."""
    if not cpu_slice.kernel_has_custom_slices():
        pytest.skip("custom time slices need Linux 6.12+")
    children = procfs.children_map()
    launcher = fleet.pid("nginx")
    nginx = [pid for master in children.get(launcher, []) for pid in [master] + children.get(master, [])]
    assert len(nginx) >= 2, "no nginx master and worker under the launcher"
    fast = [fleet.pid(f"fast-{n:02d}") for n in (1, 2)]
    for pid in fast + nginx:
        assert cpu_slice.slice_ns(pid) == 100_000, f"pid {pid}"
    heavy = [fleet.pid("slow-01")] + fleet.slow_health()["pool"]["pids"]
    for pid in heavy:
        assert cpu_slice.slice_ns(pid) > 100_000, f"pid {pid}"


def test_workers_run_below_every_other_process_group_when_the_machine_allows_it(fleet: Fleet):
    """slow.idle_cgroup (on by default): workers sit in a cpu cgroup with cpu.idle = 1."""
    pids = fleet.slow_health()["pool"]["pids"]
    groups = [procfs.cgroups(pid) for pid in pids]
    if not any("fleet-idle" in path for group in groups for path in group.values()):
        pytest.skip("no writable cpu cgroup here (not root, or no delegation): workers rely on nice")
    for group in groups:
        path = next(path for path in group.values() if "fleet-idle" in path)
        mount = next(m for m in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup")
                     if os.path.exists(m + path))
        assert open(f"{mount}{path}/cpu.idle").read().strip() == "1"
    server_group = " ".join(procfs.cgroups(fleet.pid("slow-01")).values())  # its path in every hierarchy
    assert "fleet-idle" not in server_group  # the event loop keeps its normal priority
