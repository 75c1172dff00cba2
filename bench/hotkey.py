"""The hot-key scenario: many clients asking for a few distinct heavy things at the same moment.

    .venv/bin/python -m bench.hotkey [--rounds N] [--waves N] [--out FILE.md]

Two fleets, interleaved over the rounds: compute once on (the default) and off
(slow.coalesce=false). In each wave, `clients` clients (each from its own loopback address, as
distinct users) send one GET /slow/fib/<n> at the same moment, n from a few values, while an
open-loop probe sends GET /fast at a fixed rate. Per fleet: the answers by status, the jobs the
slow instances ran (their own /metrics), jobs run ÷ distinct keys in flight (target 1.0 with
compute once: one job per distinct request in flight), and /fast p50/p99 during the waves.

Then the edge cache, on the default fleet: a cached task's answer (/slow/primes/<n>, warmed once)
and /fast, interleaved in one open-loop run: a cache hit's p50 ÷ /fast p50 (target ≤ 1.5).
`make bench` runs this after the main benchmark and writes bench/results/hotkey.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from bench import phases, subjects
from bench.httpclient import HttpConnection, HttpError
from bench.levers import Started
from bench.load import open_loop
from services.common import metrics_reader

HOST = subjects.HOST
KEYS = (31, 32, 33)  # fib(31..33): 0.13-0.33 s each here, longer than a wave takes to arrive
CACHED = "/slow/primes/20000000"
VARIANTS = {"compute once (default)": {"FLEET_SLOW_COALESCE": "true"},
            "slow.coalesce=false": {"FLEET_SLOW_COALESCE": "false"}}


def jobs_run(fleet: subjects.Fleet) -> float:
    """Jobs the fleet's slow instances ran, every task and outcome but shed/limited."""
    total = 0.0
    for _, port in fleet.settings.instances("slow"):
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        total += sum(s.value for s in metrics_reader.samples(text) if s.name == "fleet_slow_jobs_total"
                     and s.labels.get("outcome") not in ("shed", "limited", "no_workers", "unavailable"))
    return total


async def wave(port: int, clients: int) -> Counter:
    """Every client sends one heavy request at once; the statuses of their answers."""
    async def one(k: int) -> int:
        try:
            conn = await HttpConnection.open(HOST, port, f"127.0.{1 + k // 250}.{2 + k % 250}")
            try:
                status, _ = await conn.get(f"/slow/fib/{KEYS[k % len(KEYS)]}")
            finally:
                conn.close()
            return status
        except HttpError:
            return 0

    return Counter(await asyncio.gather(*(one(k) for k in range(clients))))


async def waves_with_probe(port: int, waves: int, clients: int, rate: float) -> tuple[Counter, dict]:
    statuses: Counter = Counter()
    span = waves * 1.0  # one wave a second

    async def run_waves() -> None:
        for _ in range(waves):
            started = time.monotonic()
            statuses.update(await wave(port, clients))
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))

    probe, _ = await asyncio.gather(open_loop(HOST, port, ["/fast"], rate, int(rate * span), 10), run_waves())
    return statuses, phases.summarize(probe["/fast"])


def run(rounds: int, waves: int, clients: int, work: Path) -> dict:
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    cache_runs: list[dict] = []
    for r in range(rounds):
        for i, (name, env) in enumerate(VARIANTS.items()):
            fleet = subjects.Fleet(work / f"hot{r}-{i}", overrides=env)
            with Started(fleet):
                asyncio.run(phases.warm_up(fleet, 27))
                before = jobs_run(fleet)
                statuses, fast = asyncio.run(waves_with_probe(fleet.port, waves, clients, 200))
                jobs = jobs_run(fleet) - before
                x = {"requests": waves * clients, "ok": statuses.get(200, 0), "shed": statuses.get(503, 0),
                     "other": sum(v for k, v in statuses.items() if k not in (200, 503)), "jobs": jobs,
                     "jobs_per_key": jobs / (waves * len(KEYS)), "jobs_per_request": jobs / (waves * clients),
                     "fast_p50": fast["p50"], "fast_p99": fast["p99"]}
                runs[name].append(x)
                print(f"  hot key round {r + 1}: {name}: {x['ok']}/{x['requests']} answered 200, "
                      f"{x['shed']} shed, {jobs:.0f} jobs ({x['jobs_per_key']:.2f} per key in flight), "
                      f"/fast p50/p99 {x['fast_p50']:.2f}/{x['fast_p99']:.2f} ms", flush=True)
                if i == 0:
                    cache_runs.append(asyncio.run(cache_hits(fleet)))
                    c = cache_runs[-1]
                    print(f"  cache round {r + 1}: hit p50 {c['hit_p50']:.2f} ms, /fast p50 {c['fast_p50']:.2f} ms, "
                          f"ratio {c['ratio']:.2f}, jobs during the run {c['jobs']:.0f}", flush=True)
    medians = {name: {k: statistics.median(x[k] for x in xs) for k in xs[0]} for name, xs in runs.items()}
    cache = {k: statistics.median(c[k] for c in cache_runs) for k in cache_runs[0]}
    return {"variants": medians, "cache": cache, "runs": runs, "cache_runs": cache_runs,
            "setup": {"rounds": rounds, "waves": waves, "clients": clients, "keys": list(KEYS)}}


async def cache_hits(fleet: subjects.Fleet) -> dict:
    conn = await HttpConnection.open(HOST, fleet.port)
    try:
        status, _ = await conn.get(CACHED)  # the one computation: a MISS
    finally:
        conn.close()
    assert status == 200, status
    before = jobs_run(fleet)
    res = await open_loop(HOST, fleet.port, ["/fast", CACHED], 200, 2000, 10)
    fast, hit = phases.summarize(res["/fast"]), phases.summarize(res[CACHED])
    return {"fast_p50": fast["service_p50"], "hit_p50": hit["service_p50"],
            "ratio": hit["service_p50"] / fast["service_p50"], "jobs": jobs_run(fleet) - before}


def markdown(results: dict) -> str:
    from bench.machine import machine, source
    from bench.report import now, table

    info, s, c = machine(), results["setup"], results["cache"]
    rows = [[name, f"{v['ok']:.0f} / {v['requests']:.0f}", f"{v['shed']:.0f}", f"{v['jobs']:.0f}",
             f"{v['jobs_per_key']:.2f}", f"{v['jobs_per_request']:.3f}", f"{v['fast_p50']:.2f}", f"{v['fast_p99']:.2f}"]
            for name, v in results["variants"].items()]
    on = results["variants"]["compute once (default)"]
    verdict = lambda ok: "**met**" if ok else "**missed**"  # noqa: E731
    return "\n".join([
        "# Hot keys: compute once (bench/hotkey.py)", "",
        f"`python -m bench.hotkey` on {now()}, {source()}; {info['cores']} cores, {info['cpu_model']}. "
        f"Medians of {s['rounds']} interleaved round(s). Each round: {s['waves']} waves, one a second; in each, "
        f"{s['clients']} clients (each its own loopback address) send one GET /slow/fib/<n> at the same moment, "
        f"n in {s['keys']} ({len(s['keys'])} distinct keys), while /fast is probed open-loop at 200 req/s.", "",
        table(["fleet", "answered 200", "shed 503", "jobs run", "jobs ÷ distinct keys in flight", "jobs per request",
               "/fast p50 ms", "/fast p99 ms"], rows), "",
        f"- Target: jobs run ÷ distinct keys in flight = 1.0 with compute once: {on['jobs_per_key']:.2f}, "
        f"{verdict(abs(on['jobs_per_key'] - 1.0) < 0.05)}.",
        f"- Edge cache: a cached answer ({CACHED}, warmed once, then {CACHED} and /fast interleaved open-loop at "
        f"200 req/s): hit p50 {c['hit_p50']:.2f} ms, /fast p50 {c['fast_p50']:.2f} ms, ratio {c['ratio']:.2f} "
        f"(target ≤ 1.5: {verdict(c['ratio'] <= 1.5)}); jobs run meanwhile: {c['jobs']:.0f}.", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotkey", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--waves", type=int, default=10)
    parser.add_argument("--clients", type=int, default=60)
    parser.add_argument("--out", type=Path, help="write the page here (markdown)")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fleet-hotkey-") as work:
        results = run(options.rounds, options.waves, options.clients, Path(work))
    page = markdown(results)
    print(page)
    if options.out:
        options.out.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
