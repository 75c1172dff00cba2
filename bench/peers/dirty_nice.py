"""gunicorn settings (`-c python:bench.peers.dirty_nice`): the dirty workers niced as the fleet's
workers are (slow.nice, and the idle cpu cgroup when the machine allows it).

Through the `dirty_worker_init` hook, which runs in each new dirty worker. Not `dirty_post_fork`,
whose documentation says "just after a dirty worker has been forked": in gunicorn 27.0.1 it runs
in the dirty arbiter, the parent (dirty/arbiter.py, after `os.fork()` returns the child's pid);
niceness set there lands on the arbiter, 10 more per worker spawned (measured: the arbiter at 19,
its first worker at 0, the second at 10)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from services.slow import cpu_priority

NICE = int(os.environ.get("PEER_NICE", "10"))  # the bench passes the fleet's slow.nice
GROUP = os.environ.get("PEER_IDLE_CGROUP", "")  # and an idle group's name, or "" for nice alone
RECORD = Path(os.environ.get("PEER_CGROUP_RECORD", tempfile.gettempdir())) / cpu_priority.RECORD


def dirty_worker_init(worker) -> None:  # noqa: ARG001 - gunicorn's hook signature
    os.nice(NICE)
    if GROUP:
        group = cpu_priority.create_idle_cgroup(GROUP, RECORD)
        if group is not None:
            cpu_priority.join(group)
