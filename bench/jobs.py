"""Long jobs (issue 26) against their targets, on a fleet the bench starts: `--configs jobs`.

    .venv/bin/python -m bench --configs jobs [--quick] [--repeat N] [--out DIR]

The fleet: deploy/fleet.toml's defaults (local pool) but for two settings, which results.md names:
slow.task_modules adds bench/job_tasks.py (`stamped`, a long job whose progress reports carry the
host's clock, and `blob`, a job with a 100 kB result), and jobs.result_ttl is 240 s: longer than a
wave of finished jobs takes (1,000 at about 6 a second), so that a wave's results are all in the
store at its end, and short enough for the purge to happen within the run. As for every fleet of the bench, the fast routes' per-client
limits are lifted for the bench's own probe (subjects.Fleet); the job routes' limits are not: the
clients spread over loopback addresses (127.0.x.y) as many users would, each within them.

Phases, in this order (W: the slow instance's workers; every figure is one repetition's):
  submit    GET /slow/fib/1 with Prefer: respond-async, open loop at 200 a second from 10
            addresses: the 202's latency from each scheduled send
  progress  W `stamped` jobs (one per worker) reporting 10 times a second, a few streams each
            through the edge: each event's latency, its arrival minus the clock stamped in it
  streams   W `stamped` jobs and 1,000 open streams on the one slow instance, read by 4 processes
            from 40 addresses (25 each, within jobs.max_streams_per_client): the instance's
            event-loop lag (its own fleet_event_loop_lag_seconds, the difference over the window),
            and /fast p99 against the same probe just before the streams opened (the isolation
            rule: at most 2 x that + 0.5 ms)
  cancel    DELETE of a running job: until its worker process is gone; of a queued one (every
            worker busy): until the answer, which must say cancelled
  ids       10,000 random well-formed job ids through the edge, each address within the edge's rate
  results   1,000 jobs with 100 kB results; the store's files and the slow instance's RSS sampled;
            how long after its end each of a sample of jobs answers 410; then as many jobs again
            into the space the first ones left: the second wave's peaks against the first's

Sizes (FULL): each job runs in a job process of its own (services/runner), whose start costs about
0.3 s of a core, so this machine ends about 6 tiny jobs a second: 600 submits and 2 x 1,000
finished jobs take some 14 minutes with the drain and the purge. Issue 26 measured 10,000 a wave when jobs ran in
the slow instances' pools; at 6 a second that is half an hour a wave, for the same figure (the
second wave's peak against the first's).
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from bench import memory, procs
from bench.cpu import ForeignCpu
from bench.httpclient import HttpConnection, HttpError
from bench.load import open_loop
from bench.phases import Sampler, summarize
from bench.report import NOISY_CORES, Target, cell, num, table
from bench.stats import Spread, percentile
from bench.streams import Streams
from bench.subjects import HOST, Fleet
from isolation_verdict import PhaseFigures, latency_limits
from services.common import metrics_reader, procfs
from services.slow.job_store import WAL_SIZE_LIMIT, new_id

TASK_MODULES = "services.slow.tasks,bench.job_tasks"
RESULT_TTL = 240  # jobs.result_ttl for the bench's fleet: longer than a wave of finished jobs takes
SETTINGS = {"FLEET_SLOW_TASK_MODULES": TASK_MODULES, "FLEET_JOBS_RESULT_TTL": str(RESULT_TTL)}

SUBMIT_PATH = "/slow/fib/1"  # a trivial job: the figure is the submission's, not the work's
SUBMIT_RATE = 200
# Submit from as many addresses as keep each within jobs.max_active_per_client (8) while the jobs
# wait for the runner: a job process each, about 6 end a second, so a submit phase's jobs are nearly
# all queued at its end. Each address sends far less than edge.slow_rate_per_second (50).
SUBMITS_PER_SOURCE = 8
FAST_RATE = 200
STREAMS_PER_ADDRESS = 25  # within jobs.max_streams_per_client (32)
ID_SOURCES = 25
RATE_PER_SOURCE = 40  # requests a second from one address at most: within edge.slow_rate_per_second (50)
FILL_CLIENTS = 10  # closed loop, one job each in flight: within the slow line (W + slow.queue_limit)
RESULT_KB = 100
DRAIN_RATE = 3  # queued tiny jobs ended a second, at the least (about 6 here: a job process each)
PURGE_SAMPLE = 50  # the first and the last this many jobs of a wave are watched until they answer 410
# The isolation rule's p99 limit, as `make load-check` applies it (isolation_verdict.py): the p99 of
# each block of BLOCK_SECONDS, the median over the blocks, at most ISOLATION_RATIO x the baseline's
# + its spread from block to block (at least ISOLATION_SLACK_MS). locustfile's --ratio, --slack-ms
# and --block-seconds defaults.
ISOLATION_RATIO, ISOLATION_SLACK_MS, BLOCK_SECONDS = 2.0, 0.5, 5.0
LAG_BOUND = 0.01  # seconds: the loop lag target


@dataclass(frozen=True)
class Profile:
    name: str
    submits: int  # at SUBMIT_RATE
    progress_seconds: float  # the progress phase's window
    progress_streams: int  # per job, in the progress phase
    streams: int  # open at once in the streams phase
    stream_processes: int  # reading them
    baseline_seconds: float  # the fast probe before the streams open
    streams_seconds: float  # the window with them open
    cancels_running: int
    cancels_queued: int
    random_ids: int
    finished_jobs: int  # per wave
    waves: int  # of finished_jobs; a second one goes into the space the first one's purge left
    purge: bool  # wait for the sweep to expire the first wave (result_ttl + up to a sweep's interval)
    # Repetitions of `python -m bench` that run it, unless --repeat says: its figures are steady
    # from one run to the next and one takes 14 minutes, so `make bench` runs it once (its three
    # took 42 of the whole run's three hours).
    repetitions: int = 1


FULL = Profile("full", submits=600, progress_seconds=20, progress_streams=5, streams=1000, stream_processes=4,
               baseline_seconds=20, streams_seconds=40, cancels_running=10, cancels_queued=20, random_ids=10_000,
               finished_jobs=1000, waves=2, purge=True)
QUICK = Profile("quick", submits=300, progress_seconds=5, progress_streams=3, streams=1000, stream_processes=4,
                baseline_seconds=5, streams_seconds=8, cancels_running=3, cancels_queued=5, random_ids=2000,
                finished_jobs=300, waves=1, purge=False)


def addresses(first: int, count: int) -> list[str]:
    """`count` loopback client addresses, numbered from `first`: each phase takes its own, so that the
    edge's per-client limits of one phase never meet another's."""
    return [f"127.0.{n // 250}.{2 + n % 250}" for n in range(first, first + count)]


def make_fleet(workdir: Path, overrides: dict[str, str] | None = None) -> Fleet:
    return Fleet(workdir, overrides={**SETTINGS, **(overrides or {})}, name="jobs")


# pure figures ----------------------------------------------------------------------------------------

def lag_buckets(text: str) -> dict[float, float]:
    """fleet_event_loop_lag_seconds' cumulative buckets from /metrics text: {upper bound: count}."""
    return {float(s.labels["le"]): s.value for s in metrics_reader.samples(text)
            if s.name == "fleet_event_loop_lag_seconds_bucket"}


def bucket_difference(before: dict[float, float], after: dict[float, float]) -> dict[float, float]:
    return {le: after[le] - before.get(le, 0.0) for le in after}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets {upper bound: count}: linear within
    the bucket the quantile falls in (from 0 for the first); the last finite bound if it falls in +Inf."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = le, count
    return lower


def share_within(bound: float, buckets: dict[float, float]) -> float | None:
    """The share of the observations at or under `bound` (one of the buckets' bounds)."""
    total = buckets.get(math.inf, 0)
    return buckets.get(bound, 0) / total if total else None


def block_p99s(latency_ms: list[float], due: list[float]) -> list[float]:
    """The p99 of each block of BLOCK_SECONDS (by due time) of an open-loop run's answers; a last
    block shorter than half of one joins the one before."""
    if not due:
        return []
    start, end = min(due), max(due)
    count = max(1, round((end - start) / BLOCK_SECONDS))
    width = (end - start) / count or 1.0
    blocks: dict[int, list[float]] = {}
    for t, ms in zip(due, latency_ms):
        blocks.setdefault(min(count - 1, int((t - start) // width)), []).append(ms)
    return [percentile(blocks[k], 99) for k in sorted(blocks)]


def isolation(base_blocks: list[float], blocks: list[float]) -> tuple[float, float] | None:
    """(the judged fast p99 beside the load, its limit from the one without): isolation_verdict's
    rule on the blocks' p99s."""
    if not base_blocks or not blocks:
        return None
    middle = statistics.median(base_blocks)
    baseline = PhaseFigures("baseline", "done", judged={"p99": middle},
                            spread={"p99": statistics.median(abs(x - middle) for x in base_blocks)})
    rules = SimpleNamespace(ratio=ISOLATION_RATIO, slack_ms=ISOLATION_SLACK_MS, median_ratio=ISOLATION_RATIO,
                            median_slack_ms=ISOLATION_SLACK_MS)
    return statistics.median(blocks), latency_limits(rules, baseline)["p99"][2]


def purge_delays(sample: list[dict], deadline: float) -> list[float]:
    """Seconds from each watched job's end to its first 410; one never seen expired counts as the
    time to the watch's deadline (a lower bound: at least that late)."""
    return [(job["expired"] if job.get("expired") is not None else deadline) - job["ended"] for job in sample]


def _ms(values: list[float], q: float) -> float | None:
    return percentile(values, q) if values else None


def figures(record: dict) -> dict[str, float | None]:
    """The figures the targets and the tables show, from one repetition's raw measurements."""
    j = record.get("jobs") or {}
    f: dict[str, float | None] = {}
    s = j.get("submit") or {}
    f["submit_p50"], f["submit_p99"] = s.get("p50"), s.get("p99")
    f["submit_not_202"] = (sum(s.get("non_200", {}).values()) + s.get("errors", 0) + s.get("timeouts", 0)
                           if s else None)
    p = j.get("progress") or {}
    f["progress_p50"], f["progress_p99"], f["progress_max"] = p.get("p50"), p.get("p99"), p.get("max")
    st = j.get("streams") or {}
    lag = st.get("lag") or {}
    buckets = {float(k): v for k, v in (lag.get("buckets") or {}).items()}
    base_buckets = {float(k): v for k, v in (lag.get("baseline_buckets") or {}).items()}
    f["streams_open"] = st.get("open")
    f["lag_p99"] = _times1000(histogram_quantile(0.99, buckets)) if buckets else None
    f["lag_within_bound"] = share_within(LAG_BOUND, buckets) if buckets else None
    f["lag_base_p99"] = _times1000(histogram_quantile(0.99, base_buckets)) if base_buckets else None
    f["lag_blocked"] = lag.get("blocked")
    f["streams_cpu"] = lag.get("cpu_cores")
    fast = st.get("fast") or {}
    base = st.get("fast_baseline") or {}
    f["fast_base_p99"], f["fast_streams_p99"] = base.get("p99"), fast.get("p99")
    judged = isolation(base.get("blocks") or [], fast.get("blocks") or [])
    f["fast_blocks_p99"], f["fast_limit"] = judged or (None, None)
    f["fast_base_blocks_p99"] = statistics.median(base["blocks"]) if base.get("blocks") else None
    f["fast_over_limit"] = judged[0] / judged[1] if judged else None
    f["stream_event_p50"], f["stream_event_p99"] = st.get("event_p50"), st.get("event_p99")
    f["stream_rate_min"] = st.get("events_per_stream_min")
    c = j.get("cancel") or {}
    running = [x["gone_ms"] for x in c.get("running", [])]
    queued = [x["answer_ms"] if x.get("state") == "cancelled" else math.inf for x in c.get("queued", [])]
    f["cancel_running_p50"], f["cancel_running_max"] = _ms(running, 50), max(running, default=None)
    f["cancel_queued_p50"], f["cancel_queued_max"] = _ms(queued, 50), max(queued, default=None)
    i = j.get("ids") or {}
    f["ids_sent"] = i.get("sent")
    f["ids_not_404"] = i["sent"] - i["not_found"] if i else None
    f["ids_p99"] = i.get("p99")
    waves = (j.get("results") or {}).get("waves") or []
    for k, w in enumerate(waves[:2], 1):
        f[f"wave{k}_jobs_s"] = w["jobs"] / w["seconds"] if w.get("seconds") else None
        f[f"wave{k}_store_mb"] = w.get("store_peak_mb")
        f[f"wave{k}_rss_mb"] = w.get("rss_peak_mb")
        f[f"wave{k}_wal_mb"] = w.get("wal_peak_mb")
    f["rss_idle_mb"] = (j.get("results") or {}).get("rss_before_mb")
    wal = [f.get(f"wave{k}_wal_mb") for k in (1, 2) if f.get(f"wave{k}_wal_mb") is not None]
    f["wal_peak_mb"] = max(wal) if wal else None
    f["store_growth"] = (f["wave2_store_mb"] / f["wave1_store_mb"]
                         if f.get("wave2_store_mb") and f.get("wave1_store_mb") else None)
    f["rss_growth"] = (f["wave2_rss_mb"] / f["wave1_rss_mb"] if f.get("wave2_rss_mb") and f.get("wave1_rss_mb")
                       else None)
    purge = (j.get("results") or {}).get("purge")
    if purge:
        delays = purge_delays(purge["sample"], purge["deadline"])
        f["purge_after_ttl_s"] = max(delays) - RESULT_TTL if delays else None
        f["purge_store_mb"] = purge.get("store_mb")
        f["purge_rss_mb"] = purge.get("rss_mb")
    else:
        f["purge_after_ttl_s"] = f["purge_store_mb"] = f["purge_rss_mb"] = None
    return f


def _times1000(x: float | None) -> float | None:
    return None if x is None else 1000 * x


def aggregate(records: list[dict]) -> dict[str, Spread | None]:
    figs = [figures(r) for r in records if r.get("config") == "jobs" and r.get("jobs")]
    keys = {k for f in figs for k in f}
    return {k: Spread.of(f.get(k) for f in figs) for k in sorted(keys)}


def _get(key: str) -> Callable[[dict], Spread | None]:
    return lambda agg: (agg.get("jobs") or {}).get(key)


TARGETS = [
    Target("submit → 202, p99 at 200 submits/s", "<=", 20, " ms", _get("submit_p99"), ""),
    Target("submits at 200/s answered other than 202 (refused, failed, unanswered)", "<=", 0, "",
           _get("submit_not_202"), "503 overloaded when the slow line's W + slow.queue_limit places are full"),
    Target("progress event, worker → SSE client through nginx, p99 (10 events/s per job)", "<=", 250, " ms",
           _get("progress_p99"), ""),
    Target("event streams open at once on the one slow instance", ">=", 1000, " streams", _get("streams_open"),
           "its fleet_jobs_streams_open", worst=True),
    Target("1,000 open streams: the slow instance's event-loop lag, p99", "<", 10, " ms", _get("lag_p99"),
           "300 streams: 10-25 ms before this bench"),
    Target("1,000 open streams: fast p99 ÷ its limit by the isolation rule (2 × without + their spread)", "<=", 1.0,
           "", _get("fast_over_limit"), "p99s of 5 s blocks, medians"),
    Target("cancel of a running job → its worker process gone, slowest", "<=", 2500, " ms",
           _get("cancel_running_max"), "", worst=True),
    Target("cancel of a queued job → its answer says cancelled, slowest", "<=", 50, " ms",
           _get("cancel_queued_max"), "", worst=True),
    Target("random job ids through the edge: answers other than 404 not_found", "<=", 0, "", _get("ids_not_404"),
           "", worst=True),
    Target("finished jobs with 100 kB results: the store's peak (database and result files), second wave ÷ first",
           "<=", 1.1, "", _get("store_growth"), "the first wave's space reused; the write-ahead log apart, below"),
    Target("the same: the store's write-ahead log at its peak", "<=", round(WAL_SIZE_LIMIT * 1.05 / 1e6, 1), " MB",
           _get("wal_peak_mb"), "SQLite cuts it back to WAL_SIZE_LIMIT (journal_size_limit) after each checkpoint"),
    Target("finished jobs with 100 kB results: the slow instance's peak RSS, second wave ÷ first", "<=", 1.1, "",
           _get("rss_growth"), ""),
    Target("purged (410) after its end, past jobs.result_ttl, slowest of the sample", "<=", 60, " s",
           _get("purge_after_ttl_s"), "result_ttl + 60 s", worst=True),
]


# the run ---------------------------------------------------------------------------------------------

class JobsBench:
    def __init__(self, fleet: Fleet, profile: Profile, say: Callable[[str], None]):
        self.fleet, self.p, self.say = fleet, profile, say
        self.port = fleet.port
        self.slow_port = fleet.settings.instances("slow")[0][1]
        self.workers = fleet.workers  # running slots: the local pool's workers, or the Dask cluster's threads
        self.store_dir = fleet.run_dir / "jobs"
        self.submit_sources = math.ceil(profile.submits / SUBMITS_PER_SOURCE)
        # runner-01: its fleet_jobs gauge counts the host's long jobs by state, from the store
        self.runner_port = fleet.settings.runner.base_port + 1

    # what the fleet shows

    def store_files(self) -> dict[str, int]:
        sizes = {}
        for name in ("store.sqlite", "store.sqlite-wal"):
            try:
                sizes[name] = (self.store_dir / name).stat().st_size
            except FileNotFoundError:
                sizes[name] = 0
        sizes["results"] = sum(p.stat().st_size for p in (self.store_dir / "results").glob("*.json"))
        return sizes

    def store_mb(self) -> float:
        """The database and its result files: what the records hold. Its write-ahead log apart
        (wal_mb): SQLite cuts it back to jobs' WAL_SIZE_LIMIT (32 MiB) after each checkpoint, and at
        this bench's sizes it swings by tens of percent of the store, whatever the records do."""
        files = self.store_files()
        return (files["store.sqlite"] + files["results"]) / 1e6

    def wal_mb(self) -> float:
        return self.store_files()["store.sqlite-wal"] / 1e6

    def slow_pid(self) -> int | None:
        return next((pid for pid in self.fleet.processes() if "-m services.slow " in procfs.cmdline(pid)), None)

    def rss_mb(self) -> float:
        pid = self.slow_pid()
        return memory.usage([pid])["rss_mb"] if pid else math.nan

    async def metrics(self, port: int | None = None) -> str:
        """slow-01's /metrics, or another program's of the fleet (the runner's: runner_port)."""
        conn = await HttpConnection.open(HOST, port or self.slow_port)
        try:
            status, body = await conn.get("/metrics")
        finally:
            conn.close()
        if status != 200:
            raise RuntimeError(f"/metrics on port {port or self.slow_port} answered {status}")
        return body.decode()

    async def call(self, method: str, path: str, source: str | None = None, headers: str = "",
                   port: int | None = None) -> tuple[int, bytes, dict[str, str]]:
        conn = await HttpConnection.open(HOST, port or self.port, source)
        try:
            status, body = await conn.request(method, path, headers)
            return status, body, conn.headers
        finally:
            conn.close()

    async def job(self, job_id: str, source: str) -> dict:
        status, body, _ = await self.call("GET", f"/jobs/{job_id}", source)
        if status != 200:
            raise RuntimeError(f"GET /jobs/{job_id} answered {status}: {body[:200]!r}")
        return json.loads(body)

    async def until(self, check: Callable, timeout: float, what: str, every: float = 0.02):
        deadline = time.monotonic() + timeout
        while True:
            found = await check()
            if found:
                return found
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
            await asyncio.sleep(every)

    async def slow_health(self) -> dict:
        _, body, _ = await self.call("GET", "/healthz", port=self.slow_port)
        return json.loads(body)

    async def idle(self, timeout: float = 60) -> None:
        """Every job of the earlier phase ended, every worker serving: the next phase starts clean.
        Jobs queued for the job runner count too: the runner's fleet_jobs gauge, which it refreshes
        from the store at each of its beats (jobs.lost_after_seconds / 5), so read only once a beat
        has passed since the phase's last submission."""
        await asyncio.sleep(self.fleet.settings.jobs.lost_after_seconds / 5 + 0.5)

        async def check() -> bool:
            h = await self.slow_health()
            if not (h["running"] == 0 and h["waiting"] == 0 and h["pool"]["workers"] == self.workers):
                return False
            text = await self.metrics(self.runner_port)
            return all(metrics_reader.total(text, "fleet_jobs", state=state) == 0
                       for state in ("queued", "running", "cancelling"))
        await self.until(check, timeout, "the slow instance idle with every worker", every=0.1)

    async def stamped(self, seconds: float, source: str) -> str:
        """A `stamped` job submitted and running: its id."""
        status, body, _ = await self.call("GET", f"/slow/stamped/{seconds:g}", source)
        if status != 202:
            raise RuntimeError(f"a stamped job's submission answered {status}: {body[:200]!r}")
        job_id = json.loads(body)["id"]

        async def running() -> bool:
            return (await self.job(job_id, source))["state"] == "running"
        await self.until(running, 30, f"job {job_id} running")
        return job_id

    async def cancel(self, job_ids: list[str], source: str) -> None:
        for job_id in job_ids:
            await self.call("DELETE", f"/jobs/{job_id}", source)
        for job_id in job_ids:
            async def ended(job_id=job_id) -> bool:
                return (await self.job(job_id, source))["state"] in ("cancelled", "succeeded", "failed")
            await self.until(ended, 30, f"job {job_id} ended")

    # phases

    async def submit(self) -> dict:
        res = await open_loop(HOST, self.port, [SUBMIT_PATH], SUBMIT_RATE, self.p.submits, 20,
                              headers="Prefer: respond-async\r\n", sources=addresses(1000, self.submit_sources),
                              ok_status=202)
        await self.idle(timeout=60 + self.p.submits / DRAIN_RATE)
        return summarize(res[SUBMIT_PATH], ok_status=202)

    async def progress(self) -> dict:
        source = addresses(150, 1)[0]
        ids = [await self.stamped(self.p.progress_seconds + 30, source) for _ in range(self.workers)]
        paths = [f"/jobs/{job_id}/events" for job_id in ids]
        async with Streams(self.port, paths, addresses(160, 1), len(ids) * self.p.progress_streams) as streams:
            await asyncio.sleep(1)  # each stream's replay of what it missed arrives before the window
            streams.start_window()
            await asyncio.sleep(self.p.progress_seconds)
            streams.end_window()
        await self.cancel(ids, source)
        await self.idle()
        r = streams.result
        lat = r["latency_ms"]
        return {"streams": r["open"], "statuses": r["statuses"], "events": len(lat), "p50": _ms(lat, 50),
                "p99": _ms(lat, 99), "max": max(lat, default=None), "closed_early": r["closed_early"]}

    async def fast(self, seconds: float) -> dict:
        """The fast probe: GET /fast open loop at FAST_RATE for `seconds`."""
        return await open_loop(HOST, self.port, ["/fast"], FAST_RATE, int(FAST_RATE * seconds), 10)

    async def loop_state(self) -> dict:
        text = await self.metrics()
        return {"at": time.monotonic(), "buckets": lag_buckets(text),
                "blocked": metrics_reader.total(text, "fleet_event_loop_blocked_total"),
                "cpu": metrics_reader.total(text, "process_cpu_seconds_total"),
                "streams": metrics_reader.total(text, "fleet_jobs_streams_open")}

    async def streams(self) -> dict:
        p = self.p
        source = addresses(180, 1)[0]
        ids = [await self.stamped(3600, source) for _ in range(self.workers)]
        paths = [f"/jobs/{job_id}/events" for job_id in ids]
        before = await self.loop_state()
        base = (await self.fast(p.baseline_seconds))["/fast"]
        after_base = await self.loop_state()
        count = math.ceil(p.streams / STREAMS_PER_ADDRESS)
        async with Streams(self.port, paths, addresses(200, count), STREAMS_PER_ADDRESS, p.stream_processes) as streams:
            await asyncio.sleep(2)  # the replays, and the streams' first events
            start = await self.loop_state()
            streams.start_window()
            fast = (await self.fast(p.streams_seconds))["/fast"]
            streams.end_window()
            end = await self.loop_state()
        await self.cancel(ids, source)
        await self.idle()
        r = streams.result
        lat = r["latency_ms"]
        seconds = end["at"] - start["at"]
        return {
            "requested": p.streams, "open": min(r["open"], int(end["streams"])), "open_at_readers": r["open"],
            "open_at_instance": end["streams"], "statuses": r["statuses"], "errors": r["errors"],
            "closed_early": r["closed_early"], "events": len(lat), "event_p50": _ms(lat, 50), "event_p99": _ms(lat, 99),
            "events_per_stream_min": min(r["events_per_stream_s"], default=None),
            "events_per_stream_p50": _ms(r["events_per_stream_s"], 50),
            "lag": {"buckets": {str(k): v for k, v in bucket_difference(start["buckets"], end["buckets"]).items()},
                    "baseline_buckets": {str(k): v for k, v in
                                         bucket_difference(before["buckets"], after_base["buckets"]).items()},
                    "blocked": end["blocked"] - start["blocked"], "seconds": seconds,
                    "cpu_cores": (end["cpu"] - start["cpu"]) / seconds,
                    "baseline_cpu_cores": (after_base["cpu"] - before["cpu"]) / (after_base["at"] - before["at"])},
            "fast_baseline": {**summarize(base), "blocks": block_p99s(base.latency_ms, base.due)},
            "fast": {**summarize(fast), "blocks": block_p99s(fast.latency_ms, fast.due)},
        }

    async def cancels(self) -> dict:
        source = addresses(260, 1)[0]
        running = []
        for _ in range(self.p.cancels_running):
            await self.idle()  # the worker killed last time has been replaced
            job_id = await self.stamped(600, source)

            async def reporting() -> int | None:
                progress = (await self.job(job_id, source)).get("progress")
                return int(progress["message"].split()[1]) if progress else None
            pid = await self.until(reporting, 10, f"job {job_id}'s first report")
            worker = procs.identify([pid])
            if not worker:
                raise RuntimeError(f"job {job_id}'s worker {pid} is not there")
            sent = time.monotonic()
            status, body, _ = await self.call("DELETE", f"/jobs/{job_id}", source)
            answered = time.monotonic()
            while procs.alive(worker[0]) and time.monotonic() - sent < 10:
                await asyncio.sleep(0.001)
            gone = time.monotonic()
            running.append({"status": status, "state": json.loads(body).get("state"),
                            "answer_ms": 1000 * (answered - sent), "gone_ms": 1000 * (gone - sent),
                            "gone": not procs.alive(worker[0])})
            await self.cancel([job_id], source)
        await self.idle()
        fillers = [await self.stamped(600, source) for _ in range(self.workers)]
        queued = []
        for _ in range(self.p.cancels_queued):
            status, body, _ = await self.call("GET", "/slow/stamped/600", source)
            doc = json.loads(body)
            if status != 202 or doc.get("state") != "queued":
                raise RuntimeError(f"a job behind busy workers answered {status}, {doc.get('state')!r}")
            sent = time.monotonic()
            status, body, _ = await self.call("DELETE", f"/jobs/{doc['id']}", source)
            answered = time.monotonic()
            queued.append({"status": status, "state": json.loads(body).get("state"),
                           "answer_ms": 1000 * (answered - sent)})
        await self.cancel(fillers, source)
        await self.idle()
        return {"running": running, "queued": queued}

    async def ids(self) -> dict:
        statuses: dict[int, int] = {}
        not_found = 0
        latency: list[float] = []
        per = math.ceil(self.p.random_ids / ID_SOURCES)

        async def client(source: str, count: int) -> None:
            nonlocal not_found
            conn = await HttpConnection.open(HOST, self.port, source)
            due = time.monotonic()
            try:
                for _ in range(count):
                    due += 1 / RATE_PER_SOURCE
                    sent = time.monotonic()
                    try:
                        if conn.closed:
                            conn = await HttpConnection.open(HOST, self.port, source)
                        status, body = await conn.get(f"/jobs/{new_id()}")
                    except HttpError:
                        status, body = 0, b""
                    latency.append(1000 * (time.monotonic() - sent))
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 404 and _error_code(body) == "not_found":
                        not_found += 1
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
            finally:
                conn.close()

        sources = addresses(300, ID_SOURCES)
        counts = [min(per, self.p.random_ids - k * per) for k in range(ID_SOURCES)]
        await asyncio.gather(*(client(s, n) for s, n in zip(sources, counts) if n > 0))
        return {"sent": sum(statuses.values()), "not_found": not_found,
                "statuses": {str(k): v for k, v in statuses.items()}, "p50": _ms(latency, 50), "p99": _ms(latency, 99)}

    async def fill(self, wave: int) -> dict:
        """finished_jobs blob jobs, each client waiting for its job's end (Prefer: wait)."""
        done: list[tuple[str, float]] = []  # (job id, when its answer came)
        refused: dict[str, int] = {}
        wanted = self.p.finished_jobs

        async def client(source: str) -> None:
            conn = None
            due = time.monotonic()
            while len(done) < wanted:
                due += 1 / RATE_PER_SOURCE
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                try:
                    if conn is None or conn.closed:
                        conn = await HttpConnection.open(HOST, self.port, source)
                    status, _ = await conn.request("GET", f"/slow/blob/{RESULT_KB}",
                                                   "Prefer: respond-async, wait=30\r\n")
                except HttpError:
                    status = 0
                if status == 200 and len(done) < wanted:
                    done.append((conn.headers["content-location"].rsplit("/", 1)[1], time.monotonic()))
                elif status != 200:
                    refused[str(status)] = refused.get(str(status), 0) + 1
            if conn is not None:
                conn.close()

        started = time.monotonic()
        with Sampler(lambda: (self.store_mb(), self.rss_mb(), self.wal_mb()), 0.5) as sampler:
            await asyncio.gather(*(client(s) for s in addresses(400 + 10 * wave, FILL_CLIENTS)))
        seconds = time.monotonic() - started
        return {"jobs": len(done), "seconds": seconds, "refused": refused, "done": done,
                "store_peak_mb": max([self.store_mb()] + [store for store, _, _ in sampler.samples]),
                "rss_peak_mb": max([self.rss_mb()] + [rss for _, rss, _ in sampler.samples]),
                "wal_peak_mb": max([self.wal_mb()] + [wal for _, _, wal in sampler.samples]),
                "store_after": self.store_files()}

    async def purge(self, done: list[tuple[str, float]]) -> dict:
        """Watch the first and the last jobs of a wave until each answers 410 (result_ttl, then the
        next sweep), or until result_ttl + 90 s after the last one's end."""
        picked = done[:PURGE_SAMPLE] + done[-PURGE_SAMPLE:] if len(done) > 2 * PURGE_SAMPLE else done
        sample = [{"id": job_id, "ended": ended, "expired": None} for job_id, ended in picked]
        deadline = max(job["ended"] for job in sample) + RESULT_TTL + 90
        sources = addresses(380, 4)  # 100 watched jobs a second at most: 25 each, within the edge's rate
        while time.monotonic() < deadline and any(job["expired"] is None for job in sample):
            now = time.monotonic()
            due = [job for job in sample if job["expired"] is None and now >= job["ended"] + RESULT_TTL - 1]
            # Connections of this round only: the edge closes one that waits long for its first request.
            conns = [await HttpConnection.open(HOST, self.port, s) for s in sources] if due else []
            try:
                for k, job in enumerate(due):
                    status, _ = await conns[k % len(conns)].get(f"/jobs/{job['id']}")
                    if status == 410:
                        job["expired"] = time.monotonic()
            finally:
                for conn in conns:
                    conn.close()
            await asyncio.sleep(max(0.0, 1 - (time.monotonic() - now)))
        text = await self.metrics(self.runner_port)  # the runner sweeps the store, and counts its records
        return {"sample": sample, "deadline": deadline, "store_mb": self.store_mb(), "rss_mb": self.rss_mb(),
                "store_files": self.store_files(),
                "succeeded_left": metrics_reader.total(text, "fleet_jobs", state="succeeded"),
                "sweep_seconds_max": _sweep_max(text)}

    async def results(self) -> dict:
        out: dict = {"rss_before_mb": self.rss_mb(), "store_before_mb": self.store_mb(), "waves": []}
        for wave in range(self.p.waves):
            self.say(f"    results: wave {wave + 1}, {self.p.finished_jobs:,} jobs of {RESULT_KB} kB")
            filled = await self.fill(wave)
            done = filled.pop("done")
            out["waves"].append(filled)
            if self.p.purge and wave == 0:
                self.say("    results: waiting for their purge (jobs.result_ttl + the next sweep)")
                out["purge"] = await self.purge(done)
        return out


def _error_code(body: bytes) -> str | None:
    try:
        return json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None


def _sweep_max(text: str) -> float | None:
    """The longest sweep's bucket bound so far (fleet_jobs_store_seconds{operation="sweep"}): how long a
    sweep held the store's thread."""
    buckets = {float(s.labels["le"]): s.value for s in metrics_reader.samples(text)
               if s.name == "fleet_jobs_store_seconds_bucket" and s.labels.get("operation") == "sweep"}
    total = buckets.get(math.inf, 0)
    return min((le for le, n in buckets.items() if n >= total), default=None) if total else None


def measure(fleet: Fleet, profile: Profile, say: Callable[[str], None] = lambda _: None) -> dict:
    """Every phase against the started fleet; the raw measurements of one repetition."""
    bench = JobsBench(fleet, profile, say)

    async def run() -> dict:
        await bench.idle()
        out: dict = {"profile": asdict(profile), "workers": bench.workers, "settings": SETTINGS, "foreign_cores": {}}
        for name, phase in (("submit", bench.submit), ("progress", bench.progress), ("streams", bench.streams),
                            ("cancel", bench.cancels), ("ids", bench.ids), ("results", bench.results)):
            say(name)
            with ForeignCpu(fleet.processes) as foreign:
                out[name] = await phase()
            out["foreign_cores"][name] = foreign.cores
        return out

    return asyncio.run(run())


# the report ------------------------------------------------------------------------------------------

def one_line(record: dict) -> str:
    f = figures(record)
    return (f"submit p99 {num(f['submit_p99'])} ms, progress p99 {num(f['progress_p99'])} ms, "
            f"{num(f['streams_open'], 'int')} streams: loop lag p99 {num(f['lag_p99'])} ms, fast p99 "
            f"{num(f['fast_base_blocks_p99'])} -> {num(f['fast_blocks_p99'])} ms (limit {num(f['fast_limit'])}), "
            "cancel running max "
            f"{num(f['cancel_running_max'])} ms / queued max {num(f['cancel_queued_max'])} ms, "
            f"ids not 404: {num(f['ids_not_404'], 'int')}, purge past TTL {num(f['purge_after_ttl_s'])} s"
            f"  [{record['seconds']:.0f} s]")


def markdown(records: list[dict], agg: dict) -> list[str]:
    """results.md's long-jobs section."""
    J = agg.get("jobs") or {}
    ours = [r for r in records if r.get("config") == "jobs" and r.get("jobs")]
    if not ours:
        return []
    p = ours[0]["jobs"]["profile"]
    g = lambda key, kind="ms": cell(J.get(key), kind)  # noqa: E731
    rows = [[t.figure, f"{t.op} {t.bound:g}{t.unit}", cell(t.get(agg), "ratio" if not t.unit else "ms") + t.unit,
             t.verdict(t.get(agg)), t.anchor] for t in TARGETS]
    out = [
        "## Long jobs (issue 26)",
        "",
        f"`bench/jobs.py` on a fleet of its own: deploy/fleet.toml's defaults (local pool, W = "
        f"{ours[0]['jobs']['workers']} workers, one slow instance) with `slow.task_modules` adding "
        f"`bench/job_tasks.py` (its `stamped` and `blob` tasks) and **`jobs.result_ttl = {RESULT_TTL}`** (longer "
        "than a wave of finished jobs takes, short enough for the purge to happen within the run; the default is "
        "3,600); the fast routes' per-client limits lifted "
        "for the bench's own probe as in every fleet here, the job routes' limits kept (clients spread over "
        "loopback addresses within them). Median over the repetitions with (min–max); the targets about "
        "each case (the streams open, each cancel, every id, the slowest purge) are judged on the worst "
        "repetition, the others on the median.",
        "",
        table(["figure", "target", "measured", "result", "notes"], rows),
        "",
        table(["phase", "what", "figures"], [
            ["submit", f"GET {SUBMIT_PATH} + `Prefer: respond-async`, open loop {SUBMIT_RATE}/s, {p['submits']:,} "
                       f"from {math.ceil(p['submits'] / SUBMITS_PER_SOURCE)} addresses",
             f"202 p50 {g('submit_p50')} ms, p99 {g('submit_p99')} ms; answers other than 202: "
             f"{g('submit_not_202', 'int')}"],
            ["progress", f"W `stamped` jobs, {p['progress_streams']} streams each, {p['progress_seconds']:g} s",
             f"event latency p50 {g('progress_p50')} ms, p99 {g('progress_p99')} ms, max {g('progress_max')} ms"],
            ["streams", f"{p['streams']:,} streams over W jobs, {p['stream_processes']} reader processes, "
                        f"{STREAMS_PER_ADDRESS} per address, {p['streams_seconds']:g} s",
             f"open {g('streams_open', 'int')}; loop lag p99 {g('lag_p99')} ms ({g('lag_base_p99')} ms before they "
             f"opened), share of probes ≤ 10 ms {g('lag_within_bound', 'ratio')}, blocked episodes "
             f"{g('lag_blocked', 'int')}; the instance's CPU {g('streams_cpu', 'ratio')} cores; event latency p50 "
             f"{g('stream_event_p50')} ms, p99 {g('stream_event_p99')} ms; slowest stream "
             f"{g('stream_rate_min')} events/s; /fast p99 {g('fast_base_p99')} → {g('fast_streams_p99')} ms over "
             f"each window, {g('fast_base_blocks_p99')} → {g('fast_blocks_p99')} ms by 5 s blocks (limit "
             f"{g('fast_limit')} ms)"],
            ["cancel", f"{p['cancels_running']} running, {p['cancels_queued']} queued",
             f"running: worker gone p50 {g('cancel_running_p50')} ms, slowest {g('cancel_running_max')} ms; "
             f"queued: answer p50 {g('cancel_queued_p50')} ms, slowest {g('cancel_queued_max')} ms"],
            ["ids", f"{p['random_ids']:,} random ids, {ID_SOURCES} addresses at {RATE_PER_SOURCE}/s each",
             f"sent {g('ids_sent', 'int')}, not 404 not_found {g('ids_not_404', 'int')}, p99 {g('ids_p99')} ms"],
            ["results", f"{p['waves']} wave(s) of {p['finished_jobs']:,} jobs × {RESULT_KB} kB, "
                        f"{FILL_CLIENTS} clients waiting for each (`Prefer: respond-async, wait=30`), at most "
                        f"{RATE_PER_SOURCE}/s each",
             f"jobs/s {g('wave1_jobs_s')} / {g('wave2_jobs_s')}; store peak {g('wave1_store_mb')} / "
             f"{g('wave2_store_mb')} MB, its write-ahead log {g('wave1_wal_mb')} / {g('wave2_wal_mb')} MB; slow instance RSS {g('rss_idle_mb')} before, peak {g('wave1_rss_mb')} / "
             f"{g('wave2_rss_mb')} MB; after the first wave's purge: store {g('purge_store_mb')} MB, RSS "
             f"{g('purge_rss_mb')} MB; purge past the TTL, slowest of {2 * PURGE_SAMPLE}: "
             f"{g('purge_after_ttl_s')} s"],
        ]),
        "",
    ]
    return out


def problems(records: list[dict]) -> list[str]:
    notes = []
    for r in records:
        j = r.get("jobs")
        if r.get("config") != "jobs" or not j:
            continue
        where = f"jobs repetition {r['rep'] + 1}"
        submit = j.get("submit") or {}
        if submit.get("non_200") or submit.get("errors") or submit.get("timeouts"):
            notes.append(f"{where}, submit: {submit['ok']}/{submit['sent']} answered 202; other statuses "
                         f"{submit['non_200'] or 'none'}, connection errors {submit['errors']}, unanswered "
                         f"{submit['timeouts']}")
        s = j.get("streams") or {}
        if s and s.get("open") != s.get("requested"):
            notes.append(f"{where}: {s.get('open')} of {s.get('requested')} streams open (statuses "
                         f"{s.get('statuses')}, errors {s.get('errors')})")
        if s.get("closed_early"):
            notes.append(f"{where}: {s['closed_early']} stream(s) closed during the window")
        for w, wave in enumerate((j.get("results") or {}).get("waves") or [], 1):
            if wave.get("refused"):
                notes.append(f"{where}, results wave {w}: answers other than 200 {wave['refused']}")
        purge = (j.get("results") or {}).get("purge") or {}
        missed = sum(1 for x in purge.get("sample", []) if x.get("expired") is None)
        if missed:
            notes.append(f"{where}: {missed} watched job(s) never answered 410 before the watch's end")
        busy = {phase: cores for phase, cores in (j.get("foreign_cores") or {}).items()
                if cores is not None and cores > NOISY_CORES}
        if busy:
            notes.append(f"{where}: other programs used CPU during " + ", ".join(
                f"{phase} ({cores:.2f} cores)" for phase, cores in busy.items())
                + ": figures of those phases are suspect")
    return notes
