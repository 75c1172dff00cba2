"""The PNG charts: fast latency idle vs flood per configuration, throughput, memory (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from bench.stats import Spread  # noqa: E402

IDLE, FLOOD, ONE = "#4878a8", "#d8703a", "#9aa5b1"


def _bars(ax, x: float, s: Spread | None, width: float, color: str, label: str | None) -> None:
    if s is None:
        return
    ax.bar(x, s.median, width, color=color, label=label,
           yerr=[[s.median - s.low], [s.high - s.median]] if s.n > 1 else None, capsize=3, ecolor="#333333")
    ax.annotate(_short(s.median), (x, s.high if s.n > 1 else s.median), ha="center", va="bottom",
                fontsize=7, xytext=(0, 2), textcoords="offset points")


def _short(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


SLANTED = {"rotation": 35, "ha": "right", "fontsize": 8}  # eighteen names side by side would overlap
LATENCY_COLUMNS = 6  # panels a row: eighteen set-ups in one row made a chart 6,000 pixels wide


def latency(agg: dict, configs: list[str], path: Path, rate: float) -> None:
    columns = min(LATENCY_COLUMNS, len(configs))
    rows = -(-len(configs) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns + 1, 3.6 * rows + 0.6), sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(configs):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, configs):
        figs = agg["configs"].get(name) or {}
        for i, q in enumerate(("p50", "p95", "p99")):
            _bars(ax, i - 0.2, figs.get(f"idle_{q}"), 0.38, IDLE, "idle" if i == 0 else None)
            _bars(ax, i + 0.2, figs.get(f"flood_{q}"), 0.38, FLOOD, "heavy flood" if i == 0 else None)
        ax.set_xticks(range(3), ["p50", "p95", "p99"])
        iso = figs.get("isolation")
        not_judged = figs.get("isolation_not_judged")
        ax.set_title(f"{name}" + (f"\nisolation {iso.median:.2f}" if iso else
                                  f"\nisolation {not_judged.median:.2f}, not judged" if not_judged else
                                  "\n(no heavy route)"), fontsize=10)
        ax.set_yscale("log")
        ax.grid(axis="y", which="both", alpha=0.3)
    for row in axes:
        row[0].set_ylabel(f"GET /fast, ms (open loop {rate:g} req/s)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.suptitle("Fast route latency from the scheduled send time: idle vs heavy flood (median, min–max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def throughput(agg: dict, configs: list[str], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(11, 1.2 * len(configs)), 5.2))
    for i, name in enumerate(configs):
        _bars(left, i, (agg["configs"].get(name) or {}).get("wrk_rps"), 0.6, IDLE, None)
    left.set_xticks(range(len(configs)), configs, **SLANTED)
    left.set_yscale("log")
    left.set_ylabel("GET /fast requests/s (wrk -t1 -c32)")
    left.set_title("Fast route at saturation")
    left.grid(axis="y", which="both", alpha=0.3)
    heavy = [n for n in configs if (agg["configs"].get(n) or {}).get("heavy_jobs_s")]
    for i, name in enumerate(heavy):
        figs = agg["configs"][name]
        _bars(right, i - 0.2, figs.get("heavy_jobs_s"), 0.38, FLOOD, "W workers")
        _bars(right, i + 0.2, figs.get("heavy_w1_jobs_s"), 0.38, ONE, "1 worker")
    labels = []
    for name in heavy:
        eff = agg["configs"][name].get("efficiency")
        labels.append(name + (f"\nefficiency {eff.median:.2f}" if eff else ""))
    right.set_xticks(range(len(heavy)), labels, **SLANTED)
    right.set_ylabel("heavy jobs/s (fib)")
    right.set_title("Heavy throughput")
    right.grid(axis="y", alpha=0.3)
    if heavy:
        handles, labels = right.get_legend_handles_labels()
        unique = dict(zip(labels, handles))  # one entry per kind of bar
        right.legend(unique.values(), unique.keys(), fontsize=8)
    fig.suptitle("Throughput (median, min–max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory(agg: dict, configs: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(9, 0.8 * len(configs)), 4.8))
    for i, name in enumerate(configs):
        figs = agg["configs"].get(name) or {}
        for j, (key, color, label) in enumerate((("rss_idle", IDLE, "RSS idle"), ("rss_load", FLOOD, "RSS under load"),
                                                 ("pss_idle", "#7fa7cf", "PSS idle"), ("pss_load", "#f0a57a", "PSS under load"))):
            _bars(ax, i + (j - 1.5) * 0.2, figs.get(key), 0.19, color, label if i == 0 else None)
    ax.set_xticks(range(len(configs)), configs, **SLANTED)
    ax.set_ylabel("MB, summed over every process")
    ax.set_title("Memory of each configuration (median, min–max)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, agg: dict, configs: list[str], rate: float) -> list[Path]:
    paths = [out / "latency.png", out / "throughput.png", out / "memory.png"]
    latency(agg, configs, paths[0], rate)
    throughput(agg, configs, paths[1])
    memory(agg, configs, paths[2])
    return paths
