"""The job store (services/slow/job_store.py): SQLite in a temp dir, its state machine, its events
and their replay, its TTL sweep and size bound, and writers in two processes at once."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from services.slow import job_store
from services.slow.job_store import (CANCELLED, CANCELLING, EXPIRED, FAILED, QUEUED, RUNNING, SUCCEEDED,
                                     ActiveLimit, AsyncStore, NewJob, SqliteStore, new_id)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> SqliteStore:
    s = SqliteStore(tmp_path / "store.sqlite", ttl=60, max_records=1000, clock=clock)
    yield s
    s.close()


def submit(store: SqliteStore, client: str = "10.0.0.1", **kwargs) -> str:
    job, created = store.create(NewJob(id=new_id(), task="report", client=client, owner="slow-01", **kwargs))
    assert created
    return job.id


def test_a_created_job_is_committed_queued_and_another_connection_reads_it(store, tmp_path):
    job_id = submit(store, args={"seconds": 2})
    other = SqliteStore(tmp_path / "store.sqlite")
    job = other.get(job_id)
    assert (job.state, job.seq, job.task, job.args) == (QUEUED, 1, "report", {"seconds": 2})
    assert [(e.seq, e.kind, e.data) for e in other.events(job_id)] == [(1, "state", {"state": QUEUED})]
    other.close()


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
    store.start(job_id, "slow-01")
    store.finish(job_id, FAILED, error={"error": "job_failed", "message": "boom"})
    assert store.finish(job_id, SUCCEEDED, result=b"1") is None
    assert store.start(job_id, "slow-01") is None
    assert store.progress(job_id, 1, 1, "") is None
    assert store.cancel(job_id).state == FAILED
    assert store.get(job_id).error == {"error": "job_failed", "message": "boom"}


def test_cancelling_a_queued_job_ends_it_at_once_and_it_never_starts(store):
    job_id = submit(store)
    assert store.cancel(job_id).state == CANCELLED
    assert store.start(job_id, "slow-01") is None
    assert store.get(job_id).error["error"] == "cancelled"


def test_cancelling_a_running_job_marks_it_and_it_ends_cancelled_whatever_it_returned(store):
    job_id = submit(store)
    store.start(job_id, "slow-01")
    assert store.cancel(job_id).state == CANCELLING
    assert store.cancel(job_id).state == CANCELLING  # idempotent: no second event
    assert store.progress(job_id, 5, 10, "") is None
    ended = store.finish(job_id, SUCCEEDED, result=b"1")
    assert (ended.state, ended.result) == (CANCELLED, None)
    assert [e.data.get("state") for e in store.events(job_id)] == [QUEUED, RUNNING, CANCELLING, CANCELLED]


def test_events_after_a_sequence_number_are_exactly_the_ones_missed(store):
    job_id = submit(store)
    store.start(job_id, "slow-01")
    for step in range(1, 6):
        store.progress(job_id, step, 5, f"step {step}")
    assert [e.seq for e in store.events(job_id, after=4)] == [5, 6, 7]
    assert store.events(job_id, after=7) == []


def test_changes_name_the_jobs_another_process_wrote_to_since_a_position(store, tmp_path):
    a, b = submit(store), submit(store)
    seen = store.last_position()
    other = SqliteStore(tmp_path / "store.sqlite")
    other.start(b, "slow-02")
    other.progress(b, 1, 2, "")
    last, jobs = store.changes(seen)
    assert jobs == {b: 3} and a not in jobs and last > seen
    assert store.changes(last) == (last, {})
    other.close()


def test_an_idempotency_key_reused_by_its_client_finds_the_first_job(store):
    first = submit(store, idempotency_key="k1", fingerprint="f1")
    again, created = store.create(NewJob(id=new_id(), task="report", client="10.0.0.1", owner="slow-02",
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
        store.create(NewJob(id=new_id(), task="report", client="a", owner="slow-01"), max_per_client=2)
    assert (refused.value.whose, refused.value.count) == ("client", 2)
    with pytest.raises(ActiveLimit) as refused:
        store.create(NewJob(id=new_id(), task="report", client="b", owner="slow-01"), max_per_client=2, max_active=2)
    assert refused.value.whose == "all"
    assert store.count_active() == 2  # nothing was created
    submit(store, "b")  # without limits


def test_a_finished_record_expires_after_its_ttl_to_a_tombstone_then_goes(store, clock):
    job_id = submit(store)
    store.start(job_id, "slow-01")
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
        store.start(job_id, "slow-01")
        store.finish(job_id, SUCCEEDED, result=result)
    return ids


def test_a_sweep_call_expires_and_removes_at_most_its_limit_and_the_next_ones_the_rest(store, clock):
    finished(store, 5)
    clock.now += 60
    assert [store.sweep(limit=2)["expired"] for _ in range(4)] == [2, 2, 1, 0]
    clock.now += 60
    assert [store.sweep(limit=3)["removed"] for _ in range(3)] == [3, 2, 0]
    assert store.db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0


def test_the_wal_is_cut_back_after_the_sweep_of_many_large_results(tmp_path, clock, monkeypatch):
    monkeypatch.setattr(job_store, "WAL_SIZE_LIMIT", 1 << 20)
    store = SqliteStore(tmp_path / "store.sqlite", ttl=60, clock=clock)
    finished(store, 40, result=b'"' + b"x" * 100_000 + b'"')
    clock.now += 60
    assert store.sweep(limit=40)["expired"] == 40  # one transaction rewrites 4 MB of pages (SECURE_DELETE)
    finished(store, 1)  # a write after the checkpoint (at that commit) starts the WAL again, cut to its limit
    assert (tmp_path / "store.sqlite-wal").stat().st_size <= 1 << 20
    store.close()


def test_past_max_records_the_oldest_finished_records_expire_first(tmp_path, clock):
    store = SqliteStore(tmp_path / "store.sqlite", ttl=3600, max_records=5, clock=clock)
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
    assert store.db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] <= 5
    store.close()


def _write_jobs(path: str, owner: str, count: int) -> None:
    store = SqliteStore(path)
    for _ in range(count):
        job, _ = store.create(NewJob(id=new_id(), task="report", client=owner, owner=owner))
        store.start(job.id, owner)
        for step in range(3):
            store.progress(job.id, step, 3, "")
        store.finish(job.id, SUCCEEDED, result=b"1")
    store.close()


def test_two_processes_writing_at_once_lose_and_mix_up_nothing(tmp_path):
    path = str(tmp_path / "store.sqlite")
    SqliteStore(path).close()  # the schema, once
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_write_jobs, args=(path, f"slow-0{n}", 100)) for n in (1, 2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    store = SqliteStore(path)
    for owner in ("slow-01", "slow-02"):
        ids = [r[0] for r in store.db.execute("SELECT id FROM jobs WHERE owner = ?", (owner,))]
        assert len(ids) == 100
        for job_id in ids:
            assert [e.seq for e in store.events(job_id)] == [1, 2, 3, 4, 5, 6]
            assert store.get(job_id).state == SUCCEEDED
    store.close()


def test_the_async_store_makes_the_calls_off_the_event_loop(store):
    async def main():
        stores = AsyncStore(store)
        job, _ = await stores.create(NewJob(id=new_id(), task="report", client="c", owner="slow-01"))
        return await stores.get(job.id)

    assert asyncio.run(main()).state == QUEUED


def test_the_active_jobs_of_a_silent_owner_are_reaped_and_a_cancel_made_before_holds(store, clock):
    queued, running, cancelling, done, alive = (submit(store) for _ in range(5))
    for job_id in (running, cancelling, done):
        store.start(job_id, "slow-01")
    store.cancel(cancelling)
    store.finish(done, SUCCEEDED, result=b"1")
    store.db.execute("UPDATE jobs SET owner = 'slow-02.b' WHERE id = ?", (alive,))
    store.beat("slow-01")  # the owner of the first four
    store.beat("slow-02.b")
    clock.now += 9
    store.beat("slow-02.b")
    assert store.reap(lost_after=10) == []  # slow-01 beat 9 s ago: not lost yet
    clock.now += 2
    reaped = {job.id: job for job in store.reap(lost_after=10)}
    assert set(reaped) == {queued, running, cancelling}
    assert reaped[running].state == FAILED and reaped[running].error["error"] == "worker_lost"
    assert reaped[running].error["retryable"] is True and reaped[queued].state == FAILED
    assert reaped[cancelling].state == CANCELLED
    assert store.events(running)[-1].kind == "end"
    assert store.get(alive).state == QUEUED and store.get(done).state == SUCCEEDED


def test_a_job_whose_owner_never_beat_is_reaped_too(store):
    job_id = submit(store)  # its owner died before its first beat
    assert [job.id for job in store.reap(lost_after=10)] == [job_id]


def test_a_large_result_is_kept_as_a_file_beside_the_store_and_goes_with_its_record(tmp_path, clock):
    store = SqliteStore(tmp_path / "store.sqlite", ttl=60, clock=clock, inline_result_bytes=10)
    small, large = submit(store), submit(store)
    for job_id, result in ((small, b'"0123"'), (large, b'"' + b"x" * 100 + b'"')):
        store.start(job_id, "slow-01")
        store.finish(job_id, SUCCEEDED, result=result)
    assert (store.get(small).result, store.get(small).result_file) == (b'"0123"', 0)
    kept = store.get(large)
    assert (kept.result, kept.result_file, kept.result_bytes) == (None, 1, 102)
    assert store.result_path(large).read_bytes() == b'"' + b"x" * 100 + b'"'
    clock.now += 60
    store.sweep()
    assert not store.result_path(large).exists() and store.get(large).state == EXPIRED
    store.close()


def test_a_result_file_no_record_names_is_swept_after_a_minute(tmp_path):
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


def test_a_lost_job_with_retries_left_is_queued_again_for_its_adopter_then_fails_when_none_are_left(store, clock):
    job, _ = store.create(NewJob(id=new_id(), task="report", client="c", owner="slow-01.a",
                                 kwargs={"seconds": 4.0}, retries=1))
    store.start(job.id, "slow-01.a")
    again = store.reap(lost_after=10, adopter="slow-02.b")
    assert [(j.id, j.state, j.owner, j.attempt, j.kwargs) for j in again] == [
        (job.id, QUEUED, "slow-02.b", 2, {"seconds": 4.0})]
    assert store.events(job.id)[-1].data == {"state": "queued", "attempt": 2, "after": "worker_lost"}
    store.start(job.id, "slow-02.b")  # the adopter runs it, and is lost too
    lost = store.reap(lost_after=10, adopter="slow-03.c")
    assert [(j.state, j.error["error"]) for j in lost] == [(FAILED, "worker_lost")]


def test_a_run_taken_for_lost_while_it_was_only_slow_cannot_write_to_the_job_s_next_attempt(store):
    job, _ = store.create(NewJob(id=new_id(), task="report", client="c", owner="slow-01.a",
                                 kwargs={"seconds": 4.0}, retries=1))
    store.start(job.id, "slow-01.a")
    store.reap(lost_after=10, adopter="slow-02.b")  # slow-01.a went silent: attempt 2 for slow-02.b
    store.start(job.id, "slow-02.b")
    # slow-01.a wakes up and reports, then ends, as attempt 1: neither lands.
    assert store.progress(job.id, 3, 4, "late", attempt=1) is None
    assert store.finish(job.id, SUCCEEDED, result=b'"stale"', attempt=1) is None
    assert (store.get(job.id).state, store.get(job.id).done) == (RUNNING, None)
    # Attempt 2's own writes do.
    assert store.progress(job.id, 1, 4, "section 1", attempt=2) is not None
    ended = store.finish(job.id, SUCCEEDED, result=b'"fresh"', attempt=2)
    assert (ended.state, ended.result, ended.attempt) == (SUCCEEDED, b'"fresh"', 2)


def test_a_lost_job_whose_arguments_were_not_kept_is_never_queued_again(store):
    job_id = submit(store)  # a task without retries: its arguments are not in the store
    assert [j.state for j in store.reap(lost_after=10, adopter="slow-02.b")] == [FAILED]
    assert store.get(job_id).kwargs is None
