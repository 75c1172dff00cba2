"""`python -m bench.fanout`: the fan-out routes at fixed request rates, hedging on and off (issue 28).

    .venv/bin/python -m bench.fanout [--quick] [--out bench/results]

Two fleets of the project's own, one with fanout.hedging on and one with it off, both up at once
(an idle fleet costs next to nothing) so that every point is measured on each, one after the
other (source document 004's method: open loop at fixed rates, latency from the scheduled send,
bench/load.py). The upstream service runs as deployed (2 replicas, a median of 2 ms); what a case
changes on a replica goes through its PUT /_control (observe.test_routes). Each point sends at
least 10,000 requests (the full profile) after a warm-up that gives every instance its latency
estimates. The cases, issue 28's target rows:

    straggler  GET /search (20 shards), upstream-01 answering 1 % of its calls in 2 s (0.5 % of
               all calls), 300 ms deadline: p50/p99/p99.9, partial answers, extra upstream load;
               at each of RATES, hedging on and off
    clean      the same without stragglers: hedges per call, p50 on against off
    slow-all   GET /profile with recs slow on every replica: answered at the deadline +-20 ms
               (partial), and afterwards no call left in flight anywhere
    outage     GET /profile with posts 100 % slow for 60 s: how soon every instance's breaker
               opened, hedges within the budget, posts' calls served per profile asked (x 1.06)
    batch      GET /lookup of 200 keys, 150 distinct: multi-gets per request, any key asked twice
    wide       50 requests at once, each a 20-way search: waits for a pooled connection

Writes OUT/fanout.md, OUT/fanout.json and OUT/fanout.png (route p99 and p99.9 against the rate,
hedging on and off). The load generator is this process, on the same 2 cores as the fleet;
its own lateness is in each row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench import machine, subjects
from bench.load import Samples, open_loop
from bench.report import num, table
from bench.stats import percentile
from services.common import metrics_reader
from services.common.settings import load
from services.fanout import budget

HOST = subjects.HOST
RATES = (30, 60, 90)  # searches a second; one costs about 8 ms of CPU (20 calls, both ends): 90/s is 70 % of 2 cores
PROFILES = {
    "full": {"requests": 10_000, "warmup": 300, "rates": RATES, "outage_s": 60, "lookups": 100, "wide": 2_000},
    "quick": {"requests": 300, "warmup": 100, "rates": (30,), "outage_s": 10, "lookups": 10, "wide": 200},
}
DEADLINE_MS = 300
SHARDS = 20
STRAGGLER = {"service": "search", "straggler_rate": 0.01, "straggler_ms": 2000}  # on upstream-01 only
CASES = ("straggler", "clean", "slow_all", "outage", "batch", "wide")
LOOKUP_KEYS = ",".join([f"k{i}" for i in range(150)] + [f"k{i}" for i in range(50)])

# Issue 28's targets, each judged below from the figures.
TARGETS = {
    "straggler_p99_ms": 120, "straggler_p999_ms": 200, "straggler_extra_load": 0.06,
    "clean_hedges": 0.055, "clean_p50_ratio": 1.02,
    "deadline_slack_ms": 20,
    "outage_open_s": 10, "outage_amplification": 1.06,
    "batch_multigets": 2,
    "wide_pool_wait_p99_ms": 1.0,
}


@dataclass
class FanoutFleet:
    """One of the two fleets, and the ports the bench reads and steers."""
    subject: subjects.Fleet
    hedging: bool

    @property
    def fast_ports(self) -> list[int]:
        return [p for _, p in self.subject.settings.instances("fast")]

    @property
    def upstream_ports(self) -> list[int]:
        return [p for _, p in self.subject.settings.instances("upstream")]

    def control(self, port: int, **fields) -> None:
        call("PUT", port, "/_control", fields)

    def reset(self) -> None:
        for port in self.upstream_ports:
            call("PUT", port, "/_control", {"reset": True})
            call("DELETE", port, "/_stats")

    def stats(self) -> list[dict]:
        return [call("GET", port, "/_stats") for port in self.upstream_ports]

    def metric(self, name: str, **labels: str) -> float:
        """A metric of every fast instance, added up."""
        total = 0.0
        for port in self.fast_ports:
            with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as r:
                total += metrics_reader.total(r.read().decode(), name, **labels)
        return total

    def metric_each(self, name: str, **labels: str) -> list[float]:
        found = []
        for port in self.fast_ports:
            with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as r:
                found.append(metrics_reader.total(r.read().decode(), name, **labels))
        return found


def call(method: str, port: int, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", data=data, method=method)
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read() or b"{}")


def run_open_loop(fleet: FanoutFleet, paths: list[str], rate: float, count: int,
                  headers: str = "", max_connections: int = 256) -> Samples:
    """One open-loop run; all paths' samples merged into one."""
    result = asyncio.run(open_loop(HOST, fleet.subject.port, paths, rate, count, drain_timeout=5,
                                   max_connections=max_connections, headers=headers))
    merged = Samples("+".join(sorted({p.split("?")[0] for p in paths})))
    for s in result.values():
        merged.sent += s.sent
        merged.latency_ms += s.latency_ms
        merged.lateness_ms += s.lateness_ms
        merged.statuses.update(s.statuses)
        merged.errors += s.errors
        merged.timeouts += s.timeouts
    return merged


def searches(count: int, tag: str) -> list[str]:
    return [f"/search?q={tag}{i}" for i in range(count)]


def latency_row(s: Samples) -> dict:
    lat = s.latency_ms
    return {"sent": s.sent, "ok": len(lat), "statuses": dict(s.statuses), "errors": s.errors + s.timeouts,
            "p50_ms": percentile(lat, 50) if lat else None, "p99_ms": percentile(lat, 99) if lat else None,
            "p999_ms": percentile(lat, 99.9) if lat else None, "max_ms": max(lat) if lat else None,
            "late_p99_ms": percentile(s.lateness_ms, 99) if s.lateness_ms else None}


# the cases -----------------------------------------------------------------------------------------

def search_point(fleet: FanoutFleet, rate: float, count: int, warmup: int, straggler: bool, tag: str) -> dict:
    """GET /search at `rate`: latency, partial answers, hedges, the upstream's extra load."""
    fleet.reset()
    run_open_loop(fleet, searches(warmup, f"w{tag}"), rate, warmup)  # every instance's estimate
    if straggler:
        fleet.control(fleet.upstream_ports[0], **STRAGGLER)
    for port in fleet.upstream_ports:
        call("DELETE", port, "/_stats")
    before = {e: fleet.metric("fleet_fanout_hedges_total", upstream="search", event=e) for e in ("sent", "won", "denied")}
    partial_before = fleet.metric("fleet_fanout_partial_total", route="/search")
    s = run_open_loop(fleet, searches(count, tag), rate, count, headers=f"X-Request-Deadline-Ms: {DEADLINE_MS}\r\n")
    served = sum(st["calls"]["search"] for st in fleet.stats())
    hedges = {e: fleet.metric("fleet_fanout_hedges_total", upstream="search", event=e) - v for e, v in before.items()}
    wanted = s.sent * SHARDS
    row = latency_row(s)
    row.update(rate=rate, hedging=fleet.hedging, straggler=straggler,
               partial=fleet.metric("fleet_fanout_partial_total", route="/search") - partial_before,
               calls_wanted=wanted, calls_served=served, extra_load=served / wanted - 1 if wanted else None,
               hedges_sent=hedges["sent"], hedges_won=hedges["won"], hedges_denied=hedges["denied"],
               hedge_share=hedges["sent"] / wanted if wanted else None)
    fleet.reset()
    return row


def slow_all(fleet: FanoutFleet, count: int) -> dict:
    """Every replica's recs slow: each profile answers partial at its deadline; nothing left after."""
    fleet.reset()
    for port in fleet.upstream_ports:
        fleet.control(port, service="recs", latency_ms=5000)
    s = run_open_loop(fleet, [f"/profile/{i}" for i in range(count)], 50, count, max_connections=64)
    time.sleep(1)
    left = sum(st["in_flight"] for st in fleet.stats()) + fleet.metric("fleet_fanout_attempts_in_flight")
    row = latency_row(s)
    # Two kinds of answer: those that waited for recs until the deadline, and, once recs' breaker
    # had opened on an instance, those answered at once without it (refused: not called).
    waited = sorted(x for x in s.latency_ms if x >= DEADLINE_MS / 2)
    row.update(deadline_ms=DEADLINE_MS, left_in_flight=left, waited=len(waited), answered_at_once=s.ok - len(waited),
               waited_p01_ms=percentile(waited, 0.1) if waited else None,
               waited_p999_ms=percentile(waited, 99.9) if waited else None,
               recs_refused=fleet.metric("fleet_fanout_call_seconds_count", upstream="recs", outcome="refused"),
               recs_timeout=fleet.metric("fleet_fanout_call_seconds_count", upstream="recs", outcome="timeout"))
    fleet.reset()
    return row


def outage(fleet: FanoutFleet, seconds: float) -> dict:
    """posts 100 % slow for `seconds` under profiles at 50 a second: the breakers, the hedges, the load."""
    fleet.reset()
    warmup = 200
    run_open_loop(fleet, [f"/profile/w{i}" for i in range(warmup)], 50, warmup)
    for port in fleet.upstream_ports:
        call("DELETE", port, "/_stats")
        fleet.control(port, service="posts", latency_ms=5000)
    opened_before = fleet.metric_each("fleet_fanout_breaker_opened_total", upstream="posts")
    sent_before = fleet.metric("fleet_fanout_hedges_total", upstream="posts", event="sent")
    calls_before = fleet.metric("fleet_fanout_call_seconds_count", upstream="posts")
    opened_at: list[float | None] = [None]
    started = time.monotonic()
    stop = threading.Event()

    def watch() -> None:  # when every instance's breaker for posts had opened
        while not stop.wait(0.25):
            now = fleet.metric_each("fleet_fanout_breaker_opened_total", upstream="posts")
            if opened_at[0] is None and all(n > b for n, b in zip(now, opened_before)):
                opened_at[0] = time.monotonic() - started

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    count = int(50 * seconds)
    s = run_open_loop(fleet, [f"/profile/{i}" for i in range(count)], 50, count, max_connections=64)
    stop.set()
    watcher.join()
    served = sum(st["calls"]["posts"] for st in fleet.stats())
    row = latency_row(s)
    calls = fleet.metric("fleet_fanout_call_seconds_count", upstream="posts") - calls_before
    hedges = fleet.metric("fleet_fanout_hedges_total", upstream="posts", event="sent") - sent_before
    row.update(seconds=seconds, warmup_profiles=warmup, opened_after_s=opened_at[0], posts_served=served, profiles=s.sent,
               amplification=served / s.sent if s.sent else None, posts_calls=calls, posts_hedges=hedges,
               hedge_share=hedges / calls if calls else None)
    fleet.reset()
    return row


def batch(fleet: FanoutFleet, count: int) -> dict:
    """GET /lookup of 200 keys, 150 distinct, `count` times one after the other: the multi-gets each
    request sent and the keys in them (its instances' fleet_fanout_batch_keys), and what the
    replicas received (a hedged multi-get reaches both: its keys twice there, by design)."""
    fleet.reset()
    sent, keys, received, hedged_copies = [], [], [], 0
    for _ in range(count):
        for port in fleet.upstream_ports:
            call("DELETE", port, "/_stats")
        before = (fleet.metric("fleet_fanout_batch_keys_count", upstream="items"),
                  fleet.metric("fleet_fanout_batch_keys_sum", upstream="items"))
        with urllib.request.urlopen(f"http://{HOST}:{fleet.subject.port}/lookup?keys={LOOKUP_KEYS}", timeout=5) as r:
            json.loads(r.read())
        sent.append(fleet.metric("fleet_fanout_batch_keys_count", upstream="items") - before[0])
        keys.append(fleet.metric("fleet_fanout_batch_keys_sum", upstream="items") - before[1])
        got = sum(st["multigets"]["items"] for st in fleet.stats())
        received.append(got)
        hedged_copies += got - sent[-1]
    return {"requests": count, "multigets_min": min(sent), "multigets_max": max(sent),
            "keys_min": min(keys), "keys_max": max(keys), "received_max": max(received),
            "hedged_copies": hedged_copies}


def wide(fleet: FanoutFleet, count: int) -> dict:
    """50 searches at once, one after another as each answers: any wait for a pooled connection."""
    fleet.reset()
    run_open_loop(fleet, searches(100, "vw"), 400, 100, max_connections=50)  # the connections, opened
    before = bucket_counts(fleet)
    s = run_open_loop(fleet, searches(count, "ww"), 400, count, max_connections=50,
                      headers="X-Request-Deadline-Ms: 2000\r\n")
    after = bucket_counts(fleet)
    waits = {le: after[le] - before.get(le, 0) for le in after}
    total = waits.get(float("inf"), 0)
    row = latency_row(s)
    row.update(pool_waits=total, pool_wait_p99_ms=quantile_ms(waits, 0.99) if total else 0.0)
    return row


def bucket_counts(fleet: FanoutFleet) -> dict[float, float]:
    found: dict[float, float] = {}
    for port in fleet.fast_ports:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as r:
            for sample in metrics_reader.samples(r.read().decode()):
                if sample.name == "fleet_fanout_pool_wait_seconds_bucket":
                    le = float(sample.labels["le"])
                    found[le] = found.get(le, 0) + sample.value
    return found


def quantile_ms(buckets: dict[float, float], q: float) -> float:
    """The upper bound of the bucket the quantile falls in, in ms (an upper bound of the wait)."""
    total = buckets[float("inf")]
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return 1000 * le
    return float("inf")


# judging and writing -----------------------------------------------------------------------------

def judge(results: dict) -> list[tuple[str, str, str, bool | None]]:
    """(case, target, measured, met) for each of issue 28's targets."""
    rows = []
    on = [r for r in results["straggler"] if r["hedging"]]
    off = {r["rate"]: r for r in results["straggler"] if not r["hedging"]}
    for r in on:
        rows.append((f"straggler at {r['rate']}/s", f"p99 <= {TARGETS['straggler_p99_ms']} ms, p99.9 <= "
                     f"{TARGETS['straggler_p999_ms']} ms, extra load <= {TARGETS['straggler_extra_load']:.0%}",
                     f"p99 {num(r['p99_ms'])} ms, p99.9 {num(r['p999_ms'])} ms (off: {num(off[r['rate']]['p99_ms'])}, "
                     f"{num(off[r['rate']]['p999_ms'])}), extra load {100 * r['extra_load']:.1f} %",
                     r["p99_ms"] is not None and r["p99_ms"] <= TARGETS["straggler_p99_ms"]
                     and r["p999_ms"] <= TARGETS["straggler_p999_ms"]
                     and r["extra_load"] <= TARGETS["straggler_extra_load"]))
    clean_on = next((r for r in results["clean"] if r["hedging"]), None)
    clean_off = next((r for r in results["clean"] if not r["hedging"]), None)
    if clean_on and clean_off:
        ratio = clean_on["p50_ms"] / clean_off["p50_ms"]
        rows.append(("clean upstreams", f"hedges <= {TARGETS['clean_hedges']:.1%} of calls; p50 within 2 % of off",
                     f"hedges {100 * clean_on['hedge_share']:.2f} %; p50 {num(clean_on['p50_ms'])} vs "
                     f"{num(clean_off['p50_ms'])} ms ({ratio:.3f} x)",
                     clean_on["hedge_share"] <= TARGETS["clean_hedges"] and ratio <= TARGETS["clean_p50_ratio"]))
    s = results["slow_all"]
    slack = TARGETS["deadline_slack_ms"]
    rows.append(("every replica of one upstream slow", f"answered at the deadline +-{slack} ms; nothing left after",
                 f"{s['waited']:,} waited for it: p0.1 {num(s['waited_p01_ms'])}, p99.9 {num(s['waited_p999_ms'])} ms "
                 f"against {DEADLINE_MS}; {s['answered_at_once']:,} at once once its breaker opened (p50 "
                 f"{num(s['p50_ms'])} ms); {s['left_in_flight']:.0f} calls in flight after",
                 bool(s["waited"]) and DEADLINE_MS - slack <= s["waited_p01_ms"]
                 and s["waited_p999_ms"] <= DEADLINE_MS + slack and s["max_ms"] <= DEADLINE_MS + 2 * slack
                 and s["left_in_flight"] == 0))
    o = results["outage"]
    allowed = budget_allows(o["posts_calls"], o["seconds"], o["warmup_profiles"])
    rows.append(("one upstream 100 % slow", f"breakers open within {TARGETS['outage_open_s']} s; hedges within the "
                 f"budget; load x <= {TARGETS['outage_amplification']}",
                 f"open after {num(o['opened_after_s'])} s; {o['posts_hedges']:.0f} hedges of {allowed:.0f} allowed "
                 f"({o['posts_calls']:.0f} calls); {o['posts_served']} calls served for {o['profiles']} profiles "
                 f"({o['amplification']:.3f} x)",
                 o["opened_after_s"] is not None and o["opened_after_s"] <= TARGETS["outage_open_s"]
                 and o["posts_hedges"] <= allowed and o["amplification"] <= TARGETS["outage_amplification"]))
    b = results["batch"]
    rows.append(("200 lookups of 150 keys", "2 multi-gets, no key twice",
                 f"{b['multigets_min']:.0f}-{b['multigets_max']:.0f} multi-gets of {b['keys_min']:.0f}-"
                 f"{b['keys_max']:.0f} keys in all, in each of {b['requests']} requests ({b['hedged_copies']:.0f} "
                 "hedged copies reached the other replica too)",
                 b["multigets_max"] == TARGETS["batch_multigets"] == b["multigets_min"]
                 and b["keys_min"] == b["keys_max"] == 150))
    w = results["wide"]
    rows.append(("50 at once x 20-way", f"0 pool queue timeouts; queue wait p99 < {TARGETS['wide_pool_wait_p99_ms']} ms",
                 f"{w['pool_waits']:.0f} waits (p99 <= {num(w['pool_wait_p99_ms'])} ms); {w['errors']} errors, "
                 f"statuses {w['statuses']}",
                 w["pool_wait_p99_ms"] < TARGETS["wide_pool_wait_p99_ms"] and w["errors"] == 0))
    return rows


def budget_allows(calls: float, seconds: float, earlier_calls: float, instances: int = 2) -> float:
    """The hedges the budget allows for `calls` over `seconds`: its share, its floor on every
    instance, and what the bucket may hold when the run begins (the share of the calls just
    before, and budget.CAP_SECONDS of the floor)."""
    f = load(env={}).fanout
    return (f.hedge_budget * (calls + earlier_calls)
            + instances * f.hedge_floor_per_second * (seconds + budget.CAP_SECONDS))


def write(out: Path, results: dict, profile: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fanout.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = ["# Fan-out routes at fixed rates, hedging on and off (issue 28)", "",
             f"`python -m bench.fanout` ({profile} profile), {results['machine']}. Open loop, latency from "
             f"each request's scheduled send; every point {PROFILES[profile]['requests']:,} requests after "
             f"{PROFILES[profile]['warmup']} of warm-up. The load generator runs on the same 2 cores "
             "(its own lateness: `late p99`).", "", "## Targets", ""]
    lines.append(table(["case", "target", "measured", "verdict"],
                       [[c, t, m, "PASS" if ok else "FAIL"] for c, t, m, ok in judge(results)]))
    lines += ["", "## GET /search at fixed rates: upstream-01 a 2 s straggler for 1 % of its calls", ""]
    lines.append(table(["rate /s", "hedging", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "partial", "extra load",
                        "hedges sent / won / denied", "late p99 ms", "statuses", "no answer"],
                       [[str(r["rate"]), "on" if r["hedging"] else "off", num(r["p50_ms"]), num(r["p99_ms"]),
                         num(r["p999_ms"]), num(r["max_ms"]), f"{r['partial']:.0f}", f"{100 * r['extra_load']:.2f} %",
                         f"{r['hedges_sent']:.0f} / {r['hedges_won']:.0f} / {r['hedges_denied']:.0f}",
                         num(r["late_p99_ms"]), statuses(r["statuses"]), str(r["errors"])]
                        for r in results["straggler"]]))
    lines += ["", "`no answer`: the load generator's requests that got none (a connection error in "
              "bench/load.py's client, or none by the end of the run); every answer was a 200."]
    lines += ["", "## Clean upstreams", ""]
    lines.append(table(["rate /s", "hedging", "p50 ms", "p99 ms", "hedges per call", "extra load"],
                       [[str(r["rate"]), "on" if r["hedging"] else "off", num(r["p50_ms"]), num(r["p99_ms"]),
                         f"{100 * r['hedge_share']:.2f} %", f"{100 * r['extra_load']:.2f} %"] for r in results["clean"]]))
    lines += ["", "Charts: `fanout.png` (p99 and p99.9 against the rate, hedging on and off).", ""]
    path = out / "fanout.md"
    path.write_text("\n".join(lines))
    chart(out / "fanout.png", results["straggler"])
    return path


def statuses(counts: dict) -> str:
    return ", ".join(f"{status}: {n:,}" for status, n in sorted(counts.items()))


def chart(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for hedging, color in ((True, "tab:blue"), (False, "tab:red")):
        mine = sorted((r for r in rows if r["hedging"] == hedging), key=lambda r: r["rate"])
        rates = [r["rate"] for r in mine]
        label = "hedging on" if hedging else "hedging off"
        ax.plot(rates, [r["p99_ms"] for r in mine], "o-", color=color, label=f"p99, {label}")
        ax.plot(rates, [r["p999_ms"] for r in mine], "s--", color=color, label=f"p99.9, {label}")
    ax.axhline(DEADLINE_MS, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("GET /search, requests per second (20 calls each)")
    ax.set_ylabel("latency, ms (log)")
    ax.set_yscale("log")
    ax.set_title("A 20-way fan-out with one straggling replica (0.5 % of calls, 2 s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests per point")
    parser.add_argument("--out", default="bench/results", help="where fanout.md, .json and .png go")
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated, of " + ", ".join(CASES) + "; the others are kept from OUT/fanout.json")
    options = parser.parse_args(argv)
    cases = [c for c in options.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; cases: {', '.join(CASES)}")
    profile = "quick" if options.quick else "full"
    p = PROFILES[profile]
    workdir = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    common = {"FLEET_OBSERVE_TEST_ROUTES": "true", "FLEET_FANOUT_SEARCH_SHARDS": str(SHARDS)}
    fleets = [FanoutFleet(subjects.Fleet(workdir / name, overrides={**common, "FLEET_FANOUT_HEDGING": str(on).lower()},
                                         name=f"fanout-{name}"), on)
              for name, on in (("hedging-on", True), ("hedging-off", False))]
    m = machine.machine()
    previous = Path(options.out) / "fanout.json"
    results: dict = json.loads(previous.read_text()) if set(cases) != set(CASES) and previous.exists() else {}
    results.update(profile=profile, machine=f"{m['cores']} cores ({m['cpu_model']}), {m['kernel']}, code "
                   f"{machine.source()}" + (f" ({', '.join(cases)} measured again)" if set(cases) != set(CASES) else ""))
    try:
        for f in fleets:
            f.subject.start()
        if "straggler" in cases:
            results["straggler"] = []
            for rate in p["rates"]:
                for f in fleets:
                    print(f"straggler, {rate}/s, hedging {'on' if f.hedging else 'off'}", flush=True)
                    results["straggler"].append(search_point(f, rate, p["requests"], p["warmup"], True, f"s{rate}"))
        if "clean" in cases:
            results["clean"] = []
            middle = p["rates"][len(p["rates"]) // 2]
            for f in fleets:
                print(f"clean, {middle}/s, hedging {'on' if f.hedging else 'off'}", flush=True)
                results["clean"].append(search_point(f, middle, p["requests"], p["warmup"], False, f"c{middle}"))
        on = fleets[0]
        if "slow_all" in cases:
            print("every replica of recs slow", flush=True)
            results["slow_all"] = slow_all(on, p["requests"])
        if "outage" in cases:
            print(f"posts 100 % slow for {p['outage_s']} s", flush=True)
            results["outage"] = outage(on, p["outage_s"])
        if "batch" in cases:
            print("batched lookups", flush=True)
            results["batch"] = batch(on, p["lookups"])
        if "wide" in cases:
            print("50 at once", flush=True)
            results["wide"] = wide(on, p["wide"])
    finally:
        for f in fleets:
            f.subject.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    path = write(Path(options.out), results, profile)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
