"""Memory of a set of processes: resident set (VmRSS) and proportional set (Pss), summed.

RSS counts every shared page once per process, so a forked family (nginx workers, the slow
instance's forkserver and its workers) is over-counted; PSS divides each shared page among the
processes sharing it, so the sum over the whole fleet is what the fleet really occupies. Both are
reported.
"""

from __future__ import annotations

from pathlib import Path


def _kb(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def usage(pids: list[int]) -> dict:
    """{"rss_mb", "pss_mb", "processes"} summed over the pids that are still alive."""
    rss = pss = 0
    counted = 0
    for pid in pids:
        r = _kb(Path(f"/proc/{pid}/status"), "VmRSS")
        if r is None:
            continue  # exited meanwhile, or a kernel thread
        p = _kb(Path(f"/proc/{pid}/smaps_rollup"), "Pss")
        rss += r
        pss += p if p is not None else r
        counted += 1
    return {"rss_mb": rss / 1024, "pss_mb": pss / 1024, "processes": counted}


def peak(samples: list[dict]) -> dict:
    """The largest of several samples (by RSS), for "under load"."""
    if not samples:
        return {"rss_mb": None, "pss_mb": None, "processes": 0}
    return {
        "rss_mb": max(s["rss_mb"] for s in samples),
        "pss_mb": max(s["pss_mb"] for s in samples),
        "processes": max(s["processes"] for s in samples),
    }


def describe(pids: list[int]) -> list[str]:
    """'pid rss_mb command' for each process, for the raw results."""
    lines = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        rss = _kb(Path(f"/proc/{pid}/status"), "VmRSS") or 0
        lines.append(f"{pid} {rss / 1024:.1f} MB {cmd[:140]}")
    return lines
