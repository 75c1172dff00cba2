"""Batched lookups (source 002, Quora's asynq; Facebook's DataLoader): the keys a request asks one
upstream for within one turn of the event loop go out as multi-gets, each key once.

    users = Loader(upstreams["users"], ctx, batch_size=100)
    names = await asyncio.gather(*(users.load(k) for k in friend_ids))   # one multi-get

load() only notes the key and hands back a future; the batch is sent on the loop's next turn, so
every load() of the same turn (a gather's, or each of several tasks' first steps) joins it.
Duplicate keys are removed before the batch is cut (graphql/dataloader#294: counting them would
split 150 distinct keys asked 200 times into 3 batches instead of 2), and a key asked again later
in the request is answered from what the request already has. A key the upstream did not return
fails alone (KeyError); a failed batch fails each of its keys with the batch's CallFailed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from services.common import metrics
from services.fanout.client import Upstream
from services.fanout.scope import Context


class Loader:
    def __init__(self, upstream: Upstream, ctx: Context, batch_size: int) -> None:
        self.upstream, self.ctx, self.batch_size = upstream, ctx, batch_size
        self.known: dict[str, asyncio.Future] = {}  # every key of this request, answered or on its way
        self.queued: list[str] = []  # keys of this turn, not sent yet
        self.batches = 0
        self.keys_per_batch = metrics.FANOUT_BATCH_KEYS.labels(upstream.name)

    def load(self, key: str) -> asyncio.Future:
        future = self.known.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self.known[key] = loop.create_future()
            future.add_done_callback(_retrieved)  # a key the route stopped waiting for logs no warning
            if not self.queued:
                loop.call_soon(self._dispatch)
            self.queued.append(key)
        return future

    def _dispatch(self) -> None:
        keys, self.queued = self.queued, []
        for start in range(0, len(keys), self.batch_size):
            self.ctx.spawn(self._fetch(keys[start:start + self.batch_size]))

    async def _fetch(self, keys: list[str]) -> None:
        self.batches += 1
        self.keys_per_batch.observe(len(keys))
        name = self.upstream.name
        try:
            answer = await self.upstream.get(f"/{name}?keys={','.join(keys)}", self.ctx)
            values = answer.get("values", {}) if isinstance(answer, dict) else {}
        except BaseException as error:  # a CallFailed, or this request's end (CancelledError)
            for key in keys:
                future = self.known[key]
                if not future.done():
                    if isinstance(error, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(error)
            if isinstance(error, asyncio.CancelledError):
                raise
            return
        for key in keys:
            future = self.known[key]
            if future.done():
                continue
            if key in values:
                future.set_result(values[key])
            else:
                future.set_exception(KeyError(key))


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
