"""Closed-loop saturation with wrk (Debian's package; bench/bootstrap.sh installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess


class WrkMissing(RuntimeError):
    pass


def binary() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise WrkMissing("wrk is not installed: run `make bench` (its bootstrap installs it when root) "
                         "or `sudo apt-get install wrk`")
    return path



def run(url: str, seconds: float, connections: int = 32, threads: int = 1) -> dict:
    """`wrk -t1 -c32 -dNs URL`: requests/s, plus anything that was not a 2xx/3xx."""
    cmd = [binary(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    match = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"unexpected wrk output from {' '.join(cmd)}:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    return {
        "rps": float(match.group(1)),
        "requests": int(total.group(1)) if total else None,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(map(int, socket_errors.groups())) if socket_errors else 0,
        "command": " ".join(cmd),
    }
