"""The fleet across hosts, on simulated hosts with a real network between them.

Five network namespaces on a bridge (tests/support/netns.py), with deploy/hosts.example.toml's
addresses, which exist only inside them: db1 (the Redis job store), web1 (edge, fast, slow,
scheduler), web2 (fast, slow), heavy1 and heavy2 (Dask workers). Each part is deployed with the
README's command run inside its namespace; the contract is driven through the edge from web1; long
jobs are followed through restarts; then cables are pulled. Needs root (CI is root); skipped with
the reason elsewhere.
"""

from __future__ import annotations

import gc
import http.client
import json
import os
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deploy.procs import MEMBER_MARKER, processes_of
from drills.job_faults import follow
from services.common import procfs
from services.common.settings import load
from tests.support import netns
from tests.support.fleet import REPO, TEST_SETTINGS, Response
from tests.support.probe import Probe
from tests.support.running_jobs import last_spinner, spinner_pid
from tests.support.waiting import wait_for

# In the order they are deployed: the store first (the slow instances listen once it answers).
HOSTS = {"db1": "10.77.0.4", "web1": "10.77.0.1", "web2": "10.77.0.5", "heavy1": "10.77.0.2", "heavy2": "10.77.0.3"}
STOP_ORDER = ("heavy1", "heavy2", "web2", "web1", "db1")
EDGE = ("10.77.0.1", 8080)
JOB_TIMEOUT = 3
WORKER_TTL = 2  # Dask waits at least 10 heartbeats (5 s) all the same
POLL = 0.2  # a wait's poll is a TLS request from inside a namespace: few, so the probes measure the fleet

pytestmark = [pytest.mark.integration, pytest.mark.alone,  # partitions under load, timed
              pytest.mark.skipif(netns.available() is not None, reason=f"simulated hosts: {netns.available()}")]


class Hosts:
    """The three parts, deployed; requests from inside a host's namespace."""

    def __init__(self, net: netns.SimulatedHosts, tmp: Path):
        self.net, self.tmp = net, tmp
        base = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "DASK_"))}
        self.common = {**base, **TEST_SETTINGS,
                       "FLEET_SETTINGS": "deploy/hosts.example.toml",  # the example, as the README shows it
                       "FLEET_DASK_CERTS_DIR": str(tmp / "certs"),
                       "FLEET_DASK_WORKERS": "1",  # one worker of one thread per heavy host
                       "FLEET_SLOW_JOB_TIMEOUT": str(JOB_TIMEOUT),
                       "FLEET_DASK_WORKER_TTL": str(WORKER_TTL)}

    def env(self, host: str) -> dict[str, str]:
        return {**self.common, "FLEET_HOST": host, "FLEET_RUN_DIR": str(self.run_dir(host))}

    def run_dir(self, host: str) -> Path:
        return self.tmp / f"run-{host}"

    def make(self, host: str, target: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.net.run(host, ["make", target], self.env(host), cwd=str(REPO), check=check, timeout=300)

    def tls(self, host: str, certificate: bool = True) -> ssl.SSLContext:
        """A client's TLS for an instance (they speak TLS across hosts): the fleet's CA, and the
        host's own certificate, as deploy's health checks on that host show it."""
        files = load(env=self.env(host)).tls_files()
        context = ssl.create_default_context(cafile=str(files["ca"]))
        if certificate:
            context.load_cert_chain(str(files["cert"]), str(files["key"]))
        return context

    def request(self, path: str, host: str = "web1", where: tuple[str, int] = EDGE, timeout: float = 30,
                method: str = "GET", tls: ssl.SSLContext | bool | None = None, headers: dict | None = None) -> Response:
        """From inside `host`'s namespace; to an instance (not the edge) over TLS with the host's own
        certificate unless `tls` says otherwise (False: plain HTTP)."""
        if where != EDGE and tls is None:
            tls = self.tls(host)

        def send() -> Response:
            conn = (http.client.HTTPSConnection(*where, timeout=timeout, context=tls) if tls else
                    http.client.HTTPConnection(*where, timeout=timeout))
            started = time.monotonic()
            try:
                conn.request(method, path, headers=headers or {})
                return Response.read(conn, started)
            finally:
                conn.close()

        return self.net.in_thread(host, send)

    def cluster(self) -> dict:  # from the slow instance's own host, with its certificate
        return self.request("/healthz", where=("10.77.0.1", 8201)).json()["pool"]["cluster"]

    def host_of_pid(self, pid: int) -> str | None:
        """The host whose run dir the process belongs to (every fleet process carries it)."""
        environ = procfs.environ(pid)
        for host in HOSTS:
            if f"{MEMBER_MARKER}={self.run_dir(host)}" in environ:
                return host
        return None


def fast_probe(hosts: Hosts) -> Probe:
    """GET /fast every 20 ms through the edge, from web1."""
    def send() -> int:
        conn = http.client.HTTPConnection(*EDGE, timeout=10)
        try:
            conn.request("GET", "/fast")
            return conn.getresponse().status
        finally:
            conn.close()

    return Probe(send, within=lambda run: hosts.net.in_thread("web1", run))


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hosts")
    with netns.SimulatedHosts(HOSTS) as net:
        fleet = Hosts(net, tmp)
        try:
            # The README's steps: certificates once, then each host's part on that host.
            subprocess.run(["make", "certs"], env=fleet.env("web1"), cwd=REPO, check=True, capture_output=True)
            for host in HOSTS:
                fleet.make(host, "deploy-local")
            # The slow instance re-reads the cluster's threads each second: both hosts' workers.
            wait_for(lambda: fleet.cluster()["threads"] == 2, 30, interval=POLL, what="the slow instance sees both workers")
            yield fleet
        finally:
            for host in STOP_ORDER:
                fleet.make(host, "stop", check=False)
                for pid in processes_of(fleet.run_dir(host)):  # never leave one behind, whatever happened
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass


def jobs_by_host(hosts: Hosts, count: int) -> dict[str, int]:
    """Run `count` /slow/pid jobs at once (at most 4: 2 threads, 2 waiting places); which host's process
    ran each (all must be 200)."""
    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(lambda _: hosts.request("/slow/pid"), range(count)))
    assert [a.status for a in answers] == [200] * count, [a.body for a in answers]
    found: dict[str, int] = {}
    for answer in answers:
        host = hosts.host_of_pid(answer.json()["result"])
        found[host] = found.get(host, 0) + 1
    return found


# each host runs its part ------------------------------------------------------------------------

def test_each_host_runs_only_its_part_bound_to_its_own_address(hosts):
    # The upstream service's replicas run beside the fast instances that call them.
    upstream = {"upstream-01", "upstream-02"}
    for host, wanted in (("web1", {"nginx", "fast-01", "fast-02", "slow-01", "runner-01", "dask-scheduler", *upstream}),
                         ("web2", {"fast-01", "fast-02", "slow-01", "runner-01", *upstream}), ("db1", {"job-store"}),
                         ("heavy1", {"dask-worker-01"}), ("heavy2", {"dask-worker-01"})):
        conf = (hosts.run_dir(host) / "supervisord.conf").read_text()
        programs = {line[len("[program:"):-1] for line in conf.splitlines() if line.startswith("[program:")}
        assert programs - {"fast-spare", "slow-spare"} == wanted, (host, programs)
        listening = hosts.net.run(host, ["ss", "-Htlnp"]).stdout
        bound = {tuple(line.split()[3].rsplit(":", 1)) for line in listening.splitlines()}
        # Never 0.0.0.0; loopback only for Dask's dashboards (dask.expose_dashboards is off).
        assert {address for address, _ in bound} <= {HOSTS[host], "127.0.0.1"}, (host, listening)
        dashboards = {str(p) for p in (8787, 8802)}
        assert all(address == HOSTS[host] for address, port in bound if port not in dashboards), (host, listening)
        assert all(address == "127.0.0.1" for address, port in bound if port in dashboards), (host, listening)
    # The slow instance re-reads the cluster each second: both heavy hosts' workers, over TLS.
    wait_for(lambda: "dask cluster tls://10.77.0.1:8786: connected, 2 worker(s), 2 thread(s)"
             in hosts.make("web1", "status").stdout, 10, interval=POLL, what="make status shows both workers")


def test_the_contract_holds_through_the_edge_and_heavy_jobs_run_on_the_heavy_hosts(hosts):
    assert hosts.request("/fast").body == b"Hello!"
    # A fan-out route: each web host's fast instances call their own host's replicas, over TLS.
    profiles = [hosts.request(f"/profile/{i}") for i in range(4)]
    assert all(p.status == 200 and not p.json()["partial"] for p in profiles), [p.body for p in profiles]
    assert {p.headers["x-served-by"].split("/")[0] for p in profiles} == {"web1", "web2"}
    assert hosts.request("/slow/fib/20").json()["result"] == 6765
    bad = hosts.request("/slow/fib/abc")
    assert bad.status == 400 and bad.json()["error"] == "bad_argument"
    assert hosts.request("/slow/nothing").status == 404
    assert hosts.request("/slow/raise_error").json()["error"] == "job_failed"
    found = wait_for(lambda: (lambda f: f if set(f) == {"heavy1", "heavy2"} else None)(jobs_by_host(hosts, 4)),
                     30, interval=POLL, what="jobs on both heavy hosts")
    assert set(found) == {"heavy1", "heavy2"}, found  # never on web1


def test_instances_answer_only_the_edge_host_and_their_own(hosts):
    # From heavy1: the edge answers (it is public), an instance refuses, whatever X-Real-IP says.
    assert hosts.request("/fast", host="heavy1").status == 200
    refused = hosts.request("/fast", host="heavy1", where=("10.77.0.1", 8101), headers={"X-Real-IP": "10.77.0.1"})
    assert refused.status == 403 and refused.json()["error"] == "forbidden"
    assert hosts.request("/healthz", host="heavy1", where=("10.77.0.1", 8201)).status == 403
    assert hosts.request("/healthz", host="web1", where=("10.77.0.1", 8201)).status == 200  # its own host
    # Its own host's processes get /healthz and /metrics only: the rest is the edge's (its secret).
    assert hosts.request("/fast", host="web1", where=("10.77.0.1", 8101)).status == 403


def test_the_edge_to_instance_hop_across_hosts_is_tls_with_a_certificate_of_the_fleet_s_ca(hosts):
    instance = ("10.77.0.1", 8101)
    for context in (None, hosts.tls("heavy1", certificate=False)):  # plain HTTP; TLS but no certificate
        with pytest.raises((OSError, http.client.HTTPException)):
            response = hosts.request("/healthz", host="heavy1", where=instance, tls=context or False)
            raise OSError(f"answered {response.status}")  # a plain request gets no HTTP answer either
    # nginx reaches them so, from the edge host, with its secret: the contract above holds.
    assert hosts.request("/fast").body == b"Hello!"
    conf = (hosts.run_dir("web1") / "nginx" / "conf" / "nginx.conf").read_text()
    assert "proxy_pass https://fast;" in conf and "proxy_ssl_verify on;" in conf


def test_dask_dashboards_are_not_reachable_from_other_hosts(hosts):
    for host, where in (("heavy1", ("10.77.0.1", 8787)), ("web1", ("10.77.0.2", 8802))):
        with pytest.raises(OSError):
            hosts.request("/status", host=host, where=where, tls=False)


# A refused Dask client, collected after its event loop closed, complains in __del__.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_the_scheduler_refuses_a_client_without_the_fleet_s_certificate(hosts, tmp_path):
    from distributed import Client, Security

    from deploy import certs
    from services.common.settings import load

    # Another CA's certificate, as made by the same tool: a perfectly valid TLS peer, not ours.
    stranger = load(env={**hosts.env("heavy1"), "FLEET_DASK_CERTS_DIR": str(tmp_path / "other")})
    certs.make_certs(stranger)
    paths = stranger.certs()

    def connect(security):
        import asyncio

        async def attempt():
            async with Client("tls://10.77.0.1:8786", asynchronous=True, timeout=3, security=security,
                              set_as_default=False):
                return "connected"
        try:
            return asyncio.run(attempt())
        except Exception as exc:  # noqa: BLE001 - the refusal is the point
            return f"{type(exc).__name__}"

    other = Security(tls_ca_file=str(paths["ca"]), tls_client_cert=str(paths["cert"]),
                     tls_client_key=str(paths["key"]), require_encryption=True)
    assert hosts.net.in_thread("heavy1", connect, other) != "connected"
    assert hosts.net.in_thread("heavy1", connect, None) != "connected"  # plain TCP to a TLS scheduler
    ours = load(env=hosts.env("heavy1")).certs()
    mine = Security(tls_ca_file=str(ours["ca"]), tls_client_cert=str(ours["cert"]), tls_client_key=str(ours["key"]),
                    require_encryption=True)
    assert hosts.net.in_thread("heavy1", connect, mine) == "connected"
    gc.collect()  # the refused clients complain as they are collected: here, under this test's filters


def test_deploy_without_the_certificates_fails_naming_them(hosts, tmp_path):
    env = {**hosts.env("heavy2"), "FLEET_DASK_CERTS_DIR": str(tmp_path / "none"),
           "FLEET_RUN_DIR": str(tmp_path / "run")}
    result = hosts.net.run("heavy2", ["make", "deploy-local"], env, cwd=str(REPO), check=False)
    assert result.returncode != 0
    assert "make certs" in result.stderr and "heavy2.pem" in result.stderr, result.stderr
    assert not (tmp_path / "run" / "supervisord.pid").exists()


# long jobs across hosts -----------------------------------------------------------------------------

ASYNC = {"Prefer": "respond-async"}
ENDED = ("succeeded", "failed", "cancelled")


def submit(hosts: Hosts, path: str) -> str:
    answer = hosts.request(path, headers=ASYNC)
    assert answer.status == 202, (answer.status, answer.body)
    return answer.json()["id"]


def job(hosts: Hosts, job_id: str) -> dict:
    answer = hosts.request(f"/jobs/{job_id}")
    assert answer.status == 200, (answer.status, answer.body)
    return answer.json()


def ended(hosts: Hosts, job_id: str, within: float) -> dict:
    return wait_for(lambda: (lambda doc: doc if doc["state"] in ENDED else None)(job(hosts, job_id)), within,
                    interval=POLL, what=f"job {job_id} ended")


def states(hosts: Hosts, job_id: str) -> list[dict]:
    """The state events of an ended job (its stream replays them all): each attempt's."""
    body = hosts.request(f"/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}).body.decode()
    found = []
    for block in body.split("\n\n"):
        fields = dict(line.partition(": ")[::2] for line in block.split("\n") if line and not line.startswith(":"))
        if fields.get("event") == "state":
            found.append(json.loads(fields["data"]))
    return found


def test_a_long_job_runs_on_a_workers_host_any_slow_host_answers_for_it_and_its_stream_outlives_reloads(hosts):
    # Its process on a workers host, whichever slow host's runner claimed it.
    pid = submit(hosts, "/slow/pid")
    assert hosts.host_of_pid(ended(hosts, pid, 30)["result"]) in ("heavy1", "heavy2")
    job_id = submit(hosts, "/slow/report/10")
    seen: list[int] = []
    reconnects: list[int] = []

    def follower() -> None:
        with hosts.net.inside("web1"):  # a browser's EventSource, which also hangs up once by itself
            follow(EDGE, job_id, None, seen, reconnects, hang_up_after=5)

    thread = threading.Thread(target=follower, daemon=True)
    thread.start()
    # Its status through the slow instances of both web hosts: nginx balances over them.
    served: set[str] = set()
    wait_for(lambda: served.add(hosts.request(f"/jobs/{job_id}").headers["x-served-by"])
             or {"web1/slow-01", "web2/slow-01"} <= served, 20, interval=POLL, what=f"both slow hosts (so far {served})")
    wait_for(lambda: job(hosts, job_id)["progress"], 20, interval=POLL, what="the job reporting progress")
    for host in ("web1", "web2"):  # every slow instance and runner restarted, one host after the other
        hosts.make(host, "reload")
    doc = ended(hosts, job_id, 60)
    thread.join(30)
    assert doc["state"] == "succeeded", doc
    assert states(hosts, job_id) == [{"state": "queued"}, {"state": "running"}]  # one attempt
    # Every event once, in order, across the client's own hang-up and the reloads' cuts.
    assert seen and seen == list(range(1, len(seen) + 1)), (seen, reconnects)
    assert len(reconnects) >= 1, reconnects


def test_the_store_host_cut_off_answers_503_at_once_and_a_job_that_ended_meanwhile_is_recorded(hosts, record_property):
    job_id = submit(hosts, "/slow/report/6")
    wait_for(lambda: job(hosts, job_id)["progress"], 20, interval=POLL, what="the job reporting progress")
    with fast_probe(hosts) as probe:
        figures = {"before": probe.over_the_next(2)}
        hosts.net.link("db1", up=False)
        cut = time.monotonic()
        answers = []
        for _ in range(3):  # a submit and a status read, each answered at once: 503 store_unavailable
            answers += [hosts.request("/slow/report/2", headers=ASYNC), hosts.request(f"/jobs/{job_id}")]
        assert {(a.status, a.json()["error"]) for a in answers} == {(503, "store_unavailable")}, [a.body for a in answers]
        assert "retry-after" in answers[0].headers
        figures["slowest_503_ms"] = round(max(a.elapsed for a in answers) * 1000)
        time.sleep(max(0.0, cut + 8 - time.monotonic()))  # the job's run ends meanwhile, its process holds its end
        figures["during"] = probe.window(cut, time.monotonic())
        hosts.net.link("db1", up=True)
        back = time.monotonic()
        doc = wait_for(lambda: (lambda a: a.json() if a.status == 200 and a.json()["state"] in ENDED else None)(
            hosts.request(f"/jobs/{job_id}")), 30, interval=POLL, what="the job's end recorded")
        figures["recorded_after_s"] = round(time.monotonic() - back, 1)
        figures["after"] = probe.over_the_next(2)
    record_property("store_cut_off", json.dumps(figures))
    print("store host cut off:", json.dumps(figures))
    assert doc["state"] == "succeeded", doc
    assert states(hosts, job_id) == [{"state": "queued"}, {"state": "running"}]  # it ran on, once
    assert figures["slowest_503_ms"] < 1500, figures
    for phase in ("before", "during", "after"):
        assert figures[phase]["failed"] == 0, figures  # the fast routes never notice
    assert figures["during"]["p99"] < 50, figures


def computing_on(hosts: Hosts) -> str | None:
    """The workers host whose pool worker computes now (state R at three looks, 0.1 s apart)."""
    for host in ("heavy1", "heavy2"):
        workers = [pid for pid in processes_of(hosts.run_dir(host))
                   if (stat := procfs.stat(pid)) and "forkserver" in procfs.cmdline(stat.ppid)]
        for _ in range(3):
            workers = [pid for pid in workers if procfs.state(pid) == "R"]
            time.sleep(0.1)
        if workers:
            return host
    return None


def test_a_workers_host_cut_off_under_a_long_job_fails_it_once_dask_drops_the_host_long_before_its_deadline(hosts, record_property):
    wait_for(lambda: hosts.cluster()["workers"] == 2, 60, interval=POLL, what="both workers joined")
    job_id = submit(hosts, "/slow/report/30")  # its own deadline is far (the report's: an hour, capped)
    wait_for(lambda: job(hosts, job_id)["progress"], 20, interval=POLL, what="the job reporting progress")
    host = wait_for(lambda: computing_on(hosts), 20, interval=POLL, what="the long job computing on a workers host")
    with fast_probe(hosts) as probe:
        figures = {"before": probe.over_the_next(1)}
        hosts.net.link(host, up=False)
        cut = time.monotonic()
        doc = ended(hosts, job_id, 30)  # long before its deadline: once the scheduler drops the host
        figures["ended_after_s"] = round(time.monotonic() - cut, 1)
        figures["during"] = probe.window(cut, time.monotonic())
        # The next long job runs on the other workers host.
        assert ended(hosts, submit(hosts, "/slow/fib/20"), 30)["result"] == 6765
        hosts.net.link(host, up=True)
        wait_for(lambda: hosts.cluster()["workers"] == 2, 90, interval=POLL, what=f"{host} rejoined by itself")
        figures["after"] = probe.over_the_next(1)
    record_property("workers_host_cut_off_under_a_long_job", json.dumps(figures))
    print(f"{host} cut off under a long job:", json.dumps(figures), doc.get("error"))
    error = doc.get("error") or {}
    # As a synchronous job's: the fleet cannot tell a lost host from a job that killed its worker,
    # so the error does not invite a retry (the client decides; the report's own retries are for a
    # lost job process, whose lease says so).
    assert doc["state"] == "failed" and error.get("error") == "worker_died", doc
    assert figures["ended_after_s"] < 20, figures
    for phase in ("before", "during", "after"):
        assert figures[phase]["failed"] == 0, figures


# the network breaks ---------------------------------------------------------------------------------

def test_a_heavy_host_cut_off_mid_job_fails_its_job_and_the_rest_goes_on(hosts, record_property):
    wait_for(lambda: hosts.cluster()["workers"] == 2, 60, interval=POLL, what="both workers joined")
    with fast_probe(hosts) as probe:
        figures = {"before": probe.over_the_next(3)}
        # Two jobs at once: one on each heavy host's one thread.
        before = {host: last_spinner(hosts.run_dir(host)) for host in ("heavy1", "heavy2")}
        with ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(hosts.request, "/slow/spin_and_tell/2") for _ in range(2)]
            for host, spinner in before.items():
                spinner_pid(hosts.run_dir(host), spinner)  # a job runs on that host
            hosts.net.link("heavy1", up=False)
            cut = time.monotonic()
            answers = [j.result() for j in jobs]
        statuses = sorted(a.status for a in answers)
        # heavy2's job finishes; heavy1's is answered by its deadline, 502 or 504, never a hang.
        assert statuses[0] == 200 and statuses[1] in (502, 504), [a.body for a in answers]
        assert max(a.elapsed for a in answers) < JOB_TIMEOUT + 1.5  # dask_pool.GRACE
        # The scheduler drops the silent worker (dask.worker_ttl); from then on jobs go to heavy2.
        wait_for(lambda: hosts.cluster()["workers"] == 1, 30, interval=POLL, what="heavy1's worker dropped")
        dropped = time.monotonic()
        assert jobs_by_host(hosts, 3) == {"heavy2": 3}  # heavy2's one thread and the 2 waiting places
        figures["during"] = probe.window(cut, time.monotonic())
        hosts.net.link("heavy1", up=True)
        back = time.monotonic()
        wait_for(lambda: hosts.cluster()["workers"] == 2, 90, interval=POLL, what="heavy1 rejoined by itself")
        rejoined = time.monotonic()
        wait_for(lambda: "heavy1" in jobs_by_host(hosts, 4), 30, interval=POLL, what="jobs on heavy1 again")
        figures["after"] = probe.over_the_next(3)
    figures["dropped_after_s"] = round(dropped - cut, 1)
    figures["rejoined_after_s"] = round(rejoined - back, 1)
    record_property("heavy1_cut_off", json.dumps(figures))
    print("heavy1 cut off:", json.dumps(figures))
    for phase in ("before", "during", "after"):
        assert figures[phase]["failed"] == 0, figures  # the fast routes never notice
    assert figures["during"]["p99"] < 50, figures


def test_both_heavy_hosts_cut_off_answer_503_at_once_never_a_hang(hosts, record_property):
    wait_for(lambda: hosts.cluster()["workers"] == 2, 90, interval=POLL, what="both workers joined")
    with fast_probe(hosts) as probe:
        figures = {"before": probe.over_the_next(2)}
        for host in ("heavy1", "heavy2"):
            hosts.net.link(host, up=False)
        cut = time.monotonic()
        # Until the scheduler drops the silent workers a job may be sent to one: answered by its
        # deadline. Every answer is bounded, and a 5xx in the contract's JSON.
        while hosts.cluster()["workers"] > 0:
            answer = hosts.request("/slow/fib/10", timeout=JOB_TIMEOUT + 10)
            assert answer.status in (502, 503, 504) and "error" in answer.json(), answer.body
            assert time.monotonic() - cut < 30, "workers never dropped"
        figures["dropped_after_s"] = round(time.monotonic() - cut, 1)
        # Then: 503 at once, with Retry-After.
        for _ in range(5):
            answer = hosts.request("/slow/fib/10")
            assert answer.status == 503 and answer.elapsed < 1, (answer.status, answer.elapsed, answer.body)
            assert answer.json()["error"] in ("no_workers", "overloaded", "backend_unavailable")
            assert "retry-after" in answer.headers
        figures["during"] = probe.window(cut, time.monotonic())
        for host in ("heavy1", "heavy2"):
            hosts.net.link(host, up=True)
        back = time.monotonic()
        wait_for(lambda: hosts.cluster()["workers"] == 2, 90, interval=POLL, what="both rejoined by themselves")
        figures["rejoined_after_s"] = round(time.monotonic() - back, 1)
        # The slow instance reads the cluster's threads once a second: until it sees them, a job is
        # answered 503 no_workers with Retry-After, at once (asserted above); then jobs run.
        answer = wait_for(lambda: (a := hosts.request("/slow/fib/20")).status == 200 and a, 10, interval=POLL,
                          what="a job served once the workers are back")
        assert answer.json()["result"] == 6765
        figures["served_after_s"] = round(time.monotonic() - back, 1)
        figures["after"] = probe.over_the_next(2)
    record_property("both_cut_off", json.dumps(figures))
    print("both heavy hosts cut off:", json.dumps(figures))
    for phase in ("before", "during", "after"):
        assert figures[phase]["failed"] == 0, figures
    assert figures["during"]["p99"] < 50, figures


def test_stopping_every_part_leaves_no_process_and_the_namespaces_go(hosts):
    for host in STOP_ORDER:
        hosts.make(host, "stop")
        assert processes_of(hosts.run_dir(host)) == [], host
    hosts.net.remove()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in hosts.net.namespaces.values())
