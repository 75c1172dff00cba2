"""Compute once, on real fleets: identical heavy requests in flight share one job (both backends),
and the answers of tasks with a cache_ttl come from nginx's cache, computed once across every slow
instance. Jobs are counted from the instances' own /metrics (fleet_slow_jobs_total)."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.common import metrics_reader
from tests.support.fleet import Fleet, make_fleet
from tests.support.waiting import wait_for

CONCURRENT = 50


def counted(fleet: Fleet, name: str, **labels: str) -> float:
    """The samples `name` with `labels` of every slow instance's /metrics, added up."""
    return sum(metrics_reader.total(fleet.get("/metrics", port=port).body.decode(), name, **labels)
               for port in fleet.slow_ports)


def jobs(fleet: Fleet, task: str, outcome: str = "ok") -> float:
    """Jobs of `task` with `outcome` run by the fleet's slow instances, all of them together."""
    return counted(fleet, "fleet_slow_jobs_total", task=task, outcome=outcome)


def joined(fleet: Fleet, task: str) -> float:
    """Requests for `task` that joined a job another request had started."""
    return counted(fleet, "fleet_slow_coalesced_total", task=task)


def departed(fleet: Fleet, task: str) -> float:
    """Requests for `task` whose client went away before the answer (499 in the instance's metrics)."""
    return counted(fleet, "fleet_http_request_duration_seconds_count", route=f"/slow/{task}", status="499")


def running(fleet: Fleet) -> int:
    """Jobs holding a running slot on the fleet's slow instances."""
    return sum(fleet.slow_health(n)["running"] for n in range(1, len(fleet.slow_ports) + 1))


def at_once(fleet: Fleet, path: str, count: int = CONCURRENT) -> list:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: fleet.get(path, timeout=30), range(count)))


def hanging_up(fleet: Fleet, path: str) -> socket.socket:
    """A client that sent its request and can hang up (close the socket)."""
    sock = socket.create_connection(("127.0.0.1", fleet.edge_port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return sock


# in-flight coalescing, both backends ------------------------------------------------------------------

def test_fifty_identical_requests_run_one_job_and_all_get_its_answer(slow_fleet: Fleet):
    before, before_joined = jobs(slow_fleet, "shared_spin"), joined(slow_fleet, "shared_spin")
    answers = at_once(slow_fleet, "/slow/shared_spin/1")
    assert [a.status for a in answers] == [200] * CONCURRENT, {a.body for a in answers}
    assert len({a.json()["result"]["token"] for a in answers}) == 1
    assert jobs(slow_fleet, "shared_spin") - before == 1
    assert joined(slow_fleet, "shared_spin") - before_joined == CONCURRENT - 1  # the operator sees it
    assert not any("x-shared-job" in a.headers for a in answers)  # the clients do not
    assert len({a.headers["x-request-id"] for a in answers}) == CONCURRENT


def test_two_clients_hashing_the_same_password_at_once_each_get_their_own_job(slow_fleet: Fleet):
    # Both wait in line behind two spinning jobs, so both are in flight together: a shared job
    # would tell the second client that someone is hashing that exact password right now.
    before, before_joined = jobs(slow_fleet, "pbkdf2"), joined(slow_fleet, "pbkdf2")
    body = b'{"password": "correct horse", "salt": "s", "rounds": 1000}'
    with ThreadPoolExecutor(4) as pool:
        spins = [pool.submit(slow_fleet.get, "/slow/spin/1.5") for _ in range(2)]
        wait_for(lambda: running(slow_fleet) == 2, what="both workers busy")
        hashes = [pool.submit(slow_fleet.request, "POST", "/slow/pbkdf2", body=body, source=f"127.0.0.{n}")
                  for n in (2, 3)]
        wait_for(lambda: slow_fleet.slow_health()["waiting"] + joined(slow_fleet, "pbkdf2") - before_joined == 2,
                 what="both clients' requests in line")
        answers = [h.result() for h in hashes]
        assert [s.result().status for s in spins] == [200, 200]
    assert [a.status for a in answers] == [200, 200] and answers[0].json()["result"] == answers[1].json()["result"]
    assert joined(slow_fleet, "pbkdf2") == before_joined
    assert jobs(slow_fleet, "pbkdf2") - before == 2
    assert not any("x-shared-job" in a.headers for a in answers)


def test_the_first_client_leaving_does_not_cancel_the_job_of_the_others(slow_fleet: Fleet):
    before_ok, before_cancelled = jobs(slow_fleet, "shared_spin"), jobs(slow_fleet, "shared_spin", "cancelled")
    before_joined, before_departed = joined(slow_fleet, "shared_spin"), departed(slow_fleet, "shared_spin")
    first = hanging_up(slow_fleet, "/slow/shared_spin/1.25")
    wait_for(lambda: running(slow_fleet) == 1, what="the first client's job running")
    with ThreadPoolExecutor(10) as pool:
        others = [pool.submit(slow_fleet.get, "/slow/shared_spin/1.25") for _ in range(10)]
        wait_for(lambda: joined(slow_fleet, "shared_spin") == before_joined + 10, what="the others joined its job")
        first.close()
        wait_for(lambda: departed(slow_fleet, "shared_spin") == before_departed + 1, what="the first client gone")
        answers = [o.result() for o in others]
    assert [a.status for a in answers] == [200] * 10
    assert len({a.json()["result"]["token"] for a in answers}) == 1
    assert jobs(slow_fleet, "shared_spin") - before_ok == 1
    assert jobs(slow_fleet, "shared_spin", "cancelled") == before_cancelled


def test_every_client_leaving_stops_the_shared_job(slow_fleet: Fleet):
    before = jobs(slow_fleet, "shared_spin", "cancelled")
    before_joined, before_departed = joined(slow_fleet, "shared_spin"), departed(slow_fleet, "shared_spin")
    clients = [hanging_up(slow_fleet, "/slow/shared_spin/2.5") for _ in range(5)]
    wait_for(lambda: joined(slow_fleet, "shared_spin") == before_joined + 4, what="five clients sharing one job")
    for c in clients[:4]:
        c.close()
    wait_for(lambda: departed(slow_fleet, "shared_spin") == before_departed + 4, what="four of them gone")
    assert jobs(slow_fleet, "shared_spin", "cancelled") == before  # one is still there
    clients[4].close()
    wait_for(lambda: jobs(slow_fleet, "shared_spin", "cancelled") == before + 1, 5)


def test_a_task_that_raises_gives_every_waiter_the_500(slow_fleet: Fleet):
    before = jobs(slow_fleet, "shared_raise", "error")
    answers = at_once(slow_fleet, "/slow/shared_raise/0.5", 20)
    for a in answers:
        assert a.status == 500 and a.json()["error"] == "job_failed", a.body
        assert a.json()["message"] == "ValueError: failed after 0.5 s"
    assert jobs(slow_fleet, "shared_raise", "error") - before == 1


# the edge cache -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_slow(tmp_path_factory):
    """Two slow instances: the cache lock must make one computation across both."""
    f = make_fleet(tmp_path_factory.mktemp("cache"), slow=2, FLEET_SLOW_INSTANCES="2")
    f.command("up")
    yield f
    f.command("stop")


def test_fifty_cold_requests_over_two_instances_run_once_then_hit_the_cache(two_slow: Fleet):
    answers = at_once(two_slow, "/slow/cached_spin/1")
    assert [a.status for a in answers] == [200] * CONCURRENT, {a.body for a in answers}
    assert len({a.json()["result"]["token"] for a in answers}) == 1
    assert jobs(two_slow, "cached_spin") == 1
    assert len({a.headers["x-request-id"] for a in answers}) == CONCURRENT  # never replayed
    later = [two_slow.get("/slow/cached_spin/1") for _ in range(5)]
    assert {a.headers["x-cache"] for a in later} == {"HIT"}
    assert {a.headers["x-served-by"] for a in later} == {"edge-cache"}
    assert jobs(two_slow, "cached_spin") == 1  # no job at all


def test_an_expired_entry_is_refreshed_once_while_the_stale_one_is_served(two_slow: Fleet):
    first = two_slow.get("/slow/cached_spin/0.5")
    before = jobs(two_slow, "cached_spin")
    # Past the task's cache_ttl of 2 s by nginx's clock, which counts whole seconds: an entry stored
    # at 10.9 s is fresh until 12.999 s, so a wait of 2.5 s may still find it fresh.
    time.sleep(3.2)
    answers = at_once(two_slow, "/slow/cached_spin/0.5", 10)
    assert {a.status for a in answers} == {200}
    assert {a.json()["result"]["token"] for a in answers} == {first.json()["result"]["token"]}  # the stale one
    assert {a.headers["x-cache"] for a in answers} <= {"STALE", "UPDATING"}
    assert max(a.elapsed for a in answers) < 0.4  # nobody waited for the refresh
    wait_for(lambda: jobs(two_slow, "cached_spin") == before + 1, 5)
    time.sleep(0.5)  # a second refresh, had one started beside the first, would have run (0.5 s) by now
    assert jobs(two_slow, "cached_spin") == before + 1  # refreshed once
    assert two_slow.get("/slow/cached_spin/0.5").json()["result"]["token"] != first.json()["result"]["token"]


def test_an_error_is_never_cached(two_slow: Fleet):
    flag = two_slow.run_dir / "break-cached_flaky"
    flag.touch()
    failed = two_slow.get("/slow/cached_flaky/0")
    assert failed.status == 500 and failed.json()["error"] == "job_failed"
    flag.unlink()
    fresh = two_slow.get("/slow/cached_flaky/0")
    assert fresh.status == 200 and fresh.headers["x-cache"] == "MISS"
    assert two_slow.get("/slow/cached_flaky/0").headers["x-cache"] == "HIT"


def test_another_spelling_of_a_call_is_redirected_to_its_canonical_url(two_slow: Fleet):
    moved = two_slow.get("/slow/cached_spin/0.50")
    assert moved.status == 301 and moved.headers["location"] == "/slow/cached_spin/0.5"
    assert "x-cache" in moved.headers and moved.headers["x-cache"] != "HIT"
    assert two_slow.get("/slow/cached_spin/0.50").status == 301  # never served from the cache


def test_uncached_tasks_never_go_through_the_cache(two_slow: Fleet):
    answer = two_slow.get("/slow/fib/10")
    assert answer.status == 200 and "x-cache" not in answer.headers


def test_status_shows_shared_jobs_and_cache_answers_and_a_restart_empties_the_cache(two_slow: Fleet):
    at_once(two_slow, "/slow/cached_spin/0.25", 5)
    assert two_slow.get("/slow/cached_spin/0.25").headers["x-cache"] == "HIT"
    status = two_slow.command("status").stdout
    assert "compute once:" in status and "edge cache, latest requests:" in status and "HIT" in status, status
    from deploy.render import CACHE_MARK, edge_cache_dir, edge_cache_entries
    from services.common.settings import load

    cache = edge_cache_entries(load(env=two_slow.env))
    assert any(cache.rglob("*")), cache  # the entries nginx stored
    two_slow.command("stop")
    assert not cache.exists()  # edge.cache_keep = false
    assert (edge_cache_dir(load(env=two_slow.env)) / CACHE_MARK).is_file()  # the fleet's: emptied, kept
    two_slow.command("up")
    assert two_slow.get("/slow/cached_spin/0.25").headers["x-cache"] == "MISS"
