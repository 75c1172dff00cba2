"""Admission control: W running slots, a bounded line served in turn between clients, Overloaded at
once beyond it (unless a client holding more can make room), ClientLimited at once for a client over
its share, and QueueTimeout for a job whose deadline passes in line."""

from __future__ import annotations

import asyncio

import pytest

from services.slow.admission import Admission, ClientLimited, Overloaded, client_key
from services.slow.jobs import QueueTimeout


async def settle(turns: int = 5) -> None:
    """Let every task that can run take its steps."""
    for _ in range(turns):
        await asyncio.sleep(0)


class Job:
    """A task that takes a slot and holds it until released, recording when it got in."""

    def __init__(self, admission: Admission, name: str, log: list[str], client: str = "", **slot_args):
        self.release = asyncio.Event()
        self.admitted = False
        self.task = asyncio.create_task(self._run(admission, name, log, client, slot_args))

    async def _run(self, admission: Admission, name: str, log: list[str], client: str, slot_args: dict) -> None:
        async with admission.slot(client, **slot_args):
            self.admitted = True
            log.append(name)
            await self.release.wait()


def test_slots_are_granted_up_to_slots_then_jobs_wait_up_to_queue_limit_then_are_refused_at_once():
    async def main():
        a = Admission(slots=2, queue_limit=3)
        log: list[str] = []
        jobs = [Job(a, f"j{i}", log) for i in range(5)]
        await settle()
        assert [j.admitted for j in jobs] == [True, True, False, False, False]
        assert (a.running, a.waiting, a.shed) == (2, 3, 0)

        yielded = asyncio.Event()
        asyncio.get_running_loop().call_soon(yielded.set)  # runs only if the refusal waits
        with pytest.raises(Overloaded, match="2 jobs running and 3 waiting"):
            async with a.slot():
                pytest.fail("a sixth job must not get in")
        assert not yielded.is_set(), "the refusal waited instead of coming at once"
        assert (a.running, a.waiting, a.shed) == (2, 3, 1)

        for j in jobs:
            j.release.set()
        await asyncio.gather(*(j.task for j in jobs))
        assert (a.running, a.waiting) == (0, 0)

    asyncio.run(main())


def test_queue_full_is_refused_at_once_with_queue_limit_zero():
    async def main():
        a = Admission(slots=1, queue_limit=0)
        holder = Job(a, "holder", [])
        await settle()
        with pytest.raises(Overloaded):
            async with a.slot():
                pass
        assert (a.running, a.waiting, a.shed) == (1, 0, 1)
        holder.release.set()
        await holder.task
        async with a.slot():  # free again
            assert a.running == 1
        assert a.running == 0

    asyncio.run(main())


def test_releasing_a_slot_hands_it_to_the_first_waiter():
    async def main():
        a = Admission(slots=1, queue_limit=3)
        log: list[str] = []
        holder = Job(a, "holder", log)
        await settle()
        waiters = [Job(a, f"w{i}", log) for i in range(3)]
        await settle()
        assert log == ["holder"] and a.waiting == 3

        holder.release.set()
        await settle()
        assert log == ["holder", "w0"]
        assert (a.running, a.waiting) == (1, 2)  # handed over: never more running than slots

        waiters[0].release.set()
        await settle()
        waiters[1].release.set()
        await settle()
        waiters[2].release.set()
        await asyncio.gather(holder.task, *(w.task for w in waiters))
        assert log == ["holder", "w0", "w1", "w2"]
        assert (a.running, a.waiting) == (0, 0)

    asyncio.run(main())


def test_a_newcomer_does_not_jump_the_line_while_a_slot_is_being_handed_over():
    async def main():
        a = Admission(slots=1, queue_limit=2)
        log: list[str] = []
        holder = Job(a, "holder", log)
        await settle()
        first = Job(a, "first", log)
        await settle()
        holder.release.set()
        await asyncio.sleep(0)  # holder releases; first has its turn but has not resumed yet
        newcomer = Job(a, "newcomer", log)
        await settle()
        assert log == ["holder", "first"]
        assert (a.running, a.waiting) == (1, 1)
        first.release.set()
        await settle()
        assert log == ["holder", "first", "newcomer"]
        newcomer.release.set()
        await asyncio.gather(holder.task, first.task, newcomer.task)
        assert a.running == 0

    asyncio.run(main())


def test_running_jobs_never_exceed_the_slots():
    async def main():
        a = Admission(slots=3, queue_limit=20)
        inside, peak = 0, 0

        async def job(i: int) -> None:
            nonlocal inside, peak
            async with a.slot():
                inside += 1
                peak = max(peak, inside)
                await asyncio.sleep(0.001 * (i % 4))
                inside -= 1

        await asyncio.gather(*(job(i) for i in range(23)))
        assert peak == 3
        assert (a.running, a.waiting, a.shed) == (0, 0, 0)

    asyncio.run(main())


def test_cancelling_a_waiter_removes_it_from_the_line_and_does_not_leak_a_slot():
    async def main():
        a = Admission(slots=1, queue_limit=2)
        log: list[str] = []
        holder = Job(a, "holder", log)
        await settle()
        gone = Job(a, "gone", log)
        behind = Job(a, "behind", log)
        await settle()
        assert a.waiting == 2

        gone.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone.task
        assert (a.running, a.waiting) == (1, 1)

        holder.release.set()
        await settle()
        assert log == ["holder", "behind"]  # the slot skipped the cancelled job
        behind.release.set()
        await asyncio.gather(holder.task, behind.task)
        assert (a.running, a.waiting) == (0, 0)
        async with a.slot():  # and the slot is really free
            assert a.running == 1

    asyncio.run(main())


def test_a_waiter_cancelled_just_after_its_slot_arrives_passes_the_slot_on():
    async def main():
        a = Admission(slots=1, queue_limit=2)
        log: list[str] = []
        async with a.slot():
            gone = Job(a, "gone", log)
            behind = Job(a, "behind", log)
            await settle()
            assert a.waiting == 2
        # Leaving the block handed the slot to `gone`; it is cancelled before it resumes.
        assert not gone.admitted and a.running == 1
        gone.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone.task
        await settle()
        assert log == ["behind"]
        assert (a.running, a.waiting) == (1, 0)
        behind.release.set()
        await behind.task
        assert (a.running, a.waiting) == (0, 0)

    asyncio.run(main())


def test_a_slot_is_released_when_the_body_raises():
    async def main():
        a = Admission(slots=1, queue_limit=0)
        with pytest.raises(RuntimeError):
            async with a.slot():
                raise RuntimeError("job failed")
        assert a.running == 0
        async with a.slot():
            assert a.running == 1

    asyncio.run(main())


def test_a_running_job_cancelled_releases_its_slot_to_the_next_waiter():
    async def main():
        a = Admission(slots=1, queue_limit=1)
        log: list[str] = []
        holder = Job(a, "holder", log)
        await settle()
        waiter = Job(a, "waiter", log)
        await settle()
        holder.task.cancel()
        await asyncio.gather(holder.task, return_exceptions=True)
        await settle()
        assert log == ["holder", "waiter"] and a.running == 1
        waiter.release.set()
        await waiter.task
        assert (a.running, a.waiting) == (0, 0)

    asyncio.run(main())


def test_a_waiter_cancelled_in_the_same_turn_as_a_release_ends_cancelled():
    async def main():
        a = Admission(slots=1, queue_limit=1)
        waiter = None
        async with a.slot():
            waiter = Job(a, "waiter", [])
            await settle()
            assert a.waiting == 1
            waiter.task.cancel()  # the client goes away...
        # ...and the holder finishes in the same loop turn, before the waiter resumes.
        try:
            await waiter.task
        except asyncio.CancelledError:
            pass
        else:
            pytest.fail("the cancelled waiter got in")
        assert (a.running, a.waiting) == (0, 0)

    asyncio.run(main())


def test_the_line_is_served_in_turn_between_clients_not_first_come_first_served():
    async def main():
        a = Admission(slots=1, queue_limit=10)
        log: list[str] = []
        holder = Job(a, "holder", log, client="x")
        await settle()
        hog = [Job(a, f"hog{i}", log, client="hog") for i in range(4)]  # queued first
        await settle()
        others = [Job(a, f"{c}0", log, client=c) for c in ("b", "c")]  # queued after all of them
        await settle()
        for job in [holder, *hog, *others]:
            job.release.set()
            await settle(20)
        await asyncio.gather(*(j.task for j in [holder, *hog, *others]))
        # One job of each client in turn: b and c do not wait behind every hog job.
        assert log == ["holder", "hog0", "b0", "c0", "hog1", "hog2", "hog3"]

    asyncio.run(main())


def test_a_client_over_its_share_is_refused_at_once_and_others_still_get_in():
    async def main():
        a = Admission(slots=2, queue_limit=4, per_client=2)
        log: list[str] = []
        mine = [Job(a, f"m{i}", log, client="10.0.0.1") for i in range(2)]
        await settle()
        with pytest.raises(ClientLimited, match="at most 2"):
            async with a.slot("10.0.0.1"):
                pytest.fail("a third job of the same client must not get in")
        assert a.limited == 1 and a.held_by("10.0.0.1") == 2
        other = Job(a, "o", log, client="10.0.0.2")
        await settle()
        assert a.waiting == 1  # the other client waits in line as usual
        for job in [*mine, other]:
            job.release.set()
        await asyncio.gather(*(j.task for j in [*mine, other]))
        assert a.held_by("10.0.0.1") == 0 and (a.running, a.waiting) == (0, 0)
        assert not a._held  # nothing is kept for clients that have gone

    asyncio.run(main())


def test_a_cancelled_waiting_job_gives_back_its_client_s_share():
    async def main():
        a = Admission(slots=1, queue_limit=4, per_client=2)
        log: list[str] = []
        holder = Job(a, "h", log, client="c")
        waiting = Job(a, "w", log, client="c")
        await settle()
        assert a.held_by("c") == 2
        waiting.task.cancel()
        await settle()
        assert a.held_by("c") == 1 and a.waiting == 0
        holder.release.set()
        await holder.task

    asyncio.run(main())


def test_a_freed_slot_goes_to_the_waiting_client_that_runs_the_fewest_jobs():
    async def main():
        a = Admission(slots=2, queue_limit=10)
        log: list[str] = []
        long = [Job(a, f"long{i}", log, client="hog") for i in range(4)]  # both slots, two waiting
        await settle()
        short = [Job(a, f"short{i}", log, client="b") for i in range(3)]
        await settle()
        long[0].release.set()
        await settle(20)
        assert log[-1] == "short0"  # b runs nothing, hog runs one: b gets the slot
        short[0].release.set()
        await settle(20)
        assert log[-1] == "short1"  # still b: it runs nothing again, hog still runs one
        for job in [*long, *short]:
            job.release.set()
        await asyncio.gather(*(j.task for j in [*long, *short]))

    asyncio.run(main())


def test_it_tells_whether_another_client_has_a_job_waiting():
    async def main():
        a = Admission(slots=1, queue_limit=2)
        log: list[str] = []
        first, second = Job(a, "first", log, client="a"), Job(a, "second", log, client="b")
        await settle()
        assert a.others_waiting("a") and not a.others_waiting("b")
        first.release.set()
        second.release.set()
        await asyncio.gather(first.task, second.task)
        assert not a.others_waiting("a")

    asyncio.run(main())


# a full line, shared fairly -------------------------------------------------------------------------

def test_a_line_full_of_two_clients_jobs_still_takes_a_third_client_s_pushing_out_the_largest_holder_s_newest():
    async def main():
        # The case, smaller: two clients within their share hold every slot and place.
        a = Admission(slots=2, queue_limit=2, per_client=2)
        log: list[str] = []
        first = [Job(a, f"a{i}", log, client="10.0.0.1") for i in range(2)]  # both slots
        await settle()
        second = [Job(a, f"b{i}", log, client="10.0.0.2") for i in range(2)]  # both places
        await settle()
        assert (a.running, a.waiting) == (2, 2)

        third = Job(a, "c0", log, client="10.0.0.3")
        await settle()
        assert not third.task.done(), "the third client was refused"
        assert (a.running, a.waiting, a.shed) == (2, 2, 1)
        with pytest.raises(Overloaded, match="client holding fewer"):
            await second[1].task  # the newest job of a client holding two places
        assert not second[0].task.done()

        for job in first:
            job.release.set()
            await settle(20)
        assert sorted(log[2:]) == ["b0", "c0"]
        for job in (second[0], third):
            job.release.set()
        await asyncio.gather(second[0].task, third.task, *(j.task for j in first))
        assert (a.running, a.waiting) == (0, 0) and not a._held

    asyncio.run(main())


def test_a_full_line_refuses_a_client_when_nobody_holds_two_places_more_than_it():
    async def main():
        a = Admission(slots=1, queue_limit=2)
        jobs = [Job(a, f"j{i}", [], client=f"10.0.0.{i}") for i in range(3)]  # one place each
        await settle()
        with pytest.raises(Overloaded, match="1 jobs running and 2 waiting"):
            async with a.slot("10.0.0.9"):
                pytest.fail("pushing out a client's only job would only swap who is refused")
        mine = Job(a, "mine", [], client="10.0.0.1")  # its second place: over nobody's
        await settle()
        assert mine.task.done() and isinstance(mine.task.exception(), Overloaded)
        assert (a.running, a.waiting, a.shed) == (1, 2, 2)
        for job in jobs:
            job.release.set()
        await asyncio.gather(*(j.task for j in jobs))

    asyncio.run(main())


def test_a_job_pushed_out_as_it_is_cancelled_gives_its_place_back_once():
    async def main():
        a = Admission(slots=1, queue_limit=2)
        holder = Job(a, "h", [], client="hog")
        hog = [Job(a, f"w{i}", [], client="hog") for i in range(2)]
        await settle()
        newcomer = Job(a, "n", [], client="other")
        await asyncio.sleep(0)  # the newcomer pushed out hog's newest...
        hog[1].task.cancel()  # ...whose client leaves before it hears of it
        await asyncio.gather(hog[1].task, return_exceptions=True)
        await settle()
        assert (a.running, a.waiting) == (1, 2) and a.held_by("hog") == 2 and a.held_by("other") == 1
        for job in (holder, hog[0], newcomer):
            job.release.set()
            await settle(20)
        await asyncio.gather(holder.task, hog[0].task, newcomer.task)
        assert (a.running, a.waiting) == (0, 0) and not a._held

    asyncio.run(main())


def test_ipv6_clients_are_keyed_by_their_64_and_ipv4_ones_by_their_address():
    assert client_key("2001:db8:1:2::a") == client_key("2001:db8:1:2:ffff::b") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::a") != client_key("2001:db8:1:2::a")
    assert client_key("::ffff:10.1.2.3") == client_key("10.1.2.3") == "10.1.2.3"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("") == "" and client_key("not an address") == "not an address"


# the deadline, in line ------------------------------------------------------------------------------

def test_a_job_whose_deadline_passes_in_line_leaves_it_unrun_and_its_place_goes_back():
    async def main():
        a = Admission(slots=1, queue_limit=2, per_client=5)
        log: list[str] = []
        holder = Job(a, "holder", log, client="c")
        await settle()
        loop = asyncio.get_running_loop()
        late = Job(a, "late", log, client="c", task="sleep", deadline=loop.time() + 0.05)
        behind = Job(a, "behind", log, client="d", task="fib")
        await settle()
        assert dict(a.waiting_tasks) == {"sleep": 1, "fib": 1}
        with pytest.raises(QueueTimeout, match="never ran"):
            await late.task
        assert (a.running, a.waiting, a.expired) == (1, 1, 1)
        assert a.held_by("c") == 1 and dict(a.waiting_tasks) == {"fib": 1}
        holder.release.set()
        await settle(20)
        assert log == ["holder", "behind"]  # the slot skipped the job that left
        behind.release.set()
        await asyncio.gather(holder.task, behind.task)
        assert (a.running, a.waiting) == (0, 0) and not a.waiting_tasks and not a._held

    asyncio.run(main())


def test_the_line_counts_its_jobs_by_task_as_they_join_start_and_leave():
    async def main():
        a = Admission(slots=1, queue_limit=4)
        holder = Job(a, "holder", [], task="fib")
        await settle()
        waiting = [Job(a, f"w{i}", [], client=f"10.0.0.{i}", task=t) for i, t in enumerate(["sleep", "sleep", "fib"])]
        await settle()
        assert dict(a.waiting_tasks) == {"sleep": 2, "fib": 1}  # the running job is not in line
        waiting[1].task.cancel()
        await settle()
        assert dict(a.waiting_tasks) == {"sleep": 1, "fib": 1}
        holder.release.set()
        await settle(20)
        assert dict(a.waiting_tasks) == {"fib": 1}
        for job in (waiting[0], waiting[2]):
            job.release.set()
            await settle(20)
        await asyncio.gather(holder.task, waiting[0].task, waiting[2].task)
        assert not a.waiting_tasks

    asyncio.run(main())


def test_a_job_whose_client_left_in_the_same_turn_is_never_pushed_out_twice():
    async def main():
        # A holds the slot and both places; the client of its newest waiting job leaves just as
        # B arrives (the cancel is not yet seen by that job's task): B takes the freed place.
        a = Admission(slots=1, queue_limit=2, per_client=3)
        log: list[str] = []
        holder = Job(a, "a0", log, client="A")
        await settle()
        waiting = [Job(a, f"a{i}", log, client="A") for i in (1, 2)]
        await settle()
        newcomer = Job(a, "b0", log, client="B")
        waiting[1].task.cancel()
        await settle()
        assert not newcomer.task.done(), newcomer.task.exception() if newcomer.task.done() else None
        assert (a.running, a.waiting, dict(a._held), a.shed) == (1, 2, {"A": 2, "B": 1}, 0)
        more = Job(a, "a3", log, client="A")  # within its share (2 of 3), but the line is full
        await settle()
        with pytest.raises(Overloaded):
            await more.task  # the line is full, and nobody holds two places more than A
        for job in (holder, waiting[0], newcomer):
            job.release.set()
        await asyncio.gather(holder.task, waiting[0].task, newcomer.task)
        assert (a.running, a.waiting) == (0, 0) and not a._held

    asyncio.run(main())
