"""What a bench run ran on, asked of the system: the machine (cores, CPU model, memory, OS, kernel,
versions of Python, nginx, tornado, wrk, supervisor, matplotlib) and the code measured (the commit,
and whether the work tree had changes on top of it).

bench/report.py writes them into machine.md and results.json; bench.levers and bench.hotkey quote
them in their reports' headers. Reading /proc/cpuinfo, /proc/meminfo and /etc/os-release and running
`nginx -v`, `wrk -v` and git happen here and nowhere else in the bench, so the report itself only
renders: from the same results.json it writes the same text on any machine.

    >>> machine()["cores"] == os.cpu_count()
    True
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path


def _first_line(cmd: list[str]) -> str:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    text = (result.stdout + result.stderr).strip()
    return text.splitlines()[0] if text else "?"


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*(.+)$", cpuinfo, re.M)
    meminfo = Path("/proc/meminfo").read_text()
    mem_kb = int(re.search(r"MemTotal:\s*(\d+)", meminfo).group(1))
    os_release = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    pretty = re.search(r'^PRETTY_NAME="?([^"\n]+)', os_release, re.M)
    import tornado

    from bench import edge
    return {
        "cores": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "cpu_mhz": mhz.group(1).strip() if mhz else "?",
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "os": pretty.group(1) if pretty else platform.system(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": _first_line([edge.nginx_binary(), "-v"]),
        "tornado": tornado.version,
        "wrk": _first_line(["wrk", "-v"]),
        "supervisor": _version("supervisor"),
        "matplotlib": _version("matplotlib"),
    }


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def source() -> str:
    """Which code was measured: the commit, and whether the work tree had changes on top of it."""
    from bench.subjects import REPO
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        # The result pages are not code: make bench writes them as it goes, and a later step's page
        # would otherwise say the code it measured had "uncommitted changes".
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)bench/results", ":(exclude)bench/results-quick"],
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    if not head:
        return "unknown (not a git work tree)"
    return f"commit {head}" + (f" plus uncommitted changes to {len(dirty)} tracked file(s)" if dirty else "")
