"""The floor: the least any set-up with the fleet's fast path can do on this machine.

nginx (the fleet's edge settings, bench/edge.py) in front of one Tornado instance answering
`Hello!` (bench/naive_server.py on uvloop, as the fleet's instances run). In place of the heavy
flood, W burners: processes that only spin, at the fleet's worker priority (slow.nice, and the
idle cpu cgroup when the machine allows it). Whatever the fleet adds to the fast path under a
flood beyond what these add (its admission, its pool, its dispatching, moving results) is the
fleet's own cost; what the floor shows is the machine's.

    python -m bench.floor --burn NICE [CGROUP_DIR]    # one burner (the bench starts them)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from bench import procs
from services.slow import cpu_priority


class Burners:
    """`count` spinning processes at the fleet's worker priority, while the context is open."""

    def __init__(self, count: int, nice: int, idle_cgroup: bool, workdir: Path, log: Path):
        self.count, self.nice, self.idle_cgroup, self.log = count, nice, idle_cgroup, log
        self.record = workdir / cpu_priority.RECORD
        self.group: Path | None = None
        self.popens: list = []

    def __enter__(self) -> "Burners":
        if self.idle_cgroup:
            self.group = cpu_priority.create_idle_cgroup(f"bench-floor-{os.getpid()}", self.record)
        args = [str(self.nice)] + ([str(self.group)] if self.group else [])
        for _ in range(self.count):
            self.popens.append(procs.spawn([sys.executable, "-m", "bench.floor", "--burn", *args], self.log))
        return self

    def __exit__(self, *exc: object) -> None:
        running = procs.identify(p.pid for p in self.popens)
        for proc in running:  # each is one process: stop them all at once, not one after the other
            procs.stop([proc], first=signal.SIGKILL, grace=0)
        for popen in self.popens:
            procs.reap(popen)
        self.popens = []
        cpu_priority.remove_recorded(self.record)

    def pids(self) -> list[int]:
        return [p.pid for p in self.popens if p.poll() is None]


def burn(nice: int, group: str | None) -> None:
    os.nice(nice)
    if group:
        cpu_priority.join(Path(group))
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--burn", nargs="+", metavar=("NICE", "CGROUP_DIR"), required=True)
    options = parser.parse_args()
    burn(int(options.burn[0]), options.burn[1] if len(options.burn) > 1 else None)


if __name__ == "__main__":
    main()
