"""The server job store (jobs.store = "redis"): the Store protocol of job_store.py on Redis 7 (or
Valkey), which slow instances on several hosts can share.

    store = RedisStore("redis://:secret@127.0.0.1:6390/0", ttl=3600)
    job, created = store.create(NewJob(id=new_id(), task="report", client="10.0.0.7"))
    [job] = store.claim("runner-a.ab12cd34", ["report"])  # queued -> running, fairly between clients
    store.events(job.id, after=0)                   # from the job's stream: what Last-Event-ID missed

Keys, under one prefix (`jobs` by default; `{id}` is a job's id):

    jobs:job:{id}         hash    the record: SqliteStore's columns, a field absent where the column is NULL
    jobs:events:{id}      stream  its events, each stream id "<seq>-0": XRANGE (after + replays what a
                                  stream with that Last-Event-ID missed
    jobs:result:{id}      string  a result larger than inline_result_bytes (the record says result_file = 1)
    jobs:idem:{n}:{client}:{key}  string  the job of a client's Idempotency-Key (n: the client's length)
    jobs:active           set     every active job (queued, running, cancelling): jobs.max_active
    jobs:active:{client}  set     the client's active jobs: jobs.max_active_per_client
    jobs:ended            zset    finished records, by when they expire
    jobs:tombs            zset    tombstones (state "expired", 410), by when they go
    jobs:queued           zset    queued jobs, by the position of their creation: what runners claim
    jobs:running          hash    jobs running (or being cancelled) by client: the claim's fairness
    jobs:running_keys     hash    jobs running by key (a coalescing task's): a claim leaves identical ones to join
    jobs:owners           zset    each runner process's last beat: its jobs' lease
    jobs:counts           hash    records by state (count_by_state, for the metrics)
    jobs:tallies          hash    jobs started, and ended by state and error code, ever (tallies, the metrics)
    jobs:position         string  the last position handed out (INCR): what a Watcher has seen
    jobs:changes          stream  one entry per event of any job, "<position>-0": job, seq

Every transition is one Lua script: it reads the record's state, decides and writes the record, its
next event, the indexes and the change in one step that no other client's command can interleave
with, in one round trip. MULTI/WATCH would do the same optimistically: each transition reads before
it writes, so a conflict (an instance's progress write against another's DELETE, two instances'
creates against one client's limit) would abort and retry the whole read-decide-write, and the
limits would need every create to WATCH the counters all creates change. The limits are counted in
the create script itself: instances submitting at once on any host cannot pass a limit together.

Bounded store (celery#7801's trap is results kept with no TTL): a finished job's record, events,
result and idempotency key get native TTLs when it ends (its record's lasts its tombstone's time
too), so Redis drops them even if no instance ever sweeps again. The sweep (every instance's, every
30 s, as SqliteStore's) turns records past their TTL into tombstones and removes tombstones past
theirs, on the store's clock like SqliteStore, and holds the store to max_records; the native TTLs
run EXPIRE_GRACE seconds later, as the backstop.

Durability is the server's: the fleet's managed store runs with `appendonly yes` and `appendfsync
always` (deploy/job-store.conf.j2), so a creation Redis acknowledged (the 202) is on disk before the
acknowledgement leaves, and survives a kill -9 of the store.

Faults: every call has a short socket timeout (jobs.store_timeout); a store that does not answer in
time, refuses the connection or is out of memory raises StoreUnavailable (job_store.py), which the
routes answer `503 store_unavailable` at once; for a second after that, calls fail at once
without asking (PAUSE_AFTER_FAULT), so that calls queued behind each other never add up their
timeouts. A call is never retried by the client: a transition
whose answer was lost may have been applied, and running it again would apply it twice (a second
event, a start seen as a cancel); a connection the server closed (a restarted store) is noticed and
replaced when the pool hands it out, so the first call after a restart goes through.

The calls block: the event loop makes them through AsyncStore, on one thread of its own with one
connection, as SqliteStore's.
"""

from __future__ import annotations

import functools
import json
import math
import time
from typing import Any, Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.slow.job_store import (ACTIVE, CANCELLING, EXPIRED, SWEEP_BATCH, TERMINAL, ActiveLimit, Event, Job,
                                     NewJob, StoreUnavailable)

# Native TTLs run this long after the sweep should have acted (it runs every 30 s): the sweep turns
# a record into a tombstone first, and Redis drops keys on its own only if nobody sweeps any more.
EXPIRE_GRACE = 120
# Entries kept in the changes stream (approximately: MAXLEN ~). A Watcher reads it every 0.1 s.
CHANGES_KEPT = 100_000
CHANGES_PER_READ = 10_000
# Queued jobs a claim looks at, oldest first (the fairness between clients is within them): the
# script holds the whole server while it runs.
CLAIM_SCAN = 200
# Seconds after a call the store did not answer during which calls fail at once (RedisStore).
PAUSE_AFTER_FAULT = 1.0

# Every script gets the prefix as ARGV[1] and builds its key names from it (all on one server).
_LIB = r"""
local P = ARGV[1]
local function job_key(id) return P .. ':job:' .. id end
local function idem_key(client, key) return P .. ':idem:' .. #client .. ':' .. client .. ':' .. key end
local function field(id, name) return redis.call('HGET', job_key(id), name) end
local function count(state, by) redis.call('HINCRBY', P .. ':counts', state, by) end
-- one change: the record's fields (pairs; false deletes a field), its next event, the changes stream
local function change(id, kind, data, fields)
    local key = job_key(id)
    local seq = redis.call('HINCRBY', key, 'seq', 1)
    local set, del = {}, {}
    for i = 1, #fields, 2 do
        if fields[i + 1] == false then table.insert(del, fields[i]) else
            table.insert(set, fields[i]); table.insert(set, fields[i + 1]) end
    end
    if #set > 0 then redis.call('HSET', key, unpack(set)) end
    if #del > 0 then redis.call('HDEL', key, unpack(del)) end
    redis.call('XADD', P .. ':events:' .. id, seq .. '-0', 'kind', kind, 'data', data)
    local position = redis.call('INCR', P .. ':position')
    redis.call('XADD', P .. ':changes', 'MAXLEN', '~', ARGV[2], position .. '-0', 'job', id, 'seq', seq)
    return seq
end
local function set_state(id, old, new)
    count(old, -1); count(new, 1)
end
local function tally(hash, name, by)
    if redis.call('HINCRBY', hash, name, by) <= 0 then redis.call('HDEL', hash, name) end
end
-- a job enters or leaves running (or cancelling): counted by client, and by key if it has one
local function running(id, by)
    tally(P .. ':running', field(id, 'client'), by)
    local key = field(id, 'key')
    if key then tally(P .. ':running_keys', key, by) end
end
-- queued -> running on owner (the caller checked that it is queued)
local function start(id, owner, now)
    change(id, 'state', cjson.encode({state = 'running'}), {'state', 'running', 'owner', owner, 'started', now})
    set_state(id, 'queued', 'running')
    redis.call('ZREM', P .. ':queued', id)
    running(id, 1)
    redis.call('HINCRBY', P .. ':tallies', 'started', 1)
end
-- a job's last change: terminal state, result or error, expiry; out of the active sets; native TTLs
-- (end_args: now, expires, record TTL, events TTL)
local function finish(id, state, error, result, result_bytes, in_file, now, expires, record_ttl, data_ttl)
    local old = field(id, 'state')
    local client = field(id, 'client')
    -- decoded before the first write: Redis does not undo a script's writes when it fails half-way
    local code = ''
    if error and error ~= '' then code = cjson.decode(error)['error'] or '' end  -- false: no error
    local fields = {'state', state, 'finished', now, 'expires', expires, 'error', error,
                    'result', false, 'result_bytes', result_bytes, 'result_file', '0', 'kwargs', false}
    if result ~= false and in_file == '1' then
        redis.call('SET', P .. ':result:' .. id, result, 'EX', data_ttl)
        fields[14] = '1'  -- result_file
    elseif result ~= false then
        fields[10] = result
    end
    local seq = change(id, 'end', cjson.encode({state = state}), fields)
    set_state(id, old, state)
    redis.call('HINCRBY', P .. ':tallies', 'ended/' .. state .. '/' .. code, 1)
    if old == 'queued' then redis.call('ZREM', P .. ':queued', id) else running(id, -1) end
    redis.call('SREM', P .. ':active', id)
    redis.call('SREM', P .. ':active:' .. client, id)
    redis.call('ZADD', P .. ':ended', expires, id)
    redis.call('EXPIRE', job_key(id), record_ttl)
    redis.call('EXPIRE', P .. ':events:' .. id, data_ttl)
    local key = field(id, 'idempotency_key')
    if key then redis.call('EXPIRE', idem_key(client, key), record_ttl) end
    return seq
end
"""

# KEYS: none (all names from the prefix). ARGV: prefix, changes kept, then each script's own.
_CREATE = _LIB + r"""
-- ARGV[3..]: id, client, idempotency key ('' none), max per client ('' none), max active ('' none),
-- then the record's fields as pairs
local id, client, key = ARGV[3], ARGV[4], ARGV[5]
if redis.call('EXISTS', job_key(id)) == 1 then
    return {'created', redis.call('HGETALL', job_key(id))}  -- this very create, its answer lost before
end
if key ~= '' then
    local known = redis.call('GET', idem_key(client, key))
    if known and redis.call('EXISTS', job_key(known)) == 1 then
        return {'known', redis.call('HGETALL', job_key(known))}
    end
end
local held = redis.call('SCARD', P .. ':active:' .. client)
if ARGV[6] ~= '' and held >= tonumber(ARGV[6]) then return {'limit', 'client', held} end
local active = redis.call('SCARD', P .. ':active')
if ARGV[7] ~= '' and active >= tonumber(ARGV[7]) then return {'limit', 'all', active} end
local fields = {}
for i = 8, #ARGV do table.insert(fields, ARGV[i]) end
redis.call('HSET', job_key(id), 'seq', 0, unpack(fields))
change(id, 'state', cjson.encode({state = 'queued'}), {})
count('queued', 1)
-- first come, first claimed: the position of its creation orders it (clocks tie, and differ by host)
local order = redis.call('GET', P .. ':position')
redis.call('HSET', job_key(id), 'order', order)
redis.call('ZADD', P .. ':queued', order, id)
redis.call('SADD', P .. ':active', id)
redis.call('SADD', P .. ':active:' .. client, id)
if key ~= '' then redis.call('SET', idem_key(client, key), id) end
return {'created', redis.call('HGETALL', job_key(id))}
"""

_START = _LIB + r"""
-- ARGV[3..]: id, owner, now
local id = ARGV[3]
if field(id, 'state') ~= 'queued' then return false end
start(id, ARGV[4], ARGV[5])
return redis.call('HGETALL', job_key(id))
"""

_CLAIM = _LIB + r"""
-- ARGV[3..]: owner, now, limit, jobs looked at, then the task names served
-- Among the oldest queued jobs (at most "looked at" of them) of the tasks served, those of the
-- clients with the fewest jobs running first, then the oldest: as SqliteStore.claim, bounded.
local owner, now, limit, scan = ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local served = {}
for i = 7, #ARGV do served[ARGV[i]] = true end
local candidates = {}
for position, id in ipairs(redis.call('ZRANGE', P .. ':queued', 0, scan - 1)) do
    local record = redis.call('HMGET', job_key(id), 'task', 'client', 'key')
    -- a job identical to one running is left for that run to take (join)
    if record[1] and served[record[1]] and not (record[3] and redis.call('HEXISTS', P .. ':running_keys', record[3]) == 1) then
        local held = tonumber(redis.call('HGET', P .. ':running', record[2]) or '0')
        table.insert(candidates, {held, position, id})
    end
end
table.sort(candidates, function(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end)
local claimed = {}
for i = 1, math.min(limit, #candidates) do
    start(candidates[i][3], owner, now)
    table.insert(claimed, redis.call('HGETALL', job_key(candidates[i][3])))
end
if #claimed > 0 then redis.call('ZADD', P .. ':owners', now, owner) end  -- its lease starts now
return claimed
"""

_JOIN = _LIB + r"""
-- ARGV[3..]: owner, now, key, limit, jobs looked at: the queued jobs of this key among the oldest, now running on owner
local owner, now, key, limit, scan = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local joined = {}
for _, id in ipairs(redis.call('ZRANGE', P .. ':queued', 0, scan - 1)) do
    if #joined >= limit then break end
    if field(id, 'key') == key then
        start(id, owner, now)
        table.insert(joined, redis.call('HGETALL', job_key(id)))
    end
end
return joined
"""

_PROGRESS = _LIB + r"""
-- ARGV[3..]: id, done, total ('' none), message, the event's data, the attempt reporting ('' any)
local id = ARGV[3]
if field(id, 'state') ~= 'running' then return false end
if ARGV[8] ~= '' and field(id, 'attempt') ~= ARGV[8] then return false end  -- a dead run's late report
local total = ARGV[5]
if total == '' then total = false end
return change(id, 'progress', ARGV[7], {'done', ARGV[4], 'total', total, 'message', ARGV[6]})
"""

_FINISH = _LIB + r"""
-- ARGV[3..]: id, state, error JSON ('' none), result ('' none: with has_result '0'), has_result,
-- result bytes, in file, cancelled error JSON, now, expires, record TTL, data TTL, the attempt
-- ending ('' any)
local id, state = ARGV[3], ARGV[4]
local current = field(id, 'state')
if current ~= 'queued' and current ~= 'running' and current ~= 'cancelling' then return false end
if ARGV[15] ~= '' and field(id, 'attempt') ~= ARGV[15] then return false end  -- the job moved on
local error, result, size, in_file = ARGV[5], ARGV[6], ARGV[8], ARGV[9]
if ARGV[7] == '0' then result = false end
if current == 'cancelling' then  -- the client asked first: cancelled, whatever the job returned
    state, error, result, size, in_file = 'cancelled', ARGV[10], false, '', '0'
end
if error == '' then error = false end
if size == '' then size = false end
finish(id, state, error, result, size, in_file, ARGV[11], ARGV[12], ARGV[13], ARGV[14])
return redis.call('HGETALL', job_key(id))
"""

_CANCEL = _LIB + r"""
-- ARGV[3..]: id, cancelled error JSON, now, expires, record TTL, data TTL
local id = ARGV[3]
local state = field(id, 'state')
if not state then return false end
if state == 'queued' then
    finish(id, 'cancelled', ARGV[4], false, false, '0', ARGV[5], ARGV[6], ARGV[7], ARGV[8])
elseif state == 'running' then
    change(id, 'state', cjson.encode({state = 'cancelling'}), {'state', 'cancelling'})
    set_state(id, 'running', 'cancelling')
end
return redis.call('HGETALL', job_key(id))
"""

_REAP = _LIB + r"""
-- ARGV[3..]: now, lost after, (unused), worker_lost error JSON, cancelled error JSON,
-- expires, record TTL, data TTL
local now, lost_after = tonumber(ARGV[3]), tonumber(ARGV[4])
local changed = {}
local owners = P .. ':owners'
for _, id in ipairs(redis.call('SMEMBERS', P .. ':active')) do
    local record = redis.call('HMGET', job_key(id), 'owner', 'state', 'kwargs', 'attempt', 'retries')
    local owner, state = record[1], record[2]
    local beat = owner and redis.call('ZSCORE', owners, owner)
    if not state then
        redis.call('SREM', P .. ':active', id)  -- no record (never, but for a hand-made key): nothing to end
    elseif state ~= 'queued' and (not beat or tonumber(beat) <= now - lost_after) then
        local attempt, retries = tonumber(record[4] or '1'), tonumber(record[5] or '0')
        if state ~= 'cancelling' and record[3] and attempt <= retries then
            attempt = attempt + 1
            change(id, 'state', cjson.encode({state = 'queued', attempt = attempt, after = 'worker_lost'}),
                   {'state', 'queued', 'owner', '', 'attempt', attempt, 'started', false})
            set_state(id, state, 'queued')
            running(id, -1)
            redis.call('ZADD', P .. ':queued', field(id, 'order') or 0, id)  -- its first place in the queue
        elseif state == 'cancelling' then
            finish(id, 'cancelled', ARGV[7], false, false, '0', ARGV[3], ARGV[8], ARGV[9], ARGV[10])
        else
            finish(id, 'failed', ARGV[6], false, false, '0', ARGV[3], ARGV[8], ARGV[9], ARGV[10])
        end
        table.insert(changed, redis.call('HGETALL', job_key(id)))
    end
end
-- owners silent ten times as long are forgotten: their jobs have just been ended
redis.call('ZREMRANGEBYSCORE', owners, '-inf', now - 10 * lost_after)
return changed
"""

# allow-oom: the sweep is what frees a full store (maxmemory, noeviction): it runs there whatever
# the order of its deletes and its writes (without the flag each write would be refused while full).
_SWEEP = "#!lua flags=allow-oom\n" + _LIB + r"""
-- ARGV[3..]: now, tombstone's expires, its TTL, max records, the most records to expire (and to
-- remove) in this call: a script holds the whole server while it runs (LongJobs.sweep calls again)
local now, tomb_expires, tomb_ttl, max_records = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local limit = tonumber(ARGV[7])
local ended, tombs = P .. ':ended', P .. ':tombs'
local function expire(id)  -- result and events dropped, a tombstone kept (410) for as long again
    redis.call('ZREM', ended, id)
    redis.call('DEL', P .. ':events:' .. id, P .. ':result:' .. id)
    local state = field(id, 'state')
    if not state then return end  -- Redis dropped it already (nobody swept for a long time)
    redis.call('HDEL', job_key(id), 'result', 'error')
    redis.call('HSET', job_key(id), 'state', 'expired', 'result_file', '0', 'expires', tomb_expires)
    redis.call('EXPIRE', job_key(id), tomb_ttl)
    set_state(id, state, 'expired')
    redis.call('ZADD', tombs, tomb_expires, id)
end
local function remove(id)
    redis.call('ZREM', tombs, id)
    local record = redis.call('HMGET', job_key(id), 'state', 'client', 'idempotency_key')
    if not record[1] then return end
    if record[3] then redis.call('DEL', idem_key(record[2], record[3])) end
    redis.call('DEL', job_key(id))
    count(record[1], -1)
end
local function records()
    return redis.call('SCARD', P .. ':active') + redis.call('ZCARD', ended) + redis.call('ZCARD', tombs)
end
local expired, removed = 0, 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', ended, '-inf', now, 'LIMIT', 0, limit)) do
    expire(id); expired = expired + 1
end
local over = math.min(records() - max_records, limit - expired)
if over > 0 then  -- the oldest finished records go first; active ones are bounded by jobs.max_active
    for _, id in ipairs(redis.call('ZRANGE', ended, 0, over - 1)) do expire(id); expired = expired + 1 end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', tombs, '-inf', now, 'LIMIT', 0, limit)) do
    remove(id); removed = removed + 1
end
over = math.min(records() - max_records, limit - removed)
if over > 0 then
    for _, id in ipairs(redis.call('ZRANGE', tombs, 0, over - 1)) do remove(id); removed = removed + 1 end
end
return {expired, removed}
"""

_CANCELLED_QUEUED = {"error": "cancelled", "message": "the job was cancelled before it ran"}
_CANCELLED_RUNNING = {"error": "cancelled", "message": "the job was cancelled while it ran; its worker was stopped"}
_CANCELLED_LOST = {"error": "cancelled", "message": "the job was cancelled; the instance running it was lost meanwhile"}
_WORKER_LOST = {"error": "worker_lost", "status": 502, "retryable": True,
                "message": "the instance running this job was lost (killed, or its host went down); nothing of it "
                           "runs any more: submit it again"}

# Redis' answers that mean "the store cannot take this now", as opposed to a bug in a script.
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError,
                redis.exceptions.BusyLoadingError, redis.exceptions.ReadOnlyError, redis.exceptions.AuthenticationError)


def _answering(method: Callable) -> Callable:
    """The store's faults as StoreUnavailable, whatever redis-py calls them; and after one, for
    `pause` seconds, StoreUnavailable at once without asking (see RedisStore)."""

    @functools.wraps(method)
    def call(self: "RedisStore", *args: Any, **kwargs: Any) -> Any:
        if self.monotonic() < self._paused_until:
            raise StoreUnavailable(f"the job store at {self.where} did not answer {self.pause:g} s ago or less; "
                                   "not asked again yet")
        try:
            return method(self, *args, **kwargs)
        except _UNAVAILABLE as exc:
            self._paused_until = self.monotonic() + self.pause
            raise StoreUnavailable(f"the job store at {self.where} did not answer: {type(exc).__name__}: {exc}") from exc

    return call


class RedisStore:
    """The server store: Redis, shared by the slow instances of every host that reaches it."""

    def __init__(self, url: str, ttl: float = 3600, max_records: int = 100_000, timeout: float = 0.5,
                 clock=time.time, inline_result_bytes: int = 1 << 62, prefix: str = "jobs", password: str | None = None,
                 pause: float = PAUSE_AFTER_FAULT, monotonic=time.monotonic, tls: dict[str, str] | None = None):
        # After a call the store did not answer, the calls of the next `pause` seconds fail at once
        # without asking it: the instance's calls go one at a time (AsyncStore's one thread), and
        # behind a store that swallows packets each would otherwise wait its full timeout, one
        # after another, and a request behind a few of them for seconds. One call a pause probes it.
        self.pause = pause
        self.monotonic = monotonic
        self._paused_until = -math.inf
        self.ttl = ttl
        self.max_records = max_records
        self.clock = clock
        self.inline_result_bytes = inline_result_bytes
        self.prefix = prefix
        where = redis.connection.parse_url(url)
        self.where = f"{where.get('host', where.get('path'))}:{where.get('port', '')}"  # for messages: no password
        self.db = redis.Redis.from_url(
            url, password=password, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # never again: see the module's docstring
            health_check_interval=0, client_name="fleet-job-store",
            **({"ssl_ca_certs": tls["ca"], "ssl_certfile": tls["cert"], "ssl_keyfile": tls["key"]} if tls else {}))
        self._scripts = {name: self.db.register_script(source) for name, source in (
            ("create", _CREATE), ("start", _START), ("claim", _CLAIM), ("join", _JOIN), ("progress", _PROGRESS),
            ("finish", _FINISH),
            ("cancel", _CANCEL), ("reap", _REAP), ("sweep", _SWEEP))}

    def close(self) -> None:
        self.db.close()

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    def _run(self, script: str, *args: Any) -> Any:
        return self._scripts[script](args=[self.prefix, CHANGES_KEPT, *args])

    def _end_args(self) -> list:
        """now, expires, the record's native TTL (its tombstone's time too), its data's."""
        now = self.clock()
        return [repr(now), repr(now + self.ttl), math.ceil(2 * self.ttl + EXPIRE_GRACE),
                math.ceil(self.ttl + EXPIRE_GRACE)]

    # the interface (job_store.Store)

    @_answering
    def create(self, job: NewJob, max_per_client: int | None = None, max_active: int | None = None) -> tuple[Job, bool]:
        """As SqliteStore.create: the limits are counted in the same script as the insert."""
        fields = {"id": job.id, "task": job.task, "client": job.client, "owner": "", "state": "queued",
                  "args": json.dumps(job.args), "created": repr(self.clock()), "result_file": "0",
                  "idempotency_key": job.idempotency_key, "fingerprint": job.fingerprint,
                  "kwargs": None if job.kwargs is None else json.dumps(job.kwargs), "retries": job.retries,
                  "attempt": 1, "key": job.key}
        pairs = [item for name, value in fields.items() if value is not None for item in (name, value)]
        answer = self._run("create", job.id, job.client, job.idempotency_key or "",
                           "" if max_per_client is None else max_per_client,
                           "" if max_active is None else max_active, *pairs)
        if answer[0] == b"limit":
            raise ActiveLimit(answer[1].decode(), int(answer[2]))
        return _job(answer[1]), answer[0] == b"created"

    @_answering
    def get(self, job_id: str) -> Job | None:
        return _job(self.db.hgetall(self._key("job", job_id)) or None)

    @_answering
    def find(self, client: str, idempotency_key: str) -> Job | None:
        """The client's job submitted with this Idempotency-Key, if its record is still there."""
        job_id = self.db.get(_idem_key(self.prefix, client, idempotency_key))
        return None if job_id is None else self.get(job_id.decode())

    @_answering
    def start(self, job_id: str, owner: str) -> Job | None:
        return _job(self._run("start", job_id, owner, repr(self.clock())))

    @_answering
    def claim(self, owner: str, tasks: list[str], limit: int = 1) -> list[Job]:
        """As SqliteStore.claim, among the oldest CLAIM_SCAN queued jobs (one script holds the server)."""
        if not tasks or limit <= 0:
            return []
        return [_job(record) for record in self._run("claim", owner, repr(self.clock()), limit, CLAIM_SCAN, *tasks)]

    @_answering
    def count_running(self, owner_prefix: str) -> int:
        pipe = self.db.pipeline(transaction=False)  # one round trip for every active job (jobs.max_active)
        for job_id in self.db.smembers(f"{self.prefix}:active"):
            pipe.hmget(self._key("job", job_id.decode()), "owner", "state")
        wanted = owner_prefix.encode()
        return sum(1 for owner, state in pipe.execute()
                   if state in (b"running", b"cancelling") and owner is not None and owner.startswith(wanted))

    @_answering
    def join(self, owner: str, key: str, limit: int) -> list[Job]:
        """As SqliteStore.join, among the oldest CLAIM_SCAN queued jobs."""
        return [_job(record) for record in self._run("join", owner, repr(self.clock()), key, limit, CLAIM_SCAN)]

    @_answering
    def progress(self, job_id: str, done: float, total: float | None, message: str,
                 attempt: int | None = None) -> int | None:
        data = json.dumps({"done": done, "total": total, "message": message})
        return self._run("progress", job_id, repr(float(done)), "" if total is None else repr(float(total)),
                         message, data, "" if attempt is None else attempt)

    @_answering
    def finish(self, job_id: str, state: str, result: bytes | None = None, error: dict | None = None,
               attempt: int | None = None) -> Job | None:
        """As SqliteStore.finish; a result larger than inline_result_bytes is kept under a key of its
        own (result()), so a status read never carries it."""
        if state not in TERMINAL:
            raise ValueError(f"not a terminal state: {state}")
        size = None if result is None else len(result)
        in_file = size is not None and size > self.inline_result_bytes
        return _job(self._run("finish", job_id, state, "" if error is None else json.dumps(error),
                              b"" if result is None else result, "0" if result is None else "1",
                              "" if size is None else size, "1" if in_file else "0",
                              json.dumps(_CANCELLED_RUNNING), *self._end_args(),
                              "" if attempt is None else attempt))

    @_answering
    def cancel(self, job_id: str) -> Job | None:
        return _job(self._run("cancel", job_id, json.dumps(_CANCELLED_QUEUED), *self._end_args()))

    @_answering
    def result(self, job_id: str) -> bytes | None:
        """The succeeded job's result, inline or kept apart; None if it has none (any more)."""
        inline, in_file = self.db.hmget(self._key("job", job_id), "result", "result_file")
        if in_file == b"1":
            return self.db.get(self._key("result", job_id))
        return inline

    @_answering
    def events(self, job_id: str, after: int = 0) -> list[Event]:
        entries = self.db.xrange(self._key("events", job_id), min=f"({after}-0" if after else "-")
        return [Event(int(sid.split(b"-")[0]), f[b"kind"].decode(), json.loads(f[b"data"])) for sid, f in entries]

    @_answering
    def changes(self, after: int) -> tuple[int, dict[str, int]]:
        entries = self.db.xrange(f"{self.prefix}:changes", min=f"({after}-0" if after else "-", count=CHANGES_PER_READ)
        last, jobs = after, {}
        for sid, f in entries:
            last = int(sid.split(b"-")[0])
            jobs[f[b"job"].decode()] = int(f[b"seq"])
        return last, jobs

    @_answering
    def last_position(self) -> int:
        return int(self.db.get(f"{self.prefix}:position") or 0)

    @_answering
    def tallies(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.db.hgetall(f"{self.prefix}:tallies").items()}

    @_answering
    def count_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys((*ACTIVE, *TERMINAL, EXPIRED), 0)
        counts.update({k.decode(): int(v) for k, v in self.db.hgetall(f"{self.prefix}:counts").items() if int(v)})
        return counts

    @_answering
    def count_active(self, client: str | None = None) -> int:
        return self.db.scard(f"{self.prefix}:active" if client is None else self._key("active", client))

    @_answering
    def active_owned_by(self, owner: str) -> list[str]:
        ids = [i.decode() for i in self.db.smembers(f"{self.prefix}:active")]
        return [i for i in ids if self.db.hget(self._key("job", i), "owner") == owner.encode()]

    @_answering
    def beat(self, owner: str) -> None:
        self.db.zadd(f"{self.prefix}:owners", {owner: self.clock()})

    @_answering
    def gone(self, owner: str) -> None:
        self.db.zrem(f"{self.prefix}:owners", owner)

    @_answering
    def reap(self, lost_after: float) -> list[Job]:
        now = self.clock()
        end = self._end_args()
        changed = self._run("reap", repr(now), repr(float(lost_after)), "", json.dumps(_WORKER_LOST),
                            json.dumps(_CANCELLED_LOST), end[1], end[2], end[3])
        return [_job(record) for record in changed]

    @_answering
    def sweep(self, limit: int = SWEEP_BATCH) -> dict[str, int]:
        now = self.clock()
        expired, removed = self._run("sweep", repr(now), repr(now + self.ttl), math.ceil(self.ttl + EXPIRE_GRACE),
                                     self.max_records, limit)
        return {"expired": expired, "removed": removed}

    def record_count(self) -> int:
        """Every record the store holds, tombstones included (what max_records bounds)."""
        p = self.prefix
        with self.db.pipeline(transaction=False) as pipe:
            pipe.scard(f"{p}:active").zcard(f"{p}:ended").zcard(f"{p}:tombs")
            return sum(pipe.execute())


def _idem_key(prefix: str, client: str, key: str) -> str:
    # The client's length in bytes, as Lua's # counts: no client and key can spell another pair's name.
    return f"{prefix}:idem:{len(client.encode())}:{client}:{key}"


_FLOATS = ("created", "started", "finished", "expires", "done", "total")
_INTS = ("seq", "result_bytes", "result_file", "retries", "attempt")


def _job(flat: Any) -> Job | None:
    """A Job from HGETALL's answer (a dict, or a script's flat list of field, value)."""
    if not flat:
        return None
    if isinstance(flat, list):
        flat = dict(zip(flat[::2], flat[1::2]))
    raw = {k.decode(): v for k, v in flat.items()}
    values: dict[str, Any] = {}
    for name in Job.__dataclass_fields__:
        value = raw.get(name)
        if value is None or name == "result":
            values[name] = value
        elif name in _FLOATS:
            values[name] = float(value)
        elif name in _INTS:
            values[name] = int(value)
        else:
            values[name] = value.decode()
    values["result_file"] = values["result_file"] or 0
    values["retries"] = values["retries"] or 0
    values["attempt"] = values["attempt"] or 1
    for name in ("args", "kwargs", "error"):
        values[name] = None if values[name] is None else json.loads(values[name])
    return Job(**values)
