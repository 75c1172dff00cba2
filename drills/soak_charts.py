"""`make soak`'s charts (one PNG per figure, over time, faults marked) and its results page."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

FIGURES = (("rss_mb", "resident memory (MB)"), ("fds", "open file descriptors"), ("threads", "threads"),
           ("children", "child processes"))


def draw(watch, report, out: Path) -> list[Path]:
    """soak-<figure>.png: a line per process label (its incarnations one after the other), a
    dotted vertical line per fault, the pool's live workers under the children chart."""
    by_label: dict[str, list] = {}
    for s in watch.series.values():
        by_label.setdefault(s.proc.label, []).append(s)
    paths = []
    for key, title in FIGURES:
        fig, ax = plt.subplots(figsize=(11, 5.5))
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 20 distinct colours: a Dask fleet has ~20 labels
        for label, incarnations in sorted(by_label.items()):
            line = None
            for s in sorted(incarnations, key=lambda s: s.samples[0][0]):
                xs = [t / 60 for t, _ in s.samples]
                ys = [getattr(f, key) for _, f in s.samples]
                kw = {"color": line.get_color()} if line else {"label": label}
                (line,) = ax.plot(xs, ys, linewidth=1, **kw)
        if key == "children" and watch.workers:
            ax.plot([t / 60 for t, _ in watch.workers], [n for _, n in watch.workers], "k--", linewidth=1,
                    label="pool workers (whole fleet)")
        for f in report.faults:
            ax.axvline(f.at / 60, color="grey", linestyle=":", linewidth=0.6)
        ax.set_xlabel("minutes (dotted lines: faults)")
        ax.set_ylabel(title)
        ax.set_title(f"make soak, {report.backend} backend: {title} per long-lived process")
        ax.legend(fontsize=7, ncol=3, loc="upper left", bbox_to_anchor=(0, -0.12))
        fig.tight_layout()
        path = out / f"soak-{key.replace('_mb', '')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown(report, table: str, charts: list[Path]) -> str:
    counts: dict[str, int] = {}
    for f in report.faults:
        counts[f.name] = counts.get(f.name, 0) + 1
    lines = [
        f"# make soak: {report.minutes:g} minutes on the {report.backend} backend",
        "",
        f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node() or 'this machine'}, "
        f"{platform.machine()}, Python {platform.python_version()}. Verdict: "
        f"**{'PASS' if report.passed else 'FAIL'}**.",
        "",
        f"Faults produced: {len(report.faults)} ({', '.join(f'{n} x{c}' for n, c in counts.items())}).",
        "",
        "```",
        table,
        "```",
        "",
        "Faults in order (seconds since the start):",
        "",
        "| at s | fault | what happened | recovered in s |",
        "|---|---|---|---|",
    ]
    lines += [f"| {f.at:.0f} | {f.name} | {(f.error or f.note).replace('|', '/')} | {f.recovered_in:.2f} |"
              for f in report.faults]
    lines += ["", *[f"![{c.stem}]({c.name})" for c in charts], ""]
    return "\n".join(lines)
