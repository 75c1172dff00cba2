"""Both apps in process, through real HTTP on an unused port: the contract's answers and errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from unittest import mock

import tornado
from tornado.testing import gen_test

from services.common import metrics
from services.common.server import Instance
from services.common.settings import REPO_ROOT, load
from services.common.web import BaseHandler
from services.fast.app import make_app as make_fast_app
from services.slow import registry
from services.slow.app import make_app as make_slow_app
from services.slow.inline_pool import InlinePool
from tests.support.app_case import ContractTestCase
from tests.support.fake_pools import HeldPool
from tests.support.waiting import eventually

MODULES = "services.slow.tasks,tests.support.faulty_tasks"
HEX_ID = re.compile(r"^[0-9a-f]{32}$")


# who may talk to an instance ----------------------------------------------------------------------

EXAMPLE = str(REPO_ROOT / "deploy" / "hosts.example.toml")


class PeerTestCase(ContractTestCase):
    """An instance served as the fleet serves it: no header changes the peer's address."""

    def get_httpserver_options(self):
        return {"xheaders": False}


class UntrustedPeerTest(PeerTestCase):
    """An instance of web1 in deploy/hosts.example.toml, reached from 127.0.0.1: neither the edge
    host (10.77.0.1) nor its own address."""

    def get_app(self):
        return make_fast_app(Instance("fast", 1, load(env={"FLEET_SETTINGS": EXAMPLE, "FLEET_HOST": "web1"})))

    def test_anyone_but_the_edge_and_the_own_host_gets_403_json(self):
        self.assert_json_error(self.request("/fast"), 403, "forbidden")
        self.assert_json_error(self.request("/healthz"), 403, "forbidden")

    def test_a_header_naming_the_edge_does_not_make_a_peer_trusted(self):
        for header in ("X-Real-IP", "X-Forwarded-For"):
            self.assert_json_error(self.request("/fast", **{header: "10.77.0.1"}), 403, "forbidden")


class TrustedPeerTest(PeerTestCase):
    """An instance of a fleet on one host, reached from 127.0.0.1: loopback is the edge's address."""

    def get_app(self):
        return make_fast_app(Instance("fast", 1, load(env={})))

    def test_a_request_from_the_edge_s_address_is_served(self):
        assert self.request("/fast").code == 200

    def test_a_header_naming_another_address_does_not_make_the_edge_untrusted(self):
        assert self.request("/fast", **{"X-Real-IP": "10.77.0.1"}).code == 200


class WhoIsTheClient(BaseHandler):
    """A route of the test's own: what an instance takes for the client's address and request id."""

    def get(self) -> None:
        self.write_json({"client": self.request.remote_ip, "request_id": self.request_id})


class EdgeSecretTest(ContractTestCase):
    """One host: any local process can connect to an instance's port (issue 29, item 5). Only a
    request with the edge's secret is the edge's: its X-Real-IP and X-Request-ID are believed."""

    SECRET = b"0123456789abcdef"

    def get_app(self):
        instance = Instance("fast", 1, load(env={}))
        app = make_fast_app(instance)
        app.add_handlers(r".*", [(r"/_who", WhoIsTheClient)])
        app.settings["edge_token"] = self.SECRET  # what server.serve reads from the run dir
        return app

    def test_a_local_process_that_is_not_the_edge_gets_403_on_every_route_but_health_and_metrics(self):
        for path in ("/fast", "/_who", "/nosuch"):
            self.assert_json_error(self.request(path, **{"X-Real-IP": "10.9.9.9"}), 403, "forbidden")
        self.assert_json_error(self.request("/echo", "POST", b"x"), 403, "forbidden")
        self.assert_json_error(self.request("/fast", **{"X-Fleet-Edge": "guess"}), 403, "forbidden")
        assert self.request("/healthz").code == 200 and self.request("/metrics").code == 200

    def test_only_the_edge_says_who_the_client_is_and_which_request_this_is(self):
        edge = {"X-Fleet-Edge": self.SECRET.decode()}
        body = json.loads(self.request("/_who", **edge, **{"X-Real-IP": "10.9.9.9", "X-Request-ID": "edge-1"}).body)
        assert body == {"client": "10.9.9.9", "request_id": "edge-1"}
        direct = self.request("/healthz", **{"X-Real-IP": "10.9.9.9", "X-Request-ID": "someone-else-s"})
        assert HEX_ID.match(direct.headers["X-Request-ID"])


# the fast app -----------------------------------------------------------------------------------

class FastAppTest(ContractTestCase):
    def get_app(self):
        return make_fast_app(Instance("fast", 1, load(env={})))

    def test_fast_says_hello_with_served_by_and_a_request_id(self):
        response = self.request("/fast")
        assert response.code == 200
        assert response.body == b"Hello!"
        assert response.headers["Content-Type"].startswith("text/plain")
        assert response.headers["X-Served-By"] == "fast-01"
        assert HEX_ID.match(response.headers["X-Request-ID"])

    def test_each_request_gets_its_own_request_id(self):
        assert self.request("/fast").headers["X-Request-ID"] != self.request("/fast").headers["X-Request-ID"]

    def test_a_safe_incoming_request_id_is_kept(self):
        response = self.request("/fast", **{"X-Request-ID": "edge-42.a_B"})
        assert response.headers["X-Request-ID"] == "edge-42.a_B"

    def test_an_unsafe_incoming_request_id_is_replaced(self):
        for unsafe in ("a b<>", "x" * 200, "x" * 65):
            response = self.request("/fast", **{"X-Request-ID": unsafe})
            assert response.code == 200
            assert HEX_ID.match(response.headers["X-Request-ID"]), unsafe

    def test_a_request_id_of_64_safe_characters_is_kept(self):
        assert self.request("/fast", **{"X-Request-ID": "y" * 64}).headers["X-Request-ID"] == "y" * 64

    def test_echo_returns_the_byte_count_and_sha256_of_the_body(self):
        body = "h\u00e9llo \x00 wörld".encode()
        response = self.request("/echo", method="POST", body=body)
        assert response.code == 200
        assert response.headers["Content-Type"].startswith("application/json")
        assert json.loads(response.body) == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}

    def test_echo_of_an_empty_body_is_zero_bytes(self):
        response = self.request("/echo", method="POST", body=b"")
        assert json.loads(response.body) == {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}

    def test_an_unknown_path_is_a_json_404(self):
        response = self.request("/nope?x=1", **{"X-Request-ID": "req-404"})
        body = self.assert_json_error(response, 404, "not_found")
        assert body["request_id"] == "req-404"
        assert "/nope" in body["message"]
        assert response.headers["X-Served-By"] == "fast-01"

    def test_slow_paths_are_not_served_by_the_fast_app(self):
        self.assert_json_error(self.request("/slow/fib/25"), 404, "not_found")

    def test_put_on_fast_is_a_json_405(self):
        self.assert_json_error(self.request("/fast", method="PUT", body=b"x"), 405, "method_not_allowed")

    def test_get_on_echo_is_a_json_405(self):
        self.assert_json_error(self.request("/echo"), 405, "method_not_allowed")

    def test_head_on_fast_and_healthz_answers_200_with_headers_only(self):
        for path in ("/fast", "/healthz"):
            response = self.request(path, method="HEAD")
            assert response.code == 200, path
            assert response.body == b"" and response.headers["X-Served-By"] == "fast-01"

    def test_metrics_show_the_fast_p99_objective_the_alert_rules_compare_with(self):
        assert "fleet_fast_p99_objective_seconds 0.01" in self.request("/metrics").body.decode()  # 10 ms

    def test_made_up_methods_never_become_metric_labels(self):
        for i in range(50):
            response = self.fetch("/fast", method=f"M{i:04d}X", allow_nonstandard_methods=True, raise_error=False)
            assert response.code == 405
        text = self.request("/metrics").body.decode()
        methods = set(re.findall(r'fleet_http_request_duration_seconds_count\{[^}]*method="([^"]+)"', text))
        assert methods <= {"GET", "POST", "HEAD", "other"} and "other" in methods
        assert "M0001X" not in text

    def test_no_response_names_tornado_or_its_version(self):
        for response in (self.request("/fast"), self.request("/nope"), self.request("/fast", method="PUT")):
            assert "Server" not in response.headers, response.headers.get("Server")
            assert tornado.version not in str(response.headers)

    def test_healthz_names_role_and_instance(self):
        response = self.request("/healthz")
        assert response.code == 200
        assert json.loads(response.body) == {"status": "ok", "role": "fast", "instance": "fast-01"}

    def test_healthz_says_draining_with_503_while_the_instance_drains(self):
        self._app.settings["draining"] = True
        response = self.request("/healthz")
        assert response.code == 503
        assert json.loads(response.body)["status"] == "draining"
        assert json.loads(response.body)["error"] == "draining" and response.headers["Retry-After"] == "1"
        assert response.headers.get("Connection") == "close"

    def test_no_request_stays_in_flight_after_its_answer(self):
        self.request("/fast")
        self.request("/nope")
        self.request("/fast", method="PUT")
        assert self._app.settings["in_flight"].count == 0

    def test_echo_takes_64_kib_by_default_and_refuses_a_byte_more_with_413_json(self):
        assert json.loads(self.request("/echo", "POST", b"x" * 65536).body)["bytes"] == 65536
        body = self.assert_json_error(self.request("/echo", "POST", b"x" * 65537), 413, "payload_too_large")
        assert "edge.echo_max_body_kb" in body["message"]
        assert self._app.settings["in_flight"].count == 0


class HashSpy:
    """hashlib as the fast app sees it, recording the bytes each SHA-256 step hashes in one call."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def sha256(self, data: bytes = b"") -> "HashSpy.Hash":
        return HashSpy.Hash(self, data)

    class Hash:
        def __init__(self, spy: "HashSpy", data: bytes):
            self.spy, self.real = spy, hashlib.sha256()
            self.update(data)

        def update(self, data: bytes) -> None:
            self.spy.steps.append(len(data))
            self.real.update(data)

        def hexdigest(self) -> str:
            return self.real.hexdigest()


class EchoLargeBodyTest(ContractTestCase):
    """/echo allowed 1 MiB bodies (edge.echo_max_body_kb = 1024): still never hashed whole."""

    def get_app(self):
        return make_fast_app(Instance("fast", 1, load(env={"FLEET_EDGE_ECHO_MAX_BODY_KB": "1024"})))

    def test_a_1_mib_body_is_hashed_a_read_at_a_time_never_whole_on_the_event_loop(self):
        body = bytes(range(256)) * 4096
        spy = HashSpy()
        with mock.patch("services.fast.app.hashlib", spy):
            response = self.request("/echo", "POST", body, **{"Content-Type": "application/octet-stream"})
        assert json.loads(response.body) == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        assert sum(spy.steps) == len(body)
        assert max(spy.steps) <= 64 * 1024, f"one step hashed {max(spy.steps)} bytes"  # about 30 us here

    def test_a_body_past_the_limit_is_refused_413_json_and_never_hashed(self):
        spy = HashSpy()
        with mock.patch("services.fast.app.hashlib", spy):
            response = self.request("/echo", "POST", b"x" * (1024 * 1024 + 1))
        self.assert_json_error(response, 413, "payload_too_large")
        assert spy.steps == []


# the slow app, inline pool ----------------------------------------------------------------------

class SlowAppTest(ContractTestCase):
    def get_app(self):
        self.pool = InlinePool(MODULES)
        settings = load(env={"FLEET_SLOW_WORKERS": "2", "FLEET_SLOW_TASK_MODULES": MODULES})
        return make_slow_app(Instance("slow", 1, settings), registry.load(MODULES), self.pool)

    def test_fib_25_answers_its_result_and_n(self):
        response = self.request("/slow/fib/25")
        assert response.code == 200
        assert response.headers["X-Served-By"] == "slow-01"
        body = json.loads(response.body)
        assert (body["task"], body["n"], body["result"]) == ("fib", 25, 75025)
        assert body["elapsed_ms"] >= 0 and body["queued_ms"] >= 0

    def test_a_deeply_nested_json_body_is_a_400_not_a_500(self):
        self.assert_json_error(self.request("/slow/pbkdf2", "POST", b"[" * 100000), 400, "bad_request")

    def test_an_unknown_task_or_wrong_method_is_judged_before_the_body(self):
        self.assert_json_error(self.request("/slow/nosuch", "POST", b"{oops"), 404, "not_found")
        self.assert_json_error(self.request("/slow/fib/3", "POST", b"{oops"), 405, "method_not_allowed")

    def test_bad_fib_arguments_are_a_json_400_before_any_job_runs(self):
        for path in ("/slow/fib/-1", "/slow/fib/abc", "/slow/fib/36", "/slow/fib/%D9%A3", "/slow/fib"):
            body = self.assert_json_error(self.request(path), 400, "bad_argument")
            assert "n" in body["message"], path
        assert self.pool.counters == {"ok": 0, "error": 0}

    def test_an_unknown_task_is_a_json_404(self):
        body = self.assert_json_error(self.request("/slow/nope"), 404, "not_found")
        assert "nope" in body["message"] and "fib" in body["message"]  # lists the known tasks

    def test_an_unmatched_slow_path_is_a_json_404(self):
        self.assert_json_error(self.request("/slow/Fib/1"), 404, "not_found")

    def test_get_on_a_post_only_task_is_a_json_405_with_allow(self):
        response = self.request("/slow/pbkdf2")
        self.assert_json_error(response, 405, "method_not_allowed")
        assert response.headers["Allow"] == "POST"

    def test_post_on_a_get_only_task_is_a_json_405_with_allow(self):
        response = self.request("/slow/fib/25", method="POST", body=b"{}")
        self.assert_json_error(response, 405, "method_not_allowed")
        assert response.headers["Allow"] == "GET"

    def test_head_on_a_task_is_a_405_naming_the_methods_the_task_takes_and_runs_no_job(self):
        for path, allow in (("/slow/fib/25", "GET"), ("/slow/pbkdf2", "POST")):
            response = self.request(path, method="HEAD")
            assert (response.code, response.headers.get("Allow"), response.body) == (405, allow, b""), path
        assert self.request("/slow/nope/1", method="HEAD").code == 404
        assert self.pool.counters == {"ok": 0, "error": 0}

    def test_pbkdf2_posted_as_json_answers_the_hash_and_echoes_only_rounds(self):
        response = self.request("/slow/pbkdf2", method="POST",
                                body=json.dumps({"password": "hunter2", "salt": "s", "rounds": 1000}))
        assert response.code == 200
        body = json.loads(response.body)
        assert body["result"] == hashlib.pbkdf2_hmac("sha256", b"hunter2", b"s", 1000).hex()
        assert body["rounds"] == 1000
        assert "hunter2" not in response.body.decode()

    def test_a_post_with_a_query_string_is_refused_400_without_echoing_or_logging_the_query(self):
        # A query string is written to access logs; a POST's parameters (a password) come from its body.
        body = json.dumps({"password": "hunter2", "salt": "s", "rounds": 1000})
        with self.assertLogs("fleet.access", level="WARNING") as logged:
            for query in ("?password=hunter2", "?rounds=1000&x=hunter2", "?hunter2"):
                response = self.request("/slow/pbkdf2" + query, method="POST", body=body)
                error = self.assert_json_error(response, 400, "bad_request")
                assert "body" in error["message"] and "query" in error["message"]
                assert "hunter2" not in response.body.decode()
        assert len(logged.records) == 3
        assert all("hunter2" not in record.getMessage() for record in logged.records)
        assert self.pool.counters == {"ok": 0, "error": 0}

    def test_a_post_with_only_a_json_body_still_runs(self):
        response = self.request("/slow/pbkdf2", method="POST", body=json.dumps({"password": "pw", "rounds": 1000}))
        assert response.code == 200

    def test_pbkdf2_with_a_body_that_is_not_json_is_a_json_400(self):
        for body in (b"{not json", b"\xff\xfe", b"[1, 2]", b'"password"'):
            self.assert_json_error(self.request("/slow/pbkdf2", method="POST", body=body), 400, "bad_request")

    def test_pbkdf2_with_bad_arguments_is_a_json_400(self):
        for body in ({}, {"password": "pw", "rounds": 10**9}, {"password": 5}):
            response = self.request("/slow/pbkdf2", method="POST", body=json.dumps(body))
            self.assert_json_error(response, 400, "bad_argument")

    def test_a_task_that_raises_is_a_json_500_with_its_type_and_no_traceback(self):
        response = self.request("/slow/raise_error")
        body = self.assert_json_error(response, 500, "job_failed")
        assert body["type"] == "ValueError"
        assert "this task always raises" in body["message"]
        text = response.body.decode()
        assert "Traceback" not in text and "File \"" not in text and "faulty_tasks" not in text

    def test_an_exception_message_stays_in_the_log_unless_the_task_exposes_it(self):
        response = self.request("/slow/hidden_raise")
        body = self.assert_json_error(response, 500, "job_failed")
        assert body["type"] == "PermissionError"
        assert "secret" not in response.body.decode() and "alice" not in response.body.decode()
        assert body["request_id"] in body["message"] and "log" in body["message"]

    def test_a_task_returning_something_that_is_not_json_is_a_json_500(self):
        body = self.assert_json_error(self.request("/slow/return_unpicklable"), 500, "job_failed")
        assert "not JSON" in body["message"]

    def test_sleep_reuses_the_same_client_across_jobs(self):
        first = json.loads(self.request("/slow/sleep/0").body)["result"]
        second = json.loads(self.request("/slow/sleep/0").body)["result"]
        assert first["client_id"] == second["client_id"]
        assert second["calls"] == first["calls"] + 1

    def test_query_arguments_reach_the_task_parser(self):
        response = self.request("/slow/spin/0.01?ignored=1")
        assert response.code == 200 and json.loads(response.body)["seconds"] == 0.01

    def test_slow_healthz_reports_the_line_and_the_pool(self):
        self.request("/slow/fib/5")
        body = json.loads(self.request("/healthz").body)
        assert (body["status"], body["role"], body["instance"]) == ("ok", "slow", "slow-01")
        assert (body["running"], body["waiting"], body["shed"]) == (0, 0, 0)
        assert body["pool"]["ok"] == 1

    def test_no_slow_response_names_tornado(self):
        for path in ("/slow/fib/1", "/slow/nope", "/slow/raise_error"):
            assert "Server" not in self.request(path).headers

    def test_a_password_that_cannot_be_encoded_is_a_json_400(self):
        response = self.request("/slow/pbkdf2", method="POST", body='{"password": "\\ud800"}')
        self.assert_json_error(response, 400, "bad_argument")


    def test_a_job_is_counted_ok_only_once_its_result_is_encoded(self):
        before = self.pool.counters["ok"]
        self.assert_json_error(self.request("/slow/return_unpicklable"), 500, "job_failed")
        assert self.pool.counters["ok"] == before and self.pool.counters["error"] >= 1
        text = self.request("/metrics").body.decode()
        assert 'fleet_slow_jobs_total{backend="local",outcome="ok",task="return_unpicklable"} 0.0' in text


# the slow app: what a pool can answer besides a result ----------------------------------------------

class ScriptedPool:
    """A pool that ends every job with the exception the test chose, and reports `workers`."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.workers = 2
        self.kill_on_cancel = False
        self.size = 1
        self.cluster: dict | None = None  # a Dask pool's view of its cluster

    async def run(self, task: str, kwargs: dict, timeout: float, client: str = ""):
        if self.error is not None:
            raise self.error
        return b"1", 1.0

    def stats(self) -> dict:
        return {"workers": self.workers, "busy": 0, "problem": None, **({"cluster": self.cluster} if self.cluster else {})}


class SlowAppPoolOutcomesTest(ContractTestCase):
    def get_app(self):
        self.pool = ScriptedPool()
        settings = load(env={"FLEET_SLOW_WORKERS": "2", "FLEET_SLOW_MIN_WORKERS": "1"})
        return make_slow_app(Instance("slow", 1, settings), registry.load("services.slow.tasks"), self.pool)

    def test_no_worker_is_a_503_no_workers_with_retry_after(self):
        from services.slow.jobs import NoWorkers

        self.pool.error = NoWorkers("this instance has no worker and cannot start one; retry later")
        response = self.request("/slow/fib/3")
        self.assert_json_error(response, 503, "no_workers")
        assert response.headers["Retry-After"] == "1"

    def test_a_task_whose_setup_fails_is_a_503_task_unavailable(self):
        from services.slow.jobs import TaskUnavailable

        self.pool.error = TaskUnavailable("task fib is unavailable: its setup failed")
        response = self.request("/slow/fib/3")
        body = self.assert_json_error(response, 503, "task_unavailable")
        assert "setup failed" in body["message"] and response.headers["Retry-After"] == "1"

    def test_a_result_over_the_limit_is_a_500_result_too_large(self):
        from services.slow.jobs import ResultTooLarge

        self.pool.error = ResultTooLarge("the result of fib is 20.0 MiB of JSON, over the limit of 16 MiB")
        self.assert_json_error(self.request("/slow/fib/3"), 500, "result_too_large")

    def test_metrics_show_the_worker_floor_the_rules_compare_with_and_on_dask_the_cluster_as_the_pool_sees_it(self):
        metrics.DASK_CONNECTED.clear()
        text = self.request("/metrics").body.decode()
        assert "fleet_slow_workers 2.0" in text and "fleet_slow_workers_floor 1.0" in text  # slow.min_workers
        assert "fleet_dask_scheduler_connected{" not in text  # the local pool: no series, no false alarm
        self.pool.cluster = {"scheduler": "tls://10.9.9.9:8786", "connected": False, "workers": 3}
        text = self.request("/metrics").body.decode()
        assert 'fleet_dask_scheduler_connected{scheduler="tls://10.9.9.9:8786"} 0.0' in text
        assert 'fleet_dask_workers{scheduler="tls://10.9.9.9:8786"} 3.0' in text
        metrics.DASK_CONNECTED.clear()
        metrics.DASK_WORKERS.clear()

    def test_healthz_is_503_degraded_below_the_worker_floor(self):
        assert self.request("/healthz").code == 200
        self.pool.workers = 0
        response = self.request("/healthz")
        body = self.assert_json_error(response, 503, "degraded")
        assert body["status"] == "degraded" and "min_workers" in body["message"]
        assert body["pool"]["workers"] == 0


# the slow app, the waiting line full ------------------------------------------------------------

class SlowAppFullLineTest(ContractTestCase):
    def get_app(self):
        self.pool = HeldPool()
        settings = load(env={"FLEET_SLOW_WORKERS": "1", "FLEET_SLOW_QUEUE_LIMIT": "0"})
        assert (settings.slow.workers, settings.slow.queue_limit) == (1, 0)
        return make_slow_app(Instance("slow", 1, settings), registry.load("services.slow.tasks"), self.pool)

    @gen_test(timeout=10)
    async def test_a_full_line_is_a_503_with_retry_after_while_the_slot_holder_still_succeeds(self):
        first = self.http_client.fetch(self.get_url("/slow/fib/25"), raise_error=False)
        await asyncio.wait_for(self.pool.started.wait(), 5)

        refused = await self.http_client.fetch(self.get_url("/slow/fib/24"), raise_error=False)
        body = self.assert_json_error(refused, 503, "overloaded")
        assert refused.headers["Retry-After"] == "1"
        assert "full" in body["message"]
        assert self.pool.calls == 1  # the refused job never reached the pool

        health = await self.health()
        assert (health["running"], health["waiting"], health["shed"]) == (1, 0, 1)

        self.pool.release.set()
        answered = await first
        assert answered.code == 200 and json.loads(answered.body)["result"] == 75025

        health = await self.health()
        assert (health["running"], health["waiting"]) == (0, 0)
        again = await self.http_client.fetch(self.get_url("/slow/fib/25"), raise_error=False)
        assert again.code == 200  # the slot came back

    @gen_test(timeout=10)
    async def test_a_job_still_running_at_the_drain_deadline_gets_503_shutting_down(self):
        # slow.drain_timeout > slow.job_timeout is enforced, so this is the safety net, not the rule.
        job = self.http_client.fetch(self.get_url("/slow/fib/25"), raise_error=False)
        await asyncio.wait_for(self.pool.started.wait(), 5)
        self._app.settings["on_drain_deadline"]()
        body = self.assert_json_error(await job, 503, "shutting_down")
        assert body["message"] and self.pool.kill_on_cancel  # its worker is killed, whatever the kill budget


class SlowAppPerClientTest(ContractTestCase):
    """One worker, two waiting places, at most one heavy request per client address."""

    def get_app(self):
        self.pool = HeldPool()
        settings = load(env={"FLEET_SLOW_WORKERS": "1", "FLEET_SLOW_QUEUE_LIMIT": "2", "FLEET_SLOW_MAX_PER_CLIENT": "1"})
        return make_slow_app(Instance("slow", 1, settings), registry.load("services.slow.tasks"), self.pool)

    def get_httpserver_options(self):
        return {"xheaders": True}  # as the instances run: the client is nginx's X-Real-IP

    def job(self, client: str, n: int):
        # Different arguments: identical requests in flight would share one job (coalesce.py).
        return self.http_client.fetch(self.get_url(f"/slow/fib/{n}"), headers={"X-Real-IP": client},
                                      raise_error=False)

    @gen_test(timeout=10)
    async def test_a_client_over_its_share_gets_429_while_others_are_still_admitted(self):
        first = self.job("10.0.0.1", 25)
        await asyncio.wait_for(self.pool.started.wait(), 5)
        refused = await self.job("10.0.0.1", 26)
        body = self.assert_json_error(refused, 429, "rate_limited")
        assert "at most 1" in body["message"] and refused.headers["Retry-After"] == "1"
        other = self.job("10.0.0.2", 27)  # another address waits in line, as usual

        async def other_waiting() -> dict | None:
            health = await self.health()
            return health if health["waiting"] == 1 else None

        health = await eventually(other_waiting, what="the other address's job waiting in line")
        assert (health["running"], health["waiting"], health["limited"]) == (1, 1, 1)
        self.pool.release.set()
        assert (await first).code == 200 and (await other).code == 200

    @gen_test(timeout=10)
    async def test_the_addresses_of_one_ipv6_64_share_one_client_s_share(self):
        # An IPv6 host is usually given a whole /64: one address each would be a share each.
        first = self.job("2001:db8:1:2::a", 25)
        await asyncio.wait_for(self.pool.started.wait(), 5)
        refused = await self.job("2001:db8:1:2:ffff::b", 26)
        self.assert_json_error(refused, 429, "rate_limited")
        other = self.job("2001:db8:1:3::a", 27)  # the next /64 is another client: it waits in line

        async def other_waiting() -> bool:
            return (await self.health())["waiting"] == 1

        await eventually(other_waiting, what="the other /64's job waiting in line")
        self.pool.release.set()
        assert (await first).code == 200 and (await other).code == 200


class SlowAppDeadlineTest(ContractTestCase):
    """One worker held busy, a 1 s job deadline: it counts from admission, the wait in line included."""

    def get_app(self):
        self.pool = HeldPool()
        settings = load(env={"FLEET_SLOW_WORKERS": "1", "FLEET_SLOW_QUEUE_LIMIT": "4",
                             "FLEET_SLOW_JOB_TIMEOUT": "1", "FLEET_SLOW_DRAIN_TIMEOUT": "2"})
        return make_slow_app(Instance("slow", 1, settings), registry.load("services.slow.tasks"), self.pool)

    @gen_test(timeout=10)
    async def test_a_job_admitted_while_its_instance_drains_is_answered_before_the_drain_gives_up(self):
        # nginx may still send a job down a connection it kept alive after the drain began: its
        # deadline must end before the drain's, or it would be cut off with 503 shutting_down.
        self._app.settings["drain_deadline"] = asyncio.get_running_loop().time() + 2.5
        job = self.http_client.fetch(self.get_url("/slow/fib/25"), raise_error=False)
        await asyncio.wait_for(self.pool.started.wait(), 5)
        # Its 1 s deadline would end 1.5 s before the drain's; DRAIN_MARGIN_SECONDS (2 s) ends it sooner.
        assert self.pool.timeouts[0] <= 2.5 - 2.0
        self.pool.release.set()
        assert (await job).code == 200

    @gen_test(timeout=10)
    async def test_a_job_still_waiting_at_its_deadline_is_answered_503_queue_timeout_and_never_runs(self):
        first = self.http_client.fetch(self.get_url("/slow/fib/25"), raise_error=False)
        await asyncio.wait_for(self.pool.started.wait(), 5)
        started = asyncio.get_running_loop().time()
        waiting = self.http_client.fetch(self.get_url("/slow/fib/24"), raise_error=False)
        late = await asyncio.wait_for(waiting, 3)  # on time, though the worker is still busy
        elapsed = asyncio.get_running_loop().time() - started
        body = self.assert_json_error(late, 503, "queue_timeout")
        assert 1 <= elapsed < 2, elapsed
        assert "never ran" in body["message"] and int(late.headers["Retry-After"]) >= 1
        assert self.pool.calls == 1  # it never reached the pool
        health = await self.health()
        assert (health["running"], health["waiting"]) == (1, 0)
        self.pool.release.set()
        assert (await first).code == 200

    @gen_test(timeout=10)
    async def test_a_job_that_waited_in_line_runs_only_what_is_left_of_its_deadline(self):
        first = self.http_client.fetch(self.get_url("/slow/fib/25"), raise_error=False)
        await asyncio.wait_for(self.pool.started.wait(), 5)
        second = self.http_client.fetch(self.get_url("/slow/fib/24"), raise_error=False)

        async def second_waiting() -> bool:
            return (await self.health())["waiting"] == 1

        await eventually(second_waiting, what="the second job waiting in line")
        await asyncio.sleep(0.3)  # the time it spends in line (not a synchronisation)
        self.pool.release.set()
        assert (await first).code == 200
        answered = await second
        assert answered.code == 200
        queued = json.loads(answered.body)["queued_ms"] / 1000
        assert queued >= 0.3 and 0.95 < self.pool.timeouts[0] <= 1  # it did not wait
        assert abs(self.pool.timeouts[1] - (1 - queued)) < 0.05, (self.pool.timeouts, queued)
