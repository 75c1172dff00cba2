"""The isolation check's verdict and report, from the samples of one run.

locustfile.py runs the phases, records every fast and heavy request in a Recorder (a Locust master
merges its workers' samples into one) and calls in here: `figures` turns the samples into each
phase's statistics, `judge` applies the rules to them (PASS, FAIL or INCONCLUSIVE, with the rule
that decided), and `report_text`, `write_csv` and `tab_rows` make the same table for the console,
<prefix>_isolation.csv and the web UI's Isolation tab (isolation_ui.py puts it there, and the
verdict in the exit code). Nothing here imports Locust or gevent, so a verdict can be checked from
made-up samples, as tests/unit/test_isolation_verdict.py does:

    >>> from types import SimpleNamespace
    >>> rules = SimpleNamespace(median_ratio=1.5, median_slack_ms=0.5, ratio=2, slack_ms=0.5, max_lateness_ms=10,
    ...                         min_samples=1000, slow_workers=2, min_heavy_jobs=20, block_seconds=5,
    ...                         stall_ms=100, stall_percent=0.25)
    >>> rec = Recorder(rules, names=["baseline", "mixed"], starts=[0.0, 30.0], ended_at=60.0, ran_out=True)
    >>> rec.fast = [(t / 100, 1.0, True) for t in range(6000)]  # 1 ms answers, 100 a second, both phases
    >>> rec.heavy = [(40 + t / 10, "ok") for t in range(60)]  # the slow path ran 60 heavy jobs ...
    >>> rec.heavy += [(45.0, "shed503")]  # ... and shed one as overloaded: it was saturated
    >>> judge(rec).verdict
    'PASS'
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

PHASES = ("warm-up", "baseline", "mixed", "recovery")
MEDIAN_SAMPLES = 100  # enough for a p50 (a p99 needs --min-samples)
# What a heavy request's answer was (locustfile.py's HeavyUser sorts them): a job the slow path ran
# (200), a shed because every worker and waiting place was taken (503 "overloaded" from the slow
# path: the only proof that it was saturated), a refusal by the edge's per-client limits (429).
# Anything else ("503 no_workers", "502", "504", "connection error", ...) is an error: the slow path
# did not run that job.
HEAVY_OK, HEAVY_SHED, HEAVY_LIMITED = "ok", "shed503", "shed429"
# A hostile client's answers (--hostile-users): its refusals (413 too large, 429 over its limits) are
# the fleet protecting the others, never its failure.
HOSTILE_OK, HOSTILE_REFUSED = "ok", "refused"
# The long-job users' requests (--long-job-users): a submission answered 202, a refusal with
# Retry-After (429 or 503: the fleet shedding, the client waits as told), a job's final status, an
# event stream opened (its own or a watcher's), a cancel. Anything else is an error.
LONG_SUBMITTED, LONG_REFUSED, LONG_STREAM, LONG_CANCEL = "submitted", "refused", "stream", "cancel"
LONG_ENDED = ("succeeded", "cancelled", "failed")


# the samples ----------------------------------------------------------------------------------------

@dataclass
class Recorder:
    """Everything the verdict needs, for one run: phase windows and the samples that fall in them.

    opts are the run's options (locustfile.py's OPTIONS); the verdict reads min_samples,
    slow_workers, min_heavy_jobs, max_lateness_ms, block_seconds, stall_ms, stall_percent and the
    latency limits' median_ratio, median_slack_ms, ratio and slack_ms.
    """

    opts: SimpleNamespace
    starts: list[float] = field(default_factory=list)  # wall-clock start of each entered phase
    names: list[str] = field(default_factory=list)
    ended_at: float | None = None  # when the last phase ended (run over)
    ran_out: bool = False  # the run ended because its last phase did (not stopped early)
    fast: list[tuple[float, float, bool]] = field(default_factory=list)  # start_time, ms, ok
    unanswered: list[float] = field(default_factory=list)  # start_time of fast samples cut short by the end
    late: list[tuple[float, float]] = field(default_factory=list)  # a fast user's tick: time, ms late
    heavy: list[tuple[float, str]] = field(default_factory=list)  # start_time, HEAVY_* or an error's kind
    hostile: list[tuple[float, str]] = field(default_factory=list)  # start_time, HOSTILE_* or an error's kind
    long: list[tuple[float, str]] = field(default_factory=list)  # start_time, LONG_* or an error's kind
    # heavy requests in flight, per process ("local" or a worker's id): half-second slot -> count
    inflight: dict[str, dict[float, int]] = field(default_factory=dict)
    streams: dict[str, dict[float, int]] = field(default_factory=dict)  # long jobs' event streams open, as inflight
    cpu_warning: bool = False
    error: str | None = None  # invalid options
    started: bool = False
    print_on_quit: bool = False  # headless: the table goes last, after Locust's summary
    distributed: bool = False  # the master of workers: the samples come from them
    workers: set[str] = field(default_factory=set)  # workers that sent samples (or were asked for them)
    final: set[str] = field(default_factory=set)  # workers whose last samples arrived
    lost: list[str] = field(default_factory=list)  # workers whose last samples never arrived
    closed: bool = False  # judged: later samples are ignored, so the table stays the verdict's

    def enter(self, phase: str) -> None:
        if not self.names or self.names[-1] != phase:
            self.starts.append(time.time())
            self.names.append(phase)

    def finish(self, ran_out: bool = False) -> None:
        # A started run ends here even if it entered no phase (its options were refused): its
        # verdict is then final (INCONCLUSIVE, with the reason), never "RUNNING" for good.
        if self.ended_at is None and (self.names or self.started):
            self.ended_at = time.time()
            self.ran_out = ran_out

    def window(self, phase: str) -> tuple[float, float] | None:
        """(start, end) of a phase; end is now while it runs."""
        if phase not in self.names:
            return None
        i = self.names.index(phase)
        end = self.starts[i + 1] if i + 1 < len(self.starts) else (self.ended_at or time.time())
        return self.starts[i], end

    def complete(self, phase: str) -> bool:
        i = self.names.index(phase) if phase in self.names else -1
        return i >= 0 and (i + 1 < len(self.starts) or self.ran_out)

    def merge(self, worker: str, batch: dict) -> None:
        """The master's side: adds a batch of one worker's samples (see locustfile.py's Outbox.take)."""
        if self.closed:
            return
        self.workers.add(worker)
        self.fast.extend((t, ms, ok) for t, ms, ok in batch.get("fast", ()))
        self.unanswered.extend(batch.get("unanswered", ()))
        self.late.extend((t, ms) for t, ms in batch.get("late", ()))
        self.heavy.extend((t, kind) for t, kind in batch.get("heavy", ()))
        self.hostile.extend((t, kind) for t, kind in batch.get("hostile", ()))
        self.long.extend((t, kind) for t, kind in batch.get("long", ()))
        self.inflight.setdefault(worker, {}).update((slot, n) for slot, n in batch.get("inflight", ()))
        self.streams.setdefault(worker, {}).update((slot, n) for slot, n in batch.get("streams", ()))
        # A worker's CPU warning counts if it came while the phases ran (it may arrive later).
        end = self.ended_at or math.inf
        if self.starts and any(self.starts[0] <= t <= end for t in batch.get("cpu", ())):
            self.cpu_warning = True
        if batch.get("final"):
            self.final.add(worker)




# the phase figures ----------------------------------------------------------------------------------

def percentile(ordered: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


@dataclass
class PhaseFigures:
    name: str
    state: str  # pending, running, done, stopped (cut short by a stop), skipped
    seconds: float = 0.0
    requests: int = 0
    failures: int = 0
    rate: float = 0.0
    p50: float | None = None  # over the whole phase (the table's columns)
    p95: float | None = None
    p99: float | None = None
    late_p99: float | None = None  # how late the fast users' schedule fired (the probe's own lag)
    stalls: int = 0  # fast answers slower than --stall-ms (+ Locust's lag, see _judge)
    blocks: int = 0  # the phase cut into blocks of about --block-seconds
    clean_blocks: int = 0  # blocks in which Locust kept its schedule (ticks late by p99 <= --max-lateness-ms)
    judged: dict[str, float] = field(default_factory=dict)  # "p50"...: the median over the clean blocks
    spread: dict[str, float] = field(default_factory=dict)  # "p50"...: the clean blocks' median absolute deviation
    heavy_ok: int = 0
    shed503: int = 0
    shed429: int = 0
    heavy_errors: int = 0
    heavy_error_kinds: dict[str, int] = field(default_factory=dict)  # "503 no_workers" -> count
    hostile_ok: int = 0
    hostile_refused: int = 0
    hostile_errors: int = 0
    inflight_median: float | None = None
    inflight_saturated: float = 0.0  # fraction of samples with >= slow_workers heavy requests in flight
    long_kinds: dict[str, int] = field(default_factory=dict)  # the long-job users' requests by LONG_* kind
    long_errors: int = 0  # of them, neither of the LONG_* kinds
    streams_median: float | None = None  # long jobs' event streams open (every process's, added up)
    streams_peak: int = 0


QUANTILES = {"p50": 50, "p95": 95, "p99": 99}


def block_figures(rec: Recorder, f: PhaseFigures, start: float, end: float) -> None:
    """Each percentile judged as the median over the phase's blocks, and its spread from block to block.

    A shared machine's noise comes in bursts (another program's few busy seconds), and Locust's own
    lag with it: one burst moves a whole phase's p99, but only one block's. So each judged phase is
    cut into blocks of about --block-seconds; a block in which Locust's ticks fired more than
    --max-lateness-ms late (p99) is left out (Locust's timings there are its own, not the server's);
    each percentile is the median over the remaining blocks; and how much it varies from block to
    block in the baseline (the median absolute deviation) is the noise the mixed phase is allowed
    beyond the ratio (the slack).
    """
    o = rec.opts
    width = (end - start) / max(1, round((end - start) / o.block_seconds))
    times: dict[int, list[float]] = {}  # block number -> its fast answers (ms)
    late: dict[int, list[float]] = {}
    for t, ms, ok in rec.fast:
        if start <= t < end and ok:
            times.setdefault(int((t - start) // width), []).append(ms)
    for t, ms in rec.late:
        if start <= t < end:
            late.setdefault(int((t - start) // width), []).append(ms)
    f.blocks = len(times)  # blocks with answers in them (a running phase's last one may be partial)
    values: dict[str, list[float]] = {label: [] for label in QUANTILES}
    for i, answers in times.items():
        if i in late and percentile(sorted(late[i]), 99) > o.max_lateness_ms:
            continue
        f.clean_blocks += 1
        answers.sort()
        for label, p in QUANTILES.items():
            values[label].append(percentile(answers, p))
    for label, xs in values.items():
        if xs:
            middle = statistics.median(xs)
            f.judged[label] = middle
            f.spread[label] = statistics.median(abs(x - middle) for x in xs)


def figures(rec: Recorder) -> dict[str, PhaseFigures]:
    out = {}
    for name in PHASES:
        window = rec.window(name)
        if window is None:
            out[name] = PhaseFigures(name, "skipped" if rec.ended_at is not None else "pending")
            continue
        start, end = window
        state = "done" if rec.complete(name) else "running" if rec.ended_at is None else "stopped"
        f = PhaseFigures(name, state, seconds=max(end - start, 1e-9))
        times = sorted(ms for t, ms, ok in rec.fast if start <= t < end and ok)
        f.requests = sum(1 for t, _, _ in rec.fast if start <= t < end)
        f.failures = f.requests - len(times)
        f.rate = f.requests / f.seconds
        f.p50, f.p95, f.p99 = (percentile(times, p) for p in QUANTILES.values())
        f.late_p99 = percentile(sorted(ms for t, ms in rec.late if start <= t < end), 99)
        if name in ("baseline", "mixed"):
            block_figures(rec, f, start, end)
        heavy = Counter(kind for t, kind in rec.heavy if start <= t < end)
        f.heavy_ok, f.shed503, f.shed429 = (heavy.pop(kind, 0) for kind in (HEAVY_OK, HEAVY_SHED, HEAVY_LIMITED))
        f.heavy_error_kinds, f.heavy_errors = dict(heavy), sum(heavy.values())  # what is left is errors
        hostile = Counter(kind for t, kind in rec.hostile if start <= t < end)
        f.hostile_ok, f.hostile_refused = hostile.pop(HOSTILE_OK, 0), hostile.pop(HOSTILE_REFUSED, 0)
        f.hostile_errors = sum(hostile.values())
        samples = added_up(rec.inflight, start, end)
        if samples:
            f.inflight_median = percentile(samples, 50)
            f.inflight_saturated = sum(1 for n in samples if n >= rec.opts.slow_workers) / len(samples)
        f.long_kinds = dict(Counter(kind for t, kind in rec.long if start <= t < end))
        f.long_errors = sum(n for kind, n in f.long_kinds.items()
                            if kind not in (LONG_SUBMITTED, LONG_REFUSED, LONG_STREAM, LONG_CANCEL, *LONG_ENDED))
        streams = added_up(rec.streams, start, end)
        if streams:
            f.streams_median, f.streams_peak = percentile(streams, 50), streams[-1]
        out[name] = f
    bound = stall_bound(rec.opts, out)
    for name, f in out.items():
        window = rec.window(name)
        if window is not None:
            f.stalls = sum(1 for t, ms, ok in rec.fast if window[0] <= t < window[1] and ok and ms > bound)
    return out


def added_up(per_process: dict[str, dict[float, int]], start: float, end: float) -> list[int]:
    """Every process's half-second samples in [start, end), added up slot by slot, ascending."""
    slots: dict[float, int] = {}
    for counts in per_process.values():
        for slot, n in counts.items():
            if start <= slot < end:
                slots[slot] = slots.get(slot, 0) + n
    return sorted(slots.values())


def locust_lag(f: dict[str, PhaseFigures]) -> float:
    """How late Locust's own ticks fired (p99, the worse judged phase): it can add about that much
    to the times it measures."""
    return max((f[name].late_p99 or 0.0) for name in ("baseline", "mixed"))


def stall_bound(o: SimpleNamespace, f: dict[str, PhaseFigures]) -> float:
    """A fast answer slower than this is a stall: --stall-ms, plus what Locust's own lag can add."""
    return o.stall_ms + locust_lag(f)


# the verdict ----------------------------------------------------------------------------------------

@dataclass
class Verdict:
    verdict: str  # PASS, FAIL, INCONCLUSIVE, RUNNING
    reason: str
    checks: list[tuple[bool | None, str]]  # (passed, text); None = not judged yet
    limits: dict[str, float] = field(default_factory=dict)  # "p50", "p95", "p99" -> mixed limit, ms


def latency_limits(o: SimpleNamespace, baseline: PhaseFigures) -> dict[str, tuple[float, float, float]]:
    """Each judged percentile's (ratio, slack, limit): the mixed phase's (median over its blocks) may
    be at most ratio x the baseline's, measured in the same run, + slack ms. The slack is the
    baseline's own spread from block to block (see block_figures), at least --median-slack-ms
    (p50) or --slack-ms (p95, p99): a fixed slack of several baselines would let a regression of that
    many times pass (10 ms on a 2 ms p99 passed a 6 x regression), while the spread grows only with
    the noise the machine really showed."""
    out = {}
    for label, ratio, floor in (("p50", o.median_ratio, o.median_slack_ms), ("p95", o.ratio, o.slack_ms),
                                ("p99", o.ratio, o.slack_ms)):
        base = baseline.judged.get(label)
        if base is not None:
            slack = max(floor, baseline.spread[label])
            out[label] = (ratio, slack, ratio * base + slack)
    return out


def allowed_stalls(o: SimpleNamespace, baseline: PhaseFigures, mixed: PhaseFigures) -> int:
    """Stalls the mixed phase may have: --stall-percent of its fast requests, plus the baseline's own
    share of stalls (the machine's noise, not the heavy load's) up to as much again.

    Why a count over a bound rather than a p99.9: a run has 1,000-2,400 fast samples per phase, and a
    p99.9 of them is the 1st to 3rd slowest answer, a single outlier's value. A count of answers over
    a fixed bound is a binomial count with a known spread: with 1 % of the answers stalled,
    1,000 samples (--min-samples) hold 10 on average, and 2 or fewer (the allowance at 0.25 %) with a
    probability of 0.3 %; 2,400 (the default run) hold 24, and 6 or fewer almost never."""
    allowance = o.stall_percent / 100
    if baseline.requests:
        allowance += min(allowance, baseline.stalls / baseline.requests)
    return math.floor(allowance * mixed.requests + 1e-9)


def judge(rec: Recorder) -> Verdict:
    """The verdict; while the run goes on it is RUNNING, with the verdict so far in its reason."""
    v = _judge(rec)
    if rec.ended_at is None and v.verdict != "RUNNING":
        current = rec.names[-1] if rec.names else "warm-up"
        return Verdict("RUNNING", f"{current} phase in progress; so far {v.verdict}: {v.reason}", v.checks,
                       v.limits)
    return v


def _judge(rec: Recorder) -> Verdict:
    o = rec.opts
    f = figures(rec)
    b, m = f["baseline"], f["mixed"]
    if rec.error:
        return Verdict("INCONCLUSIVE", f"invalid options: {rec.error}", [])
    checks: list[tuple[bool | None, str]] = []
    limits = latency_limits(o, b)
    done = m.state == "done"

    total = sum(x.requests for x in f.values())
    failed = sum(x.failures for x in f.values())
    checks.append((failed == 0, f"fast failures: {failed} of {total} fast requests"))
    if rec.distributed:
        workers = len(rec.workers)
        if rec.lost:
            checks.append((False, f"the last samples of {len(rec.lost)} of {workers} Locust workers never "
                                  f"arrived: {', '.join(rec.lost)}"))
        elif not workers:
            checks.append((False if rec.ended_at is not None else None, "no Locust worker took part so far"))
        else:
            checks.append((True if rec.closed else None,
                           f"samples from {workers} Locust worker(s)" + (", all in" if rec.closed else " so far")))
    cpu = rec.cpu_warning
    checks.append((not cpu, "Locust's CPU " + ("went above 90%: its timings are suspect" if cpu
                                               else "stayed below 90%")))
    b_ok = b.requests - b.failures
    m_ok = m.requests - m.failures
    checks.append((b_ok >= o.min_samples if b.state == "done" else None,
                   f"baseline fast samples: {b_ok} (need {o.min_samples})"))
    # The slow path must have run the heavy load: jobs completed (200s), not only answers. A slow
    # path that cannot run jobs answers at once (503 no_workers, 502, ...) and never slows anything.
    heavy_sent = m.heavy_ok + m.shed503 + m.shed429 + m.heavy_errors
    ran_jobs = m.heavy_ok >= o.min_heavy_jobs
    errors = ", ".join(f"{kind} x {n:,}" for kind, n in sorted(m.heavy_error_kinds.items(), key=lambda kv: -kv[1]))
    checks.append((ran_jobs if done else None,
                   f"the slow path ran the heavy load: {m.heavy_ok:,} heavy jobs completed in the mixed phase "
                   f"(need {o.min_heavy_jobs}), {m.heavy_errors:,} heavy errors" + (f" ({errors})" if errors else "")))
    busy = m.shed503 > 0 or m.inflight_saturated >= 0.9
    saturated = busy and ran_jobs
    checks.append((saturated if done else None,
                   f"heavy load saturated the slow path: {m.shed503} shed with 503 overloaded, heavy in flight "
                   f">= {o.slow_workers} in {m.inflight_saturated:.0%} of samples "
                   f"(median {fmt(m.inflight_median, 0)})"))
    hostile = m.hostile_ok + m.hostile_refused + m.hostile_errors
    if hostile:  # --hostile-users: shown, not judged (its refusals are the fleet protecting the others)
        checks.append((True, f"a hostile fast client ran beside them (not judged): {hostile:,} requests, "
                             f"{m.hostile_refused:,} refused (413/429), {m.hostile_errors:,} errors"))
    long_missing = long_jobs_check(o, m, checks, done)
    lag = locust_lag(f)
    allowed = allowed_stalls(o, b, m)
    stalled = m.stalls > allowed
    checks.append((not stalled if done else None,
                   f"mixed stalls (fast answers over {o.stall_ms:g} + Locust's lag {fmt(lag)} ms): {m.stalls} of "
                   f"{m.requests:,} (allowed {allowed}: {o.stall_percent:g}% + the baseline's {b.stalls} of "
                   f"{b.requests:,})"))
    # Locust's lag in a block makes that block's timings Locust's: it is not judged, and a phase
    # needs half of its blocks judged.
    late = [x for x in (b, m) if x.state == "done" and x.clean_blocks * 2 < x.blocks]
    late_ok = not late if done else None
    checks.append((late_ok, f"the fast users kept their schedule (ticks late by p99 <= {o.max_lateness_ms:g} ms) in "
                            f"{b.clean_blocks} of {b.blocks} baseline blocks and {m.clean_blocks} of {m.blocks} mixed "
                            f"blocks (need half; late by p99 {fmt(b.late_p99)} and {fmt(m.late_p99)} ms overall)"))
    checks.append((m_ok >= o.min_samples if done else None,
                   f"mixed fast samples: {m_ok} (need {o.min_samples})"))
    slower, whole_slower = [], []
    # A whole phase's figure over its limit by more than Locust's lag is the server's, whatever
    # Locust's state (its lag can add about that much, not more).
    beyond_lag = False
    for label, (ratio, slack, limit) in limits.items():
        value = m.judged.get(label)
        ok = value <= limit if done and value is not None else None
        if ok is False:
            slower.append(f"{label} {fmt(value)} ms > {fmt(limit)} ms")
        whole = getattr(m, label)
        if done and whole is not None and whole > limit:
            whole_slower.append(f"{label} {fmt(whole)} ms > {fmt(limit)} ms")
            beyond_lag |= whole > limit + lag
        checks.append((ok, f"mixed {label} {fmt(value)} ms vs limit {ratio:g} x {fmt(b.judged.get(label))} + "
                           f"{fmt(slack)} = {fmt(limit)} ms"))

    def result(verdict: str, reason: str) -> Verdict:
        return Verdict(verdict, reason, checks, {label: limit for label, (_, _, limit) in limits.items()})

    if failed:
        return result("FAIL", f"{failed} fast request(s) failed: the fast routes must never fail")
    if rec.lost:
        return result("INCONCLUSIVE", f"the last samples of {len(rec.lost)} Locust worker(s) never reached the "
                                      "master, so fast samples (and failures) may be missing")
    if rec.distributed and not rec.workers and rec.ended_at is not None:
        return result("INCONCLUSIVE", "no Locust worker took part (the master runs no users): start the workers "
                                      "first (--expect-workers makes a headless master wait for them)")
    if not done:
        if rec.ended_at is not None:
            return result("INCONCLUSIVE", "the run stopped before the mixed phase ended")
        current = rec.names[-1] if rec.names else "warm-up"
        return result("RUNNING", f"{current} phase in progress")
    if heavy_sent and not ran_jobs:
        return result("FAIL", f"the slow path did not run the heavy load: {m.heavy_ok:,} heavy jobs completed in "
                              f"the mixed phase (need {o.min_heavy_jobs})" + (f"; {errors}" if errors else ""))
    if cpu:
        return result("INCONCLUSIVE", "Locust's own CPU went above 90%, so its timings cannot be trusted; "
                                      "run it on a quieter machine or with fewer users")
    if b_ok < o.min_samples:
        return result("INCONCLUSIVE", f"only {b_ok} baseline fast samples (need {o.min_samples}): "
                                      "raise --fast-users, --fast-rate or --baseline-seconds")
    if not saturated:
        return result("INCONCLUSIVE", "nothing shows the heavy load saturated the slow path (no 503 overloaded, "
                                      "too few heavy requests in flight), so the mixed phase proves nothing: raise "
                                      "--heavy-users or use heavier tasks")
    if stalled:
        return result("FAIL", f"the heavy load stalled the fast routes: {m.stalls} mixed fast answers over "
                              f"{fmt(stall_bound(o, f))} ms (allowed {allowed})")
    if late and not beyond_lag:
        return result("INCONCLUSIVE", f"Locust fell behind its own schedule (ticks late by p99 > "
                                      f"{o.max_lateness_ms:g} ms in {late[0].blocks - late[0].clean_blocks} of "
                                      f"{late[0].blocks} blocks of the {late[0].name} phase), so its timings cannot "
                                      "be trusted: run it on a quieter machine, or with LOCUST_WORKERS=2")
    slowed = "the heavy load slowed the fast routes: mixed "
    if m_ok < o.min_samples:
        # A median needs far fewer samples than a p99: a p50 over its limit by more than Locust's
        # lag, on 100 samples or more, is a FAIL even when a lagging Locust sent fewer than --min-samples.
        p50_limit = limits.get("p50", (0, 0, math.inf))[2]
        if m_ok >= MEDIAN_SAMPLES and m.p50 is not None and m.p50 > p50_limit + lag:
            return result("FAIL", slowed + ", ".join(whole_slower))
        return result("INCONCLUSIVE", f"only {m_ok} mixed fast samples (need {o.min_samples})")
    if late:  # too few blocks to judge, but the whole phase went over a limit by more than Locust's lag
        return result("FAIL", slowed + ", ".join(whole_slower) + " (the whole phase)")
    if slower:
        return result("FAIL", slowed + ", ".join(slower))
    if long_missing:  # less load than asked: a FAIL above stands, a PASS would claim too much
        return result("INCONCLUSIVE", f"{long_missing}, so the mixed phase does not show the fast routes beside "
                                      "them: raise --long-job-users, or use longer long jobs")
    return result("PASS", "the fast routes kept their baseline latency while the slow path was saturated"
                  + (" and long jobs ran" if getattr(o, "long_job_users", 0) else ""))


def long_jobs_check(o: SimpleNamespace, m: PhaseFigures, checks: list[tuple[bool | None, str]], done: bool) -> str:
    """The long-job users' rule (--long-job-users, --long-job-streams), added to `checks`: their
    requests are never fast samples, but a mixed phase claimed to run long jobs and N open event
    streams must have: a job submitted, and at least 90 % of the N streams open in half of its
    samples (the median). Returns what was missing ("" if nothing, or if none were asked for)."""
    users, asked = getattr(o, "long_job_users", 0), getattr(o, "long_job_streams", 0)
    k = m.long_kinds
    if not users and not k:
        return ""
    submitted, held = k.get(LONG_SUBMITTED, 0), m.streams_median or 0
    missing = []
    if users and not submitted:
        missing.append("no long job was submitted (202) in the mixed phase")
    if held < 0.9 * asked:
        missing.append(f"only {fmt(held, 0)} event streams were open (median) of the {asked} asked")
    ended = ", ".join(f"{k.get(state, 0):,} {state}" for state in LONG_ENDED)
    checks.append((not missing if done else None,
                   f"long jobs ran beside them (their requests are not fast samples): {submitted:,} submitted "
                   f"(need 1), {k.get(LONG_REFUSED, 0):,} refused 429/503 and retried as Retry-After said; ended "
                   f"{ended}; {k.get(LONG_CANCEL, 0):,} cancels, {k.get(LONG_STREAM, 0):,} streams opened, "
                   f"{m.long_errors:,} errors; event streams open: median {fmt(m.streams_median, 0)} "
                   f"(need {math.ceil(0.9 * asked)} of {asked} asked), peak {m.streams_peak:,}"))
    return "; ".join(missing) if done else ""


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


# the report: console, CSV, web UI -------------------------------------------------------------------

COLUMNS = [  # key (one lowercase word: the web UI camel-cases keys), title
    ("phase", "Phase"), ("state", "State"), ("seconds", "Seconds"), ("requests", "Fast requests"),
    ("rate", "Fast req/s"), ("failures", "Fast failures"), ("p50", "p50 ms"), ("p95", "p95 ms"),
    ("p99", "p99 ms"), ("stalls", "Stalls"), ("late", "Probe late p99 ms"), ("heavy", "Heavy done"), ("shed", "Heavy shed 503/429"), ("inflight", "Heavy in flight"),
    ("streams", "Job streams open"), ("check", "Check"),
]


def table_rows(rec: Recorder) -> list[dict[str, str]]:
    f = figures(rec)
    v = judge(rec)
    rows = []
    for name in PHASES:
        x = f[name]
        check = ""
        if name == "baseline":
            check = "reference"
        elif name == "mixed" and v.limits:
            check = ", ".join(f"{label} <= {fmt(limit)}" for label, limit in v.limits.items())
        elif name in ("warm-up", "recovery"):
            check = "not judged"
        if x.state in ("pending", "skipped"):
            rows.append({**{k: "-" for k, _ in COLUMNS}, "phase": name, "state": x.state, "check": check})
            continue
        rows.append({
            "phase": name, "state": x.state, "seconds": fmt(x.seconds),
            "requests": f"{x.requests:,}", "rate": fmt(x.rate), "failures": str(x.failures),
            "p50": fmt(x.p50), "p95": fmt(x.p95), "p99": fmt(x.p99), "stalls": str(x.stalls), "late": fmt(x.late_p99),
            "heavy": f"{x.heavy_ok + x.heavy_errors:,}" + (f" ({x.heavy_errors:,} errors)" if x.heavy_errors else ""),
            "shed": f"{x.shed503:,} / {x.shed429:,}", "inflight": fmt(x.inflight_median, 0),
            "streams": fmt(x.streams_median, 0), "check": check,
        })
    blank = {k: "" for k, _ in COLUMNS}
    rows.append({**blank, "phase": "VERDICT", "state": v.verdict, "check": v.reason})
    for ok, text in v.checks:
        rows.append({**blank, "phase": "rule", "state": "ok" if ok else "pending" if ok is None else "BROKEN",
                     "check": text})
    return rows


def unanswered_count(rec: Recorder) -> int:
    """Fast requests in the phase windows that the end of the run cut short (counted in the table,
    never in Locust's own stats, which only see answers)."""
    start, end = rec.starts[0] if rec.starts else 0.0, rec.ended_at or math.inf
    return sum(1 for t in rec.unanswered if start <= t < end)


def report_text(rec: Recorder) -> str:
    rows = table_rows(rec)
    keys = [k for k, _ in COLUMNS if k != "check"]
    titles = dict(COLUMNS)
    rows = rows[:len(PHASES)]
    widths = {k: max(len(titles[k]), *(len(r[k]) for r in rows)) for k in keys}
    lines = ["", "Isolation check: the fast routes, baseline vs mixed (fast + heavy flood)",
             "  ".join(titles[k].ljust(widths[k]) if k == "phase" else titles[k].rjust(widths[k]) for k in keys)]
    for r in rows:
        lines.append("  ".join(r[k].ljust(widths[k]) if k == "phase" else r[k].rjust(widths[k]) for k in keys))
    v = judge(rec)
    lines.append("rules:")
    lines += [f"  {'ok' if ok else 'not judged' if ok is None else 'BROKEN':>10}  {text}" for ok, text in v.checks]
    cut_short = unanswered_count(rec)
    if cut_short:
        lines.append(f"note: {cut_short:,} fast requests were still unanswered when the run ended; "
                     "each counts with the time it had waited")
    lines.append(f"VERDICT: {v.verdict}: {v.reason}")
    return "\n".join(lines)


def write_csv(rec: Recorder, path: str) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([title for _, title in COLUMNS])
        for row in table_rows(rec):
            writer.writerow([row[k] for k, _ in COLUMNS])


def tab_rows(rec: Recorder) -> list[dict[str, str]]:
    """The web UI's Isolation tab: the table, or before the first run, where the verdict will appear."""
    if not rec.started:
        return [{"phase": "VERDICT", "state": "not started", "check": "start a run: the verdict appears here"}]
    return table_rows(rec)

