"""Memory of a set of processes: resident set (VmRSS) and proportional set (Pss), summed.

RSS counts every shared page once per process, so a forked family (nginx workers, the slow
instance's forkserver and its workers) is over-counted; PSS divides each shared page among the
processes sharing it, so the sum over the whole fleet is what the fleet really occupies. Both are
reported.
"""

from __future__ import annotations

from services.common import procfs


def usage(pids: list[int]) -> dict:
    """{"rss_mb", "pss_mb", "processes"} summed over the pids that are still alive."""
    rss = pss = 0
    counted = 0
    for pid in pids:
        r = procfs.kilobytes(pid, "VmRSS")
        if r is None:
            continue  # exited meanwhile, or a kernel thread
        p = procfs.kilobytes(pid, "Pss", "smaps_rollup")
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
        argv = procfs.argv(pid)
        if argv is None:
            continue
        cmd = " ".join(argv).strip()
        rss = procfs.kilobytes(pid, "VmRSS") or 0
        lines.append(f"{pid} {rss / 1024:.1f} MB {cmd[:140]}")
    return lines
