"""Admission control for one slow instance: W running slots plus a bounded waiting line, shared fairly.

Decided in the event loop, before anything reaches the pool: a job either gets a slot now, waits
in line (where it can always be withdrawn), or is refused at once: Overloaded (503) when the line
is full, ClientLimited (429) when its client already holds `per_client` slots and places (all
jobs.JobErrors). A job whose deadline passes while it waits leaves the line unrun (QueueTimeout,
503). It is the `line` its pool asks (jobs.Line): resize, others_waiting.

Fair between clients: the line is one queue per client (client_key: an IPv4 address, an IPv6
/64). A freed slot goes to the waiting client that runs the fewest jobs (max-min fairness), ties
served in turn; so a client that queued many jobs waits behind one job of each other client, and a
client whose long jobs hold every slot gets the next one only when nobody else is waiting. A full
line does not shut out a client that holds fewer places than another: the newest waiting job of
the client holding the most is pushed out (Overloaded) to make room, as long as that client still
holds more than the newcomer then. So a few clients within their share cannot fill the line
against everyone else: a client is refused for a full line only when nobody holds two places more.

    admission = Admission(slots=2, queue_limit=8, per_client=5)
    async with admission.slot(client_key("10.0.0.7"), "fib", deadline=loop.time() + 30):
        ...  # run the job
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter, OrderedDict, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

from services.common.addresses import plain_ip
from services.slow.jobs import ClientLimited, Overloaded, QueueTimeout  # answered as every job outcome is


def client_key(address: str) -> str:
    """Whose share a request counts against: its IPv4 address, or its IPv6 /64.

    An IPv6 host (or a home network) is normally given a whole /64 and may use any address in it:
    keyed per address, one client could take one share per address. The edge keys its per-client
    limits the same way (nginx/nginx.conf.j2, $fleet_client). An IPv4-mapped IPv6 address is its
    IPv4 address; anything else (no address: an in-process test) is its own key.
    """
    try:
        ip = plain_ip(address)
    except ValueError:
        return address
    if ip.version == 6:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(eq=False)  # compared by identity: two places of one client and task are still two
class _Place:
    """A job waiting in line: resolved with None when a slot is handed to it, with Overloaded when
    it is pushed out of the line."""

    client: str
    task: str
    turn: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Admission:
    def __init__(self, slots: int, queue_limit: int, per_client: int | None = None):
        self.slots = slots
        self.queue_limit = queue_limit
        self.per_client = per_client  # None: no per-client limit
        self.running = 0
        self.waiting = 0
        self.waiting_tasks: Counter[str] = Counter()  # jobs in line per task: the work ahead (backoff.py)
        self._lines: OrderedDict[str, deque[_Place]] = OrderedDict()  # served in this order
        self._held: Counter[str] = Counter()  # slots and places each client holds
        self._running: Counter[str] = Counter()  # slots each client holds
        self.shed = 0  # refused for a full line, or pushed out of it
        self.pushed_out = 0  # of them, waiting jobs that made room for a client holding fewer places
        self.expired = 0  # left the line unrun when their deadline passed
        self.limited = 0

    def resize(self, slots: int) -> None:
        """Change the number of running slots (a cluster's workers came or went); new ones go to
        the line at once."""
        self.slots = slots
        while self.running < self.slots and self.waiting:
            self.running += 1
            self._release()  # hands the new slot to the next in line

    def others_waiting(self, client: str) -> bool:
        """A client other than `client` has a job in line."""
        return any(c != client for c in self._lines)

    def held_by(self, client: str) -> int:
        return self._held[client]

    def refusal(self, client: str) -> Overloaded | ClientLimited | None:
        """What slot() would refuse `client` with now, or None: asked before a long job is
        committed, so that a refused one is answered at once, never accepted and then failed."""
        full = self.running >= self.slots and self.waiting >= self.queue_limit
        if full and self._victim(client) is None:
            return Overloaded(f"{self.running} jobs running and {self.waiting} waiting")
        if self.per_client is not None and self._held[client] >= self.per_client:
            return ClientLimited(f"this client already has {self._held[client]} heavy requests in this instance "
                                 f"(at most {self.per_client})")
        return None

    @asynccontextmanager
    async def slot(self, client: str = "", task: str = "", deadline: float | None = None) -> AsyncIterator[None]:
        """Hold one running slot for the body.

        Raises Overloaded or ClientLimited at once; while the job waits, Overloaded if it is pushed
        out of the line, QueueTimeout if `deadline` (the loop's time) passes first. `task` names
        what the job runs: the line's work is counted by task (waiting_tasks).
        """
        refused = self.refusal(client)
        if refused is not None:
            if isinstance(refused, Overloaded):
                self.shed += 1
            else:
                self.limited += 1
            raise refused
        full = self.running >= self.slots and self.waiting >= self.queue_limit
        victim = self._victim(client) if full else None
        if victim is not None:
            self._push_out(victim)
        if self.running < self.slots and not self.waiting:
            self.running += 1
            self._held[client] += 1
        else:
            await self._wait_in_line(_Place(client, task), deadline)
        self._running[client] += 1
        try:
            yield
        finally:
            self._held[client] -= 1
            self._running[client] -= 1
            self._forget(client)
            self._release()

    async def _wait_in_line(self, place: _Place, deadline: float | None) -> None:
        """Wait until a slot is handed to `place`; its client holds the place meanwhile."""
        loop = asyncio.get_running_loop()
        joined = loop.time()
        self._lines.setdefault(place.client, deque()).append(place)
        self.waiting += 1
        self.waiting_tasks[place.task] += 1
        self._held[place.client] += 1
        try:
            async with asyncio.timeout_at(deadline):  # None: no deadline
                try:
                    await place.turn  # resolved by _release, which hands its slot over
                except asyncio.CancelledError:  # the client left, or the deadline passed
                    self._leave(place)
                    raise
        except TimeoutError:
            self.expired += 1
            raise QueueTimeout(f"it waited {loop.time() - joined:.1f} s in line, until its deadline, and never "
                               f"ran ({self.running} jobs running, {self.waiting} waiting)") from None
        except Overloaded:  # pushed out: _push_out gave its place back
            self._forget(place.client)
            raise

    def _leave(self, place: _Place) -> None:
        """A waiting job is cancelled: it gives back its place, or the slot that reached it meanwhile."""
        turn = place.turn
        if turn.done() and not turn.cancelled() and turn.exception() is not None:
            pass  # pushed out in the same turn: _push_out has already given its place back
        elif turn.done() and not turn.cancelled():  # the slot arrived as it was cancelled: pass it on
            self._held[place.client] -= 1
            self._release()
        else:  # still in line (the cancel cancelled its turn, and _release may have skipped it since)
            self._held[place.client] -= 1
            line = self._lines.get(place.client)
            if line is not None and place in line:
                self._remove(place)
        self._forget(place.client)

    def _victim(self, client: str) -> str | None:
        """The client whose newest waiting job makes room for `client` in a full line: the one that
        holds the most, if it would still hold more than `client` afterwards."""
        if not self._lines:
            return None
        victim = max(self._lines, key=lambda c: (self._held[c], self._running[c]))
        return victim if self._held[victim] >= self._held[client] + 2 else None

    def _push_out(self, client: str) -> None:
        place = self._lines[client][-1]  # its newest: its older jobs keep their turn
        self._remove(place)
        if place.turn.done():
            # Its client has just left (a cancelled turn, not yet seen by its task): the place is
            # free already, and that task's _leave gives its hold back.
            return
        self._held[client] -= 1
        self.shed += 1
        self.pushed_out += 1
        place.turn.set_exception(Overloaded(f"its place in line went to a client holding fewer; {self.running} "
                                            f"jobs running and {self.waiting} waiting"))

    def _remove(self, place: _Place) -> None:
        line = self._lines[place.client]
        line.remove(place)
        self.waiting -= 1
        self._untask(place.task)
        if not line:
            del self._lines[place.client]

    def _untask(self, task: str) -> None:
        self.waiting_tasks[task] -= 1
        if self.waiting_tasks[task] <= 0:
            del self.waiting_tasks[task]

    def _release(self) -> None:
        """A slot is free: hand it to the waiting client running the fewest jobs (the first in turn
        among equals), who then goes to the back of the turn."""
        while self._lines:
            client = min(self._lines, key=lambda c: self._running[c])  # min() keeps the first of equals
            line = self._lines[client]
            place = line.popleft()
            self.waiting -= 1
            self._untask(place.task)
            if line:
                self._lines.move_to_end(client)
            else:
                del self._lines[client]
            if not place.turn.done():
                place.turn.set_result(None)  # the slot passes straight to that client's next job
                return
        self.running -= 1

    def _forget(self, client: str) -> None:
        if self._held[client] <= 0:  # the counters stay as small as the set of active clients
            del self._held[client]
            self._running.pop(client, None)
