"""Admission control for one slow instance: W running slots plus a bounded waiting line, shared fairly.

Decided in the event loop, before anything reaches the pool: a job either gets a slot now, waits
in line (where it can always be withdrawn), or is refused at once: Overloaded (503) when the line
is full, ClientLimited (429) when its client already holds `per_client` slots and places (both
jobs.JobErrors). It is the `line` its pool asks (jobs.Line): resize, others_waiting.

Fair between clients: the line is one queue per client address. A freed slot goes to the waiting
client that runs the fewest jobs (max-min fairness), ties served in turn; so a client that queued
many jobs waits behind one job of each other client, and a client whose long jobs hold every slot
gets the next one only when nobody else is waiting.

    admission = Admission(slots=2, queue_limit=8, per_client=5)
    async with admission.slot("10.0.0.7"):
        ...  # run the job
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict, deque
from contextlib import asynccontextmanager
from typing import AsyncIterator

from services.slow.jobs import ClientLimited, Overloaded  # its refusals, answered as every job outcome is


class Admission:
    def __init__(self, slots: int, queue_limit: int, per_client: int | None = None):
        self.slots = slots
        self.queue_limit = queue_limit
        self.per_client = per_client  # None: no per-client limit
        self.running = 0
        self.waiting = 0
        self._lines: OrderedDict[str, deque[asyncio.Future]] = OrderedDict()  # served in this order
        self._held: Counter[str] = Counter()  # slots and places each client holds
        self._running: Counter[str] = Counter()  # slots each client holds
        self.shed = 0
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

    @asynccontextmanager
    async def slot(self, client: str = "") -> AsyncIterator[None]:
        """Hold one running slot for the body; raises Overloaded or ClientLimited at once."""
        if self.running >= self.slots and self.waiting >= self.queue_limit:
            self.shed += 1
            raise Overloaded(f"{self.running} jobs running and {self.waiting} waiting")
        if self.per_client is not None and self._held[client] >= self.per_client:
            self.limited += 1
            raise ClientLimited(f"this client already has {self._held[client]} heavy requests in this instance "
                                f"(at most {self.per_client})")
        if self.running < self.slots and not self.waiting:
            self.running += 1
        else:
            turn = asyncio.get_running_loop().create_future()
            self._lines.setdefault(client, deque()).append(turn)
            self.waiting += 1
            self._held[client] += 1
            try:
                await turn  # resolved by _release, which hands its slot over
            except asyncio.CancelledError:
                self._held[client] -= 1
                if turn.done() and not turn.cancelled():
                    self._release()  # the slot arrived as we were cancelled: pass it on
                else:
                    self._withdraw(client, turn)
                self._forget(client)
                raise
            self._held[client] -= 1
        self._held[client] += 1
        self._running[client] += 1
        try:
            yield
        finally:
            self._held[client] -= 1
            self._running[client] -= 1
            self._forget(client)
            self._release()

    def _release(self) -> None:
        """A slot is free: hand it to the waiting client running the fewest jobs (the first in turn
        among equals), who then goes to the back of the turn."""
        while self._lines:
            client = min(self._lines, key=lambda c: self._running[c])  # min() keeps the first of equals
            line = self._lines[client]
            turn = line.popleft()
            self.waiting -= 1
            if line:
                self._lines.move_to_end(client)
            else:
                del self._lines[client]
            if not turn.done():
                turn.set_result(None)  # the slot passes straight to that client's next job
                return
        self.running -= 1

    def _withdraw(self, client: str, turn: asyncio.Future) -> None:
        line = self._lines.get(client)
        if line is not None and turn in line:
            line.remove(turn)
            self.waiting -= 1
            if not line:
                del self._lines[client]

    def _forget(self, client: str) -> None:
        if self._held[client] <= 0:  # the counters stay as small as the set of active clients
            del self._held[client]
            self._running.pop(client, None)
