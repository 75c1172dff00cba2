"""Fast latency across load levels, idle and under the heavy flood (source document 004's method).

    .venv/bin/python -m bench.levels [--quick] [--configs fleet,fastapi,...] [--rates 250,500,1000,2000]
                                     [--repeat N] [--out DIR]

For each configuration, started once per repetition (repetitions interleaved): its saturation
point first (wrk, closed loop), then GET /fast open loop at each fixed rate and at the saturation
point, each rate idle and then under the flood (the floor: its burners). p50/p99 from the
scheduled send time, the rate achieved, and the load generator's own lateness. Results:
DIR/levels.md and DIR/levels.png (p99 against the offered rate, one line per configuration).

The target (issues 12, 31): at every level up to 80 % of its saturation, the fleet's p99 under the
flood is at most 2 x its idle p99 at that level. The load behaves as remote clients would
(bench/load.py): the probe in a process of its own, the flood's clients each in another at the
lowest priority. The probe is still Python on the same 2 cores: a level where it sent late past
load.LATE_BOUND_MS at p99, idle or flooded, is not judged (its figures are shown with the
lateness), never counted as the subject's failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from bench import phases, subjects, wrk
from bench.levers import Started
from bench.load import LATE_BOUND_MS, HeavyFlood, kept_schedule, probe
from bench.report import cell, num, table
from bench.stats import Spread

HOST = subjects.HOST
# The fleets, the floor to judge them by, and three peers as users deploy them, behind the same
# nginx (issue 31): the two with the lowest fast p99 under the flood in the main run (fastapi,
# gunicorn-dirty-nice) and source document 000's Tornado + Dask. The target is the fleet's alone;
# the six direct peers took 40 minutes of `make bench` for lines beside it, these three take 27.
DEFAULT_CONFIGS = ("fastapi+nginx", "gunicorn-dirty-nice+nginx", "tornado-dask+nginx", "fleet", "fleet-dask", "floor")
RATES = (250, 500, 1000, 2000, 4000)
SECONDS = {"full": 4.0, "quick": 0.5}  # of open-loop sending per cell
MAX_RATIO = 2.0  # the target: p99 under the flood <= 2 x idle p99, up to 80 % of saturation
UP_TO = 0.8


async def fast_cell(subject: subjects.Subject, p: phases.Profile, rate: float, count: int, flooded: bool):
    """/fast open loop at `rate`, alone or under the flood (the floor: its burners)."""
    async def fast():
        return (await probe(HOST, subject.port, ["/fast"], rate, count, p.drain_timeout,
                            max_connections=512))["/fast"]

    if not flooded:
        return await fast()
    if hasattr(subject, "burners"):
        with subject.burners():
            await asyncio.sleep(p.ramp)
            return await fast()
    async with HeavyFlood(HOST, subject.port, f"/slow/fib/{p.heavy_n}", p.heavy_clients):
        await asyncio.sleep(p.ramp)
        return await fast()


def cell_figures(samples) -> dict:
    s = phases.summarize(samples)
    return {k: s[k] for k in ("p50", "p99", "rate", "lateness_p99", "sent", "ok", "non_200", "errors", "timeouts")}


def measure(subject: subjects.Subject, rates: list[float], p: phases.Profile, seconds: float) -> dict:
    asyncio.run(phases.warm_up(subject, p.heavy_n))
    saturation = wrk.run(f"http://{HOST}:{subject.port}/fast", max(1, round(seconds)))["rps"]
    levels = sorted({*rates, round(saturation)})
    out: dict = {"saturation": saturation, "levels": {}}
    for rate in levels:
        # Past the fixed rates (the saturation point) the load generator cannot keep the schedule
        # anyway: one second of it is enough to show that, where four would pile up a long drain.
        count = max(50, int(rate * (seconds if rate <= max(rates) else min(seconds, 1.0))))
        row = {}
        for state in ("idle", "flood"):
            row[state] = cell_figures(asyncio.run(fast_cell(subject, p, rate, count, state == "flood")))
        out["levels"][str(rate)] = row
    return out


def level_judged(cells: dict) -> bool:
    """Both cells of a level measured the subject: the probe kept its schedule idle and flooded."""
    return all(kept_schedule(cells[state]["lateness_p99"]) for state in ("idle", "flood"))


def flood_over_idle(runs: list[dict], rate: float, judged_only: bool = True) -> Spread | None:
    """p99 under the flood ÷ idle p99 at `rate`, over the repetitions (those whose probe kept its
    schedule, unless `judged_only` is false)."""
    ratios = []
    for r in runs:
        key = next((k for k in r["levels"] if float(k) == rate), None)
        cells = r["levels"].get(key) if key else None
        if cells and cells["idle"]["p99"] and cells["flood"]["p99"] is not None \
                and (level_judged(cells) or not judged_only):
            ratios.append(cells["flood"]["p99"] / cells["idle"]["p99"])
    return Spread.of(ratios)


def worst_lateness(runs: list[dict], rate: float) -> float | None:
    values = [c[state]["lateness_p99"] for r in runs for k, c in r["levels"].items() if float(k) == rate
              for state in ("idle", "flood")]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def judge(results: dict[str, list[dict]]) -> tuple[bool | None, list[str]]:
    """The fleet's p99 under the flood ÷ idle p99 at each level up to 80 % of its saturation; the
    floor's at the same level beside it (what the machine alone does at that rate)."""
    runs = results.get("fleet") or []
    if not runs:
        return None, ["the fleet was not measured"]
    saturation = Spread.of(r["saturation"] for r in runs).median
    lines, ok, scored = [], True, 0
    for rate in sorted({float(k) for r in runs for k in r["levels"]}):
        if rate > UP_TO * saturation:
            continue
        s = flood_over_idle(runs, rate)
        floor = flood_over_idle(results.get("floor") or [], rate)
        beside = f"; the floor's at this rate: {cell(floor, 'ratio')}" if floor is not None else ""
        if s is None:  # no repetition kept the schedule at this rate: shown, not scored
            lines.append(f"{rate:,.0f} req/s: not judged: the probe sent late by up to "
                         f"{num(worst_lateness(runs, rate))} ms at p99 (bound {LATE_BOUND_MS:g} ms); p99 flood ÷ idle "
                         f"as measured {cell(flood_over_idle(runs, rate, judged_only=False), 'ratio')}{beside}")
            continue
        passed = s.median <= MAX_RATIO
        ok &= passed
        scored += 1
        lines.append(f"{rate:,.0f} req/s: p99 flood ÷ idle {cell(s, 'ratio')} over {s.n} judged repetition(s) "
                     f"({'pass' if passed else 'FAIL'}, target <= {MAX_RATIO:g}){beside}")
    return (ok if scored else None), lines


def markdown(results: dict[str, list[dict]], command: str, seconds: float) -> str:
    out = ["# Fast latency across load levels", "",
           f"Generated by `{command}`. GET /fast open loop at each rate for {seconds:g} s, idle and under the "
           "heavy flood (the floor: its burners); medians over the repetitions (min–max). Saturation: wrk, "
           "closed loop (its rate is the last row of each table). The probe runs in a process of its own, the "
           "flood's clients each in another, from their own addresses, at the lowest priority (bench/load.py). "
           "Probe late: the probe's own p99 delay past its schedule; a row where it passed "
           f"{LATE_BOUND_MS:g} ms, idle or flooded, in every repetition is marked not judged: the probe (Python, "
           "on the same 2 cores as the subject) could not keep that rate, and the row measures it as much as "
           "the subject.", ""]
    ok, lines = judge(results)
    out += ["## Target (issues 12, 31)", "",
            f"At every level up to {UP_TO:.0%} of its saturation, the fleet's p99 under the flood ≤ "
            f"{MAX_RATIO:g} × its idle p99 at that level (the levels its probe could judge): "
            f"**{'pass' if ok else 'not measured' if ok is None else 'FAIL'}**",
            "", *[f"- {line}" for line in lines], ""]
    for name, runs in results.items():
        sat = Spread.of(r["saturation"] for r in runs)
        out += [f"## {name}", "", f"Saturation (wrk): {cell(sat, 'int')} req/s.", ""]
        rows = []
        for key in sorted({k for r in runs for k in r["levels"]}, key=float):
            def fig(state: str, figure: str, runs=runs, key=key) -> Spread | None:
                return Spread.of(r["levels"][key][state][figure] for r in runs if key in r["levels"])
            judged = any(level_judged(r["levels"][key]) for r in runs if key in r["levels"])
            bound = "" if judged else " (not judged)"
            rows.append([f"{float(key):,.0f}{bound}"] + [cell(fig(st, f), kind) for st in ("idle", "flood")
                                                  for f, kind in (("p50", "ms"), ("p99", "ms"), ("rate", "int"),
                                                                  ("lateness_p99", "ms"))])
        out += [table(["offered req/s", "idle p50", "idle p99", "idle achieved", "idle probe late p99",
                       "flood p50", "flood p99", "flood achieved", "flood probe late p99"], rows), ""]
        # Percentiles count 200s only: say where other answers came instead.
        other = [f"{float(key):,.0f} req/s {state}, repetition {i + 1}: "
                 + ", ".join(f"{status} x {n:,}" for status, n in sorted(c[state]["non_200"].items()))
                 for i, r in enumerate(runs) for key, c in r["levels"].items() for state in ("idle", "flood")
                 if c[state].get("non_200")]
        if other:
            out += ["Answers other than 200 (not in the percentiles): " + "; ".join(other) + ".", ""]
    return "\n".join(out)


def chart(results: dict[str, list[dict]], path: Path) -> None:
    """One panel per configuration (shared axes, so panels compare at a glance): p99 against the
    offered rate, idle (dashed) and under the flood (solid), medians of the repetitions."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(results))
    rows = math.ceil(len(results) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.9 * rows), sharex=True, sharey=True,
                             squeeze=False)
    for ax, (name, runs) in zip(axes.flat, results.items()):
        keys = sorted({k for r in runs for k in r["levels"]}, key=float)
        for state, style, color in (("idle", "--", "C0"), ("flood", "-", "C3")):
            xs, ys = [], []
            for key in keys:
                s = Spread.of(r["levels"][key][state]["p99"] for r in runs if key in r["levels"])
                if s is not None:
                    xs.append(float(key))
                    ys.append(s.median)
            ax.plot(xs, ys, style, marker="o", markersize=3, color=color, label=state)
        ax.set_title(name, fontsize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("offered /fast rate, req/s (open loop; each line's last point: its saturation)", fontsize=9)
    fig.supylabel("fast p99, ms", fontsize=9)
    fig.suptitle("Fast p99 against offered rate, idle (dashed) and under the heavy flood (solid)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.levels", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, short cells")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    parser.add_argument("--rates", default=",".join(map(str, RATES)))
    parser.add_argument("--repeat", type=int)
    parser.add_argument("--out", type=Path, default=subjects.REPO / "bench" / "results")
    o = parser.parse_args(argv)
    configs = [c for c in o.configs.split(",") if c]
    unknown = [c for c in configs if c not in subjects.CONFIGS or c in ("edge", "jobs")]
    if unknown:
        parser.error(f"--configs: unknown or without a fast instance: {', '.join(unknown)}")
    rates = [float(r) for r in o.rates.split(",") if r]
    signal.signal(signal.SIGTERM, _terminate)  # as Ctrl-C: the configuration running is stopped
    p = phases.QUICK if o.quick else phases.FULL
    seconds = SECONDS["quick" if o.quick else "full"]
    repeat = o.repeat or p.repeat
    results: dict[str, list[dict]] = {c: [] for c in configs}
    work = Path(tempfile.mkdtemp(prefix="fleet-levels-"))
    command = "python -m bench.levels " + " ".join(argv if argv is not None else sys.argv[1:])
    for rep in range(repeat):
        for name in configs:
            print(f"[{rep + 1}/{repeat}] {name}", flush=True)
            with Started(subjects.make(name, work / f"rep{rep + 1}" / name)) as subject:  # stopped on any exit
                r = measure(subject, rates, p, seconds)
            results[name].append(r)
            print("  saturation {:,.0f} req/s; ".format(r["saturation"]) + ", ".join(
                f"{float(k):,.0f}: p99 {num(v['idle']['p99'])} -> {num(v['flood']['p99'])} ms"
                for k, v in r["levels"].items()), flush=True)
    o.out.mkdir(parents=True, exist_ok=True)
    (o.out / "levels.json").write_text(json.dumps(results, indent=1))
    (o.out / "levels.md").write_text(markdown(results, command.strip(), seconds))
    chart(results, o.out / "levels.png")
    ok, lines = judge(results)
    print("\n".join(lines) + f"\nresults: {o.out / 'levels.md'}")
    shutil.rmtree(work, ignore_errors=True)  # the subjects' run dirs and logs; kept when a run fails
    return 0


if __name__ == "__main__":
    sys.exit(main())
