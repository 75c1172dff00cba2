"""The job stores: SqliteStore (services/slow/job_store.py, a file in a temp dir) and RedisStore
(job_store_redis.py, a real redis-server, tests/support/redis_server.py) pass the same tests: the
state machine, the events and their replay, the TTL sweep and size bound, writers in two processes
at once, lost owners. Then what is each one's own: SQLite's result files, Redis' native TTLs, its
durability across a kill -9 and its answer when it is down."""

from __future__ import annotations

import asyncio
import functools
import itertools
import multiprocessing
import os
import socket
import time
from pathlib import Path

import pytest

from services.slow import job_store
from services.slow.job_store import (CANCELLED, CANCELLING, EXPIRED, FAILED, QUEUED, RUNNING, SUCCEEDED,
                                     ActiveLimit, AsyncStore, NewJob, SqliteStore, StoreUnavailable, new_id)
from services.slow.job_store_redis import EXPIRE_GRACE, RedisStore
from tests.support.redis_server import RedisServer


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> RedisServer:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


_prefixes = itertools.count()


class Stores:
    """Stores of one kind that share their data (as a host's slow instances share theirs): `open()`
    another one, as another process would."""

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest):
        self.kind = kind
        self.path = tmp_path / "store.sqlite"
        self.server = request.getfixturevalue("redis_server") if kind == "redis" else None
        self.prefix = f"t{os.getpid()}-{next(_prefixes)}"  # one server for the module: each test its own keys
        self.opened: list = []

    def open(self, **kwargs):
        if self.kind == "sqlite":
            s = SqliteStore(self.path, **kwargs)
        else:
            kwargs.pop("busy_timeout", None)
            s = RedisStore(self.server.url, prefix=self.prefix, password=self.server.password, **kwargs)
        self.opened.append(s)
        return s

    def opener(self):
        """How another process opens one (a picklable callable)."""
        if self.kind == "sqlite":
            return functools.partial(SqliteStore, str(self.path))
        return functools.partial(RedisStore, self.server.url, prefix=self.prefix, password=self.server.password)

    def close(self) -> None:
        for s in self.opened:
            s.close()


@pytest.fixture(params=["sqlite", "redis"])
def stores(request, tmp_path: Path) -> Stores:
    made = Stores(request.param, tmp_path, request)
    yield made
    made.close()


@pytest.fixture
def store(stores: Stores, clock: Clock):
    return stores.open(ttl=60, max_records=1000, clock=clock)


def submit(store, client: str = "10.0.0.1", **kwargs) -> str:
    job, created = store.create(NewJob(id=new_id(), task="report", client=client, **kwargs))
    assert created
    return job.id


def record_count(store) -> int:
    """Every record the store holds, tombstones included."""
    if isinstance(store, SqliteStore):
        return store.db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    return store.record_count()


def test_a_created_job_is_committed_queued_and_another_connection_reads_it(store, stores):
    job_id = submit(store, args={"seconds": 2})
    other = stores.open()
    job = other.get(job_id)
    assert (job.state, job.seq, job.task, job.args) == (QUEUED, 1, "report", {"seconds": 2})
    assert [(e.seq, e.kind, e.data) for e in other.events(job_id)] == [(1, "state", {"state": QUEUED})]


def test_job_ids_carry_128_random_bits():
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 22 and i.replace("-", "").replace("_", "").isalnum() for i in ids)  # 16 bytes, base64url


def test_an_unknown_id_has_no_record(store):
    assert store.get(new_id()) is None
    assert store.cancel(new_id()) is None


def test_a_job_runs_reports_progress_and_succeeds_each_step_one_numbered_event(store, clock):
    job_id = submit(store)
    assert store.progress(job_id, 1, 10, "too early") is None  # not running yet
    assert store.start(job_id, "slow-02").owner == "slow-02"
    assert store.progress(job_id, 3, 10, "step 3") == 3
    clock.now += 5
    done = store.finish(job_id, SUCCEEDED, result=b'{"ok": 1}')
    assert (done.state, done.result, done.done, done.total, done.message) == (SUCCEEDED, b'{"ok": 1}', 3, 10, "step 3")
    assert done.expires == clock.now + 60
    assert [(e.seq, e.kind) for e in store.events(job_id)] == [(1, "state"), (2, "state"), (3, "progress"), (4, "end")]


def test_a_terminal_state_is_final(store):
    job_id = submit(store)
    store.start(job_id, "runner-a.1")
    store.finish(job_id, FAILED, error={"error": "job_failed", "message": "boom"})
    assert store.finish(job_id, SUCCEEDED, result=b"1") is None
    assert store.start(job_id, "runner-a.1") is None
    assert store.progress(job_id, 1, 1, "") is None
    assert store.cancel(job_id).state == FAILED
    assert store.get(job_id).error == {"error": "job_failed", "message": "boom"}


def test_cancelling_a_queued_job_ends_it_at_once_and_it_never_starts(store):
    job_id = submit(store)
    assert store.cancel(job_id).state == CANCELLED
    assert store.start(job_id, "runner-a.1") is None
    assert store.get(job_id).error["error"] == "cancelled"


def test_cancelling_a_running_job_marks_it_and_it_ends_cancelled_whatever_it_returned(store):
    job_id = submit(store)
    store.start(job_id, "runner-a.1")
    assert store.cancel(job_id).state == CANCELLING
    assert store.cancel(job_id).state == CANCELLING  # idempotent: no second event
    assert store.progress(job_id, 5, 10, "") is None
    ended = store.finish(job_id, SUCCEEDED, result=b"1")
    assert (ended.state, ended.result) == (CANCELLED, None)
    assert [e.data.get("state") for e in store.events(job_id)] == [QUEUED, RUNNING, CANCELLING, CANCELLED]


def test_events_after_a_sequence_number_are_exactly_the_ones_missed(store):
    job_id = submit(store)
    store.start(job_id, "runner-a.1")
    for step in range(1, 6):
        store.progress(job_id, step, 5, f"step {step}")
    assert [e.seq for e in store.events(job_id, after=4)] == [5, 6, 7]
    assert store.events(job_id, after=7) == []


def test_changes_name_the_jobs_another_process_wrote_to_since_a_position(store, stores):
    a, b = submit(store), submit(store)
    seen = store.last_position()
    other = stores.open()
    other.start(b, "slow-02")
    other.progress(b, 1, 2, "")
    last, jobs = store.changes(seen)
    assert jobs == {b: 3} and a not in jobs and last > seen
    assert store.changes(last) == (last, {})


def test_an_idempotency_key_reused_by_its_client_finds_the_first_job(store):
    first = submit(store, idempotency_key="k1", fingerprint="f1")
    again, created = store.create(NewJob(id=new_id(), task="report", client="10.0.0.1",
                                         idempotency_key="k1", fingerprint="f2"))
    assert (again.id, again.fingerprint, created) == (first, "f1", False)
    other_client = submit(store, client="10.0.0.2", idempotency_key="k1")
    assert other_client != first


def test_active_jobs_are_counted_per_client_and_in_all(store):
    a1, a2, b1 = submit(store, "a"), submit(store, "a"), submit(store, "b")
    store.start(a2, "slow-01")
    store.cancel(b1)
    assert (store.count_active("a"), store.count_active("b"), store.count_active()) == (2, 0, 2)


def test_a_client_at_its_active_limit_or_a_host_at_its_own_gets_no_new_job(store):
    for _ in range(2):
        submit(store, "a")
    with pytest.raises(ActiveLimit) as refused:
        store.create(NewJob(id=new_id(), task="report", client="a"), max_per_client=2)
    assert (refused.value.whose, refused.value.count) == ("client", 2)
    with pytest.raises(ActiveLimit) as refused:
        store.create(NewJob(id=new_id(), task="report", client="b"), max_per_client=2, max_active=2)
    assert refused.value.whose == "all"
    assert store.count_active() == 2  # nothing was created
    submit(store, "b")  # without limits


def test_a_finished_record_expires_after_its_ttl_to_a_tombstone_then_goes(store, clock):
    job_id = submit(store)
    store.start(job_id, "runner-a.1")
    store.finish(job_id, SUCCEEDED, result=b"1" * 1000)
    running = submit(store)
    store.start(running, "slow-01")
    clock.now += 59
    assert store.sweep() == {"expired": 0, "removed": 0}
    clock.now += 1
    assert store.sweep() == {"expired": 1, "removed": 0}
    tomb = store.get(job_id)
    assert (tomb.state, tomb.result, store.events(job_id)) == (EXPIRED, None, [])
    assert store.cancel(job_id).state == EXPIRED
    clock.now += 60
    assert store.sweep() == {"expired": 0, "removed": 1}
    assert store.get(job_id) is None
    assert store.get(running).state == RUNNING  # active jobs never expire


def finished(store: SqliteStore, count: int, result: bytes = b"1") -> list[str]:
    ids = [submit(store) for _ in range(count)]
    for job_id in ids:
        store.start(job_id, "runner-a.1")
        store.finish(job_id, SUCCEEDED, result=result)
    return ids


def test_a_sweep_call_expires_and_removes_at_most_its_limit_and_the_next_ones_the_rest(store, clock):
    finished(store, 5)
    clock.now += 60
    assert [store.sweep(limit=2)["expired"] for _ in range(4)] == [2, 2, 1, 0]
    clock.now += 60
    assert [store.sweep(limit=3)["removed"] for _ in range(3)] == [3, 2, 0]
    assert not any(store.count_by_state().values())


def test_the_wal_is_cut_back_after_the_sweep_of_many_large_results(tmp_path, clock, monkeypatch):
    monkeypatch.setattr(job_store, "WAL_SIZE_LIMIT", 1 << 20)
    store = SqliteStore(tmp_path / "store.sqlite", ttl=60, clock=clock)
    finished(store, 40, result=b'"' + b"x" * 100_000 + b'"')
    clock.now += 60
    assert store.sweep(limit=40)["expired"] == 40  # one transaction rewrites 4 MB of pages (SECURE_DELETE)
    finished(store, 1)  # a write after the checkpoint (at that commit) starts the WAL again, cut to its limit
    assert (tmp_path / "store.sqlite-wal").stat().st_size <= 1 << 20
    store.close()


def test_past_max_records_the_oldest_finished_records_expire_first(stores, clock):
    store = stores.open(ttl=3600, max_records=5, clock=clock)
    ids = []
    for _ in range(8):
        ids.append(submit(store))
        store.start(ids[-1], "slow-01")
        store.finish(ids[-1], SUCCEEDED, result=b"1")
        clock.now += 1
    active = submit(store)
    store.sweep()
    states = [store.get(i).state if store.get(i) else None for i in ids]
    assert states == [None, None, None, None, SUCCEEDED, SUCCEEDED, SUCCEEDED, SUCCEEDED]  # 9 records, 5 kept
    assert store.get(active).state == QUEUED
    assert record_count(store) <= 5


def _write_jobs(open_store, ids_file: str, owner: str, count: int) -> None:
    store = open_store()
    with open(ids_file, "w") as ids:
        for _ in range(count):
            job, _ = store.create(NewJob(id=new_id(), task="report", client=owner))
            ids.write(job.id + "\n")
            store.start(job.id, owner)
            for step in range(3):
                store.progress(job.id, step, 3, "")
            store.finish(job.id, SUCCEEDED, result=b"1")
    store.close()


def test_two_processes_writing_at_once_lose_and_mix_up_nothing(stores, tmp_path):
    stores.open()  # the schema, once
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_write_jobs, args=(stores.opener(), str(tmp_path / f"slow-0{n}"), f"slow-0{n}", 100))
               for n in (1, 2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    store = stores.open()
    for owner in ("slow-01", "slow-02"):
        ids = (tmp_path / owner).read_text().split()
        assert len(ids) == 100
        for job_id in ids:
            assert [e.seq for e in store.events(job_id)] == [1, 2, 3, 4, 5, 6]
            job = store.get(job_id)
            assert (job.state, job.owner) == (SUCCEEDED, owner)


def test_the_async_store_makes_the_calls_off_the_event_loop(store):
    async def main():
        stores = AsyncStore(store)
        job, _ = await stores.create(NewJob(id=new_id(), task="report", client="c"))
        return await stores.get(job.id)

    assert asyncio.run(main()).state == QUEUED


def test_the_running_jobs_of_a_silent_owner_are_reaped_and_a_cancel_made_before_holds(store, clock):
    queued, running, cancelling, done, alive = (submit(store) for _ in range(5))
    for job_id in (running, cancelling, done):
        store.start(job_id, "runner-a.1")
    store.start(alive, "runner-b.2")
    store.cancel(cancelling)
    store.finish(done, SUCCEEDED, result=b"1")
    store.beat("runner-a.1")  # the runner of three of them
    store.beat("runner-b.2")
    clock.now += 9
    store.beat("runner-b.2")
    assert store.reap(lost_after=10) == []  # runner-a.1 beat 9 s ago: not lost yet
    clock.now += 2
    reaped = {job.id: job for job in store.reap(lost_after=10)}
    assert set(reaped) == {running, cancelling}  # a queued job has no owner: it waits for any runner
    assert reaped[running].state == FAILED and reaped[running].error["error"] == "worker_lost"
    assert reaped[running].error["retryable"] is True and reaped[running].kwargs is None
    assert reaped[cancelling].state == CANCELLED
    assert store.events(running)[-1].kind == "end"
    assert store.get(queued).state == QUEUED and store.get(alive).state == RUNNING
    assert store.get(done).state == SUCCEEDED


def test_a_claim_starts_its_owner_s_lease_a_job_process_beats_only_once_it_is_up(store, clock):
    job_id = submit(store)
    store.claim("web1.jobs/1", ["report"])
    clock.now += 9
    assert store.reap(lost_after=10) == []  # within the lease the claim began
    clock.now += 2
    assert [job.id for job in store.reap(lost_after=10)] == [job_id]


def test_a_job_whose_owner_never_beat_is_reaped_too(store):
    job_id = submit(store)
    store.start(job_id, "runner-a.1")  # its runner died before its first beat
    assert [job.id for job in store.reap(lost_after=10)] == [job_id]


def test_a_claim_takes_the_oldest_job_of_the_client_with_the_fewest_running_and_only_tasks_served(store, clock):
    a1, a2, a3 = (submit(store, client="a") for _ in range(3))
    clock.now += 1
    b1 = submit(store, client="b")
    other, _ = store.create(NewJob(id=new_id(), task="elsewhere", client="c"))
    [first] = store.claim("runner-a.1", ["report"])
    assert (first.id, first.state, first.owner, first.attempt) == (a1, RUNNING, "runner-a.1", 1)
    assert store.events(a1)[-1].data == {"state": "running"}
    # a holds one running job, b none: b's job goes first though a's two are older
    assert [j.id for j in store.claim("runner-b.2", ["report"], limit=2)] == [b1, a2]
    assert [j.id for j in store.claim("runner-a.1", ["report"], limit=5)] == [a3]
    assert store.claim("runner-a.1", ["report"]) == [] and store.get(other.id).state == QUEUED
    assert store.claim("runner-a.1", []) == []


def test_a_claimed_job_is_claimed_once_and_a_cancelled_one_never(store):
    job_id, cancelled = submit(store), submit(store)
    store.cancel(cancelled)
    [claimed] = store.claim("runner-a.1", ["report"], limit=5)
    assert claimed.id == job_id and store.claim("runner-b.2", ["report"], limit=5) == []
    assert store.start(job_id, "runner-b.2") is None


def test_a_job_identical_to_a_running_one_is_never_claimed_and_joins_that_run(store):
    first, twin, other = (submit(store, key=key) for key in ("k1", "k1", "k2"))
    plain = submit(store)
    [claimed] = store.claim("runner-a.1", ["report"])
    assert claimed.id == first
    # its twin is left for the run of runner-a.1; another key and a job without one are claimed
    assert {j.id for j in store.claim("runner-b.2", ["report"], limit=5)} == {other, plain}
    [joined] = store.join("runner-a.1", "k1", 10)
    assert (joined.id, joined.state, joined.owner) == (twin, RUNNING, "runner-a.1")
    assert store.join("runner-a.1", "k1", 10) == []
    store.finish(first, SUCCEEDED, result=b"1")
    store.finish(twin, SUCCEEDED, result=b"1")
    again = submit(store, key="k1")  # nothing of k1 runs any more: claimed as any other
    assert [j.id for j in store.claim("runner-b.2", ["report"])] == [again]


def test_a_large_result_is_kept_apart_from_its_record_and_goes_with_it(stores, clock):
    """SQLite keeps it as a file beside the store (the edge sends it); Redis under a key of its own."""
    store = stores.open(ttl=60, clock=clock, inline_result_bytes=10)
    small, large = submit(store), submit(store)
    big = b'"' + b"x" * 100 + b'"'
    for job_id, result in ((small, b'"0123"'), (large, big)):
        store.start(job_id, "runner-a.1")
        store.finish(job_id, SUCCEEDED, result=result)
    assert (store.get(small).result, store.get(small).result_file) == (b'"0123"', 0)
    kept = store.get(large)
    assert (kept.result, kept.result_file, kept.result_bytes) == (None, 1, 102)
    assert (store.result(large), store.result(small)) == (big, b'"0123"')
    if stores.kind == "sqlite":
        assert store.result_path(large).read_bytes() == big
    clock.now += 60
    store.sweep()
    assert store.get(large).state == EXPIRED and store.result(large) is None
    if stores.kind == "sqlite":
        assert not store.result_path(large).exists()


def test_a_result_file_no_record_names_is_swept_after_a_minute(tmp_path):
    """SQLite's own: a file written before its record's commit. (Redis writes both in one script.)"""
    store = SqliteStore(tmp_path / "store.sqlite")
    stray = store.result_path(new_id())
    stray.write_bytes(b"1")  # a finish that wrote its file and never committed (its instance was killed)
    store.sweep()
    assert stray.exists()  # it may be a finish under way
    old = time.time() - 120
    os.utime(stray, (old, old))
    store.sweep()
    assert not stray.exists()
    store.close()


def test_a_lost_job_with_retries_left_is_queued_again_for_any_runner_then_fails_when_none_are_left(store, clock):
    job, _ = store.create(NewJob(id=new_id(), task="report", client="c", kwargs={"seconds": 4.0}, retries=1))
    store.claim("runner-a.1", ["report"])
    clock.now += 11  # runner-a.1 silent for a lease since its claim
    again = store.reap(lost_after=10)
    assert [(j.id, j.state, j.owner, j.attempt, j.kwargs) for j in again] == [
        (job.id, QUEUED, "", 2, {"seconds": 4.0})]
    assert store.events(job.id)[-1].data == {"state": "queued", "attempt": 2, "after": "worker_lost"}
    [claimed] = store.claim("runner-b.2", ["report"])  # another runner runs it, and is lost too
    assert (claimed.id, claimed.attempt) == (job.id, 2)
    clock.now += 11
    lost = store.reap(lost_after=10)
    assert [(j.state, j.error["error"]) for j in lost] == [(FAILED, "worker_lost")]


def test_a_run_taken_for_lost_while_it_was_only_slow_cannot_write_to_the_job_s_next_attempt(store):
    job, _ = store.create(NewJob(id=new_id(), task="report", client="c", kwargs={"seconds": 4.0}, retries=1))
    store.start(job.id, "runner-a.1")
    store.reap(lost_after=10)  # runner-a.1 went silent: attempt 2, for runner-b.2
    store.claim("runner-b.2", ["report"])
    # runner-a.1 wakes up and reports, then ends, as attempt 1: neither lands.
    assert store.progress(job.id, 3, 4, "late", attempt=1) is None
    assert store.finish(job.id, SUCCEEDED, result=b'"stale"', attempt=1) is None
    assert (store.get(job.id).state, store.get(job.id).done) == (RUNNING, None)
    # Attempt 2's own writes do.
    assert store.progress(job.id, 1, 4, "section 1", attempt=2) is not None
    ended = store.finish(job.id, SUCCEEDED, result=b'"fresh"', attempt=2)
    assert (ended.state, ended.result, ended.attempt) == (SUCCEEDED, b'"fresh"', 2)


def test_a_lost_job_of_a_task_without_retries_is_never_queued_again(store):
    job_id = submit(store, kwargs={"seconds": 4.0})  # retries = 0
    store.start(job_id, "runner-a.1")
    assert [j.state for j in store.reap(lost_after=10)] == [FAILED]
    assert store.get(job_id).kwargs is None  # an ended job's arguments are not kept


def test_records_are_counted_by_state_through_every_transition(store, clock):
    queued, running, cancelling, done = (submit(store) for _ in range(4))
    for job_id in (running, cancelling, done):
        store.start(job_id, "runner-a.1")
    store.cancel(cancelling)
    store.finish(done, SUCCEEDED, result=b"1")
    gone = submit(store)
    store.cancel(gone)
    counts = store.count_by_state()
    assert {k: v for k, v in counts.items() if v} == {QUEUED: 1, RUNNING: 1, CANCELLING: 1, SUCCEEDED: 1, CANCELLED: 1}
    clock.now += 60
    store.sweep()
    assert {k: v for k, v in store.count_by_state().items() if v} == {QUEUED: 1, RUNNING: 1, CANCELLING: 1, EXPIRED: 2}
    clock.now += 60
    store.sweep()
    assert {k: v for k, v in store.count_by_state().items() if v} == {QUEUED: 1, RUNNING: 1, CANCELLING: 1}


# Redis' own ---------------------------------------------------------------------------------------

@pytest.fixture
def redis_store(redis_server, clock) -> RedisStore:
    s = RedisStore(redis_server.url, prefix=f"own{next(_prefixes)}", password=redis_server.password, ttl=60,
                   clock=clock, inline_result_bytes=10)
    yield s
    s.close()


def test_a_finished_jobs_keys_carry_native_ttls_so_redis_drops_them_even_unswept(redis_store, clock):
    job_id = submit(redis_store, idempotency_key="k", fingerprint="f")
    keys = {name: f"{redis_store.prefix}:{name}:{job_id}" for name in ("job", "events", "result")}
    idem = f"{redis_store.prefix}:idem:8:10.0.0.1:k"
    redis_store.start(job_id, "runner-a.1")
    assert redis_store.db.ttl(keys["job"]) == -1 and redis_store.db.ttl(keys["events"]) == -1  # active: kept
    redis_store.finish(job_id, SUCCEEDED, result=b'"' + b"x" * 100 + b'"')
    record, data = 2 * 60 + EXPIRE_GRACE, 60 + EXPIRE_GRACE  # its tombstone's time too / its TTL's
    ttls = {name: redis_store.db.ttl(key) for name, key in keys.items()}
    assert record - 2 <= ttls["job"] <= record and record - 2 <= redis_store.db.ttl(idem) <= record
    assert data - 2 <= ttls["events"] <= data and data - 2 <= ttls["result"] <= data
    clock.now += 60
    redis_store.sweep()  # a tombstone: its events and result gone, the record kept for a TTL more
    assert redis_store.db.exists(keys["events"], keys["result"]) == 0
    assert data - 2 <= redis_store.db.ttl(keys["job"]) <= data


def test_a_create_whose_answer_was_lost_and_is_sent_again_is_the_same_job_once(redis_store):
    job = NewJob(id=new_id(), task="report", client="c")
    first, created = redis_store.create(job)
    again, created_again = redis_store.create(job, max_per_client=1)  # the client's limit is its own job
    assert (created, created_again, again.id, again.seq) == (True, True, first.id, 1)
    assert redis_store.count_active("c") == 1 and len(redis_store.events(job.id)) == 1


def test_an_acknowledged_create_survives_a_kill_9_of_the_store_and_not_without_its_log(tmp_path):
    for appendonly in (True, False):
        (tmp_path / str(appendonly)).mkdir()
        server = RedisServer(tmp_path / str(appendonly), appendonly=appendonly).start()
        try:
            store = RedisStore(server.url, password=server.password)
            job_id = submit(store)
            server.kill()
            server.start()
            found = store.get(job_id)
            store.close()
        finally:
            server.stop()
        if appendonly:
            assert found is not None and found.state == QUEUED
        else:  # the negative control: without the append-only log, Redis forgets it
            assert found is None


def test_a_store_that_is_down_or_never_answers_raises_store_unavailable_and_serves_again_when_back(tmp_path):
    server = RedisServer(tmp_path).start()
    store = RedisStore(server.url, password=server.password, timeout=0.2, pause=0)
    job_id = submit(store)
    server.stop()
    with pytest.raises(StoreUnavailable):
        store.get(job_id)
    with pytest.raises(StoreUnavailable):
        submit(store)
    # A listener that accepts and never answers (a store cut off mid-way): the socket timeout ends the call.
    with socket.create_server(("127.0.0.1", server.port)):
        with pytest.raises(StoreUnavailable, match="Timeout"):
            store.get(job_id)
    server.start()
    assert store.get(job_id).state == QUEUED  # the same store object: it reconnects by itself
    store.close()
    server.stop()


def test_after_a_fault_calls_fail_at_once_without_asking_until_the_pause_ends(tmp_path):
    server = RedisServer(tmp_path).start()
    now = Clock()
    store = RedisStore(server.url, password=server.password, timeout=0.2, pause=1.0, monotonic=now)
    job_id = submit(store)
    server.stop()
    with pytest.raises(StoreUnavailable, match="ConnectionError"):
        store.get(job_id)
    server.start()
    with pytest.raises(StoreUnavailable, match="not asked again yet"):  # back, but not asked before the pause ends
        store.get(job_id)
    now.now += 1.0
    assert store.get(job_id).state == QUEUED
    store.close()
    server.stop()


def test_a_full_store_refuses_new_jobs_and_its_sweep_still_frees_it(tmp_path, clock):
    server = RedisServer(tmp_path, maxmemory_mb=2).start()  # maxmemory with nothing evicted, as the fleet's
    store = RedisStore(server.url, password=server.password, ttl=60, clock=clock, pause=0)
    done = []
    with pytest.raises(StoreUnavailable, match="OutOfMemory"):
        for _ in range(10_000):  # 100 kB results until it is full
            done.append(submit(store))
            store.start(done[-1], "slow-01")
            store.finish(done[-1], SUCCEEDED, result=b'"' + b"x" * 100_000 + b'"')
    assert store.get(done[0]).state == SUCCEEDED  # nothing was evicted to make room
    clock.now += 60
    assert store.sweep()["expired"] >= len(done) - 1  # it runs though the store is full, and frees it
    assert store.get(submit(store)).state == QUEUED
    store.close()
    server.stop()


def test_the_tallies_count_every_start_and_every_end_by_state_and_error_and_outlive_the_records(store, stores, clock):
    succeeded, failed, cancelled_queued, cancelled_running, lost = (submit(store) for _ in range(5))
    for job_id in (succeeded, failed, cancelled_running, lost):
        store.start(job_id, "runner-a.1")
    store.finish(succeeded, SUCCEEDED, result=b"1")
    store.finish(failed, FAILED, error={"error": "job_failed", "status": 500})
    store.cancel(cancelled_queued)  # queued: ended at once, never started
    store.cancel(cancelled_running)
    store.finish(cancelled_running, SUCCEEDED, result=b"2")  # the cancel came first: it ends cancelled
    retried, _ = store.create(NewJob(id=new_id(), task="report", client="c", kwargs={"seconds": 1.0}, retries=1))
    store.start(retried.id, "runner-a.1")
    store.beat("runner-a.1")
    clock.now += 11
    reaped = {job.id: job.state for job in store.reap(lost_after=10)}
    assert reaped == {lost: FAILED, retried.id: QUEUED}  # queued again: no ending
    first, twin = submit(store, key="k1"), submit(store, key="k1")
    assert [job.id for job in store.claim("runner-b.2", ["report"])] == [retried.id]  # its second attempt
    assert [job.id for job in store.claim("runner-b.2", ["report"])] == [first]
    assert [job.id for job in store.join("runner-b.2", "k1", 5)] == [twin]  # a join is a start too
    expected = {"started": 8, "ended/succeeded/": 1, "ended/failed/job_failed": 1, "ended/failed/worker_lost": 1,
                "ended/cancelled/cancelled": 2}
    assert store.tallies() == expected
    clock.now += 200
    store.sweep()
    store.sweep()  # every ended record gone, tombstones too
    assert stores.open().tallies() == expected  # kept by the store, read by any connection
